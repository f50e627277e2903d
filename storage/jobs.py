"""The job queue in the database: the state machine, claims, heartbeats, the reaper, metrics
ingestion and checkpoint registration (R-JOB-01, R-JOB-02).

No torch and no OS processes here: the worker (studio/worker.py) owns the child processes and
calls these functions inside its own transactions (`with db.write() as s:`); they never commit.

State machine::

    queued ──claim──▶ running ──▶ succeeded | failed | cancelled
       │                 │
       └──▶ cancelled    └──▶ interrupted ──requeue──▶ queued     (its worker died or shut down)
                                   └──▶ cancelled | failed

Terminal states (succeeded, failed, cancelled) never change. Every transition is one conditional
``UPDATE jobs SET state = :to ... WHERE id = :id AND state IN (:sources)``; its row count tells the
caller whether it won, so of a cancel racing a completion exactly one takes effect.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, select

from storage.arena import enter_arena
from storage.models import (
    Checkpoint,
    CheckpointKind,
    CheckpointStatus,
    DatasetSnapshot,
    FailureCode,
    Job,
    JobState,
    MetricPoint,
    utcnow,
)
from storage.reward_scores import delete_scores

QUEUED, RUNNING, INTERRUPTED = JobState.queued, JobState.running, JobState.interrupted
SUCCEEDED, FAILED, CANCELLED = JobState.succeeded, JobState.failed, JobState.cancelled

ALLOWED: dict[JobState, frozenset[JobState]] = {
    QUEUED: frozenset({RUNNING, CANCELLED}),
    RUNNING: frozenset({SUCCEEDED, FAILED, CANCELLED, INTERRUPTED}),
    INTERRUPTED: frozenset({QUEUED, CANCELLED, FAILED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}
"""state → the states it may move to."""

TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
LIVE = frozenset({QUEUED, RUNNING, INTERRUPTED})
"""States in which a job still owns its output folder."""

TOTAL_STEPS = "run/total_steps"
"""The metrics row every recipe writes right after setup: ``{"step": start_step, "run/total_steps": N}``."""

_JOBS = Job.__table__
_POINTS = MetricPoint.__table__


def aware(moment: datetime) -> datetime:
    """A stored time as an aware UTC datetime (a driver may hand it back without a zone)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class TransitionError(ValueError):
    """A transition the state machine does not have (a bug in the caller, not a lost race)."""


def sources(to: JobState) -> frozenset[JobState]:
    """The states from which a job may move to ``to``."""
    return frozenset(state for state, targets in ALLOWED.items() if to in targets)


# --------------------------------------------------------------------------- transitions


def transition(
    session: Session,
    job_id: int,
    to: JobState,
    *,
    expected: Iterable[JobState] | None = None,
    owner: str | None = None,
    now: datetime | None = None,
    **values: Any,
) -> bool:
    """Move job ``job_id`` to ``to`` if it is in one of ``expected`` (default: every allowed source).

    One conditional UPDATE; returns True when this call changed the row. ``owner`` also requires
    ``worker_id == owner``. ``values`` are further columns to set in the same statement
    (``failure_code``, ``step``, ``attempt=Job.attempt + 1``, ...). A terminal ``to`` sets
    ``finished_at``. Raises :class:`TransitionError` for a move the machine does not allow.
    """
    to = JobState(to)
    allowed = sources(to)
    wanted = allowed if expected is None else frozenset(JobState(s) for s in expected)
    if not wanted or not wanted <= allowed:
        bad = sorted(str(s) for s in wanted - allowed) or ["(none)"]
        raise TransitionError(f"a job cannot move from {', '.join(bad)} to {to}")
    unknown = set(values) - set(_JOBS.c.keys())
    if unknown:
        raise TypeError(f"unknown job columns: {sorted(unknown)}")
    now = now or utcnow()
    if to in TERMINAL:
        values.setdefault("finished_at", now)
    stmt = (
        sa.update(_JOBS)
        .where(_JOBS.c.id == job_id, _JOBS.c.state.in_(sorted(str(s) for s in wanted)))
        .values(state=to, **values)
    )
    if owner is not None:
        stmt = stmt.where(_JOBS.c.worker_id == owner)
    return session.execute(stmt).rowcount == 1


def request_cancel(session: Session, job_id: int, *, now: datetime | None = None) -> bool:
    """Mark a running job for cancellation (the worker stops its child); True if it was running."""
    stmt = (
        sa.update(_JOBS)
        .where(_JOBS.c.id == job_id, _JOBS.c.state == str(RUNNING))
        .values(cancel_requested_at=sa.func.coalesce(_JOBS.c.cancel_requested_at, now or utcnow()))
    )
    return session.execute(stmt).rowcount == 1


# --------------------------------------------------------------------------- creating and claiming


def create_job(
    session: Session,
    *,
    recipe: str,
    config: Mapping[str, Any],
    jobs_dir: str | Path | None = None,
    output_dir: str | None = None,
    project_id: int | None = None,
    snapshot_id: int | None = None,
    base_checkpoint_id: int | None = None,
    parent_job_id: int | None = None,
    name: str | None = None,
    processes: int = 1,
    timeout_s: int | None = None,
    created_by: int | None = None,
) -> Job:
    """Insert a queued job (attempt 1). Without ``output_dir`` the job gets ``<jobs_dir>/<id>``,
    which is also written into its config as ``output_dir``."""
    if output_dir is None and jobs_dir is None:
        raise ValueError("give jobs_dir or output_dir")
    job = Job(
        recipe=recipe,
        config=dict(config),
        project_id=project_id,
        snapshot_id=snapshot_id,
        base_checkpoint_id=base_checkpoint_id,
        parent_job_id=parent_job_id,
        name=name,
        processes=processes,
        timeout_s=timeout_s,
        created_by=created_by,
        state=QUEUED,
        attempt=1,
        output_dir=output_dir,
    )
    session.add(job)
    session.flush()
    if output_dir is None:
        job.output_dir = str(Path(jobs_dir) / str(job.id))
    job.config = {**job.config, "output_dir": job.output_dir}
    session.flush()
    return job


def claim_next(session: Session, *, worker_id: str, now: datetime | None = None) -> Job | None:
    """Take the oldest queued job for ``worker_id`` (queued → running), or None.

    PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED`` so concurrent workers take different jobs
    without waiting. SQLite: the write transaction is already exclusive; the conditional update
    still guards the claim.
    """
    now = now or utcnow()
    pick = select(Job.id).where(Job.state == QUEUED).order_by(Job.id).limit(1)
    if session.get_bind().dialect.name == "postgresql":
        pick = pick.with_for_update(skip_locked=True)
    for _ in range(3):
        job_id = session.exec(pick).first()
        if job_id is None:
            return None
        claimed = transition(
            session, job_id, RUNNING, expected=[QUEUED], now=now, worker_id=worker_id, pid=None, started_at=now,
            heartbeat_at=now, exit_code=None, failure_code=None, failure_message=None,
        )  # fmt: skip
        if claimed:
            return session.get(Job, job_id, populate_existing=True)
    return None


def set_pid(session: Session, job_id: int, *, worker_id: str, pid: int | None) -> bool:
    stmt = (
        sa.update(_JOBS)
        .where(_JOBS.c.id == job_id, _JOBS.c.state == str(RUNNING), _JOBS.c.worker_id == worker_id)
        .values(pid=pid)
    )
    return session.execute(stmt).rowcount == 1


def heartbeat(
    session: Session, *, worker_id: str, job_ids: Iterable[int], now: datetime | None = None
) -> set[int]:
    """Refresh ``heartbeat_at`` of the worker's running jobs; returns the ids it still owns.

    A job missing from the result was reaped (or finished) meanwhile: the worker must stop its child.
    """
    ids = list(job_ids)
    if not ids:
        return set()
    stmt = (
        sa.update(_JOBS)
        .where(_JOBS.c.id.in_(ids), _JOBS.c.state == str(RUNNING), _JOBS.c.worker_id == worker_id)
        .values(heartbeat_at=now or utcnow())
        .returning(_JOBS.c.id)
    )
    return {row[0] for row in session.execute(stmt)}


@dataclass(frozen=True)
class Reaped:
    job_id: int
    worker_id: str | None
    pid: int | None
    reason: str


def reap_stale(
    session: Session,
    *,
    stale_s: float,
    worker_gone: Callable[[str | None], bool] = lambda _worker_id: False,
    now: datetime | None = None,
) -> list[Reaped]:
    """Running jobs whose heartbeat is older than ``stale_s``, or whose worker ``worker_gone`` says
    is dead (a pid on this host), become interrupted. Returns what was reaped."""
    now = now or utcnow()
    running = session.exec(select(Job).where(Job.state == RUNNING).order_by(Job.id)).all()
    reaped = []
    for job in running:
        age = (now - aware(job.heartbeat_at)).total_seconds() if job.heartbeat_at else None
        if age is None or age > stale_s:
            reason = f"no heartbeat from its worker for {age:.0f} s" if age is not None else "no heartbeat"
        elif worker_gone(job.worker_id):
            reason = "its worker process is gone"
        else:
            continue
        # owner: a job that another worker claimed meanwhile is not this pass's to reap.
        if transition(session, job.id, INTERRUPTED, expected=[RUNNING], owner=job.worker_id, now=now,
                      failure_message=f"interrupted: {reason}"):  # fmt: skip
            reaped.append(Reaped(job.id, job.worker_id, job.pid, reason))
    return reaped


def requeue_interrupted(
    session: Session,
    *,
    max_attempts: int,
    busy: Callable[[Job], bool] = lambda _job: False,
    now: datetime | None = None,
) -> tuple[list[int], list[int]]:
    """Interrupted jobs go back to the queue with ``attempt + 1``; those that already had
    ``max_attempts`` attempts fail (crashed), those with a cancel request are cancelled. ``busy(job)``
    True leaves a job for later (its folder is still in use). Returns ``(requeued ids, ended ids)``."""
    now = now or utcnow()
    requeued, failed = [], []
    for job in session.exec(select(Job).where(Job.state == INTERRUPTED).order_by(Job.id)).all():
        if busy(job):
            continue
        if job.cancel_requested_at is not None:  # cancelled while its worker was dying: honour it
            if transition(session, job.id, CANCELLED, expected=[INTERRUPTED], now=now,
                          failure_message="cancelled (its worker had stopped)"):  # fmt: skip
                failed.append(job.id)
        elif job.attempt >= max_attempts:
            message = (
                f"interrupted {job.attempt} times (last: {job.failure_message or 'unknown'}); "
                "resume it by hand once the cause is fixed"
            )
            if transition(session, job.id, FAILED, expected=[INTERRUPTED], now=now, failure_code=FailureCode.crashed,
                          failure_message=message):  # fmt: skip
                failed.append(job.id)
        elif transition(
            session, job.id, QUEUED, expected=[INTERRUPTED], now=now, attempt=_JOBS.c.attempt + 1, worker_id=None, pid=None,
            failure_message=None,
        ):  # fmt: skip
            requeued.append(job.id)
    return requeued, failed


# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class MetricsCursor:
    """How far a metrics file has been read: its inode and the byte offset after the last full line."""

    inode: int | None = None
    offset: int = 0


def parse_metric_lines(data: bytes) -> tuple[list[dict[str, Any]], int]:
    """Complete JSON lines of ``data`` → ``(rows, bytes consumed)``; a torn last line is left for later."""
    end = data.rfind(b"\n") + 1
    rows = []
    for line in data[:end].splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows, end


def metric_points(rows: Iterable[Mapping[str, Any]]) -> list[tuple[int, str, float]]:
    """``(step, name, value)`` of every finite number in ``rows`` (``step``/``time`` are not metrics)."""
    points = []
    for row in rows:
        for name, value in row.items():
            if name in ("step", "time") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if value == value and abs(value) != float("inf"):
                points.append((int(row["step"]), str(name)[:128], float(value)))
    return points


def ingest_metrics(
    session: Session, job_id: int, path: str | Path, cursor: MetricsCursor = MetricsCursor()
) -> MetricsCursor:
    """Upsert the new complete lines of ``path`` as MetricPoints; set ``jobs.step``/``total_steps``.

    A file that was replaced or got shorter (a resumed recipe rewrites it without the steps after its
    checkpoint) is read again from the start, and points of steps beyond its last line are deleted.
    Returns the cursor for the next call.
    """
    try:
        with open(path, "rb") as handle:
            inode = os.fstat(handle.fileno()).st_ino
            restart = inode != cursor.inode or os.fstat(handle.fileno()).st_size < cursor.offset
            offset = 0 if restart else cursor.offset
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return cursor
    rows, consumed = parse_metric_lines(data)
    points = metric_points(rows)
    if restart:
        last = max((int(r["step"]) for r in rows), default=-1)
        session.execute(sa.delete(_POINTS).where(_POINTS.c.job_id == job_id, _POINTS.c.step > last))
    if points:
        dialect = session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        now = utcnow()
        stmt = insert(_POINTS)
        stmt = stmt.on_conflict_do_update(
            index_elements=["job_id", "step", "name"],
            set_={"value": stmt.excluded.value, "created_at": stmt.excluded.created_at},
        )
        session.execute(
            stmt,
            [{"job_id": job_id, "step": s, "name": n, "value": v, "created_at": now} for s, n, v in points],
        )
    if points or restart:
        _update_progress(session, job_id)
    return MetricsCursor(inode, offset + consumed)


def _update_progress(session: Session, job_id: int) -> None:
    step = session.exec(
        select(sa.func.max(MetricPoint.step)).where(
            MetricPoint.job_id == job_id, MetricPoint.name != TOTAL_STEPS
        )
    ).one()
    total = session.exec(
        select(MetricPoint.value)
        .where(MetricPoint.job_id == job_id, MetricPoint.name == TOTAL_STEPS)
        .order_by(MetricPoint.step.desc())
        .limit(1)
    ).first()
    values: dict[str, Any] = {"step": int(step or 0)}
    if total is not None:
        values["total_steps"] = int(total)
    session.execute(sa.update(_JOBS).where(_JOBS.c.id == job_id).values(**values))


def metric_series(session: Session, job_id: int) -> dict[str, list[tuple[int, float]]]:
    """``{name: [(step, value), ...]}`` by step, ``run/…`` bookkeeping rows left out."""
    rows = session.exec(
        select(MetricPoint.name, MetricPoint.step, MetricPoint.value)
        .where(MetricPoint.job_id == job_id, MetricPoint.name.not_like("run/%"))
        .order_by(MetricPoint.name, MetricPoint.step)
    ).all()
    series: dict[str, list[tuple[int, float]]] = {}
    for name, step, value in rows:
        series.setdefault(name, []).append((step, value))
    return series


def attempt_start_step(session: Session, job_id: int) -> int:
    """The step the current attempt started from (that of its latest ``run/total_steps`` row)."""
    step = session.exec(
        select(sa.func.max(MetricPoint.step)).where(
            MetricPoint.job_id == job_id, MetricPoint.name == TOTAL_STEPS
        )
    ).one()
    return int(step or 0)


# --------------------------------------------------------------------------- checkpoints


def register_checkpoint(
    session: Session,
    *,
    job: Job,
    path: str,
    kind: CheckpointKind,
    name: str,
    manifest_sha256: str | None,
    studio: Mapping[str, Any],
    status: CheckpointStatus = CheckpointStatus.ready,
) -> Checkpoint:
    """Record a checkpoint folder a job wrote, with its lineage: parent = the job's base checkpoint,
    recipe, snapshot, manifest sha256, the metrics from its ``studio.json``. The same folder again
    (a rerun) updates its row. The caller verified the manifest (``status`` says how that went)."""
    row = session.exec(select(Checkpoint).where(Checkpoint.path == path, Checkpoint.kind == kind)).first()
    if row is None:
        row = Checkpoint(path=path, kind=kind, name=name)
        session.add(row)
    elif row.manifest_sha256 != manifest_sha256:
        # The same folder with other weights (a rerun): the old weights' reward scores no longer
        # hold, and rm-agreement only scores generations without a score, so drop them.
        # A re-registered *policy* keeps its arena generations and votes (they are of the old
        # weights and still count for this id): deleting them would break voted comparisons;
        # reruns into the same folder are rare, so that is left as is.
        delete_scores(session, checkpoint_id=row.id)
    row.name = name
    row.project_id = job.project_id
    row.parent_id = job.base_checkpoint_id
    row.recipe = job.recipe
    row.snapshot_id = job.snapshot_id
    row.manifest_sha256 = manifest_sha256
    row.status = status
    metrics = studio.get("metrics")
    row.metrics = (
        {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if isinstance(metrics, dict)
        else None
    )
    session.flush()
    if kind == CheckpointKind.policy and job.project_id is not None and row.parent_id is not None:
        # Auto-arena: a new policy meets its parent in the project's blind arena.
        enter_arena(session, job.project_id, row.id, source="auto")
    return row


def set_checkpoint_status(session: Session, checkpoint_id: int, status: CheckpointStatus) -> None:
    session.execute(
        sa.update(Checkpoint.__table__)
        .where(Checkpoint.__table__.c.id == checkpoint_id)
        .values(status=status)
    )


# --------------------------------------------------------------------------- queries


def get_job(session: Session, job_id: int) -> Job | None:
    return session.get(Job, job_id, populate_existing=True)


def list_jobs(session: Session, *, project_id: int | None = None, limit: int = 500) -> list[Job]:
    """Newest first."""
    stmt = select(Job).order_by(Job.id.desc()).limit(limit)
    if project_id is not None:
        stmt = stmt.where(Job.project_id == project_id)
    return list(session.exec(stmt).all())


def lock_folder(session: Session, output_dir: str | None) -> None:
    """Lock the rows of every job that writes into ``output_dir`` until the transaction ends
    (PostgreSQL ``FOR UPDATE``; SQLite's write transaction is exclusive already), so that a check
    with :func:`live_job_in_folder` followed by a new job in that folder cannot interleave."""
    if output_dir is not None and session.get_bind().dialect.name == "postgresql":
        session.exec(select(Job.id).where(Job.output_dir == output_dir).with_for_update()).all()


def live_job_in_folder(session: Session, output_dir: str, *, excluding: int | None = None) -> Job | None:
    """A queued, running or interrupted job that writes into ``output_dir`` (one per folder)."""
    stmt = select(Job).where(Job.output_dir == output_dir, Job.state.in_([str(s) for s in LIVE]))
    if excluding is not None:
        stmt = stmt.where(Job.id != excluding)
    return session.exec(stmt).first()


def jobs_by_output_checkpoint(session: Session) -> dict[int, int]:
    """checkpoint id → the id of the job that produced it."""
    rows = session.exec(select(Job.output_checkpoint_id, Job.id).where(Job.output_checkpoint_id.is_not(None)))
    return {checkpoint_id: job_id for checkpoint_id, job_id in rows}


def snapshot_hashes(session: Session, snapshot_ids: Iterable[int | None]) -> dict[int, str]:
    ids = sorted({i for i in snapshot_ids if i is not None})
    if not ids:
        return {}
    rows = session.exec(select(DatasetSnapshot.id, DatasetSnapshot.sha256).where(DatasetSnapshot.id.in_(ids)))
    return dict(rows.all())
