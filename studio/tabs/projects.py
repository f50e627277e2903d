"""Projects tab: the demo project offer on an empty database, project creation, the project list."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from studio.tabs.common import (
    ADMIN,
    DB_EVENTS,
    Shared,
    inert,
    project_choices,
    require_project,
    requires,
    user_errors,
)

COLUMNS = ["id", "name", "prompts", "responses", "pairs", "guidelines", "description"]


def projects_frame(shared: Shared) -> pd.DataFrame:
    rows = [
        [
            p.id,
            p.name + (" (demo)" if p.is_demo else ""),
            p.prompts,
            p.generations,
            p.comparisons,
            f"v{p.guideline_version}" if p.guideline_version else "-",
            p.description,
        ]
        for p in shared.services.projects.list()
    ]
    return pd.DataFrame(rows, columns=COLUMNS)


def build(shared: Shared) -> dict:
    services = shared.services
    with gr.Group(visible=False, elem_id="demo-offer") as demo_offer:
        gr.Markdown(
            "### Welcome to Feedback Studio\n"
            "This database is empty. Start with the **built-in demo project**: 40 review-style and "
            "instruction-style prompts (some as chats), guidelines and span labels. Then generate candidate "
            "responses in the *Generate* tab and look at them in *Browse*."
        )
        demo_btn = gr.Button("Create the demo project", variant="primary", elem_id="create-demo")
    with gr.Accordion("New project", open=False, elem_id="new-project"):
        name = gr.Textbox(label="Name", max_length=200, elem_id="project-name")
        description = gr.Textbox(label="Description", lines=2, elem_id="project-description")
        guidelines = gr.Textbox(
            label="Guidelines for annotators (Markdown; versioned)", lines=5, elem_id="project-guidelines"
        )
        labels = gr.Textbox(
            label="Span labels (comma-separated)",
            placeholder="factual error, off topic, good detail",
            elem_id="project-labels",
        )
        create_btn = gr.Button("Create project", variant="primary", elem_id="create-project")
    status = gr.Markdown(elem_id="projects-status")
    with gr.Accordion("Guidelines of the current project", open=False, elem_id="guidelines-editor"):
        current = gr.Textbox(label="Guidelines (Markdown)", lines=8, elem_id="current-guidelines")
        version = gr.Markdown(elem_id="guidelines-version")
        save_btn = gr.Button("Save as a new version", elem_id="save-guidelines")
    table = gr.Dataframe(
        headers=COLUMNS,
        interactive=False,
        wrap=True,
        label="Projects",
        elem_id="projects-table",
        datatype="str",
    )

    @user_errors
    @requires(shared, ADMIN)
    def create(name_v, desc_v, guide_v, labels_v):
        info = services.projects.create(name_v, description=desc_v, guidelines=guide_v, span_labels=labels_v)
        return _after_change(shared, info.id, f"Created project **{inert(info.name)}**.")

    @user_errors
    @requires(shared, ADMIN)
    def create_demo():
        info, report = services.projects.create_demo()
        return _after_change(shared, info.id, f"Created **{inert(info.name)}**. {inert(report.summary())}")

    def load_guidelines(project_id):
        if project_id is None:
            return "", "No project chosen."
        info = services.projects.get(int(project_id))
        if info.guideline_version is None:
            return "", "No guidelines yet: write them and save version 1."
        return (
            info.guidelines,
            f"Version {info.guideline_version}; every annotation records the version it saw.",
        )

    @user_errors
    @requires(shared, ADMIN)
    def save_guidelines(project_id, text):
        n = services.projects.set_guidelines(require_project(project_id), text or "")
        return f"Saved guidelines version {n}; every annotation records the version it saw."

    outputs = [shared.project_select, shared.project_id, table, status, demo_offer]
    create_btn.click(
        create, [name, description, guidelines, labels], outputs, api_name="create_project", **DB_EVENTS
    )
    demo_btn.click(create_demo, None, outputs, api_name="create_demo", **DB_EVENTS)
    save_btn.click(
        save_guidelines, [shared.project_id, current], version, api_name="save_guidelines", **DB_EVENTS
    )
    return {
        "table": table,
        "demo_offer": demo_offer,
        "status": status,
        "refresh": (load_guidelines, [shared.project_id], [current, version]),
    }


def _after_change(shared: Shared, project_id: int, message: str) -> tuple:
    choices = project_choices(shared.services)
    return (
        gr.update(choices=choices, value=project_id),
        project_id,
        projects_frame(shared),
        message,
        gr.update(visible=shared.services.projects.is_empty()),
    )
