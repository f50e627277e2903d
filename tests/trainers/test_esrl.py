"""ESRL dynamic sampling (algorithms.md §3.7.4–§3.7.6): eliminate, adaptive plan, confidence, groups."""

from __future__ import annotations

import math

import pytest
import torch

from trainers import esrl
from trainers.rl_math import group_mean_baseline, leave_one_out_baseline, reinforce_loss


@pytest.mark.parametrize("n", [1, 2, 5, 10, 17])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.3, 0.5, 0.9])
def test_eliminate_drops_the_ceil_ratio_highest_and_keeps_at_least_one(n, ratio) -> None:
    scores = torch.rand(n, generator=torch.Generator().manual_seed(n))
    keep = esrl.eliminate(scores, ratio)
    n_drop = min(math.ceil(ratio * n), n - 1)
    assert int(keep.sum()) == n - n_drop
    if n_drop:
        assert float(scores[keep].max()) <= float(scores[~keep].min())  # every kept ≤ every dropped
    if ratio == 0:
        assert bool(keep.all())


def test_eliminate_hand_worked_with_ties() -> None:
    # B = 5, ρ = 0.3 → ⌈1.5⌉ = 2 dropped: the 0.9 and, of the two 0.5s, the later one
    keep = esrl.eliminate(torch.tensor([0.5, 0.9, 0.1, 0.5, 0.2]), 0.3)
    assert keep.tolist() == [True, False, True, False, True]
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        esrl.eliminate(torch.zeros(3), 1.0)


def test_confidence_ignores_padding_steps() -> None:
    max_prob = torch.tensor([[0.9, 0.5, 0.0], [0.2, 0.4, 0.6]])
    entropy = torch.tensor([[0.1, 0.3, 99.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    torch.testing.assert_close(
        esrl.confidence(max_prob, entropy, mask, "max_prob", 4), torch.tensor([0.7, 0.4])
    )
    # 1 − mean H / log V: row 0 mean H = 0.2, row 1 = 2.0, V = 4
    expected = torch.tensor([1 - 0.2 / math.log(4), 1 - 2.0 / math.log(4)])
    torch.testing.assert_close(esrl.confidence(max_prob, entropy, mask, "entropy", 4), expected)
    # whatever sits in the padding, nothing changes
    noisy = max_prob.clone()
    noisy[0, 2] = 1.0
    torch.testing.assert_close(esrl.confidence(noisy, entropy, mask, "max_prob", 4), torch.tensor([0.7, 0.4]))


def test_adaptive_plan_is_monotone_bounded_and_hits_the_ends() -> None:
    c = torch.linspace(0, 1, 101)
    k, tau = esrl.adaptive_plan(c, k_min=2, k_max=8, tau_min=0.7, tau_max=1.2)
    assert bool((k[1:] <= k[:-1]).all()) and bool((tau[1:] <= tau[:-1] + 1e-7).all())
    assert (
        int(k.min()) >= 2
        and int(k.max()) <= 8
        and float(tau.min()) >= 0.7 - 1e-6
        and float(tau.max()) <= 1.2 + 1e-6
    )
    assert (
        (int(k[0]), int(k[-1])) == (8, 2)
        and float(tau[0]) == pytest.approx(1.2)
        and float(tau[-1]) == pytest.approx(0.7)
    )
    # hand values: c = 0.5 → k = round(8 · 0.5) = 4, τ = 0.7 + 0.5 · 0.5 = 0.95
    k, tau = esrl.adaptive_plan(torch.tensor([0.5]), 1, 8, 0.7, 1.2)
    assert int(k) == 4 and float(tau) == pytest.approx(0.95)
    with pytest.raises(ValueError):
        esrl.adaptive_plan(c, 3, 2, 0.7, 1.2)


def test_capability_from_entropy_and_from_reward() -> None:
    entropy = torch.tensor([[0.0, 0.0], [math.log(8), math.log(8)], [math.log(2), 99.0]])
    mask = torch.tensor([[True, True], [True, True], [True, False]])
    torch.testing.assert_close(
        esrl.capability_from_entropy(entropy, mask, 8), torch.tensor([1.0, 0.0, 2 / 3])
    )
    torch.testing.assert_close(esrl.capability_from_reward(torch.tensor([-2.0, 0.0, 0.5, 3.0]), -1, 1),
                               torch.tensor([0.0, 0.5, 0.75, 1.0]))  # fmt: skip


def test_step_stats_records_the_distribution_and_leaves_logits_alone() -> None:
    stats = esrl.StepStats()
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [1.0, 1e-30, 1e-30]]))
    out = stats(0, logits)
    assert out is logits
    stats(1, torch.zeros(2, 3))
    max_prob, entropy = stats.stacked()
    torch.testing.assert_close(max_prob, torch.tensor([[0.5, 1 / 3], [1.0, 1 / 3]]))
    torch.testing.assert_close(entropy, torch.tensor([[1.5 * math.log(2), math.log(3)], [0.0, math.log(3)]]))
    banned = stats(2, torch.tensor([[0.0, float("-inf"), 0.0]] * 2))  # −inf tokens count as p = 0
    assert banned.shape == (2, 3) and stats.stacked()[1][0, 2] == pytest.approx(math.log(2))


def test_row_temperature_divides_each_row() -> None:
    process = esrl.row_temperature(torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(process(0, torch.ones(2, 3)), torch.tensor([[2.0] * 3, [0.5] * 3]))
    with pytest.raises(ValueError):
        esrl.row_temperature(torch.tensor([0.0]))


def test_baseline_by_group_equals_fixed_groups_and_handles_single_sample_groups() -> None:
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 20.0])
    torch.testing.assert_close(
        esrl.baseline_by_group(scores, [3, 3], "group_mean"), group_mean_baseline(scores, 3)
    )
    torch.testing.assert_close(esrl.baseline_by_group(scores, [2, 2, 2], "leave_one_out"),
                               leave_one_out_baseline(scores, 2))  # fmt: skip
    # sizes 1, 2, 3: a lone sample gets 0 under leave-one-out, its own score under the group mean
    torch.testing.assert_close(esrl.baseline_by_group(scores, [1, 2, 3], "leave_one_out"),
                               torch.tensor([0.0, 3.0, 2.0, 15.0, 12.0, 7.0]))  # fmt: skip
    torch.testing.assert_close(esrl.baseline_by_group(scores, [1, 2, 3], "group_mean"),
                               torch.tensor([1.0, 2.5, 2.5, 34 / 3, 34 / 3, 34 / 3]))  # fmt: skip
    with pytest.raises(ValueError, match="sum to 5"):
        esrl.baseline_by_group(scores, [2, 3], "group_mean")


def test_variable_group_baseline_is_shift_invariant_and_equal_rewards_give_no_gradient() -> None:
    """§3.7.6 with groups of different sizes (adaptive mode)."""
    torch.manual_seed(0)
    sizes = [3, 1, 4]
    logits = torch.randn(8, 5, requires_grad=True)
    mask = torch.ones(8, 5, dtype=torch.bool)
    scores = torch.randn(8)

    def grad(s: torch.Tensor) -> torch.Tensor:
        logits.grad = None
        adv = s - esrl.baseline_by_group(s, sizes, "group_mean")
        loss, _ = reinforce_loss(torch.log_softmax(logits, -1), mask, adv)
        loss.backward()
        return logits.grad.clone()

    torch.testing.assert_close(grad(scores), grad(scores + 7.5))
    assert bool((grad(torch.full((8,), 0.3)) == 0).all())
