"""Keyword-only CRUD over the studio's tables.

Every function takes an open `Session` and never commits: the caller (a service) owns the
transaction, so one user action is one atomic write (`Database.write()`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, func, select

from storage.models import (
    Checkpoint,
    CheckpointKind,
    Comparison,
    ComparisonPurpose,
    Generation,
    GuidelineVersion,
    Project,
    Prompt,
    utcnow,
)

# --------------------------------------------------------------------------- projects


def create_project(
    session: Session,
    *,
    name: str,
    description: str = "",
    span_labels: Sequence[str] | None = None,
    overlap_fraction: float = 0.0,
    overlap_k: int = 1,
    is_demo: bool = False,
    created_by: int | None = None,
) -> Project:
    project = Project(
        name=name,
        description=description,
        span_labels=list(span_labels or []),
        overlap_fraction=overlap_fraction,
        overlap_k=overlap_k,
        is_demo=is_demo,
        created_by=created_by,
    )
    session.add(project)
    session.flush()
    return project


def get_project(session: Session, project_id: int) -> Project | None:
    return session.get(Project, project_id)


def get_project_by_name(session: Session, name: str) -> Project | None:
    return session.exec(select(Project).where(Project.name == name)).first()


@dataclass(frozen=True)
class ProjectSummary:
    project: Project
    prompts: int
    generations: int
    comparisons: int


def list_projects(session: Session, *, project_id: int | None = None) -> list[ProjectSummary]:
    """Projects with their prompt, generation and comparison counts (one project if `project_id`)."""
    prompts = (
        select(Prompt.project_id, func.count(Prompt.id).label("n")).group_by(Prompt.project_id).subquery()
    )
    gens = (
        select(Prompt.project_id, func.count(Generation.id).label("n"))
        .join(Generation, Generation.prompt_id == Prompt.id)
        .group_by(Prompt.project_id)
        .subquery()
    )
    comps = (
        select(Comparison.project_id, func.count(Comparison.id).label("n"))
        .group_by(Comparison.project_id)
        .subquery()
    )
    stmt = (
        select(
            Project,
            func.coalesce(prompts.c.n, 0),
            func.coalesce(gens.c.n, 0),
            func.coalesce(comps.c.n, 0),
        )
        .outerjoin(prompts, prompts.c.project_id == Project.id)
        .outerjoin(gens, gens.c.project_id == Project.id)
        .outerjoin(comps, comps.c.project_id == Project.id)
        .order_by(Project.id)
    )
    if project_id is not None:
        stmt = stmt.where(Project.id == project_id)
    rows = session.exec(stmt).all()
    return [ProjectSummary(p, n_p, n_g, n_c) for p, n_p, n_g, n_c in rows]


def has_projects(session: Session) -> bool:
    return session.exec(select(Project.id).limit(1)).first() is not None


def add_guideline_version(
    session: Session, *, project_id: int, text: str, created_by: int | None = None
) -> GuidelineVersion:
    latest = session.exec(
        select(func.max(GuidelineVersion.version)).where(GuidelineVersion.project_id == project_id)
    ).one()
    row = GuidelineVersion(project_id=project_id, version=(latest or 0) + 1, text=text, created_by=created_by)
    session.add(row)
    session.flush()
    return row


def current_guidelines(session: Session, project_id: int) -> GuidelineVersion | None:
    return session.exec(
        select(GuidelineVersion)
        .where(GuidelineVersion.project_id == project_id)
        .order_by(GuidelineVersion.version.desc())
    ).first()


# --------------------------------------------------------------------------- prompts


def existing_prompt_ids(session: Session, *, project_id: int, external_ids: Iterable[str]) -> dict[str, int]:
    """Map external id -> prompt id for the ids that already exist in the project."""
    ids = list(external_ids)
    found: dict[str, int] = {}
    for i in range(0, len(ids), 500):  # stay below SQLite's bound-parameter limit
        chunk = ids[i : i + 500]
        rows = session.exec(
            select(Prompt.external_id, Prompt.id).where(
                Prompt.project_id == project_id, Prompt.external_id.in_(chunk)
            )
        ).all()
        found.update(dict(rows))
    return found


def insert_prompts(session: Session, *, project_id: int, rows: Sequence[dict[str, Any]]) -> int:
    """Bulk insert prompts; each row has external_id, kind, text, messages, tags, source."""
    if not rows:
        return 0
    now = utcnow()
    payload = [{"project_id": project_id, "created_at": now, **row} for row in rows]
    session.execute(sa.insert(Prompt), payload)
    return len(payload)


def prompts_with_generations(session: Session, *, project_id: int, external_ids: Iterable[str]) -> set[str]:
    """The external ids among `external_ids` whose prompt already has responses."""
    ids = list(external_ids)
    found: set[str] = set()
    for i in range(0, len(ids), 500):
        rows = session.exec(
            select(Prompt.external_id)
            .where(Prompt.project_id == project_id, Prompt.external_id.in_(ids[i : i + 500]))
            .where(sa.exists().where(Generation.prompt_id == Prompt.id))
        ).all()
        found.update(rows)
    return found


def prompt_ids_casefolded(session: Session, *, project_id: int) -> dict[str, str]:
    """casefolded external id -> external id, to catch ids differing only in case from existing ones."""
    rows = session.exec(select(Prompt.external_id).where(Prompt.project_id == project_id)).all()
    return {r.casefold(): r for r in rows}


def update_prompts(session: Session, *, project_id: int, rows: Sequence[dict[str, Any]]) -> int:
    """Replace text, messages, tags and source of existing prompts, matched by external id."""
    for row in rows:
        session.execute(
            sa.update(Prompt)
            .where(Prompt.project_id == project_id, Prompt.external_id == row["external_id"])
            .values(
                kind=row["kind"],
                text=row["text"],
                messages=row["messages"],
                tags=row["tags"],
                source=row["source"],
            )
        )
    return len(rows)


def count_prompts(session: Session, *, project_id: int) -> int:
    return session.exec(select(func.count(Prompt.id)).where(Prompt.project_id == project_id)).one()


def _like_pattern(query: str) -> str:
    escaped = query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _prompt_filter(stmt, *, project_id: int, query: str = "", tag: str | None = None):
    stmt = stmt.where(Prompt.project_id == project_id)
    if query:
        pattern = _like_pattern(query)
        stmt = stmt.where(
            sa.or_(Prompt.text.ilike(pattern, escape="\\"), Prompt.external_id.ilike(pattern, escape="\\"))
        )
    if tag:
        # Tags are stored as a JSON list (json.dumps, ASCII-escaped); match the element exactly as it
        # was serialised, quotes included, so "a" does not match "ab" and "café" matches "caf\u00e9".
        stmt = stmt.where(sa.cast(Prompt.tags, sa.String).like(_like_pattern(json.dumps(tag)), escape="\\"))
    return stmt


def search_prompts(
    session: Session,
    *,
    project_id: int,
    query: str = "",
    tag: str | None = None,
    offset: int = 0,
    limit: int = 20,
) -> tuple[list[tuple[Prompt, int]], int]:
    """A page of prompts (with their generation counts) matching a text query and tag, and the total."""
    total = session.exec(
        _prompt_filter(select(func.count(Prompt.id)), project_id=project_id, query=query, tag=tag)
    ).one()
    n_gen = (
        select(func.count(Generation.id))
        .where(Generation.prompt_id == Prompt.id)
        .correlate(Prompt)
        .scalar_subquery()
    )
    rows = session.exec(
        _prompt_filter(select(Prompt, n_gen), project_id=project_id, query=query, tag=tag)
        .order_by(Prompt.id)
        .offset(offset)
        .limit(limit)
    ).all()
    return [(p, n) for p, n in rows], total


def project_tags(session: Session, *, project_id: int) -> list[str]:
    tags: set[str] = set()
    for row in session.exec(select(Prompt.tags).where(Prompt.project_id == project_id)).all():
        tags.update(row or [])
    return sorted(tags)


def select_prompts_for_generation(
    session: Session,
    *,
    project_id: int,
    tag: str | None = None,
    without_generations_from: int | None = None,
    limit: int | None = None,
) -> list[Prompt]:
    """Prompts to generate for, in id order; optionally only those the checkpoint has not answered."""
    stmt = _prompt_filter(select(Prompt), project_id=project_id, tag=tag)
    if without_generations_from is not None:
        answered = select(Generation.prompt_id).where(Generation.checkpoint_id == without_generations_from)
        stmt = stmt.where(Prompt.id.not_in(answered))
    stmt = stmt.order_by(Prompt.id)
    if limit:
        stmt = stmt.limit(limit)
    return list(session.exec(stmt).all())


# --------------------------------------------------------------------------- checkpoints and generations


def get_or_create_checkpoint(
    session: Session,
    *,
    path: str,
    name: str,
    kind: CheckpointKind = CheckpointKind.policy,
    project_id: int | None = None,
    recipe: str | None = "base",
) -> Checkpoint:
    """The checkpoint row for a model reference (a short name, folder or HF id), created once."""
    row = session.exec(
        select(Checkpoint).where(
            Checkpoint.path == path, Checkpoint.kind == kind, Checkpoint.parent_id.is_(None)
        )
    ).first()
    if row is None:
        row = Checkpoint(name=name, path=path, kind=kind, project_id=project_id, recipe=recipe)
        session.add(row)
        session.flush()
    return row


def find_checkpoint(session: Session, *, path: str, kind: CheckpointKind) -> Checkpoint | None:
    return session.exec(select(Checkpoint).where(Checkpoint.path == path, Checkpoint.kind == kind)).first()


def delete_empty_project(session: Session, *, project_id: int) -> None:
    """Remove a project that has no prompts yet (undo of a failed create), with its guidelines."""
    if count_prompts(session, project_id=project_id):
        raise ValueError(f"project {project_id} has prompts; refusing to delete it")
    session.execute(sa.delete(GuidelineVersion).where(GuidelineVersion.project_id == project_id))
    session.execute(sa.delete(Project).where(Project.id == project_id))


def list_checkpoints(
    session: Session, *, kind: CheckpointKind | None = None, project_id: int | None = None
) -> list[Checkpoint]:
    stmt = select(Checkpoint).order_by(Checkpoint.id)
    if kind is not None:
        stmt = stmt.where(Checkpoint.kind == kind)
    if project_id is not None:
        stmt = stmt.where(sa.or_(Checkpoint.project_id == project_id, Checkpoint.project_id.is_(None)))
    return list(session.exec(stmt).all())


def add_generation(
    session: Session,
    *,
    prompt_id: int,
    checkpoint_id: int,
    text: str,
    params: dict[str, Any],
    seed: int | None,
    sample_index: int = 0,
    num_tokens: int | None = None,
    finish_reason: str | None = None,
) -> Generation:
    row = Generation(
        prompt_id=prompt_id,
        checkpoint_id=checkpoint_id,
        text=text,
        params=params,
        seed=seed,
        sample_index=sample_index,
        num_tokens=num_tokens,
        finish_reason=finish_reason,
    )
    session.add(row)
    session.flush()
    return row


def add_comparison(
    session: Session,
    *,
    project_id: int,
    prompt_id: int,
    generation_a_id: int,
    generation_b_id: int,
    purpose: ComparisonPurpose = ComparisonPurpose.annotate,
    a_on_left: bool = True,
    required_votes: int = 1,
) -> Comparison:
    row = Comparison(
        project_id=project_id,
        prompt_id=prompt_id,
        generation_a_id=generation_a_id,
        generation_b_id=generation_b_id,
        purpose=purpose,
        a_on_left=a_on_left,
        required_votes=required_votes,
    )
    session.add(row)
    session.flush()
    return row


def generations_for_prompt(session: Session, *, prompt_id: int) -> list[tuple[Generation, Checkpoint]]:
    return list(
        session.exec(
            select(Generation, Checkpoint)
            .join(Checkpoint, Checkpoint.id == Generation.checkpoint_id)
            .where(Generation.prompt_id == prompt_id)
            .order_by(Generation.id)
        ).all()
    )


def count_comparisons(session: Session, *, project_id: int) -> int:
    return session.exec(select(func.count(Comparison.id)).where(Comparison.project_id == project_id)).one()
