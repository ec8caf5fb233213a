"""Fine-tuning jobs: their state machine, events, claiming and reaping (job_request.py checks a request into a job).

validating_files → queued → running → succeeded | failed | cancelled. A worker takes a queued job with one
conditional UPDATE inside BEGIN IMMEDIATE, so two workers never take the same one. A running job whose worker
died (its lock file is free) goes back to the queue and resumes from its checkpoint, until MAX_ATTEMPTS.
"""
from __future__ import annotations

import fcntl
import os
import re
import time
from pathlib import Path

from tunelab.errors import UserError
from tunelab.serve import access, files, storage
from tunelab.serve.db import connect, dialect, dumps, loads, now, transaction

MAX_ATTEMPTS = 3
UNFINISHED = ("validating_files", "queued", "running")


class Conflict(UserError):
    """A request that clashes with the current state (HTTP 409)."""


# ---- models a job can start from -------------------------------------------------------------------------------

def bundled_models() -> list[str]:
    from tunelab.models import BUNDLED
    from tunelab.models.gguf import GGUF_MODELS
    from tunelab.models.vision import VISION_MODELS

    return [*BUNDLED, *GGUF_MODELS, *VISION_MODELS]


def local_models(home: Path) -> list[str]:
    folder = Path(home) / "models"
    return sorted(p.name for p in folder.iterdir() if (p / "config.json").is_file()) if folder.is_dir() else []


def tuned(home: Path, name: str) -> dict | None:
    """The succeeded job that made the fine-tuned model `name`."""
    row = connect(home).execute(*access.scoped("SELECT * FROM jobs WHERE fine_tuned_model = ? AND "
                                               "status = 'succeeded'", (name,))).fetchone()
    return dict(row) if row else None


def by_model_name(home: Path, name: str) -> dict | None:
    """The job (finished or not) whose fine-tuned model is, or will be, called `name` (model_name), if the caller
    may see it."""
    short = name.rsplit(":", 1)[-1]
    if not name.startswith("ft:") or len(short) != 12:
        return None
    rows = connect(home).execute(*access.scoped("SELECT * FROM jobs WHERE substr(id, 7, 12) = ?", (short,)))
    return next((dict(r) for r in rows if model_name(dict(r)) == name), None)


def run_dir(home: Path, job_id: str) -> Path:
    return storage.job_dir(home, job_id) / "run"


def model_name(job: dict) -> str:
    base = job["model"].split(":")[1] if job["model"].startswith("ft:") else job["model"]
    return ":".join(["ft", base, *([job["suffix"]] if job["suffix"] else []), job["id"].split("-", 1)[1][:12]])


# ---- reading ------------------------------------------------------------------------------------------------

def get(home: Path, job_id: str) -> dict | None:
    """The job `job_id`, if the caller's project may see it (tunelab.serve.access)."""
    row = connect(home).execute(*access.scoped("SELECT * FROM jobs WHERE id = ?", (job_id,))).fetchone()
    return dict(row) if row else None


def public(job: dict) -> dict:
    """The OpenAI fine_tuning.job object, plus tunelab's task, tuning, attempts and started_at."""
    hp = loads(job["hyperparameters"])
    method = loads(job["method"])
    inner = {"hyperparameters": hp}
    return {"id": job["id"], "object": "fine_tuning.job", "created_at": job["created_at"], "model": job["model"],
            "status": job["status"], "training_file": job["training_file"],
            "validation_file": job["validation_file"],
            "hyperparameters": {k: hp[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")},
            "method": {"type": method["type"], method["type"]: inner}, "seed": job["seed"],
            "error": loads(job["error"]), "fine_tuned_model": job["fine_tuned_model"],
            "finished_at": job["finished_at"], "result_files": loads(job["result_files"], []),
            "trained_tokens": job["trained_tokens"],
            "estimated_finish": job["estimated_finish"] if job["status"] == "running" else None, "integrations": [],
            "organization_id": "tunelab", "user_provided_suffix": job["suffix"], "metadata": loads(job["metadata"]),
            "task": job["task"], "tuning": job["tuning"], "attempts": job["attempts"],
            "started_at": job["started_at"]}


def listing(home: Path, after: str | None, limit: int) -> tuple[list[dict], bool]:
    con = connect(home)
    after_seq = None
    if after:
        row = con.execute(*access.scoped("SELECT seq FROM jobs WHERE id = ?", (after,))).fetchone()
        if row is None:
            raise UserError(f"no job {after!r}", "after")
        after_seq = row["seq"]
    sql, params = access.scoped("SELECT * FROM jobs WHERE seq < ?", (after_seq if after_seq is not None else 2**62,))
    rows = con.execute(sql + " ORDER BY seq DESC LIMIT ?", (*params, limit + 1)).fetchall()
    return [public(dict(r)) for r in rows[:limit]], len(rows) > limit


def add_event(con, job_id: str, message: str, level: str = "info", kind: str = "message", data=None,
              once: str | None = None) -> None:
    """Record an event; one with a `once` key (a metric row's step) only if the job has none with that key yet,
    so attempts that resume from the same checkpoint never report a step twice."""
    con.execute("INSERT INTO events (job_id, created_at, level, type, message, data, once) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (job_id, once) WHERE once IS NOT NULL DO NOTHING",
                (job_id, now(), level, kind, message, dumps(data) if data is not None else None, once))


def events(home: Path, job_id: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
    after_seq = 2**62
    if after:
        m = re.fullmatch(r"ftevent-([0-9]{1,18})", after)
        if not m:
            raise UserError(f"not an event id: {after!r}", "after")
        after_seq = int(m.group(1))
    rows = connect(home).execute("SELECT * FROM events WHERE job_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
                                 (job_id, after_seq, limit + 1)).fetchall()
    out = [{"id": f"ftevent-{r['seq']}", "object": "fine_tuning.job.event", "created_at": r["created_at"],
            "level": r["level"], "type": r["type"], "message": r["message"], "data": loads(r["data"])}
           for r in rows[:limit]]
    return out, len(rows) > limit


# ---- state changes ------------------------------------------------------------------------------------------

def finish(con, job_id: str, status: str, message: str, level: str = "info", error: dict | None = None,
           **fields) -> None:
    """Set a terminal state with finished_at (the caller holds the transaction and has checked the current state)."""
    sets = {"status": status, "finished_at": now(), "error": dumps(error) if error else None,
            "cancel_requested": 0, **fields}
    con.execute(f"UPDATE jobs SET {', '.join(f'{k} = :{k}' for k in sets)} WHERE id = :id", {**sets, "id": job_id})
    add_event(con, job_id, message, level)


def cancel(home: Path, job_id: str) -> dict:
    con = connect(home)
    with transaction(con):
        job = get(home, job_id)
        if job is None:
            raise LookupError(job_id)
        if job["status"] in ("validating_files", "queued"):
            finish(con, job_id, "cancelled", "The job was cancelled before it started")
        elif job["status"] == "running":
            con.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            add_event(con, job_id, "Cancellation requested")
        else:
            raise Conflict(f"the job has already {job['status']}", job_id)
    return get(home, job_id)


def validate_pending(home: Path) -> None:
    """Check the files of every job in validating_files with its task's reader: queued, or failed with the line.
    Every project's: a request that sets it off (a new job) must not narrow it to its own project."""
    with access.as_service():
        _validate_pending(home)


def _validate_pending(home: Path) -> None:
    con = connect(home)
    for job in con.execute("SELECT * FROM jobs WHERE status = 'validating_files' ORDER BY seq").fetchall():
        error = None
        for key in ("training_file", "validation_file"):
            row = files.get(home, job[key]) if job[key] else None
            if job[key] and row is None:
                error = {"code": f"invalid_{key}", "message": f"the file {job[key]} was deleted", "param": key}
                break
            if row:
                try:
                    files.check(files.path_of(home, row), job["task"], row["filename"])
                except UserError as e:
                    error = {"code": f"invalid_{key}", "message": str(e), "param": key}
                    break
        with transaction(con):
            if con.execute("SELECT status FROM jobs WHERE id = ?", (job["id"],)).fetchone()[0] != "validating_files":
                continue  # cancelled meanwhile
            if error:
                finish(con, job["id"], "failed", f"File validation failed: {error['message']}", "error", error)
            else:
                con.execute("UPDATE jobs SET status = 'queued' WHERE id = ?", (job["id"],))
                add_event(con, job["id"], "Files validated, moving job to queued state")


def claim(home: Path, worker_id: str) -> dict | None:
    """Take the oldest queued job for this worker, or None. Atomic across processes. A job whose project runs as
    many jobs as its running-jobs quota allows waits in the queue; the next project's job goes first."""
    con = connect(home)
    with transaction(con):
        row = con.execute(
            "SELECT j.id, j.attempts FROM jobs j LEFT JOIN projects p ON p.id = j.project WHERE j.status = 'queued' "
            "AND (p.max_running_jobs IS NULL OR (SELECT COUNT(*) FROM jobs r WHERE r.project = j.project "
            "AND r.status = 'running') < p.max_running_jobs) ORDER BY j.seq LIMIT 1"
            + (" FOR UPDATE OF j SKIP LOCKED" if dialect(con) == "postgresql" else "")).fetchone()
        if row is None:
            return None
        con.execute("UPDATE jobs SET status = 'running', worker_id = ?, attempts = attempts + 1, heartbeat_at = ?, "
                    "started_at = COALESCE(started_at, ?) WHERE id = ? AND status = 'queued'",
                    (worker_id, now(), now(), row["id"]))
        attempt = row["attempts"] + 1
        add_event(con, row["id"], "Fine-tuning job started" if attempt == 1 else
                  f"Fine-tuning job restarted (attempt {attempt} of {MAX_ATTEMPTS})")
    return get(home, row["id"])


def owns(con, job_id: str, worker_id: str, attempt: int) -> bool:
    return con.execute("SELECT 1 FROM jobs WHERE id = ? AND worker_id = ? AND attempts = ? AND status = 'running'",
                       (job_id, worker_id, attempt)).fetchone() is not None


def release(con, job: dict, why: str) -> None:
    """A running job lost its worker or its training process: queue it again, or fail it after MAX_ATTEMPTS."""
    if job["cancel_requested"]:
        finish(con, job["id"], "cancelled", "The job was cancelled")
    elif job["attempts"] >= MAX_ATTEMPTS:
        finish(con, job["id"], "failed", f"{why}; gave up after {MAX_ATTEMPTS} attempts", "error",
               {"code": "worker_lost", "message": f"{why} in each of {MAX_ATTEMPTS} attempts", "param": None},
               worker_id=None)
    else:
        con.execute("UPDATE jobs SET status = 'queued', worker_id = NULL WHERE id = ?", (job["id"],))
        add_event(con, job["id"], f"{why}; the job is queued again and resumes from its last checkpoint "
                                  f"(attempt {job['attempts']} of {MAX_ATTEMPTS} used)", "warn")


def give_back(con, job_id: str, message: str | None = None) -> None:
    """Put a claimed job back in the queue without counting the attempt (its worker stopped on purpose)."""
    con.execute("UPDATE jobs SET status = 'queued', worker_id = NULL, attempts = attempts - 1 WHERE id = ?",
                (job_id,))
    if message:
        add_event(con, job_id, message, "warn")


# ---- worker liveness ------------------------------------------------------------------------------------------

def worker_lock(home: Path, worker_id: str) -> Path:
    return Path(home) / "workers" / f"{worker_id}.lock"


def server_lock(home: Path, server_id: str) -> Path:
    return Path(home) / "servers" / f"{server_id}.lock"


LEASE_ENV = "TUNELAB_LEASE_SECONDS"


def lease_seconds() -> float:
    """How long a job stays a worker's without a heartbeat, where workers may be on other hosts (PostgreSQL)."""
    return float(os.environ.get(LEASE_ENV) or 60)


def worker_alive(home: Path, worker_id: str | None, job=None) -> bool:
    """Whether the worker running `job` is alive. With SQLite (one host): whether its process still holds its lock
    (the kernel frees it at death, SIGKILL included). With PostgreSQL, whose workers may run on other hosts:
    whether it renewed the job's lease — its heartbeat, written every second while the job trains — within
    `lease_seconds`."""
    if not worker_id:
        return False
    if dialect(connect(home)) == "postgresql":
        return job is not None and job["heartbeat_at"] is not None and time.time() - job["heartbeat_at"] < \
            lease_seconds()
    return _held(worker_lock(home, worker_id))


def died_with_server(home: Path, con, worker_id: str) -> bool:
    """Whether a dead worker was started by a `tunelab serve` that is gone too: the server was stopped or killed,
    and its workers died with it (PR_SET_PDEATHSIG). That is no fault of the job, so it costs no attempt."""
    if dialect(con) == "postgresql":  # (its server may be on another host: its lock says nothing here)
        return False
    row = con.execute("SELECT server_id FROM workers WHERE id = ?", (worker_id,)).fetchone()
    return bool(row and row["server_id"]) and not _held(server_lock(home, row["server_id"]))


def _held(lock: Path) -> bool:
    """Whether some process holds an exclusive flock on `lock`."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing also drops the lock if we just took it
    return False


def reap(home: Path) -> None:
    """Queue again (or fail) every running job whose worker is gone."""
    con = connect(home)
    for job in con.execute("SELECT * FROM jobs WHERE status = 'running'").fetchall():
        if worker_alive(home, job["worker_id"], job):
            continue
        with transaction(con):
            current = get(home, job["id"])
            if current["status"] != "running" or current["worker_id"] != job["worker_id"]:
                continue
            # Forgiven at most MAX_ATTEMPTS times: a job that takes its whole host down each time must still end.
            if not current["cancel_requested"] and current["free_restarts"] < MAX_ATTEMPTS and \
                    died_with_server(home, con, job["worker_id"]):
                con.execute("UPDATE jobs SET free_restarts = free_restarts + 1 WHERE id = ?", (job["id"],))
                give_back(con, job["id"], "The service stopped while this job ran; the job is queued again and "
                                          "resumes from its last checkpoint (no attempt counted)")
            else:
                release(con, current, "The worker running this job stopped")
