"""The small interface every tuning method implements; everything else (the loop) is shared."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tunelab.config import Config, TrainConfig, TuningConfig
from tunelab.models import build_model, folder_of, pooling_for

NO_DECAY = ("bias", "LayerNorm.weight", "layernorm.weight", "layer_norm.weight", "norm.weight")


def grouped(named_params, lr: float, weight_decay: float, depth_lr=None) -> list[dict]:
    """AdamW parameter groups: no weight decay on biases and norms; optional learning rate per parameter."""
    groups: dict[tuple, dict] = {}
    for name, p in named_params:
        decay = 0.0 if name.endswith(NO_DECAY) else weight_decay
        group_lr = depth_lr(name) if depth_lr else lr
        key = (group_lr, decay)
        groups.setdefault(key, {"params": [], "names": [], "lr": group_lr, "weight_decay": decay})
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())


class Method:
    """How the weights adapt. Subclasses override only what differs. The registry holds the classes; each run
    makes its own instance, so a method may keep what it builds for the run (distill: its teacher)."""

    pretrained = True  # start from the pretrained weights (scratch does not)
    replays_features = False  # the backbone is frozen in eval mode: its outputs can be computed once (head)
    # The method's own defaults for train.lr and train.epochs (a user's --lr / --epochs replace them): a new head
    # or an adapter starts from zero and needs larger steps than weights that are already good.
    lr: float = 5e-5
    epochs: int = 3
    bn_statistics = "frozen"  # set per run from tuning.bn_statistics (see train_mode)

    def build(self, cfg: Config, task, space, train: list) -> tuple[nn.Module, object]:
        """The model this method starts from (before `prepare`) and its tokenizer; `train` is the training split."""
        cfg.model.pooling = pooling_for(cfg.model, task)  # resolved once: config.yaml says what the run used
        return build_model(cfg.model, task, space, self.pretrained), \
            task.processor(folder_of(cfg.model), cfg.model.trust_remote_code)

    def extra_items(self, cfg: Config, task, space, tokenizer, train: list, train_items: list[dict]) -> list[dict]:
        """Items trained on beside the training split's (distill: unlabelled transfer texts); may add fields to
        `train_items` (distill: the teacher's outputs)."""
        return []

    def collate(self, task, items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        """One training batch of `items`: the task's, plus anything the method's loss needs."""
        return task.collate(items, pad_id)

    def forward(self, task, model: nn.Module, batch: dict, space) -> tuple[torch.Tensor, dict[str, float]]:
        """The summed training loss of one batch (and the task's log sums): the task's own loss."""
        return task.forward(model, batch, space)

    def prepare(self, model: nn.Module, cfg: TuningConfig) -> nn.Module:
        """Freeze, wrap or otherwise ready the model; returns the model to train."""
        return model

    def param_groups(self, model: nn.Module, train: TrainConfig, cfg: TuningConfig) -> list[dict]:
        """Optimizer groups over every parameter this method may ever train."""
        return grouped([(n, p) for n, p in model.named_parameters() if p.requires_grad], train.lr, train.weight_decay)

    def on_epoch_start(self, model: nn.Module, epoch: int, cfg: TuningConfig) -> None:
        """Called before each epoch (also on resume): e.g. gradual unfreezing."""

    def train_mode(self, model: nn.Module) -> None:
        """Put the model in training mode (head keeps the frozen backbone in eval mode). A pretrained network's
        batch-norm layers stay in inference mode: they normalise with the statistics learnt in pre-training, which
        a few batches of a small dataset would otherwise drag away from what the rest of the network (and a head
        solved on its features) expects; their scale and shift still train. Keras's fine-tuning guide gives the
        same advice; tuning.bn_statistics "update" turns it off. Random weights (scratch) always update them."""
        model.train()
        if self.pretrained and self.bn_statistics == "frozen":
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def export(self, model: nn.Module) -> nn.Module:
        """The plain transformers model to save (lora merges its adapters into a copy)."""
        return model

    def save_extra(self, model: nn.Module, folder: Path) -> None:
        """Anything saved beside model/ (lora: the adapter alone, loadable by peft)."""

    def before_training(self, loop) -> str | None:
        """Called once before the first step of a fresh run (not on resume); names what it did, if anything."""
        return None

    def solve(self, loop, features) -> dict | None:
        """Train the model to convergence in one call instead of the loop's epochs (head: a convex problem);
        returns what it did for metrics.json, or None to train by the loop's steps."""
        return None


def freeze_all_but(model: nn.Module, keep) -> None:
    for name, p in model.named_parameters():
        p.requires_grad = bool(keep(name))
