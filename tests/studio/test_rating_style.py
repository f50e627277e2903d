"""Style features, the standardised style design, and style control recovering a planted length bias."""

from __future__ import annotations

import numpy as np
import pytest

from studio.rating import BattleRecord, RatingOptions, leaderboard
from studio.rating_style import STYLE_KEYS, standardize, style_design, style_features, style_ratio

MARKDOWN = """# Title
Some **bold** text and __more bold__.

## Section
- one
* two
  + nested
1. first
2) second

```python
# not a header
- not a list item
**not bold**
```
"""


def test_style_features_count_markdown_outside_code_blocks():
    f = style_features(MARKDOWN)
    assert (f["headers"], f["list_items"], f["bold"]) == (2.0, 5.0, 2.0)
    assert f["tokens"] > 30
    assert style_features("Hello, world!")["tokens"] == 4.0  # Hello , world !
    assert style_features("anything", n_tokens=123)["tokens"] == 123.0
    assert list(style_features("")) == list(STYLE_KEYS)


def test_unclosed_code_fence_hides_the_rest():
    assert style_features("# h\n```\n# still code")["headers"] == 1.0


def test_style_ratio_by_hand():
    # (a − b) / (a + b + 1): (300 − 100)/401, (0 − 0)/1, (1 − 3)/5
    np.testing.assert_allclose(style_ratio([[300, 0, 1]], [[100, 0, 3]]), [[200 / 401, 0.0, -2 / 5]])


def test_standardize_handles_constant_columns_and_missing_rows():
    d = np.array([[1.0, 5.0], [3.0, 5.0], [9.0, 9.0]])
    z = standardize(d, np.array([True, True, False]))
    # column 0 over the present rows {1, 3}: mean 2, std 1; column 1 is constant there → 0
    np.testing.assert_allclose(z, [[-1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])


def test_style_design_columns_follow_the_keys_and_missing_sides_are_neutral():
    a = [{"tokens": 100}, {"tokens": 10, "bold": 2}, None]
    b = [{"tokens": 10}, {"tokens": 100}, {"tokens": 5}]
    z = style_design(a, b)
    assert z.shape == (3, 4)
    assert z[0, 0] > 0 > z[1, 0] and z[2].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert z[:, 1].tolist() == [0.0, 0.0, 0.0]  # no headers anywhere


def _planted_length_bias(seed: int, n: int = 2000, beta: float = 1.0):
    """Four equally good models; model 0 writes about twice as long. Votes follow logit = β·z_tokens."""
    rng = np.random.default_rng(seed)
    mean_tokens = np.array([400.0, 200.0, 200.0, 200.0])
    pairs, sides = [], []
    for _ in range(n):
        i, j = (int(x) for x in rng.choice(4, 2, replace=False))
        pairs.append((i, j))
        sides.append(tuple({"tokens": rng.lognormal(np.log(mean_tokens[k]), 0.5)} for k in (i, j)))
    z = style_design([s[0] for s in sides], [s[1] for s in sides])[:, 0]
    a_wins = rng.random(n) < 1.0 / (1.0 + np.exp(-beta * z))
    return [
        BattleRecord(i, j, "a" if w else "b", style_a=sa, style_b=sb)
        for (i, j), (sa, sb), w in zip(pairs, sides, a_wins, strict=True)
    ]


def test_style_control_recovers_a_planted_length_bias():
    battles = _planted_length_bias(seed=0)
    raw = leaderboard(battles, [0, 1, 2, 3], RatingOptions(bootstrap=100))
    controlled = leaderboard(battles, [0, 1, 2, 3], RatingOptions(bootstrap=100, style_control=True))
    raw_r = {r.model: r.rating for r in raw.ratings}
    ctl_r = {r.model: r.rating for r in controlled.ratings}
    assert raw.style_coefficients is None
    assert raw_r[0] - np.mean([raw_r[k] for k in (1, 2, 3)]) > 100  # length pays on the raw board
    assert abs(ctl_r[0] - np.mean([ctl_r[k] for k in (1, 2, 3)])) < 30  # and not once style is held fixed
    coef = controlled.style_coefficients
    assert list(coef) == list(STYLE_KEYS)
    assert coef["tokens"] == pytest.approx(1.0, abs=0.15)
    assert coef["headers"] == coef["list_items"] == coef["bold"] == 0.0  # constant features are left out
    top = next(r for r in controlled.ratings if r.model == 0)
    assert top.lower < 1000 < top.upper


def test_style_control_with_drop_and_davidson_ties():
    battles = _planted_length_bias(seed=1, n=800)
    battles += [BattleRecord(1, 2, "tie", style_a={"tokens": 50}, style_b={"tokens": 60})] * 40
    for ties in ("drop", "davidson"):
        board = leaderboard(battles, [0, 1, 2, 3], RatingOptions(bootstrap=20, style_control=True, ties=ties))
        assert board.style_coefficients["tokens"] == pytest.approx(1.0, abs=0.3)
    assert board.tie_parameter > 0
