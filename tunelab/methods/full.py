"""full: every weight trains, lower layers more slowly (layer-wise learning-rate decay), optionally unfrozen
gradually from the top.

Layer-wise decay follows ULMFiT's discriminative fine-tuning (Howard & Ruder, 2018) and ELECTRA/BEiT's form
lr(depth) = lr * decay ** (top - depth): the head gets `lr`, each block below it `decay` times the one above,
the embeddings the least. Gradual unfreezing is also from ULMFiT: one more block from the top each epoch.
Before the first step the new head is set to its solved optimum on the pretrained features (`tuning.warm_head`,
LP-FT: Kumar et al., 2022), so that the first steps do not drag the backbone after a random head.
"""
from __future__ import annotations

from torch import nn

from tunelab.config import TrainConfig, TuningConfig
from tunelab.methods.base import Method, freeze_all_but, grouped
from tunelab.models import layer_depth, num_blocks


class Full(Method):
    def param_groups(self, model: nn.Module, train: TrainConfig, cfg: TuningConfig) -> list[dict]:
        top = num_blocks(model) + 1
        # Every parameter is in the optimizer from the start; frozen ones simply have no gradient yet,
        # which AdamW skips, so gradual unfreezing needs no optimizer rebuild (and resumes cleanly).
        return grouped(model.named_parameters(), train.lr, train.weight_decay,
                       depth_lr=lambda name: train.lr * cfg.layer_decay ** (top - layer_depth(model, name)))

    def before_training(self, loop) -> str | None:
        from tunelab.methods.head import lp_ft

        return lp_ft(loop)

    def on_epoch_start(self, model: nn.Module, epoch: int, cfg: TuningConfig) -> None:
        if not cfg.gradual_unfreeze:
            return
        top = num_blocks(model) + 1
        freeze_all_but(model, lambda name: layer_depth(model, name) >= top - epoch)
