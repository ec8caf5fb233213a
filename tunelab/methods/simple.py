"""scratch and partial: methods that differ only in where the weights start and which of them train."""
from __future__ import annotations

from torch import nn

from tunelab.config import TuningConfig
from tunelab.methods.base import Method, freeze_all_but
from tunelab.models import layer_depth, num_blocks


class Scratch(Method):
    """Same architecture, random initialisation, everything trains: what pre-training is worth."""

    pretrained = False
    lr = 1e-4  # random weights move further than pretrained ones


class Partial(Method):
    """The top `partial_layers` blocks, the pooler and the head train; the rest stays frozen. Like full, it starts
    from the head solved on the pretrained features (tuning.warm_head, LP-FT)."""

    lr = 3e-4  # the sweep in the README: 0.765 against 0.713 at 1e-4 (a fresh head on two blocks)

    def prepare(self, model: nn.Module, cfg: TuningConfig) -> nn.Module:
        n = num_blocks(model)
        lowest = n - cfg.partial_layers + 1  # depth of the lowest block that trains
        freeze_all_but(model, lambda name: layer_depth(model, name) >= max(lowest, 1))
        return model

    def before_training(self, loop) -> str | None:
        from tunelab.methods.head import lp_ft

        return lp_ft(loop)
