"""Every table round-trips; migrations match the models; constraints hold."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from storage import models as m
from storage.db import Database, check, downgrade, read_pragmas, sqlite_url, upgrade


def _graph(s) -> dict[str, object]:
    """One row in every table, linked the way the studio links them."""
    user = m.User(username="ada", password_hash="$argon2id$x", role=m.Role.admin)
    s.add(user)
    s.flush()
    project = m.Project(
        name="p", description="d", span_labels=["off topic"], overlap_fraction=0.2, overlap_k=3
    )
    s.add(project)
    s.flush()
    guide = m.GuidelineVersion(project_id=project.id, version=1, text="Prefer helpful answers.")
    prompt = m.Prompt(
        project_id=project.id,
        external_id="007",
        kind=m.PromptKind.chat,
        text="user: héllo 😀",
        messages=[{"role": "user", "content": "héllo 😀"}],
        tags=["a", "b"],
        source="f.jsonl",
    )
    s.add_all([guide, prompt])
    s.flush()
    snapshot = m.DatasetSnapshot(
        project_id=project.id,
        kind=m.SnapshotKind.preferences,
        format="jsonl",
        path="/x.jsonl",
        sha256="0" * 64,
        row_count=3,
        counts={"train": 3},
        filters={"min_votes": 1},
    )
    s.add(snapshot)
    s.flush()
    base = m.Checkpoint(name="base", path="smollm2", kind=m.CheckpointKind.policy, recipe="base")
    s.add(base)
    s.flush()
    child = m.Checkpoint(
        name="rm",
        path="/ck/rm",
        kind=m.CheckpointKind.reward,
        parent_id=base.id,
        snapshot_id=snapshot.id,
        manifest_sha256="f" * 64,
        metrics={"accuracy": 0.7},
        status=m.CheckpointStatus.unloadable,
    )
    s.add(child)
    s.flush()
    g1 = m.Generation(
        prompt_id=prompt.id, checkpoint_id=base.id, text="one", params={"temperature": 0.7}, seed=1
    )
    g2 = m.Generation(
        prompt_id=prompt.id, checkpoint_id=base.id, text="two", sample_index=1, finish_reason="eos"
    )
    s.add_all([g1, g2])
    s.flush()
    comp = m.Comparison(
        project_id=project.id,
        prompt_id=prompt.id,
        generation_a_id=g1.id,
        generation_b_id=g2.id,
        purpose=m.ComparisonPurpose.annotate,
        a_on_left=False,
        gold_outcome=m.Outcome.tie,
    )
    s.add(comp)
    s.flush()
    assign = m.Assignment(
        user_id=user.id,
        project_id=project.id,
        task=m.TaskKind.pairwise,
        comparison_id=comp.id,
        expires_at=m.utcnow() + timedelta(minutes=30),
    )
    vote = m.PairwiseVote(
        comparison_id=comp.id,
        user_id=user.id,
        outcome=m.Outcome.both_bad,
        strength=m.Strength.much,
        rationale="both wrong",
        left_generation_id=g2.id,
        idempotency_key="k1",
        time_spent_ms=1234,
        guideline_version=1,
    )
    span_set = m.SpanSet(generation_id=g1.id, user_id=user.id, version=2)
    s.add_all([assign, vote, span_set])
    s.flush()
    span = m.SpanAnnotation(
        span_set_id=span_set.id, start=0, end=3, polarity=m.Polarity.bad, label="off topic"
    )
    job = m.Job(
        project_id=project.id,
        recipe="reward_model",
        config={"lr": 1e-5},
        state=m.JobState.failed,
        failure_code=m.FailureCode.nan_loss,
        failure_message="loss is nan at step 37",
        snapshot_id=snapshot.id,
        base_checkpoint_id=base.id,
        output_checkpoint_id=child.id,
    )
    suggestion = m.SpanSuggestion(
        generation_id=g1.id, checkpoint_id=child.id, start=1, end=2, polarity=m.Polarity.good, score=0.4
    )
    s.add_all([span, suggestion, job])
    s.flush()
    point = m.MetricPoint(job_id=job.id, step=1, name="loss", value=0.5)
    entry = m.ArenaModel(
        project_id=project.id,
        checkpoint_id=child.id,
        is_anchor=True,
        source=m.ArenaSource.auto,
        added_by=user.id,
    )
    score = m.RewardScore(checkpoint_id=child.id, generation_id=g1.id, score=-0.25)
    s.add_all([point, entry, score])
    s.flush()
    return {
        t.__name__: obj
        for t, obj in zip(
            m.ALL_TABLES,
            [
                user,
                project,
                guide,
                prompt,
                base,
                g1,
                comp,
                assign,
                vote,
                span_set,
                span,
                suggestion,
                snapshot,
                job,
                point,
                entry,
                score,
            ],
            strict=True,
        )
    }


def test_every_table_round_trips(any_db: Database):
    db = any_db
    with db.write() as s:
        written = {name: obj.model_dump() for name, obj in _graph(s).items()}
    assert set(written) == {t.__name__ for t in m.ALL_TABLES}
    with db.read() as s:
        for table in m.ALL_TABLES:
            row = s.get(table, written[table.__name__]["id"])
            assert row is not None, table.__name__
            assert row.model_dump() == written[table.__name__], table.__name__


def test_enums_and_json_come_back_typed(any_db: Database):
    db = any_db
    with db.write() as s:
        _graph(s)
    with db.read() as s:
        vote = s.exec(select(m.PairwiseVote)).one()
        assert vote.outcome is m.Outcome.both_bad and vote.strength is m.Strength.much
        prompt = s.exec(select(m.Prompt)).one()
        assert prompt.messages == [{"role": "user", "content": "héllo 😀"}] and prompt.external_id == "007"
        assert prompt.created_at.tzinfo is not None


def _vote(g, *, user_id: int, key: str) -> m.PairwiseVote:
    return m.PairwiseVote(
        comparison_id=g["Comparison"].id,
        user_id=user_id,
        outcome="a",
        left_generation_id=g["Generation"].id,
        idempotency_key=key,
    )


def _second_user_votes_with_key_k1(s, g) -> None:
    bob = m.User(username="bob", role="annotator")
    s.add(bob)
    s.flush()
    s.add(_vote(g, user_id=bob.id, key="k1"))


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (
            lambda s, g: s.add(_vote(g, user_id=g["User"].id, key="k2")),
            "pairwise_votes.comparison_id|uq_pairwise_votes_comparison_id_user_id",
        ),
        (_second_user_votes_with_key_k1, "pairwise_votes.idempotency_key|uq_pairwise_votes_idempotency_key"),
        (
            lambda s, g: s.add(
                m.Prompt(project_id=g["Project"].id, external_id="007", kind="text", text="x")
            ),
            "prompts.project_id, prompts.external_id|uq_prompts_project_id_external_id",
        ),
        (
            lambda s, g: s.add(
                m.Comparison(
                    project_id=g["Project"].id,
                    prompt_id=g["Prompt"].id,
                    generation_a_id=g["Generation"].id,
                    generation_b_id=g["Generation"].id,
                    purpose="arena",
                )
            ),
            "ck_comparisons_distinct_generations",
        ),
        (
            lambda s, g: s.add(
                m.SpanAnnotation(span_set_id=g["SpanSet"].id, start=5, end=5, polarity="good")
            ),
            "ck_span_annotations_valid_range",
        ),
        (
            lambda s, g: s.add(m.Generation(prompt_id=999_999, checkpoint_id=g["Checkpoint"].id, text="x")),
            "FOREIGN KEY|fk_generations_prompt_id_prompts",
        ),
        (lambda s, g: s.execute(sa.text("UPDATE jobs SET state = 'exploded'")), "ck_jobs_job_state"),
    ],
    ids=[
        "vote-per-user",
        "idempotency-key",
        "external-id",
        "same-generation",
        "empty-span",
        "foreign-key",
        "enum",
    ],
)
def test_constraints(any_db: Database, mutate, match):
    db = any_db
    with db.write() as s:
        graph = {k: v.model_copy() for k, v in _graph(s).items()}
    with pytest.raises(IntegrityError, match=match), db.write() as s:
        mutate(s, graph)
        s.flush()


def test_migrations_from_empty_have_no_drift_and_downgrade(tmp_path):
    db = Database.from_url(sqlite_url(tmp_path / "fresh.db"))
    upgrade(db.engine)
    check(db.engine)  # raises AutogenerateDiffsDetected on drift
    tables = set(sa.inspect(db.engine).get_table_names())
    assert {t.__tablename__ for t in m.ALL_TABLES} <= tables
    downgrade(db.engine, "base")
    assert set(sa.inspect(db.engine).get_table_names()) <= {"alembic_version"}
    upgrade(db.engine)
    check(db.engine)
    upgrade(db.engine)  # idempotent
    db.dispose()


def test_postgres_migrations_have_no_drift_and_downgrade(pg_db: Database):
    check(pg_db.engine)
    downgrade(pg_db.engine, "base")
    assert set(sa.inspect(pg_db.engine).get_table_names()) <= {"alembic_version"}
    upgrade(pg_db.engine)
    check(pg_db.engine)


def test_sqlite_pragmas_on_every_connection(db: Database):
    for _ in range(3):
        assert read_pragmas(db.engine) == {
            "journal_mode": "wal",
            "busy_timeout": 5000,
            "synchronous": 1,
            "foreign_keys": 1,
        }


def test_write_transactions_begin_immediate(db: Database):
    seen: list[str] = []

    @sa.event.listens_for(db.engine, "before_cursor_execute")
    def _spy(conn, cursor, statement, *args):
        seen.append(statement)

    with db.write() as s:
        s.add(m.User(username="w", role="rater"))
    with db.read() as s:
        s.exec(select(m.User)).all()
    begins = [x for x in seen if x.startswith("BEGIN")]
    assert begins == ["BEGIN IMMEDIATE", "BEGIN DEFERRED"]


def test_constraint_names_follow_the_convention():
    names = {c.name for t in m.metadata.tables.values() for c in t.constraints}
    assert "uq_pairwise_votes_comparison_id_user_id" in names
    assert "ck_comparisons_distinct_generations" in names
    assert all(n for n in names), "every constraint is named (batch migrations need names)"


def test_pragmas_hold_on_several_simultaneous_connections(db: Database):
    conns = [db.engine.connect() for _ in range(4)]
    try:
        for conn in conns:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        for conn in conns:
            conn.close()


def test_in_memory_sqlite_engine_works():
    db = Database.from_url("sqlite://")
    upgrade(db.engine)
    with db.write() as s:
        s.add(m.User(username="mem", role="admin"))
    with db.read() as s:
        assert s.exec(select(m.User)).one().username == "mem"


def test_alembic_command_line_takes_the_url_from_x_argument(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    ini = Path(__file__).resolve().parents[2] / "storage" / "alembic.ini"
    url = sqlite_url(tmp_path / "cli.db")
    for args in (["upgrade", "head"], ["check"]):
        subprocess.run(
            [sys.executable, "-m", "alembic", "-c", str(ini), "-x", f"url={url}", *args],
            check=True,
            capture_output=True,
        )
    assert "prompts" in sa.inspect(sa.create_engine(url)).get_table_names()


def test_upgrade_from_a_populated_released_schema_keeps_every_row(tmp_path):
    """R-DB-07: a database made at schema 0001 (committed fixture) upgrades with its data intact."""
    import shutil

    fixture = Path(__file__).parents[1] / "fixtures" / "schema_0001.sqlite"
    path = tmp_path / "old.db"
    shutil.copy(fixture, path)
    db = Database.from_url(sqlite_url(path))
    upgrade(db.engine)
    check(db.engine)
    with db.read() as s:
        votes = s.exec(select(m.PairwiseVote)).all()
        assert [(v.idempotency_key, v.outcome, v.strength, v.assignment_id) for v in votes] == [
            ("key-1", m.Outcome.a, m.Strength.clear, None)
        ]
        assert [g.text for g in s.exec(select(m.Generation).order_by(m.Generation.id))] == ["hi", "hello"]
        assert s.get(m.Comparison, 1).required_votes == 2
        assert s.get(m.User, 1).password_changed_at is None
        assert s.get(m.Assignment, 1).project_id is None
    downgrade(db.engine, "0001")
    upgrade(db.engine)
    with db.read() as s:
        assert len(s.exec(select(m.PairwiseVote)).all()) == 1
    db.dispose()
