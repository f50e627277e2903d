"""Atomic checkpoint folders with a sha256 manifest, and the resume helpers built on them.

A checkpoint is a folder ``<parent>/<name>`` holding whatever the recipe writes (``save_pretrained``
safetensors, tokenizer files, ``training_state.pt``) plus three files this module writes:

* ``studio.json`` — recipe, config, snapshot sha256, parent, metrics, step, extra (normaliser params…);
* ``manifest.json`` — ``{"format": 1, "step": N, "files": {relative path: {"sha256", "size"}}}``;
* ``COMPLETE`` — the sha256 of ``manifest.json``; written last.

Writing (:func:`write_checkpoint`): everything goes into a temporary sibling ``.tmp-ckpt-<name>-*``,
each file is fsynced, then the manifest and ``COMPLETE``, the folder is fsynced, renamed to its final
name (the commit point) and the parent folder fsynced. A crash at any moment leaves either the
previous state or a complete checkpoint, plus maybe a ``.tmp-ckpt-*`` orphan that
:func:`clean_orphans` removes at the next start. A folder without ``COMPLETE`` or with a manifest that
does not match is never picked by :func:`find_latest_complete`.

Loading (:func:`load_training_state`): the manifest is verified (sha256 of every file, no extra files)
before ``torch.load(weights_only=True)``; pickled files that fail the check are never opened.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
COMPLETE = "COMPLETE"
STUDIO_JSON = "studio.json"
TRAINING_STATE = "training_state.pt"
TMP_PREFIX = ".tmp-ckpt-"
STEP_PREFIX = "step-"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_FREE_MARGIN = 100 * 2**20
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""OSError numbers reported as ``disk_full``: no space, quota exceeded, and "file too large"
(EFBIG: a file-size limit such as ``RLIMIT_FSIZE`` / ``ulimit -f``, or the filesystem's maximum)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or trusted. ``code`` is machine-readable."""

    code = "checkpoint"


class CheckpointWriteError(CheckpointError):
    """Writing failed; the previous checkpoints are intact. ``code`` is ``disk_full`` or ``io``."""

    def __init__(self, message: str, code: str = "io"):
        super().__init__(message)
        self.code = code


class ManifestError(CheckpointError):
    """The folder is incomplete, or a file is missing, extra or altered."""

    code = "bad_checkpoint"


def step_dir(folder: str | Path, step: int) -> Path:
    """``<folder>/step-000123``: zero-padded so names sort like steps."""
    return Path(folder) / f"{STEP_PREFIX}{step:06d}"


# ----------------------------------------------------------------------------- writing


def write_checkpoint(
    dest: str | Path,
    write_files: Callable[[Path], None],
    studio: Mapping[str, Any],
    *,
    expected_bytes: int | None = None,
) -> Path:
    """Atomically create the checkpoint folder ``dest``; ``write_files(tmp)`` writes the payload.

    ``studio`` becomes ``studio.json`` (it must be JSON-able; keys that ``write_files`` put in its own
    ``studio.json`` are kept unless ``studio`` sets them too). ``expected_bytes`` (the size of the
    previous checkpoint, or an estimate) triggers a free-space check first: at least twice that plus
    100 MiB must be free, else :class:`CheckpointWriteError` with code ``disk_full``. An existing
    ``dest`` is replaced (briefly moved aside, then deleted once the new one is in place).
    """
    dest = Path(dest)
    parent = dest.parent
    parent.mkdir(parents=True, exist_ok=True)
    if expected_bytes is not None:
        free = shutil.disk_usage(parent).free
        if free < 2 * expected_bytes + _FREE_MARGIN:
            raise CheckpointWriteError(
                f"disk full: {free / 2**20:.0f} MiB free in {parent}, a checkpoint needs about "
                f"{(2 * expected_bytes + _FREE_MARGIN) / 2**20:.0f} MiB",
                code="disk_full",
            )
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{dest.name}-", dir=parent))
    try:
        write_files(tmp)
        written = tmp / STUDIO_JSON  # a payload may add its own keys; ``studio`` wins on conflicts
        payload = json.loads(written.read_text()) if written.is_file() else {}
        payload.update({"format": 1, "created_at": time.time(), **studio})
        (tmp / STUDIO_JSON).write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
        files = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            _fsync_file(path)
            files[path.relative_to(tmp).as_posix()] = {"sha256": _sha256(path), "size": path.stat().st_size}
        manifest = {"format": 1, "step": studio.get("step"), "files": files}
        _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        _write_synced(tmp / COMPLETE, _sha256(tmp / MANIFEST) + "\n")
        for sub in sorted((p for p in tmp.rglob("*") if p.is_dir()), reverse=True):
            _fsync_dir(sub)
        _fsync_dir(tmp)
        tmp.chmod(0o755)  # mkdtemp folders are private; checkpoints are read by the studio's workers
        aside = None
        if dest.exists():
            aside = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}old-", dir=parent))
            dest.rename(aside / dest.name)
        tmp.rename(dest)
        _fsync_dir(parent)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        code = "disk_full" if exc.errno in DISK_FULL_ERRNOS else "io"
        raise CheckpointWriteError(f"could not write checkpoint {dest}: {exc}", code=code) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def save_checkpoint(
    dest: str | Path,
    *,
    model: Any,
    tokenizer: Any | None,
    studio: Mapping[str, Any],
    training_state: Mapping[str, Any] | None = None,
    state_dict: Mapping[str, Any] | None = None,
    expected_bytes: int | None = None,
) -> Path:
    """An HF model (``save_pretrained``, safetensors) + tokenizer + optional resume state, atomically.

    ``state_dict`` overrides the model's own (what ``accelerator.get_state_dict`` gathers under
    sharding). ``training_state`` (optimizer, scheduler, counters: tensors and plain Python values only)
    goes to ``training_state.pt``, which is loaded back with ``weights_only=True``.
    """

    def write(tmp: Path) -> None:
        kwargs = {"state_dict": dict(state_dict)} if state_dict is not None else {}
        model.save_pretrained(tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if training_state is not None:
            import torch

            torch.save(dict(training_state), tmp / TRAINING_STATE)

    return write_checkpoint(dest, write, studio, expected_bytes=expected_bytes)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb+") as handle:
        os.fsync(handle.fileno())


def _write_synced(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not supported on every OS/filesystem (Windows)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------- checking and finding


def manifest_digest(path: str | Path) -> str:
    """The checkpoint's identity: sha256 of its ``manifest.json`` (what ``COMPLETE`` holds)."""
    return _sha256(Path(path) / MANIFEST)


def verify_manifest(path: str | Path, *, hashes: bool = True) -> dict[str, Any]:
    """Return the manifest if the folder is a complete, untampered checkpoint; else :class:`ManifestError`.

    Checks: ``COMPLETE`` holds the manifest's sha256; every listed file exists with its size (and,
    with ``hashes``, its sha256); no unlisted file exists. ``hashes=False`` is the quick check.
    """
    path = Path(path)
    if not path.is_dir():
        raise ManifestError(f"{path}: not a checkpoint folder")
    try:
        complete = (path / COMPLETE).read_text().strip()
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"{path}: incomplete checkpoint (no valid {COMPLETE} and {MANIFEST})") from exc
    if complete != _sha256(path / MANIFEST):
        raise ManifestError(f"{path}: {MANIFEST} does not match {COMPLETE}")
    present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {MANIFEST, COMPLETE}
    extra = sorted(present - set(files))
    if extra:
        raise ManifestError(f"{path}: files not in the manifest: {', '.join(extra)}")
    for name, info in files.items():
        file = path / name
        if not file.is_file():
            raise ManifestError(f"{path}: {name} is missing")
        if file.stat().st_size != info["size"]:
            raise ManifestError(f"{path}: {name} has the wrong size")
        if hashes and _sha256(file) != info["sha256"]:
            raise ManifestError(f"{path}: {name} does not match its sha256 in the manifest")
    return manifest


def is_complete(path: str | Path, *, hashes: bool = False) -> bool:
    """True for a complete checkpoint (see :func:`verify_manifest`)."""
    try:
        verify_manifest(path, hashes=hashes)
    except ManifestError:
        return False
    return True


def list_complete(folder: str | Path) -> list[tuple[int, Path]]:
    """``[(step, path)]`` of the complete ``step-N`` checkpoints in ``folder``, by step."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def find_latest_complete(folder: str | Path) -> Path | None:
    """The complete ``step-N`` checkpoint with the highest N (incomplete or hand-made ones ignored)."""
    found = list_complete(folder)
    return found[-1][1] if found else None


def clean_orphans(folder: str | Path) -> list[Path]:
    """Delete ``.tmp-ckpt-*`` leftovers of interrupted writes in ``folder``; return what was removed.

    Call it at start-up only, when no other process writes checkpoints into ``folder``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = [p for p in folder.iterdir() if p.name.startswith(TMP_PREFIX)]
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


def prune_checkpoints(folder: str | Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest complete ``step-N`` checkpoints (``keep <= 0``: keep all)."""
    if keep <= 0:
        return []
    old = [path for _, path in list_complete(folder)[:-keep]]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


def folder_bytes(path: str | Path) -> int:
    """Total size of the files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- loading


def read_studio_json(path: str | Path) -> dict[str, Any]:
    """The ``studio.json`` of a checkpoint (not verified; use :func:`verify_manifest` for that)."""
    return json.loads((Path(path) / STUDIO_JSON).read_text())


def load_training_state(path: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    """Verify the manifest (full sha256), then ``torch.load(training_state.pt, weights_only=True)``."""
    import torch

    path = Path(path)
    verify_manifest(path, hashes=True)
    file = path / TRAINING_STATE
    if not file.is_file():
        raise ManifestError(f"{path}: no {TRAINING_STATE} (not a resumable checkpoint)")
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except Exception as exc:  # an UnpicklingError for anything but tensors and plain containers
        raise ManifestError(f"{path}: {TRAINING_STATE} refused by the safe loader: {exc}") from exc
