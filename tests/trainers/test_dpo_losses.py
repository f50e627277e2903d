"""DPO, log-prob and weighted-SFT losses against hand-worked numbers (algorithms.md §2.3, §2.6)."""

from __future__ import annotations

import math

import pytest
import torch

from trainers.losses import bradley_terry_loss, dpo_loss, sequence_logps, token_logps, weighted_sft_loss

LN2 = math.log(2.0)


def f64(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


# ----------------------------------------------------------------------------- DPO


def test_dpo_hand_worked_values() -> None:
    # β = 0.5
    # r⁺ = 0.5 · ([-1, -2, -3] - [-1.5, -2, -2]) = [0.25, 0, -0.5]
    # r⁻ = 0.5 · ([-2, -2, -1] - [-1.5, -2, -2]) = [-0.25, 0, 0.5]
    # d = r⁺ - r⁻ = [0.5, 0, -1]
    # -log σ(0.5) = log(1 + e^-0.5) = 0.474076984180
    # -log σ(0)   = ln 2            = 0.693147180560
    # -log σ(-1)  = log(1 + e)      = 1.313261687518
    # mean = 2.480485852258 / 3 = 0.826828617419
    loss, stats = dpo_loss(f64(-1, -2, -3), f64(-2, -2, -1), f64(-1.5, -2, -2), f64(-1.5, -2, -2), beta=0.5)
    assert loss.item() == pytest.approx(0.826828617419, abs=1e-12)
    assert stats["rewards/chosen"].item() == pytest.approx(-0.25 / 3)
    assert stats["rewards/rejected"].item() == pytest.approx(0.25 / 3)
    assert stats["rewards/margin"].item() == pytest.approx(-0.5 / 3)
    assert stats["rewards/accuracy"].item() == pytest.approx(1 / 3)  # the tie (d = 0) counts as wrong
    assert stats["logps/chosen"].item() == pytest.approx(-2.0)
    assert stats["logps/rejected"].item() == pytest.approx(-5 / 3)
    assert all(not v.requires_grad for v in stats.values())


def test_zero_margin_gives_ln2_for_any_beta_and_smoothing() -> None:
    g = torch.Generator().manual_seed(0)
    policy, ref = torch.randn(6, generator=g), torch.randn(6, generator=g)
    # the same log-ratio on both sides: β·margin = 0
    for beta, eps in [(0.1, 0.0), (2.0, 0.0), (0.5, 0.3)]:
        loss, stats = dpo_loss(policy + 1.3, policy, ref + 1.3, ref, beta, eps)
        assert loss.item() == pytest.approx(LN2, abs=1e-6)
        assert stats["rewards/margin"].item() == pytest.approx(0.0, abs=1e-6)
    # policy == reference (the first step of every run): ln 2 again
    loss, _ = dpo_loss(policy, ref, policy, ref, beta=0.1)
    assert loss.item() == pytest.approx(LN2, abs=1e-6)


def test_label_smoothing_hand_value() -> None:
    # β = 1, d = 1, ε = 0.2: 0.8 · log(1 + e^-1) + 0.2 · log(1 + e) = 0.250609350 + 0.262652338 = 0.513261688
    loss, _ = dpo_loss(f64(0.0), f64(-1.0), f64(0.0), f64(0.0), beta=1.0, label_smoothing=0.2)
    assert loss.item() == pytest.approx(0.513261687518, abs=1e-12)


def test_dpo_is_bradley_terry_on_the_implicit_rewards_and_the_reference_gets_no_gradient() -> None:
    g = torch.Generator().manual_seed(1)
    pc, pr = (torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    rc, rr = (torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    beta = 0.3
    loss, stats = dpo_loss(pc, pr, rc, rr, beta)
    bt, bt_stats = bradley_terry_loss(beta * (pc - rc), beta * (pr - rr))
    assert loss.item() == pytest.approx(bt.item(), abs=1e-12)
    assert stats["rewards/accuracy"] == bt_stats["accuracy"]
    loss.backward()
    # dL/dπ⁺_i = -β σ(-d_i) / B and dL/dπ⁻_i = +β σ(-d_i) / B
    d = beta * ((pc - rc) - (pr - rr)).detach()
    expected = -beta * torch.sigmoid(-d) / 8
    assert torch.allclose(pc.grad, expected) and torch.allclose(pr.grad, -expected)
    assert rc.grad is None and rr.grad is None


def test_dpo_rejects_bad_arguments() -> None:
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        dpo_loss(x, x, torch.zeros(2), x, beta=0.1)


# ----------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_token_logps_equal_log_softmax_gather_with_the_same_gradient(chunk: int) -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    got = token_logps(logits, labels, chunk_size=chunk)
    want = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(got, want)
    (grad_got,) = torch.autograd.grad(got.sum(), logits)
    (grad_want,) = torch.autograd.grad(want.sum(), logits)
    torch.testing.assert_close(grad_got, grad_want)
    # bf16 logits: the softmax is still taken in float32
    assert token_logps(logits.detach().bfloat16(), labels, chunk).dtype == torch.float32


def test_sequence_logps_sums_only_masked_positions() -> None:
    per_token = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, -4.0]])
    mask = torch.tensor([[False, True, True], [False, False, False]])
    assert sequence_logps(per_token, mask).tolist() == [-5.0, 0.0]  # a row with nothing scored: 0
    with pytest.raises(ValueError):
        sequence_logps(per_token, mask[:, :2])


# ----------------------------------------------------------------------------- weighted SFT


LOGPS = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]], dtype=torch.float64)
MASK = torch.tensor([[True, True, False], [False, True, True]])  # n = [2, 2]; s = [-3, -11]


def test_weighted_sft_hand_values() -> None:
    w = f64(1.0, 3.0)
    # token_mean:   -(1·-3 + 3·-11) / (1·2 + 3·2) = 36 / 8 = 4.5
    loss, stats = weighted_sft_loss(LOGPS, MASK, w, "token_mean")
    assert loss.item() == pytest.approx(4.5)
    assert stats["tokens"].item() == 4 and stats["weight_mean"].item() == 2
    # sequence_sum: -(1·-3 + 3·-11) / (1 + 3) = 36 / 4 = 9
    loss, _ = weighted_sft_loss(LOGPS, MASK, w, "sequence_sum")
    assert loss.item() == pytest.approx(9.0)


def test_unit_weights_are_plain_sft_and_equal_weights_of_any_size_too() -> None:
    """RWR with β → ∞ (all weights equal) is SFT (algorithms.md §2.6.1), in loss and gradient."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 6, 9, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 9, (3, 6), generator=g)
    mask = torch.rand(3, 6, generator=g) > 0.3
    per_token = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    sft = -(per_token * mask).sum() / mask.sum()  # the usual SFT mean over response tokens
    for weights in (None, torch.ones(3), torch.full((3,), 7.5)):
        loss, _ = weighted_sft_loss(per_token, mask, weights, "token_mean")
        assert loss.item() == pytest.approx(sft.item(), abs=1e-12)
        (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
        (want,) = torch.autograd.grad(sft, logits, retain_graph=True)
        torch.testing.assert_close(grad, want)
    seq, _ = weighted_sft_loss(per_token, mask, torch.full((3,), 0.2), "sequence_sum")
    assert seq.item() == pytest.approx(-(per_token * mask).sum(-1).mean().item(), abs=1e-12)


def test_zero_weight_rows_and_accumulation_normalizer() -> None:
    # a zero weight removes the row entirely
    loss, _ = weighted_sft_loss(LOGPS, MASK, f64(0.0, 1.0))
    assert loss.item() == pytest.approx(11 / 2)
    # two micro-batches with the window's denominator sum to the big batch's loss
    w = f64(2.0, 0.5)
    big, _ = weighted_sft_loss(LOGPS, MASK, w)
    window = (w * MASK.sum(-1)).sum()
    parts = [
        weighted_sft_loss(LOGPS[i : i + 1], MASK[i : i + 1], w[i : i + 1], normalizer=window)[0]
        for i in (0, 1)
    ]
    assert sum(parts).item() == pytest.approx(big.item(), abs=1e-12)
    # nothing to score: 0, not NaN
    empty, _ = weighted_sft_loss(LOGPS, torch.zeros_like(MASK))
    assert empty.item() == 0.0


def test_weighted_sft_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        weighted_sft_loss(LOGPS, MASK, f64(-1.0, 1.0))
    with pytest.raises(ValueError, match="weights must be"):
        weighted_sft_loss(LOGPS, MASK, f64(1.0))
    with pytest.raises(ValueError, match="reduction"):
        weighted_sft_loss(LOGPS, MASK, reduction="mean")  # type: ignore[arg-type]
