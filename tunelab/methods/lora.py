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


# The attention query and value projections under their common names (BERT, Llama-style, GPT-2).
DEFAULT_TARGETS = (["query", "value"], ["q_proj", "v_proj"], ["c_attn"])


class Lora(Method):
    def prepare(self, model: nn.Module, cfg: TuningConfig) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        targets = list(cfg.lora_targets) or next((t for t in DEFAULT_TARGETS if set(t) <= present), [])
        missing = [t for t in targets if t not in present] if targets else ["query/value or q_proj/v_proj"]
        if missing:
            raise UserError(f"lora target modules {missing} not found in the model", "tuning.lora_targets")
        # The task type tells peft which new head stays fully trainable (modules_to_save) and how to run the model.
        # A masked-LM head's decoder is tied to the input embeddings; only its new transform layer trains.
        kind, extra = self._kind(type(model).__name__)
        config = LoraConfig(task_type=kind, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                            target_modules=targets, modules_to_save=extra)
        with warnings.catch_warnings():  # peft calls a transformers API that v5 deprecates; nothing for users to do
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(model, config)

    @staticmethod
    def _kind(model_class: str):
        from peft import TaskType

        if model_class.endswith("ForTokenClassification"):
            return TaskType.TOKEN_CLS, None
        if model_class.endswith("ForCausalLM"):
            return TaskType.CAUSAL_LM, None
        if model_class.endswith("ForMaskedLM"):
            return None, ["transform"]
        return TaskType.SEQ_CLS, None

    def export(self, model: nn.Module) -> nn.Module:
        return copy.deepcopy(model).merge_and_unload()

    def save_extra(self, model: nn.Module, folder: Path) -> None:
        model.save_pretrained(folder / "adapter")
