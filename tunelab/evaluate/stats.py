"""Uncertainty: bootstrap intervals for one holdout set, t intervals over cross-validation folds."""
from __future__ import annotations

import math

import numpy as np

from tunelab.tasks import Space, Task


def bootstrap_ci(task: Task, preds: list, golds: list, space: Space, resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap (Efron & Tibshirani, 1993): resample eval examples with replacement, rescore.

    For ner the unit resampled is the sentence, so entities are never cut in half.
    """
    if resamples <= 0 or len(golds) < 2:
        return {}
    rng = np.random.default_rng(seed)
    n = len(golds)
    idx = rng.integers(0, n, (resamples, n))  # the same draws, row by row, as one call per resample
    draws = task.score_resamples(preds, golds, space, idx)
    if draws is None:
        draws = {}
        for row in idx:
            for k, v in task.score([preds[i] for i in row], [golds[i] for i in row], space).items():
                draws.setdefault(k, []).append(v)
    tail = (1 - level) / 2 * 100
    return {k: [float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))] for k, v in draws.items()}


def t_interval(values: list[float], level: float = 0.95) -> dict[str, float]:
    """Mean, sample standard deviation and the t-distribution interval of the mean over K folds.

    Folds share training data, so this interval is known to be somewhat narrow (Bengio & Grandvalet, 2004);
    it is the usual report and we say so in the docs rather than pretend it is exact.
    """
    from scipy import stats

    a = np.asarray(values, dtype=float)
    mean = float(a.mean())
    if len(a) < 2:
        return {"mean": mean, "std": 0.0, "ci": [mean, mean], "n": len(a)}
    std = float(a.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, len(a) - 1)) * std / math.sqrt(len(a))
    return {"mean": mean, "std": std, "ci": [mean - half, mean + half], "n": len(a)}
