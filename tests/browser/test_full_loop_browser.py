"""Issue 3's acceptance criterion, in the browser only: a new user sets up the studio, creates a project,
imports prompts, generates pairs, adds two annotators who both annotate pairwise and segments with
overlap, sees agreement, and exports a snapshot that TRL 1.16's DPOTrainer loads and trains on.

The studio starts on an empty data folder, so the first admin is made on the /setup page with the
one-time token from `<data_dir>/setup_token` (what the server prints on its first start). Everything
after that is clicks and typing in headless Chromium; the database is only read, to check.

The annotators' choices are deterministic whatever side a response is shown on: both prefer the
shorter response (ties in length: the smaller text), except on the last prompt, where both vote tie.
So they agree on every item, and Krippendorff's α over the 4 items is exactly 1.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import pytest
from annotation_helpers import drag_select
from conftest import Studio
from playwright.sync_api import expect
from sqlmodel import select

from storage.db import Database
from storage.models import Comparison, DatasetSnapshot, PairwiseVote, SpanSet
from studio.settings import Settings

pytestmark = pytest.mark.browser

PROMPTS = [
    "Prompt 0: Write one sentence about the weather.",
    "Prompt 1: Explain why the sky is blue in simple words.",
    "Prompt 2: Write a good review of a pizza place.",
    "Prompt 3: Translate hello into French.",
]
TIE_PROMPT = 3
ANNOTATORS = [("ann", "ann-password-1"), ("bob", "bob-password-2")]
SEED = 7
MAX_NEW_TOKENS = 32
MIN_VIEW_WAIT_MS = 700  # the Pairwise tab ignores a vote sooner than 0.5 s after its item appeared
WORD = re.compile(r"[A-Za-z]{3,8}")


class FirstRunStudio(Studio):
    """A studio on an empty data folder: no user exists, so the server offers /setup with a token."""

    def add_user(self, username: str, password: str, role: str = "annotator") -> None:
        if role == "admin" and not (self.data_dir / "studio.db").exists():
            return  # the first admin is made in the browser (Studio.__init__ asks for one here)
        super().add_user(username, password, role)


@pytest.fixture
def fresh_studio(tmp_path, tiny_model):
    server = FirstRunStudio(tmp_path, tiny_model)
    yield server
    server.stop()


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def read_db(studio: Studio):
    return Database.from_url(Settings(data_dir=studio.data_dir).database_url)


# --------------------------------------------------------------------------- the admin's steps


def first_run_setup(page, studio: Studio) -> None:
    page.goto(studio.url)
    expect(page).to_have_url(re.compile(r"/setup$"))  # no user yet: the login page sends us to setup
    token = (studio.data_dir / "setup_token").read_text(encoding="utf-8").strip()
    page.goto(f"{studio.url}/setup?token={token}")
    page.locator("#username").fill(studio.admin)
    page.locator("#password").fill(studio.admin_password)
    page.locator("#password2").fill(studio.admin_password)
    page.locator("#setup-button").click()
    expect(page.locator("#session-line")).to_contain_text(
        f"Signed in as {studio.admin} (admin)", timeout=30_000
    )
    assert not (studio.data_dir / "setup_token").exists()  # one-time


def create_project(page) -> None:
    page.get_by_text("New project").click()
    page.locator("#project-name textarea, #project-name input").first.fill("Full loop")
    page.locator("#project-guidelines textarea").fill("Prefer the shorter answer.")
    page.locator("#project-labels textarea, #project-labels input").first.fill("off topic, good detail")
    page.locator("#create-project").click()
    expect(page.locator("#projects-status")).to_contain_text("Created project Full loop")


def set_overlap(page) -> None:
    """Every item goes to 2 annotators (Team tab), and the tab shows the stored settings."""
    open_tab(page, "Team")
    expect(page.locator("#team-updated")).to_contain_text("Updated")  # the settings were loaded
    page.get_by_text("Overlap: how many items").click()
    expect(page.locator("#team-overlap-current")).to_contain_text("one annotator per item")
    share = page.locator("#team-overlap-fraction input[type=number]")
    share.fill("1")
    share.press("Enter")
    page.locator("#team-overlap-k input").fill("2")
    page.locator("#team-overlap-save").click()
    expect(page.locator("#team-overlap-status")).to_contain_text("Saved: 100% of items get 2 annotators")
    expect(page.locator("#team-overlap-current")).to_contain_text("100% of the items get 2 annotators")


def import_prompts(page, tmp_path: Path) -> None:
    file = tmp_path / "prompts.jsonl"
    file.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    open_tab(page, "Import")
    page.locator("#import-file input[type=file]").set_input_files(str(file))
    page.locator("#import-button").click()
    expect(page.locator("#import-result")).to_contain_text(f"Imported {len(PROMPTS)} new prompt(s)")


def generate_pairs(page) -> None:
    open_tab(page, "Generate")
    expect(page.locator("#gen-model input")).to_have_value(re.compile("^tiny-llama"))  # the default model
    tokens = page.locator("#gen-max-new input[type=number]")
    tokens.fill(str(MAX_NEW_TOKENS))
    tokens.press("Enter")
    page.locator("#gen-seed input").fill(str(SEED))
    page.locator("#generate-button").click()
    expect(page.locator("#generate-result")).to_contain_text(
        f"Generated {2 * len(PROMPTS)} response(s) for {len(PROMPTS)} prompt(s)", timeout=120_000
    )
    expect(page.locator("#generate-result")).to_contain_text(f"{len(PROMPTS)} candidate pair(s) created")


def add_annotators(page) -> None:
    open_tab(page, "Users")
    expect(page.locator("#users-table")).to_contain_text("admin")
    for name, password in ANNOTATORS:
        page.locator("#users-new-name input, #users-new-name textarea").first.fill(name)
        page.locator("#users-new-password input").fill(password)
        page.locator("#users-add-button").click()
        expect(page.locator("#users-status")).to_contain_text(f"Added {name} as annotator")
    expect(page.locator("#users-table")).to_contain_text("bob")


# --------------------------------------------------------------------------- an annotator's steps


def vote_on_every_pair(page) -> int:
    """Vote on each item the queue hands out until nothing is left; returns how many votes."""
    prompt = page.locator("#pair-prompt textarea")
    status = page.locator("#vote-status")
    seen: list[str] = []
    while True:
        page.wait_for_function(
            """(seen) => {
                const box = document.querySelector('#pair-prompt textarea');
                const status = document.querySelector('#vote-status');
                return (box && box.value.startsWith('Prompt ') && !seen.includes(box.value))
                    || (status && status.textContent.includes('Nothing left for you'));
            }""",
            arg=seen,
            timeout=20_000,
        )
        if "Nothing left for you" in status.text_content():
            return len(seen)
        text = prompt.input_value()
        n = PROMPTS.index(text)
        left = page.locator("#pair-left textarea").input_value()
        right = page.locator("#pair-right textarea").input_value()
        assert left != right
        page.wait_for_timeout(MIN_VIEW_WAIT_MS)
        if n == TIE_PROMPT:
            button = "#vote-tie"
        else:
            button = "#vote-a" if (len(left), left) < (len(right), right) else "#vote-b"
        seen.append(text)
        page.locator(button).click()


def mark_every_response(page) -> int:
    """Mark one span (the first short ASCII word) in each response handed out and submit it.

    Returns how many responses got a span (a response without such a word is submitted empty).
    """
    open_tab(page, "Segments")
    picker = page.locator("#span-picker")
    marked = 0
    for done in range(1, 100):
        page.wait_for_function(
            """() => {
                const text = document.querySelector('#span-picker .sp-text');
                const status = document.querySelector('#seg-status');
                return (text && text.textContent.length > 0)
                    || (status && status.textContent.includes('Nothing left to mark'));
            }""",
            timeout=20_000,
        )
        if "Nothing left to mark" in page.locator("#seg-status").text_content():
            return marked
        expect(page.locator("#seg-prompt textarea")).to_have_value(re.compile(r"^Prompt \d: "))
        text = picker.locator(".sp-text").text_content()
        word = WORD.search(text)
        if word:
            drag_select(page, "#span-picker .sp-text", word.group())
            picker.locator(".sp-mark-bad").click()
            expect(picker.locator(".sp-bad")).to_have_text(word.group())
            marked += 1
        page.locator("#seg-submit").click()
        expect(page.locator("#seg-progress")).to_contain_text(re.compile(rf"(^|\D){done} done"))
    raise AssertionError("the segment queue never ran out")


def annotate_as(browser, studio: Studio, login, name: str, password: str) -> tuple[int, int]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        page.set_default_timeout(20_000)
        login(page, studio, name, password)
        expect(page.locator("#session-line")).to_contain_text(f"Signed in as {name} (annotator)")
        votes = vote_on_every_pair(page)
        expect(page.locator("#pair-progress")).to_contain_text(f"{votes} done · 0 left for you")
        marked = mark_every_response(page)
        expect(page.locator("#seg-progress")).to_contain_text(f"{2 * len(PROMPTS)} done · 0 left for you")
        return votes, marked
    finally:
        context.close()


# --------------------------------------------------------------------------- the test


def test_new_user_full_loop_to_a_trl_ready_snapshot(fresh_studio, page, login, browser, tmp_path, tiny_model):
    studio = fresh_studio
    first_run_setup(page, studio)
    create_project(page)
    set_overlap(page)
    import_prompts(page, tmp_path)
    generate_pairs(page)
    add_annotators(page)

    for name, password in ANNOTATORS:
        votes, marked = annotate_as(browser, studio, login, name, password)
        assert votes == len(PROMPTS)  # overlap: each annotator judges every pair
        assert marked >= 1

    db = read_db(studio)
    try:
        with db.read() as s:
            required = s.exec(select(Comparison.required_votes)).all()
            n_votes = len(s.exec(select(PairwiseVote)).all())
            submitted = [x.submitted for x in s.exec(select(SpanSet)).all()]
    finally:
        db.dispose()
    assert required == [2] * len(PROMPTS) and n_votes == 2 * len(PROMPTS)
    assert submitted == [True] * (2 * 2 * len(PROMPTS))  # 8 responses × 2 annotators

    # The admin sees progress, who did what, and the agreement numbers.
    open_tab(page, "Team")
    page.locator("#team-refresh").click()
    expect(page.locator("#team-progress")).to_contain_text(
        f"Pairwise: {2 * len(PROMPTS)} of {2 * len(PROMPTS)} judgements (100%)"
    )
    quality = page.locator("#team-quality")
    expect(quality).to_contain_text(f"Krippendorff α over {len(PROMPTS)} item(s) with 2+ votes")
    expect(quality).to_contain_text(re.compile(r"nominal 1\.00 · ordinal \d\.\d\d"))  # α shown, not "–"
    expect(quality).to_contain_text(re.compile(r"IoU \d\.\d\d · F1 \d\.\d\d"))
    for name, _ in ANNOTATORS:
        expect(page.locator("#team-activity")).to_contain_text(name)
        expect(page.locator("#team-annotators")).to_contain_text(name)

    # Gold marking from the list of comparisons: click a row, choose the outcome, save.
    page.get_by_text("Gold items").click()
    table = page.locator("#team-comparisons")
    expect(table).to_contain_text("Prompt 0: Write one sentence")
    expect(table).to_contain_text("2 / 2")
    table.get_by_text("Prompt 2: Write a good review").click()
    gold_id = page.locator("#team-gold-id input")
    expect(gold_id).not_to_have_value("")
    page.locator("#team-gold-outcome").get_by_text("Tie", exact=True).click()
    page.locator("#team-gold-save").click()
    expect(page.locator("#team-gold-status")).to_contain_text(f"Comparison {gold_id.input_value()} is gold")
    expect(table).to_contain_text("Tie")

    # Export a preferences snapshot and download it.
    open_tab(page, "Datasets")
    decisive = len(PROMPTS) - 1
    page.locator("#ds-export").click()
    result = page.locator("#ds-export-result")
    expect(result).to_contain_text("Exported 1 snapshot(s)", timeout=30_000)
    expect(result).to_contain_text(f"preferences (jsonl): {decisive} row(s)")
    with page.expect_download() as info:
        page.locator("#ds-export-files a").first.click()
    downloaded = Path(info.value.path())

    db = read_db(studio)
    try:
        with db.read() as s:
            [snapshot] = s.exec(select(DatasetSnapshot)).all()
    finally:
        db.dispose()
    stored = Path(snapshot.path)
    assert stored.is_relative_to(studio.data_dir) and stored.exists()
    assert hashlib.sha256(downloaded.read_bytes()).hexdigest() == snapshot.sha256
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == snapshot.sha256
    train_dpo_one_step(stored, tiny_model, tmp_path, decisive)


def train_dpo_one_step(path: Path, model_dir: Path, tmp_path: Path, rows: int) -> None:
    """TRL 1.16's DPOTrainer loads the snapshot as a user would and takes one step on CPU."""
    pytest.importorskip("trl")
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == rows
    assert {row["prompt"] for row in ds} <= set(PROMPTS)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = DPOConfig(
        output_dir=str(tmp_path / "dpo"),
        max_steps=1,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        max_length=128,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    assert any(not before[n].equal(p.detach()) for n, p in trainer.model.named_parameters())
