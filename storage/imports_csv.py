"""CSV reader for the prompt importer (comma-separated, UTF-8, header required).

Kept apart from `storage.imports` because CSV needs its own line bookkeeping: a quoted field may
span several physical lines, and problems must name the line where the record starts.
"""

from __future__ import annotations

import csv
from pathlib import Path

from storage.imports_core import ID_KEYS, PROMPT_KEYS, ImportLimits, ParseResult, RowValidator, iter_lines


def csv_field_limit(limits: ImportLimits) -> int:
    """The csv module's per-field cap: above max_text_chars so an over-long text gets a clean
    `too_long` from the validator, with room for a JSON 'messages' cell (escapes, several turns)."""
    return limits.max_text_chars * 4 + 1024


def _delimiter_hint(header: list[str]) -> str:
    cells = "".join(header)
    if ";" in cells:
        return " The header looks ';'-separated; only comma-separated CSV is accepted (save as 'CSV (comma delimited)')."
    if "\t" in cells:
        return " The header looks tab-separated; only comma-separated CSV is accepted."
    return ""


def _check_header(header: list[str], line: int, validator: RowValidator) -> bool:
    """Report header problems; False when no row can be read safely (the import stops there)."""
    seen: set[str] = set()
    for name in header:
        if name in seen:
            validator.report(line, name, "duplicate_header", f"column {name!r} appears twice in the header")
            return False
        seen.add(name)
    ids = [k for k in ID_KEYS if k in seen]
    prompts = [k for k in PROMPT_KEYS if k in seen]
    if len(ids) > 1:
        validator.report(line, ids[1], "conflicting_fields", f"use one id column, not {' and '.join(ids)}")
        return False
    if not prompts:
        validator.report(
            line,
            "prompt",
            "missing_field",
            f"no prompt column: the header needs one of 'prompt', 'text' or 'messages' (found {', '.join(map(repr, header))})."
            + _delimiter_hint(header),
        )
        return False
    if len(prompts) > 1:
        validator.report(
            line, prompts[1], "conflicting_fields", f"use one prompt column, not {' and '.join(prompts)}"
        )
        return False
    for index, name in enumerate(header, start=1):
        if name not in ID_KEYS + PROMPT_KEYS + ("tags",):
            validator.unknown_field(name, line, column=index)
    return True


def parse_csv(path: Path, result: ParseResult, validator: RowValidator, limits: ImportLimits) -> None:
    """Stream records into `validator`; structure problems are reported at the record's first line."""
    # csv.field_size_limit is process-global; set it explicitly on every parse (R-IMP-02) rather
    # than trusting whatever another caller left behind.
    csv.field_size_limit(csv_field_limit(limits))
    bad_lines: set[int] = set()

    def lines():
        for number, text, ok in iter_lines(path, validator.report):
            if not ok:
                bad_lines.add(number)
            yield text

    # strict=True turns an unclosed quote at end of file into csv.Error instead of a record that
    # silently swallowed the rest of the file; it also rejects text after a closing quote.
    reader = csv.reader(lines(), strict=True)
    header: list[str] | None = None
    header_line = 0
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            _report_csv_error(exc, start, reader.line_num, validator, limits)
            if header is None:
                return
            result.rows_seen += 1
            continue
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank line
        spanned = range(start, reader.line_num + 1)
        if header is None:
            if any(n in bad_lines for n in spanned):
                return  # an undecodable header (already reported) gives meaningless column names
            header, header_line = row, start
            if not _check_header(header, header_line, validator):
                return
            continue
        result.rows_seen += 1
        if result.rows_seen > limits.max_records:
            return  # the caller turns this into too_many_records
        if any(n in bad_lines for n in spanned):
            continue  # its invalid_utf8 problem is already reported
        if len(row) != len(header):
            hint = (
                " (an unquoted comma inside a text? quote the field)"
                if len(row) > len(header)
                else (" (an unquoted line break inside a text? quote the field)")
            )
            validator.report(
                start,
                None,
                "csv_syntax",
                f"the row has {len(row)} cell{'s' if len(row) != 1 else ''} but the header has {len(header)} columns{hint}",
            )
            continue
        validator.add(dict(zip(header, row, strict=True)), start, source="csv")


def _report_csv_error(
    exc: csv.Error, start: int, end: int, validator: RowValidator, limits: ImportLimits
) -> None:
    text = str(exc)
    if "field larger than field limit" in text:
        validator.report(
            start,
            None,
            "too_long",
            f"a field is longer than {csv_field_limit(limits):,} characters (limit {limits.max_text_chars:,})",
        )
    elif "unexpected end of data" in text:
        validator.report(
            start,
            None,
            "csv_syntax",
            f"a quoted field in the record starting on line {start} is never closed (unbalanced '\"'); "
            f"it swallowed everything up to the end of the file (line {end})",
        )
    else:
        validator.report(
            start, None, "csv_syntax", f"CSV syntax error: {text} (line {end}); check the quotes"
        )
