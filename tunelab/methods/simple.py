"""scratch, head and partial: methods that differ only in where the weights start and which of them train."""
from __future__ import annotations

from torch import nn

from tunelab.config import TuningConfig
from tunelab.methods.base import Method, freeze_all_but
from tunelab.models import layer_depth, num_blocks


class Scratch(Method):
    """Same architecture, random initialisation, everything trains: what pre-training is worth."""

    pretrained = False


class Head(Method):
    """Transfer learning: the pretrained backbone is frozen (and kept in eval mode); only the new head trains."""

    replays_features = True

    def prepare(self, model: nn.Module, cfg: TuningConfig) -> nn.Module:
        top = num_blocks(model) + 1
        freeze_all_but(model, lambda n: layer_depth(model, n) == top and _is_head(model, n))
        return model

    def train_mode(self, model: nn.Module) -> None:
        # Dropout in a frozen backbone only adds noise to the features the head learns from.
        model.eval()
        for name, module in model.named_children():
            if name != getattr(model, "base_model_prefix", None):
                module.train()


def _is_head(model: nn.Module, name: str) -> bool:
    """The task head is everything outside the pretrained base model (`classifier`, `score`, ...)."""
    prefix = getattr(model, "base_model_prefix", "")
    return not name.startswith(prefix + ".")


class Partial(Method):
    """The top `partial_layers` blocks, the pooler and the head train; the rest stays frozen."""

    def prepare(self, model: nn.Module, cfg: TuningConfig) -> nn.Module:
        n = num_blocks(model)
        lowest = n - cfg.partial_layers + 1  # depth of the lowest block that trains
        freeze_all_but(model, lambda name: layer_depth(model, name) >= max(lowest, 1))
        return model
