"""Annotation votes (R-DB-02) on SQLite and PostgreSQL: idempotency, conflicts, payload checks,
identity and roles, skips, and the activity report."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest
from annotation_service_helpers import Clock, add_users, count, make_service, seed_project
from sqlmodel import select

from storage import crud
from storage import models as m
from studio.services.errors import Conflict, Forbidden, NotFound, ServiceError, Unauthorized


@pytest.fixture
def clock() -> Clock:
    return Clock()


# --------------------------------------------------------------------------- votes (R-DB-02)


def test_idempotent_votes_and_conflicts(any_db, tmp_path, clock):
    add_users(any_db, ["ann"])
    pid, _, _ = seed_project(any_db, comparisons=2)
    service = make_service(any_db, tmp_path, clock)
    item = service.next_pairwise("ann", pid)
    first = service.submit_vote("ann", item.assignment_id, "left", "clear", "better", "key-1", 1234)
    again = service.submit_vote("ann", item.assignment_id, "left", "clear", "better", "key-1", 99)
    assert (again.vote_id, again.outcome, again.replayed, first.replayed) == (
        first.vote_id,
        first.outcome,
        True,
        False,
    )
    with pytest.raises(Conflict, match="idempotency key"):
        service.submit_vote("ann", item.assignment_id, "right", "clear", "better", "key-1", 1234)
    with pytest.raises(Conflict, match="idempotency key"):
        service.submit_vote("ann", item.assignment_id, "left", "much", "better", "key-1", 1234)
    with pytest.raises(Conflict, match="already voted") as info:
        service.submit_vote("ann", item.assignment_id, "right", None, None, "key-2", 10)
    assert info.value.current == {"vote_id": first.vote_id, "outcome": first.outcome}
    with any_db.read() as s:
        (vote,) = s.exec(select(m.PairwiseVote)).all()
    assert (vote.id, vote.outcome, vote.strength, vote.rationale, vote.time_spent_ms) == (
        first.vote_id,
        first.outcome,
        "clear",
        "better",
        1234,
    )
    # a key reused on another item is refused too
    other = service.next_pairwise("ann", pid)
    with pytest.raises(Conflict, match="idempotency key"):
        service.submit_vote("ann", other.assignment_id, "left", "clear", "better", "key-1", 1)
    assert count(any_db, m.PairwiseVote) == 1


def test_racing_duplicates_store_one_vote(any_db, tmp_path):
    add_users(any_db, ["ann"])
    pid, _, _ = seed_project(any_db, comparisons=1)
    service = make_service(any_db, tmp_path)
    item = service.next_pairwise("ann", pid)
    barrier = threading.Barrier(8)

    def send(_):
        barrier.wait()
        return service.submit_vote("ann", item.assignment_id, "left", None, None, "same", 5)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(send, range(8)))
    assert len({r.vote_id for r in results}) == 1
    assert sum(not r.replayed for r in results) == 1
    assert count(any_db, m.PairwiseVote) == 1


def test_vote_records_guideline_version_and_clamped_time(any_db, tmp_path, clock):
    db = any_db
    add_users(db, ["ann"])
    pid, _, _ = seed_project(db, comparisons=3)
    clock.now = datetime.now(UTC)  # guideline rows are stamped with the real time
    service = make_service(db, tmp_path, clock)
    item = service.next_pairwise("ann", pid)
    assert (item.guideline_version, item.guideline_text) == (1, "Prefer helpful answers.")
    with db.write() as s:
        crud.add_guideline_version(s, project_id=pid, text="New rules.")
    clock.advance(seconds=12.5)
    v1 = service.submit_vote("ann", item.assignment_id, "right", None, None, "a", None)
    clock.advance(seconds=5)
    item2 = service.next_pairwise("ann", pid)
    assert item2.guideline_version == 2
    v2 = service.submit_vote("ann", item2.assignment_id, "left", None, None, "b", -40)
    item3 = service.next_pairwise("ann", pid)
    v3 = service.submit_vote("ann", item3.assignment_id, "tie", "clear", None, "c", 10**12)
    with db.read() as s:
        rows = {v.id: v for v in s.exec(select(m.PairwiseVote)).all()}
    assert (rows[v1.vote_id].guideline_version, rows[v1.vote_id].time_spent_ms) == (1, 12500)
    assert (rows[v2.vote_id].guideline_version, rows[v2.vote_id].time_spent_ms) == (2, 0)
    assert rows[v3.vote_id].time_spent_ms == 24 * 3600 * 1000
    assert rows[v3.vote_id].strength is None  # a tie carries no strength


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("up", None, None, "k", 1), "choice"),
        (("left", "huge", None, "k", 1), "strength"),
        (("left", None, "x" * 5001, "k", 1), "rationale"),
        (("left", None, None, "", 1), "idempotency_key"),
        (("left", None, None, "k" * 65, 1), "idempotency_key"),
        (("left", None, None, "k", 1.5), "time_spent_ms"),
    ],
)
def test_bad_vote_payloads_are_refused(db, tmp_path, args, message):
    add_users(db, ["ann"])
    pid, _, _ = seed_project(db, comparisons=1)
    service = make_service(db, tmp_path)
    item = service.next_pairwise("ann", pid)
    with pytest.raises(ServiceError, match=message):
        service.submit_vote("ann", item.assignment_id, *args)
    assert count(db, m.PairwiseVote) == 0


def test_nul_characters_and_reserved_import_keys_are_refused_on_both_backends(any_db, tmp_path):
    # PostgreSQL text cannot hold NUL (it raised a DataError, a 500 over the API); SQLite stored it.
    add_users(any_db, ["ann"])
    pid, _, _ = seed_project(any_db, comparisons=1)
    service = make_service(any_db, tmp_path)
    item = service.next_pairwise("ann", pid)
    for rationale, key, message in [
        ("a\x00b", "k1", "NUL"),
        (None, "k\x00", "NUL"),
        # The predictable keys of imported votes: claiming one would make that file's import fail for good.
        (None, f"import:{pid}:{'0' * 32}:1", "reserved"),
    ]:
        with pytest.raises(ServiceError, match=message):
            service.submit_vote("ann", item.assignment_id, "left", None, rationale, key, 1)
    assert count(any_db, m.PairwiseVote) == 0
    segment = service.next_segment("ann", pid)
    bad = [{"start": 0, "end": 1, "polarity": "bad", "label": None, "comment": "x\x00"}]
    with pytest.raises(ServiceError, match="span 0: comment may not contain NUL"):
        service.save_spans("ann", segment.generation_id, bad, 0)
    assert count(any_db, m.SpanSet) == 0
    assert service.submit_vote("ann", item.assignment_id, "left", None, "fine", "k1", 1).replayed is False


def test_identity_and_roles(db, tmp_path):
    add_users(db, ["ann", "bob"])
    add_users(db, ["rita"], role=m.Role.rater)
    add_users(db, ["root"], role=m.Role.admin)
    pid, (cid,), _ = seed_project(db, comparisons=1)
    service = make_service(db, tmp_path)
    with pytest.raises(Unauthorized):
        service.next_pairwise(None, pid)
    with pytest.raises(Unauthorized):
        service.next_pairwise("ghost", pid)
    with pytest.raises(Forbidden):
        service.next_pairwise("rita", pid)
    assert count(db, m.Assignment) == 0
    with pytest.raises(NotFound):
        service.next_pairwise("ann", 999)
    item = service.next_pairwise("ann", pid)
    with pytest.raises(NotFound):  # not bob's assignment
        service.submit_vote("bob", item.assignment_id, "left", None, None, "k", 1)
    with pytest.raises(NotFound):
        service.skip("bob", item.assignment_id)
    with pytest.raises(Forbidden):
        service.set_gold("ann", cid, "a")
    with pytest.raises(Forbidden):
        service.set_overlap("ann", pid, 0.5, 2)
    with pytest.raises(Forbidden):
        service.activity("ann", pid)
    service.set_gold("root", cid, "b")
    with db.read() as s:
        assert s.get(m.Comparison, cid).gold_outcome == "b"
    service.set_gold("root", cid, None)
    with pytest.raises(ServiceError, match="gold outcome"):
        service.set_gold("root", cid, "left")
    with db.read() as s:
        assert s.get(m.Comparison, cid).gold_outcome is None


def test_set_gold_checks_the_comparison_belongs_to_the_project(db, tmp_path):
    add_users(db, ["root"], role=m.Role.admin)
    pid, (cid,), _ = seed_project(db, comparisons=1)
    _other, (other_cid,), _ = seed_project(db, comparisons=1)
    service = make_service(db, tmp_path)
    with pytest.raises(NotFound, match=f"not in project {pid}"):
        service.set_gold("root", other_cid, "a", project_id=pid)
    service.set_gold("root", cid, "tie", project_id=pid)
    with db.read() as s:
        assert s.get(m.Comparison, other_cid).gold_outcome is None
        assert s.get(m.Comparison, cid).gold_outcome == "tie"


def test_skip_rules(db, tmp_path):
    add_users(db, ["ann"])
    pid, _, _ = seed_project(db, comparisons=2)
    service = make_service(db, tmp_path)
    item = service.next_pairwise("ann", pid)
    service.skip("ann", item.assignment_id)
    service.skip("ann", item.assignment_id)  # a repeated skip changes nothing
    with pytest.raises(Conflict, match="skipped"):
        service.submit_vote("ann", item.assignment_id, "left", None, None, "k", 1)
    nxt = service.next_pairwise("ann", pid)
    service.submit_vote("ann", nxt.assignment_id, "left", None, None, "k", 1)
    with pytest.raises(Conflict, match="done"):
        service.skip("ann", nxt.assignment_id)
    assert service.next_pairwise("ann", pid) is None


# --------------------------------------------------------------------------- activity


def test_activity_lists_who_did_what(db, tmp_path, clock):
    add_users(db, ["ann", "bob", "idle"])
    add_users(db, ["root"], role=m.Role.admin)
    pid, _, _ = seed_project(db, comparisons=4)
    service = make_service(db, tmp_path, clock)
    for i, ms in enumerate([1000, 3000, 8000]):
        item = service.next_pairwise("ann", pid)
        service.submit_vote("ann", item.assignment_id, "left", None, None, f"a{i}", ms)
    service.skip("bob", service.next_pairwise("bob", pid).assignment_id)
    seg = service.next_segment("bob", pid)
    clock.advance(minutes=5)
    service.save_spans("bob", seg.generation_id, [], 0, submit=True)
    rows = {r.username: r for r in service.activity("root", pid)}
    assert set(rows) == {"ann", "bob", "idle"}
    assert (rows["ann"].votes, rows["ann"].skips, rows["ann"].median_seconds) == (3, 0, 3.0)
    assert (rows["bob"].votes, rows["bob"].skips, rows["bob"].span_sets) == (0, 1, 1)
    assert rows["bob"].last_active == clock.now
    assert (rows["idle"].votes, rows["idle"].last_active, rows["idle"].median_seconds) == (0, None, None)
