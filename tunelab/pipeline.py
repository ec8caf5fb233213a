"""`tunelab.train(config)`: data → model → method → loop → evaluate → export, one named call per stage."""
from __future__ import annotations

import logging
import resource
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tunelab import config as config_mod
from tunelab.config import Config
from tunelab.data import Splits, load_splits
from tunelab.distributed import setup, teardown
from tunelab.errors import UserError
from tunelab.evaluate import evaluate, predict_outputs
from tunelab.evaluate.baselines import baselines
from tunelab.evaluate.plots import augmented, confusion, loss_curve, mistakes
from tunelab.evaluate.stats import bootstrap_ci
from tunelab.export import export_model, folder_mb, measure_inference
from tunelab.io import atomic_write_json
from tunelab.methods import METHODS, apply_defaults
from tunelab.methods.base import Method
from tunelab.data.augment import augment_examples, parse_ops
from tunelab.models import count_params, enable_checkpointing, set_precision, weight_dtype
from tunelab.models.vision import parse_image_ops
from tunelab.tasks import TASKS, Task
from tunelab.loop import Loop, fit
from tunelab.validate import validate


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path
    metrics: dict = field(default_factory=dict)

    @property
    def eval(self) -> dict:
        return self.metrics["eval"]


@dataclass
class Job:
    """Everything built from a config before the loop starts (lr-find and tests reuse it)."""

    cfg: Config
    task: Task
    splits: Splits
    tokenizer: object
    method: Method
    model: nn.Module
    train_items: list[dict]
    eval_items: list[dict]
    transfer_items: list[dict] = field(default_factory=list)  # the method's extra items (distill: transfer texts)
    augmented: int = 0  # how many of train_items are augmented copies (train.augment)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0


def build_job(cfg: Config, device: torch.device) -> Job:
    """Data → tokenizer → model with the method applied → encoded examples."""
    torch.manual_seed(cfg.train.seed)
    task = TASKS[cfg.task]
    splits = load_splits(task, cfg)
    space = splits.space.configure(cfg)
    if cfg.tuning.layer_decay is None:
        cfg.tuning.layer_decay = task.default_layer_decay
    apply_defaults(cfg)  # the method's own lr and epochs where none were given
    method = METHODS[cfg.tuning.name]()
    method.bn_statistics = cfg.tuning.bn_statistics
    dtype = weight_dtype(cfg.model.dtype, device)
    cfg.model.dtype = str(dtype).removeprefix("torch.")  # auto, resolved (the model loads in it; config.yaml says so)
    if dtype != torch.float32 and task.modality != "text":
        raise UserError("model.dtype applies to text models; image networks train in float32", "model.dtype")
    model, tokenizer = method.build(cfg, task, space, splits.train)
    if task.modality == "text":
        _check_language(tokenizer, splits.train, cfg.model.name)
    pad_id = tokenizer.pad_token_id or 0
    task.set_padding(model, pad_id)
    task.bind(cfg, tokenizer)
    text_augment = cfg.train.augment and task.modality == "text"  # (images: augmented as batches are drawn)
    train = splits.train + (augment_examples(splits.train, parse_ops(cfg.train.augment), cfg.train.augment_rate,
                                             cfg.train.augment_copies, cfg.train.seed, tokenizer,
                                             model.get_input_embeddings().weight) if text_augment else [])
    model = method.prepare(model, cfg.tuning).to(device)
    if dtype != torch.float32:
        set_precision(model, dtype)
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(model)
    if task.modality == "image":
        train_items = task.encode(tokenizer, train, space, cfg.data.max_length,
                                  tokenizer.train_transform(parse_image_ops(cfg.train.augment)))
    else:
        train_items = task.encode(tokenizer, train, space, cfg.data.max_length)
    if cfg.train.packing:
        train_items = task.pack(train_items, cfg.data.max_length)
    eval_items = task.encode(tokenizer, splits.eval, space, cfg.data.max_length)
    task.prepare_items(model, train_items, pad_id, device)
    task.prepare_items(model, eval_items, pad_id, device)
    transfer_items = method.extra_items(cfg, task, space, tokenizer, train, train_items)
    return Job(cfg, task, splits, tokenizer, method, model, train_items, eval_items, transfer_items,
               len(train) - len(splits.train))


def _check_language(tokenizer, examples: list, model: str) -> None:
    """Warn when the model's tokenizer does not read the training texts' language (tunelab.models.coverage)."""
    from tunelab.models.coverage import examples_coverage

    line = examples_coverage(tokenizer, examples, model).warning()
    if line:
        logging.getLogger(__name__).warning("%s", line)


def train(cfg: Config | dict | str | Path, resume: bool = False, on_step=None, on_eval=None) -> TrainResult:
    """Run one training job; the same as `tunelab train`. Bad input raises UserError before any file is written.

    With `eval.folds` set and no single `eval.fold`, runs K-fold cross-validation instead (see `cross_validate`).
    """
    cfg = _as_config(cfg)
    validate(cfg)
    if cfg.eval.folds and cfg.eval.fold is None:
        from tunelab.crossval import cross_validate

        return cross_validate(cfg, resume=resume)
    dist = setup(cfg.train.device, cfg.train.strategy)
    # A model with float32 trained weights beside bfloat16 frozen ones (model.dtype) runs every forward pass, from
    # the first evaluation to the export's timing, under autocast (the loop's backward passes step out of it).
    # Without autocast's cache of cast weights: inside one long autocast region it would keep serving the weights
    # as they were cast at the first forward pass, never the trained ones.
    low = weight_dtype(cfg.model.dtype, dist.device)
    with torch.autocast(dist.device.type, dtype=low, enabled=low != torch.float32, cache_enabled=False):
        result = _train(cfg, dist, resume, on_step, on_eval)
    dist.barrier()
    teardown(dist)
    return result


def _train(cfg: Config, dist, resume: bool, on_step, on_eval) -> TrainResult:
    job = build_job(cfg, dist.device)
    test_items = _test_items(job, dist.device)
    run = _prepare_run_dir(Path(cfg.output), cfg, resume, dist.main)
    trainable, total = count_params(job.model)  # before the loop: gradual unfreezing changes requires_grad

    start, start_test = _start_scores(job, job.eval_items, dist), _start_scores(job, test_items, dist)
    loop = Loop(cfg, job.task, job.splits.space, job.model, job.method, job.train_items + job.transfer_items,
                job.eval_items, job.pad_id, run, dist, on_step, on_eval)
    timing = fit(loop, resume=resume)
    job.model = loop.model  # (the same model, or a sharded run's weights gathered whole into a plain one)

    metrics = final_metrics(job, dist.device, test_items)
    metrics.update(job.task.summary(loop.history, metrics["eval"]))
    metrics["train"] = {**timing, "peak_rss_mb": _peak_rss_mb(), "peak_gpu_mb": _peak_gpu_mb(),
                        "trainable_params": trainable, "total_params": total, "train_examples": len(job.train_items) - job.augmented,
                        "augmented_examples": job.augmented, "transfer_examples": len(job.transfer_items),
                        "eval_examples": len(job.eval_items), "test_examples": len(test_items),
                        "world_size": dist.world, "strategy": cfg.train.strategy}
    if dist.main:
        metrics["baseline"] = _baselines(job, job.eval_items, start, dist.device)
        if test_items:  # the baselines where the model is graded: on the same untouched examples
            metrics["baseline_test"] = _baselines(job, test_items, start_test, dist.device)
        model_dir, plain = export_model(run, job.model, job.method, job.tokenizer, job.task, job.splits.space)
        metrics["inference"] = {**measure_inference(plain, job.eval_items, job.pad_id, dist.device, task=job.task),
                                "model_mb": folder_mb(model_dir)}
        _plots(run, cfg, job, loop.history, metrics)
        atomic_write_json(run / "metrics.json", metrics)  # written last: its presence marks a complete run
    return TrainResult(run, run / "model", metrics)


def _test_items(job: Job, device) -> list[dict]:
    """The test examples encoded like the eval ones, and prepared now, before any step: dpo's reference
    log-probabilities come from the model training starts from."""
    if not job.splits.test:
        return []
    items = job.task.encode(job.tokenizer, job.splits.test, job.splits.space, job.cfg.data.max_length)
    job.task.prepare_items(job.model, items, job.pad_id, device)
    return items


def _start_scores(job: Job, items: list[dict], dist):
    """Language-model stages are judged against the model they started from: score it before any step."""
    return evaluate(job.task, job.model, items, job.splits.space, job.pad_id, dist.device) \
        if items and job.task.judged_by_start and dist.main else None


def _baselines(job: Job, items: list[dict], start: dict | None, device) -> dict:
    cfg = job.cfg
    return baselines(job.task, job.splits.space, job.train_items, items, cfg.model, job.pad_id, device,
                     cfg.eval.probe, cfg.eval.bootstrap, cfg.train.seed, start)


def final_metrics(job: Job, device, test_items: list[dict] = ()) -> dict:
    """Eval metrics with bootstrap intervals; for multilabel also the threshold tuned on the eval set; then, once
    every choice is made, the test metrics of the chosen weights and threshold."""
    cfg, task, space = job.cfg, job.task, job.splits.space
    outputs = predict_outputs(task, job.model, job.eval_items, job.pad_id, device)
    out = {"task": task.name, "metric": task.primary, "labels": space.labels,
           "split": {"folds": cfg.eval.folds, "fold": cfg.eval.fold, "train_fraction": cfg.data.train_fraction}}
    tuned = task.tune(outputs, job.eval_items, space) if cfg.eval.tune_threshold else {}
    if tuned:
        untuned = evaluate(task, job.model, job.eval_items, space, job.pad_id, device, outputs=outputs)
        out["eval_at_default_threshold"] = _public(untuned)
        space.threshold = tuned["threshold"]
        out["threshold_search"] = tuned
    final = evaluate(task, job.model, job.eval_items, space, job.pad_id, device, outputs=outputs)
    golds = [it["_gold"] for it in job.eval_items]
    out["eval"] = _public(final)
    out["ci95"] = bootstrap_ci(task, final["_preds"], golds, space, cfg.eval.bootstrap, cfg.train.seed)
    out["details"] = final["_details"]
    # The eval numbers are optimistic when the eval set also chose: the best step (early stopping restores it
    # by the eval metric) or the threshold.
    out["chosen_on_eval"] = [what for what, chose in (("the best step", cfg.train.early_stopping_patience > 0),
                                                      ("the threshold", bool(tuned))) if chose]
    out["selected_on_eval"] = bool(out["chosen_on_eval"])
    out["graded_on"] = "test" if test_items else "eval"
    if test_items:  # last: nothing above may look at it
        out.update(_test_metrics(job, test_items, device))
    return out


def _test_metrics(job: Job, items: list[dict], device) -> dict:
    """The untouched estimate: the selected model scored once on the test set, with bootstrap intervals."""
    cfg, task, space = job.cfg, job.task, job.splits.space
    m = evaluate(task, job.model, items, space, job.pad_id, device)
    golds = [it["_gold"] for it in items]
    return {"test": _public(m), "test_ci95": bootstrap_ci(task, m["_preds"], golds, space, cfg.eval.bootstrap,
                                                          cfg.train.seed), "test_details": m["_details"]}


def _public(m: dict) -> dict:
    return {k: v for k, v in m.items() if not k.startswith("_")}


def _plots(run: Path, cfg: Config, job: Job, history: list[dict], metrics: dict) -> None:
    title = f"{cfg.tuning.name} · {Path(cfg.model.name).name}"
    loss_curve(history, run / "loss_curve.png", title)
    if "confusion_matrix" in metrics["details"]:
        confusion(metrics["details"]["confusion_matrix"], job.splits.labels, run / "confusion_matrix.png", title)
    if job.task.modality == "image":
        outputs = predict_outputs(job.task, job.model, job.eval_items, job.pad_id, torch.device("cpu")
                                  if not next(job.model.parameters()).is_cuda else torch.device("cuda"))
        mistakes(job.task, outputs, job.eval_items, job.splits.eval, job.splits.space, run / "mistakes.png", title)
        if job.train_items and not job.task.replayable(job.train_items):
            c = job.tokenizer.data_config
            augmented(job.train_items[:8], c["mean"], c["std"], run / "augmentations.png", job.cfg.train.augment)


def _as_config(cfg) -> Config:
    if isinstance(cfg, Config):
        return cfg
    if isinstance(cfg, dict):
        return config_mod.from_dict(cfg)
    return config_mod.load_yaml(cfg)


def _prepare_run_dir(run: Path, cfg: Config, resume: bool, main: bool) -> Path:
    if main:
        if not resume and run.exists() and any(run.iterdir()):
            if not cfg.overwrite:
                raise UserError("run folder already exists and is not empty (choose another --output, "
                                "or set --overwrite to replace it)", str(run))
            shutil.rmtree(run)
        run.mkdir(parents=True, exist_ok=True)
        (run / "metrics.json").unlink(missing_ok=True)  # a resumed run is not complete until it ends
        if not resume:
            (run / "history.jsonl").unlink(missing_ok=True)
        config_mod.save_yaml(config_mod.with_absolute_paths(cfg), run / "config.yaml")
    return run


def _peak_rss_mb() -> float:
    """This process's peak resident memory in MiB: Linux's high-water mark of its own address space (VmHWM).
    getrusage's ru_maxrss is no good here: Linux carries it over from the parent across fork and exec, so a run
    started by a large process (a test worker that loaded Gemma, say) reported the parent's 3.6 GB as its own."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_gpu_mb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
