"""Browse tab: prompts with search, tag filter and pagination; a prompt's responses, shown as plain text."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from studio.tabs.common import ADMIN, DB_EVENTS, Shared, require_project, requires, user_errors

PROMPT_COLUMNS = ["id", "external id", "kind", "tags", "responses", "prompt"]
RESPONSE_COLUMNS = ["#", "model", "sample", "response", "tokens", "finish", "settings"]
PAGE_SIZE = 20
PREVIEW_CHARS = 300


def build(shared: Shared) -> dict:
    services = shared.services
    with gr.Row():
        query = gr.Textbox(label="Search prompts", placeholder="text or id", scale=3, elem_id="browse-search")
        tag = gr.Dropdown(label="Tag", choices=[""], value="", scale=1, elem_id="browse-tag")
    with gr.Row():
        prev_btn = gr.Button("◀ Previous", size="sm", elem_id="browse-prev")
        page = gr.Number(value=1, label="Page", precision=0, minimum=1, elem_id="browse-page")
        next_btn = gr.Button("Next ▶", size="sm", elem_id="browse-next")
    info = gr.Markdown(elem_id="browse-info")
    table = gr.Dataframe(
        headers=PROMPT_COLUMNS,
        interactive=False,
        wrap=True,
        datatype="str",
        label="Prompts",
        column_widths=["5%", "12%", "6%", "14%", "8%", "55%"],
        elem_id="prompt-table",
    )
    row_ids = gr.State([])
    gr.Markdown("Select a row to see the prompt and its responses.")
    prompt_box = gr.Textbox(label="Prompt", lines=4, interactive=False, elem_id="prompt-detail")
    responses = gr.Dataframe(
        headers=RESPONSE_COLUMNS,
        interactive=False,
        wrap=True,
        datatype="str",
        label="Responses",
        elem_id="response-table",
        column_widths=["5%", "16%", "6%", "49%", "6%", "6%", "12%"],
    )

    @user_errors
    @requires(shared, ADMIN)
    def show(project_id, query_v, tag_v, page_v):
        if project_id is None:
            return (
                gr.update(value=pd.DataFrame(columns=PROMPT_COLUMNS)),
                [],
                "No project chosen.",
                1,
                gr.update(),
            )
        tags = ["", *services.prompts.tags(int(project_id))]
        tag_v = tag_v if tag_v in tags else ""  # a tag of the previously chosen project
        result = services.prompts.browse(
            int(project_id), query=query_v or "", tag=tag_v or None, page=page_v or 1, page_size=PAGE_SIZE
        )
        frame = pd.DataFrame(
            [
                [r.id, r.external_id, r.kind, ", ".join(r.tags), r.generations, _preview(r.text)]
                for r in result.rows
            ],
            columns=PROMPT_COLUMNS,
        )
        text = f"{result.total} prompt(s) · page {result.page} of {result.pages}"
        return frame, [r.id for r in result.rows], text, result.page, gr.update(choices=tags, value=tag_v)

    @user_errors
    @requires(shared, ADMIN)
    def select(project_id, ids, evt: gr.SelectData):
        project_id = require_project(project_id)
        row = evt.index[0] if isinstance(evt.index, list | tuple) else evt.index
        if row is None or row >= len(ids):
            return gr.update(), gr.update()
        detail = services.prompts.detail(project_id, ids[row])
        text = (
            "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in detail.messages)
            if detail.messages
            else detail.text
        )
        frame = pd.DataFrame(
            [
                [
                    g.id,
                    g.model,
                    g.sample_index,
                    g.text,
                    g.num_tokens,
                    g.finish_reason,
                    _settings(g.params, g.seed),
                ]
                for g in detail.generations
            ],
            columns=RESPONSE_COLUMNS,
        )
        return text, frame

    inputs = [shared.project_id, query, tag, page]
    outputs = [table, row_ids, info, page, tag]

    # Every event passes the request on, so `show` checks the role of whoever asked.
    def first_page(p, q, t, _n, request: gr.Request):
        return show(p, q, t, 1, request)

    def previous_page(p, q, t, n, request: gr.Request):
        return show(p, q, t, max(1, (n or 1) - 1), request)

    def next_page(p, q, t, n, request: gr.Request):
        return show(p, q, t, (n or 1) + 1, request)

    query.submit(first_page, inputs, outputs, api_name="browse_search", **DB_EVENTS)
    tag.change(first_page, inputs, outputs, api_name="browse_tag", **DB_EVENTS)
    page.submit(show, inputs, outputs, api_name="browse_page", **DB_EVENTS)
    prev_btn.click(previous_page, inputs, outputs, api_name="browse_previous", **DB_EVENTS)
    next_btn.click(next_page, inputs, outputs, api_name="browse_next", **DB_EVENTS)
    table.select(
        select, [shared.project_id, row_ids], [prompt_box, responses], api_name="browse_detail", **DB_EVENTS
    )
    return {"refresh": (show, inputs, outputs)}


def _settings(params: dict, seed: int | None) -> str:
    if not params.get("do_sample", True):
        text = "greedy"
    else:
        text = f"T={params.get('temperature')} top-p={params.get('top_p')}"
    return f"{text} max={params.get('max_new_tokens')} seed={seed}"


def _preview(text: str) -> str:
    text = text.replace("\n", " ⏎ ")
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"
