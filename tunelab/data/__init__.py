"""Data: read files into examples, split (holdout, K folds, learning-curve fractions), tokenize and batch."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tunelab.config import Config
from tunelab.data.load import Example
from tunelab.errors import UserError

if TYPE_CHECKING:  # data is below tasks (tasks read through it): the types only
    from tunelab.tasks import Space, Task


@dataclass
class Splits:
    train: list[Example]
    eval: list[Example]
    space: Space
    test: list[Example] = field(default_factory=list)  # untouched until the end; empty when none was asked for

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


def split_problem(strata: list | None, n: int, size: float | int, setting: str) -> str | None:
    """Why `n` examples cannot be split into a part of `size` (a fraction or a count) and the rest, stratified by
    `strata` when every stratum has two members: each side needs one example of every stratum. None if they can."""
    part = math.ceil(size * n) if isinstance(size, float) else size
    advice = "give --eval, raise data.eval_split, or add examples" if setting == "data.eval_split" else \
        f"change {setting} or add examples"
    if n < 4 or part < 1 or part >= n:
        return f"{n} examples are too few to take {part} of them ({setting}); {advice}"
    usable = _usable_strata(strata, 2)
    if usable is None:
        return None
    counts: dict = {}
    for s in usable:
        counts[s] = counts.get(s, 0) + 1
    k = len(counts)
    if part >= k and n - part >= k:
        return None
    per = ", ".join(f"{name} {c}" for name, c in sorted(counts.items(), key=lambda kv: str(kv[0]))[:10])
    return (f"{n} examples of {k} classes ({per}{', …' if k > 10 else ''}): {setting} takes {part} of them, and "
            f"a stratified split needs at least one example per class ({k}) on each side; {advice}")


def holdout(rows: list[Example], strata: list | None, size, seed: int,
            setting: str = "data.eval_split", where: str | None = None) -> tuple[list[Example], list[Example]]:
    """Split off a part (stratified when every stratum can be); too little data for it is a UserError that names
    `where` (the data file)."""
    problem = split_problem(strata, len(rows), size, setting)
    if problem:
        raise UserError(problem, where or setting)
    from sklearn.model_selection import train_test_split  # here: scikit-learn takes ~1.5 s to import, and a run
    # given its eval file never splits (every `tunelab` process imports this module)

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


def load_splits(task: Task, cfg: Config) -> Splits:
    """Training and evaluation examples plus the output space of `task` (which reads and checks the records); bad
    input raises UserError before any work."""
    d, seed = cfg.data, cfg.train.seed
    train = task.read(d.train, d)
    task.space(train, d.train)  # refuse unusable training data (one class, no entities) before splitting it
    train, test = _test_split(task, d, train, seed)
    if cfg.eval.folds:
        train, evaluation = fold_split(train, task.strata(train), cfg.eval.folds, cfg.eval.fold or 0, seed)
    elif d.eval:
        evaluation = task.read(d.eval, d)
    else:
        train, evaluation = holdout(train, task.strata(train), d.eval_split, seed, where=d.train)
    train = fraction(train, task.strata(train), d.train_fraction, seed)
    if d.limit_train and d.limit_train < len(train):
        _, train = holdout(train, task.strata(train), d.limit_train, seed, "data.limit_train", d.train)
    space = task.space(train, d.train)
    task.check(evaluation, space)
    task.check(test, space)
    return Splits(train, evaluation, space, test)


def _test_split(task, d, train: list[Example], seed: int) -> tuple[list[Example], list[Example]]:
    """(training data, test set): the --test file, or data.test_split carved off first, before the eval holdout,
    train_fraction and limit_train, so that no learning-curve point or eval setting moves the test set."""
    if d.test:
        return train, task.read(d.test, d)
    if d.test_split:
        return holdout(train, task.strata(train), d.test_split, seed, "data.test_split", d.train)
    return train, []
