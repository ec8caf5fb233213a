"""A real `tunelab serve` for tests: its own home, key, free port and the tiny models under HOME/models."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tunelab.serve import keys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    def __init__(self, home: Path, models: dict[str, str], slow_data: Path, workers: int = 1,
                 max_upload_mb: float = 100, args: tuple[str, ...] = (), env: dict | None = None):
        self.home, self.workers, self.max_upload_mb = Path(home), workers, max_upload_mb
        self.slow_data, self.args, self.env = slow_data, list(args), env or {}
        (self.home / "models").mkdir(mode=0o700, parents=True, exist_ok=True)  # as an admin would: owner only
        for name, folder in models.items():
            link = self.home / "models" / name
            if not link.exists():
                link.symlink_to(folder, target_is_directory=True)
        self.key_id, self.key = keys.create(self.home, "tests")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = self.home / "serve.log"

    # ---- process -----------------------------------------------------------------------------------------------

    def start(self) -> "Service":
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with open(os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tunelab", "serve", "--home", str(self.home), "--port", str(self.port),
                 "--workers", str(self.workers), "--max-upload-mb", str(self.max_upload_mb),
                 *([] if "--rate-limit" in self.args else ["--rate-limit", "0"]), *self.args],
                stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"tunelab serve exited:\n{self.log.read_text()[-3000:]}"
            try:
                if self.request("GET", "/health", auth=False)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"tunelab serve did not answer /health:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the server; its workers and their training processes die with it (PR_SET_PDEATHSIG)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        wait_until(lambda: not self.training_pids(), 20, "training processes outlived the server")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def worker_pids(self) -> list[int]:
        """The server's worker processes (its children: the training processes a worker forks show the same
        command line, but their parent is the worker)."""
        return [pid for pid in _pids(["tunelab", "worker", "--home", str(self.home)])
                if _parent(pid) == self.proc.pid]

    def training_pids(self, job_id: str = "") -> list[int]:
        """The training processes of this service's jobs (of `job_id` alone where given): the children a worker
        forks, named tunelab-train, found by the job lock they hold, whatever their parent is now (one that
        outlived its worker is found too)."""
        jobs = self.home / "jobs"
        wanted = (lambda lock: lock == jobs / job_id / "lock") if job_id else \
            (lambda lock: lock.name == "lock" and lock.parent.parent == jobs)
        return [pid for pid in _pids(["tunelab", "--home", str(self.home)])
                if _name(pid) == "tunelab-train" and any(wanted(f) for f in _open_files(pid))]

    # ---- HTTP --------------------------------------------------------------------------------------------------

    def request(self, method: str, path: str, body=None, auth: bool | str = True, headers=None,
                data: bytes | None = None) -> tuple[int, object]:
        """(status, parsed JSON or text) of one call; `auth` may be a different key to send."""
        headers = dict(headers or {})
        if auth:
            headers["Authorization"] = f"Bearer {self.key if auth is True else auth}"
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                status, raw, kind = r.status, r.read(), r.headers.get("content-type", "")
        except urllib.error.HTTPError as e:
            status, raw, kind = e.code, e.read(), e.headers.get("content-type", "")
        return status, json.loads(raw) if "json" in kind else raw.decode("utf-8", "replace")

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=self.key, max_retries=0, timeout=120)

    def upload(self, path: Path, name: str | None = None) -> str:
        with open(path, "rb") as f:
            return self.client().files.create(file=(name or Path(path).name, f), purpose="fine-tune").id

    def create(self, **body) -> dict:
        status, job = self.request("POST", "/v1/fine_tuning/jobs", body)
        assert status == 200, job
        return job

    def job(self, job_id: str) -> dict:
        return self.request("GET", f"/v1/fine_tuning/jobs/{job_id}")[1]

    def wait(self, job_id: str, status: str | tuple, timeout: float = 120) -> dict:
        wanted = (status,) if isinstance(status, str) else status
        job = {}

        def reached():
            nonlocal job
            job = self.job(job_id)
            return job["status"] in wanted
        wait_until(reached, timeout, lambda: f"job {job_id} never reached {wanted}: {job}\n{self.tail(job_id)}")
        return job

    def events(self, job_id: str) -> list[dict]:
        """All events, oldest first (paging through them as a client does)."""
        out, after = [], ""
        while True:
            page = self.request("GET", f"/v1/fine_tuning/jobs/{job_id}/events?limit=100{after}")[1]
            out += page["data"]
            if not page["has_more"]:
                return out[::-1]
            after = f"&after={page['last_id']}"

    def tail(self, job_id: str) -> str:
        log = self.home / "jobs" / job_id / "train.log"
        return log.read_text()[-2000:] if log.is_file() else self.log.read_text()[-2000:]

    def slow_job(self, epochs: int = 6, batch_size: int = 2) -> str:
        """A classification job on the tiny BERT that trains for some seconds, a checkpoint at every epoch."""
        return self.create(model="tiny-bert", training_file=self.upload(self.slow_data), seed=0, suffix="slow",
                           hyperparameters={"n_epochs": epochs, "batch_size": batch_size,
                                            "learning_rate_multiplier": 20},
                           config={"data": {"max_length": 32}, "eval": {"bootstrap": 0, "probe": False}})["id"]


def wait_until(condition, timeout: float, message, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(message() if callable(message) else message)
        time.sleep(every)


def _pids(parts: list[str]) -> list[int]:
    """Processes whose command line holds all of `parts` (each as a substring of some argument)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            status = (proc / "status").read_text()
        except OSError:
            continue
        if "State:\tZ" in status:
            continue
        if all(any(p in a for a in args) for p in parts):
            found.append(int(proc.name))
    return found


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _open_files(pid: int) -> list[Path]:
    out = []
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                out.append(Path(os.readlink(fd)))
            except OSError:  # closed while read
                pass
    except OSError:  # the process is gone
        pass
    return out


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None
