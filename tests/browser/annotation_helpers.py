"""Shared pieces of the annotation browser tests: the loopback canary, the active-content payloads,
seeding a studio database through the services, and checks that text stayed inert.

Seeding writes users, a project, prompts, generations and comparisons through the services and storage
CRUD before the studio process starts (no model generation).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from argon2 import PasswordHasher

from storage import crud
from storage.db import Database, upgrade
from storage.models import PromptKind
from studio.services import Services
from studio.settings import Settings

PASSWORD = "browser-test-password"
LABELS = ["factual error", "tone"]
N_PAIRS = 6


class Canary:
    """A loopback HTTP server that records every request: the payloads point at it; it must see none."""

    def __init__(self):
        hits: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                hits.append(self.path)
                self.send_response(204)
                self.end_headers()

            do_POST = do_GET

            def log_message(self, *args):
                pass

        self.hits = hits
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def payload(canary: str) -> str:
    """Reliability.md Part 4 D 1–3: active HTML, CSS tricks, Markdown links and images, a template."""
    return "\n".join(
        [
            '<img src=x id="evil-img" onerror="window.__xss_img=1">',
            '<svg id="evil-svg"><animate onbegin="window.__xss_svg=1" attributeName="x" dur="1s"/></svg>',
            '<iframe id="evil-iframe" srcdoc="<script>parent.__xss_iframe=1</script>"></iframe>',
            '<a id="evil-link" href="javascript:window.__xss_link=1">open</a>',
            f'<form id="evil-form" action="{canary}/form"><button id="evil-button">Submit</button></form>',
            f'<meta http-equiv="refresh" content="0;url={canary}/meta">',
            f'<base href="{canary}/base/">',
            f'<object id="evil-object" data="{canary}/object"></object>',
            f'<embed id="evil-embed" src="{canary}/embed">',
            '<div id="evil-overlay" style="position:fixed;top:0;left:0;width:100vw;height:100vh;'
            'z-index:99999;background:rgba(255,0,0,.4)">OVERLAY</div>',
            '<div id="evil-hide" style="display:none">',
            f'<style>@import url("{canary}/import.css");</style>',
            "[click](javascript:window.__xss_md=1) and <script>window.__xss_script=1</script>",
            f"![track]({canary}/track.png) <{canary}/autolink>",
            "${window.__xss_tpl=1} ${1+1} {{7*7}}",
        ]
    )


@dataclass
class Seeded:
    url: str
    data_dir: Path
    canary: Canary
    project_id: int
    prompts: list[str]
    """Prompt texts: prompt n starts with "Prompt #n:" (the queue hands items out in any order)."""
    lefts: list[str]
    """Generation a's text per comparison (shown left or right by a per-assignment coin)."""
    rights: list[str]
    comparison_ids: list[int]
    """The comparison of prompt n."""

    def db(self) -> Database:
        return Database.from_url(Settings(data_dir=self.data_dir).database_url)


def seed(data_dir: Path, canary: Canary, *, overlap_votes: bool = False) -> dict:
    """Users ada (admin), ann and bob (annotators), one project with N_PAIRS comparisons full of payloads."""
    data_dir.mkdir(parents=True, exist_ok=True)
    settings = Settings(data_dir=data_dir)
    db = Database.from_url(settings.database_url)
    upgrade(db.engine)
    services = Services.build(settings, db)
    services.users.hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)  # fast to seed
    services.users.create_first_admin("ada", PASSWORD)
    services.users.add_user("ada", "ann", "annotator", PASSWORD)
    services.users.add_user("ada", "bob", "annotator", PASSWORD)
    bad = payload(canary.url)
    project = services.projects.create(
        "Payload project",
        guidelines="Prefer the helpful answer.\n" + bad,
        span_labels=LABELS,
    )
    prompts = [f"Prompt #{i}: which answer is better?\n{bad}" for i in range(N_PAIRS)]
    lefts = [f"Response {i}a: Héllo 😀 wörld, a fine answer.\n{bad}" for i in range(N_PAIRS)]
    rights = [f"Response {i}b: Héllo 😀 wörld, a fine answer 👍🏽 too.\n{bad}" for i in range(N_PAIRS)]
    with db.write() as s:
        crud.insert_prompts(
            s,
            project_id=project.id,
            rows=[
                {
                    "external_id": f"p{i}",
                    "kind": PromptKind.text,
                    "text": text,
                    "messages": None,
                    "tags": None,
                }
                for i, text in enumerate(prompts)
            ],
        )
        ids = crud.existing_prompt_ids(
            s, project_id=project.id, external_ids=[f"p{i}" for i in range(N_PAIRS)]
        )
        model = crud.get_or_create_checkpoint(s, path="test-model", name="test model")
        comparison_ids = []
        for i in range(N_PAIRS):
            prompt_id = ids[f"p{i}"]
            gens = [
                crud.add_generation(
                    s,
                    prompt_id=prompt_id,
                    checkpoint_id=model.id,
                    text=text,
                    params={},
                    seed=0,
                    sample_index=k,
                )
                for k, text in enumerate((lefts[i], rights[i]))
            ]
            comparison = crud.add_comparison(
                s,
                project_id=project.id,
                prompt_id=prompt_id,
                generation_a_id=gens[0].id,
                generation_b_id=gens[1].id,
                required_votes=2 if overlap_votes else 1,
            )
            comparison_ids.append(comparison.id)
    if overlap_votes:  # ann and bob vote on the first items, so the Team tab has agreement to show
        for user, choices in (("ann", ["left", "left", "tie"]), ("bob", ["left", "right", "tie"])):
            for n, choice in enumerate(choices):
                item = services.annotation.next_pairwise(user, project.id)
                services.annotation.submit_vote(
                    user, item.assignment_id, choice, None, None, f"seed-{user}-{n}", 4000 + 1000 * n
                )
    db.dispose()
    return {
        "project_id": project.id,
        "prompts": prompts,
        "lefts": lefts,
        "rights": rights,
        "comparison_ids": comparison_ids,
    }


def assert_inert(page, seeded: Seeded) -> None:
    """Nothing from the payloads ran, rendered as an element, or fetched anything."""
    flags = page.evaluate("Object.keys(window).filter((k) => k.startsWith('__xss'))")
    assert flags == [], f"injected code ran: {flags}"
    assert page.locator("[id^=evil]").count() == 0, "an element was made from model text"
    assert page.locator("img[src='x'], iframe[srcdoc], object, embed").count() == 0
    assert seeded.canary.hits == [], f"the canary was fetched: {seeded.canary.hits}"
    assert not [u for u in page.requested if f":{seeded.canary.port}" in u]


def assert_unobstructed(page, selectors: list[str]) -> None:
    """document.elementFromPoint at each element's centre is the element (or inside it)."""
    for selector in selectors:
        hit = page.evaluate(
            """(sel) => {
                const el = document.querySelector(sel);
                if (!el) return 'missing';
                el.scrollIntoView({block: 'center'});
                const r = el.getBoundingClientRect();
                const top = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
                return top && (top === el || el.contains(top)) ? 'ok' : (top ? top.outerHTML.slice(0, 120) : 'null');
            }""",
            selector,
        )
        assert hit == "ok", f"{selector} is covered by {hit}"


def drag_select(page, container: str, word: str) -> None:
    """Select `word` inside `container` with a real mouse drag (press, move, release)."""
    box = page.evaluate(
        """([sel, word]) => {
            const root = document.querySelector(sel);
            const start = root.textContent.indexOf(word);
            if (start < 0) return null;
            const at = (k) => {
                const walk = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
                let n, seen = 0;
                while ((n = walk.nextNode())) {
                    if (k < seen + n.textContent.length) return [n, k - seen];
                    seen += n.textContent.length;
                }
            };
            const rect = (k) => { const [n, o] = at(k); const r = document.createRange();
                r.setStart(n, o); r.setEnd(n, o + 1); return r.getBoundingClientRect(); };
            root.scrollIntoView({block: 'center'});
            const a = rect(start), b = rect(start + word.length - 1);
            return {x0: a.left + 1, y0: a.top + a.height / 2, x1: b.right - 1, y1: b.top + b.height / 2};
        }""",
        [container, word],
    )
    assert box is not None, f"{word!r} is not in {container}"
    page.mouse.move(box["x0"], box["y0"])
    page.mouse.down()
    page.mouse.move((box["x0"] + box["x1"]) / 2, box["y1"], steps=4)
    page.mouse.move(box["x1"], box["y1"], steps=4)
    page.mouse.up()
    assert page.evaluate("window.getSelection().toString()") == word
