"""Annotation: the work queue, pairwise votes and span sets.

- `next_pairwise` / `next_segment` reserve one item for the user atomically, with a TTL
  (default 30 min); the user's own live reservation is handed back first; an item is never
  given to someone who already finished or skipped it; items with votes come first so overlap
  sets complete (see `storage.annotation_queue` for the queue rules).
- Left/right is drawn per assignment (a stable coin of the assignment id, so a reload shows the
  same order) and stored with the vote as `left_generation_id`; the client answers
  left|right|tie|both_bad and the server maps that to the comparison's a|b.
- `submit_vote` is idempotent by key: the same key and payload return the first result
  (`replayed=True`); the same key with another payload, or a second vote on an item, is a
  Conflict and changes nothing.
- `save_spans` is optimistic: the client sends the version it loaded; a stale one is a Conflict
  carrying the stored version and spans.
- A late answer (vote or span save after the reservation's TTL) is kept while the item still has
  room for it, and refused (Conflict) once it went to others. Votes, skips and span saves take the
  queue lock of their (project, task), like claims, so these checks never race a claim.
- Admin methods (overlap, gold, comparison list, activity) live in `annotation_admin`.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from storage import annotation as store
from storage import annotation_queue as q
from storage.db import Database, is_sqlite
from storage.models import (
    Assignment,
    AssignmentStatus,
    Comparison,
    Generation,
    Outcome,
    Project,
    Prompt,
    Role,
    Strength,
    TaskKind,
    User,
    utcnow,
)
from studio import spans as span_rules
from studio.services.annotation_admin import (
    COMPARISONS_LISTED,
    MAX_OVERLAP_K,
    ActivityRow,
    AnnotationAdmin,
    project_or_404,
)
from studio.services.errors import Conflict, NotFound, ServiceError
from studio.settings import Settings

DEFAULT_TTL = timedelta(minutes=30)
MAX_TIME_SPENT_MS = 24 * 3600 * 1000
MAX_RATIONALE_CHARS = 5000
MAX_KEY_CHARS = 64
RESERVED_KEY_PREFIX = "import:"
"""Idempotency keys of imported votes (`storage.preference_store`); clients may not use them."""
CHOICES = ("left", "right", "tie", "both_bad")
CANDIDATES = 64
"""Open items read per "next" request; one of them is claimed under the queue lock."""
CLAIM_TRIES = 8
"""Candidates checked under the lock before the queue is queried again there."""
ANNOTATE = (Role.admin, Role.annotator)


@dataclass(frozen=True)
class Progress:
    """Counts of votes (or submitted span sets) against what the project requires."""

    done_by_user: int
    """Items this user finished in the project."""
    remaining_for_user: int
    """Items this user can still be given (including the one they hold now)."""
    project_done: int
    """Votes counted toward the requirement (each item capped at its required number)."""
    project_total: int
    """Sum of required votes over the project's items."""


@dataclass(frozen=True)
class PairwiseItem:
    assignment_id: int
    comparison_id: int
    project_id: int
    prompt_text: str
    prompt_messages: list[dict[str, str]] | None
    left_text: str
    right_text: str
    left_generation_id: int
    right_generation_id: int
    guideline_version: int | None
    guideline_text: str
    expires_at: datetime
    progress: Progress


@dataclass(frozen=True)
class VoteResult:
    vote_id: int
    outcome: str
    """a | b | tie | both_bad, in terms of the comparison's generations."""
    replayed: bool
    """True when this key was seen before with the same payload: nothing new was written."""


@dataclass(frozen=True)
class SegmentItem:
    assignment_id: int
    generation_id: int
    project_id: int
    prompt_text: str
    response_text: str
    spans: list[span_rules.SpanDict]
    """The user's saved draft (code points), empty for a fresh item."""
    version: int
    """Version of the saved span set; 0 when nothing is saved yet. Send it back with `save_spans`."""
    labels: list[str]
    suggestions: list[span_rules.SpanDict]
    guideline_version: int | None
    guideline_text: str
    progress: Progress


@dataclass(frozen=True)
class SpanSaveResult:
    version: int
    spans: list[span_rules.SpanDict]


def left_is_a(comparison: Comparison, assignment_id: int) -> bool:
    """Which side generation a is shown on for this assignment: a stable per-assignment coin."""
    coin = hashlib.sha256(f"left:{assignment_id}".encode()).digest()[0] & 1
    return bool(coin) == comparison.a_on_left


def outcome_for(choice: str, a_left: bool) -> Outcome:
    """Map the annotator's left|right|tie|both_bad to the comparison's a|b|tie|both_bad."""
    if choice == "left":
        return Outcome.a if a_left else Outcome.b
    if choice == "right":
        return Outcome.b if a_left else Outcome.a
    return Outcome(choice)


def _progress(c: q.Counts) -> Progress:
    return Progress(c.done_by_user, c.remaining_for_user, c.project_done, c.project_total)


def _span_dict(row: Any) -> span_rules.SpanDict:
    return {
        "start": row.start,
        "end": row.end,
        "polarity": str(row.polarity),
        "label": getattr(row, "label", None),
        "comment": getattr(row, "comment", None),
    }


class AnnotationService(AnnotationAdmin):
    def __init__(
        self,
        db: Database,
        settings: Settings,
        users,
        clock: Callable[[], datetime] = utcnow,
        ttl: timedelta = DEFAULT_TTL,
    ):
        if ttl <= timedelta(0):
            raise ValueError("the reservation TTL must be positive")
        self.db = db
        self.settings = settings
        self.users = users
        self.clock = clock
        self.ttl = ttl
        # SQLite admits one writer at a time and makes the others poll (sleeping up to 100 ms
        # between tries), which under many concurrent annotators gives long, unfair waits.
        # Queueing this service's writers on a lock in the process hands the database over at
        # once. PostgreSQL runs writers concurrently (the queue takes its own advisory lock).
        self._writer = threading.Lock() if is_sqlite(db.engine) else contextlib.nullcontext()

    @contextlib.contextmanager
    def _write(self) -> Iterator[Session]:
        with self._writer, self.db.write() as s:
            yield s

    # ----------------------------------------------------------------------- pairwise

    def next_pairwise(self, username: str | None, project_id: int) -> PairwiseItem | None:
        """Reserve (or resume) the user's next comparison; None when nothing is left for them."""
        user = self.users.require(username, *ANNOTATE)
        assignment, counts = self._reserve(user, project_id, TaskKind.pairwise, self.clock())
        if assignment is None:
            return None
        with self.db.read() as s:
            return self._pairwise_item(s, assignment, counts)

    @staticmethod
    def _queue(s: Session, user: User, project: Project, task: TaskKind, now, limit: int = 1) -> q.QueueState:
        if task == TaskKind.pairwise:
            return q.pairwise_queue(s, user_id=user.id, project_id=project.id, now=now, limit=limit)
        return q.segment_queue(s, user_id=user.id, project=project, now=now, limit=limit)

    @staticmethod
    def _still_open(s: Session, user: User, project: Project, task: TaskKind, item: int, now) -> bool:
        if task == TaskKind.pairwise:
            return q.comparison_open(s, comparison_id=item, user_id=user.id, now=now)
        return q.generation_open(s, generation_id=item, user_id=user.id, project=project, now=now)

    def _reserve(
        self, user: User, project_id: int, task: TaskKind, now: datetime
    ) -> tuple[Assignment | None, q.Counts]:
        """The user's live reservation, or a new one on an open item; with the progress counts.

        1. Read (concurrently with other requests): the user's live reservation, else the best
           open items and the progress. This is the expensive query; it runs outside the lock.
        2. Claim under the queue lock: the first candidate that is still open (candidates of
           equal priority in random order, so concurrent requests rarely collide); if every
           candidate was taken in between, the queue is queried again under the lock.
        """
        with self.db.read() as s:
            project = self._project(s, project_id)
            held = q.live_reservation(s, user_id=user.id, project_id=project.id, task=task, now=now)
            state = self._queue(s, user, project, task, now, limit=1 if held else CANDIDATES)
        if held is not None:
            return held, state.counts
        if not state.candidates:
            return None, state.counts
        order = [item for item, _ in sorted(state.candidates, key=lambda c: (-c[1], random.random()))]
        with self._write() as s:
            q.lock_queue(s, project_id=project.id, task=task)
            q.expire_reservations(s, project_id=project.id, task=task, now=now)
            held = q.live_reservation(s, user_id=user.id, project_id=project.id, task=task, now=now)
            if held is not None:  # a concurrent request of the same user got there first
                return held, state.counts
            item = next(
                (i for i in order[:CLAIM_TRIES] if self._still_open(s, user, project, task, i, now)), None
            )
            if item is None:
                state = self._queue(s, user, project, task, now)
                item = state.next_item
            if item is None:
                return None, state.counts
            ids = {"comparison_id" if task == TaskKind.pairwise else "generation_id": item}
            assignment = q.add_assignment(
                s,
                user_id=user.id,
                project_id=project.id,
                task=task,
                now=now,
                expires_at=now + self.ttl,
                **ids,
            )
            return assignment, state.counts

    def _pairwise_item(self, s: Session, a: Assignment, counts: q.Counts) -> PairwiseItem:
        comparison = s.get(Comparison, a.comparison_id)
        prompt = s.get(Prompt, comparison.prompt_id)
        gen_a = s.get(Generation, comparison.generation_a_id)
        gen_b = s.get(Generation, comparison.generation_b_id)
        left, right = (gen_a, gen_b) if left_is_a(comparison, a.id) else (gen_b, gen_a)
        guide = store.guideline_at(s, project_id=a.project_id, at=a.reserved_at)
        return PairwiseItem(
            assignment_id=a.id,
            comparison_id=comparison.id,
            project_id=a.project_id,
            prompt_text=prompt.text,
            prompt_messages=prompt.messages,
            left_text=left.text,
            right_text=right.text,
            left_generation_id=left.id,
            right_generation_id=right.id,
            guideline_version=guide.version if guide else None,
            guideline_text=guide.text if guide else "",
            expires_at=store.as_utc(a.expires_at),
            progress=_progress(counts),
        )

    def submit_vote(
        self,
        username: str | None,
        assignment_id: int,
        choice: str,
        strength: str | None,
        rationale: str | None,
        idempotency_key: str,
        time_spent_ms: int | None,
    ) -> VoteResult:
        """Record the user's judgement of their reserved comparison (idempotent by key)."""
        if choice not in CHOICES:
            raise ServiceError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        if strength in ("", None):
            strength = None
        elif strength not in {s.value for s in Strength}:
            raise ServiceError(f"strength must be slight, clear or much, got {strength!r}")
        if choice in ("tie", "both_bad"):
            strength = None  # a strength grades a preference; a tie or both-bad has none
        rationale = rationale or None
        if rationale is not None and (not isinstance(rationale, str) or len(rationale) > MAX_RATIONALE_CHARS):
            raise ServiceError(f"the rationale is limited to {MAX_RATIONALE_CHARS} characters")
        if not isinstance(idempotency_key, str) or not 1 <= len(idempotency_key) <= MAX_KEY_CHARS:
            raise ServiceError(f"idempotency_key must be 1 to {MAX_KEY_CHARS} characters")
        if "\x00" in idempotency_key or (rationale is not None and "\x00" in rationale):
            # PostgreSQL text cannot hold NUL (SQLite can): refused alike on both, never a 500.
            raise ServiceError("the rationale and idempotency_key may not contain NUL characters")
        if idempotency_key.startswith(RESERVED_KEY_PREFIX):
            # Keys are unique across all users: a client must not claim the predictable keys of
            # imported votes (storage.preference_store), which would block that import for good.
            raise ServiceError(f"idempotency keys starting with {RESERVED_KEY_PREFIX!r} are reserved")
        if time_spent_ms is not None and (
            not isinstance(time_spent_ms, int) or isinstance(time_spent_ms, bool)
        ):
            raise ServiceError(f"time_spent_ms must be an integer, got {time_spent_ms!r}")
        user = self.users.require(username, *ANNOTATE)
        payload = (assignment_id, choice, strength, rationale)
        try:
            return self._vote(user, payload, idempotency_key, time_spent_ms)
        except IntegrityError:
            # A concurrent request with the same key (or on the same item) committed first
            # (PostgreSQL): decide again against what is stored now.
            return self._vote(user, payload, idempotency_key, time_spent_ms)

    def _vote(self, user: User, payload: tuple, key: str, time_spent_ms: int | None) -> VoteResult:
        assignment_id, choice, strength, rationale = payload
        now = self.clock()
        with self._write() as s:
            a = s.get(Assignment, assignment_id)
            if a is not None:
                # Under the queue lock a claim cannot take the item between the checks below and
                # the commit, and a skip of this assignment waits for the vote (PostgreSQL).
                q.lock_queue(s, project_id=a.project_id, task=TaskKind.pairwise)
                s.refresh(a)
            existing = store.vote_by_key(s, key)
            if existing is not None and (
                existing.user_id != user.id or existing.assignment_id != assignment_id
            ):
                raise Conflict(
                    "this idempotency key was already used for a different vote; nothing was changed"
                )
            if a is None or a.user_id != user.id or a.task != TaskKind.pairwise:
                raise NotFound(f"assignment {assignment_id} is not one of your pairwise items")
            comparison = s.get(Comparison, a.comparison_id)
            gen_a_left = left_is_a(comparison, a.id)
            outcome = outcome_for(choice, gen_a_left)
            earlier = store.user_vote(s, comparison_id=a.comparison_id, user_id=user.id)
            if existing is None and earlier is not None and earlier.idempotency_key == key:
                existing = earlier  # a duplicate that committed after our key lookup (PostgreSQL)
            if existing is not None:
                if (existing.outcome, existing.strength, existing.rationale) != (
                    outcome,
                    strength,
                    rationale,
                ):
                    raise Conflict(
                        "this idempotency key was already used for a different vote; nothing was changed"
                    )
                return VoteResult(existing.id, str(existing.outcome), replayed=True)
            if earlier is not None:
                raise Conflict(
                    "you already voted on this item; nothing was changed",
                    current={"vote_id": earlier.id, "outcome": str(earlier.outcome)},
                )
            if a.status == AssignmentStatus.skipped:
                raise Conflict("you skipped this item; take the next one")
            expired = a.status == AssignmentStatus.expired or store.as_utc(a.expires_at) <= now
            if expired and (
                q.comparison_taken_by_others(s, comparison_id=comparison.id, user_id=user.id, now=now)
                >= comparison.required_votes
            ):
                raise Conflict(
                    "your reservation expired and the item went to someone else; take the next one"
                )
            if time_spent_ms is None:
                time_spent_ms = int((now - store.as_utc(a.reserved_at)).total_seconds() * 1000)
            guide = store.guideline_at(s, project_id=a.project_id, at=a.reserved_at)
            vote = store.add_vote(
                s,
                now=now,
                comparison_id=comparison.id,
                user_id=user.id,
                outcome=outcome,
                strength=Strength(strength) if strength else None,
                rationale=rationale,
                left_generation_id=comparison.generation_a_id if gen_a_left else comparison.generation_b_id,
                assignment_id=a.id,
                idempotency_key=key,
                time_spent_ms=min(max(time_spent_ms, 0), MAX_TIME_SPENT_MS),
                guideline_version=guide.version if guide else None,
            )
            q.finish_assignment(s, a, status=AssignmentStatus.done, now=now)
            return VoteResult(vote.id, str(outcome), replayed=False)

    def skip(self, username: str | None, assignment_id: int) -> None:
        """Give the item back without judging it; the user is not offered it again."""
        user = self.users.require(username, *ANNOTATE)
        now = self.clock()
        with self._write() as s:
            a = s.get(Assignment, assignment_id)
            if a is None or a.user_id != user.id:
                raise NotFound(f"assignment {assignment_id} is not one of your items")
            q.lock_queue(s, project_id=a.project_id, task=a.task)  # a racing vote commits first
            s.refresh(a)
            if a.status == AssignmentStatus.skipped:
                return
            if a.status == AssignmentStatus.done:
                raise Conflict("this item is already done; it cannot be skipped")
            q.finish_assignment(s, a, status=AssignmentStatus.skipped, now=now)

    # ----------------------------------------------------------------------- segments

    def next_segment(self, username: str | None, project_id: int) -> SegmentItem | None:
        """Reserve (or resume) the user's next response to mark spans on; None when nothing is left."""
        user = self.users.require(username, *ANNOTATE)
        a, counts = self._reserve(user, project_id, TaskKind.segment, self.clock())
        if a is None:
            return None
        with self.db.read() as s:
            project = s.get(Project, a.project_id)
            generation = s.get(Generation, a.generation_id)
            prompt = s.get(Prompt, generation.prompt_id)
            span_set = store.span_set_for(s, generation_id=generation.id, user_id=user.id)
            saved = [_span_dict(r) for r in store.spans_of(s, span_set.id)] if span_set else []
            guide = store.guideline_at(s, project_id=project.id, at=a.reserved_at)
            return SegmentItem(
                assignment_id=a.id,
                generation_id=generation.id,
                project_id=project.id,
                prompt_text=prompt.text,
                response_text=generation.text,
                spans=saved,
                version=span_set.version if span_set else 0,
                labels=list(project.span_labels or []),
                suggestions=[_span_dict(r) for r in store.suggestions_for(s, generation.id)],
                guideline_version=guide.version if guide else None,
                guideline_text=guide.text if guide else "",
                progress=_progress(counts),
            )

    def save_spans(
        self,
        username: str | None,
        generation_id: int,
        spans: list[span_rules.SpanDict],
        version: int,
        submit: bool = False,
        offsets: str = "codepoint",
    ) -> SpanSaveResult:
        """Save the user's spans on a generation if `version` is still the stored one.

        version: what the client loaded (0 for a first save). offsets: "codepoint" or "utf16"
        (converted here). submit=True marks the set submitted and finishes the segment assignment.
        """
        if offsets not in ("codepoint", "utf16"):
            raise ServiceError(f"offsets must be 'codepoint' or 'utf16', got {offsets!r}")
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ServiceError(f"version must be a non-negative integer, got {version!r}")
        user = self.users.require(username, *ANNOTATE)
        with self.db.read() as s:
            generation = s.get(Generation, generation_id)
            if generation is None:
                raise NotFound(f"generation {generation_id} does not exist")
            project = s.get(Project, s.get(Prompt, generation.prompt_id).project_id)
        text = generation.text
        if offsets == "utf16":
            spans = span_rules.spans_from_utf16(text, spans)
        clean = span_rules.validate_spans(text, spans, project.span_labels or [])
        try:
            return self._save_spans(user, generation, project, clean, version, bool(submit))
        except IntegrityError:
            # A concurrent first save by the same user won the unique (generation, user) row.
            with self.db.read() as s:
                raise self._stale(s, generation_id, user.id) from None

    def _save_spans(self, user, generation, project, clean, version, submit) -> SpanSaveResult:
        now = self.clock()
        with self._write() as s:
            q.lock_queue(s, project_id=project.id, task=TaskKind.segment)
            span_set = store.span_set_for(s, generation_id=generation.id, user_id=user.id)
            self._check_segment_claim(s, user, generation.id, project.id, span_set, now)
            current = span_set.version if span_set else 0
            if version != current:
                raise self._stale(s, generation.id, user.id)
            guide = store.guideline_at(s, project_id=project.id, at=now)
            guide_version = guide.version if guide else None
            if span_set is None:
                span_set = store.add_span_set(
                    s,
                    generation_id=generation.id,
                    user_id=user.id,
                    submitted=submit,
                    guideline_version=guide_version,
                    now=now,
                )
                new_version = 1
            else:
                if not store.bump_span_set(
                    s,
                    span_set_id=span_set.id,
                    expected_version=version,
                    submitted=submit,
                    guideline_version=guide_version,
                    now=now,
                ):
                    raise self._stale(s, generation.id, user.id)
                new_version = version + 1
            store.replace_spans(s, span_set_id=span_set.id, spans=clean)
            if submit:
                q.finish_segment_assignments(s, user_id=user.id, generation_id=generation.id, now=now)
            return SpanSaveResult(version=new_version, spans=clean)

    @staticmethod
    def _check_segment_claim(
        s: Session, user: User, generation_id: int, project_id: int, span_set, now: datetime
    ) -> None:
        """Refuse a span save by a user the response is not (or no longer) open to (under the lock).

        Accepted: a live reservation; an edit of the user's own submitted set (it already counts);
        an admin working outside the queue (no assignment at all). A save on an expired
        reservation, a skipped item with a draft, or a set taken back to a draft is accepted only
        while others (submitted sets + live reservations) leave room under the required number.
        """
        claimed = q.user_has_segment_claim(s, user_id=user.id, generation_id=generation_id)
        if not claimed and user.role == Role.admin:
            return
        if span_set is None and not claimed:
            raise Conflict("this response is not assigned to you; take it from the queue first")
        if (span_set is not None and span_set.submitted) or q.user_holds_segment(
            s, user_id=user.id, generation_id=generation_id, now=now
        ):
            return
        project = s.get(Project, project_id)  # its overlap settings as they are now
        required = q.segment_required_votes(
            project.id, generation_id, project.overlap_fraction, project.overlap_k
        )
        if q.generation_taken_by_others(s, generation_id=generation_id, user_id=user.id, now=now) >= required:
            raise Conflict(
                "your reservation of this response expired and it went to someone else; "
                "nothing was saved. Take the next one"
            )

    @staticmethod
    def _stale(s: Session, generation_id: int, user_id: int) -> Conflict:
        span_set = store.span_set_for(s, generation_id=generation_id, user_id=user_id)
        current = {
            "version": span_set.version if span_set else 0,
            "spans": [_span_dict(r) for r in store.spans_of(s, span_set.id)] if span_set else [],
        }
        return Conflict(
            f"these spans were saved elsewhere in the meantime (now version {current['version']}); "
            "reload them, then save again",
            current=current,
        )

    # ----------------------------------------------------------------------- overview

    def progress(self, username: str | None, project_id: int, task: str = "pairwise") -> Progress:
        """The user's and the project's progress in one task (pairwise or segment)."""
        user = self.users.require(username, *ANNOTATE)
        if task not in ("pairwise", "segment"):
            raise ServiceError(f"task must be 'pairwise' or 'segment', got {task!r}")
        with self.db.read() as s:
            project = self._project(s, project_id)
            return _progress(self._queue(s, user, project, TaskKind(task), self.clock()).counts)

    # ----------------------------------------------------------------------- helpers

    _project = staticmethod(project_or_404)


__all__ = [
    "COMPARISONS_LISTED",
    "MAX_OVERLAP_K",
    "ActivityRow",
    "AnnotationService",
    "PairwiseItem",
    "Progress",
    "SegmentItem",
    "SpanSaveResult",
    "VoteResult",
]
