"""model.dtype: frozen weights in bfloat16, trained ones float32, training under autocast; the exported model in
bfloat16 answers like the run; auto follows the hardware."""
from __future__ import annotations

import json

import pytest
import torch

from tunelab.pipeline import build_job, train


def test_a_bfloat16_lora_run_keeps_float32_masters_trains_and_exports_in_bfloat16(task_config, tmp_path):
    from safetensors import safe_open

    from tunelab.predict import predict

    cfg = task_config("classification")
    cfg.tuning.name, cfg.model.dtype, cfg.train.epochs, cfg.train.lr = "lora", "bfloat16", 8, 1e-2
    job = build_job(cfg, torch.device("cpu"))
    kinds = {(p.requires_grad, p.dtype) for p in job.model.parameters()}
    assert kinds == {(True, torch.float32), (False, torch.bfloat16)}
    frozen = sum(p.numel() * p.element_size() for p in job.model.parameters() if not p.requires_grad)
    assert frozen == 2 * sum(p.numel() for p in job.model.parameters() if not p.requires_grad)  # half of float32

    result = train(cfg)
    losses = [json.loads(line)["loss"] for line in (result.run_dir / "history.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3])
    assert result.metrics["eval"]["accuracy"] > result.metrics["baseline"]["majority"]["accuracy"] + 0.2
    assert "dtype: bfloat16" in (result.run_dir / "config.yaml").read_text()
    with safe_open(str(result.run_dir / "model" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    out = predict(result.run_dir, cfg.data.eval, tmp_path / "pred.jsonl", runtime="torch")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    right = sum(r["label"] == g for r, g in zip(rows, [json.loads(line)["label"] for line in
                                                        open(cfg.data.eval, encoding="utf-8")]))
    assert right / len(rows) == pytest.approx(result.metrics["eval"]["accuracy"], abs=0.1)


def test_auto_picks_bfloat16_only_where_the_hardware_has_it(monkeypatch):
    from tunelab import models

    monkeypatch.setattr(models, "cpu_has_bf16", lambda: False)
    assert models.weight_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: True)
    assert models.weight_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert models.weight_dtype("float16", torch.device("cpu")) == torch.float16


def test_a_bfloat16_run_resumed_after_a_crash_equals_the_uninterrupted_one(task_config, tmp_path):
    from safetensors.torch import load_file

    class Crash(Exception):
        pass

    def crash_at_7(step: int) -> None:
        if step == 7:
            raise Crash

    cfg = task_config("classification")
    cfg.tuning.name, cfg.model.dtype, cfg.train.checkpoint_every = "lora", "bfloat16", 4
    cfg.output = str(tmp_path / "straight")
    straight = train(cfg)
    cfg.model.dtype, cfg.output = "bfloat16", str(tmp_path / "resumed")
    with pytest.raises(Crash):
        train(cfg, on_step=crash_at_7)
    cfg.model.dtype = "bfloat16"
    resumed = train(cfg, resume=True)
    a, b = (load_file(str(r.run_dir / "model" / "model.safetensors")) for r in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
