"""Write snapshot rows to disk atomically and hash them; read them back.

Formats:
- jsonl: one JSON object per line, UTF-8, `ensure_ascii=False` (the canonical format);
- parquet: one file, written with pyarrow;
- hf: a folder written by `datasets.Dataset.save_to_disk`.

The sha256 of a file is the sha256 of its bytes. The sha256 of a folder (hf) is the sha256 of
its manifest: one line "<sha256 of file>  <relative path>\\n" per file, sorted by path (the
`sha256sum` layout), so `sha256_path` verifies any snapshot the same way.

All files of one export go into a temp folder beside the target, which is then renamed into
place: a reader never sees a half-written snapshot. No torch, no gradio.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMATS: tuple[str, ...] = ("jsonl", "parquet", "hf")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class WrittenFile:
    name: str
    path: Path
    sha256: str
    row_count: int


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def folder_manifest(folder: Path) -> str:
    """'<sha256>  <relative posix path>' lines for every file under `folder`, sorted by path."""
    folder = Path(folder)
    files = sorted((p.relative_to(folder).as_posix(), p) for p in folder.rglob("*") if p.is_file())
    return "".join(f"{file_sha256(p)}  {rel}\n" for rel, p in files)


def sha256_path(path: Path) -> str:
    """sha256 of a snapshot: of the file's bytes, or of a folder's sorted manifest."""
    path = Path(path)
    if path.is_dir():
        return hashlib.sha256(folder_manifest(path).encode("utf-8")).hexdigest()
    return file_sha256(path)


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_jsonl(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    with Path(path).open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, allow_nan=False))
            fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def write_parquet(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(list(rows)), path)
    _fsync(path)


def write_hf(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    import datasets

    datasets.Dataset.from_list(list(rows)).save_to_disk(str(path))
    for p in Path(path).rglob("*"):
        if p.is_file():
            _fsync(p)


_WRITERS = {"jsonl": (write_jsonl, ".jsonl"), "parquet": (write_parquet, ".parquet"), "hf": (write_hf, "")}


def write_snapshot_folder(
    parent: Path, folder_name: str, files: Mapping[str, Sequence[Mapping[str, Any]]], fmt: str
) -> list[WrittenFile]:
    """Write each {name: rows} as `<parent>/<folder_name>/<name>.<ext>` (hf: a folder `<name>/`).

    Everything is written to `<parent>/.tmp-<folder_name>` first and renamed into place once
    complete; on any error the temp folder is removed and nothing appears. Returns the final
    paths with their sha256 and row counts.
    """
    if fmt not in _WRITERS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    writer, suffix = _WRITERS[fmt]
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / folder_name
    if final.exists():
        raise FileExistsError(f"snapshot folder {final} already exists")
    tmp = parent / f".tmp-{folder_name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        written = []
        for name, rows in files.items():
            target = tmp / f"{name}{suffix}"
            writer(rows, target)
            written.append((name, f"{name}{suffix}", sha256_path(target), len(rows)))
        os.replace(tmp, final)
        _fsync(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [WrittenFile(name, final / rel, sha, n) for name, rel, sha, n in written]


def read_snapshot(path: Path, fmt: str | None = None) -> list[dict[str, Any]]:
    """The rows of a snapshot file or folder (for tests and small previews; trainers use datasets)."""
    path = Path(path)
    fmt = fmt or ("hf" if path.is_dir() else path.suffix.lstrip("."))
    if fmt == "jsonl":
        with path.open(encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if fmt == "hf":
        import datasets

        return datasets.load_from_disk(str(path)).to_list()
    raise ValueError(f"unknown format {fmt!r}")
