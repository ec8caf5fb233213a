"""Losses that tasks and methods share, each a small function that cites where it comes from.

Every one returns the sum over the batch's rows (the loop divides by the global batch's units, so that batch 8
equals batch 4 with accumulation 2 and two processes of 4). tests/test_losses.py pins each against numbers
computed by hand.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F


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
