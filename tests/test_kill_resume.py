"""A real SIGKILL mid-run through the command line, then `--resume`: the same weights as never stopping."""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

import forkrun
from conftest import make_rows, write_jsonl

pytestmark = pytest.mark.slow


def test_sigkill_then_resume_gives_bitwise_identical_weights(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", make_rows(600, 3))
    args = ["train", "--model", tiny_model, "--train", str(data),
            "--tuning", "full", "--epochs", "3", "--batch-size", "8", "--lr", "1e-3", "--max-length", "32",
            "--train.checkpoint_every", "20", "--train.progress", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    forkrun.run(args + ["--output", tmp_path / "straight"], env=env, check=True)

    killed = tmp_path / "killed"
    proc = forkrun.start(args + ["--output", killed], env=env)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 120
    # 225 steps in all: killed after the checkpoint of step 40 or later, with most of the run still ahead
    while not (latest.is_file() and latest.read_text().strip() >= "step-0000040") and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists()

    resumed = forkrun.run(["train", "--resume", killed], env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(killed / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
