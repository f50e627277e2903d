"""Store validated preference records (from `storage.preference_import`) in the caller's transaction.

What is created (nothing is committed here; the service owns the one transaction):
- prompts: matched to the project's prompts by exact content (text, or messages); new ones get
  the content id "sha256:<16 hex>", the tag "imported" and the file name as source;
- one checkpoint "imported:<file name>" (kind policy, path "imported:<sha256 of the file>");
  a file already imported into the project is refused (`AlreadyImported`);
- one generation per distinct (prompt, response text) of the file;
- each preference row: a comparison (a = chosen, b = rejected, a shown on the left) and one vote
  with outcome "a" (and the row's strength) by the system user "imported";
- unpaired rows: generations only, with the label in `Generation.params["label"]`; a prompt with
  exactly two completions in the file, both labelled False, also gets a both_bad vote.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, select

from storage import crud
from storage.export_data import IMPORT_USERNAME
from storage.imports_core import content_id, render_chat
from storage.models import (
    Checkpoint,
    CheckpointKind,
    Comparison,
    ComparisonPurpose,
    Generation,
    Outcome,
    PairwiseVote,
    Prompt,
    PromptKind,
    Role,
    Strength,
    User,
)
from storage.preference_import import Content, PreferenceRecord, prompt_key

IMPORT_PATH_PREFIX = "imported:"
"""Path prefix of an import's stand-in checkpoint (``imported:<sha256 of the file>``)."""


def is_import_placeholder(path: str | None) -> bool:
    """Whether a checkpoint path is an import's stand-in: it records where imported responses came
    from and has no weights, so it can neither generate nor be a training base."""
    return str(path or "").startswith(IMPORT_PATH_PREFIX)


@dataclass
class WriteCounts:
    checkpoint_id: int | None = None
    prompts_new: int = 0
    prompts_matched: int = 0
    generations: int = 0
    comparisons: int = 0
    votes: int = 0
    both_bad: int = 0


class AlreadyImported(Exception):
    """The file (same sha256) already has generations in this project."""


def import_user(session: Session) -> User:
    """The system user owning imported votes: annotator, inactive, no password (cannot log in)."""
    user = session.exec(select(User).where(User.username == IMPORT_USERNAME)).first()
    if user is not None and user.password_hash:
        raise ValueError(
            f"a sign-in account is named {IMPORT_USERNAME!r}; rename it, the name is reserved for imported votes"
        )
    if user is None:
        user = User(username=IMPORT_USERNAME, role=Role.annotator, is_active=False, password_hash=None)
        session.add(user)
        session.flush()
    return user


def _import_checkpoint(session: Session, project_id: int, file_sha256: str, display_name: str) -> Checkpoint:
    path = f"{IMPORT_PATH_PREFIX}{file_sha256}"
    ckpt = crud.find_checkpoint(session, path=path, kind=CheckpointKind.policy)
    if ckpt is None:
        ckpt = Checkpoint(
            name=f"imported:{display_name}"[:200],
            path=path,
            kind=CheckpointKind.policy,
            project_id=project_id,
            recipe="imported",
        )
        session.add(ckpt)
        session.flush()
        return ckpt
    used = session.exec(
        select(Generation.id)
        .join(Prompt, Prompt.id == Generation.prompt_id)
        .where(Generation.checkpoint_id == ckpt.id, Prompt.project_id == project_id)
        .limit(1)
    ).first()
    if used is not None:
        raise AlreadyImported(
            f"this file (sha256 {file_sha256[:12]}…) was already imported into the project as {ckpt.name!r}"
        )
    return ckpt


def _prompt_ids(
    session: Session, project_id: int, records: list[PreferenceRecord], source: str, counts: WriteCounts
) -> dict[tuple[str, str], int]:
    """Prompt id for every distinct prompt of the records, inserting the ones not in the project."""
    existing: dict[tuple[str, str], int] = {}
    for pid, kind, text, messages in session.exec(
        select(Prompt.id, Prompt.kind, Prompt.text, Prompt.messages).where(Prompt.project_id == project_id)
    ).all():
        key = prompt_key(messages if str(getattr(kind, "value", kind)) == "chat" and messages else text)
        existing.setdefault(key, pid)
    wanted: dict[tuple[str, str], Content] = {}
    for r in records:
        wanted.setdefault(prompt_key(r.prompt), r.prompt)
    new = {k: c for k, c in wanted.items() if k not in existing}
    counts.prompts_matched = len(wanted) - len(new)
    taken = set(session.exec(select(Prompt.external_id).where(Prompt.project_id == project_id)).all())
    rows, ext_by_key = [], {}
    for key, content in new.items():
        ext = content_id(content)
        n = 1
        while ext in taken:  # an unrelated prompt that happens to use this id
            n += 1
            ext = f"{content_id(content)}-{n}"
        taken.add(ext)
        ext_by_key[key] = ext
        chat = not isinstance(content, str)
        rows.append(
            {
                "external_id": ext,
                "kind": PromptKind.chat if chat else PromptKind.text,
                "text": render_chat(content) if chat else content,
                "messages": content if chat else None,
                "tags": ["imported"],
                "source": source[:500],
            }
        )
    for i in range(0, len(rows), 5000):
        crud.insert_prompts(session, project_id=project_id, rows=rows[i : i + 5000])
    counts.prompts_new = len(rows)
    ids = crud.existing_prompt_ids(session, project_id=project_id, external_ids=list(ext_by_key.values()))
    existing.update({k: ids[ext] for k, ext in ext_by_key.items()})
    return existing


def write_preferences(
    session: Session, *, project_id: int, records: list[PreferenceRecord], file_sha256: str, display_name: str
) -> WriteCounts:
    """Store validated records (see the module doc for what is created). Never commits."""
    counts = WriteCounts()
    user = import_user(session)
    ckpt = _import_checkpoint(session, project_id, file_sha256, display_name)
    counts.checkpoint_id = ckpt.id
    prompt_ids = _prompt_ids(session, project_id, records, display_name, counts)
    gens: dict[tuple[int, str], Generation] = {}

    def generation(prompt_id: int, text: str, line: int, label: bool | None = None) -> Generation:
        key = (prompt_id, text)
        if key not in gens:
            params: dict[str, Any] = {"source": "import", "file": display_name, "line": line}
            if label is not None:
                params["label"] = label
            gens[key] = Generation(
                prompt_id=prompt_id, checkpoint_id=ckpt.id, text=text, params=params, seed=None
            )
            session.add(gens[key])
        return gens[key]

    pairs: list[tuple[PreferenceRecord, int, Generation, Generation, str]] = []
    unpaired: dict[int, list[tuple[PreferenceRecord, Generation]]] = {}
    for r in records:
        pid = prompt_ids[prompt_key(r.prompt)]
        if r.shape == "unpaired":
            unpaired.setdefault(pid, []).append((r, generation(pid, r.completion or "", r.line, r.label)))
        else:
            a, b = generation(pid, r.chosen or "", r.line), generation(pid, r.rejected or "", r.line)
            pairs.append((r, pid, a, b, "a"))
    for pid, items in unpaired.items():
        if len(items) == 2 and not items[0][0].label and not items[1][0].label:
            pairs.append((items[0][0], pid, items[0][1], items[1][1], "both_bad"))
            counts.both_bad += 1
    session.flush()
    counts.generations = len(gens)
    comps = [
        Comparison(
            project_id=project_id,
            prompt_id=pid,
            generation_a_id=a.id,
            generation_b_id=b.id,
            purpose=ComparisonPurpose.annotate,
            a_on_left=True,
            required_votes=1,
        )
        for _, pid, a, b, _ in pairs
    ]
    session.add_all(comps)
    session.flush()
    session.add_all(
        PairwiseVote(
            comparison_id=c.id,
            user_id=user.id,
            outcome=Outcome(outcome),
            strength=Strength(r.strength) if r.strength else None,
            left_generation_id=a.id,
            idempotency_key=f"import:{project_id}:{file_sha256[:32]}:{r.line}",
            guideline_version=None,
        )
        for c, (r, _, a, _, outcome) in zip(comps, pairs, strict=True)
    )
    session.flush()
    counts.comparisons = counts.votes = len(comps)
    return counts


def count_import_votes(session: Session) -> int:
    """How many votes the system import user holds (for tests and reports)."""
    return session.exec(
        select(sa.func.count(PairwiseVote.id))
        .join(User, User.id == PairwiseVote.user_id)
        .where(User.username == IMPORT_USERNAME)
    ).one()
