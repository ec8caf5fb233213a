"""Preference stages: DPO and a reward model, on a prompt with a chosen and a rejected response.

- dpo: Direct Preference Optimization (Rafailov et al., 2023): -log σ(β[(log π(y_w) - log π_ref(y_w)) -
  (log π(y_l) - log π_ref(y_l))]). The reference is the starting model, frozen: its log-probabilities are
  computed once before training (with LoRA that is the adapter-free base model), so it costs no memory after.
- reward: the first half of RLHF (Ouyang et al., 2022): a scalar head on the last token, trained with the
  Bradley–Terry loss -log σ(r(chosen) - r(rejected)).

One example is one pair; rewards are computed per pair, so bootstrap intervals resample pairs.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tunelab import losses, speed
from tunelab.config import DataConfig
from tunelab.data.batching import collate
from tunelab.data.chat import IGNORE, content, fit_length, parse_messages, read_records, render, report_overlong
from tunelab.data.load import Example, Problems
from tunelab.errors import UserError
from tunelab.tasks.base import Space, Task, predict_outputs


def _prompt(value, path: Path, line: int) -> list[dict]:
    """A prompt: chat messages, or a text (one user message)."""
    if isinstance(value, list):
        return parse_messages(value, path, line, need_assistant=False)
    return [{"role": "user", "content": content(value, path, line, "'prompt'")}]


def _response(value, path: Path, line: int, key: str) -> str:
    """A response: a string, or (OpenAI DPO format) a list holding one assistant message."""
    if isinstance(value, list):
        msgs = parse_messages(value, path, line, need_assistant=False)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise UserError(f"'{key}' must hold exactly one assistant message", str(path), line)
        return msgs[0]["content"]
    return content(value, path, line, f"'{key}'")


class Preference(Task):
    """A prompt with a chosen and a rejected response; one example is one pair."""

    tunings = ("full", "lora", "qlora")
    judged_by_start = True
    default_layer_decay = 1.0
    eval_batch_size = 4  # pairs: 8 sequences

    def read(self, path, cfg: DataConfig, need_label: bool = True, problems: Problems | None = None) -> list[Example]:
        return read_records(path, cfg, self.parse, problems)

    @staticmethod
    def parse(rec: dict, path: Path, line: int) -> dict:
        """`{"prompt", "chosen", "rejected"}` (prompt: text or messages) or OpenAI's DPO format
        `{"input": {"messages"}, "preferred_output", "non_preferred_output"}`."""
        if "input" in rec:
            inp = rec["input"]
            if not isinstance(inp, dict) or "messages" not in inp:
                raise UserError("'input' must be an object with 'messages'", str(path), line, "wrong-type")
            prompt = parse_messages(inp["messages"], path, line, need_assistant=False)
            keys = ("preferred_output", "non_preferred_output")
        elif "prompt" in rec:
            prompt = _prompt(rec["prompt"], path, line)
            keys = ("chosen", "rejected")
        else:
            raise UserError("expected 'prompt', 'chosen', 'rejected' or the OpenAI DPO format "
                            "('input', 'preferred_output', 'non_preferred_output')", str(path), line)
        for k in keys:
            if k not in rec:
                raise UserError(f"missing '{k}'", str(path), line)
        chosen, rejected = (_response(rec[k], path, line, k) for k in keys)
        if chosen.strip() == rejected.strip():
            raise UserError("chosen and rejected responses are identical: the pair says nothing", str(path), line,
                            "identical-responses")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    def encode(self, tokenizer, examples: list[Example], space: Space, max_length: int) -> list[dict]:
        items, long = [], 0
        for e in examples:
            pair, too_long = [], False
            for key in ("chosen", "rejected"):
                messages = e.label["prompt"] + [{"role": "assistant", "content": e.label[key]}]
                ids, labels = render(tokenizer, messages, [len(messages) - 1])
                too_long |= len(ids) > max_length
                pair.append(fit_length(ids, labels, max_length, space.overlong))
            long += too_long
            if all(pair):
                (c_ids, c_labels), (r_ids, r_labels) = pair
                items.append({"input_ids": c_ids, "labels": c_labels, "rejected_input_ids": r_ids,
                              "rejected_labels": r_labels, "_gold": 1})
        report_overlong(len(items), len(examples), long, max_length, space.overlong, "pairs")
        if not items:
            raise UserError(f"no preference pair fits within max_length {max_length}", "--max-length")
        return items

    def collate(self, items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        """Chosen rows then rejected rows, padded to one length; `ref` holds the reference log-probabilities."""
        seqs = [it["input_ids"] for it in items] + [it["rejected_input_ids"] for it in items]
        labels = [it["labels"] for it in items] + [it["rejected_labels"] for it in items]
        longest = max(len(s) for s in seqs)
        batch = {"input_ids": torch.tensor([s + [pad_id] * (longest - len(s)) for s in seqs]),
                 "attention_mask": torch.tensor([[1] * len(s) + [0] * (longest - len(s)) for s in seqs]),
                 "labels": torch.tensor([lab + [IGNORE] * (longest - len(lab)) for lab in labels])}
        if "_ref" in items[0]:
            batch["ref"] = torch.tensor([it["_ref"] for it in items], dtype=torch.float32)
        return batch

    def pair_scores(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) scores of each pair: log-probabilities (dpo) or rewards (reward model)."""
        raise NotImplementedError

    def outputs(self, model: nn.Module, batch: dict, lengths: list[int]) -> list[torch.Tensor]:
        batch.pop("ref", None)
        chosen, rejected = self.pair_scores(model, batch)
        return list(torch.stack([chosen, rejected], 1).float().cpu())

    def rewards(self, outputs: list[torch.Tensor], items: list[dict], space: Space) -> list[tuple[float, float]]:
        return [tuple(o.tolist()) for o in outputs]

    def decode(self, outputs: list[torch.Tensor], items: list[dict], space: Space) -> list:
        return self.rewards(outputs, items, space)  # (chosen reward, rejected reward) per pair

    def baseline(self, train_golds: list, golds: list, space: Space) -> tuple[str, list]:
        return "coin_flip", [(0.0, 0.0)] * len(golds)


def _pair_metrics(preds: list, prefix: str) -> dict[str, float]:
    n = max(len(preds), 1)
    margins = [c - r for c, r in preds]
    return {"loss": sum(-F.logsigmoid(torch.tensor(m)).item() for m in margins) / n,
            f"{prefix}accuracy": sum(m > 0 for m in margins) / n,
            f"{prefix}margin": sum(margins) / n}


class DPO(Preference):
    name = "dpo"
    uses_reference = True
    metrics = ("loss", "reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected")
    model_class = "AutoModelForCausalLM"

    loss_from_hidden = True  # its log-probabilities come from the hidden states in chunks (speed.causal_lm_logps)

    def pair_scores(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch.pop("labels")
        return speed.causal_lm_logps(model, batch, labels, self.chunked).chunk(2)

    def prepare_items(self, model: nn.Module, items: list[dict], pad_id: int, device) -> None:
        """The frozen reference: the starting model's log-probabilities of every response, computed once."""
        for it, out in zip(items, predict_outputs(self, model, items, pad_id, device)):
            it["_ref"] = out.tolist()

    def forward(self, model: nn.Module, batch: dict, space: Space) -> tuple[torch.Tensor, dict[str, float]]:
        ref = batch.pop("ref")
        chosen, rejected = self.pair_scores(model, batch)
        r_chosen, r_rejected = losses.dpo_rewards(chosen, rejected, ref[:, 0], ref[:, 1], space.beta)
        loss = losses.bradley_terry(r_chosen, r_rejected)
        return loss, {"correct": float((r_chosen > r_rejected).sum()), "chosen": float(r_chosen.detach().sum()),
                      "rejected": float(r_rejected.detach().sum())}

    def train_log(self, sums: dict[str, float], units: int) -> dict[str, float]:
        n = max(units, 1)
        return {"reward_accuracy": sums["correct"] / n, "reward_chosen": sums["chosen"] / n,
                "reward_rejected": sums["rejected"] / n}

    def rewards(self, outputs: list[torch.Tensor], items: list[dict], space: Space) -> list[tuple[float, float]]:
        """β times the log-ratio of policy to reference, for the chosen and the rejected response."""
        return [(space.beta * (float(o[0]) - it["_ref"][0]), space.beta * (float(o[1]) - it["_ref"][1]))
                for o, it in zip(outputs, items)]

    def score(self, preds: list, golds: list, space: Space) -> dict[str, float]:
        n = max(len(preds), 1)
        return {**_pair_metrics(preds, "reward_"), "reward_chosen": sum(c for c, _ in preds) / n,
                "reward_rejected": sum(r for _, r in preds) / n}

    def predict_row(self, example: Example, pred, output: torch.Tensor, space: Space) -> dict:
        raise UserError("a dpo run is a chat model; use `tunelab generate RUN --prompt ...`")


class RewardModel(Preference):
    name = "reward"
    metrics = ("pairwise_accuracy", "loss", "pairwise_margin")
    model_class = "AutoModelForSequenceClassification"

    def model_kwargs(self, space: Space) -> dict:
        return {"num_labels": 1}

    def pair_scores(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        batch.pop("labels", None)
        return model(**batch).logits.float().squeeze(-1).chunk(2)

    def forward(self, model: nn.Module, batch: dict, space: Space) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = self.pair_scores(model, batch)
        return losses.bradley_terry(chosen, rejected), {"correct": float((chosen > rejected).sum())}

    def train_log(self, sums: dict[str, float], units: int) -> dict[str, float]:
        return {"pairwise_accuracy": sums["correct"] / max(units, 1)}

    def score(self, preds: list, golds: list, space: Space) -> dict[str, float]:
        return _pair_metrics(preds, "pairwise_")

    def predict_row(self, example: Example, pred, output: torch.Tensor, space: Space) -> dict:
        raise UserError("a reward run scores responses: tunelab score RUN --input pairs.jsonl")

    @staticmethod
    def parse_scored(rec: dict, path: Path, line: int) -> dict:
        """`{"prompt", "response"}` to score (prompt: a text or messages; response: a text or one assistant
        message)."""
        if not isinstance(rec, dict) or "prompt" not in rec or "response" not in rec:
            raise UserError("expected 'prompt' and 'response'", str(path), line)
        return {"prompt": _prompt(rec["prompt"], path, line),
                "response": _response(rec["response"], path, line, "response")}

    def score_responses(self, model: nn.Module, tokenizer, records: list[dict], max_length: int, device,
                        batch_size: int = 8) -> list[float]:
        """The reward of each parsed {"prompt", "response"}: rendered with the chat template as training rendered
        a chosen or rejected response, cut to max_length as training cut it, scored at the last token."""
        rows = []
        for r in records:
            messages = r["prompt"] + [{"role": "assistant", "content": r["response"]}]
            ids = render(tokenizer, messages, [len(messages) - 1])[0][:max_length]
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
        scores: list[float] = []
        model.eval()
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch = {k: v.to(device) for k, v in collate(rows[start:start + batch_size],
                                                             tokenizer.pad_token_id or 0).items()}
                scores += model(**batch).logits.float().squeeze(-1).tolist()
        return scores


def reward_scorer(run_dir: str, device: str, flag: str):
    """`score(prompts, responses) -> rewards` of a reward run on `device`, as `tunelab score` scores them: for
    best-of-n (`--reward`) and rl (`train.reward`, named by `flag` in the refusal of any other kind of run)."""
    from tunelab.tasks.runs import load_run

    cfg, task, model, tokenizer, _ = load_run(run_dir)
    if task.name != "reward":
        raise UserError(f"a {task.name} run: {flag} takes a reward run (--task reward)", str(run_dir))
    model.to(device)
    return lambda prompts, responses: task.score_responses(
        model, tokenizer, [{"prompt": p, "response": r} for p, r in zip(prompts, responses)], cfg.data.max_length,
        device)
