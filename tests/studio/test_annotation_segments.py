"""Span sets through the annotation service (R-DB-06): drafts, versions, UTF-16 offsets,
submission, segment overlap and suggestions, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from annotation_service_helpers import HOLD_S, Clock, add_users, count, make_service, race, seed_project
from sqlmodel import select

from storage import annotation as annotation_store
from storage import crud
from storage import models as m
from storage.annotation_queue import segment_required_votes
from studio.services.errors import Conflict, NotFound, ServiceError


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_segment_flow_with_drafts_versions_and_submit(any_db, tmp_path, clock):
    add_users(any_db, ["ann", "bob"])
    text = "Good 👍🏽 answer, wrong fact."
    pid, _, (gid,) = seed_project(any_db, generations=1, texts=(text,))
    service = make_service(any_db, tmp_path, clock)
    item = service.next_segment("ann", pid)
    assert (item.generation_id, item.response_text, item.version, item.spans) == (gid, text, 0, [])
    assert item.labels == ["tone", "fact"] and item.suggestions == []
    assert service.next_segment("bob", pid) is None  # overlap 1, held by ann

    span = {"start": 16, "end": 27, "polarity": "bad", "label": "fact", "comment": None}
    saved = service.save_spans("ann", gid, [span], version=0, submit=False)
    assert saved.version == 1 and saved.spans == [span]
    # a second tab still holding version 0 is refused with what is stored now
    with pytest.raises(Conflict) as info:
        service.save_spans("ann", gid, [], version=0)
    assert info.value.current == {"version": 1, "spans": [span]}
    # the draft survives: the resumed item carries it
    resumed = service.next_segment("ann", pid)
    assert (resumed.assignment_id, resumed.version, resumed.spans) == (item.assignment_id, 1, [span])

    # UTF-16 offsets: "👍🏽" is 2 code points but 4 UTF-16 units
    good = {"start": 0, "end": 9, "polarity": "good"}  # "Good 👍🏽" in UTF-16 units
    final = service.save_spans("ann", gid, [span | {"start": 18, "end": 29}, good], 1, True, "utf16")
    assert final.version == 2
    assert final.spans == [
        {"start": 0, "end": 7, "polarity": "good", "label": None, "comment": None},
        span,
    ]
    with any_db.read() as s:
        assert s.get(m.Assignment, item.assignment_id).status == m.AssignmentStatus.done
        (span_set,) = s.exec(select(m.SpanSet)).all()
        assert span_set.submitted and span_set.version == 2 and span_set.guideline_version == 1
    assert count(any_db, m.SpanAnnotation) == 2
    assert service.next_segment("ann", pid) is None
    assert service.next_segment("bob", pid) is None  # one submission was required
    progress = service.progress("ann", pid, task="segment")
    assert (progress.done_by_user, progress.project_done, progress.project_total) == (1, 1, 1)


def test_span_save_refuses_bad_spans_and_unassigned_generations(db, tmp_path):
    add_users(db, ["ann", "bob"])
    pid, _, (gid,) = seed_project(db, generations=1, texts=("e\u0301 plain text",))
    service = make_service(db, tmp_path)
    service.next_segment("ann", pid)
    with pytest.raises(Conflict, match="not assigned"):
        service.save_spans("bob", gid, [], 0)
    with pytest.raises(ServiceError, match=r"span 0: end 1 splits a character"):
        service.save_spans("ann", gid, [{"start": 0, "end": 1, "polarity": "bad"}], 0)
    with pytest.raises(ServiceError, match=r"span 1: label 'nope'"):
        service.save_spans(
            "ann",
            gid,
            [
                {"start": 0, "end": 2, "polarity": "bad"},
                {"start": 3, "end": 5, "polarity": "good", "label": "nope"},
            ],
            0,
        )
    with pytest.raises(NotFound):
        service.save_spans("ann", 10**6, [], 0)
    with pytest.raises(ServiceError, match="offsets"):
        service.save_spans("ann", gid, [], 0, offsets="bytes")
    assert count(db, m.SpanSet) == 0


def test_concurrent_span_saves_with_one_version_let_one_win(any_db, tmp_path):
    add_users(any_db, ["ann"])
    pid, _, (gid,) = seed_project(any_db, generations=1, texts=("some words to mark",))
    service = make_service(any_db, tmp_path)
    service.next_segment("ann", pid)
    service.save_spans("ann", gid, [], 0)
    barrier = threading.Barrier(6)

    def save(i: int):
        barrier.wait()
        try:
            return service.save_spans("ann", gid, [{"start": i, "end": i + 1, "polarity": "good"}], 1)
        except Conflict as exc:
            return exc

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(save, range(6)))
    wins = [r for r in results if not isinstance(r, Conflict)]
    assert len(wins) == 1 and wins[0].version == 2
    assert all(r.current["version"] == 2 for r in results if isinstance(r, Conflict))
    assert count(any_db, m.SpanAnnotation) == 1


def test_segment_overlap_drafts_first_and_suggestions(any_db, tmp_path, clock):
    names = ["ann", "bob", "cat"]
    add_users(any_db, names)
    pid, _, gids = seed_project(any_db, generations=8, overlap_fraction=0.5, overlap_k=2)
    service = make_service(any_db, tmp_path, clock)
    item = service.next_segment("ann", pid)
    assert item.suggestions == []
    with any_db.write() as s:
        ckpt = crud.get_or_create_checkpoint(s, path="seg", name="seg", kind=m.CheckpointKind.segment_reward)
        for ck_id, start in ((ckpt.id, 0), (ckpt.id, 9)):
            s.add(
                m.SpanSuggestion(
                    generation_id=item.generation_id,
                    checkpoint_id=ck_id,
                    start=start,
                    end=start + 6,
                    polarity="good" if start else "bad",
                    score=1.5,
                )
            )
    item = service.next_segment("ann", pid)  # resumed, now with the model's suggestions
    assert item.suggestions == [
        {"start": 0, "end": 6, "polarity": "bad", "label": None, "comment": None},
        {"start": 9, "end": 15, "polarity": "good", "label": None, "comment": None},
    ]
    service.save_spans("ann", item.generation_id, [{"start": 0, "end": 8, "polarity": "good"}], 0)
    for _ in range(3):
        clock.advance(hours=1)  # ann's reservation lapses; her draft brings the item back to her first
        again = service.next_segment("ann", pid)
        assert again.generation_id == item.generation_id and again.version == 1

    def work(name: str) -> list[int]:
        got = []
        while (it := service.next_segment(name, pid)) is not None:
            got.append(it.generation_id)
            service.save_spans(name, it.generation_id, [], it.version, submit=True)
        return got

    with ThreadPoolExecutor(max_workers=3) as pool:
        per_user = list(pool.map(work, names))
    for got in per_user:
        assert len(got) == len(set(got))
    with any_db.read() as s:
        sets = s.exec(select(m.SpanSet.generation_id).where(m.SpanSet.submitted)).all()
    need = {g: segment_required_votes(pid, g, 0.5, 2) for g in gids}
    assert Counter(sets) == need
    assert 1 < sum(need.values()) - len(gids) < len(gids)  # some, not all, needed two


# --------------------------------------------------------------------------- late saves (expired claims)


def test_expired_segment_claim_is_refused_once_someone_else_took_the_response(any_db, tmp_path, clock):
    add_users(any_db, ["ann", "bob"])
    pid, _, (gid,) = seed_project(any_db, generations=1, texts=("some words to mark",))
    service = make_service(any_db, tmp_path, clock)
    span = {"start": 0, "end": 4, "polarity": "good"}
    ann = service.next_segment("ann", pid)
    assert ann.generation_id == gid
    clock.advance(minutes=31)  # ann walked away: past the TTL
    bob = service.next_segment("bob", pid)
    assert bob is not None and bob.generation_id == gid
    for submit in (False, True):
        with pytest.raises(Conflict, match="expired and it went to someone else") as info:
            service.save_spans("ann", gid, [span], 0, submit=submit)
        assert info.value.current is None
    service.save_spans("bob", gid, [span], 0, submit=True)
    with pytest.raises(Conflict, match="went to someone else"):  # bob's submission fills it now
        service.save_spans("ann", gid, [span], 0, submit=True)
    with any_db.read() as s:
        sets = s.exec(select(m.SpanSet.user_id).where(m.SpanSet.submitted)).all()
    assert len(sets) == 1  # one span set was required; only bob's exists


def test_expired_draft_cannot_be_submitted_after_the_response_went_to_someone_else(any_db, tmp_path, clock):
    add_users(any_db, ["ann", "bob"])
    pid, _, (gid,) = seed_project(any_db, generations=1, texts=("some words to mark",))
    service = make_service(any_db, tmp_path, clock)
    service.next_segment("ann", pid)
    draft = service.save_spans("ann", gid, [{"start": 0, "end": 4, "polarity": "bad"}], 0)
    clock.advance(hours=1)
    assert service.next_segment("bob", pid).generation_id == gid  # ann's draft does not hold the item
    with pytest.raises(Conflict, match="went to someone else"):
        service.save_spans("ann", gid, [], draft.version, submit=True)
    service.save_spans("bob", gid, [], 0, submit=True)
    assert count(any_db, m.SpanSet, m.SpanSet.submitted) == 1


def test_late_span_save_is_kept_when_nobody_else_holds_the_response(any_db, tmp_path, clock):
    add_users(any_db, ["ann", "bob"])
    pid, _, (gid,) = seed_project(any_db, generations=1, texts=("some words to mark",))
    service = make_service(any_db, tmp_path, clock)
    service.next_segment("ann", pid)
    clock.advance(hours=2)  # expired, but nobody took it
    first = service.save_spans("ann", gid, [{"start": 0, "end": 4, "polarity": "good"}], 0)
    assert first.version == 1
    clock.advance(minutes=31)
    assert service.next_segment("bob", pid).generation_id == gid
    clock.advance(minutes=31)  # bob let it expire too: nobody holds it now
    final = service.save_spans("ann", gid, [], first.version, submit=True)
    assert final.version == 2
    assert service.next_segment("bob", pid) is None  # the response has its one span set
    # editing one's own submitted set stays possible, whoever holds the item
    assert service.save_spans("ann", gid, [], final.version, submit=True).version == 3


def test_a_late_span_submit_and_a_racing_claim_never_exceed_the_required_sets(
    any_db, tmp_path, clock, monkeypatch
):
    add_users(any_db, ["ann", "bob"])
    pid, _, (gid,) = seed_project(any_db, generations=1, texts=("some words to mark",))
    service = make_service(any_db, tmp_path, clock)
    service.next_segment("ann", pid)
    clock.advance(minutes=31)  # ann's reservation lapsed; nobody else holds the response yet
    in_save, bob_done = threading.Event(), threading.Event()
    real_replace = annotation_store.replace_spans

    def replace_and_hold(*args, **kw):  # before ann's assignment row is touched (no row lock yet)
        real_replace(*args, **kw)
        in_save.set()
        bob_done.wait(timeout=HOLD_S)

    monkeypatch.setattr(annotation_store, "replace_spans", replace_and_hold)
    saved, bobs = race(
        lambda: service.save_spans("ann", gid, [{"start": 0, "end": 4, "polarity": "good"}], 0, True),
        in_save,
        lambda: service.next_segment("bob", pid),
        bob_done,
    )
    assert saved.version == 1
    assert bobs is None  # ann's late submission filled the response; the claim saw it
    assert count(any_db, m.SpanSet, m.SpanSet.submitted) == 1
