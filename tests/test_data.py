"""Data in: JSONL (with text pairs), CSV with configurable columns, a folder per class, string or int labels."""
from __future__ import annotations

import json

from tunelab.config import Config, DataConfig
from tunelab.data import load_splits
from tunelab.data.batching import global_batches, split_global
from tunelab.data.load import label_names, read_examples


def test_jsonl_with_pairs_and_int_labels(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"text": "a", "text_pair": "b", "label": 10}, {"text": "c", "text_pair": "d", "label": 2},
        {"text": "e", "text_pair": "f", "label": 2}]) + "\n\n")
    rows = read_examples(p, DataConfig())
    assert [(r.text, r.text_pair, r.label) for r in rows] == [("a", "b", "10"), ("c", "d", "2"), ("e", "f", "2")]
    assert label_names(rows, str(p)) == ["2", "10"]  # integers sort numerically
    assert rows[2].where == f"{p}:3"


def test_csv_with_configured_columns_and_quotes(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('review,stars\n"great, really",5\nmeh,1\n', encoding="utf-8-sig")  # BOM is accepted
    rows = read_examples(p, DataConfig(text_column="review", label_column="stars"))
    assert [(r.text, r.label) for r in rows] == [("great, really", "5"), ("meh", "1")]


def test_folder_per_class(tmp_path):
    for label, texts in {"spam": ["buy now", "win cash"], "ham": ["see you at 5"]}.items():
        (tmp_path / label).mkdir()
        for i, t in enumerate(texts):
            (tmp_path / label / f"{i}.txt").write_text(t)
    rows = read_examples(tmp_path, DataConfig())
    assert sorted((r.label, r.text) for r in rows) == [("ham", "see you at 5"), ("spam", "buy now"),
                                                       ("spam", "win cash")]


def test_eval_split_is_stratified_and_disjoint(toy_data):
    cfg = Config()
    cfg.data = DataConfig(train=toy_data["train"], eval_split=0.25)
    splits = load_splits(cfg)
    assert len(splits.eval) == 24 and len(splits.train) == 72
    assert {e.label for e in splits.eval} == set(splits.labels)
    assert not {e.where for e in splits.eval} & {e.where for e in splits.train}


def test_batches_cover_every_example_once_and_depend_only_on_seed_and_epoch():
    lengths = [(i * 7) % 23 + 1 for i in range(103)]
    a = global_batches(lengths, 8, seed=3, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(103))
    assert a == global_batches(lengths, 8, seed=3, epoch=1)
    assert a != global_batches(lengths, 8, seed=3, epoch=2)
    # bucketing: batches hold similar lengths, so padding is far below a random batching's
    pad = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in a)
    assert pad < 0.25 * sum(lengths)


def test_global_batch_splits_into_disjoint_rank_shares():
    batch = list(range(10))
    shares = [split_global(batch, r, 2, 3) for r in range(2)]
    assert shares == [[[0, 1, 2], [3, 4]], [[5, 6, 7], [8, 9]]]
