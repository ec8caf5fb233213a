"""train.strategy fsdp: the model sharded over processes (FSDP2), with the same arithmetic as one process, and
sharded checkpoints that resume on another number of processes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import forkrun
import pytest
import torch
from conftest import one_and_two_processes
from safetensors.torch import load_file

from tunelab.errors import UserError
from tunelab.pipeline import train


class Crash(Exception):
    pass


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def largest_difference(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.mark.slow
def test_fsdp_on_two_processes_equals_one_process_and_resumes_on_one(toy_config, tmp_path):
    """Two processes (gloo), each holding half of every weight, trace one process's loss curve; the sharded
    checkpoint of the first epoch, resumed by one process, finishes the same run."""
    toy_config.model.dropout = 0.0
    toy_config.tuning.name, toy_config.train.strategy = "full", "fsdp"
    toy_config.eval.bootstrap, toy_config.eval.probe = 0, False
    one, two = one_and_two_processes(toy_config, tmp_path, epochs=2)
    metrics = json.loads((two / "metrics.json").read_text())["train"]
    assert metrics["world_size"] == 2 and metrics["strategy"] == "fsdp"
    assert losses(one) == pytest.approx(losses(two), abs=1e-5)
    assert largest_difference(one, two) < 0.2 * toy_config.train.lr  # (Adam on ~0 gradients: see test_invariants)
    first_epoch = two / "checkpoints" / "step-0000012"
    assert sorted(p.name for p in (first_epoch / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]

    # The run as if the two processes had been killed after the first epoch, resumed by one process
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-0000024")
    (resumed / "checkpoints" / "latest").write_text("step-0000012\n")
    (resumed / "metrics.json").unlink()
    config = resumed / "config.yaml"
    config.write_text(config.read_text().replace(str(two), str(resumed)))
    proc = forkrun.run(["train", "--resume", str(resumed)], check=True)
    assert "2 micro-batch(es) of 4 per process keep the run's 8 examples per step" in proc.stderr
    assert json.loads((resumed / "metrics.json").read_text())["train"]["world_size"] == 1
    assert losses(resumed) == pytest.approx(losses(one), abs=1e-5)
    assert largest_difference(one, resumed) < 0.2 * toy_config.train.lr


@pytest.mark.slow
@pytest.mark.parametrize("task, tuning", [("chat", "lora"), ("mlm", "full")])
def test_fsdp_on_tied_embeddings_equals_one_process(task, tuning, lm_config, tmp_path):
    """peft's LoRA on a sharded Llama whose output layer is its input embeddings, and BERT's masked-LM decoder tied
    to its embeddings (which therefore stay in the root unit): the same losses as one process, and the weights
    gathered back from the shards export the same model."""
    cfg = lm_config(task, tuning)
    cfg.train.strategy, cfg.eval.bootstrap, cfg.tuning.lora_dropout = "fsdp", 0, 0.0  # (each process draws its own)
    cfg.model.dropout = 0.0
    one, two = one_and_two_processes(cfg, tmp_path)
    assert losses(one) == pytest.approx(losses(two), abs=1e-5)
    assert largest_difference(one, two) < 0.2 * cfg.train.lr  # the merged exports: every weight gathered back


def test_a_sharded_checkpoint_resumed_after_a_crash_equals_the_uninterrupted_run(toy_config, tmp_path):
    """One process with train.strategy fsdp writes torch.distributed.checkpoint folders (so that any number of
    processes can resume them) and resumes from one exactly, optimizer and schedule included."""
    toy_config.tuning.name, toy_config.train.strategy = "full", "fsdp"
    toy_config.train.checkpoint_every, toy_config.train.early_stopping_patience = 5, 3
    toy_config.output = str(tmp_path / "straight")
    straight = train(toy_config)

    def crash_at_8(step: int) -> None:
        if step == 8:
            raise Crash

    toy_config.output = str(tmp_path / "resumed")
    with pytest.raises(Crash):
        train(toy_config, on_step=crash_at_8)
    assert (tmp_path / "resumed" / "checkpoints" / "step-0000005" / "dcp" / ".metadata").is_file()
    resumed = train(toy_config, resume=True)
    assert losses(straight.run_dir) == losses(resumed.run_dir)
    a, b = weights(straight.run_dir), weights(resumed.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_fsdp_with_accumulation_and_a_short_last_batch_equals_one_process(toy_config, tmp_path):
    """93 examples in global batches of 8 (2 processes x 2 micro-batches of 2): the short batch of 5 gives the first
    process 3 examples (2 micro-batches) and the second 2 (one), and FSDP's collectives still meet (the second runs
    a micro-batch of weight 0)."""
    from conftest import make_rows, write_jsonl

    toy_config.model.dropout, toy_config.tuning.name, toy_config.train.strategy = 0.0, "full", "fsdp"
    toy_config.eval.bootstrap, toy_config.eval.probe = 0, False
    toy_config.data.train = str(write_jsonl(tmp_path / "ninety-three.jsonl", make_rows(93, 3)))
    toy_config.train.grad_accum = 2
    toy_config.train.epochs = 1
    toy_config.train.batch_size, toy_config.output = 4, str(tmp_path / "one")
    from tunelab.config import save_yaml

    save_yaml(toy_config, tmp_path / "one.yaml")
    toy_config.train.batch_size, toy_config.output = 2, str(tmp_path / "two")
    save_yaml(toy_config, tmp_path / "two.yaml")
    forkrun.run(["train", str(tmp_path / "one.yaml")], check=True)
    from conftest import torchrun

    torchrun(["train", str(tmp_path / "two.yaml")])
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), abs=1e-5)
    assert len(losses(tmp_path / "two")) == 12  # ceil(93 / 8)


def test_a_global_batch_that_the_processes_cannot_share_is_refused(toy_config, tmp_path):
    from tunelab.distributed import Dist
    from tunelab.loop import _keep_global_batch

    t = toy_config.train
    t.batch_size, t.grad_accum = 4, 1
    _keep_global_batch(t, Dist(0, 2), 24)  # 24 over 2 processes: 12 each, as 3 micro-batches of 4
    assert (t.batch_size, t.grad_accum) == (4, 3)
    _keep_global_batch(t, Dist(0, 1), 6)  # 6 on one: batch 4 does not divide it, 3 micro-batches of 2 do
    assert (t.batch_size, t.grad_accum) == (2, 3)
    with pytest.raises(UserError, match="takes 9 examples per optimizer step, which 2 processes cannot share"):
        _keep_global_batch(t, Dist(0, 2), 9)


@pytest.mark.parametrize("tuning, task", [("head", "classification"), ("distill", "classification"),
                                          ("full", "image-classification")])
def test_fsdp_is_refused_where_it_does_not_apply(tuning, task, toy_config):
    from tunelab.validate import validate

    toy_config.task, toy_config.tuning.name, toy_config.train.strategy = task, tuning, "fsdp"
    toy_config.tuning.teacher = "runs/teacher" if tuning == "distill" else None
    with pytest.raises(UserError, match="train.strategy fsdp shards a text model's training"):
        validate(toy_config)
