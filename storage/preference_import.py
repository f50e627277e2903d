"""Import public preference data in TRL's formats: parse and validate (pure, no database).

Accepted files: JSON Lines, Parquet, or a folder written by `datasets.save_to_disk` (the service
also unpacks a .zip of one). Row shapes, decided per row by its keys (TRL dataset_formats.md):

| shape | keys | prompt |
|---|---|---|
| explicit preference | prompt, chosen, rejected | a string, or a list of messages ending with the user |
| implicit preference | chosen, rejected (conversations) | the shared message prefix of chosen and rejected |
| unpaired preference | prompt, completion, label (bool) | as explicit |

Standard rows use plain strings everywhere; conversational rows use lists of {"role", "content"}
messages and a completion of exactly one assistant message. An optional `strength` column
(slight | clear | much, e.g. from our own export) is kept on the vote. Other known columns (our
provenance columns, `margin`, ratings) are ignored silently; unknown ones give one warning.

Every problem is reported as (file, line, field, code, message) with line = JSONL line number or
1-based row number; nothing is written when any blocking problem is found (the service checks).

`storage.preference_store.write_preferences` stores the records (prompts matched by content,
generations under an "imported:<file>" checkpoint, comparisons and votes by the system user
"imported"); see its docstring.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from storage.exports import STRENGTH_ORDER
from storage.imports import detect_format
from storage.imports_core import (
    ROLES,
    WARNING_CODES,
    ImportLimits,
    ImportProblem,
    JsonReject,
    encoding_problem,
    iter_lines,
    load_json,
    path_size,
    preview,
    render_chat,
    text_problem,
    type_name,
)

Messages = list[dict[str, str]]
Content = str | Messages

IGNORED_KEYS = frozenset(
    {
        # our own export's provenance columns
        "prompt_id", "pair_id", "snapshot_id", "rater_ids", "n_votes", "agreement", "outcome",
        "shown_order", "guideline_version", "chosen_model", "rejected_model", "chosen_generation_id",
        "rejected_generation_id", "model", "generation_id", "margin",
        # common in public preference sets
        "id", "score_chosen", "score_rejected", "chosen_rating", "rejected_rating", "source",
    }
)  # fmt: skip
KNOWN_KEYS = frozenset({"prompt", "chosen", "rejected", "completion", "label", "strength"}) | IGNORED_KEYS
PREFERENCE_PROBLEM_CODES = {
    "missing_field": "a required column is missing (chosen/rejected, or completion/label, or prompt)",
    "wrong_type": "a value of the wrong type",
    "mixed_format": "a conversational prompt with a plain-string completion, or the reverse",
    "bad_messages": "a message list that is not valid (roles, content, shape)",
    "no_shared_prompt": "an implicit-prompt row whose chosen and rejected share no user turn",
    "implicit_standard": "chosen/rejected as plain strings without a prompt column",
    "identical_pair": "chosen and rejected are the same text",
    "duplicate_pair": "the same pair (in either order) earlier in the file",
    "duplicate_row": "the same prompt and completion earlier in the file (unpaired)",
    "bad_strength": "a strength that is not slight, clear or much",
    "already_imported": "this exact file was already imported into the project",
}

Shape = Literal["explicit", "implicit", "unpaired"]
DEFAULT_LIMITS = ImportLimits()  # frozen, so one shared default is safe


@dataclass(frozen=True)
class PreferenceRecord:
    """One valid row; `chosen`/`rejected` for pairs, `completion`/`label` for unpaired rows."""

    line: int
    shape: Shape
    prompt: Content
    chosen: str | None = None
    rejected: str | None = None
    completion: str | None = None
    label: bool | None = None
    strength: str | None = None


@dataclass
class PreferenceParseResult:
    file: str
    format: str
    records: list[PreferenceRecord] = field(default_factory=list)
    problems: list[ImportProblem] = field(default_factory=list)
    rows_seen: int = 0

    @property
    def blocking(self) -> list[ImportProblem]:
        return [p for p in self.problems if p.code not in WARNING_CODES]

    def shapes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records:
            out[r.shape] = out.get(r.shape, 0) + 1
        return out


def prompt_key(content: Content) -> tuple[str, str]:
    """A key matching prompts by exact content: ("text", text) or ("chat", canonical JSON)."""
    if isinstance(content, str):
        return "text", content
    return "chat", json.dumps(content, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


# --------------------------------------------------------------------------- row validation


class _Reject(Exception):
    pass


class PreferenceValidator:
    """Validates rows of one file; remembers pairs for duplicate checks and warns once per unknown key."""

    def __init__(self, result: PreferenceParseResult, limits: ImportLimits):
        self.result, self.limits = result, limits
        self._unknown: set[str] = set()
        self._pairs: dict[tuple, int] = {}
        self._singles: dict[tuple, int] = {}
        self._line = 0
        self._bad = False

    def report(self, line: int | None, fld: str | None, code: str, message: str) -> None:
        self.result.problems.append(ImportProblem(self.result.file, line, fld, code, message))
        if code not in WARNING_CODES:
            self._bad = True

    def unknown_columns(self, keys: Iterable[str], line: int | None) -> None:
        for key in keys:
            if key not in KNOWN_KEYS and key not in self._unknown:
                self._unknown.add(key)
                self.report(
                    line, str(key)[:100], "unknown_field", f"unknown column {preview(key)} is ignored"
                )

    def add(self, row: Mapping[str, Any], line: int) -> None:
        self._line, self._bad = line, False
        self.unknown_columns(row, line)
        try:
            record = self._record(row)
        except _Reject:
            return
        if record is not None and not self._bad:
            self.result.records.append(record)

    def _fail(self, fld: str | None, code: str, message: str):
        self.report(self._line, fld, code, message)
        raise _Reject

    def _record(self, row: Mapping[str, Any]) -> PreferenceRecord | None:
        strength = self._strength(row.get("strength"))
        if "chosen" in row or "rejected" in row:
            for key in ("chosen", "rejected"):
                if key not in row:
                    self._fail(
                        key,
                        "missing_field",
                        f"a preference row needs both 'chosen' and 'rejected'; {key!r} is missing",
                    )
            if "prompt" in row:
                prompt = self._prompt(row["prompt"])
                chosen = self._completion("chosen", row["chosen"], prompt)
                rejected = self._completion("rejected", row["rejected"], prompt)
                shape: Shape = "explicit"
            else:
                prompt, chosen, rejected = self._split_implicit(row["chosen"], row["rejected"])
                shape = "implicit"
            if self._bad:
                return None
            if chosen == rejected:
                self._fail(
                    "rejected",
                    "identical_pair",
                    "chosen and rejected are the same text; a preference needs two different responses",
                )
            key = (prompt_key(prompt), chosen, rejected)
            first = self._pairs.get(key) or self._pairs.get((key[0], rejected, chosen))
            if first is not None:
                self._fail(
                    "chosen",
                    "duplicate_pair",
                    f"the same prompt and pair of responses is already on line {first}",
                )
            self._pairs[key] = self._line
            return PreferenceRecord(
                self._line, shape, prompt, chosen=chosen, rejected=rejected, strength=strength
            )
        if "completion" in row or "label" in row:
            for key in ("prompt", "completion", "label"):
                if key not in row:
                    self._fail(
                        key,
                        "missing_field",
                        f"an unpaired row needs 'prompt', 'completion' and 'label'; {key!r} is missing",
                    )
            prompt = self._prompt(row["prompt"])
            completion = self._completion("completion", row["completion"], prompt)
            label = row["label"]
            if not isinstance(label, bool):
                self._fail(
                    "label",
                    "wrong_type",
                    f"'label' must be true or false, got {type_name(label)} {preview(label)}",
                )
            if self._bad:
                return None
            key = (prompt_key(prompt), completion)
            if key in self._singles:
                self._fail(
                    "completion",
                    "duplicate_row",
                    f"the same prompt and completion is already on line {self._singles[key]}",
                )
            self._singles[key] = self._line
            return PreferenceRecord(self._line, "unpaired", prompt, completion=completion, label=label)
        self._fail(
            "chosen",
            "missing_field",
            "no preference columns: give 'chosen' and 'rejected' (with or without 'prompt'), or 'prompt', 'completion' and 'label'",
        )
        return None

    def _strength(self, value: Any) -> str | None:
        if value is None:
            return None
        if value not in STRENGTH_ORDER:
            self.report(
                self._line,
                "strength",
                "bad_strength",
                f"'strength' must be one of {', '.join(STRENGTH_ORDER)}, got {preview(value)}",
            )
            return None
        return value

    def _text(self, fld: str, value: Any) -> str:
        if not isinstance(value, str):
            self._fail(
                fld, "wrong_type", f"{fld!r} must be a string, got {type_name(value)} {preview(value)}"
            )
        problem = text_problem(value, max_chars=self.limits.max_text_chars)
        if problem:
            self._fail(fld, problem[0], f"{fld!r} {problem[1]}")
        return value

    def _messages(self, fld: str, value: Any) -> Messages:
        if not isinstance(value, list) or not value:
            self._fail(
                fld,
                "bad_messages",
                f"{fld!r} must be a non-empty list of messages, got {type_name(value)} {preview(value)}",
            )
        out: Messages = []
        for i, m in enumerate(value):
            at = f"{fld}[{i}]"
            if not isinstance(m, dict) or set(m) != {"role", "content"}:
                got = sorted(m) if isinstance(m, dict) else type_name(m)
                self._fail(
                    at,
                    "bad_messages",
                    f"{at} must be an object with exactly 'role' and 'content', got {preview(got)}",
                )
            if m["role"] not in ROLES:
                self._fail(
                    f"{at}.role",
                    "bad_messages",
                    f"{at}.role is {preview(m['role'])}; it must be one of {', '.join(ROLES)}",
                )
            out.append({"role": m["role"], "content": self._text(f"{at}.content", m["content"])})
        return out

    def _prompt(self, value: Any) -> Content:
        if isinstance(value, str):
            return self._text("prompt", value)
        if isinstance(value, list):
            messages = self._messages("prompt", value)
            if messages[-1]["role"] != "user":
                self._fail(
                    f"prompt[{len(messages) - 1}].role",
                    "bad_messages",
                    "a prompt must end with the user's turn",
                )
            if len(render_chat(messages)) > self.limits.max_text_chars:
                self._fail(
                    "prompt",
                    "too_long",
                    f"the conversation is longer than {self.limits.max_text_chars:,} characters",
                )
            return messages
        self._fail(
            "prompt",
            "wrong_type",
            f"'prompt' must be a string or a list of messages, got {type_name(value)} {preview(value)}",
        )
        raise AssertionError  # unreachable

    def _assistant(self, fld: str, messages: Messages) -> str:
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            roles = [m["role"] for m in messages]
            self._fail(
                fld, "bad_messages", f"{fld!r} must be exactly one assistant message, got roles {roles}"
            )
        return messages[0]["content"]

    def _completion(self, fld: str, value: Any, prompt: Content) -> str:
        if isinstance(prompt, str):
            if isinstance(value, list):
                self._fail(
                    fld, "mixed_format", f"the prompt is a plain string but {fld!r} is a list of messages"
                )
            return self._text(fld, value)
        if isinstance(value, str):
            self._fail(fld, "mixed_format", f"the prompt is a conversation but {fld!r} is a plain string")
        return self._assistant(fld, self._messages(fld, value))

    def _split_implicit(self, chosen: Any, rejected: Any) -> tuple[Messages, str, str]:
        if isinstance(chosen, str) or isinstance(rejected, str):
            self._fail(
                "chosen",
                "implicit_standard",
                "chosen/rejected are plain strings and there is no 'prompt' column: the prompt cannot be split off "
                "reliably; add a 'prompt' column (explicit prompt) or use conversations",
            )
        c, r = self._messages("chosen", chosen), self._messages("rejected", rejected)
        n = 0
        while n < min(len(c), len(r)) and c[n] == r[n]:
            n += 1
        if n == 0 or c[n - 1]["role"] != "user":
            self._fail(
                "chosen",
                "no_shared_prompt",
                "chosen and rejected must start with the same conversation, ending with a user turn",
            )
        return c[:n], self._assistant("chosen", c[n:]), self._assistant("rejected", r[n:])


# --------------------------------------------------------------------------- parsing files


def parse_preference_file(
    path: str | Path, *, limits: ImportLimits = DEFAULT_LIMITS, display_name: str | None = None
) -> PreferenceParseResult:
    """Read JSONL / Parquet / datasets folder into validated records and a complete problem list."""
    path = Path(path)
    name = display_name or path.name
    result = PreferenceParseResult(file=name, format="unknown")

    def fail(code: str, message: str) -> PreferenceParseResult:
        result.records.clear()
        result.problems.append(ImportProblem(name, None, None, code, message))
        return result

    if not path.exists():
        return fail("unreadable", "the file does not exist (was the upload lost?)")
    try:
        result.format = detect_format(path)
    except ValueError as exc:
        return fail("unsupported_format", str(exc))
    if result.format not in ("jsonl", "parquet", "hf"):
        return fail(
            "unsupported_format",
            f"preference data must be JSON Lines, Parquet or a datasets folder, not {result.format}",
        )
    size = path_size(path)
    if size > limits.max_file_bytes:
        return fail(
            "file_too_large",
            f"the file is {size / 2**20:,.1f} MB; the limit is {limits.max_file_bytes / 2**20:,.1f} MB",
        )
    if size == 0:
        return fail("empty_file", "the file is empty (0 bytes)")
    validator = PreferenceValidator(result, limits)
    try:
        if result.format == "jsonl":
            message = encoding_problem(path)
            if message:
                return fail("utf16", message)
            _parse_jsonl(path, result, validator, limits)
        else:
            _parse_columnar(path, result, validator, limits)
    except OSError as exc:
        return fail("unreadable", f"the file could not be read: {exc.strerror or exc}")
    if result.rows_seen > limits.max_records:
        return fail("too_many_records", f"the file has more than {limits.max_records:,} rows; split it")
    if result.rows_seen == 0 and not result.problems:
        return fail("empty_file", "the file has no rows; nothing to import")
    return result


def _parse_jsonl(
    path: Path, result: PreferenceParseResult, validator: PreferenceValidator, limits: ImportLimits
) -> None:
    for number, text, ok in iter_lines(path, validator.report):
        if ok and not text.strip():
            continue
        result.rows_seen += 1
        if result.rows_seen > limits.max_records:
            return
        if not ok:
            continue
        try:
            value = load_json(text, limits.max_json_depth)
        except JsonReject as exc:
            validator.report(number, exc.field, exc.code, exc.message)
            continue
        if not isinstance(value, dict):
            validator.report(
                number,
                None,
                "not_object",
                f"the line is a {type_name(value)}; each line must be one JSON object",
            )
            continue
        validator.add(value, number)


def _parse_columnar(
    path: Path, result: PreferenceParseResult, validator: PreferenceValidator, limits: ImportLimits
) -> None:
    """Parquet or datasets folder: rows numbered from 1; null cells count as absent."""
    import pyarrow as pa

    try:
        if result.format == "parquet":
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(path)
            columns, num_rows = parquet.schema_arrow.names, parquet.metadata.num_rows
            batches: Iterable[Any] = parquet.iter_batches(batch_size=1024)
        else:
            import datasets

            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if "train" not in loaded and len(loaded) != 1:
                    validator.report(
                        None,
                        None,
                        "ambiguous_split",
                        f"the dataset has splits {', '.join(loaded)} and none is 'train'",
                    )
                    return
                loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
            columns, num_rows = loaded.column_names, loaded.num_rows
            batches = loaded.with_format("arrow").iter(batch_size=1024)
        validator.unknown_columns(columns, None)
        result.rows_seen = num_rows
        if num_rows > limits.max_records:
            return
        number = 0
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                validator.add({k: v for k, v in row.items() if v is not None}, number)
    except (pa.ArrowException, UnicodeDecodeError, ValueError, FileNotFoundError) as exc:
        result.records.clear()
        validator.report(None, None, "unreadable", f"the data could not be read: {exc}")
