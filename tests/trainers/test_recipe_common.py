"""The plumbing the recipes share: the resume check, the step plan, evaluation sharding, the end of a
step (evaluate, stop, checkpoint) and the run's result."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from trainers.checkpoint import step_dir, write_checkpoint
from trainers.config import ConfigError, OptimConfig
from trainers.recipe_common import (
    HARMLESS_FIELDS,
    RESUME_KEYS,
    StepActions,
    TrainResult,
    asked_to_stop,
    check_resumable,
    evaluation_due,
    plan_steps,
    progress_bar,
    shard,
    step_actions,
    train_result,
)


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


def test_evaluation_is_due_every_eval_every_steps_but_never_after_the_last():
    assert [s for s in range(1, 7) if evaluation_due(s, 6, 2)] == [2, 4]  # 6 is the last: final evaluation
    assert [s for s in range(1, 8) if evaluation_due(s, 7, 3)] == [3, 6]
    assert not any(evaluation_due(s, 6, 0) for s in range(1, 7))  # 0: only at the end
    assert not any(evaluation_due(s, 6, 10) for s in range(1, 7))


def test_step_actions_checkpoint_on_schedule_and_before_an_early_stop():
    # checkpoint_every 3 of 7 steps, nobody asks to stop: checkpoints after steps 3 and 6 only
    assert [s for s in range(1, 8) if step_actions(s, 7, 3, False).checkpoint] == [3, 6]
    assert not any(step_actions(s, 7, 3, False).stop for s in range(1, 8))
    assert not any(step_actions(s, 7, 0, False).checkpoint for s in range(1, 8))  # 0: final model only
    # a stop after step 4 (off schedule) checkpoints there so the rerun resumes from step 4
    assert step_actions(4, 7, 3, True) == StepActions(checkpoint=True, stop=True)
    assert step_actions(4, 7, 0, True) == StepActions(checkpoint=True, stop=True)
    assert step_actions(6, 7, 3, True) == StepActions(checkpoint=True, stop=True)  # one checkpoint, not two
    # a stop asked for after the last step is no early stop: the run finishes (final model)
    assert step_actions(7, 7, 3, True) == StepActions(checkpoint=False, stop=False)
    assert step_actions(6, 6, 3, True) == StepActions(checkpoint=True, stop=False)


def test_asked_to_stop_asks_the_callback_with_the_step_on_one_process():
    one = SimpleNamespace(num_processes=1)
    asked: list[int] = []
    assert asked_to_stop(one, None, 3) is False
    assert asked_to_stop(one, lambda step: asked.append(step) or step >= 5, 4) is False
    assert asked_to_stop(one, lambda step: asked.append(step) or step >= 5, 5) is True
    assert asked == [4, 5]


def test_train_result_is_stopped_without_a_final_folder_and_takes_a_subclass(tmp_path):
    run = SimpleNamespace(
        cfg=SimpleNamespace(output_dir=str(tmp_path)), resumed_from=tmp_path / "checkpoints/step-2"
    )
    started = time.perf_counter() - 2.0  # the run began two seconds ago
    stopped = train_result(run, started, 4, {"eval/loss": 0.5}, tmp_path / "checkpoints/step-4")
    assert stopped == TrainResult(tmp_path, None, tmp_path / "checkpoints/step-4", 4, {"eval/loss": 0.5},
                                  tmp_path / "checkpoints/step-2", True, stopped.seconds)  # fmt: skip
    assert 2.0 <= stopped.seconds < 60

    @dataclass(frozen=True)
    class WithInfo(TrainResult):
        info: str

    done = train_result(run, started, 6, {}, None, tmp_path / "final", cls=WithInfo, info="tau")
    assert isinstance(done, WithInfo) and done.info == "tau"
    assert done.final_checkpoint == tmp_path / "final" and done.stopped is False and done.steps == 6
    assert done.output_dir == Path(tmp_path) and done.last_checkpoint is None


def test_progress_bar_shows_only_on_the_main_process_when_enabled():
    for main, enabled, shown in [(True, True, True), (True, False, False), (False, True, False)]:
        bar = progress_bar(SimpleNamespace(is_main_process=main), 5, 2, "dpo", enabled)
        assert bar.disable is not shown and bar.total == 5 and bar.n == 2
        bar.close()
