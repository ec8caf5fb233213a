"""tunelab estimate: the counts are the run's own, the activations counted on the meta device agree with a real
forward pass, and the whole estimate is within 25% of a measured run's peak memory (MiniLM, full)."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_jsonl
from tunelab.cli import main


def _estimate(task_config, tuning: str, **train):
    from tunelab.estimate import estimate

    cfg = task_config("classification")
    cfg.tuning.name = tuning
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg, estimate(cfg)


def test_the_counts_are_the_runs_and_the_meta_activations_match_a_real_forward(task_config):
    from tunelab.pipeline import build_job

    cfg, full = _estimate(task_config, "full")
    job = build_job(cfg, torch.device("cpu"))
    # the estimate reads no data, so its head has 2 labels; this run's has 3: one more row of 32 weights and a bias
    assert full.total_params == sum(p.numel() for p in job.model.parameters()) - 33 == full.trainable_params
    assert full.parts["optimizer"] == 2 * full.parts["gradients"] == 8 * full.trainable_params
    _, lora = _estimate(task_config, "lora")
    assert 0 < lora.trainable_params < 0.5 * lora.total_params and lora.parts["optimizer"] < full.parts["optimizer"]

    # the same forward on real tensors: the bytes autograd saves, counted the same way
    job.model.train()
    batch = {"input_ids": torch.randint(5, 1000, (cfg.train.batch_size, cfg.data.max_length)),
             "labels": torch.zeros(cfg.train.batch_size, dtype=torch.long)}
    saved = {}

    def pack(t):
        saved[id(t)] = t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        job.model(**batch)
    real = sum(saved.values())
    from tunelab.models import num_blocks

    meta = full.parts["activations"]
    largest = max(saved.values())
    assert meta == pytest.approx(real + 2 * largest + real / num_blocks(job.model), rel=0.05)

    _, checkpointed = _estimate(task_config, "full", gradient_checkpointing=True)
    _, head = _estimate(task_config, "head")
    # two layers: checkpointing keeps their inputs and recomputes one layer at a time, so at best about half
    assert checkpointed.parts["activations"] < 0.75 * full.parts["activations"]
    assert head.parts["activations"] < 0.05 * full.parts["activations"]


def test_frozen_weights_count_in_model_dtype_and_qlora_in_4_bits(task_config):
    from tunelab.estimate import NF4_BYTES, estimate
    from tunelab.pipeline import build_job

    cfg, lora = _estimate(task_config, "lora")
    job = build_job(cfg, torch.device("cpu"))
    frozen = sum(p.numel() for p in job.model.parameters() if not p.requires_grad)
    adapted = sum(m.weight.numel() for name, m in job.model.named_modules() if name.endswith(".base_layer"))
    cfg.model.dtype = "bfloat16"
    half = estimate(cfg)
    # 4 bytes -> 2 for each frozen weight (the run's head has one label more: peft keeps a frozen copy of the head)
    assert lora.parts["weights"] - half.parts["weights"] == 2 * (frozen - 33)
    cfg.tuning.name = "qlora"
    quarter = estimate(cfg)
    job = build_job(cfg, torch.device("cpu"))  # what bitsandbytes quantized: the blocks' layers and the pooler's
    quantized = sum(m.in_features * m.out_features for m in job.model.modules() if type(m).__name__ == "Linear4bit"
                    and not hasattr(m, "base_layer"))
    assert quantized == adapted + 32 * 32
    assert half.parts["weights"] - quarter.parts["weights"] == pytest.approx(quantized * (2 - NF4_BYTES))
    assert quarter.trainable_params == lora.trainable_params


def test_estimate_says_whether_it_fits_and_what_to_change(tiny_model, capsys):
    assert main(["estimate", "--model", tiny_model, "--task", "classification", "--tuning", "full",
                 "--batch-size", "64", "--max-length", "64", "--device-memory", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "fits a 0.5 GiB device: no" in out and "--train.gradient_checkpointing true" in out
    assert "--tuning lora" not in out or "trains adapters only" in out


@pytest.mark.slow
@pytest.mark.parametrize("model, task, tuning, length, batch", [
    ("minilm", "classification", "full", 128, 16),
    # tunelab's CPU speed-ups off: the estimate counts what PyTorch and transformers keep (README, Memory)
    ("smollm2", "clm", "lora", 256, 2)])
def test_the_estimate_is_within_a_quarter_of_the_measured_peak(model, task, tuning, length, batch, tmp_path):
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while market prices rise and people talk".split()
    rows = 64 if task == "classification" else 5  # every row fills max length (clm: 256-token blocks, 2 steps)
    data = write_jsonl(tmp_path / "long.jsonl", [{"text": " ".join(rng.choices(words, k=260)), "label": "ab"[i % 2]}
                                                 for i in range(rows)])
    args = ["--model", model, "--task", task, "--tuning", tuning, "--max-length", str(length),
            "--batch-size", str(batch)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # fresh processes: a process's peak memory is the largest it ever had
    said = subprocess.run([sys.executable, "-m", "tunelab", "estimate", *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert said.returncode == 0, said.stderr
    estimated = float(next(line for line in said.stdout.splitlines() if "CPU run" in line).split()[2]
                      .replace(",", ""))
    ran = subprocess.run([sys.executable, "-m", "tunelab", "train", *args, "--train", str(data), "--epochs", "1",
                          "--output", str(tmp_path / "run"), "--train.progress", "false", "--eval.bootstrap", "0",
                          "--eval.probe", "false", "--train.speedups", str(task == "classification").lower()],
                         env=env, capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr[-2000:]
    measured = json.loads((tmp_path / "run" / "metrics.json").read_text())["train"]["peak_rss_mb"]
    assert abs(estimated - measured) <= 0.25 * measured, (estimated, measured)


def test_a_language_models_chunked_loss_is_counted_without_its_logits(lm_config):
    """chat with the loss from the hidden states (train.chunked_loss, the default): the activations lose the
    logits the loss from the logits keeps (fp32 [batch x length x vocabulary], and the same again for their
    gradient) and gain one chunk's logits and gradient; with speed-ups off nothing changes."""
    from tunelab.estimate import estimate
    from tunelab.losses import CHUNK_BYTES

    figures = {}
    for chunked, speedups in ((True, True), (False, True), (True, False)):
        cfg = lm_config("chat")
        cfg.train.chunked_loss, cfg.train.speedups = chunked, speedups
        figures[chunked, speedups] = estimate(cfg).parts["activations"]
    vocab = json.loads((Path(lm_config("chat").model.name) / "config.json").read_text())["vocab_size"]
    logits = 8 * 64 * vocab * 4
    assert figures[True, False] == figures[False, True]
    saved = figures[False, True] - (figures[True, True] - 2 * CHUNK_BYTES)
    assert 2 * logits <= saved <= 4 * logits  # the logits, their log-softmax, and the largest-tensor gradient
