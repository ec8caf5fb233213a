"""Regression: one number per text, mean-squared-error loss; MSE, MAE and R².

Targets are standardised with the training mean and standard deviation, so that the same learning rates work
whether the numbers are star ratings or prices (an MSE in the millions would be clipped into a crawl). The
exported model has the scaling folded into its last layer, so it predicts in the original units.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from tunelab.errors import UserError, excerpt
from tunelab.tasks.base import Space, Task


def regression_scores(preds, golds) -> dict[str, float]:
    p, g = np.asarray(preds, dtype=float), np.asarray(golds, dtype=float)
    err = p - g
    mse = float(np.mean(err ** 2)) if len(g) else 0.0
    var = float(np.var(g)) if len(g) else 0.0
    return {"mse": mse, "mae": float(np.mean(np.abs(err))) if len(g) else 0.0,
            "r2": 1 - mse / var if var > 0 else 0.0}


class Regression(Task):
    name = "regression"
    pools = True
    label_key = "target"
    metrics = ("r2", "mse", "mae")
    tunings = (*Task.tunings, "distill")
    outputs_are = "value"

    def parse_label(self, value, path, line, key):
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise UserError(f"'{key}' must be a number, got {excerpt(value)}", str(path), line,
                                "not-a-number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"'{key}' must be a finite number, got {excerpt(value)}", str(path), line,
                            "not-a-number")
        return float(value)

    def space(self, train, path):
        values = np.array([e.label for e in train], dtype=float)
        std = float(values.std())
        return Space(target_mean=float(values.mean()), target_std=std if std > 0 else 1.0)

    def model_kwargs(self, space):
        return dict(num_labels=1, problem_type="regression")

    def target(self, label, space):
        return (label - space.target_mean) / space.target_std

    def gold(self, label, space):
        return float(label)

    def loss(self, logits, labels):
        return nn.functional.mse_loss(logits.float().squeeze(-1), labels.float(), reduction="sum")

    def decode(self, outputs, items, space):
        values = torch.stack(outputs).float().squeeze(-1) * space.target_std + space.target_mean
        return values.tolist()

    def score(self, preds, golds, space):
        return regression_scores(preds, golds)

    def baseline(self, train_golds, golds, space):
        return "mean", [float(np.mean(train_golds))] * len(golds)

    def probe(self, train_x, train_items, eval_x, eval_items, space):
        from sklearn.linear_model import RidgeCV
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        reg = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
        reg.fit(train_x, [it["_gold"] for it in train_items])
        return reg.predict(eval_x).tolist()

    def finalize(self, model, space):
        """Fold y = std * z + mean into the last linear layer of the head (the one with a single output)."""
        super().finalize(model, space)
        _scale_head(model, space.target_std, space.target_mean)

    def unfinalize(self, model, space):
        """z = (y - mean) / std: an exported model (a distillation student cut from its teacher) back in the
        standardised units training uses."""
        _scale_head(model, 1 / space.target_std, -space.target_mean / space.target_std)

    def space_of(self, config):
        return Space()  # the exported model already predicts in the original units

    def predict_row(self, example, pred, output, space):
        return {"text": example.text, "prediction": round(float(pred), 6)}


def _scale_head(model: nn.Module, scale: float, shift: float) -> None:
    """Make the head's last linear layer (the one with a single output) answer scale * y + shift instead of y."""
    prefix = getattr(model, "base_model_prefix", "")
    heads = [m for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and m.out_features == 1 and not n.startswith(prefix + ".")]
    if not heads:
        raise RuntimeError("regression head not found: cannot fold the target scaling into the model")
    last = heads[-1]
    with torch.no_grad():
        last.weight.mul_(scale)
        if last.bias is not None:
            last.bias.mul_(scale).add_(shift)
