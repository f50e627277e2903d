"""Issue 7 in the browser: an admin launches a tiny reward-model job, cancels it mid-run, resumes it,
watches the resumed job reach 100 %, and finds its checkpoint registered under the base model.

The studio process starts its own job worker (app.main, unless STUDIO_WORKER=0); the jobs run
`python -m trainers reward_model` on the session's tiny Llama, which is the studio's default model
(STUDIO_MODEL) and so a registered base checkpoint. Each step sleeps a little (the test-only
STUDIO_FAULT_STEP_SLEEP_S, inherited by the children) so the cancel lands mid-run on any machine.
The preference data is a small file imported on the Datasets tab; the Training tab's button makes
the snapshot. Everything is clicks and typing; the database is only read, to check, and one
checkpoint file is tampered with on disk to see Verify mark it unloadable.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import Studio
from playwright.sync_api import expect
from training_helpers import (
    ACTION_MS,
    JOB_S,
    PAIRS,
    check,
    choose,
    create_project_with_preferences,
    name_job,
    open_tab,
    progress_text,
    read_db,
    set_number,
)

from storage.models import Checkpoint, Job

pytestmark = pytest.mark.browser

STEPS = 240
STEP_SLEEP_S = 0.05
"""A run takes at least 12 s (plus 10-100 ms of work a step on a busy machine): the cancel (step ≥ 1
seen, one poll, one click) lands well before the end."""


@pytest.fixture
def slow_studio(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("STUDIO_FAULT_STEP_SLEEP_S", str(STEP_SLEEP_S))
    server = Studio(tmp_path, tiny_model)
    yield server
    server.stop()


def fill_form(page, name: str, steps: int) -> None:
    form = "train-reward_model"
    set_number(page, f"{form}-max_steps", steps)
    set_number(page, f"{form}-batch_size", 2)
    set_number(page, f"{form}-eval_fraction", 0)
    set_number(page, f"{form}-max_length", 64)
    check(page, f"{form}-cpu")
    name_job(page, name)


def test_launch_cancel_resume_watch_and_lineage(slow_studio, page, login, tmp_path):
    studio = slow_studio
    login(page, studio)
    create_project_with_preferences(page, tmp_path)

    # 1. Recipe, snapshot made from the current annotations, the tiny base model, a small form.
    open_tab(page, "Training")
    expect(page.locator("#train-recipe input")).to_have_value("reward_model")
    expect(page.locator("#train-recipe-doc")).to_contain_text("reward")
    page.locator("#train-make-snapshot").click()
    expect(page.locator("#train-launch-status")).to_contain_text(
        re.compile(rf"Made snapshot #\d+ \(reward, {PAIRS} row\(s\)"), timeout=ACTION_MS
    )
    expect(page.locator("#train-snapshot input")).to_have_value(re.compile(rf"reward · {PAIRS} rows"))
    # Every recipe's form is pre-built; choosing one shows only its group.
    choose(page, "train-recipe", "dpo")
    expect(page.locator("#train-recipe-doc")).to_contain_text("DPO")
    expect(page.locator("#train-form-dpo").first).to_be_visible()
    expect(page.locator("#train-form-reward_model").first).to_be_hidden()
    choose(page, "train-recipe", "reward_model")
    expect(page.locator("#train-form-reward_model").first).to_be_visible()
    expect(page.locator("#train-form-dpo").first).to_be_hidden()
    expect(page.locator("#train-snapshot input")).to_have_value(re.compile(rf"reward · {PAIRS} rows"))
    choose(page, "train-base", "tiny-llama (base)")
    fill_form(page, "tiny rm", STEPS)

    # 2. Launch; once it has taken steps, cancel it: it checkpoints and stops.
    page.locator("#train-launch").click()
    expect(page.locator("#train-launch-status")).to_contain_text(
        re.compile(r"Launched job #1 \(reward_model\)"), timeout=ACTION_MS
    )
    expect(progress_text(page)).to_contain_text(
        re.compile(rf"running · \d+ % · step [1-9]\d* / {STEPS} · ETA "), timeout=JOB_S
    )
    page.locator("#train-cancel").click()
    expect(page.locator("#train-action-status")).to_contain_text(
        re.compile(r"(Cancel requested for job #1|Job #1 cancelled)"), timeout=ACTION_MS
    )
    expect(page.locator("#train-job-state")).to_contain_text(
        "Job #1 · reward_model · cancelled", timeout=JOB_S
    )

    # 3. Resume: a new job, same folder, from the checkpoint; watch it reach 100 %.
    page.locator("#train-resume").click()
    expect(page.locator("#train-action-status")).to_contain_text(
        "Resumed job #1 as job #2", timeout=ACTION_MS
    )
    expect(progress_text(page)).to_contain_text(f"succeeded · 100 % · step {STEPS} / {STEPS}", timeout=JOB_S)
    expect(page.locator("#train-job-state")).to_contain_text("Job #2 · reward_model · succeeded · tiny rm")
    expect(page.locator("#train-result")).to_contain_text(re.compile(r"Checkpoint #\d+ registered"))
    expect(page.locator("#train-log")).to_contain_text(re.compile(r"resuming from step-\d+"))
    expect(page.locator("#train-config")).to_contain_text(f'"max_steps": {STEPS}')
    expect(page.locator("#train-provenance")).to_contain_text("parent job #1")
    expect(page.locator("#train-provenance")).to_contain_text("sha256")
    expect(page.locator("#train-plot-loss")).to_contain_text("train/loss")  # the plot's legend
    expect(page.locator("#train-plot-accuracy")).to_contain_text("train/accuracy")
    jobs = page.locator("#train-jobs")
    expect(jobs).to_contain_text("succeeded")
    expect(jobs).to_contain_text("cancelled")

    db = read_db(studio)
    try:
        with db.read() as s:
            cancelled, resumed = s.get(Job, 1), s.get(Job, 2)
            out = s.get(Checkpoint, resumed.output_checkpoint_id)
            stopped = s.get(Checkpoint, cancelled.output_checkpoint_id)
            base = s.get(Checkpoint, resumed.base_checkpoint_id)
    finally:
        db.dispose()
    assert str(cancelled.state) == "cancelled" and 0 < cancelled.step < STEPS
    assert resumed.parent_job_id == 1 and resumed.output_dir == cancelled.output_dir
    assert str(resumed.state) == "succeeded" and resumed.step == STEPS
    assert out.parent_id == base.id and str(out.kind) == "reward" and str(out.status) == "ready"

    # 4. The registry: the new checkpoint under its base in the lineage tree; Verify re-hashes it.
    lineage = page.locator("#ckpt-lineage")
    expect(lineage).to_contain_text(f"#{base.id} tiny-llama (base) · policy")
    expect(lineage).to_contain_text(re.compile(rf"└─ #{out.id} .* · reward · reward_model · job #2"))
    expect(page.locator("#ckpt-table")).to_contain_text("ready")
    set_number(page, "ckpt-id", out.id)
    page.locator("#ckpt-verify").click()
    expect(page.locator("#ckpt-verify-status")).to_contain_text(f"Checkpoint #{out.id}", timeout=ACTION_MS)
    expect(page.locator("#ckpt-verify-status")).to_contain_text("matches its manifest")

    # 5. Files changed on disk after registration: Verify marks the checkpoint unloadable, shown in capitals.
    weights = next(Path(stopped.path).glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b"tampered")
    set_number(page, "ckpt-id", stopped.id)
    page.locator("#ckpt-verify").click()
    expect(page.locator("#ckpt-verify-status")).to_contain_text(
        f"Checkpoint #{stopped.id}", timeout=ACTION_MS
    )
    expect(page.locator("#ckpt-verify-status")).to_contain_text("does not match its manifest: UNLOADABLE")
    expect(lineage).to_contain_text(re.compile(rf"#{stopped.id} .* · job #1 · UNLOADABLE"))
    expect(page.locator("#ckpt-table")).to_contain_text("UNLOADABLE")
