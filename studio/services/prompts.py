"""Prompts: import from files (strict or lenient, atomic), browse and search."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sqlalchemy.exc import IntegrityError

from storage import crud
from storage.db import Database
from storage.imports import WARNING_CODES, ImportLimits, ImportProblem, parse_prompt_file
from storage.models import Prompt
from studio.services.errors import ServiceError
from studio.settings import Settings

DuplicatePolicy = Literal["skip", "update", "error"]
DUPLICATE_POLICIES: tuple[str, ...] = ("skip", "update", "error")


@dataclass
class ImportReport:
    """What an import did; `committed` is False when nothing was written."""

    file: str
    format: str
    lenient: bool
    on_duplicate: str
    rows_seen: int = 0
    inserted: int = 0
    updated: int = 0
    skipped_existing: list[str] = field(default_factory=list)
    problems: list[ImportProblem] = field(default_factory=list)
    committed: bool = False

    def summary(self) -> str:
        if not self.committed:
            return (
                f"Nothing imported from {self.file}: {len(self.problems)} problem(s) found in "
                f"{self.rows_seen} row(s). Fix them, or import in lenient mode to keep the good rows."
            )
        parts = [f"Imported {self.inserted} new prompt(s) from {self.file} ({self.format})"]
        if self.updated:
            parts.append(f"updated {self.updated} existing")
        if self.skipped_existing:
            parts.append(
                f"skipped {len(self.skipped_existing)} already in the project (policy: {self.on_duplicate})"
            )
        warnings = sum(p.code in WARNING_CODES for p in self.problems)
        if len(self.problems) > warnings:
            parts.append(f"left out rows with {len(self.problems) - warnings} problem(s)")
        if warnings:
            parts.append(f"{warnings} warning(s), e.g. ignored columns")
        return "; ".join(parts) + "."

    def problems_as_dicts(self) -> list[dict[str, Any]]:
        return [p.to_dict() for p in self.problems]


@dataclass(frozen=True)
class PromptRow:
    id: int
    external_id: str
    kind: str
    tags: list[str]
    generations: int
    text: str


@dataclass(frozen=True)
class BrowsePage:
    rows: list[PromptRow]
    total: int
    page: int
    pages: int


@dataclass(frozen=True)
class GenerationRow:
    id: int
    model: str
    checkpoint_id: int
    sample_index: int
    text: str
    params: dict[str, Any]
    seed: int | None
    num_tokens: int | None
    finish_reason: str | None


@dataclass(frozen=True)
class PromptDetail:
    id: int
    external_id: str
    kind: str
    text: str
    messages: list[dict[str, str]] | None
    tags: list[str]
    source: str | None
    generations: list[GenerationRow]


class PromptService:
    def __init__(self, db: Database, settings: Settings):
        self.db = db
        self.settings = settings

    @property
    def limits(self) -> ImportLimits:
        return ImportLimits(max_file_bytes=self.settings.max_upload_mb * 2**20)

    # ----------------------------------------------------------------------- import

    def import_file(
        self,
        project_id: int,
        path: str | Path,
        *,
        lenient: bool = False,
        on_duplicate: DuplicatePolicy = "skip",
        display_name: str | None = None,
    ) -> ImportReport:
        """Import prompts from JSONL, CSV, Parquet, TXT, a `datasets.save_to_disk` folder (or a .zip of one).

        Strict (default): any bad row rejects the whole file and nothing is written.
        Lenient: the good rows are imported and the rest reported.
        An id already in the project is skipped (default), updated, or an error, as `on_duplicate` says.
        """
        if on_duplicate not in DUPLICATE_POLICIES:
            raise ServiceError(
                f"on_duplicate must be one of {', '.join(DUPLICATE_POLICIES)}, got {on_duplicate!r}"
            )
        path = Path(path)
        name = display_name or path.name
        with self.db.read() as s:
            if crud.get_project(s, project_id) is None:
                raise ServiceError(f"project {project_id} does not exist")
        with unpacked(path, self.limits) as (source, unpack_problem):
            if unpack_problem is not None:
                report = ImportReport(file=name, format="zip", lenient=lenient, on_duplicate=on_duplicate)
                report.problems.append(ImportProblem(name, None, None, "bad_zip", unpack_problem))
                return report
            parsed = parse_prompt_file(source, lenient=lenient, limits=self.limits, display_name=name)
        report = ImportReport(
            file=name,
            format=parsed.format,
            lenient=lenient,
            on_duplicate=on_duplicate,
            rows_seen=parsed.rows_seen,
            problems=list(parsed.problems),
        )
        if (parsed.blocking and not lenient) or not parsed.records:
            return report

        try:
            self._write_records(project_id, parsed.records, report)
        except _Rejected:
            report.inserted = report.updated = 0
            report.skipped_existing.clear()
        except IntegrityError:
            # Only a concurrent import of the same ids gets here (the ids were checked in this transaction).
            raise ServiceError(
                "another import added some of these ids at the same time; nothing was written, import again"
            ) from None
        return report

    def _write_records(self, project_id: int, records, report: ImportReport) -> None:
        name, on_duplicate = report.file, report.on_duplicate
        with self.db.write() as s:
            ids = [r.external_id for r in records]
            existing = crud.existing_prompt_ids(s, project_id=project_id, external_ids=ids)
            answered = (
                crud.prompts_with_generations(s, project_id=project_id, external_ids=ids)
                if on_duplicate == "update"
                else set()
            )
            folded = crud.prompt_ids_casefolded(s, project_id=project_id)
            new_rows: list[dict] = []
            update_rows: list[dict] = []

            def refuse(rec, code: str, message: str) -> None:
                report.problems.append(ImportProblem(name, rec.line, "id", code, message))

            def flush(final: bool = False) -> None:
                # Insert in chunks: memory stays bounded for a 200,000-row file (one transaction still).
                if new_rows and (final or len(new_rows) >= _INSERT_CHUNK):
                    report.inserted += crud.insert_prompts(s, project_id=project_id, rows=new_rows)
                    new_rows.clear()

            for rec in records:
                row = {
                    "external_id": rec.external_id,
                    "kind": rec.kind,
                    "text": rec.text,
                    "messages": rec.messages,
                    "tags": rec.tags,
                    "source": name,
                }
                if rec.external_id not in existing:
                    twin = folded.get(rec.external_id.casefold())
                    if twin is not None:
                        refuse(
                            rec,
                            "ambiguous_id",
                            f"id {rec.external_id!r} differs only in case from {twin!r}, already in the project",
                        )
                    else:
                        new_rows.append(row)
                        flush()
                elif on_duplicate == "skip":
                    report.skipped_existing.append(rec.external_id)
                elif on_duplicate == "error":
                    refuse(rec, "exists", f"a prompt with id {rec.external_id!r} is already in the project")
                elif rec.external_id in answered:
                    # Its responses (and any votes on them) were made for the old text.
                    refuse(
                        rec,
                        "has_responses",
                        f"prompt {rec.external_id!r} already has responses, so its text cannot change; "
                        "import it under a new id",
                    )
                else:
                    update_rows.append(row)
            if any(p.code in _DB_CODES for p in report.problems) and not report.lenient:
                raise _Rejected  # leaving the transaction by exception rolls it back
            flush(final=True)
            report.updated = crud.update_prompts(s, project_id=project_id, rows=update_rows)
        report.committed = True

    # ----------------------------------------------------------------------- browse

    def tags(self, project_id: int) -> list[str]:
        with self.db.read() as s:
            return crud.project_tags(s, project_id=project_id)

    def browse(
        self, project_id: int, *, query: str = "", tag: str | None = None, page: int = 1, page_size: int = 20
    ) -> BrowsePage:
        page_size = max(1, min(int(page_size), 200))
        query, tag, page = (query or "").strip(), tag or None, max(1, int(page))
        with self.db.read() as s:
            rows, total = crud.search_prompts(
                s, project_id=project_id, query=query, tag=tag, offset=(page - 1) * page_size, limit=page_size
            )
            pages = max(1, math.ceil(total / page_size))
            if page > pages:  # past the end (e.g. a narrower search): show the last page
                page = pages
                rows, total = crud.search_prompts(
                    s,
                    project_id=project_id,
                    query=query,
                    tag=tag,
                    offset=(page - 1) * page_size,
                    limit=page_size,
                )
        return BrowsePage(
            rows=[
                PromptRow(
                    id=p.id,
                    external_id=p.external_id,
                    kind=str(p.kind),
                    tags=list(p.tags or []),
                    generations=n,
                    text=p.text,
                )
                for p, n in rows
            ],
            total=total,
            page=page,
            pages=pages,
        )

    def detail(self, project_id: int, prompt_id: int) -> PromptDetail:
        with self.db.read() as s:
            prompt = s.get(Prompt, prompt_id)
            if prompt is None or prompt.project_id != project_id:
                raise ServiceError(f"prompt {prompt_id} is not in this project")
            gens = crud.generations_for_prompt(s, prompt_id=prompt_id)
        return PromptDetail(
            id=prompt.id,
            external_id=prompt.external_id,
            kind=str(prompt.kind),
            text=prompt.text,
            messages=prompt.messages,
            tags=list(prompt.tags or []),
            source=prompt.source,
            generations=[
                GenerationRow(
                    id=g.id,
                    model=c.name,
                    checkpoint_id=c.id,
                    sample_index=g.sample_index,
                    text=g.text,
                    params=dict(g.params or {}),
                    seed=g.seed,
                    num_tokens=g.num_tokens,
                    finish_reason=g.finish_reason,
                )
                for g, c in gens
            ],
        )


_INSERT_CHUNK = 5000
_DB_CODES = frozenset({"exists", "ambiguous_id", "has_responses"})
"""Problems found against the rows already in the project (the parser cannot see those)."""


class _Rejected(Exception):
    """Raised inside the write transaction to roll it back (strict import with existing ids)."""


@contextlib.contextmanager
def unpacked(path: Path, limits: ImportLimits) -> Iterator[tuple[Path, str | None]]:
    """A .zip (of a `datasets.save_to_disk` folder) is extracted to a temp dir, removed afterwards.

    Yields (path to parse, problem message or None). Members that would land outside the temp
    dir, or an uncompressed size over the upload limit, are refused before extracting.
    """
    if path.suffix.lower() != ".zip":
        yield path, None
        return
    tmp = Path(tempfile.mkdtemp(prefix="studio-import-"))
    try:
        yield _extract_dataset_zip(path, tmp, limits)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract_dataset_zip(path: Path, tmp: Path, limits: ImportLimits) -> tuple[Path, str | None]:
    try:
        with zipfile.ZipFile(path) as zf:
            total = sum(i.file_size for i in zf.infolist())
            if total > limits.max_file_bytes:
                limit_mib = limits.max_file_bytes / 2**20
                return path, f"the zip expands to {total / 2**20:.1f} MiB, over the {limit_mib:.0f} MiB limit"
            for info in zf.infolist():
                if not (tmp / info.filename).resolve().is_relative_to(tmp.resolve()):
                    return path, f"zip member {info.filename!r} would be written outside the import folder"
            zf.extractall(tmp)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
        return path, f"not a readable zip file ({exc})"
    markers = [
        p.parent for p in tmp.rglob("*") if p.name in ("dataset_info.json", "state.json", "dataset_dict.json")
    ]
    if not markers:
        return path, "the zip does not contain a folder saved with datasets.save_to_disk"
    return min(markers, key=lambda p: len(p.parts)), None


REPORTS_DIR = Path(tempfile.gettempdir()) / "feedback-studio-reports"
REPORT_MAX_AGE_S = 3600


def write_problems_json(report: ImportReport, folder: Path = REPORTS_DIR) -> Path:
    """The full problem list as a downloadable JSON file (the UI shows at most 100).

    Each report gets its own file; reports older than an hour are removed on the way.
    """
    folder.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in folder.glob("*.json"):
        with contextlib.suppress(OSError):
            if now - old.stat().st_mtime > REPORT_MAX_AGE_S:
                old.unlink()
    fd, name = tempfile.mkstemp(
        prefix=f"import-problems-{Path(report.file).stem[:40]}-", suffix=".json", dir=folder
    )
    os.close(fd)
    path = Path(name)
    path.write_text(json.dumps(report.problems_as_dicts(), ensure_ascii=False, indent=1), encoding="utf-8")
    return path
