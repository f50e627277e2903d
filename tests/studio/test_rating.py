"""Bradley–Terry / Davidson ratings: hand-computed cases, bootstrap CIs, ranks, and a cross-check with choix."""

from __future__ import annotations

import math

import choix
import numpy as np
import pytest

from studio.rating import (
    ALPHA,
    SCALE,
    BattleRecord,
    RatingOptions,
    battle_arrays,
    bootstrap_thetas,
    ci_ranks,
    components,
    dedup_rows,
    fit_bt,
    fit_davidson,
    fit_params,
    leaderboard,
)

B = BattleRecord
EXACT = RatingOptions(ridge=0.0, bootstrap=0)  # plain MLE, no CIs


def votes(a: int, b: int, a_wins: int = 0, b_wins: int = 0, ties: int = 0, both_bad: int = 0) -> list[B]:
    return (
        [B(a, b, "a")] * a_wins
        + [B(a, b, "b")] * b_wins
        + [B(a, b, "tie")] * ties
        + [B(a, b, "both_bad")] * both_bad
    )


def ratings(board) -> dict[int, float]:
    return {r.model: r.rating for r in board.ratings}


def random_battles(seed: int, n_models: int, n: int, tie_share: float = 0.0, spread: float = 0.5) -> list[B]:
    """n battles between random pairs of models with strengths θ ~ N(0, spread) on the display/400 scale."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(0.0, spread, n_models)
    out = []
    for _ in range(n):
        i, j = (int(x) for x in rng.choice(n_models, 2, replace=False))
        if rng.random() < tie_share:
            out.append(B(i, j, "tie"))
            continue
        p = 1.0 / (1.0 + 10.0 ** (theta[j] - theta[i]))
        out.append(B(i, j, "a" if rng.random() < p else "b"))
    return out


# --------------------------------------------------------------------------- hand-computed fits


def test_one_win_each_gives_equal_ratings():
    board = leaderboard(votes(1, 2, a_wins=1, b_wins=1), [1, 2], EXACT)
    assert ratings(board) == pytest.approx({1: 1000.0, 2: 1000.0}, abs=1e-9)


def test_three_wins_to_one_is_400_log10_3_without_ridge():
    # MLE: σ(α·Δθ) = 3/4 ⇒ α·Δθ = ln 3 ⇒ ΔR = 400·log10 3 = 190.8485...; mean at 1000
    r = ratings(leaderboard(votes(1, 2, a_wins=3, b_wins=1), [1, 2], EXACT))
    assert r[1] - r[2] == pytest.approx(400 * math.log10(3), abs=1e-8)
    assert (r[1] + r[2]) / 2 == pytest.approx(1000.0, abs=1e-9)


def test_tiny_ridge_is_close_to_the_mle():
    r = ratings(leaderboard(votes(1, 2, a_wins=3, b_wins=1), [1, 2], RatingOptions(ridge=1e-6, bootstrap=0)))
    assert r[1] - r[2] == pytest.approx(400 * math.log10(3), abs=1e-3)
    assert r[1] - r[2] < 400 * math.log10(3)  # shrunk towards 0, never away


def test_default_ridge_solves_the_penalised_score_equation():
    # θ_1 = t, θ_2 = −t, p = σ(2αt). d/dt [−3 log p − log(1 − p) + ½λ(2t²)] = 2α(4p − 3) + 2λt = 0,
    # with λ = 1·α²/4 (one pseudo-battle per model); solved by bisection here.
    lam = ALPHA**2 / 4

    def score(t: float) -> float:
        p = 1 / (1 + math.exp(-2 * ALPHA * t))
        return 2 * ALPHA * (4 * p - 3) + 2 * lam * t

    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if score(mid) < 0 else (lo, mid)
    r = ratings(leaderboard(votes(1, 2, a_wins=3, b_wins=1), [1, 2], RatingOptions(bootstrap=0)))
    assert r[1] - r[2] == pytest.approx(SCALE * 2 * lo, abs=1e-8)
    assert r[1] - r[2] < 400 * math.log10(3)


def test_ties_count_as_half_a_win_and_both_bad_is_a_tie():
    # 3 wins, 1 loss, 2 ties: A's score 4/6 ⇒ odds 2 ⇒ ΔR = 400·log10 2
    for kind in ("ties", "both_bad"):
        r = ratings(leaderboard(votes(1, 2, a_wins=3, b_wins=1, **{kind: 2}), [1, 2], EXACT))
        assert r[1] - r[2] == pytest.approx(400 * math.log10(2), abs=1e-8)


def test_drop_ties_fits_decisive_votes_only_but_counts_the_ties():
    board = leaderboard(
        votes(1, 2, a_wins=3, b_wins=1, ties=5), [1, 2], RatingOptions(ties="drop", ridge=0.0, bootstrap=0)
    )
    r = ratings(board)
    assert r[1] - r[2] == pytest.approx(400 * math.log10(3), abs=1e-8)
    top = board.ratings[0]
    assert (top.model, top.battles, top.wins, top.losses, top.ties) == (1, 9, 3, 1, 5)
    assert top.win_rate == pytest.approx(0.75)
    assert board.n_battles == 9


def test_drop_ties_leaves_a_model_with_only_ties_unrated_and_apart():
    # Model 2 only tied with 1: with ties dropped nothing is fitted for it, so no interval (NaN, not the
    # ridge prior's zero width), preliminary however many battles, no fitted probabilities, and a
    # component of its own. Model 1 and 3 split their decisive battles.
    battles = votes(1, 2, ties=30) + votes(1, 3, a_wins=5, b_wins=5)
    board = leaderboard(
        battles,
        [1, 2, 3],
        RatingOptions(ties="drop", bootstrap=50, min_battles_established=5, max_ci_halfwidth=1e3),
    )
    by = {r.model: r for r in board.ratings}
    assert math.isnan(by[2].lower) and math.isnan(by[2].upper) and math.isfinite(by[2].rating)
    assert by[2].preliminary and by[2].battles == 30 and by[2].ties == 30
    for m in (1, 3):
        assert by[m].lower < by[m].rating < by[m].upper and not by[m].preliminary
    assert [r.rank for r in board.ratings] == [1, 1, 1]  # an unknown interval overlaps everything
    assert board.components == [[1, 3], [2]]
    assert np.isnan(board.win_prob[1]).all() and np.isnan(board.win_prob[:, 1]).all()
    assert (
        np.isnan(board.diff_variance[1]).all() and np.isfinite(board.diff_variance[[0, 2]][:, [0, 2]]).all()
    )
    assert board.win_prob[0, 2] == pytest.approx(0.5, abs=0.02)
    # Counting ties (half), model 2 is fitted, with an interval, and in one component with the others.
    half = leaderboard(battles, [1, 2, 3], RatingOptions(bootstrap=50))
    assert all(math.isfinite(r.lower) and math.isfinite(r.upper) for r in half.ratings)
    assert half.components == [[1, 2, 3]]


def test_a_model_without_battles_has_no_interval():
    board = leaderboard(votes(1, 2, a_wins=3, b_wins=2), [1, 2, 3], RatingOptions(bootstrap=20))
    by = {r.model: r for r in board.ratings}
    assert math.isnan(by[3].lower) and by[3].preliminary and by[3].battles == 0
    assert math.isfinite(by[1].lower) and math.isfinite(by[2].upper)


def test_davidson_two_models_matches_the_closed_form():
    # Two models: the Davidson MLE reproduces the three frequencies exactly:
    # e^(αΔθ) = n_A/n_B and ν = n_T / √(n_A·n_B)
    board = leaderboard(
        votes(1, 2, a_wins=8, b_wins=2, ties=4),
        [1, 2],
        RatingOptions(ties="davidson", ridge=0.0, bootstrap=0),
    )
    r = ratings(board)
    assert r[1] - r[2] == pytest.approx(400 * math.log10(8 / 2), abs=1e-7)
    assert board.tie_parameter == pytest.approx(4 / math.sqrt(8 * 2), rel=1e-9)


def test_davidson_without_ties_is_bt_and_with_rare_ties_is_close():
    battles = random_battles(seed=5, n_models=5, n=600)
    models = list(range(5))
    bt = ratings(leaderboard(battles, models, RatingOptions(bootstrap=0)))
    board = leaderboard(battles, models, RatingOptions(ties="davidson", bootstrap=0))
    assert board.tie_parameter == 0.0
    assert ratings(board) == pytest.approx(bt, abs=1e-6)
    rare = [*battles, B(0, 1, "tie")]
    board = leaderboard(rare, models, RatingOptions(ties="davidson", bootstrap=0))
    assert 0 < board.tie_parameter < 0.01
    assert ratings(board) == pytest.approx(bt, abs=2.0)


def test_undefeated_model_stays_finite_and_on_top():
    board = leaderboard(
        votes(1, 2, a_wins=10) + votes(2, 3, a_wins=3, b_wins=3), [1, 2, 3], RatingOptions(bootstrap=50)
    )
    r = ratings(board)
    assert all(
        math.isfinite(x.rating) and math.isfinite(x.lower) and math.isfinite(x.upper) for x in board.ratings
    )
    assert r[1] > r[2] and r[1] - r[2] < 800  # ten pseudo-free wins, one pseudo-battle of doubt


def test_fit_reports_convergence_and_both_fitters_share_the_rows():
    battles = random_battles(seed=1, n_models=4, n=300, tie_share=0.2)
    rows = dedup_rows(*battle_arrays(battles, {m: m for m in range(4)}))
    assert rows.weights.sum() == 300 and len(rows.a) <= 3 * 4 * 3  # ordered pairs × outcomes
    assert fit_bt(rows, 4).converged and fit_davidson(rows, 4).converged


# --------------------------------------------------------------------------- anchor and invariances


def test_anchor_sits_exactly_at_anchor_rating_and_mean_is_1000_without_one():
    battles = random_battles(seed=2, n_models=4, n=200)
    free = leaderboard(battles, [0, 1, 2, 3], RatingOptions(bootstrap=0))
    assert np.mean([r.rating for r in free.ratings]) == pytest.approx(1000.0, abs=1e-9)
    anchored = leaderboard(battles, [0, 1, 2, 3], RatingOptions(anchor=2, bootstrap=0))
    assert ratings(anchored)[2] == 1000.0
    # moving the anchor only shifts everything by a constant
    shift = ratings(anchored)[0] - ratings(free)[0]
    assert ratings(anchored) == pytest.approx({m: v + shift for m, v in ratings(free).items()}, abs=1e-9)


def test_translation_and_relabelling_invariance():
    battles = random_battles(seed=4, n_models=4, n=200)
    base = ratings(leaderboard(battles, [0, 1, 2, 3], RatingOptions(anchor=0, bootstrap=0)))
    lifted = ratings(
        leaderboard(battles, [0, 1, 2, 3], RatingOptions(anchor=0, anchor_rating=1500.0, bootstrap=0))
    )
    assert lifted == pytest.approx({m: v + 500 for m, v in base.items()}, abs=1e-9)
    # other ids, other order, sides swapped with the outcome: the same ratings
    ids = {0: 40, 1: 10, 2: 30, 3: 20}
    flip = {"a": "b", "b": "a", "tie": "tie", "both_bad": "both_bad"}
    swapped = [B(ids[x.model_b], ids[x.model_a], flip[x.outcome]) for x in battles]
    other = ratings(leaderboard(swapped, [10, 20, 30, 40], RatingOptions(anchor=40, bootstrap=0)))
    assert {m: other[ids[m]] for m in base} == pytest.approx(base, abs=1e-8)


def test_errors_for_bad_input():
    with pytest.raises(ValueError, match="outcome"):
        B(1, 2, "left")
    with pytest.raises(ValueError, match="anchor"):
        leaderboard([], [1, 2], RatingOptions(anchor=3))
    with pytest.raises(ValueError, match="ties"):
        RatingOptions(ties="elo")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- graph, matrices, filters


def test_disconnected_graph_is_reported():
    board = leaderboard(
        votes(1, 2, a_wins=2, b_wins=1) + votes(4, 3, ties=1), [1, 2, 3, 4, 5], RatingOptions(bootstrap=0)
    )
    assert board.components == [[1, 2], [3, 4], [5]]
    assert components(np.ones((2, 2)), [7, 8]) == [[7, 8]]


def test_matrices_pool_seat_orders_and_exclude_ties():
    battles = votes(1, 2, a_wins=2, b_wins=1) + votes(2, 1, a_wins=1, ties=3) + votes(1, 3, both_bad=1)
    board = leaderboard(battles, [1, 2, 3], RatingOptions(bootstrap=0))
    # model 1 beat 2 twice (seat A) ; 2 beat 1 once as B and once as A
    np.testing.assert_allclose(board.win_fraction[0, 1], 2 / 4)
    np.testing.assert_allclose(board.win_fraction[1, 0], 2 / 4)
    assert math.isnan(board.win_fraction[0, 2]) and math.isnan(board.win_fraction[1, 2])
    np.testing.assert_array_equal(board.battle_counts, [[0, 7, 1], [7, 0, 0], [1, 0, 0]])
    r = ratings(board)
    expected = 1 / (1 + 10 ** ((r[2] - r[1]) / 400))
    assert board.win_prob[0, 1] == pytest.approx(expected, abs=1e-12)
    np.testing.assert_allclose(board.win_prob + board.win_prob.T, 1.0)


def test_daily_cap_unknown_models_and_self_battles_are_dropped_and_counted():
    day1 = [B(1, 2, "a", rater=7, day="2025-01-01")] * 5 + [B(1, 2, "b", rater=8, day="2025-01-01")] * 2
    day2 = [B(1, 2, "b", rater=7, day="2025-01-02")] * 2 + [B(1, 2, "a")] * 4  # no rater/day: never capped
    noise = [B(1, 9, "a"), B(2, 2, "a")]
    board = leaderboard(day1 + day2 + noise, [1, 2], RatingOptions(daily_cap=3, bootstrap=0))
    assert board.dropped == {"daily_cap": 2, "unknown_model": 1, "self_battle": 1}
    assert board.n_battles == 3 + 2 + 2 + 4
    assert leaderboard(day1, [1, 2], RatingOptions(bootstrap=0)).dropped == {}


def test_preliminary_flag_uses_battles_and_ci_width():
    battles = votes(1, 2, a_wins=15, b_wins=10)
    loose = leaderboard(
        battles, [1, 2], RatingOptions(bootstrap=200, min_battles_established=20, max_ci_halfwidth=1000)
    )
    assert not any(r.preliminary for r in loose.ratings)
    few = leaderboard(
        battles, [1, 2], RatingOptions(bootstrap=200, min_battles_established=30, max_ci_halfwidth=1000)
    )
    assert all(r.preliminary for r in few.ratings)
    tight = leaderboard(
        battles, [1, 2], RatingOptions(bootstrap=200, min_battles_established=20, max_ci_halfwidth=10)
    )
    assert all(r.preliminary for r in tight.ratings)  # 25 votes cannot pin a rating to ±10 points


# --------------------------------------------------------------------------- bootstrap and ranks


def test_ci_contains_the_estimate_and_shrinks_with_more_data():
    small = (
        votes(1, 2, a_wins=6, b_wins=4) + votes(2, 3, a_wins=6, b_wins=4) + votes(1, 3, a_wins=7, b_wins=3)
    )
    widths = []
    for reps in (1, 4):
        board = leaderboard(small * reps, [1, 2, 3], RatingOptions(bootstrap=500))
        for r in board.ratings:
            assert r.lower < r.rating < r.upper
        widths.append(np.mean([r.upper - r.lower for r in board.ratings]))
    assert widths[1] < 0.7 * widths[0]  # ~1/√4 = 0.5 in theory


def test_bootstrap_is_seeded_and_anchor_keeps_its_own_spread():
    battles = random_battles(seed=6, n_models=4, n=300)
    one = leaderboard(battles, [0, 1, 2, 3], RatingOptions(anchor=0, seed=1))
    again = leaderboard(battles, [0, 1, 2, 3], RatingOptions(anchor=0, seed=1))
    assert one.ratings == again.ratings
    anchor = next(r for r in one.ratings if r.model == 0)
    assert (
        anchor.rating == 1000.0 and anchor.upper - anchor.lower > 1.0
    )  # centred, not pinned (FastChat#3377)
    dv = one.diff_variance
    assert np.allclose(dv, dv.T) and np.allclose(np.diag(dv), 0) and (dv[~np.eye(4, dtype=bool)] > 0).all()


def test_batched_bootstrap_equals_one_fit_per_replicate():
    battles = random_battles(seed=7, n_models=5, n=400, tie_share=0.1)
    rows = dedup_rows(*battle_arrays(battles, {m: m for m in range(5)}))
    for davidson in (False, True):
        thetas = bootstrap_thetas(rows, 5, 6, np.random.default_rng(0), davidson=davidson, chunk_elements=100)
        counts = np.random.default_rng(0).multinomial(400, rows.weights / 400, size=6)
        for k in range(6):
            single = fit_params(rows, 5, counts[k : k + 1].astype(float), davidson=davidson)[0][0, :5]
            np.testing.assert_allclose(thetas[k], single, atol=1e-9)


def test_ci_ranks_by_hand():
    lower = np.array([1100.0, 1050.0, 900.0, 700.0])
    upper = np.array([1200.0, 1150.0, 1060.0, 800.0])
    # model 1 overlaps model 0 → rank 1; model 2 is below 0's lower (1100 > 1060) → 2; model 3 below all → 4
    np.testing.assert_array_equal(ci_ranks(lower, upper), [1, 1, 2, 4])


def test_ranks_are_shared_when_cis_overlap():
    close = votes(1, 2, a_wins=21, b_wins=19)
    far = votes(1, 3, a_wins=38, b_wins=2) + votes(2, 3, a_wins=37, b_wins=3)
    board = leaderboard(close + far, [1, 2, 3], RatingOptions(bootstrap=500))
    assert {r.model: r.rank for r in board.ratings} == {1: 1, 2: 1, 3: 3}
    assert [r.model for r in board.ratings] == [1, 2, 3]


def test_500_bootstrap_refits_of_10_models_and_1000_battles_agree_with_a_separate_seed():
    # the size named in the design (≈0.1 s here); two seeds give nearly the same intervals
    battles = random_battles(seed=8, n_models=10, n=1000)
    a = leaderboard(battles, list(range(10)), RatingOptions(seed=0))
    b = leaderboard(battles, list(range(10)), RatingOptions(seed=1))
    for x, y in zip(a.ratings, b.ratings, strict=True):
        assert x.model == y.model and abs(x.lower - y.lower) < 15 and abs(x.upper - y.upper) < 15


# --------------------------------------------------------------------------- independent implementation


def _centred(x: np.ndarray) -> np.ndarray:
    return x - x.mean()


@pytest.mark.parametrize("tie_share", [0.0, 0.2])
def test_matches_choix(tie_share):
    """choix fits σ(θ_i − θ_j) (natural log scale) with penalty alpha·‖θ‖² (choix/opt.py: PairwiseFcts).

    Ours is ½·ridge·(α²/4)·‖θ‖² on θ = θ_choix/α, i.e. alpha = ridge/8 per vote. With ties, choix gets
    every decisive vote twice and every tie as one win each way: twice our likelihood (a tie is half a
    win and half a loss), so alpha doubles to ridge/4.
    """
    m = 6
    battles = random_battles(seed=11, n_models=m, n=400, tie_share=tie_share, spread=0.8)
    data = []
    for x in battles:
        if x.outcome == "tie":
            data += [(x.model_a, x.model_b), (x.model_b, x.model_a)]
        else:
            won = (x.model_a, x.model_b) if x.outcome == "a" else (x.model_b, x.model_a)
            data += [won] * (2 if tie_share else 1)
    per_vote = 2 if tie_share else 1
    rows = dedup_rows(*battle_arrays(battles, {i: i for i in range(m)}))
    to_display = SCALE / ALPHA

    ours = SCALE * fit_bt(rows, m, ridge=1.0).theta
    theirs = to_display * choix.opt_pairwise(m, data, alpha=per_vote / 8, method="Newton-CG", tol=1e-12)
    np.testing.assert_allclose(_centred(ours), _centred(theirs), atol=1e-4)

    ours_mle = SCALE * fit_bt(rows, m, ridge=0.0).theta
    theirs_mle = to_display * choix.ilsr_pairwise(m, data, alpha=0.0, tol=1e-12, max_iter=2000)
    np.testing.assert_allclose(_centred(ours_mle), _centred(theirs_mle), atol=1e-4)
    assert np.ptp(ours_mle) > 100  # a real spread, not a trivial all-zero agreement
