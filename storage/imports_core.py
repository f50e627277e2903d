"""The shared half of the prompt importer: result types, JSON and text checks, row validation.

`storage.imports` re-exports the public names; this module exists so the per-format readers
(`imports.py` for JSONL/TXT/Arrow, `imports_csv.py` for CSV) share one row validator without a
circular import. Everything here is pure: no database, no torch, no gradio.

Design choices that matter to callers:
- Every problem is collected, never raised: the UI shows a (file, line, field, code, message) table
  and strict mode rejects the file if the list is non-empty (R-IMP-01).
- Text is kept exactly (no strip, no NFC): the checks only reject what storage cannot hold (lone
  surrogates, NUL for PostgreSQL) or what the limits forbid (R-IMP-02, R-IMP-03).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

ID_KEYS = ("id", "external_id", "prompt_id")
PROMPT_KEYS = ("prompt", "text", "messages")
KNOWN_KEYS = frozenset((*ID_KEYS, *PROMPT_KEYS, "tags"))
ROLES = ("system", "user", "assistant")
UTF8_BOM = b"\xef\xbb\xbf"
# Python refuses str->int conversion past 4,300 digits by default; we cap explicitly so the answer
# does not depend on the interpreter's `sys.set_int_max_str_digits` setting.
MAX_INT_DIGITS = 4300
_TRAILING_COMMA = re.compile(r",\s*[}\]]")

PROBLEM_CODES: dict[str, str] = {
    "unsupported_format": "not a .jsonl/.json (JSON Lines), .csv, .parquet, .txt file or a datasets folder",
    "unreadable": "the file could not be opened or is corrupt",
    "file_too_large": "the file is bigger than the size limit (checked before parsing)",
    "empty_file": "0 bytes, or no data rows",
    "too_many_records": "more rows than one import may hold",
    "utf16": "the file is UTF-16; save it as UTF-8",
    "invalid_utf8": "bytes that are not valid UTF-8",
    "bad_json": "a line that is not valid JSON",
    "not_object": "a JSON line that is an array or a scalar instead of an object",
    "non_finite_number": "NaN, Infinity or a number that overflows",
    "duplicate_key": "the same key twice in one JSON object",
    "too_deep": "JSON nested deeper than the limit",
    "csv_syntax": "unbalanced quotes or a row whose cell count differs from the header",
    "duplicate_header": "the same column name twice",
    "ambiguous_split": "a datasets folder with several splits and none named 'train'",
    "missing_field": "no prompt column/key",
    "conflicting_fields": "two keys for the same thing (e.g. both 'prompt' and 'text')",
    "unknown_field": "a column/key the importer does not know (a warning: it is ignored, rows still import)",
    "wrong_type": "a value of the wrong type",
    "bad_id": "an id that is not a clean string or integer",
    "bad_messages": "a chat prompt that is not a valid list of messages",
    "invalid_unicode": "a lone surrogate, which cannot be stored as UTF-8",
    "nul_character": "a NUL character, which PostgreSQL text cannot store",
    "too_long": "a text longer than the limit",
    "empty_text": "an empty or whitespace-only text",
    "duplicate_id": "the same id earlier in the file (the first one wins)",
    "ambiguous_id": "an id that differs only by letter case from an earlier one",
}

WARNING_CODES = frozenset({"unknown_field"})
"""Codes reported but not rejecting a strict import: the data is fine, something extra was ignored."""


@dataclass(frozen=True)
class ImportLimits:
    """Limits from R-IMP-02; tests pass small values to exercise them cheaply."""

    max_file_bytes: int = 50 * 2**20
    max_records: int = 200_000
    max_text_chars: int = 100_000
    max_json_depth: int = 20
    max_id_chars: int = 200


@dataclass(frozen=True)
class ImportProblem:
    """One row of the error report: where, which field, a stable code and a human message."""

    file: str
    line: int | None
    field: str | None
    code: str
    message: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PromptRecord:
    """A validated prompt, ready to store; `text` is the exact prompt or the chat rendering."""

    line: int
    external_id: str
    kind: Literal["text", "chat"]
    text: str
    messages: list[dict[str, str]] | None
    tags: list[str]


@dataclass
class ParseResult:
    """Everything one parse found; the caller decides (strict/lenient) what to commit."""

    file: str
    format: str
    records: list[PromptRecord]
    problems: list[ImportProblem]
    rows_seen: int

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def blocking(self) -> list[ImportProblem]:
        """Problems that reject a strict import (all but warnings such as an ignored column)."""
        return [p for p in self.problems if p.code not in WARNING_CODES]


def render_chat(messages: list[dict[str, str]]) -> str:
    """A readable one-turn-per-line rendering, stored as the prompt's text for search and display."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def content_id(content: str | list[dict[str, str]]) -> str:
    """An id from the prompt content, so identical id-less prompts collide as duplicates."""
    canonical = json.dumps(content, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def type_name(value: object) -> str:
    """JSON vocabulary for messages ('null', 'number'), since users think in their file's terms."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {str: "string", list: "list", dict: "object", bytes: "bytes"}.get(
        type(value), type(value).__name__
    )


def preview(value: object, limit: int = 40) -> str:
    """A short repr for messages, so a 100 KB value never lands in the report."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- text and JSON checks ---------------------------------------------------------------------


def text_problem(value: str, *, max_chars: int | None, allow_blank: bool = False) -> tuple[str, str] | None:
    """The first storage problem of a string as (code, message tail), or None when it can be stored."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            "invalid_unicode",
            f"contains a lone surrogate U+{ord(value[exc.start]):04X} at character {exc.start + 1} "
            "(a broken \\uXXXX escape?); it cannot be stored as UTF-8",
        )
    nul = value.find("\x00")
    if nul >= 0:
        return (
            "nul_character",
            f"contains a NUL character (U+0000) at character {nul + 1}; NUL cannot be stored (PostgreSQL text)",
        )
    if max_chars is not None and len(value) > max_chars:
        return "too_long", f"is {len(value):,} characters long; the limit is {max_chars:,}"
    if not allow_blank and not value.strip():
        return "empty_text", "is empty or only whitespace"
    return None


class JsonReject(Exception):
    """A JSON text we refuse, carrying the problem code (raised from the json hooks)."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.field = code, message, field


def _pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Python's json keeps the last duplicate silently; a silent data loss we report instead.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise JsonReject(
                    "duplicate_key",
                    f"key {preview(key)} appears twice in one object (JSON readers silently keep the last)",
                    key,
                )
            seen.add(key)
    return obj


def _reject_constant(name: str) -> float:
    raise JsonReject("non_finite_number", f"{name} is not valid JSON; numbers must be finite")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonReject("non_finite_number", f"the number {text[:24]} overflows to infinity")
    return value


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise JsonReject(
            "bad_json", f"an integer with {digits:,} digits is too large (at most {MAX_INT_DIGITS:,} digits)"
        )
    return int(text)


def _depth(value: object) -> int:
    """Nesting depth without recursion (the top-level object counts as 1)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in item if isinstance(child, dict | list))
    return deepest


def load_json(text: str, max_depth: int) -> Any:
    """json.loads that refuses NaN/Infinity, duplicate keys, huge integers and deep nesting.

    Raises JsonReject with the problem code; never RecursionError or a bare ValueError.
    """
    try:
        value = json.loads(
            text,
            object_pairs_hook=_pairs_hook,
            parse_constant=_reject_constant,
            parse_float=_parse_float,
            parse_int=_parse_int,
        )
    except RecursionError:
        raise JsonReject("too_deep", f"JSON is nested deeper than {max_depth} levels") from None
    except json.JSONDecodeError as exc:
        hint = ""
        if _TRAILING_COMMA.search(text):
            hint = " (a trailing comma before a closing bracket?)"
        elif text.strip() in ("{", "[") or exc.msg.startswith("Extra data"):
            hint = " (JSON Lines needs exactly one complete object per line; pretty-printed JSON is not accepted)"
        raise JsonReject("bad_json", f"invalid JSON: {exc.msg} at column {exc.colno}{hint}") from None
    except ValueError as exc:  # int conversion limits and similar from the decoder itself
        raise JsonReject("bad_json", f"invalid JSON: {exc}") from None
    # Counting brackets over-approximates depth (brackets inside strings), so walk only when needed.
    if text.count("[") + text.count("{") > max_depth and _depth(value) > max_depth:
        raise JsonReject("too_deep", f"JSON is nested deeper than {max_depth} levels")
    return value


# --- reading text files ---------------------------------------------------------------------------

_SAVE_AS_UTF8 = "save it as UTF-8 (Excel: 'CSV UTF-8'; most editors: Save as, Encoding UTF-8)"
Report = Callable[[int | None, str | None, str, str], None]


def path_size(path: Path) -> int:
    """Bytes in a file, or in all files under a folder (a datasets folder)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def encoding_problem(path: Path) -> str | None:
    """A message when the file is clearly UTF-16/32 (a BOM, or NUL bytes everywhere), else None."""
    with path.open("rb") as fh:
        head = fh.read(4096)
    if head.startswith((b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")):
        return "the file is UTF-16 (it starts with a UTF-16 byte order mark); " + _SAVE_AS_UTF8
    if len(head) >= 2 and head.count(0) * 4 >= len(head):
        return "the file looks like UTF-16 (many NUL bytes); " + _SAVE_AS_UTF8
    return None


def iter_lines(path: Path, report: Report) -> Iterator[tuple[int, str, bool]]:
    """Physical lines as (number, text with its line ending, decoded_ok), streamed from disk.

    Splitting on b"\\n" only (not str.splitlines) keeps U+2028, form feeds and lone CRs inside
    the text. A BOM on line 1 is dropped. An undecodable line is reported once and yielded with
    replacement characters (ok=False) so a CSV reader can keep its place; callers drop it.
    """
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if number == 1 and raw.startswith(UTF8_BOM):
                raw = raw[len(UTF8_BOM) :]
            try:
                yield number, raw.decode("utf-8"), True
            except UnicodeDecodeError as exc:
                report(
                    number,
                    None,
                    "invalid_utf8",
                    f"byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line is not valid UTF-8 "
                    f"({exc.reason}); save the file as UTF-8",
                )
                yield number, raw.decode("utf-8", errors="replace"), False


# --- row validation -------------------------------------------------------------------------------

Source = Literal["json", "csv", "arrow", "txt"]


class RowValidator:
    """Validates rows (already decoded into dicts) and tracks ids across one file.

    One instance per file: it remembers ids for `duplicate_id` / `ambiguous_id` and unknown keys so
    each is reported once. `add` appends a PromptRecord or problems to `result`.
    """

    def __init__(self, result: ParseResult, limits: ImportLimits) -> None:
        self.result = result
        self.limits = limits
        self._ids: dict[str, int] = {}
        self._folded: dict[str, tuple[str, int]] = {}
        self._unknown: set[str] = set()

    def report(self, line: int | None, field: str | None, code: str, message: str) -> None:
        self.result.problems.append(ImportProblem(self.result.file, line, field, code, message))

    def unknown_field(self, key: str, line: int | None, *, column: int | None = None) -> None:
        """Report an unknown key once per file; rows keep being imported without it."""
        if key in self._unknown:
            return
        self._unknown.add(key)
        if key == "":
            where = f"column {column}" if column else "a column"
            msg = f"{where} has an empty name (a CSV written with its index? use index=False); it is ignored"
        else:
            msg = f"unknown field {preview(key)} is ignored; known fields: {', '.join(sorted(KNOWN_KEYS))}"
        self.report(line, key[:100], "unknown_field", msg)

    def add(self, row: Mapping[str, Any], line: int, *, source: Source) -> PromptRecord | None:
        """Validate one row; every problem of the row is reported, and the row kept only if none."""
        for key in row:
            if key not in KNOWN_KEYS:
                self.unknown_field(key, line)
        row_problems_start = len(self.result.problems)

        id_keys = [k for k in ID_KEYS if k in row]
        prompt_keys = [k for k in PROMPT_KEYS if k in row]
        external_id: str | None = None
        if len(id_keys) > 1:
            self.report(
                line, id_keys[1], "conflicting_fields", f"use one id field, not {' and '.join(id_keys)}"
            )
        elif id_keys:
            external_id = self._check_id(row[id_keys[0]], line, id_keys[0])
        content: str | list[dict[str, str]] | None = None
        if not prompt_keys:
            self.report(
                line, "prompt", "missing_field", "no prompt: give one of 'prompt', 'text' or 'messages'"
            )
        elif len(prompt_keys) > 1:
            self.report(
                line,
                prompt_keys[1],
                "conflicting_fields",
                f"give only one of {' / '.join(prompt_keys)}; both are prompt fields",
            )
        else:
            content = self._check_prompt(prompt_keys[0], row[prompt_keys[0]], line, source)
        tags = self._check_tags(row["tags"], line, source) if "tags" in row else []

        if external_id is None and not id_keys and content is not None:
            external_id = content_id(content)
        if external_id is not None:
            self._check_duplicate(external_id, line, id_keys[0] if id_keys else None)
        if len(self.result.problems) > row_problems_start or content is None or tags is None:
            return None
        assert external_id is not None
        if isinstance(content, str):
            record = PromptRecord(line, external_id, "text", content, None, tags)
        else:
            record = PromptRecord(line, external_id, "chat", render_chat(content), content, tags)
        self.result.records.append(record)
        return record

    # The checks below report their own problems and return None on failure.

    def _check_id(self, value: object, line: int, key: str) -> str | None:
        if isinstance(value, bool) or not isinstance(value, str | int):
            hint = " (write 1, not 1.0, or quote it as a string)" if isinstance(value, float) else ""
            self.report(
                line,
                key,
                "bad_id",
                f"{key!r} must be a string or an integer, got {type_name(value)} {preview(value)}{hint}",
            )
            return None
        text = str(value)
        problem = text_problem(text, max_chars=None, allow_blank=True)
        if problem:
            self.report(line, key, problem[0], f"{key!r} {problem[1]}")
            return None
        reason = None
        if not text:
            reason = "is empty (to get ids from the content, leave out the id field or column entirely)"
        elif len(text) > self.limits.max_id_chars:
            reason = f"is {len(text):,} characters long; the limit is {self.limits.max_id_chars:,}"
        elif text != text.strip():
            reason = f"{preview(text)} has leading or trailing whitespace"
        if reason:
            self.report(line, key, "bad_id", f"{key!r} {reason}")
            return None
        return text

    def _check_duplicate(self, external_id: str, line: int, key: str | None) -> None:
        field = key or "prompt"
        first = self._ids.get(external_id)
        if first is not None:
            what = (
                f"id {preview(external_id)} is already used on line {first}"
                if key
                else (
                    f"the same prompt (no id, so id {external_id} from its content) is already on line {first}"
                )
            )
            self.report(line, field, "duplicate_id", f"{what}; the first one is kept")
            return
        folded = external_id.casefold()
        earlier = self._folded.get(folded)
        if earlier is not None:
            self.report(
                line,
                field,
                "ambiguous_id",
                f"id {preview(external_id)} differs only by letter case from {preview(earlier[0])} on line {earlier[1]}",
            )
            return
        self._ids[external_id] = line
        self._folded[folded] = (external_id, line)

    def _check_prompt(
        self, key: str, value: object, line: int, source: Source
    ) -> str | list[dict[str, str]] | None:
        if key == "messages" and source == "csv" and isinstance(value, str):
            # CSV cells are strings: a 'messages' column holds the JSON list of messages.
            try:
                value = load_json(value, self.limits.max_json_depth)
            except JsonReject as exc:
                code = exc.code if exc.code == "too_deep" else "bad_messages"
                self.report(
                    line, key, code, f"the 'messages' cell must be a JSON list of messages: {exc.message}"
                )
                return None
        if isinstance(value, str) and key != "messages":
            problem = text_problem(value, max_chars=self.limits.max_text_chars)
            if problem:
                self.report(line, key, problem[0], f"{key!r} {problem[1]}")
                return None
            return value
        # A list counts as chat if any item is an object; a list of plain strings is a wrong type.
        if (
            isinstance(value, list)
            and key != "text"
            and (key == "messages" or not value or any(isinstance(m, dict) for m in value))
        ):
            return self._check_messages(value, line, key)
        expected = (
            "a list of messages"
            if key == "messages"
            else ("a string" if key == "text" else "a string or a list of chat messages")
        )
        got = type_name(value)
        if isinstance(value, list):
            got = f"a list of {', '.join(sorted({type_name(v) for v in value}))} values"
        self.report(line, key, "wrong_type", f"{key!r} must be {expected}, got {got} {preview(value)}")
        return None

    def _check_messages(self, value: list[Any], line: int, key: str) -> list[dict[str, str]] | None:
        if not value:
            self.report(
                line, key, "bad_messages", f"{key!r} is an empty list; a chat prompt needs a user message"
            )
            return None
        start = len(self.result.problems)
        messages: list[dict[str, str]] = []
        for index, message in enumerate(value):
            field = f"{key}[{index}]"
            if not isinstance(message, dict):
                self.report(
                    line,
                    field,
                    "bad_messages",
                    f"{field} is a {type_name(message)}; a message is an object with role and content",
                )
                continue
            missing = [k for k in ("role", "content") if k not in message]
            extra = sorted(set(message) - {"role", "content"})
            if missing or extra:
                parts = [f"missing {', '.join(map(repr, missing))}"] if missing else []
                parts += [f"unexpected {', '.join(map(preview, extra))}"] if extra else []
                self.report(
                    line,
                    field,
                    "bad_messages",
                    f"{field} must have exactly 'role' and 'content': {'; '.join(parts)}",
                )
                continue
            role, content = message["role"], message["content"]
            if not isinstance(role, str) or role not in ROLES:
                self.report(
                    line,
                    f"{field}.role",
                    "bad_messages",
                    f"{field}.role is {preview(role)}; it must be one of {', '.join(ROLES)}",
                )
            if not isinstance(content, str):
                self.report(
                    line,
                    f"{field}.content",
                    "bad_messages",
                    f"{field}.content must be a string, got {type_name(content)} (multimodal content is not supported)",
                )
                continue
            problem = text_problem(content, max_chars=self.limits.max_text_chars)
            if problem:
                self.report(line, f"{field}.content", problem[0], f"{field}.content {problem[1]}")
                continue
            messages.append({"role": role, "content": content})
        if len(self.result.problems) > start:
            return None
        if messages[-1]["role"] != "user":
            self.report(
                line,
                f"{key}[{len(messages) - 1}].role",
                "bad_messages",
                f"the last message is from {messages[-1]['role']!r}; a prompt must end with the user's turn",
            )
            return None
        rendered = len(render_chat(messages))
        if rendered > self.limits.max_text_chars:
            self.report(
                line,
                key,
                "too_long",
                f"the conversation is {rendered:,} characters long; the limit is {self.limits.max_text_chars:,}",
            )
            return None
        return messages

    def _check_tags(self, value: object, line: int, source: Source) -> list[str] | None:
        if source == "csv" and isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            self.report(
                line,
                "tags",
                "wrong_type",
                f"'tags' must be a list of strings, got {type_name(value)} {preview(value)}",
            )
            return None
        tags: list[str] = []
        ok = True
        for index, tag in enumerate(value):
            field = f"tags[{index}]"
            if not isinstance(tag, str):
                self.report(
                    line,
                    field,
                    "wrong_type",
                    f"{field} must be a string, got {type_name(tag)} {preview(tag)}",
                )
                ok = False
                continue
            problem = text_problem(tag, max_chars=self.limits.max_id_chars)
            if problem:
                self.report(line, field, problem[0], f"{field} {problem[1]}")
                ok = False
            elif tag not in tags:  # tags are a set; keep the first spelling and order
                tags.append(tag)
        return tags if ok else None
