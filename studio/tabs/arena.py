"""Arena tab: a blind battle between two checkpoints, one vote, then the names.

Raters, annotators and admins see a prompt (from the evaluation set, or typed) and two anonymous
responses, filled in at an equal pace (`services.arena.pace`) so timing does not tell the models apart.
The battle id, its texts and the vote's idempotency key live only in `gr.State` (server side, per page
session); the page gets nothing that names a checkpoint until the vote's answer, which reveals both
names as plain text. One click disables all four vote buttons in the same response, and the service
refuses a second vote anyway (the same key again returns the first result).

Admins also get the arena's model list (add, anchor, remove), batch pre-generation, and a named
side-by-side for debugging that is never stored as a battle or a vote.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from studio.services import ServiceError
from studio.tabs.annotate import raise_auth_errors
from studio.tabs.common import (
    ADMIN,
    DB_EVENTS,
    HEAVY_LIMITS,
    UI_ONLY,
    Shared,
    inert,
    require_project,
    requires,
    signed_in,
    user_errors,
)

MODEL_EVENTS = {"concurrency_id": "model", "concurrency_limit": HEAVY_LIMITS["model"]}
"""Events that may load a model and generate (one at a time, like the Generate tab)."""
SOURCES = [("Evaluation set", "eval"), ("Type a prompt", "typed")]
VOTES = [
    ("A is better [1]", "arena-vote-a", "left"),
    ("B is better [2]", "arena-vote-b", "right"),
    ("Tie [3]", "arena-vote-tie", "tie"),
    ("Both bad [4]", "arena-vote-both-bad", "both_bad"),
]
KEY_LEGEND = "Keys: **1** A is better · **2** B is better · **3** tie · **4** both bad · **N** new battle"
MODEL_COLUMNS = ["id", "checkpoint", "anchor", "parent", "source", "status", "battles"]
PACE_TICKS = 40
"""At most this many display steps per battle: long responses move more characters per step."""
PACE_TICK_S = 0.025
"""Seconds per display step. A server running behind skips steps (both sides still grow together), so a
battle is on screen within about PACE_TICKS × PACE_TICK_S = 1 s of its texts being ready."""
TYPED_MAX_CHARS = 4000
NEVER_COUNTED = (
    "⚠ **Debug only, never counted.** The names are shown, so nothing here is stored as a battle or a "
    "vote and the leaderboard does not change."
)


@dataclass(frozen=True)
class Battle:
    """The battle on screen for one page session (gr.State: never sent to the browser)."""

    battle_id: int
    project_id: int
    key: str
    """Idempotency key of this view's vote, made here: every click on this battle sends the same one."""
    left: str
    right: str
    voted: bool = False


def battle_key(battle_id: int) -> str:
    """A fresh, unguessable idempotency key for the vote on one battle view."""
    return f"arena-{battle_id}-{secrets.token_urlsafe(12)}"


def pace_chunk(left: str, right: str, ticks: int = PACE_TICKS) -> int:
    """Characters added per display step so the longer text is done in at most `ticks` steps (≥ 8)."""
    return max(8, math.ceil(max(len(left), len(right)) / max(1, ticks)))


CHOICE_WORDS = {
    "left": "You preferred **Model A**.",
    "right": "You preferred **Model B**.",
    "tie": "You called it a **tie**.",
    "both_bad": "You found **both bad**.",
}


def reveal_text(left_name: str, right_name: str, choice: str, replayed: bool = False) -> str:
    """Markdown naming both sides after the vote; names are inert text (never markup or links)."""
    head = CHOICE_WORDS.get(choice, "Vote recorded.")
    if replayed:
        head = "This battle already has your vote. " + head
    return f"{head} Model A was **{inert(left_name)}** · Model B was **{inert(right_name)}**."


def model_frame(infos) -> pd.DataFrame:
    """The arena's models for admins: one row per ArenaModelInfo."""
    rows = [
        [
            m.checkpoint_id,
            m.name,
            "⚓ anchor" if m.is_anchor else "",
            "–" if m.parent_id is None else f"#{m.parent_id}",
            str(m.source),
            "UNLOADABLE (never plays)" if str(m.status) == "unloadable" else str(m.status),
            m.battles,
        ]
        for m in infos
    ]
    return pd.DataFrame(rows, columns=MODEL_COLUMNS)


def _locked(buttons, interactive: bool) -> dict:
    return {b: gr.update(interactive=interactive) for b in buttons}


# ----------------------------------------------------------------------------- the tab


def build(shared: Shared) -> dict:
    services = shared.services
    state = gr.State(None)
    gr.Markdown(
        "Two anonymous checkpoints answer the same prompt. Read both, vote, and then see who they were. "
        "Sides are shuffled for every battle."
    )
    with gr.Row():
        source = gr.Radio(SOURCES, value="eval", label="Prompt", elem_id="arena-source", scale=1)
        typed = gr.Textbox(
            label="Your prompt",
            lines=2,
            max_lines=8,
            max_length=TYPED_MAX_CHARS,
            visible=False,
            elem_id="arena-typed",
            scale=3,
        )
    with gr.Row():
        new_btn = gr.Button("New battle [N]", variant="primary", elem_id="arena-new", scale=0)
        next_btn = gr.Button("Next battle [N]", visible=False, elem_id="arena-next", scale=0)
    status = gr.Markdown(elem_id="arena-status")
    prompt = gr.Textbox(label="Prompt", lines=2, max_lines=12, interactive=False, elem_id="arena-prompt")
    with gr.Row(equal_height=True):
        left = gr.Textbox(label="Model A", lines=10, max_lines=30, interactive=False, elem_id="arena-left")
        right = gr.Textbox(label="Model B", lines=10, max_lines=30, interactive=False, elem_id="arena-right")
    with gr.Row():
        vote_buttons = [
            gr.Button(text, variant="primary", interactive=False, elem_id=eid) for text, eid, _ in VOTES
        ]
    reveal = gr.Markdown(elem_id="arena-reveal")
    gr.Markdown(KEY_LEGEND, elem_id="arena-keys")
    admin = build_admin(shared)

    def cleared() -> dict:
        """No battle on screen: empty panels under their anonymous labels, vote buttons locked."""
        return {
            state: None,
            prompt: "",
            left: gr.update(value="", label="Model A"),
            right: gr.update(value="", label="Model B"),
            reveal: "",
            next_btn: gr.update(visible=False),
            **_locked(vote_buttons, False),
        }

    # 1. A battle: reserve it (maybe generating both sides, with progress), then show it at an equal pace.
    def start(project_id, source_v, typed_v, request: gr.Request, progress=gr.Progress()):  # noqa: B008
        signed_in(services, request)
        empty = cleared()
        if project_id is None:
            yield empty | {status: "Choose a project first."}
            return
        text = (typed_v or "").strip() if source_v == "typed" else None
        if source_v == "typed" and not text:
            yield empty | {status: "Type a prompt first, or choose the evaluation set."}
            return
        yield empty | {status: "Preparing a battle…"}
        try:
            view = services.arena.next_battle(
                request.username,
                int(project_id),
                prompt_text=text,
                progress=lambda fraction, *_: progress(fraction, desc="Generating both responses"),
            )
        except ServiceError as exc:
            raise_auth_errors(exc)
            yield {status: inert(str(exc))}
            return
        battle = Battle(view.battle_id, int(project_id), battle_key(view.battle_id), view.left, view.right)
        yield {state: battle, prompt: view.prompt, status: ""}

    def stream(battle: Battle | None):
        """Both panels grow by the same number of characters per step; the buttons unlock at the end."""
        if battle is None or battle.voted:
            yield gr.skip()
            return
        from studio.services.arena import pace

        frames = list(pace(battle.left, battle.right, chunk_chars=pace_chunk(battle.left, battle.right)))
        started = time.monotonic()
        for n, (left_so_far, right_so_far) in enumerate(frames[:-1], start=1):
            due = started + n * PACE_TICK_S
            if time.monotonic() > due + PACE_TICK_S:  # a busy server drops frames rather than drag on
                continue
            yield {left: left_so_far, right: right_so_far}
            time.sleep(max(0.0, due - time.monotonic()))
        yield {left: battle.left, right: battle.right, **_locked(vote_buttons, True)}

    start_outputs = [state, prompt, left, right, reveal, next_btn, status, *vote_buttons]
    stream_outputs = [left, right, *vote_buttons]
    for button, api_name in ((new_btn, "arena_new"), (next_btn, "arena_next")):
        button.click(
            start,
            [shared.project_id, source, typed],
            start_outputs,
            api_name=api_name,
            trigger_mode="once",
            **MODEL_EVENTS,
        ).success(stream, state, stream_outputs, show_progress="hidden", **DB_EVENTS)

    # 2. The vote: all four buttons locked in the same answer, then the names.
    def make_vote(choice: str):
        def vote(battle, request: gr.Request):
            return _vote(choice, battle, request)

        vote.__name__ = f"arena_vote_{choice}"
        return vote

    def _vote(choice: str, battle: Battle | None, request: gr.Request) -> dict:
        signed_in(services, request)
        locked = _locked(vote_buttons, False)
        if battle is None:
            return locked | {status: "Start a battle first."}
        try:
            result = services.arena.vote(
                request.username, battle.battle_id, choice, idempotency_key=battle.key
            )
        except ServiceError as exc:
            raise_auth_errors(exc)
            return locked | {status: inert(str(exc)), state: dataclasses.replace(battle, voted=True)}
        return locked | {
            state: dataclasses.replace(battle, voted=True),
            left: gr.update(label=f"Model A: {result.left_name}"),
            right: gr.update(label=f"Model B: {result.right_name}"),
            reveal: reveal_text(result.left_name, result.right_name, result.choice, battle.voted),
            status: "Vote recorded.",
            next_btn: gr.update(visible=True),
        }

    vote_outputs = [state, left, right, reveal, status, next_btn, *vote_buttons]
    for button, (_, _, choice) in zip(vote_buttons, VOTES, strict=True):
        button.click(
            make_vote(choice),
            state,
            vote_outputs,
            trigger_mode="once",
            api_name=f"arena_vote_{choice}",
            **DB_EVENTS,
        )
    source.change(lambda v: gr.update(visible=v == "typed"), source, typed, **UI_ONLY)

    def on_tab(project_id, request: gr.Request) -> dict:
        """Opening the tab: admins get their tools (filled); everyone else never sees them."""
        user = signed_in(services, request)
        if str(user.role) != ADMIN:
            return {admin["box"]: gr.update(visible=False)}
        return {admin["box"]: gr.update(visible=True), **admin["fill"](project_id, request)}

    def on_project(project_id, battle: Battle | None) -> dict:
        """Another project: a battle on screen from the old one goes (the first project chosen at page
        load, or the same one again, leaves a battle being prepared alone)."""
        if battle is None or (project_id is not None and battle.project_id == int(project_id)):
            return gr.skip()
        return cleared() | {status: ""}

    return {
        "on_tab": (on_tab, [shared.project_id], [admin["box"], *admin["fill_outputs"]]),
        "on_project": (on_project, [shared.project_select, state], start_outputs),
    }


# ----------------------------------------------------------------------------- admin tools


def build_admin(shared: Shared) -> dict:
    """The admin accordion (hidden until an admin opens the tab): models, pre-generation, named mode."""
    services = shared.services
    with gr.Accordion("Arena admin", open=False, visible=False, elem_id="arena-admin") as box:
        models_table = gr.Dataframe(
            headers=MODEL_COLUMNS,
            interactive=False,
            wrap=True,
            datatype="str",
            label="Checkpoints in the arena",
            elem_id="arena-models",
        )
        with gr.Row():
            candidate = gr.Dropdown(
                label="Ready policy checkpoint", choices=[], elem_id="arena-add-pick", scale=3
            )
            add_btn = gr.Button("Add to the arena", size="sm", elem_id="arena-add", scale=0)
        with gr.Row():
            member = gr.Dropdown(label="Checkpoint in the arena", choices=[], elem_id="arena-member", scale=3)
            anchor_btn = gr.Button("Set as anchor", size="sm", elem_id="arena-set-anchor", scale=0)
            remove_btn = gr.Button("Remove", size="sm", variant="stop", elem_id="arena-remove", scale=0)
        with gr.Row():
            max_prompts = gr.Number(
                value=0,
                precision=0,
                minimum=0,
                label="Prompts to pre-generate (0 = the whole evaluation set)",
                elem_id="arena-pregen-max",
                scale=2,
            )
            pregen_btn = gr.Button("Pre-generate responses", size="sm", elem_id="arena-pregen", scale=0)
        admin_status = gr.Markdown(elem_id="arena-admin-status")
        with gr.Accordion("Named side-by-side (debug, never counted)", open=False, elem_id="arena-named-box"):
            gr.Markdown(NEVER_COUNTED, elem_id="arena-named-note")
            with gr.Row():
                named_a = gr.Dropdown(label="Checkpoint 1", choices=[], elem_id="arena-named-a")
                named_b = gr.Dropdown(label="Checkpoint 2", choices=[], elem_id="arena-named-b")
            named_prompt = gr.Textbox(
                label="Prompt", lines=2, max_lines=8, max_length=TYPED_MAX_CHARS, elem_id="arena-named-prompt"
            )
            named_btn = gr.Button("Generate side by side", elem_id="arena-named-run")
            with gr.Row(equal_height=True):
                named_left = gr.Textbox(
                    label="Checkpoint 1", lines=8, max_lines=30, interactive=False, elem_id="arena-named-left"
                )
                named_right = gr.Textbox(
                    label="Checkpoint 2",
                    lines=8,
                    max_lines=30,
                    interactive=False,
                    elem_id="arena-named-right",
                )

    def fill(project_id, request: gr.Request) -> dict:
        """The models table and every dropdown, for an admin (checked again here)."""
        signed_in(services, request, ADMIN)
        if project_id is None:
            return {models_table: model_frame([]), admin_status: "Choose a project first."}
        project_id = int(project_id)
        try:
            infos = services.arena.arena_models(request.username, project_id)
        except ServiceError as exc:
            raise_auth_errors(exc)
            return {admin_status: inert(str(exc))}
        ready = [(m.label, m.checkpoint_id) for m in services.generation.models(project_id)]
        members = [(f"#{m.checkpoint_id} {m.name}", m.checkpoint_id) for m in infos]
        first, second = (ready[0][1] if ready else None), (ready[1][1] if len(ready) > 1 else None)
        return {
            models_table: model_frame(infos),
            candidate: gr.update(choices=ready, value=None),
            member: gr.update(choices=members, value=None),
            named_a: gr.update(choices=ready, value=first),
            named_b: gr.update(choices=ready, value=second or first),
        }

    fill_outputs = [models_table, candidate, member, named_a, named_b, admin_status]

    def manage(action: str):
        @user_errors
        @requires(shared, ADMIN)
        def run(project_id, checkpoint_v, request: gr.Request):
            project_id = require_project(project_id)
            if checkpoint_v is None:
                raise gr.Error("Choose a checkpoint first.")
            getattr(services.arena, action)(request.username, project_id, int(checkpoint_v))
            done = {"add_model": "Added", "remove_model": "Removed", "set_anchor": "Anchor set to"}[action]
            return fill(project_id, request) | {admin_status: f"{done} checkpoint #{int(checkpoint_v)}."}

        run.__name__ = f"arena_{action}"
        return run

    add_btn.click(
        manage("add_model"), [shared.project_id, candidate], fill_outputs, api_name="arena_add", **DB_EVENTS
    )
    anchor_btn.click(
        manage("set_anchor"), [shared.project_id, member], fill_outputs, api_name="arena_anchor", **DB_EVENTS
    )
    remove_btn.click(
        manage("remove_model"),
        [shared.project_id, member],
        fill_outputs,
        api_name="arena_remove",
        **DB_EVENTS,
    )

    @user_errors
    @requires(shared, ADMIN)
    def pregenerate(project_id, max_v, request: gr.Request, progress=gr.Progress()):  # noqa: B008
        project_id = require_project(project_id)
        made = services.arena.pregenerate(
            request.username,
            project_id,
            max_prompts=int(max_v or 0) or None,
            progress=lambda fraction, *_: progress(fraction, desc="Pre-generating arena responses"),
        )
        return fill(project_id, request) | {admin_status: f"Pre-generated {made} response(s)."}

    pregen_btn.click(
        pregenerate,
        [shared.project_id, max_prompts],
        fill_outputs,
        api_name="arena_pregenerate",
        **MODEL_EVENTS,
    )

    @user_errors
    @requires(shared, ADMIN)
    def named(project_id, a_v, b_v, prompt_v, request: gr.Request):
        project_id = require_project(project_id)
        if a_v is None or b_v is None:
            raise gr.Error("Choose two checkpoints.")
        if not (prompt_v or "").strip():
            raise gr.Error("Type a prompt.")
        text_a, text_b = services.arena.named_side_by_side(
            request.username, project_id, int(a_v), int(b_v), prompt_v.strip()
        )
        labels = {m.checkpoint_id: m.label for m in services.generation.models(project_id)}
        return (
            gr.update(value=text_a, label=labels.get(int(a_v), f"#{int(a_v)}")),
            gr.update(value=text_b, label=labels.get(int(b_v), f"#{int(b_v)}")),
        )

    named_btn.click(
        named,
        [shared.project_id, named_a, named_b, named_prompt],
        [named_left, named_right],
        api_name="arena_named",
        **MODEL_EVENTS,
    )
    return {"box": box, "fill": fill, "fill_outputs": fill_outputs}
