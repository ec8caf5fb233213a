"""Baselines scored on the same split as the model: the trivial answer and a linear probe.

The linear probe (Alain & Bengio, 2016) freezes the pretrained encoder, takes its mean-pooled last hidden
states (for ner: the hidden state of each word's first sub-token) and fits a scikit-learn linear model on
them. A fine-tuned model that does not beat it has not earned its training cost.
"""
from __future__ import annotations

import numpy as np
import torch

from tunelab.config import ModelConfig
from tunelab.data.batching import collate, global_batches
from tunelab.tasks import Space, Task


def frozen_encoder(model_cfg: ModelConfig, device) -> torch.nn.Module:
    """The pretrained backbone without a head, in eval mode."""
    from transformers import AutoModel
    from transformers.utils import logging

    from tunelab.models import folder_of

    logging.disable_progress_bar()
    return AutoModel.from_pretrained(folder_of(model_cfg), trust_remote_code=model_cfg.trust_remote_code,
                                     use_safetensors=True).to(device).eval()


@torch.no_grad()
def features(model: torch.nn.Module, items: list[dict], pad_id: int, device, batch_size: int = 64) -> np.ndarray:
    """Frozen pretrained features: one row per item, or one per kept word when items carry `_first`."""
    per_word = "_first" in items[0]
    rows: list = [None] * len(items)
    lengths = [len(it["input_ids"]) for it in items]
    for batch in global_batches(lengths, batch_size, seed=0, epoch=0, shuffle=False):
        inputs = collate([{k: v for k, v in items[i].items() if k != "labels"} for i in batch], pad_id)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        hidden = model(**inputs).last_hidden_state.float()
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        for row, i in enumerate(batch):
            if per_word:
                rows[i] = hidden[row, [pos for pos, _ in items[i]["_first"]]].cpu().numpy()
            else:
                rows[i] = pooled[row].cpu().numpy()
    width = model.config.hidden_size
    return np.concatenate(rows) if per_word else np.stack(rows) if rows else np.zeros((0, width))


def baselines(task: Task, space: Space, train_items: list[dict], eval_items: list[dict], model_cfg: ModelConfig,
              pad_id: int, device, probe: bool, resamples: int, seed: int, start: dict | None = None) -> dict:
    """{name: metrics with their bootstrap intervals} for the trivial baseline and (optionally) the probe; for
    language-model stages, the model before training (`start`: its evaluate() result)."""
    from tunelab.evaluate.stats import bootstrap_ci

    golds = [it["_gold"] for it in eval_items]
    if task.judged_by_start:
        found = {"before_training": start["_preds"]} if start else {}
    else:
        name, preds = task.baseline([it["_gold"] for it in train_items], golds, space)
        found = {name: preds, **task.more_baselines(train_items, eval_items, space)}
    if probe and not task.judged_by_start:
        own = task.probe_features(model_cfg, [train_items, eval_items], device)
        if own is not None:
            train_x, eval_x = own
        else:
            encoder = frozen_encoder(model_cfg, device)
            train_x = features(encoder, train_items, pad_id, device)
            eval_x = features(encoder, eval_items, pad_id, device)
        found["linear_probe"] = task.probe(train_x, train_items, eval_x, eval_items, space)
    out = {}
    for name, preds in found.items():
        out[name] = {**task.score(preds, golds, space),
                     "ci95": bootstrap_ci(task, preds, golds, space, resamples, seed)}
    return out
