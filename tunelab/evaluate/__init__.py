"""Evaluation: run a model over examples, decode its outputs through the task, and score them honestly."""
from __future__ import annotations

import torch
from torch import nn

from tunelab.tasks import Space, Task
from tunelab.tasks.base import predict_outputs

__all__ = ["evaluate", "predict_outputs"]


def evaluate(task: Task, model: nn.Module, items: list[dict], space: Space, pad_id: int, device,
             autocast_dtype=None, outputs: list[torch.Tensor] | None = None) -> dict:
    """Scalar metrics plus `loss`; the predictions and details ride along under `_preds` and `_details`."""
    if outputs is None:
        outputs = predict_outputs(task, model, items, pad_id, device, autocast_dtype=autocast_dtype)
    preds = task.decode(outputs, items, space)
    golds = [it["_gold"] for it in items]
    metrics = task.score(preds, golds, space)
    if "loss" not in metrics:  # language-model and preference scores already aggregate their own loss
        metrics["loss"] = task.eval_loss(outputs, items, space)
    metrics["_preds"], metrics["_details"] = preds, task.details(preds, golds, space)
    return metrics
