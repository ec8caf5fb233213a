"""A worker: claims queued jobs and runs each as `tunelab train CONFIG` in a child process.

The worker imports the training stack (torch, transformers, the loop) once when it starts, then forks each job's
training process from itself: a job starts in a fraction of a second instead of the ~8 s a fresh interpreter
spends on those imports. The worker itself never runs a model, so nothing it forks holds threads, an OpenMP pool
or a GPU context. In `ps` the child keeps the worker's command line and is named `tunelab-train`; where the
training stack cannot be imported, jobs start as `python -m tunelab train CONFIG` as before (and fail with that
process's own message).

The worker holds HOME/workers/<id>.lock for its whole life (liveness for `jobs.reap`) and each job's own lock,
which the training child inherits, so a job never has two training processes. The child gets PR_SET_PDEATHSIG:
when the worker dies, the kernel kills its training process too. While the child runs, the worker follows the
run's history.jsonl (step and evaluation rows become metric events), announces checkpoints, and stops the child
within a second of a cancel, or when the job has run longer than the service's limit (`--max-job-hours`).
"""
from __future__ import annotations

import csv
import ctypes
import fcntl
import io
import json
import logging
import os
import runpy
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from tunelab import config as config_mod
from tunelab.errors import cut
from tunelab.rundir import HistoryTail, RunDir, is_train_row, openai_train_metrics, openai_valid_metrics
from tunelab.serve import files, job_request, jobs, storage
from tunelab.serve.db import connect, dumps, loads, new_id, now, transaction

log = logging.getLogger(__name__)

POLL = 0.5  # seconds between looks at the queue, the child, history.jsonl and the cancel flag
GENERATORS = ("clm", "chat", "dpo")  # tasks whose finished model answers prompts: sample generations are shown
SAMPLE_PROMPTS = 3
MAX_ERROR = 500  # characters of a training error passed on to the client


CHILD_ENV = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
PRELOAD = ("tunelab.cli", "tunelab.pipeline", "tunelab.generate")  # what `tunelab train` and `generate` import
CHILD_NAME = b"tunelab-train"  # the forked child's name in ps and top (15 bytes at most)


def _die_with_parent() -> None:  # runs in the child, after the fork (and before the exec of a spawned one)
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn(args: list[str], log: Path, pass_fds=()) -> subprocess.Popen:
    """A `python -m tunelab …` child that dies with this process, its output appended to `log`."""
    env = {**os.environ, **CHILD_ENV}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "tunelab", *args], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, pass_fds=pass_fds,
                                preexec_fn=_die_with_parent)


class Preloaded:
    """Whether this process imported the training stack (see the module's docstring); set once at start."""

    done = False

    @classmethod
    def load(cls) -> None:
        import importlib

        try:
            for name in PRELOAD:
                importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - a missing stack is the job's error to report, not the worker's
            log.warning("the training stack could not be imported (%s: %s); jobs start as new processes",
                        type(e).__name__, e)
            return
        cls.done = True


class Forked:
    """A child forked by `start`: the parts of subprocess.Popen the worker uses."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)  # -N when killed by signal N, as Popen
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None:
            if self.returncode is None:
                self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
            return self.returncode
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"tunelab (pid {self.pid})", timeout)
            time.sleep(0.05)
        return self.returncode

    def terminate(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)


def start(args: list[str], log: Path, pass_fds=()) -> Forked | subprocess.Popen:
    """`tunelab ARGS` in a child that dies with this process, its output appended to `log`: forked from this
    process once it has the training stack (a fork inherits every open descriptor, `pass_fds` among them),
    else spawned with `pass_fds`."""
    if not Preloaded.done:
        return spawn(args, log, pass_fds)
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return Forked(pid)
    code = 1
    try:  # the child: never returns into the worker's code, whatever happens
        _die_with_parent()
        if os.getppid() != parent:  # the worker died before the line above took effect
            os._exit(1)
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(15, CHILD_NAME)  # PR_SET_NAME
        for sig, handler in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.default_int_handler)):
            signal.signal(sig, handler)  # the worker's own handlers would only set its stop flag
        out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.environ.update(CHILD_ENV)
        sys.stdout.reconfigure(line_buffering=True)  # as PYTHONUNBUFFERED for a fresh interpreter: the log is live
        sys.stderr.reconfigure(line_buffering=True)
        sys.argv = ["tunelab", *args]
        runpy.run_module("tunelab", run_name="__main__")  # the package's __main__, as `python -m tunelab` runs it
        code = 0
    except SystemExit as e:
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported in the job's log, as a fresh interpreter would
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


def hold_lock(path: Path, wait: float = 0.0) -> int:
    """An open descriptor holding an exclusive flock on `path`; waits up to `wait` seconds, else raises TimeoutError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise TimeoutError(str(path)) from None
            time.sleep(0.2)


class Stopping:
    """Set by SIGTERM/SIGINT: the worker puts its job back in the queue (no attempt counted) and exits."""

    requested = False

    @classmethod
    def install(cls) -> None:
        def handler(signum, frame):
            cls.requested = True
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def run_worker(home: Path, max_job_hours: float | None = None, server_id: str | None = None) -> None:
    """Claim and run jobs until SIGTERM or SIGINT. `server_id`: the `tunelab serve` that started this worker."""
    home = Path(home)
    os.umask(0o077)  # run folders, logs and result files are the owner's alone; training children inherit it
    Stopping.install()
    Preloaded.load()
    worker_id = new_id("wrk")
    lock = hold_lock(jobs.worker_lock(home, worker_id))
    connect(home).execute("INSERT INTO workers (id, pid, started_at, server_id) VALUES (?, ?, ?, ?)",
                          (worker_id, os.getpid(), now(), server_id))
    log.info("tunelab worker %s (pid %d) serving %s", worker_id, os.getpid(), home)
    try:
        while not Stopping.requested:
            jobs.reap(home)
            job = jobs.claim(home, worker_id)
            if job is None:
                time.sleep(POLL)
                continue
            try:
                Run(home, job, worker_id, max_job_hours).run()
            except Exception as e:  # noqa: BLE001 - a bug here must not strand the job as running
                traceback.print_exc()
                con = connect(home)
                with transaction(con):
                    if jobs.owns(con, job["id"], worker_id, job["attempts"]):
                        jobs.release(con, jobs.get(home, job["id"]), f"The worker failed ({type(e).__name__}: {e})")
    finally:
        connect(home).execute("UPDATE workers SET stopped_at = ? WHERE id = ?", (now(), worker_id))
        os.close(lock)


class Run:
    """One attempt at one job."""

    def __init__(self, home: Path, job: dict, worker_id: str, max_job_hours: float | None = None):
        self.home, self.job, self.worker_id = home, job, worker_id
        # The job's time limit counts the seconds its attempts ran, not the time it waited in the queue or for a
        # stopped service to come back.
        self.limit = max_job_hours * 3600 if max_job_hours else float("inf")
        self.ran_before, self.max_job_hours = job["ran_seconds"], max_job_hours
        self.id, self.attempt = job["id"], job["attempts"]
        self.folder = storage.job_dir(home, self.id)
        self.run_dir = jobs.run_dir(home, self.id)
        self.con = connect(home)
        self.total = loads(job["hyperparameters"])["n_epochs"]  # "auto": the method's, read from the run's config
        self.rundir = RunDir(self.run_dir)
        self.history = HistoryTail(self.run_dir / "history.jsonl")  # the rows not yet turned into events
        self.emitted: set[tuple[bool, int]] = set()  # (evaluation?, step) rows already turned into events
        self.resumed_at = 0  # the step this attempt resumed from (its pace is measured from there)
        self.started = time.monotonic()
        self.estimated_at = float("-inf")  # the first reported step gives the first estimate, then every 5 s
        self.checkpoints: set[int] = set()  # steps of the checkpoints already announced
        self.results: str | None = None  # the id of the step-metrics file, once training succeeded

    def event(self, message: str, level: str = "info", kind: str = "message", data=None,
              once: str | None = None) -> None:
        jobs.add_event(self.con, self.id, message, level, kind, data, once)

    def run(self) -> None:
        try:
            job_lock = hold_lock(self.folder / "lock", wait=30)
        except TimeoutError:  # an earlier training process still runs: it will die with its worker; try later
            with transaction(self.con):
                if jobs.owns(self.con, self.id, self.worker_id, self.attempt):
                    jobs.give_back(self.con, self.id)
            return
        try:
            self._train(job_lock)
        finally:
            os.close(job_lock)

    def _train(self, job_lock: int) -> None:
        cfg_path = self.folder / "config.yaml"
        latest = self.rundir.latest_step()
        if latest is not None:
            self.checkpoints = set(self.rundir.checkpoint_steps())
            self.resumed_at = latest
            self.event(f"Resuming from the checkpoint at step {self.resumed_at}")
            args = ["train", "--resume", str(self.run_dir)]
        else:
            config_mod.save_yaml(job_request.training_config(self.home, self.job), cfg_path)
            args = ["train", str(cfg_path)]
        child = start(args, self.folder / "train.log", pass_fds=(job_lock,))
        state = "running"
        while child.poll() is None:
            time.sleep(POLL)
            self._follow()
            state = "stopping" if Stopping.requested else self._heartbeat()
            if state != "running":
                _stop(child)
                break
        cancelled, lost, late = state == "cancel", state == "lost", state == "time_limit"
        self._follow()
        if lost:
            return  # the job is no longer ours: whoever has it now records what happens
        trained = not (cancelled or late or Stopping.requested) and child.returncode == 0 and \
            (self.run_dir / "metrics.json").is_file()
        if trained:  # before taking the write lock: sample generation takes seconds
            self._prepare_results()
        with transaction(self.con):
            if not jobs.owns(self.con, self.id, self.worker_id, self.attempt):
                return
            if Stopping.requested and not cancelled:
                jobs.give_back(self.con, self.id, "The worker was stopped; the job is queued again and resumes "
                                                  "from its last checkpoint")
            elif cancelled:
                jobs.finish(self.con, self.id, "cancelled", f"The job was cancelled at step {self._last_step()}")
            elif late:
                message = (f"the job ran longer than the service's limit of {self.max_job_hours:g} hours; "
                           f"stopped at step {self._last_step()}, its checkpoints are kept")
                jobs.finish(self.con, self.id, "failed", f"Training stopped: {message}", "error",
                            {"code": "time_limit_exceeded", "message": message, "param": None})
            elif trained:
                self._succeed()
            elif child.returncode < 0:
                job = jobs.get(self.home, self.id)
                jobs.release(self.con, job, f"The training process was killed by signal {-child.returncode}")
            else:
                error = self._error(child.returncode)
                jobs.finish(self.con, self.id, "failed", f"Training failed: {error['message']}", "error", error)

    def _heartbeat(self) -> str:
        row = self.con.execute("SELECT status, worker_id, attempts, cancel_requested FROM jobs WHERE id = ?",
                               (self.id,)).fetchone()
        if row["status"] != "running" or row["worker_id"] != self.worker_id or row["attempts"] != self.attempt:
            return "lost"
        if row["cancel_requested"]:
            return "cancel"
        ran = self.ran_before + time.monotonic() - self.started
        if ran > self.limit:
            return "time_limit"
        self.con.execute("UPDATE jobs SET heartbeat_at = ?, ran_seconds = ? WHERE id = ? AND worker_id = ? AND "
                         "attempts = ?", (time.time(), ran, self.id, self.worker_id, self.attempt))
        return "running"

    # ---- progress ----------------------------------------------------------------------------------------------

    def _follow(self) -> None:
        """New history rows → metric events; new checkpoint folders → message events."""
        for row in self.history.new_rows():
            # Every row, those before the checkpoint this attempt resumed from too: the attempt that wrote them may
            # have been killed before it reported them all. The events' `once` keys drop what it did report.
            key = ("loss" not in row, row.get("step", 0))
            if key not in self.emitted:
                self.emitted.add(key)
                self._metric_event(row)
        for step in self.rundir.checkpoint_steps():
            if step not in self.checkpoints:
                self.checkpoints.add(step)
                self.event(f"Checkpoint saved at step {step}")

    def _epochs(self) -> int:
        """The job's epochs: as requested, or (auto) the method's default that the run's config.yaml resolved."""
        if self.total == "auto":
            self.total = config_mod.load_yaml(self.run_dir / "config.yaml").train.epochs
        return self.total

    def _metric_event(self, row: dict) -> None:
        step = row["step"]
        if is_train_row(row):
            per_epoch = round(step / row["epoch"]) if row["epoch"] else 0
            data = {"step": step, "total_steps": per_epoch * self._epochs(), "epoch": row["epoch"],
                    **openai_train_metrics(row)}
            self.event(f"Step {step}/{data['total_steps']}: training loss={row['loss']:.4f}", kind="metrics",
                       data=data, once=f"train:{step}")
            self._estimate(step, data["total_steps"])
        else:
            data = openai_valid_metrics(row)
            shown = ", ".join(f"{k[6:]}={v:.4f}" for k, v in data.items() if k != "step" and isinstance(v, float))
            self.event(f"Step {step}: validation {shown}", kind="metrics", data=data, once=f"valid:{step}")

    def _estimate(self, step: int, total: int) -> None:
        """estimated_finish from this attempt's pace, refreshed every few seconds."""
        if time.monotonic() - self.estimated_at < 5 or step <= self.resumed_at:
            return
        self.estimated_at = time.monotonic()
        per_step = (self.estimated_at - self.started) / (step - self.resumed_at)
        self.con.execute("UPDATE jobs SET estimated_finish = ? WHERE id = ?",
                         (int(time.time() + per_step * max(0, total - step)), self.id))

    def _last_step(self) -> int:
        row = self.con.execute("SELECT data FROM events WHERE job_id = ? AND type = 'metrics' ORDER BY seq DESC "
                               "LIMIT 1", (self.id,)).fetchone()
        return json.loads(row["data"])["step"] if row else 0

    # ---- the end ---------------------------------------------------------------------------------------------

    def _prepare_results(self) -> None:
        """Sample generations (generators) and the step-metrics result file, made outside any transaction."""
        if self.job["task"] in GENERATORS:
            self._samples()
        self.results = self._results_file()

    def _succeed(self) -> None:
        metrics = self.rundir.metrics()
        name = jobs.model_name(self.job)
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics["eval"].items() if isinstance(v, float))
        self.event(f"Final evaluation: {shown}")
        jobs.finish(self.con, self.id, "succeeded", f"The job has successfully completed; new model: {name}",
                    fine_tuned_model=name, trained_tokens=metrics["train"].get("tokens_seen"),
                    result_files=dumps([self.results]))

    def _results_file(self) -> str:
        """The step metrics as CSV (OpenAI's result file), stored as a file of purpose fine-tune-results."""
        rows = self.rundir.history()
        keys = list(dict.fromkeys(k for r in rows for k in r))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, keys)
        writer.writeheader()
        writer.writerows(rows)
        file_id = new_id("file")
        path = storage.files_dir(self.home) / f"{file_id}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(buf.getvalue(), encoding="utf-8")
        # the job's project's, as the job is (it counts toward that project's stored bytes)
        self.con.execute("INSERT INTO files (id, filename, bytes, created_at, purpose, path, format, records, project) "
                         "VALUES (?, ?, ?, ?, 'fine-tune-results', ?, 'results', ?, ?)",
                         (file_id, "step_metrics.csv", path.stat().st_size, now(), path.name, len(rows),
                          self.job["project"]))
        return file_id

    def _samples(self) -> None:
        """Answers of the fine-tuned model to the first validation (else training) prompts, for the dashboard."""
        prompts = sample_prompts(self.home, self.job)
        if not prompts:
            return
        raw = ["--raw"] if self.job["task"] == "clm" else []
        out = self.run_dir / "samples.jsonl"
        child = start(["generate", str(self.run_dir), *[a for p in prompts for a in ("--prompt", p)], *raw,
                       "--max-new-tokens", "48", "--output", str(out)], self.folder / "samples.log")
        if child.wait() != 0:
            self.event("Sample generations failed (see samples.log in the job folder)", "warn")

    def _error(self, code: int) -> dict:
        """The job's error from the training log: the CLI's `tunelab: error:` line, else the traceback's last line."""
        log = (self.folder / "train.log").read_text(encoding="utf-8", errors="replace").splitlines()
        said = [line[len("tunelab: error: "):] for line in log if line.startswith("tunelab: error: ")]
        message = said[-1] if said else next((line for line in reversed(log) if line.strip()), f"exit code {code}")
        param = None
        for key, file_id in job_request.job_files(self.job).items():  # server paths → the names the client gave
            row = files.get(self.home, file_id)
            if row and str(files.path_of(self.home, row)) in message:
                message = message.replace(str(files.path_of(self.home, row)), row["filename"])
                param = param or key
        for home in sorted({str(self.home.absolute()), str(self.home)}, key=len, reverse=True):
            message = message.replace(home, "HOME")
        message = cut(message, MAX_ERROR)  # a crash's last line may quote anything: the client gets its start
        if param:
            return {"code": f"invalid_{param.rsplit('.', 1)[-1]}", "message": message, "param": param}
        return {"code": "invalid_request" if said else "training_error", "message": message, "param": None}


def sample_prompts(home: Path, job: dict) -> list[str]:
    """Up to SAMPLE_PROMPTS prompts: the first user turn of chat or preference records, or a text's first words."""
    row = files.get(home, job["validation_file"] or job["training_file"])
    prompts = []
    for line in files.path_of(home, row).read_text(encoding="utf-8").splitlines():
        if len(prompts) == SAMPLE_PROMPTS:
            break
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = {"text": line}
        text = _first_user_text(rec)
        if text:
            prompts.append(text[:500])
    return prompts


def _first_user_text(rec) -> str | None:
    if not isinstance(rec, dict):
        return None
    if isinstance(rec.get("prompt"), str):
        return rec["prompt"]
    messages = rec.get("messages") or rec.get("prompt") or (rec.get("input") or {}).get("messages") or []
    for m in messages if isinstance(messages, list) else []:
        if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
            return m["content"]
    text = rec.get("text")
    return " ".join(text.split()[:8]) if isinstance(text, str) else None


def _stop(child: Forked | subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 3 seconds."""
    child.terminate()
    try:
        child.wait(3)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
