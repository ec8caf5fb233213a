"""`tunelab lr-find`: the learning-rate range test.

Smith (2017), "Cyclical Learning Rates for Training Neural Networks", section 3.3, in the form fastai's
`lr_find` made popular: train for a short while as the learning rate grows exponentially from tiny to huge and
watch the loss. It stays flat while the rate is too small to matter, falls once the model learns, and blows up
once the rate is too large. A good peak rate lies where the smoothed loss falls fastest.

The job is built exactly as `tunelab train` builds it (data, model, method, parameter groups, the loop's own
`_step` with its clipping and loss scaling), so the answer is for that run. The model lives only in memory:
nothing is checkpointed and no saved model is touched; only the curve and the suggestion are written.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tunelab import config as config_mod
from tunelab.config import Config
from tunelab.data.batching import global_batches
from tunelab.distributed import Dist
from tunelab.errors import UserError
from tunelab.io import atomic_write_json
from tunelab.models import pick_device
from tunelab.loop import Loop, _step
from tunelab.validate import validate

BETA = 0.98  # exponential moving average of the loss, bias-corrected (fastai's choice)
DIVERGE = 4.0  # stop once the smoothed loss exceeds this many times its minimum (fastai's rule)


@dataclass
class LRFindResult:
    points: list[dict]  # one per optimizer step: step, lr (of the head group), loss, smoothed loss
    suggested: float  # the rate to train with
    suggested_by: str  # "steepest" normally; "min/10" when the loss never fell enough to find a slope
    steepest: float | None  # lr at the most negative d(smoothed loss)/d(log lr) before the minimum
    min_over_10: float  # a tenth of the lr at the minimum smoothed loss: the other common rule of thumb
    lr_at_min: float
    diverged: bool  # stopped before max_lr because the loss exploded or stopped being finite
    output: Path

    def summary(self) -> str:
        last = self.points[-1]["lr"]
        stop = f"stopped at lr {last:.1e}: the loss diverged" if self.diverged else f"reached lr {last:.1e}"
        how = "steepest descent of the smoothed loss" if self.suggested_by == "steepest" else \
            "a tenth of the minimum-loss rate (the loss never fell steadily enough to find a slope)"
        return "\n".join([
            f"lr-find: {len(self.points)} steps, {stop}",
            f"suggested learning rate: {self.suggested:.1e} ({how})",
            f"minimum smoothed loss at lr {self.lr_at_min:.1e}; a tenth of that: {self.min_over_10:.1e}",
            f"train with: --lr {self.suggested:.1e}",
            f"wrote {self.output / 'lr_find.json'} and {self.output / 'lr_find.png'}"])


def lr_find(cfg: Config, min_lr: float = 1e-7, max_lr: float = 1.0, steps: int = 100,
            output: str | Path = "runs/lr-find") -> LRFindResult:
    """Run the range test on the job `cfg` describes; write lr_find.json and lr_find.png to `output`."""
    check_options(min_lr, max_lr, steps)
    validate(cfg)
    points, diverged = _sweep(cfg, min_lr, max_lr, steps)
    if len(points) < 2:
        raise UserError(f"the loss diverged at once, even at --min-lr {min_lr:g}; lower --min-lr", "lr-find")
    steepest, lr_at_min = suggest(points, skip=steps // 10)
    result = LRFindResult(points, steepest or lr_at_min / 10, "steepest" if steepest else "min/10", steepest,
                          lr_at_min / 10, lr_at_min, diverged, Path(output))
    _write(result, cfg, min_lr, max_lr, steps)
    return result


def check_options(min_lr: float, max_lr: float, steps: int) -> None:
    if not min_lr > 0:
        raise UserError(f"--min-lr must be positive, got {min_lr:g}")
    if not min_lr < max_lr:
        raise UserError(f"--min-lr ({min_lr:g}) must be below --max-lr ({max_lr:g})")
    if steps < 10:
        raise UserError(f"--steps must be at least 10 to draw a curve, got {steps}")


def _sweep(cfg: Config, min_lr: float, max_lr: float, steps: int) -> tuple[list[dict], bool]:
    """Train `steps` optimizer steps at exponentially rising rates; stop early when the loss diverges."""
    from tunelab.pipeline import build_job

    t = cfg.train
    dist = Dist(device=pick_device(t.device))  # one process: the curve needs no data parallelism
    job = build_job(cfg, dist.device)
    groups = job.method.param_groups(job.model, t, cfg.tuning)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=t.lr)
    # Every group keeps its share of the head's rate (layer-wise decay): only the common factor is swept.
    ratios = [g["lr"] / t.lr for g in optimizer.param_groups]
    points, avg, best = [], 0.0, math.inf
    bar = tqdm(total=steps, disable=not t.progress, unit="step", dynamic_ncols=True, mininterval=2.0)
    with tempfile.TemporaryDirectory(prefix="tunelab-lr-find-") as tmp:  # the Loop wants a run folder
        loop = Loop(cfg, job.task, job.splits.space, job.model, job.method, job.train_items, job.eval_items,
                    job.pad_id, Path(tmp), dist)
        for i, batch in zip(range(steps), _batches(job, t.batch_size * t.grad_accum)):
            lr = min_lr * (max_lr / min_lr) ** (i / (steps - 1))
            for g, r in zip(optimizer.param_groups, ratios):
                g["lr"] = lr * r
            job.method.train_mode(job.model)
            loss, _ = _step(loop, job.model, optimizer, batch)
            bar.update(1)
            if not math.isfinite(loss):
                break
            avg = BETA * avg + (1 - BETA) * loss
            smoothed = avg / (1 - BETA ** (i + 1))
            points.append({"step": i + 1, "lr": lr, "loss": loss, "smoothed": smoothed})
            best = min(best, smoothed)
            if smoothed > DIVERGE * best:
                break
    bar.close()
    return points, len(points) < steps


def _batches(job, global_batch: int):
    """Training batches epoch after epoch, as the loop would see them (method epoch hooks included)."""
    lengths = [job.task.length(it) for it in job.train_items]
    epoch = 0
    while True:
        job.method.on_epoch_start(job.model, epoch, job.cfg.tuning)
        yield from global_batches(lengths, global_batch, job.cfg.train.seed, epoch)
        epoch += 1


def suggest(points: list[dict], skip: int = 0) -> tuple[float | None, float]:
    """(lr at the steepest descent before the minimum, or None when there is no slope; lr at the minimum).

    The slope is d(smoothed loss)/d(log10 lr), taken only on the falling part of the curve: past the minimum
    the loss is already climbing. The first `skip` points are left out of both, as fastai v1 did (10 of 100):
    there the rate is too small to matter, and the smoothed loss, still an average of a few batches, moves only
    with their noise.
    """
    lrs = np.array([p["lr"] for p in points])
    smoothed = np.array([p["smoothed"] for p in points])
    start = skip if len(points) - skip >= 3 else 0  # a curve that short: use every point we have
    i_min = start + int(smoothed[start:].argmin())
    if i_min - start < 2:
        return None, float(lrs[i_min])
    # Central differences over the whole curve, so that the slope just before the minimum sees the turn.
    slope = np.gradient(smoothed[start:], np.log10(lrs[start:]))
    return float(lrs[start + int(slope[:i_min - start].argmin())]), float(lrs[i_min])


def _write(result: LRFindResult, cfg: Config, min_lr: float, max_lr: float, steps: int) -> None:
    atomic_write_json(result.output / "lr_find.json", {
        "points": result.points,
        "suggestion": {"lr": result.suggested, "by": result.suggested_by, "steepest": result.steepest,
                       "min_over_10": result.min_over_10, "lr_at_min": result.lr_at_min,
                       "flag": f"--lr {result.suggested:.1e}"},
        "settings": {"min_lr": min_lr, "max_lr": max_lr, "steps": steps, "steps_run": len(result.points),
                     "diverged": result.diverged, "beta": BETA, "diverge_factor": DIVERGE,
                     "config": config_mod.to_dict(cfg)}})
    _plot(result, result.output / "lr_find.png", f"{cfg.tuning.name} · {Path(cfg.model.name).name}")


def _plot(result: LRFindResult, path: Path, title: str) -> None:
    from tunelab.evaluate.plots import figure, save_png

    lrs = [p["lr"] for p in result.points]
    fig, ax = figure()
    ax.plot(lrs, [p["loss"] for p in result.points], alpha=0.3, label="loss")
    ax.plot(lrs, [p["smoothed"] for p in result.points], label="smoothed loss")
    at = min(range(len(lrs)), key=lambda i: abs(math.log(lrs[i] / result.suggested)))
    ax.plot([result.suggested], [result.points[at]["smoothed"]], "o", color="red",
            label=f"suggested {result.suggested:.1e}")
    ax.set_xscale("log")
    smoothed = [p["smoothed"] for p in result.points]  # the last raw losses can be huge: keep the dip in view
    ax.set_ylim(min(min(p["loss"] for p in result.points), min(smoothed)) * 0.95, max(smoothed) * 1.1)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend()
    save_png(fig, path)
