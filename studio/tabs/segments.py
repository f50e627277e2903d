"""Segments tab: mark good and bad spans of one response with the span picker; save a draft or submit.

The response text, its generation id and the stored version live in `gr.State` (server side); from the
picker's value only the spans are read, and the annotation service validates them against its own copy
of the text. Saving sends the version the annotator started from: if the same annotator changed the
spans elsewhere in the meantime (another tab), the service refuses with Conflict and the tab reloads the
latest version instead of overwriting it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import gradio as gr

from studio.components.span_picker import SpanPicker, picker_value, spans_of
from studio.services import ServiceError
from studio.services.errors import Conflict
from studio.tabs.annotate import progress_text, raise_auth_errors
from studio.tabs.common import DB_EVENTS, Shared, inert

CONFLICT_MESSAGE = (
    "This response was changed elsewhere — reloaded the latest version. Check it, then save again."
)


@dataclass(frozen=True)
class Marking:
    """The response on screen for one page session (kept in gr.State, never sent to the browser)."""

    generation_id: int
    project_id: int
    version: int
    text: str
    labels: tuple[str, ...]
    suggestions: tuple[dict, ...]


def kept_suggestions(marking: Marking, payload: dict | None) -> list[dict]:
    """The stored suggestions the annotator has not yet accepted or rejected in the picker.

    Only suggestions the server handed out are kept (matched on start, end and polarity), so the client
    can hide suggestions but never add one.
    """
    if not isinstance(payload, dict) or not isinstance(payload.get("suggestions"), list):
        return list(marking.suggestions)
    sent = {
        (s.get("start"), s.get("end"), s.get("polarity"))
        for s in payload["suggestions"]
        if isinstance(s, dict)
    }
    return [s for s in marking.suggestions if (s["start"], s["end"], s["polarity"]) in sent]


def build(shared: Shared) -> dict:
    services = shared.services
    marking = gr.State(None)
    with gr.Accordion("Guidelines", open=False, elem_id="seg-guidelines-box") as guidelines_box:
        guidelines = gr.Textbox(
            show_label=False, lines=6, max_lines=20, interactive=False, elem_id="seg-guidelines"
        )
    with gr.Row():
        progress = gr.Markdown(elem_id="seg-progress")
        load_btn = gr.Button("Load next response", size="sm", elem_id="seg-load", scale=0)
    prompt = gr.Textbox(label="Prompt", lines=2, max_lines=10, interactive=False, elem_id="seg-prompt")
    gr.Markdown(
        "Select a part of the response with the mouse, then press **Good [G]** or **Bad [B]**. "
        "Pick a label and add a comment if it helps. Spans are listed below the text, where you can "
        "change or delete them.",
        elem_id="seg-help",
    )
    picker = SpanPicker(picker_value(""), elem_id="span-picker")
    with gr.Row():
        save_btn = gr.Button("Save draft", elem_id="seg-save")
        submit_btn = gr.Button("Submit and next", variant="primary", elem_id="seg-submit")
    status = gr.Markdown(elem_id="seg-status")
    outputs = [marking, guidelines_box, guidelines, progress, prompt, picker, status]

    def blank(message: str) -> dict:
        return {marking: None, prompt: "", picker: picker_value(""), status: message}

    def show(username, project_id: int, message: str) -> dict:
        item = services.annotation.next_segment(username, project_id)
        if item is None:
            p = services.annotation.progress(username, project_id, task="segment")
            done = message + (" " if message else "") + "Nothing left to mark in this project. Thank you!"
            return blank(done) | {progress: progress_text(p)}
        state = Marking(
            generation_id=item.generation_id,
            project_id=project_id,
            version=item.version,
            text=item.response_text,
            labels=tuple(item.labels),
            suggestions=tuple(dict(s) for s in item.suggestions),
        )
        version = f"Guidelines (version {item.guideline_version})" if item.guideline_version else "Guidelines"
        return {
            marking: state,
            guidelines_box: gr.update(label=version),
            guidelines: item.guideline_text or "No guidelines yet.",
            progress: progress_text(item.progress),
            prompt: item.prompt_text,
            picker: picker_value(item.response_text, item.spans, item.labels, item.suggestions),
            status: message,
        }

    def load(project_id, request: gr.Request) -> dict:
        if project_id is None:
            return blank("Choose a project first.")
        try:
            return show(request.username, int(project_id), "")
        except ServiceError as exc:
            raise_auth_errors(exc)
            return blank(inert(str(exc)))

    def save(state: Marking | None, value, submit: bool, request: gr.Request) -> dict:
        if state is None:
            return {status: "Load a response first."}
        username = request.username
        try:
            spans = spans_of(value)
        except ValueError as exc:
            return {status: inert(str(exc))}
        suggestions = kept_suggestions(state, value)
        try:
            result = services.annotation.save_spans(
                username, state.generation_id, spans, state.version, submit, offsets="codepoint"
            )
        except Conflict as exc:
            if not isinstance(exc.current, dict):  # not a version clash: the response is no longer theirs
                return {status: inert(str(exc))}
            current = exc.current
            return {
                marking: replace(state, version=int(current.get("version", state.version))),
                picker: picker_value(state.text, current.get("spans", []), state.labels, suggestions),
                status: CONFLICT_MESSAGE,
            }
        except ServiceError as exc:
            raise_auth_errors(exc)
            return {status: inert(str(exc))}
        if submit:
            try:
                return show(username, state.project_id, f"Submitted {len(result.spans)} span(s).")
            except ServiceError as exc:
                raise_auth_errors(exc)
                return blank(inert(str(exc)))
        return {
            marking: replace(state, version=result.version),
            picker: picker_value(state.text, result.spans, state.labels, suggestions),
            status: f"Draft saved: {len(result.spans)} span(s), version {result.version}.",
        }

    def save_draft(state, value, request: gr.Request):
        return save(state, value, False, request)

    def submit(state, value, request: gr.Request):
        return save(state, value, True, request)

    save_btn.click(
        save_draft,
        [marking, picker],
        outputs,
        trigger_mode="once",
        api_name="spans_save",
        **DB_EVENTS,
    )
    submit_btn.click(
        submit,
        [marking, picker],
        outputs,
        trigger_mode="once",
        api_name="spans_submit",
        **DB_EVENTS,
    )
    load_btn.click(load, [shared.project_id], outputs, api_name="segments_next", **DB_EVENTS)

    def on_project(project_id, state: Marking | None):
        """A project change clears a response of another project (opening the tab loads the next one)."""
        if state is None or (project_id is not None and state.project_id == int(project_id)):
            return gr.skip()
        return blank("Press **Load next response** to start.")

    return {
        "load": (load, [shared.project_id], outputs),
        # Wired to the project dropdown itself: its value is the new project id.
        "on_project": (on_project, [shared.project_select, marking], outputs),
    }
