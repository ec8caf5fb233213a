"""Honest model selection: the eval set chooses (best step, threshold, best trial), the test set grades, once."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

import tunelab
from tunelab import compare as compare_mod
from tunelab import loop as loop_mod
from tunelab import pipeline
from tunelab.cli import main
from tunelab.config import Config, DataConfig, save_yaml
from tunelab.data import load_splits
from tunelab.tasks import TASKS
from tunelab.hparams import tune
from tunelab.hparams.tune import table as tune_table
from tunelab.report import write_report

from conftest import make_rows, write_jsonl


@pytest.fixture(scope="module")
def test_file(tmp_path_factory) -> str:
    """21 examples drawn apart from train (seed 1) and eval (seed 2): a size no other split has."""
    return str(write_jsonl(tmp_path_factory.mktemp("test-data") / "test.jsonl", make_rows(21, 3)))


def _early_stopping(cfg: Config) -> Config:
    """Far too high a learning rate: the eval loss is best early and then rises, so early stopping restores an
    earlier step than the last one."""
    cfg.tuning.name = "full"
    cfg.train.lr, cfg.train.epochs = 0.05, 6
    cfg.train.eval_every, cfg.train.early_stopping_patience, cfg.train.metric = 2, 2, "loss"
    cfg.eval.bootstrap, cfg.eval.probe = 100, False
    return cfg


def _flags(cfg: Config) -> list[str]:
    return ["--model", cfg.model.name, "--train", cfg.data.train, "--eval", cfg.data.eval, "--max-length", "32",
            "--epochs", "2", "--batch-size", "8", "--lr", "5e-3", "--train.progress", "false",
            "--eval.bootstrap", "100", "--eval.probe", "false", "--output", cfg.output]


# ---- (a) selected_on_eval says when the eval numbers are optimistic ------------------------------------------

def test_early_stopping_without_a_test_set_is_called_optimistic(toy_config, capsys):
    args = ["train", *_flags(toy_config), "--train.early_stopping_patience", "2", "--train.eval_every", "4"]
    assert main(args) == 0
    m = json.loads((Path(toy_config.output) / "metrics.json").read_text())
    assert m["selected_on_eval"] is True and m["graded_on"] == "eval" and m["chosen_on_eval"] == ["the best step"]
    assert "test" not in m and "baseline_test" not in m
    out = capsys.readouterr().out
    assert "eval metrics are optimistic: the eval set also chose the best step" in out and "--test FILE" in out


def test_without_early_stopping_a_classifier_is_not_selected_on_eval(toy_config, capsys):
    assert main(["train", *_flags(toy_config)]) == 0
    m = json.loads((Path(toy_config.output) / "metrics.json").read_text())
    assert m["selected_on_eval"] is False and m["chosen_on_eval"] == [] and m["graded_on"] == "eval"
    assert "optimistic" not in capsys.readouterr().out


def test_a_threshold_tuned_on_eval_is_a_selection(task_config):
    cfg = task_config("multilabel")
    cfg.train.epochs = 1
    m = tunelab.train(cfg).metrics
    assert "threshold_search" in m and m["selected_on_eval"] is True and m["chosen_on_eval"] == ["the threshold"]


# ---- (b) the test set is scored once, after selection, from the selected weights ------------------------------

def test_the_test_set_is_scored_once_after_training_with_the_exported_model(toy_config, test_file, monkeypatch,
                                                                            capsys):
    seen, fitted = [], []
    real_evaluate, real_fit = pipeline.evaluate, pipeline.fit

    def spy_evaluate(task, model, items, *a, **kw):
        seen.append((len(items), bool(fitted)))
        return real_evaluate(task, model, items, *a, **kw)

    def spy_fit(*a, **kw):
        out = real_fit(*a, **kw)
        fitted.append(True)
        return out

    monkeypatch.setattr(pipeline, "evaluate", spy_evaluate)
    monkeypatch.setattr(loop_mod, "evaluate", spy_evaluate)
    monkeypatch.setattr(pipeline, "fit", spy_fit)
    assert main(["train", *_flags(toy_config), "--test", test_file]) == 0
    assert [s for s in seen if s[0] == 21] == [(21, True)]  # the 21 test examples: once, and after the loop
    run = Path(toy_config.output)
    m = json.loads((run / "metrics.json").read_text())
    assert m["graded_on"] == "test" and m["train"]["test_examples"] == 21
    assert m["test"].keys() == m["eval"].keys() and m["test_ci95"].keys() <= m["test"].keys()
    assert "majority" in m["baseline_test"] and "ci95" in m["baseline_test"]["majority"]
    assert not any(k.startswith("test") for line in (run / "history.jsonl").read_text().splitlines()
                   for k in json.loads(line))  # the loop never saw it
    printed = capsys.readouterr().out
    assert "test set (21 examples)" in printed and "untouched estimate" in printed
    assert main(["eval", str(run), "--data", test_file]) == 0
    again = json.loads((run / "eval-test.json").read_text())
    for k, v in m["test"].items():
        assert again[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


@pytest.fixture(scope="module")
def early_stopped(tiny_model, toy_data, tmp_path_factory):
    """An early-stopped run whose test file is a copy of the eval file: its test numbers must be the best step's
    eval numbers, not the last evaluation's."""
    folder = tmp_path_factory.mktemp("early")
    copy_of_eval = shutil.copy(toy_data["eval"], folder / "test.jsonl")
    cfg = Config()
    cfg.model.name, cfg.output = tiny_model, str(folder / "run")
    cfg.data.train, cfg.data.eval, cfg.data.test, cfg.data.max_length = (toy_data["train"], toy_data["eval"],
                                                                         str(copy_of_eval), 32)
    cfg.train.batch_size, cfg.train.progress = 8, False
    return tunelab.train(_early_stopping(cfg)), cfg


def test_with_early_stopping_the_test_set_sees_the_best_steps_weights(early_stopped):
    result, cfg = early_stopped
    m, t = result.metrics, result.metrics["train"]
    evals = [h["eval_loss"] for h in (json.loads(line) for line in (result.run_dir / "history.jsonl").open())
             if "eval_loss" in h]
    assert t["stopped_early"] and evals[-1] > t["best"]  # the last weights were worse than the best ones
    assert m["test"]["loss"] == pytest.approx(t["best"], rel=1e-5)
    assert m["test"] == pytest.approx(m["eval"], rel=1e-6)
    assert m["selected_on_eval"] and m["graded_on"] == "test"
    assert main(["eval", str(result.run_dir), "--data", cfg.data.test]) == 0  # the exported model is the best step's
    assert json.loads((result.run_dir / "eval-test.json").read_text())["loss"] == pytest.approx(t["best"], rel=1e-4)


def test_dpo_test_set_is_scored_against_the_starting_model(lm_config, tmp_path):
    cfg = lm_config("dpo")
    cfg.train.epochs = 1
    cfg.data.test = str(shutil.copy(cfg.data.eval, tmp_path / "test.jsonl"))
    m = tunelab.train(cfg).metrics
    # The same examples, references taken from the same starting model: the same numbers as eval.
    assert m["test"] == pytest.approx(m["eval"], rel=1e-5)
    main_metric = m["metric"]
    assert m["baseline_test"]["before_training"][main_metric] == m["baseline"]["before_training"][main_metric]


# ---- (c) data.test_split: stratified, disjoint, fixed across learning-curve fractions -----------------------

def test_test_split_is_stratified_disjoint_and_unchanged_by_train_fraction(toy_data):
    def splits(**data):
        cfg = Config()
        cfg.data = DataConfig(train=toy_data["train"], test_split=0.25, eval_split=0.2, **data)
        return load_splits(TASKS[cfg.task], cfg)

    full = splits()
    test = {e.where for e in full.test}
    assert len(full.test) == 24  # 96 rows, 32 per class: 8 of each
    assert all(sum(e.label == name for e in full.test) == 8 for name in full.labels)
    assert not test & {e.where for e in full.train + full.eval}
    assert len(full.train) + len(full.eval) + len(full.test) == 96
    for other in (splits(train_fraction=0.5), splits(train_fraction=0.1), splits(limit_train=20),
                  splits(eval=toy_data["eval"])):
        assert {e.where for e in other.test} == test
        assert not test & {e.where for e in other.train + other.eval}
    assert splits(train_fraction=0.5).train != full.train  # the fraction did take effect


# ---- (d) compare grades on test when there is one, else marks the optimistic rows -----------------------------

def _base(cfg: Config, test: str | None) -> Config:
    base = copy.deepcopy(cfg)
    base.data.test, base.eval.probe = test, False
    return base


def test_compare_rows_come_from_the_test_set(early_stopped, tmp_path):
    result, cfg = early_stopped
    row = compare_mod._row("full", 1.0, result.metrics, cfg)
    assert row["graded_on"] == "test" and row["selected_on_eval"]
    assert row["metrics"]["accuracy"]["value"] == result.metrics["test"]["accuracy"]
    assert row["metrics"]["f1_macro"]["ci"] == result.metrics["test_ci95"]["f1_macro"]
    assert row["eval_metrics"]["f1_macro"]["value"] == result.metrics["eval"]["f1_macro"]
    baselines = compare_mod._baselines(_base(cfg, cfg.data.test), 1.0)
    assert [b["graded_on"] for b in baselines] == ["test"]
    assert baselines[0]["metrics"]["accuracy"]["value"] == pytest.approx(
        result.metrics["baseline_test"]["majority"]["accuracy"])
    comparison = _comparison([row], baselines, "test")
    text = compare_mod.table(comparison)
    assert "test f1_macro [95% CI]" in text and "*" not in text
    assert "optimistic" not in (write_report(comparison, tmp_path)).read_text()


def test_compare_marks_rows_chosen_on_the_eval_set_they_are_scored_on(early_stopped, tmp_path):
    result, cfg = early_stopped
    m = {k: v for k, v in result.metrics.items() if not k.startswith("test") and k != "baseline_test"}
    m["graded_on"] = "eval"  # the same run as if it had no test set
    cfg = _base(cfg, None)
    marked = compare_mod._row("full", 1.0, m, cfg)
    plain = compare_mod._row("head", 1.0, {**m, "selected_on_eval": False, "chosen_on_eval": []}, cfg)
    assert marked["selected_on_eval"] and marked["graded_on"] == "eval" and not plain["selected_on_eval"]
    comparison = _comparison([marked, plain], compare_mod._baselines(cfg, 1.0), "eval")
    lines = compare_mod.table(comparison).splitlines()
    full = next(line for line in lines if line.startswith("full"))
    head = next(line for line in lines if line.startswith("head"))
    assert f"{marked['metrics']['f1_macro']['value']:.4f}*" in full and "*" not in head
    assert any(line.startswith("* chosen on the eval set it is scored on (optimistic)") for line in lines)
    html = write_report(comparison, tmp_path).read_text()
    assert f"{marked['metrics']['f1_macro']['value']:.3f}*" in html and "* chosen on the eval set" in html
    json.dumps(comparison)  # comparison.json carries selected_on_eval and graded_on per row


def _comparison(rows: list[dict], baselines: list[dict], graded_on: str) -> dict:
    return {"task": "classification", "metric": "f1_macro", "metrics": ["f1_macro", "accuracy"],
            "methods": [r["method"] for r in rows], "fractions": [1.0], "folds": 0, "output": "cmp", "rows": rows,
            "graded_on": graded_on, "baselines": baselines}


def test_cross_validation_marks_folds_that_selected_on_their_held_out_part():
    from tunelab.crossval import summarize

    fold = {"task": "classification", "metric": "f1_macro", "eval": {"f1_macro": 0.5}, "baseline": {},
            "selected_on_eval": True, "chosen_on_eval": ["the best step"]}
    cv = summarize([fold, {**fold, "eval": {"f1_macro": 0.7}}])
    assert cv["selected_on_eval"] and cv["graded_on"] == "eval" and cv["chosen_on_eval"] == ["the best step"]


# ---- tune: the best trial is chosen on eval and graded on test ------------------------------------------------

def test_tune_reports_the_best_trials_untouched_test_metrics(toy_config, test_file, tmp_path):
    import dataclasses

    from tunelab.hparams import SearchSpace

    toy_config.tuning.name, toy_config.data.test = "head", test_file
    space = dataclasses.replace(SearchSpace.default(toy_config), epochs=(1, 1))
    summary = tune(toy_config, 1, tmp_path / "tune", space=space)
    best = summary["best"]
    trial = json.loads((Path(summary["trials"][0]["run_dir"]) / "metrics.json").read_text())
    assert best["test"] == trial["test"] and "untouched" in best["note"]
    assert json.loads((tmp_path / "tune" / "trials.json").read_text())["best"]["test"] == trial["test"]
    assert json.loads((tmp_path / "tune" / "best.json").read_text())["test"] == trial["test"]
    text = tune_table(summary)
    assert f"untouched estimate of trial 0 on the test set: f1_macro {trial['test']['f1_macro']:.4f}" in text
    without = {**summary, "best": {**best, "test": None}}
    assert "no test set: that score is optimistic" in tune_table(without)


# ---- (e) bad combinations are refused before any work -----------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--data.test_split", "0.2", "--test", "T"], "either --test FILE or data.test_split, not both"),
    (["--folds", "2", "--data.test_split", "0.2"], "--folds already scores every example once"),
    (["--test", "EVAL"], "--test names the same file as --eval"),
    (["--data.test_split", "1"], "'data.test_split' must be in [0, 1)"),
    (["--data.test_split", "0.99"], "data.test_split"),
])
def test_bad_combinations_are_refused(toy_config, test_file, extra, message, capsys):
    flags = _flags(toy_config)
    if "--folds" in extra:  # folds refuse --eval on their own: leave it out to reach the test-set check
        flags = flags[:4] + flags[6:]
    extra = [test_file if a == "T" else toy_config.data.eval if a == "EVAL" else a for a in extra]
    assert main(["train", *flags, *extra]) == 2
    assert message in capsys.readouterr().err
    assert not Path(toy_config.output).exists()


def test_compare_refuses_a_test_set_with_folds(toy_config, test_file, tmp_path, capsys):
    args = ["compare", "--model", toy_config.model.name, "--train", toy_config.data.train, "--folds", "2",
            "--test", test_file, "--tuning", "head", "--output", str(tmp_path / "cmp")]
    assert main(args) == 2
    assert "--folds already scores every example once" in capsys.readouterr().err


def test_the_test_file_becomes_an_absolute_path_in_the_run_config(toy_config, test_file, tmp_path, monkeypatch):
    from tunelab.config import load_yaml, with_absolute_paths

    monkeypatch.chdir(Path(test_file).parent)
    toy_config.data.test = Path(test_file).name
    save_yaml(with_absolute_paths(toy_config), tmp_path / "c.yaml")
    assert load_yaml(tmp_path / "c.yaml").data.test == test_file
