"""The checkpoint registry, shown in the Training tab: a table, a lineage tree (plain text) and Verify.

A checkpoint whose files no longer match its manifest is marked unloadable by the service and is
never loaded; the table and the tree say so in capitals. Names reach the page only as table cells
and plain text.
"""

from __future__ import annotations

import math
from typing import Any

import gradio as gr
import pandas as pd

from studio.tabs.common import ADMIN, DB_EVENTS, UI_ONLY, Shared, inert, requires, user_errors

CHECKPOINT_COLUMNS = ["id", "name", "kind", "status", "recipe", "parent", "job", "snapshot sha256", "metrics"]
UNLOADABLE = "UNLOADABLE"
METRICS_SHOWN = 4


def status_text(status: Any) -> str:
    """ "ready", or "UNLOADABLE" in capitals so it cannot be missed."""
    return UNLOADABLE if str(status) == "unloadable" else str(status)


def metrics_text(metrics: dict[str, Any] | None, limit: int = METRICS_SHOWN) -> str:
    """`{"eval/accuracy": 0.8125, "eval/loss": 0.4}` -> "eval/accuracy 0.812 · eval/loss 0.4"."""
    shown = []
    for name, value in sorted((metrics or {}).items()):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        shown.append(f"{name} {value:.3g}" if math.isfinite(value) else f"{name} {value}")
        if len(shown) == limit:
            break
    return " · ".join(shown)


def _opt(value: Any, prefix: str = "#") -> str:
    return "–" if value is None else f"{prefix}{value}"


def checkpoint_frame(infos: list[Any]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            [
                c.id,
                c.name,
                str(c.kind),
                status_text(c.status),
                c.recipe or "–",
                _opt(c.parent_id),
                _opt(c.job_id),
                (c.snapshot_sha256 or "")[:12] or "–",
                metrics_text(c.metrics),
            ]
            for c in infos
        ],
        columns=CHECKPOINT_COLUMNS,
    )


def lineage_lines(infos: list[Any]) -> list[str]:
    """The registry as an indented tree: each checkpoint under its parent (base models at the top).

        #1 tiny-llama (base) · policy
        └─ #4 rm-1 · reward · reward_model · job #2
           └─ #6 rm-1b · reward · reward_model · job #3 · UNLOADABLE

    A checkpoint whose parent is not listed is a root. Children are in id order.
    """
    by_id = {c.id: c for c in infos}
    children: dict[int | None, list[Any]] = {}
    for c in sorted(infos, key=lambda c: c.id):
        parent = c.parent_id if c.parent_id in by_id and c.parent_id != c.id else None
        children.setdefault(parent, []).append(c)

    def describe(c: Any) -> str:
        parts = [f"#{c.id} {' '.join(str(c.name).split())}", str(c.kind)]
        if c.recipe and c.recipe != "base":
            parts.append(str(c.recipe))
        if c.job_id is not None:
            parts.append(f"job #{c.job_id}")
        if str(c.status) == "unloadable":
            parts.append(UNLOADABLE)
        return " · ".join(parts)

    lines: list[str] = []
    seen: set[int] = set()

    def walk(node: Any, prefix: str, last: bool, root: bool) -> None:
        if node.id in seen:  # a cycle in bad data must not loop forever
            return
        seen.add(node.id)
        lines.append(describe(node) if root else f"{prefix}{'└─' if last else '├─'} {describe(node)}")
        below = children.get(node.id, [])
        inner = "" if root else prefix + ("   " if last else "│  ")
        for i, child in enumerate(below):
            walk(child, inner, i == len(below) - 1, False)

    for root in children.get(None, []):
        walk(root, "", True, True)
    return lines


def build(shared: Shared) -> dict:
    services = shared.services
    gr.Markdown("### Checkpoints")
    with gr.Row():
        refresh_btn = gr.Button("Refresh", size="sm", elem_id="ckpt-refresh", scale=0)
        ckpt_id = gr.Number(label="Checkpoint id (click a row)", precision=0, elem_id="ckpt-id", scale=1)
        verify_btn = gr.Button("Verify files against the manifest", size="sm", elem_id="ckpt-verify", scale=0)
    verify_status = gr.Markdown(elem_id="ckpt-verify-status")
    table = gr.Dataframe(
        headers=CHECKPOINT_COLUMNS,
        interactive=False,
        wrap=True,
        datatype="str",
        label="Registered checkpoints",
        elem_id="ckpt-table",
    )
    tree = gr.Code(
        label="Lineage",
        language=None,
        interactive=False,
        lines=4,
        max_lines=30,
        show_line_numbers=False,
        elem_id="ckpt-lineage",
    )

    def view(username: str, project_id: int | None) -> dict:
        infos = services.jobs.checkpoints(username, None if project_id is None else int(project_id))
        return {table: checkpoint_frame(infos), tree: "\n".join(lineage_lines(infos))}

    def empty() -> dict:
        return {table: checkpoint_frame([]), tree: "", verify_status: ""}

    @user_errors
    @requires(shared, ADMIN)
    def refresh(project_id, request: gr.Request):
        return view(request.username, project_id)

    @user_errors
    @requires(shared, ADMIN)
    def verify(project_id, id_v, request: gr.Request):
        if not id_v:
            raise gr.Error("Enter a checkpoint id (click a row of the list).")
        info = services.jobs.verify_checkpoint(request.username, int(id_v))
        if str(info.status) == "unloadable":
            message = (
                f"❌ Checkpoint #{info.id} ({inert(info.name)}) does not match its manifest: "
                f"**{UNLOADABLE}**, never loaded."
            )
            if info.problem:
                message += f"  \n{inert(info.problem)}"
        elif info.manifest_sha256 is None:
            message = (
                f"Checkpoint #{info.id} ({inert(info.name)}) is a base model reference: it has no manifest."
            )
        else:
            message = f"✅ Checkpoint #{info.id} ({inert(info.name)}) matches its manifest."
        return {verify_status: message, **view(request.username, project_id)}

    def pick(evt: gr.SelectData):
        row = evt.row_value or []
        try:
            return int(row[0])
        except (IndexError, TypeError, ValueError):
            return gr.skip()

    refresh_btn.click(refresh, [shared.project_id], [table, tree], api_name="checkpoints_list", **DB_EVENTS)
    verify_btn.click(
        verify,
        [shared.project_id, ckpt_id],
        [verify_status, table, tree],
        api_name="checkpoints_verify",
        **DB_EVENTS,
    )
    table.select(pick, None, ckpt_id, **UI_ONLY)
    return {"view": view, "empty": empty, "outputs": [table, tree, verify_status]}
