"""Parse and validate prompt files before anything touches the database (R-IMP-01..04).

`parse_prompt_file` reads JSON Lines, CSV, Parquet, plain text (one prompt per line) or a folder
written by `datasets.save_to_disk`, and returns a ParseResult: the valid PromptRecords plus every
problem as (file, line, field, code, message). It never raises for bad input, so the UI can show
the report; the service decides what to commit (strict: nothing if any problem; lenient: the good
rows). Pure: no DB, no torch, no gradio; pyarrow and datasets are imported only when needed.

Row schema: optional `id` (aliases `external_id`, `prompt_id`; a string or an integer), exactly
one of `prompt` (a string, or a list of chat messages as in TRL's conversational prompt-only
format), `text` (a string) or `messages` (a list of {"role", "content"} ending with the user), and
optional `tags` (a list of strings; in CSV a comma-separated cell). Prompts without an id get
"sha256:" + 16 hex digits of their content, so identical prompts show up as duplicates.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from storage.imports_core import (
    KNOWN_KEYS,
    PROBLEM_CODES,
    PROMPT_KEYS,
    UTF8_BOM,
    WARNING_CODES,
    ImportLimits,
    ImportProblem,
    JsonReject,
    ParseResult,
    PromptRecord,
    RowValidator,
    encoding_problem,
    iter_lines,
    load_json,
    path_size,
    render_chat,
    type_name,
)
from storage.imports_csv import parse_csv

__all__ = [
    "PROBLEM_CODES",
    "WARNING_CODES",
    "ImportLimits",
    "ImportProblem",
    "ParseResult",
    "PromptRecord",
    "detect_format",
    "parse_prompt_file",
    "render_chat",
]

_SUFFIXES = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet", ".txt": "txt"}
_SUPPORTED = ".jsonl, .json (JSON Lines), .csv, .parquet, .txt, or a folder saved with datasets.save_to_disk"
_TEXT_FORMATS = ("jsonl", "csv", "txt")
DEFAULT_LIMITS = ImportLimits()  # frozen, so sharing one default instance is safe


def detect_format(path: Path) -> str:
    """The format name for `path`, by suffix (sniffing only .json); ValueError when unsupported."""
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "hf"
        raise ValueError(
            f"the folder {path.name!r} is not a dataset saved with datasets.save_to_disk "
            "(no dataset_dict.json or state.json); supported: " + _SUPPORTED
        )
    suffix = path.suffix.lower()
    if suffix in _SUFFIXES:
        return _SUFFIXES[suffix]
    if suffix == ".json":
        if _looks_like_json_lines(path):
            return "jsonl"
        raise ValueError(
            f"{path.name!r} is a single JSON document, not JSON Lines; write one JSON object per line "
            "(e.g. pandas.DataFrame.to_json(lines=True, orient='records')) and name it .jsonl"
        )
    shown = suffix or "(no extension)"
    hint = "; tab-separated files are not accepted, save as comma-separated .csv" if suffix == ".tsv" else ""
    raise ValueError(f"unsupported file type {shown}{hint}; supported: {_SUPPORTED}")


def _looks_like_json_lines(path: Path) -> bool:
    """A .json file is JSON Lines when its first non-blank line is one complete {...} object.

    A pretty-printed document starts with a line that is just "{" or "[", so this is enough to
    send it to a clear "not JSON Lines" message instead of a bad_json on every line.
    """
    with path.open("rb") as fh:
        head = fh.read(1 << 20)
        complete = not fh.read(1)
    lines = head.removeprefix(UTF8_BOM).split(b"\n")
    for index, raw in enumerate(lines):
        line = raw.strip()
        if line:
            # A line cut off by the 1 MB read can't be judged by its last byte.
            whole = index < len(lines) - 1 or complete
            return line.startswith(b"{") and (line.endswith(b"}") or not whole)
    return True  # blank: let the parser report empty_file


def parse_prompt_file(
    path: str | Path,
    *,
    lenient: bool = False,
    limits: ImportLimits = DEFAULT_LIMITS,
    display_name: str | None = None,
) -> ParseResult:
    """Parse one file (or datasets folder) into valid records and a complete problem list.

    `lenient` does not change what is parsed: in both modes `records` holds the valid rows and
    `problems` everything else. The caller commits nothing in strict mode when problems is
    non-empty, and the good rows in lenient mode. A file-level problem (too large, too many
    records, encoding, unsupported) leaves `records` empty so a lenient import cannot commit a
    silently truncated file.
    """
    del lenient  # parsing is identical; kept in the signature so callers state their intent
    path = Path(path)
    name = display_name or path.name
    result = ParseResult(file=name, format="unknown", records=[], problems=[], rows_seen=0)

    def fail(code: str, message: str) -> ParseResult:
        result.records.clear()
        result.problems.append(ImportProblem(name, None, None, code, message))
        return result

    if not path.exists():
        return fail("unreadable", "the file does not exist (was the upload lost?)")
    try:
        result.format = detect_format(path)
    except ValueError as exc:
        return fail("unsupported_format", str(exc))
    except OSError as exc:
        return fail("unreadable", f"the file could not be read: {exc.strerror or exc}")
    try:
        size = path_size(path)
        if size > limits.max_file_bytes:
            return fail(
                "file_too_large",
                f"the file is {size / 2**20:,.1f} MB; the limit is {limits.max_file_bytes / 2**20:,.1f} MB "
                "(split it into smaller files)",
            )
        if size == 0:
            return fail("empty_file", "the file is empty (0 bytes)")
        if result.format in _TEXT_FORMATS:
            message = encoding_problem(path)
            if message:
                return fail("utf16", message)
            if result.format != "csv":
                count = _count_nonblank_lines(path)
                if count > limits.max_records:
                    result.rows_seen = count
                    return fail("too_many_records", _too_many(count, limits))
        validator = RowValidator(result, limits)
        if result.format == "jsonl":
            _parse_jsonl(path, result, validator, limits)
        elif result.format == "txt":
            _parse_txt(path, result, validator, limits)
        elif result.format == "csv":
            parse_csv(path, result, validator, limits)
        elif result.format == "parquet":
            _parse_parquet(path, result, validator, limits)
        else:
            _parse_hf(path, result, validator, limits)
    except OSError as exc:
        return fail("unreadable", f"the file could not be read: {exc.strerror or exc}")
    if result.rows_seen > limits.max_records:
        return fail(
            "too_many_records",
            _too_many(
                result.rows_seen, limits, at_least=result.format != "parquet" and result.format != "hf"
            ),
        )
    if result.rows_seen == 0 and not result.problems:
        what = "only a header row" if result.format == "csv" else "no rows"
        return fail("empty_file", f"the file has {what}; nothing to import")
    return result


def _too_many(count: int, limits: ImportLimits, *, at_least: bool = False) -> str:
    has = f"more than {limits.max_records:,}" if at_least else f"{count:,}"
    return f"the file has {has} records; one import takes at most {limits.max_records:,} (split the file)"


def _count_nonblank_lines(path: Path) -> int:
    """A cheap binary pre-pass so an over-long file is refused before any row is parsed."""
    with path.open("rb") as fh:
        return sum(1 for raw in fh if raw.strip())


def _parse_jsonl(path: Path, result: ParseResult, validator: RowValidator, limits: ImportLimits) -> None:
    """One JSON object per line, streamed; blank lines skipped, CRLF accepted."""
    for number, text, ok in iter_lines(path, validator.report):
        if ok and not text.strip():
            continue
        result.rows_seen += 1
        if result.rows_seen > limits.max_records:
            return
        if not ok:
            continue  # reported as invalid_utf8
        if "\x00" in text:
            validator.report(
                number,
                None,
                "nul_character",
                "the line contains a raw NUL byte; NUL cannot be stored (PostgreSQL text)",
            )
            continue
        try:
            value = load_json(text, limits.max_json_depth)
        except JsonReject as exc:
            validator.report(number, exc.field, exc.code, exc.message)
            continue
        if not isinstance(value, dict):
            kind = "an array" if isinstance(value, list) else f"a {type_name(value)}"
            hint = (
                " (a whole JSON array? write one object per line instead)" if isinstance(value, list) else ""
            )
            validator.report(
                number, None, "not_object", f"the line is {kind}; each line must be one JSON object{hint}"
            )
            continue
        validator.add(value, number, source="json")


def _parse_txt(path: Path, result: ParseResult, validator: RowValidator, limits: ImportLimits) -> None:
    """One text prompt per non-blank line; the line ending is removed, nothing else."""
    for number, text, ok in iter_lines(path, validator.report):
        line = text.removesuffix("\n").removesuffix("\r")
        if ok and not line.strip():
            continue
        result.rows_seen += 1
        if result.rows_seen > limits.max_records:
            return
        if ok:
            validator.add({"prompt": line}, number, source="txt")


# --- columnar: Parquet and datasets folders ------------------------------------------------------


def _parse_columns(
    columns: list[str],
    num_rows: int,
    batches: Iterable[Any],
    result: ParseResult,
    validator: RowValidator,
    limits: ImportLimits,
) -> None:
    """Validate Arrow batches row by row; line numbers are 1-based row numbers.

    Nulls are dropped before validation: a columnar file can only say "no value here" with null,
    so a null id or tags means absent, and a dataset with both 'prompt' and 'messages' columns
    works when each row fills exactly one.
    """
    seen: set[str] = set()
    for name in columns:
        if name in seen:
            validator.report(None, name, "duplicate_header", f"column {name!r} appears twice")
            return
        seen.add(name)
    for name in columns:
        if name not in KNOWN_KEYS:
            validator.unknown_field(name, None)
    if not seen.intersection(PROMPT_KEYS):
        validator.report(
            None,
            "prompt",
            "missing_field",
            f"no prompt column: need 'prompt', 'text' or 'messages' (found {', '.join(columns)})",
        )
        return
    result.rows_seen = num_rows
    if num_rows > limits.max_records:
        return
    number = 0
    for batch in batches:
        for row in batch.to_pylist():
            number += 1
            validator.add({k: v for k, v in row.items() if v is not None}, number, source="arrow")


def _parse_parquet(path: Path, result: ParseResult, validator: RowValidator, limits: ImportLimits) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        _parse_columns(
            parquet.schema_arrow.names,
            parquet.metadata.num_rows,
            parquet.iter_batches(batch_size=1024),
            result,
            validator,
            limits,
        )
    except (pa.ArrowException, UnicodeDecodeError) as exc:
        result.records.clear()
        validator.report(None, None, "unreadable", f"not a readable Parquet file: {exc}")


def _parse_hf(path: Path, result: ParseResult, validator: RowValidator, limits: ImportLimits) -> None:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises many types for a damaged folder; all mean "unreadable"
        validator.report(None, None, "unreadable", f"the datasets folder could not be loaded: {exc}")
        return
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if "train" in loaded:
            loaded = loaded["train"]
        elif len(splits) == 1:
            loaded = loaded[splits[0]]
        else:
            validator.report(
                None,
                None,
                "ambiguous_split",
                f"the dataset has splits {', '.join(splits)} and none is 'train'; save the split to import on its own",
            )
            return
    arrow = loaded.with_format("arrow")
    _parse_columns(
        loaded.column_names, loaded.num_rows, arrow.iter(batch_size=1024), result, validator, limits
    )
