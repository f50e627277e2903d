"""What the Team tab reads besides agreement: the project's overlap settings (ProjectInfo) and the
list of comparisons for gold marking (`AnnotationService.comparisons`), on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from annotation_service_helpers import add_users, make_service, seed_project
from sqlmodel import select

from storage import crud
from storage import models as m
from storage.annotation import ComparisonOverview
from storage.annotation_queue import overlap_selected
from studio.generation import SamplingParams
from studio.services import Services
from studio.services.errors import Forbidden, NotFound, Unauthorized
from studio.settings import Settings
from studio.tabs.team import comparison_frame, excerpt, overlap_line


def test_project_info_shows_the_overlap_settings(db, tmp_path):
    add_users(db, ["root"], role=m.Role.admin)
    services = Services.build(Settings(data_dir=tmp_path / "data", database_url="sqlite://"), db)
    info = services.projects.create("Overlap")
    assert (info.overlap_fraction, info.overlap_k) == (0.0, 1)  # the defaults of a new project
    services.annotation.set_overlap("root", info.id, 0.25, 3)
    again = services.projects.get(info.id)
    assert (again.overlap_fraction, again.overlap_k) == (0.25, 3)
    assert [(p.overlap_fraction, p.overlap_k) for p in services.projects.list()] == [(0.25, 3)]


def test_generated_pairs_take_the_overlap_share_by_the_stable_hash(db, tmp_path, tiny_model):
    """Generation picks the overlap items as `set_overlap` does, so re-saving the settings changes nothing."""
    add_users(db, ["root"], role=m.Role.admin)
    settings = Settings(data_dir=tmp_path / "data", database_url="sqlite://", default_model=str(tiny_model))
    services = Services.build(settings, db)
    pid = services.projects.create("Half overlap").id
    services.annotation.set_overlap("root", pid, 0.5, 3)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"id": "q{i}", "prompt": "Say {i}."}}\n' for i in range(16)))
    assert services.prompts.import_file(pid, prompts).committed
    model = services.generation.models(pid)[0]
    params = SamplingParams(temperature=1.0, max_new_tokens=4, seed=5, batch_size=16)
    assert services.generation.run(pid, checkpoint_id=model.checkpoint_id, params=params).comparisons >= 12
    with db.read() as s:
        generated = dict(s.exec(select(m.Comparison.id, m.Comparison.required_votes)).all())
    assert generated == {cid: 3 if overlap_selected(pid, cid, 0.5) else 1 for cid in generated}
    assert set(generated.values()) == {1, 3}
    assert services.annotation.set_overlap("root", pid, 0.5, 3) == len(generated)  # all unvoted ...
    with db.read() as s:
        assert (
            dict(s.exec(select(m.Comparison.id, m.Comparison.required_votes)).all()) == generated
        )  # ... same


def test_comparisons_list_votes_required_and_gold(any_db, tmp_path):
    add_users(any_db, ["ann", "bob"])
    add_users(any_db, ["root"], role=m.Role.admin)
    pid, ids, _ = seed_project(any_db, comparisons=3, required=2)
    other, other_ids, _ = seed_project(any_db, comparisons=1)
    with any_db.write() as s:  # a long chat-like prompt and an arena comparison (never listed)
        c = s.get(m.Comparison, ids[2])
        s.get(m.Prompt, c.prompt_id).text = "x" * 300
        crud.add_comparison(
            s,
            project_id=pid,
            prompt_id=c.prompt_id,
            generation_a_id=c.generation_b_id,
            generation_b_id=c.generation_a_id,
            purpose=m.ComparisonPurpose.arena,
        )
    service = make_service(any_db, tmp_path)
    voted = {}
    for name in ("ann", "bob"):
        item = service.next_pairwise(name, pid)
        service.submit_vote(name, item.assignment_id, "tie", None, None, f"k-{name}", 1000)
        voted[name] = item.comparison_id
    service.set_gold("root", ids[1], "b")

    rows = service.comparisons("root", pid)
    assert [r.id for r in rows] == ids  # by id; the arena pair and the other project are left out
    votes = {cid: 0 for cid in ids}
    for cid in voted.values():
        votes[cid] += 1
    assert {r.id: r.votes for r in rows} == votes
    assert {r.required_votes for r in rows} == {2}
    assert [r.gold_outcome for r in rows] == [None, "b", None]
    assert rows[0].prompt_excerpt == "prompt 0"
    assert rows[2].prompt_excerpt == "x" * 120  # only an excerpt is read
    assert [r.id for r in service.comparisons("root", pid, limit=2)] == ids[:2]
    assert [r.id for r in service.comparisons("root", other)] == other_ids

    with pytest.raises(Forbidden):
        service.comparisons("ann", pid)
    with pytest.raises(Unauthorized):
        service.comparisons(None, pid)
    with pytest.raises(NotFound):
        service.comparisons("root", 10_000)


def test_team_tab_formats_the_list_as_plain_cells():
    assert excerpt("  two\n\nlines\tand  spaces ") == "two lines and spaces"
    assert excerpt("y" * 100, 10) == "y" * 9 + "…"
    rows = [
        ComparisonOverview(1, "<img src=x onerror=alert(1)>", 1, 2, None),
        ComparisonOverview(2, "**bold**", 2, 2, "both_bad"),
    ]
    frame = comparison_frame(rows)
    assert frame.values.tolist() == [
        [1, "<img src=x onerror=alert(1)>", "1 / 2", "–"],
        [2, "**bold**", "2 / 2", "Both bad"],
    ]
    assert overlap_line(1.0, 2) == "**Now:** 100% of the items get 2 annotators; the rest get one."
    assert overlap_line(0.5, 1).startswith("**Now:** one annotator per item")
