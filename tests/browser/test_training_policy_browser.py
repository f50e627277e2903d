"""Issue 7 in the browser, the policy half: an admin launches a tiny DPO job from the Training tab on a
preferences snapshot, watches it run to 100 %, and finds the policy checkpoint registered under its
base model with the snapshot's hash; the checkpoint's `final/` loads with plain transformers.

As in test_training_browser.py, the studio's own worker runs `python -m trainers dpo` on the session's
tiny Llama (the studio's default model, so a registered base checkpoint), each step slowed a little by
the test-only STUDIO_FAULT_STEP_SLEEP_S so a running state with an ETA is seen on any machine. The
database is only read, to check.
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

from storage.models import Checkpoint, DatasetSnapshot, Job

pytestmark = pytest.mark.browser

STEPS = 6
STEP_SLEEP_S = 1.0
"""≥ 6 s of running steps: the tab's 2 s poll shows a running state with an ETA at least once."""
LR = 1e-3
"""Large enough that the trained weights differ visibly from the base."""


@pytest.fixture
def slow_studio(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("STUDIO_FAULT_STEP_SLEEP_S", str(STEP_SLEEP_S))
    server = Studio(tmp_path, tiny_model)
    yield server
    server.stop()


def fill_dpo_form(page, name: str) -> None:
    form = "train-dpo"
    set_number(page, f"{form}-max_steps", STEPS)
    set_number(page, f"{form}-batch_size", 2)
    set_number(page, f"{form}-eval_fraction", 0)
    set_number(page, f"{form}-max_length", 64)
    set_number(page, f"{form}-optim-lr", LR)
    check(page, f"{form}-cpu")
    name_job(page, name)


def test_dpo_job_from_the_training_tab(slow_studio, page, login, tmp_path, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    studio = slow_studio
    login(page, studio)
    create_project_with_preferences(page, tmp_path, name="DPO run")

    # 1. The DPO recipe, a preferences snapshot made from the imported pairs, the tiny base model.
    open_tab(page, "Training")
    choose(page, "train-recipe", "dpo")
    expect(page.locator("#train-recipe-doc")).to_contain_text("DPO")
    expect(page.locator("#train-form-dpo").first).to_be_visible()
    page.locator("#train-make-snapshot").click()
    expect(page.locator("#train-launch-status")).to_contain_text(
        re.compile(rf"Made snapshot #\d+ \(preferences, {PAIRS} row\(s\)"), timeout=ACTION_MS
    )
    expect(page.locator("#train-snapshot input")).to_have_value(re.compile(rf"preferences · {PAIRS} rows"))
    choose(page, "train-base", "tiny-llama (base)")
    fill_dpo_form(page, "tiny dpo")

    # 2. Launch and watch: running with an ETA, then 100 % with the checkpoint registered.
    page.locator("#train-launch").click()
    expect(page.locator("#train-launch-status")).to_contain_text(
        re.compile(r"Launched job #1 \(dpo\)"), timeout=ACTION_MS
    )
    expect(progress_text(page)).to_contain_text(
        re.compile(rf"running · \d+ % · step [1-9]\d* / {STEPS} · ETA "), timeout=JOB_S
    )
    expect(progress_text(page)).to_contain_text(f"succeeded · 100 % · step {STEPS} / {STEPS}", timeout=JOB_S)
    expect(page.locator("#train-job-state")).to_contain_text("Job #1 · dpo · succeeded · tiny dpo")
    expect(page.locator("#train-result")).to_contain_text(
        re.compile(r"Checkpoint #\d+ registered: tiny dpo · policy · status ready")
    )
    expect(page.locator("#train-plot-loss")).to_contain_text("train/loss")
    expect(page.locator("#train-plot-accuracy")).to_contain_text("train/rewards/accuracy")
    expect(page.locator("#train-config")).to_contain_text(f'"max_steps": {STEPS}')

    db = read_db(studio)
    try:
        with db.read() as s:
            job = s.get(Job, 1)
            out = s.get(Checkpoint, job.output_checkpoint_id)
            base = s.get(Checkpoint, job.base_checkpoint_id)
            snapshot = s.get(DatasetSnapshot, job.snapshot_id)
    finally:
        db.dispose()
    assert str(job.state) == "succeeded" and job.step == STEPS and job.total_steps == STEPS
    assert base.path == str(tiny_model) and str(base.kind) == "policy"
    assert str(out.kind) == "policy" and str(out.status) == "ready" and out.recipe == "dpo"
    assert out.parent_id == base.id and out.snapshot_id == snapshot.id
    assert str(snapshot.kind) == "preferences" and len(snapshot.sha256) == 64

    # 3. Provenance and the registry: the snapshot's hash, the policy under its base in the tree.
    expect(page.locator("#train-provenance")).to_contain_text(
        f"snapshot #{snapshot.id} (sha256 {snapshot.sha256})"
    )
    expect(page.locator("#train-provenance")).to_contain_text(f"base checkpoint #{base.id}")
    expect(page.locator("#train-jobs")).to_contain_text(snapshot.sha256[:12])
    lineage = page.locator("#ckpt-lineage")
    expect(lineage).to_contain_text(f"#{base.id} tiny-llama (base) · policy")
    expect(lineage).to_contain_text(f"└─ #{out.id} tiny dpo · policy · dpo · job #1")
    row = page.locator("#ckpt-table").get_by_role("row").filter(has_text="tiny dpo")
    expect(row).to_contain_text(snapshot.sha256[:12])
    expect(row).to_contain_text(f"#{base.id}")

    # 4. The new policy is offered as a base for the next policy run; the import's weightless
    #    stand-in checkpoint ("imported:prefs.jsonl", in the registry) is not.
    expect(lineage).to_contain_text("imported:prefs.jsonl · policy · imported")
    choose(page, "train-recipe", "reward_model")
    choose(page, "train-recipe", "dpo")
    page.locator("#train-base input").click()
    expect(page.get_by_role("option", name=re.compile(rf"#{out.id} tiny dpo"))).to_be_visible()
    expect(page.get_by_role("option", name=re.compile("imported:"))).to_have_count(0)
    page.get_by_role("option", name=re.compile(rf"#{out.id} tiny dpo")).click()
    expect(page.locator("#train-base input")).to_have_value(f"#{out.id} tiny dpo")

    # 5. final/ loads with plain transformers, runs, and is not the base's weights.
    assert Path(out.path) == Path(job.output_dir) / "final"
    tokenizer = AutoTokenizer.from_pretrained(out.path)
    trained = AutoModelForCausalLM.from_pretrained(out.path).eval()
    start = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = tokenizer("Question 1: say something kind.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = trained(ids).logits
    assert logits.shape == (1, ids.shape[1], trained.config.vocab_size)
    assert torch.isfinite(logits).all()
    changed = [
        name for name, p in trained.state_dict().items() if not torch.equal(p, start.state_dict()[name])
    ]
    assert changed, "the DPO job left every weight as it was"
