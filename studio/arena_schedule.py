"""Which two models meet in the next arena battle (annotation-and-arena.md §2.8). Pure: no DB, no I/O.

The rule, in order:

1. **Warm-up.** A model with fewer than ``n0`` battles against its parent, then the anchor, then the
   current best plays that pair first; the newest model goes first. This keeps the comparison graph
   connected and answers "is the new checkpoint better than where it came from" early.
2. **Exploration.** With probability ``explore``, a uniformly random pair, so every pair keeps some
   coverage and the ratings do not rest only on adaptive choices.
3. **Information.** Otherwise a pair drawn with probability ∝ p̂ᵢⱼ(1−p̂ᵢⱼ)·Var(θᵢ−θⱼ) from the latest
   board: close pairs whose rating difference is still uncertain. Without a board, uniform.

A model never meets itself. Which side is shown on the left is decided elsewhere (per battle).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from studio.rating import Leaderboard

REASONS = ("parent", "anchor", "best", "uncertain", "random")


@dataclass(frozen=True)
class ArenaEntry:
    """A model that may be scheduled: its checkpoint, its parent's, whether it is the anchor, and
    when it entered the arena (newer models warm up first)."""

    checkpoint_id: int
    parent_id: int | None
    is_anchor: bool
    added_at: datetime


def pair_count(counts: Mapping[tuple[int, int], int], a: int, b: int) -> int:
    """Battles between ``a`` and ``b``, whichever order the counts are keyed in."""
    return counts.get((a, b), 0) + (counts.get((b, a), 0) if a != b else 0)


def best_model(board: Leaderboard | None, ids: Sequence[int]) -> int | None:
    """The highest-rated model of ``ids`` on the board (None without a board or rated model)."""
    if board is None:
        return None
    wanted = set(ids)
    rated = [r for r in board.ratings if r.model in wanted]
    return max(rated, key=lambda r: r.rating).model if rated else None


def warmup_pair(
    models: Sequence[ArenaEntry], counts: Mapping[tuple[int, int], int], best: int | None, n0: int
) -> tuple[int, int, str] | None:
    """Step 1: (model, target, reason) of the newest model still short of ``n0`` battles against its
    parent, the anchor or the best model (targets checked in that order), or None."""
    ids = {m.checkpoint_id for m in models}
    anchor = next((m.checkpoint_id for m in models if m.is_anchor), None)
    for m in sorted(models, key=lambda e: (e.added_at, e.checkpoint_id), reverse=True):
        for target, reason in ((m.parent_id, "parent"), (anchor, "anchor"), (best, "best")):
            if target is None or target == m.checkpoint_id or target not in ids:
                continue
            if pair_count(counts, m.checkpoint_id, target) < n0:
                return m.checkpoint_id, target, reason
    return None


def information_weights(pairs: Sequence[tuple[int, int]], board: Leaderboard) -> np.ndarray:
    """Weight p̂(1−p̂)·Var(θᵢ−θⱼ) per pair, shape [len(pairs)].

    A pair with a model the board does not know (no battles yet), or an undefined variance, gets the
    largest weight seen (p̂ = ½ and the largest known variance): nothing is known about it.
    """
    index = {m: k for k, m in enumerate(board.models)}
    weights = np.full(len(pairs), np.nan)
    for n, (a, b) in enumerate(pairs):
        if a in index and b in index:
            p = float(board.win_prob[index[a], index[b]])
            var = float(board.diff_variance[index[a], index[b]])
            if math.isfinite(p) and math.isfinite(var):
                weights[n] = p * (1.0 - p) * max(var, 0.0)
    known = weights[np.isfinite(weights)]
    variance = np.asarray(board.diff_variance, dtype=float)
    off_diagonal = variance[~np.eye(len(variance), dtype=bool)]
    variances = off_diagonal[np.isfinite(off_diagonal)]
    fallback = 0.25 * float(variances.max()) if variances.size else 1.0
    weights[~np.isfinite(weights)] = max(fallback, float(known.max()) if known.size else 0.0)
    return weights


def choose_pair(
    models: Sequence[ArenaEntry],
    counts: Mapping[tuple[int, int], int],
    board: Leaderboard | None,
    rng: np.random.Generator,
    *,
    n0: int = 10,
    explore: float = 0.2,
) -> tuple[int, int, str]:
    """The next battle's two model ids and why: "parent" | "anchor" | "best" | "uncertain" | "random".

    ``counts`` maps a pair of checkpoint ids (either order) to its number of counted battles; ``board``
    is the latest leaderboard (``models``, ``win_prob`` and ``diff_variance`` [M, M] are read) or None.
    Raises ValueError with fewer than two distinct models.
    """
    unique = list({m.checkpoint_id: m for m in models}.values())
    if len(unique) < 2:
        raise ValueError("a battle needs at least two different models")
    if not 0.0 <= explore <= 1.0:
        raise ValueError(f"explore must be in [0, 1], got {explore}")
    ids = [m.checkpoint_id for m in unique]
    warm = warmup_pair(unique, counts, best_model(board, ids), n0)
    if warm is not None:
        return warm
    pairs = list(itertools.combinations(sorted(ids), 2))
    if board is None or rng.random() < explore:
        a, b = pairs[int(rng.integers(len(pairs)))]
        return a, b, "random"
    weights = information_weights(pairs, board)
    total = float(weights.sum())
    if not total > 0.0:  # every pair decided with certainty: fall back to coverage
        a, b = pairs[int(rng.integers(len(pairs)))]
        return a, b, "random"
    a, b = pairs[int(rng.choice(len(pairs), p=weights / total))]
    return a, b, "uncertain"
