"""The Training tab's pure formatting: progress bar, ETA, job rows, metric plots, base choices, lineage."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

from studio.tabs.checkpoints import UNLOADABLE, checkpoint_frame, lineage_lines, metrics_text, status_text
from studio.tabs.training_view import (
    DEFAULT_BASE,
    base_choices,
    fmt_eta,
    job_frame,
    metric_frames,
    plot_frame,
    plot_of,
    plot_plan,
    progress_html,
    state_line,
)


def test_eta_and_progress_bar_are_numbers_only():
    assert [fmt_eta(x) for x in (None, -1, 0, 59.4, 65, 3600, 3725)] == [
        "–",
        "–",
        "0 s",
        "59 s",
        "1 min 05 s",
        "1 h 00 min",
        "1 h 02 min",
    ]
    bar = progress_html("running", 0.5, 10, 20, 65)
    assert "value='0.5000'" in bar and "running · 50 % · step 10 / 20 · ETA 1 min 05 s" in bar
    done = progress_html("succeeded", 1.0, 20, 20, None)
    assert "succeeded · 100 % · step 20 / 20</div>" in done  # no ETA once finished
    assert "step 0 / ?" in progress_html("queued", None, 0, None, None)
    assert "value='1.0000'" in progress_html("running", 7.0, 1, 1, 0)  # clamped
    assert "&lt;b&gt;" in progress_html("<b>", 0, 0, 1, 0)  # a state is escaped, whatever it is


def job(**kw):
    base = dict(
        id=1,
        name="",
        recipe="reward_model",
        state="running",
        failure_code=None,
        failure_message=None,
        step=3,
        total_steps=12,
        progress=0.25,
        snapshot_id=7,
        parent_job_id=None,
        output_checkpoint_id=None,
    )
    return NS(**{**base, **kw})


def test_job_rows_show_provenance():
    frame = job_frame(
        [job(), job(id=2, state="failed", failure_code="nan_loss", parent_job_id=1, output_checkpoint_id=5)],
        {7: "ab" * 32},
    )
    assert frame.values.tolist() == [
        [1, "", "reward_model", "running", "25 %", "3 / 12", "abababababab", "–", "–"],
        [2, "", "reward_model", "failed (nan_loss)", "25 %", "3 / 12", "abababababab", "#1", "#5"],
    ]


def test_state_line_makes_the_failure_message_inert():
    line = state_line(
        job(state="failed", failure_code="bad_input", failure_message="<img src=x onerror=alert(1)>")
    )
    assert "<img" not in line and "&#60;img" in line
    assert line.startswith("**Job #1** · reward&#95;model · **failed**")


def test_metrics_go_to_their_plots():
    assert [
        plot_of(n)
        for n in (
            "train/loss",
            "eval/loss",
            "train/kl",
            "eval/accuracy",
            "train/rewards/accuracies",
            "train/rewards/chosen",
            "eval/margin",
            "train/chosen",
            "train/rewards/margin",
            "train/logps/chosen",
            "train/lr",
            "run/total_steps",
            "eval/ece",
        )
    ] == [
        "loss",
        "loss",
        "kl",
        "accuracy",
        "accuracy",
        "reward",
        "reward",
        "reward",
        "reward",
        None,
        None,
        None,
        None,
    ]
    frames = metric_frames(
        {
            "train/loss": [(1, 0.7), (2, float("nan")), (3, 0.5)],
            "train/lr": [(1, 1e-4)],
            "eval/accuracy": [(3, 0.75)],
        }
    )
    assert frames["loss"].values.tolist() == [[1, 0.7, "train/loss"], [3, 0.5, "train/loss"]]
    assert frames["accuracy"].values.tolist() == [[3, 0.75, "eval/accuracy"]]
    assert frames["kl"].empty and frames["reward"].empty


def test_base_choices_add_the_default_encoder_only_where_allowed():
    models = [
        NS(id=1, name="tiny", kind="policy", status="ready"),
        NS(id=2, name="rm", kind="reward", status="ready"),
        NS(id=3, name="broken", kind="policy", status="unloadable"),
    ]
    assert base_choices("policy", models) == [("#1 tiny", 1)]
    choices = base_choices("encoder_or_policy", models)
    assert [v for _, v in choices] == [DEFAULT_BASE, 1] and choices[0][0].startswith("minilm")


def ckpt(id, parent=None, status="ready", **kw):
    base = dict(
        id=id,
        name=f"c{id}",
        kind="reward",
        status=status,
        parent_id=parent,
        recipe="reward_model",
        job_id=None,
        snapshot_sha256=None,
        metrics=None,
    )
    return NS(**{**base, **kw})


def test_lineage_tree():
    infos = [
        ckpt(1, kind="policy", recipe="base"),
        ckpt(4, parent=1, job_id=2),
        ckpt(6, parent=4, job_id=3, status="unloadable"),
        ckpt(5, parent=1),
        ckpt(9, parent=99),  # its parent is not listed: a root
    ]
    assert lineage_lines(infos) == [
        "#1 c1 · policy",
        "├─ #4 c4 · reward · reward_model · job #2",
        "│  └─ #6 c6 · reward · reward_model · job #3 · UNLOADABLE",
        "└─ #5 c5 · reward · reward_model",
        "#9 c9 · reward · reward_model",
    ]
    # A cycle in bad data: neither is a root, nothing loops.
    assert lineage_lines([ckpt(1, parent=2), ckpt(2, parent=1)]) == []


def test_checkpoint_rows():
    frame = checkpoint_frame(
        [
            ckpt(
                4,
                parent=1,
                job_id=2,
                snapshot_sha256="f" * 64,
                metrics={"eval/accuracy": 0.8125, "note": "x"},
            )
        ]
    )
    assert frame.values.tolist() == [
        [4, "c4", "reward", "ready", "reward_model", "#1", "#2", "ffffffffffff", "eval/accuracy 0.812"]
    ]
    assert status_text("unloadable") == UNLOADABLE
    assert metrics_text({"a": 1, "b": 2.0, "c": 3, "d": 4, "e": 5}, limit=2) == "a 1 · b 2"


def test_a_plot_whose_series_change_is_cleared_then_filled():
    loss = plot_frame([(1, 0.7, "train/loss")])
    both = plot_frame([(1, 0.7, "train/loss"), (1, 0.6, "eval/loss")])
    empty = plot_frame()
    # First data: cleared now, drawn by the follow-up.
    now, later, shown = plot_plan({"loss": loss, "kl": empty}, {})
    assert now == {"loss": None, "kl": None} and list(later) == ["loss"] and later["loss"] is loss
    assert shown == {"loss": ("train/loss",), "kl": ()}
    # The same series again: drawn at once.
    now, later, shown = plot_plan({"loss": loss, "kl": empty}, shown)
    assert now["loss"] is loss and later == {} and now["kl"] is None
    # A new series appears: cleared again, then drawn with both.
    now, later, shown = plot_plan({"loss": both}, shown)
    assert now == {"loss": None} and later["loss"] is both
    assert shown == {"loss": ("eval/loss", "train/loss")}


def _training_events(db, tmp_path):
    import gradio as gr

    from studio.services import Services
    from studio.settings import Settings
    from studio.tabs import training
    from studio.tabs.common import Shared

    services = Services.build(Settings(data_dir=tmp_path / "data", database_url="sqlite://"), db)
    with gr.Blocks() as demo:
        shared = Shared(services=services, project_id=gr.State(None), project_select=gr.Dropdown())
        training.build(shared)
    return {f.api_name: f.fn for f in demo.fns.values() if f.api_name}, services


def test_every_training_event_refuses_an_annotator(db, tmp_path):
    """Hiding the tab is no protection: each handler checks the role before touching anything."""
    import gradio as gr
    from annotation_service_helpers import add_users, seed_project
    from sqlmodel import func, select

    from storage.models import DatasetSnapshot, Job

    events, _ = _training_events(db, tmp_path)
    add_users(db, ["ann"])
    pid, _, _ = seed_project(db, comparisons=1)
    ann = NS(username="ann")
    calls = {
        "training_snapshot": (pid, "reward_model"),
        "training_launch": ({},),
        "training_jobs": (pid, 1, {}),
        "training_cancel": (pid, 1, {}),
        "training_resume": (pid, 1, {}),
        "checkpoints_list": (pid,),
        "checkpoints_verify": (pid, 1),
    }
    assert set(calls) <= set(events)
    for name, args in calls.items():
        with pytest.raises(gr.Error, match="needs the admin role"):
            events[name](*args, ann)
    with db.read() as s:
        assert s.exec(select(func.count()).select_from(Job)).one() == 0
        assert s.exec(select(func.count()).select_from(DatasetSnapshot)).one() == 0


def test_verify_says_a_base_model_has_no_manifest_and_a_missing_job_is_no_error(db, tmp_path):
    from annotation_service_helpers import add_users, seed_project

    from storage.models import Role

    events, services = _training_events(db, tmp_path)
    add_users(db, ["root"], role=Role.admin)
    pid, _, _ = seed_project(db)
    base = services.generation.ensure_default_model()
    root = NS(username="root")
    out = events["checkpoints_verify"](pid, base.checkpoint_id, root)
    assert any("is a base model reference: it has no manifest" in str(v) for v in out.values())
    assert any("#1" in str(v) and "policy" in str(v) for v in out.values())  # the lineage
    out = events["training_jobs"](pid, 99, {}, root)  # a mistyped job id: said, not raised
    assert "There is no job #99." in [v for v in out.values() if isinstance(v, str)]


def test_long_series_are_thinned_keeping_both_ends():
    from studio.tabs.training_view import thin

    points = [(i, float(i)) for i in range(1, 11)]
    assert thin(points, 20) == points
    # 10 points to 4: indices round(k * 9 / 3) = 0, 3, 6, 9.
    assert thin(points, 4) == [(1, 1.0), (4, 4.0), (7, 7.0), (10, 10.0)]
    many = {"train/loss": [(i, 1.0) for i in range(10_000)]}
    frame = metric_frames(many)["loss"]
    assert len(frame) == 400 and frame["step"].iloc[0] == 0 and frame["step"].iloc[-1] == 9_999
