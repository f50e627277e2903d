"""Import tab: upload a prompt file, import strictly or leniently, see every problem by line and field."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from studio.services.prompts import write_problems_json
from studio.tabs.common import ADMIN, DB_EVENTS, Shared, inert, require_project, requires, user_errors

PROBLEM_COLUMNS = ["line", "field", "code", "message"]
MAX_SHOWN = 100

FORMAT_HELP = """\
**Formats.** JSONL (one object per line), CSV (comma-separated, header row), Parquet, TXT (one prompt per line),
or a `.zip` of a folder saved with `datasets.save_to_disk`.

**Fields.** `prompt` — a string, or a list of chat messages `{"role", "content"}` ending with a user turn
(TRL's conversational format); `text` is an alias of a string prompt and `messages` of a chat; `id` — your own id
(string or integer, unique in the file; a content hash is used when absent); `tags` — a list of strings
(in CSV: comma-separated in one cell).

**Strict** (default) rejects the whole file if any row is bad and writes nothing. **Lenient** imports the good rows
and lists the rest. Unknown columns are ignored with a warning. Ids already in the project are **skipped** by default
(or updated — never for a prompt that already has responses — or treated as errors).
"""


def build(shared: Shared) -> dict:
    services = shared.services
    gr.Markdown(FORMAT_HELP)
    upload = gr.File(
        label="Prompt file",
        file_types=[".jsonl", ".json", ".csv", ".parquet", ".txt", ".zip"],
        type="filepath",
        elem_id="import-file",
    )
    with gr.Row():
        mode = gr.Radio(["strict", "lenient"], value="strict", label="Mode", elem_id="import-mode")
        policy = gr.Radio(
            ["skip", "update", "error"],
            value="skip",
            label="Ids already in the project",
            elem_id="import-policy",
        )
    import_btn = gr.Button("Import", variant="primary", elem_id="import-button")
    result = gr.Markdown(elem_id="import-result")
    problems = gr.Dataframe(
        headers=PROBLEM_COLUMNS,
        interactive=False,
        wrap=True,
        visible=False,
        label="Problems",
        elem_id="import-problems",
    )
    problems_file = gr.File(
        label="All problems (JSON)", visible=False, interactive=False, elem_id="import-problems-file"
    )

    @user_errors
    @requires(shared, ADMIN)
    def run_import(project_id, path, mode_v, policy_v):
        project_id = require_project(project_id)
        if not path:
            raise gr.Error("Choose a file to import first.")
        upload_path = Path(path)
        try:
            report = services.prompts.import_file(
                project_id,
                upload_path,
                lenient=mode_v == "lenient",
                on_duplicate=policy_v,
                display_name=upload_path.name,
            )
        finally:
            # Uploaded data must not linger in Gradio's cache, where any logged-in user could fetch it.
            upload_path.unlink(missing_ok=True)
        shown = report.problems[:MAX_SHOWN]
        frame = pd.DataFrame(
            [[p.line if p.line is not None else "", p.field or "", p.code, p.message] for p in shown],
            columns=PROBLEM_COLUMNS,
        )
        message = ("✅ " if report.committed else "❌ ") + inert(report.summary())
        if len(report.problems) > MAX_SHOWN:
            message += f" Showing the first {MAX_SHOWN} of {len(report.problems)} problems; download the full list below."
        json_path = write_problems_json(report) if report.problems else None
        return (
            message,
            gr.update(value=frame, visible=bool(shown)),
            gr.update(value=str(json_path) if json_path else None, visible=json_path is not None),
            None,
        )

    event = import_btn.click(
        run_import,
        [shared.project_id, upload, mode, policy],
        [result, problems, problems_file, upload],
        api_name="import_prompts",
        **DB_EVENTS,
    )
    return {"imported": event}
