"""Rater statistics (position bias, ties, crowd agreement, outlier martingales), vote screening, and the
always-valid pair test — hand-checked cases plus seeded frequency checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from studio.rater_stats import outlier_martingales, rater_stats, screen_votes, sequential_pair_test
from studio.rating import BattleRecord, RatingOptions, leaderboard

B = BattleRecord


def stats_of(battles, rater):
    return next(s for s in rater_stats(battles) if s.rater == rater)


# --------------------------------------------------------------------------- position bias, ties, agreement


def test_position_bias_with_a_wilson_interval():
    # 10 decisive votes, all for the left side, whichever model sat there; plus 2 ties
    left_a = [B(1, 2, "a", rater=5, left_is_a=True)] * 6
    left_b = [B(1, 2, "b", rater=5, left_is_a=False)] * 4
    s = stats_of([*left_a, *left_b, B(1, 2, "tie", rater=5), B(1, 2, "both_bad", rater=5)], 5)
    assert s.votes == 12 and s.left_rate == 1.0
    # Wilson 10/10, z = 1.96: centre (1 + z²/20)/(1 + z²/10) = 0.8612, half 0.1388 → [0.7225, 1]
    assert s.left_ci == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert s.tie_rate == pytest.approx(2 / 12)


def test_no_decisive_votes_gives_nan_bias_and_no_agreement():
    s = stats_of([B(1, 2, "tie", rater=3)], 3)
    assert math.isnan(s.left_rate) and all(math.isnan(x) for x in s.left_ci)
    assert s.tie_rate == 1.0 and s.crowd_agreement is None and not s.flagged


def test_crowd_agreement_excludes_the_raters_own_votes():
    crowd = [B(1, 2, "a", rater=r) for r in (10, 11, 12)] + [B(2, 1, "a", rater=13)]  # 3 : 1 for model 1
    mine = [B(2, 1, "b", rater=7), B(1, 2, "b", rater=7), B(2, 1, "a", rater=7), B(1, 2, "tie", rater=7)]
    # rater 7 picks model 1, model 2, model 2 (tie not counted): agrees once in three
    assert stats_of(crowd + mine, 7).crowd_agreement == pytest.approx(1 / 3)
    # rater 13's crowd is 3 : 0 for model 1 while 13 voted for model 2
    assert stats_of(crowd, 13).crowd_agreement == 0.0
    # alone on a pair (or with an evenly split crowd) nothing is comparable
    assert stats_of([B(3, 4, "a", rater=1), B(3, 4, "a", rater=1)], 1).crowd_agreement is None
    split = [B(1, 2, "a", rater=20), B(1, 2, "b", rater=21), B(1, 2, "a", rater=22)]
    assert stats_of(split, 22).crowd_agreement is None


def test_votes_without_a_rater_feed_the_crowd_only():
    battles = [B(1, 2, "a")] * 3 + [B(1, 2, "a", rater=4)]
    assert [s.rater for s in rater_stats(battles)] == [4]
    assert stats_of(battles, 4).crowd_agreement == 1.0


# --------------------------------------------------------------------------- outlier martingales


def test_martingale_factors_by_hand():
    # v = 0 against a crowd of 3 wins, 1 loss: p_up = (#{c ≤ 0} + 1)/(n + 1) = 2/5,
    # p_low = (#{c ≥ 0} + 1)/(n + 1) = 5/5
    up, low, flagged = outlier_martingales([(0.0, 3, 1)])
    assert (up, low, flagged) == (pytest.approx(1 / (2 * 0.4)), pytest.approx(1 / 2), False)
    # a vote on a pair nobody else decided changes nothing, and neither does a tie (v = ½): the crowd
    # is decisive votes only, so ½ would read as extreme against any crowd
    assert outlier_martingales([(1.0, 0, 0)]) == (1.0, 1.0, False)
    assert outlier_martingales([(0.5, 3, 1), (0.5, 50, 0)]) == (1.0, 1.0, False)


def test_a_rater_who_ties_now_and_then_is_not_flagged_against_a_decisive_crowd():
    crowd = [B(1, 2, "a", rater=r) for r in (10, 11, 12) for _ in range(5)]  # 15 decisive: 1 beats 2
    honest = [B(1, 2, "tie", rater=99), B(1, 2, "both_bad", rater=99), *[B(1, 2, "a", rater=99)] * 3]
    s = stats_of(crowd + honest, 99)
    # only the three agreeing votes count: each factor (15 + 1)/(2·(15 + 1)) = ½ on both sides
    assert not s.flagged and s.crowd_agreement == 1.0
    assert (s.martingale_up, s.martingale_low) == (pytest.approx(0.125), pytest.approx(0.125))
    ties_only = stats_of(crowd + [B(1, 2, "tie", rater=98)] * 20, 98)
    assert (ties_only.martingale_up, ties_only.martingale_low, ties_only.flagged) == (1.0, 1.0, False)


def test_contrarian_rater_is_flagged_after_two_votes():
    crowd = [B(1, 2, "a", rater=100 + k) for k in range(10)]  # model 1 (the pair's first) always wins
    contrarian = [B(1, 2, "b", rater=9)] * 5
    s = stats_of(crowd + contrarian, 9)
    # each vote v = 0: p_up = (0 + 1)/11 → factor 5.5; p_low = 11/11 → 0.5. After two: 30.25 > 20 → stop
    assert s.flagged
    assert (s.martingale_up, s.martingale_low) == (pytest.approx(30.25), pytest.approx(0.25))
    honest = stats_of([*crowd, *[B(1, 2, "a", rater=8)] * 5], 8)
    assert not honest.flagged and honest.martingale_up == pytest.approx(0.5**5)


def test_raters_with_fewer_than_five_votes_are_not_tested():
    crowd = [B(1, 2, "a", rater=100 + k) for k in range(10)]
    s = stats_of(crowd + [B(1, 2, "b", rater=9)] * 4, 9)
    assert (s.martingale_up, s.martingale_low, s.flagged) == (1.0, 1.0, False)


def test_honest_raters_are_rarely_flagged():
    rng = np.random.default_rng(0)
    battles = []
    for _ in range(3000):  # 30 raters voting like the crowd: model 1 beats 2 with p = 0.7
        i, j = (1, 2) if rng.random() < 0.5 else (2, 1)
        one_wins = rng.random() < 0.7
        battles.append(B(i, j, "a" if (i == 1) == one_wins else "b", rater=int(rng.integers(30))))
    assert sum(s.flagged for s in rater_stats(battles)) <= 3  # α = 0.05 per rater


def test_flagged_raters_are_dropped_only_when_asked():
    crowd = [B(1, 2, "a", rater=100 + k) for k in range(10)]
    battles = crowd + [B(1, 2, "b", rater=9)] * 5
    assert leaderboard(battles, [1, 2], RatingOptions(bootstrap=0)).n_battles == 15
    board = leaderboard(battles, [1, 2], RatingOptions(bootstrap=0, drop_flagged_raters=True))
    assert board.n_battles == 10 and board.dropped == {"flagged_rater": 5}


def test_screen_votes_caps_each_rater_per_day_in_order():
    votes = [B(1, 2, "a", rater=1, day="d1")] * 3 + [B(1, 2, "b", rater=1, day="d1")] * 2
    votes += [B(1, 2, "b", rater=1, day="d2"), B(1, 2, "b", rater=2, day="d1"), B(1, 2, "b", day="d1")]
    kept, dropped = screen_votes(votes, [1, 2], daily_cap=2)
    assert dropped == {"daily_cap": 3}
    assert [(b.rater, b.day, b.outcome) for b in kept] == [
        (1, "d1", "a"), (1, "d1", "a"), (1, "d2", "b"), (2, "d1", "b"), (None, "d1", "b")
    ]  # fmt: skip


# --------------------------------------------------------------------------- sequential pair test


def test_pair_test_wealth_by_hand():
    # KT bets: q = ½, then (1 + ½)/2 = ¾, then (2 + ½)/3 = ⅚ ⇒ W = 1 · 1.5 · (5/3) = 2.5
    battles = [B(1, 2, "a"), B(2, 1, "b"), B(1, 2, "tie"), B(1, 3, "a"), B(1, 2, "a")]
    assert sequential_pair_test(battles, 1, 2) == (False, None, pytest.approx(2.5))
    assert sequential_pair_test(battles, 2, 1)[2] == pytest.approx(2.5)  # two-sided: symmetric in a, b


def _coin_battles(rng: np.random.Generator, p_first: float, n: int) -> list[B]:
    out = []
    for _ in range(n):
        first_wins = rng.random() < p_first
        if rng.random() < 0.5:
            out.append(B(1, 2, "a" if first_wins else "b"))
        else:
            out.append(B(2, 1, "b" if first_wins else "a"))
    return out


def test_pair_test_rarely_decides_under_a_fair_coin():
    rng = np.random.default_rng(1)
    decided = sum(sequential_pair_test(_coin_battles(rng, 0.5, 300), 1, 2)[0] for _ in range(300))
    assert decided <= 0.08 * 300  # Ville: at most α = 5 % ever, however long we watch


def test_pair_test_finds_a_75_percent_winner_quickly():
    rng = np.random.default_rng(2)
    needed = []
    for _ in range(40):
        battles = _coin_battles(rng, 0.75, 400)
        decided, winner, evidence = sequential_pair_test(battles, 1, 2)
        assert decided and winner == 1 and evidence >= 20
        lo, hi = 0, len(battles)  # decided on a prefix ⇒ decided on every longer one: bisect the first
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if sequential_pair_test(battles[:mid], 1, 2)[0] else (mid, hi)
        needed.append(hi)
    assert np.median(needed) <= 80 and max(needed) <= 250
