"""lora: low-rank adapters on the chosen linear layers plus a trainable head, through the `peft` library.

LoRA (Hu et al., 2021): W x + (alpha / r) B A x with A, B of rank r; the base weights stay frozen. On export
the adapters are merged into a copy of the base weights, so the model loads in plain transformers; the adapter
alone is also saved so that `peft` can load it onto the base model.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

from torch import nn

from tunelab.config import TuningConfig
from tunelab.errors import UserError
from tunelab.methods.base import Method


class Lora(Method):
    def prepare(self, model: nn.Module, cfg: TuningConfig) -> nn.Module:
        from peft import LoraConfig, TaskType, get_peft_model

        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in cfg.lora_targets if t not in present]
        if missing:
            raise UserError(f"lora target modules {missing} not found in the model", "tuning.lora_targets")
        # SEQ_CLS / TOKEN_CLS make peft keep the new task head fully trainable (modules_to_save).
        kind = TaskType.TOKEN_CLS if type(model).__name__.endswith("ForTokenClassification") else TaskType.SEQ_CLS
        config = LoraConfig(task_type=kind, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                            lora_dropout=cfg.lora_dropout, target_modules=list(cfg.lora_targets))
        with warnings.catch_warnings():  # peft calls a transformers API that v5 deprecates; nothing for users to do
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(model, config)

    def export(self, model: nn.Module) -> nn.Module:
        return copy.deepcopy(model).merge_and_unload()

    def save_extra(self, model: nn.Module, folder: Path) -> None:
        model.save_pretrained(folder / "adapter")
