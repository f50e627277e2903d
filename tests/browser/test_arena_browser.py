"""The blind arena in a real browser: a rater votes through four battles with the mouse and the keyboard,
sees no checkpoint name anywhere before each vote (neither in the page nor in any response body the page
received), gets all four buttons locked by one vote, and then sees the names; the admin's leaderboard
changes with the votes, and the named side-by-side shows names without adding a vote.

Every response body the rater's page receives is recorded twice over: the HTTP responses through
Playwright (`page.on("response")`), and everything read through `fetch`, including Gradio's queue
data stream (server-sent events), by a wrapper installed before the page's own scripts run. The check
can fail: the same recording must contain the names right after a vote (the reveal arrives through the
stream).

The studio generates the battles on demand with two tiny random models named with words a tiny model
cannot produce; one name carries markup, which must show as text in the table, the labels and the plot.
"""

from __future__ import annotations

import dataclasses
import json
import re
from urllib.parse import urlparse

import pytest
from argon2 import PasswordHasher
from playwright.sync_api import expect
from sqlmodel import select
from training_helpers import choose, open_tab, read_db

from storage import crud
from storage.db import Database
from storage.models import Comparison, ComparisonPurpose, PairwiseVote, PromptKind
from studio.services import Services
from studio.settings import Settings

pytestmark = pytest.mark.browser

RATER, PASSWORD = "rita", "arena-rater-password"
FALCON = "zebrafalcon"
MANTIS = "quokkamantis"
MANTIS_FULL = f"{MANTIS} <i>x</i>"
NAMES = (FALCON, MANTIS)
EVAL_PROMPTS = [f"Arena question {i}: describe a quiet harbour." for i in range(4)]
TYPED = "Name three colours of the sea"
VOTES = ["#arena-vote-a", "#arena-vote-b", "#arena-vote-tie", "#arena-vote-both-bad"]
ACTION_MS = 30_000
BATTLE_MS = 60_000
"""A battle's first generation loads torch and both tiny models in the studio process."""

CAPTURE_JS = """(() => {
  window.__captured = [];
  const original = window.fetch;
  window.fetch = async function (...args) {
    const response = await original.apply(this, args);
    try {
      const copy = response.clone();
      const entry = { url: copy.url, text: '' };
      window.__captured.push(entry);
      if (copy.body) {
        const reader = copy.body.getReader();
        const decoder = new TextDecoder();
        (async () => {
          for (;;) {
            const { done, value } = await reader.read();
            if (done) break;
            entry.text += decoder.decode(value, { stream: true });
          }
        })().catch(() => {});
      }
    } catch (e) {}
    return response;
  };
})();"""
RECORD_CSP = (
    "window.__csp = []; document.addEventListener('securitypolicyviolation', "
    "e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"
)
STATIC = re.compile(r"/assets/|/static/|\.(js|css|woff2?|ttf|svg|png|ico|map)(\?|$)")


class Recorder:
    """Response bodies a page received: HTTP responses (Playwright) and fetch streams (in the page)."""

    def __init__(self, page):
        self.page = page
        self.responses = []
        page.add_init_script(CAPTURE_JS)
        page.on("response", lambda response: self.responses.append(response))

    def http_bodies(self, start: int = 0) -> list[tuple[str, str]]:
        out = []
        for response in self.responses[start:]:
            if STATIC.search(response.url) or "event-stream" in response.headers.get("content-type", ""):
                continue
            try:
                out.append((response.url, response.body().decode("utf-8", "replace")))
            except Exception:  # a redirect or an aborted request has no body
                continue
        return out

    def fetched(self, start: int = 0) -> list[tuple[str, str]]:
        rows = self.page.evaluate(
            "(start) => window.__captured.slice(start).map((e) => [e.url, e.text])", start
        )
        return [tuple(r) for r in rows]

    def marks(self) -> tuple[int, int]:
        """Where the recordings end now: later checks look only at what came after."""
        return len(self.responses), self.page.evaluate("window.__captured.length")


def guard(page) -> list[str]:
    """Requests that left loopback, and dialogs: both must stay empty (as the `page` fixture checks)."""
    problems: list[str] = []
    page.add_init_script(RECORD_CSP)
    page.on("dialog", lambda d: (problems.append(f"dialog {d.message}"), d.dismiss()))
    page.on(
        "request",
        lambda r: (
            None
            if r.url.startswith(("data:", "blob:")) or urlparse(r.url).hostname in ("127.0.0.1", "localhost")
            else problems.append(r.url)
        ),
    )
    return problems


def assert_no_names(page, recorder: Recorder, mark: tuple[int, int]) -> None:
    """No checkpoint name in the page (text, DOM, field values) or in any body received since `mark`."""
    seen = page.evaluate(
        """() => document.body.innerText + '\\n' + document.documentElement.outerHTML + '\\n' +
        [...document.querySelectorAll('textarea, input')].map((e) => e.value).join('\\n')"""
    )
    bodies = recorder.http_bodies(mark[0]) + recorder.fetched(mark[1])
    assert any("queue/data" in url for url, _ in recorder.fetched(mark[1])), (
        "the data stream was not recorded"
    )
    for name in NAMES:
        assert name not in seen, f"{name} is in the page before the vote"
        leaks = [url for url, body in bodies if name in body]
        assert not leaks, f"{name} reached the page before the vote: {leaks}"


def assert_names_in_stream(recorder: Recorder, mark: tuple[int, int]) -> None:
    """The recording works: the reveal's names are in the stream received since `mark`."""
    streamed = "\n".join(body for url, body in recorder.fetched(mark[1]) if "queue/data" in url)
    for name in NAMES:
        assert name in streamed, f"{name} not in the recorded stream after the vote"


def seed(studio, tiny_a, tiny_b) -> int:
    """The rater, a project with four evaluation prompts (and one other), two named checkpoints in its arena."""
    settings = Settings(data_dir=studio.data_dir)
    db = Database.from_url(settings.database_url)
    try:
        services = Services.build(settings, db)
        services.users.hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
        services.users.add_user(studio.admin, RATER, "rater", PASSWORD)
        project = services.projects.create("Harbour arena")
        rows = [
            {"external_id": f"e{i}", "kind": PromptKind.text, "text": t, "messages": None, "tags": ["eval"]}
            for i, t in enumerate(EVAL_PROMPTS)
        ]
        rows.append(
            {
                "external_id": "x",
                "kind": PromptKind.text,
                "text": "Not for the arena",
                "messages": None,
                "tags": None,
            }
        )
        with db.write() as s:
            crud.insert_prompts(s, project_id=project.id, rows=rows)
            ids = [
                crud.get_or_create_checkpoint(
                    s, path=str(path), name=name, project_id=project.id, recipe="external"
                ).id
                for path, name in ((tiny_a, FALCON), (tiny_b, MANTIS_FULL))
            ]
        services.arena.add_model(studio.admin, project.id, ids[0], anchor=True)
        services.arena.add_model(studio.admin, project.id, ids[1])
        return project.id
    finally:
        db.dispose()


def counts(studio, project_id: int) -> tuple[int, int]:
    """(arena comparisons, votes) in the project."""
    db = read_db(studio)
    try:
        with db.read() as s:
            battles = s.exec(
                select(Comparison).where(
                    Comparison.project_id == project_id, Comparison.purpose == ComparisonPurpose.arena
                )
            ).all()
            votes = s.exec(
                select(PairwiseVote).where(PairwiseVote.comparison_id.in_([b.id for b in battles]))
            ).all()
        return len(battles), len(votes)
    finally:
        db.dispose()


def wait_battle(page) -> None:
    """A battle is on screen once the vote buttons unlock: the last step of the paced display (a tiny
    random model may answer with nothing at all, so the panels' text is not the signal)."""
    for button in VOTES:
        expect(page.locator(button)).to_be_enabled(timeout=BATTLE_MS)


def assert_revealed(page, recorder: Recorder, mark, outcome: str) -> None:
    for button in VOTES:  # one click locked all four
        expect(page.locator(button)).to_be_disabled()
    reveal = page.locator("#arena-reveal")
    expect(reveal).to_contain_text(outcome)
    expect(reveal).to_contain_text(FALCON)
    expect(reveal).to_contain_text(MANTIS_FULL)  # the markup shows as text
    expect(page.locator("#arena-next")).to_be_visible()
    assert page.locator("#arena-reveal i").count() == 0
    assert_names_in_stream(recorder, mark)


def leaderboard_text(page, votes: int) -> str:
    """Refresh the board and wait for the answer (the vote count), then read the table."""
    page.locator("#lb-refresh").click()
    expect(page.locator("#lb-summary")).to_contain_text(f"{votes} vote(s)", timeout=ACTION_MS)
    expect(page.locator("#lb-table")).to_contain_text(FALCON)
    # The cells only: a pending event's timer (the tab's own refresh) may overlay the table.
    return "\n".join(page.locator("#lb-table").get_by_role("row").all_inner_texts())


def test_rater_votes_blind_and_the_board_moves(studio, browser, login, make_tiny_model):
    project_id = seed(studio, make_tiny_model(5), make_tiny_model(7))
    admin_ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    rater_ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        admin = admin_ctx.new_page()
        admin.set_default_timeout(30_000)
        problems = guard(admin)
        login(admin, studio)
        choose(admin, "project-select", "Harbour arena")
        # The admin's tools: both checkpoints play (one the anchor); their answers to the evaluation
        # prompts are generated in one batch, so the battles below only read them.
        open_tab(admin, "Arena")
        admin.get_by_text("Arena admin").click()
        models = admin.locator("#arena-models")
        expect(models).to_contain_text(FALCON)
        expect(models).to_contain_text(MANTIS_FULL)
        expect(models.get_by_role("row").filter(has_text=FALCON)).to_contain_text("anchor")
        admin.locator("#arena-pregen").click()
        expect(admin.locator("#arena-admin-status")).to_contain_text(
            f"Pre-generated {2 * len(EVAL_PROMPTS)} response(s).", timeout=BATTLE_MS
        )
        open_tab(admin, "Leaderboard")
        expect(admin.locator("#lb-summary")).to_contain_text("0 vote(s): no counted battle yet")

        # 1. The rater, recorded from the first byte: battle 1 with the mouse.
        page = rater_ctx.new_page()
        page.set_default_timeout(30_000)
        recorder = Recorder(page)
        rater_problems = guard(page)
        login(page, studio, RATER, PASSWORD)
        expect(page.get_by_role("tab", name="Arena")).to_be_visible()
        expect(page.get_by_role("tab", name="Training")).to_be_hidden()
        expect(page.locator("#arena-admin")).to_be_hidden()
        expect(page.locator("#project-select input")).to_have_value("Harbour arena")
        mark = recorder.marks()
        page.locator("#arena-new").click()
        wait_battle(page)
        assert page.locator("#arena-prompt textarea").input_value() in EVAL_PROMPTS
        assert_no_names(page, recorder, (0, 0))  # everything since sign-in
        page.locator("#arena-vote-a").click()
        assert_revealed(page, recorder, mark, "You preferred Model A")
        assert counts(studio, project_id) == (1, 1)

        # 2. Keyboard: N for the next battle, a double click on B records one vote.
        mark = recorder.marks()
        page.keyboard.press("n")
        wait_battle(page)
        expect(page.locator("#arena-reveal")).to_have_text("")
        assert_no_names(page, recorder, mark)
        page.locator("#arena-vote-b").dblclick()
        assert_revealed(page, recorder, mark, "You preferred Model B")
        assert counts(studio, project_id) == (2, 2)

        # 3. A typed prompt; keys typed into a text field never vote.
        mark = recorder.marks()
        page.locator("#arena-source").get_by_text("Type a prompt").click()
        page.locator("#arena-typed textarea").fill(TYPED)
        page.locator("#arena-new").click()
        wait_battle(page)
        expect(page.locator("#arena-prompt textarea")).to_have_value(TYPED)
        assert_no_names(page, recorder, mark)
        page.locator("#arena-typed textarea").press("End")
        page.keyboard.press("3")
        expect(page.locator("#arena-typed textarea")).to_have_value(TYPED + "3")
        page.wait_for_timeout(500)
        expect(page.locator("#arena-vote-tie")).to_be_enabled()
        assert counts(studio, project_id)[1] == 2
        page.evaluate("document.activeElement.blur()")
        page.keyboard.press("3")
        assert_revealed(page, recorder, mark, "You called it a tie")
        assert counts(studio, project_id) == (3, 3)

        # The admin's board after three votes.
        middle = leaderboard_text(admin, 3)
        assert FALCON in middle and MANTIS_FULL in middle  # markup stays text in the table

        # 4. Back to the evaluation set, key 4.
        mark = recorder.marks()
        page.locator("#arena-source").get_by_text("Evaluation set").click()
        page.keyboard.press("n")
        wait_battle(page)
        assert_no_names(page, recorder, mark)
        page.keyboard.press("4")
        assert_revealed(page, recorder, mark, "You found both bad")
        assert counts(studio, project_id) == (4, 4)

        # The board moved: more votes, other numbers; the plot shows the names as text.
        after = leaderboard_text(admin, 4)
        assert after != middle
        expect(admin.locator("#lb-ratings-plot")).to_contain_text(MANTIS_FULL, timeout=10_000)
        expect(admin.locator("#lb-raters")).to_contain_text(RATER)

        # The rater may look at the board too, without the admin parts.
        open_tab(page, "Leaderboard")
        expect(page.locator("#lb-table")).to_contain_text(FALCON)
        expect(page.locator("#lb-raters-box")).to_be_hidden()
        expect(page.locator("#lb-export-box")).to_be_hidden()

        # 5. Named side-by-side (admin): names shown, nothing counted.
        open_tab(admin, "Arena")
        admin.get_by_text("Named side-by-side (debug, never counted)").click()
        expect(admin.locator("#arena-named-note")).to_contain_text("never counted")
        choose(admin, "arena-named-a", FALCON)
        choose(admin, "arena-named-b", MANTIS)
        admin.locator("#arena-named-prompt textarea").fill("Say hello")
        admin.locator("#arena-named-run").click()
        expect(admin.locator("#arena-named-left textarea")).not_to_have_value("", timeout=BATTLE_MS)
        expect(admin.locator("#arena-named-left")).to_contain_text(FALCON)
        expect(admin.locator("#arena-named-right")).to_contain_text(MANTIS_FULL)
        assert counts(studio, project_id) == (4, 4)
        admin.reload()  # a fresh page: the board below is a new answer, not the one on screen
        expect(admin.locator("#session-line")).to_contain_text("Signed in as")
        open_tab(admin, "Leaderboard")
        assert leaderboard_text(admin, 4) == after

        # 6. Export (admin): the raw battles and the ratings as downloads.
        admin.get_by_text("Export (admin)").click()
        admin.locator("#lb-export").click()
        files = admin.locator("#lb-export-files")
        link = files.get_by_role("row", name=re.compile(r"battles\.jsonl")).get_by_role("link")
        expect(link).to_be_visible(timeout=ACTION_MS)
        battles = admin.request.get(link.get_attribute("href")).text().splitlines()
        assert len(battles) == 4 and all(json.loads(line)["rater"] == RATER for line in battles)
        expect(files.get_by_role("row", name=re.compile(r"ratings\.json"))).to_be_visible()

        # 7. Anchor and removal (admin): the table follows.
        open_tab(admin, "Arena")
        admin.get_by_text("Arena admin").click()  # closed again since the reload
        choose(admin, "arena-member", MANTIS)
        admin.locator("#arena-set-anchor").click()
        expect(admin.locator("#arena-admin-status")).to_contain_text("Anchor set to checkpoint")
        expect(models.get_by_role("row").filter(has_text=MANTIS)).to_contain_text("anchor")
        expect(models.get_by_role("row").filter(has_text=FALCON)).not_to_contain_text("anchor")
        choose(admin, "arena-member", FALCON)
        admin.locator("#arena-remove").click()
        expect(admin.locator("#arena-admin-status")).to_contain_text("Removed checkpoint")
        expect(models).not_to_contain_text(FALCON)
        assert admin.evaluate("window.__csp") == [] and page.evaluate("window.__csp") == []
        assert problems == [] and rater_problems == [], (problems, rater_problems)
    finally:
        admin_ctx.close()
        rater_ctx.close()


def test_plot_names_are_data_not_markup():
    """Names go into the figures as escaped data: plotly shows `<b>` literally instead of bold."""
    import json

    import numpy as np

    from studio.components.arena_plots import RatingPoint, model_label, ratings_figure, win_heatmap

    label = model_label(3, "evil <b>bold</b> & <a href='javascript:x'>link</a>")
    assert label == "#3 evil &lt;b&gt;bold&lt;/b&gt; &amp; &lt;a href='javascript:x'&gt;link&lt;/a&gt;"
    fig = ratings_figure([RatingPoint(label, 1010.0, 990.0, 1040.0, preliminary=True)])
    data = json.loads(fig.to_json())["data"][0]
    assert data["y"] == [label]
    assert data["error_x"]["array"] == [30.0] and data["error_x"]["arrayminus"] == [20.0]  # asymmetric
    heat = win_heatmap(
        [label, model_label(4, "b")], np.array([[np.nan, 0.75], [0.25, np.nan]]), np.ones((2, 2)) * 4
    )
    cells = json.loads(heat.to_json())["data"][0]
    assert cells["x"][0] == label and "<b>" not in json.dumps(cells["x"])
    assert cells["z"] == [[None, 0.75], [0.25, None]]
    assert cells["text"][0][1] == "75%<br>n=4"


def test_board_tables_and_cards_read_the_view():
    """The Leaderboard tab's rows and cards from a real (tiny) board: 3 wins of #1, 1 of #2, 1 tie."""
    from studio.rating import BattleRecord, RatingOptions, leaderboard
    from studio.services.arena_board import LeaderboardView
    from studio.services.rm_agreement import JudgedBattle, pair_agreement
    from studio.tabs.leaderboard import board_frame, pair_cards, rm_frame, summary_text, warning_text

    battles = [BattleRecord(1, 2, "a")] * 3 + [BattleRecord(1, 2, "b"), BattleRecord(2, 1, "tie")]
    board = leaderboard(battles, [1, 2], RatingOptions(anchor=1, bootstrap=50))
    names = {1: "base", 2: "new <b>x</b>"}
    view = LeaderboardView(board, names, {1: None, 2: 1}, 1, pair_tests=[(2, 1, False, None, 1.5)], n_votes=5)
    rows = board_frame(view).to_dict("records")
    assert [r["checkpoint"] for r in rows] == ["#1 base", "#2 new <b>x</b>"]  # a cell: plain text
    top = rows[0]
    assert top["rating"] == "1000" and top["anchor"] == "⚓ anchor" and top["rank"] == 1
    assert top["W / L / T"] == "3 / 1 / 1" and top["win rate"] == "75.0 %"  # 3 of 4 decisive
    assert top["status"] == "preliminary"  # 5 battles < 20
    r = board.ratings[1]
    assert rows[1]["95% CI"] == (
        f"{r.lower:.0f} – {r.upper:.0f} (−{r.rating - r.lower:.0f} / +{r.upper - r.rating:.0f})"
    )
    assert "**5** vote(s)" in summary_text(view) and warning_text(view) == ""
    card = pair_cards(view)
    assert "new &#60;b&#62;x&#60;&#47;b&#62;" in card and "not decided yet" in card  # inert Markdown
    split = LeaderboardView(dataclasses.replace(board, components=[[1], [2]]), names, {}, 1, n_votes=5)
    assert "The battle graph is disconnected** (2 groups" in warning_text(split)
    # Dropped ties: a model with only a tie has no fitted vote, so no interval, and stands apart.
    dropped = leaderboard(
        [BattleRecord(1, 2, "a"), BattleRecord(1, 3, "tie")],
        [1, 2, 3],
        RatingOptions(ties="drop", bootstrap=20),
    )
    lonely = LeaderboardView(dropped, {1: "a", 2: "b", 3: "c"}, {}, None, n_votes=2)
    cells = {r["checkpoint"]: r["95% CI"] for r in board_frame(lonely).to_dict("records")}
    assert cells["#3 c"] == "not estimable yet (no fitted vote)" and "–" in cells["#1 a"]
    assert "disconnected" in warning_text(lonely)

    agreement = pair_agreement(
        [
            JudgedBattle(1, 2, "a", 0.9, 0.1),
            JudgedBattle(1, 2, "b", 0.9, 0.1),
            JudgedBattle(1, 2, "tie", 0, 0),
        ]
    )
    table = rm_frame(agreement).to_dict("records")
    assert table[0]["decisive votes"] == 2 and table[0]["RM agrees"] == 1 and table[0]["agreement"] == "50 %"
    assert table[-1]["pair"] == "all pairs"
