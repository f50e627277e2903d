"""The blind arena: battles between a project's checkpoints, one vote per rater and battle, names after.

A battle is a `Comparison(purpose=arena)` of two generations of one prompt; `next_battle` reserves one
for the rater (an `Assignment(task=arena)` with a TTL, as in annotation) and returns a `BattleView`,
which holds the prompt and the two texts and nothing that names a model. `vote` records the judgement
(one per battle and rater; an idempotency key replays the same `Reveal`) and only then names the sides.

- Pairs come from `studio.arena_schedule.choose_pair` (warm-up against parent/anchor/best, then
  information-weighted); a model never meets itself; unloadable checkpoints never play.
- Prompts come from the evaluation set (`storage.arena.eval_prompts`) or are typed by the rater.
  Generations sampled with the arena's settings are reused (pre-generated in batch, or left by an
  earlier battle); missing sides are generated now through the generation service's model cache and
  its checkpoint re-hash guard, and stored with their sampling settings and seed. A text once shown to
  a rater is never reused in her later battles (her vote named it). A model that cannot be loaded is
  kept out and the battle scheduled again; before the vote, errors name no model (details go to the log).
- The named side-by-side mode (admins) generates and stores nothing: it never counts.
- The leaderboard is fitted by `studio.rating` from the counted votes and cached per
  (project, votes, options, models) (see `studio.services.arena_board`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from storage import annotation as votes
from storage import annotation_queue as q
from storage import arena as store
from storage import crud
from storage.db import Database, is_sqlite
from storage.models import (
    AssignmentStatus,
    Comparison,
    ComparisonPurpose,
    Generation,
    Prompt,
    TaskKind,
    User,
    utcnow,
)
from studio.arena_schedule import ArenaEntry, choose_pair
from studio.services.annotation import CHOICES, MAX_KEY_CHARS, RESERVED_KEY_PREFIX, left_is_a, outcome_for
from studio.services.annotation_admin import project_or_404
from studio.services.arena_admin import ADMIN, VOTERS, ArenaAdmin, ArenaModelInfo, Progress, Unloadable
from studio.services.arena_board import ArenaBoards, Board, BoardCache, LeaderboardView
from studio.services.errors import Conflict, NotFound, ServiceError
from studio.settings import Settings

if TYPE_CHECKING:
    from studio.generation import SamplingParams
    from studio.services.generate import GenerationService

log = logging.getLogger(__name__)

GENERATION_FAILED = "the arena could not prepare a battle right now; try again, or tell an admin"
"""What a rater reads when a battle's responses cannot be generated: before the vote nothing may name
a model (the details go to the log)."""
MAX_SCHEDULES = 10
"""Battles scheduled per request at most; each retry follows a model taken out as unloadable."""


@dataclass(frozen=True)
class ArenaConfig:
    """How the arena samples responses and schedules battles."""

    temperature: float = 0.7
    """Sampling temperature of every arena response (one setting for all models, so none is favoured)."""
    top_p: float = 0.9
    """Nucleus sampling mass."""
    max_new_tokens: int = 128
    """Length cap of a response; short enough to read two side by side."""
    batch_size: int = 8
    """Prompts per batch when pre-generating."""
    n0: int = 10
    """Warm-up battles of a model against its parent, the anchor and the best before information-driven pairs."""
    explore: float = 0.2
    """Share of uniformly random pairs after the warm-up."""
    ttl: timedelta = timedelta(minutes=30)
    """How long a battle stays reserved for its rater (then `next_battle` gives a new one)."""
    schedule_bootstrap: int = 100
    """Bootstrap resamples of the board used for scheduling (the displayed board uses the options')."""
    max_prompt_chars: int = 4000
    """Longest prompt a rater (or an admin in named mode) may type."""
    load_retry: timedelta = timedelta(minutes=10)
    """How long a base model whose files could not be loaded stays out of battles before it is tried again."""

    def sampling(self, seed: int, batch_size: int = 1) -> SamplingParams:
        from studio.generation import SamplingParams

        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                              samples_per_prompt=1, seed=seed, batch_size=batch_size)  # fmt: skip

    def params(self) -> dict[str, Any]:
        """The settings stored with (and matched on) every arena generation."""
        return self.sampling(0).to_dict()


@dataclass(frozen=True)
class BattleView:
    """What a rater sees before voting: no checkpoint id, name or path anywhere in it."""

    battle_id: int
    """The comparison's id."""
    prompt: str
    left: str
    right: str


@dataclass(frozen=True)
class Reveal:
    """The answer to a vote: the outcome and, now, the names of both sides (``#id name``)."""

    battle_id: int
    outcome: str
    """a | b | tie | both_bad in the comparison's terms."""
    left_name: str
    right_name: str
    choice: str
    """left | right | tie | both_bad as the rater chose."""


@dataclass(frozen=True)
class _Plan:
    """A battle being prepared: the prompt, the two models, and a stored generation per side or None."""

    prompt_id: int
    prompt_input: str | list[dict[str, str]]
    models: tuple[int, int]
    reuse: tuple[Generation | None, Generation | None]


def pace(left: str, right: str, *, chunk_chars: int = 8) -> Iterator[tuple[str, str]]:
    """Yield (left so far, right so far), both grown by ``chunk_chars`` characters per tick; a finished
    side waits. The last tick shows both texts whole; two empty texts give one ("", "") tick.

    Equal pace: the display's timing does not tell which model is faster or which side generated first.
    """
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be >= 1, got {chunk_chars}")
    ticks = max(1, -(-max(len(left), len(right)) // chunk_chars))
    for tick in range(1, ticks + 1):
        end = tick * chunk_chars
        yield left[:end], right[:end]


def reveal_name(checkpoint_id: int, name: str) -> str:
    return f"#{checkpoint_id} {name}"


class ArenaService(ArenaAdmin, ArenaBoards):
    def __init__(
        self,
        db: Database,
        settings: Settings,
        users,
        generation: GenerationService,
        *,
        config: ArenaConfig | None = None,
        clock: Callable[[], datetime] = utcnow,
        seed: int | None = None,
    ):
        self.db = db
        self.settings = settings
        self.users = users
        self.generation = generation
        self.config = config or ArenaConfig()
        self.clock = clock
        self._rng = np.random.default_rng(seed)
        self._rng_lock = threading.Lock()
        self.boards = BoardCache()
        self._schedule: dict[int, tuple[int, Board]] = {}
        self._schedule_lock = threading.Lock()
        self._load_failed: dict[int, datetime] = {}
        # As in annotation: on SQLite, queue this service's writers in the process rather than
        # letting them poll the database lock.
        self._writer = threading.Lock() if is_sqlite(db.engine) else contextlib.nullcontext()

    @contextlib.contextmanager
    def _write(self) -> Iterator[Session]:
        with self._writer, self.db.write() as s:
            yield s

    def _random(self, fn: Callable[[np.random.Generator], Any]) -> Any:
        with self._rng_lock:
            return fn(self._rng)

    # ----------------------------------------------------------------------- battles

    def next_battle(
        self,
        username: str | None,
        project_id: int,
        *,
        prompt_text: str | None = None,
        prompt_id: int | None = None,
        progress: Progress | None = None,
    ) -> BattleView:
        """The rater's reserved, unvoted battle; else a new one (on the given or typed prompt, if any).

        Asking with a prompt gives the rater's unvoted battle back (it is not counted) and starts a
        new one on that prompt. Missing responses are generated now (``progress(fraction)``).
        """
        user = self.users.require(username, *VOTERS)
        if prompt_text is not None:
            prompt_text = self._check_prompt(prompt_text)
        chosen = prompt_text is not None or prompt_id is not None
        with self.db.read() as s:
            project_or_404(s, project_id)
            held = None
            if not chosen:
                held = store.pending_battle(s, project_id=project_id, user_id=user.id, now=self.clock())
            if held is not None:
                return _view(s, held.comparison_id, held.id)
        if prompt_text is not None:
            with self._write() as s:
                prompt_id = store.upsert_typed_prompt(s, project_id=project_id, text=prompt_text).id
        for _ in range(MAX_SCHEDULES):
            plan = self._plan(user, project_id, prompt_id)
            try:
                texts = self._generate(plan, progress)
            except Unloadable:  # that side is now kept out (and logged): schedule again without it
                continue
            except Exception:
                # Any message here may name a checkpoint, its folder or its id: the rater has not voted.
                log.exception("arena: generating a battle of checkpoints %s failed", plan.models)
                raise ServiceError(GENERATION_FAILED) from None
            return self._reserve(user, project_id, plan, texts, release=chosen)
        raise ServiceError(GENERATION_FAILED)

    def _plan(self, user: User, project_id: int, prompt_id: int | None) -> _Plan:
        with self.db.read() as s:
            entries = self._entries(s, project_id)
            if len(entries) < 2:
                raise ServiceError(
                    "the arena needs at least two loadable models: train a policy in this project, "
                    "or ask an admin to add models"
                )
            counts = store.pair_counts(s, project_id=project_id)
        board = self._schedule_board(project_id)
        models = [ArenaEntry(e.checkpoint_id, e.parent_id, e.is_anchor, e.added_at) for e in entries]
        a, b, _reason = self._random(
            lambda rng: choose_pair(
                models, counts, board, rng, n0=self.config.n0, explore=self.config.explore
            )
        )
        params = self.config.params()
        with self.db.read() as s:
            seen = store.seen_prompts(s, project_id=project_id, user_id=user.id, checkpoint_ids=(a, b))
            # Every text this rater was shown in a battle may have been named by a vote: never reuse
            # one blind (on a prompt seen with this pair, that makes both sides fresh samples).
            shown = store.shown_generations(s, project_id=project_id, user_id=user.id)
            if prompt_id is None:
                prompt_id = self._pick_prompt(s, project_id, (a, b), seen, shown, params)
            prompt = s.get(Prompt, prompt_id)
            if prompt is None or prompt.project_id != project_id:
                raise NotFound(f"prompt {prompt_id} is not in this project")
            found = store.arena_generations(s, prompt_ids=[prompt_id], checkpoint_ids=(a, b), params=params)
            reuse = tuple(self._one_of(_unshown(found.get((prompt_id, m), []), shown)) for m in (a, b))
        return _Plan(prompt_id, prompt.messages or prompt.text, (a, b), reuse)  # type: ignore[arg-type]

    def _pick_prompt(
        self, s: Session, project_id: int, pair: tuple[int, int], seen: set[int], shown: set[int], params
    ) -> int:
        """An evaluation prompt the rater has not judged this pair on, preferring ones with both (then
        one) responses already generated and not yet shown to the rater; when every prompt was seen,
        any (fresh samples)."""
        ids = [i for i, _ in store.eval_prompts(s, project_id=project_id)]
        if not ids:
            raise ServiceError("this project has no evaluation prompts: import prompts, or type one")
        fresh = [i for i in ids if i not in seen]
        if not fresh:
            return int(self._random(lambda rng: rng.choice(ids)))
        found = store.arena_generations(s, prompt_ids=fresh, checkpoint_ids=pair, params=params)
        ready = {i: sum(bool(_unshown(found.get((i, m), []), shown)) for m in pair) for i in fresh}
        best = max(ready.values())
        pool = [i for i in fresh if ready[i] == best]
        return int(self._random(lambda rng: rng.choice(pool)))

    def _one_of(self, gens: Sequence[Generation]) -> Generation | None:
        return gens[int(self._random(lambda rng: rng.integers(len(gens))))] if gens else None

    def _generate(self, plan: _Plan, progress: Progress | None) -> list[Any]:
        """GeneratedText per side that has no stored generation (None where one is reused)."""
        from studio.generation import generate, random_seed

        missing = [k for k in (0, 1) if plan.reuse[k] is None]
        out: list[Any] = [None, None]
        for n, k in enumerate(missing):
            loaded = self._load(plan.models[k])
            step = None
            if progress is not None:

                def step(done: float, total: int, n=n) -> None:
                    progress((n + done / max(total, 1)) / len(missing))

            params = self.config.sampling(random_seed())
            out[k] = generate(loaded, [plan.prompt_input], params, progress=step)[0][0]
        if progress is not None:
            progress(1.0)
        return out

    def _reserve(
        self, user: User, project_id: int, plan: _Plan, texts: list[Any], *, release: bool
    ) -> BattleView:
        a_on_left = bool(self._random(lambda rng: rng.random() < 0.5))
        for attempt in range(2):
            try:
                return self._reserve_once(user, project_id, plan, texts, release, a_on_left)
            except IntegrityError:
                # Another rater created the battle of these two stored generations first: use theirs.
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _reserve_once(
        self, user, project_id, plan: _Plan, texts, release: bool, a_on_left: bool
    ) -> BattleView:
        now = self.clock()
        with self._write() as s:
            store.lock_rater(s, user_id=user.id)
            gens = [
                plan.reuse[k] or self._store_generation(s, plan.prompt_id, plan.models[k], texts[k])
                for k in (0, 1)
            ]
            if release:
                store.release_pending(s, project_id=project_id, user_id=user.id, now=now)
            else:
                held = store.pending_battle(s, project_id=project_id, user_id=user.id, now=now)
                if held is not None:  # a concurrent request of this rater reserved one first
                    return _view(s, held.comparison_id, held.id)
            battle = store.find_battle(s, generation_ids=(gens[0].id, gens[1].id))
            if battle is None:
                battle = crud.add_comparison(s, project_id=project_id, prompt_id=plan.prompt_id,
                                             generation_a_id=gens[0].id, generation_b_id=gens[1].id,
                                             purpose=ComparisonPurpose.arena, a_on_left=a_on_left)  # fmt: skip
            held = q.add_assignment(s, user_id=user.id, project_id=project_id, task=TaskKind.arena, now=now,
                                    expires_at=now + self.config.ttl, comparison_id=battle.id)  # fmt: skip
            return _view(s, battle.id, held.id)

    # ----------------------------------------------------------------------- votes

    def vote(self, username: str | None, battle_id: int, choice: str, *, idempotency_key: str) -> Reveal:
        """Record the rater's judgement of their battle and name both sides.

        One vote per battle and rater: a second is a Conflict. The same key with the same choice
        returns the same Reveal (nothing new is written); with another choice it is a Conflict.
        """
        if choice not in CHOICES:
            raise ServiceError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        key = idempotency_key
        if not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY_CHARS or "\x00" in key:
            raise ServiceError(f"idempotency_key must be 1 to {MAX_KEY_CHARS} characters (no NUL)")
        if key.startswith(RESERVED_KEY_PREFIX):
            raise ServiceError(f"idempotency keys starting with {RESERVED_KEY_PREFIX!r} are reserved")
        user = self.users.require(username, *VOTERS)
        try:
            return self._vote(user, battle_id, choice, key)
        except IntegrityError:  # a concurrent duplicate committed first (PostgreSQL): decide again
            return self._vote(user, battle_id, choice, key)

    def _vote(self, user: User, battle_id: int, choice: str, key: str) -> Reveal:
        now = self.clock()
        with self._write() as s:
            store.lock_rater(s, user_id=user.id)
            battle = s.get(Comparison, battle_id)
            assignment = store.rater_assignment(s, comparison_id=battle_id, user_id=user.id)
            # First: is it this rater's arena battle? A replayed key must never reveal the sides of
            # anything else (an annotation comparison, another rater's battle).
            if battle is None or battle.purpose != ComparisonPurpose.arena or assignment is None:
                raise NotFound(f"battle {battle_id} is not one of your arena battles")
            existing = votes.vote_by_key(s, key)
            if existing is not None:
                if existing.user_id != user.id or existing.comparison_id != battle_id:
                    raise Conflict(
                        "this idempotency key was already used for another vote; nothing was changed"
                    )
                if _choice_of(existing, battle) != choice:
                    raise Conflict(
                        "this idempotency key was already used with another choice; nothing was changed"
                    )
                return _reveal(s, battle, existing)
            earlier = votes.user_vote(s, comparison_id=battle_id, user_id=user.id)
            if earlier is not None:
                raise Conflict("you already voted on this battle; nothing was changed",
                               current={"choice": _choice_of(earlier, battle)})  # fmt: skip
            if assignment.status == AssignmentStatus.skipped:
                raise Conflict("this battle was replaced by a newer one; vote there")
            gen_a_left = left_is_a(battle, assignment.id)
            spent = int((now - votes.as_utc(assignment.reserved_at)).total_seconds() * 1000)
            vote = votes.add_vote(
                s, now=now, comparison_id=battle.id, user_id=user.id, outcome=outcome_for(choice, gen_a_left),
                left_generation_id=battle.generation_a_id if gen_a_left else battle.generation_b_id,
                assignment_id=assignment.id, idempotency_key=key, time_spent_ms=max(spent, 0),
            )  # fmt: skip
            q.finish_assignment(s, assignment, status=AssignmentStatus.done, now=now)
            return _reveal(s, battle, vote)


def _unshown(gens: Sequence[Generation], shown: set[int]) -> list[Generation]:
    return [g for g in gens if g.id not in shown]


def _sides(s: Session, battle: Comparison, left_generation_id: int) -> tuple[Generation, Generation]:
    a, b = s.get(Generation, battle.generation_a_id), s.get(Generation, battle.generation_b_id)
    return (a, b) if left_generation_id == a.id else (b, a)


def _view(s: Session, battle_id: int, assignment_id: int) -> BattleView:
    battle = s.get(Comparison, battle_id)
    left_id = battle.generation_a_id if left_is_a(battle, assignment_id) else battle.generation_b_id
    left, right = _sides(s, battle, left_id)
    return BattleView(
        battle_id=battle.id, prompt=s.get(Prompt, battle.prompt_id).text, left=left.text, right=right.text
    )


def _choice_of(vote, battle: Comparison) -> str:
    """The rater's left|right|tie|both_bad back from a stored outcome and the side shown left."""
    outcome = str(vote.outcome)
    if outcome in ("tie", "both_bad"):
        return outcome
    a_left = vote.left_generation_id == battle.generation_a_id
    return "left" if (outcome == "a") == a_left else "right"


def _reveal(s: Session, battle: Comparison, vote) -> Reveal:
    left, right = _sides(s, battle, vote.left_generation_id)
    names = store.checkpoint_names(s, [left.checkpoint_id, right.checkpoint_id])
    return Reveal(
        battle_id=battle.id,
        outcome=str(vote.outcome),
        left_name=reveal_name(left.checkpoint_id, names[left.checkpoint_id]),
        right_name=reveal_name(right.checkpoint_id, names[right.checkpoint_id]),
        choice=_choice_of(vote, battle),
    )


__all__ = [
    "ADMIN",
    "VOTERS",
    "ArenaConfig",
    "ArenaModelInfo",
    "ArenaService",
    "BattleView",
    "LeaderboardView",
    "Reveal",
    "pace",
]
