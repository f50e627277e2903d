"""Arena ratings, the fitting half: Bradley–Terry / Davidson maximum likelihood by Newton's method and
the bootstrap, on deduplicated vote rows (pure numpy). `studio.rating` builds the rows from battles and
turns the fits into a leaderboard; its docstring explains the scale, the ridge and the tie models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ALPHA = math.log(10.0)
"""Logit per unit of θ: P(i beats j) = σ(ALPHA·(θ_i − θ_j))."""
DEFAULT_RIDGE = 1.0
"""Pseudo-battles per model (see `studio.rating`'s docstring): λ = ridge·ALPHA²/4 ≈ 1.33 on θ."""
STYLE_L2 = 0.5
"""L2 on the style coefficients β (½·STYLE_L2·‖β‖², FastChat's reg = 0.5 on deduplicated rows)."""
B_WINS, TIE, A_WINS = 0, 1, 2
"""Outcome codes in the arrays: y = code / 2 is A's score (1, ½, 0)."""
_PHI_BOUND = 30.0  # |log ν| cap: without ties (or without decisive votes) the Davidson MLE is at ±∞


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
