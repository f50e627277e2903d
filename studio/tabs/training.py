"""Training tab (admin): launch a recipe on a dataset snapshot from a base checkpoint, watch its jobs
(progress with ETA, live metric plots, the log), cancel and resume them, and browse the checkpoints
they registered (studio.tabs.checkpoints).

Gradio needs its components at build time, so every recipe's hyperparameter form is built once (the
recipe list comes from `services.jobs.recipes()`) and only the chosen recipe's group is visible.
Stored or model-written text (job names, failure messages, logs) reaches the page only as table
cells, plain-text code boxes or inert Markdown; the progress bar is our own HTML made of numbers.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from studio.forms import FormError, WidgetSpec, form_specs, grouped, parse_form
from studio.services import ServiceError
from studio.services.errors import NotFound
from studio.tabs import checkpoints
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
from studio.tabs.training_view import (
    DEFAULT_BASE,
    JOB_COLUMNS,
    LIVE_STATES,
    PLOTS,
    POLL_S,
    base_choices,
    config_text,
    job_frame,
    metric_frames,
    plot_frame,
    plot_plan,
    progress_html,
    ref,
    short_sha,
    snapshot_label,
    state_line,
)

# ----------------------------------------------------------------------------- the form


@dataclass
class RecipeForm:
    """One recipe's pre-built hyperparameter form; `specs[i]` is shown by `widgets[i]`."""

    recipe: str
    group: Any
    specs: list[WidgetSpec] = field(default_factory=list)
    widgets: list[Any] = field(default_factory=list)


def widget(spec: WidgetSpec, elem_id: str):
    """A Gradio component for one field (ranges are checked by studio.forms on launch)."""
    common = {"label": spec.label, "info": spec.help or None, "elem_id": elem_id}
    if spec.kind == "int":
        return gr.Number(value=spec.default, precision=0, **common)
    if spec.kind == "number":
        return gr.Number(value=spec.default, step=spec.step, **common)
    if spec.kind == "checkbox":
        return gr.Checkbox(value=bool(spec.default), **common)
    if spec.kind == "dropdown":
        choices = list(spec.choices)
        return gr.Dropdown(choices=choices, value=spec.default if spec.default in choices else None, **common)
    return gr.Textbox(value="" if spec.default is None else str(spec.default), max_lines=1, **common)


def build_form(recipe: str, fields: list[Any], visible: bool) -> RecipeForm:
    specs = form_specs(fields)
    with gr.Group(visible=visible, elem_id=f"train-form-{recipe}") as group:
        form = RecipeForm(recipe, group)
        for section, items in grouped(specs):
            if section:
                gr.Markdown(f"**{inert(section)}**", elem_classes=["train-form-section"], padding=True)
            # Checkboxes get a row of their own: their help text needs the width of a number box.
            for row in (
                [s for s in items if s.kind != "checkbox"],
                [s for s in items if s.kind == "checkbox"],
            ):
                if not row:
                    continue
                with gr.Row():
                    for spec in row:
                        form.specs.append(spec)
                        form.widgets.append(widget(spec, f"train-{recipe}-{spec.name.replace('.', '-')}"))
    return form


# ----------------------------------------------------------------------------- the tab


def build(shared: Shared) -> dict:
    services = shared.services
    try:
        recipes = services.jobs.recipes()
        recipe_error = ""
    except ServiceError as exc:
        recipes, recipe_error = {}, str(exc)
    names = list(recipes)
    first = names[0] if names else None

    gr.Markdown("### Launch a training job")
    if recipe_error:
        gr.Markdown(
            f"❌ The recipes could not be listed: {inert(recipe_error)}", elem_id="train-recipe-error"
        )
    recipe = gr.Dropdown(names, value=first, label="Recipe", elem_id="train-recipe")
    recipe_doc = gr.Markdown(recipes[first].doc if first else "", elem_id="train-recipe-doc")
    with gr.Row():
        snapshot = gr.Dropdown(label="Dataset snapshot", choices=[], elem_id="train-snapshot", scale=3)
        make_snapshot = gr.Button(
            "Make a snapshot from the current annotations", size="sm", elem_id="train-make-snapshot", scale=1
        )
    base = gr.Dropdown(label="Base checkpoint", choices=[], elem_id="train-base")
    gr.Markdown("#### Hyperparameters")
    forms = [build_form(name, recipes[name].fields, name == first) for name in names]
    with gr.Accordion("Run options", open=False), gr.Row():
        job_name = gr.Textbox(label="Job name (optional)", max_lines=1, elem_id="train-job-name")
        processes = gr.Number(
            value=1,
            precision=0,
            label="Processes (GPUs; >1 uses accelerate)",
            elem_id="train-processes",
        )
        timeout_min = gr.Number(
            value=0,
            precision=0,
            label="Time limit in minutes (0: none)",
            elem_id="train-timeout",
        )
    launch_btn = gr.Button("Launch", variant="primary", elem_id="train-launch")
    launch_status = gr.Markdown(elem_id="train-launch-status")

    gr.Markdown("### Jobs")
    with gr.Row():
        refresh_btn = gr.Button("Refresh", size="sm", elem_id="train-refresh", scale=0)
        job_id = gr.Number(label="Job id (click a row)", precision=0, elem_id="train-job-id", scale=1)
        cancel_btn = gr.Button("Cancel job", size="sm", variant="stop", elem_id="train-cancel", scale=0)
        resume_btn = gr.Button("Resume job", size="sm", elem_id="train-resume", scale=0)
    action_status = gr.Markdown(elem_id="train-action-status")
    jobs_table = gr.Dataframe(
        headers=JOB_COLUMNS, interactive=False, wrap=True, datatype="str", label="Jobs", elem_id="train-jobs"
    )
    state_md = gr.Markdown(elem_id="train-job-state")
    progress = gr.HTML("", elem_id="train-progress")
    plots = {}
    for row in (("loss", "reward"), ("kl", "accuracy")):
        with gr.Row():
            for key in row:
                plots[key] = gr.LinePlot(
                    None,
                    x="step",
                    y="value",
                    color="metric",
                    title=PLOTS[key],
                    height=240,
                    elem_id=f"train-plot-{key}",
                )
    result_md = gr.Markdown(elem_id="train-result")
    with gr.Accordion("Provenance and log", open=True):
        provenance = gr.Markdown(elem_id="train-provenance")
        config_box = gr.Code(
            label="Resolved config", language="json", interactive=False, elem_id="train-config", max_lines=20
        )
        log_box = gr.Code(
            label="Log (last lines)",
            language=None,
            interactive=False,
            lines=8,
            max_lines=24,
            show_line_numbers=False,
            elem_id="train-log",
        )
    ckpt = checkpoints.build(shared)
    timer = gr.Timer(POLL_S, active=False)
    shown_project = gr.State(None)
    finished = gr.State(())
    """(job id, state) of every finished job last shown: a change refreshes the checkpoint list."""
    plot_shown = gr.State({})
    """{plot: series names} now drawn (see training_view.plot_plan)."""
    plot_later = gr.State({})
    """{plot: frame} for the follow-up event after a plot was cleared."""

    def form_of(name: str) -> RecipeForm:
        for form in forms:
            if form.recipe == name:
                return form
        raise gr.Error(f"Unknown recipe {html.escape(str(name))}.")

    # -- choices ------------------------------------------------------------------------------

    def snapshot_update(username: str, project_id: int | None, recipe_v: str | None, keep=None):
        if project_id is None or recipe_v not in recipes:
            return gr.update(choices=[], value=None)
        kinds = set(recipes[recipe_v].snapshot_kinds)
        listed = [s for s in services.datasets.list_snapshots(username, int(project_id)) if s.kind in kinds]
        choices = [(snapshot_label(s), s.id) for s in sorted(listed, key=lambda s: -s.id)]
        ids = [c[1] for c in choices]
        return gr.update(choices=choices, value=keep if keep in ids else (ids[0] if ids else None))

    def base_update(username: str, project_id: int | None, recipe_v: str | None, keep=None):
        if recipe_v not in recipes:
            return gr.update(choices=[], value=None)
        services.generation.ensure_default_model()  # the studio's default model is always a base
        pid = None if project_id is None else int(project_id)
        choices = base_choices(recipes[recipe_v].base_kind, services.jobs.checkpoints(username, pid))
        ids = [c[1] for c in choices]
        return gr.update(choices=choices, value=keep if keep in ids else (ids[0] if ids else None))

    @user_errors
    @requires(shared, ADMIN)
    def choose_recipe(project_id, recipe_v, snapshot_v, base_v, request: gr.Request):
        username = request.username
        doc = recipes[recipe_v].doc if recipe_v in recipes else ""
        return (
            doc,
            snapshot_update(username, project_id, recipe_v, snapshot_v),
            base_update(username, project_id, recipe_v, base_v),
            *[gr.update(visible=form.recipe == recipe_v) for form in forms],
        )

    @user_errors
    @requires(shared, ADMIN)
    def snapshot_now(project_id, recipe_v, request: gr.Request):
        project_id = require_project(project_id)
        if recipe_v not in recipes:
            raise gr.Error("Choose a recipe first.")
        kind = recipes[recipe_v].snapshot_kinds[0]
        made = services.datasets.export(request.username, project_id, [kind], "jsonl")
        new = made[0]
        return (
            f"Made snapshot #{new.id} ({inert(new.kind)}, {new.row_count} row(s), sha256 `{short_sha(new.sha256)}…`).",
            snapshot_update(request.username, project_id, recipe_v, new.id),
        )

    # -- jobs ---------------------------------------------------------------------------------

    def sha_by_snapshot(username: str, project_id: int) -> dict[int, str]:
        return {s.id: s.sha256 for s in services.datasets.list_snapshots(username, project_id)}

    def plot_view(frames: dict, shown) -> dict:
        now, later, drawn = plot_plan(frames, shown or {})
        return {**{plots[k]: v for k, v in now.items()}, plot_shown: drawn, plot_later: later}

    def fill_later(later):
        """The follow-up of every event that shows a job: draw the plots it cleared."""
        return {**{plots[k]: frame for k, frame in (later or {}).items()}, plot_later: {}}

    def follow(event) -> None:
        event.then(fill_later, [plot_later], [*plots.values(), plot_later], **UI_ONLY)

    def job_view(username: str, id_v, shown) -> dict:
        """The selected job's detail outputs (empty when none is selected or it does not exist)."""
        try:
            d = services.jobs.job(username, int(id_v)) if id_v else None
        except NotFound:  # a mistyped id must not raise on every timer tick
            d = None
        if d is None:
            return {
                state_md: f"There is no job #{int(id_v)}." if id_v else "",
                progress: "",
                result_md: "",
                provenance: "",
                config_box: "",
                log_box: "",
                **plot_view({k: plot_frame() for k in PLOTS}, shown),
            }
        result = "No checkpoint yet."
        if d.output_checkpoint is not None:
            c = d.output_checkpoint
            result = (
                f"**Checkpoint #{c.id}** registered: {inert(c.name)} · {inert(c.kind)} · "
                f"status **{inert(c.status)}**"
            )
        parts = [
            f"Recipe **{inert(d.recipe)}**",
            f"snapshot {ref(d.snapshot_id)} (sha256 `{inert(d.snapshot_sha256 or '–')}`)",
            f"base checkpoint {ref(d.base_checkpoint_id)}",
            f"parent job {ref(d.parent_job_id)}",
            f"attempt {d.attempt}",
        ]
        return {
            state_md: state_line(d),
            progress: progress_html(str(d.state), d.progress, d.step, d.total_steps, d.eta_s),
            result_md: result,
            provenance: " · ".join(parts),
            config_box: config_text(d.config),
            log_box: d.log_tail or "",
            **plot_view(metric_frames(d.metrics), shown),
        }

    detail_outputs = [
        state_md,
        progress,
        result_md,
        provenance,
        config_box,
        log_box,
        *plots.values(),
        plot_shown,
        plot_later,
    ]

    def jobs_view(username: str, project_id, id_v, seen, shown) -> dict:
        """Table + selected job + timer (active while a job is live) + checkpoints if a job finished."""
        if project_id is None:
            return {
                jobs_table: job_frame([]),
                shown_project: None,
                timer: gr.Timer(active=False),
                **job_view(username, None, shown),
            }
        project_id = int(project_id)
        jobs = services.jobs.list_jobs(username, project_id)
        done = tuple((j.id, str(j.state)) for j in jobs if str(j.state) not in LIVE_STATES)
        live = any(str(j.state) in LIVE_STATES for j in jobs)
        view = {
            jobs_table: job_frame(jobs, sha_by_snapshot(username, project_id)),
            shown_project: project_id,
            timer: gr.Timer(active=live),
            finished: done,
            **job_view(username, id_v, shown),
        }
        if seen is None or done != tuple(seen):  # None: not a timer tick, always reload
            view.update(ckpt["view"](username, project_id))
        return view

    view_outputs = [jobs_table, shown_project, timer, finished, *detail_outputs, *ckpt["outputs"]]

    @user_errors
    @requires(shared, ADMIN)
    def refresh(project_id, id_v, shown, request: gr.Request):
        return jobs_view(request.username, project_id, id_v, None, shown)

    @user_errors
    @requires(shared, ADMIN)
    def poll(project_id, id_v, shown, seen, request: gr.Request):
        return jobs_view(request.username, project_id, id_v, seen, shown)

    @user_errors
    @requires(shared, ADMIN)
    def launch(data: dict, request: gr.Request):
        project_id = require_project(data[shared.project_id])
        recipe_v = data[recipe]
        form = form_of(recipe_v)
        if data[snapshot] is None:
            raise gr.Error("Choose a dataset snapshot (or make one from the current annotations).")
        try:
            values = parse_form(form.specs, [data[w] for w in form.widgets])
        except FormError as exc:
            problems = "; ".join(f"{name}: {problem}" for name, problem in exc.errors.items())
            raise gr.Error(html.escape(f"Check the hyperparameters: {problems}")) from None
        base_v = data[base]
        timeout = data[timeout_min]
        job = services.jobs.launch(
            request.username,
            project_id=project_id,
            recipe=recipe_v,
            snapshot_id=int(data[snapshot]),
            base_checkpoint_id=None if base_v in (None, DEFAULT_BASE) else int(base_v),
            values=values,
            name=(data[job_name] or "").strip() or None,
            processes=int(data[processes] or 1),
            timeout_s=int(timeout) * 60 if timeout else None,
        )
        return {
            launch_status: f"Launched job #{job.id} ({inert(job.recipe)}): {inert(job.state)}.",
            job_id: job.id,
            **jobs_view(request.username, project_id, job.id, None, data[plot_shown]),
        }

    @user_errors
    @requires(shared, ADMIN)
    def cancel(project_id, id_v, shown, request: gr.Request):
        if not id_v:
            raise gr.Error("Enter a job id (click a row of the list).")
        job = services.jobs.cancel(request.username, int(id_v))
        message = (
            f"Job #{job.id} cancelled."
            if str(job.state) == "cancelled"
            else f"Cancel requested for job #{job.id}: it stops after writing a checkpoint."
        )
        return {action_status: message, **jobs_view(request.username, project_id, job.id, None, shown)}

    @user_errors
    @requires(shared, ADMIN)
    def resume(project_id, id_v, shown, request: gr.Request):
        if not id_v:
            raise gr.Error("Enter a job id (click a row of the list).")
        job = services.jobs.resume(request.username, int(id_v))
        same = job.id == int(id_v)
        message = f"Job #{job.id} queued again." if same else f"Resumed job #{int(id_v)} as job #{job.id}."
        return {
            action_status: message,
            job_id: job.id,
            **jobs_view(request.username, project_id, job.id, None, shown),
        }

    @user_errors
    @requires(shared, ADMIN)
    def select_job(id_v, shown, request: gr.Request):
        return job_view(request.username, id_v, shown)

    def pick(evt: gr.SelectData):
        """A click on a row of the job list takes its id (every action checks it again)."""
        row = evt.row_value or []
        try:
            return int(row[0])
        except (IndexError, TypeError, ValueError):
            return gr.skip()

    choice_inputs = [shared.project_id, recipe, snapshot, base]
    choice_outputs = [recipe_doc, snapshot, base, *[f.group for f in forms]]
    recipe.change(choose_recipe, choice_inputs, choice_outputs, **DB_EVENTS)
    make_snapshot.click(
        snapshot_now,
        [shared.project_id, recipe],
        [launch_status, snapshot],
        concurrency_limit=HEAVY_LIMITS["datasets"],
        concurrency_id="datasets",
        api_name="training_snapshot",
    )
    launch_inputs = {shared.project_id, recipe, snapshot, base, job_name, processes, timeout_min, plot_shown}
    launch_inputs |= {w for f in forms for w in f.widgets}
    follow(
        launch_btn.click(
            launch,
            launch_inputs,
            [launch_status, job_id, *view_outputs],
            api_name="training_launch",
            **DB_EVENTS,
        )
    )
    view_inputs = [shared.project_id, job_id, plot_shown]
    follow(refresh_btn.click(refresh, view_inputs, view_outputs, api_name="training_jobs", **DB_EVENTS))
    follow(timer.tick(poll, [*view_inputs, finished], view_outputs, show_progress="hidden", **DB_EVENTS))
    follow(
        cancel_btn.click(
            cancel, view_inputs, [action_status, *view_outputs], api_name="training_cancel", **DB_EVENTS
        )
    )
    follow(
        resume_btn.click(
            resume,
            view_inputs,
            [action_status, job_id, *view_outputs],
            api_name="training_resume",
            **DB_EVENTS,
        )
    )
    picked = jobs_table.select(pick, None, job_id, **UI_ONLY)
    follow(picked.then(select_job, [job_id, plot_shown], detail_outputs, **DB_EVENTS))
    follow(job_id.submit(select_job, [job_id, plot_shown], detail_outputs, **DB_EVENTS))

    def clear(project_id, shown):
        """Another project was chosen: no job of the previous project stays on screen."""
        if shown is None or shown == project_id:
            return gr.skip()
        return {
            jobs_table: job_frame([]),
            job_id: None,
            shown_project: None,
            timer: gr.Timer(active=False),
            launch_status: "",
            action_status: "",
            **job_view("", None, {}),  # no job selected: no database access
            **ckpt["empty"](),
        }

    def on_project(project_id, recipe_v, snapshot_v, base_v, request: gr.Request):
        """The project changed: reload the choices for an admin (others never see this tab)."""
        if str(signed_in(services, request).role) != ADMIN:
            return tuple(gr.skip() for _ in choice_outputs)
        return choose_recipe(project_id, recipe_v, snapshot_v, base_v, request)

    return {
        "open": (choose_recipe, choice_inputs, choice_outputs),
        # Wired to the project dropdown itself: its value is the new project id.
        "on_project": (on_project, [shared.project_select, recipe, snapshot, base], choice_outputs),
        "refresh": (refresh, view_inputs, view_outputs),
        "clear": (
            clear,
            [shared.project_select, shown_project],
            [
                jobs_table,
                job_id,
                shown_project,
                timer,
                launch_status,
                action_status,
                *detail_outputs,
                *ckpt["outputs"],
            ],
        ),
        "timer": timer,
        "follow": follow,
    }


def wire(shared: Shared, tab: gr.Tab, parts: dict) -> None:
    """Opening the tab loads its choices and jobs and starts polling (only while a job is live);
    opening another tab stops the polling; another project clears what was shown."""
    tab.select(*parts["open"], **DB_EVENTS)
    parts["follow"](tab.select(*parts["refresh"], **DB_EVENTS))
    for other, _tab_id, _roles in shared.tabs:
        if other is not tab:
            other.select(lambda: gr.Timer(active=False), None, parts["timer"], **UI_ONLY)
    shared.project_select.change(*parts["clear"], **UI_ONLY)
    # The choices depend on the project: reload them (the form keeps what was typed).
    shared.project_select.change(*parts["on_project"], **DB_EVENTS)
