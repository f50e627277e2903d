"""Keyword-only CRUD for the annotation work queue (assignments with a TTL). Never commits.

The queue hands out *items* (a comparison for a pairwise task, a generation for a segment task)
as `Assignment` rows with a TTL. An item needs `required` annotators (the comparison's
`required_votes`; for a generation, k or 1 from `overlap_selected`). It is open to a user when

    votes (or submitted span sets) + other users' live reservations < required

and the user has not finished (voted, submitted) or skipped it. A live reservation has status
`reserved` and an `expires_at` in the future; past its TTL it no longer counts, and it is
marked `expired` lazily when the next reservation in the project is made.

Atomicity: a claim (`comparison_open` / `generation_open`, then `add_assignment`) runs inside
`Database.write()` after `lock_queue`; so do the checks of a vote, a skip and a span save that
read what others hold (`comparison_taken_by_others`, `generation_taken_by_others`). On SQLite that transaction is BEGIN IMMEDIATE, so claims
are serialised by the database lock; on PostgreSQL `lock_queue` takes a transaction-scoped
advisory lock per (project, task), so two concurrent claims never both see the same open slot.
The expensive ranking query (`pairwise_queue` / `segment_queue`) may run before, in a read.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Session, func, select
from sqlmodel.sql.sqltypes import UTCDateTime

from storage.annotation import as_utc
from storage.models import (
    Assignment,
    AssignmentStatus,
    Comparison,
    ComparisonPurpose,
    Generation,
    PairwiseVote,
    Project,
    Prompt,
    SpanSet,
    TaskKind,
)

_HASH_MUL = 2654435769  # floor(2**32 / golden ratio): Fibonacci hashing spreads consecutive ids evenly
_HASH_PROJECT = 40503
_HASH_MOD = 2**32
_LOCK_CLASS = 727275  # advisory-lock namespace of the annotation queue (the migration lock is 727274)
_TASK_CODE = {TaskKind.pairwise: 0, TaskKind.segment: 1}
DRAFT_PRIORITY = 1_000_000


# --------------------------------------------------------------------------- overlap


def overlap_hash(project_id: int, item_id: int) -> int:
    """A stable hash of (project, item) in [0, 2**32); the same formula as `_required_expr`."""
    return (item_id * _HASH_MUL + project_id * _HASH_PROJECT) % _HASH_MOD


def overlap_selected(project_id: int, item_id: int, fraction: float) -> bool:
    """Whether the item is one of the project's overlap share (it then needs k annotators)."""
    return overlap_hash(project_id, item_id) < fraction * _HASH_MOD


# Bound parameters of the cached queue statements (built once, executed with a dict).
_P_PROJECT = sa.bindparam("q_project", type_=sa.Integer)
_P_USER = sa.bindparam("q_user", type_=sa.Integer)
_P_NOW = sa.bindparam("q_now", type_=UTCDateTime())
_P_ITEM = sa.bindparam("q_item", type_=sa.Integer)
_P_LIMIT = sa.bindparam("q_limit", type_=sa.Integer)
_P_HASH_OFFSET = sa.bindparam("q_hash_offset", type_=sa.BigInteger)
_P_THRESHOLD = sa.bindparam("q_threshold", type_=sa.Float)
_P_K = sa.bindparam("q_k", type_=sa.Integer)


def _required_expr(item_id_col):
    """SQL: k if `overlap_selected(project, item, fraction)` else 1 (parameters: `_required_params`)."""
    mul, mod = sa.literal_column(str(_HASH_MUL)), sa.literal_column(str(_HASH_MOD))
    hashed = (sa.cast(item_id_col, sa.BigInteger) * mul + _P_HASH_OFFSET) % mod
    return sa.case((hashed < _P_THRESHOLD, _P_K), else_=1)


def _required_params(project_id: int, fraction: float, k: int) -> dict[str, float | int]:
    return {
        "q_hash_offset": project_id * _HASH_PROJECT,
        "q_threshold": float(fraction) * _HASH_MOD,
        "q_k": int(k),
    }


def segment_required_votes(project_id: int, generation_id: int, fraction: float, k: int) -> int:
    """Annotators a generation needs for the segment task: k for the overlap share, else 1."""
    return k if k > 1 and overlap_selected(project_id, generation_id, fraction) else 1


def set_required_votes_where_unvoted(session: Session, *, project_id: int, fraction: float, k: int) -> int:
    """Re-derive `required_votes` of the project's comparisons that have no vote yet; returns how many."""
    voted = sa.exists().where(PairwiseVote.comparison_id == Comparison.id)
    stmt = (
        sa.update(Comparison)
        .where(Comparison.project_id == project_id, Comparison.purpose == ComparisonPurpose.annotate, ~voted)
        .values(required_votes=_required_expr(Comparison.id))
    )
    return session.connection().execute(stmt, _required_params(project_id, fraction, k)).rowcount


# --------------------------------------------------------------------------- reservations


def lock_queue(session: Session, *, project_id: int, task: TaskKind) -> None:
    """Serialise reservations in one project and task (PostgreSQL advisory lock until commit).

    SQLite needs nothing: the caller's write transaction is BEGIN IMMEDIATE.
    """
    if session.get_bind().dialect.name == "postgresql":
        key = project_id * 2 + _TASK_CODE[TaskKind(task)]
        session.execute(sa.text("SELECT pg_advisory_xact_lock(:cls, :key)"), {"cls": _LOCK_CLASS, "key": key})


def expire_reservations(session: Session, *, project_id: int, task: TaskKind, now: datetime) -> int:
    """Mark the project's reservations past their TTL as expired; returns how many."""
    result = session.execute(
        sa.update(Assignment)
        .where(
            Assignment.project_id == project_id,
            Assignment.task == task,
            Assignment.status == AssignmentStatus.reserved,
            Assignment.expires_at <= as_utc(now),
        )
        .values(status=AssignmentStatus.expired)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount


def live_reservation(
    session: Session, *, user_id: int, project_id: int, task: TaskKind, now: datetime
) -> Assignment | None:
    """The user's unexpired reservation in this project and task, if any (the oldest)."""
    return session.exec(
        select(Assignment)
        .where(
            Assignment.user_id == user_id,
            Assignment.project_id == project_id,
            Assignment.task == task,
            Assignment.status == AssignmentStatus.reserved,
            Assignment.expires_at > as_utc(now),
        )
        .order_by(Assignment.id)
    ).first()


def _held_by_others(task: TaskKind, item_col):
    """Subquery: item id -> live (unexpired) reservations other users hold, in the project."""
    return (
        select(item_col.label("item_id"), func.count().label("n"))
        .where(
            Assignment.project_id == _P_PROJECT,
            Assignment.task == task,
            Assignment.status == AssignmentStatus.reserved,
            Assignment.expires_at > _P_NOW,
            Assignment.user_id != _P_USER,
        )
        .group_by(item_col)
        .subquery()
    )


@dataclass(frozen=True)
class Counts:
    """Progress numbers of one user in one project and task (see `Progress` in the service)."""

    done_by_user: int
    remaining_for_user: int
    project_done: int
    project_total: int


@dataclass(frozen=True)
class QueueState:
    """The items open to this user, best first, and the progress counts.

    candidates: (item id, priority) of at most the `limit` asked for, in the queue's order
    (priority descending, then id). Priority = votes (or submitted span sets) plus other users'
    live reservations, plus `DRAFT_PRIORITY` for the user's own span drafts.
    """

    candidates: list[tuple[int, int]]
    counts: Counts

    @property
    def next_item(self) -> int | None:
        return self.candidates[0][0] if self.candidates else None


def _queue_state(session: Session, stmt, params: dict) -> QueueState:
    """Run a queue query: one row per item, open ones first, with the window totals on every row."""
    rows = session.connection().execute(stmt, params).all()
    if not rows:
        return QueueState([], Counts(0, 0, 0, 0))
    _, _, total, done, n_open, mine, _ = rows[0]
    return QueueState(
        [(r[0], int(r[6])) for r in rows if r[1]], Counts(int(mine), int(n_open), int(done), int(total))
    )


def _user_items(item_col, *where):
    """Subquery: the distinct item ids of this user's rows matching `where` (joined, not correlated)."""
    return select(item_col.label("item_id")).where(*where).group_by(item_col).subquery()


def _closed(task: TaskKind, item_col):
    """Subquery: the items the user finished or skipped in the project."""
    return _user_items(
        item_col,
        Assignment.user_id == _P_USER,
        Assignment.project_id == _P_PROJECT,
        Assignment.task == task,
        Assignment.status.in_([AssignmentStatus.done, AssignmentStatus.skipped]),
    )


@functools.cache
def _pairwise_queue_stmt():
    votes = (
        select(PairwiseVote.comparison_id.label("item_id"), func.count().label("n"))
        .join(Comparison, Comparison.id == PairwiseVote.comparison_id)
        .where(Comparison.project_id == _P_PROJECT)
        .group_by(PairwiseVote.comparison_id)
        .subquery()
    )
    held = _held_by_others(TaskKind.pairwise, Assignment.comparison_id)
    voted = _user_items(PairwiseVote.comparison_id, PairwiseVote.user_id == _P_USER)
    closed = _closed(TaskKind.pairwise, Assignment.comparison_id)
    n = func.coalesce(votes.c.n, 0)
    taken = n + func.coalesce(held.c.n, 0)
    required = Comparison.required_votes
    is_open = sa.case(
        (sa.and_(taken < required, voted.c.item_id.is_(None), closed.c.item_id.is_(None)), 1), else_=0
    )
    capped = sa.case((n < required, n), else_=required)
    return (
        select(
            Comparison.id,
            is_open,
            func.sum(required).over(),
            func.sum(capped).over(),
            func.sum(is_open).over(),
            func.sum(sa.case((voted.c.item_id.is_not(None), 1), else_=0)).over(),
            taken,
        )
        .outerjoin(votes, votes.c.item_id == Comparison.id)
        .outerjoin(held, held.c.item_id == Comparison.id)
        .outerjoin(voted, voted.c.item_id == Comparison.id)
        .outerjoin(closed, closed.c.item_id == Comparison.id)
        .where(Comparison.project_id == _P_PROJECT, Comparison.purpose == ComparisonPurpose.annotate)
        .order_by(is_open.desc(), taken.desc(), Comparison.id)
        .limit(_P_LIMIT)
    )


def pairwise_queue(
    session: Session, *, user_id: int, project_id: int, now: datetime, limit: int = 1
) -> QueueState:
    """The comparisons open to this user, best first, and the pairwise progress, in one query.

    An item is open when votes + other users' live reservations < required_votes and the user
    has not voted on, finished or skipped it. Order: the most-taken first (overlap sets
    complete), then by id. The totals are window sums over all the project's comparisons:
    required votes, votes counted toward them (capped per item), open items, the user's votes.
    The statement is built once and run with bound parameters (this is the hot query).
    """
    params = {"q_project": project_id, "q_user": user_id, "q_now": as_utc(now), "q_limit": limit}
    return _queue_state(session, _pairwise_queue_stmt(), params)


@functools.cache
def _comparison_open_stmt():
    votes = select(func.count()).where(PairwiseVote.comparison_id == _P_ITEM).scalar_subquery()
    held = (
        select(func.count())
        .where(
            Assignment.comparison_id == _P_ITEM,
            Assignment.status == AssignmentStatus.reserved,
            Assignment.expires_at > _P_NOW,
            Assignment.user_id != _P_USER,
        )
        .scalar_subquery()
    )
    mine = sa.exists().where(PairwiseVote.comparison_id == _P_ITEM, PairwiseVote.user_id == _P_USER)
    closed = sa.exists().where(
        Assignment.comparison_id == _P_ITEM,
        Assignment.user_id == _P_USER,
        Assignment.status.in_([AssignmentStatus.done, AssignmentStatus.skipped]),
    )
    return select(sa.and_(votes + held < Comparison.required_votes, ~mine, ~closed)).where(
        Comparison.id == _P_ITEM
    )


def comparison_open(session: Session, *, comparison_id: int, user_id: int, now: datetime) -> bool:
    """Whether this one comparison is still open to the user (the claim check, under the queue lock)."""
    params = {"q_item": comparison_id, "q_user": user_id, "q_now": as_utc(now)}
    return bool(session.connection().execute(_comparison_open_stmt(), params).scalar())


@functools.cache
def _segment_queue_stmt():
    sets = (
        select(SpanSet.generation_id.label("item_id"), func.count().label("n"))
        .join(Generation, Generation.id == SpanSet.generation_id)
        .join(Prompt, Prompt.id == Generation.prompt_id)
        .where(Prompt.project_id == _P_PROJECT, SpanSet.submitted)
        .group_by(SpanSet.generation_id)
        .subquery()
    )
    held = _held_by_others(TaskKind.segment, Assignment.generation_id)
    submitted = _user_items(SpanSet.generation_id, SpanSet.user_id == _P_USER, SpanSet.submitted)
    drafts = _user_items(SpanSet.generation_id, SpanSet.user_id == _P_USER, ~SpanSet.submitted)
    closed = _closed(TaskKind.segment, Assignment.generation_id)
    n = func.coalesce(sets.c.n, 0)
    taken = n + func.coalesce(held.c.n, 0)
    required = _required_expr(Generation.id)
    is_open = sa.case(
        (sa.and_(taken < required, submitted.c.item_id.is_(None), closed.c.item_id.is_(None)), 1), else_=0
    )
    capped = sa.case((n < required, n), else_=required)
    priority = taken + sa.case((drafts.c.item_id.is_not(None), DRAFT_PRIORITY), else_=0)
    return (
        select(
            Generation.id,
            is_open,
            func.sum(required).over(),
            func.sum(capped).over(),
            func.sum(is_open).over(),
            func.sum(sa.case((submitted.c.item_id.is_not(None), 1), else_=0)).over(),
            priority,
        )
        .join(Prompt, Prompt.id == Generation.prompt_id)
        .outerjoin(sets, sets.c.item_id == Generation.id)
        .outerjoin(held, held.c.item_id == Generation.id)
        .outerjoin(submitted, submitted.c.item_id == Generation.id)
        .outerjoin(drafts, drafts.c.item_id == Generation.id)
        .outerjoin(closed, closed.c.item_id == Generation.id)
        .where(Prompt.project_id == _P_PROJECT)
        .order_by(is_open.desc(), priority.desc(), Generation.id)
        .limit(_P_LIMIT)
    )


def segment_queue(
    session: Session, *, user_id: int, project: Project, now: datetime, limit: int = 1
) -> QueueState:
    """The generations open to this user for spans, best first, and the segment progress.

    Like `pairwise_queue`, with an item's requirement k or 1 (`segment_required_votes`) and the
    user's own unsubmitted drafts first among the open items (their priority is raised).
    """
    params = {"q_project": project.id, "q_user": user_id, "q_now": as_utc(now), "q_limit": limit}
    params |= _required_params(project.id, project.overlap_fraction, project.overlap_k)
    return _queue_state(session, _segment_queue_stmt(), params)


@functools.cache
def _generation_open_stmt():
    sets = select(func.count()).where(SpanSet.generation_id == _P_ITEM, SpanSet.submitted).scalar_subquery()
    held = (
        select(func.count())
        .where(
            Assignment.generation_id == _P_ITEM,
            Assignment.task == TaskKind.segment,
            Assignment.status == AssignmentStatus.reserved,
            Assignment.expires_at > _P_NOW,
            Assignment.user_id != _P_USER,
        )
        .scalar_subquery()
    )
    mine = sa.exists().where(SpanSet.generation_id == _P_ITEM, SpanSet.user_id == _P_USER, SpanSet.submitted)
    closed = sa.exists().where(
        Assignment.generation_id == _P_ITEM,
        Assignment.user_id == _P_USER,
        Assignment.task == TaskKind.segment,
        Assignment.status.in_([AssignmentStatus.done, AssignmentStatus.skipped]),
    )
    required = _required_expr(Generation.id)
    return select(sa.and_(sets + held < required, ~mine, ~closed)).where(Generation.id == _P_ITEM)


def generation_open(
    session: Session, *, generation_id: int, user_id: int, project: Project, now: datetime
) -> bool:
    """Whether this one generation is still open to the user for spans (the claim check)."""
    params = {"q_item": generation_id, "q_user": user_id, "q_now": as_utc(now)}
    params |= _required_params(project.id, project.overlap_fraction, project.overlap_k)
    return bool(session.connection().execute(_generation_open_stmt(), params).scalar())


def add_assignment(
    session: Session,
    *,
    user_id: int,
    project_id: int,
    task: TaskKind,
    now: datetime,
    expires_at: datetime,
    comparison_id: int | None = None,
    generation_id: int | None = None,
) -> Assignment:
    row = Assignment(
        user_id=user_id,
        project_id=project_id,
        task=task,
        comparison_id=comparison_id,
        generation_id=generation_id,
        status=AssignmentStatus.reserved,
        reserved_at=as_utc(now),
        expires_at=as_utc(expires_at),
    )
    session.add(row)
    session.flush()
    return row


def finish_assignment(session: Session, assignment: Assignment, *, status: AssignmentStatus, now: datetime):
    assignment.status = status
    assignment.finished_at = as_utc(now)
    session.add(assignment)
    session.flush()


def finish_segment_assignments(session: Session, *, user_id: int, generation_id: int, now: datetime) -> int:
    """Mark the user's open (reserved or expired) segment assignments on a generation done."""
    result = session.execute(
        sa.update(Assignment)
        .where(
            Assignment.user_id == user_id,
            Assignment.generation_id == generation_id,
            Assignment.task == TaskKind.segment,
            Assignment.status.in_([AssignmentStatus.reserved, AssignmentStatus.expired]),
        )
        .values(status=AssignmentStatus.done, finished_at=as_utc(now))
        .execution_options(synchronize_session=False)
    )
    return result.rowcount


def user_has_segment_claim(session: Session, *, user_id: int, generation_id: int) -> bool:
    """Whether the user was given this generation (any assignment but a skipped one, live or not)."""
    stmt = select(Assignment.id).where(
        Assignment.user_id == user_id,
        Assignment.generation_id == generation_id,
        Assignment.task == TaskKind.segment,
        Assignment.status != AssignmentStatus.skipped,
    )
    return session.exec(stmt.limit(1)).first() is not None


def user_holds_segment(session: Session, *, user_id: int, generation_id: int, now: datetime) -> bool:
    """Whether the user holds a live (reserved, unexpired at `now`) segment reservation of the generation."""
    stmt = select(Assignment.id).where(
        Assignment.user_id == user_id,
        Assignment.generation_id == generation_id,
        Assignment.task == TaskKind.segment,
        Assignment.status == AssignmentStatus.reserved,
        Assignment.expires_at > as_utc(now),
    )
    return session.exec(stmt.limit(1)).first() is not None


def generation_taken_by_others(session: Session, *, generation_id: int, user_id: int, now: datetime) -> int:
    """Other users' submitted span sets on the generation plus their live segment reservations of it."""
    sets = session.exec(
        select(func.count())
        .select_from(SpanSet)
        .where(SpanSet.generation_id == generation_id, SpanSet.submitted, SpanSet.user_id != user_id)
    ).one()
    held = session.exec(
        select(func.count())
        .select_from(Assignment)
        .where(
            Assignment.generation_id == generation_id,
            Assignment.task == TaskKind.segment,
            Assignment.status == AssignmentStatus.reserved,
            Assignment.expires_at > as_utc(now),
            Assignment.user_id != user_id,
        )
    ).one()
    return sets + held


def comparison_taken_by_others(session: Session, *, comparison_id: int, user_id: int, now: datetime) -> int:
    """Votes on the comparison plus other users' live (unexpired at `now`) reservations of it."""
    votes = session.exec(
        select(func.count()).select_from(PairwiseVote).where(PairwiseVote.comparison_id == comparison_id)
    ).one()
    held = session.exec(
        select(func.count())
        .select_from(Assignment)
        .where(
            Assignment.comparison_id == comparison_id,
            Assignment.status == AssignmentStatus.reserved,
            Assignment.expires_at > as_utc(now),
            Assignment.user_id != user_id,
        )
    ).one()
    return votes + held
