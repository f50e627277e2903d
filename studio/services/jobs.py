"""Training jobs and the checkpoint registry (admin only): launch, cancel, resume, watch, verify.

The studio never imports the trainers' torch code. Recipe forms come from one
``python -m trainers --schema`` subprocess per process (cached); jobs run as children of the
worker (studio/worker.py); checkpoint folders are checked with ``trainers.checkpoint``, which is
hashlib and json only.

A job's folder is ``<data_dir>/jobs/<job id>/``: the recipe's ``output_dir`` with ``config.json``,
``metrics.jsonl``, ``checkpoints/step-N``, ``final/`` and ``job.log``. Resuming a cancelled or failed
job makes a new job (``parent_job_id`` = the old one) with the same folder and config, so the
recipe continues from its latest complete checkpoint.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from storage import crud
from storage import jobs as q
from storage.db import Database
from storage.models import (
    Checkpoint,
    CheckpointKind,
    CheckpointStatus,
    DatasetSnapshot,
    FailureCode,
    Job,
    JobState,
    utcnow,
)
from storage.preference_store import is_import_placeholder
from studio.services.errors import Conflict, NotFound, ServiceError
from studio.services.job_support import (
    CONFIG_NAME,
    LOG_NAME,
    FieldSpec,
    RecipeSpec,
    checkpoint_facts,
    child_env,
    coerce_field,
    last_error_line,
    nest,
    read_log_tail,
    recipe_schemas,
    recipe_spec,
)
from studio.settings import Settings

__all__ = [
    "CONFIG_NAME", "LOG_NAME", "CheckpointInfo", "FieldSpec", "JobDetail", "JobInfo", "JobService", "RecipeSpec",
    "checkpoint_facts", "child_env", "coerce_field", "last_error_line", "nest", "read_log_tail", "recipe_schemas",
    "tree_order",
]  # fmt: skip

MAX_PROCESSES = 64


# --------------------------------------------------------------------------- views


@dataclass(frozen=True)
class JobInfo:
    id: int
    name: str | None
    recipe: str
    state: str
    failure_code: str | None
    failure_message: str | None
    step: int
    total_steps: int | None
    progress: float
    """0..1 (1 once succeeded)."""
    eta_s: float | None
    """Seconds left while running: time per step since this attempt started × steps left."""
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    attempt: int
    parent_job_id: int | None
    output_checkpoint_id: int | None
    snapshot_id: int | None
    base_checkpoint_id: int | None
    project_id: int | None
    processes: int
    timeout_s: int | None
    exit_code: int | None
    cancel_requested: bool
    output_dir: str | None


@dataclass(frozen=True)
class CheckpointInfo:
    id: int
    name: str
    path: str
    kind: str
    status: str
    parent_id: int | None
    recipe: str | None
    snapshot_id: int | None
    snapshot_sha256: str | None
    job_id: int | None
    """The job that produced it (None for base models)."""
    metrics: dict[str, Any]
    manifest_sha256: str | None
    created_at: datetime | None
    depth: int = 0
    """Depth in the lineage tree (0: a root such as a base model)."""
    problem: str | None = None
    """Why verification failed (only from ``verify_checkpoint``)."""


@dataclass(frozen=True)
class JobDetail(JobInfo):
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """Metric series by name, ``(step, value)`` in step order."""
    log_tail: str = ""
    """The last lines of job.log as plain text."""
    output_checkpoint: CheckpointInfo | None = None
    parent: JobInfo | None = None
    snapshot_sha256: str | None = None


# --------------------------------------------------------------------------- the service


def _info(job: Job, start_step: int | None = None, now: datetime | None = None) -> JobInfo:
    state = str(job.state)
    total = job.total_steps
    progress = min(1.0, job.step / total) if total else 0.0
    if state == JobState.succeeded:
        progress = 1.0
    eta = None
    if (
        state == JobState.running
        and total
        and job.started_at
        and start_step is not None
        and job.step > start_step
    ):
        elapsed = ((now or utcnow()) - q.aware(job.started_at)).total_seconds()
        eta = max(0.0, elapsed / (job.step - start_step) * (total - job.step))
    return JobInfo(
        id=job.id, name=job.name, recipe=job.recipe, state=state,
        failure_code=str(job.failure_code) if job.failure_code else None, failure_message=job.failure_message,
        step=job.step, total_steps=total, progress=progress, eta_s=eta, created_at=job.created_at,
        started_at=job.started_at, finished_at=job.finished_at, attempt=job.attempt,
        parent_job_id=job.parent_job_id, output_checkpoint_id=job.output_checkpoint_id, snapshot_id=job.snapshot_id,
        base_checkpoint_id=job.base_checkpoint_id, project_id=job.project_id, processes=job.processes,
        timeout_s=job.timeout_s, exit_code=job.exit_code, cancel_requested=job.cancel_requested_at is not None,
        output_dir=job.output_dir,
    )  # fmt: skip


def _checkpoint_info(
    row: Checkpoint,
    job_ids: Mapping[int, int],
    shas: Mapping[int, str],
    depth: int = 0,
    problem: str | None = None,
) -> CheckpointInfo:
    return CheckpointInfo(
        id=row.id, name=row.name, path=row.path, kind=str(row.kind), status=str(row.status), parent_id=row.parent_id,
        recipe=row.recipe, snapshot_id=row.snapshot_id, snapshot_sha256=shas.get(row.snapshot_id),
        job_id=job_ids.get(row.id), metrics=dict(row.metrics or {}), manifest_sha256=row.manifest_sha256,
        created_at=row.created_at, depth=depth, problem=problem,
    )  # fmt: skip


def tree_order(rows: list[Checkpoint]) -> list[tuple[Checkpoint, int]]:
    """``[(row, depth)]``: each checkpoint right after its parent (and its parent's earlier children);
    a checkpoint whose parent is not in ``rows`` is a root. Children in id order; cycles cut."""
    by_id = {r.id: r for r in rows}
    children: dict[int | None, list[Checkpoint]] = {}
    for row in sorted(rows, key=lambda r: r.id):
        parent = row.parent_id if row.parent_id in by_id and row.parent_id != row.id else None
        children.setdefault(parent, []).append(row)
    out: list[tuple[Checkpoint, int]] = []
    seen: set[int] = set()
    stack = [(r, 0) for r in reversed(children.get(None, []))]
    while stack:
        row, depth = stack.pop()
        if row.id in seen:
            continue
        seen.add(row.id)
        out.append((row, depth))
        stack.extend((c, depth + 1) for c in reversed(children.get(row.id, [])))
    out.extend((r, 0) for r in sorted(rows, key=lambda r: r.id) if r.id not in seen)  # cycles: still listed
    return out


class JobService:
    def __init__(self, db: Database, settings: Settings, users):
        self.db = db
        self.settings = settings
        self.users = users

    @property
    def jobs_dir(self) -> Path:
        return Path(self.settings.data_dir) / "jobs"

    # ----------------------------------------------------------------------- recipes and forms

    def recipes(self) -> dict[str, RecipeSpec]:
        """Every recipe the trainers offer, with its form fields (cached per process)."""
        return {name: recipe_spec(name, raw) for name, raw in recipe_schemas().items()}

    def _recipe(self, recipe: str) -> RecipeSpec:
        specs = self.recipes()
        if recipe not in specs:
            raise ServiceError(f"unknown recipe {recipe!r}; choose one of {', '.join(specs) or '(none)'}")
        return specs[recipe]

    def validate(self, recipe: str, values: Mapping[str, Any]) -> dict[str, Any]:
        """Form values by dotted field name → typed values (same keys; empty optional fields → None,
        empty others → their default). ServiceError names the first bad field."""
        spec = self._recipe(recipe)
        fields = {f.name: f for f in spec.fields}
        typed = {}
        for key, raw in values.items():
            f = fields.get(key)
            if f is None:
                close = difflib.get_close_matches(str(key), list(fields), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ServiceError(f"field '{key}': not a setting of {recipe}{hint}")
            if f.managed:
                raise ServiceError(f"field '{key}': set by the studio, not by hand")
            typed[key] = coerce_field(f, raw)
        return typed

    # ----------------------------------------------------------------------- launching and control

    def launch(
        self,
        username: str | None,
        *,
        project_id: int,
        recipe: str,
        snapshot_id: int,
        base_checkpoint_id: int | None,
        values: Mapping[str, Any],
        name: str | None = None,
        processes: int = 1,
        timeout_s: int | None = None,
    ) -> JobInfo:
        """Queue a job: the form values plus the fields the studio fills (snapshot path, base model,
        model cache, no progress bar). ``base_checkpoint_id`` None: the recipe's default model."""
        user = self.users.require(username, "admin")
        spec = self._recipe(recipe)
        typed = self.validate(recipe, values)
        if not 1 <= int(processes) <= MAX_PROCESSES:
            raise ServiceError(f"processes must be 1..{MAX_PROCESSES}, got {processes}")
        if timeout_s is not None and int(timeout_s) < 1:
            raise ServiceError(f"the time limit must be at least 1 second, got {timeout_s}")
        name = (name or "").strip() or None
        if name is not None and len(name) > 200:
            raise ServiceError("the job name is longer than 200 characters")
        fields = {f.name: f for f in spec.fields}
        with self.db.read() as s:
            if crud.get_project(s, project_id) is None:
                raise NotFound(f"project {project_id} does not exist")
            snapshot = s.get(DatasetSnapshot, snapshot_id)
            if snapshot is None or snapshot.project_id not in (None, project_id):
                raise NotFound(f"dataset snapshot {snapshot_id} does not exist in this project")
            kind = (snapshot.filters or {}).get("variant") or str(snapshot.kind)
            if spec.snapshot_kinds and kind not in spec.snapshot_kinds:
                raise ServiceError(
                    f"{recipe} trains on {' or '.join(spec.snapshot_kinds)} snapshots; snapshot {snapshot_id} is {kind}"
                )
            base = None
            if base_checkpoint_id is not None:
                base = s.get(Checkpoint, base_checkpoint_id)
                if base is None:
                    raise NotFound(f"checkpoint {base_checkpoint_id} does not exist")
                if base.status == CheckpointStatus.unloadable:
                    raise ServiceError(
                        f"checkpoint {base.id} is unloadable (its files do not match its manifest)"
                    )
                if is_import_placeholder(base.path):
                    raise ServiceError(
                        f"checkpoint {base.id} stands for imported data and has no weights; choose a model"
                    )
                if spec.base_kind == "policy" and base.kind != CheckpointKind.policy:
                    raise ServiceError(
                        f"{recipe} needs a policy (causal LM) base; checkpoint {base.id} is {base.kind}"
                    )
        if not Path(snapshot.path).exists():
            raise ServiceError(f"the file of snapshot {snapshot_id} is missing: {snapshot.path}")
        managed = {
            "snapshot": snapshot.path,
            "model": base.path
            if base is not None
            else fields.get("model", FieldSpec("model", "str")).default,
            "model_cache": str(self.settings.model_cache),
            "progress": False,
            "resume": True,
        }
        config = nest({**{k: v for k, v in managed.items() if k in fields}, **typed})
        with self.db.write() as s:
            job = q.create_job(
                s, recipe=recipe, config=config, jobs_dir=self.jobs_dir, project_id=project_id,
                snapshot_id=snapshot_id, base_checkpoint_id=base_checkpoint_id, name=name,
                processes=int(processes), timeout_s=None if timeout_s is None else int(timeout_s), created_by=user.id,
            )  # fmt: skip
            return _info(job)

    def cancel(self, username: str | None, job_id: int) -> JobInfo:
        """Queued or interrupted: cancelled at once. Running: the worker stops it (SIGTERM → checkpoint →
        cancelled). Finished: Conflict."""
        self.users.require(username, "admin")
        for _ in range(3):
            with self.db.write() as s:
                job = self._job(s, job_id)
                state = JobState(job.state)
                if state in q.TERMINAL:
                    raise Conflict(f"job {job_id} is already {state}", current=_info(job))
                if state == JobState.running:
                    done = q.request_cancel(s, job_id)
                else:
                    done = q.transition(s, job_id, JobState.cancelled, expected=[state],
                                        failure_message=f"cancelled while {state}")  # fmt: skip
                if done:
                    return _info(self._job(s, job_id))
        raise Conflict(f"job {job_id} changed state meanwhile; try again")

    def resume(self, username: str | None, job_id: int) -> JobInfo:
        """Interrupted: queued again (same job, next attempt). Cancelled or failed (except bad_input): a
        new queued job with the same folder and config, ``parent_job_id`` = this one."""
        user = self.users.require(username, "admin")
        with self.db.write() as s:
            job = self._job(s, job_id)
            state = JobState(job.state)
            if state == JobState.interrupted:
                if not q.transition(s, job_id, JobState.queued, expected=[state], attempt=Job.attempt + 1,
                                    worker_id=None, pid=None, failure_message=None, cancel_requested_at=None):  # fmt: skip
                    raise Conflict(f"job {job_id} changed state meanwhile; try again")
                return _info(self._job(s, job_id))
            if state not in (JobState.cancelled, JobState.failed):
                raise Conflict(f"job {job_id} is {state}; only cancelled, failed or interrupted jobs resume")
            if job.failure_code == FailureCode.bad_input:
                raise Conflict(
                    f"job {job_id} failed on its input ({job.failure_message}); launch a new job instead"
                )
            q.lock_folder(s, job.output_dir)  # two resumes at once (PostgreSQL) would both find it free
            other = q.live_job_in_folder(s, job.output_dir)
            if other is not None:
                raise Conflict(f"job {other.id} is already continuing this run ({other.state})")
            new = q.create_job(
                s, recipe=job.recipe, config=dict(job.config or {}), output_dir=job.output_dir,
                project_id=job.project_id, snapshot_id=job.snapshot_id, base_checkpoint_id=job.base_checkpoint_id,
                parent_job_id=job.id, name=job.name, processes=job.processes, timeout_s=job.timeout_s,
                created_by=user.id,
            )  # fmt: skip
            return _info(new)

    # ----------------------------------------------------------------------- reading

    def list_jobs(self, username: str | None, project_id: int | None = None) -> list[JobInfo]:
        """Newest first."""
        self.users.require(username, "admin")
        with self.db.read() as s:
            jobs = q.list_jobs(s, project_id=project_id)
            starts = {j.id: q.attempt_start_step(s, j.id) for j in jobs if j.state == JobState.running}
        now = utcnow()
        return [_info(j, starts.get(j.id), now) for j in jobs]

    def job(self, username: str | None, job_id: int) -> JobDetail:
        self.users.require(username, "admin")
        with self.db.read() as s:
            job = self._job(s, job_id)
            info = _info(job, q.attempt_start_step(s, job_id))
            series = q.metric_series(s, job_id)
            parent = q.get_job(s, job.parent_job_id) if job.parent_job_id else None
            output = s.get(Checkpoint, job.output_checkpoint_id) if job.output_checkpoint_id else None
            shas = q.snapshot_hashes(s, [job.snapshot_id, output.snapshot_id if output else None])
            output_info = _checkpoint_info(output, {output.id: job.id}, shas) if output else None
        log = read_log_tail(Path(job.output_dir) / LOG_NAME) if job.output_dir else ""
        return JobDetail(
            **info.__dict__, config=dict(job.config or {}), metrics=series, log_tail=log,
            output_checkpoint=output_info, parent=_info(parent) if parent else None,
            snapshot_sha256=shas.get(job.snapshot_id),
        )  # fmt: skip

    def _job(self, s, job_id: int) -> Job:
        job = q.get_job(s, job_id)
        if job is None:
            raise NotFound(f"job {job_id} does not exist")
        return job

    # ----------------------------------------------------------------------- checkpoints

    def checkpoints(self, username: str | None, project_id: int | None = None) -> list[CheckpointInfo]:
        """The registry in tree order (each checkpoint after its parent), with depth for indentation."""
        self.users.require(username, "admin")
        with self.db.read() as s:
            rows = crud.list_checkpoints(s, project_id=project_id)
            job_ids = q.jobs_by_output_checkpoint(s)
            shas = q.snapshot_hashes(s, [r.snapshot_id for r in rows])
        return [_checkpoint_info(r, job_ids, shas, depth) for r, depth in tree_order(rows)]

    def verify_checkpoint(self, username: str | None, checkpoint_id: int) -> CheckpointInfo:
        """Re-hash a trained checkpoint's files against its manifest and the digest recorded at
        registration: ready if they match, else unloadable (never loaded). Base models (no manifest)
        are returned as they are."""
        self.users.require(username, "admin")
        with self.db.read() as s:
            row = s.get(Checkpoint, checkpoint_id)
            if row is None:
                raise NotFound(f"checkpoint {checkpoint_id} does not exist")
        problem = None
        if row.manifest_sha256 is not None:
            facts = checkpoint_facts(row.path, row.manifest_sha256)
            problem = facts.problem
            status = CheckpointStatus.unloadable if problem else CheckpointStatus.ready
            with self.db.write() as s:
                q.set_checkpoint_status(s, checkpoint_id, status)
        with self.db.read() as s:
            row = s.get(Checkpoint, checkpoint_id, populate_existing=True)
            job_ids = q.jobs_by_output_checkpoint(s)
            shas = q.snapshot_hashes(s, [row.snapshot_id])
        return _checkpoint_info(row, job_ids, shas, problem=problem)
