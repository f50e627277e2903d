"""Pairwise tab: the prompt and two responses side by side, one vote, then the next item.

Everything shown is plain text in read-only textboxes (never HTML). The item handed out comes with
an assignment id and an unguessable vote key made once per item (kept server side in gr.State), so
a double click, a retried request or a key held down records at most one vote. The annotator is
`request.username`, never a form field; the current item lives in `gr.State` (server side, per page
session) and the database keeps the reservation, so a refresh resumes the same item.
"""

from __future__ import annotations

import html
import secrets
import time
from dataclasses import dataclass

import gradio as gr

from studio.services import ServiceError
from studio.services.errors import Forbidden, Unauthorized
from studio.tabs.common import ADMIN, ANNOTATOR, DB_EVENTS, Shared, inert, signed_in

STRENGTHS = [("slightly", "slight"), ("clearly", "clear"), ("much", "much")]
MIN_VIEW_S = 0.5
"""A vote arriving sooner than this after its item appeared is not recorded (an accidental double click
or key press that landed on the item that had just replaced the voted one)."""
VOTES = [
    ("A is better [1]", "vote-a", "left"),
    ("B is better [2]", "vote-b", "right"),
    ("Tie [3]", "vote-tie", "tie"),
    ("Both bad [4]", "vote-both-bad", "both_bad"),
]
KEY_LEGEND = "Keys: **1** A is better · **2** B is better · **3** tie · **4** both bad · **S** skip"


@dataclass(frozen=True)
class Shown:
    """The item on screen for one page session (kept in gr.State, never sent to the browser)."""

    assignment_id: int
    comparison_id: int
    project_id: int
    shown_at: float
    vote_key: str = ""
    """The idempotency key of this item's vote (see `vote_key`): the same for every click on it."""


def vote_key(assignment_id: int) -> str:
    """A fresh idempotency key for the vote on one shown item.

    Keys are unique across all users, so a key derived from the assignment id alone could be taken
    first by another annotator through the REST API, and this user's vote would then be refused.
    """
    return f"vote-{assignment_id}-{secrets.token_urlsafe(12)}"


def progress_text(progress) -> str:
    """'12 done · 30 left for you · project 40/120' from an annotation Progress."""
    return (
        f"{progress.done_by_user} done · {progress.remaining_for_user} left for you · "
        f"project {progress.project_done}/{progress.project_total}"
    )


def prompt_text(text: str, messages: list[dict] | None) -> str:
    """A chat prompt as readable turns; a plain prompt as it is."""
    if messages:
        return "\n\n".join(f"[{m.get('role', '?')}]\n{m.get('content', '')}" for m in messages)
    return text


def raise_auth_errors(exc: ServiceError) -> None:
    """Identity and role problems stop the event with a message; other service errors are shown inline."""
    if isinstance(exc, Unauthorized | Forbidden):
        raise gr.Error(html.escape(str(exc))) from None


def build(shared: Shared) -> dict:
    services = shared.services
    shown = gr.State(None)
    with gr.Accordion("Guidelines", open=False, elem_id="pair-guidelines-box") as guidelines_box:
        guidelines = gr.Textbox(
            show_label=False, lines=6, max_lines=20, interactive=False, elem_id="pair-guidelines"
        )
    with gr.Row():
        progress = gr.Markdown(elem_id="pair-progress")
        load_btn = gr.Button("Load next item", size="sm", elem_id="pair-load", scale=0)
    prompt = gr.Textbox(label="Prompt", lines=3, max_lines=12, interactive=False, elem_id="pair-prompt")
    with gr.Row(equal_height=True):
        left = gr.Textbox(label="Response A", lines=10, max_lines=30, interactive=False, elem_id="pair-left")
        right = gr.Textbox(
            label="Response B", lines=10, max_lines=30, interactive=False, elem_id="pair-right"
        )
    with gr.Row():
        vote_buttons = [gr.Button(text, variant="primary", elem_id=eid) for text, eid, _ in VOTES]
        skip_btn = gr.Button("Skip [S]", variant="secondary", elem_id="vote-skip")
    with gr.Row():
        strength = gr.Radio(
            STRENGTHS, value=None, label="How much better? (optional)", elem_id="vote-strength", scale=1
        )
        rationale = gr.Textbox(
            label="Why? (optional)", lines=1, max_lines=4, max_length=2000, elem_id="vote-rationale", scale=2
        )
    gr.Markdown(KEY_LEGEND, elem_id="pair-keys")
    status = gr.Markdown(elem_id="vote-status")
    buttons = [*vote_buttons, skip_btn]
    outputs = [
        shown,
        guidelines_box,
        guidelines,
        progress,
        prompt,
        left,
        right,
        strength,
        rationale,
        status,
        *buttons,
    ]

    def blank(message: str) -> dict:
        """No item on screen: empty boxes and the message; buttons and guidelines stay as they are."""
        return {shown: None, prompt: "", left: "", right: "", strength: None, rationale: "", status: message}

    def show(username, project_id: int, message: str, state: Shown | None) -> dict:
        """Reserve (or resume) the user's next item and fill the tab with it."""
        item = services.annotation.next_pairwise(username, project_id)
        active = {b: gr.update(interactive=item is not None) for b in buttons}
        if item is None:
            p = services.annotation.progress(username, project_id)
            done = message + (" " if message else "") + "Nothing left for you in this project. Thank you!"
            return blank(done) | active | {progress: progress_text(p)}
        same = state is not None and state.assignment_id == item.assignment_id
        started = state.shown_at if same else time.monotonic()
        key = state.vote_key if same and state.vote_key else vote_key(item.assignment_id)
        version = f"Guidelines (version {item.guideline_version})" if item.guideline_version else "Guidelines"
        fresh = {} if same else {strength: None, rationale: ""}  # keep what was typed for the same item
        return {
            shown: Shown(item.assignment_id, item.comparison_id, project_id, started, key),
            guidelines_box: gr.update(label=version),
            guidelines: item.guideline_text or "No guidelines yet.",
            progress: progress_text(item.progress),
            prompt: prompt_text(item.prompt_text, item.prompt_messages),
            left: item.left_text,
            right: item.right_text,
            status: message,
            **fresh,
            **active,
        }

    def load(project_id, state, request: gr.Request) -> dict:
        if project_id is None:
            return blank("Choose a project first.")
        try:
            return show(request.username, int(project_id), "", state)
        except ServiceError as exc:
            raise_auth_errors(exc)
            return blank(inert(str(exc)))

    def make_vote(choice: str):
        def vote(project_id, state, strength_v, rationale_v, request: gr.Request):
            return _vote(choice, project_id, state, strength_v, rationale_v, request)

        vote.__name__ = f"vote_{choice}"
        return vote

    def _vote(choice, project_id, state: Shown | None, strength_v, rationale_v, request: gr.Request) -> dict:
        if state is None:
            return load(project_id, state, request)
        username = request.username
        waited = time.monotonic() - state.shown_at
        if waited < MIN_VIEW_S:
            return {
                status: f"Not recorded: that came {waited:.1f} s after this item appeared. "
                "Vote again if you meant it."
            }
        try:
            if choice == "skip":
                services.annotation.skip(username, state.assignment_id)
                message = "Skipped."
            else:
                result = services.annotation.submit_vote(
                    username,
                    state.assignment_id,
                    choice,
                    strength_v or None,
                    (rationale_v or "").strip() or None,
                    idempotency_key=state.vote_key or vote_key(state.assignment_id),
                    time_spent_ms=int(waited * 1000),
                )
                message = "Already recorded." if result.replayed else "Vote recorded."
        except ServiceError as exc:
            raise_auth_errors(exc)
            message = inert(str(exc))
        try:
            return show(username, state.project_id, message, state)
        except ServiceError as exc:
            raise_auth_errors(exc)
            return blank(inert(str(exc)))

    inputs = [shared.project_id, shown, strength, rationale]
    choices = [(b, c) for b, (_, _, c) in zip(vote_buttons, VOTES, strict=True)] + [(skip_btn, "skip")]
    for button, choice in choices:
        button.click(
            make_vote(choice),
            inputs,
            outputs,
            trigger_mode="once",
            api_name="skip" if choice == "skip" else f"vote_{choice}",
            **DB_EVENTS,
        )
    load_btn.click(load, [shared.project_id, shown], outputs, api_name="pairwise_next", **DB_EVENTS)

    def on_project(project_id, state: Shown | None, request: gr.Request) -> dict:
        """Annotators get their next item of the newly chosen project at once (the Pairwise tab is their
        first tab); an admin reserves items only by opening the tab, so their view is just cleared."""
        if project_id is not None and state is not None and state.project_id == int(project_id):
            return gr.skip()
        role = str(signed_in(services, request).role)
        if role == ANNOTATOR:
            return load(project_id, state, request)
        if role != ADMIN:
            return gr.skip()  # a rater has no Pairwise tab (the Arena is theirs): nothing to load or clear
        return gr.skip() if state is None else blank("Press **Load next item** to start.")

    return {
        "load": (load, [shared.project_id, shown], outputs),
        # Wired to the project dropdown itself: its value is the new project id.
        "on_project": (on_project, [shared.project_select, shown], outputs),
    }
