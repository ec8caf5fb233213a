"""Memory settings: gradient checkpointing gives the same gradients and keeps fewer activations."""
from __future__ import annotations

import pytest
import torch

from tunelab.pipeline import build_job


def _gradients_and_saved_bytes(cfg) -> tuple[dict[str, torch.Tensor], int]:
    """One batch's gradients, and the bytes autograd kept for the backward pass (outside checkpointed layers: a
    checkpointed layer keeps only its inputs, through its own hooks)."""
    job = build_job(cfg, torch.device("cpu"))
    job.method.train_mode(job.model)
    batch = job.method.collate(job.task, job.train_items[:16], job.pad_id)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = job.method.forward(job.task, job.model, batch, job.splits.space)
    loss.backward()
    return {n: p.grad.clone() for n, p in job.model.named_parameters() if p.grad is not None}, sum(saved)


@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_less(tuning, task_config):
    cfg = task_config("classification")
    cfg.tuning.name, cfg.model.dropout = tuning, 0.0  # dropout would draw other masks when recomputed
    plain, plain_bytes = _gradients_and_saved_bytes(cfg)
    cfg.train.gradient_checkpointing = True
    checked, checked_bytes = _gradients_and_saved_bytes(cfg)
    assert plain.keys() == checked.keys() and plain
    assert all(torch.allclose(plain[k], checked[k], atol=1e-5, rtol=1e-4) for k in plain)
    assert checked_bytes < 0.6 * plain_bytes, (checked_bytes, plain_bytes)
