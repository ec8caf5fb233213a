"""`tunelab` commands as real child processes, without paying the interpreter's imports for each.

Every child is forked from one process per test worker that imported tunelab's training stack once and never ran
a model (multiprocessing's forkserver, so nothing threaded is forked). The child runs the command line's entry
point, `tunelab.cli.main`, as `python -m tunelab` does, with its own pid, environment, working directory, standard
output and error and exit code, and can be killed like any process. Starting one takes a fraction of a second
instead of the ~8 s that importing torch and transformers costs a fresh interpreter (suite time, issue 25).

What differs from a fresh interpreter: settings libraries read when they are imported (HF_HOME, HF_HUB_OFFLINE)
come from the fork server's start, not from `env` (OMP_NUM_THREADS is applied with torch.set_num_threads); a test
that changes those, or that is about the interpreter itself (`python -m tunelab`, an installed wheel), starts
`sys.executable` instead.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PRELOAD = ["tunelab.cli", "tunelab.pipeline", "tunelab.predict", "tunelab.export", "tunelab.check"]
_context = None


def _server():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _child(argv: list[str], env: dict, cwd: str, out: str, err: str) -> None:
    """In the forked child: the environment, folder and output files given, then `tunelab ARGV`."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(file, fd)
        os.close(file)
    threads = env.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:  # OpenMP read it when the server loaded torch: as a fresh process
        import torch

        torch.set_num_threads(int(threads))
    sys.argv = ["tunelab", *argv]
    from tunelab.cli import main

    sys.exit(main(argv))  # multiprocessing turns SystemExit into the exit code and an exception into 1


class Child:
    """A running `tunelab` command (the parts of subprocess.Popen the tests use)."""

    def __init__(self, argv, env: dict | None = None, cwd=None):
        self.args = [str(a) for a in argv]
        self._folder = Path(tempfile.mkdtemp(prefix="tunelab-child-"))
        self._out, self._err = self._folder / "stdout", self._folder / "stderr"
        self._proc = _server().Process(target=_child, args=(
            self.args, dict(os.environ if env is None else env), str(cwd or os.getcwd()), str(self._out),
            str(self._err)))
        self._proc.start()
        self.pid = self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.exitcode

    def poll(self) -> int | None:
        return self._proc.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._proc.exitcode

    def __del__(self):
        shutil.rmtree(self._folder, ignore_errors=True)  # a child killed or never read: its output files

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        self._proc.kill()

    def result(self, timeout: float | None = None) -> subprocess.CompletedProcess:
        """Waits for the end; the exit code and the text the command wrote."""
        code = self.wait(timeout)
        try:
            out = self._out.read_text(errors="replace")
            err = self._err.read_text(errors="replace")
        finally:
            shutil.rmtree(self._folder, ignore_errors=True)
        return subprocess.CompletedProcess(self.args, code, out, err)


def start(argv, env: dict | None = None, cwd=None) -> Child:
    return Child(argv, env, cwd)


def run(argv, env: dict | None = None, cwd=None, check: bool = False, timeout: float = 900
        ) -> subprocess.CompletedProcess:
    """`tunelab ARGV` to its end, like subprocess.run(..., capture_output=True, text=True)."""
    child = Child(argv, env, cwd)
    try:
        done = child.result(timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        raise
    if check and done.returncode:
        raise subprocess.CalledProcessError(done.returncode, done.args, done.stdout, done.stderr)
    return done
