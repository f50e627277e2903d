"""``python -m trainers score``: score (prompt, response) rows with a reward-model checkpoint.

    python -m trainers score --checkpoint DIR --input in.jsonl --output out.jsonl
                             [--batch-size N] [--cpu] [--manifest-sha256 HEX]

Input: JSONL, one object per line, ``{"id": int | str, "prompt": str | [{"role", "content"}, ...],
"response": str}`` (blank lines are skipped; ids must be unique). Output: JSONL ``{"id": ..., "score":
float}`` in input order, written atomically (a temporary sibling, fsynced, then renamed), and one JSON
summary line on stdout.

The checkpoint is trusted only after :func:`trainers.checkpoint.verify_manifest` (full sha256 of every
file; with ``--manifest-sha256``, also the manifest digest the studio recorded at registration). Its
``studio.json`` says what it is: kind ``reward`` (the ``reward_model`` recipe) or ``segment_reward``
(``segment_reward_model``). Scoring goes through the very reward sources the RL recipes train on
(:func:`trainers.tasks.build_reward` → :class:`trainers.rewards.SequenceRMReward` /
:class:`trainers.rewards.SegmentRMReward`, with the RL defaults), so a response gets the score an RL run
would have given it: its sequence reward, the sum of its token rewards (``TokenRewards.total``). The
RM's own tokenizer stands in for the policy's; the total does not depend on the policy tokenizer.

Failures follow ``python -m trainers``: one ``error[<code>]: <message>`` line on stderr and the code's
exit status (2 ``bad_input``: a bad argument or input row, named by file, line and field;
5 ``bad_checkpoint``: an incomplete, altered, unloadable or non-reward checkpoint; 6 ``io``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainers.checkpoint import (
    DISK_FULL_ERRNOS,
    ManifestError,
    manifest_digest,
    read_studio_json,
    verify_manifest,
)
from trainers.config import ConfigError
from trainers.data import jsonl_lines

RECIPE_KINDS = {"reward_model": "reward", "segment_reward_model": "segment_reward"}
"""Checkpoint kind by recipe, for a ``studio.json`` written before it recorded ``kind``."""
REWARD_KINDS = {"reward": "sequence_rm", "segment_reward": "segment_rm"}
"""Checkpoint kind → :class:`trainers.tasks.RewardConfig` kind."""


class ScoreError(RuntimeError):
    """A scoring run that cannot go on; ``code`` is one of ``python -m trainers``'s failure codes."""

    def __init__(self, message: str, code: str = "bad_input"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ScoreRow:
    """One input row: ``prompt`` is text or chat messages, ``response`` the text to score."""

    id: int | str
    prompt: str | list[dict[str, str]]
    response: str


# ----------------------------------------------------------------------------- input


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value
        )
    )


def parse_row(raw: str, where: str) -> ScoreRow:
    """One JSONL line → :class:`ScoreRow`; :class:`ConfigError` naming ``where`` (file:line) and the field."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(where, None, f"not valid JSON ({exc.msg})") from exc
    if not isinstance(data, dict):
        raise ConfigError(where, None, f"expected a JSON object, got {type(data).__name__}")
    for name in ("id", "prompt", "response"):
        if name not in data:
            raise ConfigError(where, name, "missing")
    row_id = data["id"]
    if isinstance(row_id, bool) or not isinstance(row_id, int | str):
        raise ConfigError(where, "id", f"must be an integer or a string, got {type(row_id).__name__}")
    prompt = data["prompt"]
    if not isinstance(prompt, str) and not _is_messages(prompt):
        raise ConfigError(where, "prompt", "must be a string or a list of {role, content} messages")
    if not isinstance(data["response"], str):
        raise ConfigError(where, "response", f"must be a string, got {type(data['response']).__name__}")
    return ScoreRow(row_id, prompt, data["response"])


def read_rows(path: str | Path) -> list[ScoreRow]:
    """All rows of an input JSONL file, validated before any model is loaded."""
    path = Path(path)
    try:
        lines = jsonl_lines(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), None, f"cannot read the input: {exc}") from exc
    rows: list[ScoreRow] = []
    seen: dict[int | str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row = parse_row(line, f"{path}:{number}")
        if row.id in seen:
            raise ConfigError(f"{path}:{number}", "id", f"{row.id!r} repeats line {seen[row.id]}")
        seen[row.id] = number
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- checkpoint


def reward_kind(folder: str | Path, expected_sha256: str | None = None) -> str:
    """Verify the checkpoint (every file's sha256; the manifest digest when given) and return its kind.

    Raises :class:`ManifestError` for an incomplete or altered folder and :class:`ScoreError`
    (``bad_checkpoint``) for one that is not a reward model.
    """
    verify_manifest(folder, hashes=True)
    if expected_sha256 is not None and manifest_digest(folder) != expected_sha256:
        raise ManifestError(
            f"{folder}: the manifest is not the one recorded when the checkpoint was registered"
        )
    try:
        studio = read_studio_json(folder)
    except (OSError, ValueError) as exc:
        raise ScoreError(f"{folder}: unreadable studio.json: {exc}", "bad_checkpoint") from exc
    kind = studio.get("kind") or RECIPE_KINDS.get(str(studio.get("recipe")))
    if kind not in REWARD_KINDS:
        raise ScoreError(
            f"{folder}: a {kind or 'unknown'} checkpoint is not a reward model "
            "(kind must be reward or segment_reward)",
            "bad_checkpoint",
        )
    return str(kind)


def build_source(folder: str | Path, kind: str, *, batch_size: int, device: str) -> Any:
    """The :class:`trainers.rewards.RewardSource` an RL recipe builds for this checkpoint.

    The RL defaults apply (:class:`trainers.tasks.RewardConfig` ``normalise: null``): raw logits for a
    sequence RM, the fitted normaliser for a segment RM — raw segment rewards when it has none.
    """
    from transformers import AutoTokenizer

    from trainers.tasks import RewardConfig, build_reward

    normalise = None
    if kind == "segment_reward":
        info = read_studio_json(folder).get("segment_rm") or {}
        normalise = None if info.get("normaliser") else False
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        cfg = RewardConfig(
            kind=REWARD_KINDS[kind], path=str(folder), normalise=normalise, batch_size=batch_size
        )
        return build_reward(cfg, tokenizer, device=device)
    except (OSError, ValueError, KeyError) as exc:
        raise ScoreError(f"{folder}: the reward model could not be loaded: {exc}", "bad_checkpoint") from exc


def score_rows(source: Any, rows: Sequence[ScoreRow]) -> list[float]:
    """(N,) sequence scores: each response's sum of token rewards, as an RL return sees it."""
    if not rows:
        return []
    outs = source.score([r.prompt for r in rows], [r.response for r in rows])
    scores = [float(o.total) for o in outs]
    for row, value in zip(rows, scores, strict=True):
        if not math.isfinite(value):
            raise ScoreError(
                f"the reward model gave a non-finite score ({value}) to id {row.id!r}", "bad_checkpoint"
            )
    return scores


# ----------------------------------------------------------------------------- output


def write_scores(path: str | Path, rows: Sequence[ScoreRow], scores: Sequence[float]) -> Path:
    """Write ``{"id", "score"}`` lines atomically: readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for row, score in zip(rows, scores, strict=True):
                handle.write(json.dumps({"id": row.id, "score": score}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


# ----------------------------------------------------------------------------- main


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own exit would skip the error[code] line
        raise ScoreError(f"{self.prog}: {message}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="python -m trainers score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a reward_model or segment_reward_model folder")
    parser.add_argument("--input", required=True, help='JSONL rows {"id", "prompt", "response"}')
    parser.add_argument("--output", required=True, help='JSONL rows {"id", "score"}, written atomically')
    parser.add_argument("--batch-size", type=int, default=16, help="responses per forward pass")
    parser.add_argument("--cpu", action="store_true", help="score on the CPU even when a GPU is present")
    parser.add_argument("--manifest-sha256", help="refuse the checkpoint unless its manifest has this sha256")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise ScoreError(f"--batch-size must be at least 1, got {args.batch_size}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run a scoring job; exceptions carry a failure code that ``python -m trainers`` reports."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    start = time.perf_counter()
    rows = read_rows(args.input)
    kind = reward_kind(args.checkpoint, args.manifest_sha256)

    import torch

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    source = build_source(args.checkpoint, kind, batch_size=args.batch_size, device=device)
    scores = score_rows(source, rows)
    try:
        write_scores(args.output, rows, scores)
    except OSError as exc:
        code = "disk_full" if exc.errno in DISK_FULL_ERRNOS else "io"
        raise ScoreError(f"could not write {args.output}: {exc}", code) from exc
    summary = {"rows": len(rows), "kind": kind, "output": str(args.output), "device": device,
               "seconds": round(time.perf_counter() - start, 3)}  # fmt: skip
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
