"""`tunelab.train(config)`: data → model → method → loop → evaluate → export, one named call per stage."""
from __future__ import annotations

import resource
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunelab import config as config_mod
from tunelab.config import Config
from tunelab.data import load_splits
from tunelab.data.batching import encode
from tunelab.distributed import setup, teardown
from tunelab.errors import UserError
from tunelab.evaluate import evaluate, majority_baseline
from tunelab.evaluate.plots import confusion, loss_curve
from tunelab.export import export_model
from tunelab.io import atomic_write_json
from tunelab.methods import METHODS
from tunelab.models import build_classifier, count_params, load_tokenizer
from tunelab.train import Loop, fit


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path
    metrics: dict = field(default_factory=dict)

    @property
    def eval(self) -> dict:
        return self.metrics["eval"]


def train(cfg: Config | dict | str | Path, resume: bool = False, on_step=None) -> TrainResult:
    """Run one training job; the same as `tunelab train`. Bad input raises UserError before any file is written."""
    cfg = _as_config(cfg)
    config_mod.validate(cfg)
    dist = setup(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    splits = load_splits(cfg.data, cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    run = _prepare_run_dir(Path(cfg.output), cfg, resume, dist.main)

    method = METHODS[cfg.tuning.name]
    model = method.prepare(build_classifier(cfg.model, splits.labels, method.pretrained), cfg.tuning)
    model.to(dist.device)
    train_items = encode(tokenizer, splits.train, splits.labels, cfg.data.max_length)
    eval_items = encode(tokenizer, splits.eval, splits.labels, cfg.data.max_length)
    trainable, total = count_params(model)  # before the loop: gradual unfreezing changes requires_grad

    loop = Loop(cfg, model, method, train_items, eval_items, tokenizer.pad_token_id or 0, run, dist, on_step)
    timing = fit(loop, resume=resume)

    final = evaluate(model, eval_items, loop.pad_id, dist.device, len(splits.labels))
    metrics = {
        "eval": {k: v for k, v in final.items() if k != "confusion_matrix"},
        "baseline": {"majority": majority_baseline([it["labels"] for it in train_items],
                                                   [it["labels"] for it in eval_items], len(splits.labels))},
        "train": {**timing, "peak_rss_mb": _peak_rss_mb(), "peak_gpu_mb": _peak_gpu_mb(),
                  "trainable_params": trainable, "total_params": total,
                  "train_examples": len(train_items), "eval_examples": len(eval_items), "world_size": dist.world},
        "labels": splits.labels,
        "confusion_matrix": final["confusion_matrix"],
    }
    if dist.main:
        model_dir = export_model(run, model, method, tokenizer)
        title = f"{cfg.tuning.name} · {Path(cfg.model.name).name}"
        loss_curve(loop.history, run / "loss_curve.png", title)
        confusion(final["confusion_matrix"], splits.labels, run / "confusion_matrix.png", title)
        atomic_write_json(run / "metrics.json", metrics)  # written last: its presence marks a complete run
    dist.barrier()
    teardown(dist)
    return TrainResult(run, run / "model", metrics)


def _as_config(cfg) -> Config:
    if isinstance(cfg, Config):
        return cfg
    if isinstance(cfg, dict):
        return config_mod.from_dict(cfg)
    return config_mod.load_yaml(cfg)


def _prepare_run_dir(run: Path, cfg: Config, resume: bool, main: bool) -> Path:
    if main:
        if not resume and run.exists() and any(run.iterdir()):
            if not cfg.overwrite:
                raise UserError("run folder already exists and is not empty (choose another --output, "
                                "or set --overwrite to replace it)", str(run))
            shutil.rmtree(run)
        run.mkdir(parents=True, exist_ok=True)
        (run / "metrics.json").unlink(missing_ok=True)  # a resumed run is not complete until it ends
        if not resume:
            (run / "history.jsonl").unlink(missing_ok=True)
        config_mod.save_yaml(cfg, run / "config.yaml")
    return run


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_gpu_mb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
