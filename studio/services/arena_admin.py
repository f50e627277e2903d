"""The admin side of the arena: which models play, batch pre-generation, the named side-by-side mode.

`ArenaAdmin` is a mixin of `studio.services.arena.ArenaService` (the public API stays there); it uses
the service's `db`, `users`, `generation`, `config` and `_write()`. It also holds the helpers the
battle code shares: the playable entries, loading a model through the generation service's cache and
re-hash guard, storing an arena generation, and checking a typed prompt.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlmodel import Session

from storage import arena as store
from storage import crud
from storage.db import Database
from storage.jobs import set_checkpoint_status
from storage.models import ArenaSource, Checkpoint, CheckpointKind, CheckpointStatus, Generation, Prompt, Role
from storage.preference_store import is_import_placeholder
from studio.services.annotation_admin import project_or_404
from studio.services.errors import NotFound, ServiceError

if TYPE_CHECKING:
    from studio.generation import LoadedModel
    from studio.services.arena import ArenaConfig
    from studio.services.generate import GenerationService

VOTERS = (Role.rater.value, Role.annotator.value)
"""Who may vote (an admin passes every role check)."""
ADMIN = Role.admin.value
Progress = Callable[[float], None]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArenaModelInfo:
    """An arena model as the admin's table shows it; ``battles`` counts its counted votes."""

    checkpoint_id: int
    name: str
    parent_id: int | None
    is_anchor: bool
    active: bool
    source: str
    status: str
    battles: int


class Unloadable(ServiceError):
    """A checkpoint could not be loaded and is now kept out of battles: the re-hash guard marked it
    unloadable, or its files could not be read (see `ArenaAdmin._load`). The message names it: it is
    for logs and admins, never for a rater before the vote."""


def policy_or_404(s: Session, project_id: int, checkpoint_id: int) -> Checkpoint:
    """A policy checkpoint usable in this project (its own, or a studio-wide base model)."""
    ck = s.get(Checkpoint, checkpoint_id)
    if ck is None or ck.kind != CheckpointKind.policy or ck.project_id not in (None, project_id):
        raise NotFound(f"checkpoint {checkpoint_id} is not a policy model of this project")
    if is_import_placeholder(ck.path):
        raise ServiceError(f"{ck.name} stands for imported responses; it cannot generate")
    return ck


class ArenaAdmin:
    """Model management, pre-generation and the named mode (mixed into `ArenaService`)."""

    db: Database
    users: Any
    generation: GenerationService
    config: ArenaConfig
    clock: Callable[[], datetime]
    _load_failed: dict[int, datetime]
    """checkpoint id → when loading its base model last failed (kept out until `config.load_retry`)."""

    def _write(self) -> contextlib.AbstractContextManager[Session]:
        """A write transaction (provided by `ArenaService`)."""
        raise NotImplementedError

    # ----------------------------------------------------------------------- models in the arena

    def arena_models(
        self, username: str | None, project_id: int, *, include_removed: bool = False
    ) -> list[ArenaModelInfo]:
        """The project's arena models (admins), oldest entry first, with their counted battles."""
        self.users.require(username, ADMIN)
        with self.db.read() as s:
            project_or_404(s, project_id)
            counts = store.pair_counts(s, project_id=project_id)
            rows = store.list_entries(s, project_id=project_id, active_only=not include_removed)
        played: dict[int, int] = {}
        for (x, y), n in counts.items():
            played[x] = played.get(x, 0) + n
            played[y] = played.get(y, 0) + n
        return [
            ArenaModelInfo(
                r.checkpoint_id,
                r.name,
                r.parent_id,
                r.is_anchor,
                r.active,
                r.source,
                r.status,
                played.get(r.checkpoint_id, 0),
            )
            for r in rows
        ]

    def add_model(
        self, username: str | None, project_id: int, checkpoint_id: int, *, anchor: bool = False
    ) -> None:
        """Put a policy checkpoint of the project (or a studio-wide base model) into its arena."""
        user = self.users.require(username, ADMIN)
        with self._write() as s:
            project_or_404(s, project_id)
            policy_or_404(s, project_id, checkpoint_id)
            store.add_model(s, project_id=project_id, checkpoint_id=checkpoint_id, source=ArenaSource.manual,
                            added_by=user.id, now=self.clock())  # fmt: skip
            if anchor:
                store.set_anchor(s, project_id=project_id, checkpoint_id=checkpoint_id, added_by=user.id)

    def remove_model(self, username: str | None, project_id: int, checkpoint_id: int) -> None:
        """No new battles for this checkpoint (its past votes still count)."""
        self.users.require(username, ADMIN)
        with self._write() as s:
            project_or_404(s, project_id)
            if not store.remove_model(s, project_id=project_id, checkpoint_id=checkpoint_id):
                raise NotFound(f"checkpoint {checkpoint_id} is not in this project's arena")

    def set_anchor(self, username: str | None, project_id: int, checkpoint_id: int) -> None:
        """Pin this checkpoint at 1000 on the board (added to the arena if needed)."""
        user = self.users.require(username, ADMIN)
        with self._write() as s:
            project_or_404(s, project_id)
            policy_or_404(s, project_id, checkpoint_id)
            store.set_anchor(s, project_id=project_id, checkpoint_id=checkpoint_id, added_by=user.id)

    def eval_prompts(self, username: str | None, project_id: int) -> list[tuple[int, str]]:
        """(prompt id, text) of the project's evaluation set."""
        self.users.require(username, *VOTERS)
        with self.db.read() as s:
            project_or_404(s, project_id)
            return store.eval_prompts(s, project_id=project_id)

    # ----------------------------------------------------------------------- batch and named generation

    def pregenerate(
        self,
        username: str | None,
        project_id: int,
        *,
        max_prompts: int | None = None,
        progress: Progress | None = None,
    ) -> int:
        """Generate, in batches, every active model's missing arena response to the evaluation prompts
        (the first ``max_prompts`` by id); returns how many were stored. Each batch is committed as it
        finishes, so an interrupted run keeps its work."""
        from studio.generation import generate, random_seed

        self.users.require(username, ADMIN)
        params = self.config.params()
        with self.db.read() as s:
            project_or_404(s, project_id)
            entries = self._entries(s, project_id)
            prompts = store.eval_prompts(s, project_id=project_id)[: max_prompts or None]
            ids = [i for i, _ in prompts]
            have = store.arena_generations(s, prompt_ids=ids, checkpoint_ids=[e.checkpoint_id for e in entries],
                                           params=params)  # fmt: skip
            rows = {i: s.get(Prompt, i) for i in ids}
        work = [(e.checkpoint_id, [i for i in ids if (i, e.checkpoint_id) not in have]) for e in entries]
        work = [(m, todo) for m, todo in work if todo]
        total = sum(len(todo) for _, todo in work)
        made = 0
        size = self.config.batch_size
        for model, todo in work:
            loaded = self._load(model)
            for start in range(0, len(todo), size):
                chunk = todo[start : start + size]
                inputs = [rows[i].messages or rows[i].text for i in chunk]
                out = generate(loaded, inputs, self.config.sampling(random_seed(), batch_size=size))
                with self._write() as s:
                    for prompt_id, samples in zip(chunk, out, strict=True):
                        self._store_generation(s, prompt_id, model, samples[0])
                made += len(chunk)
                if progress is not None:
                    progress(made / total)
        return made

    def named_side_by_side(
        self, username: str | None, project_id: int, checkpoint_a: int, checkpoint_b: int, prompt: str
    ) -> tuple[str, str]:
        """Both checkpoints' responses to a prompt, for debugging (admins). Nothing is stored: it never counts."""
        from studio.generation import generate, random_seed

        self.users.require(username, ADMIN)
        prompt = self._check_prompt(prompt)
        if checkpoint_a == checkpoint_b:
            raise ServiceError("choose two different checkpoints")
        with self.db.read() as s:
            project_or_404(s, project_id)
            for cid in (checkpoint_a, checkpoint_b):
                policy_or_404(s, project_id, cid)
        texts = []
        for cid in (checkpoint_a, checkpoint_b):
            try:
                loaded = self._load(cid)
            except Unloadable as exc:
                raise ServiceError(str(exc)) from None
            texts.append(generate(loaded, [prompt], self.config.sampling(random_seed()))[0][0].text)
        return texts[0], texts[1]

    # ----------------------------------------------------------------------- shared with the battles

    def _entries(self, s: Session, project_id: int) -> list[store.EntryRow]:
        """The active, loadable arena models (none whose base model failed to load lately)."""
        cutoff = self.clock() - self.config.load_retry
        return [
            e
            for e in store.list_entries(s, project_id=project_id, active_only=True)
            if e.status == CheckpointStatus.ready
            and not is_import_placeholder(e.path)
            and self._load_failed.get(e.checkpoint_id, cutoff) <= cutoff
        ]

    def _load(self, checkpoint_id: int) -> LoadedModel:
        """The loaded model of a checkpoint, through the generation service's cache and its re-hash
        guard (which marks altered files unloadable before any weight is read).

        A checkpoint whose files cannot be read raises `Unloadable` and is kept out of battles, so the
        next schedule goes on without it: a trained one (it has a manifest) is marked unloadable, as
        the guard does, and an admin's "verify" puts it back; a base model (no manifest: verify cannot
        clear it, and a mark would also refuse training from it) is only skipped by this service for
        ``config.load_retry`` (its folder may come back, or its hub download be made).
        """
        with self.db.read() as s:
            ck = s.get(Checkpoint, checkpoint_id)
        try:
            self.generation.check_loadable(ck)
        except ServiceError as exc:
            with self.db.read() as s:
                if s.get(Checkpoint, checkpoint_id).status == CheckpointStatus.unloadable:
                    log.warning("arena: checkpoint %s: %s", checkpoint_id, exc)
                    raise Unloadable(str(exc)) from None
            raise
        try:
            return self.generation.cache.get(ck.path)
        except (ValueError, OSError) as exc:  # ModelNotFoundError is a ValueError; unreadable files OSError
            log.warning("arena: checkpoint %s (%s) cannot be loaded: %s", ck.id, ck.path, exc)
            if ck.manifest_sha256:
                with self._write() as s:
                    set_checkpoint_status(s, ck.id, CheckpointStatus.unloadable)
            else:
                self._load_failed[ck.id] = self.clock()
            raise Unloadable(f"cannot load {ck.name}: {exc}") from None

    def _store_generation(self, s: Session, prompt_id: int, checkpoint_id: int, sample) -> Generation:
        """Store one sampled response with the arena's sampling settings and its seed."""
        index = store.next_sample_index(s, prompt_id=prompt_id, checkpoint_id=checkpoint_id)
        return crud.add_generation(
            s, prompt_id=prompt_id, checkpoint_id=checkpoint_id, text=sample.text, params=self.config.params(),
            seed=sample.seed, sample_index=index, num_tokens=sample.num_tokens, finish_reason=sample.finish_reason,
        )  # fmt: skip

    def _check_prompt(self, text: str) -> str:
        if not isinstance(text, str) or not text.strip():
            raise ServiceError("type a prompt first")
        if len(text) > self.config.max_prompt_chars:
            raise ServiceError(f"a prompt has at most {self.config.max_prompt_chars} characters")
        if "\x00" in text:
            raise ServiceError("a prompt may not contain NUL characters")
        return text
