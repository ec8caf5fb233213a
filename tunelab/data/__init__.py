"""Data: read files into examples, split (holdout, K folds, learning-curve fractions), tokenize and batch."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sklearn.model_selection import train_test_split

from tunelab.config import Config
from tunelab.data.load import Example
from tunelab.errors import UserError

if TYPE_CHECKING:  # tasks import data.batching: a top-level import of tasks here would be circular
    from tunelab.tasks import Space


@dataclass
class Splits:
    train: list[Example]
    eval: list[Example]
    space: Space

    @property
    def labels(self) -> list[str]:
        return self.space.labels


def _usable_strata(strata: list | None, k: int) -> list | None:
    """Strata only when every stratum has at least k members (else sklearn cannot stratify)."""
    if strata is None:
        return None
    counts: dict = {}
    for s in strata:
        counts[s] = counts.get(s, 0) + 1
    return strata if min(counts.values()) >= k else None


def holdout(rows: list[Example], strata: list | None, size, seed: int) -> tuple[list[Example], list[Example]]:
    """Split off a part (stratified when every stratum can be)."""
    rest, part = train_test_split(rows, test_size=size, random_state=seed, stratify=_usable_strata(strata, 2))
    return rest, part


def fold_split(rows: list[Example], strata: list | None, folds: int, fold: int, seed: int):
    """(train, held-out) of one of K folds: stratified when the task has strata, grouped when rows have groups."""
    from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

    if len(rows) < folds:
        raise UserError(f"{len(rows)} examples cannot be split into {folds} folds", "--folds")
    groups = [r.group for r in rows] if any(r.group is not None for r in rows) else None
    strata = _usable_strata(strata, folds)
    index = list(range(len(rows)))
    if groups is not None:
        if len(set(groups)) < folds:
            raise UserError(f"{len(set(groups))} groups cannot be split into {folds} folds", "data.group_column")
        splitter = (StratifiedGroupKFold(folds, shuffle=True, random_state=seed) if strata
                    else GroupKFold(folds, shuffle=True, random_state=seed))
        parts = list(splitter.split(index, strata or index, groups))
    elif strata:
        parts = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(index, strata))
    else:
        parts = list(KFold(folds, shuffle=True, random_state=seed).split(index))
    train_idx, eval_idx = parts[fold]
    return [rows[i] for i in train_idx], [rows[i] for i in eval_idx]


def fraction(rows: list[Example], strata: list | None, frac: float, seed: int) -> list[Example]:
    """A nested sample: each stratum shuffled once by `seed`, then its first ceil(frac * n) taken.

    Nested means the 10% sample is inside the 25% sample, so a learning curve adds data instead of swapping it.
    """
    if frac >= 1:
        return rows
    keys = strata if strata is not None else [None] * len(rows)
    by: dict = {}
    for i, k in enumerate(keys):
        by.setdefault(k, []).append(i)
    rng = random.Random(seed)
    keep = []
    for k in sorted(by, key=str):
        idx = by[k]
        rng.shuffle(idx)
        keep += idx[:max(1, math.ceil(frac * len(idx)))]
    return [rows[i] for i in sorted(keep)]


def load_splits(cfg: Config) -> Splits:
    """Training and evaluation examples plus the output space; bad input raises UserError before any work."""
    from tunelab.tasks import TASKS

    task, d, seed = TASKS[cfg.task], cfg.data, cfg.train.seed
    train = task.read(d.train, d)
    task.space(train, d.train)  # refuse unusable training data (one class, no entities) before splitting it
    if cfg.eval.folds:
        train, evaluation = fold_split(train, task.strata(train), cfg.eval.folds, cfg.eval.fold or 0, seed)
    elif d.eval:
        evaluation = task.read(d.eval, d)
    else:
        if len(train) < 4:
            raise UserError(f"{len(train)} examples are too few to hold some out; give --eval", d.train)
        train, evaluation = holdout(train, task.strata(train), d.eval_split, seed)
    train = fraction(train, task.strata(train), d.train_fraction, seed)
    if d.limit_train and d.limit_train < len(train):
        _, train = holdout(train, task.strata(train), d.limit_train, seed)
    space = task.space(train, d.train)
    task.check(evaluation, space)
    return Splits(train, evaluation, space)
