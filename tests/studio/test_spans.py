"""Span offsets (UTF-16 <-> code points) and span validation (reliability Part 4 C.2)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from studio.services.errors import ServiceError
from studio.spans import (
    codepoint_to_utf16,
    grapheme_boundaries,
    spans_from_utf16,
    spans_to_utf16,
    utf16_length,
    utf16_to_codepoint,
    validate_spans,
)

PIECES = [
    "a",
    " ",
    "é",  # precomposed
    "e\u0301",  # e + combining acute
    "a\u0308\u0301",  # two combining marks
    "👍",
    "👍🏽",  # emoji + skin tone modifier
    "👩🏿‍💻",  # skin tone inside a ZWJ sequence
    "👨‍👩‍👧‍👦",  # ZWJ family
    "🏳️‍🌈",  # flag ZWJ sequence with a variation selector
    "🇫🇷",  # regional indicator pair
    "東京",
    "한국어",
    "𝔘𝔫𝔦",  # mathematical fraktur (astral)
    "𠜎",  # CJK extension B (astral)
    "\u202e",  # right-to-left override
    "\u200b",  # zero-width space
    "\n",
    "\r\n",
]
texts = st.one_of(
    st.lists(st.sampled_from(PIECES), max_size=30).map("".join),
    st.text(max_size=60),
    st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=5)), max_size=20).map("".join),
)


def utf16_units(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


@settings(max_examples=300, deadline=None)
@given(texts, st.data())
def test_codepoint_offsets_round_trip_and_agree_with_python_utf16(text, data):
    i = data.draw(st.integers(0, len(text)))
    u = codepoint_to_utf16(text, i)
    assert u == utf16_units(text[:i])
    assert utf16_to_codepoint(text, u) == i
    assert utf16_length(text) == utf16_units(text)


@settings(max_examples=200, deadline=None)
@given(texts)
def test_conversion_is_strictly_monotonic(text):
    units = [codepoint_to_utf16(text, i) for i in range(len(text) + 1)]
    assert units[0] == 0 and units[-1] == utf16_units(text)
    assert all(a < b for a, b in itertools.pairwise(units))


@settings(max_examples=300, deadline=None)
@given(texts, st.data())
def test_every_utf16_offset_converts_or_is_inside_a_surrogate_pair(text, data):
    u = data.draw(st.integers(0, utf16_units(text)))
    prefix = text.encode("utf-16-le")[: 2 * u]
    splits_pair = bool(prefix) and 0xD800 <= int.from_bytes(prefix[-2:], "little") <= 0xDBFF
    if splits_pair:
        with pytest.raises(ServiceError, match="surrogate pair"):
            utf16_to_codepoint(text, u)
    else:
        i = utf16_to_codepoint(text, u)
        assert text[:i].encode("utf-16-le") == prefix


@settings(max_examples=200, deadline=None)
@given(texts, st.data())
def test_validated_spans_are_sorted_disjoint_and_survive_utf16(text, data):
    cuts = sorted(grapheme_boundaries(text))
    chosen = sorted(set(data.draw(st.lists(st.sampled_from(cuts), max_size=8))))
    spans = [
        {"start": a, "end": b, "polarity": "good" if k % 2 else "bad"}
        for k, (a, b) in enumerate(zip(chosen[::2], chosen[1::2], strict=False))
    ]
    shuffled = data.draw(st.permutations(spans))
    clean = validate_spans(text, shuffled, [])
    assert [(s["start"], s["end"]) for s in clean] == [(s["start"], s["end"]) for s in spans]
    assert all(set(s) == {"start", "end", "polarity", "label", "comment"} for s in clean)
    assert spans_from_utf16(text, spans_to_utf16(text, clean)) == clean


def test_known_offsets():
    text = "a👍🏽b"  # code points: a, 👍, 🏽, b -> UTF-16 units 1 + 2 + 2 + 1
    assert [codepoint_to_utf16(text, i) for i in range(5)] == [0, 1, 3, 5, 6]
    assert [utf16_to_codepoint(text, u) for u in (0, 1, 3, 5, 6)] == [0, 1, 2, 3, 4]
    for inside in (2, 4):
        with pytest.raises(ServiceError, match="surrogate pair"):
            utf16_to_codepoint(text, inside)
    for bad in (-1, 7, 1.0, "1", True, None):
        with pytest.raises(ServiceError):
            utf16_to_codepoint(text, bad)
    for bad in (-1, 5, 2.0):
        with pytest.raises(ServiceError):
            codepoint_to_utf16(text, bad)
    assert sorted(grapheme_boundaries("e\u0301👨‍👩‍👧x")) == [0, 2, 7, 8]


TEXT = "Good 👍🏽 answer, e\u0301tc."  # 21 code points; "e\u0301" is one grapheme at 16..18
LABELS = ["fact", "tone"]


def span(start, end, polarity="bad", **kw):
    return {"start": start, "end": end, "polarity": polarity, **kw}


@pytest.mark.parametrize(
    ("spans", "message"),
    [
        ([span(5, 3)], r"span 0: start 5 is after end 3"),
        ([span(0, 4), span(10, 22)], r"span 1: end 22 is past the end"),
        ([span(-1, 3)], r"span 0: start -1 is negative"),
        ([span(0, -2)], r"span 0: end -2 is negative"),
        ([span(1.0, 3)], r"span 0: start must be an integer"),
        ([span(1, 3.5)], r"span 0: end must be an integer"),
        ([span(True, 3)], r"span 0: start must be an integer"),
        ([span("1", 3)], r"span 0: start must be an integer"),
        ([span(0, 2), span(3, 3)], r"span 1: end: the span is empty"),
        ([span(0, 4), span(10, 14), span(2, 5)], r"span 2: start 2 overlaps span 0"),
        ([span(0, 4, label="style")], r"span 0: label 'style' is not one of the project's labels"),
        ([span(0, 4, label=3)], r"span 0: label 3 is not one of"),
        ([span(5, 6)], r"span 0: end 6 splits a character"),  # between 👍 and its skin tone
        ([span(17, 19)], r"span 0: start 17 splits a character"),  # between e and U+0301
        ([span(0, 4, polarity="neutral")], r"span 0: polarity must be 'good' or 'bad'"),
        ([span(0, 4, comment="x" * 2001)], r"span 0: comment is 2001 characters long"),
        ([span(0, 4, comment=5)], r"span 0: comment must be text"),
        ([span(0, 4), span(5, 9, comment="a\x00b")], r"span 1: comment may not contain NUL"),
        ([{"start": 0, "polarity": "bad"}], r"span 0: end is missing"),
        ([span(0, 4), {"end": 4, "polarity": "bad"}], r"span 1: start is missing"),
        ([{"start": 0, "end": 4}], r"span 0: polarity is missing"),
        ([span(0, 4, colour="red")], r"span 0: unknown field 'colour'"),
        ([span(0, 4), "0-4"], r"span 1: must be an object"),
        ("0-4", r"spans must be a list"),
        ([span(i, i + 1) for i in range(1001)], r"at most 1000"),
    ],
)
def test_bad_spans_name_the_span_and_field(spans, message):
    with pytest.raises(ServiceError, match=message):
        validate_spans(TEXT, spans, LABELS)


def test_overlap_error_names_both_spans():
    with pytest.raises(ServiceError, match=r"span 2: start 2 overlaps span 0 \[0, 4\)"):
        validate_spans(TEXT, [span(0, 4), span(10, 14), span(2, 5)], LABELS)
    # touching spans do not overlap (half-open ranges)
    assert len(validate_spans(TEXT, [span(0, 4), span(4, 5)], LABELS)) == 2


def test_valid_spans_are_normalised_and_sorted():
    given_spans = [span(16, 18, "good", label="tone", comment=""), span(0, 4, label="", comment="why")]
    assert validate_spans(TEXT, given_spans, LABELS) == [
        {"start": 0, "end": 4, "polarity": "bad", "label": None, "comment": "why"},
        {"start": 16, "end": 18, "polarity": "good", "label": "tone", "comment": None},
    ]
    assert validate_spans(TEXT, [span(0, len(TEXT))], None)[0]["end"] == 21
    assert validate_spans("", [], []) == []


def test_utf16_span_errors_name_the_span_and_field():
    with pytest.raises(ServiceError, match=r"span 1: end: UTF-16 offset 6 falls inside a surrogate pair"):
        spans_from_utf16(TEXT, [span(0, 4), span(5, 6)])
    with pytest.raises(ServiceError, match=r"span 0: start: UTF-16 offset must be an integer"):
        spans_from_utf16(TEXT, [span(0.5, 4)])
    with pytest.raises(ServiceError, match=r"span 0: end: UTF-16 offset 99 is past the end"):
        spans_from_utf16(TEXT, [span(0, 99)])
    # "Good 👍🏽" is 7 code points and 9 UTF-16 units
    assert spans_from_utf16(TEXT, [span(0, 9)])[0]["end"] == 7
