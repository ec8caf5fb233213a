"""A config checked against what the registries know, before any file is written: the method applies to the
task, the metric is one of the task's own. tunelab.config checks the settings themselves (types, ranges,
choices, combinations); this module adds what needs the tasks and methods, which config must not import."""
from __future__ import annotations

from tunelab import config as config_mod
from tunelab.config import Config
from tunelab.errors import UserError
from tunelab.tasks import TASKS


def validate(cfg: Config) -> None:
    """Check `cfg` against the registries; `tuning.name` auto is resolved here, in place (config.yaml keeps the
    method that ran)."""
    config_mod.validate(cfg)  # the task is one of config's closed choice, which names the registered tasks
    if cfg.tuning.name == "auto":
        cfg.tuning.name = default_tuning(cfg)
    task = TASKS[cfg.task]
    if cfg.train.metric not in ("auto", "loss", *task.metrics):
        raise UserError(f"metric '{cfg.train.metric}' is not one of the {cfg.task} task's "
                        f"({', '.join(task.metrics)}, loss)", "train.metric")
    if cfg.tuning.name not in task.tunings:
        raise UserError(f"tuning method '{cfg.tuning.name}' does not apply to the {cfg.task} task "
                        f"(use {', '.join(task.tunings)})", "--tuning")
    if task.judged_by_start and cfg.eval.folds:
        raise UserError(f"cross-validation is not offered for the {cfg.task} task; give --eval or data.eval_split",
                        "--folds")
    if cfg.train.strategy == "fsdp" and (cfg.tuning.name in ("head", "distill", "qlora") or task.modality != "text"):
        raise UserError(f"train.strategy fsdp shards a text model's training over processes; {cfg.tuning.name} "
                        f"tuning of the {cfg.task} task runs on ddp (the default)", "train.strategy")
    if cfg.train.strategy == "fsdp" and cfg.train.l1 > 0:
        raise UserError("train.l1 is not offered with train.strategy fsdp (each process holds part of each weight)",
                        "train.l1")
    if cfg.model.pooling != "auto" and (not task.pools or task.modality != "text"):
        raise UserError(f"model.pooling applies to classification, multilabel and regression, not {cfg.task}",
                        "model.pooling")


def default_tuning(cfg: Config) -> str:
    """lora for a decoder backbone (its config.json names a causal-LM architecture) under a task with a new head
    (classification, multilabel, regression, ner); full for everything else."""
    import json

    from tunelab.models import folder_of

    task = TASKS[cfg.task]
    if task.modality != "text" or task.judged_by_start or "lora" not in task.tunings:
        return "full"
    try:
        archs = json.loads((folder_of(cfg.model) / "config.json").read_text(encoding="utf-8")).get("architectures")
    except (OSError, ValueError):
        return "full"  # (a model that cannot be read is refused where it is loaded, with its reason)
    decoder = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs or [])
    return "lora" if decoder else "full"
