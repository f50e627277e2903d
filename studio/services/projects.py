"""Projects: create, list, guidelines, and the built-in demo project."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import IntegrityError

from storage import crud
from storage.db import Database
from storage.models import Project
from studio.services.errors import ServiceError
from studio.services.prompts import ImportReport, PromptService
from studio.settings import Settings

DEMO_FILE = Path(__file__).resolve().parent.parent / "demo" / "prompts.jsonl"
DEMO_NAME = "Demo: reviews and instructions"
DEMO_DESCRIPTION = (
    "A built-in starter project: short review-style prompts (good for sentiment and tone) and "
    "instruction-style prompts (explain, list, rewrite), some as chat conversations."
)
DEMO_GUIDELINES = """\
Prefer the response that answers the prompt **helpfully, correctly and concisely**.

- A response that ignores the instruction loses, however fluent it is.
- Factual errors count more than style.
- Mark a **tie** when both are about equally good, **both bad** when neither is acceptable.
- For reviews: the tone asked for (positive / negative / balanced) must match.
"""
DEMO_SPAN_LABELS = ["factual error", "off topic", "repetition", "good detail", "tone"]


@dataclass(frozen=True)
class ProjectInfo:
    id: int
    name: str
    description: str
    is_demo: bool
    prompts: int
    generations: int
    comparisons: int
    span_labels: list[str]
    guidelines: str
    guideline_version: int | None
    overlap_fraction: float
    """Share of the items (0–1) that get `overlap_k` annotators; the rest get one."""
    overlap_k: int
    """Annotators per overlap item (set with `AnnotationService.set_overlap`)."""


class ProjectService:
    def __init__(self, db: Database, settings: Settings, prompts: PromptService):
        self.db = db
        self.settings = settings
        self.prompts = prompts

    def list(self, project_id: int | None = None) -> list[ProjectInfo]:
        with self.db.read() as s:
            out = []
            for summary in crud.list_projects(s, project_id=project_id):
                g = crud.current_guidelines(s, summary.project.id)
                out.append(_info(summary.project, summary, g.text if g else "", g.version if g else None))
            return out

    def get(self, project_id: int) -> ProjectInfo:
        found = self.list(project_id)
        if not found:
            raise ServiceError(f"project {project_id} does not exist")
        return found[0]

    def is_empty(self) -> bool:
        """True on a fresh database: the UI then offers the demo project."""
        with self.db.read() as s:
            return not crud.has_projects(s)

    def create(
        self,
        name: str,
        *,
        description: str = "",
        guidelines: str = "",
        span_labels: list[str] | str | None = None,
        is_demo: bool = False,
    ) -> ProjectInfo:
        name = (name or "").strip()
        if not name:
            raise ServiceError("project name is empty")
        if len(name) > 200:
            raise ServiceError(f"project name is {len(name)} characters long; the limit is 200")
        labels = _parse_labels(span_labels)
        try:
            with self.db.write() as s:
                if crud.get_project_by_name(s, name):
                    raise ServiceError(f"a project named {name!r} already exists")
                project = crud.create_project(
                    s, name=name, description=description or "", span_labels=labels, is_demo=is_demo
                )
                if guidelines.strip():
                    crud.add_guideline_version(s, project_id=project.id, text=guidelines)
                project_id = project.id
        except IntegrityError:  # a concurrent create of the same name
            raise ServiceError(f"a project named {name!r} already exists") from None
        return self.get(project_id)

    def set_guidelines(self, project_id: int, text: str) -> int:
        """Store a new guideline version; returns its number."""
        for _attempt in range(3):
            try:
                with self.db.write() as s:
                    if crud.get_project(s, project_id) is None:
                        raise ServiceError(f"project {project_id} does not exist")
                    return crud.add_guideline_version(s, project_id=project_id, text=text).version
            except IntegrityError:
                continue  # another editor took this version number (PostgreSQL); number again
        raise ServiceError("the guidelines are being edited by someone else right now; save again")

    def create_demo(self) -> tuple[ProjectInfo, ImportReport]:
        """Create the demo project and import its prompts (the prompts ship with the package)."""
        with self.db.read() as s:
            existing = crud.get_project_by_name(s, DEMO_NAME)
        if existing is not None:
            raise ServiceError(f"the demo project already exists (project {existing.id})")
        info = self.create(
            DEMO_NAME,
            description=DEMO_DESCRIPTION,
            guidelines=DEMO_GUIDELINES,
            span_labels=DEMO_SPAN_LABELS,
            is_demo=True,
        )
        try:
            report = self.prompts.import_file(info.id, DEMO_FILE, display_name="demo/prompts.jsonl")
            if not report.committed:
                raise ServiceError(f"the demo prompts did not import: {report.summary()}")
        except Exception:
            # Undo the empty project, so the demo is offered again rather than half there.
            with self.db.write() as s:
                crud.delete_empty_project(s, project_id=info.id)
            raise
        return self.get(info.id), report


def _parse_labels(labels: list[str] | str | None) -> list[str]:
    if labels is None:
        return []
    if isinstance(labels, str):
        labels = labels.replace("\n", ",").split(",")
    out: list[str] = []
    for raw in labels:
        label = raw.strip()
        if not label:
            continue
        if len(label) > 100:
            raise ServiceError(f"span label {label[:30]!r}... is longer than 100 characters")
        if label not in out:
            out.append(label)
    return out


def _info(
    project: Project, summary: crud.ProjectSummary, guidelines: str, version: int | None
) -> ProjectInfo:
    return ProjectInfo(
        id=project.id,
        name=project.name,
        description=project.description,
        is_demo=project.is_demo,
        prompts=summary.prompts,
        generations=summary.generations,
        comparisons=summary.comparisons,
        span_labels=list(project.span_labels or []),
        guidelines=guidelines,
        guideline_version=version,
        overlap_fraction=float(project.overlap_fraction),
        overlap_k=int(project.overlap_k),
    )
