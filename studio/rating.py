"""Arena ratings: Bradley–Terry / Davidson MLE with bootstrap CIs, in pure numpy (annotation-and-arena.md §2).

The pipeline (FastChat `rating_systems.py` shape, fitted by Newton's method instead of scipy's L-BFGS):

    battles ──screen_votes──▶ kept votes ──battle_arrays──▶ (a, b, outcome) ──dedup_rows──▶ Rows (U ≤ 3·M² without style)
    Rows ──fit_params──▶ θ (+ style β, + Davidson φ)       Rows ──bootstrap_thetas──▶ θ^(b), b = 1..B
    θ, θ^(b) ──display_offset / bootstrap_display──▶ ratings, CIs ──ci_ranks──▶ Leaderboard

Scale (§2.2). P(i beats j) = σ(α·(θ_i − θ_j)) with α = ln 10, and the displayed rating is R = 400·θ + c,
so P(i beats j) = 1 / (1 + 10^((R_j − R_i)/400)), the Elo expected score. c puts the anchor model at
`anchor_rating` (or, without an anchor, the mean rating at `anchor_rating`).

Ridge. The MLE of a model that won (or lost) every battle is infinite, so θ gets ½·λ·‖θ‖² with
λ = ridge · α²/4: that is the curvature at θ = 0 of one virtual tie against an average (θ = 0)
opponent, so `ridge` counts pseudo-battles per model (default 1). The likelihood only sees
differences, so the penalty also fixes the mean at 0. `ridge=0` gives the plain MLE (the mean is
then pinned by a gauge term ½·(Σθ)², which leaves every difference unchanged); it needs a connected
graph in which every model has won and lost something.

Ties ("tie" and "both_bad" alike, §2.4): "half" = half a win and half a loss (FastChat's default);
"drop" = left out of the fit (still counted in the per-model tallies); "davidson" = P(tie) =
ν·√(π_i π_j)/(π_i + π_j + ν·√(π_i π_j)), π = e^(αθ), with ν fitted jointly (ν = 0 is plain BT).

A model without a fitted vote (no battle at all; with "drop", only ties) has no estimate, only the
ridge prior: its interval is NaN (not estimable; ranked 1 as an unbounded interval would be, and it
moves nobody else's rank), its rows of `win_prob` and `diff_variance` are NaN, it is preliminary,
and with "drop" the battle graph of `components` has decisive battles only (so it stands apart).

Style control (§2.6): logit = α·(θ_a − θ_b) + z·β, z = standardised style differences
(`studio.rating_style`), β with an L2 penalty ½·0.5·‖β‖² (FastChat's reg = 0.5); the reported
rating is θ, i.e. the strength with style held equal.

Bootstrap (§2.3): multinomial counts over the unique rows (FastChat#3523), all replicates fitted
together by a batched Newton solver; each replicate is centred to mean 0 and shifted by the
full-data offset, so the anchor's own noise does not widen everyone's interval (FastChat#3377).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

# re-exported: the arena service and tabs import the whole rating API from this module
from studio.rater_stats import RaterStats as RaterStats
from studio.rater_stats import rater_stats as rater_stats
from studio.rater_stats import screen_votes
from studio.rater_stats import sequential_pair_test as sequential_pair_test

# the fitting half, re-exported likewise
from studio.rating_fit import A_WINS as A_WINS
from studio.rating_fit import ALPHA as ALPHA
from studio.rating_fit import B_WINS as B_WINS
from studio.rating_fit import DEFAULT_RIDGE as DEFAULT_RIDGE
from studio.rating_fit import STYLE_L2 as STYLE_L2
from studio.rating_fit import TIE as TIE
from studio.rating_fit import Fit as Fit
from studio.rating_fit import Rows as Rows
from studio.rating_fit import bootstrap as bootstrap
from studio.rating_fit import bootstrap_thetas as bootstrap_thetas
from studio.rating_fit import dedup_rows as dedup_rows
from studio.rating_fit import fit_bt as fit_bt
from studio.rating_fit import fit_davidson as fit_davidson
from studio.rating_fit import fit_params as fit_params
from studio.rating_style import STYLE_KEYS, style_design
from studio.rating_style import style_features as style_features

OUTCOMES = ("a", "b", "tie", "both_bad")
SCALE = 400.0
"""Display points per unit of θ."""


@dataclass(frozen=True)
class BattleRecord:
    """One counted vote. Model ids as shown: `model_a` is the comparison's generation A."""

    model_a: int
    model_b: int
    outcome: str
    """"a" | "b" | "tie" | "both_bad"."""
    rater: int | None = None
    left_is_a: bool = True
    """Whether A was shown on the left (for position bias)."""
    style_a: Mapping[str, float] | None = None
    """`style_features()` of A's response (needed only for style control)."""
    style_b: Mapping[str, float] | None = None
    day: str | None = None
    """"YYYY-MM-DD" of the vote, for the per-rater daily cap."""

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, not {self.outcome!r}")


@dataclass(frozen=True)
class RatingOptions:
    """How a leaderboard is computed."""

    ties: Literal["half", "drop", "davidson"] = "half"
    """Tie handling in the fit (module docstring)."""
    ridge: float = DEFAULT_RIDGE
    """Pseudo-battles per model pulling θ towards the mean; 0 = plain MLE."""
    bootstrap: int = 500
    """Bootstrap replicates for the CIs (0 = no CIs: lower = upper = rating)."""
    seed: int = 0
    """Seed of the bootstrap's random generator."""
    anchor: int | None = None
    """Model id placed exactly at `anchor_rating`; None = the mean rating is `anchor_rating`."""
    anchor_rating: float = 1000.0
    style_control: bool = False
    """Fit style coefficients jointly and report the strength with style held equal."""
    daily_cap: int | None = None
    """Keep only the first k votes of each rater per day (votes without rater or day are kept)."""
    min_battles_established: int = 20
    """Fewer battles than this ⇒ preliminary."""
    max_ci_halfwidth: float = 100.0
    """A 95 % CI half-width above this (display points) ⇒ preliminary."""
    drop_flagged_raters: bool = False
    """Added field: drop all votes of raters the sequential outlier test flags (default: only warn)."""

    def __post_init__(self) -> None:
        if self.ties not in ("half", "drop", "davidson"):
            raise ValueError(f"ties must be 'half', 'drop' or 'davidson', not {self.ties!r}")
        if self.ridge < 0 or self.bootstrap < 0 or (self.daily_cap is not None and self.daily_cap < 0):
            raise ValueError("ridge, bootstrap and daily_cap must be non-negative")


@dataclass(frozen=True)
class ModelRating:
    model: int
    rating: float
    lower: float
    """2.5 % bootstrap quantile (display scale); NaN for a model without a fitted vote."""
    upper: float
    """97.5 % bootstrap quantile; NaN for a model without a fitted vote."""
    rank: int
    """1 + number of models whose lower bound is above this model's upper bound (ties share a rank)."""
    battles: int
    wins: int
    losses: int
    ties: int
    """Ties and both-bad votes."""
    win_rate: float
    """wins / (wins + losses); NaN without decisive battles."""
    preliminary: bool


@dataclass(frozen=True)
class Leaderboard:
    ratings: list[ModelRating]
    """Sorted by rating, descending."""
    models: list[int]
    """Model order of the matrices (as passed to `leaderboard`)."""
    win_fraction: np.ndarray
    """[M, M] share of decisive i–j battles that i won, both seat orders pooled; NaN without any."""
    battle_counts: np.ndarray
    """[M, M] symmetric: battles between i and j, ties included."""
    diff_variance: np.ndarray
    """[M, M] bootstrap Var(R_i − R_j), display points²."""
    win_prob: np.ndarray
    """[M, M] fitted P(i beats j | the vote is not a tie)."""
    components: list[list[int]]
    """Connected components of the battle graph; more than one ⇒ ratings across them are not comparable."""
    style_coefficients: dict[str, float] | None
    """β per style feature (logit per standard deviation of d_k), when style control is on."""
    options: RatingOptions
    n_battles: int
    """Votes used (after the filters in `dropped`), ties included."""
    dropped: dict[str, int]
    """Reason → votes removed: unknown_model, self_battle, daily_cap, flagged_rater (non-zero only)."""
    tie_parameter: float | None = None
    """Added field: Davidson's ν when ties="davidson", else None."""


# --------------------------------------------------------------------------- battles → arrays


def battle_arrays(battles: Sequence[BattleRecord], index: Mapping[int, int]) -> tuple[np.ndarray, ...]:
    """(a [N], b [N], outcome [N]) as model indices and codes B_WINS / TIE / A_WINS."""
    code = {"a": A_WINS, "b": B_WINS, "tie": TIE, "both_bad": TIE}
    a = np.array([index[x.model_a] for x in battles], dtype=np.int64)
    b = np.array([index[x.model_b] for x in battles], dtype=np.int64)
    outcome = np.array([code[x.outcome] for x in battles], dtype=np.int64)
    return a, b, outcome


# --------------------------------------------------------------------------- display, CIs, ranks


def display_offset(theta: np.ndarray, anchor: int | None, anchor_rating: float) -> float:
    """c in R = 400·θ + c: the anchor (an index) at anchor_rating, or the mean rating at anchor_rating."""
    base = theta[anchor] if anchor is not None else (theta.mean() if len(theta) else 0.0)
    return float(anchor_rating - SCALE * base)


def bootstrap_display(thetas: np.ndarray, theta_hat: np.ndarray, offset: float) -> np.ndarray:
    """Replicates on the display scale [B, M]: each centred to mean 0, then given the full-data mean and offset."""
    centred = thetas - thetas.mean(axis=1, keepdims=True) + theta_hat.mean()
    return SCALE * centred + offset


def ci_ranks(lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """rank_i = 1 + #{j : lower_j > upper_i} (§2.3); models with overlapping CIs share a rank. [M] → [M]."""
    return 1 + (lower[None, :] > upper[:, None]).sum(axis=1)


def pair_counts(
    a: np.ndarray, b: np.ndarray, outcome: np.ndarray, n_models: int
) -> tuple[np.ndarray, np.ndarray]:
    """(wins [M, M]: i beat j, seat order pooled; ties [M, M] symmetric, both_bad included)."""
    wins = np.zeros((n_models, n_models))
    ties = np.zeros((n_models, n_models))
    np.add.at(wins, (a[outcome == A_WINS], b[outcome == A_WINS]), 1.0)
    np.add.at(wins, (b[outcome == B_WINS], a[outcome == B_WINS]), 1.0)
    np.add.at(ties, (a[outcome == TIE], b[outcome == TIE]), 1.0)
    return wins, ties + ties.T


def win_fraction(wins: np.ndarray) -> np.ndarray:
    """[M, M] wins_ij / (wins_ij + wins_ji), NaN where i and j have no decisive battle."""
    decisive = wins + wins.T
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(decisive > 0, wins / decisive, np.nan)


def win_probability(theta: np.ndarray) -> np.ndarray:
    """[M, M] σ(α·(θ_i − θ_j)): P(i beats j), ties aside."""
    return 0.5 * (1.0 + np.tanh(0.5 * ALPHA * (theta[:, None] - theta[None, :])))


def components(counts: np.ndarray, models: Sequence[int]) -> list[list[int]]:
    """Connected components of the graph with an edge where counts[i, j] > 0 → lists of model ids.

    Components come in the order of their first model in `models`, members in `models` order; a
    model without battles is a component of its own.
    """
    adjacent = (counts + counts.T) > 0
    label = np.full(len(models), -1)
    groups: list[list[int]] = []
    for start in range(len(models)):
        if label[start] >= 0:
            continue
        label[start] = len(groups)
        frontier, members = [start], [start]
        while frontier:
            nxt = np.flatnonzero(adjacent[frontier].any(axis=0) & (label < 0))
            label[nxt] = len(groups)
            members.extend(nxt.tolist())
            frontier = nxt.tolist()
        groups.append([models[i] for i in sorted(members)])
    return groups


# --------------------------------------------------------------------------- the leaderboard


def _fit_and_bootstrap(rows: Rows, n_models: int, options: RatingOptions) -> tuple[Fit, np.ndarray]:
    """Point fit and bootstrap θ [B, M]; style columns that are zero everywhere are left out (β = 0)."""
    used = np.flatnonzero(np.abs(rows.features).max(axis=0, initial=0.0) > 0)
    small = replace(rows, features=rows.features[:, used])
    davidson = options.ties == "davidson"
    fit = (fit_davidson if davidson else fit_bt)(small, n_models, ridge=options.ridge)
    rng = np.random.default_rng(options.seed)
    thetas = bootstrap_thetas(small, n_models, options.bootstrap, rng, ridge=options.ridge, davidson=davidson)
    beta = np.zeros(rows.features.shape[1])
    beta[used] = fit.beta
    return replace(fit, beta=beta), thetas


def _model_rows(
    models: list[int],
    rating: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    wins: np.ndarray,
    ties: np.ndarray,
    options: RatingOptions,
) -> list[ModelRating]:
    ranks = ci_ranks(lower, upper)
    won, lost, tied = wins.sum(axis=1), wins.sum(axis=0), ties.sum(axis=1)
    out = []
    for i, model in enumerate(models):
        battles = int(won[i] + lost[i] + tied[i])
        decisive = won[i] + lost[i]
        half_width = (upper[i] - lower[i]) / 2.0
        out.append(
            ModelRating(
                model=model, rating=float(rating[i]), lower=float(lower[i]), upper=float(upper[i]),
                rank=int(ranks[i]), battles=battles, wins=int(won[i]), losses=int(lost[i]), ties=int(tied[i]),
                win_rate=float(won[i] / decisive) if decisive else math.nan,
                preliminary=battles < options.min_battles_established
                or not half_width <= options.max_ci_halfwidth,  # NaN: no fitted vote
            )
        )  # fmt: skip
    return sorted(out, key=lambda r: (-r.rating, r.model))


def leaderboard(
    battles: Sequence[BattleRecord], models: Sequence[int], options: RatingOptions = RatingOptions()
) -> Leaderboard:
    """Ratings, CIs, ranks and pairwise matrices of `models` from votes in chronological order."""
    models = list(models)
    if len(set(models)) != len(models):
        raise ValueError("models contains duplicates")
    index = {m: i for i, m in enumerate(models)}
    if options.anchor is not None and options.anchor not in index:
        raise ValueError(f"anchor {options.anchor} is not among the rated models")
    n = len(models)
    kept, dropped = screen_votes(
        battles, models, daily_cap=options.daily_cap, drop_flagged=options.drop_flagged_raters
    )
    a, b, outcome = battle_arrays(kept, index)
    wins, ties = pair_counts(a, b, outcome, n)
    features = None
    if options.style_control:
        features = style_design([x.style_a for x in kept], [x.style_b for x in kept])
    fitted = outcome != TIE if options.ties == "drop" else np.ones(len(kept), dtype=bool)
    rows = dedup_rows(a[fitted], b[fitted], outcome[fitted], None if features is None else features[fitted])
    fit, thetas = _fit_and_bootstrap(rows, n, options)
    unfitted = np.ones(n, dtype=bool)  # models in no fitted row: nothing but the ridge prior
    unfitted[a[fitted]] = unfitted[b[fitted]] = False

    offset = display_offset(fit.theta, index.get(options.anchor), options.anchor_rating)
    rating = SCALE * fit.theta + offset
    boot = bootstrap_display(thetas, fit.theta, offset)
    if len(boot):
        lower, upper = np.quantile(boot, [0.025, 0.975], axis=0)
        diff_variance = (boot[:, :, None] - boot[:, None, :]).var(axis=0)
    else:
        lower, upper, diff_variance = rating.copy(), rating.copy(), np.zeros((n, n))
    lower[unfitted] = upper[unfitted] = np.nan
    win_prob = win_probability(fit.theta)
    for matrix in (diff_variance, win_prob):
        matrix[unfitted, :] = matrix[:, unfitted] = np.nan
    return Leaderboard(
        ratings=_model_rows(models, rating, lower, upper, wins, ties, options),
        models=models,
        win_fraction=win_fraction(wins),
        battle_counts=wins + wins.T + ties,
        diff_variance=diff_variance,
        win_prob=win_prob,
        components=components(wins if options.ties == "drop" else wins + ties, models),
        style_coefficients=dict(zip(STYLE_KEYS, map(float, fit.beta), strict=True))
        if options.style_control
        else None,
        options=options,
        n_battles=len(kept),
        dropped=dropped,
        tie_parameter=fit.nu,
    )
