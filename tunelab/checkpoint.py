"""Resumable checkpoints: weights (safetensors), optimizer and scheduler, RNG state and the data position.

Each checkpoint is built in a temporary folder and renamed into place; only then is the `latest` pointer
replaced (itself atomically), so a kill at any moment leaves the previous complete checkpoint usable.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from tunelab.io import atomic_dir, atomic_write_text

@dataclass
class TrainState:
    """Where training stands: enough, with the files beside it, to continue exactly."""

    step: int = 0
    epoch: int = 0  # the epoch to run next (or being run)
    batch_in_epoch: int = 0  # global batches of `epoch` already done
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    # The checked speed-ups (speed.apply) as the run's start decided them: a resume keeps them, so that a check
    # on other weights cannot change the arithmetic halfway (None: decided at the start of this run)
    checked: dict | None = None


def save(folder: Path, model: nn.Module, optimizer, scheduler, state: TrainState, keep: int = 2) -> Path:
    """A complete checkpoint of this step; the `keep` latest are kept (besides `best`)."""
    root = folder / "checkpoints"
    name = f"step-{state.step:07d}"

    def fill(tmp: Path) -> None:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2))

    atomic_dir(root / name, fill)
    atomic_write_text(root / "latest", name + "\n")
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != name)
    for old in done[:-(keep - 1)] if keep > 1 else done:
        shutil.rmtree(old, ignore_errors=True)
    return root / name


def latest(folder: Path) -> Path | None:
    pointer = folder / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = folder / "checkpoints" / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load(path: Path, model: nn.Module, optimizer, scheduler) -> TrainState:
    load_model(model, str(path / "model.safetensors"), strict=True)
    # Our own file, written above; weights_only refuses anything but tensors and plain containers.
    extra = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return TrainState(**json.loads((path / "state.json").read_text()))


def save_best(folder: Path, model: nn.Module) -> None:
    """The best weights so far, for restoring at the end of an early-stopped run."""
    def fill(tmp: Path) -> None:
        save_model(model, str(tmp / "model.safetensors"))

    atomic_dir(folder / "checkpoints" / "best", fill)


def load_best(folder: Path, model: nn.Module) -> bool:
    path = folder / "checkpoints" / "best" / "model.safetensors"
    if not path.is_file():
        return False
    load_model(model, str(path), strict=True)
    return True
