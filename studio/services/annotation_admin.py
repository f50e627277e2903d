"""The admin side of annotation: overlap settings, gold items, the comparison list, who did what.

`AnnotationAdmin` is a mixin of `studio.services.annotation.AnnotationService` (the public API
stays there); it uses the service's `db`, `users` and `_write()`. Every method is admin only.
"""

from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, select

from storage import annotation as store
from storage import annotation_queue as q
from storage.db import Database
from storage.models import Comparison, ComparisonPurpose, Outcome, Project, Role, User
from studio.services.errors import NotFound, ServiceError

MAX_OVERLAP_K = 20
COMPARISONS_LISTED = 500
"""Comparisons `comparisons()` lists at most (the lowest ids)."""


@dataclass(frozen=True)
class ActivityRow:
    username: str
    role: str
    votes: int
    skips: int
    span_sets: int
    median_seconds: float | None
    last_active: datetime | None


def project_or_404(s: Session, project_id: int) -> Project:
    """The project row, or NotFound (also for an id that is not an int)."""
    project = s.get(Project, project_id) if isinstance(project_id, int) else None
    if project is None:
        raise NotFound(f"project {project_id} does not exist")
    return project


class AnnotationAdmin:
    """Admin methods of the annotation service (mixed into `AnnotationService`)."""

    db: Database
    users: Any

    def _write(self) -> contextlib.AbstractContextManager[Session]:
        """A write transaction (provided by `AnnotationService`)."""
        raise NotImplementedError

    def activity(self, username: str | None, project_id: int) -> list[ActivityRow]:
        """Who did what in the project (admin only): every user with activity, and all active annotators."""
        self.users.require(username, Role.admin)
        with self.db.read() as s:
            project_or_404(s, project_id)
            raw = store.project_activity(s, project_id=project_id)
            people = s.exec(
                select(User).where(
                    sa.or_(User.id.in_(list(raw)), sa.and_(User.role == Role.annotator, User.is_active))
                )
            ).all()
        rows = []
        for person in people:
            r = raw.get(person.id) or store.RawActivity(vote_ms=[])
            rows.append(
                ActivityRow(
                    username=person.username,
                    role=str(person.role),
                    votes=r.votes,
                    skips=r.skips,
                    span_sets=r.span_sets,
                    median_seconds=statistics.median(r.vote_ms) / 1000 if r.vote_ms else None,
                    last_active=store.as_utc(r.last_active),
                )
            )
        return sorted(rows, key=lambda row: row.username)

    def set_overlap(self, username: str | None, project_id: int, fraction: float, k: int) -> int:
        """Set the project's overlap share and k; re-derive required votes of unvoted comparisons.

        Returns how many comparisons were re-derived. Comparisons with votes keep their number.
        """
        self.users.require(username, Role.admin)
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction <= 1:
            raise ServiceError(f"the overlap share must be between 0 and 1, got {fraction!r}")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_OVERLAP_K:
            raise ServiceError(f"overlap k must be an integer from 1 to {MAX_OVERLAP_K}, got {k!r}")
        with self._write() as s:
            project = project_or_404(s, project_id)
            project.overlap_fraction = float(fraction)
            project.overlap_k = k
            s.add(project)
            s.flush()
            return q.set_required_votes_where_unvoted(s, project_id=project_id, fraction=float(fraction), k=k)

    def set_gold(
        self, username: str | None, comparison_id: int, outcome: str | None, project_id: int | None = None
    ) -> None:
        """Mark a comparison as gold with its known outcome (a|b|tie|both_bad), or unmark it (None).

        project_id: the project the admin is looking at; a comparison of another project is then
        NotFound (an id typed by hand must not change another project's gold set).
        """
        self.users.require(username, Role.admin)
        if outcome not in (None, *(o.value for o in Outcome)):
            raise ServiceError(f"a gold outcome is a, b, tie or both_bad, got {outcome!r}")
        with self._write() as s:
            comparison = s.get(Comparison, comparison_id)
            if comparison is None or comparison.purpose != ComparisonPurpose.annotate:
                raise NotFound(f"comparison {comparison_id} does not exist")
            if project_id is not None and comparison.project_id != project_id:
                raise NotFound(f"comparison {comparison_id} is not in project {project_id}")
            comparison.gold_outcome = Outcome(outcome) if outcome else None
            s.add(comparison)

    def comparisons(
        self, username: str | None, project_id: int, limit: int = COMPARISONS_LISTED
    ) -> list[store.ComparisonOverview]:
        """The project's comparisons by id (admin only): prompt excerpt, votes so far, gold outcome."""
        self.users.require(username, Role.admin)
        with self.db.read() as s:
            project_or_404(s, project_id)
            return store.comparison_overview(s, project_id=project_id, limit=limit)
