"""Who is asking: the project of the key behind a request, and what that project may see.

Files, jobs, fine-tuned models and events belong to the project whose key created them (OpenAI's projects are the
model). The authentication middleware sets `CALLER` for the request it lets through; every lookup of an object by
id or in a list narrows itself to the caller's project through `scoped`, so an object of another project is "no
such object" (404: its existence is not disclosed), never "forbidden". An admin key sees every project. The
service's own workers and housekeeping run outside any request (CALLER None) and see everything.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

from tunelab.serve.db import dumps, now

DEFAULT_PROJECT = "proj-default"  # where the objects and keys of a home made before projects live


@dataclass(frozen=True)
class Caller:
    key_id: str
    project: str
    admin: bool = False


CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("tunelab_caller", default=None)


def current() -> Caller | None:
    return CALLER.get()


@contextlib.contextmanager
def as_service():
    """Within the block, lookups are the service's own (not narrowed to a caller's project): for work a request
    sets off that concerns every project, such as validating every pending job's files."""
    token = CALLER.set(None)
    try:
        yield
    finally:
        CALLER.reset(token)


def project_of_caller() -> str:
    """The project new objects belong to: the caller's (the default one outside a request)."""
    caller = current()
    return caller.project if caller else DEFAULT_PROJECT


def scoped(sql: str, params: tuple = (), column: str = "project") -> tuple[str, tuple]:
    """`sql` (a SELECT … WHERE …, UPDATE or DELETE with a WHERE clause) narrowed to the caller's project: the
    condition is added with AND; an admin or no caller (the service itself) is not narrowed."""
    caller = current()
    if caller is None or caller.admin:
        return sql, params
    return f"{sql} AND {column} = ?", (*params, caller.project)


def visible(row: dict | None) -> dict | None:
    """`row` if the caller may see it, else None (as if there were no such object)."""
    caller = current()
    if row is None or caller is None or caller.admin or row.get("project") == caller.project:
        return row
    return None


QUOTAS = {"running_jobs": "max_running_jobs", "queued_jobs": "max_queued_jobs", "file_bytes": "max_file_bytes"}


class OverQuota(Exception):
    """A project at one of its quotas: the API answers 429 (jobs) or 409 (storage) saying which."""

    def __init__(self, message: str, quota: str, status: int):
        super().__init__(message)
        self.quota, self.status = quota, status


def queued_jobs(con, project: str) -> int:
    """The project's jobs waiting to run (validating their files, or queued)."""
    return con.execute("SELECT COUNT(*) FROM jobs WHERE project = ? AND status IN ('validating_files', 'queued')",
                       (project,)).fetchone()[0]


def running_jobs(con, project: str) -> int:
    return con.execute("SELECT COUNT(*) FROM jobs WHERE project = ? AND status = 'running'", (project,)).fetchone()[0]


def stored_bytes(con, project: str) -> int:
    """The bytes of the project's stored files."""
    return con.execute("SELECT COALESCE(SUM(bytes), 0) FROM files WHERE project = ?", (project,)).fetchone()[0]


def check_queued_jobs(con, project: str) -> None:
    """Refuse one more queued job where the project is at its queued-jobs quota (call inside the insert's
    transaction)."""
    limit = _limit(con, project, "max_queued_jobs")
    if limit is None:
        return
    queued = queued_jobs(con, project)
    if queued >= limit:
        raise OverQuota(f"the project has {queued} queued jobs, its quota (queued_jobs = {limit}): wait for one "
                        "to start or cancel one", "queued_jobs", 429)


def check_file_bytes(con, project: str, adding: int) -> None:
    """Refuse `adding` more stored bytes past the project's file-bytes quota (inside the insert's transaction)."""
    limit = _limit(con, project, "max_file_bytes")
    if limit is None:
        return
    stored = stored_bytes(con, project)
    if stored + adding > limit:
        raise OverQuota(f"the project stores {stored:,} bytes of files and this one adds {adding:,}: over its quota "
                        f"(file_bytes = {limit:,}); delete files first", "file_bytes", 409)


def _limit(con, project: str, column: str) -> int | None:
    row = con.execute(f"SELECT {column} FROM projects WHERE id = ?", (project,)).fetchone()
    return row[0] if row else None


def audit(con, action: str, object_id: str, detail: dict | None = None) -> None:
    """Record who (the key's id and project, never the key) did `action` to `object_id`."""
    caller = current()
    con.execute("INSERT INTO audit (created_at, key_id, project, action, object, detail) VALUES (?, ?, ?, ?, ?, ?)",
                (now(), caller.key_id if caller else None, caller.project if caller else None, action, object_id,
                 dumps(detail) if detail else None))
