"""Services on a real (per-test) SQLite database: projects, atomic imports, browse, generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlmodel import func, select

from storage import models as m
from storage.db import Database
from studio.generation import SamplingParams
from studio.services import ServiceError, Services
from studio.settings import Settings


@pytest.fixture
def services(db: Database, tmp_path, tiny_model) -> Services:
    settings = Settings(data_dir=tmp_path / "data", database_url="sqlite://", default_model=str(tiny_model))
    return Services.build(settings, db)


@pytest.fixture
def both(any_db: Database, tmp_path, tiny_model) -> Services:
    """The same services on SQLite and on PostgreSQL."""
    settings = Settings(data_dir=tmp_path / "data", database_url="sqlite://", default_model=str(tiny_model))
    return Services.build(settings, any_db)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _count(db: Database, table) -> int:
    with db.read() as s:
        return s.exec(select(func.count()).select_from(table)).one()


def test_create_project_validates_and_versions_guidelines(services: Services):
    info = services.projects.create(
        "  Reviews  ", guidelines="Be kind.", span_labels="tone, off topic, tone,"
    )
    assert (
        info.name == "Reviews" and info.span_labels == ["tone", "off topic"] and info.guideline_version == 1
    )
    assert services.projects.set_guidelines(info.id, "Be kinder.") == 2
    assert services.projects.get(info.id).guidelines == "Be kinder."
    with pytest.raises(ServiceError, match="already exists"):
        services.projects.create("Reviews")
    with pytest.raises(ServiceError, match="empty"):
        services.projects.create("   ")


def test_demo_project_offered_only_on_empty_database(services: Services):
    assert services.projects.is_empty()
    info, report = services.projects.create_demo()
    assert report.committed and report.inserted == info.prompts >= 30
    assert {"review", "instruction", "chat"} <= set(services.prompts.tags(info.id))
    assert not services.projects.is_empty()
    with pytest.raises(ServiceError, match="already exists"):
        services.projects.create_demo()


def test_strict_import_with_one_bad_row_writes_nothing(both: Services, tmp_path):
    services, db = both, both.db
    pid = services.projects.create("p").id
    path = _jsonl(
        tmp_path / "p.jsonl",
        [{"id": "1", "prompt": "fine"}, {"id": "2", "prompt": 5}, {"id": "3", "prompt": "ok"}],
    )
    report = services.prompts.import_file(pid, path)
    assert not report.committed and report.inserted == 0
    assert [(p.line, p.field, p.code) for p in report.problems] == [(2, "prompt", "wrong_type")]
    assert _count(db, m.Prompt) == 0

    lenient = services.prompts.import_file(pid, path, lenient=True)
    assert lenient.committed and lenient.inserted == 2 and len(lenient.problems) == 1
    assert _count(db, m.Prompt) == 2


def test_reimport_policies(both: Services, tmp_path):
    services, db = both, both.db
    pid = services.projects.create("p").id
    first = _jsonl(tmp_path / "a.jsonl", [{"id": "1", "prompt": "one"}, {"id": "2", "prompt": "two"}])
    assert services.prompts.import_file(pid, first).inserted == 2
    second = _jsonl(tmp_path / "b.jsonl", [{"id": "2", "prompt": "TWO"}, {"id": "3", "prompt": "three"}])

    skipped = services.prompts.import_file(pid, second)  # default: skip, and say so
    assert (skipped.inserted, skipped.skipped_existing) == (1, ["2"]) and "skipped 1" in skipped.summary()

    third = _jsonl(tmp_path / "c.jsonl", [{"id": "2", "prompt": "TWO"}, {"id": "4", "prompt": "four"}])
    refused = services.prompts.import_file(pid, third, on_duplicate="error")
    assert not refused.committed and [p.code for p in refused.problems] == ["exists"]
    assert _count(db, m.Prompt) == 3  # strict + error policy: the new row 4 was not written either

    updated = services.prompts.import_file(pid, third, on_duplicate="update")
    assert (updated.inserted, updated.updated) == (1, 1)
    assert services.prompts.browse(pid, query="TWO").rows[0].text == "TWO"


def test_browse_search_tags_and_pages(both: Services, tmp_path):
    services = both
    pid = services.projects.create("p").id
    rows = [
        {
            "id": f"r{i:02d}",
            "prompt": f"prompt number {i} 100%_sure",
            "tags": ["even" if i % 2 == 0 else "odd"],
        }
        for i in range(45)
    ]
    services.prompts.import_file(pid, _jsonl(tmp_path / "p.jsonl", rows))
    page = services.prompts.browse(pid, page=3, page_size=20)
    assert (page.total, page.pages, page.page, len(page.rows)) == (45, 3, 3, 5)
    assert services.prompts.browse(pid, page=99, page_size=20).page == 3
    assert services.prompts.browse(pid, tag="even").total == 23
    assert services.prompts.browse(pid, query="number 4").total == 6  # 4, 40..44
    assert services.prompts.browse(pid, query="%").total == 45  # % is a literal, not a wildcard
    assert services.prompts.browse(pid, query="x%y").total == 0
    other = services.projects.create("other").id
    with pytest.raises(ServiceError, match="not in this project"):
        services.prompts.detail(other, page.rows[0].id)


def test_generate_two_samples_stores_generations_and_pairs(both: Services, tmp_path):
    services, db = both, both.db
    pid = services.projects.create("p").id
    rows = [
        {"id": "t", "prompt": "Write one sentence about the sea."},
        {"id": "c", "messages": [{"role": "user", "content": "Hi!"}]},
    ]
    services.prompts.import_file(pid, _jsonl(tmp_path / "p.jsonl", rows))
    model = services.generation.models(pid)[0]
    seen: list[float] = []
    params = SamplingParams(temperature=1.0, max_new_tokens=6, samples_per_prompt=2, seed=3, batch_size=4)
    report = services.generation.run(
        pid, checkpoint_id=model.checkpoint_id, params=params, progress=lambda f, d: seen.append(f)
    )
    assert (report.prompts, report.generations) == (2, 4)
    assert report.comparisons + report.identical_pairs == 2
    assert seen[-1] == 1.0
    with db.read() as s:
        gens = s.exec(select(m.Generation)).all()
        assert {g.params["max_new_tokens"] for g in gens} == {6} and all(g.seed is not None for g in gens)
    # "missing" selection: a second run finds nothing left to answer for this model.
    assert services.generation.run(pid, checkpoint_id=model.checkpoint_id, params=params).prompts == 0
    detail = services.prompts.detail(pid, services.prompts.browse(pid).rows[0].id)
    assert len(detail.generations) == 2 and detail.generations[0].model == model.name


def test_generate_two_checkpoints_pairs_one_sample_each(services: Services, tmp_path, make_tiny_model):
    other = make_tiny_model(1)
    pid = services.projects.create("p").id
    services.prompts.import_file(pid, _jsonl(tmp_path / "p.jsonl", [{"id": "1", "prompt": "Hello there"}]))
    a = services.generation.models(pid)[0]
    b = services.generation.register_model(str(other), name="other")
    params = SamplingParams(temperature=0.0, max_new_tokens=5, samples_per_prompt=1)
    report = services.generation.run(
        pid,
        checkpoint_id=a.checkpoint_id,
        second_checkpoint_id=b.checkpoint_id,
        pairing="two_checkpoints",
        params=params,
    )
    assert report.generations == 2 and report.comparisons + report.identical_pairs == 1
    with pytest.raises(ServiceError, match="second, different model"):
        services.generation.run(pid, checkpoint_id=a.checkpoint_id, pairing="two_checkpoints", params=params)


def test_register_model_rejects_unknown_reference(services: Services):
    with pytest.raises(ServiceError):
        services.generation.register_model("no/such-model-anywhere")
    with pytest.raises(ServiceError, match="empty"):
        services.generation.register_model("  ")


def test_tags_with_non_ascii_and_quotes_filter_exactly(both: Services, tmp_path):
    services = both
    pid = services.projects.create("p").id
    rows = [
        {"id": "1", "prompt": "a", "tags": ["café", 'say "hi"']},
        {"id": "2", "prompt": "b", "tags": ["cafe"]},
        {"id": "3", "prompt": "c", "tags": ["café-2"]},
    ]
    services.prompts.import_file(pid, _jsonl(tmp_path / "p.jsonl", rows))
    assert [r.external_id for r in services.prompts.browse(pid, tag="café").rows] == ["1"]
    assert [r.external_id for r in services.prompts.browse(pid, tag='say "hi"').rows] == ["1"]
    assert [r.external_id for r in services.prompts.browse(pid, tag="cafe").rows] == ["2"]


def test_update_policy_never_rewrites_prompts_that_have_responses(services: Services, tmp_path):
    pid = services.projects.create("p").id
    services.prompts.import_file(
        pid, _jsonl(tmp_path / "a.jsonl", [{"id": "1", "prompt": "old"}, {"id": "2", "prompt": "two"}])
    )
    model = services.generation.models(pid)[0]
    params = SamplingParams(temperature=0, max_new_tokens=3, samples_per_prompt=1)
    services.generation.run(
        pid, checkpoint_id=model.checkpoint_id, params=params, pairing="none", tag=None, limit=1
    )
    new = _jsonl(tmp_path / "b.jsonl", [{"id": "1", "prompt": "new"}, {"id": "2", "prompt": "TWO"}])
    strict = services.prompts.import_file(pid, new, on_duplicate="update")
    assert not strict.committed and [(p.line, p.code) for p in strict.problems] == [(1, "has_responses")]
    lenient = services.prompts.import_file(pid, new, on_duplicate="update", lenient=True)
    assert lenient.committed and lenient.updated == 1
    assert {r.external_id: r.text for r in services.prompts.browse(pid).rows} == {"1": "old", "2": "TWO"}


def test_ids_differing_only_in_case_from_existing_ones_are_refused(services: Services, tmp_path):
    pid = services.projects.create("p").id
    services.prompts.import_file(pid, _jsonl(tmp_path / "a.jsonl", [{"id": "Ab", "prompt": "x"}]))
    report = services.prompts.import_file(pid, _jsonl(tmp_path / "b.jsonl", [{"id": "aB", "prompt": "y"}]))
    assert not report.committed and [p.code for p in report.problems] == ["ambiguous_id"]


def test_zip_of_a_datasets_folder_imports_and_a_corrupt_zip_is_a_clear_problem(services: Services, tmp_path):
    import shutil

    from datasets import Dataset

    pid = services.projects.create("p").id
    Dataset.from_list([{"id": "z1", "prompt": "from a zip"}]).save_to_disk(str(tmp_path / "ds"))
    archive = shutil.make_archive(str(tmp_path / "ds"), "zip", tmp_path, "ds")
    report = services.prompts.import_file(pid, archive)
    assert report.committed and report.inserted == 1 and report.format == "hf"
    broken = tmp_path / "broken.zip"
    broken.write_bytes(Path(archive).read_bytes()[:200])
    bad = services.prompts.import_file(pid, broken)
    assert not bad.committed and [p.code for p in bad.problems] == ["bad_zip"]
    assert "not a readable zip" in bad.problems[0].message


def test_models_are_shared_between_projects(services: Services, make_tiny_model):
    a, b = services.projects.create("a").id, services.projects.create("b").id
    folder = str(make_tiny_model(2))
    registered = services.generation.register_model(folder, name="mine")
    assert registered.checkpoint_id in [m.checkpoint_id for m in services.generation.models(a)]
    assert registered.checkpoint_id in [m.checkpoint_id for m in services.generation.models(b)]
    assert services.generation.register_model(folder) == registered  # registered once


def test_demo_project_is_removed_when_its_prompts_fail_to_import(services: Services, tmp_path, monkeypatch):
    from studio.services import projects as projects_module

    broken = _jsonl(tmp_path / "demo.jsonl", [{"id": "1", "prompt": 3}])
    monkeypatch.setattr(projects_module, "DEMO_FILE", broken)
    with pytest.raises(ServiceError, match="did not import"):
        services.projects.create_demo()
    assert services.projects.is_empty()  # offered again, not half there


def test_each_batch_of_a_run_gets_its_own_recorded_seed(services: Services, db: Database, tmp_path):
    pid = services.projects.create("p").id
    services.prompts.import_file(
        pid, _jsonl(tmp_path / "p.jsonl", [{"id": str(i), "prompt": f"p{i}"} for i in range(5)])
    )
    model = services.generation.models(pid)[0]
    params = SamplingParams(temperature=1.0, max_new_tokens=3, samples_per_prompt=2, seed=100, batch_size=4)
    report = services.generation.run(pid, checkpoint_id=model.checkpoint_id, params=params)
    assert report.seed == 100 and "seed 100" in report.summary()
    with db.read() as s:
        seeds = sorted({g.seed for g in s.exec(select(m.Generation)).all()})
    assert seeds == [100, 101, 102]  # 5 prompts x 2 samples in batches of 4 -> 3 batches
