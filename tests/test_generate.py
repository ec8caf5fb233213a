"""tunelab.generate and the `generate` / `chat` commands, on the tiny random Llama (ChatML, eos = <|im_end|>)."""
from __future__ import annotations

import io
import json
import shutil

import pytest
import torch
from torch import nn

import tunelab.generate as gen
from tunelab.cli import main
from tunelab.errors import UserError

ASK = [{"role": "user", "content": "name a color"}]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return gen.load_generator(tiny_llama)


def _forced_head(model, token_id: int, logit: float) -> None:
    """Replace the (tied) output layer by one with a bias: +logit makes `token_id` always the argmax, -logit never."""
    old = model.get_output_embeddings()
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight if logit < 0 else torch.zeros_like(old.weight))
        head.bias.zero_()
        head.bias[token_id] = logit
    model.lm_head = head


def test_greedy_and_seeded_sampling_are_reproducible(llm):
    model, tok = llm
    greedy = gen.generate(model, tok, ASK, max_new_tokens=12)
    assert greedy and greedy == gen.generate(model, tok, ASK, max_new_tokens=12)
    sampled = gen.generate(model, tok, ASK, max_new_tokens=12, temperature=1.5, seed=3)
    assert sampled == gen.generate(model, tok, ASK, max_new_tokens=12, temperature=1.5, seed=3)
    # The seed matters, and sampling is not greedy in disguise (fixed random model: deterministic outcome).
    assert sampled != gen.generate(model, tok, ASK, max_new_tokens=12, temperature=1.5, seed=4)
    assert sampled != greedy


def test_max_new_tokens_bounds_the_answer(tiny_llama):
    model, tok = gen.load_generator(tiny_llama)
    _forced_head(model, tok.eos_token_id, -1e4)  # eos never wins: only the bound can end the answer
    for n in (1, 7):
        c = gen.complete(model, tok, ASK, max_new_tokens=n)
        assert c.new_tokens == n
        assert len(tok(c.text, add_special_tokens=False)["input_ids"]) <= n


def test_stops_at_the_tokenizers_eos(tiny_llama):
    model, tok = gen.load_generator(tiny_llama)
    model.generation_config.eos_token_id = None  # the stop must come from the ids generate() passes itself
    _forced_head(model, tok.eos_token_id, 1e4)  # eos is always the most likely token
    c = gen.complete(model, tok, ASK, max_new_tokens=20)
    assert (c.new_tokens, c.text) == (1, "")
    # Control: the same forcing on an ordinary token runs to the bound, so the check above can fail.
    _forced_head(model, tok.convert_tokens_to_ids("<|im_start|>"), 1e4)
    assert gen.complete(model, tok, ASK, max_new_tokens=20).new_tokens == 20


def test_end_of_turn_token_stops_even_when_it_is_not_the_eos(tiny_llama):
    model, tok = gen.load_generator(tiny_llama)
    model.generation_config.eos_token_id = None
    tok.eos_token = "<|pad|>"
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen.stop_ids(model, tok)


def test_raw_text_continues_without_the_template(llm):
    model, tok = llm
    assert gen.render(tok, "the day was") == "the day was"
    assert "<|im_start|>user\nname a color<|im_end|>\n<|im_start|>assistant\n" == gen.render(tok, ASK)
    assert gen.complete(model, tok, "the day was", max_new_tokens=4).new_tokens <= 4


def test_no_chat_template_suggests_raw(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = None
    with pytest.raises(UserError, match="--raw"):
        gen.render(tok, ASK)


def test_cli_generate_on_a_run_folder_prints_and_writes_jsonl(tiny_llama, llm, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_llama, run / "model")
    (run / "config.yaml").write_text("task: chat\n")
    out = tmp_path / "answers.jsonl"
    rc = main(["generate", str(run), "--prompt", "name a color", "--prompt", "name a fruit", "--system", "be brief",
               "--max-new-tokens", "6", "--output", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["name a color", "name a fruit"]
    model, tok = llm
    for r in rows:
        assert set(r) == {"prompt", "answer", "new_tokens", "seconds"} and 1 <= r["new_tokens"] <= 6
        assert r["answer"] in printed  # streamed to stdout
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": r["prompt"]}]
        assert r["answer"] == gen.generate(model, tok, messages, max_new_tokens=6)  # the CLI is the API
    assert "[2/2] name a fruit" in printed and f"wrote {out}" in printed


def test_cli_generate_on_a_model_folder_with_raw(tiny_llama, capsys):
    assert main(["generate", tiny_llama, "--raw", "--prompt", "the day was", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()


def _chat(monkeypatch, lines: str, *flags: str) -> tuple[int, list[list[dict]], list[str]]:
    """Run `tunelab chat` on stdin `lines`; every conversation generate() saw, and its answers."""
    seen, answers = [], []
    real = gen.generate

    def spy(model, tok, messages, **kw):
        seen.append([dict(m) for m in messages])
        answers.append(real(model, tok, messages, **kw))
        return answers[-1]

    monkeypatch.setattr(gen, "generate", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    return main(["chat", *flags, "--max-new-tokens", "5"]), seen, answers


def test_chat_answers_each_line_and_keeps_the_history(tiny_llama, llm, monkeypatch, capsys):
    rc, seen, answers = _chat(monkeypatch, "name a color\nname a fruit\n", tiny_llama)
    out = capsys.readouterr().out
    assert rc == 0 and len(seen) == 2 and out.count("bot> ") == 2 and out.count("you> ") == 3
    first = [{"role": "user", "content": "name a color"}, {"role": "assistant", "content": answers[0]}]
    assert seen[1] == first + [{"role": "user", "content": "name a fruit"}]
    rendered = gen.render(llm[1], seen[1])
    assert f"<|im_start|>user\nname a color<|im_end|>\n<|im_start|>assistant\n{answers[0]}<|im_end|>" in rendered


def test_chat_reset_exit_and_system(tiny_llama, monkeypatch, capsys):
    rc, seen, _ = _chat(monkeypatch, "name a color\n/reset\nname a fruit\n/exit\nnever asked\n", tiny_llama,
                        "--system", "be brief")
    system = {"role": "system", "content": "be brief"}
    assert rc == 0
    assert seen == [[system, {"role": "user", "content": "name a color"}],
                    [system, {"role": "user", "content": "name a fruit"}]]
    rc, seen, _ = _chat(monkeypatch, "name a color\n\nnever asked\n", tiny_llama)
    assert rc == 0 and len(seen) == 1


def test_chat_ctrl_c_exits_cleanly(tiny_llama, monkeypatch, capsys):
    class Interrupted(io.StringIO):
        def readline(self, *a):
            raise KeyboardInterrupt

    monkeypatch.setattr("sys.stdin", Interrupted())
    assert main(["chat", tiny_llama]) == 0
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("flag,value", [("--max-new-tokens", "0"), ("--temperature", "-0.5"), ("--top-p", "0"),
                                        ("--top-p", "1.5")])
def test_bad_flags_exit_2_naming_the_flag(tiny_llama, capsys, command, flag, value):
    prompt = ["--prompt", "hi"] if command == "generate" else []
    assert main([command, tiny_llama, *prompt, flag, value]) == 2
    assert flag in capsys.readouterr().err


def test_empty_prompt_and_system_with_raw_are_refused(tiny_llama, capsys):
    assert main(["generate", tiny_llama, "--prompt", "  "]) == 2
    assert "--prompt" in capsys.readouterr().err
    assert main(["generate", tiny_llama, "--raw", "--system", "be brief", "--prompt", "hi"]) == 2
    assert "--system" in capsys.readouterr().err


def test_a_model_that_is_not_a_causal_lm_is_refused(tiny_model, tmp_path, capsys):
    assert main(["generate", tiny_model, "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert tiny_model in err and "not a causal language model" in err
    assert main(["chat", str(tmp_path / "missing")]) == 2
    assert "config.json" in capsys.readouterr().err
