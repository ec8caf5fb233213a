"""CoNLL files: one token per line, its IOB2 tag in the last column, a blank line between sentences."""
from __future__ import annotations

import re
from pathlib import Path

from tunelab.data.load import Example, Problems, _decoded_lines
from tunelab.errors import UserError

TAG = re.compile(r"^(O|[BI]-\S+)$")


def read_conll(path: Path, need_label: bool, encoding: str = "utf-8", problems: Problems | None = None
               ) -> list[Example]:
    """CoNLL-style: one token per line, the tag in the last column, a blank line between sentences. Given
    `problems`, a bad line is noted there and read as a sentence break (`tunelab data check` reads on)."""
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
            try:
                tags.append(_tag(fields, path, i))
            except UserError as e:
                if problems is None:
                    raise
                problems.note(e)
                flush()
                continue
        tokens.append(fields[0])  # as written: a full-width space is a token in Japanese corpora
    flush()
    return rows


def _tag(fields: list[str], path: Path, line: int) -> str:
    """The IOB2 tag of one token line (its last column)."""
    if len(fields) < 2:
        raise UserError("a CoNLL line needs the token and its tag (the last column)", str(path), line)
    if not TAG.match(fields[-1].strip()):
        raise UserError(f"tag '{fields[-1].strip()}' is not IOB2 (O, B-TYPE or I-TYPE)", str(path), line)
    return fields[-1].strip()
