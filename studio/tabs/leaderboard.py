"""Leaderboard tab: Bradley–Terry ratings of the arena's checkpoints with bootstrap CIs, the plots, the
"new vs parent" tests, the reward model's agreement with the raters, and (admins) rater statistics
and exports.

Any signed-in user may look; the board is computed by `services.arena.leaderboard` (cached per vote
count and options), nothing here does maths beyond formatting. It loads when the tab is opened or
Refresh is pressed, never on page load. Names reach the page only as table cells, inert Markdown
and plotly data (escaped, see studio.components.arena_plots).
"""

from __future__ import annotations

import math
from pathlib import Path

import gradio as gr
import pandas as pd

from studio.components.arena_plots import RatingPoint, model_label, ratings_figure, win_heatmap
from studio.services import ServiceError
from studio.tabs.annotate import raise_auth_errors
from studio.tabs.common import (
    ADMIN,
    DB_EVENTS,
    HEAVY_LIMITS,
    Shared,
    inert,
    require_project,
    requires,
    signed_in,
    user_errors,
)
from studio.tabs.datasets import download_copy

TIES = [
    ("Ties count as half a win", "half"),
    ("Drop ties", "drop"),
    ("Davidson model for ties", "davidson"),
]
BOARD_COLUMNS = [
    "rank",
    "checkpoint",
    "rating",
    "95% CI",
    "battles",
    "W / L / T",
    "win rate",
    "status",
    "anchor",
]
RM_COLUMNS = ["pair", "decisive votes", "RM agrees", "agreement", "95% CI", "unscored"]
RATER_COLUMNS = ["rater", "votes", "left rate", "left 95% CI", "tie rate", "crowd agreement", "outlier"]
EVIDENCE_THRESHOLD = 20.0
"""1/α of the sequential tests (α = 0.05): evidence above this decides (FastChat's outlier rule too)."""


def _num(value: float | None, fmt: str = ".0f") -> str:
    return "–" if value is None or not math.isfinite(float(value)) else format(float(value), fmt)


def name_of(names: dict[int, str], model_id: int | None) -> str:
    """`#3 tiny dpo` (plain text; callers make it inert where Markdown renders it)."""
    if model_id is None:
        return "–"
    return f"#{model_id} {' '.join(str(names.get(model_id, '?')).split())}"


def ci_text(rating: float, lower: float, upper: float) -> str:
    """`918 – 1082 (−82 / +82)`: the bootstrap interval and its asymmetric distances from the rating."""
    if not (math.isfinite(lower) and math.isfinite(upper)):
        return "not estimable yet (no fitted vote)"
    return f"{lower:.0f} – {upper:.0f} (−{rating - lower:.0f} / +{upper - rating:.0f})"


def board_frame(view) -> pd.DataFrame:
    """One row per checkpoint, best first: rank, name, rating, asymmetric CI, battles, W/L/T, badges."""
    rows = []
    for r in view.board.ratings:
        rows.append(
            [
                r.rank,
                name_of(view.names, r.model),
                _num(r.rating),
                ci_text(r.rating, r.lower, r.upper),
                r.battles,
                f"{r.wins} / {r.losses} / {r.ties}",
                _num(100 * r.win_rate, ".1f") + " %" if r.battles else "–",
                "preliminary" if r.preliminary else "established",
                "⚓ anchor" if r.model == view.anchor else "",
            ]
        )
    return pd.DataFrame(rows, columns=BOARD_COLUMNS)


def summary_text(view) -> str:
    board = view.board
    if not board.ratings:
        return f"**{view.n_votes}** vote(s): no counted battle yet. The board fills in after the first arena vote."
    parts = [f"**{view.n_votes}** vote(s)", f"**{board.n_battles}** counted battle(s)"]
    parts.append(f"**{len(board.ratings)}** checkpoint(s)")
    dropped = ", ".join(f"{n} {reason}" for reason, n in sorted((board.dropped or {}).items()) if n)
    if dropped:
        parts.append(f"left out: {inert(dropped)}")
    if board.style_coefficients:
        coefs = ", ".join(f"{inert(k)} {v:+.2f}" for k, v in sorted(board.style_coefficients.items()))
        parts.append(f"style coefficients: {coefs}")
    return " · ".join(parts)


def warning_text(view) -> str:
    """A warning when the battle graph falls apart: ratings of separate groups are not comparable."""
    components = [c for c in view.board.components if c]
    if len(components) <= 1:
        return ""
    groups = " | ".join(", ".join(inert(name_of(view.names, m)) for m in c) for c in components)
    return (
        f"⚠ **The battle graph is disconnected** ({len(components)} groups that never met): ratings are only "
        f"comparable within a group. Groups: {groups}"
    )


def pair_cards(view) -> str:
    """ "New vs parent" cards from the always-valid sequential tests."""
    if not view.pair_tests:
        return "No checkpoint has a parent in the arena yet."
    cards = []
    for new, parent, decided, winner, evidence in view.pair_tests:
        title = f"**{inert(name_of(view.names, new))}** vs parent **{inert(name_of(view.names, parent))}**"
        if decided:
            verdict = f"decided: **{inert(name_of(view.names, winner))}** is better"
        else:
            verdict = "not decided yet: keep voting"
        cards.append(
            f"- {title}: {verdict} (evidence ×{_num(evidence, '.1f')}; decides at ×{EVIDENCE_THRESHOLD:.0f})"
        )
    return "\n".join(cards)


def figures(view):
    board = view.board
    points = [
        RatingPoint(
            model_label(r.model, view.names.get(r.model, "?")),
            r.rating,
            r.lower,
            r.upper,
            r.preliminary,
            r.model == view.anchor,
        )
        for r in board.ratings
    ]
    labels = [model_label(m, view.names.get(m, "?")) for m in board.models]
    return ratings_figure(points), win_heatmap(labels, board.win_fraction, board.battle_counts)


def rater_frame(view) -> pd.DataFrame:
    rows = [
        [
            view.rater_names.get(r.rater, f"user {r.rater}"),
            r.votes,
            _num(r.left_rate, ".2f"),
            f"{_num(r.left_ci[0], '.2f')} – {_num(r.left_ci[1], '.2f')}",
            _num(r.tie_rate, ".2f"),
            _num(r.crowd_agreement, ".2f"),
            "⚠ flagged" if r.flagged else "",
        ]
        for r in view.rater_rows
    ]
    return pd.DataFrame(rows, columns=RATER_COLUMNS)


def outlier_text(view) -> str:
    flagged = [r for r in view.rater_rows if r.flagged]
    if not flagged:
        return ""
    who = ", ".join(inert(view.rater_names.get(r.rater, f"user {r.rater}")) for r in flagged)
    return (
        f"⚠ **Possible outlier rater(s): {who}.** Their votes disagree with the crowd more than chance allows "
        f"(sequential test, evidence > ×{EVIDENCE_THRESHOLD:.0f}). Their votes still count; review them."
    )


def rm_frame(rows) -> pd.DataFrame:
    """PairAgreement rows (names included); the overall row (no pair) comes last from the service."""
    out = []
    for a in rows:
        overall = a.model_a is None or a.model_b is None
        pair = "all pairs" if overall else f"#{a.model_a} {a.name_a} vs #{a.model_b} {a.name_b}"
        decided = bool(a.decisive_votes) and a.rate is not None
        out.append(
            [
                pair,
                a.decisive_votes,
                a.agree,
                _num(100 * a.rate, ".0f") + " %" if decided else "–",
                f"{_num(100 * a.lower, '.0f')} – {_num(100 * a.upper, '.0f')} %" if decided else "–",
                a.unscored,
            ]
        )
    return pd.DataFrame(out, columns=RM_COLUMNS)


# ----------------------------------------------------------------------------- the tab


def build(shared: Shared) -> dict:
    services = shared.services
    with gr.Row():
        ties = gr.Radio(TIES, value="half", label="Ties", elem_id="lb-ties", scale=2)
        style = gr.Checkbox(
            value=False,
            label="Style control (length and markdown)",
            info="Rates what is said, not how long or how formatted it is.",
            elem_id="lb-style",
            scale=1,
        )
        refresh_btn = gr.Button("Refresh", size="sm", elem_id="lb-refresh", scale=0)
    warning = gr.Markdown(elem_id="lb-warning")
    summary = gr.Markdown(elem_id="lb-summary")
    table = gr.Dataframe(
        headers=BOARD_COLUMNS,
        interactive=False,
        wrap=True,
        datatype="str",
        label="Leaderboard",
        elem_id="lb-table",
    )
    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown("#### New vs parent")
            cards = gr.Markdown(elem_id="lb-pairs")
        with gr.Column(scale=1):
            gr.Markdown("#### Reward model vs humans")
            with gr.Row():
                rm_pick = gr.Dropdown(label="Reward model", choices=[], elem_id="lb-rm", scale=3)
                score_btn = gr.Button(
                    "Score with reward model", size="sm", visible=False, elem_id="lb-rm-score", scale=0
                )
            rm_status = gr.Markdown(elem_id="lb-rm-status")
            rm_table = gr.Dataframe(
                headers=RM_COLUMNS,
                interactive=False,
                wrap=True,
                datatype="str",
                label="How often the reward model prefers the response the raters preferred",
                elem_id="lb-rm-table",
            )
    with gr.Row():
        ratings_plot = gr.Plot(label="Ratings", elem_id="lb-ratings-plot")
        heatmap = gr.Plot(label="Win fractions", elem_id="lb-heatmap")
    with gr.Accordion(
        "Rater statistics (admin)", open=True, visible=False, elem_id="lb-raters-box"
    ) as raters_box:
        outliers = gr.Markdown(elem_id="lb-outliers")
        raters = gr.Dataframe(
            headers=RATER_COLUMNS, interactive=False, wrap=True, datatype="str", elem_id="lb-raters"
        )
    with gr.Accordion("Export (admin)", open=False, visible=False, elem_id="lb-export-box") as export_box:
        export_btn = gr.Button("Export battles and ratings", size="sm", elem_id="lb-export")
        export_files = gr.File(
            label="Download", file_count="multiple", interactive=False, elem_id="lb-export-files"
        )

    board_outputs = [
        warning,
        summary,
        table,
        cards,
        ratings_plot,
        heatmap,
        raters_box,
        outliers,
        raters,
        export_box,
    ]

    def refresh(project_id, ties_v, style_v, request: gr.Request) -> dict:
        user = signed_in(services, request)
        if project_id is None:
            return {summary: "Choose a project first.", table: board_frame_empty()}
        from studio.rating import RatingOptions

        options = RatingOptions(ties=ties_v or "half", style_control=bool(style_v))
        try:
            view = services.arena.leaderboard(request.username, int(project_id), options)
        except ServiceError as exc:
            raise_auth_errors(exc)
            return {summary: inert(str(exc))}
        is_admin = str(user.role) == ADMIN
        ratings_fig, heat_fig = figures(view) if view.board.ratings else (None, None)
        return {
            warning: warning_text(view),
            summary: summary_text(view),
            table: board_frame(view),
            cards: pair_cards(view),
            ratings_plot: ratings_fig,
            heatmap: heat_fig,
            raters_box: gr.update(visible=is_admin),
            outliers: outlier_text(view) if is_admin else "",
            raters: rater_frame(view) if is_admin else pd.DataFrame(columns=RATER_COLUMNS),
            export_box: gr.update(visible=is_admin),
        }

    rm_outputs = [rm_pick, score_btn, rm_status, rm_table]

    def rm_refresh(project_id, rm_v, request: gr.Request) -> dict:
        """The reward models of the project (default: the newest) and their agreement with the raters."""
        user = signed_in(services, request)
        if project_id is None:
            return {rm_status: "", rm_table: pd.DataFrame(columns=RM_COLUMNS)}
        project_id = int(project_id)
        try:
            models = services.rm_agreement.reward_models(project_id)
            choices = [(f"#{cid} {name}", cid) for cid, name in models]
            chosen = rm_v if rm_v in [c[1] for c in choices] else None
            rows = services.rm_agreement.agreement(request.username, project_id, chosen) if models else []
        except ServiceError as exc:
            raise_auth_errors(exc)
            return {rm_status: inert(str(exc))}
        if not models:
            status_v = "No reward model in this project yet (train one in the Training tab)."
        elif not rows or all(r.decisive_votes == 0 for r in rows):
            status_v = "No scored decisive votes yet: votes need reward scores (Score with reward model)."
        else:
            status_v = ""
        return {
            rm_pick: gr.update(
                choices=choices, value=chosen if chosen is not None else (choices[0][1] if choices else None)
            ),
            score_btn: gr.update(visible=str(user.role) == ADMIN and bool(models)),
            rm_status: status_v,
            rm_table: rm_frame(rows),
        }

    @user_errors
    @requires(shared, ADMIN)
    def score(project_id, rm_v, request: gr.Request) -> dict:
        project_id = require_project(project_id)
        made = services.rm_agreement.refresh(
            request.username, project_id, None if rm_v is None else int(rm_v)
        )
        return rm_refresh(project_id, rm_v, request) | {rm_status: f"Scored {made} response(s)."}

    @user_errors
    @requires(shared, ADMIN)
    def export(project_id, request: gr.Request):
        project_id = require_project(project_id)
        battles, ratings = services.arena.export(request.username, project_id)
        # Copies in a fresh temp folder: the data folder stays in blocked_paths (see studio.tabs.datasets).
        return [str(download_copy(Path(p), Path(p).stem)) for p in (battles, ratings)]

    inputs = [shared.project_id, ties, style]
    rm_inputs = [shared.project_id, rm_pick]
    refresh_btn.click(refresh, inputs, board_outputs, api_name="leaderboard", **DB_EVENTS).then(
        rm_refresh, rm_inputs, rm_outputs, **DB_EVENTS
    )
    ties.change(refresh, inputs, board_outputs, **DB_EVENTS)
    style.change(refresh, inputs, board_outputs, **DB_EVENTS)
    rm_pick.input(rm_refresh, rm_inputs, rm_outputs, **DB_EVENTS)
    score_btn.click(
        score,
        rm_inputs,
        rm_outputs,
        api_name="rm_score",
        concurrency_id="model",
        concurrency_limit=HEAVY_LIMITS["model"],
    )
    export_btn.click(export, shared.project_id, export_files, api_name="arena_export", **DB_EVENTS)

    def clear(_project_id) -> dict:
        """Another project: nothing of the old board stays on screen."""
        return {
            warning: "",
            summary: "Press **Refresh** to load this project's leaderboard.",
            table: board_frame_empty(),
            cards: "",
            ratings_plot: None,
            heatmap: None,
            rm_table: pd.DataFrame(columns=RM_COLUMNS),
            rm_status: "",
            export_files: None,
        }

    return {
        "refresh": (refresh, inputs, board_outputs),
        "rm_refresh": (rm_refresh, rm_inputs, rm_outputs),
        "clear": (clear, shared.project_select, [*board_outputs, rm_table, rm_status, export_files]),
    }


def board_frame_empty() -> pd.DataFrame:
    return pd.DataFrame(columns=BOARD_COLUMNS)
