"""Reward normalisers for segment-level PPO: the location-aware one and the bandit global z-score.

algorithms.md §4.4. A segment reward r_k at normalised position p_k = k/K is standardised as
r̃_k = (r_k − mean(p_k)) / std(p_k) with mean(p) = a·ln(p + 1e-10) + c and std(p) = b·ln(p + 1e-10) + d,
both fitted by Huber regression over the per-position-key means and standard deviations of raw
segment rewards. Bandit mode uses one global mean and std instead.

Pure numpy/torch; no models, configs, devices or logging. The fitted normalisers are small frozen
dataclasses with ``to_dict``/``from_dict`` so a checkpoint's ``studio.json`` can store them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np
import torch

LOG_EPS = 1e-10
"""Added to p before the log, as in the reference fitting code."""

MAD_TO_SIGMA = 0.6744897501960817
"""Median of |N(0, 1)|: MAD / this is a consistent estimate of a normal σ."""

STD_FLOOR_FRACTION = 0.1
"""Default std floor = this × d (algorithms.md §4.4 [design]: clamp std ≥ 0.1·d)."""

MIN_STD = 1e-6
"""Last-resort std floor when neither d nor the pooled std of the rewards is positive."""

Array = TypeVar("Array", torch.Tensor, np.ndarray, float)


# ------------------------------------------------------------------------------------------ Huber fit


def huber_fit(
    x: Any, y: Any, epsilon: float = 1.35, max_iter: int = 200, tol: float = 1e-12
) -> tuple[float, float]:
    """Robust straight-line fit y ≈ slope·x + intercept with the Huber loss (ε = 1.35 as sklearn's default).

    Iteratively reweighted least squares with a fixed robust scale: start from the Theil–Sen line
    (median of pairwise slopes, robust to ~29 % outliers, so a high-leverage outlier cannot trap the
    iteration at the least-squares line); take the residual scale once from it, s = median|r| / 0.6745
    (MAD about zero); then repeat "Huber weights w = min(1, ε·s/|r|), weighted least squares" until
    the coefficients stop moving. With s fixed the objective is convex, so the result is unique.
    Points within ε·s of the line count fully, points further out only linearly, so a few outliers
    barely move the fit; data lying exactly on a line plus outliers is recovered exactly (s → 0).

    Differs from ``sklearn.linear_model.HuberRegressor`` in the scale (MAD here, a jointly optimised
    σ there) and in having no L2 penalty (sklearn's α = 1e-4), so coefficients agree only closely.

    Args:
        x: (N,) abscissae (array-like or tensor).
        y: (N,) ordinates.
        epsilon: Huber threshold in units of the robust scale, > 1.
        max_iter: IRLS iteration cap.
        tol: convergence tolerance on the coefficients (relative to their size).

    Returns:
        (slope, intercept) as floats. With fewer than two distinct x values the slope is 0 and the
        intercept is the Huber location of y.
    """
    xs = _as_float64(x)
    ys = _as_float64(y)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"x and y must both be (N,), got {xs.shape} and {ys.shape}")
    if xs.size == 0:
        raise ValueError("huber_fit needs at least one point")
    if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
        raise ValueError("huber_fit got non-finite values")
    if epsilon <= 1.0:
        raise ValueError("epsilon must be > 1")
    columns = [np.ones_like(xs)] if np.ptp(xs) == 0 else [xs, np.ones_like(xs)]
    design = np.stack(columns, axis=1)
    beta = _theil_sen(xs, ys) if design.shape[1] == 2 else np.array([np.median(ys)])
    floor = 1e-12 * max(1.0, float(np.abs(ys).max()))
    scale = max(float(np.median(np.abs(ys - design @ beta))) / MAD_TO_SIGMA, floor)
    for _ in range(max_iter):
        u = np.abs(ys - design @ beta) / scale
        weights = np.where(u <= epsilon, 1.0, epsilon / np.maximum(u, epsilon))
        root = np.sqrt(weights)
        new = np.linalg.lstsq(design * root[:, None], ys * root, rcond=None)[0]
        done = np.max(np.abs(new - beta)) <= tol * (1.0 + np.max(np.abs(beta)))
        beta = new
        if done:
            break
    if design.shape[1] == 1:
        return 0.0, float(beta[0])
    return float(beta[0]), float(beta[1])


def _theil_sen(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[slope, intercept]: median slope over pairs with distinct x, then median of y − slope·x."""
    i, j = np.triu_indices(x.size, k=1)
    dx = x[j] - x[i]
    keep = dx != 0
    slope = float(np.median((y[j] - y[i])[keep] / dx[keep]))
    return np.array([slope, float(np.median(y - slope * x))])


# ------------------------------------------------------------------------------------------ normalisers


@dataclass(frozen=True)
class LocationNormaliser:
    """Location-aware normaliser: mean(p) = a·ln(p + 1e-10) + c, std(p) = max(b·ln(p + 1e-10) + d, std_floor).

    ``param.json`` of the reference code stores [a, b, c, d] in this order. At p = 1 (the last
    segment) mean = c and std = d (up to the 1e-10). The fitted std line turns ≤ 0 for small p when
    K is large, so it is clamped to ``std_floor`` > 0 (the paper's code does not clamp).
    Evaluate only at p = k/K of real segment ends; use ``mask`` to zero everything else.
    """

    a: float
    """Slope of the mean in ln p."""
    b: float
    """Slope of the std in ln p."""
    c: float
    """Mean at p = 1."""
    d: float
    """Std at p = 1 (before the clamp)."""
    std_floor: float
    """Lower clamp of std(p), > 0 (see :func:`fit_location_normaliser` for the default)."""

    def __post_init__(self) -> None:
        for name in ("a", "b", "c", "d", "std_floor"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite")
        if self.std_floor <= 0:
            raise ValueError("std_floor must be > 0")

    def mean(self, p: Array) -> Array:
        """Expected raw reward at normalised position p (elementwise; tensor, ndarray or float)."""
        return self.a * _log(p) + self.c

    def std(self, p: Array) -> Array:
        """Std of raw rewards at position p, clamped ≥ std_floor (elementwise)."""
        return _clamp_min(self.b * _log(p) + self.d, self.std_floor)

    def normalise(self, r: Array, p: Array, mask: Any = None) -> Array:
        """r̃ = (r − mean(p)) / std(p) elementwise; where ``mask`` is False the result is 0.

        Args:
            r: raw segment rewards, e.g. (B, T) values at segment ends.
            p: positions k/K, same shape (e.g. from ``segments.segment_positions``).
            mask: optional bool, same shape, True where r is a real segment reward.
        """
        z = (r - self.mean(p)) / self.std(p)
        return _mask(z, mask)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with ``kind = "location"``."""
        return {"kind": "location", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LocationNormaliser:
        """Inverse of :meth:`to_dict`."""
        if data.get("kind", "location") != "location":
            raise ValueError(f"not a location normaliser: kind={data.get('kind')!r}")
        return cls(**{k: float(data[k]) for k in ("a", "b", "c", "d", "std_floor")})


@dataclass(frozen=True)
class GlobalNormaliser:
    """Bandit-mode z-score with one global mean and std: r̃ = (r − mean) / max(std, std_floor).

    ``normalise`` accepts ``p`` and ignores it, so both normalisers share one call shape.
    """

    mean: float
    """Mean of sequence scores (e.g. on the RM's evaluation set)."""
    std: float
    """Population std of sequence scores (clamped to ``std_floor`` when used)."""
    std_floor: float = MIN_STD
    """Lower clamp of the std, > 0."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mean) and math.isfinite(self.std)):
            raise ValueError("mean and std must be finite")
        if self.std_floor <= 0:
            raise ValueError("std_floor must be > 0")

    def normalise(self, r: Array, p: Any = None, mask: Any = None) -> Array:
        """(r − mean) / max(std, std_floor) elementwise; 0 where ``mask`` is False."""
        return _mask((r - self.mean) / max(self.std, self.std_floor), mask)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with ``kind = "global"``."""
        return {"kind": "global", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GlobalNormaliser:
        """Inverse of :meth:`to_dict`."""
        if data.get("kind", "global") != "global":
            raise ValueError(f"not a global normaliser: kind={data.get('kind')!r}")
        return cls(float(data["mean"]), float(data["std"]), float(data.get("std_floor", MIN_STD)))


Normaliser = LocationNormaliser | GlobalNormaliser


def normaliser_from_dict(data: dict[str, Any]) -> Normaliser:
    """Rebuild either normaliser from its ``to_dict`` output (dispatch on ``kind``)."""
    kind = data.get("kind")
    if kind == "location":
        return LocationNormaliser.from_dict(data)
    if kind == "global":
        return GlobalNormaliser.from_dict(data)
    raise ValueError(f"unknown normaliser kind {kind!r}")


# ------------------------------------------------------------------------------------------ fitting


def position_keys(positions: Any, decimals: int = 3) -> np.ndarray:
    """Round positions to the fitting key (3 decimals, like the reference's ``'%.3f'`` keys). (N,) → (N,)."""
    return np.round(_as_float64(positions), decimals)


def fit_location_normaliser(
    positions: Any,
    rewards: Any,
    *,
    epsilon: float = 1.35,
    std_floor: float | None = None,
    min_count: int = 1,
    decimals: int = 3,
) -> LocationNormaliser:
    """Fit a :class:`LocationNormaliser` on raw segment rewards (algorithms.md §4.4).

    1. Key every reward by its position rounded to ``decimals`` (3).
    2. Per key: mean and population std (ddof 0) of the rewards; keys with fewer than ``min_count``
       rewards are dropped (default 1 keeps all, as the paper does; a single reward has std 0).
    3. Huber-fit per-key mean = a·ln(key + 1e-10) + c and per-key std = b·ln(key + 1e-10) + d; each key
       is one unweighted point.

    Args:
        positions: (N,) p_k = k/K of every scored segment (chosen and rejected responses alike),
            e.g. ``segment_positions(ends)[ends]``.
        rewards: (N,) raw (unnormalised) segment rewards r_k at those segments.
        epsilon: Huber threshold.
        std_floor: clamp for std(p). Default: 0.1·d if d > 0; else 0.1 × the pooled population std of
            all rewards if that is > 0; else ``MIN_STD`` (1e-6).
        min_count: minimum rewards per key.
        decimals: rounding of the position key.

    Returns:
        The fitted normaliser.
    """
    p = _as_float64(positions)
    r = _as_float64(rewards)
    if p.shape != r.shape or p.ndim != 1:
        raise ValueError(f"positions and rewards must both be (N,), got {p.shape} and {r.shape}")
    if p.size and (p.min() <= 0 or p.max() > 1):
        raise ValueError("positions must lie in (0, 1]")
    keys, inverse, counts = np.unique(position_keys(p, decimals), return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=r, minlength=keys.size)
    means = sums / np.maximum(counts, 1)
    sq = np.bincount(inverse, weights=(r - means[inverse]) ** 2, minlength=keys.size)
    stds = np.sqrt(sq / np.maximum(counts, 1))
    keep = counts >= max(1, min_count)
    if not keep.any():
        raise ValueError("no position key has enough rewards to fit a normaliser")
    x = np.log(keys[keep] + LOG_EPS)
    a, c = huber_fit(x, means[keep], epsilon=epsilon)
    b, d = huber_fit(x, stds[keep], epsilon=epsilon)
    if std_floor is None:
        pooled = float(r.std())
        if d > 0:
            std_floor = STD_FLOOR_FRACTION * d
        elif pooled > 0:
            std_floor = STD_FLOOR_FRACTION * pooled
        else:
            std_floor = MIN_STD
    return LocationNormaliser(a=a, b=b, c=c, d=d, std_floor=float(std_floor))


def fit_global_normaliser(scores: Any, std_floor: float = MIN_STD) -> GlobalNormaliser:
    """Mean and population std of sequence scores (N,) → :class:`GlobalNormaliser` for bandit PPO."""
    s = _as_float64(scores)
    if s.size == 0:
        raise ValueError("fit_global_normaliser needs at least one score")
    return GlobalNormaliser(float(s.mean()), float(s.std()), std_floor)


# ------------------------------------------------------------------------------------------ helpers


def _as_float64(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1) if np.ndim(x) else np.asarray([x], dtype=np.float64)


def _log(p: Any) -> Any:
    if isinstance(p, torch.Tensor):
        return torch.log(p + LOG_EPS)
    out = np.log(np.asarray(p, dtype=np.float64) + LOG_EPS)
    return float(out) if np.ndim(out) == 0 else out


def _clamp_min(x: Any, floor: float) -> Any:
    if isinstance(x, torch.Tensor):
        return x.clamp(min=floor)
    out = np.maximum(x, floor)
    return float(out) if np.ndim(out) == 0 else out


def _mask(z: Any, mask: Any) -> Any:
    if mask is None:
        return z
    if isinstance(z, torch.Tensor):
        m = torch.as_tensor(mask, dtype=torch.bool, device=z.device)
        return torch.where(m, z, torch.zeros((), dtype=z.dtype, device=z.device))
    return np.where(np.asarray(mask, dtype=bool), z, 0.0)
