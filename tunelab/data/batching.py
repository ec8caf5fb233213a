"""Batch tokenized examples with length bucketing so each batch pads only to its own longest example.

Tokenizing is the task's job (`Task.encode`); items are dicts of model inputs plus `labels`, and keys that
start with `_` are bookkeeping (gold answers, word positions) that never reach the model.
"""
from __future__ import annotations

import numpy as np
import torch


def collate(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    longest = max(len(it["input_ids"]) for it in items)
    batch = {}
    for key in items[0]:
        if key.startswith("_"):
            continue
        if key == "labels":
            batch[key] = _labels([it[key] for it in items], longest)
            continue
        fill = pad_id if key == "input_ids" else 0
        batch[key] = _padded([it[key] for it in items], longest, fill)
    return batch


def _padded(rows: list[list[int]], longest: int, fill: int) -> torch.Tensor:
    """The rows padded with `fill` to `longest`, as one int64 tensor. Through a numpy array: 30 us for 16 rows of
    10-40 ids where torch.tensor on the padded lists takes 200 us (a cached head's whole training step is ~2 ms)."""
    if not all(type(row[0]) is int for row in rows if row):  # not the tokenizer's ids or masks: torch converts
        return torch.tensor([row + [fill] * (longest - len(row)) for row in rows])
    out = np.full((len(rows), longest), fill, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return torch.from_numpy(out)


def global_batches(lengths: list[int], global_batch: int, seed: int, epoch: int, shuffle: bool = True,
                   bucket: int = 50) -> list[list[int]]:
    """The epoch's batches of example indices, the same on every process and after a resume.

    Shuffle with a generator seeded by (seed, epoch), sort chunks of `bucket` batches by length so that
    batches hold similar lengths (less padding), then shuffle the order of the batches.
    """
    n = len(lengths)
    if not shuffle:
        order = sorted(range(n), key=lambda i: lengths[i])
        return [order[i:i + global_batch] for i in range(0, n, global_batch)]
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    chunk = global_batch * bucket
    batches = []
    for start in range(0, n, chunk):
        part = sorted(order[start:start + chunk], key=lambda i: lengths[i])
        batches += [part[i:i + global_batch] for i in range(0, len(part), global_batch)]
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in perm]


# Padded tokens per forward without autograd (evaluation, the head's feature cache). MiniLM over 1,000 tweets on
# 2 Zen 3 cores: 64 examples at a time (~2,000 tokens) took 7.65-7.85 s against 8.28-8.29 in batches of 16 (~500
# tokens; MKL's rate grows with the rows) and 9.39 in batches of 128; 1,024 tokens longest first was faster than
# 64 examples (see token_batches) and holds a fifth of the largest batch's activations on those tweets.
FORWARD_TOKENS = 1024


def token_batches(lengths: list[int], tokens: int, rows: int | None = None) -> list[list[int]]:
    """All examples sorted by length, longest first, in batches of at most `tokens` padded tokens and `rows`
    examples (at least one example each): for a forward without autograd over a whole set (evaluation, the head's
    feature cache).

    Even-sized batches, longest first, suit glibc's malloc: it maps a block above its mmap threshold afresh and
    faults in every page, and raises that threshold only to the size of a mapped block it frees. In batches of 64
    examples, shortest first, every batch's activations outgrow the last one's. MiniLM over 1,000 tweets on 2
    Zen 3 cores, a fresh process each, 4 alternating rounds: 1,024 tokens longest first 7.85-8.50 s, 105-342
    thousand page faults, peak RSS +136-173 MB; 64 examples shortest first 8.18-9.63 s, 380-454 thousand,
    +191-211 MB.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, start = [], 0
    while start < len(order):
        take = max(1, tokens // max(1, lengths[order[start]]))  # the first example is the batch's longest
        take = min(take, rows) if rows else take
        batches.append(order[start:start + take])
        start += take
    return batches


def split_global(batch: list[int], rank: int, world: int, micro: int) -> list[list[int]]:
    """This process's micro-batches of one global batch: its contiguous share, in slices of `micro`."""
    share = (len(batch) + world - 1) // world
    mine = batch[rank * share:(rank + 1) * share]
    return [mine[i:i + micro] for i in range(0, len(mine), micro)]


def _labels(values: list, longest: int) -> torch.Tensor:
    """Class ids, numbers, per-label 0/1 vectors (multilabel) or per-token ids padded with -100 (ner)."""
    first = values[0]
    if isinstance(first, list) and first and isinstance(first[0], int):
        return _padded(values, longest, -100)
    if isinstance(first, float) or (isinstance(first, list) and first and isinstance(first[0], float)):
        return torch.tensor(values, dtype=torch.float32)
    return torch.tensor(values)
