"""A cancelled job's registered checkpoint outlives the resumed run's pruning.

The recipe keeps only its newest `keep_checkpoints` step checkpoints; a resumed run in the same folder
writes newer ones and deletes the step the cancel wrote. The registry must not be left pointing at
nothing: the worker registers a hard-linked twin under `stopped/` (studio.services.job_support.keep_stopped).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from job_helpers import ADMIN, drive, make_env, tiny_values

from studio.services.job_support import keep_stopped
from studio.worker import Worker
from trainers.checkpoint import verify_manifest

FAST = {"poll_s": 0.05, "heartbeat_s": 0.2, "stale_s": 30, "grace_s": 10, "reap_every_s": 1000}


def test_keep_stopped_links_every_file_and_is_idempotent(tmp_path):
    ckpt = tmp_path / "job" / "checkpoints" / "step-000002"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"weights")
    (ckpt / "sub" / "state.json").write_text("{}")
    kept = keep_stopped(ckpt, tmp_path / "job", 7)
    assert kept == tmp_path / "job" / "stopped" / "job-7-step-000002"
    assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*")) == [
        "model.safetensors",
        "sub",
        "sub/state.json",
    ]
    assert os.path.samefile(kept / "model.safetensors", ckpt / "model.safetensors")  # no second copy
    assert keep_stopped(ckpt, tmp_path / "job", 7) == kept
    assert [p.name for p in kept.parent.iterdir()] == [kept.name]  # no temp folder left


@pytest.fixture
def env(db, tmp_path, tiny_model):
    return make_env(db, tmp_path, tiny_model)


@pytest.fixture
def worker(env):
    w = Worker(env.db, env.settings, **FAST)
    yield w
    w.shutdown()


def finished(env, job_id: int):
    return lambda: env.job(job_id).state not in ("queued", "running")


def test_the_cancelled_checkpoint_survives_pruning_by_the_resumed_run(env, worker, monkeypatch):
    monkeypatch.setenv("STUDIO_FAULT_STEP_SLEEP_S", "0.3")
    job = env.launch(tiny_values(max_steps=8, checkpoint_every=1, keep_checkpoints=1))
    drive(worker, lambda: env.job(job.id).step >= 2)
    env.services.jobs.cancel(ADMIN, job.id)
    drive(worker, finished(env, job.id))
    stopped = env.job(job.id).output_checkpoint
    assert env.job(job.id).state == "cancelled" and stopped is not None
    assert Path(stopped.path).parent.name == "stopped" and Path(stopped.path).name.startswith(
        f"job-{job.id}-"
    )
    step_name = Path(stopped.path).name.removeprefix(f"job-{job.id}-")

    monkeypatch.delenv("STUDIO_FAULT_STEP_SLEEP_S")
    again = env.services.jobs.resume(ADMIN, job.id)
    drive(worker, finished(env, again.id))
    assert env.job(again.id).state == "succeeded"
    checkpoints = Path(env.job(again.id).output_dir) / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step-000008"]  # the cancel's step was pruned
    assert step_name != "step-000008"

    verify_manifest(stopped.path)  # ...its registered twin is whole
    info = env.services.jobs.verify_checkpoint(ADMIN, stopped.id)
    assert (info.status, info.problem, info.path) == ("ready", None, stopped.path)
