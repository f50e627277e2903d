"""Generate tab: sample candidate responses with a model (or two) and pair them for annotation."""

from __future__ import annotations

import gradio as gr

from studio.tabs.common import (
    ADMIN,
    DB_EVENTS,
    HEAVY_LIMITS,
    UI_ONLY,
    Shared,
    inert,
    require_project,
    requires,
    user_errors,
)

PAIRINGS = [
    ("Two samples of one model", "two_samples"),
    ("One sample each from two models", "two_checkpoints"),
    ("No pairs (responses only)", "none"),
]
SELECTIONS = [("Prompts this model has not answered yet", "missing"), ("All prompts", "all")]


def model_choices(shared: Shared, project_id: int | None) -> list[tuple[str, int]]:
    return [(m.label, m.checkpoint_id) for m in shared.services.generation.models(project_id)]


def build(shared: Shared) -> dict:
    services = shared.services
    with gr.Row():
        model = gr.Dropdown(label="Model", choices=[], elem_id="gen-model", scale=2)
        pairing = gr.Radio(
            PAIRINGS, value="two_samples", label="Candidate pairs", elem_id="gen-pairing", scale=2
        )
        second = gr.Dropdown(
            label="Second model", choices=[], visible=False, elem_id="gen-second-model", scale=2
        )
    with gr.Row():
        selection = gr.Radio(SELECTIONS, value="missing", label="Which prompts", elem_id="gen-selection")
        tag = gr.Dropdown(label="Only prompts with tag", choices=[""], value="", elem_id="gen-tag")
        limit = gr.Number(
            label="At most this many prompts (0 = all)", value=8, precision=0, minimum=0, elem_id="gen-limit"
        )
    with gr.Accordion("Sampling settings", open=True):
        with gr.Row():
            temperature = gr.Slider(
                0.0, 2.0, value=0.8, step=0.05, label="Temperature (0 = greedy)", elem_id="gen-temperature"
            )
            top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p", elem_id="gen-top-p")
            max_new = gr.Slider(8, 512, value=96, step=8, label="Max new tokens", elem_id="gen-max-new")
        with gr.Row():
            samples = gr.Slider(
                1, 8, value=2, step=1, label="Samples per prompt (per model)", elem_id="gen-samples"
            )
            seed = gr.Number(value=-1, precision=0, label="Seed (-1 = a new random seed)", elem_id="gen-seed")
            batch = gr.Slider(1, 32, value=8, step=1, label="Batch size", elem_id="gen-batch")
    with gr.Accordion("Add a model (local folder or Hugging Face id)", open=False), gr.Row():
        ref = gr.Textbox(
            label="Folder or model id",
            placeholder="/path/to/checkpoint or org/name",
            elem_id="gen-add-ref",
        )
        ref_name = gr.Textbox(label="Display name (optional)", elem_id="gen-add-name")
        add_btn = gr.Button("Add model", elem_id="gen-add-button")
    run_btn = gr.Button("Generate", variant="primary", elem_id="generate-button")
    result = gr.Markdown(elem_id="generate-result")

    @user_errors
    def refresh(project_id):
        choices = model_choices(shared, project_id)
        tags = [""] + (services.prompts.tags(int(project_id)) if project_id is not None else [])
        first = choices[0][1] if choices else None
        second_value = choices[1][1] if len(choices) > 1 else first
        return (
            gr.update(choices=choices, value=first),
            gr.update(choices=choices, value=second_value),
            gr.update(choices=tags, value=""),
        )

    @user_errors
    @requires(shared, ADMIN)
    def add_model(project_id, ref_v, name_v):
        choice = services.generation.register_model(ref_v, name=name_v or None)
        choices = model_choices(shared, project_id)
        return (
            gr.update(choices=choices, value=choice.checkpoint_id),
            gr.update(choices=choices),
            f"Added {inert(choice.label)}.",
        )

    @user_errors
    @requires(shared, ADMIN)
    def run(
        project_id,
        model_v,
        pairing_v,
        second_v,
        selection_v,
        tag_v,
        limit_v,
        t,
        p,
        m,
        n,
        seed_v,
        bs,
        progress=gr.Progress(),  # noqa: B008 - Gradio injects the tracker through this default
    ):
        from studio.generation import SamplingParams, random_seed

        project_id = require_project(project_id)
        if model_v is None:
            raise gr.Error("Choose a model.")
        try:
            params = SamplingParams(
                temperature=float(t),
                top_p=float(p),
                max_new_tokens=int(m),
                samples_per_prompt=int(n),
                seed=random_seed() if seed_v is None or seed_v < 0 else int(seed_v),
                batch_size=int(bs),
            )
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
        report = services.generation.run(
            project_id,
            checkpoint_id=int(model_v),
            params=params,
            pairing=pairing_v,
            second_checkpoint_id=int(second_v) if second_v is not None else None,
            selection=selection_v,
            tag=tag_v or None,
            limit=int(limit_v or 0) or None,
            progress=lambda fraction, desc: progress(fraction, desc=desc),
        )
        return inert(report.summary())

    pairing.change(lambda v: gr.update(visible=v == "two_checkpoints"), pairing, second, **UI_ONLY)
    add_btn.click(
        add_model,
        [shared.project_id, ref, ref_name],
        [model, second, result],
        api_name="add_model",
        **DB_EVENTS,
    )
    generated = run_btn.click(
        run,
        [
            shared.project_id,
            model,
            pairing,
            second,
            selection,
            tag,
            limit,
            temperature,
            top_p,
            max_new,
            samples,
            seed,
            batch,
        ],
        result,
        api_name="generate",
        concurrency_id="model",
        concurrency_limit=HEAVY_LIMITS["model"],
    )
    return {"refresh": (refresh, [shared.project_id], [model, second, tag]), "generated": generated}
