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
from studio.rating_style import STYLE_KEYS, style_design
from studio.rating_style import style_features as style_features

OUTCOMES = ("a", "b", "tie", "both_bad")
ALPHA = math.log(10.0)
"""Logit per unit of θ: P(i beats j) = σ(ALPHA·(θ_i − θ_j))."""
SCALE = 400.0
"""Display points per unit of θ."""
DEFAULT_RIDGE = 1.0
"""Pseudo-battles per model (see the module docstring): λ = ridge·ALPHA²/4 ≈ 1.33 on θ."""
STYLE_L2 = 0.5
"""L2 on the style coefficients β (½·STYLE_L2·‖β‖², FastChat's reg = 0.5 on deduplicated rows)."""
B_WINS, TIE, A_WINS = 0, 1, 2
"""Outcome codes in the arrays: y = code / 2 is A's score (1, ½, 0)."""
_PHI_BOUND = 30.0  # |log ν| cap: without ties (or without decisive votes) the Davidson MLE is at ±∞


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


@dataclass(frozen=True)
class Rows:
    """The unique (a, b, outcome, style) rows of a fit, U of them."""

    a: np.ndarray
    """[U] model index of side A."""
    b: np.ndarray
    """[U] model index of side B."""
    outcome: np.ndarray
    """[U] B_WINS / TIE / A_WINS."""
    features: np.ndarray
    """[U, K] standardised style differences (K = 0 without style control)."""
    weights: np.ndarray
    """[U] how many votes share this row."""


def dedup_rows(a: np.ndarray, b: np.ndarray, outcome: np.ndarray, features: np.ndarray | None = None) -> Rows:
    """Group N votes into unique rows with counts as weights (§2.2); features [N, K] or None."""
    features = np.zeros((len(a), 0)) if features is None else np.asarray(features, dtype=np.float64)
    if len(a) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return Rows(empty, empty, empty, features.reshape(0, features.shape[1]), np.zeros(0))
    table = np.column_stack([a, b, outcome, features]).astype(np.float64)
    unique, counts = np.unique(table, axis=0, return_counts=True)
    ints = unique[:, :3].astype(np.int64)
    return Rows(ints[:, 0], ints[:, 1], ints[:, 2], unique[:, 3:], counts.astype(np.float64))


# --------------------------------------------------------------------------- the likelihood


def _bt_terms(delta: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row BT NLL and its first/second derivative in the logit Δ; delta [B, U], y [U] (A's score).

    NLL = −y·log σ(Δ) − (1 − y)·log σ(−Δ) = softplus(−Δ) + (1 − y)·Δ, one log-exp per row.
    """
    softplus = np.logaddexp(0.0, -delta)
    p = np.exp(-softplus)  # σ(Δ)
    return softplus + (1.0 - y) * delta, p - y, p * (1.0 - p)


def _davidson_terms(delta: np.ndarray, phi: np.ndarray, outcome: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-row Davidson NLL and derivatives in (Δ, φ = log ν); delta [B, U], phi [B, 1], outcome [U].

    P(A) = e^(Δ/2)/Z, P(B) = e^(−Δ/2)/Z, P(tie) = e^φ/Z, Z = e^(Δ/2) + e^(−Δ/2) + e^φ. log Z is a
    log-sum-exp of linear functions, so the NLL is convex in (θ, β, φ) jointly; its Hessian is the
    covariance of the sufficient statistics (±½ for a win, 1 for a tie).
    Returns (loss, g_Δ, h_ΔΔ, g_φ, h_Δφ, h_φφ), each [B, U].
    """
    half = 0.5 * delta
    m = np.maximum(np.abs(half), phi)
    ea, eb, et = np.exp(half - m), np.exp(-half - m), np.exp(phi - m)
    z = ea + eb + et
    qa, qb, qt = ea / z, eb / z, et / z
    is_a, is_b, is_t = (outcome == A_WINS), (outcome == B_WINS), (outcome == TIE)
    loss = m + np.log(z) - half * is_a + half * is_b - phi * is_t
    g_delta = 0.5 * (qa - qb) - 0.5 * is_a + 0.5 * is_b
    h_delta = 0.25 * (qa + qb) - 0.25 * (qa - qb) ** 2
    return loss, g_delta, h_delta, qt - is_t, -0.5 * qt * (qa - qb), qt * (1.0 - qt)


def _design(rows: Rows, n_models: int) -> np.ndarray:
    """[U, M + K]: Δ_u = design[u] · (θ, β), i.e. α at a, −α at b, then the style features."""
    design = np.zeros((len(rows.a), n_models + rows.features.shape[1]))
    u = np.arange(len(rows.a))
    design[u, rows.a] += ALPHA
    design[u, rows.b] -= ALPHA
    design[:, n_models:] = rows.features
    return design


class _Problem:
    """The penalised NLL of one set of rows, evaluated for B weightings at once.

    Parameters p = (θ [M], β [K], φ if davidson). Δ_u = design[u]·(θ, β). The θ–θ block of the
    Hessian is assembled per ordered model pair (reduceat over rows sorted by pair, then a scatter),
    so its cost is B·(U + M²) rather than B·U·M².
    """

    def __init__(self, rows: Rows, n_models: int, penalty: np.ndarray, davidson: bool) -> None:
        self.design = _design(rows, n_models)  # [U, Q], Q = M + K
        self.features = rows.features  # [U, K]
        self.outcome = rows.outcome  # [U]
        self.penalty = penalty  # [P] diagonal of the quadratic penalty, P = Q (+1 for φ)
        self.n_models, self.davidson = n_models, davidson
        pair_id = rows.a * n_models + rows.b
        self.order = np.argsort(pair_id, kind="stable")
        pairs, self.starts = np.unique(pair_id[self.order], return_index=True)
        self.pair_a, self.pair_b = pairs // n_models, pairs % n_models
        self.signed = np.zeros((len(pairs), n_models))  # [n_pairs, M]: α at a, −α at b
        self.signed[np.arange(len(pairs)), self.pair_a] = ALPHA
        self.signed[np.arange(len(pairs)), self.pair_b] = -ALPHA

    def _per_pair(self, v: np.ndarray) -> np.ndarray:
        """Sum a per-row quantity v [B, U, ...] over the rows of each ordered pair → [B, n_pairs, ...]."""
        if len(self.starts) == 0:
            return np.zeros((v.shape[0], 0, *v.shape[2:]))
        return np.add.reduceat(v[:, self.order], self.starts, axis=1)

    def _hessian(self, wh: np.ndarray, n_params: int) -> np.ndarray:
        """Σ_u wh_u · d_u d_uᵀ over the (θ, β) block, wh [B, U] → [B, P, P] (φ entries left at 0)."""
        m, q = self.n_models, self.design.shape[1]
        hessian = np.zeros((wh.shape[0], n_params, n_params))
        per_pair = np.zeros((wh.shape[0], m, m))
        per_pair[:, self.pair_a, self.pair_b] = self._per_pair(wh)
        per_pair += per_pair.transpose(0, 2, 1)
        diag = np.arange(m)
        hessian[:, :m, :m] = -(ALPHA**2) * per_pair
        hessian[:, diag, diag] += ALPHA**2 * per_pair.sum(axis=2)
        if q > m:
            cross = np.einsum("bpk,pm->bmk", self._per_pair(wh[:, :, None] * self.features), self.signed)
            hessian[:, :m, m:q] = cross
            hessian[:, m:q, :m] = cross.transpose(0, 2, 1)
            hessian[:, m:q, m:q] = (self.features.T[None] * wh[:, None, :]) @ self.features
        return hessian

    def objective(self, p: np.ndarray, w: np.ndarray, hess: bool) -> tuple[np.ndarray, ...]:
        """Penalised NLL of B parameter vectors p [B, P] under row weights w [B, U].

        Returns loss [B], and with `hess` also gradient [B, P] and Hessian [B, P, P].
        """
        q, m = self.design.shape[1], self.n_models
        delta = p[:, :q] @ self.design.T
        theta_sum = p[:, :m].sum(axis=1)
        if self.davidson:
            loss_u, g_d, h_dd, g_phi, h_dphi, h_pp = _davidson_terms(delta, p[:, q : q + 1], self.outcome)
        else:
            loss_u, g_d, h_dd = _bt_terms(delta, self.outcome / 2.0)
        loss = (w * loss_u).sum(axis=1) + 0.5 * (self.penalty * p**2).sum(axis=1) + 0.5 * theta_sum**2
        if not hess:
            return (loss,)
        grad = self.penalty * p
        grad[:, :q] += (w * g_d) @ self.design
        grad[:, :m] += theta_sum[:, None]  # gauge ½(Σθ)²: zero at any optimum, fixes the flat direction
        hessian = self._hessian(w * h_dd, p.shape[1])
        if self.davidson:
            grad[:, q] += (w * g_phi).sum(axis=1)
            v = w * h_dphi
            cross = np.concatenate([self._per_pair(v) @ self.signed, v @ self.features], axis=1)
            hessian[:, :q, q] = cross
            hessian[:, q, :q] = cross
            hessian[:, q, q] = (w * h_pp).sum(axis=1)
        hessian[:, :m, :m] += 1.0
        hessian += np.diag(self.penalty)
        return loss, grad, hessian


def _newton(problem: _Problem, p0: np.ndarray, w: np.ndarray, max_iter: int = 100, tol: float = 1e-10):
    """Damped Newton on B independent convex problems at once → (p [B, P], converged [B]).

    Each iteration solves H·s = g, backtracks (Armijo) per problem, and stops a problem once its
    parameters move less than `tol` (Newton converges quadratically, so this is near machine precision).
    """
    p = p0.copy()
    active = np.ones(len(p), dtype=bool)
    eye = 1e-12 * np.eye(p.shape[1])  # keeps flat directions (ridge 0, unplayed models) solvable
    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        loss, grad, hessian = problem.objective(p[idx], w[idx], hess=True)
        step = np.linalg.solve(hessian + eye, grad[..., None])[..., 0]
        decrement = np.maximum((grad * step).sum(axis=1), 0.0)
        t = np.ones(idx.size)
        for _ in range(40):
            trial = _clamp_phi(problem, p[idx] - t[:, None] * step)
            (new_loss,) = problem.objective(trial, w[idx], hess=False)
            bad = new_loss > loss - 1e-4 * t * decrement + 1e-12 * np.abs(loss)
            if not bad.any():
                break
            t = np.where(bad, 0.5 * t, t)
        moved = np.abs(trial - p[idx]).max(axis=1, initial=0.0)
        p[idx] = trial
        active[idx[moved < tol]] = False
    return p, ~active


def _clamp_phi(problem: _Problem, p: np.ndarray) -> np.ndarray:
    if problem.davidson:
        p[:, -1] = np.clip(p[:, -1], -_PHI_BOUND, _PHI_BOUND)
    return p


def fit_params(
    rows: Rows,
    n_models: int,
    weights: np.ndarray | None = None,
    *,
    ridge: float = DEFAULT_RIDGE,
    davidson: bool = False,
    feature_l2: float = STYLE_L2,
    init: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fit B weightings of the same rows at once → (params [B, M + K (+1)], converged [B]).

    weights [B, U] (default: the rows' own counts, B = 1). params = (θ, β, φ = log ν if davidson).
    init [P]: a starting point for all B (e.g. the full-data fit for bootstrap replicates).
    """
    w = rows.weights[None] if weights is None else np.atleast_2d(np.asarray(weights, dtype=np.float64))
    k = rows.features.shape[1]
    penalty = np.concatenate([np.full(n_models, ridge * ALPHA**2 / 4.0), np.full(k, feature_l2)])
    if davidson:
        penalty = np.append(penalty, 0.0)
    problem = _Problem(rows, n_models, penalty, davidson)
    p0 = np.zeros((len(w), len(penalty)))
    if init is not None:
        p0[:] = init
    elif davidson:
        # start φ at its value for equal strengths: P(tie) = ν / (2 + ν) ⇒ ν = 2t / (1 − t)
        tie_share = (w * (rows.outcome == TIE)).sum(axis=1) / np.maximum(w.sum(axis=1), 1e-300)
        with np.errstate(divide="ignore"):
            p0[:, -1] = np.clip(np.log(2.0 * tie_share) - np.log1p(-tie_share), -_PHI_BOUND, _PHI_BOUND)
    return _newton(problem, p0, w)


@dataclass(frozen=True)
class Fit:
    theta: np.ndarray
    """[M] strengths; the display rating is 400·θ + offset."""
    beta: np.ndarray
    """[K] style coefficients (logit per standard deviation of d_k); empty without features."""
    nu: float | None
    """Davidson tie parameter (None for BT)."""
    converged: bool


def fit_bt(rows: Rows, n_models: int, *, ridge: float = DEFAULT_RIDGE, feature_l2: float = STYLE_L2) -> Fit:
    """Bradley–Terry MLE (ties in the rows count half; drop them from the rows for "drop")."""
    params, converged = fit_params(rows, n_models, ridge=ridge, feature_l2=feature_l2)
    return Fit(params[0, :n_models], params[0, n_models:], None, bool(converged[0]))


def fit_davidson(
    rows: Rows, n_models: int, *, ridge: float = DEFAULT_RIDGE, feature_l2: float = STYLE_L2
) -> Fit:
    """Davidson MLE with the tie parameter ν fitted jointly (ν → 0 without ties: plain BT)."""
    params, converged = fit_params(rows, n_models, ridge=ridge, davidson=True, feature_l2=feature_l2)
    nu = 0.0 if not (rows.outcome == TIE).any() else float(np.exp(params[0, -1]))
    return Fit(params[0, :n_models], params[0, n_models:-1], nu, bool(converged[0]))


def bootstrap_thetas(
    rows: Rows,
    n_models: int,
    n_boot: int,
    rng: np.random.Generator,
    *,
    ridge: float = DEFAULT_RIDGE,
    davidson: bool = False,
    feature_l2: float = STYLE_L2,
    chunk_elements: int = 4_000_000,
) -> np.ndarray:
    """θ of n_boot replicates [n_boot, M]: vote counts redrawn as Multinomial(N, w/N) over the rows.

    Replicates start from the full-data fit (fewer Newton steps) and are fitted together in chunks
    of at most `chunk_elements` numbers in the [B, U, P]-sized temporaries.
    """
    total = rows.weights.sum()
    if n_boot == 0 or total == 0:
        return np.zeros((n_boot, n_models))
    counts = rng.multinomial(round(total), rows.weights / total, size=n_boot).astype(np.float64)
    kwargs = {"ridge": ridge, "davidson": davidson, "feature_l2": feature_l2}
    start = fit_params(rows, n_models, **kwargs)[0][0]
    chunk = max(1, chunk_elements // (len(start) * (len(start) + len(rows.a))))
    thetas = [
        fit_params(rows, n_models, counts[i : i + chunk], init=start, **kwargs)[0]
        for i in range(0, n_boot, chunk)
    ]
    return np.concatenate(thetas)[:, :n_models]


bootstrap = bootstrap_thetas  # the name the design notes use


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
