"""`tunelab serve`: uvicorn with the API in this process and N supervised worker processes beside it.

Workers are children that die with the server (PR_SET_PDEATHSIG); one that exits is started again, so a job it
was running is re-queued by the housekeeping and resumed.
"""
from __future__ import annotations

import subprocess
import threading
from pathlib import Path

from tunelab.serve.worker import spawn

RESTART_EVERY = 1.0  # seconds between checks that every worker still runs


def serve(home: Path, host: str, port: int, workers: int, max_upload_mb: float) -> None:
    import uvicorn

    from tunelab.serve.app import create_app

    home = Path(home)
    (home / "logs").mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    procs: list[subprocess.Popen] = [_worker(home, i) for i in range(workers)]

    def supervise() -> None:
        while not stop.wait(RESTART_EVERY):
            for i, proc in enumerate(procs):
                if proc.poll() is not None:
                    procs[i] = _worker(home, i)

    threading.Thread(target=supervise, daemon=True, name="supervisor").start()
    print(f"tunelab serve: http://{host}:{port}/ (dashboard), API at /v1, {workers} worker(s), home {home}",
          flush=True)
    def stop_workers() -> None:  # at application shutdown: uvicorn re-raises SIGTERM afterwards, ending the process
        stop.set()
        for proc in procs:
            proc.terminate()  # each worker puts its job back in the queue, no attempt counted
        for proc in procs:
            proc.wait()

    try:
        uvicorn.run(create_app(home, max_upload_mb, stop_workers), host=host, port=port, log_level="info")
    finally:
        if not stop.is_set():
            stop_workers()


def _worker(home: Path, i: int) -> subprocess.Popen:
    return spawn(["worker", "--home", str(home)], home / "logs" / f"worker-{i}.log")
