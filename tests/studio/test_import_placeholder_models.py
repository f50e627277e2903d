"""An import of preference data registers a weightless stand-in checkpoint ("imported:<file>", kind
policy, status ready) so imported responses have a source. It is no model: the Training tab must not
offer it as a base, the job service must refuse it, and the Generate tab must not list it."""

from __future__ import annotations

import json
from types import SimpleNamespace as NS

import pytest
from job_helpers import ADMIN, make_env, tiny_values

from storage.models import Checkpoint
from storage.preference_store import is_import_placeholder
from studio.services import ServiceError
from studio.tabs.training_view import DEFAULT_BASE, base_choices


def test_placeholder_paths():
    assert is_import_placeholder("imported:" + "a" * 64)
    assert not is_import_placeholder("/models/imported:odd-but-real")
    assert not is_import_placeholder("smollm2") and not is_import_placeholder(None)


def test_base_choices_leave_out_import_placeholders():
    models = [
        NS(id=1, name="tiny", kind="policy", status="ready", path="/m/tiny"),
        NS(id=2, name="imported:prefs.jsonl", kind="policy", status="ready", path="imported:" + "b" * 64),
    ]
    assert base_choices("policy", models) == [("#1 tiny", 1)]
    assert [v for _, v in base_choices("encoder_or_policy", models)] == [DEFAULT_BASE, 1]


@pytest.fixture
def env(db, tmp_path, tiny_model):
    return make_env(db, tmp_path, tiny_model)


def test_an_imported_file_is_no_base_and_no_generation_model(env, tmp_path):
    prefs = tmp_path / "prefs.jsonl"
    rows = [{"prompt": f"Q{i}?", "chosen": f"Answer {i}.", "rejected": "No."} for i in range(4)]
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = env.services.datasets.import_preferences(ADMIN, env.project_id, prefs)
    assert report.committed
    with env.db.read() as s:
        stand_in = next(c for c in s.query(Checkpoint).all() if c.name == "imported:prefs.jsonl")
    assert str(stand_in.kind) == "policy" and str(stand_in.status) == "ready"

    listed = env.services.jobs.checkpoints(ADMIN, env.project_id)
    assert stand_in.id in [c.id for c in listed]  # still in the registry: imported responses point at it
    for kind in ("policy", "encoder_or_policy"):
        assert stand_in.id not in [v for _, v in base_choices(kind, listed)]
    assert env.base_id in [v for _, v in base_choices("policy", listed)]

    preferences = env.services.datasets.export(ADMIN, env.project_id, ["preferences"], "jsonl")[0]
    for recipe, values, snapshot in (
        ("dpo", {"max_steps": "1"}, preferences.id),
        ("reward_model", tiny_values(), env.snapshot_id),
    ):
        with pytest.raises(ServiceError, match=rf"checkpoint {stand_in.id} stands for imported data"):
            env.launch(values, recipe=recipe, snapshot_id=snapshot, base_checkpoint_id=stand_in.id)
    assert env.services.jobs.list_jobs(ADMIN) == []

    names = [m.name for m in env.services.generation.models(env.project_id)]
    assert "imported:prefs.jsonl" not in names and "tiny" in names
