"""A project's annotations read from the database into plain frozen dataclasses.

`load_project_data(session, project_id, purposes)` reads prompts, generations (with their
checkpoint names), comparisons with their votes (and voters' names) and the *submitted* span sets
in one go. Snapshot rows (`storage.exports`) and the quality report (`studio.services.quality`)
are computed from this data by pure functions. No torch, no gradio.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, select

from storage.models import (
    Checkpoint,
    Comparison,
    Generation,
    PairwiseVote,
    Prompt,
    SpanAnnotation,
    SpanSet,
    User,
)

IMPORT_USERNAME = "imported"
"""System user that owns the votes of imported preference data (never logs in)."""


@dataclass(frozen=True)
class PromptData:
    id: int
    external_id: str
    kind: str  # text | chat
    text: str
    messages: tuple[dict[str, str], ...] | None
    tags: tuple[str, ...]

    @property
    def sha256(self) -> str:
        return prompt_sha256(self.text if self.kind == "text" else list(self.messages or ()))


@dataclass(frozen=True)
class GenerationData:
    id: int
    prompt_id: int
    text: str
    model: str
    checkpoint_id: int


@dataclass(frozen=True)
class VoteData:
    id: int
    comparison_id: int
    user_id: int
    username: str
    outcome: str  # a | b | tie | both_bad (relative to the comparison's generations)
    strength: str | None
    left_generation_id: int
    time_spent_ms: int | None
    guideline_version: int | None
    rationale: str | None
    created_at: datetime


@dataclass(frozen=True)
class ComparisonData:
    id: int
    prompt_id: int
    generation_a_id: int
    generation_b_id: int
    purpose: str
    gold_outcome: str | None
    votes: tuple[VoteData, ...]


@dataclass(frozen=True)
class SpanData:
    start: int
    end: int
    polarity: str
    label: str | None
    comment: str | None


@dataclass(frozen=True)
class SpanSetData:
    id: int
    generation_id: int
    user_id: int
    username: str
    guideline_version: int | None
    spans: tuple[SpanData, ...]


@dataclass(frozen=True)
class ProjectData:
    project_id: int
    prompts: dict[int, PromptData]
    generations: dict[int, GenerationData]
    comparisons: list[ComparisonData]
    span_sets: list[SpanSetData]


def prompt_sha256(content: str | list[dict[str, str]]) -> str:
    """sha256 of the prompt: of its UTF-8 text, or of its messages as canonical JSON."""
    if isinstance(content, str):
        data = content
    else:
        data = json.dumps(content, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


def _enum(value: Any) -> str | None:
    return None if value is None else str(getattr(value, "value", value))


def load_project_data(
    session: Session, project_id: int, *, purposes: Sequence[str] = ("annotate",), spans: bool = True
) -> ProjectData:
    """Everything a snapshot or a quality report needs, as plain data (submitted span sets only)."""
    prompts = {
        p.id: PromptData(
            p.id,
            p.external_id,
            _enum(p.kind),
            p.text,
            tuple(p.messages) if p.messages else None,
            tuple(p.tags or ()),
        )
        for p in session.exec(select(Prompt).where(Prompt.project_id == project_id).order_by(Prompt.id)).all()
    }
    gen_rows = session.exec(
        select(Generation, Checkpoint.name)
        .join(Prompt, Prompt.id == Generation.prompt_id)
        .join(Checkpoint, Checkpoint.id == Generation.checkpoint_id)
        .where(Prompt.project_id == project_id)
    ).all()
    generations = {
        g.id: GenerationData(g.id, g.prompt_id, g.text, name, g.checkpoint_id) for g, name in gen_rows
    }

    purpose_list = list(purposes)
    votes: dict[int, list[VoteData]] = {}
    vote_rows = session.exec(
        select(PairwiseVote, User.username)
        .join(Comparison, Comparison.id == PairwiseVote.comparison_id)
        .join(User, User.id == PairwiseVote.user_id)
        .where(Comparison.project_id == project_id, Comparison.purpose.in_(purpose_list))
        .order_by(PairwiseVote.id)
    ).all()
    for v, username in vote_rows:
        votes.setdefault(v.comparison_id, []).append(
            VoteData(
                v.id,
                v.comparison_id,
                v.user_id,
                username,
                _enum(v.outcome),
                _enum(v.strength),
                v.left_generation_id,
                v.time_spent_ms,
                v.guideline_version,
                v.rationale,
                v.created_at,
            )
        )
    comparisons = [
        ComparisonData(
            c.id,
            c.prompt_id,
            c.generation_a_id,
            c.generation_b_id,
            _enum(c.purpose),
            _enum(c.gold_outcome),
            tuple(votes.get(c.id, ())),
        )
        for c in session.exec(
            select(Comparison)
            .where(Comparison.project_id == project_id, Comparison.purpose.in_(purpose_list))
            .order_by(Comparison.id)
        ).all()
    ]
    span_sets: list[SpanSetData] = []
    if spans:
        set_rows = session.exec(
            select(SpanSet, User.username)
            .join(User, User.id == SpanSet.user_id)
            .join(Generation, Generation.id == SpanSet.generation_id)
            .join(Prompt, Prompt.id == Generation.prompt_id)
            .where(Prompt.project_id == project_id, SpanSet.submitted == sa.true())
            .order_by(SpanSet.id)
        ).all()
        by_set: dict[int, list[SpanData]] = {}
        ids = [s.id for s, _ in set_rows]
        for i in range(0, len(ids), 500):
            for a in session.exec(
                select(SpanAnnotation)
                .where(SpanAnnotation.span_set_id.in_(ids[i : i + 500]))
                .order_by(SpanAnnotation.start, SpanAnnotation.end, SpanAnnotation.id)
            ).all():
                by_set.setdefault(a.span_set_id, []).append(
                    SpanData(a.start, a.end, _enum(a.polarity), a.label, a.comment)
                )
        span_sets = [
            SpanSetData(
                s.id, s.generation_id, s.user_id, username, s.guideline_version, tuple(by_set.get(s.id, ()))
            )
            for s, username in set_rows
        ]
    return ProjectData(project_id, prompts, generations, comparisons, span_sets)
