"""Reward functions the rl tests name as `rewards:NAME` (this folder is on the path while tests run)."""


def brevity(prompt, answer, record):
    """Shorter answers score higher: learnable by ending at once."""
    return -len(answer) / 50


def broken(prompt, answer, record):
    raise ValueError("no reward for " + record["answer"])


def infinite(prompt, answer, record):
    return float("inf")
