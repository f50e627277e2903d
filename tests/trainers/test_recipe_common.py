"""The plumbing the recipes share: the resume check, the step plan, evaluation sharding."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from trainers.checkpoint import step_dir, write_checkpoint
from trainers.config import ConfigError, OptimConfig
from trainers.recipe_common import HARMLESS_FIELDS, RESUME_KEYS, check_resumable, plan_steps, shard


def studio(**changes) -> dict:
    base = {"config": {"lr": 1.0, "progress": True, "fast": True}, "snapshot_sha256": "a",
            "eval_snapshot_sha256": None, "span_snapshot_sha256": "s", "world_size": 1}  # fmt: skip
    config = {**base["config"], **changes.pop("config", {})}
    return {**base, **changes, "config": config}


@pytest.fixture
def latest(tmp_path):
    return write_checkpoint(step_dir(tmp_path, 2), lambda tmp: None, {**studio(), "step": 2})


def test_check_resumable_returns_the_old_studio_json_when_nothing_that_matters_changed(latest):
    previous = check_resumable("run", True, latest, studio(config={"progress": False}))
    assert previous["step"] == 2 and previous["config"]["progress"] is True


def test_check_resumable_names_what_changed(latest):
    with pytest.raises(ConfigError, match="lr, world_size changed") as info:
        check_resumable("run", True, latest, studio(config={"lr": 2.0}, world_size=2))
    assert info.value.field == "lr"
    with pytest.raises(ConfigError, match="set resume: true"):
        check_resumable("run", False, latest, studio())


def test_check_resumable_takes_a_recipes_own_harmless_fields_and_keys(latest):
    faster = studio(config={"fast": False})
    with pytest.raises(ConfigError, match="fast changed"):
        check_resumable("run", True, latest, faster)
    check_resumable("run", True, latest, faster, harmless=HARMLESS_FIELDS | {"fast"})
    other_spans = studio(span_snapshot_sha256="t")
    check_resumable("run", True, latest, other_spans)  # not compared unless asked for
    with pytest.raises(ConfigError, match="span_snapshot_sha256 changed"):
        check_resumable("run", True, latest, other_spans, keys=(*RESUME_KEYS, "span_snapshot_sha256"))


@pytest.mark.parametrize(("n", "world"), [(1, 1), (32, 1), (32, 2), (33, 2), (5, 4), (3, 4)])
def test_shards_are_equal_sized_and_cover_every_item_once_in_order(n, world):
    shards = [shard(n, world, rank) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1
    assert [i for s in shards for i in s][:n] == list(range(n))  # gather, then [:n]


def test_plan_steps_counts_epochs_and_refuses_a_batch_larger_than_the_data():
    cfg = SimpleNamespace(snapshot="data.jsonl", batch_size=2, optim=OptimConfig(grad_accum=2), seed=0,
                          max_steps=0, epochs=1.5)  # fmt: skip
    sampler, steps = plan_steps(cfg, 2, 40)
    assert sampler.global_batch == 8 and steps == 7  # 5 steps an epoch
    assert plan_steps(SimpleNamespace(**{**vars(cfg), "max_steps": 3}), 2, 40)[1] == 3
    with pytest.raises(ConfigError, match=r"one step needs 8 pairs .* has 7 training pairs") as info:
        plan_steps(cfg, 2, 7)
    assert info.value.field == "batch_size"
