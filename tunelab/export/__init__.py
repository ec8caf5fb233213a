"""Export: the run's `model/` folder loads with plain transformers (and `adapter/` with peft)."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from tunelab.io import atomic_dir
from tunelab.methods.base import Method


def export_model(run: Path, model: nn.Module, method: Method, tokenizer) -> Path:
    """Write model/ (safetensors, config with label names, tokenizer) atomically, plus method extras."""
    plain = method.export(model)

    def fill(tmp: Path) -> None:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    atomic_dir(run / "model", fill)
    method.save_extra(model, run)
    return run / "model"
