"""`tunelab data clean FILE -o OUT`: the fixes a user chooses from `tunelab data check`'s findings, applied to a
copy, with a log line for every record dropped or changed.

The input file is never touched. OUT keeps the input's format (JSONL records or CSV rows, every field as it was,
UTF-8); the log (OUT's name with `.log.jsonl`) holds each dropped record whole and each change before and after,
so nothing is lost. Both are written atomically.
"""
from __future__ import annotations

import csv
import io
import json
import unicodedata
from collections import Counter
from pathlib import Path

from tunelab.config import DataConfig
from tunelab.check import Report, check
from tunelab.data.load import _decoded_lines, csv_rows
from tunelab.errors import UserError
from tunelab.io import atomic_write_jsonl, atomic_write_text

FIXES = {  # option → what it does
    "drop_duplicates": "drop exact duplicates (the first copy stays)",
    "drop_near_duplicates": "drop near duplicates (the first of each group stays)",
    "drop_conflicts": "drop every copy of a text that carries different labels",
    "drop_leaked": "drop training records that also appear (exactly or nearly) in --eval",
    "drop_noise": "drop URL-only, repeated-character and too-short texts",
    "drop_invalid": "drop records that fail the format check",
    "label_errors": "drop likely label errors whose label has an out-of-fold probability below this",
    "normalize": "Unicode NFKC-normalise the texts (full-width letters and digits, compatibility forms)",
    "strip_boilerplate": "remove boilerplate shared by many texts (and drop a text left empty)",
}


def clean(path: str | Path, out: str | Path, task: str | None = None, eval_path: str | None = None,
          cfg: DataConfig | None = None, **fixes) -> dict:
    unknown = set(fixes) - set(FIXES)
    if unknown:
        raise UserError(f"unknown fix {sorted(unknown)[0]!r}")
    chosen = {k: v for k, v in fixes.items() if v not in (None, False)}
    if not chosen:
        raise UserError("choose what to fix: " + ", ".join("--" + k.replace("_", "-") for k in FIXES), "tunelab data clean")
    path, out = Path(path), Path(out)
    if out.resolve() == path.resolve():
        raise UserError("the output must be another file: clean never overwrites its input", str(out))
    cfg = cfg or DataConfig()
    report = check(path, task, eval_path, None, cfg, label_errors="label_errors" in chosen)
    _refuse_unreadable(report, "drop_invalid" in chosen)
    if "drop_leaked" in chosen and not eval_path:
        raise UserError("--drop-leaked needs --eval FILE (the file the training data must not overlap)")
    if "drop_leaked" in chosen and "leaked_training_lines" not in report.stats:
        bad = next(f for f in report.findings if f.file != report.file and f.level == "error")
        raise UserError(f"cannot look for leaks: {bad.message}", bad.file, bad.lines[0] if bad.lines else None)

    drops = _drops(report, chosen)
    records, header = _records(path, cfg)
    log, kept = [], []
    pieces = report.stats.get("boilerplate", []) if "strip_boilerplate" in chosen else []
    for line, record in records:
        if line in drops:
            reason, detail = drops[line]
            log.append({"line": line, "action": "dropped", "reason": reason, "detail": detail, "record": record})
            continue
        if isinstance(record, dict) and cfg.text_column in record and isinstance(record[cfg.text_column], str):
            before = record[cfg.text_column]
            after, reasons = _fix_text(before, "normalize" in chosen, pieces)
            if after != before:
                if not after:
                    log.append({"line": line, "action": "dropped", "reason": "strip-boilerplate",
                                "detail": "nothing left but boilerplate", "record": record})
                    continue
                record = {**record, cfg.text_column: after}
                log.append({"line": line, "action": "changed", "reason": "+".join(reasons), "before": before,
                            "after": after})
        kept.append(record)
    if not kept:
        raise UserError("every record would be dropped; nothing written", str(path))
    log_path = out.with_name(out.name.rsplit(".", 1)[0] + ".log.jsonl")
    if header is None:
        atomic_write_jsonl(out, kept)
    else:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([r.get(h, "") for h in header] for r in kept)
        atomic_write_text(out, buf.getvalue())
    atomic_write_jsonl(log_path, log)
    counts = Counter(f"{entry['action']} {entry['reason']}" for entry in log)
    return {"input": str(path), "output": str(out), "log": str(log_path), "records": len(records), "kept": len(kept),
            "dropped": sum(e["action"] == "dropped" for e in log), "changed": sum(e["action"] == "changed" for e in log),
            "by_reason": dict(counts)}


def _refuse_unreadable(report: Report, drop_invalid: bool) -> None:
    """A file-level problem stops clean; record-level format problems do too unless they are to be dropped."""
    # too little data for a held-out split is training's problem, not a reason to refuse cleaning the file
    errors = [f for f in report.findings if f.level == "error" and f.file == report.file and f.code != "too-few"]
    fatal = [f for f in errors if len(f.lines) != 1 or f.code in ("encoding", "not-found")]
    if fatal:
        raise UserError(fatal[0].message, report.file, fatal[0].lines[0] if fatal[0].lines else None)
    if errors and not drop_invalid:
        raise UserError(f"{len(errors)} records fail the format check (first: line {errors[0].lines[0]}: "
                        f"{errors[0].message}); fix them, or drop them with --drop-invalid", report.file)


def _drops(report: Report, chosen: dict) -> dict[int, tuple[str, str]]:
    """Line → (reason, detail) of every record to drop."""
    drops: dict[int, tuple[str, str]] = {}

    def drop(lines, reason, detail):
        for n in lines:
            drops.setdefault(n, (reason, detail))
    for f in report.findings:
        if f.file != report.file:
            continue
        if f.level == "error" and "drop_invalid" in chosen:
            drop(f.lines, "invalid", f.message)
        elif f.code == "exact-duplicate" and "drop_duplicates" in chosen:
            drop(f.lines[1:], "exact-duplicate", f"a copy of line {f.lines[0]}")
        elif f.code == "near-duplicate" and "drop_near_duplicates" in chosen:
            drop(f.lines[1:], "near-duplicate", f"nearly line {f.lines[0]}")
        elif f.code in ("conflicting-labels", "near-duplicate-conflict") and "drop_conflicts" in chosen:
            drop(f.lines, f.code, f.message)
        elif f.code in ("url-only", "repeated-characters", "too-short") and "drop_noise" in chosen:
            drop(f.lines, f.code, f.message)
    if "drop_leaked" in chosen:
        drop(report.stats.get("leaked_training_lines", []), "leaked", "also in the eval file (exactly or nearly)")
    if "label_errors" in chosen:
        for e in report.stats.get("label_errors", []):
            if e["p_label"] < chosen["label_errors"]:
                drop([e["line"]], "label-error", f"'{e['label']}' has probability {e['p_label']:.3f} out of fold; "
                                                 f"the data suggests '{e['suggested']}'")
    return drops


def _records(path: Path, cfg: DataConfig) -> tuple[list[tuple[int, object]], list[str] | None]:
    """(line, record) of every non-blank record, and the CSV header (None for JSONL): records as the file has
    them (a JSONL line that is not JSON stays its text, for the log)."""
    text = "\n".join(_decoded_lines(path, cfg.encoding))
    if path.suffix.lower() in (".csv", ".tsv"):
        parsed = csv_rows(text, path)
        header = [h.strip() for h in next(parsed)[1]]
        rows = [(line, dict(zip(header, fields))) for line, fields in parsed if any(f.strip() for f in fields)]
        return rows, header
    if path.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
        raise UserError("clean writes JSONL and CSV files", str(path))
    rows = []
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError:
                rows.append((n, line))
    return rows, None


def _fix_text(text: str, normalize: bool, pieces: list[str]) -> tuple[str, list[str]]:
    reasons = []
    if normalize and unicodedata.normalize("NFKC", text) != text:
        text, reasons = unicodedata.normalize("NFKC", text), ["normalize"]
    folded = " ".join(unicodedata.normalize("NFKC", text).split())
    for piece in pieces:
        if piece in folded:
            folded = " ".join(folded.replace(piece, " ").split())
            text = folded
            if "strip-boilerplate" not in reasons:
                reasons.append("strip-boilerplate")
    return text, reasons
