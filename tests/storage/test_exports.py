"""Snapshots (rows, formats, hashes, atomic writes) and the import of public preference data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from datasets_factory import add_user, seed_project, spans, vote
from sqlmodel import func, select

from storage import exports_io
from storage.export_data import IMPORT_USERNAME, SpanData, prompt_sha256
from storage.exports import ExportFilters, stepwise_segments
from storage.exports_io import read_snapshot, sha256_path
from storage.models import Checkpoint, Comparison, DatasetSnapshot, Generation, PairwiseVote, Prompt, User
from studio.services.datasets import DatasetService
from studio.services.errors import Forbidden, ServiceError
from studio.services.users import UserService
from studio.settings import Settings

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]


@pytest.fixture
def svc(db, tmp_path) -> DatasetService:
    settings = Settings(data_dir=tmp_path / "data", database_url="sqlite://")
    add_user(db, "root", "admin")
    return DatasetService(db, settings, UserService(db, settings))


def _count(db, table) -> int:
    with db.read() as s:
        return s.exec(select(func.count()).select_from(table)).one()


def _votes_project(db, prompts=None, **kw):
    """c0: a, a, b (clear, much) -> a; c1: tie, tie; c2: both_bad x2; c3: a vs b split."""
    u, v, w = (add_user(db, n) for n in ("ann", "bob", "cyd"))
    seed = seed_project(db, prompts=prompts or ["p0", "p1", "p2", "p3"], **kw)
    c0, c1, c2, c3 = seed.comparisons
    vote(db, c0, u, "a", strength="clear", guideline_version=1)
    vote(db, c0, v, "a", strength="much", a_left=False, guideline_version=2)
    vote(db, c0, w, "b", strength="slight")
    vote(db, c1, u, "tie")
    vote(db, c1, v, "tie")
    vote(db, c2, u, "both_bad")
    vote(db, c2, w, "both_bad")
    vote(db, c3, u, "a")
    vote(db, c3, v, "b")
    return seed, (u, v, w)


# --------------------------------------------------------------------------- rows and formats


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf"])
def test_preferences_round_trip_with_provenance_and_sha(db, svc, fmt, tmp_path):
    seed, (u, v, w) = _votes_project(db)
    [info] = svc.export("root", seed.project_id, ["preferences"], fmt)
    assert info.kind == "preferences" and info.format == fmt and info.row_count == 1
    path = Path(info.path)
    assert path.parent.parent == tmp_path / "data" / "exports" / str(seed.project_id)
    assert info.sha256 == sha256_path(path)
    if fmt != "hf":
        assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    # counts say why the other three comparisons gave no pair
    assert info.counts["tie"] == 1 and info.counts["both_bad"] == 1 and info.counts["split"] == 1
    [row] = read_snapshot(path)
    assert (row["prompt"], row["chosen"], row["rejected"]) == ("p0", "A0 answer é 😀", "B0 reply")
    assert row["prompt_id"] == hashlib.sha256(b"p0").hexdigest()
    assert row["pair_id"] == seed.comparisons[0] and row["rater_ids"] == [u, v, w]
    assert row["n_votes"] == 3 and row["agreement"] == pytest.approx(2 / 3)
    assert row["outcome"] == "a" and row["strength"] == "clear"  # lower median of clear, much
    assert row["shown_order"] == ["ab", "ba", "ab"] and row["guideline_version"] == 2
    assert (row["chosen_model"], row["rejected_model"]) == ("model-a", "model-b")
    assert row["snapshot_id"] == path.parent.name
    with db.read() as s:
        stored = s.exec(select(DatasetSnapshot)).one()
    assert (stored.sha256, stored.row_count, stored.path) == (info.sha256, 1, str(path))
    assert svc.verify("root", info.id)


def test_jsonl_is_utf8_unescaped_and_loads_with_datasets(db, svc, tmp_path):
    import datasets

    seed, _ = _votes_project(db)
    [info] = svc.export("root", seed.project_id, ["preferences"], "jsonl")
    text = Path(info.path).read_text(encoding="utf-8")
    assert "é 😀" in text and "\\u" not in text
    ds = datasets.load_dataset("json", data_files=info.path, split="train", cache_dir=str(tmp_path / "c"))
    assert ds[0]["chosen"] == "A0 answer é 😀"


def test_chat_prompts_are_conversational_and_mixed_projects_wrap_text_prompts(db, svc):
    seed, _ = _votes_project(db, prompts=[CHAT, "p1", "p2", "plain text"])
    vote(db, seed.comparisons[3], add_user(db, "dan"), "b")  # c3 now a, b, b -> b
    [info] = svc.export("root", seed.project_id, ["preferences"], "jsonl")
    rows = read_snapshot(Path(info.path))
    assert info.counts["conversational"] is True and len(rows) == 2
    assert rows[0]["prompt"] == CHAT and rows[0]["chosen"] == [
        {"role": "assistant", "content": "A0 answer é 😀"}
    ]
    assert rows[0]["prompt_id"] == prompt_sha256(CHAT)
    assert rows[1]["prompt"] == [{"role": "user", "content": "plain text"}]  # one user turn
    assert rows[1]["chosen"] == [{"role": "assistant", "content": "B3 reply"}]
    [std] = svc.export("root", seed.project_id, ["preferences"], "jsonl", {"prompt_format": "standard"})
    assert read_snapshot(Path(std.path))[0]["prompt"] == "system: Be brief.\nuser: Hi?"


def test_reward_rows_are_implicit_with_margins_and_optional_tie_pairs(db, svc):
    seed, _ = _votes_project(db, prompts=[CHAT, "p1", "p2", "p3"])
    [info] = svc.export("root", seed.project_id, ["reward"], "jsonl")
    [row] = read_snapshot(Path(info.path))
    assert row["chosen"] == [*CHAT, {"role": "assistant", "content": "A0 answer é 😀"}]
    assert row["rejected"] == [*CHAT, {"role": "assistant", "content": "B0 reply"}]
    assert row["margin"] == 1.0 and "prompt" not in row  # clear -> 1.0
    [ties] = svc.export("root", seed.project_id, ["reward"], "parquet", {"include_ties": True})
    rows = read_snapshot(Path(ties.path))
    tie_rows = [r for r in rows if r["outcome"] == "tie"]
    assert len(rows) == 3 and [r["margin"] for r in tie_rows] == [0.0, 0.0]
    assert tie_rows[0]["chosen"] == tie_rows[1]["rejected"]  # mirrored: no side is preferred


@pytest.mark.parametrize(("strengths", "margin"), [(["slight"], 0.5), (["much"], 2.0), ([None], 1.0)])
def test_strength_to_margin(db, svc, strengths, margin):
    seed = seed_project(db, prompts=["x"])
    for i, s in enumerate(strengths):
        vote(db, seed.comparisons[0], add_user(db, f"u{i}"), "b", strength=s)
    [info] = svc.export("root", seed.project_id, ["reward"], "jsonl")
    [row] = read_snapshot(Path(info.path))
    assert row["margin"] == margin and row["chosen"] == "xB0 reply" and row["rejected"] == "xA0 answer é 😀"


def test_unpaired_rows_map_decisive_and_both_bad(db, svc):
    seed, _ = _votes_project(db)
    [info] = svc.export("root", seed.project_id, ["unpaired"], "jsonl")
    rows = read_snapshot(Path(info.path))
    got = [(r["prompt"], r["completion"], r["label"], r["outcome"]) for r in rows]
    assert got == [
        ("p0", "A0 answer é 😀", True, "a"),
        ("p0", "B0 reply", False, "a"),
        ("p2", "A2 answer é 😀", False, "both_bad"),
        ("p2", "B2 reply", False, "both_bad"),
    ]  # the tie (p1) and the split (p3) give nothing
    assert rows[0]["model"] == "model-a" and rows[1]["generation_id"] == seed.generations[(0, "b")]


def test_segments_code_point_offsets_and_stepwise_rebuild(db, svc):
    seed = seed_project(db, prompts=["p0"])
    u, v = add_user(db, "ann"), add_user(db, "bob")
    g = seed.generations[(0, "a")]  # "A0 answer é 😀": the emoji is one code point at offset 12
    spans(db, g, u, [(10, 13, "bad", "tone", "emoji?"), (0, 2, "good")])
    spans(db, g, v, [])
    seg, step = svc.export("root", seed.project_id, ["segments", "stepwise"], "jsonl")
    assert Path(seg.path).parent == Path(step.path).parent  # one folder per export
    rows = read_snapshot(Path(seg.path))
    assert [len(r["spans"]) for r in rows] == [2, 0]
    first = rows[0]["spans"]
    assert first[0] == {
        "start": 0,
        "end": 2,
        "polarity": "good",
        "label": None,
        "comment": None,
        "text": "A0",
    }
    assert first[1]["text"] == "é 😀" and first[1]["label"] == "tone" and first[1]["comment"] == "emoji?"
    assert rows[0]["response_sha256"] == hashlib.sha256("A0 answer é 😀".encode()).hexdigest()
    assert seg.counts["offsets"] == "codepoint"
    steps = read_snapshot(Path(step.path))
    assert steps[0]["completions"] == ["A0", " answer ", "é 😀"] and steps[0]["labels"] == [True, True, False]
    assert steps[1]["completions"] == ["A0 answer é 😀"] and steps[1]["labels"] == [True]
    assert all("".join(r["completions"]) == "A0 answer é 😀" for r in steps)
    assert step.kind == "stepwise" and svc.list_snapshots("root", seed.project_id)[0].kind == "stepwise"
    with db.read() as s:
        assert {str(r.kind) for r in s.exec(select(DatasetSnapshot)).all()} == {"segments"}


def test_stepwise_segments_overlaps_bad_wins():
    text = "abcdefghij"
    segs, labels = stepwise_segments(
        text,
        [
            SpanData(2, 6, "good", None, None),
            SpanData(4, 8, "bad", None, None),
            SpanData(9, 10, "good", None, None),
        ],
    )
    assert segs == ["ab", "cd", "ef", "gh", "i", "j"]
    assert labels == [True, True, False, False, True, True]
    assert stepwise_segments("", []) == ([], [])


def test_votes_kind_has_every_raw_vote(db, svc):
    seed, _ = _votes_project(db)
    [info] = svc.export("root", seed.project_id, ["votes"], "parquet")
    rows = read_snapshot(Path(info.path))
    assert len(rows) == 9 and info.counts["tie"] == 2
    bob = next(r for r in rows if r["rater"] == "bob" and r["pair_id"] == seed.comparisons[0])
    assert bob["outcome"] == "a" and bob["strength"] == "much" and bob["shown_order"] == "ba"
    assert bob["guideline_version"] == 2 and bob["created_at"] and bob["response_b"] == "B0 reply"


def test_filters_min_votes_agreement_tag_and_allowlist(db, svc):
    seed, _ = _votes_project(db, tags=[["keep"], [], [], []])
    with pytest.raises(ServiceError, match="nothing to export for preferences"):
        svc.export("root", seed.project_id, ["preferences"], "jsonl", {"min_agreement": 0.7})
    with pytest.raises(ServiceError, match="below min_votes"):
        svc.export("root", seed.project_id, ["preferences"], "jsonl", {"min_votes": 4})
    [info] = svc.export("root", seed.project_id, ["votes"], "jsonl", {"tag": "keep"})
    assert info.row_count == 3 and info.filters["tag"] == "keep"
    for bad in ({"user__password": 1}, {"min_votes": 0}, {"min_agreement": 2}, {"prompt_format": "x"}):
        with pytest.raises(ServiceError):
            svc.export("root", seed.project_id, ["votes"], "jsonl", bad)
    with pytest.raises(ServiceError, match="unknown export kind"):
        svc.export("root", seed.project_id, ["everything"], "jsonl")
    with pytest.raises(ServiceError, match="format"):
        svc.export("root", seed.project_id, ["votes"], "csv")
    assert ExportFilters.from_dict({"tag": ""}).tag is None


def test_export_is_admin_only_and_empty_kinds_write_nothing(db, svc, tmp_path):
    seed = seed_project(db)
    add_user(db, "ann")
    with pytest.raises(Forbidden):
        svc.export("ann", seed.project_id, ["votes"], "jsonl")
    with pytest.raises(Forbidden):
        svc.list_snapshots("ann", seed.project_id)
    with pytest.raises(ServiceError, match="2 comparisons, 2 without votes"):
        svc.export("root", seed.project_id, ["prompts", "preferences"], "jsonl")
    assert not (tmp_path / "data" / "exports").exists() and _count(db, DatasetSnapshot) == 0


def test_export_is_atomic_when_a_write_fails(db, svc, tmp_path, monkeypatch):
    seed, _ = _votes_project(db)

    def broken(rows, path):
        Path(path).write_text("half")
        raise OSError("disk full")

    monkeypatch.setitem(exports_io._WRITERS, "jsonl", (broken, ".jsonl"))
    with pytest.raises(OSError, match="disk full"):
        svc.export("root", seed.project_id, ["votes", "prompts"], "jsonl")
    parent = tmp_path / "data" / "exports" / str(seed.project_id)
    assert list(parent.iterdir()) == [] and _count(db, DatasetSnapshot) == 0


def test_export_removes_files_when_the_database_write_fails(db, svc, tmp_path, monkeypatch):
    seed, _ = _votes_project(db)
    monkeypatch.setattr("studio.services.datasets.DatasetSnapshot", None)  # building the row fails
    with pytest.raises(TypeError):
        svc.export("root", seed.project_id, ["votes"], "jsonl")
    assert list((tmp_path / "data" / "exports" / str(seed.project_id)).iterdir()) == []


def test_verify_detects_a_changed_snapshot(db, svc):
    seed, _ = _votes_project(db)
    jsonl, hf = (svc.export("root", seed.project_id, ["votes"], f)[0] for f in ("jsonl", "hf"))
    assert svc.verify("root", jsonl.id) and svc.verify("root", hf.id)
    Path(jsonl.path).write_text("{}\n")
    arrow = next(Path(hf.path).glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes() + b"x")
    assert not svc.verify("root", jsonl.id) and not svc.verify("root", hf.id)
    assert [s.id for s in svc.list_snapshots("root", seed.project_id)] == [hf.id, jsonl.id]


# --------------------------------------------------------------------------- import


def _write(path: Path, rows: list[dict], fmt: str = "jsonl") -> Path:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "parquet":
        exports_io.write_parquet(rows, path)
    else:
        exports_io.write_hf(rows, path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf"])
def test_import_explicit_standard_and_export_again(db, svc, tmp_path, fmt):
    seed = seed_project(db, prompts=["Say hi."])  # "Say hi." exists: matched by text
    rows = [
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No.", "strength": "much", "score_chosen": 9},
        {"prompt": "New prompt", "chosen": "good", "rejected": "bad"},
        {"prompt": "New prompt", "chosen": "better", "rejected": "bad"},
    ]
    name = {"jsonl": "pairs.jsonl", "parquet": "pairs.parquet", "hf": "pairs_hf"}[fmt]
    report = svc.import_preferences("root", seed.project_id, _write(tmp_path / name, rows, fmt))
    assert report.committed, report.problems
    assert (report.prompts_new, report.prompts_matched) == (1, 1)
    assert (report.generations, report.comparisons, report.votes) == (5, 3, 3)  # "bad" stored once
    assert report.shapes == {"explicit": 3}
    with db.read() as s:
        user = s.exec(select(User).where(User.username == IMPORT_USERNAME)).one()
        assert (str(user.role), user.is_active, user.password_hash) == ("annotator", False, None)
        ckpt = s.get(Checkpoint, report.checkpoint_id)
        assert ckpt.name == f"imported:{name}" and ckpt.path == f"imported:{sha256_path(tmp_path / name)}"
        new = s.exec(select(Prompt).where(Prompt.text == "New prompt")).one()
        assert new.tags == ["imported"] and new.external_id.startswith("sha256:")
    [info] = svc.export("root", seed.project_id, ["preferences"], "jsonl")
    out = read_snapshot(Path(info.path))
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in out] == [
        (r["prompt"], r["chosen"], r["rejected"]) for r in rows
    ]
    assert out[0]["strength"] == "much" and out[0]["chosen_model"] == f"imported:{name}"


def test_import_conversational_explicit_and_implicit(db, svc, tmp_path):
    seed = seed_project(db, prompts=[CHAT])
    assistant = lambda t: {"role": "assistant", "content": t}  # noqa: E731
    rows = [
        {"prompt": CHAT, "chosen": [assistant("Yes.")], "rejected": [assistant("Nope, never.")]},
        {"chosen": [*CHAT, assistant("Sure.")], "rejected": [*CHAT, assistant("Go away.")]},
        {
            "chosen": [{"role": "user", "content": "Q"}, assistant("A1")],
            "rejected": [{"role": "user", "content": "Q"}, assistant("A2")],
        },
    ]
    report = svc.import_preferences("root", seed.project_id, _write(tmp_path / "chat.jsonl", rows))
    assert report.committed and report.shapes == {"explicit": 1, "implicit": 2}
    assert (report.prompts_matched, report.prompts_new) == (1, 1)
    with db.read() as s:
        q = s.exec(select(Prompt).where(Prompt.text == "user: Q")).one()
        assert str(q.kind) == "chat" and q.messages == [{"role": "user", "content": "Q"}]
    [info] = svc.export("root", seed.project_id, ["preferences"], "jsonl")
    out = read_snapshot(Path(info.path))
    assert out[1]["prompt"] == CHAT and out[1]["chosen"] == [assistant("Sure.")]


def test_import_unpaired_rows_become_generations_and_both_bad_votes(db, svc, tmp_path):
    seed = seed_project(db, prompts=["x"])
    rows = [
        {"prompt": "u1", "completion": "meh", "label": False},
        {"prompt": "u1", "completion": "awful", "label": False},
        {"prompt": "u2", "completion": "great", "label": True},
        {"prompt": "u2", "completion": "poor", "label": False},
    ]
    report = svc.import_preferences("root", seed.project_id, _write(tmp_path / "kto.jsonl", rows))
    assert report.committed and report.generations == 4 and report.both_bad == 1 and report.comparisons == 1
    with db.read() as s:
        labels = {g.text: g.params["label"] for g in s.exec(select(Generation)).all() if g.params}
        assert labels == {"meh": False, "awful": False, "great": True, "poor": False}
        assert s.exec(select(PairwiseVote.outcome).join(Comparison)).all() == ["both_bad"]
    [info] = svc.export("root", seed.project_id, ["unpaired"], "jsonl")
    assert [(r["completion"], r["label"]) for r in read_snapshot(Path(info.path))] == [
        ("meh", False),
        ("awful", False),
    ]


def test_bad_rows_report_line_and_field_and_write_nothing(db, svc, tmp_path):
    seed = seed_project(db)
    before = {t: _count(db, t) for t in (Prompt, Generation, Comparison, PairwiseVote, Checkpoint, User)}
    lines = [
        json.dumps({"prompt": "ok", "chosen": "a", "rejected": "b"}),
        json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}),
        "{not json",
        json.dumps({"prompt": "p", "chosen": "a"}),
        json.dumps({"prompt": CHAT, "chosen": "plain", "rejected": "plain2"}),
        json.dumps({"chosen": "a b", "rejected": "a c"}),
        json.dumps({"prompt": "q", "completion": "c", "label": "yes"}),
        json.dumps({"prompt": "ok", "chosen": "b", "rejected": "a"}),
        json.dumps({"prompt": "r", "chosen": "x", "rejected": "y", "strength": "huge"}),
        json.dumps(
            {
                "prompt": [{"role": "user", "content": "hi"}],
                "chosen": [{"role": "user", "content": "x"}],
                "rejected": [{"role": "assistant", "content": "y"}],
            }
        ),
        json.dumps({"prompt": 5, "chosen": "x", "rejected": "y", "weird": 1}),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = svc.import_preferences("root", seed.project_id, path, display_name="upload.jsonl")
    assert not report.committed and "Nothing imported" in report.summary()
    got = {(p.line, p.field, p.code) for p in report.problems}
    assert got == {
        (2, "rejected", "identical_pair"),
        (3, None, "bad_json"),
        (4, "rejected", "missing_field"),
        (5, "chosen", "mixed_format"),
        (6, "chosen", "implicit_standard"),
        (7, "label", "wrong_type"),
        (8, "chosen", "duplicate_pair"),
        (9, "strength", "bad_strength"),
        (10, "chosen", "bad_messages"),
        (11, "weird", "unknown_field"),
        (11, "prompt", "wrong_type"),
    }
    assert all(p.file == "upload.jsonl" for p in report.problems)
    assert {t: _count(db, t) for t in before} == before


def test_bad_parquet_row_numbers_and_unsupported_files(db, svc, tmp_path):
    seed = seed_project(db)
    rows = [{"prompt": "a", "chosen": "x", "rejected": "y"}, {"prompt": "b", "chosen": "", "rejected": "y"}]
    report = svc.import_preferences("root", seed.project_id, _write(tmp_path / "p.parquet", rows, "parquet"))
    assert [(p.line, p.field, p.code) for p in report.problems] == [(2, "chosen", "empty_text")]
    assert not report.committed and _count(db, PairwiseVote) == 0
    (tmp_path / "x.csv").write_text("prompt,chosen,rejected\na,b,c\n")
    report = svc.import_preferences("root", seed.project_id, tmp_path / "x.csv")
    assert [p.code for p in report.problems] == ["unsupported_format"]


def test_same_file_twice_is_refused(db, svc, tmp_path):
    seed = seed_project(db)
    path = _write(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "x", "rejected": "y"}])
    assert svc.import_preferences("root", seed.project_id, path).committed
    again = svc.import_preferences("root", seed.project_id, path)
    assert not again.committed and [p.code for p in again.problems] == ["already_imported"]
    assert _count(db, PairwiseVote) == 1
    other = seed_project(db, name="Other")
    assert svc.import_preferences("root", other.project_id, path).committed  # another project is fine
    with pytest.raises(Forbidden):
        add_user(db, "ann")
        svc.import_preferences("ann", seed.project_id, path)


def test_export_and_import_on_both_databases(any_db, tmp_path):
    db = any_db
    settings = Settings(data_dir=tmp_path / "data", database_url="sqlite://")
    add_user(db, "root", "admin")
    svc = DatasetService(db, settings, UserService(db, settings))
    seed, (u, _, _) = _votes_project(db, prompts=[CHAT, "p1", "p2", "p3"])
    spans(db, seed.generations[(0, "a")], u, [(0, 2, "good")])
    infos = svc.export("root", seed.project_id, ["preferences", "unpaired", "segments", "votes"], "parquet")
    assert [i.row_count for i in infos] == [1, 4, 1, 9]
    rows = [
        {
            "prompt": CHAT,
            "chosen": [{"role": "assistant", "content": "Ok."}],
            "rejected": [{"role": "assistant", "content": "No."}],
        }
    ]
    report = svc.import_preferences("root", seed.project_id, _write(tmp_path / "chat.jsonl", rows))
    assert report.committed and report.prompts_matched == 1
    [again] = svc.export("root", seed.project_id, ["preferences"], "jsonl")
    assert [r["chosen"][0]["content"] for r in read_snapshot(Path(again.path))] == ["A0 answer é 😀", "Ok."]
    assert len(svc.list_snapshots("root", seed.project_id)) == 5
