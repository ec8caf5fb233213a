"""Data in: JSONL (with text pairs), CSV with configurable columns, a folder per class, string or int labels."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.config import Config, DataConfig
from tunelab.data import load_splits
from tunelab.tasks import TASKS
from tunelab.data.batching import global_batches, split_global, token_batches
from tunelab.data.load import Problems, label_names, read_examples
from tunelab.errors import UserError


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


def test_a_bad_record_stops_the_reading_unless_problems_are_collected(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": "x"}\n{"text": "b", \n{"text": "c", "label": "y"}\n{"text": "d"}\n'
                 '{"text": "e", "label": "y"}\n', encoding="utf-8")
    with pytest.raises(UserError) as first:  # training: the first bad record is the error
        read_examples(p, DataConfig())
    assert (first.value.line, first.value.code) == (2, "bad-json")
    problems = Problems(limit=10)  # data check: every bad record noted, the rest read
    rows = read_examples(p, DataConfig(), problems=problems)
    assert [r.text for r in rows] == ["a", "c", "e"]
    assert [(e.line, e.code) for e in problems.errors] == [(2, "bad-json"), (4, "missing-label")]
    problems = Problems(limit=1)  # past the limit the next one is raised
    with pytest.raises(UserError) as past:
        read_examples(p, DataConfig(), problems=problems)
    assert past.value.line == 4 and [e.line for e in problems.errors] == [2]


def test_skip_invalid_skips_bad_content_even_when_problems_are_collected(tmp_path, caplog):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": "x"}\n{"text": " ", "label": "x"}\n{"text": "b", \n', encoding="utf-8")
    problems = Problems(limit=10)
    rows = read_examples(p, DataConfig(skip_invalid=True), problems=problems)
    assert [r.text for r in rows] == ["a"] and [e.line for e in problems.errors] == [3]  # bad JSON is never skipped
    assert "skipped 1 invalid records" in caplog.text  # the library warns through logging (the CLI shows it)


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
    splits = load_splits(TASKS[cfg.task], cfg)
    assert len(splits.eval) == 24 and len(splits.train) == 72
    assert {e.label for e in splits.eval} == set(splits.labels)
    assert not {e.where for e in splits.eval} & {e.where for e in splits.train}


def test_batches_cover_every_example_once_and_depend_only_on_seed_and_epoch():
    lengths = [(i * 7) % 23 + 1 for i in range(103)]
    a = global_batches(lengths, 8, seed=3, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(103))
    assert a == global_batches(lengths, 8, seed=3, epoch=1)
    assert a != global_batches(lengths, 8, seed=3, epoch=2)
    # bucketing: batches hold similar lengths, so padding is far below a random batching's (chunks of one batch)
    def pad(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    assert pad(a) < 0.25 * pad(global_batches(lengths, 8, seed=3, epoch=1, bucket=1))


def test_token_batches_run_longest_first_within_the_token_budget():
    lengths = [(i * 7) % 23 + 1 for i in range(103)] + [40]  # one example longer than the budget
    batches = token_batches(lengths, 30)
    assert sorted(i for b in batches for i in b) == list(range(104))
    assert batches[0] == [103]  # alone: a batch holds at least one example
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat, reverse=True)
    assert all(max(lengths[i] for i in b) * len(b) <= 30 for b in batches[1:])
    # and full: one more example (as long as its first) would not fit
    assert all((len(b) + 1) * lengths[b[0]] > 30 for b in batches[:-1])
    capped = token_batches(lengths, 1000, rows=8)  # evaluation: at most eval_batch_size examples too
    assert [len(b) for b in capped] == [8] * 13


def test_global_batch_splits_into_disjoint_rank_shares():
    batch = list(range(10))
    shares = [split_global(batch, r, 2, 3) for r in range(2)]
    assert shares == [[[0, 1, 2], [3, 4]], [[5, 6, 7], [8, 9]]]


# --- chat and preference data from PyPI packages: real files, small sizes ------------------------------------------

def _lines(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _assert_chat(rows: list[dict]) -> None:
    for r in rows:
        roles = [m["role"] for m in r["messages"]]
        assert len(roles) >= 2 and len(roles) % 2 == 0
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in r["messages"])


def _assert_written(info: dict, seed_again) -> tuple[list[dict], list[dict]]:
    """Counts match the files, train and eval share nothing, and the same seed writes identical files."""
    train, evaluation = _lines(info["train"]), _lines(info["eval"])
    assert (len(train), len(evaluation)) == (info["train_examples"], info["eval_examples"])
    keys = [json.dumps(r, sort_keys=True) for r in train + evaluation]
    assert len(set(keys)) == len(keys)
    again = seed_again()
    for split in ("train", "eval"):
        assert open(again[split], "rb").read() == open(info[split], "rb").read()
    return train, evaluation


def test_chitchat_writes_alternating_chats_split_by_conversation(tmp_path):
    from tunelab.data.bundled import chitchat

    info = chitchat(tmp_path / "a", 40, 10, seed=3, max_turns=5)
    train, evaluation = _assert_written(info, lambda: chitchat(tmp_path / "b", 40, 10, seed=3, max_turns=5))
    assert (len(train), len(evaluation)) == (40, 10) and info["available"] > 3000
    _assert_chat(train + evaluation)
    assert max(len(r["messages"]) for r in train + evaluation) == 4  # 5 turns cut to end on the assistant
    chitchat(tmp_path / "c", 40, 10, seed=4)
    assert _lines(tmp_path / "c" / "eval.jsonl") != evaluation  # another seed, another split


def test_chitchat_preferences_pairs_differ_and_split_by_starter(tmp_path):
    from tunelab.data.bundled import chitchat_preferences

    info = chitchat_preferences(tmp_path / "a", 60, 20, seed=1)
    train, evaluation = _assert_written(info, lambda: chitchat_preferences(tmp_path / "b", 60, 20, seed=1))
    assert (len(train), len(evaluation)) == (60, 20) and 500 < info["available"] < 2000
    for r in train + evaluation:
        assert set(r) == {"prompt", "chosen", "rejected"}
        assert all(r[k].strip() for k in r) and r["chosen"] != r["rejected"]
        assert r["chosen"].startswith("A: ") and len(r["chosen"].split()) <= 64  # "A:", "B:", 30 words each, "…"
    # each conversation is in one pair at most, and no conversation starter is in both splits
    responses = [r[k] for r in train + evaluation for k in ("chosen", "rejected")]
    assert len(set(responses)) == len(responses)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evaluation}


def test_chitchat_replies_prefer_the_real_next_turn_and_read_as_dpo_records(tmp_path):
    from tunelab.config import DataConfig
    from tunelab.data.bundled import chitchat_replies

    info = chitchat_replies(tmp_path / "a", 60, 20, seed=2)
    train, evaluation = _assert_written(info, lambda: chitchat_replies(tmp_path / "b", 60, 20, seed=2))
    assert (len(train), len(evaluation)) == (60, 20) and info["available"] > 2000
    for r in train + evaluation:
        assert [m["role"] for m in r["prompt"]] == ["user", "assistant", "user"]
        assert r["chosen"] != r["rejected"] and len(r["chosen"].split()) <= 30
    pairs = TASKS["dpo"].read(info["train"], DataConfig())  # valid input for the dpo and reward stages
    assert len(pairs) == 60 and pairs[0].label["prompt"][-1]["role"] == "user"


def test_chatterbot_japanese_and_sizes_beyond_what_is_available(tmp_path):
    from tunelab.data.bundled import chatterbot_japanese

    info = chatterbot_japanese(tmp_path / "a", eval_size=10, seed=2)
    train, evaluation = _assert_written(info, lambda: chatterbot_japanese(tmp_path / "b", eval_size=10, seed=2))
    assert len(evaluation) == 10 and len(train) + 10 == info["available"] > 500
    _assert_chat(train + evaluation)
    everything = chatterbot_japanese(tmp_path / "c", eval_size=10_000)  # more than there is: all of it, in eval
    assert (everything["train_examples"], everything["eval_examples"]) == (0, info["available"])


def test_cli_writes_chitchat_preferences(tmp_path, capsys):
    from tunelab.cli import main

    out = tmp_path / "prefs"
    assert main(["data", "chitchat-preferences", "--output", str(out), "--train-size", "5000", "--eval-size", "30",
                 "--seed", "0"]) == 0
    assert len(_lines(out / "eval.jsonl")) == 30 and 0 < len(_lines(out / "train.jsonl")) < 5000
    assert "available" in capsys.readouterr().out


def test_missing_data_package_names_the_install_command(tmp_path, monkeypatch):
    import importlib.util

    import pytest

    from tunelab.data.bundled import chitchat
    from tunelab.errors import UserError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "chitchat_dataset" else real(name, *a))
    with pytest.raises(UserError, match=r"the chit-chat data needs the .data. extra: pip install .tunelab\[data\]."):
        chitchat(tmp_path, 10, 10)


def test_japanese_ner_sentence_labels_are_the_entity_types_each_sentence_mentions(tmp_path):
    from tunelab.data.bundled import japanese_ner

    tagged = japanese_ner(tmp_path / "ner", eval_size=100, seed=0)
    labelled = japanese_ner(tmp_path / "labels", eval_size=100, seed=0, sentence_labels=True)
    assert labelled["train_examples"] == tagged["train_examples"] == 400
    for split in ("train", "eval"):
        ner = [json.loads(line) for line in Path(tagged[split]).read_text(encoding="utf-8").splitlines()]
        sent = [json.loads(line) for line in Path(labelled[split]).read_text(encoding="utf-8").splitlines()]
        for a, b in zip(ner, sent):  # the same sentences, in the same order
            assert b["text"] == "".join(a["tokens"])
            assert b["labels"] == sorted({t[2:] for t in a["tags"] if t != "O"})
    assert any(not r["labels"] for r in sent) and any(len(r["labels"]) > 1 for r in sent)


def test_topics_are_balanced_disjoint_and_stable(tmp_path):
    """The second corpus (issue 24): five chatterbot topics, as many of each, no text in two splits or topics."""
    import collections

    from tunelab.data.bundled import TOPICS, topics

    info = topics(tmp_path / "a", 400, 200, seed=0)
    again = topics(tmp_path / "b", 400, 200, seed=0)
    rows = {split: [json.loads(line) for line in Path(info[split]).read_text(encoding="utf-8").splitlines()]
            for split in ("train", "eval")}
    assert collections.Counter(r["label"] for r in rows["eval"]) == {t: 40 for t in TOPICS["english"]}
    assert min(collections.Counter(r["label"] for r in rows["train"]).values()) >= 75
    assert not {r["text"] for r in rows["train"]} & {r["text"] for r in rows["eval"]}
    assert Path(info["train"]).read_bytes() == Path(again["train"]).read_bytes()
    ja = topics(tmp_path / "ja", 240, 90, seed=0, language="japanese")  # the Japanese classification example
    rows = [json.loads(line) for line in Path(ja["eval"]).read_text(encoding="utf-8").splitlines()]
    assert collections.Counter(r["label"] for r in rows) == {"ai": 30, "emotion": 30, "psychology": 30}
    assert sum(any("\u3040" <= c <= "\u30ff" for c in r["text"]) for r in rows) >= 85  # kana: Japanese text
