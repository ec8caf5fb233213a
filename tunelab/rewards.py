"""Verifiable rewards for `--task rl`, named as `--train.reward tunelab.rewards:NAME`. Each is called as
`reward(prompt_messages, answer_text, record)` with the prompt's JSONL record (its `answer` field, for these)."""
from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def number_answer(prompt, answer: str, record: dict) -> float:
    """1 for an answer that is exactly the expected number (`record["answer"]`), 0.5 for an answer that says it
    among other words, 0 otherwise: correctness first, then the asked-for format."""
    expected = str(record["answer"]).strip()
    if answer.strip().rstrip(".") == expected:
        return 1.0
    return 0.5 if expected in NUMBER.findall(answer) else 0.0


def exact_match(prompt, answer: str, record: dict) -> float:
    """1 where the answer, stripped, is `record["answer"]`, else 0."""
    return float(answer.strip() == str(record["answer"]).strip())
