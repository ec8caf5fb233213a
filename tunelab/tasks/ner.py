"""Token classification (NER): IOB2 tags per word, a per-token head, entity-level scores by the conlleval rules.

Words are split into sub-word tokens by the model's tokenizer; the first sub-token of each word carries the
word's tag and the rest are ignored by the loss (-100), as in BERT's NER recipe (Devlin et al., 2019, §5.3).
Words cut off by `max_length` are predicted `O`, so truncation costs recall instead of vanishing from the score.
Entity precision, recall and F1 come from `seqeval` (default mode: conlleval's rules).
"""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import numpy as np
from torch import nn

from tunelab.config import DataConfig
from tunelab.data.conll import TAG, read_conll
from tunelab.data.load import Example, Problems, Records, _decoded_lines, check_known_labels, group_of, json_records
from tunelab.errors import UserError, excerpt
from tunelab.extras import need
from tunelab.tasks.base import Space, Task
from tunelab.tasks.classification import fit_logistic

CONLL_SUFFIXES = (".conll", ".conllu", ".iob", ".iob2", ".bio", ".txt", ".tsv")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uff66-\uff9f]")


def segment(text: str) -> list[str]:
    """Words of raw text: MeCab (fugashi + unidic-lite) for Japanese, word/punctuation split otherwise."""
    if _CJK.search(text):
        return [w.surface for w in _tagger()(text) if w.surface.strip()]
    return re.findall(r"\w+|[^\w\s]", text)


_TAGGER = None


def _tagger():
    global _TAGGER  # one MeCab instance per process: building it loads the dictionary
    if _TAGGER is None:
        need("unidic_lite", "ja")  # the dictionary fugashi.Tagger() loads
        _TAGGER = need("fugashi", "ja").Tagger()
    return _TAGGER


def _tags(value, path: Path, line: int, n_tokens: int) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise UserError(f"'tags' must be a list of strings, got {excerpt(value)}", str(path), line, "wrong-type")
    if len(value) != n_tokens:
        raise UserError(f"{len(value)} tags for {n_tokens} tokens", str(path), line)
    for t in value:
        if not TAG.match(t):
            raise UserError(f"tag {excerpt(t)} is not IOB2 (O, B-TYPE or I-TYPE)", str(path), line)
    return list(value)


def read_ner_jsonl(path: Path, cfg: DataConfig, need_label: bool, problems: Problems | None = None) -> list[Example]:
    key = cfg.label_column or "tags"
    records = Records(path, False, problems)  # no data.skip_invalid here: a bad record stops training

    def example(i: int, rec: dict) -> Example:
        if "tokens" in rec:
            tokens = rec["tokens"]
            if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t for t in tokens):
                raise UserError("'tokens' must be a non-empty list of non-empty strings", str(path), i, "empty")
        elif not need_label and isinstance(rec.get(cfg.text_column), str):
            tokens = segment(rec[cfg.text_column])
        else:
            raise UserError("missing 'tokens' (a list of words)", str(path), i)
        tags = None
        if need_label or key in rec:
            if key not in rec:
                raise UserError(f"missing '{key}' (one IOB2 tag per token)", str(path), i)
            tags = _tags(rec[key], path, i, len(tokens))
        return Example(" ".join(tokens), tags, where=f"{path}:{i}", tokens=list(tokens),
                       group=group_of(rec, cfg, path, i))
    for i, rec in json_records(path, cfg.encoding, problems):
        records.add(lambda: example(i, rec))
    return records.done()


def _looks_like_conll(lines: list[str]) -> bool:
    """A tab in the first lines means columns (token, tag): CoNLL, not one raw sentence per line."""
    return any("\t" in line for line in lines[:50])


class Ner(Task):
    name = "ner"
    label_key = "tags"
    metrics = ("f1", "precision", "recall", "accuracy")
    model_class = "AutoModelForTokenClassification"

    def read(self, path, cfg, need_label=True, problems=None):
        p = Path(path)
        if not p.is_file():
            raise UserError("file not found" if not p.exists() else "ner data must be a JSONL or CoNLL file", str(p))
        suffix = p.suffix.lower()
        if suffix in (".jsonl", ".json", ".ndjson"):
            rows = read_ner_jsonl(p, cfg, need_label, problems)
        elif suffix == ".txt" and not need_label and not _looks_like_conll(lines := _decoded_lines(p, cfg.encoding)):
            rows = [Example(l, None, where=f"{p}:{i}", tokens=segment(l)) for i, l in enumerate(lines, 1) if l.strip()]
        elif suffix in CONLL_SUFFIXES:
            rows = read_conll(p, need_label, cfg.encoding, problems)
        else:
            raise UserError("unknown ner data format (use .jsonl with tokens/tags, or a CoNLL file)", str(p))
        if not rows:
            raise UserError("no sentences found (the file is empty)", str(p), code="empty")
        return rows

    def space(self, train, path):
        names = sorted({t for e in train for t in e.label})
        if not any(n != "O" for n in names):
            raise UserError("the training data has no entity tags (only O)", path)
        return Space(labels=names)

    def check(self, examples, space):
        check_known_labels(examples, space.labels, flat=lambda tags: tags)

    def build(self, cfg, folder, space, pretrained, quantize_on=None):
        """transformers' token classifier for the architecture; for one it has none (Gemma 3), tunelab's
        (tunelab.models.pooled.BackboneForTokenClassification: the backbone and a linear layer per token)."""
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES

        model_type = AutoConfig.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code).model_type
        if model_type in MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES or model_type == "tunelab-pooled":
            return super().build(cfg, folder, space, pretrained, quantize_on)
        from tunelab.models import pretrained_kwargs
        from tunelab.models.pooled import BackboneForTokenClassification

        return BackboneForTokenClassification.from_backbone(
            folder, "tokens", cfg.trust_remote_code, pretrained, pretrained_kwargs(cfg, quantize_on),
            **self.model_kwargs(space))

    def model_kwargs(self, space):
        return space.label_mapping()

    def encode(self, tokenizer, examples, space, max_length):
        if not getattr(tokenizer, "is_fast", False):
            raise UserError("ner needs a fast tokenizer (word alignment); this model's is not", "--model")
        index = {n: i for i, n in enumerate(space.labels)}
        words = [[unicodedata.normalize("NFKC", w) for w in e.tokens] for e in examples]
        enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length, padding=False)
        items = []
        for i, e in enumerate(examples):
            item = {k: enc[k][i] for k in enc.keys()}
            first, labels, previous = [], [], None
            for pos, w in enumerate(enc.word_ids(i)):
                is_first = w is not None and w != previous
                if is_first:
                    first.append((pos, w))
                labels.append(index[e.label[w]] if is_first and e.label is not None else -100)
                previous = w
            item["_first"], item["_n_words"] = first, len(e.tokens)
            if e.label is not None:
                item["labels"], item["_gold"] = labels, list(e.label)
            items.append(item)
        return items

    def units(self, item):
        return sum(1 for label in item["labels"] if label != -100)

    def loss(self, logits, labels):
        return nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                           reduction="sum")

    def decode(self, outputs, items, space):
        preds = []
        for out, item in zip(outputs, items):
            tags = ["O"] * item["_n_words"]
            best = out.argmax(-1).tolist()
            for pos, w in item["_first"]:
                tags[w] = space.labels[best[pos]]
            preds.append(tags)
        return preds

    def score(self, preds, golds, space):
        from seqeval.metrics import f1_score, precision_score, recall_score

        flat_p = [t for s in preds for t in s]
        flat_g = [t for s in golds for t in s]
        return {"f1": float(f1_score(golds, preds, zero_division=0)),
                "precision": float(precision_score(golds, preds, zero_division=0)),
                "recall": float(recall_score(golds, preds, zero_division=0)),
                "accuracy": float(np.mean([p == g for p, g in zip(flat_p, flat_g)])) if flat_g else 0.0}

    def details(self, preds, golds, space):
        from seqeval.metrics import classification_report

        report = classification_report(golds, preds, output_dict=True, zero_division=0)
        return {"per_type": {k: {m: float(v) for m, v in d.items()} for k, d in report.items()}}

    def baseline(self, train_golds, golds, space):
        counts: dict[str, int] = {}
        for s in train_golds:
            for t in s:
                counts[t] = counts.get(t, 0) + 1
        majority = max(counts, key=counts.get)
        return "majority", [[majority] * len(s) for s in golds]

    def probe(self, train_x, train_items, eval_x, eval_items, space):
        y = [it["_gold"][w] for it in train_items for _, w in it["_first"]]
        flat = fit_logistic(train_x, y).predict(eval_x).tolist()
        preds, k = [], 0
        for item in eval_items:
            tags = ["O"] * item["_n_words"]
            for _, w in item["_first"]:
                tags[w] = flat[k]
                k += 1
            preds.append(tags)
        return preds

    def predict_row(self, example, pred, output, space):
        from seqeval.metrics.sequence_labeling import get_entities

        entities = [{"type": t, "start": s, "end": e + 1, "text": " ".join(example.tokens[s:e + 1])}
                    for t, s, e in get_entities(pred)]
        return {"tokens": example.tokens, "tags": pred, "entities": entities}
