"""Hyperparameters: the learning-rate range test and the Optuna search, on the tiny model."""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib
import json
import math
from pathlib import Path

import optuna
import pytest

from tunelab.cli import main
from tunelab.config import load_yaml
from tunelab.errors import UserError
from tunelab.hparams import SearchSpace, lr_find, tune
from tunelab.hparams.lr_find import suggest

lr_find_mod = importlib.import_module("tunelab.hparams.lr_find")  # the package's `lr_find` is the function

PNG = b"\x89PNG\r\n\x1a\n"


def _digest(folder: str) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file())).hexdigest()


def test_lr_find_stops_at_divergence_and_suggests_a_rate_before_it(toy_config, tiny_model, tmp_path):
    before = _digest(tiny_model)
    toy_config.train.batch_size = 16  # fewer, larger batches: a smoother curve on 96 examples
    result = lr_find(toy_config, min_lr=1e-4, max_lr=100, steps=50, output=tmp_path / "lrf")
    lrs = [p["lr"] for p in result.points]
    assert all(math.isfinite(p["loss"]) and math.isfinite(p["smoothed"]) for p in result.points)
    assert lrs[0] == pytest.approx(1e-4) and all(a < b for a, b in zip(lrs, lrs[1:]))
    assert result.diverged and len(result.points) < 50 and lrs[-1] < 100  # the loss exploded before max_lr
    assert result.suggested_by == "steepest"
    assert 1e-4 < result.suggested < result.lr_at_min < lrs[-1]
    assert result.min_over_10 == pytest.approx(result.lr_at_min / 10)
    written = json.loads((tmp_path / "lrf" / "lr_find.json").read_text())
    assert written["suggestion"]["lr"] == result.suggested and len(written["points"]) == len(result.points)
    assert written["settings"]["diverged"] and written["settings"]["steps"] == 50
    assert (tmp_path / "lrf" / "lr_find.png").read_bytes()[:8] == PNG
    assert _digest(tiny_model) == before  # the saved model is never touched


def test_lr_find_keeps_the_groups_relative_rates(toy_config, tmp_path, monkeypatch):
    """With layer-wise decay every group's rate is its share of the swept rate; the loss here is a stand-in."""
    toy_config.tuning.name, toy_config.tuning.layer_decay, toy_config.train.lr = "full", 0.5, 1e-3
    seen = []

    def fake_step(loop, ddp, optimizer, batch):
        seen.append(sorted({g["lr"] for g in optimizer.param_groups}))
        return 1.0 + len(seen) / 100, {}

    monkeypatch.setattr(lr_find_mod, "_step", fake_step)
    lr_find(toy_config, min_lr=1e-5, max_lr=1e-1, steps=10, output=tmp_path / "lrf")
    first, last = seen[0], seen[-1]
    assert first[-1] == pytest.approx(1e-5) and last[-1] == pytest.approx(1e-1)  # the head gets the swept rate
    assert len(first) == 4  # tiny BERT: embeddings, two blocks, head
    assert [lr / first[-1] for lr in first] == pytest.approx([0.125, 0.25, 0.5, 1.0])
    assert [lr / last[-1] for lr in last] == pytest.approx([0.125, 0.25, 0.5, 1.0])


def test_suggest_on_a_known_curve():
    lrs = [10 ** (-6 + i * 0.1) for i in range(50)]
    loss = [2.0 - 1.5 / (1 + math.exp(-(math.log10(lr) + 3.5) * 4)) + max(0.0, math.log10(lr) + 2) ** 2 for lr in lrs]
    points = [{"lr": lr, "loss": v, "smoothed": v} for lr, v in zip(lrs, loss)]
    steepest, at_min = suggest(points, skip=5)
    assert steepest == pytest.approx(10 ** -3.5, rel=0.3)  # the sigmoid's middle: where the loss falls fastest
    assert 10 ** -3 < at_min < 10 ** -1.5
    flat = [{"lr": lr, "loss": 1.0 + i, "smoothed": 1.0 + i} for i, lr in enumerate(lrs)]
    assert suggest(flat, skip=5) == (None, pytest.approx(lrs[5]))  # never falls: no slope to read


@pytest.mark.parametrize("flags, message", [
    (["--min-lr", "1", "--max-lr", "0.1"], "--min-lr (1) must be below --max-lr (0.1)"),
    (["--steps", "5"], "--steps must be at least 10"),
    (["--min-lr", "0"], "--min-lr must be positive"),
])
def test_lr_find_refuses_bad_options(flags, message, toy_data, tiny_model, tmp_path, capsys):
    code = main(["lr-find", "--model", tiny_model, "--train", toy_data["train"], "--output", str(tmp_path / "o"),
                 *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err
    assert not (tmp_path / "o").exists()


def _cli(command, tiny_model, toy_data, out, *flags) -> int:
    """`tunelab COMMAND` on the tiny model and toy data."""
    return main([command, "--model", tiny_model, "--train", toy_data["train"], "--eval", toy_data["eval"],
                 "--max-length", "32", "--train.progress", "false", "--output", str(out), *flags])


def test_lr_find_from_the_command_line(toy_data, tiny_model, tmp_path, capsys):
    out = tmp_path / "lrf"
    code = _cli("lr-find", tiny_model, toy_data, out, "--batch-size", "16", "--min-lr", "1e-4", "--max-lr", "10",
                "--steps", "12")
    assert code == 0
    suggested = json.loads((out / "lr_find.json").read_text())["suggestion"]["lr"]
    assert f"--lr {suggested:.1e}" in capsys.readouterr().out


def _space(cfg):
    return dataclasses.replace(SearchSpace.default(cfg), epochs=(1, 2))


def _trials_csv(out: Path) -> list[dict]:
    with open(out / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_tune_writes_the_best_config_and_continues_a_stopped_search(toy_config, tmp_path, capsys):
    out = tmp_path / "tune"
    summary = tune(toy_config, 3, out, space=_space(toy_config))
    trials = summary["trials"]
    assert len(trials) == 3 and {t["state"] for t in trials} <= {"COMPLETE", "PRUNED"}
    completed = [t for t in trials if t["state"] == "COMPLETE"]
    assert summary["best"]["value"] == max(t["value"] for t in completed)
    best = load_yaml(out / "best.yaml")
    assert best.train.lr in [t["params"]["train.lr"] for t in trials]
    assert best.train.lr == summary["best"]["params"]["train.lr"] and best.output == str(out / "best-run")
    assert best.tuning.layer_decay == summary["best"]["params"]["tuning.layer_decay"]
    assert best.eval.bootstrap == toy_config.eval.bootstrap  # the final run gets its intervals back
    assert all(1e-6 <= t["params"]["train.lr"] <= 1e-3 and 1 <= t["params"]["train.epochs"] <= 2 for t in trials)
    assert len(_trials_csv(out)) == 3
    assert json.loads((out / "trials.json").read_text())["best"]["number"] == summary["best"]["number"]
    assert (out / "trials.png").read_bytes()[:8] == PNG
    assert (Path(completed[0]["run_dir"]) / "metrics.json").is_file()
    assert not (Path(completed[0]["run_dir"]) / "checkpoints").exists()  # trials are never resumed

    again = tune(toy_config, 4, out, space=_space(toy_config))  # as if the first search had been stopped at 3
    assert [t["number"] for t in again["trials"]] == [0, 1, 2, 3]
    assert [t["value"] for t in again["trials"][:3]] == [t["value"] for t in trials]  # earlier trials kept
    assert len(_trials_csv(out)) == 4
    assert len(tune(toy_config, 4, out, space=_space(toy_config))["trials"]) == 4  # nothing left to do
    toy_config.train.max_grad_norm = 0.5
    with pytest.raises(UserError, match="different config"):
        tune(toy_config, 5, out)


def test_tune_from_the_command_line(toy_data, tiny_model, tmp_path, capsys):
    out = tmp_path / "tune"
    code = _cli("tune", tiny_model, toy_data, out, "--tuning", "head", "--epochs", "1", "--eval.probe", "false",
                "--trials", "1")
    assert code == 0
    printed = capsys.readouterr()
    assert "trial 0: complete" in printed.err  # progress on stderr; the result table on stdout
    assert "best: trial 0" in printed.out and str(out / "best.yaml") in printed.out
    lr = load_yaml(out / "best.yaml").train.lr
    assert 1e-4 <= lr <= 1e-1  # head's range
    assert main(["tune", "--train", toy_data["train"], "--trials", "0", "--output", str(tmp_path / "x")]) == 2


class PruneAllButTheFirst(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return trial.number > 0


def test_pruned_trials_are_recorded_and_never_chosen(toy_config, tmp_path):
    toy_config.tuning.name = "lora"
    out = tmp_path / "tune"
    summary = tune(toy_config, 3, out, space=_space(toy_config), pruner=PruneAllButTheFirst())
    assert [t["state"] for t in summary["trials"]] == ["COMPLETE", "PRUNED", "PRUNED"]
    assert summary["best"]["number"] == 0
    study = optuna.load_study(study_name="tunelab", storage=f"sqlite:///{out / 'study.db'}")
    assert [t.state for t in study.trials][1:] == [optuna.trial.TrialState.PRUNED] * 2
    for t in summary["trials"][1:]:
        assert not (Path(t["run_dir"]) / "metrics.json").exists()  # stopped at the first evaluation
    best = load_yaml(out / "best.yaml")
    assert best.train.lr == summary["trials"][0]["params"]["train.lr"]
    assert best.tuning.lora_alpha == 2 * best.tuning.lora_r
    assert [r["state"] for r in _trials_csv(out)] == ["COMPLETE", "PRUNED", "PRUNED"]


@pytest.mark.slow
def test_a_search_with_every_trial_pruned_has_no_best(toy_config, tmp_path):
    toy_config.tuning.name = "head"
    summary = tune(toy_config, 2, tmp_path / "tune", space=_space(toy_config),
                   pruner=optuna.pruners.ThresholdPruner(lower=2.0))  # F1 never reaches 2
    assert [t["state"] for t in summary["trials"]] == ["PRUNED", "PRUNED"]
    assert summary["best"] is None and not (tmp_path / "tune" / "best.yaml").exists()


@pytest.mark.slow
def test_tune_with_cross_validation_scores_the_mean_and_never_prunes(toy_config, tmp_path):
    toy_config.tuning.name, toy_config.data.eval, toy_config.eval.folds = "head", None, 2
    out = tmp_path / "tune"
    summary = tune(toy_config, 1, out, space=_space(toy_config), pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    trial = summary["trials"][0]
    assert trial["state"] == "COMPLETE"
    cv = json.loads((Path(trial["run_dir"]) / "cv.json").read_text())
    assert trial["value"] == pytest.approx(cv["eval"]["f1_macro"]["mean"])
    assert load_yaml(out / "best.yaml").eval.folds == 2
