"""Issue 8's loop, closed in the browser: an admin trains a tiny DPO policy from the Training tab, the new
checkpoint enters the arena by itself against its parent (auto-arena), a rater votes through three
battles, and the leaderboard shows both checkpoints with confidence intervals.

The studio's own worker runs `python -m trainers dpo` for one step on the session's tiny Llama (the
studio's default model, a registered base checkpoint); battles are generated on demand in the studio
process. The database is only read, to check.
"""

from __future__ import annotations

import re

import pytest
from argon2 import PasswordHasher
from playwright.sync_api import expect
from sqlmodel import select
from training_helpers import (
    ACTION_MS,
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

from storage.db import Database
from storage.models import ArenaModel, Checkpoint, Comparison, ComparisonPurpose, Generation, PairwiseVote
from studio.services import Services
from studio.settings import Settings

pytestmark = pytest.mark.browser

RATER, PASSWORD = "rudi", "arena-loop-rater-password"
JOB = "ocelotpolicy"
"""The job's (and so the new checkpoint's) name: a word a tiny random model cannot write."""
BASE = "tiny-llama (base)"
STEPS = 1
JOB_MS = 180_000
"""Child start-up (torch, transformers) and one DPO step on a busy machine."""
BATTLE_MS = 60_000
VOTES = ["#arena-vote-a", "#arena-vote-b", "#arena-vote-tie", "#arena-vote-both-bad"]


def add_rater(studio) -> None:
    settings = Settings(data_dir=studio.data_dir)
    db = Database.from_url(settings.database_url)
    try:
        services = Services.build(settings, db)
        services.users.hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
        services.users.add_user(studio.admin, RATER, "rater", PASSWORD)
    finally:
        db.dispose()


def train_policy(page, tmp_path) -> None:
    """Training tab: a preferences snapshot of the imported pairs, one DPO step on the tiny base model."""
    open_tab(page, "Training")
    choose(page, "train-recipe", "dpo")
    page.locator("#train-make-snapshot").click()
    expect(page.locator("#train-launch-status")).to_contain_text(
        re.compile(rf"Made snapshot #\d+ \(preferences, {PAIRS} row\(s\)"), timeout=ACTION_MS
    )
    choose(page, "train-base", BASE)
    form = "train-dpo"
    set_number(page, f"{form}-max_steps", STEPS)
    set_number(page, f"{form}-batch_size", 2)
    set_number(page, f"{form}-eval_fraction", 0)
    set_number(page, f"{form}-max_length", 64)
    check(page, f"{form}-cpu")
    name_job(page, JOB)
    page.locator("#train-launch").click()
    expect(page.locator("#train-launch-status")).to_contain_text("Launched job #1 (dpo)", timeout=ACTION_MS)
    expect(progress_text(page)).to_contain_text(f"succeeded · 100 % · step {STEPS} / {STEPS}", timeout=JOB_MS)
    expect(page.locator("#train-result")).to_contain_text(re.compile(rf"Checkpoint #\d+ registered: {JOB}"))


def vote(page, how: str, button: str) -> None:
    """Start the next battle, wait for both sides, vote with a click or a key; one vote locks all four."""
    if how == "click":
        page.locator("#arena-new").click()
    else:
        page.keyboard.press("n")
    for b in VOTES:
        expect(page.locator(b)).to_be_enabled(timeout=BATTLE_MS)
    assert JOB not in page.locator("body").inner_text()  # blind until the vote
    if how == "click":
        page.locator(button).click()
    else:
        page.keyboard.press(str(VOTES.index(button) + 1))
    for b in VOTES:
        expect(page.locator(b)).to_be_disabled()
    expect(page.locator("#arena-reveal")).to_contain_text(JOB)
    expect(page.locator("#arena-reveal")).to_contain_text(BASE)


def test_trained_policy_meets_its_parent_in_the_arena(studio, browser, login, tmp_path):
    add_rater(studio)
    admin_ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    rater_ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        # 1. The admin imports preference pairs and trains a policy on them in the studio.
        admin = admin_ctx.new_page()
        admin.set_default_timeout(30_000)
        login(admin, studio)
        create_project_with_preferences(admin, tmp_path, name="Loop arena")
        train_policy(admin, tmp_path)

        # 2. Auto-arena: the new checkpoint plays, against its parent (the anchor), without anyone adding it.
        open_tab(admin, "Arena")
        admin.get_by_text("Arena admin").click()
        rows = admin.locator("#arena-models").get_by_role("row")
        expect(rows.filter(has_text=JOB)).to_contain_text("auto")
        expect(rows.filter(has_text=BASE)).to_contain_text("anchor")

        # 3. A rater votes through three battles (mouse, then keys).
        page = rater_ctx.new_page()
        page.set_default_timeout(30_000)
        login(page, studio, RATER, PASSWORD)
        expect(page.locator("#project-select input")).to_have_value("Loop arena")
        vote(page, "click", "#arena-vote-a")
        vote(page, "key", "#arena-vote-b")
        vote(page, "key", "#arena-vote-tie")

        # 4. The leaderboard shows both checkpoints with confidence intervals, and the new-vs-parent card.
        open_tab(page, "Leaderboard")
        table = page.locator("#lb-table")
        expect(page.locator("#lb-summary")).to_contain_text("3 vote(s)", timeout=ACTION_MS)  # first fit
        for name in (JOB, BASE):
            row = table.get_by_role("row").filter(has_text=name)
            expect(row).to_contain_text(re.compile(r"\d+ – \d+ \(−\d+ / \+\d+\)"))
        expect(table.get_by_role("row").filter(has_text=BASE)).to_contain_text("anchor")
        expect(page.locator("#lb-pairs")).to_contain_text(
            re.compile(rf"{JOB} vs parent #\d+ {re.escape(BASE)}")
        )
        expect(page.locator("#lb-ratings-plot")).to_contain_text(JOB, timeout=10_000)
        # Beside the board: no reward model trained in this project yet, and the page says so.
        expect(page.locator("#lb-rm-status")).to_contain_text("No reward model in this project yet")
        expect(page.locator("#lb-rm-score")).to_be_hidden()
    finally:
        admin_ctx.close()
        rater_ctx.close()

    db = read_db(studio)
    try:
        with db.read() as s:
            new = s.exec(select(Checkpoint).where(Checkpoint.name == JOB)).one()
            entries = {e.checkpoint_id: e for e in s.exec(select(ArenaModel)).all()}
            battles = s.exec(select(Comparison).where(Comparison.purpose == ComparisonPurpose.arena)).all()
            played = {
                frozenset(
                    (
                        s.get(Generation, b.generation_a_id).checkpoint_id,
                        s.get(Generation, b.generation_b_id).checkpoint_id,
                    )
                )
                for b in battles
            }
            votes = s.exec(
                select(PairwiseVote).where(PairwiseVote.comparison_id.in_([b.id for b in battles]))
            ).all()
    finally:
        db.dispose()
    assert set(entries) == {new.id, new.parent_id}
    assert str(entries[new.id].source) == "auto" and entries[new.parent_id].is_anchor
    assert played == {frozenset((new.id, new.parent_id))}
    assert len(battles) == 3 and len(votes) == 3
