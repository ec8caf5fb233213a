"""Data: read files into examples, split, tokenize, and batch with length-bucketed dynamic padding."""
from __future__ import annotations

from dataclasses import dataclass

from sklearn.model_selection import train_test_split

from tunelab.config import DataConfig
from tunelab.data.load import Example, check_known_labels, label_names, read_examples


@dataclass
class Splits:
    train: list[Example]
    eval: list[Example]
    labels: list[str]


def _stratified_take(rows: list[Example], fraction_or_n, seed: int) -> tuple[list[Example], list[Example]]:
    """Split off a stratified part (falls back to a plain random split when a class is too rare)."""
    labels = [r.label for r in rows]
    counts = {l: labels.count(l) for l in set(labels)}
    stratify = labels if min(counts.values()) >= 2 else None
    try:
        rest, part = train_test_split(rows, test_size=fraction_or_n, random_state=seed, stratify=stratify)
    except ValueError:
        rest, part = train_test_split(rows, test_size=fraction_or_n, random_state=seed)
    return rest, part


def load_splits(cfg: DataConfig, seed: int) -> Splits:
    """Training and evaluation examples plus the class names; bad input raises UserError before any work."""
    train = read_examples(cfg.train, cfg)
    names = label_names(train, cfg.train)
    if cfg.eval:
        evaluation = read_examples(cfg.eval, cfg)
        check_known_labels(evaluation, names)
    else:
        train, evaluation = _stratified_take(train, cfg.eval_split, seed)
        names = label_names(train, cfg.train)
    if cfg.limit_train and cfg.limit_train < len(train):
        _, train = _stratified_take(train, cfg.limit_train, seed)
    return Splits(train, evaluation, names)
