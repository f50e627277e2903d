"""Every bad-input fixture, imported strictly through the service, is refused and writes nothing;
leniently, exactly the good rows land. (The parser's codes and lines are tested in storage/.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlmodel import func, select

from storage import models as m
from storage.imports import parse_prompt_file
from studio.services import Services
from studio.settings import Settings

BAD = Path(__file__).resolve().parents[1] / "fixtures" / "bad_inputs"
# Written out by hand so a parser that starts accepting a bad file fails here instead of
# silently dropping the case: these import strictly (the last one with a warning), the rest are refused.
ACCEPTED = {
    "csv_bom_crlf_multiline.csv",
    "csv_formula_payloads.csv",
    "csv_id_leading_zeros.csv",
    "csv_unicode_exact.csv",
    "jsonl_blank_lines.jsonl",
    "jsonl_bom_crlf.jsonl",
    "jsonl_unicode_exact.jsonl",
    "csv_extra_column.csv",  # unknown column: a warning, the column is ignored
}
REFUSED = sorted(p.name for p in BAD.iterdir() if p.name not in ACCEPTED)


@pytest.fixture
def services(db, tmp_path) -> Services:
    return Services.build(Settings(data_dir=tmp_path, database_url="sqlite://"), db)


def _prompts(services: Services) -> int:
    with services.db.read() as s:
        return s.exec(select(func.count(m.Prompt.id))).one()


def test_there_are_many_refused_fixtures():
    assert len(REFUSED) == 36


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_strict_import_of_acceptable_file_commits(services: Services, name: str):
    pid = services.projects.create("p").id
    report = services.prompts.import_file(pid, BAD / name)
    assert report.committed and report.inserted == _prompts(services) > 0
    assert all(p.code == "unknown_field" for p in report.problems)


@pytest.mark.parametrize("name", REFUSED)
def test_strict_import_of_bad_file_writes_nothing(services: Services, name: str):
    pid = services.projects.create("p").id
    report = services.prompts.import_file(pid, BAD / name)
    assert not report.committed and report.inserted == 0 and report.problems
    assert "Nothing imported" in report.summary()
    assert _prompts(services) == 0

    lenient = services.prompts.import_file(pid, BAD / name, lenient=True)
    assert _prompts(services) == lenient.inserted == len(parse_prompt_file(BAD / name).records)
