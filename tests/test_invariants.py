"""Invariants of the loop: resume equals uninterrupted, accumulation and processes don't change the result."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import one_and_two_processes
import torch
from safetensors.torch import load_file

from tunelab.pipeline import train


class Crash(Exception):
    pass


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("name", ["full", "lora"])
def test_resume_after_crash_equals_uninterrupted_bitwise(name, toy_config, tmp_path):
    toy_config.tuning.name = name
    toy_config.train.checkpoint_every, toy_config.train.eval_every, toy_config.train.epochs = 4, 3, 2
    toy_config.output = str(tmp_path / "straight")
    straight = train(toy_config)

    def crash_at_7(step: int) -> None:
        if step == 7:  # after the step-4 checkpoint, before the next one: steps 5-7 are lost and redone
            raise Crash

    toy_config.output = str(tmp_path / "resumed")
    with pytest.raises(Crash):
        train(toy_config, on_step=crash_at_7)
    assert not (tmp_path / "resumed" / "metrics.json").exists()  # an interrupted run never looks complete
    resumed = train(toy_config, resume=True)

    a, b = weights(straight.run_dir), weights(resumed.run_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(straight.run_dir) == losses(resumed.run_dir)  # history rewound to the checkpoint, then redone
    assert straight.eval == resumed.eval


def test_batch_8_equals_batch_4_with_accumulation_2(toy_config, tmp_path):
    toy_config.model.dropout = 0.0  # dropout masks depend on batch shapes; the invariant is about the gradient
    toy_config.tuning.name = "full"
    toy_config.output = str(tmp_path / "b8")
    toy_config.train.batch_size, toy_config.train.grad_accum = 8, 1
    a = train(toy_config)
    toy_config.output = str(tmp_path / "b4x2")
    toy_config.train.batch_size, toy_config.train.grad_accum = 4, 2
    b = train(toy_config)
    assert losses(a.run_dir) == pytest.approx(losses(b.run_dir), abs=1e-5)
    assert_weights_close(a.run_dir, b.run_dir, toy_config.train.lr)


def assert_weights_close(a: Path, b: Path, lr: float) -> None:
    # Adam divides by sqrt(v): for weights whose gradient is ~0, float rounding of the summed gradient can flip an
    # update of size ~lr. Every loss above agrees to 1e-5; the weights must agree to a fraction of one step.
    wa, wb = weights(a), weights(b)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 0.2 * lr


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(toy_config, tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU), batch 4 per process == one process with batch 8."""
    toy_config.model.dropout = 0.0
    toy_config.tuning.name = "full"
    one, two = one_and_two_processes(toy_config, tmp_path)
    assert json.loads((two / "metrics.json").read_text())["train"]["world_size"] == 2
    assert losses(one) == pytest.approx(losses(two), abs=1e-5)
    assert_weights_close(one, two, toy_config.train.lr)


def test_an_augmented_image_run_resumed_after_a_crash_equals_the_uninterrupted_one(task_config, tmp_path):
    """The random views of a resumed run are the ones the uninterrupted run drew: the augmentation's random state
    is part of every checkpoint."""
    cfg = task_config("image-classification")
    cfg.tuning.name, cfg.train.augment = "full", "flip,rotate,zoom,randaugment"
    cfg.train.checkpoint_every, cfg.train.eval_every, cfg.train.epochs = 4, 5, 2  # 9 steps an epoch
    cfg.output = str(tmp_path / "straight")
    straight = train(cfg)

    def crash_at_11(step: int) -> None:
        if step == 11:  # in the second epoch, after the step-8 checkpoint: steps 9-11 are lost and redone
            raise Crash

    cfg.output = str(tmp_path / "resumed")
    with pytest.raises(Crash):
        train(cfg, on_step=crash_at_11)
    resumed = train(cfg, resume=True)
    a, b = weights(straight.run_dir), weights(resumed.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(straight.run_dir) == losses(resumed.run_dir)
