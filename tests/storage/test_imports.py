"""Prompt import parser: every Part 4 bad input gives its code and line; good text round-trips exactly.

Fixtures live in tests/fixtures/bad_inputs/ and are rebuilt by tests/fixtures/make_bad_inputs.py;
big cases (over-size files, 200,001 rows) are built in tmp_path.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage.imports import (
    PROBLEM_CODES,
    ImportLimits,
    ImportProblem,
    PromptRecord,
    detect_format,
    parse_prompt_file,
    render_chat,
)
from storage.imports_core import content_id

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
BAD = FIXTURES / "bad_inputs"


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_bad_inputs", FIXTURES / "make_bad_inputs.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


gen = _load_generator()

# file -> (every expected (code, line, field), number of valid records kept)
BAD_CASES: dict[str, tuple[list[tuple[str, int | None, str | None]], int]] = {
    # A. structure, CSV
    "csv_missing_prompt_column.csv": ([("missing_field", 1, "prompt")], 0),
    "csv_extra_column.csv": ([("unknown_field", 1, "score")], 2),
    "csv_duplicate_header.csv": ([("duplicate_header", 1, "prompt")], 0),
    "csv_header_only.csv": ([("empty_file", None, None)], 0),
    "csv_empty.csv": ([("empty_file", None, None)], 0),
    "csv_unbalanced_quote.csv": ([("csv_syntax", 3, None)], 1),
    "csv_quote_then_text.csv": ([("csv_syntax", 2, None)], 1),
    "csv_semicolon_delimiter.csv": ([("missing_field", 1, "prompt")], 0),
    "csv_tab_delimiter.csv": ([("missing_field", 1, "prompt")], 0),
    "csv_too_many_cells.csv": ([("csv_syntax", 2, None)], 1),
    # A. structure, JSON Lines
    "jsonl_empty.jsonl": ([("empty_file", None, None)], 0),
    "jsonl_only_blank_lines.jsonl": ([("empty_file", None, None)], 0),
    "jsonl_invalid_line_4.jsonl": ([("bad_json", 4, None)], 4),
    "jsonl_trailing_comma.jsonl": ([("bad_json", 2, None)], 1),
    "jsonl_top_level_array.jsonl": ([("not_object", 1, None)], 0),
    "jsonl_scalar.jsonl": ([("not_object", 2, None), ("not_object", 3, None)], 1),
    "jsonl_nan.jsonl": ([("non_finite_number", 1, None)], 0),
    "jsonl_infinity.jsonl": ([("non_finite_number", n, None) for n in (1, 2, 3)], 0),
    "jsonl_duplicate_keys.jsonl": ([("duplicate_key", 1, "prompt")], 0),
    # A. wrong types and ids
    "jsonl_text_number.jsonl": ([("wrong_type", 1, "prompt")], 0),
    "jsonl_text_list.jsonl": ([("wrong_type", 1, "prompt")], 0),
    "jsonl_text_null.jsonl": ([("wrong_type", 1, "text")], 0),
    "jsonl_id_float.jsonl": ([("bad_id", 2, "id")], 1),
    "jsonl_duplicate_id.jsonl": ([("duplicate_id", 3, "id"), ("duplicate_id", 5, "prompt")], 3),
    "jsonl_id_case.jsonl": ([("ambiguous_id", 2, "id")], 1),
    "jsonl_id_whitespace.jsonl": ([("bad_id", n, "id") for n in (2, 3, 4)], 1),
    # B. content
    "jsonl_invalid_utf8.jsonl": ([("invalid_utf8", 2, None)], 1),
    "jsonl_overlong_utf8.jsonl": ([("invalid_utf8", 1, None), ("invalid_utf8", 2, None)], 0),
    "csv_invalid_utf8.csv": ([("invalid_utf8", 3, None)], 2),
    "jsonl_utf16.jsonl": ([("utf16", None, None)], 0),
    "csv_utf16_no_bom.csv": ([("utf16", None, None)], 0),
    "jsonl_lone_surrogate.jsonl": ([("invalid_unicode", 1, "prompt")], 0),
    "jsonl_nul.jsonl": ([("nul_character", 1, "prompt"), ("nul_character", 2, None)], 0),
    "csv_nul.csv": ([("nul_character", 2, "prompt")], 0),
    "jsonl_too_long_text.jsonl": ([("too_long", 1, "prompt")], 1),
    "jsonl_5000_digit_int.jsonl": ([("bad_json", 1, None)], 0),
    "jsonl_deep_nesting.jsonl": (
        [("too_deep", 1, None), ("too_deep", 2, None), ("unknown_field", 3, "x")],
        1,
    ),
}

# file -> [(external_id or None for a content hash, exact text)] for good files
GOOD_CASES: dict[str, list[tuple[str | None, str]]] = {
    "bad_inputs/csv_bom_crlf_multiline.csv": [("1", "first line\r\nsecond line"), ("2", "plain")],
    "bad_inputs/jsonl_blank_lines.jsonl": [(None, "one"), (None, "two")],
    "bad_inputs/jsonl_bom_crlf.jsonl": [("a", "first"), ("b", "second")],
    "bad_inputs/csv_id_leading_zeros.csv": [("007", "Bond"), ("0042", "The answer")],
    "bad_inputs/jsonl_unicode_exact.jsonl": [(f"raw-{i}", t) for i, t in enumerate(gen.UNICODE_SAMPLES)]
    + [(f"esc-{i}", t) for i, t in enumerate(gen.UNICODE_SAMPLES)],
    "bad_inputs/csv_unicode_exact.csv": [(f"u{i}", t) for i, t in enumerate(gen.UNICODE_SAMPLES)],
    "bad_inputs/csv_formula_payloads.csv": [(f"f{i}", t) for i, t in enumerate(gen.FORMULA_SAMPLES)],
    "prompts_ok.csv": [(row[0], row[1]) for row in gen.GOOD_CSV_ROWS[1:]],
}


def _triples(result) -> list[tuple[str, int | None, str | None]]:
    return [(p.code, p.line, p.field) for p in result.problems]


def _write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def _jsonl(tmp_path: Path, *rows: object, name: str = "p.jsonl") -> Path:
    return _write(tmp_path / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# --- fixtures stay in sync with their generator -----------------------------------------------------


def test_committed_fixtures_match_generator():
    built = gen.build_bad_inputs()
    assert sorted(p.name for p in BAD.iterdir()) == sorted(built)
    for name, data in built.items():
        assert (BAD / name).read_bytes() == data, f"{name} is stale: run tests/fixtures/make_bad_inputs.py"
    for name, data in gen.build_good_files().items():
        assert (FIXTURES / name).read_bytes() == data
    covered = set(BAD_CASES) | {Path(k).name for k in GOOD_CASES}
    assert covered >= set(built), f"fixtures without an expectation: {set(built) - covered}"


# --- Part 4 bad inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_input_reports_code_line_and_field(name):
    expected, n_records = BAD_CASES[name]
    result = parse_prompt_file(BAD / name)
    assert _triples(result) == expected
    assert len(result.records) == n_records  # what a lenient import would commit
    assert not result.ok
    for problem in result.problems:
        assert problem.code in PROBLEM_CODES
        assert problem.file == name
        assert problem.message and "Traceback" not in problem.message
        assert set(problem.to_dict()) == {"file", "line", "field", "code", "message"}


def test_lenient_parse_equals_strict_parse():
    for name in ("jsonl_duplicate_id.jsonl", "csv_invalid_utf8.csv", "csv_extra_column.csv"):
        strict = parse_prompt_file(BAD / name)
        lenient = parse_prompt_file(BAD / name, lenient=True)
        assert lenient.records == strict.records and lenient.problems == strict.problems


def test_duplicate_ids_first_wins():
    result = parse_prompt_file(BAD / "jsonl_duplicate_id.jsonl", lenient=True)
    assert [(r.external_id, r.text) for r in result.records] == [
        ("1", "one"),
        ("2", "two"),
        (content_id("no id"), "no id"),
    ]
    assert "line 1" in result.problems[0].message


def test_messages_are_specific():
    by_name = {n: parse_prompt_file(BAD / n).problems for n in BAD_CASES}
    assert "';'" in by_name["csv_semicolon_delimiter.csv"][0].message
    assert "tab" in by_name["csv_tab_delimiter.csv"][0].message
    assert "UTF-8" in by_name["jsonl_utf16.jsonl"][0].message
    assert "0xff" in by_name["jsonl_invalid_utf8.jsonl"][0].message
    assert "trailing comma" in by_name["jsonl_trailing_comma.jsonl"][0].message
    assert "5,000 digits" in by_name["jsonl_5000_digit_int.jsonl"][0].message
    assert "1.0" in by_name["jsonl_id_float.jsonl"][0].message
    assert "'abc'" in by_name["jsonl_id_case.jsonl"][0].message
    assert "line 3" in by_name["csv_unbalanced_quote.csv"][0].message
    assert "100,001" in by_name["jsonl_too_long_text.jsonl"][0].message


# --- good files: exact round trip ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GOOD_CASES))
def test_good_file_round_trips_exactly(name):
    result = parse_prompt_file(FIXTURES / name)
    assert result.ok, result.problems
    expected = [(eid or content_id(text), text) for eid, text in GOOD_CASES[name]]
    assert [(r.external_id, r.text) for r in result.records] == expected
    for record in result.records:
        assert record.kind == "text" and record.messages is None


def test_prompts_ok_jsonl_mixes_text_and_chat():
    result = parse_prompt_file(FIXTURES / "prompts_ok.jsonl")
    assert result.ok and result.format == "jsonl" and result.rows_seen == 6
    records = {r.external_id: r for r in result.records}
    assert list(records)[:4] == ["greet-1", "2", "chat-1", "chat-2"]
    assert records["greet-1"].tags == ["poetry", "short"]
    chat = records["chat-1"]
    assert chat.kind == "chat" and chat.messages == gen.GOOD_JSONL_ROWS[2]["prompt"]
    assert chat.text == "system: You are terse.\nuser: Summarise: the pizza was warm, the service slow."
    assert records["chat-2"].messages[-1]["role"] == "user"
    assert records["007"].tags == []
    unicode_text = gen.GOOD_JSONL_ROWS[4]["prompt"]
    assert records[content_id(unicode_text)].text == unicode_text


def test_csv_tags_are_split_and_trimmed():
    result = parse_prompt_file(FIXTURES / "prompts_ok.csv")
    assert [r.tags for r in result.records] == [["poetry", "short"], [], ["spy"], ["a", "b"]]
    result = parse_prompt_file(BAD / "csv_bom_crlf_multiline.csv")
    assert [(r.line, r.tags) for r in result.records] == [(2, ["a"]), (4, ["b", "c"])]


def test_line_numbers_skip_blank_lines():
    result = parse_prompt_file(BAD / "jsonl_blank_lines.jsonl")
    assert [r.line for r in result.records] == [2, 5]


def test_txt_one_prompt_per_line(tmp_path):
    path = _write(tmp_path / "p.txt", "\ufeffFirst prompt  \r\n\n   \nSecond\twith tab\nsame\nsame\n")
    result = parse_prompt_file(path)
    assert [(r.line, r.text) for r in result.records] == [
        (1, "First prompt  "),
        (4, "Second\twith tab"),
        (5, "same"),
    ]
    assert _triples(result) == [("duplicate_id", 6, "prompt")]
    # Content ids do not depend on the format the text came from.
    jsonl = parse_prompt_file(_jsonl(tmp_path, {"prompt": "same"}))
    assert jsonl.records[0].external_id == result.records[2].external_id


# --- chat messages ----------------------------------------------------------------------------------

USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"messages": []}, ("bad_messages", "messages")),
        ({"messages": [{"role": "assistant", "content": "x"}]}, ("bad_messages", "messages[0].role")),
        ({"messages": [{"role": "bot", "content": "x"}, USER]}, ("bad_messages", "messages[0].role")),
        ({"messages": [{"role": "user"}]}, ("bad_messages", "messages[0]")),
        ({"messages": [{**USER, "name": "x"}]}, ("bad_messages", "messages[0]")),
        ({"messages": [USER, "hi"]}, ("bad_messages", "messages[1]")),
        ({"messages": [{"role": "user", "content": ["a"]}]}, ("bad_messages", "messages[0].content")),
        ({"messages": [{"role": "user", "content": "  "}]}, ("empty_text", "messages[0].content")),
        ({"messages": [{"role": "user", "content": "a\u0000"}]}, ("nul_character", "messages[0].content")),
        ({"messages": "hi"}, ("wrong_type", "messages")),
        ({"prompt": [USER, {"role": "assistant", "content": "x"}]}, ("bad_messages", "prompt[1].role")),
        ({"text": [USER]}, ("wrong_type", "text")),
        ({"prompt": True}, ("wrong_type", "prompt")),
        ({"prompt": {"a": 1}}, ("wrong_type", "prompt")),
        ({"prompt": "   \n"}, ("empty_text", "prompt")),
        ({"prompt": "a", "text": "b"}, ("conflicting_fields", "text")),
        ({"id": "a", "prompt_id": "b", "prompt": "x"}, ("conflicting_fields", "prompt_id")),
        ({"id": "x"}, ("missing_field", "prompt")),
        ({"id": True, "prompt": "x"}, ("bad_id", "id")),
        ({"id": None, "prompt": "x"}, ("bad_id", "id")),
        ({"id": [1], "prompt": "x"}, ("bad_id", "id")),
        ({"id": "x" * 201, "prompt": "x"}, ("bad_id", "id")),
        ({"id": "a\u0000", "prompt": "x"}, ("nul_character", "id")),
        ({"prompt": "x", "tags": "a,b"}, ("wrong_type", "tags")),
        ({"prompt": "x", "tags": ["a", 1]}, ("wrong_type", "tags[1]")),
        ({"prompt": "x", "tags": [""]}, ("empty_text", "tags[0]")),
    ],
)
def test_row_problems(tmp_path, row, expected):
    result = parse_prompt_file(_jsonl(tmp_path, row))
    assert [(p.code, p.field) for p in result.problems] == [expected]
    assert result.records == []


def test_chat_prompt_and_render():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Line one\nline two"}]
    assert render_chat(messages) == "system: Be brief.\nuser: Line one\nline two"


def test_row_with_several_problems_reports_each(tmp_path):
    result = parse_prompt_file(_jsonl(tmp_path, {"id": 1.5, "prompt": 3, "tags": "x", "extra": 1}))
    assert _triples(result) == [
        ("unknown_field", 1, "extra"),
        ("bad_id", 1, "id"),
        ("wrong_type", 1, "prompt"),
        ("wrong_type", 1, "tags"),
    ]


def test_unknown_key_reported_once_and_row_kept(tmp_path):
    result = parse_prompt_file(
        _jsonl(tmp_path, {"prompt": "a"}, {"prompt": "b", "x": 1}, {"prompt": "c", "x": 2})
    )
    assert _triples(result) == [("unknown_field", 2, "x")]
    assert [r.text for r in result.records] == ["a", "b", "c"]


def test_csv_messages_column_holds_json(tmp_path):
    good = json.dumps([{"role": "user", "content": 'héllo, "you"'}], ensure_ascii=False)
    rows = [["id", "messages"], ["c1", good], ["c2", "[{"], ["c3", "not json"]]
    buf = io.StringIO(newline="")
    csv.writer(buf).writerows(rows)
    result = parse_prompt_file(_write(tmp_path / "chat.csv", buf.getvalue()))
    assert result.records[0].messages == [{"role": "user", "content": 'héllo, "you"'}]
    assert _triples(result) == [("bad_messages", 3, "messages"), ("bad_messages", 4, "messages")]


def test_csv_empty_name_column_hints_at_index(tmp_path):
    result = parse_prompt_file(_write(tmp_path / "p.csv", ",prompt\n0,hello\n"))
    assert _triples(result) == [("unknown_field", 1, "")]
    assert "index" in result.problems[0].message and len(result.records) == 1


# --- limits (R-IMP-02) ------------------------------------------------------------------------------


def test_file_too_large_rejected_before_parsing(tmp_path):
    path = _write(tmp_path / "big.jsonl", b"not json at all\n" * 100)
    result = parse_prompt_file(path, limits=ImportLimits(max_file_bytes=1000))
    assert _triples(result) == [("file_too_large", None, None)]  # no bad_json: never parsed


def test_200001_rows_rejected_with_row_count_error(tmp_path):
    path = _write(tmp_path / "many.jsonl", b"".join(b'{"prompt":"p%d"}\n' % i for i in range(200_001)))
    result = parse_prompt_file(path)
    assert _triples(result) == [("too_many_records", None, None)]
    assert "200,001" in result.problems[0].message and result.records == []


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("p.jsonl", "".join(f'{{"prompt": "p{i}"}}\n' for i in range(6))),
        ("p.txt", "".join(f"p{i}\n" for i in range(6))),
        ("p.csv", "prompt\n" + "".join(f'"p{i}\nsecond line"\n' for i in range(6))),
    ],
)
def test_max_records_limit(tmp_path, name, body):
    path = _write(tmp_path / name, body)
    assert parse_prompt_file(path, limits=ImportLimits(max_records=6)).ok
    result = parse_prompt_file(path, limits=ImportLimits(max_records=5))
    assert _triples(result) == [("too_many_records", None, None)] and result.records == []


def test_text_length_limit_is_inclusive(tmp_path):
    limits = ImportLimits(max_text_chars=10)
    result = parse_prompt_file(_jsonl(tmp_path, {"prompt": "x" * 10}, {"prompt": "y" * 11}), limits=limits)
    assert _triples(result) == [("too_long", 2, "prompt")] and len(result.records) == 1
    chat = {"messages": [{"role": "system", "content": "s" * 8}, {"role": "user", "content": "u" * 8}]}
    result = parse_prompt_file(_jsonl(tmp_path, chat), limits=limits)
    assert _triples(result) == [("too_long", 1, "messages")]  # the rendering is stored, so it counts


def test_csv_field_bigger_than_csv_limit_is_too_long(tmp_path):
    path = _write(tmp_path / "p.csv", "id,prompt\n1," + "z" * 5000 + "\n2,ok\n")
    result = parse_prompt_file(path, limits=ImportLimits(max_text_chars=100))
    assert _triples(result) == [("too_long", 2, None)] and [r.text for r in result.records] == ["ok"]


def test_json_depth_limit(tmp_path):
    row = '{"prompt": "x", "tags": ' + "[" * 4 + "]" * 4 + "}\n"
    path = _write(tmp_path / "p.jsonl", row)
    assert _triples(parse_prompt_file(path, limits=ImportLimits(max_json_depth=4))) == [("too_deep", 1, None)]
    # At the limit the JSON is accepted and the row fails on its own merits (tags must be strings).
    assert _triples(parse_prompt_file(path, limits=ImportLimits(max_json_depth=5))) == [
        ("wrong_type", 1, "tags[0]")
    ]


# --- formats --------------------------------------------------------------------------------------


def test_detect_format(tmp_path):
    assert detect_format(_write(tmp_path / "a.JSONL", "{}")) == "jsonl"
    assert detect_format(_write(tmp_path / "lines.json", '{"prompt": "a"}\n{"prompt": "b"}\n')) == "jsonl"
    with pytest.raises(ValueError, match="JSON Lines"):
        detect_format(_write(tmp_path / "array.json", '[\n  {"prompt": "a"}\n]\n'))
    with pytest.raises(ValueError, match="JSON Lines"):
        detect_format(_write(tmp_path / "pretty.json", '{\n  "prompt": "a"\n}\n'))
    with pytest.raises(ValueError, match=r"unsupported file type \.xlsx"):
        detect_format(_write(tmp_path / "a.xlsx", b"PK"))
    with pytest.raises(ValueError, match="tab-separated"):
        detect_format(_write(tmp_path / "a.tsv", "prompt\nx\n"))
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(ValueError, match="save_to_disk"):
        detect_format(folder)


def test_unsupported_and_missing_files_become_problems(tmp_path):
    result = parse_prompt_file(_write(tmp_path / "a.xlsx", b"PK"), display_name="upload.xlsx")
    assert _triples(result) == [("unsupported_format", None, None)] and result.file == "upload.xlsx"
    assert _triples(parse_prompt_file(tmp_path / "gone.jsonl")) == [("unreadable", None, None)]
    assert _triples(parse_prompt_file(_write(tmp_path / "bad.parquet", b"not parquet"))) == [
        ("unreadable", None, None)
    ]


def _arrow_table():
    import pyarrow as pa

    return pa.table(
        {
            "id": ["t1", "c1", None],
            "prompt": ["Write a haiku. 😀 ", None, "no id \u202e here"],
            "messages": [
                None,
                [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                None,
            ],
            "tags": [["a", "b"], None, []],
        }
    )


def _check_arrow_result(result):
    assert result.ok, result.problems
    assert [(r.line, r.kind, r.text, r.tags) for r in result.records] == [
        (1, "text", "Write a haiku. 😀 ", ["a", "b"]),
        (2, "chat", "system: Be brief.\nuser: Hi", []),
        (3, "text", "no id \u202e here", []),
    ]
    assert result.records[0].external_id == "t1"
    assert result.records[2].external_id == content_id("no id \u202e here")


def test_parquet_round_trip(tmp_path):
    import pyarrow.parquet as pq

    pq.write_table(_arrow_table(), tmp_path / "p.parquet", row_group_size=2)
    result = parse_prompt_file(tmp_path / "p.parquet")
    assert result.format == "parquet" and result.rows_seen == 3
    _check_arrow_result(result)


def test_parquet_types_checked_like_json(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"id": [1.0, 2.0], "prompt": [1, 2], "score": [0.5, 0.1]}), tmp_path / "t.parquet"
    )
    result = parse_prompt_file(tmp_path / "t.parquet")
    assert _triples(result) == [
        ("unknown_field", None, "score"),
        ("bad_id", 1, "id"),
        ("wrong_type", 1, "prompt"),
        ("bad_id", 2, "id"),
        ("wrong_type", 2, "prompt"),
    ]
    pq.write_table(pa.table({"text2": ["a"]}), tmp_path / "m.parquet")
    assert ("missing_field", None, "prompt") in _triples(parse_prompt_file(tmp_path / "m.parquet"))
    pq.write_table(pa.table({"prompt": ["a", "b", "c"]}), tmp_path / "n.parquet")
    result = parse_prompt_file(tmp_path / "n.parquet", limits=ImportLimits(max_records=2))
    assert _triples(result) == [("too_many_records", None, None)]


def test_hf_dataset_folders(tmp_path):
    import datasets

    ds = datasets.Dataset(_arrow_table())
    ds.save_to_disk(str(tmp_path / "single"))
    result = parse_prompt_file(tmp_path / "single")
    assert result.format == "hf"
    _check_arrow_result(result)

    other = datasets.Dataset.from_dict({"prompt": ["other"]})
    datasets.DatasetDict({"train": ds, "test": other}).save_to_disk(str(tmp_path / "with_train"))
    _check_arrow_result(parse_prompt_file(tmp_path / "with_train"))
    datasets.DatasetDict({"eval": other}).save_to_disk(str(tmp_path / "one_split"))
    assert [r.text for r in parse_prompt_file(tmp_path / "one_split").records] == ["other"]
    datasets.DatasetDict({"a": other, "b": other}).save_to_disk(str(tmp_path / "two_splits"))
    result = parse_prompt_file(tmp_path / "two_splits")
    assert _triples(result) == [("ambiguous_split", None, None)] and "a, b" in result.problems[0].message


def test_records_are_frozen():
    record = PromptRecord(1, "x", "text", "t", None, [])
    with pytest.raises(AttributeError):
        record.text = "changed"  # type: ignore[misc]
    problem = ImportProblem("f", None, None, "empty_file", "m")
    assert problem.to_dict() == {
        "file": "f",
        "line": None,
        "field": None,
        "code": "empty_file",
        "message": "m",
    }


# --- property: any storable text round-trips through JSONL and CSV -----------------------------------

storable_text = st.text(
    st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=60
).filter(lambda t: t.strip())


@settings(max_examples=80, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(storable_text, min_size=1, max_size=4, unique=True), ascii_json=st.booleans())
def test_any_storable_text_round_trips(texts, ascii_json):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        jsonl = folder / "p.jsonl"
        jsonl.write_text(
            "".join(json.dumps({"prompt": t}, ensure_ascii=ascii_json) + "\n" for t in texts),
            encoding="utf-8",
            newline="",
        )
        csv_path = folder / "p.csv"
        with csv_path.open("w", encoding="utf-8", newline="") as fh:
            csv.writer(fh).writerows([["id", "prompt"], *([f"r{i}", t] for i, t in enumerate(texts))])
        for path in (jsonl, csv_path):
            result = parse_prompt_file(path)
            assert result.ok, (path.name, result.problems)
            assert [r.text for r in result.records] == texts
