"""Distillation: the KD loss, temperature, layer-subset students, teacher caching and what soft targets buy."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import make_rows, train_classifier, write_jsonl

import tunelab
from tunelab.errors import UserError
from tunelab.losses import soft_targets
from tunelab.methods.distill import distill_loss, evenly_spaced, keep_layers, soft_targets_of


def _softmax(xs, t):
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def _distill_loss(task, student, teacher, labels, labelled, t, alpha, **space):
    """The loss a Distill student trains on, from the teacher's raw outputs (as its exported model answers)."""
    from tunelab.tasks import TASKS
    from tunelab.tasks.base import Space

    task, space = TASKS[task], Space(**space)
    targets = [soft_targets_of(task, row, space) for row in teacher]
    return float(distill_loss(task, torch.tensor(student), torch.tensor(targets), torch.tensor(labels),
                              torch.tensor(labelled), t, alpha))


def test_kd_loss_matches_a_hand_computed_value():
    student, teacher, t, alpha = [1.0, 2.0, 0.0], [2.0, 0.0, 1.0], 2.0, 0.3
    p, q = _softmax(teacher, t), _softmax(student, t)
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    ce = -math.log(_softmax(student, 1.0)[1])
    want = alpha * t * t * kl + (1 - alpha) * ce
    assert _distill_loss("classification", [student], [teacher], [1], [True], t, alpha) == pytest.approx(want, rel=1e-6)
    # an unlabelled (transfer) row adds only its soft term; the loss is a sum over rows
    two = _distill_loss("classification", [student, student], [teacher, teacher], [1, 0], [True, False], t, alpha)
    assert two == pytest.approx(want + alpha * t * t * kl, rel=1e-6)
    assert _distill_loss("classification", [teacher], [teacher], [0], [False], t, 1.0) == \
        pytest.approx(0, abs=1e-6)  # a student equal to its teacher has nothing left to learn


def test_multilabel_and_regression_soft_terms_match_hand_computed_values():
    def sig(x):
        return 1 / (1 + math.exp(-x))

    student, teacher, t, alpha = [0.5, -1.0], [2.0, -3.0], 2.0, 0.4
    kl = 0.0
    for s_, t_ in zip(student, teacher):
        p, q = sig(t_ / t), sig(s_ / t)
        kl += p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    gold = [1.0, 0.0]
    bce = -(math.log(sig(student[0])) + math.log(1 - sig(student[1]))) / 2
    want = alpha * t * t * kl / 2 + (1 - alpha) * bce
    assert _distill_loss("multilabel", [student], [teacher], [gold], [True], t, alpha) == pytest.approx(want, rel=1e-6)
    # regression: the teacher answers in the target's units, the student in standardised ones
    got = _distill_loss("regression", [[0.5]], [[7.0]], [1.0], [True], t, alpha, target_mean=5.0, target_std=2.0)
    assert got == pytest.approx(alpha * (0.5 - 1.0) ** 2 + (1 - alpha) * (0.5 - 1.0) ** 2)
    assert _distill_loss("regression", [[0.5]], [[9.0]], [0.0], [False], t, alpha, target_mean=5.0,
                         target_std=2.0) == pytest.approx(alpha * (0.5 - 2.0) ** 2)  # unlabelled: soft term only


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


@pytest.mark.slow
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
    with pytest.raises(UserError, match="a classification student needs a classification teacher"):
        _student(tmp_path, tiny_model, "e", labelled, 1, teacher=str(regression))
    with pytest.raises(UserError, match="prune_vocab only applies to --tuning distill"):
        _student(tmp_path, tiny_model, "f", labelled, 1, prune_vocab=True)


def test_vocabulary_pruning_keeps_the_pieces_the_texts_use_and_their_embeddings(tiny_model):
    from transformers import AutoTokenizer, BertForSequenceClassification

    from tunelab.methods.distill import prune_vocabulary

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = BertForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    before = model.get_input_embeddings().weight.detach().clone()
    texts = ["The delivery was wonderful, thanks!", "terrible service again"]
    small = prune_vocabulary(model, tok, texts)
    assert 1_000 < len(small) < len(tok) / 4 and model.config.vocab_size == len(small)
    assert model.get_input_embeddings().weight.shape == (len(small), before.shape[1])
    for text in texts:  # the same pieces, renumbered, with the same embedding rows and the special tokens around
        old, new = tok(text)["input_ids"], small(text)["input_ids"]
        assert tok.convert_ids_to_tokens(old) == small.convert_ids_to_tokens(new)
        assert new[0] == small.cls_token_id and new[-1] == small.sep_token_id
        assert torch.equal(model.get_input_embeddings().weight[new], before[old])
    unseen = small.tokenize("zebra")  # a word the texts never used splits into kept pieces, never [UNK]
    assert unseen != ["zebra"] and small.unk_token not in unseen and "".join(unseen).replace("##", "") == "zebra"
    assert small.pad_token_id == model.config.pad_token_id == model.get_input_embeddings().padding_idx
    assert model(**small(texts, padding=True, return_tensors="pt")).logits.shape == (2, 2)


def test_a_pruned_student_exports_and_predicts_with_its_own_vocabulary(tmp_path, tiny_model, teacher_run):
    from transformers import AutoConfig, AutoTokenizer

    from tunelab.predict import predict

    labelled = write_jsonl(tmp_path / "train.jsonl", make_rows(60, 19))
    result = _student(tmp_path, tiny_model, "pruned", labelled, 2, teacher=str(teacher_run), student_layers=1,
                      prune_vocab=True)
    vocab = AutoConfig.from_pretrained(result.model_dir).vocab_size
    assert vocab == len(AutoTokenizer.from_pretrained(result.model_dir)) < 30_522 / 4
    assert result.eval["f1_macro"] > 0.6
    out = predict(result.run_dir, write_jsonl(tmp_path / "in.jsonl", make_rows(10, 20)))
    assert len(out.read_text().splitlines()) == 10


@pytest.mark.parametrize("task", ["multilabel", "regression"])
def test_multilabel_and_regression_students_learn_from_their_teacher(task, task_config, tmp_path):
    """A one-layer student of a two-layer teacher, with 200 unlabelled texts the teacher answers for it."""
    from conftest import TASK_ROWS

    teacher_cfg = task_config(task)
    teacher_cfg.train.epochs = 4
    teacher = tunelab.train(teacher_cfg)
    student_cfg = task_config(task)
    student_cfg.output = str(tmp_path / "student")
    student_cfg.tuning.name, student_cfg.tuning.teacher = "distill", str(teacher.run_dir)
    student_cfg.tuning.student_layers, student_cfg.tuning.kd_alpha, student_cfg.train.epochs = 1, 0.7, 3
    student_cfg.data.transfer = str(write_jsonl(tmp_path / "transfer.jsonl",
                                                [{"text": r["text"]} for r in TASK_ROWS[task](200, 31)]))
    student = tunelab.train(student_cfg)
    main = {"multilabel": "f1_micro", "regression": "r2"}[task]
    assert student.metrics["train"]["transfer_examples"] == 200
    assert student.eval[main] >= 0.9 * teacher.eval[main], (student.eval, teacher.eval)
    baseline = next(iter(student.metrics["baseline"].values()))[main]
    assert student.eval[main] > baseline + 0.2


def test_a_generator_fine_tuned_as_a_classifier_teaches_a_small_encoder(tmp_path, tiny_model, tiny_llama):
    """Another architecture and tokenizer (byte-level BPE Llama → WordPiece BERT): soft targets are per text."""
    (tmp_path / "llama").mkdir()
    teacher = train_classifier(tmp_path / "llama", tiny_llama, 300, 41)
    labelled = write_jsonl(tmp_path / "few.jsonl", make_rows(16, 42))
    transfer = write_jsonl(tmp_path / "transfer.jsonl", [{"text": r["text"]} for r in make_rows(300, 43)])
    student = _student(tmp_path, tiny_model, "student", labelled, 3, teacher=str(teacher.run_dir),
                       transfer=transfer, kd_alpha=0.7)
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(teacher.model_dir).model_type == "llama" and teacher.eval["f1_macro"] > 0.9
    assert AutoConfig.from_pretrained(student.model_dir).model_type == "bert"
    assert student.eval["f1_macro"] >= 0.9 * teacher.eval["f1_macro"], (student.eval, teacher.eval)


# --- language models ------------------------------------------------------------------------------------------
def test_token_distill_loss_is_the_kl_plus_the_task_loss():
    """α = 1 against itself: 0; α = 0: the chat task's own summed loss; α mixes the two."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.methods.distill import token_distill_loss
    from tunelab.tasks import TASKS

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)
    student, teacher = LlamaForCausalLM(config).eval(), LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 50, (2, 7))
    labels = ids.clone()
    labels[:, :3] = -100  # the prompt carries no loss
    batch = lambda: {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels.clone()}  # noqa: E731
    chat = TASKS["chat"]
    same, _ = token_distill_loss(chat, student, student, batch(), 2.0, 1.0)
    assert same.item() == pytest.approx(0.0, abs=1e-5)
    hard, extra = token_distill_loss(chat, student, teacher, batch(), 2.0, 0.0)
    assert hard.item() == pytest.approx(chat.forward(student, batch(), None)[0].item(), rel=1e-6)
    assert extra["tokens"] == 2 * 4  # positions 3..6 predict labelled tokens 4..7 of each row
    s = student(input_ids=ids).logits[:, 2:-1]
    t = teacher(input_ids=ids).logits[:, 2:-1]
    kl = (torch.softmax(t / 2, -1) * (torch.log_softmax(t / 2, -1) - torch.log_softmax(s / 2, -1))).sum() * 4
    mixed, _ = token_distill_loss(chat, student, teacher, batch(), 2.0, 0.3)
    assert mixed.item() == pytest.approx(0.3 * kl.item() + 0.7 * hard.item(), rel=1e-5)


def test_a_chat_model_distils_token_level_and_sequence_level(lm_config, tmp_path, capsys):
    """A chat run teaches the tiny Llama: token level (same tokenizer) learns, its held-out loss falls; sequence
    level writes the teacher's answers to the training prompts, and the student trains on exactly those."""
    import json

    from tunelab import generate as gen
    from tunelab.cli import main
    from tunelab.pipeline import train

    teacher = train(lm_config("chat", "full")).run_dir
    cfg = lm_config("chat", "distill")
    cfg.tuning.teacher = str(teacher)
    result = train(cfg)
    assert result.metrics["train"] and cfg.tuning.kd_level == "token"
    start = result.metrics["baseline"]["before_training"]["loss"]
    assert result.eval["loss"] < start * 0.9

    cfg = lm_config("chat", "distill")
    cfg.tuning.teacher, cfg.tuning.kd_level, cfg.tuning.kd_max_new_tokens = str(teacher), "sequence", 8
    cfg.output = str(tmp_path / "sequence")
    train(cfg)
    written = tmp_path / "sequence" / "distill" / "teacher_answers.jsonl"
    rows = [json.loads(line) for line in written.read_text().splitlines()]
    gold = [json.loads(line) for line in open(cfg.data.train)]
    assert len(rows) == len(gold)
    model, tokenizer = gen.load_generator(str(teacher), "cpu")
    for row, g in list(zip(rows, gold))[:3]:
        prompt = [{"role": m["role"], "content": m["content"]} for m in g["messages"][:-1]]
        assert row["messages"][:-1] == prompt
        assert row["messages"][-1]["content"] == gen.complete(model, tokenizer, prompt, max_new_tokens=8).text
    # the set is plain chat JSONL: reusable as training data
    assert main(["train", "--task", "chat", "--model", cfg.model.name, "--train", str(written), "--eval",
                 cfg.data.eval, "--epochs", "1", "--output", str(tmp_path / "again"), "--train.progress", "false"]) == 0

    capsys.readouterr()
    assert main(["train", "--task", "clm", "--model", cfg.model.name, "--tuning", "distill", "--teacher",
                 str(teacher), "--train", lm_config("clm").data.train, "--tuning.kd_level", "sequence",
                 "--output", str(tmp_path / "clm"), "--train.progress", "false"]) == 2
    assert "sequence-level distillation trains on the teacher's answers" in capsys.readouterr().err
