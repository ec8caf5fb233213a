"""Evaluation: run a model over examples, decode its outputs through the task, and score them honestly."""
from __future__ import annotations

import torch
from torch import nn

from tunelab import speed
from tunelab.data.batching import FORWARD_TOKENS, token_batches
from tunelab.tasks import Space, Task


@torch.no_grad()
def predict_outputs(task: Task, model: nn.Module, items: list[dict], pad_id: int, device, autocast_dtype=None
                    ) -> list[torch.Tensor]:
    """Per-item outputs in input order (the task's `outputs`: logits for most tasks), at most
    `task.eval_batch_size` items and `FORWARD_TOKENS` padded tokens at a time, longest first, in a fixed order:
    the same items always meet the same batches, so outputs repeat bit for bit."""
    batch_size = task.eval_batch_size
    was_training = model.training
    model.eval()
    out: list = [None] * len(items)
    lengths = [len(it["input_ids"]) for it in items]
    with speed.onednn_linears(model):
        for batch in token_batches(lengths, FORWARD_TOKENS, batch_size):
            inputs = {k: v.to(device) for k, v in task.collate([items[i] for i in batch], pad_id).items()}
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                rows = task.outputs(model, inputs, [lengths[i] for i in batch])
            for row, i in zip(rows, batch):
                out[i] = row
    model.train(was_training)
    return out


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
