"""The studio's Gradio page. `build_app(services)` builds it and never launches anything."""

from __future__ import annotations

from typing import Any

import gradio as gr

from studio.components.keys import KEYBOARD_JS
from studio.services import Services
from studio.settings import Settings
from studio.tabs import (
    annotate,
    arena,
    browse,
    datasets,
    generate,
    imports,
    leaderboard,
    projects,
    segments,
    team,
    training,
    users,
)
from studio.tabs.common import (
    ADMIN,
    ANNOTATOR,
    DB_EVENTS,
    RATER,
    UI_ONLY,
    Shared,
    project_choices,
    signed_in,
    wire_session,
)

DELETE_CACHE = (600, 3600)
"""gr.Blocks(delete_cache=(every s, older than s)): temporary files do not pile up on the disk."""
CSS = """
#studio-header h1 { margin-bottom: 0; }
#studio-header p { margin-top: 0.2em; opacity: 0.8; }
#session-line { text-align: right; }
"""


def build_app(services: Services) -> gr.Blocks:
    # Gradio's cache (uploads, file outputs) is swept every 10 min of files older than 1 h (R-SEC-09).
    with gr.Blocks(title="Feedback Studio", delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(
            "# Feedback Studio\nPrompts → candidate responses → human feedback → reward models and aligned "
            "policies → blind comparison.",
            elem_id="studio-header",
        )
        session = gr.HTML("", elem_id="session-line")
        with gr.Row():
            project_select = gr.Dropdown(
                label="Project", choices=[], value=None, elem_id="project-select", scale=3
            )
        shared = Shared(services=services, project_id=gr.State(None), project_select=project_select)
        with gr.Tabs(elem_id="tabs") as tabs:
            with shared.tab("Projects", "projects", ADMIN):
                proj = projects.build(shared)
            with shared.tab("Import", "import", ADMIN):
                imp = imports.build(shared)
            with shared.tab("Generate", "generate", ADMIN):
                gen = generate.build(shared)
            with shared.tab("Browse", "browse", ADMIN):
                brw = browse.build(shared)
            with shared.tab("Pairwise", "pairwise", ANNOTATOR) as pairwise_tab:
                pair = annotate.build(shared)
            with shared.tab("Segments", "segments", ANNOTATOR) as segments_tab:
                seg = segments.build(shared)
            with shared.tab("Team", "team", ADMIN) as team_tab:
                tm = team.build(shared)
            with shared.tab("Datasets", "datasets", ADMIN) as datasets_tab:
                ds = datasets.build(shared)
            with shared.tab("Training", "training", ADMIN) as training_tab:
                trn = training.build(shared)
            with shared.tab("Arena", "arena", RATER, ANNOTATOR) as arena_tab:
                arn = arena.build(shared)
            with shared.tab("Leaderboard", "leaderboard") as leaderboard_tab:
                lbd = leaderboard.build(shared)
            with shared.tab("Users", "users", ADMIN) as users_tab:
                usr = users.build(shared)
        _wire(demo, shared, proj, imp, gen, brw)
        wire_session(demo, shared, session, tabs)
        users_tab.select(*usr["refresh"], **DB_EVENTS)
        training.wire(shared, training_tab, trn)
        _wire_arena(shared, arena_tab, arn, leaderboard_tab, lbd)
        _wire_annotation(
            shared,
            {
                "pairwise": (pairwise_tab, pair),
                "segments": (segments_tab, seg),
                "team": (team_tab, tm),
                "datasets": (datasets_tab, ds),
            },
        )
    # Every event names its concurrency group (studio.tabs.common: DB_EVENTS, UI_ONLY, HEAVY_LIMITS);
    # the default below only applies to one that forgot (tests/studio/test_ui_helpers.py checks).
    demo.queue(default_concurrency_limit=1)
    return demo


def _wire(demo: gr.Blocks, shared: Shared, proj: dict, imp: dict, gen: dict, brw: dict) -> None:
    services = shared.services

    def on_load(current):
        choices = project_choices(services)
        value = current if current in [c[1] for c in choices] else (choices[0][1] if choices else None)
        return (
            gr.update(choices=choices, value=value),
            value,
            projects.projects_frame(shared),
            gr.update(visible=services.projects.is_empty()),
        )

    load_outputs = [shared.project_select, shared.project_id, proj["table"], proj["demo_offer"]]
    show, show_in, show_out = brw["refresh"]
    gen_refresh, _gen_in, gen_out = gen["refresh"]
    guide_refresh, _guide_in, guide_out = proj["refresh"]

    def refresh_tabs(project_id, query_v, tag_v, _page, request: gr.Request):
        if str(signed_in(services, request).role) != ADMIN:  # the admin tabs are hidden for others
            return tuple(gr.skip() for _ in show_out + gen_out + guide_out)
        return (
            *show(project_id, query_v, tag_v, 1, request),
            *gen_refresh(project_id),
            *guide_refresh(project_id),
        )

    demo.load(on_load, [shared.project_id], load_outputs, **DB_EVENTS)
    # Choosing a project (by hand or after creating one) updates the session state and every tab.
    shared.project_select.change(lambda v: v, shared.project_select, shared.project_id, **DB_EVENTS).then(
        refresh_tabs, show_in, show_out + gen_out + guide_out, **DB_EVENTS
    )
    after_data = [imp["imported"], gen["generated"]]
    for event in after_data:
        event.then(show, show_in, show_out, **DB_EVENTS).then(
            lambda: projects.projects_frame(shared), None, proj["table"], **DB_EVENTS
        )


def _wire_annotation(shared: Shared, parts: dict[str, tuple[gr.Tab, dict]]) -> None:
    """Annotation tabs load their item when opened or when the project changes (see their `on_project`)."""
    (pairwise_tab, pair), (segments_tab, seg) = parts["pairwise"], parts["segments"]
    (team_tab, tm), (datasets_tab, ds) = parts["team"], parts["datasets"]
    load_pair, pair_in, pair_out = pair["load"]
    load_seg, seg_in, seg_out = seg["load"]
    pairwise_tab.select(load_pair, pair_in, pair_out, **DB_EVENTS)
    segments_tab.select(load_seg, seg_in, seg_out, **DB_EVENTS)
    refresh_team, team_in, team_out = tm["refresh"]
    team_tab.select(refresh_team, team_in, team_out, **DB_EVENTS).then(
        lambda: gr.Timer(active=True), None, tm["timer"], **DB_EVENTS
    )
    for tab, tab_id, _roles in shared.tabs:
        if tab_id != "team":
            tab.select(lambda: gr.Timer(active=False), None, tm["timer"], **UI_ONLY)
    datasets_tab.select(*ds["refresh"], **DB_EVENTS)

    on_pair, on_pair_in, _ = pair["on_project"]
    on_seg, on_seg_in, _ = seg["on_project"]
    shared.project_select.change(on_pair, on_pair_in, pair_out, **DB_EVENTS)
    shared.project_select.change(on_seg, on_seg_in, seg_out, **UI_ONLY)
    shared.project_select.change(*tm["clear"], **UI_ONLY)
    shared.project_select.change(*ds["clear"], **UI_ONLY)


def _wire_arena(shared: Shared, arena_tab: gr.Tab, arn: dict, leaderboard_tab: gr.Tab, lbd: dict) -> None:
    """The arena's admin tools fill when the tab opens; the leaderboard loads only when its tab opens
    (never on page load, so a rater's page names no checkpoint before a vote)."""
    arena_tab.select(*arn["on_tab"], **DB_EVENTS)
    shared.project_select.change(*arn["on_project"], **UI_ONLY)
    leaderboard_tab.select(*lbd["refresh"], **DB_EVENTS).then(*lbd["rm_refresh"], **DB_EVENTS)
    shared.project_select.change(*lbd["clear"], **UI_ONLY)


def mount_options(settings: Settings) -> dict[str, Any]:
    """`gr.mount_gradio_app()` keyword arguments: safe defaults for a studio holding annotation data."""
    return {
        "server_name": settings.host,
        "server_port": settings.port,
        "theme": gr.themes.Soft(),
        "css": CSS,
        # The database, uploads, exports and model files are never served by the file route.
        "blocked_paths": [str(settings.data_dir), str(settings.model_cache)],
        "max_file_size": f"{settings.max_upload_mb}mb",
        "run_history": False,
        "enable_monitoring": False,
        "footer_links": ["gradio", "settings"],
        "show_error": False,
        "ssr_mode": False,
        "mcp_server": False,
        "js": KEYBOARD_JS,
    }
