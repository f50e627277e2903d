"""Keyword-light CRUD for the blind arena: who plays, which prompts, battles and their votes. Never commits.

A *battle* is a `Comparison(purpose=arena)` of two generations of one prompt by two checkpoints; a rater
gets it through an `Assignment(task=arena)` (a reservation with a TTL, as in annotation) and judges it
with one `PairwiseVote`. Several raters may judge the same battle, each once.

- `arena_models` rows say which checkpoints play in a project. A training job's new policy checkpoint
  enters automatically with its parent (`enter_arena`, called from `storage.jobs.register_checkpoint`);
  the parent becomes the project's anchor (pinned at 1000 on the board) when there is none yet.
  Removing a model keeps its row (`active=False`): its past battles still count.
- Evaluation prompts: the project's prompts tagged `eval` or `arena`; when none is tagged, every
  prompt except those typed by raters. A typed prompt is stored once per text (`arena-typed` tag,
  external id from the text's sha256).

No torch, no gradio; the service (studio/services/arena.py) owns every transaction.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import aliased
from sqlmodel import Session, func, select

from storage.annotation import as_utc
from storage.models import (
    ArenaModel,
    ArenaSource,
    Assignment,
    AssignmentStatus,
    Checkpoint,
    Comparison,
    ComparisonPurpose,
    Generation,
    PairwiseVote,
    Prompt,
    PromptKind,
    TaskKind,
    User,
    utcnow,
)

TYPED_TAG = "arena-typed"
EVAL_TAGS = ("eval", "arena")
TYPED_PREFIX = "arena-typed-"
_LOCK_CLASS = 727276  # advisory-lock namespace of arena raters (727274 migrations, 727275 annotation queue)
ARENA = ComparisonPurpose.arena


# --------------------------------------------------------------------------- who plays


@dataclass(frozen=True)
class EntryRow:
    """An arena model with the facts of its checkpoint."""

    checkpoint_id: int
    name: str
    path: str
    parent_id: int | None
    is_anchor: bool
    active: bool
    source: str
    status: str
    """The checkpoint's status: ready | unloadable (an unloadable one never plays)."""
    added_at: datetime


def _row(session: Session, project_id: int, checkpoint_id: int) -> ArenaModel | None:
    return session.exec(
        select(ArenaModel).where(
            ArenaModel.project_id == project_id, ArenaModel.checkpoint_id == checkpoint_id
        )
    ).first()


def anchor_of(session: Session, *, project_id: int) -> int | None:
    """The checkpoint id of the project's active anchor (the oldest, should two ever be marked)."""
    return session.exec(
        select(ArenaModel.checkpoint_id)
        .where(ArenaModel.project_id == project_id, ArenaModel.is_anchor, ArenaModel.active)
        .order_by(ArenaModel.id)
        .limit(1)
    ).first()


def add_model(
    session: Session,
    *,
    project_id: int,
    checkpoint_id: int,
    source: ArenaSource | str,
    added_by: int | None = None,
    reactivate: bool = True,
    now: datetime | None = None,
) -> ArenaModel:
    """Put a checkpoint into the project's arena (idempotent). A removed one comes back when
    ``reactivate`` (an admin's choice); an automatic entry never undoes an admin's removal."""
    row = _row(session, project_id, checkpoint_id)
    if row is None:
        row = ArenaModel(
            project_id=project_id,
            checkpoint_id=checkpoint_id,
            source=ArenaSource(source),
            added_by=added_by,
            added_at=as_utc(now or utcnow()),
        )
        session.add(row)
    elif reactivate and not row.active:
        row.active = True
        session.add(row)
    session.flush()
    return row


def set_anchor(
    session: Session, *, project_id: int, checkpoint_id: int, added_by: int | None = None
) -> ArenaModel:
    """Make the checkpoint the project's only anchor (added, or reactivated, when needed)."""
    row = add_model(
        session,
        project_id=project_id,
        checkpoint_id=checkpoint_id,
        source=ArenaSource.manual,
        added_by=added_by,
    )
    session.execute(
        sa.update(ArenaModel)
        .where(ArenaModel.project_id == project_id, ArenaModel.id != row.id, ArenaModel.is_anchor)
        .values(is_anchor=False)
        .execution_options(synchronize_session=False)
    )
    row.is_anchor = True
    session.add(row)
    session.flush()
    return row


def remove_model(session: Session, *, project_id: int, checkpoint_id: int) -> bool:
    """Take a checkpoint out of new battles (its row and battles stay); False if it was not in the arena."""
    row = _row(session, project_id, checkpoint_id)
    if row is None:
        return False
    row.active = False
    row.is_anchor = False
    session.add(row)
    session.flush()
    return True


def enter_arena(
    session: Session,
    project_id: int,
    checkpoint_id: int,
    *,
    source: ArenaSource | str = ArenaSource.auto,
    added_by: int | None = None,
) -> ArenaModel:
    """Enter a new checkpoint and its parent (when it has one) into the project's arena.

    The parent becomes the anchor when the project has no active anchor yet; a parent that belongs
    to another project stays out. Models an admin removed stay removed (``reactivate`` only for a
    manual entry).
    """
    manual = ArenaSource(source) == ArenaSource.manual
    checkpoint = session.get(Checkpoint, checkpoint_id)
    if checkpoint is None:
        raise ValueError(f"checkpoint {checkpoint_id} does not exist")
    parent_id = checkpoint.parent_id
    parent = session.get(Checkpoint, parent_id) if parent_id not in (None, checkpoint_id) else None
    # Only a parent usable in this project (its own, or a studio-wide base model) enters: a job may
    # start from another project's checkpoint, which the admin API (policy_or_404) would refuse too.
    if parent is not None and parent.project_id in (None, project_id):
        add_model(session, project_id=project_id, checkpoint_id=parent_id, source=source, added_by=added_by,
                  reactivate=manual)  # fmt: skip
        parent = _row(session, project_id, parent_id)
        if parent.active and anchor_of(session, project_id=project_id) is None:
            parent.is_anchor = True
            session.add(parent)
            session.flush()
    return add_model(session, project_id=project_id, checkpoint_id=checkpoint_id, source=source,
                     added_by=added_by, reactivate=manual)  # fmt: skip


def list_entries(session: Session, *, project_id: int, active_only: bool = False) -> list[EntryRow]:
    """The project's arena models with their checkpoints, oldest entry first."""
    stmt = (
        select(ArenaModel, Checkpoint)
        .join(Checkpoint, Checkpoint.id == ArenaModel.checkpoint_id)
        .where(ArenaModel.project_id == project_id)
        .order_by(ArenaModel.added_at, ArenaModel.id)
    )
    if active_only:
        stmt = stmt.where(ArenaModel.active)
    return [
        EntryRow(
            checkpoint_id=ck.id,
            name=ck.name,
            path=ck.path,
            parent_id=ck.parent_id,
            is_anchor=bool(row.is_anchor),
            active=bool(row.active),
            source=str(row.source),
            status=str(ck.status),
            added_at=as_utc(row.added_at),
        )
        for row, ck in session.exec(stmt).all()
    ]


def checkpoint_names(session: Session, ids: Iterable[int]) -> dict[int, str]:
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    return dict(session.exec(select(Checkpoint.id, Checkpoint.name).where(Checkpoint.id.in_(wanted))).all())


def checkpoint_parents(session: Session, ids: Iterable[int]) -> dict[int, int | None]:
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    return dict(
        session.exec(select(Checkpoint.id, Checkpoint.parent_id).where(Checkpoint.id.in_(wanted))).all()
    )


# --------------------------------------------------------------------------- prompts


def _has_tag(tag: str):
    # Tags are a JSON list serialised by json.dumps: match the quoted element exactly
    # (as storage.crud does), so "eval" does not match "evaluation".
    escaped = json.dumps(tag).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return sa.cast(Prompt.tags, sa.String).like(f"%{escaped}%", escape="\\")


def eval_prompts(session: Session, *, project_id: int) -> list[tuple[int, str]]:
    """(prompt id, text) of the evaluation set, by id: prompts tagged eval or arena; when none is
    tagged, every prompt of the project that a rater did not type."""
    base = select(Prompt.id, Prompt.text).where(Prompt.project_id == project_id).order_by(Prompt.id)
    tagged = session.exec(base.where(sa.or_(*(_has_tag(t) for t in EVAL_TAGS)))).all()
    if tagged:
        return [(i, t) for i, t in tagged]
    untyped = sa.or_(Prompt.tags.is_(None), ~_has_tag(TYPED_TAG))
    return [(i, t) for i, t in session.exec(base.where(untyped)).all()]


def typed_external_id(text: str) -> str:
    """The external id of a rater-typed prompt: the same text always maps to the same prompt."""
    return TYPED_PREFIX + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _find_prompt(session: Session, project_id: int, external_id: str) -> Prompt | None:
    return session.exec(
        select(Prompt).where(Prompt.project_id == project_id, Prompt.external_id == external_id)
    ).first()


def upsert_typed_prompt(session: Session, *, project_id: int, text: str) -> Prompt:
    """The project's prompt for a rater-typed text, created once (tag `arena-typed`).

    Two raters typing the same text at once may both miss it and both insert (PostgreSQL: nothing
    serialises them, unlike SQLite's BEGIN IMMEDIATE): the insert runs in a savepoint, and the loser
    of the unique (project, external id) race reads the winner's row instead of failing.
    """
    external_id = typed_external_id(text)
    row = _find_prompt(session, project_id, external_id)
    if row is not None:
        return row
    try:
        with session.begin_nested():
            row = Prompt(
                project_id=project_id,
                external_id=external_id,
                kind=PromptKind.text,
                text=text,
                tags=[TYPED_TAG],
                source="arena",
            )
            session.add(row)
    except IntegrityError:
        row = _find_prompt(session, project_id, external_id)
        if row is None:  # the conflict was not the typed prompt's: nothing to fall back on
            raise
    return row


# --------------------------------------------------------------------------- generations and battles


def arena_generations(
    session: Session, *, prompt_ids: Sequence[int], checkpoint_ids: Sequence[int], params: Mapping[str, Any]
) -> dict[tuple[int, int], list[Generation]]:
    """(prompt id, checkpoint id) → its generations sampled with exactly ``params``, by id."""
    if not prompt_ids or not checkpoint_ids:
        return {}
    rows = session.exec(
        select(Generation)
        .where(Generation.prompt_id.in_(list(prompt_ids)), Generation.checkpoint_id.in_(list(checkpoint_ids)))
        .order_by(Generation.id)
    ).all()
    wanted = dict(params)
    found: dict[tuple[int, int], list[Generation]] = {}
    for g in rows:
        if g.params == wanted:  # JSON equality is dialect-specific in SQL: compare here
            found.setdefault((g.prompt_id, g.checkpoint_id), []).append(g)
    return found


def next_sample_index(session: Session, *, prompt_id: int, checkpoint_id: int) -> int:
    """One past the highest sample index of the checkpoint's generations of this prompt."""
    top = session.exec(
        select(func.max(Generation.sample_index)).where(
            Generation.prompt_id == prompt_id, Generation.checkpoint_id == checkpoint_id
        )
    ).one()
    return 0 if top is None else int(top) + 1


def find_battle(session: Session, *, generation_ids: tuple[int, int]) -> Comparison | None:
    """The arena comparison of these two generations, in either order."""
    x, y = generation_ids
    return session.exec(
        select(Comparison).where(
            Comparison.purpose == ARENA,
            sa.or_(
                sa.and_(Comparison.generation_a_id == x, Comparison.generation_b_id == y),
                sa.and_(Comparison.generation_a_id == y, Comparison.generation_b_id == x),
            ),
        )
    ).first()


def seen_prompts(
    session: Session, *, project_id: int, user_id: int, checkpoint_ids: tuple[int, int]
) -> set[int]:
    """Prompts on which the user was already given a battle between these two checkpoints."""
    ga, gb = aliased(Generation), aliased(Generation)
    x, y = checkpoint_ids
    rows = session.exec(
        select(Comparison.prompt_id)
        .join(Assignment, Assignment.comparison_id == Comparison.id)
        .join(ga, ga.id == Comparison.generation_a_id)
        .join(gb, gb.id == Comparison.generation_b_id)
        .where(
            Comparison.project_id == project_id,
            Comparison.purpose == ARENA,
            Assignment.user_id == user_id,
            Assignment.task == TaskKind.arena,
            sa.or_(
                sa.and_(ga.checkpoint_id == x, gb.checkpoint_id == y),
                sa.and_(ga.checkpoint_id == y, gb.checkpoint_id == x),
            ),
        )
    ).all()
    return set(rows)


def shown_generations(session: Session, *, project_id: int, user_id: int) -> set[int]:
    """Ids of the generations the user was shown in any arena battle of the project (voted, pending
    or given back). A vote names both sides, so these texts are never shown to that user blind again."""
    rows = session.exec(
        select(Comparison.generation_a_id, Comparison.generation_b_id)
        .join(Assignment, Assignment.comparison_id == Comparison.id)
        .where(
            Comparison.project_id == project_id,
            Comparison.purpose == ARENA,
            Assignment.user_id == user_id,
            Assignment.task == TaskKind.arena,
        )
    ).all()
    return {int(g) for pair in rows for g in pair}


def lock_rater(session: Session, *, user_id: int) -> None:
    """Serialise one rater's battle requests and votes (PostgreSQL advisory lock until commit), so a
    double click cannot reserve two battles. SQLite needs nothing: writes are BEGIN IMMEDIATE."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            sa.text("SELECT pg_advisory_xact_lock(:cls, :key)"), {"cls": _LOCK_CLASS, "key": user_id}
        )


def pending_battle(session: Session, *, project_id: int, user_id: int, now: datetime) -> Assignment | None:
    """The user's live, unvoted battle reservation in the project (the oldest), if any."""
    return session.exec(
        select(Assignment)
        .where(
            Assignment.user_id == user_id,
            Assignment.project_id == project_id,
            Assignment.task == TaskKind.arena,
            Assignment.status == AssignmentStatus.reserved,
            Assignment.expires_at > as_utc(now),
        )
        .order_by(Assignment.id)
    ).first()


def release_pending(session: Session, *, project_id: int, user_id: int, now: datetime) -> int:
    """Give back the user's reserved battles in the project (status skipped); returns how many."""
    return session.execute(
        sa.update(Assignment)
        .where(
            Assignment.user_id == user_id,
            Assignment.project_id == project_id,
            Assignment.task == TaskKind.arena,
            Assignment.status == AssignmentStatus.reserved,
        )
        .values(status=AssignmentStatus.skipped, finished_at=as_utc(now))
        .execution_options(synchronize_session=False)
    ).rowcount


def rater_assignment(session: Session, *, comparison_id: int, user_id: int) -> Assignment | None:
    """The user's latest arena assignment of this battle."""
    return session.exec(
        select(Assignment)
        .where(
            Assignment.comparison_id == comparison_id,
            Assignment.user_id == user_id,
            Assignment.task == TaskKind.arena,
        )
        .order_by(Assignment.id.desc())
        .limit(1)
    ).first()


# --------------------------------------------------------------------------- counted battles


@dataclass(frozen=True)
class BattleRow:
    """One counted arena vote with everything the board, the rater statistics and the export need.

    ``model_a``/``model_b`` are the checkpoints of the comparison's generations a and b; ``outcome``
    is a | b | tie | both_bad in those terms; ``left_generation_id`` is what the rater saw on the left.
    """

    battle_id: int
    vote_id: int
    prompt_id: int
    prompt_text: str
    model_a: int
    model_b: int
    generation_a_id: int
    generation_b_id: int
    text_a: str
    text_b: str
    tokens_a: int | None
    tokens_b: int | None
    outcome: str
    user_id: int
    username: str
    left_generation_id: int
    created_at: datetime

    @property
    def left_is_a(self) -> bool:
        return self.left_generation_id == self.generation_a_id


def _battle_join(stmt, ga, gb, project_id: int):
    return (
        stmt.select_from(PairwiseVote)
        .join(Comparison, Comparison.id == PairwiseVote.comparison_id)
        .join(ga, ga.id == Comparison.generation_a_id)
        .join(gb, gb.id == Comparison.generation_b_id)
        .where(Comparison.project_id == project_id, Comparison.purpose == ARENA)
    )


def counted_battles(session: Session, *, project_id: int) -> list[BattleRow]:
    """Every arena vote of the project (named side-by-side stores nothing, so all are blind), by vote id."""
    ga, gb = aliased(Generation), aliased(Generation)
    stmt = select(
        Comparison.id, PairwiseVote.id, Prompt.id, Prompt.text, ga.checkpoint_id, gb.checkpoint_id, ga.id, gb.id,
        ga.text, gb.text, ga.num_tokens, gb.num_tokens, PairwiseVote.outcome, User.id, User.username,
        PairwiseVote.left_generation_id, PairwiseVote.created_at,
    )  # fmt: skip
    stmt = (
        _battle_join(stmt, ga, gb, project_id)
        .join(Prompt, Prompt.id == Comparison.prompt_id)
        .join(User, User.id == PairwiseVote.user_id)
        .order_by(PairwiseVote.id)
    )
    out = []
    for row in session.exec(stmt).all():
        values = list(row)
        values[12] = str(values[12])
        values[16] = as_utc(values[16])
        out.append(BattleRow(*values))
    return out


def pair_counts(session: Session, *, project_id: int) -> dict[tuple[int, int], int]:
    """Counted votes per unordered pair of checkpoints, keyed ``(smaller id, larger id)``."""
    ga, gb = aliased(Generation), aliased(Generation)
    stmt = _battle_join(select(ga.checkpoint_id, gb.checkpoint_id, func.count()), ga, gb, project_id)
    counts: dict[tuple[int, int], int] = {}
    for x, y, n in session.exec(stmt.group_by(ga.checkpoint_id, gb.checkpoint_id)).all():
        key = (min(x, y), max(x, y))
        counts[key] = counts.get(key, 0) + int(n)
    return counts


def vote_state(session: Session, *, project_id: int) -> tuple[int, int]:
    """(number of arena votes, highest vote id) of the project: changes whenever a vote is added."""
    n, top = session.exec(
        select(func.count(PairwiseVote.id), func.max(PairwiseVote.id))
        .join(Comparison, Comparison.id == PairwiseVote.comparison_id)
        .where(Comparison.project_id == project_id, Comparison.purpose == ARENA)
    ).one()
    return int(n), int(top or 0)
