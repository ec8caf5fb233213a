"""Tokenize once, then batch with length bucketing so each batch pads only to its own longest example."""
from __future__ import annotations

import torch

from tunelab.data.load import Example


def encode(tokenizer, examples: list[Example], labels: list[str] | None, max_length: int) -> list[dict]:
    """Token ids per example (no padding yet) and the label index when labels are known."""
    texts = [e.text for e in examples]
    pairs = [e.text_pair for e in examples]
    kwargs = dict(truncation=True, max_length=max_length, padding=False)
    enc = tokenizer(texts, pairs, **kwargs) if any(p is not None for p in pairs) and all(
        p is not None for p in pairs) else tokenizer(texts, **kwargs)
    index = {name: i for i, name in enumerate(labels or [])}
    items = []
    for i, e in enumerate(examples):
        item = {k: enc[k][i] for k in enc.keys()}
        if labels is not None and e.label is not None:
            item["labels"] = index[e.label]
        items.append(item)
    return items


def collate(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    longest = max(len(it["input_ids"]) for it in items)
    batch = {}
    for key in items[0]:
        if key == "labels":
            batch[key] = torch.tensor([it[key] for it in items])
            continue
        fill = pad_id if key == "input_ids" else 0
        batch[key] = torch.tensor([it[key] + [fill] * (longest - len(it[key])) for it in items])
    return batch


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


def split_global(batch: list[int], rank: int, world: int, micro: int) -> list[list[int]]:
    """This process's micro-batches of one global batch: its contiguous share, in slices of `micro`."""
    share = (len(batch) + world - 1) // world
    mine = batch[rank * share:(rank + 1) * share]
    return [mine[i:i + micro] for i in range(0, len(mine), micro)]
