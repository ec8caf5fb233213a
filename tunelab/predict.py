"""Use a finished run: predict with it, or evaluate it on a labelled file."""
from __future__ import annotations

from pathlib import Path

import torch

from tunelab import config as config_mod
from tunelab.errors import UserError
from tunelab.evaluate import evaluate, predict_outputs
from tunelab.evaluate.stats import bootstrap_ci
from tunelab.io import atomic_write_json, atomic_write_jsonl
from tunelab.tasks import TASKS


def load_run(run_dir: str | Path):
    """(config, task, model, tokenizer, space) of a complete run folder."""
    import transformers
    from transformers import AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    run = Path(run_dir)
    if not (run / "model" / "config.json").is_file():
        raise UserError("not a finished run folder (no model/config.json)", str(run))
    cfg = config_mod.load_yaml(run / "config.yaml")
    task = TASKS[cfg.task]
    model = getattr(transformers, task.model_class).from_pretrained(run / "model", use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    space = task.space_of(model.config)
    if task.judged_by_start:  # language models: masking, length policy and dpo beta come from the run's config
        space = space.configure(cfg)
    return cfg, task, model.eval(), tokenizer, space


def predict(run_dir: str | Path, input_path: str | Path, output: str | Path | None = None) -> Path:
    cfg, task, model, tokenizer, space = load_run(run_dir)
    if task.judged_by_start:
        raise UserError(f"a {cfg.task} run does not predict labels; use `tunelab generate {run_dir} --prompt ...` "
                        "to talk to it, or `tunelab eval` to score it on a file", str(run_dir))
    rows = predict_examples((cfg, task, model, tokenizer, space), task.read(input_path, cfg.data, need_label=False))
    out = Path(output) if output else Path(run_dir) / "predictions.jsonl"
    atomic_write_jsonl(out, rows)
    return out


def predict_examples(loaded, examples) -> list[dict]:
    """One prediction row per example (label and probabilities, labels, value or entities) from `load_run`'s tuple."""
    cfg, task, model, tokenizer, space = loaded
    items = task.encode(tokenizer, examples, space, cfg.data.max_length)
    outputs = predict_outputs(task, model, items, tokenizer.pad_token_id or 0, torch.device("cpu"))
    preds = task.decode(outputs, items, space)
    return [task.predict_row(e, p, o, space) for e, p, o in zip(examples, preds, outputs)]


def evaluate_file(run_dir: str | Path, data_path: str | Path, output: str | Path | None = None) -> dict:
    cfg, task, model, tokenizer, space = load_run(run_dir)
    examples = task.read(data_path, cfg.data)
    task.check(examples, space)
    items = task.encode(tokenizer, examples, space, cfg.data.max_length)
    pad_id = tokenizer.pad_token_id or 0
    if task.uses_reference:  # dpo rewards are relative to the reference: the model the run started from
        from tunelab.models import build_model

        task.prepare_items(build_model(cfg.model, task, space, pretrained=True), items, pad_id, torch.device("cpu"))
    m = evaluate(task, model, items, space, pad_id, torch.device("cpu"))
    metrics = {k: v for k, v in m.items() if not k.startswith("_")}
    metrics["ci95"] = bootstrap_ci(task, m["_preds"], [it["_gold"] for it in items], space, cfg.eval.bootstrap)
    metrics.update(m["_details"], examples=len(items), data=str(data_path))
    out = Path(output) if output else Path(run_dir) / f"eval-{Path(data_path).stem}.json"
    atomic_write_json(out, metrics)
    return metrics
