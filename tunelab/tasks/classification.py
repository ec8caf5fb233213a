"""Single-label classification (softmax, cross-entropy) and multi-label classification (sigmoid, BCE)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from tunelab.data.load import check_known_labels, class_label, label_names, parse_json
from tunelab.errors import UserError, excerpt
from tunelab.tasks.base import Space, Task


def prf_from_confusion(cm: np.ndarray) -> dict:
    """Accuracy and macro precision/recall/F1 from a confusion matrix (rows true, columns predicted), or from a
    stack of them (one value per matrix, as arrays).

    Same definitions as scikit-learn with zero_division=0; computed here because bootstrap intervals score a
    thousand resamples and sklearn's input checks dominate at that scale.
    """
    tp = np.diagonal(cm, axis1=-2, axis2=-1).astype(float)
    predicted, actual = cm.sum(-2), cm.sum(-1)
    p = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    r = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    f = np.divide(2 * p * r, p + r, out=np.zeros_like(tp), where=(p + r) > 0)
    out = {"accuracy": tp.sum(-1) / np.maximum(cm.sum((-2, -1)), 1), "f1_macro": f.mean(-1),
           "precision_macro": p.mean(-1), "recall_macro": r.mean(-1)}
    return {k: float(v) for k, v in out.items()} if cm.ndim == 2 else out


def confusion(golds, preds, n: int) -> np.ndarray:
    return np.bincount(np.asarray(golds) * n + np.asarray(preds), minlength=n * n).reshape(n, n)


def confusions(golds, preds, n: int, idx: np.ndarray) -> np.ndarray:
    """One confusion matrix per row of `idx` (resamples × examples): resamples × n × n."""
    codes = (np.asarray(golds) * n + np.asarray(preds))[idx] + (np.arange(len(idx)) * n * n)[:, None]
    return np.bincount(codes.ravel(), minlength=len(idx) * n * n).reshape(len(idx), n, n)


def fit_logistic(x, y, multi: bool = False, scoring: str | None = None):
    """The probe's logistic regression on standardised features, its C chosen as a careful analyst would: by
    stratified 5-fold cross-validation inside the training data (per label for `multi`), scored by `scoring`
    (sklearn's name; accuracy when None). With too few examples per class to cross-validate, C = 1."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(y)  # class ids, tag names (NER), or a 0/1 column per label (multi)
    rarest = min(int(np.unique(col, return_counts=True)[1].min()) for col in (labels.T if multi else [labels])
                 if len(col))
    folds = min(5, rarest)
    clf = LogisticRegressionCV(Cs=np.logspace(-4, 2, 7), cv=folds, scoring=scoring, max_iter=2000, l1_ratios=(0,),
                               use_legacy_attributes=False) \
        if folds >= 2 else LogisticRegression(max_iter=2000, C=1.0)
    return make_pipeline(StandardScaler(), OneVsRestClassifier(clf) if multi else clf).fit(x, y)


class Classification(Task):
    name = "classification"
    pools = True
    label_key = "label"
    metrics = ("f1_macro", "accuracy", "precision_macro", "recall_macro")
    tunings = (*Task.tunings, "distill")
    outputs_are = "softmax"

    def parse_label(self, value, path, line, key):
        return class_label(value, path, line, key)

    def space(self, train, path):
        return Space(labels=label_names(train, path))

    def check(self, examples, space):
        check_known_labels(examples, space.labels)

    def strata(self, examples):
        return [e.label for e in examples]

    def model_kwargs(self, space):
        return dict(**space.label_mapping(), problem_type="single_label_classification")

    def target(self, label, space):
        return space.labels.index(label)

    def loss(self, logits, labels):
        return nn.functional.cross_entropy(logits.float(), labels, reduction="sum")

    def decode(self, outputs, items, space):
        return torch.stack(outputs).argmax(-1).tolist()

    def score(self, preds, golds, space):
        return prf_from_confusion(confusion(golds, preds, len(space.labels)))

    def score_resamples(self, preds, golds, space, idx):
        return prf_from_confusion(confusions(golds, preds, len(space.labels), idx))

    def details(self, preds, golds, space):
        return {"confusion_matrix": confusion(golds, preds, len(space.labels)).tolist()}

    def baseline(self, train_golds, golds, space):
        majority = int(np.bincount(train_golds, minlength=len(space.labels)).argmax())
        return "majority", [majority] * len(golds)

    def probe(self, train_x, train_items, eval_x, eval_items, space):
        clf = fit_logistic(train_x, [it["_gold"] for it in train_items], scoring="f1_macro")
        return clf.predict(eval_x).tolist()

    def predict_row(self, example, pred, output, space):
        probs = torch.softmax(output.float(), -1).tolist()
        return {"text": example.text, "label": space.labels[pred],
                "probabilities": {name: round(p, 6) for name, p in zip(space.labels, probs)}}


def _label_list(value, path: Path, line: int, key: str) -> list[str]:
    """A JSON list of labels; in CSV a cell of labels separated by `|` (an empty list means none apply)."""
    if isinstance(value, str):
        value = parse_json(value, path, line) if value.strip().startswith("[") else \
            [v for v in value.split("|") if v.strip()]
    if not isinstance(value, list):
        raise UserError(f"'{key}' must be a list of labels, got {excerpt(value)}", str(path), line, "wrong-type")
    labels = [class_label(v, path, line, key) for v in value]
    if len(set(labels)) != len(labels):
        raise UserError(f"'{key}' lists a label twice: {excerpt(value)}", str(path), line, "repeated-label")
    return labels


def _label_counts(preds, golds, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-label true positives, false positives and false negatives of label-set predictions."""
    tp, fp, fn = np.zeros(n), np.zeros(n), np.zeros(n)
    for p, g in zip(preds, golds):
        tp[list(p & g)] += 1
        fp[list(p - g)] += 1
        fn[list(g - p)] += 1
    return tp, fp, fn


def _f1(tp, fp, fn):
    """F1 = 2TP / (2TP + FP + FN), 0 where a label was never predicted nor present (sklearn's zero_division=0)."""
    tp, fp, fn = (np.asarray(x, dtype=float) for x in (tp, fp, fn))
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(denom), where=denom > 0)


class Multilabel(Task):
    """Any number of labels per text: one sigmoid per label, binary cross-entropy, a tunable threshold."""

    name = "multilabel"
    pools = True
    label_key = "labels"
    metrics = ("f1_micro", "f1_macro", "exact_match", "precision_micro", "recall_micro")
    tunings = (*Task.tunings, "distill")
    outputs_are = "sigmoid"

    def parse_label(self, value, path, line, key):
        return _label_list(value, path, line, key)

    def space(self, train, path):
        names = sorted({n for e in train for n in e.label})
        if not names:
            raise UserError("no labels in the training data; multilabel needs at least one", path)
        return Space(labels=names)

    def check(self, examples, space):
        check_known_labels(examples, space.labels, flat=lambda labels: labels)

    def model_kwargs(self, space):
        return dict(**space.label_mapping(), problem_type="multi_label_classification")

    def target(self, label, space):
        return [1.0 if n in label else 0.0 for n in space.labels]

    def gold(self, label, space):
        return frozenset(space.labels.index(n) for n in label)

    def loss(self, logits, labels):
        # Mean over the labels of one example, summed over examples: the loop averages over examples.
        per = nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
        return per.mean(-1).sum()

    def decode(self, outputs, items, space):
        probs = torch.sigmoid(torch.stack(outputs).float())
        return [frozenset(torch.nonzero(row >= space.threshold).flatten().tolist()) for row in probs]

    def score(self, preds, golds, space):
        tp, fp, fn = _label_counts(preds, golds, len(space.labels))
        T, FP, FN = tp.sum(), fp.sum(), fn.sum()
        return {"f1_micro": float(_f1(T, FP, FN)), "f1_macro": float(_f1(tp, fp, fn).mean()),
                "exact_match": sum(p == g for p, g in zip(preds, golds)) / max(len(golds), 1),
                "precision_micro": float(T / (T + FP)) if T + FP else 0.0,
                "recall_micro": float(T / (T + FN)) if T + FN else 0.0}

    def details(self, preds, golds, space):
        tp, fp, fn = _label_counts(preds, golds, len(space.labels))
        f1 = _f1(tp, fp, fn)
        per = {name: {"f1": float(f1[i]), "support": int(tp[i] + fn[i])} for i, name in enumerate(space.labels)}
        return {"per_label": per, "threshold": space.threshold}

    def baseline(self, train_golds, golds, space):
        # The "majority" answer per label: predict a label when more than half of the training texts carry it.
        counts = np.zeros(len(space.labels))
        for g in train_golds:
            for i in g:
                counts[i] += 1
        answer = frozenset(np.nonzero(counts > len(train_golds) / 2)[0].tolist())
        return "majority", [answer] * len(golds)

    def probe(self, train_x, train_items, eval_x, eval_items, space):
        y = np.array([it["labels"] for it in train_items])
        keep = (y.min(0) != y.max(0))  # a label that never (or always) occurs cannot be fitted
        preds = np.tile((y.mean(0) > 0.5), (len(eval_items), 1))
        if keep.any():
            clf = fit_logistic(train_x, y[:, keep].astype(int), multi=True)
            preds[:, keep] = clf.predict_proba(eval_x) >= space.threshold
        return [frozenset(np.nonzero(row)[0].tolist()) for row in preds]

    def tune(self, outputs, items, space):
        """The one threshold for all labels that maximises micro-F1 on the eval set (optimistic: chosen on it)."""
        golds = [it["_gold"] for it in items]
        at = {}
        for t in np.round(np.arange(0.05, 0.96, 0.05), 2):
            at[float(t)] = self.score(self.decode(outputs, items, Space(space.labels, threshold=float(t))), golds,
                                      space)["f1_micro"]
        best = max(at, key=lambda t: (at[t], -abs(t - 0.5)))
        return {"threshold": best, "f1_micro_at_threshold": at}

    def finalize(self, model, space):
        super().finalize(model, space)
        model.config.update({"tunelab_threshold": space.threshold})

    def predict_row(self, example, pred, output, space):
        probs = torch.sigmoid(output.float()).tolist()
        return {"text": example.text, "labels": [space.labels[i] for i in sorted(pred)],
                "probabilities": {name: round(p, 6) for name, p in zip(space.labels, probs)}}
