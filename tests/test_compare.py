"""`tunelab compare`: methods × training fractions in separate processes, baselines once, a report that holds it."""
from __future__ import annotations

import json
import re

import pytest

from tunelab.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture
def compare_args(tiny_model, toy_data, tmp_path):
    return ["compare", "--model", tiny_model, "--train", toy_data["train"], "--eval", toy_data["eval"],
            "--tuning", "head,full", "--train-fractions", "0.5,1.0", "--output", str(tmp_path / "cmp"),
            "--epochs", "2", "--batch-size", "8", "--max-length", "32", "--lr", "5e-3", "--train.progress", "false",
            "--eval.bootstrap", "200", "--method-set", "head:train.lr=0.3"]


def test_compare_runs_every_method_and_fraction_writes_the_report_and_resumes(compare_args, tmp_path, capsys):
    assert main(compare_args) == 0
    out = tmp_path / "cmp"
    result = json.loads((out / "comparison.json").read_text())
    assert [(r["method"], r["fraction"]) for r in result["rows"]] == [("head", 0.5), ("full", 0.5), ("head", 1.0),
                                                                      ("full", 1.0)]
    assert [r["train_examples"] for r in result["rows"]] == [48, 48, 96, 96]
    for r in result["rows"]:
        assert (out / r["method"] / f"frac-{r['fraction']:g}" / "metrics.json").is_file()
        f1 = r["metrics"]["f1_macro"]
        assert f1["ci"][0] <= f1["value"] <= f1["ci"][1]
        assert r["trainable"] > 0 and r["latency_ms"] > 0 and r["model_mb"] > 0 and r["peak_mb"] > 0
    head = next(r for r in result["rows"] if r["method"] == "head")
    full = next(r for r in result["rows"] if r["method"] == "full")
    assert head["trainable"] < full["trainable"] / 100
    # the per-method setting reached only its method
    assert "lr: 0.3" in (out / "head-frac-1.config.yaml").read_text()
    assert "lr: 0.005" in (out / "full-frac-1.config.yaml").read_text()
    assert {(b["name"], b["fraction"]) for b in result["baselines"]} == {
        (n, f) for n in ("majority", "linear_probe") for f in (0.5, 1.0)}
    assert result["recommendation"] and "full" in result["recommendation"]
    html = (out / "report.html").read_text()
    assert len(re.findall(r"data:image/png;base64,", html)) >= 3 and "https://" not in html
    assert all(name in html for name in ("head", "full", "majority", "linear_probe"))
    printed = capsys.readouterr().out
    assert "f1_macro [95% CI]" in printed and "linear_probe" in printed

    # --resume keeps the finished runs (one compare for both checks: each costs four training processes)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/frac-*/metrics.json")}
    assert len(stamps) == 4
    assert main(compare_args + ["--resume"]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert "already complete, kept" in capsys.readouterr().err  # progress goes to stderr, results to stdout


@pytest.mark.parametrize("extra, expected", [(["--tuning", "head,nope"], "unknown tuning method"),
                                             (["--train-fractions", "0.5,2"], "must be in (0, 1]"),
                                             (["--train-fractions", "half"], "comma-separated numbers")])
def test_compare_refuses_bad_options(compare_args, extra, expected, capsys):
    assert main(compare_args + extra) == 2
    assert expected in capsys.readouterr().err


def test_compare_with_folds_reports_fold_means_and_t_intervals(tiny_model, toy_data, tmp_path):
    args = ["compare", "--model", tiny_model, "--train", toy_data["train"], "--tuning", "head", "--folds", "2",
            "--output", str(tmp_path / "cv"), "--epochs", "1", "--batch-size", "8", "--max-length", "32",
            "--lr", "0.3", "--train.progress", "false", "--eval.bootstrap", "0"]
    assert main(args) == 0
    result = json.loads((tmp_path / "cv" / "comparison.json").read_text())
    row = result["rows"][0]
    cv = json.loads((tmp_path / "cv" / "head" / "cv.json").read_text())
    assert row["metrics"]["f1_macro"]["value"] == pytest.approx(cv["eval"]["f1_macro"]["mean"])
    assert row["metrics"]["f1_macro"]["std"] is not None and len(row["history"]) == 2
    assert all((tmp_path / "cv" / "head" / f"fold-{k}" / "metrics.json").is_file() for k in range(2))
    probe = next(b for b in result["baselines"] if b["name"] == "linear_probe")
    assert probe["metrics"]["f1_macro"]["std"] is not None  # summarised over the same two folds


def test_compare_reports_a_distilled_student_against_its_teacher(tiny_model, toy_data, tmp_path, capsys):
    common = ["--model", tiny_model, "--train", toy_data["train"], "--eval", toy_data["eval"], "--epochs", "3",
              "--batch-size", "8", "--max-length", "32", "--lr", "5e-3", "--train.progress", "false",
              "--eval.bootstrap", "0", "--eval.probe", "false"]
    assert main(["train", *common, "--output", str(tmp_path / "teacher")]) == 0
    args = ["compare", *common, "--tuning", "full,distill", "--teacher", str(tmp_path / "teacher"),
            "--tuning.student_layers", "1", "--output", str(tmp_path / "cmp")]
    assert main(args) == 0
    rows = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["rows"]
    full, distill = rows
    assert "teacher" not in full and "teacher: null" in (tmp_path / "cmp" / "full.config.yaml").read_text()
    t = distill["teacher"]
    teacher = json.loads((tmp_path / "teacher" / "metrics.json").read_text())
    assert t["f1_macro"] == teacher["eval"]["f1_macro"]
    assert t["retained_pct"] == pytest.approx(100 * distill["metrics"]["f1_macro"]["value"] / t["f1_macro"])
    assert t["params_ratio"] < 1 and t["size_ratio"] < 1  # one of the teacher's two layers
    assert f"keeps {t['retained_pct']:.1f}% of its f1_macro" in capsys.readouterr().out
