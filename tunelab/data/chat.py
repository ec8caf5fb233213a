"""Chat records: OpenAI-format messages read and checked, rendered with the tokenizer's own chat template, and the
tokens that carry a loss (assistant turns through their end-of-turn token) located.

Shared by the chat SFT, DPO and reward-model stages (tunelab.tasks.lm, tunelab.tasks.preference).
"""
from __future__ import annotations

from pathlib import Path

from tunelab.config import DataConfig
from tunelab.data.load import Example, Problems, Records, json_records, warn
from tunelab.errors import UserError, excerpt
from tunelab.losses import IGNORE  # (the label of a token that carries no loss; its users import it from here too)
ROLES = ("system", "user", "assistant")


def content(value, path: Path, line: int, what: str) -> str:
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        value = "".join(str(p.get("text", "")) for p in value)
    if not isinstance(value, str):
        raise UserError(f"{what}: 'content' must be a string", str(path), line, "wrong-type")
    if not value.strip():
        raise UserError(f"{what}: empty content", str(path), line, "empty")
    return value


def parse_messages(value, path: Path, line: int, need_assistant: bool = True) -> list[dict]:
    """OpenAI chat messages, checked: known roles, non-empty content, `weight` 0/1 on assistant messages only."""
    if not isinstance(value, list) or not value:
        raise UserError("'messages' must be a non-empty list of {role, content} objects", str(path), line, "empty")
    out = []
    for n, m in enumerate(value, 1):
        what = f"message {n}"
        if not isinstance(m, dict):
            raise UserError(f"{what} is not an object", str(path), line)
        role = m.get("role")
        role = "system" if role == "developer" else role
        if role not in ROLES:
            raise UserError(f"{what}: unknown role {excerpt(role)} (use system, user or assistant)", str(path), line,
                            "unknown-role")
        if "content" not in m or m["content"] is None:
            raise UserError(f"{what}: missing content", str(path), line, "missing-content")
        msg = {"role": role, "content": content(m["content"], path, line, what)}
        if "weight" in m:
            if role != "assistant" or m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                raise UserError(f"{what}: 'weight' must be 0 or 1 and only on assistant messages", str(path), line)
            msg["weight"] = int(m["weight"])
        out.append(msg)
    if need_assistant and not any(m["role"] == "assistant" and m.get("weight", 1) for m in out):
        raise UserError("no assistant message to learn from (every conversation needs one with weight 1)",
                        str(path), line, "no-assistant")
    return out


def read_records(path: str | Path, cfg: DataConfig, parse, problems: Problems | None = None) -> list[Example]:
    """Examples from a JSONL file, one per record; with data.skip_invalid, bad records are counted and skipped;
    given `problems`, bad records are noted there (`tunelab data check`)."""
    p = Path(path)
    if not p.is_file():
        raise UserError("file not found", str(p))
    if p.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
        raise UserError("this task reads JSONL (one JSON object per line)", str(p))
    records = Records(p, cfg.skip_invalid, problems)
    for i, rec in json_records(p, cfg.encoding, problems):
        records.add(lambda: Example("", parse(rec, p, i), where=f"{p}:{i}"))
    rows = records.done()
    if not rows:
        raise UserError("no usable records found", str(p))
    return rows


def _apply(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    from jinja2.exceptions import TemplateError

    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    try:
        return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as e:  # e.g. a template that refuses a system message, or roles out of turn
        raise UserError(f"the model's chat template refused the conversation: {e}", "messages") from None


def render(tokenizer, messages: list[dict], trained: list[int]) -> tuple[list[int], list[int]]:
    """(token ids, labels) of a conversation: labels hold the ids of the messages in `trained` (assistant turns)
    from their first token through the end-of-turn token, and IGNORE everywhere else.

    The template renders each prefix of the conversation; the text between "everything before, plus the
    assistant header" and "everything through this message" is the message and its end-of-turn marker.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the model's tokenizer has no chat template, which chat, dpo and reward data are rendered "
                        "with; use an instruct model (e.g. smollm2) or a folder whose tokenizer has one", "--model")
    full = _apply(tokenizer, messages)
    spans = []
    for i in trained:
        before, through = _apply(tokenizer, messages[:i], True), _apply(tokenizer, messages[:i + 1])
        if not (full.startswith(through) and through.startswith(before)):
            raise UserError("the chat template does not render a conversation prefix by prefix, so the assistant "
                            "tokens cannot be located", "--model")
        spans.append((len(before), len(through.rstrip())))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    labels = [t if any(a <= start < b for a, b in spans) else IGNORE
              for t, (start, _) in zip(enc["input_ids"], enc["offset_mapping"])]
    return list(enc["input_ids"]), labels


def fit_length(ids: list[int], labels: list[int], max_length: int, overlong: str) -> tuple[list[int], list[int]] | None:
    """Apply the overlong policy: None when the example must go (dropped, or nothing trainable left)."""
    if len(ids) > max_length:
        if overlong == "drop":
            return None
        ids, labels = ids[:max_length], labels[:max_length]
    return (ids, labels) if any(t != IGNORE for t in labels[1:]) else None


def report_overlong(kept: int, total: int, long: int, max_length: int, overlong: str, what: str) -> None:
    if long:
        verb = "dropped" if overlong == "drop" else "truncated"
        lost = total - kept if overlong == "truncate" else 0
        empty = f"; {lost} left with no response token were dropped" if lost else ""
        warn(f"{long} of {total} {what} are longer than max_length {max_length} tokens and were {verb} "
              f"(data.overlong){empty}; {kept} used")
