"""The service's state: one SQLite database in WAL mode under the service home, one connection per thread.

Every write that reads before it writes runs inside `BEGIN IMMEDIATE` (`transaction`), so two processes never
both see a job as free. WAL lets the API read while a worker writes; `synchronous=NORMAL` keeps the database
consistent through any process kill (only an OS crash can lose the last transactions).
"""
from __future__ import annotations

import contextlib
import json
import math
import secrets
import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, bytes INTEGER NOT NULL, created_at INTEGER NOT NULL,
    purpose TEXT NOT NULL, path TEXT NOT NULL, format TEXT NOT NULL, records INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL, created_at INTEGER NOT NULL, model TEXT NOT NULL,
    training_file TEXT NOT NULL, validation_file TEXT, request TEXT NOT NULL, task TEXT NOT NULL,
    tuning TEXT NOT NULL, hyperparameters TEXT NOT NULL, method TEXT NOT NULL, seed INTEGER NOT NULL,
    suffix TEXT, metadata TEXT, status TEXT NOT NULL, error TEXT, fine_tuned_model TEXT, finished_at INTEGER,
    started_at INTEGER, trained_tokens INTEGER, result_files TEXT NOT NULL DEFAULT '[]',
    worker_id TEXT, attempts INTEGER NOT NULL DEFAULT 0, cancel_requested INTEGER NOT NULL DEFAULT 0,
    heartbeat_at REAL, estimated_finish INTEGER);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, seq);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_model ON jobs(fine_tuned_model);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, created_at INTEGER NOT NULL,
    level TEXT NOT NULL, type TEXT NOT NULL, message TEXT NOT NULL, data TEXT);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, seq);
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, prefix TEXT NOT NULL, hash TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL, last_used_at INTEGER, revoked_at INTEGER);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY, pid INTEGER NOT NULL, started_at INTEGER NOT NULL, stopped_at INTEGER);
"""

_local = threading.local()


def now() -> int:
    return int(time.time())


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def connect(home: Path) -> sqlite3.Connection:
    """This thread's connection to HOME/tunelab.db (created with its tables on first use)."""
    path = str(Path(home) / "tunelab.db")
    cache = getattr(_local, "connections", None)
    if cache is None:
        cache = _local.connections = {}
    if path not in cache:
        Path(home).mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute("PRAGMA foreign_keys=ON")
        con.executescript(SCHEMA)
        cache[path] = con
    return cache[path]


@contextlib.contextmanager
def transaction(con: sqlite3.Connection):
    """BEGIN IMMEDIATE … COMMIT: the write lock is taken first, so a read-then-write cannot race another process."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def loads(text: str | None, default=None):
    return json.loads(text) if text else default


def finite(obj):
    """`obj` with NaN and infinities as None: strict JSON (what browsers and FastAPI's responses accept)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj) -> str:
    return json.dumps(finite(obj), ensure_ascii=False)


def integrity(home: Path) -> str:
    """`PRAGMA integrity_check`: "ok" for a sound database."""
    return connect(home).execute("PRAGMA integrity_check").fetchone()[0]
