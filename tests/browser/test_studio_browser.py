"""What a person does in the browser: create a project, import a file, browse; demo + generate."""

from __future__ import annotations

import json
import re

import pytest
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

XSS = '<img src=x onerror="window.__xss=1"> ${7*6} <b>bold</b>'
NAME = 'Team <img src=x onerror="window.__xss=2;alert(1)"> ![t](http://127.0.0.1:9/track.png) **x**'


def _open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def test_import_file_and_see_prompts_listed(studio, page, login, tmp_path):
    rows = [
        {"id": "p1", "prompt": "Write a haiku about rain.", "tags": ["poem"]},
        {"id": "p2", "messages": [{"role": "user", "content": "Explain tides briefly."}]},
        {"id": "p3", "prompt": XSS},
    ]
    file = tmp_path / "my prompts.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "prompt": "ok"}\n{"id": "y", "prompt": 42}\n')

    login(page, studio)
    page.get_by_text("New project").click()
    page.locator("#project-name textarea, #project-name input").first.fill(NAME)
    page.locator("#create-project").click()
    # The typed name shows as typed: no element made from it, no image fetched, no script run.
    expect(page.locator("#projects-status")).to_contain_text("Created project Team <img src=x")
    expect(page.locator("#projects-status")).to_contain_text("![t](http://127.0.0.1:9/track.png) **x**")
    assert page.locator("#projects-status img").count() == 0
    page.locator("#create-project").click()  # the same name again: an error quoting it, also inert
    expect(page.get_by_text("already exists").first).to_be_visible()

    _open_tab(page, "Import")
    # A strict import of a file with a bad row is refused with its line and field.
    page.locator("#import-file input[type=file]").set_input_files(str(bad))
    page.locator("#import-button").click()
    expect(page.locator("#import-result")).to_contain_text("Nothing imported")
    expect(page.locator("#import-problems")).to_contain_text("wrong_type")

    page.locator("#import-file input[type=file]").set_input_files(str(file))
    page.locator("#import-button").click()
    expect(page.locator("#import-result")).to_contain_text("Imported 3 new prompt(s)")

    _open_tab(page, "Browse")
    table = page.locator("#prompt-table")
    expect(table).to_contain_text("Write a haiku about rain.")
    expect(table).to_contain_text("user: Explain tides briefly.")
    # Imported text is inert: the payload shows as text and runs nothing.
    expect(table).to_contain_text("<img src=x")
    assert page.evaluate("window.__xss") is None
    assert page.locator("#prompt-table img").count() == 0
    assert not [u for u in page.requested if "track.png" in u]

    page.locator("#browse-search textarea, #browse-search input").first.fill("haiku")
    page.keyboard.press("Enter")
    expect(page.locator("#browse-info")).to_contain_text("1 prompt(s)")


def test_demo_project_generate_and_browse_responses(studio, page, login):
    login(page, studio)
    demo_button = page.locator("#create-demo")
    expect(demo_button).to_be_visible()
    demo_button.click()
    expect(page.locator("#projects-status")).to_contain_text("Imported 40 new prompt(s)")
    expect(page.locator("#demo-offer")).to_be_hidden()
    page.get_by_text("Guidelines of the current project").click()
    expect(page.locator("#current-guidelines textarea")).to_have_value(re.compile("Prefer the response"))
    page.locator("#current-guidelines textarea").fill("Prefer short, correct answers.")
    page.locator("#save-guidelines").click()
    expect(page.locator("#guidelines-version")).to_contain_text("Saved guidelines version 2")

    _open_tab(page, "Generate")
    page.locator("#gen-limit input").fill("2")
    page.locator("#gen-max-new input[type=number]").fill("8")
    page.locator("#gen-max-new input[type=number]").press("Enter")
    page.locator("#generate-button").click()
    expect(page.locator("#generate-result")).to_contain_text(
        "Generated 4 response(s) for 2 prompt(s)", timeout=60_000
    )

    _open_tab(page, "Browse")
    page.locator("#prompt-table").get_by_text("review-01").click()
    expect(page.locator("#prompt-detail textarea")).to_have_value(
        "Write a two-sentence positive review of a small Italian restaurant with great pasta."
    )
    expect(page.locator("#response-table")).to_contain_text("max=8 seed=")
