"""Style features and the style design matrix for style-controlled ratings (annotation-and-arena.md §2.6).

Pure Python + numpy. `style_features(text)` counts what the rater can see at a glance: length and
markdown structure. `style_design(style_a, style_b)` turns per-battle feature pairs into the
standardised differences the contextual Bradley–Terry fit in `studio.rating` uses:

    d_k = (a_k − b_k) / (a_k + b_k + 1)        per battle, per feature k   (FastChat `preprocess_for_style`)
    z_k = (d_k − mean_k) / std_k               across the battles of one fit

The ratio keeps a 900-vs-1000-token battle close to a 9-vs-10-token one, and z-scoring makes the
coefficients of different features comparable (logit per standard deviation of d_k).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

STYLE_KEYS: tuple[str, ...] = ("tokens", "headers", "list_items", "bold")
"""Feature names, in the column order of `style_design`."""

_CODE_FENCE = re.compile(r"```.*?(?:```|\Z)", re.DOTALL)
_HEADER = re.compile(r"^#{1,6}\s", re.MULTILINE)
_LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s", re.MULTILINE)
_BOLD = re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__")
_TOKEN = re.compile(r"\w+|[^\w\s]")


def style_features(text: str, n_tokens: int | None = None) -> dict[str, float]:
    """Length and markdown counts of one response: {tokens, headers, list_items, bold}.

    `tokens` is `n_tokens` when the caller knows the generated token count (a Generation row does);
    otherwise a tokenizer-free stand-in: words and punctuation marks. Markdown elements inside fenced
    code blocks are not counted (a `# comment` in Python is not a header), as in FastChat.
    """
    prose = _CODE_FENCE.sub("", text)
    return {
        "tokens": float(n_tokens if n_tokens is not None else len(_TOKEN.findall(text))),
        "headers": float(len(_HEADER.findall(prose))),
        "list_items": float(len(_LIST_ITEM.findall(prose))),
        "bold": float(len(_BOLD.findall(prose))),
    }


def style_ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """d = (a − b) / (a + b + 1), elementwise; a, b: [N, K] non-negative counts → [N, K] in (−1, 1)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return (a - b) / (a + b + 1.0)


def standardize(d: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Z-score the columns of d [N, K] over the rows where present [N] is True → [N, K].

    A constant column (e.g. no response ever had a header) becomes all zeros, so its coefficient
    has nothing to explain. Absent rows (a battle without style features) are set to 0, the mean:
    they neither push nor pull the style coefficients.
    """
    z = np.zeros_like(d, dtype=np.float64)
    if not present.any():
        return z
    rows = d[present]
    mean = rows.mean(axis=0)
    std = rows.std(axis=0)
    safe = np.where(std > 1e-12, std, 1.0)
    z[present] = np.where(std > 1e-12, (rows - mean) / safe, 0.0)
    return z


def style_design(
    style_a: Sequence[Mapping[str, float] | None],
    style_b: Sequence[Mapping[str, float] | None],
    keys: Sequence[str] = STYLE_KEYS,
) -> np.ndarray:
    """Standardised style differences of N battles → [N, K] (K = len(keys)), columns in `keys` order.

    A battle where either side has no features is a row of zeros (see `standardize`); a missing key
    in a mapping counts as 0.
    """
    n = len(style_a)
    present = np.array([sa is not None and sb is not None for sa, sb in zip(style_a, style_b, strict=True)])
    a = np.zeros((n, len(keys)))
    b = np.zeros((n, len(keys)))
    for i, (sa, sb) in enumerate(zip(style_a, style_b, strict=True)):
        if present[i]:
            a[i] = [float(sa.get(k, 0.0)) for k in keys]
            b[i] = [float(sb.get(k, 0.0)) for k in keys]
    if n == 0:
        return np.zeros((0, len(keys)))
    return standardize(style_ratio(a, b), present)
