"""models/pooled.py: a sentence-transformers folder is pooled the way it was trained, and the exported model reads
the same in plain transformers (registered by tunelab, or by trust_remote_code without it) as in tunelab."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import forkrun
from conftest import PLAIN_PRELUDE, make_rows, write_jsonl


def sentence_folder(tiny_model: str, where: Path, mode: str = "mean") -> str:
    """The tiny BERT dressed as a sentence-transformers model: modules.json and a Pooling config."""
    folder = where / f"tiny-st-{mode}"
    shutil.copytree(tiny_model, folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": mode == "cls",
        "pooling_mode_mean_tokens": mode == "mean", "pooling_mode_max_tokens": mode == "max"}))
    return str(folder)


def test_pool_leaves_padding_out():
    from tunelab.models.pooled import pool

    torch.manual_seed(0)
    hidden = torch.randn(1, 3, 4)
    padded = torch.cat([hidden, torch.full((1, 2, 4), 100.0)], 1)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    assert torch.allclose(pool(padded, mask, "mean"), hidden.mean(1))
    assert torch.allclose(pool(padded, mask, "max"), hidden.max(1).values)
    assert torch.equal(pool(padded, mask, "last"), hidden[:, 2])
    assert torch.equal(pool(padded, mask, "cls"), hidden[:, 0])
    left = torch.cat([torch.full((1, 2, 4), 100.0), hidden], 1)  # a left-padded decoder batch
    assert torch.equal(pool(left, torch.tensor([[0, 0, 1, 1, 1]]), "last"), hidden[:, 2])


def test_sentence_pooling_reads_the_folder(tiny_model, tmp_path):
    from tunelab.models import resolve
    from tunelab.models.pooled import sentence_pooling

    for mode in ("mean", "cls", "max"):
        assert sentence_pooling(sentence_folder(tiny_model, tmp_path, mode)) == mode
    assert sentence_pooling(tiny_model) is None  # a plain encoder keeps its own head
    assert sentence_pooling(resolve("minilm")) == "mean"  # all-MiniLM-L6-v2 is mean-pooled


def test_minilm_pooled_as_sentence_transformers_does():
    """Our mean pooling of the bundled MiniLM is sentence-transformers' own embedding (before its Normalize)."""
    from sentence_transformers import SentenceTransformer

    from tunelab.config import Config
    from tunelab.models import build_model, load_tokenizer, pooling_for, resolve
    from tunelab.models.pooled import pool
    from tunelab.tasks import TASKS, Space

    cfg = Config()
    cfg.model.pooling = pooling_for(cfg.model, TASKS["classification"])
    assert cfg.model.pooling == "mean"
    model = build_model(cfg.model, TASKS["classification"], Space(labels=["a", "b"]), True).eval()
    texts = ["good morning", "the weather was awful all week, and the trains were late"]
    batch = load_tokenizer(cfg.model)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = pool(model.backbone(**batch).last_hidden_state, batch["attention_mask"], "mean")
    theirs = SentenceTransformer(str(resolve("minilm")), device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.allclose(torch.nn.functional.normalize(ours, dim=-1), theirs, atol=1e-5)


@pytest.fixture(scope="module")
def pooled_run(tiny_model, tmp_path_factory):
    """A run on a sentence-transformers-style tiny folder with no pooling asked for: auto finds mean."""
    from tunelab import train
    from tunelab.config import Config

    where = tmp_path_factory.mktemp("pooled")
    cfg = Config()
    cfg.model.name = sentence_folder(tiny_model, where)
    cfg.data.train = str(write_jsonl(where / "train.jsonl", make_rows(96, 1)))
    cfg.data.eval = str(write_jsonl(where / "eval.jsonl", make_rows(60, 2)))
    cfg.data.max_length = 32
    cfg.tuning.name, cfg.train.epochs, cfg.train.lr, cfg.train.batch_size = "full", 2, 5e-3, 8
    cfg.train.progress, cfg.eval.bootstrap, cfg.output = False, 50, str(where / "run")
    return train(cfg), cfg.data.eval


def test_auto_pooling_is_saved_with_the_run(pooled_run):
    result, _ = pooled_run
    saved = (result.run_dir / "config.yaml").read_text()
    assert "pooling: mean" in saved
    config = json.loads((result.model_dir / "config.json").read_text())
    assert config["model_type"] == "tunelab-pooled" and config["pooling"] == "mean"
    assert (result.model_dir / "modeling_tunelab_pooled.py").is_file()


def _predict(run: Path, data: str) -> list[str]:
    out = run / "predictions.jsonl"
    forkrun.run(["predict", run, "--input", data, "--output", out], check=True)
    return [json.loads(line)["label"] for line in out.read_text().splitlines()]


PLAIN = """
import json, sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
folder, data = sys.argv[1], sys.argv[2]
model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
texts = [json.loads(line)["text"] for line in open(data)]
with torch.no_grad():
    logits = model(**tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")).logits
print(json.dumps([model.config.id2label[i] for i in logits.argmax(-1).tolist()]))
"""


@pytest.mark.slow
def test_exported_model_predicts_as_tunelab_in_plain_transformers(pooled_run, tmp_path):
    """In a process that never imports tunelab (trust_remote_code reads the exported file), and with tunelab's
    registration: the same labels as `tunelab predict`, for every text."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import tunelab.models  # noqa: F401 - registers the model type

    result, data = pooled_run
    ours = _predict(result.run_dir, data)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    plain = subprocess.run([sys.executable, "-c", PLAIN_PRELUDE + PLAIN, str(result.model_dir), data], env=env,
                           cwd=tmp_path,
                           capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr[-2000:]
    theirs = json.loads(plain.stdout.splitlines()[-1])
    assert len(ours) == 60 and sum(a == b for a, b in zip(ours, theirs)) / len(ours) >= 0.99

    model = AutoModelForSequenceClassification.from_pretrained(result.model_dir).eval()
    assert type(model).__name__ == "PooledForSequenceClassification"
    tok = AutoTokenizer.from_pretrained(result.model_dir)
    texts = [json.loads(line)["text"] for line in open(data)]
    with torch.no_grad():
        logits = model(**tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")).logits
    assert [model.config.id2label[i] for i in logits.argmax(-1).tolist()] == ours


def test_unknown_model_type_is_refused_without_tunelab_or_trust(pooled_run, tmp_path):
    """Without tunelab and without trust_remote_code, transformers refuses: it never reads [CLS] in silence."""
    result, _ = pooled_run
    code = ("import sys; from transformers import AutoModelForSequenceClassification as A; "
            "A.from_pretrained(sys.argv[1])")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    plain = subprocess.run([sys.executable, "-c", PLAIN_PRELUDE + code, str(result.model_dir)], env=env,
                           cwd=tmp_path,
                           capture_output=True, text=True)
    assert plain.returncode != 0 and "trust_remote_code" in plain.stderr


def test_pooling_is_refused_where_it_does_not_apply(tmp_path):
    from tunelab.config import Config
    from tunelab.errors import UserError
    from tunelab.validate import validate

    cfg = Config()
    cfg.task, cfg.data.train, cfg.model.pooling = "ner", "x.jsonl", "mean"
    with pytest.raises(UserError, match="pooling applies to classification"):
        validate(cfg)
    cfg.task, cfg.model.pooling = "classification", "median"
    with pytest.raises(UserError, match="'model.pooling' must be one of auto, cls, mean, max, last, got 'median'"):
        validate(cfg)


def test_a_pooled_teacher_shortened_and_pruned_saves_what_it_is(pooled_run, tmp_path):
    """A student cut from a pooled teacher (fewer layers, a pruned vocabulary) reloads as it trained."""
    from transformers import AutoModelForSequenceClassification

    from tunelab import train
    from tunelab.predict import predict

    teacher, data = pooled_run
    cfg = {"model": {"name": "unused"}, "output": str(tmp_path / "student"),
           "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", make_rows(60, 19))), "eval": data,
                    "max_length": 32},
           "train": {"epochs": 1, "batch_size": 8, "lr": 5e-3, "progress": False},
           "eval": {"bootstrap": 0, "probe": False},
           "tuning": {"name": "distill", "teacher": str(teacher.run_dir), "student_layers": 1, "prune_vocab": True}}
    result = train(cfg)
    saved = json.loads((result.model_dir / "config.json").read_text())
    assert saved["model_type"] == "tunelab-pooled" and saved["backbone"]["num_hidden_layers"] == 1
    model = AutoModelForSequenceClassification.from_pretrained(result.model_dir)
    assert model.backbone.get_input_embeddings().num_embeddings == saved["backbone"]["vocab_size"] < 30_522 / 4
    out = predict(result.run_dir, write_jsonl(tmp_path / "in.jsonl", make_rows(10, 20)))
    assert len(out.read_text().splitlines()) == 10


def test_ner_on_a_decoder_transformers_has_no_token_head_for_trains_and_reloads(tmp_path):
    """Gemma 3 has no token classifier in transformers: NER gets tunelab's own head over the backbone, which
    trains, and loads back through AutoModelForTokenClassification with the same predictions."""
    import json

    from transformers import AutoModelForTokenClassification, AutoTokenizer, Gemma3TextConfig, Gemma3ForCausalLM

    from conftest import build_tiny_llama, make_ner_rows, write_jsonl
    from tunelab.cli import main

    llama = build_tiny_llama(tmp_path / "llama")  # for its tokenizer
    tok = AutoTokenizer.from_pretrained(llama)
    config = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=tok.pad_token_id,
                              max_position_embeddings=256, sliding_window=64)
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(tmp_path / "gemma")
    tok.save_pretrained(tmp_path / "gemma")
    train = write_jsonl(tmp_path / "train.jsonl", make_ner_rows(60, 1))
    held = write_jsonl(tmp_path / "eval.jsonl", make_ner_rows(20, 2))
    out = tmp_path / "run"
    assert main(["train", "--task", "ner", "--model", str(tmp_path / "gemma"), "--train", str(train), "--eval",
                 str(held), "--output", str(out), "--epochs", "6", "--lr", "5e-3", "--train.progress", "false",
                 "--eval.bootstrap", "0", "--eval.probe", "false"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["eval"]["f1"] > m["baseline"]["majority"]["f1"] + 0.2
    model = AutoModelForTokenClassification.from_pretrained(out / "model").eval()
    assert type(model).__name__ == "BackboneForTokenClassification"
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForTokenClassification"].endswith("BackboneForTokenClassification")
