"""Does a model read the data's language? The share of the data's tokens that its tokenizer maps to the unknown
token, or breaks into single bytes of characters its vocabulary lacks.

An English vocabulary meets Japanese with `[UNK]` (WordPiece: all-MiniLM-L6-v2 maps 27% of the Japanese NER
corpus's pieces to it, and what is unknown is invisible to the model) or, in byte-level and byte-fallback
vocabularies (GPT-2's family, Llama, Gemma), with one token per UTF-8 byte: nothing is lost, but a character
costs two to four positions, each meaningless alone. `tunelab data check --model M` reports both shares and
`tunelab train` warns at its start above UNKNOWN_WARN or BYTES_WARN.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

UNKNOWN_WARN = 0.05  # a twentieth of the text invisible to the model
BYTES_WARN = 0.25  # a quarter of the positions spent on stray bytes
SAMPLE = 2000  # texts measured (evenly spread over the file): the shares settle long before
KANA = re.compile(r"[\u3040-\u30ff]")
CJK = re.compile(r"[\u4e00-\u9fff\uac00-\ud7af]")


@dataclass
class Coverage:
    model: str
    unknown_token: str | None
    tokens: int
    unknown: int
    byte_pieces: int
    suggestion: str

    @property
    def unknown_share(self) -> float:
        return self.unknown / self.tokens if self.tokens else 0.0

    @property
    def byte_share(self) -> float:
        return self.byte_pieces / self.tokens if self.tokens else 0.0

    def warning(self) -> str | None:
        """One line when the model does not read the data well, else None."""
        if self.unknown_share >= UNKNOWN_WARN:
            return (f"{self.unknown_share:.0%} of the tokens are {self.unknown_token} for {self.model}: this model "
                    f"does not read this language; try {self.suggestion}")
        if self.byte_share >= BYTES_WARN:
            return (f"{self.byte_share:.0%} of the tokens are single bytes for {self.model}: its vocabulary lacks "
                    f"this script and reads it byte by byte; try {self.suggestion}")
        return None

    def stats(self) -> dict:
        return {"model": self.model, "tokens": self.tokens, "unknown_share": round(self.unknown_share, 4),
                "byte_share": round(self.byte_share, 4)}


def coverage(tokenizer, texts: list[str], model: str) -> Coverage:
    """The shares for up to SAMPLE of `texts` (special tokens not counted)."""
    step = max(1, len(texts) // SAMPLE)
    sample = [t for t in texts[::step] if t]
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"] if sample else []
    unk, stray = tokenizer.unk_token_id, byte_ids(tokenizer)
    flat = [i for row in ids for i in row]
    return Coverage(model, tokenizer.unk_token, len(flat), sum(i == unk for i in flat) if unk is not None else 0,
                    sum(i in stray for i in flat), suggestion(sample))


def examples_coverage(tokenizer, examples: list, model: str) -> Coverage:
    """`coverage` of the texts (and text pairs) of data examples, the model named by its folder's last part."""
    from pathlib import Path

    return coverage(tokenizer, [t for e in examples for t in (e.text, e.text_pair) if isinstance(t, str)],
                    Path(model).name)


def byte_ids(tokenizer) -> set[int]:
    """Ids of the pieces that are one byte of a multi-byte character alone: SentencePiece's byte fallback
    (`<0xE3>`) or, in a byte-level BPE, a single symbol of GPT-2's byte alphabet for a byte of 0x80 or more."""
    vocab = tokenizer.get_vocab()
    found = {i for piece, i in vocab.items() if re.fullmatch(r"<0x[89A-Fa-f][0-9A-Fa-f]>", piece)}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and "ByteLevel" in json.dumps([json.loads(backend.to_str()).get(k)
                                                          for k in ("pre_tokenizer", "decoder")]):
        # a lone byte of 0x80 or more is no UTF-8 text: it decodes to the replacement character
        found |= {i for piece, i in vocab.items()
                  if len(piece) == 1 and tokenizer.convert_tokens_to_string([piece]) == "\ufffd"}
    return found


def suggestion(texts: list[str]) -> str:
    """Models that read the script the texts are mostly written in."""
    sample = "".join(texts[:200])
    if KANA.search(sample):
        return ("a Japanese or multilingual model, e.g. gemma3-270m (bundled) or tohoku-nlp/bert-base-japanese-v3 "
                "from the Hub")
    if CJK.search(sample):
        return "a multilingual model, e.g. gemma3-270m (bundled) or FacebookAI/xlm-roberta-base from the Hub"
    return "a multilingual model, e.g. FacebookAI/xlm-roberta-base from the Hub or gemma3-270m (bundled)"
