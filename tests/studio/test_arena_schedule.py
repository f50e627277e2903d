"""Battle scheduling (annotation-and-arena.md §2.8): hand-checked cases and a seeded frequency test."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import numpy as np
import pytest

from studio.arena_schedule import ArenaEntry, choose_pair, information_weights, pair_count, warmup_pair

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def entry(cid: int, parent: int | None = None, anchor: bool = False, minutes: int = 0) -> ArenaEntry:
    return ArenaEntry(
        checkpoint_id=cid, parent_id=parent, is_anchor=anchor, added_at=T0 + timedelta(minutes=minutes)
    )


def board(models, win_prob, diff_variance, ratings=None):
    """The fields `choose_pair` reads from a `studio.rating.Leaderboard`."""
    ratings = ratings or {}
    return SimpleNamespace(
        models=list(models),
        win_prob=np.asarray(win_prob, dtype=float),
        diff_variance=np.asarray(diff_variance, dtype=float),
        ratings=[SimpleNamespace(model=m, rating=r) for m, r in ratings.items()],
    )


# Base 1 (anchor) ← 2 ← 3: a lineage of three checkpoints, newest last.
LINEAGE = [entry(1, anchor=True), entry(2, parent=1, minutes=1), entry(3, parent=2, minutes=2)]


def test_pair_count_reads_either_order():
    assert pair_count({(1, 2): 3, (2, 1): 4}, 2, 1) == 7
    assert pair_count({(1, 2): 3}, 1, 3) == 0


def test_newest_model_plays_its_parent_first():
    rng = np.random.default_rng(0)
    assert choose_pair(LINEAGE, {}, None, rng, n0=2) == (3, 2, "parent")


def test_then_the_anchor_then_the_next_newest():
    # 3 has 2 battles with its parent (= n0), none with the anchor 1.
    assert warmup_pair(LINEAGE, {(2, 3): 2}, None, n0=2) == (3, 1, "anchor")
    # 3 is warm against 2 and 1; 2's parent is the anchor: one entry covers both.
    assert warmup_pair(LINEAGE, {(2, 3): 2, (1, 3): 5, (1, 2): 1}, None, n0=2) == (2, 1, "parent")
    assert warmup_pair(LINEAGE, {(2, 3): 2, (1, 3): 5, (1, 2): 2}, None, n0=2) is None


def test_the_best_model_is_a_warmup_target_and_never_its_own():
    # Model 4 (no parent, no anchor in the arena) must meet the best model, 2.
    models = [entry(1), entry(2, minutes=1), entry(4, minutes=3)]
    b = board([1, 2, 4], np.full((3, 3), 0.5), np.ones((3, 3)), ratings={1: 990.0, 2: 1050.0, 4: 1000.0})
    assert warmup_pair(models, {}, 2, n0=1) == (4, 2, "best")
    assert choose_pair(models, {}, b, np.random.default_rng(0), n0=1) == (4, 2, "best")
    # Once 4 is warm, the older model 1 meets the best.
    assert warmup_pair(models, {(2, 4): 1}, 2, n0=1) == (1, 2, "best")
    # The best model itself has no "best" target: with 4 and 1 warm, nothing is left to warm up.
    assert warmup_pair(models, {(2, 4): 1, (1, 2): 1}, 2, n0=1) is None


def test_a_model_never_meets_itself():
    rng = np.random.default_rng(1)
    # Its own parent and the anchor are itself: no warm-up target, only the other model.
    models = [entry(1, parent=1, anchor=True), entry(2, minutes=1)]
    for _ in range(50):
        a, b, _ = choose_pair(models, {}, None, rng, n0=3)
        assert {a, b} == {1, 2}
    with pytest.raises(ValueError, match="two different models"):
        choose_pair([entry(1), entry(1, minutes=5)], {}, None, rng)
    with pytest.raises(ValueError, match="two different models"):
        choose_pair([entry(1)], {}, None, rng)


def test_without_a_board_after_warmup_pairs_are_uniform():
    rng = np.random.default_rng(2)
    models = [entry(1), entry(2), entry(3)]
    seen = {}
    for _ in range(3000):
        a, b, reason = choose_pair(models, {}, None, rng)
        assert reason == "random" and a < b
        seen[(a, b)] = seen.get((a, b), 0) + 1
    assert set(seen) == {(1, 2), (1, 3), (2, 3)}
    assert all(abs(n / 3000 - 1 / 3) < 0.04 for n in seen.values())


# A board over models 1, 2, 3 (hand-made):
#   pair (1, 2): p = 0.5, Var = 0.04 → 0.25 · 0.04 = 0.0100
#   pair (1, 3): p = 0.9, Var = 0.04 → 0.09 · 0.04 = 0.0036
#   pair (2, 3): p = 0.5, Var = 0.01 → 0.25 · 0.01 = 0.0025          total 0.0161
P = [[0.5, 0.5, 0.9], [0.5, 0.5, 0.5], [0.1, 0.5, 0.5]]
V = [[0.0, 0.04, 0.04], [0.04, 0.0, 0.01], [0.04, 0.01, 0.0]]
BOARD = board([1, 2, 3], P, V)
PAIRS = [(1, 2), (1, 3), (2, 3)]


def test_information_weights_by_hand():
    np.testing.assert_allclose(information_weights(PAIRS, BOARD), [0.0100, 0.0036, 0.0025])


def test_a_model_missing_from_the_board_gets_the_largest_weight():
    # Model 4 has no battles: its pairs weigh max(0.25 · max Var, largest known weight) = max(0.01, 0.01).
    w = information_weights([(1, 2), (1, 4), (3, 4)], BOARD)
    np.testing.assert_allclose(w, [0.0100, 0.0100, 0.0100])
    nan_board = board([1, 2], [[0.5, np.nan], [np.nan, 0.5]], [[0, np.nan], [np.nan, 0]])
    np.testing.assert_allclose(information_weights([(1, 2)], nan_board), [1.0])  # nothing known at all


def test_seeded_frequencies_follow_the_information_weights():
    rng = np.random.default_rng(1234)
    models = [entry(1), entry(2), entry(3)]
    n = 20_000
    counts = dict.fromkeys(PAIRS, 0)
    for _ in range(n):
        a, b, reason = choose_pair(models, {}, BOARD, rng, explore=0.0)
        assert reason == "uncertain"
        counts[(a, b)] += 1
    expected = {(1, 2): 0.0100 / 0.0161, (1, 3): 0.0036 / 0.0161, (2, 3): 0.0025 / 0.0161}
    for pair, share in expected.items():
        sd = (share * (1 - share) / n) ** 0.5
        assert abs(counts[pair] / n - share) < 4 * sd, (pair, counts[pair] / n, share)


def test_exploration_share_is_about_explore():
    rng = np.random.default_rng(7)
    models = [entry(1), entry(2), entry(3)]
    n = 5000
    random_share = sum(choose_pair(models, {}, BOARD, rng, explore=0.2)[2] == "random" for _ in range(n)) / n
    assert abs(random_share - 0.2) < 4 * (0.2 * 0.8 / n) ** 0.5
    with pytest.raises(ValueError, match="explore"):
        choose_pair(models, {}, BOARD, rng, explore=1.5)


def test_every_pair_decided_falls_back_to_random():
    certain = board([1, 2], [[0.5, 1.0], [0.0, 0.5]], [[0, 0.0], [0.0, 0]])
    a, b, reason = choose_pair([entry(1), entry(2)], {}, certain, np.random.default_rng(0), explore=0.0)
    assert (a, b, reason) == (1, 2, "random")
