"""Resumable checkpoints: weights (safetensors), optimizer and scheduler, RNG state and the data position.

Each checkpoint is built in a temporary folder and renamed into place; only then is the `latest` pointer
replaced (itself atomically), so a kill at any moment leaves the previous complete checkpoint usable.

A `train.strategy: fsdp` run writes the model's and the optimizer's state with torch.distributed.checkpoint
instead (`dcp/`: every process writes its own shards, and any number of processes reads them back, resharded);
`load` reads either kind.
"""
from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from tunelab.io import atomic_dir, atomic_write_text, replace_dir, temporary_dir

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
    # Examples per optimizer step over all processes: a resume on another number of processes keeps it
    global_batch: int | None = None


def save(folder: Path, model: nn.Module, optimizer, scheduler, state: TrainState, keep: int = 2) -> Path:
    """A complete checkpoint of this step; the `keep` latest are kept (besides `best`). The first process writes it."""
    root = folder / "checkpoints"
    name = f"step-{state.step:07d}"

    def fill(tmp: Path) -> None:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        _write_position(tmp, state)

    atomic_dir(root / name, fill)
    _publish(root, name, keep)
    return root / name


def save_sharded(folder: Path, model: nn.Module, optimizer, scheduler, state: TrainState, keep: int = 2) -> Path:
    """`save` for a train.strategy fsdp run, on one process or many (every process calls it): the model and the
    optimizer through torch.distributed.checkpoint into `dcp/`, each process writing its shards; the scheduler,
    the random state and the position by the first process."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = folder / "checkpoints"
    name = f"step-{state.step:07d}"
    model_state, optimizer_state = get_state_dict(model, optimizer)

    def fill(tmp: Path) -> None:
        torch.save({"scheduler": scheduler.state_dict()}, tmp / "scheduler.pt")
        _write_position(tmp, state)

    _save_dcp(root / name, {"model": model_state, "optimizer": optimizer_state}, fill)
    if _first():
        _publish(root, name, keep)
    _barrier()
    return root / name


def _write_position(tmp: Path, state: TrainState) -> None:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2))


def _publish(root: Path, name: str, keep: int) -> None:
    """Point `latest` at the complete checkpoint `name`, then delete all but the `keep` newest."""
    atomic_write_text(root / "latest", name + "\n")
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != name)
    for old in done[:-(keep - 1)] if keep > 1 else done:
        shutil.rmtree(old, ignore_errors=True)


def _first() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _save_dcp(final: Path, states: dict, fill=None) -> None:
    """The folder `final` with `states` in `dcp/` (every process writes its shards) and what `fill(tmp)` adds (the
    first process), built under a temporary name and renamed into place once complete (by the first process:
    the others learn it at the caller's barrier). Collective."""
    tmp = _shared_temporary_dir(final)
    _dcp("save", states, tmp / "dcp")
    if _first():
        if fill:
            fill(tmp)
        replace_dir(tmp, final)


def _shared_temporary_dir(final: Path) -> Path:
    """A temporary folder beside `final`, made by the first process and named to every other one."""
    names = [None]
    if _first():
        final.parent.mkdir(parents=True, exist_ok=True)
        names = [str(temporary_dir(final))]
    if dist.is_initialized():
        dist.broadcast_object_list(names, src=0)
    return Path(names[0])


def _dcp(action: str, states: dict, path: Path) -> None:
    """torch.distributed.checkpoint's save or load of `states` at `path`: collective over the process group, or
    within this one process where there is none (its notice that it assumes so is expected, not shown)."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        getattr(dcp, action)(states, checkpoint_id=path)


def latest(folder: Path) -> Path | None:
    pointer = folder / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = folder / "checkpoints" / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def read_state(path: Path) -> TrainState:
    """The position a checkpoint records, without loading it."""
    return TrainState(**json.loads((path / "state.json").read_text()))


def load(path: Path, model: nn.Module, optimizer, scheduler) -> TrainState:
    """Restore a checkpoint of either kind (`save`, `save_sharded`; collective for the second) into `model`,
    sharded or not, on any number of processes."""
    if (path / "dcp").is_dir():
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        states = {"model": model_state, "optimizer": optimizer_state}
        _dcp("load", states, path / "dcp")
        set_state_dict(model, optimizer, model_state_dict=states["model"], optim_state_dict=states["optimizer"])
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True)["scheduler"])
    else:
        load_model(model, str(path / "model.safetensors"), strict=True)
        # Our own file, written above; weights_only refuses anything but tensors and plain containers.
        extra = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        optimizer.load_state_dict(extra["optimizer"])
        scheduler.load_state_dict(extra["scheduler"])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return read_state(path)


def save_best(folder: Path, model: nn.Module, sharded: bool = False) -> None:
    """The best weights so far, for restoring at the end of an early-stopped run. `sharded`: the model is an FSDP
    one, saved by every process through torch.distributed.checkpoint."""
    final = folder / "checkpoints" / "best"
    if not sharded:
        atomic_dir(final, lambda tmp: save_model(model, str(tmp / "model.safetensors")))
        return
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    _save_dcp(final, {"model": get_model_state_dict(model)})
    _barrier()


def load_best(folder: Path, model: nn.Module) -> bool:
    """Restore `save_best`'s weights into the plain `model` (collective where they were saved sharded)."""
    best = folder / "checkpoints" / "best"
    if (best / "dcp").is_dir():
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        states = {"model": get_model_state_dict(model)}
        _dcp("load", states, best / "dcp")
        set_model_state_dict(model, states["model"])
        return True
    if not (best / "model.safetensors").is_file():
        return False
    load_model(model, str(best / "model.safetensors"), strict=True)
    return True
