"""The comparison report: recommendation sentences pinned on hand-made numbers, and a self-contained HTML file."""
from __future__ import annotations

import json
import re

from tunelab.report import recommend, write_report

METRICS = ["f1_macro", "accuracy"]


def metric(value, ci=None, std=None):
    return {"value": value, "ci": ci, "std": std}


def row(method, value, ci, trainable, train_s, fraction=1.0, history=()):
    return {"method": method, "fraction": fraction, "train_examples": int(3000 * fraction),
            "metrics": {"f1_macro": metric(value, ci), "accuracy": metric(value + 0.05)},
            "train_s": train_s, "samples_per_s": 50.0, "trainable": trainable, "total_params": 2_000_000,
            "peak_mb": 900.0, "model_mb": 87.0, "latency_ms": 8.1, "throughput": 300.0, "history": list(history)}


def baseline(name, value, fraction=1.0):
    return {"name": name, "fraction": fraction,
            "metrics": {"f1_macro": metric(value, [value - 0.01, value + 0.01]), "accuracy": metric(value)}}


def comparison(rows, baselines, fractions=(1.0,), task="classification", main="f1_macro", metrics=METRICS):
    return {"task": task, "metric": main, "metrics": metrics, "methods": list(dict.fromkeys(r["method"] for r in rows)),
            "fractions": list(fractions), "folds": 0, "output": "/tmp/compare", "rows": rows, "baselines": baselines}


def pair(lora_ci):
    """full 0.80 with 1,000,000 parameters in 100 s; lora 0.792 with 10,000 parameters in 62 s."""
    return comparison([row("full", 0.80, [0.78, 0.82], 1_000_000, 100.0), row("lora", 0.792, lora_ci, 10_000, 62.0)],
                      [baseline("majority", 0.16), baseline("linear_probe", 0.70)])


def write_history(path, steps, scale):
    """Training rows, an evaluation row, a NaN loss and a torn last line: only the training rows may be plotted."""
    lines = [{"step": s, "loss": scale / (1 + s), "epoch": 0, "lr": 1e-4} for s in range(1, steps + 1)]
    lines += [{"step": steps, "eval_loss": 0.5, "eval_f1_macro": 0.7}, {"step": steps + 1, "loss": float("nan")}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{half a line")
    return str(path)


def curve_comparison(tmp_path):
    """Four methods at three fractions, histories at the largest fraction (one of them missing on disk)."""
    fractions = (0.1, 0.5, 1.0)
    quality = {"scratch": 0.3, "head": 0.6, "lora": 0.75, "full": 0.78}
    params = {"scratch": 2_000_000, "head": 2_000, "lora": 30_000, "full": 2_000_000}
    rows = []
    for f in fractions:
        for m, q in quality.items():
            v = q + (0.3 if m == "scratch" else 0.05) * f  # scratch gains most from more data
            # head's history file is missing on disk: the loss chart must skip it, not fail.
            hist = [str(tmp_path / "gone.jsonl")]
            if f == 1.0 and m != "head":
                hist = [write_history(tmp_path / f"{m}.jsonl", 60, 3 - 2 * q)]
            rows.append(row(m, v, [v - 0.02, v + 0.02], params[m], 10 + 100 * f, f, hist))
    base = [baseline(n, v, f) for f in fractions for n, v in (("majority", 0.2), ("linear_probe", 0.62 + 0.05 * f))]
    return comparison(rows, base, fractions)


def test_tradeoff_percentages_are_computed_from_the_numbers():
    text = recommend(pair([0.77, 0.81]))
    assert "full scores the highest macro-F1: 0.800 [0.780, 0.820]" in text
    assert "lora reaches 99.0% of full's macro-F1" in text
    assert "1.0% of the trainable parameters" in text
    assert "0.62× the time" in text


def test_recommends_cheaper_method_only_when_intervals_overlap():
    assert "Recommendation: lora" in recommend(pair([0.77, 0.81]))
    assert "Recommendation: full" in recommend(pair([0.76, 0.775]))


def test_without_intervals_recommends_the_best():
    c = pair(None)
    c["rows"][0]["metrics"]["f1_macro"]["ci"] = None
    assert "Recommendation: full, the best scorer" in recommend(c)


def test_baselines_compared_and_a_method_below_the_probe_flagged():
    c = pair([0.77, 0.81])
    c["rows"].append(row("head", 0.65, [0.63, 0.67], 2_000, 20.0))
    text = recommend(c)
    assert "full beats the linear probe (0.700) by 0.100 macro-F1" in text
    assert "full beats the majority baseline (0.160) by 0.640 macro-F1" in text
    assert "head (0.650) does NOT beat the linear probe" in text
    assert "lora (0.792) does NOT" not in text


def test_best_below_probe_said_plainly():
    c = pair([0.77, 0.81])
    c["baselines"][1] = baseline("linear_probe", 0.85)
    assert "full does NOT beat the linear probe (0.850); it is 0.050 macro-F1 lower" in recommend(c)


def test_transfer_gap_across_fractions(tmp_path):
    text = recommend(curve_comparison(tmp_path))
    assert "Transfer matters most when data is small" in text
    assert "+0.455 macro-F1 at 10% of the data (full) versus +0.230 at 100% (full)" in text


def test_transfer_gap_inside_the_noise_is_not_called_a_trend(tmp_path):
    c = curve_comparison(tmp_path)
    for r in c["rows"]:  # widen every interval to +-0.2: a 0.225 change in the gap is now within the noise
        v = r["metrics"]["f1_macro"]["value"]
        r["metrics"]["f1_macro"]["ci"] = [v - 0.2, v + 0.2]
    text = recommend(c)
    assert "is not settled by this data" in text and "Transfer matters most" not in text
    assert "combined 95% uncertainty (±0.400)" in text


def test_report_is_self_contained_with_charts(tmp_path):
    c = curve_comparison(tmp_path)
    path = write_report(c, tmp_path / "out")
    assert path == tmp_path / "out" / "report.html"
    page = path.read_text(encoding="utf-8")
    assert not re.search(r'(src|href)\s*=\s*["\']?https?://', page)
    assert "<script src" not in page
    assert page.count("data:image/png;base64,") >= 3  # bar chart, learning curves, loss curves
    assert "Learning curves" in page and "Training loss" in page
    for name in ["scratch", "head", "lora", "full", "majority", "linear_probe"]:
        assert f"<td>{name}</td>" in page
    assert recommend(c).split(":")[0] in page
    assert "95% bootstrap confidence intervals" in page
    assert "0.800 [0.780, 0.820]" in page  # lora's main metric with its CI in the main table


def test_text_is_escaped(tmp_path):
    c = pair([0.77, 0.81])
    c["rows"][1]["method"] = c["methods"][1] = "<b>lora</b>"
    page = write_report(c, tmp_path).read_text(encoding="utf-8")
    assert "<b>lora</b>" not in page and "&lt;b&gt;lora&lt;/b&gt;" in page


def test_single_fraction_has_no_learning_curves(tmp_path):
    page = write_report(pair([0.77, 0.81]), tmp_path).read_text(encoding="utf-8")
    assert "Learning curves" not in page
    assert "Training loss" not in page  # no history files at all
    assert page.count("data:image/png;base64,") == 1
    assert recommend(pair([0.77, 0.81])) == recommend(pair([0.77, 0.81]))
    assert "Transfer" not in recommend(pair([0.77, 0.81]))


def test_folds_described_with_sd_and_t_interval(tmp_path):
    c = pair([0.77, 0.81])
    c["folds"] = 5
    c["rows"][0]["metrics"]["f1_macro"]["std"] = 0.012
    page = write_report(c, tmp_path).read_text(encoding="utf-8")
    assert "5-fold cross-validation" in page and "t-interval" in page
    assert "0.800 ± 0.012 [0.780, 0.820]" in page


def test_regression_with_negative_r2_does_not_crash(tmp_path):
    rows = [row("full", -0.10, [-0.3, 0.1], 1_000_000, 100.0), row("lora", -0.25, None, 10_000, 50.0)]
    for r in rows:
        r["metrics"] = {"r2": r["metrics"]["f1_macro"], "mae": metric(1.2)}
    base = [{"name": "mean", "fraction": 1.0, "metrics": {"r2": metric(0.0), "mae": metric(1.5)}}]
    c = comparison(rows, base, task="regression", main="r2", metrics=["r2", "mae"])
    text = recommend(c)
    assert "lora scores 0.150 R² below full" in text
    assert "full does NOT beat the mean baseline" in text
    page = write_report(c, tmp_path).read_text(encoding="utf-8")
    assert "R²" in page and "mean" in page
