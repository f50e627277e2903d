"""Pure helpers of the annotation UI: span picker values, kept suggestions, download copies, formatting."""

from __future__ import annotations

import json
import math
import zipfile
from types import SimpleNamespace

import pytest

from studio.components.keys import KEYBOARD_JS, VOTE_KEYS
from studio.components.span_picker import TEMPLATE, picker_value, spans_of
from studio.spans import MAX_SPANS
from studio.tabs.annotate import VOTES, progress_text, prompt_text
from studio.tabs.datasets import download_copy
from studio.tabs.segments import Marking, kept_suggestions
from studio.tabs.team import fmt, fmt_interval


def test_spans_of_keeps_only_the_five_span_keys():
    payload = picker_value("abc", [{"start": 0, "end": 1, "polarity": "good", "extra": "<x>"}])
    payload["text"] = "a different text sent by the client"
    assert spans_of(payload) == [{"start": 0, "end": 1, "polarity": "good", "label": None, "comment": None}]
    assert spans_of(None) == []


@pytest.mark.parametrize(
    "payload",
    ["text", {"spans": "nope"}, {"spans": [1]}, {"spans": [{"start": 0}] * (MAX_SPANS + 1)}],
)
def test_spans_of_refuses_other_shapes(payload):
    with pytest.raises(ValueError):
        spans_of(payload)


def test_the_picker_template_has_no_value_or_template_expressions():
    # Model text must never pass through the Handlebars + template-literal rendering.
    assert "${" not in TEMPLATE and "{{" not in TEMPLATE and "`" not in TEMPLATE


def test_kept_suggestions_can_hide_but_never_add():
    stored = (
        {"start": 0, "end": 2, "polarity": "bad", "label": None, "comment": None},
        {"start": 3, "end": 5, "polarity": "good", "label": None, "comment": None},
    )
    marking = Marking(1, 1, 0, "ab cd", (), stored)
    sent = {
        "suggestions": [
            {"start": 3, "end": 5, "polarity": "good"},
            {"start": 0, "end": 5, "polarity": "good"},
        ]
    }
    assert kept_suggestions(marking, sent) == [stored[1]]
    assert kept_suggestions(marking, None) == list(stored)


def test_download_copy_of_a_file_and_of_a_folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    snapshot = data / "votes.jsonl"
    snapshot.write_text('{"a": 1}\n')
    root = tmp_path / "downloads"
    copy = download_copy(snapshot, "snapshot-3-votes", root=root)
    assert copy.name == "snapshot-3-votes.jsonl" and copy.read_text() == '{"a": 1}\n'
    assert root in copy.parents and data not in copy.parents

    folder = data / "hf"
    folder.mkdir()
    (folder / "dataset_info.json").write_text(json.dumps({"x": 1}))
    archive = download_copy(folder, "snapshot-4-prompts", root=root)
    assert archive.suffix == ".zip"
    assert zipfile.ZipFile(archive).namelist() == ["dataset_info.json"]

    # Copies older than the TTL are removed when the next one is made.
    later = download_copy(snapshot, "snapshot-3-votes", root=root, now=copy.stat().st_mtime + 10**6)
    assert later.exists() and not copy.exists() and not archive.exists()


def test_keyboard_shortcuts_click_the_vote_buttons():
    assert set(VOTE_KEYS.values()) == {eid for _, eid, _ in VOTES} | {"vote-skip"}
    for key, elem_id in VOTE_KEYS.items():
        assert json.dumps(key) in KEYBOARD_JS and json.dumps(elem_id) in KEYBOARD_JS
    for text, elem_id, _ in VOTES:
        key = next(k for k, v in VOTE_KEYS.items() if v == elem_id)
        assert text.endswith(f"[{key}]")


def test_progress_and_number_formatting():
    progress = SimpleNamespace(done_by_user=12, remaining_for_user=30, project_done=40, project_total=120)
    assert progress_text(progress) == "12 done · 30 left for you · project 40/120"
    assert prompt_text("x", [{"role": "user", "content": "hi"}]) == "[user]\nhi"
    assert prompt_text("plain", None) == "plain"
    assert fmt(None) == fmt(math.nan) == "–"
    assert fmt(0.123456) == "0.12" and fmt(3) == "3"
    assert fmt_interval((-0.16, 0.5)) == "[-0.16, +0.50]"
    assert fmt_interval(None) == "–"
