"""Evaluation: run a model over examples, decode its outputs through the task, and score them honestly."""
from __future__ import annotations

import torch
from torch import nn

from tunelab.data.batching import collate, global_batches
from tunelab.tasks import Space, Task


@torch.no_grad()
def predict_outputs(model: nn.Module, items: list[dict], pad_id: int, device, batch_size: int = 64,
                    autocast_dtype=None) -> list[torch.Tensor]:
    """Per-item logits in input order: (num_labels,) per text, or (tokens, num_labels) for token tasks."""
    was_training = model.training
    model.eval()
    out: list = [None] * len(items)
    lengths = [len(it["input_ids"]) for it in items]
    for batch in global_batches(lengths, batch_size, seed=0, epoch=0, shuffle=False):
        inputs = collate([{k: v for k, v in items[i].items() if k != "labels"} for i in batch], pad_id)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(**inputs).logits.float().cpu()
        for row, i in enumerate(batch):
            out[i] = logits[row, :lengths[i]] if logits.dim() == 3 else logits[row]
    model.train(was_training)
    return out


def mean_loss(task: Task, outputs: list[torch.Tensor], items: list[dict]) -> float:
    """The training loss on these items, averaged over the task's units (examples, or tokens for ner)."""
    total, units = 0.0, 0
    for out, item in zip(outputs, items):
        labels = collate([{"input_ids": item["input_ids"], "labels": item["labels"]}], 0)["labels"]
        total += float(task.loss(out.unsqueeze(0), labels))
        units += task.units(item)
    return total / max(units, 1)


def evaluate(task: Task, model: nn.Module, items: list[dict], space: Space, pad_id: int, device,
             autocast_dtype=None, outputs: list[torch.Tensor] | None = None) -> dict:
    """Scalar metrics plus `loss`; the predictions and details ride along under `_preds` and `_details`."""
    if outputs is None:
        outputs = predict_outputs(model, items, pad_id, device, autocast_dtype=autocast_dtype)
    preds = task.decode(outputs, items, space)
    golds = [it["_gold"] for it in items]
    metrics = task.score(preds, golds, space)
    metrics["loss"] = mean_loss(task, outputs, items)
    metrics["_preds"], metrics["_details"] = preds, task.details(preds, golds, space)
    return metrics
