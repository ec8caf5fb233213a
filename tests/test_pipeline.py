"""End to end through the CLI and the library: the run folder, predict, eval, early stopping."""
from __future__ import annotations

import json

import pytest

import tunelab
from tunelab.cli import main


@pytest.fixture
def finished_run(tiny_model, toy_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    code = main(["train", "--model", tiny_model, "--train", toy_data["train"], "--eval", toy_data["eval"],
                 "--tuning", "lora", "--epochs", "6", "--lr", "2e-2", "--batch-size", "8", "--max-length", "32",
                 "--output", str(out), "--train.progress", "false"])
    assert code == 0
    return out


def test_run_folder_holds_everything(finished_run):
    from transformers import AutoModelForSequenceClassification

    names = {p.name for p in finished_run.iterdir()}
    assert {"config.yaml", "metrics.json", "history.jsonl", "loss_curve.png", "confusion_matrix.png", "model",
            "adapter", "checkpoints"} <= names
    m = json.loads((finished_run / "metrics.json").read_text())
    assert {"accuracy", "f1_macro", "precision_macro", "recall_macro", "loss"} <= m["eval"].keys()
    assert {"seconds", "samples_per_second", "peak_rss_mb", "trainable_params", "total_params"} <= m["train"].keys()
    assert 0 < m["train"]["trainable_params"] < m["train"]["total_params"]
    assert m["train"]["lean_lora"]  # on the CPU the adapters ran speed._LoraLinear
    assert m["eval"]["accuracy"] > m["baseline"]["majority"]["accuracy"]
    history = [json.loads(line) for line in (finished_run / "history.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "samples_per_second"} <= history[0].keys()
    assert any("eval_f1_macro" in h for h in history)
    for png in ("loss_curve.png", "confusion_matrix.png"):
        assert (finished_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = AutoModelForSequenceClassification.from_pretrained(finished_run / "model")
    assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert not any("lora" in n for n, _ in model.named_parameters())  # merged: a plain transformers model


def test_predict_writes_labels_and_probabilities(finished_run, tmp_path, capsys):
    inp = tmp_path / "new.jsonl"
    inp.write_text('{"text": "great great day"}\n{"text": "awful sad day"}\n')
    assert main(["predict", str(finished_run), "--input", str(inp), "--output", str(tmp_path / "p.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert r["label"] in ("negative", "neutral", "positive")
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)


def test_eval_reproduces_the_runs_metrics(finished_run, toy_data, capsys):
    assert main(["eval", str(finished_run), "--data", toy_data["eval"]]) == 0
    out = capsys.readouterr().out
    written = json.loads((finished_run / "eval-eval.json").read_text())
    expected = json.loads((finished_run / "metrics.json").read_text())["eval"]
    assert written["accuracy"] == pytest.approx(expected["accuracy"])
    assert written["f1_macro"] == pytest.approx(expected["f1_macro"])
    assert f"{expected['accuracy']:.4f}" in out


def test_library_train_returns_metrics_and_paths(toy_config):
    result = tunelab.train(toy_config)
    assert result.model_dir.is_dir() and result.run_dir.name == "run"
    assert result.eval["accuracy"] == result.metrics["eval"]["accuracy"]


def test_early_stopping_restores_the_best_weights(toy_config):
    toy_config.tuning.name = "full"
    toy_config.train.lr, toy_config.train.epochs = 0.05, 6  # far too high: quality peaks early, then falls
    toy_config.train.eval_every, toy_config.train.early_stopping_patience = 2, 2
    toy_config.train.metric = "loss"
    result = tunelab.train(toy_config)
    t = result.metrics["train"]
    assert t["stopped_early"] and t["steps"] < 6 * 12
    assert result.eval["loss"] == pytest.approx(t["best"], rel=1e-5)  # final weights are the best ones


def test_l1_penalty_shrinks_weights(toy_config, tmp_path):
    from safetensors.torch import load_file

    toy_config.tuning.name = "full"
    norms = []
    for l1 in (0.0, 1e-3):
        toy_config.train.l1, toy_config.output = l1, str(tmp_path / f"l1-{l1}")
        w = load_file(str(tunelab.train(toy_config).model_dir / "model.safetensors"))
        norms.append(sum(v.abs().sum().item() for k, v in w.items() if v.ndim > 1 and "embeddings" not in k))
    assert norms[1] < norms[0]


def test_a_run_trained_on_relative_paths_is_usable_from_any_directory(toy_config, tmp_path, monkeypatch, capsys):
    import shutil

    from tunelab.config import load_yaml

    work = tmp_path / "project"
    (work / "data").mkdir(parents=True)
    shutil.copy(toy_config.data.train, work / "data" / "train.jsonl")
    shutil.copy(toy_config.data.eval, work / "data" / "eval.jsonl")
    monkeypatch.chdir(work)
    toy_config.data.train, toy_config.data.eval, toy_config.output = "data/train.jsonl", "data/eval.jsonl", "run"
    toy_config.train.epochs = 1
    tunelab.train(toy_config)
    saved = load_yaml(work / "run" / "config.yaml")
    assert saved.data.train == str(work / "data" / "train.jsonl") and saved.data.eval == str(work / "data" / "eval.jsonl")
    monkeypatch.chdir(tmp_path)  # elsewhere: export reads the run's training and eval files by their saved paths
    assert main(["export", str(work / "run"), "--int8"]) == 0
    assert "checked on 30 examples of " + str(work / "data" / "eval.jsonl") in capsys.readouterr().out
