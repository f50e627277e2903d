"""Span offsets and span validation (pure: no database, no gradio).

A span is a half-open range [start, end) of Unicode **code points** of a response text, as
stored in `SpanAnnotation`. Browsers count in UTF-16 code units (JavaScript string indices), so
the REST API and the span picker may send UTF-16 offsets; `utf16_to_codepoint` converts them
and refuses an offset that falls between the two halves of a surrogate pair.

`validate_spans` is the one gate every stored span passes: integer offsets inside the text,
non-empty, on grapheme-cluster boundaries (a span never splits "é" written as e + U+0301, an
emoji with its skin tone, or a ZWJ family), polarity good|bad, a label from the project's set
(or none), a comment of at most 2,000 characters, no two spans overlapping. It returns the
spans normalised (plain dicts with exactly the five keys) and sorted by start. Every error
names the span's index in the list as given and the field at fault.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any, Literal, TypedDict

import regex

from studio.services.errors import ServiceError

MAX_COMMENT_CHARS = 2000
MAX_SPANS = 1000
POLARITIES = ("good", "bad")
SPAN_FIELDS = ("start", "end", "polarity", "label", "comment")
_GRAPHEME = regex.compile(r"\X", regex.DOTALL)


class SpanDict(TypedDict):
    start: int
    end: int
    polarity: Literal["good", "bad"]
    label: str | None
    comment: str | None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def utf16_length(text: str) -> int:
    """Length of `text` in UTF-16 code units (what JavaScript's `.length` reports)."""
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


def utf16_to_codepoint(text: str, offset: int) -> int:
    """Code-point index of the UTF-16 offset `offset` in `text` (0 ≤ offset ≤ utf16_length).

    Raises ServiceError for a non-integer, an offset outside the text, or one inside a surrogate
    pair (the second half of an astral character such as an emoji).
    """
    if not _is_int(offset):
        raise ServiceError(f"UTF-16 offset must be an integer, got {offset!r}")
    if offset < 0:
        raise ServiceError(f"UTF-16 offset {offset} is negative")
    units = 0
    for index, ch in enumerate(text):
        if units == offset:
            return index
        units += 2 if ord(ch) > 0xFFFF else 1
        if units > offset:
            raise ServiceError(
                f"UTF-16 offset {offset} falls inside a surrogate pair (character {index}, {ch!r})"
            )
    if units == offset:
        return len(text)
    raise ServiceError(f"UTF-16 offset {offset} is past the end of the text ({units} UTF-16 units)")


def codepoint_to_utf16(text: str, offset: int) -> int:
    """UTF-16 offset of the code-point index `offset` in `text` (0 ≤ offset ≤ len(text))."""
    if not _is_int(offset):
        raise ServiceError(f"code-point offset must be an integer, got {offset!r}")
    if not 0 <= offset <= len(text):
        raise ServiceError(f"code-point offset {offset} is outside the text (0..{len(text)})")
    return offset + sum(1 for ch in text[:offset] if ord(ch) > 0xFFFF)


def grapheme_boundaries(text: str) -> set[int]:
    """Code-point indices where an extended grapheme cluster starts, plus len(text)."""
    return {m.start() for m in _GRAPHEME.finditer(text)} | {len(text)}


def spans_from_utf16(text: str, spans: Sequence[Any]) -> list[dict[str, Any]]:
    """Copies of `spans` with start/end converted from UTF-16 units to code points.

    Errors name the span index and field; other fields are left for `validate_spans`.
    """
    out = []
    for i, span in enumerate(_span_list(spans)):
        if not isinstance(span, dict):
            raise ServiceError(f"span {i}: must be an object with start, end and polarity")
        converted = dict(span)
        for field in ("start", "end"):
            if field not in span:
                raise ServiceError(f"span {i}: {field} is missing")
            try:
                converted[field] = utf16_to_codepoint(text, span[field])
            except ServiceError as exc:
                raise ServiceError(f"span {i}: {field}: {exc}") from None
        out.append(converted)
    return out


def spans_to_utf16(text: str, spans: Iterable[SpanDict]) -> list[SpanDict]:
    """Copies of code-point spans with start/end in UTF-16 units (for a browser)."""
    return [
        {
            **span,
            "start": codepoint_to_utf16(text, span["start"]),
            "end": codepoint_to_utf16(text, span["end"]),
        }
        for span in spans
    ]


def _span_list(spans: Any) -> list[Any]:
    if not isinstance(spans, list | tuple):
        raise ServiceError(f"spans must be a list, got {type(spans).__name__}")
    if len(spans) > MAX_SPANS:
        raise ServiceError(f"{len(spans)} spans given; at most {MAX_SPANS} per response")
    return list(spans)


def _one_span(i: int, span: Any, n: int, boundaries: set[int], labels: set[str]) -> SpanDict:
    if not isinstance(span, dict):
        raise ServiceError(f"span {i}: must be an object with start, end and polarity")
    unknown = sorted(str(k) for k in span if k not in SPAN_FIELDS)
    if unknown:
        raise ServiceError(f"span {i}: unknown field {unknown[0]!r}")
    for field in ("start", "end", "polarity"):
        if field not in span:
            raise ServiceError(f"span {i}: {field} is missing")
    start, end = span["start"], span["end"]
    for field, value in (("start", start), ("end", end)):
        if not _is_int(value):
            raise ServiceError(f"span {i}: {field} must be an integer, got {value!r}")
        if value < 0:
            raise ServiceError(f"span {i}: {field} {value} is negative")
        if value > n:
            raise ServiceError(f"span {i}: {field} {value} is past the end of the text ({n} characters)")
    if start > end:
        raise ServiceError(f"span {i}: start {start} is after end {end}")
    if start == end:
        raise ServiceError(f"span {i}: end: the span is empty (start = end = {start})")
    for field, value in (("start", start), ("end", end)):
        if value not in boundaries:
            raise ServiceError(f"span {i}: {field} {value} splits a character (inside a grapheme cluster)")
    polarity = span["polarity"]
    if polarity not in POLARITIES:
        raise ServiceError(f"span {i}: polarity must be 'good' or 'bad', got {polarity!r}")
    label = span.get("label")
    if label == "":
        label = None
    if label is not None and (not isinstance(label, str) or label not in labels):
        allowed = ", ".join(sorted(labels)) or "none defined"
        raise ServiceError(f"span {i}: label {label!r} is not one of the project's labels ({allowed})")
    comment = span.get("comment")
    if comment == "":
        comment = None
    if comment is not None:
        if not isinstance(comment, str):
            raise ServiceError(f"span {i}: comment must be text, got {type(comment).__name__}")
        if len(comment) > MAX_COMMENT_CHARS:
            raise ServiceError(
                f"span {i}: comment is {len(comment)} characters long; the limit is {MAX_COMMENT_CHARS}"
            )
        if "\x00" in comment:  # PostgreSQL text cannot store NUL; refused on every backend alike
            raise ServiceError(f"span {i}: comment may not contain NUL characters")
    return {"start": start, "end": end, "polarity": polarity, "label": label, "comment": comment}


def validate_spans(text: str, spans: Sequence[Any], labels: Iterable[str] | None) -> list[SpanDict]:
    """Check code-point spans against `text` and the project's `labels`; return them normalised.

    spans: list of {"start", "end", "polarity", "label"?, "comment"?}; returns the same spans as
    SpanDicts sorted by start. Raises ServiceError naming the span index (as given) and field.
    """
    items = _span_list(spans)
    boundaries = grapheme_boundaries(text)
    allowed = set(labels or [])
    checked = [(i, _one_span(i, span, len(text), boundaries, allowed)) for i, span in enumerate(items)]
    checked.sort(key=lambda pair: (pair[1]["start"], pair[1]["end"]))
    for (i_prev, prev), (i, span) in itertools.pairwise(checked):
        if span["start"] < prev["end"]:
            raise ServiceError(
                f"span {i}: start {span['start']} overlaps span {i_prev} "
                f"[{prev['start']}, {prev['end']}); spans may not overlap"
            )
    return [span for _, span in checked]
