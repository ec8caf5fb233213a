"""The service's state: one SQLite database in WAL mode under the service home, one connection per thread.

Every write that reads before it writes runs inside `BEGIN IMMEDIATE` (`transaction`), so two processes never
both see a job as free. WAL lets the API read while a worker writes; `synchronous=NORMAL` keeps the database
consistent through any process kill (only an OS crash can lose the last transactions).

The home is the owner's alone: the folder is created 0700 and the database 0600 (SQLite gives its -wal and -shm
files the database's mode); the service's processes run with umask 077, so uploads and run folders are too.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
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
    heartbeat_at REAL, estimated_finish INTEGER, ran_seconds REAL NOT NULL DEFAULT 0,
    free_restarts INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, seq);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_model ON jobs(fine_tuned_model);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, created_at INTEGER NOT NULL,
    level TEXT NOT NULL, type TEXT NOT NULL, message TEXT NOT NULL, data TEXT, once TEXT);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, seq);
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, prefix TEXT NOT NULL, hash TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL, last_used_at INTEGER, revoked_at INTEGER);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY, pid INTEGER NOT NULL, started_at INTEGER NOT NULL, stopped_at INTEGER, server_id TEXT);
CREATE TABLE IF NOT EXISTS projects (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, created_at INTEGER NOT NULL, archived_at INTEGER);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, created_at INTEGER NOT NULL, key_id TEXT, project TEXT,
    action TEXT NOT NULL, object TEXT NOT NULL, detail TEXT);
"""
# Columns added since the first release: (table, column, declaration), added to an older database on open.
# Version 1 (projects): every key, file and job belongs to a project; a home from before is in `default`.
ADDED = [("events", "once", "TEXT"), ("workers", "server_id", "TEXT"),
         ("jobs", "ran_seconds", "REAL NOT NULL DEFAULT 0"), ("jobs", "free_restarts", "INTEGER NOT NULL DEFAULT 0"),
         ("keys", "project", "TEXT NOT NULL DEFAULT 'proj-default'"), ("keys", "admin", "INTEGER NOT NULL DEFAULT 0"),
         ("files", "project", "TEXT NOT NULL DEFAULT 'proj-default'"),
         ("jobs", "project", "TEXT NOT NULL DEFAULT 'proj-default'"),
         # version 2: per-project quotas set by an admin (NULL: no limit)
         ("projects", "max_running_jobs", "INTEGER"), ("projects", "max_queued_jobs", "INTEGER"),
         ("projects", "max_file_bytes", "INTEGER"),
         # version 3: the text encoding an upload was detected in (it is stored converted to UTF-8)
         ("files", "encoding", "TEXT NOT NULL DEFAULT 'utf-8'")]
VERSION = 3  # PRAGMA user_version of a database this code has migrated
# After ADDED: an event with a `once` key (a metric row's step) is recorded once per job, whatever resumes.
INDEXES = """CREATE UNIQUE INDEX IF NOT EXISTS events_once ON events(job_id, once) WHERE once IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_project ON jobs(project, seq);
CREATE INDEX IF NOT EXISTS files_project ON files(project, created_at);"""

_local = threading.local()


def now() -> int:
    return int(time.time())


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


DB_ENV = "TUNELAB_DB"  # a postgresql:// URL: the state there instead of HOME/tunelab.db (`--db`; workers inherit it)


def url() -> str | None:
    """The PostgreSQL database the service's processes share, if one was given."""
    return os.environ.get(DB_ENV) or None


def connect(home: Path):
    """This thread's connection: to the PostgreSQL database of `--db` when one was given (tunelab.serve.pg), else to
    HOME/tunelab.db (created with its tables on first use)."""
    cache = getattr(_local, "connections", None)
    if cache is None:
        cache = _local.connections = {}
    if url():
        if url() not in cache:
            cache[url()] = _connect_pg(url())
        return cache[url()]
    path = str(Path(home) / "tunelab.db")
    if path not in cache:
        private_dir(Path(home))
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        for made in (path, path + "-wal", path + "-shm"):  # a database made before files were private
            if os.path.exists(made):
                _tighten(Path(made), 0o600)
        con = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute("PRAGMA foreign_keys=ON")
        con.executescript(SCHEMA)
        _migrate(con)
        cache[path] = con
    return cache[path]


def private_dir(path: Path) -> Path:
    """`path` as a folder only its owner can enter (created 0700; an existing one of ours loses group and other
    bits)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _tighten(path, 0o700)
    return path


def _tighten(path: Path, mode: int) -> None:
    """Drop group and other bits of a file or folder this user owns (another user's is left as it is)."""
    try:
        st = path.stat()
        if st.st_mode & 0o077 and st.st_uid == os.getuid():
            os.chmod(path, mode)
    except FileNotFoundError:  # a -wal or -shm file removed meanwhile by another process's last close
        pass


def _migrate(con: sqlite3.Connection) -> None:
    """Bring an older database to VERSION: the columns added since (existing rows take their defaults: a home
    from before projects has its keys, files and jobs in the `default` project), the default project's row, the
    indexes; then record VERSION in PRAGMA user_version."""
    if con.execute("PRAGMA user_version").fetchone()[0] >= VERSION:
        return
    for table, column, declaration in ADDED:
        if column not in [r["name"] for r in con.execute(f"PRAGMA table_info({table})")]:
            with transaction(con):
                if column not in [r["name"] for r in con.execute(f"PRAGMA table_info({table})")]:
                    con.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
    with transaction(con):
        con.execute("INSERT OR IGNORE INTO projects (id, name, created_at) VALUES ('proj-default', 'default', ?)",
                    (now(),))
        con.execute(f"PRAGMA user_version = {VERSION}")
    con.executescript(INDEXES)


def _connect_pg(address: str):
    """A connection to the PostgreSQL database, its tables made or brought to VERSION on first use: the same schema
    and added columns as SQLite's (tunelab.serve.pg translates the types), under the writers' lock."""
    from tunelab.serve import pg

    con = pg.Connection(address)
    with transaction(con):
        con.executescript(pg.ddl(SCHEMA))
        for table, column, declaration in ADDED:
            con.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {pg.ddl(declaration)}")
        con.execute("ALTER TABLE files ADD COLUMN IF NOT EXISTS rowid BIGSERIAL")  # (SQLite's implicit order)
        con.executescript(INDEXES)
        con.execute("INSERT INTO projects (id, name, created_at) VALUES ('proj-default', 'default', ?) "
                    "ON CONFLICT DO NOTHING", (now(),))
        con.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        con.execute("INSERT INTO meta (key, value) VALUES ('version', ?) ON CONFLICT (key) DO UPDATE SET "
                    "value = excluded.value", (str(VERSION),))
    return con


def dialect(con) -> str:
    return getattr(con, "dialect", "sqlite")


@contextlib.contextmanager
def transaction(con):
    """BEGIN IMMEDIATE … COMMIT: the write lock is taken first, so a read-then-write cannot race another process
    (PostgreSQL: BEGIN and the writers' advisory lock, tunelab.serve.pg)."""
    if dialect(con) == "postgresql":
        con.begin()
    else:
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
    """`PRAGMA integrity_check`: "ok" for a sound database (PostgreSQL checks its own)."""
    con = connect(home)
    return "ok" if dialect(con) == "postgresql" else con.execute("PRAGMA integrity_check").fetchone()[0]
