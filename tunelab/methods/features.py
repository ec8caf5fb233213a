"""head: the frozen backbone's outputs for every training example, computed once and replayed.

The head method keeps its frozen backbone in eval mode, so the backbone gives the same outputs for an example in
every epoch: the cache runs it once over the training items (length-sorted batches, no autograd) and, during
training steps, stands in for it, answering each batch with the cached outputs padded to the batch's length. The
head's own layers (dropout included) run as before, so the loss and the gradients are those of the uncached run
up to float rounding. Only what the head reads is kept: the pooled output when the head reads nothing else
(BERT's classifier; checked by a probe), else every token's last hidden state, within `BUDGET` bytes (above it
there is no cache and each step runs the backbone as before).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from tunelab.data.batching import FORWARD_TOKENS, token_batches
from tunelab.modes import eval_mode
from tunelab.tasks.base import NOT_INPUTS

BUDGET = 2 << 30  # bytes of cached hidden states (fp32) above which the backbone runs every step instead


class FrozenFeatures(nn.Module):
    """Stands in for the base model: `serving(model, rows)` answers the next forward with rows' cached outputs."""

    def __init__(self, output_type, pooled: list | None, hidden: list | None, width: int):
        super().__init__()
        self.output_type = output_type
        self.pooled, self.hidden, self.width = pooled, hidden, width
        self.rows: list[int] = []

    @property
    def kept(self) -> str:
        """What the cache holds: "pooled" outputs, or every token's "hidden" state."""
        return "hidden" if self.hidden is not None else "pooled"

    def forward(self, input_ids=None, **kwargs):
        batch, length = input_ids.shape
        if self.hidden is not None:
            hidden = input_ids.new_zeros((batch, length, self.width), dtype=torch.float32)
            for row, i in enumerate(self.rows):
                hidden[row, :len(self.hidden[i])] = self.hidden[i]
        else:  # the head reads only the pooled output (the probe proved it): a placeholder of the right shape
            hidden = torch.zeros((), dtype=torch.float32).expand(batch, length, self.width)
        fields = {"last_hidden_state": hidden}
        if self.pooled is not None:
            fields["pooler_output"] = torch.stack([self.pooled[i] for i in self.rows])
        return self.output_type(**fields)

    @contextlib.contextmanager
    def serving(self, model: nn.Module, rows: list[int]):
        """Within the block, `model`'s base model is this cache, answering for the training items `rows`."""
        prefix = model.base_model_prefix
        base = getattr(model, prefix)
        self.rows = rows
        setattr(model, prefix, self)
        try:
            yield
        finally:
            setattr(model, prefix, base)


@torch.no_grad()  # not inference_mode: the cached tensors feed the head's autograd later
def cache_features(task, model: nn.Module, items: list[dict], pad_id: int, device,
                   tokens: int = FORWARD_TOKENS) -> FrozenFeatures | None:
    """The frozen base model's outputs for `items`; None when the head needs every token's hidden state and they
    would exceed BUDGET, or the model has no separable base model."""
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None)
    width = getattr(model.config, "hidden_size", None)
    if not items or not isinstance(base, nn.Module) or base is model or width is None:
        return None
    lengths = [task.length(it) for it in items]
    cache = FrozenFeatures(None, [None] * len(items), [None] * len(items), width)
    keep_hidden = True
    with eval_mode(base):
        for k, batch in enumerate(token_batches(lengths, tokens)):
            out = base(**model_inputs(task, [items[i] for i in batch], pad_id, device))
            cache.output_type = type(out)
            pooled = getattr(out, "pooler_output", None)
            for row, i in enumerate(batch):
                cache.hidden[i] = out.last_hidden_state[row, :lengths[i]].float().clone()
                cache.pooled[i] = pooled[row].float().clone() if pooled is not None else None
            if k == 0:  # the first batch decides what to keep
                keep_hidden = pooled is None or not _reads_only_pooled(task, model, cache, batch[:4], items,
                                                                       pad_id, device)
                if keep_hidden and sum(lengths) * width * 4 > BUDGET:
                    return None
            if not keep_hidden:
                for i in batch:
                    cache.hidden[i] = None
    if not keep_hidden:
        cache.hidden = None
    if cache.pooled[0] is None:
        cache.pooled = None
    return cache


def model_inputs(task, items: list[dict], pad_id: int, device) -> dict:
    """A padded batch of `items` as model inputs only (no labels or teacher outputs), on `device`."""
    batch = task.collate(items, pad_id)
    for key in NOT_INPUTS:
        batch.pop(key, None)
    return {k: v.to(device) for k, v in batch.items()}


def _reads_only_pooled(task, model, cache: FrozenFeatures, rows: list[int], items, pad_id, device) -> bool:
    """Does the head give the same answer when every token's hidden state is NaN? Then it reads only the pooled
    output (probed in eval mode, so that dropout cannot hide a difference)."""
    inputs = model_inputs(task, [items[i] for i in rows], pad_id, device)
    real = cache.hidden
    with eval_mode(model), cache.serving(model, rows):  # (the frozen base stays in eval mode for later batches)
        full = model(**inputs).logits
        cache.hidden = list(real)
        for i in rows:
            cache.hidden[i] = torch.full_like(real[i], float("nan"))
        try:
            blind = model(**inputs).logits
        finally:
            cache.hidden = real
    return bool(torch.isfinite(blind).all()) and torch.allclose(full, blind)
