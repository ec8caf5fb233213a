"""--task rl on the tiny random Llama: the advantage, KL and loss terms by hand, the reward rising under RLOO and
GRPO (full and lora), a crash-and-resume equal to the uninterrupted run, rewards from a reward run, refusals."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import crash_and_resume, same_weights

from tunelab.pipeline import train
from tunelab.tasks.rl import grpo_advantages, kl_k3, policy_loss, rloo_advantages


def _history(run) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def test_advantages_kl_and_losses_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 4.0]])
    # RLOO: each minus the mean of the other two
    assert rloo_advantages(rewards)[0].tolist() == pytest.approx([1 - 3.0, 2 - 2.5, 4 - 1.5])
    # GRPO: (r - 7/3) / (std + 1e-4), std with Bessel's correction: sqrt(((4/3)² + (1/3)² + (5/3)²) / 2) = sqrt(7/3)
    std = math.sqrt(7 / 3)
    assert grpo_advantages(rewards)[0].tolist() == pytest.approx([(r - 7 / 3) / (std + 1e-4) for r in (1, 2, 4)])
    # k3 = pi_ref/pi - log(pi_ref/pi) - 1: pi 0.5, pi_ref 0.25 -> 0.5 + ln 2 - 1; zero where they agree
    assert kl_k3(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25))).item() == pytest.approx(math.log(2) - 0.5)
    assert kl_k3(torch.tensor(-1.3), torch.tensor(-1.3)).item() == 0.0

    # one prompt, two answers of two tokens; the second token of answer 1 is padding (mask 0)
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -7.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    rewards = torch.tensor([[1.0, 0.0]])
    # rloo: KL per answer -1 and 0.5; r' = 1 + 0.1, 0 - 0.05; advantages ±1.15; loss -A * sum log pi
    loss = policy_loss("rloo", logp, ref, mask, rewards, beta=0.1)
    assert loss.tolist() == pytest.approx([-1.15 * -3.0, 1.15 * -0.5])
    loss.sum().backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-1.15, -1.15, 1.15, 0.0])
    # grpo: A = ±0.5 / (sqrt(0.5) + 1e-4); per token -A + beta * k3, averaged over the answer's own tokens
    logp.grad = None
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    k3 = lambda lp, rf: math.exp(rf - lp) - (rf - lp) - 1  # noqa: E731
    loss = policy_loss("grpo", logp, ref, mask, rewards, beta=0.1)
    assert loss.tolist() == pytest.approx([(-a + 0.1 * k3(-1, -1) - a + 0.1 * k3(-2, -1)) / 2,
                                           a + 0.1 * k3(-0.5, -1)])
    loss.sum().backward()  # d/dlogp of -A * exp(logp - logp.detach()) is -A; of k3, 1 - exp(ref - logp)
    assert logp.grad.flatten().tolist() == pytest.approx([(-a + 0.1 * (1 - math.exp(0))) / 2,
                                                          (-a + 0.1 * (1 - math.exp(1))) / 2,
                                                          a + 0.1 * (1 - math.exp(-0.5)), 0.0])


@pytest.mark.parametrize("algorithm,tuning", [("rloo", "full"), ("grpo", "full"), ("grpo", "lora")])
def test_the_reward_rises_on_a_trivially_learnable_reward(algorithm, tuning, lm_config):
    """Brevity (minus the answer's characters): the held-out greedy answers' mean reward rises well clear of the
    starting model's, and every step logs reward, KL, answer length and entropy."""
    cfg = lm_config("rl", tuning)
    cfg.train.rl_algorithm = algorithm
    result = train(cfg)
    start = result.metrics["baseline"]["before_training"]
    assert result.eval["reward"] > start["reward"] + 0.3, (start, result.eval)
    steps = [h for h in _history(result.run_dir) if "loss" in h]
    for h in steps:
        assert {"reward", "kl", "response_length", "entropy"} <= set(h) and 0 < h["entropy"] < math.log(600)
        assert 0 < h["response_length"] <= 16
    assert any(h["kl"] != 0 for h in steps[1:])  # the policy moved away from the reference


def test_rl_resume_after_crash_equals_uninterrupted(lm_config, tmp_path):
    """Sampling draws from the run's random state, which checkpoints keep: a resumed run samples, and so learns,
    what the uninterrupted one did, bit for bit on the CPU."""
    cfg = lm_config("rl", "full")
    cfg.train.checkpoint_every, cfg.train.epochs = 3, 2
    straight, resumed = crash_and_resume(cfg, tmp_path, crash_at=5)
    assert same_weights(straight, resumed)
    assert [h.get("reward") for h in _history(straight.run_dir)] == [h.get("reward") for h in
                                                                     _history(resumed.run_dir)]


def test_rewards_from_a_reward_run_are_its_scores(lm_config, tmp_path):
    """train.reward naming a reward run: an eval prompt's reward is that run's score of the greedy answer
    (`tunelab score`'s); prompts one at a time, as `complete` answers them (batched, left-padded prompts can
    break a tiny random model's near-ties differently)."""
    from tunelab import generate as gen
    from tunelab.predict import load_run, score_records
    from tunelab.tasks.base import predict_outputs

    reward_run = train(lm_config("reward", "full")).run_dir
    cfg = lm_config("rl", "lora")
    cfg.train.reward, cfg.train.epochs = str(reward_run), 1
    result = train(cfg)
    assert all(math.isfinite(h["reward"]) for h in _history(result.run_dir) if "loss" in h)
    _, task, model, tokenizer, space = load_run(result.run_dir)
    items = task.encode(tokenizer, task.read(cfg.data.eval, cfg.data), space, cfg.data.max_length)
    got = [float(predict_outputs(task, model, [it], tokenizer.pad_token_id, "cpu")[0][0]) for it in items]
    answers = [gen.complete(model, tokenizer, it["_prompt"], max_new_tokens=16).text for it in items]
    scores = score_records(load_run(reward_run), [{"prompt": it["_prompt"], "response": a}
                                                  for it, a in zip(items, answers)])
    assert got == pytest.approx(scores, abs=1e-4) and len(set(scores)) > 1


@pytest.mark.parametrize("reward,message", [
    ("", "rl needs a reward"),
    ("rewards:nothing_here", "cannot load the reward function 'rewards:nothing_here'"),
    ("no/such/file.py:fn", "cannot load the reward function"),
    ("not a spec", "is neither a run folder nor module:function"),
    ("rewards:broken", "the reward function rewards:broken raised ValueError: no reward for short"),
    ("rewards:infinite", "returned inf (a finite number is needed)"),
])
def test_a_bad_reward_is_refused_with_one_line(reward, message, lm_config, tmp_path, capsys):
    from tunelab.cli import main

    cfg = lm_config("rl", "full")
    assert main(["train", "--task", "rl", "--model", cfg.model.name, "--train", cfg.data.train, "--eval",
                 cfg.data.eval, "--train.reward", reward, "--train.rl_max_new_tokens", "4", "--epochs", "1",
                 "--output", str(tmp_path / "run"), "--train.progress", "false"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_data_check_reads_rl_prompts(lm_config, capsys):
    """`tunelab data check --task rl`: prompts are read as their messages; duplicates are found, no crash."""
    from tunelab.cli import main

    cfg = lm_config("rl")
    rc = main(["data", "check", cfg.data.train, "--task", "rl", "--no-label-errors"])
    out = capsys.readouterr().out
    assert rc in (0, 1) and "exact-duplicate" in out and "say something about the" in out
