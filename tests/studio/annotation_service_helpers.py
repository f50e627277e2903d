"""Helpers shared by the annotation-service tests (queue, votes, segments, team overview, API).

Imported by name (tests/ has no __init__.py; pytest prepends this folder to sys.path)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

from sqlmodel import func, select

from storage import crud
from storage import models as m
from storage import users as user_crud
from storage.db import Database
from studio.services.annotation import AnnotationService
from studio.services.errors import Conflict
from studio.services.users import UserService
from studio.settings import Settings


class Clock:
    """An injectable clock that only moves when told."""

    def __init__(self, start: datetime | None = None):
        self.now = start or datetime(2030, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw) -> None:
        self.now += timedelta(**kw)


def add_users(db: Database, names: list[str], role: m.Role = m.Role.annotator) -> None:
    with db.write() as s:
        for name in names:
            user_crud.insert_user(
                s, username=name, role=role, password_hash="not-a-hash", changed_at=datetime.now(UTC)
            )


def seed_project(
    db: Database,
    *,
    comparisons: int = 0,
    required: int = 1,
    generations: int = 0,
    labels: tuple[str, ...] = ("tone", "fact"),
    overlap_fraction: float = 0.0,
    overlap_k: int = 1,
    guidelines: str | None = "Prefer helpful answers.",
    texts: tuple[str, ...] | None = None,
) -> tuple[int, list[int], list[int]]:
    """A project with `comparisons` pairs (each needing `required` votes) and `generations` lone responses.

    Returns (project id, comparison ids, ids of the generations made for the segment task).
    """
    with db.write() as s:
        project = crud.create_project(
            s,
            name=f"p{datetime.now(UTC).timestamp()}",
            span_labels=list(labels),
            overlap_fraction=overlap_fraction,
            overlap_k=overlap_k,
        )
        if guidelines:
            crud.add_guideline_version(s, project_id=project.id, text=guidelines)
        ckpt = crud.get_or_create_checkpoint(s, path="tiny", name="tiny")
        comparison_ids, generation_ids = [], []
        for i in range(comparisons):
            prompt = m.Prompt(project_id=project.id, external_id=f"c{i}", kind="text", text=f"prompt {i}")
            s.add(prompt)
            s.flush()
            a = crud.add_generation(
                s, prompt_id=prompt.id, checkpoint_id=ckpt.id, text=f"A{i}", params={}, seed=0
            )
            b = crud.add_generation(
                s, prompt_id=prompt.id, checkpoint_id=ckpt.id, text=f"B{i}", params={}, seed=1
            )
            c = crud.add_comparison(
                s,
                project_id=project.id,
                prompt_id=prompt.id,
                generation_a_id=a.id,
                generation_b_id=b.id,
                required_votes=required,
            )
            comparison_ids.append(c.id)
        for i in range(generations):
            prompt = m.Prompt(project_id=project.id, external_id=f"g{i}", kind="text", text=f"ask {i}")
            s.add(prompt)
            s.flush()
            text = texts[i % len(texts)] if texts else f"response number {i} 👍🏽 done"
            g = crud.add_generation(
                s, prompt_id=prompt.id, checkpoint_id=ckpt.id, text=text, params={}, seed=0
            )
            generation_ids.append(g.id)
        return project.id, comparison_ids, generation_ids


def make_service(db: Database, tmp_path, clock=None, **kw) -> AnnotationService:
    settings = Settings(data_dir=tmp_path / "data", database_url="sqlite://")
    users = UserService(db, settings)
    return AnnotationService(db, settings, users, **({"clock": clock} if clock else {}), **kw)


def count(db: Database, table, *where) -> int:
    with db.read() as s:
        return s.exec(select(func.count()).select_from(table).where(*where)).one()


HOLD_S = 1.5
"""How long a paused transaction waits for the racing request before it commits anyway."""


def race(first, pause_hook: threading.Event, second, release: threading.Event):
    """Run `first` in a thread until it signals `pause_hook` (inside its open transaction), then `second`.

    `first`'s transaction waits (up to HOLD_S) for `release`, which is set when `second` returns. A
    request that takes the queue lock therefore waits for `first` to commit; one that does not
    finishes while `first` is still open. Returns (first's result, second's result or exception).
    """

    def run_second():
        try:
            return second()
        except Conflict as exc:
            return exc
        finally:
            release.set()

    with ThreadPoolExecutor(max_workers=2) as pool:
        one = pool.submit(first)
        assert pause_hook.wait(timeout=30)
        two = pool.submit(run_second)
        return one.result(timeout=60), two.result(timeout=60)
