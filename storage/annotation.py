"""Keyword-only CRUD for pairwise votes, span sets and annotation activity. Never commits.

The work queue (assignments, overlap, reservations) is in `storage.annotation_queue`.
Times are aware UTC datetimes (the columns are sqlmodel's UTCDateTime: timestamptz on
PostgreSQL, UTC text on SQLite); `as_utc` also accepts a naive value as UTC.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlmodel import Session, func, select

from storage.models import (
    Assignment,
    AssignmentStatus,
    Comparison,
    ComparisonPurpose,
    Generation,
    GuidelineVersion,
    PairwiseVote,
    Prompt,
    SpanAnnotation,
    SpanSet,
    SpanSuggestion,
)


def as_utc(when: datetime | None) -> datetime | None:
    """`when` as an aware UTC datetime (a naive value is taken to be UTC already)."""
    if when is None:
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


# --------------------------------------------------------------------------- guidelines


def guideline_at(session: Session, *, project_id: int, at: datetime) -> GuidelineVersion | None:
    """The guideline version that was current at `at` (the newest created no later than it)."""
    return session.exec(
        select(GuidelineVersion)
        .where(GuidelineVersion.project_id == project_id, GuidelineVersion.created_at <= as_utc(at))
        .order_by(GuidelineVersion.version.desc())
        .limit(1)
    ).first()


# --------------------------------------------------------------------------- votes


def vote_by_key(session: Session, key: str) -> PairwiseVote | None:
    return session.exec(select(PairwiseVote).where(PairwiseVote.idempotency_key == key)).first()


def user_vote(session: Session, *, comparison_id: int, user_id: int) -> PairwiseVote | None:
    return session.exec(
        select(PairwiseVote).where(
            PairwiseVote.comparison_id == comparison_id, PairwiseVote.user_id == user_id
        )
    ).first()


def add_vote(session: Session, *, now: datetime, **fields) -> PairwiseVote:
    row = PairwiseVote(created_at=as_utc(now), **fields)
    session.add(row)
    session.flush()
    return row


# --------------------------------------------------------------------------- spans


def span_set_for(session: Session, *, generation_id: int, user_id: int) -> SpanSet | None:
    # populate_existing: after a failed compare-and-set the row must be re-read, not taken from
    # the session's identity map.
    return session.exec(
        select(SpanSet)
        .where(SpanSet.generation_id == generation_id, SpanSet.user_id == user_id)
        .execution_options(populate_existing=True)
    ).first()


def spans_of(session: Session, span_set_id: int) -> list[SpanAnnotation]:
    return list(
        session.exec(
            select(SpanAnnotation)
            .where(SpanAnnotation.span_set_id == span_set_id)
            .order_by(SpanAnnotation.start, SpanAnnotation.id)
        )
    )


def add_span_set(
    session: Session,
    *,
    generation_id: int,
    user_id: int,
    submitted: bool,
    guideline_version: int | None,
    now: datetime,
) -> SpanSet:
    row = SpanSet(
        generation_id=generation_id,
        user_id=user_id,
        version=1,
        submitted=submitted,
        guideline_version=guideline_version,
        updated_at=as_utc(now),
    )
    session.add(row)
    session.flush()
    return row


def bump_span_set(
    session: Session,
    *,
    span_set_id: int,
    expected_version: int,
    submitted: bool,
    guideline_version: int | None,
    now: datetime,
) -> bool:
    """Compare-and-set: version += 1 only if it is still `expected_version`; False if it moved on."""
    values = {
        "version": SpanSet.version + 1,
        "updated_at": as_utc(now),
        "guideline_version": guideline_version,
    }
    if submitted:
        values["submitted"] = True
    result = session.execute(
        sa.update(SpanSet)
        .where(SpanSet.id == span_set_id, SpanSet.version == expected_version)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def replace_spans(session: Session, *, span_set_id: int, spans: Sequence[dict]) -> None:
    session.execute(sa.delete(SpanAnnotation).where(SpanAnnotation.span_set_id == span_set_id))
    if spans:
        session.execute(
            sa.insert(SpanAnnotation),
            [
                {
                    "span_set_id": span_set_id,
                    "start": s["start"],
                    "end": s["end"],
                    "polarity": s["polarity"],
                    "label": s["label"],
                    "comment": s["comment"],
                }
                for s in spans
            ],
        )


def suggestions_for(session: Session, generation_id: int) -> list[SpanSuggestion]:
    """The span suggestions of the newest segment model that scored this generation."""
    newest = session.exec(
        select(func.max(SpanSuggestion.checkpoint_id)).where(SpanSuggestion.generation_id == generation_id)
    ).one()
    if newest is None:
        return []
    return list(
        session.exec(
            select(SpanSuggestion)
            .where(SpanSuggestion.generation_id == generation_id, SpanSuggestion.checkpoint_id == newest)
            .order_by(SpanSuggestion.start)
        )
    )


# --------------------------------------------------------------------------- activity


@dataclass
class RawActivity:
    """Per-user raw numbers of one project, before the service formats them."""

    votes: int = 0
    skips: int = 0
    span_sets: int = 0
    vote_ms: list[int] | None = None
    last_active: datetime | None = None

    def seen(self, when: datetime | None) -> None:
        if when is not None and (self.last_active is None or when > self.last_active):
            self.last_active = when


def project_activity(session: Session, *, project_id: int) -> dict[int, RawActivity]:
    """user id -> votes (with their time_spent_ms), skips, submitted span sets and last activity."""
    out: dict[int, RawActivity] = {}

    def row(user_id: int) -> RawActivity:
        return out.setdefault(user_id, RawActivity(vote_ms=[]))

    for user_id, ms, created in session.exec(
        select(PairwiseVote.user_id, PairwiseVote.time_spent_ms, PairwiseVote.created_at)
        .join(Comparison, Comparison.id == PairwiseVote.comparison_id)
        .where(Comparison.project_id == project_id)
    ):
        r = row(user_id)
        r.votes += 1
        if ms is not None:
            r.vote_ms.append(ms)
        r.seen(created)
    for user_id, status, finished in session.exec(
        select(Assignment.user_id, Assignment.status, Assignment.finished_at).where(
            Assignment.project_id == project_id,
            Assignment.status.in_([AssignmentStatus.skipped, AssignmentStatus.done]),
        )
    ):
        r = row(user_id)
        r.skips += status == AssignmentStatus.skipped
        r.seen(finished)
    for user_id, submitted, updated in session.exec(
        select(SpanSet.user_id, SpanSet.submitted, SpanSet.updated_at)
        .join(Generation, Generation.id == SpanSet.generation_id)
        .join(Prompt, Prompt.id == Generation.prompt_id)
        .where(Prompt.project_id == project_id)
    ):
        r = row(user_id)
        r.span_sets += bool(submitted)
        r.seen(updated)
    return out


# --------------------------------------------------------------------------- comparisons overview


@dataclass(frozen=True)
class ComparisonOverview:
    """One comparison of a project as the admin's gold-marking list shows it."""

    id: int
    prompt_excerpt: str
    """The first `excerpt_chars` characters of the prompt's text (chat prompts: their readable text)."""
    votes: int
    required_votes: int
    gold_outcome: str | None
    """a | b | tie | both_bad, or None when the comparison is not a gold item."""


def comparison_overview(
    session: Session, *, project_id: int, limit: int, excerpt_chars: int = 120
) -> list[ComparisonOverview]:
    """The project's annotation comparisons by id (at most `limit`), with their vote counts."""
    votes = (
        select(PairwiseVote.comparison_id, func.count().label("n"))
        .group_by(PairwiseVote.comparison_id)
        .subquery()
    )
    rows = session.exec(
        select(
            Comparison.id,
            func.substr(Prompt.text, 1, excerpt_chars),
            func.coalesce(votes.c.n, 0),
            Comparison.required_votes,
            Comparison.gold_outcome,
        )
        .join(Prompt, Prompt.id == Comparison.prompt_id)
        .outerjoin(votes, votes.c.comparison_id == Comparison.id)
        .where(Comparison.project_id == project_id, Comparison.purpose == ComparisonPurpose.annotate)
        .order_by(Comparison.id)
        .limit(limit)
    ).all()
    return [
        ComparisonOverview(cid, excerpt or "", int(n), required, str(gold) if gold is not None else None)
        for cid, excerpt, n, required, gold in rows
    ]
