"""methods/head.py: the head is fitted to convergence, with its L2 chosen inside the training split, and is as good
as scikit-learn's logistic regression on the same features; the method defaults fill unset lr and epochs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tunelab.methods import METHODS, apply_defaults
from tunelab.methods.head import TOLERANCE, fit_linear
from tunelab.tasks import TASKS, Space


def separable(n: int, seed: int, width: int = 20, classes: int = 3):
    """Gaussian features whose class is the argmax of a fixed linear map: linearly separable by construction;
    features on different scales, as a frozen encoder's are."""
    fixed = np.random.default_rng(99)
    scale, offset = fixed.uniform(0.1, 10, size=width), fixed.normal(size=width)
    rule = fixed.normal(size=(classes, width))
    unit = np.random.default_rng(seed).normal(size=(n, width))
    x = unit * scale + offset
    return torch.tensor(x, dtype=torch.float32), torch.tensor((unit @ rule.T).argmax(1))


def test_head_matches_sklearn_logistic_regression_and_converges():
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    task, space = TASKS["classification"], Space(labels=["a", "b", "c"])
    x, y = separable(400, 0)
    x_test, y_test = separable(2000, 1)
    fitted = fit_linear(task, space, x, y, y.tolist(), True, None, seed=0)
    ours = ((x_test @ fitted["weight"].T + fitted["bias"]).argmax(1) == y_test).float().mean().item()
    sk = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=np.logspace(-4, 4, 9), max_iter=5000, l1_ratios=(0,), scoring="accuracy",
                                                          use_legacy_attributes=False))
    theirs = sk.fit(x.numpy(), y.numpy()).score(x_test.numpy(), y_test.numpy())
    assert ours >= theirs - 0.01 and ours > 0.9, (ours, theirs)
    # converged: the gradient is near zero and the last evaluations no longer move the objective
    trace = fitted["objective"]
    assert fitted["converged"] and fitted["gradient"] < 1e-3
    assert abs(trace[-1] - trace[-2]) < 10 * TOLERANCE * max(1.0, abs(trace[-1]))
    # λ was chosen by its held-out cross-entropy, the lowest of the grid and far below chance's ln 3 = 1.10
    cv = fitted["cv_loss"]
    assert len(cv) > 5 and cv[fitted["l2"]] == min(cv.values()) < 0.3, cv


def relabelled(y: torch.Tensor, share: float) -> torch.Tensor:
    """`y` with about `share` of its labels drawn again at random among the 3 classes (seeded)."""
    noisy = y.clone()
    flip = torch.rand(len(y), generator=torch.Generator().manual_seed(0)) < share
    noisy[flip] = torch.randint(0, 3, (int(flip.sum()),), generator=torch.Generator().manual_seed(1))
    return noisy


def test_l2_is_chosen_inside_the_training_split():
    """Noisy labels on few examples want a strong penalty; clean, plentiful ones a weak one."""
    task, space = TASKS["classification"], Space(labels=["a", "b", "c"])
    x, y = separable(300, 2)
    noisy = relabelled(y, 0.5)
    clean = fit_linear(task, space, x, y, y.tolist(), True, None, seed=0)
    dirty = fit_linear(task, space, x, noisy, noisy.tolist(), True, None, seed=0)
    assert dirty["l2"] > clean["l2"]


def test_regression_head_is_ridge_regression():
    from sklearn.linear_model import Ridge

    task, space = TASKS["regression"], Space()
    x, _ = separable(200, 3)
    target = x @ torch.linspace(-1, 1, x.shape[1]) + 0.1 * torch.randn(200, generator=torch.Generator().manual_seed(0))
    y = (target - target.mean()) / target.std()
    fitted = fit_linear(task, space, x, y, y.tolist(), True, 1e-3, seed=0)
    xs = (x - x.mean(0)) / x.std(0)
    ridge = Ridge(alpha=1e-3 * len(x) / 2).fit(xs.numpy(), y.numpy())  # the same objective, times n
    ours = (x @ fitted["weight"].T + fitted["bias"]).squeeze(-1)
    assert torch.allclose(ours, torch.tensor(ridge.predict(xs.numpy()), dtype=torch.float32), atol=1e-3)


def test_the_l2_path_stops_past_its_minimum_and_chooses_as_the_whole_grid(monkeypatch):
    from tunelab.methods import head

    task, space = TASKS["classification"], Space(labels=["a", "b", "c"])
    x, y = separable(300, 2)
    noisy = relabelled(y, 0.3)
    short = fit_linear(task, space, x, noisy, noisy.tolist(), True, None, seed=0)
    monkeypatch.setattr(head, "PATIENCE", len(head.L2_GRID))
    whole = fit_linear(task, space, x, noisy, noisy.tolist(), True, None, seed=0)
    assert len(short["cv_loss"]) < len(whole["cv_loss"]) == len(head.L2_GRID)
    assert short["l2"] == whole["l2"] and short["cv_loss"] == {k: whole["cv_loss"][k] for k in short["cv_loss"]}


def test_head_run_reaches_sklearn_on_its_own_cached_features(task_config):
    """End to end on the tiny BERT: the head's eval accuracy equals scikit-learn's logistic regression fitted on the
    features the head reads (± 1 point), the solver converged, and the history is its objective, falling."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from tunelab import train
    from tunelab.loop import Loop
    from tunelab.methods.head import _linear_head, head_inputs
    from tunelab.distributed import setup
    from tunelab.pipeline import build_job

    cfg = task_config("classification")
    cfg.tuning.name, cfg.train.lr, cfg.train.epochs = "head", None, None
    result = train(cfg)
    solver = result.metrics["train"]["solver"]
    assert solver["converged"] and solver["gradient"] < 1e-3
    history = [json.loads(line) for line in (result.run_dir / "history.jsonl").read_text().splitlines()]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == solver["evaluations"] and losses[-1] < losses[0]

    def features(path):  # what the head's linear layer reads, for every example of `path`
        c = task_config("classification")
        c.tuning.name, c.data.train, c.data.eval = "head", path, path
        job = build_job(c, torch.device("cpu"))
        loop = Loop(c, job.task, job.splits.space, job.model, job.method, job.train_items, job.eval_items,
                    job.pad_id, result.run_dir, setup("cpu"))
        return head_inputs(loop, _linear_head(job.model), None, job.train_items).numpy(), \
            [it["_gold"] for it in job.train_items]

    x, y = features(cfg.data.train)
    x_eval, y_eval = features(cfg.data.eval)
    sk = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=np.logspace(-4, 4, 9), max_iter=5000, l1_ratios=(0,), scoring="accuracy",
                                                          use_legacy_attributes=False))
    theirs = sk.fit(x, y).score(x_eval, y_eval)
    assert result.eval["accuracy"] >= theirs - 0.01, (result.eval["accuracy"], theirs)


def test_sgd_head_still_steps(task_config):
    from tunelab import train

    cfg = task_config("classification")
    cfg.tuning.name, cfg.tuning.head_solver, cfg.train.lr, cfg.train.epochs = "head", "sgd", None, 2
    result = train(cfg)
    assert "solver" not in result.metrics["train"] and result.metrics["train"]["steps"] > 2


def test_method_defaults_fill_what_is_not_given(task_config):
    from tunelab.config import Config

    for name, method in METHODS.items():
        cfg = Config()
        cfg.tuning.name = name
        apply_defaults(cfg)
        assert (cfg.train.lr, cfg.train.epochs) == (method.lr, method.epochs)
    assert METHODS["lora"].lr > METHODS["full"].lr and METHODS["head"].lr > METHODS["full"].lr
    cfg = Config()
    cfg.tuning.name, cfg.train.lr, cfg.train.epochs, cfg.train.lr_scale = "lora", 3e-4, 7, 2.0
    apply_defaults(cfg)
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.lr_scale) == (6e-4, 7, 1.0)
    cfg = Config()
    cfg.tuning.name, cfg.train.lr_scale = "full", 10.0
    apply_defaults(cfg)
    assert cfg.train.lr == METHODS["full"].lr * 10


@pytest.mark.slow
def test_full_starts_from_the_solved_head(task_config, tmp_path):
    """LP-FT: before full fine-tuning's first step the head is the solved one, so the objective starts lower than
    with the random head; a resume does not redo it; a distill student gets it unless it is the teacher cut
    shorter."""
    from test_contract import build, training_objective

    from tunelab.distributed import Dist
    from tunelab.loop import Loop, fit
    from tunelab.methods.head import warm_head

    cfg = task_config("classification")
    cfg.tuning.name, cfg.train.lr, cfg.train.epochs, cfg.tuning.warm_head = "full", 5e-4, 1, True
    model, method, tok, items, eval_items, job = build(cfg)
    loop = Loop(cfg, job.task, job.splits.space, model, method, items, eval_items, tok.pad_token_id, tmp_path,
                Dist())
    random_head = training_objective(job)
    assert warm_head(loop)
    assert training_objective(job) < 0.9 * random_head
    assert method.before_training(loop) and fit(loop)["warm_start"]
    shortened = METHODS["distill"]()  # a student cut from the teacher keeps the teacher's trained head
    cfg.tuning.student_layers = 1
    assert shortened.before_training(loop) is None
    cfg.tuning.student_layers = 0  # a student built from --model starts from its solved head, as full does
    assert METHODS["distill"]().before_training(loop)
