"""The pure RL layer against hand-worked numbers and the invariants of algorithms.md §1.14 and §3.7."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from trainers.rl_math import (
    AdaptiveKLController,
    FixedKLController,
    RunningBaseline,
    aggregate,
    discounted_returns,
    duplicate_mask,
    entropy_bonus,
    gae,
    group_mean_baseline,
    group_std,
    kl_k1,
    kl_k1_clamped,
    kl_k2,
    kl_k3,
    kl_shaped_rewards,
    leave_one_out_baseline,
    masked_mean,
    masked_var,
    masked_whiten,
    mrt_loss,
    ppo_policy_loss,
    reinforce_loss,
    value_loss,
)


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def prefix_mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


# ----------------------------------------------------------------------------- KL


def test_kl_estimators_hand_values() -> None:
    # d = log π − log π_ref = [0, 1, −1]
    logp = torch.tensor([-1.0, -1.0, -2.0], dtype=torch.float64)
    ref = torch.tensor([-1.0, -2.0, -1.0], dtype=torch.float64)
    assert kl_k1(logp, ref).tolist() == [0.0, 1.0, -1.0]
    assert kl_k1_clamped(logp, ref).tolist() == [0.0, 1.0, 0.0]
    assert kl_k2(logp, ref).tolist() == [0.0, 0.5, 0.5]
    # k3 = e^{−d} − 1 + d: 0; e^{−1} = 0.367879441171; e − 2 = 0.718281828459
    assert kl_k3(logp, ref).tolist() == pytest.approx([0.0, 0.367879441171, 0.718281828459], abs=1e-12)


def test_k3_is_nonnegative_and_k1_k3_are_unbiased_for_the_kl() -> None:
    d = rand(10_000) * 5
    assert bool((kl_k3(d, torch.zeros_like(d)) >= 0).all())
    # exact expectations under a ~ π over a 7-token vocabulary
    logp = torch.log_softmax(rand(7, seed=1), -1)
    ref = torch.log_softmax(rand(7, seed=2), -1)
    p = logp.exp()
    kl = (p * (logp - ref)).sum()
    assert (p * kl_k1(logp, ref)).sum().item() == pytest.approx(kl.item(), abs=1e-12)
    assert (p * kl_k3(logp, ref)).sum().item() == pytest.approx(kl.item(), abs=1e-12)
    assert kl.item() > 0


def test_kl_rewards_zero_when_policy_is_reference_and_sum_is_minus_beta_log_ratio() -> None:
    mask = prefix_mask([3, 1], 4)
    task = torch.tensor([[0.0, 0.0, 2.0, 9.0], [-1.0, 9.0, 9.0, 9.0]])
    logp = rand(2, 4, seed=3).float()
    rewards, kl = kl_shaped_rewards(task, logp, logp.clone(), mask, beta=0.3, estimator="k3")
    assert torch.equal(kl, torch.zeros_like(kl))
    assert torch.equal(rewards, torch.where(mask, task, 0.0))  # total reward = task reward
    ref = rand(2, 4, seed=4).float()
    rewards, kl = kl_shaped_rewards(torch.zeros_like(task), logp, ref, mask, beta=0.3)
    expected = -0.3 * ((logp - ref) * mask).sum(-1)
    assert torch.allclose(rewards.sum(-1), expected, atol=1e-6)
    assert bool((rewards[~mask] == 0).all()) and bool((kl[~mask] == 0).all())
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_shaped_rewards(task, logp, ref, mask, beta=0.3, estimator="k4")


def test_adaptive_kl_controller_rl4lms_rule() -> None:
    c = AdaptiveKLController(beta=0.1, target=0.1)
    assert c.update(0.1) == pytest.approx(0.1)  # KL̄ = target: unchanged
    assert c.update(0.11) == pytest.approx(0.1 * 1.01)  # e = 0.1 → ×(1 + 0.1·0.1)
    c = AdaptiveKLController(beta=0.1, target=0.1)
    assert c.update(0.15) == pytest.approx(0.102)  # e = 0.5, clipped to 0.2 → ×1.02
    assert c.update(0.0) == pytest.approx(0.102 * 0.98)  # e = −1 → −0.2 → ×0.98
    for kl in rand(200, seed=5).abs().tolist():
        before = c.beta
        after = c.update(kl)
        assert abs(after - before) / before <= 0.02 + 1e-12
        assert (after > before) == (kl > c.target) or kl == c.target
    state = dataclasses.asdict(c)
    assert AdaptiveKLController(**state) == c


def test_adaptive_kl_controller_with_horizon_and_fixed() -> None:
    c = AdaptiveKLController(beta=0.2, target=0.1, horizon=10_000)
    # e = (0.2 − 0.1)/0.1 = 1 → clipped 0.2; × (1 + 0.2 · 256/10 000) = × 1.00512
    assert c.update(0.2, n_steps=256) == pytest.approx(0.2 * 1.00512)
    assert c.update(0.1, n_steps=256) == pytest.approx(0.2 * 1.00512)
    fixed = FixedKLController(beta=0.05)
    assert fixed.update(123.0) == 0.05
    with pytest.raises(ValueError):
        AdaptiveKLController(beta=0.1, target=0.0)
    with pytest.raises(ValueError, match="finite"):
        c.update(float("nan"))


# ----------------------------------------------------------------------------- masked statistics


def test_masked_statistics_hand_values() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    assert masked_mean(x, mask).item() == 2.0
    assert masked_var(x, mask).item() == 1.0  # ((−1)² + 0 + 1²)/(3 − 1)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(2 / 3)
    assert masked_whiten(x, mask)[0].tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)
    # without shifting the mean, the spread is scaled (std already 1 here) and the mean kept
    assert masked_whiten(x, mask, shift_mean=False)[0].tolist() == pytest.approx(
        [1.0, 2.0, 3.0, 0.0], abs=1e-6
    )
    assert masked_mean(x, mask, dim=-1).tolist() == [2.0]


def test_whitening_gives_mean_zero_std_one_over_the_mask() -> None:
    x = rand(4, 9, seed=6) * 3 + 5
    mask = prefix_mask([9, 4, 1, 6], 9)
    w = masked_whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert masked_var(w, mask).sqrt().item() == pytest.approx(1.0, abs=1e-6)
    assert bool((w[~mask] == 0).all())
    kept = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(kept, mask).item() == pytest.approx(masked_mean(x, mask).item(), abs=1e-9)
    assert masked_var(kept, mask).sqrt().item() == pytest.approx(1.0, abs=1e-6)


def test_masked_statistics_degenerate_masks_give_no_nan() -> None:
    x = torch.tensor([[3.0, 4.0]])
    one = torch.tensor([[True, False]])
    none = torch.zeros_like(one)
    assert masked_var(x, one).item() == 0.0
    assert masked_whiten(x, one).tolist() == [[0.0, 0.0]]
    assert masked_mean(x, none).item() == 0.0
    assert masked_whiten(x, none).tolist() == [[0.0, 0.0]]


def test_aggregate_token_vs_sequence_mean() -> None:
    loss = torch.tensor([[1.0, 3.0, 7.0], [10.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    mask = prefix_mask([2, 1, 0], 3)
    assert aggregate(loss, mask, "token_mean").item() == pytest.approx((1 + 3 + 10) / 3)
    assert aggregate(loss, mask, "sequence_mean").item() == pytest.approx((2 + 10) / 2)  # empty row skipped
    with pytest.raises(ValueError):
        aggregate(loss, mask, "sum")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- returns and GAE


def gae_oracle(rewards, values, lengths, gamma, lam):
    """The textbook loop over each row's valid steps (prefix masks)."""
    adv = torch.zeros_like(rewards)
    for i, n in enumerate(lengths):
        last = 0.0
        for t in reversed(range(n)):
            next_value = values[i, t + 1] if t + 1 < n else 0.0
            delta = rewards[i, t] + gamma * next_value - values[i, t]
            last = delta + gamma * lam * last
            adv[i, t] = last
    return adv


def test_gae_hand_worked() -> None:
    # γ = 0.9, λ = 0.8 (γλ = 0.72), r = [0, 0, 1], V = [0.5, 0.4, 0.3]
    # t=2: δ = 1 − 0.3 = 0.7;                A = 0.7
    # t=1: δ = 0.9·0.3 − 0.4 = −0.13;        A = −0.13 + 0.72·0.7 = 0.374
    # t=0: δ = 0.9·0.4 − 0.5 = −0.14;        A = −0.14 + 0.72·0.374 = 0.12928
    r = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    v = torch.tensor([[0.5, 0.4, 0.3, 7.0]])
    mask = prefix_mask([3], 4)
    adv, ret = gae(r, v, mask, gamma=0.9, lam=0.8)
    assert adv[0].tolist() == pytest.approx([0.12928, 0.374, 0.7, 0.0], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0.62928, 0.774, 1.0, 0.0], abs=1e-6)


def test_gae_matches_the_loop_oracle_on_random_prefix_masks() -> None:
    lengths = [7, 3, 0, 1, 5]
    r, v = rand(5, 7, seed=7), rand(5, 7, seed=8)
    adv, ret = gae(r, v, prefix_mask(lengths, 7), gamma=0.97, lam=0.9)
    expected = gae_oracle(r, v, lengths, 0.97, 0.9)
    assert torch.allclose(adv, expected, atol=1e-12)
    assert torch.allclose(ret, torch.where(prefix_mask(lengths, 7), expected + v, 0.0), atol=1e-12)


def test_gae_limits() -> None:
    mask = prefix_mask([5, 2, 4], 5)
    r, v = rand(3, 5, seed=9), rand(3, 5, seed=10)
    # λ = 1, γ = 1: A = G − V; with V ≡ 0, A_t = Σ_{k≥t} r_k
    adv, _ = gae(r, v, mask, gamma=1.0, lam=1.0)
    returns = discounted_returns(r, mask, gamma=1.0)
    assert torch.allclose(adv, torch.where(mask, returns - v, 0.0), atol=1e-12)
    adv, _ = gae(r, torch.zeros_like(v), mask, gamma=1.0, lam=1.0)
    suffix = torch.where(mask, r, 0.0).flip(-1).cumsum(-1).flip(-1)
    assert torch.allclose(adv, torch.where(mask, suffix, 0.0), atol=1e-12)
    # λ = 1, γ < 1 too: A = G − V
    adv, _ = gae(r, v, mask, gamma=0.9, lam=1.0)
    assert torch.allclose(adv, torch.where(mask, discounted_returns(r, mask, 0.9) - v, 0.0), atol=1e-12)
    # λ = 0: A_t = δ_t = r_t + γ V_{t+1} − V_t (V after the end = 0)
    adv, _ = gae(r, v, mask, gamma=0.9, lam=0.0)
    next_v = torch.cat([v[:, 1:], torch.zeros(3, 1, dtype=v.dtype)], 1) * prefix_mask([4, 1, 3], 5)
    delta = r + 0.9 * next_v - v
    assert torch.allclose(adv, torch.where(mask, delta, 0.0), atol=1e-12)


def test_masked_steps_get_zero_advantage_and_nothing_leaks() -> None:
    mask = prefix_mask([4, 2], 6)
    r, v = rand(2, 6, seed=11), rand(2, 6, seed=12)
    adv, ret = gae(r, v, mask, gamma=0.99, lam=0.95)
    assert bool((adv[~mask] == 0).all()) and bool((ret[~mask] == 0).all())
    # garbage in the padding (after an episode's end) changes nothing
    r2, v2 = r.clone(), v.clone()
    r2[~mask], v2[~mask] = 1e6, -1e6
    adv2, ret2 = gae(r2, v2, mask, gamma=0.99, lam=0.95)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)
    # rows are episodes: changing row 1 leaves row 0's advantages alone
    r3 = r.clone()
    r3[1] += 3.0
    adv3, _ = gae(r3, v, mask, gamma=0.99, lam=0.95)
    assert torch.equal(adv3[0], adv[0]) and not torch.equal(adv3[1], adv[1])


def test_discounted_returns_hand_worked() -> None:
    # γ = 0.5, r = [1, 0, 2]: G2 = 2, G1 = 0 + 0.5·2 = 1, G0 = 1 + 0.5·1 = 1.5
    r = torch.tensor([[1.0, 0.0, 2.0, 4.0]])
    assert discounted_returns(r, prefix_mask([3], 4), gamma=0.5).tolist() == [[1.5, 1.0, 2.0, 0.0]]


# ----------------------------------------------------------------------------- baselines


def test_group_and_leave_one_out_baselines() -> None:
    scores = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    assert group_mean_baseline(scores, 3).tolist() == [2.0, 2.0, 2.0, 10.0, 10.0, 10.0]
    # LOO: (sum − r_i)/(K − 1): (5/2, 4/2, 3/2)
    loo = leave_one_out_baseline(scores, 3)
    assert loo.tolist() == [2.5, 2.0, 1.5, 10.0, 10.0, 10.0]
    # identical rewards in a group → zero advantages
    assert (scores - loo)[3:].tolist() == [0.0, 0.0, 0.0]
    assert group_std(scores, 3).tolist() == pytest.approx([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="group_size >= 2"):
        leave_one_out_baseline(scores, 1)
    with pytest.raises(ValueError, match="groups of 4"):
        group_mean_baseline(scores, 4)


def test_running_baseline_uses_only_earlier_batches() -> None:
    b = RunningBaseline(alpha=0.5)
    assert b.update(torch.tensor([1.0, 3.0])).tolist() == [2.0, 2.0]  # the first batch initialises
    assert b.update(torch.tensor([4.0, 4.0])).tolist() == [2.0, 2.0]  # then b = 0.5·2 + 0.5·4 = 3
    assert b.value == 3.0
    assert RunningBaseline(**dataclasses.asdict(b)) == b
    with pytest.raises(ValueError):
        RunningBaseline(alpha=0.0)


# ----------------------------------------------------------------------------- PPO losses


def test_ratio_one_gives_minus_mean_advantage() -> None:
    logp = rand(3, 5, seed=13).float()
    adv = rand(3, 5, seed=14).float()
    mask = prefix_mask([5, 2, 3], 5)
    loss, stats = ppo_policy_loss(logp, logp.clone(), adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(-masked_mean(adv, mask).item(), abs=1e-6)
    assert stats["clip_fraction"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0
    assert stats["ratio_mean"].item() == 1.0 and stats["ratio_max"].item() == 1.0


def test_ppo_clipping_hand_worked_and_zero_gradient_when_clipped() -> None:
    # ρ = 1.5 on every token, ε = 0.2
    # A = +1: min(1.5, 1.2) = 1.2 (clipped)    A = −1: min(−1.5, −1.2) = −1.5 (unclipped)
    # ρ = 0.5: A = +1: min(0.5, 0.8) = 0.5 (unclipped)   A = −1: min(−0.5, −0.8) = −0.8 (clipped)
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]])).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, stats = ppo_policy_loss(logp, old, adv, torch.ones(1, 4, dtype=torch.bool), clip_eps=0.2)
    assert loss.item() == pytest.approx(-(1.2 - 1.5 + 0.5 - 0.8) / 4)
    assert stats["clip_fraction"].item() == 0.5
    # approx KL (ρ − 1) − log ρ: 0.5 − ln 1.5 = 0.0945348, −0.5 − ln 0.5 = 0.1931472
    assert stats["approx_kl"].item() == pytest.approx((0.0945348 + 0.1931472) / 2, abs=1e-6)
    loss.backward()
    # d/dlogp of −ρA/4 = −ρA/4 on unclipped tokens; 0 on the clipped ones
    assert logp.grad[0].tolist() == pytest.approx([0.0, 1.5 / 4, -0.5 / 4, 0.0])


def test_ppo_masked_tokens_do_not_count() -> None:
    logp = torch.tensor([[-1.0, 50.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -50.0]])
    adv = torch.tensor([[2.0, 1e9]])
    mask = torch.tensor([[True, False]])
    loss, stats = ppo_policy_loss(logp, old, adv, mask)
    assert loss.item() == -2.0 and stats["ratio_max"].item() == 1.0
    loss.backward()
    assert logp.grad[0, 1].item() == 0.0 and math.isfinite(logp.grad[0, 0].item())


def test_value_loss_hand_worked() -> None:
    # V = 1, V_old = 0.5, R = 2, ε = 0.2: unclipped (1 − 2)² = 1; clipped V = 0.7 → (0.7 − 2)² = 1.69
    v = torch.tensor([[1.0, 3.0]], requires_grad=True)
    old = torch.tensor([[0.5, 3.0]])
    ret = torch.tensor([[2.0, 3.0]])
    mask = torch.tensor([[True, False]])
    loss, stats = value_loss(v, old, ret, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(1.69)
    assert stats["clip_fraction"].item() == 1.0 and stats["mse"].item() == pytest.approx(1.0)
    loss.backward()
    assert v.grad.tolist() == [[0.0, 0.0]]  # the clipped branch is flat in V
    loss, stats = value_loss(v, old, ret, mask)
    assert loss.item() == pytest.approx(1.0) and stats["clip_fraction"].item() == 0.0


def test_entropy_bonus_is_minus_mean_entropy() -> None:
    ent = torch.tensor([[1.0, 2.0, 9.0]])
    loss, stats = entropy_bonus(ent, prefix_mask([2], 3))
    assert loss.item() == -1.5 and stats["entropy"].item() == 1.5


# ----------------------------------------------------------------------------- REINFORCE and MRT


def test_reinforce_hand_worked() -> None:
    # sequence log-probs s = [−1 − 2, −0.5] = [−3, −0.5]; A = [2, −1]; L = −(2·−3 + −1·−0.5)/2 = 2.75
    logp = torch.tensor([[-1.0, -2.0, -7.0], [-0.5, -7.0, -7.0]], requires_grad=True)
    mask = prefix_mask([2, 1], 3)
    loss, stats = reinforce_loss(logp, mask, torch.tensor([2.0, -1.0]))
    assert loss.item() == pytest.approx(2.75)
    assert stats["logp_mean"].item() == pytest.approx(-1.75)
    loss.backward()
    assert logp.grad.tolist() == [[-1.0, -1.0, 0.0], [0.5, 0.0, 0.0]]  # −A_i/B on counted tokens
    token_loss, _ = reinforce_loss(logp, mask, torch.tensor([2.0, -1.0]), reduction="token_mean")
    assert token_loss.item() == pytest.approx(5.5 / 3)


def _reinforce_grad(scores: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logp = logp.clone().requires_grad_()
    adv = scores - group_mean_baseline(scores, 3)
    loss, _ = reinforce_loss(logp, mask, adv)
    loss.backward()
    return logp.grad


def test_group_baseline_is_shift_invariant_and_equal_rewards_give_zero_gradient() -> None:
    logp = -rand(6, 4, seed=15).abs()
    mask = prefix_mask([4, 3, 2, 4, 1, 2], 4)
    scores = rand(6, seed=16)
    assert torch.allclose(_reinforce_grad(scores, logp, mask), _reinforce_grad(scores + 17.0, logp, mask))
    equal = torch.full((6,), 0.75, dtype=torch.float64)  # exact in binary: the group mean is exact
    assert torch.equal(_reinforce_grad(equal, logp, mask), torch.zeros_like(logp))
    equal = torch.full((6,), 0.7, dtype=torch.float64)  # (0.7 + 0.7 + 0.7)/3 ≠ 0.7 by one ulp
    assert torch.allclose(_reinforce_grad(equal, logp, mask), torch.zeros_like(logp), atol=1e-15)


def test_mrt_hand_worked_normalised_and_uniform_at_alpha_zero() -> None:
    # α = 1: Q ∝ p = [0.2, 0.6] → [0.25, 0.75]; r = [1, 0]: L = −0.25
    seq = torch.log(torch.tensor([0.2, 0.6]))
    loss, stats = mrt_loss(seq, torch.tensor([1.0, 0.0]), group_size=2, alpha=1.0)
    assert loss.item() == pytest.approx(-0.25) and stats["q_max"].item() == pytest.approx(0.75)
    seq = rand(8, seed=17).float().requires_grad_()
    scores = rand(8, seed=18).float()
    loss, _ = mrt_loss(seq, scores, group_size=4, alpha=0.0)
    assert loss.item() == pytest.approx(-scores.view(2, 4).mean(-1).mean().item(), abs=1e-6)
    q = torch.softmax(5e-3 * seq.detach().view(2, 4), -1)
    assert q.sum(-1).tolist() == pytest.approx([1.0, 1.0])
    loss, _ = mrt_loss(seq, scores, group_size=4)
    assert loss.item() == pytest.approx((q * -scores.view(2, 4)).sum(-1).mean().item(), abs=1e-6)
    loss.backward()
    assert seq.grad.abs().sum() > 0


def test_mrt_removes_duplicates() -> None:
    ids = torch.tensor([[5, 6, 0], [5, 6, 9], [5, 6, 1], [7, 0, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    keep = duplicate_mask(ids, mask, group_size=2)  # row 1 repeats row 0 (padding differs)
    assert keep.tolist() == [True, False, True, True]
    loss, _ = mrt_loss(
        torch.zeros(4), torch.tensor([1.0, 100.0, 2.0, 4.0]), group_size=2, alpha=1.0, keep=keep
    )
    assert loss.item() == pytest.approx(-(1.0 + (2.0 + 4.0) / 2) / 2)
    with pytest.raises(ValueError, match="at least one"):
        mrt_loss(torch.zeros(2), torch.zeros(2), group_size=2, keep=torch.tensor([False, False]))
