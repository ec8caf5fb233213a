"""PostgreSQL for the service's state (`--db postgresql://…`): the queries the service writes for SQLite, through a
thin adapter, against a database every host can reach.

The adapter translates what differs and nothing else: `?` and `:name` placeholders to psycopg's, SQLite's
`instr` to `strpos`, its column types to PostgreSQL's (the schema stays written once, in tunelab.serve.db), and
a transaction's "BEGIN IMMEDIATE" (SQLite's single writer) to BEGIN plus one transaction-scoped advisory lock,
which serialises the service's writers the same way. Claims add `FOR UPDATE SKIP LOCKED` (tunelab.serve.jobs).
Rows answer by position and by column name, as sqlite3.Row does.
"""
from __future__ import annotations

import re

WRITER_LOCK = 20261207  # the advisory lock every writing transaction holds (any fixed number of ours)
_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")
_TYPES = [(re.compile(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b"), "BIGSERIAL PRIMARY KEY"),
          (re.compile(r"\bINTEGER\b"), "BIGINT"), (re.compile(r"\bREAL\b"), "DOUBLE PRECISION")]


def translate(sql: str, named: bool = False) -> str:
    """A statement of the service's (SQLite's dialect) in PostgreSQL's."""
    sql = sql.replace("instr(", "strpos(")
    return _NAMED.sub(r"%(\1)s", sql) if named else sql.replace("?", "%s")


def ddl(sql: str) -> str:
    """SQLite column types as PostgreSQL's."""
    for pattern, replacement in _TYPES:
        sql = pattern.sub(replacement, sql)
    return sql


class Row:
    """One result row: by position or by column name; dict(row) gives {name: value}."""

    __slots__ = ("_names", "_values")

    def __init__(self, names: tuple[str, ...], values: tuple):
        self._names, self._values = names, values

    def __getitem__(self, key):
        return self._values[key] if isinstance(key, int) else self._values[self._names.index(key)]

    def keys(self) -> tuple[str, ...]:
        return self._names

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


class Cursor:
    def __init__(self, cursor):
        self._cursor = cursor
        self.rowcount = cursor.rowcount
        self._names = tuple(c.name for c in cursor.description) if cursor.description else ()

    def fetchone(self) -> Row | None:
        values = self._cursor.fetchone()
        return None if values is None else Row(self._names, values)

    def fetchall(self) -> list[Row]:
        return [Row(self._names, v) for v in self._cursor.fetchall()]

    def __iter__(self):
        return iter(self.fetchall())


RECONNECT_SECONDS = 60  # how long a statement waits for a database server that went away (a restart) to be back


class Connection:
    """What the service uses of a sqlite3 connection, on PostgreSQL (autocommit; transactions are explicit).

    A connection the server dropped (a restart, a failover) is made again, for up to RECONNECT_SECONDS, and a
    statement that met the drop outside a transaction is sent again; inside one, the transaction is lost with the
    connection, and the error goes to its caller (a worker then releases its job, which resumes from its last
    checkpoint), while the next transaction starts on a new connection."""

    dialect = "postgresql"

    def __init__(self, url: str):
        from tunelab.extras import need

        self._psycopg = need("psycopg", "postgres")
        self.url, self.in_transaction = url, False
        try:
            self.raw = self._psycopg.connect(url, autocommit=True)
        except self._psycopg.OperationalError as e:
            from tunelab.errors import UserError

            raise UserError(f"cannot connect to the PostgreSQL database: {str(e).strip().splitlines()[0]}",
                            "--db") from None

    def execute(self, sql: str, params=()) -> Cursor | None:
        if sql in ("COMMIT", "ROLLBACK"):
            self.in_transaction = False
        if sql == "ROLLBACK" and (self.raw.broken or self.raw.closed):
            return None  # (the transaction went with the connection)
        try:
            return self._execute(sql, params)
        except self._psycopg.OperationalError:
            if self.in_transaction or sql in ("COMMIT", "ROLLBACK") or not self.raw.broken:
                raise
            self._reconnect()
            return self._execute(sql, params)

    def _execute(self, sql: str, params) -> Cursor:
        named = isinstance(params, dict)
        return Cursor(self.raw.execute(translate(sql, named), params if named or params else None))

    def _reconnect(self) -> None:
        import time

        deadline = time.monotonic() + RECONNECT_SECONDS
        while True:
            try:
                self.raw = self._psycopg.connect(self.url, autocommit=True)
                return
            except self._psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def executescript(self, script: str) -> None:
        for statement in script.split(";"):
            if statement.strip():
                self.raw.execute(statement)

    def begin(self) -> None:
        if self.raw.broken or self.raw.closed:
            self._reconnect()
        self.execute("BEGIN")
        self.in_transaction = True
        self.raw.execute("SELECT pg_advisory_xact_lock(%s)", (WRITER_LOCK,))

    def close(self) -> None:
        self.raw.close()
