"""API keys and projects: a key is 32 random bytes shown once at creation; only its SHA-256 is stored. Each key
belongs to one project (tunelab.serve.access); an admin key manages keys and projects and sees every project.

A key carries 256 bits of randomness, so a fast hash is enough (there is nothing to brute-force, unlike a
password); the row is found by its hash and the hash compared again in constant time, so no key is ever compared
or kept in clear and no comparison's time depends on how much of a guess was right.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from pathlib import Path

from tunelab.errors import UserError
from tunelab.serve.access import Caller, audit
from tunelab.serve.db import connect, new_id, now, transaction

PROJECT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

PREFIX = "tl-"


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create(home: Path, name: str, project: str = "default", admin: bool = False) -> tuple[str, str]:
    """(key id, key) of a new key of the project named `project` (made if new). The key itself is returned here
    and nowhere else."""
    if not name.strip():
        raise UserError("a key needs a name (who or what uses it)", "--name")
    project_id = ensure_project(home, project)["id"]
    key = PREFIX + secrets.token_urlsafe(32)
    key_id = new_id("key")
    con = connect(home)
    with transaction(con):
        con.execute("INSERT INTO keys (id, name, prefix, hash, created_at, project, admin) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (key_id, name.strip(), key[:7], _hash(key), now(), project_id, int(admin)))
        audit(con, "api_key.created", key_id, {"project": project_id, "admin": admin})
    return key_id, key


def ensure_project(home: Path, name: str) -> dict:
    """The project named `name`, made if there is none."""
    if not isinstance(name, str) or not PROJECT_NAME.fullmatch(name):
        raise UserError("a project name is 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit",
                        "project")
    con = connect(home)
    with transaction(con):
        if con.execute("SELECT 1 FROM projects WHERE name = ?", (name,)).fetchone() is None:
            project_id = new_id("proj")
            con.execute("INSERT INTO projects (id, name, created_at) VALUES (?, ?, ?)", (project_id, name, now()))
            audit(con, "project.created", project_id, {"name": name})
    return dict(con.execute("SELECT * FROM projects WHERE name = ?", (name,)).fetchone())


def projects(home: Path) -> list[dict]:
    return [dict(r) for r in connect(home).execute("SELECT * FROM projects ORDER BY created_at, id").fetchall()]


def project(home: Path, project_id: str) -> dict | None:
    row = connect(home).execute("SELECT * FROM projects WHERE id = ?", (project_id,)).fetchone()
    return dict(row) if row else None


def listing(home: Path, project_id: str | None = None) -> list[dict]:
    """Every key (or one project's), without its hash."""
    rows = connect(home).execute(
        "SELECT k.id, k.name, k.prefix, k.created_at, k.last_used_at, k.revoked_at, k.project, k.admin, "
        "p.name AS project_name FROM keys k LEFT JOIN projects p ON p.id = k.project "
        "WHERE CAST(? AS TEXT) IS NULL OR k.project = ? ORDER BY k.created_at, k.id",
        (project_id, project_id)).fetchall()
    return [dict(r) for r in rows]


def revoke(home: Path, key_id: str) -> None:
    con = connect(home)
    with transaction(con):
        cur = con.execute("UPDATE keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now(), key_id))
        if cur.rowcount:
            audit(con, "api_key.deleted", key_id)
    if cur.rowcount == 0:
        known = connect(home).execute("SELECT 1 FROM keys WHERE id = ?", (key_id,)).fetchone()
        raise UserError("already revoked" if known else "no such key (see `tunelab keys list`)", key_id)


def verify(home: Path, key: str | None) -> Caller | None:
    """Who a valid, unrevoked key is (its id, project and role), else None. Records when each key was last used
    (to the minute)."""
    if not key or not key.startswith(PREFIX):
        return None
    con = connect(home)
    digest = _hash(key)
    row = con.execute("SELECT id, hash, last_used_at, project, admin FROM keys WHERE hash = ? AND revoked_at IS NULL",
                      (digest,)).fetchone()
    if row is None or not hmac.compare_digest(row["hash"], digest):
        return None
    if not row["last_used_at"] or now() - row["last_used_at"] >= 60:
        con.execute("UPDATE keys SET last_used_at = ? WHERE id = ?", (now(), row["id"]))
    return Caller(row["id"], row["project"], bool(row["admin"]))
