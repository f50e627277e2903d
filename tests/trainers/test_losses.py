"""Bradley–Terry loss and preference accuracy against hand-worked numbers (algorithms.md §4.3, §4.9.4)."""

from __future__ import annotations

import math

import pytest
import torch

from trainers.losses import bradley_terry_loss, preference_accuracy

LN2 = math.log(2.0)


def test_hand_worked_values() -> None:
    # gaps d = [1, 0, -2]
    # -log σ(1)  = log(1 + e^-1) = 0.313261687518
    # -log σ(0)  = ln 2          = 0.693147180560
    # -log σ(-2) = log(1 + e^2)  = 2.126928011043
    # mean = 3.133336879121 / 3 = 1.044445626374
    chosen = torch.tensor([1.0, 0.5, -1.0], dtype=torch.float64)
    rejected = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    loss, stats = bradley_terry_loss(chosen, rejected)
    assert loss.item() == pytest.approx(1.044445626374, abs=1e-12)
    assert stats["accuracy"].item() == pytest.approx(1 / 3)  # the tie counts as wrong
    assert stats["reward_gap"].item() == pytest.approx((1 + 0 - 2) / 3)
    assert stats["chosen"].item() == pytest.approx(0.5 / 3)
    assert stats["rejected"].item() == pytest.approx(1.5 / 3)
    assert all(not v.requires_grad for v in stats.values())


def test_equal_scores_give_ln2_and_margin_shifts_the_gap() -> None:
    s = torch.randn(7, generator=torch.Generator().manual_seed(0))
    loss, stats = bradley_terry_loss(s, s.clone())
    assert loss.item() == pytest.approx(LN2, abs=1e-6)
    assert stats["accuracy"].item() == 0.0
    # chosen beats rejected by exactly the margin: -log σ(0) = ln 2 again
    loss, stats = bradley_terry_loss(s + 0.7, s, margin=torch.full((7,), 0.7))
    assert loss.item() == pytest.approx(LN2, abs=1e-6)
    assert stats["accuracy"].item() == 1.0  # accuracy ignores the margin


def test_sign_symmetry_under_swapping() -> None:
    g = torch.Generator().manual_seed(1)
    c, r = (
        torch.randn(16, generator=g, dtype=torch.float64),
        torch.randn(16, generator=g, dtype=torch.float64),
    )
    forward, _ = bradley_terry_loss(c, r)
    backward, _ = bradley_terry_loss(r, c)
    # softplus(-d) - softplus(d) = -d, so L(c, r) - L(r, c) = -mean(d)
    assert (forward - backward).item() == pytest.approx(-(c - r).mean().item(), abs=1e-12)
    d = c - r
    assert forward.item() == pytest.approx(torch.nn.functional.softplus(-d).mean().item(), abs=1e-12)
    assert backward.item() == pytest.approx(torch.nn.functional.softplus(d).mean().item(), abs=1e-12)


def test_numerically_stable_for_huge_gaps_with_exact_gradient() -> None:
    chosen = torch.tensor([1000.0, -1000.0], requires_grad=True)
    rejected = torch.zeros(2)
    loss, _ = bradley_terry_loss(chosen, rejected)
    # -log σ(1000) ≈ 0 and -log σ(-1000) = 1000 (+ e^-1000): mean 500, finite
    assert loss.item() == pytest.approx(500.0)
    loss.backward()
    # d/dc of -log σ(c) is -σ(-c); divided by B = 2
    assert chosen.grad.tolist() == pytest.approx([0.0, -0.5])


def test_gradient_matches_formula() -> None:
    chosen = torch.tensor([0.3, -0.2, 1.5], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([0.1, 0.4, -0.5], dtype=torch.float64, requires_grad=True)
    loss, _ = bradley_terry_loss(chosen, rejected)
    loss.backward()
    d = (chosen - rejected).detach()
    expected = -torch.sigmoid(-d) / 3
    assert torch.allclose(chosen.grad, expected)
    assert torch.allclose(rejected.grad, -expected)


def test_preference_accuracy() -> None:
    chosen = torch.tensor([2.0, 1.0, 0.0, -1.0])
    rejected = torch.tensor([1.0, 1.0, 0.5, -3.0])
    assert preference_accuracy(chosen, rejected).item() == pytest.approx(
        0.5
    )  # 2>1 yes, tie no, 0<0.5 no, -1>-3 yes


@pytest.mark.parametrize(("c", "r"), [((3,), (2,)), ((2, 2), (2, 2)), ((3,), (3, 1))])
def test_shape_mismatch_raises(c: tuple[int, ...], r: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        bradley_terry_loss(torch.zeros(c), torch.zeros(r))
