"""Language modelling stages: continued pre-training (causal and masked) and chat SFT.

Every stage runs through the same loop, methods and run folders as the classifiers; what differs is here: which
tokens carry a loss and how a batch turns into one.

- clm: next-token prediction on plain text, documents packed (eos between them) into max_length blocks.
- mlm: masked-token prediction (BERT): 15% of the tokens chosen, 80% of those become [MASK], 10% a random
  token, 10% stay; masks are drawn once per example from the seed (static masking, as in the original BERT;
  RoBERTa's dynamic masking would redraw them every epoch).
- nsp: BERT's full pre-training, masked tokens plus next-sentence prediction on sentence pairs (PreTraining).
- chat: supervised fine-tuning on conversations rendered with the tokenizer's own chat template; only assistant
  tokens (with weight 1), including the end-of-turn token that teaches the model to stop, carry the loss.

Perplexity and token accuracy are computed per example and aggregated in `score`, so the bootstrap intervals
resample examples (blocks, conversations) like every other task.
"""
from __future__ import annotations

import bisect
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tunelab import speed
from tunelab.config import DataConfig, ModelConfig
from tunelab.data.chat import IGNORE, content, fit_length, parse_messages, read_records, render, report_overlong
from tunelab.data.load import Example, Problems, read_examples
from tunelab.errors import UserError
from tunelab.losses import token_stats
from tunelab.tasks.base import Space, Task


class LanguageModeling(Task):
    """Shared by clm, mlm and chat: a loss per labelled token; perplexity and token accuracy per example."""

    label_key = "text"
    metrics = ("loss", "perplexity", "mean_token_accuracy")
    lower_is_better = frozenset({"loss", "perplexity"})
    model_class = "AutoModelForCausalLM"
    tunings = ("full", "lora", "qlora")
    judged_by_start = True
    default_layer_decay = 1.0
    eval_batch_size = 8
    shift = True  # causal: the logits at position t score token t + 1

    @property
    def loss_from_hidden(self) -> bool:  # a causal model's (speed.causal_lm_loss); a masked one's comes from logits
        return self.shift

    def read(self, path, cfg: DataConfig, need_label: bool = True, problems: Problems | None = None) -> list[Example]:
        return read_examples(path, cfg, need_label=False, folders=False, problems=problems)

    def units(self, item: dict) -> int:
        labels = item["labels"][1:] if self.shift else item["labels"]
        return sum(t != IGNORE for t in labels)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return token_stats(logits, labels, self.shift)[0].sum()

    def _token_losses(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, ...]:
        """(summed loss; per row, detached: summed loss, labelled tokens, correct tokens). A causal model's comes
        from its hidden states in chunks where the speed-ups allow (speed.causal_lm_loss), never holding the
        [tokens × vocabulary] logits."""
        labels = batch.pop("labels")
        if self.shift:
            return speed.causal_lm_loss(model, batch, labels, self.chunked)
        loss, tokens, correct = token_stats(model(**batch).logits.float(), labels, self.shift)
        return loss.sum(), loss.detach(), tokens, correct

    def forward(self, model: nn.Module, batch: dict, space: Space) -> tuple[torch.Tensor, dict[str, float]]:
        loss, _, tokens, correct = self._token_losses(model, batch)
        return loss, {"correct": float(correct.sum()), "tokens": float(tokens.sum())}

    def train_log(self, sums: dict[str, float], units: int) -> dict[str, float]:
        return {"mean_token_accuracy": sums["correct"] / max(sums["tokens"], 1)}

    def outputs(self, model: nn.Module, batch: dict, lengths: list[int]) -> list[torch.Tensor]:
        return list(torch.stack(self._token_losses(model, batch)[1:], 1).float().cpu())

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
    tunings = ("scratch", "full", "lora", "qlora", "distill")

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
    tunings = ("scratch", "full", "lora", "qlora")
    shift = False

    def build(self, cfg: ModelConfig, folder: Path, space: Space, pretrained: bool,
              quantize_on: torch.device | None = None) -> nn.Module:
        model = super().build(cfg, folder, space, pretrained, quantize_on)
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


SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])")


def sentences(text: str) -> list[str]:
    """A document's sentences: split after . ! ? followed by white space, and after 。！？."""
    return [s.strip() for s in SENTENCE_END.split(text) if s.strip()]


def nsp_pairs(documents: list[str], seed: int) -> list[tuple[str, str, int]]:
    """BERT's next-sentence pairs (Devlin et al. 2019, section 3.1): each two consecutive sentences of a document
    give a pair whose second half is, by a seeded coin, the true next sentence (label 0, IsNext) or a sentence
    drawn from another document of the same file (label 1, NotNext) — so no pair crosses the train/eval split.
    Documents of one sentence give no pair."""
    split = [sentences(d) for d in documents]
    owners = [(d, j) for d, doc in enumerate(split) for j in range(len(doc))]
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for d, doc in enumerate(split):
        for a, b in zip(doc, doc[1:]):
            if float(torch.rand((), generator=g)) < 0.5 or len(split) < 2:
                pairs.append((a, b, 0))
                continue
            while True:  # a sentence of another document
                other, j = owners[int(torch.randint(len(owners), (), generator=g))]
                if other != d:
                    break
            pairs.append((a, split[other][j], 1))
    return pairs


class PreTraining(MaskedLM):
    """BERT's two pre-training objectives at once: masked tokens (as mlm) and next-sentence prediction on sentence
    pairs built from the documents (nsp_pairs). The loss is the summed MLM token losses plus each pair's NSP loss
    weighted by its masked tokens, over the batch's masked tokens: the MLM mean plus (nearly) the NSP mean, BERT's
    sum of the two. A pair's NSP label travels in `labels` at its first position ([CLS], never an MLM target).
    The model is transformers' BertForPreTraining (an encoder with a next-sentence head)."""

    name = "nsp"
    model_class = "AutoModelForPreTraining"
    metrics = ("loss", "perplexity", "mean_token_accuracy", "nsp_accuracy")
    tunings = ("scratch", "full", "lora")

    def build(self, cfg: ModelConfig, folder: Path, space: Space, pretrained: bool,
              quantize_on: torch.device | None = None) -> nn.Module:
        try:
            model = super().build(cfg, folder, space, pretrained, quantize_on)
        except ValueError:  # transformers has no pre-training class for this architecture
            model = None
        if not hasattr(getattr(model, "cls", None), "seq_relationship"):
            raise UserError("nsp needs an encoder with a next-sentence head, as BERT has (such as minilm); this "
                            "model has none: use --task mlm or --task clm", "--model")
        return model

    def encode(self, tokenizer, examples: list[Example], space: Space, max_length: int) -> list[dict]:
        if tokenizer.mask_token_id is None:
            raise UserError("nsp needs a tokenizer with a mask token (an encoder such as minilm)", "--model")
        pairs = nsp_pairs([e.text for e in examples], space.seed)
        if not pairs:
            raise UserError("no document has two sentences to pair (nsp splits documents after . ! ? and 。！？)")
        enc = tokenizer([a for a, _, _ in pairs], [b for _, b, _ in pairs], truncation="longest_first",
                        max_length=max_length, padding=False)
        items = []
        for i, ids in enumerate(enc["input_ids"]):
            special = tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True)
            inputs, labels = self._mask(ids, special, len(tokenizer), tokenizer.mask_token_id, space, i)
            labels[0] = pairs[i][2]  # [CLS]: special, never masked
            items.append({**{k: enc[k][i] for k in enc.keys()}, "input_ids": inputs, "labels": labels, "_gold": 0})
        return items

    def units(self, item: dict) -> int:
        return sum(t != IGNORE for t in item["labels"][1:])

    def _stats(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Per pair: (MLM loss sum, masked tokens, correct tokens, correct NSP, NSP loss)."""
        labels = batch.pop("labels")
        nsp, tokens = labels[:, 0], labels.clone()
        tokens[:, 0] = IGNORE
        out = model(**batch)
        loss, count, correct = token_stats(out.prediction_logits.float(), tokens, shift=False)
        relation = out.seq_relationship_logits.float()
        nsp_loss = F.cross_entropy(relation, nsp, reduction="none")
        return torch.stack([loss, count.float(), correct.float(), (relation.argmax(-1) == nsp).float(), nsp_loss], 1)

    def forward(self, model: nn.Module, batch: dict, space: Space) -> tuple[torch.Tensor, dict[str, float]]:
        stats = self._stats(model, batch)
        counts = stats.detach().sum(0)
        return (stats[:, 0] + stats[:, 4] * stats[:, 1]).sum(), {"correct": float(counts[2]), "tokens": float(counts[1]),
                                   "nsp_correct": float(counts[3]), "pairs": float(len(stats))}

    def train_log(self, sums: dict[str, float], units: int) -> dict[str, float]:
        return {**super().train_log(sums, units), "nsp_accuracy": sums["nsp_correct"] / max(sums["pairs"], 1)}

    def outputs(self, model: nn.Module, batch: dict, lengths: list[int]) -> list[torch.Tensor]:
        return list(self._stats(model, batch).cpu())

    def score(self, preds: list, golds: list, space: Space) -> dict[str, float]:
        """loss and perplexity are the MLM's, beside the NSP accuracy."""
        return {**super().score(preds, golds, space), "nsp_accuracy": sum(p[3] for p in preds) / max(len(preds), 1)}


def alpaca_messages(rec: dict, path: Path, line: int) -> list[dict]:
    """An Alpaca record as chat messages (see ChatSFT.parse)."""
    user = content(rec["instruction"], path, line, "instruction")
    extra = rec.get("input")
    if extra not in (None, ""):
        user += "\n\n" + content(extra, path, line, "input")
    system = [{"role": "system", "content": content(rec["system"], path, line, "system")}] \
        if rec.get("system") not in (None, "") else []
    return [*system, {"role": "user", "content": user},
            {"role": "assistant", "content": content(rec["output"], path, line, "output")}]


class ChatSFT(LanguageModeling):
    name = "chat"
    tunings = ("full", "lora", "qlora", "distill")

    def read(self, path, cfg: DataConfig, need_label: bool = True, problems: Problems | None = None) -> list[Example]:
        return read_records(path, cfg, self.parse, problems)

    @staticmethod
    def parse(rec: dict, path: Path, line: int) -> list[dict]:
        """`{"messages": [...]}` (OpenAI chat format), `{"prompt", "completion"}`, or Alpaca's `{"instruction",
        "input", "output"}` (Taori et al., 2023; `input` optional, a `system` key too): the instruction, then a
        blank line and the input when there is one, is the user's turn and the output the assistant's. The model's
        own chat template renders it, in place of Alpaca's "Below is an instruction..." preamble, which was written
        for base models without one."""
        if "messages" in rec:
            return parse_messages(rec["messages"], path, line)
        if "prompt" in rec and "completion" in rec:
            return [{"role": "user", "content": content(rec["prompt"], path, line, "prompt")},
                    {"role": "assistant", "content": content(rec["completion"], path, line, "completion")}]
        if "instruction" in rec and "output" in rec:
            return alpaca_messages(rec, path, line)
        raise UserError("expected 'messages' (OpenAI chat format), 'prompt' and 'completion', or 'instruction' and "
                        "'output' (Alpaca)", str(path), line)

    def encode(self, tokenizer, examples: list[Example], space: Space, max_length: int) -> list[dict]:
        items, long = [], 0
        for e in examples:
            trained = [i for i, m in enumerate(e.label) if m["role"] == "assistant" and m.get("weight", 1)]
            ids, labels = render(tokenizer, e.label, trained)
            long += len(ids) > max_length
            fitted = fit_length(ids, labels, max_length, space.overlong)
            if fitted:
                items.append({"input_ids": fitted[0], "attention_mask": [1] * len(fitted[0]), "labels": fitted[1],
                              "_gold": 0})
        report_overlong(len(items), len(examples), long, max_length, space.overlong, "conversations")
        if not items:
            raise UserError(f"no conversation has an assistant token within max_length {max_length}", "--max-length")
        return items

    def pack(self, items: list[dict], max_length: int) -> list[dict]:
        """Conversations several to a row of at most max_length tokens, longest first, each into the fullest row it
        still fits (best-fit decreasing). A row carries no attention mask and `position_ids` that restart at 0 at
        each conversation: transformers then masks attention block by block (masking_utils'
        find_packed_sequence_indices; FlashAttention's variable-length kernels read the same positions on a GPU),
        so no token sees another conversation and each conversation's loss is its unpacked loss. The first token of
        each conversation carries no label: the previous one's last token does not learn to predict it."""
        order = sorted(range(len(items)), key=lambda i: -len(items[i]["input_ids"]))
        room: list[tuple[int, int]] = []  # (free tokens, row), kept sorted
        rows: list[list[int]] = []
        for i in order:
            n = len(items[i]["input_ids"])
            at = bisect.bisect_left(room, (n, -1))
            if at < len(room):
                free, row = room.pop(at)
            else:
                free, row = max_length, len(rows)
                rows.append([])
            rows[row].append(i)
            bisect.insort(room, (free - n, row))
        packed = []
        for row in rows:
            ids, positions, labels = [], [], []
            for i in row:
                item = items[i]
                ids += item["input_ids"]
                positions += range(len(item["input_ids"]))
                labels += [IGNORE] + item["labels"][1:]
            packed.append({"input_ids": ids, "position_ids": positions, "labels": labels, "_gold": 0,
                           "_conversations": len(row)})
        return packed
