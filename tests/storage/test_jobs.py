"""The job queue in the database: state machine, races, claims, reaper, metrics ingestion, registry."""

from __future__ import annotations

import itertools
import json
import threading
from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlmodel import select

from storage import crud
from storage import jobs as q
from storage.db import Database, check, downgrade, sqlite_url, upgrade
from storage.models import (
    Checkpoint,
    CheckpointKind,
    CheckpointStatus,
    FailureCode,
    Job,
    JobState,
    MetricPoint,
    Project,
    Prompt,
    utcnow,
)

STATES = list(JobState)
EXPECTED_EDGES = {
    ("queued", "running"),
    ("queued", "cancelled"),
    ("running", "succeeded"),
    ("running", "failed"),
    ("running", "cancelled"),
    ("running", "interrupted"),
    ("interrupted", "queued"),
    ("interrupted", "cancelled"),
    ("interrupted", "failed"),
}


def new_job(db: Database, tmp_path, state: JobState = JobState.queued, **values) -> int:
    with db.write() as s:
        job = q.create_job(s, recipe="reward_model", config={"max_steps": 3}, jobs_dir=tmp_path / "jobs")
        if state != JobState.queued or values:
            s.execute(
                sa.update(Job.__table__).where(Job.__table__.c.id == job.id).values(state=state, **values)
            )
        return job.id


def state_of(db: Database, job_id: int) -> Job:
    with db.read() as s:
        return q.get_job(s, job_id)


def test_the_transition_table_is_exactly_the_specified_one():
    edges = {(str(a), str(b)) for a, targets in q.ALLOWED.items() for b in targets}
    assert edges == EXPECTED_EDGES
    assert all(not q.ALLOWED[s] for s in q.TERMINAL)  # terminal states never change


@pytest.mark.parametrize(("source", "target"), list(itertools.product(STATES, STATES)), ids=lambda s: str(s))
def test_every_transition_is_allowed_or_refused_as_the_table_says(db, tmp_path, source, target):
    job_id = new_job(db, tmp_path, source)
    if (str(source), str(target)) in EXPECTED_EDGES:
        with db.write() as s:
            assert q.transition(s, job_id, target, expected=[source]) is True
        job = state_of(db, job_id)
        assert job.state == target
        assert (job.finished_at is not None) == (target in q.TERMINAL)
    else:
        with pytest.raises(q.TransitionError), db.write() as s:
            q.transition(s, job_id, target, expected=[source])
        assert state_of(db, job_id).state == source


def test_a_transition_from_the_wrong_current_state_does_nothing(db, tmp_path):
    job_id = new_job(db, tmp_path, JobState.succeeded)
    with db.write() as s:
        assert q.transition(s, job_id, JobState.cancelled) is False  # any allowed source, none matches
        assert q.transition(s, job_id, JobState.failed, failure_code=FailureCode.crashed) is False
    job = state_of(db, job_id)
    assert job.state == JobState.succeeded and job.failure_code is None


def test_owner_guards_a_transition(db, tmp_path):
    job_id = new_job(db, tmp_path, JobState.running, worker_id="h:1:a")
    with db.write() as s:
        assert q.transition(s, job_id, JobState.succeeded, owner="h:2:b") is False
        assert q.transition(s, job_id, JobState.succeeded, owner="h:1:a") is True


def race(db: Database, job_id: int, rounds_of: list) -> list[bool]:
    """Run each callable(session) -> bool in its own thread at the same moment; return their results."""
    barrier = threading.Barrier(len(rounds_of))
    results: list[bool | BaseException] = [False] * len(rounds_of)

    def run(i: int) -> None:
        barrier.wait()
        try:
            with db.write() as s:
                results[i] = rounds_of[i](s)
        except BaseException as exc:  # reported below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(rounds_of))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not [r for r in results if isinstance(r, BaseException)], results
    return results


def test_cancel_racing_completion_has_exactly_one_winner(any_db, tmp_path):
    for _ in range(8):
        job_id = new_job(any_db, tmp_path, JobState.running, worker_id="h:1:a")
        wins = race(
            any_db,
            job_id,
            [
                lambda s, j=job_id: q.transition(s, j, JobState.cancelled, expected=[JobState.running]),
                lambda s, j=job_id: q.transition(
                    s, j, JobState.succeeded, expected=[JobState.running], exit_code=0
                ),
            ],
        )
        assert sorted(wins) == [False, True]
        final = state_of(any_db, job_id)
        assert final.state == (JobState.cancelled if wins[0] else JobState.succeeded)
        assert (final.exit_code == 0) == wins[1]


def test_two_workers_claiming_one_job_one_wins(any_db, tmp_path):
    for _ in range(6):
        job_id = new_job(any_db, tmp_path)
        wins = race(
            any_db,
            job_id,
            [lambda s, w=w: q.claim_next(s, worker_id=w) is not None for w in ("h:1:a", "h:2:b")],
        )
        assert sorted(wins) == [False, True]
        job = state_of(any_db, job_id)
        assert job.state == JobState.running and job.worker_id == ("h:1:a" if wins[0] else "h:2:b")


def test_concurrent_claims_take_different_jobs(any_db, tmp_path):
    ids = [new_job(any_db, tmp_path) for _ in range(4)]
    claimed: list[int] = []
    lock = threading.Lock()

    def claim(s, w):
        job = q.claim_next(s, worker_id=w)
        with lock:
            claimed.append(job.id)
        return True

    race(any_db, 0, [lambda s, w=f"h:{i}:x": claim(s, w) for i in range(4)])
    assert sorted(claimed) == ids


def test_claim_takes_the_oldest_queued_and_resets_the_attempt_fields(db, tmp_path):
    first = new_job(db, tmp_path, failure_message="interrupted: old", cancel_requested_at=None)
    new_job(db, tmp_path)
    with db.write() as s:
        job = q.claim_next(s, worker_id="h:1:a")
        assert job.id == first and job.state == JobState.running and job.failure_message is None
        assert job.started_at is not None and job.heartbeat_at is not None
    with db.write() as s:
        assert q.claim_next(s, worker_id="h:1:a").id != first
        assert q.claim_next(s, worker_id="h:1:a") is None


def test_create_job_puts_its_folder_into_its_config(db, tmp_path):
    with db.write() as s:
        job = q.create_job(s, recipe="r", config={"seed": 1}, jobs_dir=tmp_path / "jobs", processes=2)
    assert job.output_dir == str(tmp_path / "jobs" / str(job.id))
    assert job.config == {"seed": 1, "output_dir": job.output_dir} and job.attempt == 1 and job.processes == 2


def test_request_cancel_marks_only_running_jobs(db, tmp_path):
    running = new_job(db, tmp_path, JobState.running)
    queued = new_job(db, tmp_path)
    with db.write() as s:
        assert q.request_cancel(s, running) and not q.request_cancel(s, queued)
    assert state_of(db, running).cancel_requested_at is not None
    assert state_of(db, queued).cancel_requested_at is None


def test_heartbeat_reports_which_jobs_the_worker_still_owns(any_db, tmp_path):
    db = any_db
    mine = new_job(db, tmp_path, JobState.running, worker_id="h:1:a")
    taken = new_job(db, tmp_path, JobState.interrupted, worker_id="h:1:a")
    other = new_job(db, tmp_path, JobState.running, worker_id="h:2:b")
    with db.write() as s:
        assert q.heartbeat(s, worker_id="h:1:a", job_ids=[mine, taken, other]) == {mine}


def test_reaper_interrupts_stale_jobs_and_jobs_of_dead_workers_only(any_db, tmp_path):
    db = any_db
    now = utcnow()
    stale = new_job(
        db, tmp_path, JobState.running, worker_id="h:1:a", heartbeat_at=now - timedelta(seconds=120)
    )
    dead = new_job(db, tmp_path, JobState.running, worker_id="h:2:b", heartbeat_at=now, pid=4242)
    fresh = new_job(db, tmp_path, JobState.running, worker_id="h:3:c", heartbeat_at=now)
    queued = new_job(db, tmp_path)
    with db.write() as s:
        reaped = q.reap_stale(s, stale_s=60, worker_gone=lambda w: w == "h:2:b", now=now)
    assert {r.job_id: r.reason for r in reaped} == {
        stale: "no heartbeat from its worker for 120 s",
        dead: "its worker process is gone",
    }
    assert next(r for r in reaped if r.job_id == dead).pid == 4242
    assert [state_of(db, j).state for j in (stale, dead, fresh, queued)] == [
        JobState.interrupted, JobState.interrupted, JobState.running, JobState.queued,
    ]  # fmt: skip
    assert state_of(db, stale).failure_message == "interrupted: no heartbeat from its worker for 120 s"


def test_interrupted_jobs_are_requeued_with_the_next_attempt_until_the_limit(any_db, tmp_path):
    db = any_db
    retry = new_job(db, tmp_path, JobState.interrupted, attempt=1, worker_id="h:1:a", pid=9)
    exhausted = new_job(db, tmp_path, JobState.interrupted, attempt=3, failure_message="interrupted: x")
    busy = new_job(db, tmp_path, JobState.interrupted, attempt=1)
    cancel = new_job(db, tmp_path, JobState.interrupted, attempt=1, cancel_requested_at=utcnow())
    with db.write() as s:
        requeued, ended = q.requeue_interrupted(s, max_attempts=3, busy=lambda job: job.id == busy)
    assert (requeued, ended) == ([retry], [exhausted, cancel])
    assert state_of(db, cancel).state == JobState.cancelled  # a cancel asked for meanwhile is kept
    job = state_of(db, retry)
    assert (job.state, job.attempt, job.worker_id, job.pid) == (JobState.queued, 2, None, None)
    job = state_of(db, exhausted)
    assert job.state == JobState.failed and job.failure_code == FailureCode.crashed
    assert "interrupted 3 times" in job.failure_message
    assert state_of(db, busy).state == JobState.interrupted


# --------------------------------------------------------------------------- metrics


def write_rows(path, rows, *, tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def points(db: Database, job_id: int) -> dict[tuple[int, str], float]:
    with db.read() as s:
        rows = s.exec(select(MetricPoint).where(MetricPoint.job_id == job_id)).all()
    return {(p.step, p.name): p.value for p in rows}


def test_ingest_upserts_new_complete_lines_and_sets_progress(any_db, tmp_path):
    db = any_db
    job_id = new_job(db, tmp_path, JobState.running)
    path = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 0, "time": 1.0, "run/total_steps": 10.0},
        {"step": 1, "time": 2.0, "train/loss": 0.7, "train/lr": 1e-3},
        {"step": 2, "time": 3.0, "train/loss": None, "train/flag": True},
    ]
    write_rows(path, rows, tail='{"step": 3, "train/lo')  # a torn line is left for later
    with db.write() as s:
        cursor = q.ingest_metrics(s, job_id, path)
    assert points(db, job_id) == {(0, "run/total_steps"): 10.0, (1, "train/loss"): 0.7, (1, "train/lr"): 1e-3}
    job = state_of(db, job_id)
    assert (job.step, job.total_steps) == (1, 10)
    with path.open("a") as handle:
        handle.write('ss": 0.5}\n' + json.dumps({"step": 1, "train/loss": 0.65}) + "\n")
    with db.write() as s:
        cursor = q.ingest_metrics(s, job_id, path, cursor)
        assert q.ingest_metrics(s, job_id, path, cursor) == cursor  # nothing new
    got = points(db, job_id)
    assert got[(3, "train/loss")] == 0.5 and got[(1, "train/loss")] == 0.65  # upsert, no duplicate
    assert state_of(db, job_id).step == 3
    with db.read() as s:
        assert q.metric_series(s, job_id) == {"train/loss": [(1, 0.65), (3, 0.5)], "train/lr": [(1, 1e-3)]}
        assert q.attempt_start_step(s, job_id) == 0


def test_a_metrics_file_rewritten_shorter_on_resume_is_read_again(db, tmp_path):
    job_id = new_job(db, tmp_path, JobState.running)
    path = tmp_path / "metrics.jsonl"
    total = {"step": 0, "run/total_steps": 6}
    write_rows(path, [total] + [{"step": i, "train/loss": 1.0 / i} for i in range(1, 6)])
    with db.write() as s:
        cursor = q.ingest_metrics(s, job_id, path)
    # The resumed recipe keeps the lines up to its checkpoint (step 2), replaces the file, appends.
    tmp = tmp_path / "metrics.jsonl.tmp"
    write_rows(tmp, [total, {"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": 0.5}])
    tmp.replace(path)
    with path.open("a") as handle:
        handle.write(json.dumps({"step": 2, "run/total_steps": 6}) + "\n")
        handle.write(json.dumps({"step": 3, "train/loss": 0.3}) + "\n")
    with db.write() as s:
        q.ingest_metrics(s, job_id, path, cursor)
    got = points(db, job_id)
    assert sorted(step for step, name in got if name == "train/loss") == [1, 2, 3]
    assert got[(3, "train/loss")] == 0.3  # the new step 3, the old steps 4 and 5 are gone
    assert state_of(db, job_id).step == 3
    with db.read() as s:
        assert q.attempt_start_step(s, job_id) == 2


def test_a_run_restarted_from_scratch_is_read_again_even_when_it_outgrows_the_old_file(db, tmp_path):
    from trainers.metrics import MetricsWriter

    job_id = new_job(db, tmp_path, JobState.running)
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path) as writer:  # attempt 1, killed before its first checkpoint
        writer.write(0, {"run/total_steps": 6})
        writer.write(1, {"train/loss": 9.0})
    with db.write() as s:
        cursor = q.ingest_metrics(s, job_id, path)
    with MetricsWriter(path) as writer:  # attempt 2 starts afresh and gets further before the next read
        writer.write(0, {"run/total_steps": 6})
        for step in range(1, 5):
            writer.write(step, {"train/loss": 1.0 / step})
    with db.write() as s:
        q.ingest_metrics(s, job_id, path, cursor)
    got = points(db, job_id)
    assert {step: v for (step, name), v in got.items() if name == "train/loss"} == {
        1: 1.0,
        2: 0.5,
        3: 1 / 3,
        4: 0.25,
    }


def test_a_missing_metrics_file_changes_nothing(db, tmp_path):
    job_id = new_job(db, tmp_path, JobState.running)
    with db.write() as s:
        assert q.ingest_metrics(s, job_id, tmp_path / "none.jsonl") == q.MetricsCursor()


# --------------------------------------------------------------------------- registry


def test_register_checkpoint_records_lineage_and_updates_the_same_folder(db, tmp_path):
    with db.write() as s:
        base = Checkpoint(name="base", path="tiny", kind=CheckpointKind.policy)
        s.add(base)
        s.flush()
        job = q.create_job(s, recipe="reward_model", config={}, jobs_dir=tmp_path, base_checkpoint_id=base.id)
        studio = {"metrics": {"eval/accuracy": 0.75, "note": "x"}, "step": 4}
        row = q.register_checkpoint(s, job=job, path="/r/final", kind=CheckpointKind.reward, name="rm",
                                    manifest_sha256="a" * 64, studio=studio)  # fmt: skip
        again = q.register_checkpoint(s, job=job, path="/r/final", kind=CheckpointKind.reward, name="rm",
                                      manifest_sha256="b" * 64, studio={}, status=CheckpointStatus.unloadable)  # fmt: skip
        assert again.id == row.id
    with db.read() as s:
        row = s.get(Checkpoint, row.id)
    assert (row.parent_id, row.recipe, row.manifest_sha256, row.status) == (
        base.id, "reward_model", "b" * 64, CheckpointStatus.unloadable,
    )  # fmt: skip


def test_rerun_with_other_weights_drops_the_reward_models_scores(db, tmp_path):
    # rm-agreement scores only generations without a score: old weights' scores would stay forever.
    from storage import reward_scores

    with db.write() as s:
        project = Project(name="p")
        s.add(project)
        s.flush()
        policy = Checkpoint(name="base", path="tiny", kind=CheckpointKind.policy, project_id=project.id)
        prompt = Prompt(project_id=project.id, external_id="x", kind="text", text="hi")
        s.add_all([policy, prompt])
        s.flush()
        gen = crud.add_generation(
            s, prompt_id=prompt.id, checkpoint_id=policy.id, text="t", params={}, seed=0
        )
        job = q.create_job(s, recipe="reward_model", config={}, jobs_dir=tmp_path, project_id=project.id)
        other = q.register_checkpoint(s, job=job, path="/r/other", kind=CheckpointKind.reward, name="rm2",
                                      manifest_sha256="c" * 64, studio={})  # fmt: skip

        def register(sha):
            return q.register_checkpoint(s, job=job, path="/r/final", kind=CheckpointKind.reward, name="rm",
                                         manifest_sha256=sha, studio={})  # fmt: skip

        rm = register("a" * 64)
        for ck in (rm.id, other.id):
            reward_scores.upsert_scores(s, checkpoint_id=ck, scores={gen.id: 1.0})
        assert register("a" * 64).id == rm.id  # the same weights again: the scores hold
        assert reward_scores.get_scores(s, checkpoint_id=rm.id) == {gen.id: 1.0}
        assert register("b" * 64).id == rm.id
        assert reward_scores.unscored(s, checkpoint_id=rm.id, generation_ids=[gen.id]) == [gen.id]
        assert reward_scores.get_scores(s, checkpoint_id=other.id) == {gen.id: 1.0}  # only that model's


# --------------------------------------------------------------------------- migration 0003


def test_upgrade_from_0002_keeps_jobs_and_adds_the_new_columns(tmp_path):
    db = Database.from_url(sqlite_url(tmp_path / "old.db"))
    upgrade(db.engine, "0002")
    with db.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO jobs (recipe, config, state, step, attempt, created_at) "
            "VALUES ('reward_model', '{\"seed\": 1}', 'failed', 7, 2, '2026-01-01 00:00:00.000000')"
        )
    upgrade(db.engine)
    check(db.engine)
    with db.read() as s:
        job = s.get(Job, 1)
    kept = (job.recipe, job.config, job.state, job.step, job.attempt)
    assert kept == ("reward_model", {"seed": 1}, "failed", 7, 2)
    added = (job.processes, job.name, job.timeout_s, job.exit_code, job.cancel_requested_at)
    assert added == (1, None, None, None, None)
    downgrade(db.engine, "0002")
    assert "processes" not in {c["name"] for c in sa.inspect(db.engine).get_columns("jobs")}
    upgrade(db.engine)
    with db.read() as s:
        assert s.get(Job, 1).step == 7
    db.dispose()
