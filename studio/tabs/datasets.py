"""Datasets tab (admin): export snapshots for training, download them, import public preference data.

Downloads: a snapshot's file is looked up by id among the project's snapshots (the path comes from the
database, never from the browser), its sha256 is checked, and a copy is made in a fresh temporary
folder; only that copy is handed to gr.File. The data folder itself stays in `blocked_paths`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from studio.services.datasets import EXPORT_KINDS, FORMATS
from studio.tabs.common import (
    ADMIN,
    DB_EVENTS,
    HEAVY_LIMITS,
    Shared,
    inert,
    require_project,
    requires,
    user_errors,
)

SNAPSHOT_COLUMNS = ["id", "kind", "format", "rows", "sha256", "created (UTC)", "path"]
PROBLEM_COLUMNS = ["file", "line", "field", "code", "message"]
MAX_PROBLEMS_SHOWN = 100
DOWNLOAD_PREFIX = "studio-download-"
DOWNLOAD_TTL_S = 3600
"""Download copies older than this are removed the next time someone downloads."""
KIND_HELP = """\
**Kinds.** `preferences` — prompt / chosen / rejected (TRL DPO & RewardTrainer); `reward` — the same with a
`margin` from vote strength; `unpaired` — prompt / completion / label (KTO); `segments` — responses with
good/bad spans (code-point offsets); `stepwise` — the segments as steps; `votes` — every raw vote;
`prompts` — the prompts. Formats: JSONL (canonical), Parquet, or a Hugging Face `datasets` folder (zipped for
download). Every snapshot records its sha256 and row count. Details: storage/DATASETS.md.
"""


def snapshot_frame(snapshots) -> pd.DataFrame:
    return pd.DataFrame(
        [
            [
                s.id,
                s.kind,
                s.format,
                s.row_count,
                s.sha256,
                s.created_at.strftime("%Y-%m-%d %H:%M") if s.created_at else "–",
                s.path,
            ]
            for s in snapshots
        ],
        columns=SNAPSHOT_COLUMNS,
    )


def download_copy(path: Path, name: str, *, root: Path | None = None, now: float | None = None) -> Path:
    """A copy of `path` (a file, or a folder that is zipped) in a new private folder under the temp dir.

    `name` is our own (snapshot id and kind). Our copies older than DOWNLOAD_TTL_S are removed first.
    """
    root = Path(root or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    now = time.time() if now is None else now
    for old in root.glob(f"{DOWNLOAD_PREFIX}*"):
        info = old.lstat()
        if (
            old.is_dir()
            and not old.is_symlink()
            and info.st_uid == os.getuid()
            and now - info.st_mtime > DOWNLOAD_TTL_S
        ):
            shutil.rmtree(old, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=DOWNLOAD_PREFIX, dir=root))  # mode 0700, a fresh name
    if path.is_dir():
        return Path(shutil.make_archive(str(folder / name), "zip", root_dir=path))
    target = folder / f"{name}{''.join(path.suffixes)}"
    shutil.copyfile(path, target)
    return target


def build(shared: Shared) -> dict:
    services = shared.services
    gr.Markdown("### Export a snapshot")
    gr.Markdown(KIND_HELP)
    with gr.Row():
        kinds = gr.CheckboxGroup(list(EXPORT_KINDS), value=["preferences"], label="Kinds", elem_id="ds-kinds")
        fmt = gr.Radio(list(FORMATS), value="jsonl", label="Format", elem_id="ds-format")
    with gr.Row():
        min_votes = gr.Number(
            value=1, precision=0, minimum=1, label="Least votes per comparison", elem_id="ds-min-votes"
        )
        min_agreement = gr.Slider(
            0.0,
            1.0,
            value=0.0,
            step=0.05,
            label="Least agreement with the consensus",
            elem_id="ds-min-agreement",
        )
        include_ties = gr.Checkbox(value=False, label="Ties as two margin-0 rows (reward)", elem_id="ds-ties")
    export_btn = gr.Button("Export", variant="primary", elem_id="ds-export")
    export_result = gr.Markdown(elem_id="ds-export-result")
    export_files = gr.File(
        label="Download", file_count="multiple", interactive=False, elem_id="ds-export-files"
    )

    gr.Markdown("### Snapshots of this project")
    with gr.Row():
        list_btn = gr.Button("Refresh list", size="sm", elem_id="ds-list-refresh", scale=0)
        snapshot_id = gr.Number(
            label="Snapshot id", precision=0, minimum=1, elem_id="ds-download-id", scale=1
        )
        download_btn = gr.Button("Download", size="sm", elem_id="ds-download", scale=0)
    snapshots = gr.Dataframe(
        headers=SNAPSHOT_COLUMNS,
        interactive=False,
        wrap=True,
        datatype="str",
        label="Snapshots",
        elem_id="ds-snapshots",
    )
    download_file = gr.File(label="Snapshot file", interactive=False, elem_id="ds-download-file")
    shown_project = gr.State(None)

    gr.Markdown(
        "### Import public preference data\nTRL preference files (JSONL, Parquet, a `datasets` folder as .zip): "
        "`prompt` + `chosen` + `rejected` (explicit or implicit prompt), or `prompt` + `completion` + `label`. "
        "Any bad row means nothing is written; every problem is listed with its line and field."
    )
    upload = gr.File(
        label="Preference file",
        file_types=[".jsonl", ".json", ".parquet", ".zip"],
        type="filepath",
        elem_id="ds-import-file",
    )
    import_btn = gr.Button("Import preferences", elem_id="ds-import")
    import_result = gr.Markdown(elem_id="ds-import-result")
    problems = gr.Dataframe(
        headers=PROBLEM_COLUMNS,
        interactive=False,
        wrap=True,
        visible=False,
        label="Problems",
        elem_id="ds-import-problems",
    )

    @user_errors
    def export(project_id, kinds_v, fmt_v, min_votes_v, min_agreement_v, ties_v, request: gr.Request):
        project_id = require_project(project_id)
        filters = {
            "min_votes": int(min_votes_v or 1),
            "min_agreement": float(min_agreement_v or 0.0),
            "include_ties": bool(ties_v),
        }
        made = services.datasets.export(request.username, project_id, list(kinds_v or []), fmt_v, filters)
        files = [str(download_copy(Path(s.path), f"snapshot-{s.id}-{s.kind}")) for s in made]
        lines = [f"Exported {len(made)} snapshot(s):"] + [
            f"- #{s.id} **{inert(s.kind)}** ({inert(s.format)}): {s.row_count} row(s), sha256 `{s.sha256[:16]}…`"
            for s in made
        ]
        listed = services.datasets.list_snapshots(request.username, project_id)
        return "\n".join(lines), files, snapshot_frame(listed), project_id

    @user_errors
    def list_snapshots(project_id, request: gr.Request):
        if project_id is None:
            return snapshot_frame([]), None
        listed = services.datasets.list_snapshots(request.username, int(project_id))
        return snapshot_frame(listed), int(project_id)

    @user_errors
    def download(project_id, id_v, request: gr.Request):
        project_id = require_project(project_id)
        if id_v is None:
            raise gr.Error("Enter the id of a snapshot from the list.")
        found = [
            s for s in services.datasets.list_snapshots(request.username, project_id) if s.id == int(id_v)
        ]
        if not found:
            raise gr.Error(f"This project has no snapshot {int(id_v)}.")
        snapshot = found[0]
        if not services.datasets.verify(request.username, snapshot.id):
            raise gr.Error(f"Snapshot {snapshot.id} is missing or changed on disk since it was exported.")
        return str(download_copy(Path(snapshot.path), f"snapshot-{snapshot.id}-{snapshot.kind}"))

    @user_errors
    @requires(shared, ADMIN)  # before the file is touched: the `finally` below deletes it
    def import_file(project_id, path, request: gr.Request):
        project_id = require_project(project_id)
        if not path:
            raise gr.Error("Choose a file to import first.")
        upload_path = Path(path)
        try:
            report = services.datasets.import_preferences(
                request.username, project_id, upload_path, upload_path.name
            )
        finally:
            upload_path.unlink(missing_ok=True)  # uploaded data must not linger in Gradio's cache
        shown = report.problems[:MAX_PROBLEMS_SHOWN]
        frame = pd.DataFrame(
            [[p.file, "" if p.line is None else p.line, p.field or "", p.code, p.message] for p in shown],
            columns=PROBLEM_COLUMNS,
        )
        message = ("✅ " if report.committed else "❌ ") + inert(report.summary())
        if len(report.problems) > MAX_PROBLEMS_SHOWN:
            message += f" Showing the first {MAX_PROBLEMS_SHOWN} of {len(report.problems)} problems."
        return message, gr.update(value=frame, visible=bool(shown)), None

    export_btn.click(
        export,
        [shared.project_id, kinds, fmt, min_votes, min_agreement, include_ties],
        [export_result, export_files, snapshots, shown_project],
        concurrency_limit=HEAVY_LIMITS["datasets"],
        concurrency_id="datasets",
        api_name="datasets_export",
    )
    list_btn.click(
        list_snapshots,
        [shared.project_id],
        [snapshots, shown_project],
        api_name="datasets_list",
        **DB_EVENTS,
    )
    download_btn.click(
        download,
        [shared.project_id, snapshot_id],
        download_file,
        concurrency_limit=HEAVY_LIMITS["datasets"],
        concurrency_id="datasets",
        api_name="datasets_download",
    )
    import_btn.click(
        import_file,
        [shared.project_id, upload],
        [import_result, problems, upload],
        concurrency_limit=HEAVY_LIMITS["datasets"],
        concurrency_id="datasets",
        api_name="datasets_import",
    )

    def clear(project_id, shown):
        """Another project was chosen: nothing of the previous project's stays on screen."""
        if shown is None or shown == project_id:
            return gr.skip()
        return snapshot_frame([]), "", None, None, "", gr.update(visible=False), None

    cleared = [snapshots, export_result, export_files, download_file, import_result, problems, shown_project]
    return {
        "refresh": (list_snapshots, [shared.project_id], [snapshots, shown_project]),
        # Wired to the project dropdown itself: its value is the new project id.
        "clear": (clear, [shared.project_select, shown_project], cleared),
    }
