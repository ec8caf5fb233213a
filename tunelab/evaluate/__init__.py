"""Evaluation: run a classifier over examples and compute honest metrics."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support
from torch import nn

from tunelab.data.batching import collate, global_batches


def classification_metrics(y_true, y_pred, n_classes: int) -> dict:
    p, r, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=list(range(n_classes)), average="macro",
                                                  zero_division=0)
    return {"accuracy": float(accuracy_score(y_true, y_pred)), "f1_macro": float(f1),
            "precision_macro": float(p), "recall_macro": float(r),
            "confusion_matrix": confusion_matrix(y_true, y_pred, labels=list(range(n_classes))).tolist()}


def majority_baseline(train_labels, eval_labels, n_classes: int) -> dict:
    """What always predicting the most frequent training class scores on the same eval set."""
    majority = int(np.bincount(train_labels, minlength=n_classes).argmax())
    m = classification_metrics(eval_labels, [majority] * len(eval_labels), n_classes)
    m.pop("confusion_matrix")
    return m


@torch.no_grad()
def predict_logits(model: nn.Module, items: list[dict], pad_id: int, device, batch_size: int = 64,
                   autocast_dtype=None) -> torch.Tensor:
    """Logits for every item, in input order (batched by length for less padding)."""
    was_training = model.training
    model.eval()
    out = torch.empty(len(items), model.config.num_labels)
    lengths = [len(it["input_ids"]) for it in items]
    for batch in global_batches(lengths, batch_size, seed=0, epoch=0, shuffle=False):
        inputs = collate([{k: v for k, v in items[i].items() if k != "labels"} for i in batch], pad_id)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(**inputs).logits
        out[batch] = logits.float().cpu()
    model.train(was_training)
    return out


def evaluate(model: nn.Module, items: list[dict], pad_id: int, device, n_classes: int, autocast_dtype=None) -> dict:
    logits = predict_logits(model, items, pad_id, device, autocast_dtype=autocast_dtype)
    y = torch.tensor([it["labels"] for it in items])
    metrics = classification_metrics(y.numpy(), logits.argmax(-1).numpy(), n_classes)
    metrics["loss"] = float(nn.functional.cross_entropy(logits, y))
    return metrics
