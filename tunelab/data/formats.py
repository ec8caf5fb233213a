"""Which kind of records a data file holds, from its extension and first record: the task that reads it."""
from __future__ import annotations


from tunelab.data.load import parse_json
from tunelab.errors import UserError

FORMAT_TASK = {"chat": "chat", "preference": "dpo", "text_label": "classification", "text_labels": "multilabel",
               "text_target": "regression", "tokens_tags": "ner", "text": "clm"}


def detect_format(data: str, ext: str, name: str) -> str:
    """The record format, from the extension and the first record (the readers then check every record)."""
    if ext == ".txt":
        return "text"
    if ext == ".csv":
        header = data.split("\n", 1)[0]
        return "text_label" if "label" in [h.strip().strip('"') for h in header.split(",")] else "text"
    data = data.removeprefix("\ufeff")  # a byte-order mark, as every reader drops it
    for line, text in enumerate(data.split("\n"), 1):
        if text.strip():
            break
    else:
        raise UserError("the file is empty", name)
    rec = parse_json(text, name, line)
    if not isinstance(rec, dict):
        raise UserError("each line must be a JSON object", name, line)
    keys = set(rec)
    if "messages" in keys or {"prompt", "completion"} <= keys or {"instruction", "output"} <= keys:
        return "chat"
    if {"prompt", "chosen"} <= keys or {"input", "preferred_output"} <= keys:
        return "preference"
    if "tokens" in keys:
        return "tokens_tags"
    for key, fmt in (("label", "text_label"), ("labels", "text_labels"), ("target", "text_target")):
        if key in keys:
            return fmt
    if "text" in keys:
        return "text"
    raise UserError("unknown record format: expected messages, prompt/completion, instruction/output (Alpaca), "
                    "prompt/chosen/rejected, "
                    "text with label, labels or target, tokens with tags, or text", name, line)
