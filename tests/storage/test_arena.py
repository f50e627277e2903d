"""Arena storage: migration 0004, who plays (auto-arena through register_checkpoint), prompts, battles."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from storage import annotation_queue as q
from storage import arena as store
from storage import crud
from storage import jobs as job_store
from storage.db import Database, check, downgrade, sqlite_url, upgrade
from storage.models import (
    ArenaModel,
    Assignment,
    AssignmentStatus,
    Checkpoint,
    CheckpointKind,
    Comparison,
    ComparisonPurpose,
    PairwiseVote,
    Prompt,
    RewardScore,
    TaskKind,
    User,
)

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def _user(s, name: str, role: str = "rater") -> User:
    user = User(username=name, role=role)
    s.add(user)
    s.flush()
    return user


def _checkpoint(s, name: str, parent: int | None = None, project: int | None = None) -> Checkpoint:
    row = Checkpoint(
        name=name, path=f"/ck/{name}", kind=CheckpointKind.policy, parent_id=parent, project_id=project
    )
    s.add(row)
    s.flush()
    return row


def _prompt(s, project_id: int, ext: str, tags: list[str] | None = None) -> Prompt:
    row = Prompt(project_id=project_id, external_id=ext, kind="text", text=f"prompt {ext}", tags=tags)
    s.add(row)
    s.flush()
    return row


def _battle(s, project_id, prompt_id, ck_a, ck_b, *, purpose=ComparisonPurpose.arena, texts=("A", "B")):
    ga = crud.add_generation(s, prompt_id=prompt_id, checkpoint_id=ck_a, text=texts[0], params={}, seed=1,
                             num_tokens=3)  # fmt: skip
    gb = crud.add_generation(s, prompt_id=prompt_id, checkpoint_id=ck_b, text=texts[1], params={}, seed=2)
    return crud.add_comparison(s, project_id=project_id, prompt_id=prompt_id, generation_a_id=ga.id,
                               generation_b_id=gb.id, purpose=purpose)  # fmt: skip


def _assign(s, user_id, project_id, comparison_id, *, expires=NOW + timedelta(minutes=30)) -> Assignment:
    return q.add_assignment(s, user_id=user_id, project_id=project_id, task=TaskKind.arena, now=NOW,
                            expires_at=expires, comparison_id=comparison_id)  # fmt: skip


def _vote(
    s, comparison: Comparison, user_id: int, outcome: str, key: str, left_is_a: bool = True
) -> PairwiseVote:
    vote = PairwiseVote(
        comparison_id=comparison.id,
        user_id=user_id,
        outcome=outcome,
        left_generation_id=comparison.generation_a_id if left_is_a else comparison.generation_b_id,
        idempotency_key=key,
        created_at=NOW,
    )
    s.add(vote)
    s.flush()
    return vote


# --------------------------------------------------------------------------- migration 0004


def _fill_at_0003(db: Database) -> None:
    """Rows of every table 0004 touches, written while the schema is at 0003."""
    with db.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO users (id, username, role, is_active, created_at) "
            "VALUES (1, 'ann', 'annotator', true, '2026-01-01 00:00:00')"
        )
        conn.exec_driver_sql(
            "INSERT INTO projects (id, name, description, overlap_fraction, overlap_k, is_demo, created_at) "
            "VALUES (1, 'p', '', 0, 1, false, '2026-01-01 00:00:00')"
        )
        conn.exec_driver_sql(
            "INSERT INTO prompts (id, project_id, external_id, kind, text, created_at) "
            "VALUES (1, 1, 'x', 'text', 'hi', '2026-01-01 00:00:00')"
        )
        conn.exec_driver_sql(
            "INSERT INTO checkpoints (id, name, path, kind, status, created_at) "
            "VALUES (1, 'base', 'tiny', 'policy', 'ready', '2026-01-01 00:00:00')"
        )
        for gid, text in ((1, "one"), (2, "two")):
            conn.exec_driver_sql(
                "INSERT INTO generations (id, prompt_id, checkpoint_id, text, sample_index, created_at) "
                f"VALUES ({gid}, 1, 1, '{text}', 0, '2026-01-01 00:00:00')"
            )
        conn.exec_driver_sql(
            "INSERT INTO comparisons (id, project_id, prompt_id, generation_a_id, generation_b_id, purpose, "
            "a_on_left, required_votes, created_at) VALUES (1, 1, 1, 1, 2, 'annotate', true, 1, '2026-01-01 00:00:00')"
        )
        conn.exec_driver_sql(
            "INSERT INTO assignments (id, user_id, project_id, task, comparison_id, status, reserved_at, expires_at) "
            "VALUES (1, 1, 1, 'pairwise', 1, 'done', '2026-01-01 00:00:00', '2026-01-01 00:30:00')"
        )
        conn.exec_driver_sql(
            "INSERT INTO pairwise_votes (id, comparison_id, user_id, outcome, left_generation_id, assignment_id, "
            "idempotency_key, created_at) VALUES (1, 1, 1, 'a', 1, 1, 'k1', '2026-01-01 00:00:00')"
        )
    if db.engine.dialect.name == "postgresql":  # explicit ids do not move PostgreSQL's sequences
        with db.engine.begin() as conn:
            for table in ("users", "projects", "prompts", "checkpoints", "generations", "comparisons",
                          "assignments", "pairwise_votes"):  # fmt: skip
                conn.exec_driver_sql(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), 10)")


def _check_upgrade_from_0003(db: Database) -> None:
    _fill_at_0003(db)
    upgrade(db.engine)
    check(db.engine)
    with db.read() as s:
        vote = s.exec(select(PairwiseVote)).one()
        assert (vote.idempotency_key, vote.outcome, vote.assignment_id) == ("k1", "a", 1)
        assert s.get(Assignment, 1).task == TaskKind.pairwise
    with db.write() as s:  # the new tables and the new task kind take rows
        s.add(ArenaModel(project_id=1, checkpoint_id=1, source="auto", is_anchor=True))
        s.add(RewardScore(checkpoint_id=1, generation_id=1, score=0.25))
        arena = crud.add_comparison(s, project_id=1, prompt_id=1, generation_a_id=2, generation_b_id=1,
                                    purpose=ComparisonPurpose.arena)  # fmt: skip
        held = _assign(s, 1, 1, arena.id)
        s.add(PairwiseVote(comparison_id=arena.id, user_id=1, outcome="tie", left_generation_id=2,
                           assignment_id=held.id, idempotency_key="k2"))  # fmt: skip
    for row in (ArenaModel(project_id=1, checkpoint_id=1, source="manual"),
                RewardScore(checkpoint_id=1, generation_id=1, score=1.0)):  # fmt: skip
        with pytest.raises(IntegrityError), db.write() as s:
            s.add(row)
            s.flush()
    downgrade(db.engine, "0003")
    tables = set(sa.inspect(db.engine).get_table_names())
    assert not {"arena_models", "reward_scores"} & tables
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT task FROM assignments ORDER BY id").scalars().all() == [
            "pairwise"
        ]
        kept = conn.exec_driver_sql(
            "SELECT idempotency_key, assignment_id FROM pairwise_votes ORDER BY id"
        ).all()
        assert [tuple(r) for r in kept] == [("k1", 1), ("k2", None)]
    with pytest.raises(sa.exc.IntegrityError), db.engine.begin() as conn:  # 'arena' is refused again
        conn.exec_driver_sql(
            "INSERT INTO assignments (user_id, project_id, task, status, reserved_at, expires_at) "
            "VALUES (1, 1, 'arena', 'reserved', '2026-01-01 00:00:00', '2026-01-01 00:30:00')"
        )
    upgrade(db.engine)
    check(db.engine)


def test_upgrade_from_0003_keeps_rows_adds_arena_tables_and_downgrades(tmp_path):
    db = Database.from_url(sqlite_url(tmp_path / "old.db"))
    upgrade(db.engine, "0003")
    _check_upgrade_from_0003(db)
    db.dispose()


def test_postgres_upgrade_from_0003(pg_db: Database):
    downgrade(pg_db.engine, "0003")
    _check_upgrade_from_0003(pg_db)


# --------------------------------------------------------------------------- who plays


def _project(s) -> int:
    return crud.create_project(s, name=f"p{datetime.now(UTC).timestamp()}").id


def _entries(db, project_id):
    with db.read() as s:
        return {e.checkpoint_id: e for e in store.list_entries(s, project_id=project_id)}


def test_enter_arena_adds_parent_as_anchor_then_keeps_the_anchor(db: Database):
    with db.write() as s:
        pid = _project(s)
        base = _checkpoint(s, "base")
        one = _checkpoint(s, "one", parent=base.id, project=pid)
        store.enter_arena(s, pid, one.id)
        two = _checkpoint(s, "two", parent=one.id, project=pid)
        store.enter_arena(s, pid, two.id)
        store.enter_arena(s, pid, two.id)  # idempotent
    entries = _entries(db, pid)
    assert set(entries) == {base.id, one.id, two.id}
    assert [c for c, e in entries.items() if e.is_anchor] == [base.id]  # one's parent never displaces it
    assert all(e.active and e.source == "auto" for e in entries.values())
    assert entries[two.id].parent_id == one.id and entries[two.id].name == "two"


def test_removed_models_stay_removed_for_auto_entries_and_manual_add_brings_them_back(db: Database):
    with db.write() as s:
        pid = _project(s)
        base = _checkpoint(s, "base")
        one = _checkpoint(s, "one", parent=base.id, project=pid)
        store.enter_arena(s, pid, one.id)
        assert store.remove_model(s, project_id=pid, checkpoint_id=base.id)
        assert store.anchor_of(s, project_id=pid) is None
        assert not store.remove_model(s, project_id=pid, checkpoint_id=999)
        two = _checkpoint(s, "two", parent=base.id, project=pid)
        store.enter_arena(s, pid, two.id)  # the removed parent is not revived, nor made the anchor
    entries = _entries(db, pid)
    assert not entries[base.id].active and not entries[base.id].is_anchor
    with db.write() as s:
        store.add_model(s, project_id=pid, checkpoint_id=base.id, source="manual")
        store.set_anchor(s, project_id=pid, checkpoint_id=two.id)
        store.set_anchor(s, project_id=pid, checkpoint_id=one.id)
        assert store.anchor_of(s, project_id=pid) == one.id
    entries = _entries(db, pid)
    assert entries[base.id].active
    assert [c for c, e in entries.items() if e.is_anchor] == [one.id]
    with db.read() as s:
        assert [e.checkpoint_id for e in store.list_entries(s, project_id=pid, active_only=True)] == [
            base.id, one.id, two.id,
        ]  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "with_project", "with_parent", "entered"),
    [
        (CheckpointKind.policy, True, True, True),
        (CheckpointKind.reward, True, True, False),
        (CheckpointKind.policy, False, True, False),
        (CheckpointKind.policy, True, False, False),
    ],
    ids=["policy", "reward-model", "no-project", "no-parent"],
)
def test_register_checkpoint_enters_new_policies_with_their_parent(
    db, tmp_path, kind, with_project, with_parent, entered
):
    with db.write() as s:
        pid = _project(s)
        base = _checkpoint(s, "base")
        job = job_store.create_job(
            s, recipe="dpo", config={}, jobs_dir=tmp_path, project_id=pid if with_project else None,
            base_checkpoint_id=base.id if with_parent else None,
        )  # fmt: skip
        for _ in range(2):  # a rerun registers the same folder again
            row = job_store.register_checkpoint(s, job=job, path="/jobs/1/final", kind=kind, name="dpo #1",
                                                manifest_sha256="a" * 64, studio={})  # fmt: skip
    entries = _entries(db, pid)
    if entered:
        assert set(entries) == {base.id, row.id} and entries[base.id].is_anchor
    else:
        assert entries == {}


def test_a_parent_from_another_project_does_not_enter_the_arena(db: Database, tmp_path):
    # A job may start from another project's checkpoint; that one is not this project's to rate
    # (the admin API refuses it too). A studio-wide base model (no project) does enter.
    with db.write() as s:
        pid, other = _project(s), _project(s)
        foreign = _checkpoint(s, "foreign", project=other)
        job = job_store.create_job(s, recipe="dpo", config={}, jobs_dir=tmp_path, project_id=pid,
                                   base_checkpoint_id=foreign.id)  # fmt: skip
        row = job_store.register_checkpoint(s, job=job, path="/jobs/x/final", kind=CheckpointKind.policy,
                                            name="x", manifest_sha256=None, studio={})  # fmt: skip
        own = _checkpoint(s, "own", parent=row.id, project=pid)
        store.enter_arena(s, pid, own.id)
    entries = _entries(db, pid)
    assert set(entries) == {row.id, own.id}
    assert [c for c, e in entries.items() if e.is_anchor] == [row.id]  # the foreign one is no anchor either
    assert _entries(db, other) == {}


# --------------------------------------------------------------------------- prompts


def test_eval_prompts_are_the_tagged_ones_else_all_but_typed(db: Database):
    with db.write() as s:
        pid = _project(s)
        plain = _prompt(s, pid, "plain")
        near = _prompt(s, pid, "near", ["evaluation"])  # not the tag "eval"
        typed = store.upsert_typed_prompt(s, project_id=pid, text="Tell me a joke.")
    with db.read() as s:
        assert [i for i, _ in store.eval_prompts(s, project_id=pid)] == [plain.id, near.id]
    with db.write() as s:
        tagged = _prompt(s, pid, "t1", ["x", "eval"])
        arena = _prompt(s, pid, "t2", ["arena"])
    with db.read() as s:
        assert store.eval_prompts(s, project_id=pid) == [(tagged.id, "prompt t1"), (arena.id, "prompt t2")]
        assert typed.id not in dict(store.eval_prompts(s, project_id=pid))


def test_typed_prompts_are_stored_once_per_text(db: Database):
    with db.write() as s:
        pid = _project(s)
        first = store.upsert_typed_prompt(s, project_id=pid, text="Write a haiku about rain.")
        again = store.upsert_typed_prompt(s, project_id=pid, text="Write a haiku about rain.")
        other = store.upsert_typed_prompt(s, project_id=pid, text="Write a haiku about rain!")
    assert first.id == again.id != other.id
    # The external id is the prefix plus the first 16 hex digits of the text's sha256.
    digest = hashlib.sha256(b"Write a haiku about rain.").hexdigest()[:16]
    assert first.external_id == f"arena-typed-{digest}" and first.tags == ["arena-typed"]
    assert first.text == "Write a haiku about rain." and first.source == "arena"


def test_a_typed_prompt_inserted_concurrently_is_read_back_not_a_failure(any_db: Database, monkeypatch):
    # Two raters type the same text: both miss it, the other commits first. Simulated by hiding the
    # committed row from the first lookup; the insert hits the unique constraint in its savepoint and
    # the winner's row comes back, with the transaction still usable.
    with any_db.write() as s:
        pid = _project(s)
        winner = store.upsert_typed_prompt(s, project_id=pid, text="Same text.")
    lookups = []
    real = store._find_prompt

    def racing(session, project_id, external_id):
        lookups.append(external_id)
        return None if len(lookups) == 1 else real(session, project_id, external_id)

    monkeypatch.setattr(store, "_find_prompt", racing)
    with any_db.write() as s:
        got = store.upsert_typed_prompt(s, project_id=pid, text="Same text.")
        assert got.id == winner.id and len(lookups) == 2
        later = _prompt(s, pid, "after")  # the transaction goes on
    with any_db.read() as s:
        assert s.get(Prompt, later.id) is not None
        assert len(s.exec(select(Prompt).where(Prompt.external_id == winner.external_id)).all()) == 1


# --------------------------------------------------------------------------- battles and votes


def test_counted_battles_pair_counts_and_vote_state(db: Database):
    with db.write() as s:
        pid = _project(s)
        ann, rae = _user(s, "ann", "annotator"), _user(s, "rae")
        x, y, z = (_checkpoint(s, n, project=pid) for n in ("x", "y", "z"))
        p = _prompt(s, pid, "p")
        b1 = _battle(s, pid, p.id, x.id, y.id, texts=("## Title\n- a", "plain"))
        b2 = _battle(s, pid, p.id, y.id, x.id)
        b3 = _battle(s, pid, p.id, x.id, z.id)
        annotate = _battle(s, pid, p.id, x.id, y.id, purpose=ComparisonPurpose.annotate)
        v1 = _vote(s, b1, ann.id, "a", "k1", left_is_a=False)
        _vote(s, b1, rae.id, "tie", "k2")
        _vote(s, b2, rae.id, "b", "k3")
        _vote(s, b3, rae.id, "both_bad", "k4")
        _vote(s, annotate, rae.id, "a", "k5")  # annotation votes never count in the arena
    with db.read() as s:
        rows = store.counted_battles(s, project_id=pid)
        counts = store.pair_counts(s, project_id=pid)
        state = store.vote_state(s, project_id=pid)
    assert [(r.battle_id, r.model_a, r.model_b, r.outcome, r.username) for r in rows] == [
        (b1.id, x.id, y.id, "a", "ann"), (b1.id, x.id, y.id, "tie", "rae"), (b2.id, y.id, x.id, "b", "rae"),
        (b3.id, x.id, z.id, "both_bad", "rae"),
    ]  # fmt: skip
    first = rows[0]
    assert (first.vote_id, first.left_is_a, rows[1].left_is_a) == (v1.id, False, True)
    assert (first.text_a, first.text_b, first.tokens_a, first.tokens_b) == ("## Title\n- a", "plain", 3, None)
    assert first.prompt_text == "prompt p" and first.created_at == NOW
    assert counts == {(min(x.id, y.id), max(x.id, y.id)): 3, (min(x.id, z.id), max(x.id, z.id)): 1}
    assert state[0] == 4 and state[1] >= v1.id


def test_pending_battle_release_seen_prompts_and_find_battle(db: Database):
    with db.write() as s:
        pid = _project(s)
        rae, rob = _user(s, "rae"), _user(s, "rob")
        x, y = _checkpoint(s, "x", project=pid), _checkpoint(s, "y", project=pid)
        p1, p2 = _prompt(s, pid, "1"), _prompt(s, pid, "2")
        b1 = _battle(s, pid, p1.id, x.id, y.id)
        held = _assign(s, rae.id, pid, b1.id)
        _assign(s, rob.id, pid, _battle(s, pid, p2.id, y.id, x.id).id, expires=NOW - timedelta(seconds=1))
    with db.read() as s:
        assert store.pending_battle(s, project_id=pid, user_id=rae.id, now=NOW).id == held.id
        assert store.pending_battle(s, project_id=pid, user_id=rae.id, now=NOW + timedelta(hours=1)) is None
        assert store.pending_battle(s, project_id=pid, user_id=rob.id, now=NOW) is None  # expired
        # The annotation queue never sees an arena reservation.
        assert q.live_reservation(s, user_id=rae.id, project_id=pid, task=TaskKind.pairwise, now=NOW) is None
        assert store.seen_prompts(s, project_id=pid, user_id=rae.id, checkpoint_ids=(y.id, x.id)) == {p1.id}
        assert store.seen_prompts(s, project_id=pid, user_id=rob.id, checkpoint_ids=(x.id, y.id)) == {p2.id}
        assert store.find_battle(s, generation_ids=(b1.generation_b_id, b1.generation_a_id)).id == b1.id
        assert store.rater_assignment(s, comparison_id=b1.id, user_id=rae.id).id == held.id
    with db.write() as s:
        assert store.release_pending(s, project_id=pid, user_id=rae.id, now=NOW) == 1
    with db.read() as s:
        assert s.get(Assignment, held.id).status == AssignmentStatus.skipped
        assert store.pending_battle(s, project_id=pid, user_id=rae.id, now=NOW) is None


def test_shown_generations_are_those_of_every_battle_the_user_was_given(db: Database):
    with db.write() as s:
        pid, other_project = _project(s), _project(s)
        rae, rob = _user(s, "rae"), _user(s, "rob")
        a, b, c = _checkpoint(s, "a"), _checkpoint(s, "b"), _checkpoint(s, "c")
        p1, p2 = _prompt(s, pid, "1"), _prompt(s, other_project, "2")
        voted = _battle(s, pid, p1.id, a.id, b.id)
        _vote(s, voted, rae.id, "a", "k1")
        _assign(s, rae.id, pid, voted.id)
        given_back = _battle(s, pid, p1.id, b.id, c.id)
        q.finish_assignment(
            s, _assign(s, rae.id, pid, given_back.id), status=AssignmentStatus.skipped, now=NOW
        )
        robs = _battle(s, pid, p1.id, a.id, c.id)
        _assign(s, rob.id, pid, robs.id)
        elsewhere = _battle(s, other_project, p2.id, a.id, b.id)
        _assign(s, rae.id, other_project, elsewhere.id)
        annotated = _battle(s, pid, p1.id, a.id, b.id, purpose=ComparisonPurpose.annotate)
    with db.read() as s:
        got = store.shown_generations(s, project_id=pid, user_id=rae.id)
    assert got == {voted.generation_a_id, voted.generation_b_id, given_back.generation_a_id,
                   given_back.generation_b_id}  # fmt: skip
    assert not got & {robs.generation_a_id, robs.generation_b_id, annotated.generation_a_id}


def test_arena_generations_match_the_sampling_settings_exactly(db: Database):
    params = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 128, "do_sample": True}
    with db.write() as s:
        pid = _project(s)
        x, y = _checkpoint(s, "x", project=pid), _checkpoint(s, "y", project=pid)
        p = _prompt(s, pid, "p")
        g = crud.add_generation(s, prompt_id=p.id, checkpoint_id=x.id, text="t", params=params, seed=3)
        crud.add_generation(s, prompt_id=p.id, checkpoint_id=x.id, text="u", params={**params, "top_p": 0.95},
                            seed=4, sample_index=1)  # fmt: skip
        crud.add_generation(s, prompt_id=p.id, checkpoint_id=y.id, text="v", params=None, seed=5)
    with db.read() as s:
        found = store.arena_generations(s, prompt_ids=[p.id], checkpoint_ids=[x.id, y.id], params=params)
        assert {k: [r.id for r in v] for k, v in found.items()} == {(p.id, x.id): [g.id]}
        assert store.next_sample_index(s, prompt_id=p.id, checkpoint_id=x.id) == 2
        assert store.next_sample_index(s, prompt_id=p.id, checkpoint_id=999) == 0
