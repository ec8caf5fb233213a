"""Read labelled text from JSONL, CSV or a folder per class, refusing bad input with file, line and problem."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from tunelab.config import DataConfig
from tunelab.errors import UserError


@dataclass
class Example:
    text: str
    label: str | None
    text_pair: str | None = None
    where: str = ""  # "file:line" for messages


def _decoded_lines(path: Path) -> list[str]:
    """The file's lines as text; the first line that is not UTF-8 is named in the error."""
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines = raw.split(b"\n")
    out = []
    for i, line in enumerate(lines, 1):
        try:
            out.append(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1}); "
                            "re-save the file as UTF-8", str(path), i) from None
    return out


def _label(value, path: Path, line: int, key: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UserError(f"label '{key}' must be a string or an integer, got {json.dumps(value)}", str(path), line)
    value = str(value).strip()
    if not value:
        raise UserError(f"label '{key}' is empty", str(path), line)
    return value


def _text(value, path: Path, line: int, key: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"'{key}' must be a string, got {json.dumps(value)}", str(path), line)
    return value


def read_jsonl(path: Path, cfg: DataConfig, need_label: bool = True) -> list[Example]:
    rows = []
    for i, line in enumerate(_decoded_lines(path), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"invalid JSON ({e.msg} at column {e.colno})", str(path), i) from None
        if not isinstance(rec, dict):
            raise UserError("each line must be a JSON object", str(path), i)
        if cfg.text_column not in rec:
            raise UserError(f"missing text field '{cfg.text_column}'", str(path), i)
        label = None
        if need_label or cfg.label_column in rec:
            if cfg.label_column not in rec:
                raise UserError(f"missing label field '{cfg.label_column}'", str(path), i)
            label = _label(rec[cfg.label_column], path, i, cfg.label_column)
        pair = rec.get(cfg.text_pair_column)
        rows.append(Example(_text(rec[cfg.text_column], path, i, cfg.text_column), label,
                            None if pair is None else _text(pair, path, i, cfg.text_pair_column), f"{path}:{i}"))
    return rows


def read_csv(path: Path, cfg: DataConfig, need_label: bool = True) -> list[Example]:
    text = "\n".join(_decoded_lines(path))
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise UserError("empty file", str(path)) from None
    header = [h.strip() for h in header]
    if cfg.text_column not in header:
        raise UserError(f"no '{cfg.text_column}' column in the header (columns: {', '.join(header)}); "
                        "set data.text_column", str(path), 1)
    has_label = cfg.label_column in header
    if need_label and not has_label:
        raise UserError(f"no '{cfg.label_column}' column in the header (columns: {', '.join(header)}); "
                        "set data.label_column", str(path), 1)
    rows = []
    for fields in reader:
        line = reader.line_num
        if not fields or all(not f.strip() for f in fields):
            continue
        if len(fields) != len(header):
            raise UserError(f"row has {len(fields)} fields but the header has {len(header)}", str(path), line)
        rec = dict(zip(header, fields))
        label = _label(rec[cfg.label_column], path, line, cfg.label_column) if has_label else None
        rows.append(Example(rec[cfg.text_column], label, rec.get(cfg.text_pair_column) or None, f"{path}:{line}"))
    return rows


def read_folder(path: Path) -> list[Example]:
    rows = []
    classes = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    for d in classes:
        for f in sorted(d.glob("*.txt")):
            text = "\n".join(_decoded_lines(f)).strip()
            if text:
                rows.append(Example(text, d.name, None, str(f)))
    if not classes:
        raise UserError("a data folder needs one sub-folder of .txt files per class", str(path))
    return rows


def read_examples(path: str | Path, cfg: DataConfig, need_label: bool = True) -> list[Example]:
    """All examples of one file or folder; an error names the file, the line and the problem."""
    p = Path(path)
    if not p.exists():
        raise UserError("file not found", str(p))
    if p.is_dir():
        rows = read_folder(p)
    elif p.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        rows = read_jsonl(p, cfg, need_label)
    elif p.suffix.lower() in (".csv", ".tsv"):
        rows = read_csv(p, cfg, need_label)
    elif p.suffix.lower() == ".txt" and not need_label:
        rows = [Example(line, None, None, f"{p}:{i}") for i, line in enumerate(_decoded_lines(p), 1) if line.strip()]
    else:
        raise UserError("unknown data format (use .jsonl, .csv, .tsv or a folder per class)", str(p))
    if not rows:
        raise UserError("no examples found (the file is empty)", str(p))
    return rows


def label_names(examples: list[Example], path: str) -> list[str]:
    """The sorted class names of the training data (numerically when every label is an integer)."""
    names = sorted({e.label for e in examples})
    if all(n.lstrip("-").isdigit() for n in names):
        names = sorted(names, key=int)
    if len(names) < 2:
        raise UserError(f"training data has {len(names)} class ({', '.join(names)}); classification needs at least two", path)
    return names


def check_known_labels(examples: list[Example], names: list[str]) -> None:
    known = set(names)
    for e in examples:
        if e.label not in known:
            file, _, line = e.where.rpartition(":")
            raise UserError(f"label '{e.label}' never occurs in the training data (known: {', '.join(names)})",
                            file or e.where, int(line) if line.isdigit() else None)
