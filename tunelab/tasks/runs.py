"""A finished run folder read back: its resolved config, its task and the model it exported."""
from __future__ import annotations

from pathlib import Path

from tunelab import config as config_mod
from tunelab.errors import UserError
from tunelab.models import load_trained
from tunelab.tasks import TASKS


def load_run(run_dir: str | Path):
    """(config, task, model in eval mode, tokenizer, space) of a complete run folder, on the CPU in fp32 (what
    `tunelab predict --runtime torch` answers with, and what distillation's teacher labels with)."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    run = Path(run_dir)
    if not (run / "model" / "config.json").is_file():
        raise UserError("not a finished run folder (no model/config.json)", str(run))
    cfg = config_mod.load_yaml(run / "config.yaml")
    task = TASKS[cfg.task]
    model = load_trained(task.model_class, run / "model")
    tokenizer = task.processor(run / "model")
    task.bind(cfg, tokenizer)
    space = task.space_of(model.config)
    if task.judged_by_start:  # language models: masking, length policy and dpo beta come from the run's config
        space = space.configure(cfg)
    return cfg, task, model.eval(), tokenizer, space
