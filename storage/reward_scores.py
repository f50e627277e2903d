"""Reward-model scores of stored generations (the arena's battles are read by ``storage.arena``).

A ``RewardScore`` row is one reward checkpoint's score of one generation (unique per checkpoint and
generation; the score of a re-run replaces the old one). The scores come from ``python -m trainers
score`` (see ``studio.services.rm_agreement``); this module only stores and reads them. The caller
owns the transaction: nothing here commits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, select

from storage.models import Generation, Prompt, RewardScore, utcnow

_CHUNK = 500
"""Rows per statement: well under SQLite's bound-parameter limit (5 parameters a row)."""


# --------------------------------------------------------------------------- scores


def upsert_scores(session: Session, *, checkpoint_id: int, scores: Mapping[int, float]) -> int:
    """Store ``{generation id: score}`` for the reward checkpoint; an existing score is replaced.

    One ``INSERT … ON CONFLICT (checkpoint_id, generation_id) DO UPDATE`` per chunk, so two refreshes
    racing on the same generations cannot fail on the unique constraint. Returns the number of rows
    written. A non-finite score is a ``ValueError`` (nothing is written).
    """
    rows = []
    now = utcnow()
    for generation_id, score in scores.items():
        value = float(score)
        if not math.isfinite(value):
            raise ValueError(f"generation {generation_id}: the score {value} is not finite")
        rows.append({"checkpoint_id": checkpoint_id, "generation_id": int(generation_id), "score": value,
                     "created_at": now})  # fmt: skip
    insert = _dialect_insert(session)
    table = RewardScore.__table__
    for begin in range(0, len(rows), _CHUNK):
        stmt = insert(table).values(rows[begin : begin + _CHUNK])
        stmt = stmt.on_conflict_do_update(
            index_elements=[table.c.checkpoint_id, table.c.generation_id],
            set_={"score": stmt.excluded.score, "created_at": stmt.excluded.created_at},
        )
        session.execute(stmt)
    return len(rows)


def _dialect_insert(session: Session) -> Any:
    name = session.get_bind().dialect.name
    if name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:  # pragma: no cover - the studio supports these two
        raise NotImplementedError(f"no upsert for the {name} dialect")
    return insert


def delete_scores(session: Session, *, checkpoint_id: int) -> int:
    """Forget every score of the reward checkpoint (its weights changed); returns how many went."""
    table = RewardScore.__table__
    return session.execute(sa.delete(table).where(table.c.checkpoint_id == checkpoint_id)).rowcount


def get_scores(
    session: Session, *, checkpoint_id: int, generation_ids: Iterable[int] | None = None
) -> dict[int, float]:
    """``{generation id: score}`` of the reward checkpoint (all its scores when ``generation_ids`` is None)."""
    stmt = select(RewardScore.generation_id, RewardScore.score).where(
        RewardScore.checkpoint_id == checkpoint_id
    )
    if generation_ids is None:
        return {int(g): float(s) for g, s in session.exec(stmt).all()}
    wanted = sorted({int(g) for g in generation_ids})
    out: dict[int, float] = {}
    for begin in range(0, len(wanted), _CHUNK):
        chunk = wanted[begin : begin + _CHUNK]
        out.update(
            {int(g): float(s) for g, s in session.exec(stmt.where(RewardScore.generation_id.in_(chunk)))}
        )
    return out


def unscored(session: Session, *, checkpoint_id: int, generation_ids: Iterable[int]) -> list[int]:
    """The generation ids (ascending, distinct) the reward checkpoint has no score for yet."""
    ids = {int(g) for g in generation_ids}
    return sorted(ids - set(get_scores(session, checkpoint_id=checkpoint_id, generation_ids=ids)))


@dataclass(frozen=True)
class ScoreInput:
    """What the scorer needs of a generation: its prompt (text, or chat messages) and its text."""

    generation_id: int
    prompt: str | list[dict[str, str]]
    response: str


def score_inputs(session: Session, generation_ids: Iterable[int]) -> list[ScoreInput]:
    """The prompt and text of each generation (ascending id). The prompt is the one the generation was
    made from, in the form it was generated with: chat messages when the prompt has them, else its text."""
    wanted = sorted({int(g) for g in generation_ids})
    out: list[ScoreInput] = []
    for begin in range(0, len(wanted), _CHUNK):
        chunk = wanted[begin : begin + _CHUNK]
        stmt = (
            select(Generation.id, Generation.text, Prompt.text, Prompt.messages)
            .join(Prompt, Prompt.id == Generation.prompt_id)
            .where(Generation.id.in_(chunk))
            .order_by(Generation.id)
        )
        for gid, text, prompt_text, messages in session.exec(stmt):
            out.append(ScoreInput(int(gid), list(messages) if messages else prompt_text, text))
    return out
