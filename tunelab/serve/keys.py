"""API keys: 32 random bytes shown once at creation; only their SHA-256 is stored.

A key carries 256 bits of randomness, so a fast hash is enough (there is nothing to brute-force, unlike a
password); lookup is by hash, so no key is ever compared or kept in clear.
"""
from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

from tunelab.errors import UserError
from tunelab.serve.db import connect, new_id, now

PREFIX = "tl-"


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create(home: Path, name: str) -> tuple[str, str]:
    """(key id, key). The key itself is returned here and nowhere else."""
    if not name.strip():
        raise UserError("a key needs a name (who or what uses it)", "--name")
    key = PREFIX + secrets.token_urlsafe(32)
    key_id = new_id("key")
    connect(home).execute("INSERT INTO keys (id, name, prefix, hash, created_at) VALUES (?, ?, ?, ?, ?)",
                          (key_id, name.strip(), key[:7], _hash(key), now()))
    return key_id, key


def listing(home: Path) -> list[dict]:
    rows = connect(home).execute("SELECT id, name, prefix, created_at, last_used_at, revoked_at FROM keys "
                                 "ORDER BY created_at, id").fetchall()
    return [dict(r) for r in rows]


def revoke(home: Path, key_id: str) -> None:
    cur = connect(home).execute("UPDATE keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now(), key_id))
    if cur.rowcount == 0:
        known = connect(home).execute("SELECT 1 FROM keys WHERE id = ?", (key_id,)).fetchone()
        raise UserError("already revoked" if known else "no such key (see `tunelab keys list`)", key_id)


def verify(home: Path, key: str | None) -> str | None:
    """The id of a valid, unrevoked key, else None. Records when each key was last used (to the minute)."""
    if not key or not key.startswith(PREFIX):
        return None
    con = connect(home)
    row = con.execute("SELECT id, last_used_at FROM keys WHERE hash = ? AND revoked_at IS NULL",
                      (_hash(key),)).fetchone()
    if row is None:
        return None
    if not row["last_used_at"] or now() - row["last_used_at"] >= 60:
        con.execute("UPDATE keys SET last_used_at = ? WHERE id = ?", (now(), row["id"]))
    return row["id"]
