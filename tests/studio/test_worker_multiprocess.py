"""A job with processes=2 runs under ``accelerate launch`` through the worker and finishes like one
process would: every rank trains, rank 0 writes and the worker registers the checkpoint."""

from __future__ import annotations

import json

import pytest
from job_helpers import drive, make_env, tiny_values

from studio.worker import Worker

FAST = {"poll_s": 0.05, "heartbeat_s": 0.2, "stale_s": 60, "grace_s": 10, "reap_every_s": 1000}


@pytest.fixture
def env(db, tmp_path, tiny_model):
    return make_env(db, tmp_path, tiny_model)


def test_a_two_process_job_runs_under_accelerate_launch(env):
    worker = Worker(env.db, env.settings, **FAST)
    try:
        job = env.launch(tiny_values(max_steps=4, batch_size=2, checkpoint_every=0), processes=2)
        drive(worker, lambda: env.job(job.id).state not in ("queued", "running"), timeout=240)
    finally:
        worker.shutdown()
    d = env.job(job.id)
    assert d.state == "succeeded", (d.failure_code, d.failure_message, d.log_tail[-2000:])
    assert (d.step, d.processes) == (4, 2)
    assert d.output_checkpoint is not None and d.output_checkpoint.status == "ready"
    studio = json.loads((env.settings.data_dir / "jobs" / str(job.id) / "final" / "studio.json").read_text())
    assert studio["world_size"] == 2, studio  # both ranks trained (data-parallel), not one
