"""Team tab (admin): progress per person and per project, who did what, live agreement and annotator
quality, overlap settings and gold items. Refreshes with a button and, while the tab is open, a timer.

Usernames and every other stored string reach the page only as table cells or inert Markdown.
"""

from __future__ import annotations

import math

import gradio as gr
import pandas as pd

from studio.services.annotation import COMPARISONS_LISTED
from studio.tabs.common import DB_EVENTS, UI_ONLY, Shared, inert, require_project, user_errors

ACTIVITY_COLUMNS = ["user", "role", "votes", "skips", "span sets", "median s / vote", "last active (UTC)"]
ANNOTATOR_COLUMNS = [
    "user",
    "votes",
    "left rate",
    "left bias 95% CI",
    "tie rate",
    "gold accuracy (n)",
    "agrees with majority",
    "median s",
]
GOLD_OUTCOMES = [("A", "a"), ("B", "b"), ("Tie", "tie"), ("Both bad", "both_bad"), ("Not gold", "none")]
COMPARISON_COLUMNS = ["id", "prompt", "votes / needed", "gold"]
EXCERPT_CHARS = 80
REFRESH_S = 20.0


def fmt(value, digits: int = 2) -> str:
    """A number for a table cell; '–' for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_interval(ci) -> str:
    if not ci or any(v is None or math.isnan(v) for v in ci):
        return "–"
    lo, hi = ci
    return f"[{lo:+.2f}, {hi:+.2f}]"


def activity_frame(rows) -> pd.DataFrame:
    return pd.DataFrame(
        [
            [
                r.username,
                r.role,
                r.votes,
                r.skips,
                r.span_sets,
                fmt(r.median_seconds, 1),
                r.last_active.strftime("%Y-%m-%d %H:%M") if r.last_active else "–",
            ]
            for r in rows
        ],
        columns=ACTIVITY_COLUMNS,
    )


def annotator_frame(per_annotator) -> pd.DataFrame:
    return pd.DataFrame(
        [
            [
                a.username,
                a.votes,
                fmt(a.left_rate),
                fmt_interval(a.left_bias_ci),
                fmt(a.tie_rate),
                f"{fmt(a.gold_accuracy)} ({a.gold_n})" if a.gold_n else "–",
                fmt(a.agreement_with_majority),
                fmt(a.median_seconds, 1),
            ]
            for a in per_annotator
        ],
        columns=ANNOTATOR_COLUMNS,
    )


def quality_text(report) -> str:
    """The project-level agreement numbers as one Markdown block (numbers only, nothing user-written)."""
    return (
        f"**Pairwise agreement** (Krippendorff α over {report.n_overlap_items} item(s) with 2+ votes): "
        f"nominal {fmt(report.pairwise_alpha_nominal)} · ordinal {fmt(report.pairwise_alpha_ordinal)}  \n"
        f"**Span agreement**: IoU {fmt(report.span_iou)} · F1 {fmt(report.span_f1)}  \n"
        "α ≥ 0.8 is good agreement, 0.67–0.8 tentative, below that the guidelines probably need work. "
        "Left bias is the left rate − 0.5: an interval that does not cover 0 means a person favours one side."
    )


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """`text` on one line (runs of whitespace become one space), cut to `limit` characters with '…'."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def comparison_frame(rows) -> pd.DataFrame:
    """The gold-marking list: id, prompt excerpt, votes so far / needed, gold outcome (table cells only)."""
    names = {value: label for label, value in GOLD_OUTCOMES}
    return pd.DataFrame(
        [
            [
                r.id,
                excerpt(r.prompt_excerpt),
                f"{r.votes} / {r.required_votes}",
                names.get(r.gold_outcome, "–"),
            ]
            for r in rows
        ],
        columns=COMPARISON_COLUMNS,
    )


def overlap_line(fraction: float, k: int) -> str:
    """The project's current overlap settings in words (numbers only)."""
    if k <= 1 or fraction <= 0:
        return f"**Now:** one annotator per item (share {fraction:.0%}, k = {k})."
    return f"**Now:** {fraction:.0%} of the items get {k} annotators; the rest get one."


def progress_line(name: str, p) -> str:
    share = f" ({100 * p.project_done / p.project_total:.0f}%)" if p.project_total else ""
    return f"**{name}**: {p.project_done} of {p.project_total} judgements{share}"


def build(shared: Shared) -> dict:
    services = shared.services
    with gr.Row():
        refresh_btn = gr.Button("Refresh", size="sm", elem_id="team-refresh", scale=0)
        updated = gr.Markdown(elem_id="team-updated")
    progress = gr.Markdown(elem_id="team-progress")
    activity = gr.Dataframe(
        headers=ACTIVITY_COLUMNS,
        interactive=False,
        wrap=True,
        datatype="str",
        label="Who did what",
        elem_id="team-activity",
    )
    quality = gr.Markdown(elem_id="team-quality")
    annotators = gr.Dataframe(
        headers=ANNOTATOR_COLUMNS,
        interactive=False,
        wrap=True,
        datatype="str",
        label="Per annotator",
        elem_id="team-annotators",
    )
    with gr.Accordion("Overlap: how many items get several annotators", open=False, elem_id="team-overlap"):
        gr.Markdown(
            "A share of the items (chosen by a stable hash) is given to **k** different people so agreement "
            "can be measured; the rest get one vote each. Changing it re-derives the requirement of items "
            "that have no vote yet."
        )
        with gr.Row():
            fraction = gr.Slider(
                0.0,
                1.0,
                value=0.0,
                step=0.05,
                label="Share of items with overlap",
                elem_id="team-overlap-fraction",
            )
            k = gr.Number(
                value=2,
                precision=0,
                minimum=1,
                maximum=20,
                label="Annotators per overlap item (k)",
                elem_id="team-overlap-k",
            )
        overlap_now = gr.Markdown(elem_id="team-overlap-current")
        overlap_btn = gr.Button("Save overlap settings", elem_id="team-overlap-save")
        overlap_status = gr.Markdown(elem_id="team-overlap-status")
    with gr.Accordion("Gold items: comparisons with a known answer", open=False, elem_id="team-gold"):
        gr.Markdown(
            f"Click a row to take its id, choose the known outcome (A and B are the comparison's own "
            f"generations, whatever side an annotator saw them on), and save. The list shows the first "
            f"{COMPARISONS_LISTED} comparisons of the project."
        )
        comparisons = gr.Dataframe(
            headers=COMPARISON_COLUMNS,
            interactive=False,
            wrap=True,
            datatype="str",
            label="Comparisons",
            elem_id="team-comparisons",
        )
        with gr.Row():
            gold_id = gr.Number(label="Comparison id", precision=0, minimum=1, elem_id="team-gold-id")
            gold_outcome = gr.Radio(
                GOLD_OUTCOMES, value="a", label="Known outcome", elem_id="team-gold-outcome"
            )
        gold_btn = gr.Button("Save gold answer", elem_id="team-gold-save")
        gold_status = gr.Markdown(elem_id="team-gold-status")
    timer = gr.Timer(REFRESH_S, active=False)
    shown_project = gr.State(None)

    @user_errors
    def refresh(project_id, shown, request: gr.Request):
        if project_id is None:
            return "Choose a project first.", "", None, "", None, None, gr.skip(), gr.skip(), "", None
        username, project_id = request.username, int(project_id)
        rows = services.annotation.activity(username, project_id)
        pairwise = services.annotation.progress(username, project_id, task="pairwise")
        segment = services.annotation.progress(username, project_id, task="segment")
        report = services.quality.report(username, project_id)
        listed = services.annotation.comparisons(username, project_id)
        info = services.projects.get(project_id)
        # The sliders take the stored settings when a project is first shown, never on a timer tick
        # (that would undo what the admin is typing).
        first = shown != project_id
        stamp = pd.Timestamp.now(tz="UTC").strftime("%H:%M:%S UTC")
        return (
            f"Updated {stamp}; refreshes every {REFRESH_S:.0f} s while this tab is open.",
            progress_line("Pairwise", pairwise) + "  \n" + progress_line("Segments", segment),
            activity_frame(rows),
            quality_text(report),
            annotator_frame(report.per_annotator),
            project_id,
            info.overlap_fraction if first else gr.skip(),
            info.overlap_k if first else gr.skip(),
            overlap_line(info.overlap_fraction, info.overlap_k),
            comparison_frame(listed),
        )

    @user_errors
    def save_overlap(project_id, fraction_v, k_v, request: gr.Request):
        project_id = require_project(project_id)
        n = services.annotation.set_overlap(request.username, project_id, float(fraction_v), int(k_v or 1))
        info = services.projects.get(project_id)
        return (
            f"Saved: {fraction_v:.0%} of items get {int(k_v or 1)} annotators; {n} unvoted item(s) updated.",
            overlap_line(info.overlap_fraction, info.overlap_k),
        )

    @user_errors
    def save_gold(project_id, id_v, outcome_v, request: gr.Request):
        if id_v is None:
            raise gr.Error("Enter a comparison id (click a row of the list).")
        outcome = None if outcome_v == "none" else outcome_v
        pid = None if project_id is None else int(project_id)  # a comparison of another project: NotFound
        services.annotation.set_gold(request.username, int(id_v), outcome, project_id=pid)
        shown = "no longer gold" if outcome is None else f"gold with outcome {inert(outcome)}"
        listed = (
            comparison_frame(services.annotation.comparisons(request.username, int(project_id)))
            if project_id is not None
            else gr.skip()
        )
        return f"Comparison {int(id_v)} is {shown}.", listed

    def pick(evt: gr.SelectData):
        """A click on a row of the list takes its comparison id (the save checks it again)."""
        row = evt.row_value or []
        try:
            return int(row[0])
        except (IndexError, TypeError, ValueError):
            return gr.skip()

    outputs = [
        updated,
        progress,
        activity,
        quality,
        annotators,
        shown_project,
        fraction,
        k,
        overlap_now,
        comparisons,
    ]
    inputs = [shared.project_id, shown_project]
    refresh_btn.click(refresh, inputs, outputs, api_name="team_refresh", **DB_EVENTS)
    timer.tick(refresh, inputs, outputs, show_progress="hidden", **DB_EVENTS)
    overlap_btn.click(
        save_overlap,
        [shared.project_id, fraction, k],
        [overlap_status, overlap_now],
        api_name="team_overlap",
        **DB_EVENTS,
    )
    gold_btn.click(
        save_gold,
        [shared.project_id, gold_id, gold_outcome],
        [gold_status, comparisons],
        api_name="team_gold",
        **DB_EVENTS,
    )
    comparisons.select(pick, None, gold_id, **UI_ONLY)

    def clear(project_id, shown):
        """Another project was chosen: no numbers of the previous one stay on screen."""
        if shown is None or shown == project_id:
            return gr.skip()
        return "Project changed: press Refresh.", "", None, "", None, None, gr.skip(), gr.skip(), "", None

    return {
        "refresh": (refresh, inputs, outputs),
        # Wired to the project dropdown itself: its value is the new project id.
        "clear": (clear, [shared.project_select, shown_project], outputs),
        "timer": timer,
    }
