"""The annotation queue, votes and span sets (R-DB-02, R-DB-05, R-DB-06) on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from sqlmodel import func, select

from storage import annotation as annotation_store
from storage import annotation_queue as queue_store
from storage import crud
from storage import models as m
from storage import users as user_crud
from storage.annotation_queue import QueueState, overlap_selected, segment_required_votes
from storage.db import Database
from studio.services.annotation import AnnotationService, outcome_for
from studio.services.errors import Conflict, Forbidden, NotFound, ServiceError, Unauthorized
from studio.services.users import UserService
from studio.settings import Settings


class Clock:
    """An injectable clock that only moves when told."""

    def __init__(self, start: datetime | None = None):
        self.now = start or datetime(2030, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw) -> None:
        self.now += timedelta(**kw)


def add_users(db: Database, names: list[str], role: m.Role = m.Role.annotator) -> None:
    with db.write() as s:
        for name in names:
            user_crud.insert_user(
                s, username=name, role=role, password_hash="not-a-hash", changed_at=datetime.now(UTC)
            )


def seed_project(
    db: Database,
    *,
    comparisons: int = 0,
    required: int = 1,
    generations: int = 0,
    labels: tuple[str, ...] = ("tone", "fact"),
    overlap_fraction: float = 0.0,
    overlap_k: int = 1,
    guidelines: str | None = "Prefer helpful answers.",
    texts: tuple[str, ...] | None = None,
) -> tuple[int, list[int], list[int]]:
    """A project with `comparisons` pairs (each needing `required` votes) and `generations` lone responses.

    Returns (project id, comparison ids, ids of the generations made for the segment task).
    """
    with db.write() as s:
        project = crud.create_project(
            s,
            name=f"p{datetime.now(UTC).timestamp()}",
            span_labels=list(labels),
            overlap_fraction=overlap_fraction,
            overlap_k=overlap_k,
        )
        if guidelines:
            crud.add_guideline_version(s, project_id=project.id, text=guidelines)
        ckpt = crud.get_or_create_checkpoint(s, path="tiny", name="tiny")
        comparison_ids, generation_ids = [], []
        for i in range(comparisons):
            prompt = m.Prompt(project_id=project.id, external_id=f"c{i}", kind="text", text=f"prompt {i}")
            s.add(prompt)
            s.flush()
            a = crud.add_generation(
                s, prompt_id=prompt.id, checkpoint_id=ckpt.id, text=f"A{i}", params={}, seed=0
            )
            b = crud.add_generation(
                s, prompt_id=prompt.id, checkpoint_id=ckpt.id, text=f"B{i}", params={}, seed=1
            )
            c = crud.add_comparison(
                s,
                project_id=project.id,
                prompt_id=prompt.id,
                generation_a_id=a.id,
                generation_b_id=b.id,
                required_votes=required,
            )
            comparison_ids.append(c.id)
        for i in range(generations):
            prompt = m.Prompt(project_id=project.id, external_id=f"g{i}", kind="text", text=f"ask {i}")
            s.add(prompt)
            s.flush()
            text = texts[i % len(texts)] if texts else f"response number {i} 👍🏽 done"
            g = crud.add_generation(
                s, prompt_id=prompt.id, checkpoint_id=ckpt.id, text=text, params={}, seed=0
            )
            generation_ids.append(g.id)
        return project.id, comparison_ids, generation_ids


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_service(db: Database, tmp_path, clock=None, **kw) -> AnnotationService:
    settings = Settings(data_dir=tmp_path / "data", database_url="sqlite://")
    users = UserService(db, settings)
    return AnnotationService(db, settings, users, **({"clock": clock} if clock else {}), **kw)


def count(db: Database, table, *where) -> int:
    with db.read() as s:
        return s.exec(select(func.count()).select_from(table).where(*where)).one()


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


HOLD_S = 1.5
"""How long a paused transaction waits for the racing request before it commits anyway."""


def race(first, pause_hook: threading.Event, second, release: threading.Event):
    """Run `first` in a thread until it signals `pause_hook` (inside its open transaction), then `second`.

    `first`'s transaction waits (up to HOLD_S) for `release`, which is set when `second` returns. A
    request that takes the queue lock therefore waits for `first` to commit; one that does not
    finishes while `first` is still open. Returns (first's result, second's result or exception).
    """

    def run_second():
        try:
            return second()
        except Conflict as exc:
            return exc
        finally:
            release.set()

    with ThreadPoolExecutor(max_workers=2) as pool:
        one = pool.submit(first)
        assert pause_hook.wait(timeout=30)
        two = pool.submit(run_second)
        return one.result(timeout=60), two.result(timeout=60)


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


def test_service_rejects_a_nonpositive_ttl(db, tmp_path):
    with pytest.raises(ValueError):
        make_service(db, tmp_path, ttl=timedelta(0))
