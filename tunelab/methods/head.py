"""head: transfer learning. The pretrained backbone is frozen; only a new task head learns.

With the backbone frozen (and in eval mode), a head that is one linear layer over a fixed vector per text is a
linear model on fixed features: logistic regression for classification, one logistic per label for multilabel,
ridge regression for regression. Its loss is convex, so it is solved, not stepped: the head's inputs are
computed once, standardised, and the weights fitted to convergence by full-batch L-BFGS; the L2 strength is
chosen by stratified K-fold cross-validation inside the training split (the eval set never sees a candidate),
and the standardisation is folded back into the exported layer. Candidates are compared by their held-out loss
(cross-entropy; squared error for regression), a proper scoring rule that moves smoothly with λ, rather than
by macro-F1, which on folds of a few dozen examples jumps with every flipped prediction: on the demo tweets at
10% (201 examples, bench/head_vs_probe.py, seeds 0-4) the head minus the probe was -0.030..+0.003 macro-F1
choosing by F1, -0.002..+0.014 choosing by loss. Stepping the same head with AdamW for a couple of
epochs stopped far from this optimum (issue 24: 0.50 macro-F1 against the probe's 0.65 on the demo tweets).

Heads that are not one linear layer (RoBERTa's dense + out_proj) and per-token tasks (ner) train with the loop's
epochs as before (`tuning.head_solver sgd` asks for that everywhere).
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch import nn

from tunelab.config import TuningConfig
from tunelab.data.batching import collate
from tunelab.methods.base import Method, freeze_all_but
from tunelab.models import is_head, layer_depth, num_blocks
from tunelab.modes import eval_mode

L2_GRID = tuple(10.0 ** (k / 2) for k in range(2, -11, -1))  # λ of mean loss + λ/2 ‖W‖², strongest first (warm starts)
INNER_FOLDS = 5
MAX_ITER = 1000  # L-BFGS iterations of the final fit; the cross-validation fits stop at a tenth of it
TOLERANCE = 1e-7  # L-BFGS stops when the objective changes less than this, or the gradient's largest entry
GRADIENT = 1e-3  # converged: the gradient's largest entry at the end (float32 losses round near 1e-4)
PATIENCE = 3  # the cross-validation's path stops after this many λ in a row worse than its best (1.5 decades)


class Head(Method):
    """Transfer learning: the pretrained backbone is frozen (and kept in eval mode); only the new head trains."""

    replays_features = True
    lr, epochs = 2e-3, 3  # the loop's settings where the head is stepped (sgd) rather than solved

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

    def solve(self, loop, features) -> dict | None:
        """Fit the head to convergence in place (see the module's docstring); None where it is stepped instead."""
        linear = _linear_head(loop.model)
        if loop.cfg.tuning.head_solver != "lbfgs" or linear is None or not loop.task.pools or \
                not loop.task.replayable(loop.train_items):  # augmented views: stepped, a fresh view each batch
            return None
        return fit_head(loop, linear, features, per_feature=True)


def lp_ft(loop) -> str | None:
    """What full and partial do before their first step (tuning.warm_head): the head solved first; names it."""
    return "head solved on the pretrained features (LP-FT)" if loop.cfg.tuning.warm_head and warm_head(loop) else None


def warm_head(loop) -> bool:
    """Linear probing, then fine-tuning (LP-FT; Kumar et al., ICLR 2022): set the new head's linear layer to its
    solved optimum on the pretrained features before any weight moves, so that fine-tuning starts from a good
    head instead of pulling the backbone after a random one. True where it applied (one linear head layer)."""
    heads = [m for name, m in loop.model.named_modules()
             if isinstance(m, nn.Linear) and _is_head(loop.model, name + ".weight")]
    if len(heads) != 1 or not loop.task.pools or type(heads[0]) is not nn.Linear:
        return False
    labelled = [it for it in loop.train_items if not it.get("_unlabelled")]  # (distill's transfer set has no gold)
    return fit_head(loop, heads[0], None, per_feature=False, items=labelled) is not None


def fit_head(loop, linear: nn.Linear, features, per_feature: bool, items: list[dict] | None = None) -> dict | None:
    """Set `linear` to the solved optimum on what it reads for `items` (default: every training item; see
    fit_linear); returns the fit's record, or None where it reads more than one vector per item."""
    items = loop.train_items if items is None else items
    z = head_inputs(loop, linear, features, items)
    if z is None:
        return None
    y = collate([{"input_ids": [0], "labels": it["labels"]} for it in items], 0)["labels"]
    fitted = fit_linear(loop.task, loop.space, z, y, [it["_gold"] for it in items],
                        linear.bias is not None, loop.cfg.tuning.head_l2, loop.cfg.train.seed, per_feature)
    with torch.no_grad():
        linear.weight.copy_(fitted.pop("weight").to(linear.weight))
        bias = fitted.pop("bias")
        if linear.bias is not None:
            linear.bias.copy_(bias.to(linear.bias))
    return fitted


def _is_head(model: nn.Module, name: str) -> bool:
    return is_head(model, name)


def _linear_head(model: nn.Module) -> nn.Linear | None:
    """The head's one trainable layer, when it is a single nn.Linear and nothing else in the model trains."""
    trainable = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    if len(trainable) != 1:
        return None
    module = model.get_submodule(trainable.pop())
    return module if type(module) is nn.Linear else None


@torch.no_grad()
def head_inputs(loop, linear: nn.Linear, features, items: list[dict]) -> torch.Tensor | None:
    """What `linear` reads for each of `items`, in eval mode (no dropout): one forward pass, or the replay of
    the cached backbone outputs (`features`: of every training item, in order). None where it reads more than one
    vector per item."""
    from tunelab.data.batching import global_batches
    from tunelab.methods.features import model_inputs

    seen: list[torch.Tensor] = []
    hook = linear.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().float().cpu()))
    rows: list[int] = []
    try:
        lengths = [loop.task.length(it) for it in items]
        with eval_mode(loop.model):
            for batch in global_batches(lengths, 64, seed=0, epoch=0, shuffle=False):
                inputs = model_inputs(loop.task, [items[i] for i in batch], loop.pad_id, loop.dist.device)
                with features.serving(loop.model, batch) if features else contextlib.nullcontext():
                    loop.model(**inputs)
                rows += batch
    finally:
        hook.remove()
    if any(part.dim() != 2 for part in seen):  # a per-token head (a decoder's score reads every position)
        return None
    z = torch.cat(seen)
    out = torch.empty_like(z)
    out[torch.tensor(rows)] = z
    return out


def fit_linear(task, space, z: torch.Tensor, y: torch.Tensor, golds: list, bias: bool, l2: float | None,
               seed: int, per_feature: bool = True) -> dict:
    """The task's linear model on `z` by L-BFGS: L2 chosen by inner cross-validation unless `l2` is given.
    Features are standardised each on its own scale, or (`per_feature` False) all by one scale, which keeps the
    weights on low-variance directions small: a head that fine-tuning will move the features under.
    Returns the weight and bias in z's own units, the chosen λ, the cross-validated held-out losses and the
    final fit's objective after every evaluation."""
    mean = z.mean(0) if bias else torch.zeros(z.shape[1])
    std = z.std(0).clamp(min=1e-6) if len(z) > 1 else torch.ones(z.shape[1])
    if not per_feature:
        std = torch.full_like(std, float(std.pow(2).mean().sqrt()))
    x = (z - mean) / std
    out_dim = _out_dim(task, space)
    scores = None if l2 is not None else _cross_validate(task, x, y, golds, out_dim, bias, seed)
    chosen = l2 if l2 is not None else _best(scores)
    w, b, trace = _lbfgs(task, x, y, out_dim, bias, chosen, MAX_ITER)
    weight = w / std  # fold the standardisation into the layer: W (z - μ)/σ + b
    gradient = _gradient(task, x, y, w, b, chosen)
    return {"weight": weight, "bias": b - weight @ mean, "l2": chosen, "cv_loss": scores, "objective": trace,
            "gradient": gradient, "converged": gradient <= GRADIENT}


def _out_dim(task, space) -> int:
    return 1 if not space.labels else len(space.labels)


def _lbfgs(task, x, y, out_dim: int, bias: bool, l2: float, max_iter: int, start=None):
    """Minimise mean task loss + λ/2 ‖W‖² (bias unpenalised); returns W, b and the objective at each evaluation."""
    w = (start[0].clone() if start else torch.zeros(out_dim, x.shape[1])).requires_grad_()
    b = (start[1].clone() if start else torch.zeros(out_dim)).requires_grad_(bias)
    opt = torch.optim.LBFGS([w, b] if bias else [w], lr=1, max_iter=max_iter, history_size=20,
                            tolerance_grad=TOLERANCE, tolerance_change=TOLERANCE, line_search_fn="strong_wolfe")
    trace: list[float] = []

    def objective():
        opt.zero_grad()
        loss = _objective(task, x, y, w, b, l2)
        loss.backward()
        trace.append(float(loss.detach()))
        return loss

    opt.step(objective)
    return w.detach(), b.detach(), trace


def _objective(task, x, y, w, b, l2: float) -> torch.Tensor:
    """Mean task loss + λ/2 ‖W‖² (the bias is not penalised)."""
    return task.loss(x @ w.T + b, y) / len(x) + 0.5 * l2 * (w * w).sum()


def _gradient(task, x, y, w, b, l2: float) -> float:
    """The largest entry of the objective's gradient at (w, b): near 0 at the optimum."""
    w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
    _objective(task, x, y, w, b, l2).backward()
    return float(max(w.grad.abs().max(), b.grad.abs().max()))


def _cross_validate(task, x, y, golds, out_dim: int, bias: bool, seed: int) -> dict[float, float]:
    """{λ: the task's mean loss per held-out example, averaged over the folds}, along L2_GRID from the strongest
    penalty until PATIENCE values in a row were worse than the best so far. The held-out loss is a smooth, single-
    dipped curve of λ (on the demo tweets and the topics set, every one of 13 runs chose the same λ as the whole
    grid did after 6-8 of its 13 values), and the weakest penalties, which the path then skips, are the slowest
    fits."""
    folds = _inner_folds(task, golds, seed)
    if folds is None:  # too few examples to hold any out: a moderate default, said in the result
        return {1e-2: math.nan}
    losses: dict[float, float] = {}
    starts = [None] * len(folds)  # each fold's fit starts from its solution at the last λ
    worse = 0
    for l2 in L2_GRID:
        losses[l2] = 0.0
        for k, (train_idx, held_idx) in enumerate(folds):
            w, b, _ = _lbfgs(task, x[train_idx], y[train_idx], out_dim, bias, l2, MAX_ITER // 10, starts[k])
            starts[k] = (w, b)
            losses[l2] += float(task.loss(x[held_idx] @ w.T + b, y[held_idx])) / len(held_idx) / len(folds)
        worse = 0 if losses[l2] <= min(losses.values()) else worse + 1
        if worse == PATIENCE:
            break
    return losses


def _best(losses: dict[float, float]) -> float:
    """The λ with the lowest cross-validated loss; a tie goes to the stronger penalty (listed first)."""
    best = None
    for l2, value in losses.items():
        if math.isnan(value):
            return l2
        if best is None or value < losses[best]:
            best = l2
    return best


def _inner_folds(task, golds: list, seed: int):
    """Index pairs of K-fold splits of the training split: stratified by class where every class has K members,
    with fewer folds (at least 2) where the rarest class is smaller; None with under 10 examples."""
    from sklearn.model_selection import KFold, StratifiedKFold

    n = len(golds)
    if n < 10:
        return None
    index = np.arange(n)
    if task.name == "classification":
        counts = np.bincount(np.asarray(golds))
        k = min(INNER_FOLDS, int(counts[counts > 0].min()))
        if k >= 2:
            return [(torch.from_numpy(a), torch.from_numpy(b))
                    for a, b in StratifiedKFold(k, shuffle=True, random_state=seed).split(index, golds)]
    return [(torch.from_numpy(a), torch.from_numpy(b))
            for a, b in KFold(INNER_FOLDS, shuffle=True, random_state=seed).split(index)]
