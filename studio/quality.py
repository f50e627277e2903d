"""Agreement and rater-calibration maths: pure numpy, no database (annotation-and-arena.md §5.3–5.4).

Inputs are plain mappings so the service (and tests) can build them from anything:

    units: {item_id: {rater_id: value}}     # a missing rater is simply absent; None/NaN = missing

Pairwise judgements are coded with `PAIRWISE_NOMINAL` (the four outcomes as categories) and
`PAIRWISE_ORDINAL` (A better < tie < B better). Decision on **both_bad**: it is a category of
its own in the nominal α, and *missing* in the ordinal α. Both-bad says something about the
absolute quality of the two responses, not about which one is better, so it has no place on the
A–tie–B axis; putting it in the middle would score "tie" vs "both bad" as perfect agreement and
"A" vs "both bad" as a half disagreement, which neither rater said.

Functions:
- `krippendorff_alpha(units, metric)` — nominal / ordinal / interval, any number of raters,
  missing values (Krippendorff 2011, "Computing Krippendorff's Alpha-Reliability").
- `alpha_bootstrap_ci(units, metric)` — percentile CI from resampling items.
- `cohen_kappa(a, b)` — two raters, nominal.
- `span_iou_f1(a, b)` and `span_agreement(items)` — character-level, polarity-aware.
- `position_bias(left, decisive)` — P(choose left) − 0.5 with a Wilson 95 % interval.
- `gold_accuracy(pairs)` and `agreement_with_majority(units)` (leave-one-out).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Metric = Literal["nominal", "ordinal", "interval"]
Units = Mapping[Hashable, Mapping[Hashable, Any]]

PAIRWISE_NOMINAL: dict[str, str] = {"a": "a", "b": "b", "tie": "tie", "both_bad": "both_bad"}
"""Pairwise outcome -> nominal category (all four outcomes are distinct categories)."""
PAIRWISE_ORDINAL: dict[str, int] = {"a": 0, "tie": 1, "b": 2}
"""Pairwise outcome -> rank on the preference axis; both_bad is absent (= missing, see module doc)."""

Z95 = 1.959963984540054


# --------------------------------------------------------------------------- Krippendorff's alpha


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _value_matrix(units: Units, metric: Metric, order: Sequence[Any] | None) -> tuple[np.ndarray, np.ndarray]:
    """Count matrix C (U, V): C[u, v] = how many raters gave value v to unit u; and the values (V,).

    Only units with at least two values are kept (the others are not pairable). Values are sorted
    (or put in `order`) so ordinal and interval distances can use their positions.
    """
    rows = [[v for v in unit.values() if not _is_missing(v)] for unit in units.values()]
    rows = [r for r in rows if len(r) >= 2]
    if order is not None:
        values = list(order)
        unknown = {v for r in rows for v in r} - set(values)
        if unknown:
            raise ValueError(f"values {sorted(map(repr, unknown))} are not in the given order")
    else:
        distinct = {v for r in rows for v in r}
        try:
            values = sorted(distinct)
        except TypeError:
            if metric != "nominal":
                raise ValueError(f"{metric} alpha needs comparable values or an explicit order") from None
            values = sorted(distinct, key=repr)
    index = {v: i for i, v in enumerate(values)}
    counts = np.zeros((len(rows), len(values)))
    for u, row in enumerate(rows):
        for v in row:
            counts[u, index[v]] += 1
    return counts, np.asarray(values, dtype=object)


def _coincidences(counts: np.ndarray) -> np.ndarray:
    """Coincidence matrix o (V, V) = Σ_u (c_u c_uᵀ − diag(c_u)) / (m_u − 1), m_u = values in unit u."""
    m = counts.sum(axis=1)
    w = 1.0 / (m - 1.0)  # every kept unit has m >= 2
    return (counts * w[:, None]).T @ counts - np.diag(w @ counts)


def _delta2(values: np.ndarray, marginals: np.ndarray, metric: Metric) -> np.ndarray:
    """Squared distance δ²(c, k) (V, V) for the metric; ordinal uses the pooled marginals n_g."""
    size = len(values)
    if metric == "nominal":
        return 1.0 - np.eye(size)
    if metric == "interval":
        try:
            x = values.astype(float)
        except (TypeError, ValueError):
            raise ValueError("interval alpha needs numeric values") from None
        return (x[:, None] - x[None, :]) ** 2
    if metric == "ordinal":
        # δ(c, k) = Σ_{g=c..k} n_g − (n_c + n_k) / 2, for ranks c <= k (symmetric).
        cum = np.concatenate([[0.0], np.cumsum(marginals)])
        lo = np.minimum.outer(np.arange(size), np.arange(size))
        hi = np.maximum.outer(np.arange(size), np.arange(size))
        span = cum[hi + 1] - cum[lo]
        return (span - (marginals[:, None] + marginals[None, :]) / 2.0) ** 2
    raise ValueError(f"unknown metric {metric!r}; use nominal, ordinal or interval")


def _alpha_from_counts(counts: np.ndarray, values: np.ndarray, metric: Metric) -> float:
    if counts.shape[0] == 0:
        return math.nan
    o = _coincidences(counts)
    n_c = o.sum(axis=1)
    n = n_c.sum()
    d2 = _delta2(values, n_c, metric)
    expected = float(n_c @ d2 @ n_c)
    if expected <= 0.0:
        return math.nan  # a single value in all the data: agreement is undefined, not perfect
    return 1.0 - (n - 1.0) * float((o * d2).sum()) / expected


def krippendorff_alpha(
    units: Units, metric: Metric = "nominal", *, order: Sequence[Any] | None = None
) -> float:
    """Krippendorff's α = 1 − D_o / D_e over the pairable values of all units.

    units: {item: {rater: value}}; None/NaN or an absent rater = missing. Units with fewer than
    two values are ignored. `order` fixes the ranks for ordinal data (default: sorted values).
    Returns NaN when no unit is pairable or every value is the same (D_e = 0).
    """
    counts, values = _value_matrix(units, metric, order)
    return _alpha_from_counts(counts, values, metric)


def alpha_bootstrap_ci(
    units: Units,
    metric: Metric = "nominal",
    *,
    order: Sequence[Any] | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of α, resampling items with replacement. (nan, nan) if undefined."""
    counts, values = _value_matrix(units, metric, order)
    if counts.shape[0] < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    draws = np.array(
        [
            _alpha_from_counts(counts[rng.integers(0, counts.shape[0], counts.shape[0])], values, metric)
            for _ in range(n_boot)
        ]
    )
    draws = draws[~np.isnan(draws)]
    if draws.size == 0:
        return math.nan, math.nan
    tail = (1.0 - level) / 2.0
    return float(np.quantile(draws, tail)), float(np.quantile(draws, 1.0 - tail))


def pairwise_units(
    votes: Iterable[tuple[Hashable, Hashable, str]], scale: Literal["nominal", "ordinal"]
) -> dict:
    """(item, rater, outcome) triples -> units for α; ordinal drops both_bad (see module doc)."""
    code = PAIRWISE_NOMINAL if scale == "nominal" else PAIRWISE_ORDINAL
    units: dict[Hashable, dict[Hashable, Any]] = {}
    for item, rater, outcome in votes:
        if outcome in code:
            units.setdefault(item, {})[rater] = code[outcome]
    return units


# --------------------------------------------------------------------------- Cohen's kappa


def cohen_kappa(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Cohen's κ = (p_o − p_e) / (1 − p_e) for two raters' labels on the same items.

    Pairs where either label is missing (None/NaN) are dropped. NaN if no pair is left or p_e = 1.
    """
    if len(a) != len(b):
        raise ValueError(f"the raters labelled different numbers of items ({len(a)} vs {len(b)})")
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if not (_is_missing(x) or _is_missing(y))]
    if not pairs:
        return math.nan
    n = len(pairs)
    p_o = sum(x == y for x, y in pairs) / n
    ca, cb = Counter(x for x, _ in pairs), Counter(y for _, y in pairs)
    p_e = sum(ca[k] * cb.get(k, 0) for k in ca) / (n * n)
    if p_e >= 1.0:
        return math.nan
    return (p_o - p_e) / (1.0 - p_e)


# --------------------------------------------------------------------------- spans

Span = Mapping[str, Any] | tuple[int, int, str]


def _chars(spans: Iterable[Span]) -> set[tuple[int, str]]:
    """The (code point, polarity) pairs covered by the spans; overlaps of one rater count once."""
    out: set[tuple[int, str]] = set()
    for span in spans:
        if isinstance(span, Mapping):
            start, end, polarity = span["start"], span["end"], span["polarity"]
        else:
            start, end, polarity = span
        out.update((i, str(polarity)) for i in range(int(start), int(end)))
    return out


def span_iou_f1(a: Iterable[Span], b: Iterable[Span]) -> tuple[float, float]:
    """Character-level IoU and F1 between two raters' spans on one text, polarity-aware.

    A character marked "good" by one rater and "bad" by the other counts as a disagreement.
    IoU = |A∩B| / |A∪B|, F1 = 2|A∩B| / (|A| + |B|). Two empty span sets agree: (1.0, 1.0).
    """
    sa, sb = _chars(a), _chars(b)
    if not sa and not sb:
        return 1.0, 1.0
    inter = len(sa & sb)
    return inter / len(sa | sb), 2.0 * inter / (len(sa) + len(sb))


@dataclass(frozen=True)
class SpanAgreement:
    iou: float
    """Mean character IoU over (item, rater pair); NaN when no item has two raters."""
    f1: float
    n_pairs: int
    n_items: int


def span_agreement(items: Mapping[Hashable, Mapping[Hashable, Iterable[Span]]]) -> SpanAgreement:
    """Average `span_iou_f1` over every pair of raters on every item with two or more raters."""
    ious: list[float] = []
    f1s: list[float] = []
    n_items = 0
    for raters in items.values():
        sets = [list(spans) for spans in raters.values()]
        if len(sets) < 2:
            continue
        n_items += 1
        for i in range(len(sets)):
            for j in range(i + 1, len(sets)):
                iou, f1 = span_iou_f1(sets[i], sets[j])
                ious.append(iou)
                f1s.append(f1)
    if not ious:
        return SpanAgreement(math.nan, math.nan, 0, 0)
    return SpanAgreement(float(np.mean(ious)), float(np.mean(f1s)), len(ious), n_items)


# --------------------------------------------------------------------------- calibration


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (nan, nan) when n = 0."""
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class PositionBias:
    n: int
    """Decisive votes (the rater chose one side)."""
    left_rate: float
    """P(choose left) among decisive votes; NaN when n = 0."""
    bias: float
    """left_rate − 0.5: > 0 favours the left side."""
    ci: tuple[float, float]
    """Wilson 95 % interval of the bias (i.e. of left_rate, minus 0.5)."""


def position_bias(chose_left: int, decisive: int) -> PositionBias:
    lo, hi = wilson_interval(chose_left, decisive)
    rate = chose_left / decisive if decisive else math.nan
    return PositionBias(decisive, rate, rate - 0.5, (lo - 0.5, hi - 0.5))


def gold_accuracy(pairs: Iterable[tuple[Any, Any]]) -> tuple[float, int]:
    """(share of votes equal to the gold answer, number of gold votes); NaN accuracy when none."""
    pairs = list(pairs)
    if not pairs:
        return math.nan, 0
    return sum(v == g for v, g in pairs) / len(pairs), len(pairs)


def agreement_with_majority(units: Units) -> dict[Hashable, tuple[float, int]]:
    """Per rater: how often their value equals the majority of the *other* raters (leave-one-out).

    For each item and rater, the other raters' values must have a unique most common value;
    items where the others are split evenly (or where the rater is alone) are not counted.
    Returns {rater: (rate, items counted)}; raters with no counted item get (nan, 0).
    """
    hits: Counter = Counter()
    seen: Counter = Counter()
    raters: set[Hashable] = set()
    for unit in units.values():
        present = {r: v for r, v in unit.items() if not _is_missing(v)}
        raters.update(present)
        for rater, value in present.items():
            others = Counter(v for r, v in present.items() if r != rater)
            if not others:
                continue
            top = others.most_common(2)
            if len(top) == 2 and top[0][1] == top[1][1]:
                continue
            seen[rater] += 1
            hits[rater] += value == top[0][0]
    return {r: (hits[r] / seen[r] if seen[r] else math.nan, seen[r]) for r in raters}


def majority(values: Iterable[Any]) -> tuple[Any, int, int] | None:
    """(most common value, its count, total) or None when empty or the top count is shared."""
    counts = Counter(values)
    if not counts:
        return None
    top = counts.most_common(2)
    if len(top) == 2 and top[0][1] == top[1][1]:
        return None
    return top[0][0], top[0][1], sum(counts.values())
