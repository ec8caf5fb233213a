"""`tunelab serve`: uvicorn with the API in this process and N supervised worker processes beside it.

Workers are children that die with the server (PR_SET_PDEATHSIG); one that exits is started again, so a job it
was running is re-queued by the housekeeping and resumed. The server holds HOME/servers/<id>.lock while it lives
and its workers record its id: a job whose worker died together with the server costs no attempt.

Log lines never carry a key: the access log shows paths without their query strings, and anything that looks
like a key or an Authorization header is masked in every line uvicorn writes.

uvicorn closes an idle keep-alive connection after KEEP_ALIVE seconds but gives a connection that has not finished
sending its request line and headers all the time in the world (its timer starts only after a response), so a few
hundred silent sockets would hold the server. `Deadline` closes such a connection after the body timeout; the
body itself is timed by limits.LimitBody. A public deployment still belongs behind a reverse proxy.
"""
from __future__ import annotations

import copy
import logging
import os
import re
import subprocess
import threading
from pathlib import Path

from tunelab.extras import need
from tunelab.serve.db import new_id, private_dir

log = logging.getLogger(__name__)

RESTART_EVERY = 1.0  # seconds between checks that every worker still runs
KEEP_ALIVE = 5  # seconds an idle connection stays open (uvicorn's default, set here on purpose)
SECRET = re.compile(r"(?i)(tl-[A-Za-z0-9_-]{8,}|bearer\s+\S+|authorization:\s*\S+)")


class Redact(logging.Filter):
    """Masks keys in a log record: the access line's query string and any key-like or Authorization text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            client, method, path, version, status = record.args
            path = str(path).split("?", 1)[0] + ("?…" if "?" in str(path) else "")
            record.args = (client, method, SECRET.sub("…", path), version, status)
        elif SECRET.search(record.getMessage()):
            record.msg, record.args = SECRET.sub("…", record.getMessage()), ()
        return True


def deadline_protocol(seconds: float):
    """uvicorn's h11 protocol, closing a connection that is serving no request and has waited `seconds` since it
    opened or since its last answer: headers that never finish, or a body still trickling in after the answer (a
    401 is sent without reading the body). A request being served (a long generation, say) is never cut."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Deadline(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._waiting_since = self.loop.time()
            self._timer = self.loop.call_later(seconds, self._check_deadline)

        def connection_lost(self, exc) -> None:
            self._timer.cancel()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            self._waiting_since = self.loop.time()  # the next request's headers get their own time
            super().on_response_complete()

        def _check_deadline(self) -> None:
            if self.transport.is_closing():
                return
            serving = self.cycle is not None and not self.cycle.response_complete
            waited = self.loop.time() - self._waiting_since
            if not serving and waited >= seconds:
                self.transport.close()
            else:
                self._timer = self.loop.call_later(seconds if serving else max(seconds - waited, 0.1),
                                                   self._check_deadline)
    return Deadline


def log_config() -> dict:
    """uvicorn's logging with the Redact filter on every handler."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"redact": {"()": Redact}}
    for handler in config["handlers"].values():
        handler["filters"] = ["redact"]
    return config


def need_service_stack():
    """The 'serve' extra, checked before anything starts (uploads need python-multipart; request bodies, and so the
    workers, pydantic): one line naming the extra where a part is missing. Returns uvicorn."""
    for module in ("fastapi", "python_multipart", "pydantic"):
        need(module, "serve")
    return need("uvicorn", "serve")


def serve(home: Path, host: str, port: int, workers: int, max_upload_mb: float,
          max_job_hours: float | None = None, body_timeout: float = 30.0, rate_limit: float = 0) -> None:
    uvicorn = need_service_stack()
    from tunelab.serve.app import create_app
    from tunelab.serve.worker import hold_lock

    os.umask(0o077)  # the database, uploads, logs and run folders are the owner's alone (workers inherit it)
    home = private_dir(Path(home))
    (home / "logs").mkdir(exist_ok=True)
    server_id = new_id("srv")
    lock = hold_lock(home / "servers" / f"{server_id}.lock")  # held until this process ends, however it ends
    stop = threading.Event()
    extra = ["--server-id", server_id] + (["--max-job-hours", str(max_job_hours)] if max_job_hours else [])
    procs: list[subprocess.Popen] = [_worker(home, i, extra) for i in range(workers)]

    def supervise() -> None:
        while not stop.wait(RESTART_EVERY):
            for i, proc in enumerate(procs):
                if proc.poll() is not None:
                    procs[i] = _worker(home, i, extra)

    threading.Thread(target=supervise, daemon=True, name="supervisor").start()
    log.info("tunelab serve: http://%s:%d/ (dashboard), API at /v1, %d worker(s), home %s", host, port, workers, home)
    def stop_workers() -> None:  # at application shutdown: uvicorn re-raises SIGTERM afterwards, ending the process
        stop.set()
        for proc in procs:
            proc.terminate()  # each worker puts its job back in the queue, no attempt counted
        for proc in procs:
            proc.wait()

    try:
        uvicorn.run(create_app(home, max_upload_mb, stop_workers, body_timeout, rate_limit), host=host, port=port, log_level="info",
                    log_config=log_config(), timeout_keep_alive=KEEP_ALIVE, http=deadline_protocol(body_timeout))
    finally:
        if not stop.is_set():
            stop_workers()
        os.close(lock)


def _worker(home: Path, i: int, extra: list[str]) -> subprocess.Popen:
    from tunelab.serve.worker import spawn

    return spawn(["worker", "--home", str(home), *extra], home / "logs" / f"worker-{i}.log")
