"""Leaderboard figures (plotly, shown through gr.Plot): ratings with asymmetric CI bars, win fractions.

Checkpoint names are data, never markup. Plotly.js draws tick labels, hover text and cell text through
its own small HTML subset (`<b>`, `<br>`, `<a href>`, `<span style>`); `plotly_text` turns `&`, `<` and
`>` into entities, which plotly shows as the characters themselves. Labels carry the checkpoint id, so
two checkpoints with the same name stay two rows on a categorical axis.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go

TEMPLATE = "plotly_white"
ROW_PX = 34
"""Height per checkpoint row (the figures grow with the number of checkpoints)."""


def plotly_text(text: object) -> str:
    """`<b>x</b> & y` -> `&lt;b&gt;x&lt;/b&gt; &amp; y`: shown literally by plotly, never as markup."""
    return html.escape(str(text), quote=False)


def model_label(model_id: int, name: str) -> str:
    """`#3 tiny dpo`: unique per checkpoint, escaped for plotly."""
    return plotly_text(f"#{model_id} {' '.join(str(name).split())}")


@dataclass(frozen=True)
class RatingPoint:
    """One checkpoint's row of the ratings figure."""

    label: str
    """Already made by `model_label`."""
    rating: float
    lower: float
    upper: float
    preliminary: bool = False
    anchor: bool = False


def ratings_figure(points: Sequence[RatingPoint]) -> go.Figure:
    """Ratings as dots with asymmetric 95 % CI bars, best at the top (bootstrap CIs need not be symmetric).

    Preliminary checkpoints are drawn hollow; the anchor gets a diamond.
    """
    shown = list(reversed(points))  # plotly draws the first category at the bottom
    fig = go.Figure(
        go.Scatter(
            x=[p.rating for p in shown],
            y=[p.label for p in shown],
            mode="markers",
            marker={
                "size": 11,
                "symbol": [
                    ("diamond" if p.anchor else "circle") + ("-open" if p.preliminary else "") for p in shown
                ],
            },
            error_x={
                "type": "data",
                "symmetric": False,
                # A NaN bound (no fitted vote) draws no bar: max(0.0, nan) is 0.0.
                "array": [max(0.0, p.upper - p.rating) for p in shown],
                "arrayminus": [max(0.0, p.rating - p.lower) for p in shown],
                "thickness": 1.5,
            },
            customdata=[[_interval(p)] for p in shown],
            hovertemplate="%{y}<br>rating %{x:.0f}<br>95 % CI %{customdata[0]}<extra></extra>",
        )
    )
    fig.update_layout(
        template=TEMPLATE,
        title="Ratings with 95 % bootstrap confidence intervals",
        xaxis_title="rating (anchor = 1000)",
        height=140 + ROW_PX * max(1, len(shown)),
        margin={"l": 10, "r": 10, "t": 50, "b": 40},
        showlegend=False,
    )
    fig.update_yaxes(type="category", automargin=True)
    return fig


def _interval(p: RatingPoint) -> str:
    if not (math.isfinite(p.lower) and math.isfinite(p.upper)):
        return "not estimable yet"
    return f"{p.lower:.0f} – {p.upper:.0f}"


def _cell(value: float) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else float(value)


def win_heatmap(labels: Sequence[str], win_fraction: np.ndarray, battle_counts: np.ndarray) -> go.Figure:
    """Cell (row i, column j): the fraction of i's decisive battles against j that i won, and how many
    battles the pair had. Empty where the pair never met (or every battle was a tie).

    labels: [M] from `model_label`; win_fraction, battle_counts: [M, M] in the same order.
    """
    m = len(labels)
    z = [[_cell(win_fraction[i][j]) for j in range(m)] for i in range(m)]
    text = [
        ["" if z[i][j] is None else f"{z[i][j]:.0%}<br>n={int(battle_counts[i][j])}" for j in range(m)]
        for i in range(m)
    ]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(labels),
            y=list(labels),
            text=text,
            texttemplate="%{text}",
            zmin=0.0,
            zmax=1.0,
            colorscale="RdBu",
            colorbar={"title": "row wins"},
            hovertemplate="%{y} vs %{x}<br>%{text}<extra></extra>",
        )
    )
    fig.update_layout(
        template=TEMPLATE,
        title="Win fraction of the row's checkpoint against the column's (ties excluded)",
        height=160 + ROW_PX * max(2, m),
        margin={"l": 10, "r": 10, "t": 50, "b": 40},
    )
    fig.update_xaxes(type="category", automargin=True, side="bottom")
    fig.update_yaxes(type="category", automargin=True, autorange="reversed")
    return fig
