"""Choosing hyperparameters: the learning-rate range test (`lr_find`) and Optuna search (`tune`)."""
from tunelab.hparams.lr_find import LRFindResult, lr_find
from tunelab.hparams.tune import SearchSpace, table, tune

__all__ = ["LRFindResult", "SearchSpace", "lr_find", "table", "tune"]
