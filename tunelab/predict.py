"""Use a finished run: predict labels with probabilities, or evaluate on a labelled file."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tunelab import config as config_mod
from tunelab.data.batching import encode
from tunelab.data.load import check_known_labels, read_examples
from tunelab.errors import UserError
from tunelab.evaluate import evaluate, predict_logits
from tunelab.io import atomic_write_json, atomic_write_jsonl


def load_run(run_dir: str | Path):
    """(config, model, tokenizer, labels) of a complete run folder."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = Path(run_dir)
    if not (run / "model" / "config.json").is_file():
        raise UserError("not a finished run folder (no model/config.json)", str(run))
    cfg = config_mod.load_yaml(run / "config.yaml")
    model = AutoModelForSequenceClassification.from_pretrained(run / "model", use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return cfg, model.eval(), tokenizer, labels


def predict(run_dir: str | Path, input_path: str | Path, output: str | Path | None = None) -> Path:
    cfg, model, tokenizer, labels = load_run(run_dir)
    examples = read_examples(input_path, cfg.data, need_label=False)
    items = encode(tokenizer, examples, None, cfg.data.max_length)
    probs = torch.softmax(predict_logits(model, items, tokenizer.pad_token_id or 0, torch.device("cpu")), -1)
    rows = []
    for e, p in zip(examples, probs.tolist()):
        best = max(range(len(labels)), key=lambda i: p[i])
        rows.append({"text": e.text, "label": labels[best],
                     "probabilities": {name: round(v, 6) for name, v in zip(labels, p)}})
    out = Path(output) if output else Path(run_dir) / "predictions.jsonl"
    atomic_write_jsonl(out, rows)
    return out


def evaluate_file(run_dir: str | Path, data_path: str | Path, output: str | Path | None = None) -> dict:
    cfg, model, tokenizer, labels = load_run(run_dir)
    examples = read_examples(data_path, cfg.data)
    check_known_labels(examples, labels)
    items = encode(tokenizer, examples, labels, cfg.data.max_length)
    metrics = evaluate(model, items, tokenizer.pad_token_id or 0, torch.device("cpu"), len(labels))
    metrics["examples"] = len(items)
    metrics["data"] = str(data_path)
    out = Path(output) if output else Path(run_dir) / f"eval-{Path(data_path).stem}.json"
    atomic_write_json(out, metrics)
    return metrics
