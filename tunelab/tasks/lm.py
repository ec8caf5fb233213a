"""Language-model stages: continued pre-training (causal and masked), chat SFT, DPO and a reward model.

Every stage runs through the same loop, methods and run folders as the classifiers; what differs is here:
how records read and render, which tokens carry a loss, and how a batch turns into a loss.

- clm: next-token prediction on plain text, documents packed (eos between them) into max_length blocks.
- mlm: masked-token prediction (BERT): 15% of the tokens chosen, 80% of those become [MASK], 10% a random
  token, 10% stay; masks are drawn once per example from the seed (static masking, as in the original BERT).
- chat: supervised fine-tuning on conversations rendered with the tokenizer's own chat template; only assistant
  tokens (with weight 1), including the end-of-turn token that teaches the model to stop, carry the loss.
- dpo: Direct Preference Optimization (Rafailov et al., 2023): -log σ(β[(log π(y_w) - log π_ref(y_w)) -
  (log π(y_l) - log π_ref(y_l))]). The reference is the starting model, frozen: its log-probabilities are
  computed once before training (with LoRA that is the adapter-free base model), so it costs no memory after.
- reward: the first half of RLHF (Ouyang et al., 2022): a scalar head on the last token, trained with the
  Bradley–Terry loss -log σ(r(chosen) - r(rejected)).

Perplexity, token accuracy and rewards are computed per example and aggregated in `score`, so the bootstrap
intervals resample examples (conversations, blocks, pairs) like every other task.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.config import DataConfig, ModelConfig
from tunelab.data.load import Example, json_records, read_examples
from tunelab.errors import UserError
from tunelab.tasks.base import Space, Task

IGNORE = -100
ROLES = ("system", "user", "assistant")


def _warn(message: str) -> None:
    print(f"tunelab: warning: {message}", file=sys.stderr)


def _token_stats(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> tuple[torch.Tensor, ...]:
    """Per-row (summed loss, labelled tokens, correct argmax tokens); with `shift`, token t predicts t + 1."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE
    loss = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none") * mask
    correct = (logits.argmax(-1) == labels) & mask
    return loss.sum(1), mask.sum(1), correct.sum(1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's labelled tokens (next-token: logits at t score the token at t + 1)."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE
    logps = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logps * mask).sum(1)


# --- reading and rendering conversations ---------------------------------------------------------------------

def _content(value, path: Path, line: int, what: str) -> str:
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        value = "".join(str(p.get("text", "")) for p in value)
    if not isinstance(value, str):
        raise UserError(f"{what}: 'content' must be a string", str(path), line)
    if not value.strip():
        raise UserError(f"{what}: empty content", str(path), line)
    return value


def parse_messages(value, path: Path, line: int, need_assistant: bool = True) -> list[dict]:
    """OpenAI chat messages, checked: known roles, non-empty content, `weight` 0/1 on assistant messages only."""
    if not isinstance(value, list) or not value:
        raise UserError("'messages' must be a non-empty list of {role, content} objects", str(path), line)
    out = []
    for n, m in enumerate(value, 1):
        what = f"message {n}"
        if not isinstance(m, dict):
            raise UserError(f"{what} is not an object", str(path), line)
        role = m.get("role")
        role = "system" if role == "developer" else role
        if role not in ROLES:
            raise UserError(f"{what}: unknown role {role!r} (use system, user or assistant)", str(path), line)
        if "content" not in m or m["content"] is None:
            raise UserError(f"{what}: missing content", str(path), line)
        msg = {"role": role, "content": _content(m["content"], path, line, what)}
        if "weight" in m:
            if role != "assistant" or m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                raise UserError(f"{what}: 'weight' must be 0 or 1 and only on assistant messages", str(path), line)
            msg["weight"] = int(m["weight"])
        out.append(msg)
    if need_assistant and not any(m["role"] == "assistant" and m.get("weight", 1) for m in out):
        raise UserError("no assistant message to learn from (every conversation needs one with weight 1)",
                        str(path), line)
    return out


def _read_records(path: str | Path, cfg: DataConfig, parse) -> list[Example]:
    """Examples from a JSONL file, one per record; with data.skip_invalid, bad records are counted and skipped."""
    p = Path(path)
    if not p.is_file():
        raise UserError("file not found", str(p))
    if p.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
        raise UserError("this task reads JSONL (one JSON object per line)", str(p))
    rows, skipped = [], []
    for i, rec in json_records(p):
        try:
            rows.append(Example("", parse(rec, p, i), where=f"{p}:{i}"))
        except UserError as e:
            if not cfg.skip_invalid:
                raise
            skipped.append(e)
    if skipped:
        _warn(f"{p}: skipped {len(skipped)} invalid records (data.skip_invalid); first: {skipped[0]}")
    if not rows:
        raise UserError("no usable records found", str(p))
    return rows


def _apply(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=generation_prompt)


def render(tokenizer, messages: list[dict], trained: list[int]) -> tuple[list[int], list[int]]:
    """(token ids, labels) of a conversation: labels hold the ids of the messages in `trained` (assistant turns)
    from their first token through the end-of-turn token, and IGNORE everywhere else.

    The template renders each prefix of the conversation; the text between "everything before, plus the
    assistant header" and "everything through this message" is the message and its end-of-turn marker.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the model's tokenizer has no chat template, which chat, dpo and reward data are rendered "
                        "with; use an instruct model (e.g. smollm2) or a folder whose tokenizer has one", "--model")
    full = _apply(tokenizer, messages)
    spans = []
    for i in trained:
        before, through = _apply(tokenizer, messages[:i], True), _apply(tokenizer, messages[:i + 1])
        if not (full.startswith(through) and through.startswith(before)):
            raise UserError("the chat template does not render a conversation prefix by prefix, so the assistant "
                            "tokens cannot be located", "--model")
        spans.append((len(before), len(through.rstrip())))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    labels = [t if any(a <= start < b for a, b in spans) else IGNORE
              for t, (start, _) in zip(enc["input_ids"], enc["offset_mapping"])]
    return list(enc["input_ids"]), labels


def _fit(ids: list[int], labels: list[int], max_length: int, overlong: str) -> tuple[list[int], list[int]] | None:
    """Apply the overlong policy: None when the example must go (dropped, or nothing trainable left)."""
    if len(ids) > max_length:
        if overlong == "drop":
            return None
        ids, labels = ids[:max_length], labels[:max_length]
    return (ids, labels) if any(t != IGNORE for t in labels[1:]) else None


def _report_overlong(kept: int, total: int, long: int, max_length: int, overlong: str, what: str) -> None:
    if long:
        verb = "dropped" if overlong == "drop" else "truncated"
        _warn(f"{long} of {total} {what} are longer than max_length {max_length} tokens and were {verb} "
              f"(data.overlong); {kept} used")


# --- token-level language modelling: clm, mlm, chat ----------------------------------------------------------

class LanguageModeling(Task):
    """Shared by clm, mlm and chat: a loss per labelled token; perplexity and token accuracy per example."""

    label_key = "text"
    metrics = ("loss", "perplexity", "mean_token_accuracy")
    lower_is_better = frozenset({"loss", "perplexity"})
    model_class = "AutoModelForCausalLM"
    tunings = ("full", "lora")
    judged_by_start = True
    default_layer_decay = 1.0
    shift = True  # causal: the logits at position t score token t + 1

    def read(self, path, cfg: DataConfig, need_label: bool = True) -> list[Example]:
        return read_examples(path, cfg, need_label=False, folders=False)

    def units(self, item: dict) -> int:
        labels = item["labels"][1:] if self.shift else item["labels"]
        return sum(t != IGNORE for t in labels)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _token_stats(logits, labels, self.shift)[0].sum()

    def forward(self, model: nn.Module, batch: dict, space: Space) -> tuple[torch.Tensor, dict[str, float]]:
        labels = batch.pop("labels")
        loss, tokens, correct = _token_stats(model(**batch).logits.float(), labels, self.shift)
        return loss.sum(), {"correct": float(correct.sum()), "tokens": float(tokens.sum())}

    def train_log(self, sums: dict[str, float], units: int) -> dict[str, float]:
        return {"mean_token_accuracy": sums["correct"] / max(sums["tokens"], 1)}

    def outputs(self, model: nn.Module, batch: dict, lengths: list[int]) -> list[torch.Tensor]:
        labels = batch.pop("labels")
        stats = torch.stack(_token_stats(model(**batch).logits.float(), labels, self.shift), 1).float().cpu()
        return list(stats)

    def eval_loss(self, outputs: list[torch.Tensor], items: list[dict], space: Space) -> float:
        return self.score([tuple(o.tolist()) for o in outputs], [], space)["loss"]

    def decode(self, outputs: list[torch.Tensor], items: list[dict], space: Space) -> list:
        return [tuple(o.tolist()) for o in outputs]  # (summed loss, tokens, correct tokens) per example

    def score(self, preds: list, golds: list, space: Space) -> dict[str, float]:
        loss, tokens, correct = (sum(p[k] for p in preds) for k in range(3))
        mean = loss / max(tokens, 1)
        return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "mean_token_accuracy": correct / max(tokens, 1)}

    def summary(self, history: list[dict], final: dict) -> dict:
        """The figures under the names the OpenAI fine-tuning API uses: training ones are the mean over the
        last epoch's steps, validation ones are on the whole eval set after training."""
        steps = [h for h in history if "loss" in h]
        last = [h for h in steps if h["epoch"] > math.ceil(steps[-1]["epoch"]) - 1] if steps else []
        mean = (lambda key: sum(h[key] for h in last) / len(last)) if last else (lambda key: None)
        return {"train_loss": mean("loss"), "train_mean_token_accuracy": mean("mean_token_accuracy"),
                "valid_loss": final["loss"], "valid_mean_token_accuracy": final["mean_token_accuracy"]}

    def predict_row(self, example: Example, pred, output: torch.Tensor, space: Space) -> dict:
        raise UserError("a language model does not predict labels; use `tunelab generate RUN --prompt ...`")


class CausalLM(LanguageModeling):
    name = "clm"
    tunings = ("scratch", "full", "lora")

    def encode(self, tokenizer, examples: list[Example], space: Space, max_length: int) -> list[dict]:
        """Pack: tokenize every document, end each with eos, concatenate, cut into max_length blocks."""
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        stream: list[int] = []
        for e in examples:
            ids = tokenizer(e.text, add_special_tokens=True)["input_ids"]
            stream += ids + ([eos] if eos is not None and (not ids or ids[-1] != eos) else [])
        blocks = [stream[i:i + max_length] for i in range(0, len(stream), max_length)]
        return [{"input_ids": b, "attention_mask": [1] * len(b), "labels": list(b), "_gold": 0}
                for b in blocks if len(b) > 1]


class MaskedLM(LanguageModeling):
    name = "mlm"
    model_class = "AutoModelForMaskedLM"
    tunings = ("scratch", "full", "lora")
    shift = False

    def build(self, cfg: ModelConfig, folder: Path, space: Space, pretrained: bool) -> nn.Module:
        model = super().build(cfg, folder, space, pretrained)
        out = model.get_output_embeddings()
        if out is not None and out.weight is not model.get_input_embeddings().weight:
            # An encoder saved without its MLM head: the new decoder shares the input embeddings (as in BERT).
            out.weight = model.get_input_embeddings().weight
        return model

    def encode(self, tokenizer, examples: list[Example], space: Space, max_length: int) -> list[dict]:
        if tokenizer.mask_token_id is None:
            raise UserError("mlm needs a tokenizer with a mask token (an encoder such as minilm)", "--model")
        enc = tokenizer([e.text for e in examples], truncation=True, max_length=max_length, padding=False)
        items = []
        for i, ids in enumerate(enc["input_ids"]):
            special = tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True)
            inputs, labels = self._mask(ids, special, len(tokenizer), tokenizer.mask_token_id, space, i)
            if any(t != IGNORE for t in labels):
                item = {k: enc[k][i] for k in enc.keys()}
                items.append({**item, "input_ids": inputs, "labels": labels, "_gold": 0})
        return items

    @staticmethod
    def _mask(ids: list[int], special: list[int], vocab: int, mask_id: int, space: Space, index: int):
        """BERT's 80/10/10 corruption of a `mlm_probability` share of the ordinary tokens (at least one)."""
        g = torch.Generator().manual_seed(space.seed * 1_000_003 + index)
        candidates = [j for j, s in enumerate(special) if not s]
        if not candidates:
            return ids, [IGNORE] * len(ids)
        chosen = [j for j in candidates if torch.rand((), generator=g) < space.mlm_probability]
        chosen = chosen or [candidates[int(torch.randint(len(candidates), (), generator=g))]]
        inputs, labels = list(ids), [IGNORE] * len(ids)
        for j in chosen:
            labels[j] = ids[j]
            r = float(torch.rand((), generator=g))
            inputs[j] = mask_id if r < 0.8 else int(torch.randint(vocab, (), generator=g)) if r < 0.9 else ids[j]
        return inputs, labels


class ChatSFT(LanguageModeling):
    name = "chat"

    def read(self, path, cfg: DataConfig, need_label: bool = True) -> list[Example]:
        return _read_records(path, cfg, self.parse)

    @staticmethod
    def parse(rec: dict, path: Path, line: int) -> list[dict]:
        """`{"messages": [...]}` (OpenAI chat format) or `{"prompt", "completion"}`."""
        if "messages" in rec:
            return parse_messages(rec["messages"], path, line)
        if "prompt" in rec and "completion" in rec:
            return [{"role": "user", "content": _content(rec["prompt"], path, line, "prompt")},
                    {"role": "assistant", "content": _content(rec["completion"], path, line, "completion")}]
        raise UserError("expected 'messages' (OpenAI chat format) or 'prompt' and 'completion'", str(path), line)

    def encode(self, tokenizer, examples: list[Example], space: Space, max_length: int) -> list[dict]:
        items, long = [], 0
        for e in examples:
            trained = [i for i, m in enumerate(e.label) if m["role"] == "assistant" and m.get("weight", 1)]
            ids, labels = render(tokenizer, e.label, trained)
            long += len(ids) > max_length
            fitted = _fit(ids, labels, max_length, space.overlong)
            if fitted:
                items.append({"input_ids": fitted[0], "attention_mask": [1] * len(fitted[0]), "labels": fitted[1],
                              "_gold": 0})
        _report_overlong(len(items), len(examples), long, max_length, space.overlong, "conversations")
        if not items:
            raise UserError(f"no conversation has an assistant token within max_length {max_length}", "--max-length")
        return items


# --- preference pairs: dpo and reward ----------------------------------------------------------------------

def _response(value, path: Path, line: int, key: str) -> str:
    """A response: a string, or (OpenAI DPO format) a list holding one assistant message."""
    if isinstance(value, list):
        msgs = parse_messages(value, path, line, need_assistant=False)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise UserError(f"'{key}' must hold exactly one assistant message", str(path), line)
        return msgs[0]["content"]
    return _content(value, path, line, f"'{key}'")


class Preference(Task):
    """A prompt with a chosen and a rejected response; one example is one pair."""

    tunings = ("full", "lora")
    judged_by_start = True
    default_layer_decay = 1.0

    def read(self, path, cfg: DataConfig, need_label: bool = True) -> list[Example]:
        return _read_records(path, cfg, self.parse)

    @staticmethod
    def parse(rec: dict, path: Path, line: int) -> dict:
        """`{"prompt", "chosen", "rejected"}` (prompt: text or messages) or OpenAI's DPO format
        `{"input": {"messages"}, "preferred_output", "non_preferred_output"}`."""
        if "input" in rec:
            inp = rec["input"]
            if not isinstance(inp, dict) or "messages" not in inp:
                raise UserError("'input' must be an object with 'messages'", str(path), line)
            prompt = parse_messages(inp["messages"], path, line, need_assistant=False)
            keys = ("preferred_output", "non_preferred_output")
        elif "prompt" in rec:
            p = rec["prompt"]
            prompt = (parse_messages(p, path, line, need_assistant=False) if isinstance(p, list)
                      else [{"role": "user", "content": _content(p, path, line, "'prompt'")}])
            keys = ("chosen", "rejected")
        else:
            raise UserError("expected 'prompt', 'chosen', 'rejected' or the OpenAI DPO format "
                            "('input', 'preferred_output', 'non_preferred_output')", str(path), line)
        for k in keys:
            if k not in rec:
                raise UserError(f"missing '{k}'", str(path), line)
        chosen, rejected = (_response(rec[k], path, line, k) for k in keys)
        if chosen.strip() == rejected.strip():
            raise UserError("chosen and rejected responses are identical: the pair says nothing", str(path), line)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    def encode(self, tokenizer, examples: list[Example], space: Space, max_length: int) -> list[dict]:
        items, long = [], 0
        for e in examples:
            pair = []
            for key in ("chosen", "rejected"):
                messages = e.label["prompt"] + [{"role": "assistant", "content": e.label[key]}]
                ids, labels = render(tokenizer, messages, [len(messages) - 1])
                long += len(ids) > max_length
                pair.append(_fit(ids, labels, max_length, space.overlong))
            if all(pair):
                (c_ids, c_labels), (r_ids, r_labels) = pair
                items.append({"input_ids": c_ids, "labels": c_labels, "rejected_input_ids": r_ids,
                              "rejected_labels": r_labels, "_gold": 1})
        _report_overlong(len(items), len(examples), long, max_length, space.overlong, "responses")
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

    def eval_loss(self, outputs: list[torch.Tensor], items: list[dict], space: Space) -> float:
        return self.score(self.decode(outputs, items, space), [], space)["loss"]

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
    metrics = ("loss", "reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected")
    model_class = "AutoModelForCausalLM"

    def pair_scores(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch.pop("labels")
        logps = sequence_logps(model(**batch).logits.float(), labels)
        return logps.chunk(2)

    def prepare_items(self, model: nn.Module, items: list[dict], pad_id: int, device) -> None:
        """The frozen reference: the starting model's log-probabilities of every response, computed once."""
        from tunelab.evaluate import predict_outputs

        for it in items:
            it.pop("_ref", None)
        for it, out in zip(items, predict_outputs(self, model, items, pad_id, device, batch_size=16)):
            it["_ref"] = out.tolist()

    def forward(self, model: nn.Module, batch: dict, space: Space) -> tuple[torch.Tensor, dict[str, float]]:
        ref = batch.pop("ref")
        chosen, rejected = self.pair_scores(model, batch)
        r_chosen, r_rejected = space.beta * (chosen - ref[:, 0]), space.beta * (rejected - ref[:, 1])
        loss = -F.logsigmoid(r_chosen - r_rejected).sum()
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

    def build(self, cfg: ModelConfig, folder: Path, space: Space, pretrained: bool) -> nn.Module:
        from transformers import AutoTokenizer

        model = super().build(cfg, folder, space, pretrained)
        # The score is read at each row's last token that is not padding: the model must know the pad id
        # that batches are padded with (the tokenizer's, or 0 when it has none; see Job.pad_id).
        model.config.pad_token_id = AutoTokenizer.from_pretrained(folder).pad_token_id or 0
        return model

    def pair_scores(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        batch.pop("labels", None)
        return model(**batch).logits.float().squeeze(-1).chunk(2)

    def forward(self, model: nn.Module, batch: dict, space: Space) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = self.pair_scores(model, batch)
        return -F.logsigmoid(chosen - rejected).sum(), {"correct": float((chosen > rejected).sum())}

    def train_log(self, sums: dict[str, float], units: int) -> dict[str, float]:
        return {"pairwise_accuracy": sums["correct"] / max(units, 1)}

    def score(self, preds: list, golds: list, space: Space) -> dict[str, float]:
        return _pair_metrics(preds, "pairwise_")

    def predict_row(self, example: Example, pred, output: torch.Tensor, space: Space) -> dict:
        raise UserError("score responses with the exported model/ (AutoModelForSequenceClassification, one logit)")
