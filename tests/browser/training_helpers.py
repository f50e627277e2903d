"""Shared steps of the Training-tab browser tests: a project with imported preference pairs, form
inputs (numbers, Gradio dropdowns), the progress line, and a read-only handle on the studio's database.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import Studio
from playwright.sync_api import expect

from storage.db import Database
from studio.settings import Settings

PAIRS = 8
"""Preference pairs in the imported file."""
ACTION_MS = 30_000
"""Milliseconds allowed for a click's answer on a busy machine."""
JOB_S = 60_000
"""Milliseconds allowed for one job (child start-up with torch included)."""


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def preference_file(tmp_path: Path, pairs: int = PAIRS) -> Path:
    """`pairs` explicit-prompt rows (prompt/chosen/rejected) as JSONL."""
    file = tmp_path / "prefs.jsonl"
    rows = [
        {
            "prompt": f"Question {i}: say something kind.",
            "chosen": f"A kind answer, number {i}.",
            "rejected": "No.",
        }
        for i in range(pairs)
    ]
    file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return file


def create_project_with_preferences(page, tmp_path: Path, name: str = "RM run", pairs: int = PAIRS) -> None:
    """Projects tab: a new project; Datasets tab: import `pairs` preference pairs into it."""
    page.get_by_text("New project").click()
    page.locator("#project-name textarea, #project-name input").first.fill(name)
    page.locator("#create-project").click()
    expect(page.locator("#projects-status")).to_contain_text(f"Created project {name}")
    open_tab(page, "Datasets")
    page.locator("#ds-import-file input[type=file]").set_input_files(str(preference_file(tmp_path, pairs)))
    page.locator("#ds-import").click()
    expect(page.locator("#ds-import-result")).to_contain_text(f"Imported {pairs} row(s)", timeout=30_000)


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input")
    box.fill(str(value))
    box.press("Tab")


def check(page, elem_id: str) -> None:
    box = page.locator(f"#{elem_id} input[type=checkbox]")
    if not box.is_checked():
        box.check()


def choose(page, elem_id: str, option: str) -> None:
    """Pick an option of a Gradio dropdown by (part of) its label."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=re.compile(re.escape(option))).first.click()
    expect(page.locator(f"#{elem_id} input")).to_have_value(re.compile(re.escape(option)))


def name_job(page, name: str) -> None:
    """Type the job name in the (closed) Run options accordion, and close it again."""
    page.get_by_text("Run options").click()
    page.locator("#train-job-name input, #train-job-name textarea").first.fill(name)
    page.get_by_text("Run options").click()


def progress_text(page):
    return page.locator("#train-progress-text")


def read_db(studio: Studio) -> Database:
    """The studio's database, for checks only (dispose it when done)."""
    return Database.from_url(Settings(data_dir=studio.data_dir).database_url)
