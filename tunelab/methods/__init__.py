"""Tuning methods. Adding one is a file plus one line in this plain dict (of classes: a run makes its instance)."""
from tunelab.methods.base import Method
from tunelab.methods.distill import Distill
from tunelab.methods.full import Full
from tunelab.methods.lora import Lora, QLora
from tunelab.methods.head import Head
from tunelab.methods.simple import Partial, Scratch

METHODS: dict[str, type[Method]] = {
    "scratch": Scratch,
    "head": Head,
    "partial": Partial,
    "full": Full,
    "lora": Lora,
    "qlora": QLora,
    "distill": Distill,
}


def apply_defaults(cfg) -> None:
    """Fill train.lr and train.epochs left unset with the method's own defaults, scaled by train.lr_scale (in
    place)."""
    method = METHODS.get(cfg.tuning.name)
    if method is None:
        return
    if cfg.train.lr is None:
        cfg.train.lr = method.lr
    cfg.train.lr, cfg.train.lr_scale = cfg.train.lr * cfg.train.lr_scale, 1.0  # once: config.yaml has the product
    if cfg.train.epochs is None:
        cfg.train.epochs = method.epochs
