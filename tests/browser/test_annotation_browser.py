"""Annotation in a real browser: pairwise votes (mouse, keyboard, double click), span marking with a real
mouse drag, the admin's Team, Browse and Datasets views, all with active content in every prompt and response.

Every prompt and response carries the payloads of reliability.md Part 4 D; after each page load and each
"next item" event the test checks that nothing ran (no window flag, no dialog, no request to the loopback
canary, no element made from the text) and that each button is the element at its own centre, so a
normal (never forced) click reaches it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from annotation_helpers import (
    N_PAIRS,
    PASSWORD,
    Canary,
    Seeded,
    assert_inert,
    assert_unobstructed,
    drag_select,
    seed,
)
from playwright.sync_api import expect
from sqlmodel import select

from storage.models import Assignment, Comparison, PairwiseVote, SpanAnnotation, SpanSet

pytestmark = pytest.mark.browser

VOTE_BUTTONS = ["#vote-a", "#vote-b", "#vote-tie", "#vote-both-bad", "#vote-skip"]
MIN_VIEW_WAIT_MS = 700  # the Pairwise tab ignores a vote sooner than 0.5 s after its item appeared


@pytest.fixture
def canary():
    c = Canary()
    yield c
    c.close()


def _studio(request, tmp_path, canary, **kw) -> Seeded:
    made = seed(tmp_path / "data", canary, **kw)  # the studio fixture uses tmp_path / "data" too
    studio = request.getfixturevalue("studio")
    return Seeded(url=studio.url, data_dir=studio.data_dir, canary=canary, **made)


@pytest.fixture
def seeded(request, tmp_path, canary) -> Seeded:
    return _studio(request, tmp_path, canary)


@pytest.fixture
def seeded_with_votes(request, tmp_path, canary) -> Seeded:
    return _studio(request, tmp_path, canary, overlap_votes=True)


# --------------------------------------------------------------------------- helpers


def open_segments(page, seeded: Seeded) -> None:
    """Open the Segments tab once the page has set itself up (an annotator starts on Pairwise)."""
    expect(page.locator("#pair-prompt textarea")).to_have_value(re.compile(r"^Prompt #"), timeout=20_000)
    page.get_by_role("tab", name="Segments").click()


def votes(seeded: Seeded) -> list[PairwiseVote]:
    db = seeded.db()
    try:
        with db.read() as s:
            return list(s.exec(select(PairwiseVote).order_by(PairwiseVote.id)).all())
    finally:
        db.dispose()


def comparison_of(seeded: Seeded, comparison_id: int) -> Comparison:
    db = seeded.db()
    try:
        with db.read() as s:
            return s.get(Comparison, comparison_id)
    finally:
        db.dispose()


def expected_outcome(seeded: Seeded, vote: PairwiseVote, side: str) -> str:
    """What a click on `side` (left/right) means for the comparison, given what was shown left."""
    comparison = comparison_of(seeded, vote.comparison_id)
    a_left = vote.left_generation_id == comparison.generation_a_id
    return "a" if (side == "left") == a_left else "b"


def next_item(page, seeded: Seeded, seen: list[int]) -> int:
    """Wait for an item not seen before (the queue picks among equals at random) and return its number.

    Every box shows its text exactly as stored, nothing in it is active, and the vote buttons are on top.
    """
    box = page.locator("#pair-prompt textarea")
    page.wait_for_function(
        """(seen) => {
            const el = document.querySelector('#pair-prompt textarea');
            const m = el && el.value.match(/^Prompt #(\\d+):/);
            return m && !seen.includes(Number(m[1]));
        }""",
        arg=seen,
        timeout=20_000,
    )
    n = int(re.match(r"Prompt #(\d+):", box.input_value()).group(1))
    assert box.input_value() == seeded.prompts[n]
    left = page.locator("#pair-left textarea").input_value()
    right = page.locator("#pair-right textarea").input_value()
    assert {left, right} == {seeded.lefts[n], seeded.rights[n]}
    assert_inert(page, seeded)
    assert_unobstructed(page, VOTE_BUTTONS)
    page.wait_for_timeout(MIN_VIEW_WAIT_MS)
    seen.append(n)
    return n


# --------------------------------------------------------------------------- tests


def test_pairwise_vote_by_mouse_keyboard_and_double_click(seeded, page, login):
    login(page, seeded, "ann", PASSWORD)
    seen: list[int] = []
    # An annotator lands on the Pairwise tab and an item is reserved and shown.
    first_item = next_item(page, seeded, seen)
    progress = page.locator("#pair-progress")
    expect(progress).to_contain_text(f"0 done · {N_PAIRS} left for you · project 0/{N_PAIRS}")
    expect(page.locator("#vote-a")).to_have_text("A is better [1]")
    # The guidelines are shown as text, with their version.
    page.locator("#pair-guidelines-box button").first.click()
    expect(page.locator("#pair-guidelines textarea")).to_have_value(re.compile("^Prefer the helpful answer"))
    expect(page.locator("#pair-guidelines-box")).to_contain_text("Guidelines (version 1)")
    assert_inert(page, seeded)

    # 1. A normal mouse click on "A is better" records one vote for the left response and advances.
    page.locator("#vote-a").click()
    item = next_item(page, seeded, seen)
    expect(page.locator("#vote-status")).to_contain_text("Vote recorded.")
    expect(progress).to_contain_text(f"1 done · {N_PAIRS - 1} left for you · project 1/{N_PAIRS}")
    [first] = votes(seeded)
    assert first.comparison_id == seeded.comparison_ids[first_item]
    assert first.idempotency_key.startswith(f"vote-{first.assignment_id}-")  # + an unguessable part
    assert str(first.outcome) == expected_outcome(seeded, first, "left")

    # 2. Keys are ignored while typing in a text field ...
    rationale = page.locator("#vote-rationale textarea, #vote-rationale input").first
    rationale.fill("clearer")
    rationale.press("1")
    rationale.press("s")
    page.wait_for_timeout(300)
    assert len(votes(seeded)) == 1
    expect(page.locator("#pair-prompt textarea")).to_have_value(seeded.prompts[item])
    # ... and work once the focus is back on the page: 2 = B is better, with the typed rationale.
    page.locator("#pair-progress").click()
    page.keyboard.press("2")
    next_item(page, seeded, seen)
    second = votes(seeded)[1]
    assert second.comparison_id == seeded.comparison_ids[item]
    assert str(second.outcome) == expected_outcome(seeded, second, "right")
    assert second.rationale == "clearer1s"
    expect(rationale).to_have_value("")  # a new item starts with an empty rationale

    # 3. A double click records exactly one vote (the second click is dropped or refused).
    page.locator("#vote-tie").dblclick()
    item = next_item(page, seeded, seen)
    page.wait_for_timeout(800)  # give a stray second request every chance to land
    after = votes(seeded)
    assert len(after) == 3 and str(after[2].outcome) == "tie"
    expect(page.locator("#pair-prompt textarea")).to_have_value(seeded.prompts[item])

    # 4. S skips (no vote), 4 = both bad.
    page.keyboard.press("s")
    next_item(page, seeded, seen)
    assert len(votes(seeded)) == 3
    page.keyboard.press("4")
    next_item(page, seeded, seen)
    assert str(votes(seeded)[3].outcome) == "both_bad"
    expect(progress).to_contain_text(f"4 done · 1 left for you · project 4/{N_PAIRS}")
    db = seeded.db()
    with db.read() as s:
        statuses = sorted(str(a.status) for a in s.exec(select(Assignment)).all())
    db.dispose()
    assert statuses == ["done"] * 4 + ["reserved", "skipped"]

    # 5. After the last item: a clear end message, and the buttons are disabled.
    page.locator("#vote-b").click()
    expect(page.locator("#vote-status")).to_contain_text("Nothing left for you")
    expect(page.locator("#vote-a")).to_be_disabled()
    expect(progress).to_contain_text("5 done · 0 left for you")
    assert len(votes(seeded)) == 5
    assert_inert(page, seeded)


def _spans(seeded: Seeded) -> tuple[int | None, list[tuple[int, int, str, str | None, str | None]]]:
    db = seeded.db()
    try:
        with db.read() as s:
            span_set = s.exec(select(SpanSet)).first()
            if span_set is None:
                return None, []
            rows = s.exec(
                select(SpanAnnotation)
                .where(SpanAnnotation.span_set_id == span_set.id)
                .order_by(SpanAnnotation.start)
            ).all()
            return span_set.version, [(r.start, r.end, str(r.polarity), r.label, r.comment) for r in rows]
    finally:
        db.dispose()


def shown_response(page, seeded: Seeded, previous: str | None) -> str:
    """Wait for a response other than `previous` in the span picker; it and its prompt show as stored."""
    page.wait_for_function(
        """(previous) => {
            const el = document.querySelector('#span-picker .sp-text');
            return el && el.textContent.startsWith('Response ') && el.textContent !== previous;
        }""",
        arg=previous,
        timeout=20_000,
    )
    text = page.evaluate("document.querySelector('#span-picker .sp-text').textContent")
    assert text in seeded.lefts + seeded.rights
    n = int(re.match(r"Response (\d+)", text).group(1))
    expect(page.locator("#seg-prompt textarea")).to_have_value(seeded.prompts[n])
    return text


def test_span_marking_with_mouse_drag_save_conflict_and_submit(seeded, page, login):
    login(page, seeded, "ann", PASSWORD)
    open_segments(page, seeded)
    picker = page.locator("#span-picker")
    text = shown_response(page, seeded, previous=None)
    # The payloads show as typed, template syntax included; nothing ran or rendered.
    expect(picker.locator(".sp-text")).to_contain_text("${window.__xss_tpl=1} ${1+1}")
    assert_inert(page, seeded)

    # Mark "wörld" bad with the mouse: drag-select it, choose a label, type a comment, press Bad.
    drag_select(page, "#span-picker .sp-text", "wörld")
    picker.locator(".sp-label").select_option("tone")
    picker.locator(".sp-comment").fill("odd word")
    assert_unobstructed(
        page, ["#span-picker .sp-mark-good", "#span-picker .sp-mark-bad", "#span-picker .sp-label"]
    )
    picker.locator(".sp-mark-bad").click()
    expect(picker.locator(".sp-bad")).to_have_text("wörld")
    # Mark "Héllo" good with the G key.
    drag_select(page, "#span-picker .sp-text", "Héllo")
    page.keyboard.press("g")
    expect(picker.locator(".sp-good")).to_have_text("Héllo")
    expect(picker.locator(".sp-row")).to_have_count(2)

    page.locator("#seg-save").click()
    expect(page.locator("#seg-status")).to_contain_text("Draft saved: 2 span(s), version 1.")
    hello, world = text.index("Héllo"), text.index("wörld")  # code points, as stored
    assert _spans(seeded) == (
        1,
        [(hello, hello + 5, "good", None, None), (world, world + 5, "bad", "tone", "odd word")],
    )

    # Edit in the list: "Héllo" becomes bad; then delete "wörld".
    picker.locator(".sp-row").first.locator(".sp-row-polarity").select_option("bad")
    picker.locator(".sp-row").nth(1).locator(".sp-delete").click()
    expect(picker.locator(".sp-row")).to_have_count(1)
    page.locator("#seg-save").click()
    expect(page.locator("#seg-status")).to_contain_text("version 2")
    assert _spans(seeded) == (2, [(hello, hello + 5, "bad", None, None)])

    # The same annotator saves in a second tab; the first tab's save is then stale: reloaded, not overwritten.
    other = page.context.new_page()
    other.bring_to_front()
    other.goto(seeded.url)
    open_segments(other, seeded)
    expect(other.locator("#span-picker .sp-text")).to_have_text(text, timeout=20_000)
    drag_select(other, "#span-picker .sp-text", "answer")
    other.locator("#span-picker .sp-mark-good").click()
    other.locator("#seg-save").click()
    expect(other.locator("#seg-status")).to_contain_text("version 3")
    other.close()
    page.bring_to_front()

    drag_select(page, "#span-picker .sp-text", "fine")
    page.keyboard.press("b")
    page.locator("#seg-save").click()
    expect(page.locator("#seg-status")).to_contain_text("changed elsewhere — reloaded the latest version")
    expect(picker.locator(".sp-row")).to_have_count(2)  # the stored spans, without the unsaved "fine"
    expect(picker.locator(".sp-good")).to_have_text("answer")
    answer = text.index("answer")
    assert _spans(seeded)[0] == 3

    # Submit the reloaded version: the next response appears, with progress, and is just as inert.
    assert_unobstructed(page, ["#seg-save", "#seg-submit"])
    page.locator("#seg-submit").click()
    expect(page.locator("#seg-status")).to_contain_text("Submitted 2 span(s).")
    shown_response(page, seeded, previous=text)
    expect(page.locator("#seg-progress")).to_contain_text("1 done")
    assert _spans(seeded) == (
        4,
        [(hello, hello + 5, "bad", None, None), (answer, answer + 6, "good", None, None)],
    )
    assert_inert(page, seeded)
    assert_unobstructed(page, ["#seg-save", "#seg-submit", "#seg-load", "#span-picker .sp-mark-bad"])


def test_admin_team_browse_and_datasets_views(seeded_with_votes, page, login, tmp_path):
    seeded = seeded_with_votes
    login(page, seeded, "ada", PASSWORD)
    page.get_by_role("tab", name="Team").click()
    activity = page.locator("#team-activity")
    expect(activity).to_contain_text("ann", timeout=20_000)
    expect(activity).to_contain_text("bob")
    expect(page.locator("#team-progress")).to_contain_text(f"Pairwise: 6 of {2 * N_PAIRS} judgements")
    expect(page.locator("#team-quality")).to_contain_text("Krippendorff α over 3 item(s)")
    expect(page.locator("#team-annotators")).to_contain_text("bob")
    assert_unobstructed(page, ["#team-refresh", "#project-select"])
    page.locator("#team-refresh").click()
    expect(page.locator("#team-updated")).to_contain_text("Updated")

    # Gold: mark comparison 1 with a known outcome.
    page.get_by_text("Gold items").click()
    page.locator("#team-gold-id input").fill("1")
    page.locator("#team-gold-outcome").get_by_text("B", exact=True).click()
    page.locator("#team-gold-save").click()
    expect(page.locator("#team-gold-status")).to_contain_text("Comparison 1 is gold with outcome b")
    assert str(comparison_of(seeded, 1).gold_outcome) == "b"
    assert_inert(page, seeded)

    # Browse shows the payload prompts as text; a normal click on a row shows the prompt and responses.
    page.get_by_role("tab", name="Browse").click()
    expect(page.locator("#prompt-table")).to_contain_text("Prompt #0", timeout=20_000)
    expect(page.locator("#prompt-table")).to_contain_text("<img src=x")
    assert_inert(page, seeded)
    assert_unobstructed(page, ["#browse-next", "#browse-prev"])
    page.locator("#prompt-table").get_by_text("Prompt #2").first.click()
    expect(page.locator("#prompt-detail textarea")).to_have_value(seeded.prompts[2])
    expect(page.locator("#response-table")).to_contain_text("Response 2a")
    assert_inert(page, seeded)

    # Datasets: export votes and prompts; the snapshots are listed with their sha256 and offered as copies.
    page.get_by_role("tab", name="Datasets").click()
    kinds = page.locator("#ds-kinds")
    kinds.get_by_text("preferences", exact=True).click()  # on by default: off
    kinds.get_by_text("votes", exact=True).click()
    kinds.get_by_text("prompts", exact=True).click()
    page.locator("#ds-export").click()
    expect(page.locator("#ds-export-result")).to_contain_text("Exported 2 snapshot(s)", timeout=30_000)
    expect(page.locator("#ds-snapshots")).to_contain_text("votes")
    links = page.locator("#ds-export-files a")
    expect(links).to_have_count(2)
    texts = []
    for n in range(2):
        with page.expect_download() as info:
            links.nth(n).click()
        texts.append(Path(info.value.path()).read_text(encoding="utf-8"))
    assert any("Prompt #0" in t for t in texts)
    assert_inert(page, seeded)

    # Import public preference data: a bad row is reported with file, line and field; nothing is written.
    bad = tmp_path / "prefs.jsonl"
    good_row = {
        "prompt": f"Imported <img src=x id='evil-imported'> {seeded.canary.url}/x.png",
        "chosen": "a",
        "rejected": "b",
    }
    bad.write_text(json.dumps(good_row) + "\n" + json.dumps({"prompt": "Q", "chosen": "a"}) + "\n")
    page.locator("#ds-import-file input[type=file]").set_input_files(str(bad))
    page.locator("#ds-import").click()
    expect(page.locator("#ds-import-result")).to_contain_text("Nothing imported from prefs.jsonl")
    problems = page.locator("#ds-import-problems")
    expect(problems).to_contain_text("missing_field")
    expect(problems).to_contain_text("rejected")
    bad.write_text(json.dumps(good_row) + "\n")
    page.locator("#ds-import-file input[type=file]").set_input_files(str(bad))
    page.locator("#ds-import").click()
    expect(page.locator("#ds-import-result")).to_contain_text("1 comparison(s) with 1 vote(s)")
    assert_inert(page, seeded)
