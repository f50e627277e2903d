"""Dataset snapshots (export) and import of public preference data; admin only.

`export` freezes what the project's annotators produced into TRL-shaped files under
`<data_dir>/exports/<project id>/<snapshot folder>/`, one file (or datasets folder) per kind,
written atomically, and records a DatasetSnapshot row per kind with its sha256 and counts.
`import_preferences` reads JSONL / Parquet / a datasets folder (or a .zip of one) in TRL's
preference formats; any blocking problem means nothing is written. Formats and the mapping of
ties, both-bad and strength: storage/DATASETS.md.
"""

from __future__ import annotations

import secrets
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from storage import crud
from storage.db import Database
from storage.export_data import load_project_data
from storage.exports import EXPORT_KINDS, STORED_KIND, ExportFilters, build_rows
from storage.exports_io import FORMATS, sha256_path, write_snapshot_folder
from storage.imports_core import WARNING_CODES, ImportLimits, ImportProblem
from storage.models import DatasetSnapshot, SnapshotKind, utcnow
from storage.preference_import import parse_preference_file
from storage.preference_store import AlreadyImported, write_preferences
from studio.services.errors import NotFound, ServiceError
from studio.services.prompts import unpacked
from studio.settings import Settings


@dataclass(frozen=True)
class SnapshotInfo:
    id: int
    kind: str
    """Export kind: preferences, reward, unpaired, segments, stepwise, votes or prompts."""
    format: str
    path: str
    sha256: str
    row_count: int
    counts: dict[str, Any]
    filters: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None


@dataclass
class PreferenceImportReport:
    """What an import found and did; `committed` is False when nothing was written."""

    file: str
    format: str
    rows_seen: int = 0
    shapes: dict[str, int] = field(default_factory=dict)
    """Valid rows per shape: explicit, implicit, unpaired."""
    prompts_new: int = 0
    prompts_matched: int = 0
    generations: int = 0
    comparisons: int = 0
    votes: int = 0
    both_bad: int = 0
    checkpoint_id: int | None = None
    problems: list[ImportProblem] = field(default_factory=list)
    committed: bool = False

    @property
    def blocking(self) -> list[ImportProblem]:
        return [p for p in self.problems if p.code not in WARNING_CODES]

    def summary(self) -> str:
        if not self.committed:
            return (
                f"Nothing imported from {self.file}: {len(self.blocking)} problem(s) in {self.rows_seen} row(s). "
                "Fix them and import again."
            )
        return (
            f"Imported {self.rows_seen} row(s) from {self.file} ({self.format}): {self.prompts_new} new prompt(s), "
            f"{self.prompts_matched} matched, {self.generations} response(s), {self.comparisons} comparison(s) "
            f"with {self.votes} vote(s)."
        )

    def problems_as_dicts(self) -> list[dict[str, Any]]:
        return [p.to_dict() for p in self.problems]


def _info(row: DatasetSnapshot) -> SnapshotInfo:
    filters = dict(row.filters or {})
    kind = filters.get("variant") or str(getattr(row.kind, "value", row.kind))
    return SnapshotInfo(
        id=row.id,
        kind=kind,
        format=row.format,
        path=row.path,
        sha256=row.sha256,
        row_count=row.row_count,
        counts=dict(row.counts or {}),
        filters=filters,
        created_at=row.created_at,
    )


class DatasetService:
    def __init__(self, db: Database, settings: Settings, users):
        self.db = db
        self.settings = settings
        self.users = users

    @property
    def limits(self) -> ImportLimits:
        return ImportLimits(max_file_bytes=self.settings.max_upload_mb * 2**20)

    # ----------------------------------------------------------------------- export

    def export(
        self,
        username: str | None,
        project_id: int,
        kinds: list[str],
        fmt: str = "jsonl",
        filters: dict[str, Any] | None = None,
    ) -> list[SnapshotInfo]:
        """Write one snapshot per kind into a new folder and record them; nothing if any kind is empty."""
        user = self.users.require(username, "admin")
        kinds = list(dict.fromkeys(kinds or []))
        if not kinds:
            raise ServiceError(f"choose at least one kind to export: {', '.join(EXPORT_KINDS)}")
        bad = [k for k in kinds if k not in EXPORT_KINDS]
        if bad:
            raise ServiceError(f"unknown export kind(s) {bad}; use {', '.join(EXPORT_KINDS)}")
        if fmt not in FORMATS:
            raise ServiceError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        try:
            parsed = ExportFilters.from_dict(filters)
        except ValueError as exc:
            raise ServiceError(str(exc)) from None
        with self.db.read() as s:
            if crud.get_project(s, project_id) is None:
                raise NotFound(f"project {project_id} does not exist")
            data = load_project_data(s, project_id, purposes=parsed.purposes, spans=True)

        folder = f"{utcnow():%Y%m%dT%H%M%S}Z-{secrets.token_hex(3)}"
        results = {kind: build_rows(kind, data, parsed, folder) for kind in kinds}
        empty = [r for r in results.values() if not r.rows]
        if empty:
            details = "; ".join(f"{r.kind}: {_why_empty(r.counts)}" for r in empty)
            raise ServiceError(f"nothing to export for {', '.join(r.kind for r in empty)} ({details})")
        parent = Path(self.settings.exports_dir) / str(project_id)
        written = write_snapshot_folder(parent, folder, {k: r.rows for k, r in results.items()}, fmt)
        try:
            with self.db.write() as s:
                rows = []
                for w in written:
                    stored_filters = parsed.to_dict() | {"folder": folder}
                    if w.name == "stepwise":
                        stored_filters["variant"] = "stepwise"
                    row = DatasetSnapshot(
                        project_id=project_id,
                        kind=SnapshotKind(STORED_KIND[w.name]),
                        format=fmt,
                        path=str(w.path),
                        sha256=w.sha256,
                        row_count=w.row_count,
                        counts=results[w.name].counts,
                        filters=stored_filters,
                        created_by=user.id,
                    )
                    s.add(row)
                    rows.append(row)
                s.flush()
                return [_info(r) for r in rows]
        except BaseException:
            shutil.rmtree(parent / folder, ignore_errors=True)  # no files without their rows
            raise

    def list_snapshots(self, username: str | None, project_id: int) -> list[SnapshotInfo]:
        """The project's snapshots, newest first."""
        self.users.require(username, "admin")
        with self.db.read() as s:
            rows = s.exec(
                select(DatasetSnapshot)
                .where(DatasetSnapshot.project_id == project_id)
                .order_by(DatasetSnapshot.id.desc())
            ).all()
            return [_info(r) for r in rows]

    def verify(self, username: str | None, snapshot_id: int) -> bool:
        """True when the snapshot on disk still has the sha256 recorded for it."""
        self.users.require(username, "admin")
        with self.db.read() as s:
            row = s.get(DatasetSnapshot, snapshot_id)
        if row is None:
            raise NotFound(f"snapshot {snapshot_id} does not exist")
        path = Path(row.path)
        return path.exists() and sha256_path(path) == row.sha256

    # ----------------------------------------------------------------------- import

    def import_preferences(
        self, username: str | None, project_id: int, path: str | Path, display_name: str | None = None
    ) -> PreferenceImportReport:
        """Import TRL preference data (see storage.preference_import); all rows or nothing."""
        self.users.require(username, "admin")
        path = Path(path)
        name = display_name or path.name
        with self.db.read() as s:
            if crud.get_project(s, project_id) is None:
                raise NotFound(f"project {project_id} does not exist")
        with unpacked(path, self.limits) as (source, unpack_problem):
            if unpack_problem is not None:
                report = PreferenceImportReport(file=name, format="zip")
                report.problems.append(ImportProblem(name, None, None, "bad_zip", unpack_problem))
                return report
            parsed = parse_preference_file(source, limits=self.limits, display_name=name)
            file_sha = sha256_path(path) if parsed.records and not parsed.blocking else ""
        report = PreferenceImportReport(
            file=name,
            format=parsed.format,
            rows_seen=parsed.rows_seen,
            shapes=parsed.shapes(),
            problems=list(parsed.problems),
        )
        if parsed.blocking or not parsed.records:
            return report
        try:
            with self.db.write() as s:
                counts = write_preferences(
                    s, project_id=project_id, records=parsed.records, file_sha256=file_sha, display_name=name
                )
        except AlreadyImported as exc:
            report.problems.append(ImportProblem(name, None, None, "already_imported", str(exc)))
            return report
        except ValueError as exc:
            raise ServiceError(str(exc)) from None
        except IntegrityError:
            raise ServiceError(
                "the import clashed with data written at the same time; nothing was written, import again"
            ) from None
        report.prompts_new, report.prompts_matched = counts.prompts_new, counts.prompts_matched
        report.generations, report.comparisons = counts.generations, counts.comparisons
        report.votes, report.both_bad, report.checkpoint_id = (
            counts.votes,
            counts.both_bad,
            counts.checkpoint_id,
        )
        report.committed = True
        return report


_REASONS = {
    "no_votes": "without votes",
    "below_min_votes": "below min_votes",
    "split": "with split votes",
    "below_min_agreement": "below min_agreement",
    "tie": "tie",
    "both_bad": "both bad",
    "other_tag": "other tags",
}


def _why_empty(counts: dict[str, Any]) -> str:
    parts = [f"{counts[k]} {label}" for k, label in _REASONS.items() if counts.get(k)]
    for key in ("comparisons", "span_sets", "prompts"):
        if key in counts:
            parts.insert(0, f"{counts[key]} {key.replace('_', ' ')}")
    return ", ".join(parts) or "no data yet"
