"""Pure helpers of the annotation UI: span picker values, kept suggestions, download copies, formatting."""

from __future__ import annotations

import json
import math
import zipfile
from types import SimpleNamespace

import pytest

from studio.components.keys import KEYBOARD_JS, VOTE_KEYS
from studio.components.span_picker import TEMPLATE, picker_value, spans_of
from studio.spans import MAX_SPANS
from studio.tabs.annotate import VOTES, progress_text, prompt_text
from studio.tabs.datasets import download_copy
from studio.tabs.segments import Marking, kept_suggestions
from studio.tabs.team import fmt, fmt_interval


def test_spans_of_keeps_only_the_five_span_keys():
    payload = picker_value("abc", [{"start": 0, "end": 1, "polarity": "good", "extra": "<x>"}])
    payload["text"] = "a different text sent by the client"
    assert spans_of(payload) == [{"start": 0, "end": 1, "polarity": "good", "label": None, "comment": None}]
    assert spans_of(None) == []


@pytest.mark.parametrize(
    "payload",
    ["text", {"spans": "nope"}, {"spans": [1]}, {"spans": [{"start": 0}] * (MAX_SPANS + 1)}],
)
def test_spans_of_refuses_other_shapes(payload):
    with pytest.raises(ValueError):
        spans_of(payload)


def test_the_picker_template_has_no_value_or_template_expressions():
    # Model text must never pass through the Handlebars + template-literal rendering.
    assert "${" not in TEMPLATE and "{{" not in TEMPLATE and "`" not in TEMPLATE


def test_kept_suggestions_can_hide_but_never_add():
    stored = (
        {"start": 0, "end": 2, "polarity": "bad", "label": None, "comment": None},
        {"start": 3, "end": 5, "polarity": "good", "label": None, "comment": None},
    )
    marking = Marking(1, 1, 0, "ab cd", (), stored)
    sent = {
        "suggestions": [
            {"start": 3, "end": 5, "polarity": "good"},
            {"start": 0, "end": 5, "polarity": "good"},
        ]
    }
    assert kept_suggestions(marking, sent) == [stored[1]]
    assert kept_suggestions(marking, None) == list(stored)


def test_download_copy_of_a_file_and_of_a_folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    snapshot = data / "votes.jsonl"
    snapshot.write_text('{"a": 1}\n')
    root = tmp_path / "downloads"
    copy = download_copy(snapshot, "snapshot-3-votes", root=root)
    assert copy.name == "snapshot-3-votes.jsonl" and copy.read_text() == '{"a": 1}\n'
    assert root in copy.parents and data not in copy.parents

    folder = data / "hf"
    folder.mkdir()
    (folder / "dataset_info.json").write_text(json.dumps({"x": 1}))
    archive = download_copy(folder, "snapshot-4-prompts", root=root)
    assert archive.suffix == ".zip"
    assert zipfile.ZipFile(archive).namelist() == ["dataset_info.json"]

    # Copies older than the TTL are removed when the next one is made.
    later = download_copy(snapshot, "snapshot-3-votes", root=root, now=copy.stat().st_mtime + 10**6)
    assert later.exists() and not copy.exists() and not archive.exists()


def test_keyboard_shortcuts_click_the_vote_buttons():
    assert set(VOTE_KEYS.values()) == {eid for _, eid, _ in VOTES} | {"vote-skip"}
    for key, elem_id in VOTE_KEYS.items():
        assert json.dumps(key) in KEYBOARD_JS and json.dumps(elem_id) in KEYBOARD_JS
    for text, elem_id, _ in VOTES:
        key = next(k for k, v in VOTE_KEYS.items() if v == elem_id)
        assert text.endswith(f"[{key}]")


def test_progress_and_number_formatting():
    progress = SimpleNamespace(done_by_user=12, remaining_for_user=30, project_done=40, project_total=120)
    assert progress_text(progress) == "12 done · 30 left for you · project 40/120"
    assert prompt_text("x", [{"role": "user", "content": "hi"}]) == "[user]\nhi"
    assert prompt_text("plain", None) == "plain"
    assert fmt(None) == fmt(math.nan) == "–"
    assert fmt(0.123456) == "0.12" and fmt(3) == "3"
    assert fmt_interval((-0.16, 0.5)) == "[-0.16, +0.50]"
    assert fmt_interval(None) == "–"


# --------------------------------------------------------------------------- handlers, called as Gradio would


def _tab_events(build, db, tmp_path) -> tuple[dict, object]:
    """Build one tab on real services; ({api_name: handler}, services)."""
    import gradio as gr

    from studio.services import Services
    from studio.settings import Settings
    from studio.tabs.common import Shared

    services = Services.build(Settings(data_dir=tmp_path / "data", database_url="sqlite://"), db)
    with gr.Blocks() as demo:
        shared = Shared(services=services, project_id=gr.State(None), project_select=gr.Dropdown())
        build(shared)
    return {f.api_name: f.fn for f in demo.fns.values() if f.api_name}, services


def test_pairwise_vote_key_cannot_be_taken_first_by_another_annotator(db, tmp_path):
    from dataclasses import replace

    from annotation_service_helpers import add_users, seed_project
    from sqlmodel import select

    from storage import models as m
    from studio.tabs import annotate

    events, services = _tab_events(annotate.build, db, tmp_path)
    add_users(db, ["ann", "bob"])
    pid, _, _ = seed_project(db, comparisons=3)
    mine = services.annotation.next_pairwise("ann", pid)
    # ann votes through the REST API with the key the tab would derive from bob's next assignment id.
    guess = f"vote-{mine.assignment_id + 1}"
    services.annotation.submit_vote("ann", mine.assignment_id, "left", None, None, guess, 1000)
    bob = SimpleNamespace(username="bob")
    shown = next(v for v in events["pairwise_next"](pid, None, bob).values() if isinstance(v, annotate.Shown))
    assert shown.assignment_id == mine.assignment_id + 1
    assert shown.vote_key.startswith(f"vote-{shown.assignment_id}-") and len(shown.vote_key) <= 64
    shown = replace(shown, shown_at=shown.shown_at - 5)  # looked at it for 5 s
    texts = lambda out: [v for v in out.values() if isinstance(v, str)]  # noqa: E731
    assert "Vote recorded." in texts(events["vote_left"](pid, shown, None, "", bob))
    assert "Already recorded." in texts(events["vote_left"](pid, shown, None, "", bob))  # double click
    with db.read() as s:
        votes = s.exec(
            select(m.PairwiseVote).where(m.PairwiseVote.assignment_id == shown.assignment_id)
        ).all()
    assert [v.idempotency_key for v in votes] == [shown.vote_key]


def test_datasets_import_checks_the_role_before_deleting_the_upload(db, tmp_path):
    import gradio as gr
    from annotation_service_helpers import add_users, seed_project

    from studio.tabs import datasets

    events, _ = _tab_events(datasets.build, db, tmp_path)
    add_users(db, ["ann"])
    pid, _, _ = seed_project(db, comparisons=1)
    upload = tmp_path / "someone-elses-upload.jsonl"
    upload.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(gr.Error, match="needs the admin role"):
        events["datasets_import"](pid, str(upload), SimpleNamespace(username="ann"))
    assert upload.exists()


# --------------------------------------------------------------------------- the built app


@pytest.fixture
def built_app(db, tmp_path):
    from studio.services import Services
    from studio.settings import Settings
    from studio.ui import build_app

    return build_app(Services.build(Settings(data_dir=tmp_path / "data", database_url="sqlite://"), db))


def test_every_event_has_an_explicit_concurrency_group_within_the_database_pool(built_app, tmp_path):
    """R-DB-04: Gradio gives an event without `concurrency_id` its own slots (id = str(id(fn))), so the
    slots of all events together could exceed the connections the database pool can hand out."""
    from storage.db import POOL_CAPACITY, make_engine, sqlite_url
    from studio.tabs.common import REST_HEADROOM

    engine = make_engine(sqlite_url(tmp_path / "pool.db"))
    assert engine.pool.size() + engine.pool._max_overflow == POOL_CAPACITY
    engine.dispose()
    groups: dict[str, set] = {}
    fns = list(built_app.fns.values())  # gradio 6.31: {fn index: BlockFunction}
    assert len(fns) > 40
    for fn in fns:
        where = f"event {fn.name!r} (api_name {fn.api_name!r})"
        if not fn.queue:  # runs outside the queue: allowed only for events declared DB-free
            assert fn.concurrency_id == "ui", f"{where} skips the queue without **UI_ONLY"
            continue
        assert fn.concurrency_id != str(id(fn.fn)), f"{where} has no explicit concurrency_id"
        assert fn.concurrency_id != "ui", f"{where} is queued in the DB-free group"
        limit = fn.concurrency_limit
        assert isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1, (
            f"{where} has no explicit concurrency_limit ({limit!r})"
        )
        groups.setdefault(fn.concurrency_id, set()).add(limit)
    # Gradio applies the lowest limit of a group to all of it: one limit per group, no surprises.
    assert all(len(limits) == 1 for limits in groups.values()), groups
    limits = {group: limits.pop() for group, limits in groups.items()}
    assert set(limits) == {"db", "model", "datasets"}, limits
    assert sum(limits.values()) <= POOL_CAPACITY - REST_HEADROOM, limits
    by_name = {fn.api_name: fn.concurrency_id for fn in fns}
    for api_name in ("vote_left", "skip", "spans_submit", "pairwise_next", "team_refresh", "users_add"):
        assert by_name[api_name] == "db"
    assert by_name["generate"] == "model"


def test_gradio_cache_is_swept(built_app):
    """R-SEC-09: uploaded and generated temporary files older than an hour go every 10 minutes."""
    assert built_app.delete_cache == (600, 3600)


def test_one_key_listener_serves_the_pairwise_and_arena_tabs():
    from studio.components.keys import ARENA_KEYS, key_map

    merged = key_map(VOTE_KEYS, ARENA_KEYS)
    assert merged["1"] == ["vote-a", "arena-vote-a"]  # the first shown and enabled one is clicked
    assert merged["n"] == ["arena-next", "arena-new"] and merged["s"] == ["vote-skip"]
    assert json.dumps(merged) in KEYBOARD_JS
