"""Pure formatting for the Training tab: job rows, the progress bar, metric plots, choices (no components).

Everything shown here is numbers, enum names, hashes, or text made inert by the caller (`state_line`
does it itself); the progress bar is HTML built from numbers only.
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

import pandas as pd

from storage.preference_store import is_import_placeholder
from studio.tabs.common import inert

POLL_S = 2.0
"""Seconds between refreshes while the tab is open and a job is queued or running."""
LIVE_STATES = ("queued", "running")
JOB_COLUMNS = ["id", "name", "recipe", "state", "progress", "step", "snapshot sha256", "parent", "checkpoint"]
PLOTS = {"loss": "Loss", "reward": "Reward / margin", "kl": "KL", "accuracy": "Accuracy"}
PLOT_COLUMNS = ["step", "value", "metric"]
MAX_POINTS = 400
"""Points per metric series sent to a plot."""
DEFAULT_ENCODER = "minilm"
"""The reward-model recipes' own default backbone: a valid base without a registry entry."""
DEFAULT_BASE = 0
"""Dropdown value of "the recipe's default model" (no base checkpoint)."""


# ----------------------------------------------------------------------------- pure formatting


def fmt_eta(seconds: float | None) -> str:
    """`65` -> "1 min 05 s"; None -> "–"."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "–"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def fmt_progress(progress: float | None) -> str:
    return "–" if progress is None else f"{100 * min(max(progress, 0.0), 1.0):.0f} %"


def progress_html(
    state: str, progress: float | None, step: int, total: int | None, eta_s: float | None
) -> str:
    """The selected job's progress bar as our own HTML: numbers and the state's enum name only."""
    fraction = min(max(progress or 0.0, 0.0), 1.0)
    eta = f" · ETA {fmt_eta(eta_s)}" if state in LIVE_STATES else ""
    total_text = "?" if total is None else str(int(total))
    return (
        f"<progress id='train-progress-bar' value='{fraction:.4f}' max='1' style='width:100%'></progress>"
        f"<div id='train-progress-text'>{html.escape(str(state))} · {100 * fraction:.0f} % · "
        f"step {int(step)} / {total_text}{eta}</div>"
    )


def short_sha(sha: str | None, n: int = 12) -> str:
    return (sha or "")[:n] or "–"


def ref(value: int | None) -> str:
    return "–" if value is None else f"#{value}"


def job_frame(jobs: list[Any], snapshot_sha: dict[int, str] | None = None) -> pd.DataFrame:
    """The job history: one row per job with its provenance (snapshot hash, parent, output checkpoint)."""
    snapshot_sha = snapshot_sha or {}
    return pd.DataFrame(
        [
            [
                j.id,
                j.name or "",
                j.recipe,
                str(j.state) + (f" ({j.failure_code})" if j.failure_code else ""),
                fmt_progress(j.progress),
                f"{j.step} / {'?' if j.total_steps is None else j.total_steps}",
                short_sha(snapshot_sha.get(j.snapshot_id)),
                ref(j.parent_job_id),
                ref(j.output_checkpoint_id),
            ]
            for j in jobs
        ],
        columns=JOB_COLUMNS,
    )


def plot_of(metric: str) -> str | None:
    """Which plot a metric series goes to (None: not plotted): `train/loss` -> "loss"."""
    leaf = metric.rsplit("/", 1)[-1].lower()
    lower = metric.lower()
    if lower.startswith("run/") or "logp" in lower:  # bookkeeping; log-probabilities are not rewards
        return None
    if leaf.endswith("loss"):
        return "loss"
    if "kl" in leaf:
        return "kl"
    if "acc" in leaf:
        return "accuracy"
    if "reward" in lower or "margin" in leaf or leaf in ("chosen", "rejected"):
        return "reward"
    return None


def thin(points: list[tuple[int, float]], limit: int = MAX_POINTS) -> list[tuple[int, float]]:
    """At most `limit` points, evenly spaced, the first and the last always kept (a 10k-step job is
    not sent to the browser point by point every poll)."""
    if len(points) <= limit:
        return list(points)
    last = len(points) - 1
    picked = sorted({round(i * last / (limit - 1)) for i in range(limit)})
    return [points[i] for i in picked]


def metric_frames(series: dict[str, list[tuple[int, float]]]) -> dict[str, pd.DataFrame]:
    """{plot: long-format frame (step, value, metric)} for gr.LinePlot; non-finite values dropped,
    each series thinned to MAX_POINTS."""
    rows: dict[str, list[tuple[int, float, str]]] = {p: [] for p in PLOTS}
    for name, points in sorted(series.items()):
        plot = plot_of(name)
        if plot is None:
            continue
        finite = [(int(s), float(v)) for s, v in points if v is not None and math.isfinite(float(v))]
        rows[plot].extend((s, v, name) for s, v in thin(finite))
    return {p: plot_frame(r) for p, r in rows.items()}


def plot_frame(rows: list[tuple[int, float, str]] = ()) -> pd.DataFrame:
    """A (step, value, metric) frame with numeric columns even when empty: gr.LinePlot draws an
    object-typed (empty) column on a categorical axis, one tick per value."""
    frame = pd.DataFrame(list(rows), columns=PLOT_COLUMNS)
    return frame.astype({"step": "int64", "value": "float64", "metric": "str"})


def snapshot_label(s: Any) -> str:
    created = s.created_at.strftime("%Y-%m-%d %H:%M") if getattr(s, "created_at", None) else ""
    return f"#{s.id} {s.kind} · {s.row_count} rows · sha256 {short_sha(s.sha256)} · {created}".strip(" ·")


def base_choices(base_kind: str, models: list[Any]) -> list[tuple[str, int]]:
    """Dropdown choices for the base model: ready policy checkpoints (not the weightless stand-ins of
    imported data), plus the default encoder for a recipe whose base may be an encoder (`encoder_or_policy`)."""
    choices = [
        (f"#{m.id} {m.name}", m.id)
        for m in models
        if str(m.kind) == "policy"
        and str(m.status) == "ready"
        and not is_import_placeholder(getattr(m, "path", None))
    ]
    if base_kind == "encoder_or_policy":
        choices.insert(0, (f"{DEFAULT_ENCODER} (the recipe's default encoder)", DEFAULT_BASE))
    return choices


def state_line(job: Any) -> str:
    """One Markdown line: the state, and the failure code and message (inert) if it failed."""
    line = f"**Job #{job.id}** · {inert(job.recipe)} · **{inert(job.state)}**"
    if job.name:
        line += f" · {inert(job.name)}"
    if job.failure_code or job.failure_message:
        line += f"  \n❌ {inert(job.failure_code or 'failed')}: {inert(job.failure_message or '')}"
    return line


def config_text(config: Any) -> str:
    return json.dumps(config or {}, indent=2, sort_keys=True, default=str)


def plot_plan(
    frames: dict[str, pd.DataFrame], shown: dict[str, tuple[str, ...]]
) -> tuple[dict[str, pd.DataFrame | None], dict[str, pd.DataFrame], dict[str, tuple[str, ...]]]:
    """What to send to each plot: `(now, later, shown)`.

    gr.LinePlot (gradio 6.31) keeps the colour domain of the data it was first drawn with, so a series
    that appears later (eval/loss at the first evaluation) would not be drawn. A plot whose set of
    series changed is therefore cleared now (None) and gets its frame in a follow-up event (`later`);
    one with the same series gets the new frame at once. `shown`: the series now on each plot.
    """
    now: dict[str, pd.DataFrame | None] = {}
    later: dict[str, pd.DataFrame] = {}
    new_shown: dict[str, tuple[str, ...]] = {}
    for key, frame in frames.items():
        names = tuple(sorted(set(frame["metric"])))
        new_shown[key] = names
        if names and names == tuple(shown.get(key, ())):
            now[key] = frame
        else:
            now[key] = None
            if names:
                later[key] = frame
    return now, later, new_shown
