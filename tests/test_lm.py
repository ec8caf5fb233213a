"""Language-model stages on a tiny random Llama (and a tiny BERT for mlm): chat loss sits on assistant tokens only,
DPO starts at ln 2 with a frozen reference, resume is exact, exports load in plain transformers and peft, bad
records are refused by file and line. (That every stage trains and round-trips is in test_contract.py.)"""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import crash_and_resume, one_and_two_processes, same_weights, write_jsonl

from tunelab.distributed import Dist
from tunelab.pipeline import build_job, train
from tunelab.loop import Loop, fit


def _history(run):
    import json

    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


# --- chat: which tokens carry the loss --------------------------------------------------------------------------

def _tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_chat_loss_covers_assistant_tokens_through_the_end_of_turn_only(tiny_llama):
    from tunelab.data.chat import IGNORE, render

    tok = _tokenizer(tiny_llama)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name a color"},
                {"role": "assistant", "content": "a blue of course"}, {"role": "user", "content": "again"},
                {"role": "assistant", "content": "a red", "weight": 0}, {"role": "user", "content": "once more"},
                {"role": "assistant", "content": "a cat"}]
    ids, labels = render(tok, messages, trained=[2, 6])
    assert len(ids) == len(labels)
    kept = [t for t in labels if t != IGNORE]
    # exactly the two trained answers, each followed by the end-of-turn token, and nothing else
    assert tok.decode(kept) == "a blue of course<|im_end|>a cat<|im_end|>"
    assert kept.count(tok.eos_token_id) == 2
    assert ids[labels.index(kept[0]) - 1] != kept[0]  # the assistant header before it is not trained
    text_ignored = tok.decode([t for t, lab in zip(ids, labels) if lab == IGNORE])
    assert "name a color" in text_ignored and "a red" in text_ignored and "be brief" in text_ignored


def test_chat_items_train_the_end_of_turn_and_prompt_completion_reads(lm_config, tmp_path):
    cfg = lm_config("chat")
    p = tmp_path / "pc.jsonl"
    p.write_text('{"prompt": "name a fruit", "completion": "an apple"}\n' * 4)
    cfg.data.train = str(p)
    job = build_job(cfg, torch.device("cpu"))
    eos = job.tokenizer.eos_token_id
    for it in job.train_items:
        trained = [t for t in it["labels"] if t != -100]
        assert trained[-1] == eos and job.tokenizer.decode(trained) == "an apple<|im_end|>"


def test_alpaca_records_become_a_user_turn_and_the_trained_answer(lm_config, tmp_path, capsys):
    from tunelab.cli import main
    from tunelab.data.formats import detect_format

    cfg = lm_config("chat")
    p = tmp_path / "alpaca.jsonl"
    rows = [{"instruction": "Name a fruit.", "input": "", "output": "An apple."},
            {"instruction": "Translate to French.", "input": "good morning", "output": "bonjour",
             "system": "Be brief."}] * 3
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert detect_format(p.read_text(), ".jsonl", "alpaca.jsonl") == "chat"  # what the service calls an upload
    cfg.data.train = str(p)
    job = build_job(cfg, torch.device("cpu"))
    tok = job.tokenizer
    first, second = job.train_items[0], job.train_items[1]
    assert tok.decode([t for t in first["labels"] if t != -100]) == "An apple.<|im_end|>"
    prompt = tok.decode([t for t, lab in zip(second["input_ids"], second["labels"]) if lab == -100])
    assert "Be brief." in prompt and "Translate to French.\n\ngood morning" in prompt
    p.write_text(json.dumps({"instruction": "Name a fruit.", "output": 3}) + "\n")
    assert main(["data", "check", str(p), "--task", "chat"]) == 2
    assert "alpaca.jsonl:1" in capsys.readouterr().out


def test_sft_resume_after_crash_equals_uninterrupted(lm_config, tmp_path):
    cfg = lm_config("chat", "lora")
    cfg.train.checkpoint_every, cfg.train.epochs = 4, 2
    straight, resumed = crash_and_resume(cfg, tmp_path, crash_at=7)
    assert same_weights(straight, resumed)
    assert straight.eval == resumed.eval
    steps = [[(h["step"], h.get("loss"), h.get("mean_token_accuracy")) for h in _history(r.run_dir)]
             for r in (straight, resumed)]
    assert steps[0] == steps[1]  # history rewound to the checkpoint, then redone


def test_chat_metrics_carry_the_openai_names(lm_config):
    m = train(lm_config("chat", "lora")).metrics
    for key in ("train_loss", "valid_loss", "train_mean_token_accuracy", "valid_mean_token_accuracy"):
        assert isinstance(m[key], float), key
    assert m["valid_loss"] == m["eval"]["loss"] and 0 <= m["valid_mean_token_accuracy"] <= 1


# --- dpo ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_dpo_loss_is_ln2_when_policy_equals_reference(tuning, lm_config):
    cfg = lm_config("dpo", tuning)
    job = build_job(cfg, torch.device("cpu"))
    job.model.eval()  # no dropout: the policy is exactly the starting model
    batch = job.task.collate(job.train_items[:8], job.pad_id)
    with torch.no_grad():
        loss, _ = job.task.forward(job.model, batch, job.splits.space)
    assert abs(float(loss) / 8 - math.log(2)) < 1e-5
    # and with a real difference between the responses' probabilities, the loss is not ln 2
    assert abs(job.train_items[0]["_ref"][0] - job.train_items[0]["_ref"][1]) > 1e-3


def test_dpo_lora_reference_is_the_adapter_free_model(lm_config):
    from tunelab.evaluate import predict_outputs

    cfg = lm_config("dpo", "lora")
    job = build_job(cfg, torch.device("cpu"))
    run = cfg.output
    import pathlib

    pathlib.Path(run).mkdir(parents=True)
    fit(Loop(cfg, job.task, job.splits.space, job.model, job.method, job.train_items, job.eval_items, job.pad_id,
             pathlib.Path(run), Dist()))
    trained = predict_outputs(job.task, job.model, job.eval_items, job.pad_id, torch.device("cpu"))
    with job.model.disable_adapter():
        base = predict_outputs(job.task, job.model, job.eval_items, job.pad_id, torch.device("cpu"))
    refs = torch.tensor([it["_ref"] for it in job.eval_items])
    assert torch.allclose(torch.stack(base), refs, atol=1e-4)  # the reference stayed frozen
    assert not torch.allclose(torch.stack(trained), refs, atol=1e-2)  # while the policy moved


# --- continued pre-training -------------------------------------------------------------------------------------

def test_clm_packs_documents_with_eos_into_full_blocks(lm_config):
    cfg = lm_config("clm")
    cfg.data.max_length = 16
    job = build_job(cfg, torch.device("cpu"))
    lengths = [len(it["input_ids"]) for it in job.train_items]
    assert all(n == 16 for n in lengths[:-1]) and 1 < lengths[-1] <= 16
    stream = [t for it in job.train_items for t in it["input_ids"]]
    assert stream.count(job.tokenizer.eos_token_id) == len(job.splits.train)  # one eos closes each document


def test_mlm_head_is_tied_and_masks_about_15_percent(lm_config):
    cfg = lm_config("mlm")
    job = build_job(cfg, torch.device("cpu"))
    model = job.model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    tok = job.tokenizer
    labelled = [(it["input_ids"][j], lab) for it in job.train_items for j, lab in enumerate(it["labels"]) if lab != -100]
    ordinary = sum(len(it["input_ids"]) - 2 for it in job.train_items)
    assert 0.08 < len(labelled) / ordinary < 0.25
    masked = sum(i == tok.mask_token_id for i, _ in labelled) / len(labelled)
    assert 0.6 < masked < 0.95
    again = build_job(cfg, torch.device("cpu")).train_items
    assert [it["input_ids"] for it in again] == [it["input_ids"] for it in job.train_items]  # static, seeded


# --- exports --------------------------------------------------------------------------------------------------

def test_chat_lora_export_loads_in_transformers_and_adapter_in_peft(lm_config):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.models import resolve

    cfg = lm_config("chat", "lora")
    result = train(cfg)
    tok = _tokenizer(result.model_dir)
    assert tok.chat_template  # the template travels with the model
    text = tok.apply_chat_template([{"role": "user", "content": "name a city"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    merged = AutoModelForCausalLM.from_pretrained(result.model_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(resolve(cfg.model.name))
    adapted = PeftModel.from_pretrained(base, result.run_dir / "adapter").eval()
    with torch.no_grad():
        a, b = merged(ids).logits, adapted(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(resolve(cfg.model.name)).eval()(ids).logits
    assert torch.allclose(a, b, atol=1e-4) and not torch.allclose(a, plain, atol=1e-3)


def test_reward_export_scores_chosen_above_rejected(lm_config):
    from transformers import AutoModelForSequenceClassification

    result = train(lm_config("reward", "full"))
    model = AutoModelForSequenceClassification.from_pretrained(result.model_dir).eval()
    tok = _tokenizer(result.model_dir)

    def score(answer):
        text = tok.apply_chat_template([{"role": "user", "content": "name a fruit"},
                                        {"role": "assistant", "content": answer}], tokenize=False)
        with torch.no_grad():
            return float(model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0])

    assert result.metrics["eval"]["pairwise_accuracy"] > result.metrics["baseline"]["before_training"]["pairwise_accuracy"]
    assert score("a apple of course") > score("a tea of course")


# --- bad input --------------------------------------------------------------------------------------------------

BAD_CHAT = {
    "unknown role": ('{"messages": [{"role": "bot", "content": "hi"}]}', ":2: message 1: unknown role 'bot'"),
    "missing content": ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}',
                        ":2: message 1: missing content"),
    "empty content": ('{"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}]}',
                      ":2: message 1: empty content"),
    "no assistant": ('{"messages": [{"role": "user", "content": "hi"}]}', ":2: no assistant message"),
    "bad weight": ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", '
                   '"weight": 2}]}', ":2: message 2: 'weight' must be 0 or 1"),
    "neither format": ('{"text": "hello"}', ":2: expected 'messages'"),
}
BAD_PAIRS = {
    "empty prompt": ('{"prompt": "", "chosen": "a", "rejected": "b"}', ":2: 'prompt': empty content"),
    "empty chosen": ('{"prompt": "q", "chosen": "", "rejected": "b"}', ":2: 'chosen': empty content"),
    "missing rejected": ('{"prompt": "q", "chosen": "a"}', ":2: missing 'rejected'"),
    "identical": ('{"prompt": "q", "chosen": "same", "rejected": "same"}', ":2: chosen and rejected responses are identical"),
    "openai two answers": ('{"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": '
                           '[{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}], '
                           '"non_preferred_output": [{"role": "assistant", "content": "c"}]}',
                           ":2: 'preferred_output' must hold exactly one assistant message"),
}
GOOD_CHAT = '{"messages": [{"role": "user", "content": "name a cat"}, {"role": "assistant", "content": "a cat"}]}'
GOOD_PAIR = '{"prompt": "name a cat", "chosen": "a cat", "rejected": "a dog"}'


def _train_cli(capsys, model, task, path, *extra):
    from tunelab.cli import main

    code = main(["train", "--task", task, "--model", model, "--train", str(path), "--output", str(path) + ".run",
                 "--epochs", "1", "--train.progress", "false", "--eval.bootstrap", "0", *extra])
    return code, capsys.readouterr()


@pytest.mark.parametrize("case", sorted(BAD_CHAT))
def test_bad_chat_record_names_file_and_line(case, capsys, tiny_llama, tmp_path):
    line, expected = BAD_CHAT[case]
    path = tmp_path / "chat.jsonl"
    path.write_text(GOOD_CHAT + "\n" + line + "\n")
    code, out = _train_cli(capsys, tiny_llama, "chat", path)
    assert code == 2 and f"chat.jsonl{expected}" in out.err and "Traceback" not in out.err


@pytest.mark.parametrize("case", sorted(BAD_PAIRS))
def test_bad_preference_record_names_file_and_line(case, capsys, tiny_llama, tmp_path):
    line, expected = BAD_PAIRS[case]
    path = tmp_path / "pairs.jsonl"
    path.write_text(GOOD_PAIR + "\n" + line + "\n")
    code, out = _train_cli(capsys, tiny_llama, "dpo", path)
    assert code == 2 and f"pairs.jsonl{expected}" in out.err


def test_skip_invalid_counts_what_it_skips(capsys, tiny_llama, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text((GOOD_CHAT + "\n") * 8 + BAD_CHAT["unknown role"][0] + "\n" + BAD_CHAT["no assistant"][0] + "\n")
    code, out = _train_cli(capsys, tiny_llama, "chat", path, "--data.skip_invalid", "true")
    assert code == 0, out.err
    assert "skipped 2 invalid records" in out.err and "chat.jsonl:9: message 1: unknown role" in out.err


@pytest.mark.parametrize("policy,verb", [("truncate", "truncated"), ("drop", "dropped")])
def test_overlong_conversations_are_truncated_or_dropped_and_counted(policy, verb, lm_config, caplog):
    from tunelab.data.load import Example

    cfg = lm_config("chat")
    cfg.data.max_length, cfg.data.overlong = 24, policy
    job = build_job(cfg, torch.device("cpu"))
    caplog.clear()
    long = [{"role": "user", "content": "name a color"}, {"role": "assistant", "content": "blue " * 40}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a cat"}]
    items = job.task.encode(job.tokenizer, [Example("", long), Example("", short)], job.splits.space, 24)
    err = caplog.text  # the library warns through logging (the CLI shows it)
    assert f"1 of 2 conversations are longer than max_length 24 tokens and were {verb}" in err
    assert len(items) == (2 if policy == "truncate" else 1) and all(len(it["input_ids"]) <= 24 for it in items)


def test_model_without_chat_template_is_refused(capsys, tiny_model, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text((GOOD_CHAT + "\n") * 8)
    code, out = _train_cli(capsys, tiny_model, "chat", path)
    assert code == 2 and "no chat template" in out.err


def test_tuning_that_does_not_apply_is_refused(capsys, tiny_llama, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text((GOOD_CHAT + "\n") * 8)
    code, out = _train_cli(capsys, tiny_llama, "chat", path, "--tuning", "head")
    assert code == 2 and "does not apply to the chat task" in out.err


@pytest.mark.parametrize("task", ["chat", "dpo"])
def test_eval_on_a_file_reproduces_the_runs_metrics_and_predict_points_to_generate(task, lm_config, capsys):
    from tunelab.cli import main
    from tunelab.predict import evaluate_file

    cfg = lm_config(task, "lora")
    result = train(cfg)
    if task == "dpo":  # before any step the policy is the reference: every reward is exactly 0
        start = result.metrics["baseline"]["before_training"]
        assert start["reward_chosen"] == start["reward_rejected"] == start["reward_accuracy"] == 0
    again = evaluate_file(result.run_dir, cfg.data.eval)
    for k, v in result.metrics["eval"].items():
        assert again[k] == pytest.approx(v, abs=1e-4), k
    code = main(["predict", str(result.run_dir), "--input", cfg.data.eval])
    assert code == 2 and "tunelab generate" in capsys.readouterr().err


def test_compare_refuses_language_stages(capsys, tiny_llama, lm_data, tmp_path):
    from tunelab.cli import main

    code = main(["compare", "--task", "chat", "--model", tiny_llama, "--train", lm_data["chat"]["train"],
                 "--tuning", "full,lora", "--output", str(tmp_path / "cmp")])
    assert code == 2 and "compare is for labelled tasks" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("task", ["chat", "dpo"])
def test_two_process_ddp_equals_one_process_for_language_stages(task, lm_config, tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU), batch 4 per process == one process with batch 8: token-level
    losses are divided by the global batch's labelled tokens, pairs by the global batch's pairs."""
    import json

    from safetensors.torch import load_file

    cfg = lm_config(task, "full")
    one_and_two_processes(cfg, tmp_path)
    rows = [[json.loads(line) for line in (tmp_path / r / "history.jsonl").read_text().splitlines()]
            for r in ("one", "two")]
    steps = [[h for h in r if "loss" in h] for r in rows]
    assert [h["loss"] for h in steps[0]] == pytest.approx([h["loss"] for h in steps[1]], abs=1e-5)
    extra = "mean_token_accuracy" if task == "chat" else "reward_accuracy"
    assert [h[extra] for h in steps[0]] == pytest.approx([h[extra] for h in steps[1]], abs=1e-6)
    # As in test_invariants: Adam's update on a ~0 gradient can flip with float rounding of the summed gradient,
    # so the weights must agree to a fraction of one step, the losses above to 1e-5.
    a, b = (load_file(str(tmp_path / r / "model" / "model.safetensors")) for r in ("one", "two"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 0.2 * cfg.train.lr


def test_score_gives_a_reward_runs_scores_and_agrees_with_its_evaluation(lm_config, tmp_path, capsys):
    """`tunelab score RUN --input pairs.jsonl`: the reward of each prompt and response, rendered and cut as training
    rendered them: chosen above rejected on exactly the eval pairs the run's pairwise accuracy counted."""
    from tunelab.cli import main

    cfg = lm_config("reward", "full")
    result = train(cfg)
    pairs = [json.loads(line) for line in open(cfg.data.eval, encoding="utf-8")]
    rows = [{"prompt": p["prompt"], "response": p[k]} for p in pairs for k in ("chosen", "rejected")]
    path = write_jsonl(tmp_path / "responses.jsonl", rows)
    assert main(["score", str(result.run_dir), "--input", str(path), "--output", str(tmp_path / "s.jsonl")]) == 0
    scored = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [r["response"] for r in scored] == [r["response"] for r in rows]
    wins = [scored[2 * i]["score"] > scored[2 * i + 1]["score"] for i in range(len(pairs))]
    assert sum(wins) / len(wins) == pytest.approx(result.eval["pairwise_accuracy"])
    assert sum(wins) / len(wins) > 0.5

    assert main(["score", str(train(lm_config("chat", "full")).run_dir), "--input", str(path)]) == 2
    assert "only reward runs score responses" in capsys.readouterr().err


def test_best_of_n_answers_with_the_highest_scored_of_n_seeded_samples(lm_config, tmp_path, capsys):
    """`tunelab generate … --best-of N --reward RUN`: N samples (seeds seed..seed+N-1), each scored by the reward
    run as `tunelab score` scores it, the highest one answered; sample 0 is plain sampling with the same seed."""
    from tunelab.cli import main

    cfg = lm_config("reward", "full")
    reward = str(train(cfg).run_dir)
    ask = ["generate", cfg.model.name, "--prompt", "name a color", "--temperature", "1.0", "--max-new-tokens", "8"]
    best = tmp_path / "best.jsonl"
    assert main([*ask, "--best-of", "4", "--reward", reward, "--output", str(best)]) == 0
    row = json.loads(best.read_text())
    answers, scores = [c["answer"] for c in row["candidates"]], [c["score"] for c in row["candidates"]]
    assert len(answers) == 4 and len(set(answers)) > 1
    assert row["score"] == max(scores) and row["answer"] == answers[scores.index(max(scores))]
    assert row["answer"] in capsys.readouterr().out
    path = write_jsonl(tmp_path / "candidates.jsonl", [{"prompt": "name a color", "response": a} for a in answers])
    assert main(["score", reward, "--input", str(path), "--output", str(tmp_path / "s.jsonl")]) == 0
    rescored = [json.loads(line)["score"] for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert rescored == pytest.approx(scores, abs=1e-5)
    plain = tmp_path / "plain.jsonl"
    assert main([*ask, "--output", str(plain)]) == 0
    assert json.loads(plain.read_text())["answer"] == answers[0]

    capsys.readouterr()
    for flags, message in ((["--best-of", "4"], "name a reward run with --reward"),
                           (["--reward", reward], "add --best-of N"),
                           (["--best-of", "4", "--reward", reward, "--temperature", "0"], "set --temperature above 0"),
                           (["--best-of", "4", "--reward", str(tmp_path)], "not a finished run folder")):
        assert main([*ask, *flags]) == 2
        assert message in capsys.readouterr().err


def test_nsp_pairs_are_half_next_half_random_from_the_same_file(lm_config):
    from conftest import make_document_rows

    from tunelab.tasks.lm import nsp_pairs, sentences

    assert all(3 <= len(sentences(r["text"])) <= 4 for r in make_document_rows(50, 1))
    docs = [" ".join(f"document {d} sentence {j}." for j in range(2 + d % 3)) for d in range(200)]
    split = [sentences(d) for d in docs]
    pairs = nsp_pairs(docs, seed=0)
    assert len(pairs) == sum(len(s) - 1 for s in split)
    assert 0.42 < sum(label for _, _, label in pairs) / len(pairs) < 0.58
    home = {s: d for d, doc in enumerate(split) for s in doc}
    consecutive = {(a, b) for doc in split for a, b in zip(doc, doc[1:])}
    for a, b, label in pairs:
        assert ((a, b) in consecutive) if label == 0 else (home[b] != home[a])
    assert nsp_pairs(docs, seed=0) == pairs and nsp_pairs(docs, seed=1) != pairs
    # pairs are built inside one file: the eval file's random halves are its own sentences
    held_out = [r["text"] for r in make_document_rows(16, 2)]
    own = {s for d in held_out for s in sentences(d)}
    assert all(b in own for _, b, _ in nsp_pairs(held_out, seed=0))
    assert sentences("one. two! three? 四。五") == ["one.", "two!", "three?", "四。", "五"]
    assert nsp_pairs(["a single sentence.", "another one."], seed=0) == []


def test_nsp_trains_both_heads_and_plain_transformers_loads_bert_for_pretraining(lm_config, tmp_path, capsys):
    """--task nsp: masked tokens and next-sentence prediction together; both improve on the starting model, and the
    saved model is a BertForPreTraining whose next-sentence head gives the run's accuracy."""
    from transformers import AutoTokenizer, BertForPreTraining

    from tunelab.cli import main
    from tunelab.data.batching import collate
    from tunelab.tasks import TASKS, Space

    cfg = lm_config("nsp", "full")
    cfg.train.epochs = 8
    result = train(cfg)
    start = result.metrics["baseline"]["before_training"]
    assert result.eval["loss"] < start["loss"] - 1 and result.eval["nsp_accuracy"] >= start["nsp_accuracy"] + 0.2
    history = [json.loads(line) for line in (result.run_dir / "history.jsonl").read_text().splitlines()]
    assert all(0 <= h["nsp_accuracy"] <= 1 for h in history if "loss" in h)

    model = BertForPreTraining.from_pretrained(result.run_dir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(result.run_dir / "model")
    task = TASKS["nsp"]
    items = task.encode(tokenizer, task.read(cfg.data.eval, cfg.data), Space(seed=cfg.train.seed), 64)
    batch = collate(items, tokenizer.pad_token_id)
    nsp = batch.pop("labels")[:, 0]
    with torch.no_grad():
        right = (model(**batch).seq_relationship_logits.argmax(-1) == nsp).float().mean().item()
    assert right == pytest.approx(result.eval["nsp_accuracy"])

    path = write_jsonl(tmp_path / "one.jsonl", [{"text": f"no second sentence in {i}"} for i in range(4)])
    assert main(["train", "--task", "nsp", "--model", cfg.model.name, "--train", str(path), "--eval", str(path),
                 "--output", str(tmp_path / "r")]) == 2
    assert "no document has two sentences to pair" in capsys.readouterr().err
    assert main(["train", "--task", "nsp", "--model", lm_config("chat").model.name, "--train", cfg.data.train,
                 "--output", str(tmp_path / "r2")]) == 2
    assert "nsp needs" in capsys.readouterr().err


def test_packed_conversations_each_keep_their_unpacked_loss(lm_config):
    """train.packing: conversations best-fit into rows of max_length (no row longer, every conversation once);
    a packed batch through the model gives each conversation the summed loss, labelled tokens and correct tokens
    it gets alone in an unpacked padded batch (attention stops at the borders, positions restart)."""
    from transformers import AutoModelForCausalLM

    from tunelab.data.chat import IGNORE

    cfg = lm_config("chat")
    cfg.data.max_length = 48
    job = build_job(cfg, torch.device("cpu"))
    items = job.train_items
    packed = job.task.pack(items, 128)  # (rows may be longer than the conversations were cut to)
    assert max(len(p["input_ids"]) for p in packed) <= 128
    assert len(packed) <= len(items) / 3 and sum(p["_conversations"] for p in packed) == len(items)
    assert sum(job.task.units(p) for p in packed) == sum(job.task.units(it) for it in items)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name).eval()

    def token_losses(batch):  # per shifted position: (loss, labelled, correct)
        labels = batch.pop("labels")[:, 1:]
        logits = model(**batch, use_cache=False).logits[:, :-1]  # (with a cache, transformers masks no packing)
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
        mask = labels != IGNORE
        return torch.stack([loss * mask, mask, (logits.argmax(-1) == labels) & mask], -1)

    with torch.no_grad():
        alone = token_losses(job.task.collate(items, job.tokenizer.pad_token_id)).sum(1)
        together = token_losses(job.task.collate(packed, job.tokenizer.pad_token_id))
    position = {tuple(it["input_ids"]): i for i, it in enumerate(items)}
    seen = []
    for r, p in enumerate(packed):
        starts = [t for t, pos in enumerate(p["position_ids"]) if pos == 0] + [len(p["position_ids"])]
        for a, b in zip(starts, starts[1:]):
            i = position[tuple(p["input_ids"][a:b])]
            got = together[r, a:b - 1].sum(0)  # within the conversation: position t scores token t + 1
            assert got[1:].tolist() == alone[i][1:].tolist(), i
            assert float(got[0]) == pytest.approx(float(alone[i][0]), abs=1e-4), i
            seen.append(tuple(p["input_ids"][a:b]))
    assert sorted(seen) == sorted(tuple(it["input_ids"]) for it in items)  # each conversation once (some repeat)
    with torch.no_grad():  # the training path's loss (the task's, through speed.causal_lm_loss): the same sum
        batch = job.task.collate(packed, job.tokenizer.pad_token_id)
        packed_total = job.task.forward(model, batch, job.splits.space)[0]
    assert float(packed_total) == pytest.approx(float(alone[:, 0].sum()), rel=1e-5)


def test_a_packed_chat_run_trains_on_fewer_rows_and_learns(lm_config, capsys):
    """The same conversations packed: fewer steps, every labelled token counted, the held-out loss falls as the
    unpacked run's does; packing anything but chat is refused with one line."""
    import tunelab
    from tunelab.cli import main

    cfg = lm_config("chat")
    cfg.train.packing, cfg.data.max_length = True, 64
    result = tunelab.train(cfg)
    m = result.metrics
    assert m["train"]["steps"] < 3 * 64 / 8  # 3 epochs of 64 conversations in batches of 8 rows would be 24
    assert m["eval"]["loss"] < m["baseline"]["before_training"]["loss"] - 0.5
    rc = main(["train", "--task", "clm", "--model", cfg.model.name, "--train", lm_config("clm").data.train,
               "--train.packing", "true", "--output", cfg.output + "-clm"])
    assert rc == 2 and "train.packing is for chat conversations, not clm" in capsys.readouterr().err
