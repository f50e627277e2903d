"""The annotation queue (R-DB-05, R-DB-06) on SQLite and PostgreSQL: concurrent claims, reservations,
queue rules and overlap settings."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from annotation_service_helpers import HOLD_S, Clock, add_users, count, make_service, race, seed_project
from sqlmodel import select

from storage import annotation as annotation_store
from storage import annotation_queue as queue_store
from storage import models as m
from storage.annotation_queue import QueueState, overlap_selected, segment_required_votes
from storage.db import Database
from studio.services.annotation import AnnotationService, outcome_for
from studio.services.errors import Conflict, ServiceError


@pytest.fixture
def clock() -> Clock:
    return Clock()


# --------------------------------------------------------------------------- concurrency (R-DB-05)


def test_fifty_concurrent_next_requests_get_fifty_distinct_items(any_db: Database, tmp_path):
    names = [f"u{i}" for i in range(50)]
    add_users(any_db, names)
    pid, _, _ = seed_project(any_db, comparisons=60)
    service = make_service(any_db, tmp_path)
    barrier = threading.Barrier(50)

    def take(name: str):
        barrier.wait()
        return service.next_pairwise(name, pid)

    with ThreadPoolExecutor(max_workers=50) as pool:
        items = list(pool.map(take, names))
    assert all(item is not None for item in items)
    assert len({item.comparison_id for item in items}) == 50
    assert len({item.assignment_id for item in items}) == 50
    assert count(any_db, m.Assignment, m.Assignment.status == m.AssignmentStatus.reserved) == 50


def test_concurrent_requests_respect_overlap_k(any_db: Database, tmp_path):
    """k=2 items, 6 annotators working in parallel until the queue is empty: exactly 2 votes each."""
    names = [f"a{i}" for i in range(6)]
    add_users(any_db, names)
    pid, comparison_ids, _ = seed_project(any_db, comparisons=12, required=2)
    service = make_service(any_db, tmp_path)

    def work(name: str) -> list[int]:
        seen = []
        while (item := service.next_pairwise(name, pid)) is not None:
            seen.append(item.comparison_id)
            service.submit_vote(name, item.assignment_id, "left", None, None, f"{name}-{len(seen)}", 1000)
        return seen

    with ThreadPoolExecutor(max_workers=6) as pool:
        per_user = list(pool.map(work, names))
    for seen in per_user:
        assert len(seen) == len(set(seen))  # nobody was given an item twice
    with any_db.read() as s:
        votes = s.exec(select(m.PairwiseVote.comparison_id, m.PairwiseVote.user_id)).all()
    per_item = Counter(c for c, _ in votes)
    assert per_item == dict.fromkeys(comparison_ids, 2)
    assert len(set(votes)) == len(votes) == 24


def test_a_late_vote_and_a_racing_claim_never_exceed_the_required_votes(any_db, tmp_path, clock, monkeypatch):
    """R-DB-05 on an expired reservation: the vote's checks and a claim are serialised by the queue lock."""
    add_users(any_db, ["ann", "bob"])
    pid, _, _ = seed_project(any_db, comparisons=1)
    service = make_service(any_db, tmp_path, clock)
    item = service.next_pairwise("ann", pid)
    clock.advance(minutes=31)  # ann's reservation lapsed; nobody else holds the item yet
    in_vote, bob_done = threading.Event(), threading.Event()
    real_add_vote = annotation_store.add_vote

    def add_vote_and_hold(*args, **kw):
        vote = real_add_vote(*args, **kw)
        in_vote.set()
        bob_done.wait(timeout=HOLD_S)
        return vote

    monkeypatch.setattr(annotation_store, "add_vote", add_vote_and_hold)
    vote, bobs = race(
        lambda: service.submit_vote("ann", item.assignment_id, "left", None, None, "late", None),
        in_vote,
        lambda: service.next_pairwise("bob", pid),
        bob_done,
    )
    assert not vote.replayed
    assert bobs is None  # the late vote filled the item; the claim saw it
    assert count(any_db, m.PairwiseVote) == 1
    assert count(any_db, m.Assignment, m.Assignment.status == m.AssignmentStatus.reserved) == 0


def test_a_skip_racing_a_vote_never_leaves_a_vote_on_a_skipped_assignment(any_db, tmp_path, monkeypatch):
    add_users(any_db, ["ann"])
    pid, _, _ = seed_project(any_db, comparisons=2)
    service = make_service(any_db, tmp_path)
    item = service.next_pairwise("ann", pid)
    in_vote, skip_done = threading.Event(), threading.Event()
    real_finish = queue_store.finish_assignment

    def finish_and_hold(session, assignment, *, status, now):
        real_finish(session, assignment, status=status, now=now)
        if status == m.AssignmentStatus.done:
            in_vote.set()
            skip_done.wait(timeout=HOLD_S)

    monkeypatch.setattr(queue_store, "finish_assignment", finish_and_hold)
    vote, skipped = race(
        lambda: service.submit_vote("ann", item.assignment_id, "tie", None, None, "k", 5),
        in_vote,
        lambda: service.skip("ann", item.assignment_id),
        skip_done,
    )
    assert not vote.replayed
    assert isinstance(skipped, Conflict) and "already done" in str(skipped)
    with any_db.read() as s:
        assert s.get(m.Assignment, item.assignment_id).status == m.AssignmentStatus.done
    assert count(any_db, m.PairwiseVote) == 1


# --------------------------------------------------------------------------- queue rules


def test_own_reservation_is_resumed_and_expired_one_returns_to_the_pool(any_db, tmp_path, clock):
    add_users(any_db, ["ann", "bob"])
    pid, (cid,), _ = seed_project(any_db, comparisons=1)
    service = make_service(any_db, tmp_path, clock)
    first = service.next_pairwise("ann", pid)
    assert first.comparison_id == cid
    assert first.expires_at == clock.now + timedelta(minutes=30)
    assert service.next_pairwise("ann", pid).assignment_id == first.assignment_id  # resumed
    assert service.next_pairwise("bob", pid) is None  # the only item is held

    clock.advance(minutes=29)
    assert service.next_pairwise("bob", pid) is None
    clock.advance(minutes=2)  # ann abandoned it: past the TTL
    again = service.next_pairwise("bob", pid)
    assert again is not None and again.comparison_id == cid
    with any_db.read() as s:
        assert s.get(m.Assignment, first.assignment_id).status == m.AssignmentStatus.expired
    # ann's late vote loses: the item went to bob
    with pytest.raises(Conflict, match="expired"):
        service.submit_vote("ann", first.assignment_id, "left", None, None, "late", None)
    assert service.next_pairwise("ann", pid) is None
    service.submit_vote("bob", again.assignment_id, "right", "clear", None, "bob-1", None)
    assert count(any_db, m.PairwiseVote) == 1


def test_late_vote_is_kept_when_nobody_took_the_item(db, tmp_path, clock):
    add_users(db, ["ann"])
    pid, _, _ = seed_project(db, comparisons=1)
    service = make_service(db, tmp_path, clock)
    item = service.next_pairwise("ann", pid)
    clock.advance(hours=2)
    result = service.submit_vote("ann", item.assignment_id, "tie", None, None, "k", None)
    assert not result.replayed and result.outcome == "tie"
    with db.read() as s:
        vote = s.get(m.PairwiseVote, result.vote_id)
        assert vote.time_spent_ms == 2 * 3600 * 1000  # measured from the reservation


def test_late_vote_is_kept_when_the_next_taker_also_let_it_expire(any_db, tmp_path, clock):
    db = any_db
    add_users(db, ["ann", "bob"])
    pid, _, _ = seed_project(db, comparisons=1)
    service = make_service(db, tmp_path, clock)
    item = service.next_pairwise("ann", pid)
    clock.advance(minutes=31)
    bobs = service.next_pairwise("bob", pid)
    assert bobs.comparison_id == item.comparison_id
    with pytest.raises(Conflict, match="went to someone else"):  # bob's live reservation wins
        service.submit_vote("ann", item.assignment_id, "left", None, None, "late", None)
    clock.advance(minutes=31)  # bob's reservation is past its TTL too: nobody holds the item now
    result = service.submit_vote("ann", item.assignment_id, "left", None, None, "late", None)
    assert not result.replayed and count(db, m.PairwiseVote) == 1
    assert service.next_pairwise("bob", pid) is None  # the item has its vote


def test_nobody_is_given_an_item_they_voted_on_or_skipped(any_db, tmp_path, clock):
    add_users(any_db, ["ann", "bob"])
    pid, comparison_ids, _ = seed_project(any_db, comparisons=6, required=2)
    service = make_service(any_db, tmp_path, clock)
    given = []
    while (item := service.next_pairwise("ann", pid)) is not None:
        given.append(item.comparison_id)
        if len(given) % 3 == 0:
            service.skip("ann", item.assignment_id)
        else:
            service.submit_vote("ann", item.assignment_id, "left", None, None, f"k{len(given)}", 5)
        clock.advance(hours=1)  # even after every reservation would have expired
    assert sorted(given) == sorted(comparison_ids)
    # bob still gets every item: each needs 2 annotators
    bob = []
    while (item := service.next_pairwise("bob", pid)) is not None:
        bob.append(item.comparison_id)
        service.submit_vote("bob", item.assignment_id, "right", None, None, f"b{len(bob)}", 5)
    assert sorted(bob) == sorted(comparison_ids)
    progress = service.progress("ann", pid)
    assert (progress.done_by_user, progress.remaining_for_user) == (4, 0)
    assert (progress.project_done, progress.project_total) == (10, 12)


def test_items_with_votes_come_first(db, tmp_path):
    add_users(db, ["ann", "bob"])
    pid, _, _ = seed_project(db, comparisons=5, required=2)
    service = make_service(db, tmp_path)
    skipped = service.next_pairwise("ann", pid)
    service.skip("ann", skipped.assignment_id)
    second = service.next_pairwise("ann", pid)
    assert second.comparison_id != skipped.comparison_id
    service.submit_vote("ann", second.assignment_id, "left", None, None, "x", 10)
    # bob is steered to the item that already has a vote, so its overlap set completes
    assert service.next_pairwise("bob", pid).comparison_id == second.comparison_id


def test_stale_candidates_are_checked_again_under_the_lock(db, tmp_path, monkeypatch):
    """The read phase offers an item someone took meanwhile: the claim re-checks and re-queries."""
    add_users(db, ["ann", "bob"])
    pid, comparison_ids, _ = seed_project(db, comparisons=3)
    service = make_service(db, tmp_path)
    bobs = service.next_pairwise("bob", pid)
    real_queue = AnnotationService._queue
    calls = []

    def stale_first(s, user, project, task, now, limit=1):
        calls.append(limit)
        state = real_queue(s, user, project, task, now, limit)
        if len(calls) == 1:  # what a read that raced bob's claim would have seen
            return QueueState([(bobs.comparison_id, 0)], state.counts)
        return state

    monkeypatch.setattr(AnnotationService, "_queue", staticmethod(stale_first))
    item = service.next_pairwise("ann", pid)
    assert item.comparison_id != bobs.comparison_id and item.comparison_id in comparison_ids
    assert calls == [64, 1]  # the read, then the fallback under the lock
    assert count(db, m.Assignment, m.Assignment.status == m.AssignmentStatus.reserved) == 2


def test_left_right_is_randomised_per_assignment_and_mapped_to_a_b(db, tmp_path):
    names = [f"u{i}" for i in range(40)]
    add_users(db, names)
    pid, comparison_ids, _ = seed_project(db, comparisons=1, required=40)
    service = make_service(db, tmp_path)
    with db.read() as s:
        comparison = s.get(m.Comparison, comparison_ids[0])
    sides = Counter()
    for i, name in enumerate(names):
        item = service.next_pairwise(name, pid)
        assert {item.left_generation_id, item.right_generation_id} == {
            comparison.generation_a_id,
            comparison.generation_b_id,
        }
        a_left = item.left_generation_id == comparison.generation_a_id
        sides[a_left] += 1
        assert item.left_text == ("A0" if a_left else "B0")
        choice = "left" if i % 2 else "right"
        result = service.submit_vote(name, item.assignment_id, choice, "slight", None, f"k{i}", 100)
        assert result.outcome == outcome_for(choice, a_left)
        with db.read() as s:
            vote = s.get(m.PairwiseVote, result.vote_id)
        assert vote.left_generation_id == item.left_generation_id
        chosen = item.left_generation_id if choice == "left" else item.right_generation_id
        assert chosen == (comparison.generation_a_id if vote.outcome == "a" else comparison.generation_b_id)
    assert sides[True] >= 8 and sides[False] >= 8


# --------------------------------------------------------------------------- overlap settings


def test_set_overlap_rederives_only_unvoted_comparisons(any_db, tmp_path):
    add_users(any_db, ["ann"])
    add_users(any_db, ["root"], role=m.Role.admin)
    pid, comparison_ids, _ = seed_project(any_db, comparisons=40)
    service = make_service(any_db, tmp_path)
    item = service.next_pairwise("ann", pid)
    service.submit_vote("ann", item.assignment_id, "left", None, None, "k", 1)
    assert service.set_overlap("root", pid, 0.5, 3) == 39
    with any_db.read() as s:
        required = dict(s.exec(select(m.Comparison.id, m.Comparison.required_votes)).all())
        project = s.get(m.Project, pid)
    assert (project.overlap_fraction, project.overlap_k) == (0.5, 3)
    assert required[item.comparison_id] == 1  # it has a vote: left alone
    for cid in comparison_ids:
        if cid != item.comparison_id:
            assert required[cid] == (3 if overlap_selected(pid, cid, 0.5) else 1)
    assert 12 <= sum(r == 3 for r in required.values()) <= 27  # about half
    for bad in [(-0.1, 2), (1.5, 2), (0.5, 0), (0.5, 2.5)]:
        with pytest.raises(ServiceError):
            service.set_overlap("root", pid, *bad)


def test_overlap_hash_is_stable_and_tracks_the_fraction():
    assert overlap_selected(7, 123, 0.3) == overlap_selected(7, 123, 0.3)
    for fraction in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0):
        share = sum(overlap_selected(3, i, fraction) for i in range(1, 1001)) / 1000
        assert abs(share - fraction) <= 0.01
    assert segment_required_votes(3, 5, 1.0, 4) == 4
    assert segment_required_votes(3, 5, 0.0, 4) == 1
    assert segment_required_votes(3, 5, 1.0, 1) == 1


def test_service_rejects_a_nonpositive_ttl(db, tmp_path):
    with pytest.raises(ValueError):
        make_service(db, tmp_path, ttl=timedelta(0))
