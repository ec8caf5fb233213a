"""Text augmentation for small training sets: EDA's four operations (Wei & Zou 2019), offline, any language.

Each training text gets `train.augment_copies` extra copies with its label; each copy applies one operation,
chosen at random from `train.augment`, to about `train.augment_rate` of its words:
- swap: exchange two words;
- delete: drop each word with that probability (one always stays);
- insert: put a neighbour of one of the text's words at a random place;
- neighbour: replace words by one of their five nearest neighbours in the model's own input-embedding space
  (cosine), in place of EDA's WordNet synonyms: it needs no thesaurus and works for any language the model's
  vocabulary has whole words of.
Words are what a real segmenter says they are: Japanese text (kana or kanji) is split by MeCab (fugashi with
unidic-lite) and joined back without spaces; other text is split on whitespace. Copies are a pure function of
(seed, example, copy): the same seed gives the same augmented set. Only the training split is augmented, after
the eval split is set aside.
"""
from __future__ import annotations

import dataclasses
import random
import re

import torch

from tunelab.data.load import Example
from tunelab.errors import UserError
from tunelab.extras import need

OPS = ("swap", "delete", "insert", "neighbour")
JAPANESE = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")


def parse_ops(spec: str) -> list[str]:
    ops = [o.strip() for o in spec.split(",") if o.strip()]
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise UserError(f"unknown augmentation {unknown[0]!r} (use any of {', '.join(OPS)})", "train.augment")
    return ops


class Augmenter:
    def __init__(self, ops: list[str], rate: float, tokenizer, embeddings: torch.Tensor):
        self.ops, self.rate, self.tokenizer = ops, rate, tokenizer
        self._tagger = None
        self._cache: dict[str, list[str]] = {}
        self.words_by_id = self._vocabulary_words(tokenizer) if {"insert", "neighbour"} & set(ops) else {}
        if self.words_by_id:
            self.ids = torch.tensor(sorted(self.words_by_id))
            self.unit = torch.nn.functional.normalize(embeddings.detach().float()[self.ids], dim=-1)
            self.row = {int(i): r for r, i in enumerate(self.ids)}

    @staticmethod
    def _vocabulary_words(tokenizer) -> dict[int, str]:
        """Vocabulary entries that are whole words (not word pieces, not special tokens), by id."""
        special = set(tokenizer.all_special_ids)
        vocab = tokenizer.get_vocab()
        # SentencePiece and byte-level BPE mark a word's first piece (▁, Ġ); WordPiece marks the others (##)
        marker = next((m for m in ("▁", "Ġ") if sum(t.startswith(m) for t in vocab) > len(vocab) // 10), None)
        out = {}
        for token, i in vocab.items():
            if i in special or (token[:1] != marker if marker else token.startswith("##")):
                continue
            word = token[1:] if marker else token
            if word.isalpha() and (len(word) > 1 or JAPANESE.match(word)):
                out[i] = word
        return out

    def words(self, text: str) -> tuple[list[str], str]:
        """(words, joiner): MeCab words joined by nothing for Japanese, whitespace words joined by a space."""
        if JAPANESE.search(text):
            if self._tagger is None:
                need("unidic_lite", "ja")  # the dictionary fugashi.Tagger() loads
                self._tagger = need("fugashi", "ja").Tagger()
            return [w.surface for w in self._tagger(text)], ""
        return text.split(), " "

    def neighbours(self, word: str) -> list[str]:
        """The five vocabulary words nearest to `word` in the input-embedding space, [] if it is not one."""
        if word not in self._cache:
            ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
            found = []
            if len(ids) == 1 and ids[0] in self.row:
                sims = self.unit @ self.unit[self.row[ids[0]]]
                for r in sims.topk(min(12, len(sims))).indices.tolist():
                    w = self.words_by_id[int(self.ids[r])]
                    if w.casefold() != word.casefold() and w not in found:
                        found.append(w)
                    if len(found) == 5:
                        break
            self._cache[word] = found
        return self._cache[word]

    def __call__(self, text: str, rng: random.Random) -> str:
        words, joiner = self.words(text)
        if len(words) < 2:
            return text
        n = max(1, round(self.rate * len(words)))
        op = rng.choice(self.ops)
        if op == "swap":
            for _ in range(n):
                i, j = rng.randrange(len(words)), rng.randrange(len(words))
                words[i], words[j] = words[j], words[i]
        elif op == "delete":
            kept = [w for w in words if rng.random() >= self.rate]
            words = kept or [rng.choice(words)]
        elif op == "insert":
            for _ in range(n):
                options = self.neighbours(rng.choice(words))
                if options:
                    words.insert(rng.randrange(len(words) + 1), rng.choice(options))
        else:
            spots = [i for i in rng.sample(range(len(words)), len(words)) if self.neighbours(words[i])][:n]
            for i in spots:
                words[i] = rng.choice(self.neighbours(words[i]))
        return joiner.join(words)


def augment_examples(examples: list[Example], ops: list[str], rate: float, copies: int, seed: int, tokenizer,
                     embeddings: torch.Tensor) -> list[Example]:
    """`copies` augmented copies of every example (its label kept), in example order."""
    augmenter = Augmenter(ops, rate, tokenizer, embeddings)
    out = []
    for i, e in enumerate(examples):
        for c in range(copies):
            rng = random.Random(f"{seed}:{i}:{c}")
            out.append(dataclasses.replace(e, text=augmenter(e.text, rng), where=f"{e.where} (augmented {c + 1})"))
    return out
