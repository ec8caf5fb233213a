"""Distillation: the KD loss, temperature, layer-subset students, teacher caching and what soft targets buy."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import make_rows, train_classifier, write_jsonl

import tunelab
from tunelab.errors import UserError
from tunelab.methods.distill import IGNORE, evenly_spaced, kd_loss, keep_layers, soft_targets


def _softmax(xs, t):
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def test_kd_loss_matches_a_hand_computed_value():
    student, teacher, t, alpha = [1.0, 2.0, 0.0], [2.0, 0.0, 1.0], 2.0, 0.3
    p, q = _softmax(teacher, t), _softmax(student, t)
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    ce = -math.log(_softmax(student, 1.0)[1])
    want = alpha * t * t * kl + (1 - alpha) * ce
    got = kd_loss(torch.tensor([student]), torch.tensor([teacher]), torch.tensor([1]), t, alpha)
    assert float(got) == pytest.approx(want, rel=1e-6)
    # an unlabelled (transfer) row adds only its soft term; the loss is a sum over rows
    two = kd_loss(torch.tensor([student, student]), torch.tensor([teacher, teacher]), torch.tensor([1, IGNORE]),
                  t, alpha)
    assert float(two) == pytest.approx(want + alpha * t * t * kl, rel=1e-6)
    assert float(kd_loss(torch.tensor([teacher]), torch.tensor([teacher]), torch.tensor([IGNORE]), t, 1.0)) == \
        pytest.approx(0, abs=1e-7)  # a student equal to its teacher has nothing left to learn


def test_temperature_softens_the_teachers_distribution():
    logits = torch.tensor([3.0, 1.0, -2.0])
    assert soft_targets(logits, 1.0).tolist() == pytest.approx(torch.softmax(logits, -1).tolist())

    def entropy(p):
        return float(-(p * p.log()).sum())
    entropies = [entropy(soft_targets(logits, t)) for t in (0.5, 1, 2, 4, 8)]
    assert entropies == sorted(entropies) and entropies[0] < entropies[-1]
    assert soft_targets(logits, 1e4).tolist() == pytest.approx([1 / 3] * 3, abs=1e-3)  # T → ∞: uniform
    assert soft_targets(logits, 1e-3).tolist() == pytest.approx([1, 0, 0], abs=1e-6)  # T → 0: the argmax


def test_student_layers_are_evenly_spaced_teacher_layers_copied_exactly():
    from transformers import BertConfig, BertForSequenceClassification

    assert evenly_spaced(6, 3) == [0, 2, 4] and evenly_spaced(12, 6) == list(range(0, 12, 2))
    assert evenly_spaced(4, 4) == [0, 1, 2, 3] and evenly_spaced(6, 1) == [0]
    for bad in (0, 7):
        with pytest.raises(UserError, match="between 1 and"):
            evenly_spaced(6, bad)
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=6,
                                                       num_attention_heads=2, intermediate_size=32, num_labels=3))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = keep_layers(teacher, evenly_spaced(6, 3))
    assert student.config.num_hidden_layers == 3 and len(student.bert.encoder.layer) == 3
    state = student.state_dict()
    for new, old in enumerate([0, 2, 4]):
        for name in ("attention.self.query.weight", "intermediate.dense.weight", "output.LayerNorm.bias"):
            assert torch.equal(state[f"bert.encoder.layer.{new}.{name}"], before[f"bert.encoder.layer.{old}.{name}"])
    for name in ("bert.embeddings.word_embeddings.weight", "classifier.weight"):
        assert torch.equal(state[name], before[name])
    assert student(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, tiny_model):
    """A tiny BERT teacher trained on plenty of toy rows: it knows the task well."""
    result = train_classifier(tmp_path_factory.mktemp("teacher"), tiny_model, 300, 11)
    assert result.eval["f1_macro"] > 0.9
    return result.run_dir


def _student(tmp_path, tiny_model, run, labelled, epochs, eval_file=None, **tuning):
    cfg = {"model": {"name": tiny_model}, "output": str(tmp_path / run),
           "data": {"train": str(labelled),
                    "eval": str(eval_file or write_jsonl(tmp_path / "eval.jsonl", make_rows(90, 13))),
                    "max_length": 32},
           "train": {"epochs": epochs, "batch_size": 8, "lr": 5e-3, "progress": False, "seed": 3},
           "eval": {"bootstrap": 0, "probe": False}, "tuning": tuning}
    if "teacher" in tuning:
        cfg["tuning"]["name"] = "distill"
    transfer = cfg["tuning"].pop("transfer", None)
    if transfer:
        cfg["data"]["transfer"] = str(transfer)
    return tunelab.train(cfg)


def test_soft_targets_on_unlabelled_text_beat_hard_labels_alone(tmp_path, tiny_model, teacher_run):
    """16 labelled rows; the distilled student also has 300 unlabelled texts the teacher labels softly. Both get
    the same number of optimizer steps (the hard-label student repeats its 16 rows for more epochs)."""
    labelled = write_jsonl(tmp_path / "few.jsonl", make_rows(16, 14))
    transfer = write_jsonl(tmp_path / "transfer.jsonl", [{"text": r["text"]} for r in make_rows(300, 15)])
    soft = _student(tmp_path, tiny_model, "soft", labelled, 3, teacher=str(teacher_run),
                    transfer=transfer, kd_alpha=0.7)
    steps = soft.metrics["train"]["steps"]
    hard = _student(tmp_path, tiny_model, "hard", labelled, steps // 2)  # 2 steps per epoch
    assert hard.metrics["train"]["steps"] == steps
    assert soft.metrics["train"]["transfer_examples"] == 300
    assert soft.eval["f1_macro"] > hard.eval["f1_macro"] + 0.15, (soft.eval, hard.eval)


def test_a_shortened_teacher_as_student_and_the_cache(tmp_path, tiny_model, teacher_run, monkeypatch):
    labelled = write_jsonl(tmp_path / "train.jsonl", make_rows(60, 16))
    result = _student(tmp_path, tiny_model, "short", labelled, 2, teacher=str(teacher_run),
                      student_layers=1)
    assert result.metrics["train"]["total_params"] < result.metrics["train"]["trainable_params"] + 1
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(result.model_dir).num_hidden_layers == 1
    assert result.eval["f1_macro"] > 0.6
    # the same teacher and texts again: the logits come from the cache, not from the teacher
    import tunelab.evaluate

    monkeypatch.setattr(tunelab.evaluate, "predict_outputs", lambda *a, **k: pytest.fail("recomputed"))
    from tunelab.methods.distill import Teacher
    from tunelab.tasks import TASKS
    from tunelab.config import DataConfig

    again = Teacher(str(teacher_run)).logits(TASKS["classification"].read(labelled, DataConfig()))
    assert len(again) == 60 and len(again[0]) == 3


def test_distill_refuses_what_it_cannot_do(tmp_path, tiny_model, teacher_run, task_config):
    labelled = write_jsonl(tmp_path / "train.jsonl", make_rows(30, 17))
    with pytest.raises(UserError, match="needs --teacher"):
        _student(tmp_path, tiny_model, "a", labelled, 1, name="distill")
    with pytest.raises(UserError, match="only applies to --tuning distill"):
        _student(tmp_path, tiny_model, "b", labelled, 1, transfer=labelled)
    with pytest.raises(UserError, match="not a finished run"):
        _student(tmp_path, tiny_model, "c", labelled, 1, teacher=str(tmp_path))
    two = write_jsonl(tmp_path / "two.jsonl", [r for r in make_rows(30, 18) if r["label"] != "neutral"])
    with pytest.raises(UserError, match="differ from the teacher"):
        _student(tmp_path, tiny_model, "d", two, 1, eval_file=two, teacher=str(teacher_run))
    regression = tunelab.train(task_config("regression")).run_dir
    with pytest.raises(UserError, match="must be a classification run"):
        _student(tmp_path, tiny_model, "e", labelled, 1, teacher=str(regression))
