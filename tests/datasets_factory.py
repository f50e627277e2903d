"""Build small annotated projects directly in the database for the quality and export tests.

Importable from any test (tests/ is on sys.path through its conftest). Rows are written with the
ORM in one transaction per call, exactly as the annotation service would leave them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from storage import crud
from storage.db import Database
from storage.models import (
    Comparison,
    Generation,
    PairwiseVote,
    Prompt,
    PromptKind,
    Role,
    SpanAnnotation,
    SpanSet,
    User,
)

_keys = itertools.count()


def add_user(db: Database, username: str, role: str = "annotator") -> int:
    with db.write() as s:
        user = User(username=username, role=Role(role), password_hash="x", is_active=True)
        s.add(user)
        s.flush()
        return user.id


@dataclass
class Seed:
    project_id: int
    prompts: list[int] = field(default_factory=list)
    generations: dict[tuple[int, str], int] = field(default_factory=dict)
    """(prompt index, "a" | "b") -> generation id."""
    comparisons: list[int] = field(default_factory=list)


def seed_project(
    db: Database,
    *,
    name: str = "P",
    prompts: list[str | list[dict[str, str]]] | None = None,
    tags: list[list[str]] | None = None,
) -> Seed:
    """A project with one comparison per prompt: generations "A<i> ..." (model-a) vs "B<i> ..." (model-b)."""
    prompts = prompts or ["Say hi.", "Name a colour."]
    with db.write() as s:
        project = crud.create_project(s, name=name)
        ck_a = crud.get_or_create_checkpoint(s, path="model-a", name="model-a")
        ck_b = crud.get_or_create_checkpoint(s, path="model-b", name="model-b")
        seed = Seed(project.id)
        for i, content in enumerate(prompts):
            chat = not isinstance(content, str)
            p = Prompt(
                project_id=project.id,
                external_id=f"p{i}",
                kind=PromptKind.chat if chat else PromptKind.text,
                text="\n".join(f"{m['role']}: {m['content']}" for m in content) if chat else content,
                messages=content if chat else None,
                tags=(tags[i] if tags else []),
            )
            s.add(p)
            s.flush()
            seed.prompts.append(p.id)
            ga = Generation(prompt_id=p.id, checkpoint_id=ck_a.id, text=f"A{i} answer é 😀", params={})
            gb = Generation(prompt_id=p.id, checkpoint_id=ck_b.id, text=f"B{i} reply", params={})
            s.add_all([ga, gb])
            s.flush()
            seed.generations[(i, "a")], seed.generations[(i, "b")] = ga.id, gb.id
            c = Comparison(
                project_id=project.id,
                prompt_id=p.id,
                generation_a_id=ga.id,
                generation_b_id=gb.id,
                purpose="annotate",
                required_votes=3,
            )
            s.add(c)
            s.flush()
            seed.comparisons.append(c.id)
    return seed


def vote(
    db: Database,
    comparison_id: int,
    user_id: int,
    outcome: str,
    *,
    strength: str | None = None,
    a_left: bool = True,
    time_ms: int | None = None,
    guideline_version: int | None = None,
) -> int:
    with db.write() as s:
        c = s.get(Comparison, comparison_id)
        v = PairwiseVote(
            comparison_id=comparison_id,
            user_id=user_id,
            outcome=outcome,
            strength=strength,
            left_generation_id=c.generation_a_id if a_left else c.generation_b_id,
            idempotency_key=f"k{next(_keys)}",
            time_spent_ms=time_ms,
            guideline_version=guideline_version,
        )
        s.add(v)
        s.flush()
        return v.id


def set_gold(db: Database, comparison_id: int, outcome: str) -> None:
    with db.write() as s:
        c = s.get(Comparison, comparison_id)
        c.gold_outcome = outcome
        s.add(c)


def spans(
    db: Database, generation_id: int, user_id: int, items: list[tuple], *, submitted: bool = True
) -> int:
    """items: (start, end, polarity[, label[, comment]]) in code points."""
    with db.write() as s:
        ss = SpanSet(generation_id=generation_id, user_id=user_id, submitted=submitted, guideline_version=1)
        s.add(ss)
        s.flush()
        for item in items:
            start, end, polarity, *rest = item
            s.add(
                SpanAnnotation(
                    span_set_id=ss.id,
                    start=start,
                    end=end,
                    polarity=polarity,
                    label=rest[0] if rest else None,
                    comment=rest[1] if len(rest) > 1 else None,
                )
            )
        return ss.id
