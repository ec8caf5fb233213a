"""Read labelled text from JSONL, CSV or a folder per class, refusing bad input with file, line and problem.

The file formats live here; what a label is (a class, a list of classes, a number) is the task's business:
readers take the task's `parse_label` and default label key.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.config import DataConfig
from tunelab.errors import UserError, cut, excerpt

log = logging.getLogger(__name__)


@dataclass
class Example:
    text: str
    label: Any  # str (classification), list[str] (multilabel), float (regression), list[str] tags (ner), or None
    text_pair: str | None = None
    where: str = ""  # "file:line" for messages
    tokens: list[str] | None = None  # ner: the words the tags belong to
    group: str | None = None  # cross-validation never splits a group
    image: Any = None  # image tasks: the decoded 8-bit RGB picture (PIL); `text` is then its file's path


def where_parts(where: str) -> tuple[str, int | None]:
    """("file", line) of an Example.where string."""
    file, _, line = where.rpartition(":")
    return (file, int(line)) if file and line.isdigit() else (where, None)


def _decoded_lines(path: Path, encoding: str = "utf-8") -> list[str]:
    """The file's lines as text. UTF-8 (a byte-order mark is dropped) unless `encoding` names another codec, or is
    `auto`: the encoding is detected (tunelab.data.encoding). A UTF-8 file that is not UTF-8 fails on its first bad
    line, with the encoding it looks like and how to read it."""
    from tunelab.data import encoding as enc

    raw = path.read_bytes()
    if encoding == "auto":
        codec = enc.detect(raw)
        if codec is None:
            raise UserError("cannot tell the text encoding (not UTF-8, UTF-16, Shift_JIS or EUC-JP); "
                            "name it with --encoding CODEC", str(path), code="encoding")
        try:
            return raw.decode(codec).lstrip("\ufeff").split("\n")
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise UserError(f"not valid {enc.name(codec)} text (byte {e.start}); name the encoding with --encoding "
                            "CODEC, or re-save it as UTF-8", str(path), line, "encoding") from None
    if encoding not in ("utf-8", "utf8"):
        try:
            return raw.decode(encoding).split("\n")
        except LookupError:
            raise UserError(f"unknown encoding {encoding!r}", "--encoding", code="encoding") from None
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise UserError(f"not {encoding} text (byte 0x{raw[e.start]:02x}); try --encoding auto", str(path),
                            line, "encoding") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines = raw.split(b"\n")
    out = []
    for i, line in enumerate(lines, 1):
        try:
            out.append(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            codec = enc.detect(raw)
            fix = f"it looks like {enc.name(codec)}: read it with --encoding auto, or re-save it as UTF-8" \
                if codec else "re-save the file as UTF-8"
            raise UserError(f"not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1}); {fix}",
                            str(path), i, "encoding") from None
    return out


def class_label(value, path: Path, line: int, key: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UserError(f"label '{key}' must be a string or an integer, got {excerpt(value)}", str(path), line,
                        "wrong-type")
    value = str(value).strip()
    if not value:
        raise UserError(f"label '{key}' is empty", str(path), line, "empty")
    return value


def _text(value, path: Path, line: int, key: str, required: bool = True) -> str:
    if not isinstance(value, str):
        raise UserError(f"'{key}' must be a string, got {excerpt(value)}", str(path), line, "wrong-type")
    if required and not value.strip():
        raise UserError(f"'{key}' is empty (data.skip_invalid skips such records in training)", str(path), line,
                        "empty")
    return value


def warn(message: str) -> None:
    log.warning("%s", message)


class Problems:
    """The bad records of one file, noted instead of raised, so that `tunelab data check` reads a file once and
    lists every bad record. A reader given one notes each bad record's error here and reads on; the error after
    `limit` is raised, which ends the reading (a file that broken is not listed to its end)."""

    def __init__(self, limit: int):
        self.errors: list[UserError] = []
        self.limit = limit

    def note(self, error: UserError) -> None:
        if len(self.errors) >= self.limit:
            raise error
        self.errors.append(error)


class Records:
    """Collects a file's examples. A record with bad content raises its error, which stops the reading; with
    data.skip_invalid it is counted and skipped (a warning names how many and the first); given `problems`
    (`tunelab data check`) its error is noted there."""

    def __init__(self, path: Path, skip: bool, problems: Problems | None = None):
        self.path, self.skip, self.problems, self.rows, self.skipped = path, skip, problems, [], []

    def add(self, make) -> None:
        try:
            self.rows.append(make())
        except UserError as e:
            if self.skip:
                self.skipped.append(e)
            elif self.problems is None:
                raise
            else:
                self.problems.note(e)

    def done(self) -> list:
        if self.skipped:
            warn(f"{self.path}: skipped {len(self.skipped)} invalid records (data.skip_invalid); "
                 f"first: {self.skipped[0]}")
        return self.rows


def parse_json(text: str, path, line: int | None) -> Any:
    """One JSON value; whatever the text, a bad one is a UserError naming the file and line, never a traceback."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"invalid JSON ({e.msg} at column {e.colno})", str(path), line, "bad-json") from None
    except RecursionError:
        raise UserError("invalid JSON (nested too deeply to read)", str(path), line, "bad-json") from None
    except ValueError:  # Python refuses integers of more than 4,300 digits (sys.get_int_max_str_digits)
        raise UserError("invalid JSON (a number too long to read)", str(path), line, "bad-json") from None


def json_records(path: Path, encoding: str = "utf-8", problems: Problems | None = None):
    """(line number, object) for each non-blank line of a JSONL file; a bad line is named in the error (or, given
    `problems`, noted there and skipped)."""
    for i, line in enumerate(_decoded_lines(path, encoding), 1):
        if not line.strip():
            continue
        try:
            rec = parse_json(line, path, i)
            if not isinstance(rec, dict):
                raise UserError("each line must be a JSON object", str(path), i, "not-an-object")
        except UserError as e:
            if problems is None:
                raise
            problems.note(e)
            continue
        yield i, rec


def read_jsonl(path: Path, cfg: DataConfig, need_label: bool = True, parse=class_label,
               default_key: str = "label", problems: Problems | None = None) -> list[Example]:
    key = cfg.label_column or default_key
    records = Records(path, cfg.skip_invalid, problems)

    def example(i: int, rec: dict) -> Example:
        if cfg.text_column not in rec:
            raise UserError(f"missing text field '{cfg.text_column}'", str(path), i, "missing-text")
        label = label_of(rec, key, need_label, parse, path, i)
        pair = rec.get(cfg.text_pair_column)
        return Example(_text(rec[cfg.text_column], path, i, cfg.text_column), label,
                       None if pair is None else _text(pair, path, i, cfg.text_pair_column, False), f"{path}:{i}",
                       group=group_of(rec, cfg, path, i))
    for i, rec in json_records(path, cfg.encoding, problems):
        records.add(lambda: example(i, rec))
    return records.done()


def label_of(rec: dict, key: str, need_label: bool, parse, path: Path, line: int):
    """The record's label under `key`, parsed; None where labels are optional (prediction) and it has none."""
    if not need_label and key not in rec:
        return None
    if key not in rec:
        raise UserError(f"missing label field '{key}'", str(path), line, "missing-label")
    return parse(rec[key], path, line, key)


def group_of(rec: dict, cfg: DataConfig, path: Path, line: int) -> str | None:
    if not cfg.group_column:
        return None
    if cfg.group_column not in rec or rec[cfg.group_column] in (None, ""):
        raise UserError(f"missing group field '{cfg.group_column}' (data.group_column)", str(path), line)
    return str(rec[cfg.group_column])


def _columns(header: list[str]) -> str:
    """The header's columns for an error: how many, and the first few names, short."""
    shown = ", ".join(excerpt(h, 24) for h in header[:4])
    return f"{len(header)} columns: {shown}{', …' if len(header) > 4 else ''}"


def csv_rows(text: str, path: Path, problems: Problems | None = None):
    """(line number, fields) of each CSV (or .tsv) row, the header first; a row the csv module cannot parse (a lone
    carriage return in an unquoted field, a NUL byte, a field past its size limit) is a UserError naming the line.
    Given `problems`, such a row after the header is noted there and skipped (the csv reader starts afresh on the
    next line); a header that cannot be read always raises: the rows mean nothing without it."""
    reader = csv.reader(io.StringIO(text), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    header_read = False
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            error = UserError(f"not valid CSV ({e})", str(path), reader.line_num)
            if problems is None or not header_read:
                raise error from None
            problems.note(error)
            continue
        header_read = True
        yield reader.line_num, fields


def read_csv(path: Path, cfg: DataConfig, need_label: bool = True, parse=class_label,
             default_key: str = "label", problems: Problems | None = None) -> list[Example]:
    key = cfg.label_column or default_key
    rows = csv_rows("\n".join(_decoded_lines(path, cfg.encoding)), path, problems)
    try:
        _, header = next(rows)
    except StopIteration:
        raise UserError("empty file", str(path), code="empty") from None
    header = [h.strip() for h in header]
    if cfg.text_column not in header:
        raise UserError(f"no '{cfg.text_column}' column in the header ({_columns(header)}); "
                        "set data.text_column", str(path), 1)
    has_label = key in header
    if need_label and not has_label:
        raise UserError(f"no '{key}' column in the header ({_columns(header)}); "
                        "set data.label_column", str(path), 1)
    records = Records(path, cfg.skip_invalid, problems)

    def example(line: int, fields: list[str]) -> Example:
        if len(fields) != len(header):
            raise UserError(f"row has {len(fields)} fields but the header has {len(header)}", str(path), line,
                            "field-count")
        rec = dict(zip(header, fields))
        label = parse(rec[key], path, line, key) if has_label else None
        return Example(_text(rec[cfg.text_column], path, line, cfg.text_column), label,
                       rec.get(cfg.text_pair_column) or None, f"{path}:{line}", group=group_of(rec, cfg, path, line))
    for line, fields in rows:
        if fields and any(f.strip() for f in fields):
            records.add(lambda: example(line, fields))
    return records.done()


def read_folder(path: Path, encoding: str = "utf-8") -> list[Example]:
    rows = []
    classes = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    for d in classes:
        for f in sorted(d.glob("*.txt")):
            text = "\n".join(_decoded_lines(f, encoding)).strip()
            if text:
                rows.append(Example(text, d.name, None, str(f)))
    if not classes:
        raise UserError("a data folder needs one sub-folder of .txt files per class", str(path))
    return rows


def read_examples(path: str | Path, cfg: DataConfig, need_label: bool = True, parse=class_label,
                  default_key: str = "label", folders: bool = True, problems: Problems | None = None
                  ) -> list[Example]:
    """All examples of one file or folder; an error names the file, the line and the problem. Given `problems`,
    bad records are noted there and the rest read (`tunelab data check`)."""
    p = Path(path)
    if not p.exists():
        raise UserError("file not found", str(p))
    if p.is_dir() and folders:
        rows = read_folder(p, cfg.encoding)
    elif p.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        rows = read_jsonl(p, cfg, need_label, parse, default_key, problems)
    elif p.suffix.lower() in (".csv", ".tsv"):
        rows = read_csv(p, cfg, need_label, parse, default_key, problems)
    elif p.suffix.lower() == ".txt" and not need_label:
        rows = [Example(line, None, None, f"{p}:{i}") for i, line in enumerate(_decoded_lines(p, cfg.encoding), 1) if line.strip()]
    else:
        raise UserError("unknown data format (use .jsonl, .csv, .tsv or a folder per class)", str(p))
    if not rows:
        raise UserError("no examples found (the file is empty)", str(p), code="empty")
    return rows


def label_names(examples: list[Example], path: str) -> list[str]:
    """The sorted class names of the training data (numerically when every label is an integer)."""
    names = sorted({e.label for e in examples})
    if all(n.lstrip("-").isdigit() for n in names):
        names = sorted(names, key=int)
    if len(names) < 2:
        raise UserError(f"training data has {len(names)} class ({', '.join(names)}); classification needs at least two", path)
    return names


def check_known_labels(examples: list[Example], names: list[str], flat=lambda label: [label]) -> None:
    known = set(names)
    for e in examples:
        for name in flat(e.label):
            if name not in known:
                raise UserError(f"label '{cut(name)}' never occurs in the training data "
                                f"(known: {cut(', '.join(names), 200)})",
                                *where_parts(e.where))
