"""Huber fit and the location-aware / global normalisers (algorithms.md §4.4, invariants §4.9.6)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from trainers.normalise import (
    LOG_EPS,
    MIN_STD,
    GlobalNormaliser,
    LocationNormaliser,
    fit_global_normaliser,
    fit_location_normaliser,
    huber_fit,
    normaliser_from_dict,
    position_keys,
)
from trainers.segments import segment_ends, segment_positions

# The phi3-instruct / τ = 1.75 parameters shipped with the paper's code: [a, b, c, d].
A, B, C, D = 0.7668, 0.2569, 0.4705, 2.8339


def _positions(max_k: int) -> np.ndarray:
    """Every distinct p = k/K for K ≤ max_k."""
    return np.unique(np.round([k / K for K in range(1, max_k + 1) for k in range(1, K + 1)], 3))


# ------------------------------------------------------------------------------------------ Huber


def test_huber_hand_worked_line_with_a_high_leverage_outlier() -> None:
    # y = 2x except the last point. Least squares gives slope 20, intercept -36; Huber ignores it:
    # Theil–Sen start (2, 0) → residuals [0, 0, 0, 0, 90] → MAD 0 → the outlier's weight ≈ 0.
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    y = [2.0, 4.0, 6.0, 8.0, 100.0]
    assert np.polyfit(x, y, 1) == pytest.approx([20.0, -36.0])
    slope, intercept = huber_fit(x, y)
    assert slope == pytest.approx(2.0, abs=1e-8) and intercept == pytest.approx(0.0, abs=1e-8)


def test_huber_recovers_a_and_c_on_log_position_data_with_outliers() -> None:
    p = _positions(40)
    x = np.log(p + LOG_EPS)
    y = A * x + C
    rng = np.random.default_rng(0)
    bad = rng.choice(p.size, size=p.size // 10, replace=False)
    y_out = y.copy()
    y_out[bad] += rng.choice([-1, 1], size=bad.size) * rng.uniform(5, 20, size=bad.size)
    assert huber_fit(x, y_out) == pytest.approx((A, C), abs=1e-6)  # exact data + outliers: exact
    noisy = y_out + rng.normal(0, 0.05, size=p.size)
    slope, intercept = huber_fit(x, noisy)
    assert slope == pytest.approx(A, abs=0.03) and intercept == pytest.approx(C, abs=0.03)
    ols_slope, ols_intercept = np.polyfit(x, noisy, 1)
    assert abs(ols_slope - A) + abs(ols_intercept - C) > 5 * (abs(slope - A) + abs(intercept - C))


def test_huber_without_outliers_is_close_to_least_squares() -> None:
    rng = np.random.default_rng(1)
    x = rng.uniform(-3, 0, size=300)
    y = -0.5 * x + 1.0 + rng.normal(0, 0.1, size=300)
    assert huber_fit(x, y) == pytest.approx(tuple(np.polyfit(x, y, 1)), abs=0.01)


def test_huber_small_and_degenerate_inputs() -> None:
    assert huber_fit([0.0, 1.0], [1.0, 3.0]) == pytest.approx((2.0, 1.0))  # two points: exact
    assert huber_fit([2.0], [5.0]) == (0.0, 5.0)  # one point: flat
    slope, intercept = huber_fit([1.0, 1.0, 1.0], [1.0, 2.0, 30.0])  # one distinct x: robust location
    assert slope == 0.0 and 1.0 < intercept < 4.0  # the mean would be 11
    assert huber_fit(torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(
        (1.0, 1.0)
    )
    for bad in (([], []), ([1.0, 2.0], [1.0]), ([1.0, math.nan], [1.0, 2.0])):
        with pytest.raises(ValueError):
            huber_fit(*bad)
    with pytest.raises(ValueError):
        huber_fit([0.0, 1.0], [0.0, 1.0], epsilon=1.0)


# ------------------------------------------------------------------------------------------ location normaliser


def test_normaliser_at_p_equal_one_is_c_and_d() -> None:
    norm = LocationNormaliser(a=A, b=B, c=C, d=D, std_floor=0.1 * D)
    assert norm.mean(1.0) == pytest.approx(C, abs=1e-9)
    assert norm.std(1.0) == pytest.approx(D, abs=1e-9)
    assert norm.mean(torch.tensor([1.0])).item() == pytest.approx(C)
    assert norm.std(np.array([1.0]))[0] == pytest.approx(D)
    # hand-worked: p = 0.5 → ln 0.5 = -0.693147; mean = 0.4705 - 0.7668·0.693147 = 0.4705 - 0.531505 = -0.061005
    assert norm.mean(0.5) == pytest.approx(C - A * math.log(2), abs=1e-9)
    assert norm.mean(0.5) == pytest.approx(-0.061005, abs=1e-6)
    # r̃ = (r - mean) / std at p = 1: (2.0 - 0.4705) / 2.8339
    assert norm.normalise(2.0, 1.0) == pytest.approx((2.0 - C) / D, abs=1e-9)


def test_std_is_clamped_above_zero() -> None:
    # llama-3-sft token model: std(p) = 0.9906 ln p + 5.4513 < 0 for p < ~0.004
    norm = LocationNormaliser(a=1.734, b=0.9906, c=1.3212, d=5.4513, std_floor=0.54513)
    p = torch.tensor([1e-4, 1 / 300, 0.01, 1.0], dtype=torch.float64)
    raw = 0.9906 * torch.log(p) + 5.4513
    assert raw[0] < 0 and raw[1] < 0  # the unclamped line goes negative
    std = norm.std(p)
    assert (std > 0).all() and std[0] == 0.54513 and std[1] == 0.54513
    assert std[2:].tolist() == pytest.approx(raw[2:].tolist())
    assert torch.isfinite(norm.normalise(torch.ones(4, dtype=torch.float64), p)).all()
    with pytest.raises(ValueError):
        LocationNormaliser(a=0.0, b=0.0, c=0.0, d=1.0, std_floor=0.0)


def test_fit_recovers_parameters_from_exact_per_key_statistics() -> None:
    # Per key two rewards mean ± std: the per-key mean and population std are exact, so the fit is.
    p = _positions(30)
    x = np.log(p + LOG_EPS)
    mean, std = A * x + C, B * x + D
    positions = np.repeat(p, 2)
    rewards = np.stack([mean - std, mean + std], axis=1).reshape(-1)
    norm = fit_location_normaliser(positions, rewards)
    assert (norm.a, norm.b, norm.c, norm.d) == pytest.approx((A, B, C, D), abs=1e-6)
    assert norm.std_floor == pytest.approx(0.1 * D, abs=1e-6)
    # a few keys with wild statistics barely matter (Huber, each key one point)
    rewards_bad = rewards.copy()
    rewards_bad[:6] += 40.0
    norm_bad = fit_location_normaliser(positions, rewards_bad)
    assert (norm_bad.a, norm_bad.c) == pytest.approx((A, C), abs=1e-3)


def test_fit_groups_by_three_decimals_with_population_std_and_unweighted_keys() -> None:
    # key 1.0: rewards 1, 3 → mean 2, population std 1
    # key 0.5: rewards 0, 0, 0, 0, 4 and 0.5004 (rounds to 0.5) → six rewards, mean 4/6
    # each key is one point: two keys give an exact line through (ln 0.5, ·) and (0, ·)
    positions = [1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5004]
    rewards = [1.0, 3.0, 0.0, 0.0, 0.0, 0.0, 4.0, 0.0]
    norm = fit_location_normaliser(positions, rewards)
    mean_half = 4 / 6
    std_half = math.sqrt((4 - mean_half) ** 2 / 6 + 5 * mean_half**2 / 6)
    assert norm.c == pytest.approx(2.0) and norm.d == pytest.approx(1.0)
    assert norm.mean(0.5) == pytest.approx(mean_half)
    assert norm.std(0.5) == pytest.approx(std_half)
    assert position_keys([0.3333, 0.33349, 0.6666]).tolist() == [0.333, 0.333, 0.667]
    # min_count drops thin keys: only key 0.5 (6 rewards) remains → flat line
    thin = fit_location_normaliser(positions, rewards, min_count=3)
    assert thin.a == 0.0 and thin.c == pytest.approx(mean_half)


def test_default_std_floor_rules() -> None:
    # d ≤ 0: 0.1 × pooled population std of the rewards
    positions, rewards = [1.0, 1.0, 0.5], [1.0, 1.0, 5.0]  # key 1.0 has std 0 → d = 0
    norm = fit_location_normaliser(positions, rewards)
    assert norm.d == pytest.approx(0.0, abs=1e-9)
    assert norm.std_floor == pytest.approx(0.1 * np.std(rewards))
    # all rewards equal: the last-resort floor
    assert fit_location_normaliser([1.0, 0.5], [2.0, 2.0]).std_floor == MIN_STD
    # explicit floor wins
    assert fit_location_normaliser([1.0, 0.5], [2.0, 2.0], std_floor=0.3).std_floor == 0.3
    for bad in (([0.0], [1.0]), ([1.5], [1.0]), ([1.0], [1.0, 2.0])):
        with pytest.raises(ValueError):
            fit_location_normaliser(*bad)


def test_normalise_only_at_segment_ends() -> None:
    # p = k/K from the segmentation; everything off the ends is 0 (no ln(0 + 1e-10) leaks)
    h = torch.tensor([[0.0, 3.0, 0.0, 3.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    ends = segment_ends(h, mask, 2.0)  # ends at 1, 3, 4 (EOS at 5)
    p = segment_positions(ends, dtype=torch.float64)
    values = torch.tensor([[9.0, 1.0, 9.0, 2.0, 3.0, 9.0, 9.0]], dtype=torch.float64)
    norm = LocationNormaliser(a=A, b=B, c=C, d=D, std_floor=0.1 * D)
    out = norm.normalise(values, p, ends)
    assert out[~ends].abs().sum() == 0
    for t, k in ((1, 1), (3, 2), (4, 3)):
        pk = k / 3
        want = (values[0, t].item() - (A * math.log(pk) + C)) / (B * math.log(pk) + D)
        assert out[0, t].item() == pytest.approx(want, abs=1e-8)
    assert out[0, 4].item() == pytest.approx((3.0 - C) / D, abs=1e-8)  # p_K = 1


def test_location_round_trip_through_json() -> None:
    norm = LocationNormaliser(a=A, b=B, c=C, d=D, std_floor=0.28339)
    data = json.loads(json.dumps(norm.to_dict()))
    assert data["kind"] == "location"
    assert LocationNormaliser.from_dict(data) == norm
    assert normaliser_from_dict(data) == norm
    with pytest.raises(ValueError):
        LocationNormaliser.from_dict({**data, "kind": "global"})
    with pytest.raises(ValueError):
        normaliser_from_dict({"kind": "mystery"})


# ------------------------------------------------------------------------------------------ global normaliser


def test_global_normaliser() -> None:
    # scores 1, 2, 3, 6: mean 3, population std sqrt((4 + 1 + 0 + 9) / 4) = sqrt(3.5)
    norm = fit_global_normaliser(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    assert norm.mean == pytest.approx(3.0) and norm.std == pytest.approx(math.sqrt(3.5))
    r = torch.tensor([[3.0, 6.0]])
    out = norm.normalise(r, None, torch.tensor([[False, True]]))
    assert out[0].tolist() == pytest.approx([0.0, 3 / math.sqrt(3.5)])
    # the paper's phi3 bandit statistics
    phi3 = GlobalNormaliser(mean=-0.5195, std=2.1563)
    assert phi3.normalise(1.6368) == pytest.approx(1.0, abs=1e-4)
    assert GlobalNormaliser(mean=0.0, std=0.0, std_floor=0.5).normalise(1.0) == 2.0  # clamped std
    data = json.loads(json.dumps(phi3.to_dict()))
    assert data["kind"] == "global" and normaliser_from_dict(data) == phi3
    with pytest.raises(ValueError):
        fit_global_normaliser([])
