"""CoNLL files: one token per line, its IOB2 tag in the last column, a blank line between sentences."""
from __future__ import annotations

import re
from pathlib import Path

from tunelab.data.load import Example, _decoded_lines
from tunelab.errors import UserError

TAG = re.compile(r"^(O|[BI]-\S+)$")


def read_conll(path: Path, need_label: bool, encoding: str = "utf-8") -> list[Example]:
    """CoNLL-style: one token per line, the tag in the last column, a blank line between sentences."""
    rows, tokens, tags, start = [], [], [], 0
    lines = _decoded_lines(path, encoding)

    def flush():
        if tokens:
            rows.append(Example(" ".join(tokens), list(tags) if need_label else None, where=f"{path}:{start}",
                                tokens=list(tokens)))
        tokens.clear()
        tags.clear()

    for i, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if not line.strip() or line.startswith("-DOCSTART-"):
            flush()
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        if not tokens:
            start = i
        if need_label:
            if len(fields) < 2:
                raise UserError("a CoNLL line needs the token and its tag (the last column)", str(path), i)
            if not TAG.match(fields[-1].strip()):
                raise UserError(f"tag '{fields[-1].strip()}' is not IOB2 (O, B-TYPE or I-TYPE)", str(path), i)
            tags.append(fields[-1].strip())
        tokens.append(fields[0])  # as written: a full-width space is a token in Japanese corpora
    flush()
    return rows
