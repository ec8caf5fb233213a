"""--device for predict, eval, generate and the service: the model answers where it is asked to; a GPU that is not
there is one clear line (on a machine with one, its answers equal the CPU's)."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import make_rows, train_classifier, write_jsonl
from tunelab.cli import main

GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    return train_classifier(tmp_path_factory.mktemp("devices"), tiny_model, 60, 3).run_dir


def test_predict_and_eval_run_on_the_device_asked(run, tmp_path, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", make_rows(12, 9))
    assert main(["predict", str(run), "--input", str(data), "--output", str(tmp_path / "cpu.jsonl"),
                 "--device", "cpu"]) == 0
    code = main(["predict", str(run), "--input", str(data), "--output", str(tmp_path / "gpu.jsonl"),
                 "--device", "cuda"])
    if GPU:
        assert code == 0
        cpu, gpu = ([json.loads(line) for line in (tmp_path / f).read_text().splitlines()]
                    for f in ("cpu.jsonl", "gpu.jsonl"))
        assert [r["label"] for r in cpu] == [r["label"] for r in gpu]
        assert all(abs(a - b) < 1e-4 for r, s in zip(cpu, gpu) for a, b in zip(r["probabilities"].values(),
                                                                               s["probabilities"].values()))
    else:
        assert code == 2
        assert "--device: 'cuda': no CUDA device is visible to PyTorch on this machine" in capsys.readouterr().err
    assert main(["eval", str(run), "--data", str(data), "--device", "auto"]) == 0  # auto: the GPU where there is one
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(data), "--device", "tpu"]) == 2
    assert "unknown device 'tpu'" in capsys.readouterr().err
    assert main(["predict", str(run), "--input", str(data), "--device", "cuda", "--runtime", "int8"]) == 2


def test_generate_refuses_a_missing_gpu_before_loading_anything(tiny_llama, capsys):
    if GPU:
        pytest.skip("this machine has a GPU: the refusal is for machines without one")
    assert main(["generate", tiny_llama, "--prompt", "hi", "--device", "cuda"]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err
