"""tunelab.losses against numbers computed by hand (the arithmetic is in each test's comments)."""
from __future__ import annotations

import math

import pytest
import torch

from tunelab import losses


def test_softmax_kl_by_hand():
    # T = 2: teacher (2, 0) → softmax(1, 0) = (e/(e+1), 1/(e+1)) = (0.731059, 0.268941); student (0, 0) → (½, ½).
    # KL = 0.731059·ln(0.731059/0.5) + 0.268941·ln(0.268941/0.5) = 0.277718 − 0.166775 = 0.110943; × T² = 0.443776.
    p = 1 / (1 + math.exp(-1))
    by_hand = 4 * (p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5))
    assert by_hand == pytest.approx(0.443776, abs=1e-6)
    got = losses.softmax_kl(torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]]), 2.0)
    assert float(got) == pytest.approx(by_hand, rel=1e-6)
    # summed over rows; zero where the student already matches
    two = losses.softmax_kl(torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.tensor([[2.0, 0.0], [1.0, 0.0]]), 2.0)
    assert float(two) == pytest.approx(by_hand, rel=1e-6)


def test_sigmoid_kl_by_hand():
    # T = 1, one row, two labels. Label 1: teacher 0 → p = ½, student ln 3 → q = ¾:
    # KL = ½ ln(½/¾) + ½ ln(½/¼) = ½ (ln 2 − ln 1.5) = 0.143841. Label 2: teacher = student → 0. Mean over labels: 0.071921.
    got = losses.sigmoid_kl(torch.tensor([[math.log(3), 5.0]]), torch.tensor([[0.0, 5.0]]), 1.0)
    assert float(got) == pytest.approx(0.5 * (math.log(2) - math.log(1.5)) / 2, rel=1e-5)


def test_soft_targets_temperature():
    logits = torch.tensor([2.0, 1.0, 0.0])
    assert losses.soft_targets(logits, 1.0).tolist() == pytest.approx(torch.softmax(logits, -1).tolist())
    assert losses.soft_targets(logits, 1e4).tolist() == pytest.approx([1 / 3] * 3, abs=1e-3)


def test_bradley_terry_by_hand():
    # margins 0 and ln 3: −ln σ(0) = ln 2 = 0.693147; −ln σ(ln 3) = −ln ¾ = 0.287682; sum 0.980829
    got = losses.bradley_terry(torch.tensor([1.0, math.log(3)]), torch.tensor([1.0, 0.0]))
    assert float(got) == pytest.approx(math.log(2) - math.log(0.75), rel=1e-6)


def test_dpo_by_hand_and_ln2_at_the_reference():
    # β = 0.1; policy log-probs chosen −10, rejected −12; reference −11 and −11:
    # rewards 0.1·(−10 + 11) = 0.1 and 0.1·(−12 + 11) = −0.1; loss = −ln σ(0.2) = ln(1 + e^−0.2) = 0.598139
    args = [torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.0)]
    chosen, rejected = losses.dpo_rewards(*args, beta=0.1)
    assert (float(chosen), float(rejected)) == pytest.approx((0.1, -0.1))
    assert float(losses.dpo(*args, beta=0.1)) == pytest.approx(math.log(1 + math.exp(-0.2)), rel=1e-6)
    same = torch.tensor([-3.0, -7.0, -1.5])
    assert float(losses.dpo(same, same - 1, same, same - 1, beta=0.5)) == pytest.approx(3 * math.log(2), rel=1e-6)


def _output_layer(monkeypatch, seed: int, bias: bool, weight_trains: bool):
    """30 hidden rows of 16, a 1,000-token output layer (its weight trainable or not, a bias or not), targets, and
    chunks of 7 rows (5 chunks, the last short): (hidden, weight, bias, targets, generator, the leaves)."""
    monkeypatch.setattr(losses, "CHUNK_BYTES", 4 * 1000 * 7)
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(30, 16, generator=g, requires_grad=True)
    weight = torch.randn(1000, 16, generator=g).requires_grad_(weight_trains)
    b = torch.randn(1000, generator=g, requires_grad=True) if bias else None
    targets = torch.randint(1000, (30,), generator=g)
    return hidden, weight, b, targets, g, [t for t in (hidden, weight, b) if t is not None and t.requires_grad]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weight_trains", [False, True])
def test_linear_log_probs_in_chunks_equal_the_whole_logits_under_any_incoming_gradient(monkeypatch, bias,
                                                                                       weight_trains):
    """Each row's log-probability of its target, 7 rows at a time (30 rows), equals log_softmax of the whole
    logits, and the gradients of hidden states, weight and bias under incoming gradients that differ per row (as
    DPO's do: each row is scaled by its pair's sigmoid) equal autograd's through the whole logits; without
    gradients they are the same values."""
    hidden, weight, b, targets, g, leaves = _output_layer(monkeypatch, 1, bias, weight_trains)
    incoming = torch.randn(30, generator=g)

    ours = losses.linear_log_probs(hidden, weight, b, targets)
    plain = torch.log_softmax(torch.nn.functional.linear(hidden, weight, b).float(), -1).gather(
        1, targets[:, None]).squeeze(1)
    assert torch.allclose(ours.detach(), plain.detach(), atol=1e-5)
    for a, c in zip(torch.autograd.grad((ours * incoming).sum(), leaves),
                    torch.autograd.grad((plain * incoming).sum(), leaves)):
        assert torch.allclose(a, c, atol=1e-5), (a - c).abs().max()
    with torch.no_grad():
        assert torch.allclose(losses.linear_log_probs(hidden, weight, b, targets), plain.detach(), atol=1e-5)
    assert losses.sequence_logps(torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75]]])),
                                 torch.tensor([[-100, 1]])).tolist() == pytest.approx([math.log(0.5)])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weight_trains", [False, True])
def test_linear_cross_entropy_in_chunks_equals_the_whole_logits_with_their_gradients(monkeypatch, bias,
                                                                                     weight_trains):
    """The loss of `hidden @ Wᵀ + b` computed 7 rows at a time (30 rows: 5 chunks, the last short) equals
    F.cross_entropy of the whole logits: the sum, each row's loss, the argmax, and the gradients of the hidden
    states, the weight and the bias under an upstream factor (the loop divides the summed loss by its units)."""
    hidden, weight, b, targets, _, leaves = _output_layer(monkeypatch, 0, bias, weight_trains)

    total, per_row, argmax = losses.linear_cross_entropy(hidden, weight, b, targets)
    kept = [tuple(t.shape) for t in total.grad_fn.saved_tensors if t is not None]
    assert kept == [(30, 16)] + [(1000, 16)] * weight_trains + [(1000,)] * bias  # no frozen weight's gradient
    ours = torch.autograd.grad(total * 0.37, leaves)
    logits = torch.nn.functional.linear(hidden, weight, b).float()
    plain = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    theirs = torch.autograd.grad(plain.sum() * 0.37, leaves)
    assert float(total.detach()) == pytest.approx(float(plain.sum().detach()), rel=1e-6)
    assert torch.allclose(per_row, plain.detach(), atol=1e-5) and not per_row.requires_grad
    assert torch.equal(argmax, logits.argmax(-1))
    for a, c in zip(ours, theirs):
        assert torch.allclose(a, c, atol=1e-5), (a - c).abs().max()
    with torch.no_grad():  # evaluation: no gradients made
        assert float(losses.linear_cross_entropy(hidden, weight, b, targets)[0]) == pytest.approx(float(total))
