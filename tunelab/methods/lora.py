"""lora: low-rank adapters on the chosen linear layers plus a trainable head, through the `peft` library.

LoRA (Hu et al., 2021): W x + (alpha / r) B A x with A, B of rank r; the base weights stay frozen. On export
the adapters are merged into a copy of the base weights, so the model loads in plain transformers; the adapter
alone is also saved so that `peft` can load it onto the base model.
"""
from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from tunelab.config import Config, TuningConfig
from tunelab.errors import UserError
from tunelab.methods.base import Method
from tunelab.models import build_model, folder_of, layer_depth, num_blocks, pick_device, pooling_for


class Lora(Method):
    lr, epochs = 1e-3, 4  # from the sweep in the README (adapters start at zero: B = 0)

    def prepare(self, model: nn.Module, cfg: TuningConfig) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        targets = _targets(model, cfg.lora_targets)
        # The task type tells peft which new head stays fully trainable (modules_to_save) and how to run the model.
        # A masked-LM head's decoder is tied to the input embeddings; only its new transform layer trains.
        kind, extra = self._kind(type(model).__name__)
        if _is_image_network(model):  # peft's plain model: its forward passes pixel_values through
            kind, extra = None, [model.timm_model.pretrained_cfg["classifier"]]
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
        if model_class.endswith("ForPreTraining"):  # BERT's: the masked-LM head and the new next-sentence head
            return None, ["transform", "seq_relationship"]
        return TaskType.SEQ_CLS, None

    def export(self, model: nn.Module) -> nn.Module:
        return copy.deepcopy(model).merge_and_unload()

    def save_extra(self, model: nn.Module, folder: Path) -> None:
        model.save_pretrained(folder / "adapter")


class QLora(Lora):
    """lora over base weights held in 4 bits (QLoRA, Dettmers et al. 2023): the linear layers load as
    bitsandbytes' NF4 with double quantization (about 0.52 bytes a weight instead of 2 in bfloat16) and compute
    in model.dtype; the adapters and the new head train in float32 as lora's do. The export merges the adapters
    into a copy of the base whose 4-bit weights are de-quantized to model.dtype: the weights the adapters were
    trained against, not the original ones, so the saved model computes what was evaluated."""

    def build(self, cfg: Config, task, space, train: list) -> tuple[nn.Module, object]:
        cfg.model.pooling = pooling_for(cfg.model, task)
        device = pick_device(cfg.train.device)
        model = build_model(cfg.model, task, space, self.pretrained, quantize_on=device)
        for module in model.modules():
            # bitsandbytes repacks a 4-bit weight for its CPU kernel at the first forward pass without gradients,
            # into a layout its de-quantization does not read: the export would merge into garbage
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        return model, task.processor(folder_of(cfg.model), cfg.model.trust_remote_code)

    def export(self, model: nn.Module) -> nn.Module:
        from peft.tuners.lora import LoraLayer

        prefix = "base_model.model."
        with torch.no_grad():
            deltas = {name.removeprefix(prefix): layer.get_delta_weight(layer.active_adapter[0])
                      for name, layer in model.named_modules() if isinstance(layer, LoraLayer)}
            plain = copy.deepcopy(model).unload()  # the base, each new head its trained copy, no adapters
            # transformers turns the 4-bit layers back into plain ones, model by model: the quantized one may be
            # a backbone inside tunelab's pooled classifier or token tagger
            for quantized in [m for m in plain.modules() if getattr(m, "hf_quantizer", None) is not None]:
                quantized.dequantize()
            for name, delta in deltas.items():
                weight = plain.get_submodule(name).weight
                weight += delta.to(weight.dtype)
        logging.getLogger(__name__).warning(
            "qlora: the adapters are merged into a %s copy of the de-quantized 4-bit base (model/); the adapter "
            "alone, for peft over the 4-bit base, is in adapter/", str(next(plain.parameters()).dtype)[6:])
        return plain


def _is_image_network(model: nn.Module) -> bool:
    return hasattr(getattr(model, "timm_model", None), "pretrained_cfg")


def _targets(model: nn.Module, asked: list[str]) -> list[str]:
    """The full names of the linear modules that get adapters: every linear layer (or GPT-2's Conv1D) inside the
    transformer blocks (attention and MLP, as QLoRA found best: Dettmers et al. 2023), or those whose name is or
    ends with one of `asked`. In an image network (timm) the convolutions count too, those peft can adapt: the
    ungrouped ones (pointwise 1x1 and full kxk), not the depthwise (grouped) ones."""
    image = _is_image_network(model)
    linear = [name for name, m in model.named_modules()
              if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
              or (image and isinstance(m, nn.Conv2d) and m.groups == 1)]
    if asked:
        found = [n for n in linear if any(n == a or n.endswith("." + a) for a in asked)]
        missing = [a for a in asked if not any(n == a or n.endswith("." + a) for n in linear)]
        if missing:
            raise UserError(f"lora target modules {missing} are not linear layers (or, in an image network, "
                            "ungrouped convolutions) of the model", "tuning.lora_targets")
        return found
    top = num_blocks(model)
    found = [n for n in linear if 1 <= layer_depth(model, n + ".weight") <= top]
    if not found:
        raise UserError("the model has no linear layers inside numbered blocks for adapters; name them with "
                        "tuning.lora_targets", "tuning.lora_targets")
    return found
