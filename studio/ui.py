"""The studio's Gradio page. `build_app(services)` builds it and never launches anything."""

from __future__ import annotations

from typing import Any

import gradio as gr

from studio.services import Services
from studio.settings import Settings
from studio.tabs import browse, generate, imports, projects
from studio.tabs.common import Shared, project_choices

CSS = """
#studio-header h1 { margin-bottom: 0; }
#studio-header p { margin-top: 0.2em; opacity: 0.8; }
"""


def build_app(services: Services) -> gr.Blocks:
    with gr.Blocks(title="Feedback Studio") as demo:
        gr.Markdown(
            "# Feedback Studio\nPrompts → candidate responses → human feedback → reward models and aligned "
            "policies → blind comparison.",
            elem_id="studio-header",
        )
        with gr.Row():
            project_select = gr.Dropdown(
                label="Project", choices=[], value=None, elem_id="project-select", scale=3
            )
        shared = Shared(services=services, project_id=gr.State(None), project_select=project_select)
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Projects", id="projects", elem_id="tab-projects"):
                proj = projects.build(shared)
            with gr.Tab("Import", id="import", elem_id="tab-import"):
                imp = imports.build(shared)
            with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                gen = generate.build(shared)
            with gr.Tab("Browse", id="browse", elem_id="tab-browse"):
                brw = browse.build(shared)
        _wire(demo, shared, proj, imp, gen, brw)
    demo.queue(default_concurrency_limit=8)
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

    def refresh_tabs(project_id, *browse_inputs):
        return (
            *show(project_id, *browse_inputs[:2], 1),
            *gen_refresh(project_id),
            *guide_refresh(project_id),
        )

    demo.load(on_load, [shared.project_id], load_outputs)
    # Choosing a project (by hand or after creating one) updates the session state and every tab.
    shared.project_select.change(lambda v: v, shared.project_select, shared.project_id).then(
        refresh_tabs, show_in, show_out + gen_out + guide_out
    )
    after_data = [imp["imported"], gen["generated"]]
    for event in after_data:
        event.then(show, show_in, show_out).then(lambda: projects.projects_frame(shared), None, proj["table"])


def launch_options(settings: Settings) -> dict[str, Any]:
    """`launch()` keyword arguments: safe defaults for a studio holding annotation data."""
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
        "share": False,
        "show_error": False,
    }
