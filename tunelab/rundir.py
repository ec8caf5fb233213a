"""What a run folder holds, read by everyone who shows a run: the service's worker and API, `compare` and its report.

A run folder (written by tunelab.loop and tunelab.pipeline) holds config.yaml, history.jsonl (one row per logged
step: `loss`, `lr`, `epoch`, ...; one per evaluation: `eval_<metric>`), metrics.json at the end and
checkpoints/step-NNNNNNN/ (resumable, `latest` names the newest). history.jsonl may be being appended to or cut by
a kill: readers take its complete rows only. Nothing here imports the training code.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from tunelab.io import read_jsonl_prefix


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def history(self) -> list[dict]:
        """Every complete row of history.jsonl, training steps and evaluations in the order they were written."""
        return read_jsonl_prefix(self.path / "history.jsonl")

    def metrics(self) -> dict | None:
        """metrics.json, once the run has finished; None before."""
        path = self.path / "metrics.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def checkpoint_steps(self) -> list[int]:
        """The steps of the complete resumable checkpoints kept, oldest first."""
        folder = self.path / "checkpoints"
        if not folder.is_dir():
            return []
        return sorted(int(p.name.split("-")[1]) for p in folder.glob("step-*") if (p / "state.json").is_file())

    def latest_step(self) -> int | None:
        """The step of the checkpoint a resume starts from; None where there is none."""
        pointer = self.path / "checkpoints" / "latest"
        return int(pointer.read_text().strip().split("-")[1]) if pointer.is_file() else None

    def state_time(self, step: int) -> float:
        """When the checkpoint of `step` was written (seconds since the epoch)."""
        return (self.path / "checkpoints" / f"step-{step:07d}" / "state.json").stat().st_mtime


class HistoryTail:
    """The rows appended to a run's history.jsonl since the last call, for a reader that follows a training
    process: a file replaced or shortened (a resume rewinds it to its checkpoint) is read again from the start."""

    def __init__(self, path: Path):
        self.path, self.offset, self.inode = Path(path), 0, None

    def new_rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as f:
            stat = os.fstat(f.fileno())
            if stat.st_ino != self.inode or stat.st_size < self.offset:
                self.offset, self.inode = 0, stat.st_ino
            f.seek(self.offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]  # a row still being written waits for its newline
        self.offset += len(complete)
        rows = []
        for line in complete.decode("utf-8", errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows


def history_losses(path: Path) -> tuple[list[int], list[float]]:
    """(steps, training losses) of a history file's finite training-step rows (a diverged step's NaN is left
    out); none for a missing file."""
    rows = [r for r in read_jsonl_prefix(path) if is_train_row(r) and isinstance(r["loss"], (int, float))
            and math.isfinite(r["loss"])]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def is_train_row(row: dict) -> bool:
    """A training-step row (it carries `loss`); evaluation rows carry `eval_loss` and the other `eval_` metrics."""
    return isinstance(row, dict) and "loss" in row and "step" in row


# OpenAI's names for a step's metrics (fine_tuning.job.event data, checkpoint metrics): train_ and valid_ prefixes.
def openai_train_metrics(row: dict) -> dict:
    """A training row in OpenAI's names: train_loss, learning_rate, and our other figures as train_<name>."""
    return {"step": row["step"], "train_loss": row["loss"], "learning_rate": row.get("lr"),
            **{f"train_{k}": v for k, v in row.items() if k not in ("step", "epoch", "loss", "lr", "samples_per_second")}}


def openai_valid_metrics(row: dict) -> dict:
    """An evaluation row in OpenAI's names: eval_<metric> becomes valid_<metric>."""
    return {"step": row["step"], **{"valid_" + k[5:]: v for k, v in row.items() if k.startswith("eval_")}}
