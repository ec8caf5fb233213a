"""Train and eval mode, switched for a block and given back module by module."""
from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """`model` in eval mode within the block; after it, every module back in its own mode. `model.train(was)` would
    put all of them into one mode: a frozen backbone that a method keeps in eval mode (head) would come back with its
    dropout on."""
    # (or a stand-in that answers like a module: the ONNX Runtime classifier has `training`, eval() and train())
    modes = [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else [(model, model.training)]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
