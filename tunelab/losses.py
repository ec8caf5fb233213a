"""Losses that tasks and methods share, each a small function that cites where it comes from.

Every one returns the sum over the batch's rows (the loop divides by the global batch's units, so that batch 8
equals batch 4 with accumulation 2 and two processes of 4). tests/test_losses.py pins each against numbers
computed by hand.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F


IGNORE = -100  # the label of a token that carries no loss (PyTorch's and transformers' ignore_index)


def token_stats(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> tuple[torch.Tensor, ...]:
    """Per row: (summed cross-entropy of the labelled tokens, labelled tokens, correct argmax tokens); with
    `shift`, the logits at position t score token t + 1 (causal language models)."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE
    loss = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none") * mask
    correct = (logits.argmax(-1) == labels) & mask
    return loss.sum(1), mask.sum(1), correct.sum(1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's labelled tokens (next-token: logits at t score the token at t + 1)."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE
    logps = torch.gather(logits, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return (logps * mask).sum(1)


def soft_targets(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T): T = 1 is the teacher's own distribution, larger T flattens it towards uniform
    (Hinton, Vinyals & Dean 2015, §2)."""
    return torch.softmax(logits.float() / temperature, -1)


def softmax_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher / T) ‖ softmax(student / T)), summed over the rows: knowledge distillation of a
    classifier (Hinton et al. 2015). The T² keeps the soft term's gradients on the scale of a hard term's as T
    changes (their §2)."""
    soft_teacher = F.log_softmax(teacher.float() / temperature, -1)
    soft_student = F.log_softmax(student.float() / temperature, -1)
    return temperature ** 2 * F.kl_div(soft_student, soft_teacher, log_target=True, reduction="sum")


def sigmoid_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · the KL divergence of each label's yes/no distribution, sigmoid(teacher / T) against sigmoid(student
    / T), averaged over the labels and summed over the rows: Hinton et al.'s soft term for independent labels
    (multilabel), on the same scale as its binary cross-entropy."""
    t, s = teacher.float() / temperature, student.float() / temperature
    p = torch.sigmoid(t)
    kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return temperature ** 2 * kl.mean(-1).sum()


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """−log σ(r_chosen − r_rejected), summed over the pairs: the negative log-likelihood that the chosen response
    wins under the Bradley–Terry model (Bradley & Terry 1952), the reward model's loss in InstructGPT (Ouyang et
    al. 2022, eq. 1, one comparison per pair)."""
    return -F.logsigmoid(chosen.float() - rejected.float()).sum()


def dpo_rewards(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor, ref_chosen_logp: torch.Tensor,
                ref_rejected_logp: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The implicit rewards of DPO, β · (log π(y|x) − log π_ref(y|x)), of the chosen and the rejected responses
    (Rafailov et al. 2023, eq. 5)."""
    return beta * (chosen_logp - ref_chosen_logp), beta * (rejected_logp - ref_rejected_logp)


def dpo(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor, ref_chosen_logp: torch.Tensor,
        ref_rejected_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """Direct preference optimisation (Rafailov et al. 2023, eq. 7): the Bradley–Terry loss of the implicit
    rewards, summed over the pairs. ln 2 per pair where the policy equals the reference."""
    return bradley_terry(*dpo_rewards(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta))


CHUNK_BYTES = 64 << 20  # fp32 logits of one chunk: 64 MiB (128 rows of gemma3's 262,144-token vocabulary)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy of the logits `hidden @ weightᵀ + bias` (in fp32, as `logits.float()` gives them) against
    `targets`, without ever holding the [rows × vocabulary] logits: a language model's output layer and loss in
    chunks of rows of at most CHUNK_BYTES of logits each. Returns (the summed loss, differentiable in `hidden`,
    `weight` and `bias`; each row's loss and the argmax token, both detached). With gradients wanted, each chunk's
    gradients are computed while its logits exist — softmax minus the one-hot target, times the weight and the
    hidden rows — and the backward pass only scales them (the loss is a plain sum, so one factor scales all): the
    same products as autograd's backward of the whole logits, summed in another order, with no second pass over
    the vocabulary (the idea of Liger Kernel's fused linear cross-entropy, Hsu et al. 2024; Apple's Cut
    Cross-Entropy, Wijmans et al. 2024, goes further on GPUs)."""
    rows = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    wanted = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not wanted:
        with torch.no_grad():
            return _LinearCrossEntropy.chunks(hidden, weight, bias, targets, rows, False)[:3]
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, rows)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def chunks(hidden, weight, bias, targets, rows: int, grads: tuple[bool, bool, bool] | bool):
        """The summed loss, each row's loss and argmax, and the gradients `grads` asks for (of hidden, weight and
        bias; True: all three, False: none) — a frozen output layer's weight gradient is not made."""
        want_hidden, want_weight, want_bias = (grads,) * 3 if isinstance(grads, bool) else grads
        n = hidden.shape[0]
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        argmax = torch.empty(n, dtype=torch.long, device=hidden.device)
        d_hidden = torch.empty_like(hidden) if want_hidden else None
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        d_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) \
            if want_bias and bias is not None else None
        for start in range(0, n, rows):
            h, y = hidden[start:start + rows], targets[start:start + rows]
            z = F.linear(h, weight, bias).float()
            lse = torch.logsumexp(z, -1)
            losses[start:start + rows] = lse - z.gather(1, y[:, None]).squeeze(1)
            argmax[start:start + rows] = z.argmax(-1)
            if want_hidden or want_weight or d_bias is not None:  # d loss / d z = softmax(z) − onehot(y), in place
                g = z.sub_(lse[:, None]).exp_()
                g[torch.arange(len(y), device=g.device), y] -= 1
                d_z = g.to(hidden.dtype)
                if want_hidden:
                    d_hidden[start:start + rows] = d_z @ weight
                if want_weight:
                    d_weight += (d_z.t() @ h).float()
                if d_bias is not None:
                    d_bias += g.sum(0)
        return losses.sum(), losses, argmax, d_hidden, d_weight, d_bias

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows):
        want = ctx.needs_input_grad
        total, losses, argmax, d_hidden, d_weight, d_bias = _LinearCrossEntropy.chunks(
            hidden, weight, bias, targets, rows, (want[0], want[1], bias is not None and want[2]))
        ctx.save_for_backward(d_hidden, None if d_weight is None else d_weight.to(weight.dtype),
                              None if d_bias is None else d_bias.to(bias.dtype))
        ctx.mark_non_differentiable(losses, argmax)
        return total, losses, argmax

    @staticmethod
    def backward(ctx, d_total, _losses, _argmax):
        return tuple(None if d is None else d * d_total for d in ctx.saved_tensors) + (None, None)


def linear_log_probs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     targets: torch.Tensor) -> torch.Tensor:
    """Each row's log-probability of its target under softmax(`hidden @ weightᵀ + bias`) (in fp32), in the chunks
    of `linear_cross_entropy`, never holding the [rows × vocabulary] logits: what DPO's sequence log-probabilities
    sum. A row's log-probability depends on its own hidden state only, so its gradient (the weight times the
    one-hot target minus the softmax) is made while the chunk's logits exist, and the backward pass scales each
    row's by that row's incoming gradient — any loss of the log-probabilities, with no second pass over the
    vocabulary. An output layer that trains (its gradient would need those incoming gradients first) goes
    through autograd chunk by chunk, each chunk's logits kept for the backward pass."""
    rows = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (weight, bias)):
        parts = []
        for start in range(0, hidden.shape[0], rows):
            z = F.linear(hidden[start:start + rows], weight, bias).float()
            y = targets[start:start + rows]
            parts.append(z.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(z, -1))
        return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    if not (torch.is_grad_enabled() and hidden.requires_grad):
        with torch.no_grad():
            return -_LinearCrossEntropy.chunks(hidden, weight, bias, targets, rows, False)[1]
    return _LinearLogProbs.apply(hidden, weight, bias, targets, rows)


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows):
        _, losses, _, d_hidden, _, _ = _LinearCrossEntropy.chunks(hidden, weight, bias, targets, rows,
                                                                 (True, False, False))
        ctx.save_for_backward(d_hidden)  # each row's gradient of its loss, the negative log-probability
        return -losses

    @staticmethod
    def backward(ctx, d_logps):
        (d_hidden,) = ctx.saved_tensors
        return -d_hidden * d_logps[:, None].to(d_hidden.dtype), None, None, None, None
