"""The parts of the job service that need no database: recipe schemas (one ``python -m trainers
--schema`` subprocess per process, cached), form values → typed config values, the environment of
trainer subprocesses, and a job's files (its log, a checkpoint's manifest, the kept twin of a cancelled
job's checkpoint).

The studio never imports the trainers' torch code; ``trainers.checkpoint`` is hashlib and json only.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.services.errors import ServiceError
from studio.settings import OFFLINE_ENV

LOG_NAME = "job.log"
CONFIG_NAME = "config.json"
LOG_TAIL_LINES = 200
STOPPED_DIR = "stopped"
"""Where a cancelled job's step checkpoint is kept for the registry (see :func:`keep_stopped`)."""
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass(frozen=True)
class FieldSpec:
    """One config field of a recipe, as ``python -m trainers --schema`` describes it."""

    name: str
    """Dotted name, e.g. ``optim.lr``."""
    type: str
    """int, float, bool, str, choice, list, dict or json; ``optional_`` in front when null is allowed."""
    default: Any = None
    help: str = ""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] = ()
    items: tuple[str, ...] = ()
    """Item types of a ``list`` field (one per position for a fixed-length tuple)."""
    required: bool = False
    managed: bool = False
    """Filled by the studio (snapshot, output_dir, model, ...), never shown in a form."""


@dataclass(frozen=True)
class RecipeSpec:
    name: str
    doc: str
    checkpoint_kind: str
    """policy, reward or segment_reward: what the job's ``final/`` is registered as."""
    snapshot_kinds: tuple[str, ...]
    """Export kinds of the dataset snapshots it trains on."""
    base_kind: str
    """policy (a causal LM) or encoder_or_policy."""
    fields: list[FieldSpec]


# --------------------------------------------------------------------------- subprocess helpers


SECRET_ENV = frozenset({"STUDIO_DATABASE_URL", "DATABASE_URL", "STUDIO_ADMIN_PASSWORD", "PGPASSWORD"})
"""Environment variables the studio may hold that a trainer never needs."""


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every trainers subprocess: offline, unbuffered, this checkout importable."""
    root = str(Path(__file__).resolve().parents[2])
    # Trainers need no database and no credentials: the studio's secrets stay out of the child.
    inherited = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    env = {**inherited, **OFFLINE_ENV, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


_schema_lock = threading.Lock()


@functools.cache
def _schemas(python: str) -> dict[str, Any]:
    proc = subprocess.run(
        [python, "-m", "trainers", "--schema"], capture_output=True, text=True, timeout=600, env=child_env()
    )
    try:
        data = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        data = None
    if not isinstance(data, dict):
        raise ServiceError(f"the training recipes could not be listed: {last_error_line(proc.stderr)}")
    return data


def recipe_schemas(python: str = sys.executable) -> dict[str, Any]:
    """``python -m trainers --schema``, run once per process and cached (not cached on failure)."""
    with _schema_lock:
        return _schemas(python)


def recipe_spec(name: str, raw: Mapping[str, Any]) -> RecipeSpec:
    fields = [
        FieldSpec(
            name=f["name"],
            type=f.get("type", "json"),
            default=f.get("default"),
            help=f.get("help", ""),
            ge=f.get("ge"),
            gt=f.get("gt"),
            le=f.get("le"),
            lt=f.get("lt"),
            choices=tuple(f.get("choices") or ()),
            items=tuple(f.get("items") or ()),
            required=bool(f.get("required")),
            managed=bool(f.get("managed")),
        )
        for f in raw.get("fields", [])
    ]
    return RecipeSpec(
        name=name,
        doc=str(raw.get("doc", "")),
        checkpoint_kind=str(raw.get("checkpoint_kind", "policy")),
        snapshot_kinds=tuple(raw.get("snapshot_kinds") or ()),
        base_kind=str(raw.get("base_kind", "policy")),
        fields=fields,
    )


def last_error_line(text: str) -> str:
    """The child's last ``error[code]: message`` line, else its last non-empty line (never a traceback)."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error["):
            return line
    return lines[-1][:500] if lines else "no output"


def read_log_tail(path: str | Path, lines: int = LOG_TAIL_LINES, max_bytes: int = 256 * 1024) -> str:
    """The last ``lines`` lines of a log as plain text: progress-bar redraws (\\r) and colours removed."""
    try:
        with open(path, "rb") as handle:
            start = max(0, os.fstat(handle.fileno()).st_size - max_bytes)
            handle.seek(start)
            data = handle.read()
    except OSError:
        return ""
    text = _ANSI.sub("", data.decode("utf-8", errors="replace")).rstrip("\n")
    kept = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
    if start > 0:
        kept = kept[1:]  # the first line was cut by the seek
    return "\n".join(kept[-lines:])


@dataclass(frozen=True)
class CheckpointFacts:
    """What a checkpoint folder says about itself."""

    path: str
    manifest_sha256: str | None
    studio: dict[str, Any]
    problem: str | None
    """None when the folder is complete and every file matches its manifest."""


def checkpoint_facts(path: str | Path, expected_sha256: str | None = None) -> CheckpointFacts:
    """Verify a checkpoint folder (full sha256 of every file; ``expected_sha256``: the manifest's digest
    recorded earlier) and read its ``studio.json``."""
    from trainers.checkpoint import ManifestError, manifest_digest, read_studio_json, verify_manifest

    problem = None
    try:
        verify_manifest(path, hashes=True)
    except ManifestError as exc:
        problem = str(exc)
    try:
        digest = manifest_digest(path)
    except OSError:
        digest = None
    if problem is None and expected_sha256 is not None and digest != expected_sha256:
        problem = f"{path}: the manifest is not the one recorded when the checkpoint was registered"
    try:
        studio = read_studio_json(path)
    except (OSError, ValueError):
        studio = {}
    return CheckpointFacts(str(path), digest, studio if isinstance(studio, dict) else {}, problem)


# --------------------------------------------------------------------------- form values


def coerce_field(spec: FieldSpec, raw: Any) -> Any:
    """A form value (often a string) → the typed value ``spec`` wants; ServiceError names the field."""

    def fail(problem: str) -> ServiceError:
        return ServiceError(f"field '{spec.name}': {problem}")

    optional = spec.type.startswith("optional_")
    base = spec.type.removeprefix("optional_")
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        if optional:
            return None
        if spec.required:
            raise fail("a value is required")
        return spec.default
    value = _coerce(base, raw, spec.choices, spec.items, fail)
    for number in value if isinstance(value, list) else [value]:
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            _check_bounds(spec, number, fail)
    return value


def _coerce(base: str, raw: Any, choices: tuple[Any, ...], items: tuple[str, ...], fail) -> Any:
    text = raw.strip() if isinstance(raw, str) else None
    if base == "int":
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        with contextlib.suppress(ValueError, AttributeError):
            return int(text.replace("_", ""))
        raise fail(f"expected a whole number, got {raw!r}")
    if base == "float":
        number = None
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            number = float(raw)
        elif text is not None:
            with contextlib.suppress(ValueError):
                number = float(text)
        if number is None:
            raise fail(f"expected a number, got {raw!r}")
        if not math.isfinite(number):
            raise fail(f"must be finite, got {raw!r}")
        return number
    if base == "bool":
        if isinstance(raw, bool):
            return raw
        words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
        if text is not None and text.lower() in words:
            return words[text.lower()]
        raise fail(f"expected true or false, got {raw!r}")
    if base == "choice":
        for choice in choices:
            if raw == choice or (text is not None and text == str(choice)):
                return choice
        raise fail(f"must be one of {', '.join(map(str, choices))}, got {raw!r}")
    if base == "str":
        if isinstance(raw, str):
            return raw
        raise fail(f"expected text, got {raw!r}")
    value = raw
    if text is not None:
        try:
            value = json.loads(text)
        except ValueError:
            if base != "list":
                raise fail(f"expected JSON, got {raw!r}") from None
            value = [part.strip() for part in text.strip("[]()").split(",") if part.strip()]
    if base == "list":
        if not isinstance(value, (list, tuple)):
            raise fail(f"expected a list, got {raw!r}")
        if len(items) > 1 and len(value) != len(items):
            raise fail(f"expected {len(items)} values, got {len(value)}")
        kinds = items if len(items) > 1 else (items[0] if items else "json",) * len(value)
        return [
            v if kind == "json" else _coerce(kind, v, (), (), fail)
            for kind, v in zip(kinds, value, strict=True)
        ]
    if base == "dict" and not isinstance(value, dict):
        raise fail(f"expected a mapping, got {raw!r}")
    return value


def _check_bounds(spec: FieldSpec, number: float, fail) -> None:
    for limit, ok, word in ((spec.ge, lambda a, b: a >= b, "≥"), (spec.gt, lambda a, b: a > b, ">"),
                            (spec.le, lambda a, b: a <= b, "≤"), (spec.lt, lambda a, b: a < b, "<")):  # fmt: skip
        if limit is not None and not ok(number, limit):
            raise fail(f"out of range: must be {word} {limit:g}, got {number:g}")


def nest(values: Mapping[str, Any]) -> dict[str, Any]:
    """``{"optim.lr": 1e-4, "seed": 1}`` → ``{"optim": {"lr": 1e-4}, "seed": 1}``."""
    out: dict[str, Any] = {}
    for dotted, value in values.items():
        node = out
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def keep_stopped(checkpoint: Path, job_folder: Path, job_id: int) -> Path:
    """A lasting twin of a cancelled job's step checkpoint for the registry to point at:
    ``<job folder>/stopped/job-<id>-step-N``, hard links of its files (copies where linking fails).

    The recipe prunes its own ``checkpoints/step-N`` once a resumed run has written newer ones
    (``keep_checkpoints``), which would leave the registered checkpoint without files. Checkpoint files
    are written once (atomic folder renames) and never changed in place, so links are safe.
    """
    dest = job_folder / STOPPED_DIR / f"job-{job_id}-{checkpoint.name}"
    if dest.is_dir():
        return dest
    tmp = dest.with_name(f".tmp-{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for src in sorted(checkpoint.rglob("*")):
            target = tmp / src.relative_to(checkpoint)
            if src.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, target)
            except OSError:
                shutil.copy2(src, target)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
