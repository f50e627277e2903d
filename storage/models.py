"""The studio's data model as SQLModel tables.

One module holds every table so Alembic sees the whole schema. The loop of DESIGN.md reads
top to bottom: users and projects, prompts, checkpoints and generations, comparisons and the
annotations made on them, then the training side (snapshots, jobs, metric points).

Conventions:
- ids are integer surrogate keys; natural keys get unique constraints (named through the
  metadata naming convention so SQLite batch migrations can alter them).
- enumerations are stored as short strings with a CHECK constraint (`native_enum=False`), so
  PostgreSQL needs no enum types and migrations stay plain.
- times are UTC (`utcnow`); text is stored exactly as given (no trimming, no normalisation).
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import MetaData
from sqlmodel import Field, SQLModel

# Named constraints from day one: Alembic's batch mode (SQLite) can only alter what has a name.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
SQLModel.metadata = MetaData(naming_convention=NAMING_CONVENTION)
metadata = SQLModel.metadata


def utcnow() -> datetime:
    return datetime.now(UTC)


def _enum(cls: type[enum.Enum], name: str) -> sa.Enum:
    # Store the enum *values* (short lower-case strings), not member names.
    return sa.Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=24,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


def _json(**kw: Any) -> Any:
    return Field(default=None, sa_column=sa.Column(sa.JSON, **kw))


def _created() -> Any:
    return Field(default_factory=utcnow, nullable=False)


# --------------------------------------------------------------------------- enumerations


class Role(enum.StrEnum):
    admin = "admin"
    annotator = "annotator"
    rater = "rater"


class PromptKind(enum.StrEnum):
    text = "text"
    chat = "chat"


class CheckpointKind(enum.StrEnum):
    policy = "policy"
    reward = "reward"
    segment_reward = "segment_reward"


class CheckpointStatus(enum.StrEnum):
    ready = "ready"
    unloadable = "unloadable"


class ComparisonPurpose(enum.StrEnum):
    annotate = "annotate"
    arena = "arena"


class TaskKind(enum.StrEnum):
    pairwise = "pairwise"
    segment = "segment"
    # An arena battle reserved for one rater; apart from `pairwise` so the annotation queue
    # never hands out (or counts) arena battles.
    arena = "arena"


class AssignmentStatus(enum.StrEnum):
    reserved = "reserved"
    done = "done"
    skipped = "skipped"
    expired = "expired"


class Outcome(enum.StrEnum):
    """The four outcomes of a pairwise judgement; `a`/`b` refer to the comparison's generations."""

    a = "a"
    b = "b"
    tie = "tie"
    both_bad = "both_bad"


class Strength(enum.StrEnum):
    slight = "slight"
    clear = "clear"
    much = "much"


class ArenaSource(enum.StrEnum):
    """How a model entered a project's arena: registered by a training job, or added by an admin."""

    auto = "auto"
    manual = "manual"


class Polarity(enum.StrEnum):
    good = "good"
    bad = "bad"


class SnapshotKind(enum.StrEnum):
    preferences = "preferences"
    reward = "reward"
    unpaired = "unpaired"
    segments = "segments"
    votes = "votes"
    prompts = "prompts"


class JobState(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    interrupted = "interrupted"


class FailureCode(enum.StrEnum):
    oom = "oom"
    nan_loss = "nan_loss"
    disk_full = "disk_full"
    bad_input = "bad_input"
    crashed = "crashed"
    timeout = "timeout"


# --------------------------------------------------------------------------- people and projects


class User(SQLModel, table=True):
    __tablename__ = "users"
    id: int | None = Field(default=None, primary_key=True)
    username: str = Field(max_length=64, unique=True, index=True)
    # argon2/bcrypt hash; None until the user sets a password (no default passwords).
    password_hash: str | None = Field(default=None, max_length=255)
    role: Role = Field(sa_column=sa.Column(_enum(Role, "role"), nullable=False))
    is_active: bool = Field(default=True)
    created_at: datetime = _created()
    # Sessions issued before this moment are invalid (set when the password changes).
    password_changed_at: datetime | None = None
    last_login_at: datetime | None = None


class Project(SQLModel, table=True):
    __tablename__ = "projects"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=200, unique=True)
    description: str = Field(default="")
    # Labels annotators may attach to a span, e.g. ["factual error", "off topic"].
    span_labels: list[str] | None = _json()
    # Share of items that get `overlap_k` annotators (the rest get one).
    overlap_fraction: float = Field(default=0.0)
    overlap_k: int = Field(default=1)
    is_demo: bool = Field(default=False)
    created_by: int | None = Field(default=None, foreign_key="users.id")
    created_at: datetime = _created()


class GuidelineVersion(SQLModel, table=True):
    """Guidelines are versioned: each edit adds a row; votes record the version they saw."""

    __tablename__ = "guideline_versions"
    __table_args__ = (sa.UniqueConstraint("project_id", "version"),)
    id: int | None = Field(default=None, primary_key=True)
    project_id: int = Field(foreign_key="projects.id", index=True)
    version: int
    text: str
    created_by: int | None = Field(default=None, foreign_key="users.id")
    created_at: datetime = _created()


# --------------------------------------------------------------------------- prompts and generations


class Prompt(SQLModel, table=True):
    __tablename__ = "prompts"
    __table_args__ = (sa.UniqueConstraint("project_id", "external_id"),)
    id: int | None = Field(default=None, primary_key=True)
    project_id: int = Field(foreign_key="projects.id", index=True)
    external_id: str = Field(max_length=200)
    kind: PromptKind = Field(sa_column=sa.Column(_enum(PromptKind, "prompt_kind"), nullable=False))
    # Plain prompt text; for chat prompts a readable rendering ("role: content" lines) used for
    # search and display. The canonical chat form is `messages`.
    text: str
    messages: list[dict[str, str]] | None = _json()
    tags: list[str] | None = _json()
    source: str | None = Field(default=None, max_length=500)
    created_at: datetime = _created()


class Checkpoint(SQLModel, table=True):
    """A model the studio can load: a base model reference or a trained checkpoint folder."""

    __tablename__ = "checkpoints"
    # One row per model reference: a base model by its name, a trained checkpoint by its folder.
    __table_args__ = (sa.UniqueConstraint("path", "kind"),)
    id: int | None = Field(default=None, primary_key=True)
    project_id: int | None = Field(default=None, foreign_key="projects.id", index=True)
    name: str = Field(max_length=200)
    # What the model resolver accepts: a short name of a default model, a local folder or an HF id.
    path: str = Field(max_length=1000)
    kind: CheckpointKind = Field(
        sa_column=sa.Column(_enum(CheckpointKind, "checkpoint_kind"), nullable=False)
    )
    parent_id: int | None = Field(default=None, foreign_key="checkpoints.id")
    recipe: str | None = Field(default=None, max_length=64)
    snapshot_id: int | None = Field(default=None, foreign_key="dataset_snapshots.id")
    manifest_sha256: str | None = Field(default=None, max_length=64)
    status: CheckpointStatus = Field(
        default=CheckpointStatus.ready,
        sa_column=sa.Column(_enum(CheckpointStatus, "checkpoint_status"), nullable=False),
    )
    metrics: dict[str, Any] | None = _json()
    created_at: datetime = _created()


class Generation(SQLModel, table=True):
    __tablename__ = "generations"
    id: int | None = Field(default=None, primary_key=True)
    prompt_id: int = Field(foreign_key="prompts.id", index=True)
    checkpoint_id: int = Field(foreign_key="checkpoints.id", index=True)
    text: str
    # Sampling settings exactly as used: temperature, top_p, max_new_tokens, do_sample.
    params: dict[str, Any] | None = _json()
    seed: int | None = None
    sample_index: int = Field(default=0)
    num_tokens: int | None = None
    finish_reason: str | None = Field(default=None, max_length=16)  # "eos" | "length"
    created_at: datetime = _created()


# --------------------------------------------------------------------------- annotation


class Comparison(SQLModel, table=True):
    """Two generations of one prompt, to be judged side by side."""

    __tablename__ = "comparisons"
    __table_args__ = (
        sa.UniqueConstraint("generation_a_id", "generation_b_id", "purpose"),
        sa.CheckConstraint("generation_a_id <> generation_b_id", name="distinct_generations"),
    )
    id: int | None = Field(default=None, primary_key=True)
    project_id: int = Field(foreign_key="projects.id", index=True)
    prompt_id: int = Field(foreign_key="prompts.id", index=True)
    generation_a_id: int = Field(foreign_key="generations.id")
    generation_b_id: int = Field(foreign_key="generations.id")
    purpose: ComparisonPurpose = Field(
        sa_column=sa.Column(_enum(ComparisonPurpose, "comparison_purpose"), nullable=False)
    )
    # Default display order; each vote records the order its annotator actually saw.
    a_on_left: bool = Field(default=True)
    # Annotators needed for this item (1, or the project's overlap k).
    required_votes: int = Field(default=1)
    # Gold items carry a known answer for rater calibration.
    gold_outcome: Outcome | None = Field(
        default=None, sa_column=sa.Column(_enum(Outcome, "gold_outcome"), nullable=True)
    )
    created_at: datetime = _created()


class Assignment(SQLModel, table=True):
    """An item reserved for one user until `expires_at`."""

    __tablename__ = "assignments"
    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="users.id", index=True)
    project_id: int | None = Field(default=None, foreign_key="projects.id", index=True)
    task: TaskKind = Field(sa_column=sa.Column(_enum(TaskKind, "task_kind"), nullable=False))
    comparison_id: int | None = Field(default=None, foreign_key="comparisons.id", index=True)
    generation_id: int | None = Field(default=None, foreign_key="generations.id", index=True)
    status: AssignmentStatus = Field(
        default=AssignmentStatus.reserved,
        sa_column=sa.Column(_enum(AssignmentStatus, "assignment_status"), nullable=False),
    )
    reserved_at: datetime = _created()
    expires_at: datetime
    finished_at: datetime | None = None


class PairwiseVote(SQLModel, table=True):
    __tablename__ = "pairwise_votes"
    __table_args__ = (sa.UniqueConstraint("comparison_id", "user_id"),)
    id: int | None = Field(default=None, primary_key=True)
    comparison_id: int = Field(foreign_key="comparisons.id", index=True)
    user_id: int = Field(foreign_key="users.id", index=True)
    outcome: Outcome = Field(sa_column=sa.Column(_enum(Outcome, "outcome"), nullable=False))
    strength: Strength | None = Field(
        default=None, sa_column=sa.Column(_enum(Strength, "strength"), nullable=True)
    )
    rationale: str | None = None
    # Which generation the annotator saw on the left (position-bias analysis).
    left_generation_id: int = Field(foreign_key="generations.id")
    assignment_id: int | None = Field(default=None, foreign_key="assignments.id")
    # A retry with the same key returns the first result instead of voting twice.
    idempotency_key: str = Field(max_length=64, unique=True)
    time_spent_ms: int | None = None
    guideline_version: int | None = None
    created_at: datetime = _created()


class SpanSet(SQLModel, table=True):
    """One user's spans on one generation; `version` guards against stale saves."""

    __tablename__ = "span_sets"
    __table_args__ = (sa.UniqueConstraint("generation_id", "user_id"),)
    id: int | None = Field(default=None, primary_key=True)
    generation_id: int = Field(foreign_key="generations.id", index=True)
    user_id: int = Field(foreign_key="users.id", index=True)
    version: int = Field(default=1)
    submitted: bool = Field(default=False)
    guideline_version: int | None = None
    updated_at: datetime = _created()


class SpanAnnotation(SQLModel, table=True):
    """A half-open span [start, end) in Unicode code points of the generation's text."""

    __tablename__ = "span_annotations"
    __table_args__ = (sa.CheckConstraint('start >= 0 AND "end" > start', name="valid_range"),)
    id: int | None = Field(default=None, primary_key=True)
    span_set_id: int = Field(foreign_key="span_sets.id", index=True)
    start: int
    end: int
    polarity: Polarity = Field(sa_column=sa.Column(_enum(Polarity, "polarity"), nullable=False))
    label: str | None = Field(default=None, max_length=100)
    comment: str | None = None


class SpanSuggestion(SQLModel, table=True):
    """A span proposed by a segment reward model, shown to annotators as a suggestion."""

    __tablename__ = "span_suggestions"
    __table_args__ = (
        sa.UniqueConstraint("generation_id", "checkpoint_id", "start"),
        sa.CheckConstraint('start >= 0 AND "end" > start', name="valid_range"),
    )
    id: int | None = Field(default=None, primary_key=True)
    generation_id: int = Field(foreign_key="generations.id", index=True)
    checkpoint_id: int = Field(foreign_key="checkpoints.id")
    start: int
    end: int
    polarity: Polarity = Field(sa_column=sa.Column(_enum(Polarity, "polarity"), nullable=False))
    # The segment's normalised reward (higher = better).
    score: float
    created_at: datetime = _created()


# --------------------------------------------------------------------------- arena and reward scores


class ArenaModel(SQLModel, table=True):
    """A checkpoint taking part in a project's blind arena; the anchor is pinned at 1000 on the board."""

    __tablename__ = "arena_models"
    __table_args__ = (sa.UniqueConstraint("project_id", "checkpoint_id"),)
    id: int | None = Field(default=None, primary_key=True)
    project_id: int = Field(foreign_key="projects.id", index=True)
    checkpoint_id: int = Field(foreign_key="checkpoints.id")
    is_anchor: bool = Field(default=False)
    # Removed models stay (their battles still count) but get no new battles.
    active: bool = Field(default=True)
    source: ArenaSource = Field(sa_column=sa.Column(_enum(ArenaSource, "arena_source"), nullable=False))
    added_at: datetime = _created()
    added_by: int | None = Field(default=None, foreign_key="users.id")


class RewardScore(SQLModel, table=True):
    """A reward model's score of one generation (CRUD in storage/reward_scores.py)."""

    __tablename__ = "reward_scores"
    __table_args__ = (sa.UniqueConstraint("checkpoint_id", "generation_id"),)
    id: int | None = Field(default=None, primary_key=True)
    # The reward model that scored.
    checkpoint_id: int = Field(foreign_key="checkpoints.id")
    generation_id: int = Field(foreign_key="generations.id", index=True)
    score: float
    created_at: datetime = _created()


# --------------------------------------------------------------------------- training


class DatasetSnapshot(SQLModel, table=True):
    """A frozen export file; trainers read only this file, identified by its sha256."""

    __tablename__ = "dataset_snapshots"
    id: int | None = Field(default=None, primary_key=True)
    project_id: int | None = Field(default=None, foreign_key="projects.id", index=True)
    kind: SnapshotKind = Field(sa_column=sa.Column(_enum(SnapshotKind, "snapshot_kind"), nullable=False))
    format: str = Field(max_length=16)  # jsonl | parquet | hf
    path: str = Field(max_length=1000)
    sha256: str = Field(max_length=64)
    row_count: int = Field(default=0)
    counts: dict[str, Any] | None = _json()
    filters: dict[str, Any] | None = _json()
    created_by: int | None = Field(default=None, foreign_key="users.id")
    created_at: datetime = _created()


class Job(SQLModel, table=True):
    __tablename__ = "jobs"
    id: int | None = Field(default=None, primary_key=True)
    project_id: int | None = Field(default=None, foreign_key="projects.id", index=True)
    name: str | None = Field(default=None, max_length=200)
    recipe: str = Field(max_length=64)
    # The resolved recipe config (managed fields included); the worker writes it to config.json.
    config: dict[str, Any] | None = _json()
    # >1: `accelerate launch --num_processes N -m trainers ...`.
    processes: int = Field(default=1, sa_column_kwargs={"server_default": "1"})
    # Wall-clock limit of one attempt; past it the job is stopped and fails with `timeout`.
    timeout_s: int | None = None
    state: JobState = Field(
        default=JobState.queued,
        sa_column=sa.Column(_enum(JobState, "job_state"), nullable=False, index=True),
    )
    failure_code: FailureCode | None = Field(
        default=None, sa_column=sa.Column(_enum(FailureCode, "failure_code"), nullable=True)
    )
    failure_message: str | None = None
    snapshot_id: int | None = Field(default=None, foreign_key="dataset_snapshots.id")
    base_checkpoint_id: int | None = Field(default=None, foreign_key="checkpoints.id")
    parent_job_id: int | None = Field(default=None, foreign_key="jobs.id")
    # The checkpoint this job produced (lineage: base checkpoint + snapshot -> output).
    output_checkpoint_id: int | None = Field(default=None, foreign_key="checkpoints.id")
    output_dir: str | None = Field(default=None, max_length=1000)
    worker_id: str | None = Field(default=None, max_length=128)
    pid: int | None = None
    step: int = Field(default=0)
    total_steps: int | None = None
    attempt: int = Field(default=0)
    # The child's exit status of the last attempt (negative: killed by that signal).
    exit_code: int | None = None
    # Set by a cancel of a running job; the worker then stops the child (SIGTERM, SIGKILL after grace).
    cancel_requested_at: datetime | None = None
    created_by: int | None = Field(default=None, foreign_key="users.id")
    created_at: datetime = _created()
    # Start of the current attempt (each claim sets it).
    started_at: datetime | None = None
    heartbeat_at: datetime | None = None
    finished_at: datetime | None = None


class MetricPoint(SQLModel, table=True):
    __tablename__ = "metric_points"
    __table_args__ = (sa.UniqueConstraint("job_id", "step", "name"),)
    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="jobs.id", index=True)
    step: int
    name: str = Field(max_length=128)
    value: float
    created_at: datetime = _created()


ALL_TABLES = [
    User,
    Project,
    GuidelineVersion,
    Prompt,
    Checkpoint,
    Generation,
    Comparison,
    Assignment,
    PairwiseVote,
    SpanSet,
    SpanAnnotation,
    SpanSuggestion,
    DatasetSnapshot,
    Job,
    MetricPoint,
    ArenaModel,
    RewardScore,
]
