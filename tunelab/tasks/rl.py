"""Reinforcement learning from a reward (`--task rl`): the policy samples answers to the training prompts and
learns from how a reward scores them, held near the model it started from.

Each step takes a batch of prompts and, for each, draws `train.rl_samples` (k) answers from the current policy
(on-policy sampling at `train.rl_temperature`, seeded by the run's random state, so a resumed run draws what the
uninterrupted one drew). The reward of an answer comes from `train.reward`: a reward run (`--task reward`; its
score of the prompt and answer, as `tunelab score` gives it) or a Python function `module:function` (or
`path/to/file.py:function`) called as `function(prompt_messages, answer_text, record)` -> float, for verifiable
rewards (exact match, format, length). Then one policy-gradient update, by `train.rl_algorithm`:

- rloo (REINFORCE Leave-One-Out; Ahmadian et al. 2024, "Back to Basics"): the KL penalty enters the reward,
  r'_i = r_i - beta * sum_t (log pi(y_t) - log pi_ref(y_t)); each answer's advantage is its r' minus the mean r'
  of the other k-1 answers to the same prompt; the loss is -A_i * sum_t log pi(y_t), the whole answer one action.
- grpo (Group Relative Policy Optimization; Shao et al. 2024, DeepSeekMath): A_i = (r_i - mean r) / (std r +
  1e-4) over the prompt's k answers (std with Bessel's correction); per token, -A_i * pi/pi_detached (one update
  per sample: the ratio is 1, its gradient the policy gradient) plus beta times the unbiased estimator
  k3 = pi_ref/pi - log(pi_ref/pi) - 1 of KL(pi || pi_ref) (Schulman 2020), averaged over the answer's tokens.

beta is `train.kl_coef`. The reference pi_ref is the starting model: with lora the base without its adapters,
with full a frozen copy. Logged per step: mean reward, KL (per answer, summed over its tokens), answer length and
the policy's entropy per answer token. Held out: the mean reward of each eval prompt's greedy answer, with a
bootstrap interval, beside the starting model's (`before_training`).
"""
from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.config import DataConfig
from tunelab.data.chat import read_records
from tunelab.data.load import Example, Problems
from tunelab.errors import UserError
from tunelab.tasks.base import Space, Task
from tunelab.tasks.preference import _prompt, reward_scorer

GRPO_EPS = 1e-4


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """[prompts, k] rewards (KL already taken out) -> each minus the mean of the other k-1 of its prompt."""
    k = rewards.shape[1]
    if k < 2:
        raise UserError("rloo needs at least 2 answers per prompt for its baseline", "train.rl_samples")
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (k - 1)


def grpo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """[prompts, k] rewards -> normalised within each prompt's group: (r - mean) / (std + 1e-4)."""
    return (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + GRPO_EPS)


def kl_k3(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per token, the non-negative unbiased estimator of KL(pi || pi_ref) from a sample of pi."""
    return torch.exp(ref - logp) - (ref - logp) - 1


def policy_loss(algorithm: str, logp: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
                beta: float) -> torch.Tensor:
    """Per answer [prompts * k], the loss of one update. logp, ref, mask: [prompts * k, answer tokens]; rewards:
    [prompts, k]."""
    k = rewards.shape[1]
    if algorithm == "rloo":
        kl = ((logp - ref) * mask).sum(1).detach()
        advantages = rloo_advantages(rewards - beta * kl.view(-1, k)).flatten()
        return -advantages * (logp * mask).sum(1)
    advantages = grpo_advantages(rewards).flatten()
    per_token = -advantages[:, None] * torch.exp(logp - logp.detach()) + beta * kl_k3(logp, ref)
    return (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)


@functools.lru_cache(maxsize=4)
def reward_source(spec: str, device: str):
    """`score(prompts, texts, records) -> list[float]` for train.reward: a reward run folder, or module:function."""
    if not spec:
        raise UserError("rl needs a reward: train.reward names a reward run or a Python function module:function",
                        "train.reward")
    if (Path(spec) / "config.yaml").is_file():
        score_run = reward_scorer(spec, device, "train.reward")
        return lambda prompts, texts, records: score_run(prompts, texts)
    module, _, name = spec.rpartition(":")
    if not module or not name:
        raise UserError(f"{spec!r} is neither a run folder nor module:function", "train.reward")
    try:
        if module.endswith(".py"):
            found = importlib.util.spec_from_file_location(Path(module).stem, module)
            if found is None or not Path(module).is_file():
                raise ImportError(f"no file {module}")
            mod = importlib.util.module_from_spec(found)
            found.loader.exec_module(mod)
        else:
            if os.getcwd() not in sys.path:  # a module beside the user, as `python -m` would find it
                sys.path.append(os.getcwd())
            mod = importlib.import_module(module)
        fn = getattr(mod, name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot load the reward function {spec!r}: {e}", "train.reward") from None

    def score(prompts, texts, records):
        out = []
        for p, t, r in zip(prompts, texts, records):
            try:
                value = float(fn(p, t, r))
            except Exception as e:  # the user's code: its failure is reported as theirs, not as a crash of ours
                raise UserError(f"the reward function {spec} raised {type(e).__name__}: {e}", "train.reward") from None
            if not math.isfinite(value):
                raise UserError(f"the reward function {spec} returned {value} (a finite number is needed)",
                                "train.reward")
            out.append(value)
        return out
    return score


class Reinforce(Task):
    name = "rl"
    label_key = "prompt"
    metrics = ("reward", "response_length")
    lower_is_better = frozenset()
    model_class = "AutoModelForCausalLM"
    tunings = ("full", "lora")
    judged_by_start = True
    default_layer_decay = 1.0
    eval_batch_size = 8

    def __init__(self):
        self.reference = None  # the frozen starting model (full); lora's is its base with the adapters off
        self.settings = self.tokenizer = None  # the run's train config and tokenizer, set by `bind`
        self._rows: list[dict] = []  # the items of the batch `collate` made last (prompts and records for rewards)

    def bind(self, cfg, tokenizer) -> None:
        self.settings, self.tokenizer, self.reference = cfg.train, tokenizer, None

    def read(self, path, cfg: DataConfig, need_label: bool = True, problems: Problems | None = None) -> list[Example]:
        return read_records(path, cfg, self.parse, problems)

    @staticmethod
    def parse(rec: dict, path: Path, line: int) -> dict:
        """`{"prompt": text or messages, ...}`: the other keys travel to a reward function as its record."""
        if not isinstance(rec, dict) or "prompt" not in rec:
            raise UserError("expected 'prompt' (a text or chat messages)", str(path), line)
        return {"prompt": _prompt(rec["prompt"], path, line), "record": rec}

    def encode(self, tokenizer, examples: list[Example], space: Space, max_length: int) -> list[dict]:
        from tunelab.generate import encode

        items = []
        for e in examples:
            ids = encode(tokenizer, e.label["prompt"])
            if len(ids) >= max_length:
                raise UserError(f"a prompt of {len(ids)} tokens leaves no room for an answer within max_length "
                                f"{max_length}", e.where)
            items.append({"input_ids": ids, "attention_mask": [1] * len(ids), "_prompt": e.label["prompt"],
                          "_record": e.label["record"], "_gold": 0})
        return items

    def units(self, item: dict) -> int:
        return self.settings.rl_samples

    def collate(self, items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        """Prompts left-padded (generation continues each at the right edge); the items kept for their rewards."""
        self._rows = items
        longest = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        for i, it in enumerate(items):
            ids[i, longest - len(it["input_ids"]):] = torch.tensor(it["input_ids"])
            mask[i, longest - len(it["input_ids"]):] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def prepare_items(self, model: nn.Module, items: list[dict], pad_id: int, device) -> None:
        """While training (the pipeline prepares every task's items): the starting model kept as the KL reference,
        a frozen copy for full (lora's is its base with the adapters off). Evaluating needs none."""
        if self.reference is None and not hasattr(model, "disable_adapter"):
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)

    def _sample(self, policy: nn.Module, batch: dict, k: int, temperature: float):
        """k answers per prompt: (sequences, prompt length, answer mask incl. the stop token)."""
        from tunelab.generate import stop_ids

        t = self.settings
        stops = stop_ids(policy, self.tokenizer)
        ids, mask = batch["input_ids"].repeat_interleave(k, 0), batch["attention_mask"].repeat_interleave(k, 0)
        mode = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else \
            dict(do_sample=False, temperature=1.0, top_p=1.0, top_k=50)
        was_training = policy.training
        policy.eval()
        with torch.no_grad():
            out = policy.generate(input_ids=ids, attention_mask=mask, max_new_tokens=t.rl_max_new_tokens,
                                  eos_token_id=stops, pad_token_id=self.tokenizer.pad_token_id
                                  if self.tokenizer.pad_token_id is not None else stops[0], **mode)
        policy.train(was_training)
        answer = out[:, ids.shape[1]:]
        is_stop = torch.isin(answer, torch.tensor(stops, device=answer.device))
        after_stop = (is_stop.cumsum(1) - is_stop.long()) > 0  # tokens after the first stop token
        return out, ids.shape[1], (~after_stop).long() * (answer.shape[1] > 0), mask

    def _rewards(self, answer: torch.Tensor, answer_mask: torch.Tensor, k: int) -> torch.Tensor:
        from tunelab.generate import answer_text

        t = self.settings
        texts = [answer_text(self.tokenizer, a[m.bool()].tolist()) for a, m in zip(answer, answer_mask)]
        rows = [r for r in self._rows for _ in range(k)]
        score = reward_source(t.reward, str(answer.device))
        return torch.tensor(score([r["_prompt"] for r in rows], texts, [r["_record"] for r in rows]),
                            dtype=torch.float32, device=answer.device)

    @staticmethod
    def _logps(model: nn.Module, sequences: torch.Tensor, mask: torch.Tensor, start: int):
        """Per answer token: log-probability under `model` and the distribution's entropy. Positions count from
        each row's first real token, as generation counted them (the prompts are left-padded). Only the answer's
        positions get logits (transformers' logits_to_keep, where the model takes it). The memory of a step is
        mostly the activations of batch_size x rl_samples whole sequences (SmolLM2, 8 x 4 of ~190 tokens: 9.4 GB of a 17 GB peak);
        micro-batches (--batch-size with train.grad_accum) keep each prompt's answers together and cut it."""
        inputs = dict(input_ids=sequences, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
        keep = sequences.shape[1] - start + 1
        try:
            logits = model(**inputs, logits_to_keep=keep).logits
        except TypeError:  # a model without logits_to_keep: every position's logits
            logits = model(**inputs).logits
        logits = logits[:, -keep:-1].float()
        logp_all = F.log_softmax(logits, -1)
        logp = logp_all.gather(-1, sequences[:, start:, None]).squeeze(-1)
        with torch.no_grad():  # logged only: no graph over the vocabulary for it
            entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logp, entropy

    def forward(self, model: nn.Module, batch: dict, space: Space) -> tuple[torch.Tensor, dict[str, float]]:
        t = self.settings
        k = t.rl_samples
        policy = getattr(model, "module", model)
        sequences, start, answer_mask, prompt_mask = self._sample(policy, batch, k, t.rl_temperature)
        answer = sequences[:, start:]
        full_mask = torch.cat([prompt_mask, answer_mask], 1)
        rewards = self._rewards(answer, answer_mask, k)
        logp, entropy = self._logps(model, sequences, full_mask, start)
        with torch.no_grad():
            if self.reference is not None:
                ref, _ = self._logps(self.reference, sequences, full_mask, start)
            else:
                with policy.disable_adapter():
                    ref, _ = self._logps(policy, sequences, full_mask, start)
        m = answer_mask.float()
        loss = policy_loss(t.rl_algorithm, logp, ref, m, rewards.view(-1, k), t.kl_coef)
        tokens = m.sum(1)
        return loss.sum(), {"reward": float(rewards.sum()), "kl": float(((logp - ref).detach() * m).sum()),
                            "response_length": float(tokens.sum()),
                            "entropy": float((entropy.detach() * m).sum() / tokens.clamp(min=1).sum() * len(m))}

    def train_log(self, sums: dict[str, float], units: int) -> dict[str, float]:
        n = max(units, 1)
        return {k: sums[k] / n for k in ("reward", "kl", "response_length", "entropy")}

    def outputs(self, model: nn.Module, batch: dict, lengths: list[int]) -> list[torch.Tensor]:
        """Per eval prompt: (reward of its greedy answer, answer length)."""
        sequences, start, answer_mask, _ = self._sample(getattr(model, "module", model), batch, 1, 0.0)
        rewards = self._rewards(sequences[:, start:], answer_mask, 1)
        return list(torch.stack([rewards, answer_mask.sum(1).float()], 1).cpu())

    def decode(self, outputs: list[torch.Tensor], items: list[dict], space: Space) -> list:
        return [tuple(o.tolist()) for o in outputs]

    def score(self, preds: list, golds: list, space: Space) -> dict[str, float]:
        n = max(len(preds), 1)
        return {"reward": sum(p[0] for p in preds) / n, "response_length": sum(p[1] for p in preds) / n}

    def eval_loss(self, outputs: list[torch.Tensor], items: list[dict], space: Space) -> float:
        """There is no held-out loss to learn from: the reported `loss` is minus the mean reward."""
        return -sum(float(o[0]) for o in outputs) / max(len(outputs), 1)

    def predict_row(self, example: Example, pred, output: torch.Tensor, space: Space) -> dict:
        raise UserError("an rl run is a chat model; use `tunelab generate RUN --prompt ...`")
