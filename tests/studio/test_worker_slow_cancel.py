"""A cancel of a trainer whose steps are slower than the worker's SIGTERM → SIGKILL grace.

A recipe stops at a step boundary and then writes its checkpoint. SmolLM2 on a CPU can take longer per
step than the fixed grace (30 s in the studio), and a SIGKILL then throws the step's work and the stop
checkpoint away (with `checkpoint_every: 0`, the default, a resume starts from scratch). The worker
waits longer for slow trainers: the grace plus twice the longest step it has seen.
"""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest
from job_helpers import ADMIN, drive, make_env, tiny_values

from studio.worker import Worker

STEP_SLEEP_S = 2.0
GRACE_S = 0.5
"""Far shorter than a step: a fixed grace would SIGKILL the trainer mid-step."""


def test_grace_grows_with_the_step_time_within_a_cap(db, tmp_path, tiny_model):
    env = make_env(db, tmp_path, tiny_model)
    w = Worker(env.db, env.settings, grace_s=30)
    assert w.grace_for(NS(step_s=0.0)) == 30
    assert w.grace_for(NS(step_s=40.0)) == 110
    assert w.grace_for(NS(step_s=1000.0)) == 300  # a hung trainer still dies


@pytest.fixture
def env(db, tmp_path, tiny_model):
    return make_env(db, tmp_path, tiny_model)


def test_a_slow_trainer_gets_to_write_its_stop_checkpoint(env, monkeypatch):
    monkeypatch.setenv("STUDIO_FAULT_STEP_SLEEP_S", str(STEP_SLEEP_S))
    worker = Worker(env.db, env.settings, poll_s=0.05, heartbeat_s=0.2, grace_s=GRACE_S, reap_every_s=1000)
    try:
        job = env.launch(tiny_values(max_steps=8, checkpoint_every=0))
        drive(worker, lambda: env.job(job.id).step >= 2)
        env.services.jobs.cancel(ADMIN, job.id)
        drive(worker, lambda: env.job(job.id).state not in ("queued", "running"))
    finally:
        worker.shutdown()
    d = env.job(job.id)
    assert (d.state, d.exit_code) == ("cancelled", 143)  # stopped by itself, not SIGKILLed (-9)
    assert d.output_checkpoint is not None and d.output_checkpoint.status == "ready"
    assert "(step " in d.output_checkpoint.name and d.step >= 2
