"""int8 and ONNX variants of a classifier run: checked against fp32, and usable by `tunelab predict`."""
from __future__ import annotations

import json
import os
from pathlib import Path

import onnx as onnx_module
import pytest
import torch
import forkrun
from conftest import make_rows, train_classifier, write_jsonl

import tunelab
from tunelab.errors import UserError
from tunelab import predict as predict_module
from tunelab.predict import compress, predict
from tunelab.tasks import TASKS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tiny_model):
    """The toy run these tests compress, trained on 2 threads whatever the test process's setting (`make test`
    runs 1 per worker): float sums round differently on 1 and 2 threads, and this toy model's probabilities are
    steep enough that another set of weights moves int8's worst probability from 0.008 to 0.18 on the eval texts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return train_classifier(tmp_path_factory.mktemp("compress"), tiny_model, 150, 21).run_dir
    finally:
        torch.set_num_threads(threads)


def test_int8_and_onnx_agree_with_fp32_and_predict_with_them(classifier, tmp_path):
    done = forkrun.run(["export", classifier, "--int8", "--onnx"])
    assert done.returncode == 0, done.stderr
    assert "int8" in done.stdout and "onnx" in done.stdout
    result = json.loads((classifier / "compression.json").read_text())
    assert result["examples"] == 60
    # a toy model has near ties among 60 examples: a label may flip where fp32's top two are within int8's error
    assert result["int8"]["agreement"] >= 0.95 and result["int8"]["max_abs_difference"] < 0.02
    assert 0.5 <= result["int8_smoothing"]["alpha"] <= 0.95
    assert (classifier / "int8" / "smoothing.safetensors").is_file()
    assert result["onnx"]["agreement"] == 1.0 and result["onnx"]["max_abs_difference"] < 1e-4
    assert result["int8"]["model_mb"] < result["fp32"]["model_mb"]
    graph = onnx_module.load(str(classifier / "onnx" / "model.onnx")).graph
    assert {"SkipLayerNormalization", "BiasGelu"} <= {n.op_type for n in graph.node}  # ONNX Runtime's fused ops

    texts = write_jsonl(tmp_path / "in.jsonl", make_rows(40, 23))
    rows = {}
    for runtime in ("torch", "int8", "onnx"):
        out = predict(classifier, texts, tmp_path / f"{runtime}.jsonl", runtime)
        rows[runtime] = [json.loads(line) for line in out.read_text().splitlines()]
    # the default, auto, answers with the run's ONNX export once it has one
    assert predict_module._resolve(Path(classifier), TASKS["classification"], "auto") == "onnx"
    auto = predict(classifier, texts, tmp_path / "auto.jsonl")
    assert [json.loads(line) for line in auto.read_text().splitlines()] == rows["onnx"]
    onnx, weights = Path(classifier) / "onnx" / "model.onnx", Path(classifier) / "model" / "model.safetensors"
    then = onnx.stat().st_mtime
    os.utime(onnx, (then, weights.stat().st_mtime - 60))  # an export older than the weights: not used
    try:
        assert predict_module._resolve(Path(classifier), TASKS["classification"], "auto") == "torch"
    finally:
        os.utime(onnx, (then, then))
    again = compress(classifier, int8=False, onnx=True)  # a run exported before exports again (from torch)
    assert again["onnx"]["agreement"] == 1.0 and again["fp32"]["model_mb"] == result["fp32"]["model_mb"]
    for runtime in ("int8", "onnx"):
        gap = max(abs(a["probabilities"][k] - b["probabilities"][k])
                  for a, b in zip(rows["torch"], rows[runtime]) for k in a["probabilities"])
        assert gap < (1e-4 if runtime == "onnx" else 0.02), (runtime, gap)
        for a, b in zip(rows["torch"], rows[runtime]):  # a different label only where fp32 nearly ties
            first, second = sorted(a["probabilities"].values())[-2:][::-1]
            assert a["label"] == b["label"] or first - second <= 2 * gap, (runtime, a, b)


def test_compression_refuses_what_it_cannot_do(classifier, task_config, tmp_path):
    texts = write_jsonl(tmp_path / "in.jsonl", make_rows(5, 24))
    fresh = tunelab.train(task_config("classification")).run_dir
    with pytest.raises(UserError, match="tunelab export RUN --onnx"):
        predict(fresh, texts, runtime="onnx")
    assert predict_module._resolve(Path(fresh), TASKS["classification"], "auto") == "torch"  # no export: PyTorch
    assert predict(fresh, texts, tmp_path / "auto.jsonl").read_text() == \
        predict(fresh, texts, tmp_path / "torch.jsonl", runtime="torch").read_text()
    with pytest.raises(UserError, match="choose --int8, --onnx or both"):
        compress(fresh, False, False)
    regression = tunelab.train({**_as_dict(task_config("regression")), "output": str(tmp_path / "reg")}).run_dir
    with pytest.raises(UserError, match="not regression runs"):
        compress(regression, True, False)
    assert predict(regression, texts, tmp_path / "reg.jsonl", runtime="int8").is_file()  # int8 applies to any head
    done = forkrun.run(["predict", fresh, "--input", texts, "--runtime", "onnx"])
    assert done.returncode == 2 and "Traceback" not in done.stderr and "tunelab export" in done.stderr


def _as_dict(cfg):
    from tunelab import config as config_mod

    return config_mod.to_dict(cfg)


def test_smoothing_keeps_the_function_and_shrinks_int8_error_on_outlier_inputs():
    import copy

    import torch
    from torch import nn

    from tunelab.export.compress import Smoothed, input_maxima, quantize_int8, smoothing_scales

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8)).eval()
    x = torch.randn(512, 64)
    x[:, 3] *= 80  # one outlier input channel: it sets a per-tensor input scale far too coarse for the others
    with torch.no_grad():
        want = model(x)
        scales = smoothing_scales(model, input_maxima(model, lambda: model(x))[0], 0.8)
        assert set(scales) == {"0", "2"} and scales["0"][3] > 10 * scales["0"].median()
        same = copy.deepcopy(model)
        same[0] = Smoothed(same[0], scales["0"])
        assert torch.allclose(same(x), want, rtol=1e-4, atol=1e-4)  # X/s · (W·s)ᵀ is the same function
        plain = (quantize_int8(model)(x) - want).abs().mean()
        smooth = (quantize_int8(model, scales)(x) - want).abs().mean()
    assert smooth < plain / 2, (float(smooth), float(plain))
