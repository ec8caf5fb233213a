"""Bundled generators: GGUF converted once into a cached safetensors folder that plain transformers loads."""
from __future__ import annotations

import json
import time

import pytest

from tunelab.cli import main
from tunelab.errors import UserError
from tunelab.models import gguf, resolve


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    monkeypatch.setitem(gguf.GGUF_MODELS, "ghost", gguf.GgufModel("no_such_pkg_xyz", "m.gguf", "pip install ghost", "MIT"))
    with pytest.raises(UserError, match="pip install ghost"):
        resolve("ghost")
    assert not any(tmp_path.iterdir())  # nothing half-made left in the cache


def test_unknown_alias_to_prepare_is_refused(capsys):
    assert main(["models", "prepare", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_smollm2_converts_once_and_answers_like_the_original(monkeypatch, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    folder = resolve("smollm2")
    assert folder == tmp_path / "smollm2" and (folder / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2"]  # no temporary folder left behind
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    tic = time.perf_counter()
    assert resolve("smollm2") == folder and time.perf_counter() - tic < 1.0
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # the cache is reused, not rebuilt

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # SmolLM2-135M, tied embeddings
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0][inputs["input_ids"].shape[1]:])
    assert "Paris" in answer, answer


def test_a_chunk_that_does_not_match_the_checksum_is_refused_and_nothing_is_cached(monkeypatch, tmp_path):
    import dataclasses

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    spec = dataclasses.replace(gguf.GGUF_MODELS["gemma3-270m"], sha256="0" * 64)
    monkeypatch.setitem(gguf.GGUF_MODELS, "gemma3-270m", spec)
    with pytest.raises(UserError, match="does not match its sha256"):
        resolve("gemma3-270m")
    assert not any(tmp_path.iterdir())  # neither the joined file nor a half-made folder stays


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gemma3_joins_its_chunks_converts_and_continues_text(monkeypatch, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.data.chat import IGNORE, render

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    folder = resolve("gemma3-270m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma3-270m"]
    assert not list(folder.rglob("*.gguf"))  # the joined GGUF was only needed while converting
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(model).__name__ == "Gemma3ForCausalLM"
    ids = tok("Paris is the capital of", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "France" in tok.decode(out[0][ids["input_ids"].shape[1]:])
    # the base model ships no chat template; the Gemma turn format is added, and chat SFT can locate its answers
    messages = [{"role": "user", "content": "おはよう"}, {"role": "assistant", "content": "おはようございます"}]
    _, labels = render(tok, messages, [1])
    assert tok.decode([t for t in labels if t != IGNORE]) == "おはようございます<end_of_turn>"
    # Gemma's 262k vocabulary reads the Japanese that MiniLM's cannot (tests/test_coverage.py): no unknown token and
    # hardly a stray byte
    from test_coverage import JAPANESE
    from tunelab.models.coverage import coverage

    found = coverage(tok, JAPANESE, "gemma3-270m")
    assert found.unknown == 0 and found.byte_share < 0.02 and found.warning() is None
