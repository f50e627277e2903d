"""The job worker on tiny reward-model jobs (real child processes): success with metrics and lineage,
cancel with a checkpoint and resume, bad input, NaN at step k, time limit, shutdown, a lost lease.
The exit-status mapping and the command line are checked as pure functions first."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
from job_helpers import ADMIN, drive, make_env, tiny_values
from safetensors.numpy import load_file

from storage import jobs as q
from storage.models import FailureCode, JobState
from studio.services.errors import Conflict
from studio.worker import Outcome, Worker, classify, trainer_command
from trainers.checkpoint import manifest_digest, verify_manifest

FAST = {"poll_s": 0.05, "heartbeat_s": 0.2, "stale_s": 30, "grace_s": 10, "reap_every_s": 1000}


@pytest.mark.parametrize(
    ("returncode", "reason", "log", "expected"),
    [
        (0, None, "", Outcome(JobState.succeeded)),
        (0, "cancel", "", Outcome(JobState.succeeded)),  # it finished before the stop: complete wins
        (143, "cancel", "", Outcome(JobState.cancelled, message="cancelled")),
        (-9, "cancel", "", Outcome(JobState.cancelled, message="cancelled")),  # SIGKILL after the grace
        (143, "shutdown", "", Outcome(JobState.interrupted, message="interrupted: the worker shut down")),
        (-15, None, "", Outcome(JobState.interrupted, message="interrupted: the trainer was stopped by SIGTERM")),
        (143, "timeout", "", Outcome(JobState.failed, FailureCode.timeout, "stopped after its time limit of 60 s")),
        (2, None, "x\nerror[bad_input]: cfg.json: field 'batch_size': too big\n",
         Outcome(JobState.failed, FailureCode.bad_input, "cfg.json: field 'batch_size': too big")),
        (3, None, "error[nan_loss]: non-finite loss (nan) at step 37\n",
         Outcome(JobState.failed, FailureCode.nan_loss, "non-finite loss (nan) at step 37", 37)),
        (4, None, "error[disk_full]: disk full: 1 MiB free\n", Outcome(JobState.failed, FailureCode.disk_full, "disk full: 1 MiB free")),
        (5, None, "error[bad_checkpoint]: altered\n", Outcome(JobState.failed, FailureCode.crashed, "altered")),
        (6, None, "error[io]: EIO\n", Outcome(JobState.failed, FailureCode.crashed, "EIO")),
        (1, None, "Traceback\n  ...\ntorch.OutOfMemoryError: CUDA out of memory.\n",
         Outcome(JobState.failed, FailureCode.oom, "out of memory: torch.OutOfMemoryError: CUDA out of memory.")),
        (-9, None, "", Outcome(JobState.failed, FailureCode.crashed,
                               "killed by signal 9 (SIGKILL; often the out-of-memory killer)")),
        (1, None, "Traceback (most recent call last):\n  File x\nKeyError: 'a'\n",
         Outcome(JobState.failed, FailureCode.crashed, "exited with status 1: KeyError: 'a'")),
    ],
)  # fmt: skip
def test_exit_status_maps_to_the_job_end_state(returncode, reason, log, expected):
    assert classify(returncode, reason, log, timeout_s=60) == expected


def test_trainer_command_uses_accelerate_for_several_processes():
    single = ["py", "-m", "trainers", "dpo", "--config", "/j/config.json"]
    assert trainer_command("py", "dpo", "/j/config.json") == single
    assert trainer_command("py", "dpo", "c.json", 4) == [
        "py", "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "4", "-m", "trainers", "dpo",
        "--config", "c.json",
    ]  # fmt: skip


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


def test_a_tiny_job_succeeds_with_live_metrics_and_a_registered_checkpoint(env, worker, monkeypatch):
    monkeypatch.setenv("STUDIO_FAULT_STEP_SLEEP_S", "0.1")  # so the test sees it mid-run
    job = env.launch(tiny_values(), name="tiny rm")
    seen_running: list[int] = []

    def done() -> bool:
        d = env.job(job.id)
        if d.state == "running" and d.total_steps:
            seen_running.append(d.step)
        return d.state not in ("queued", "running")

    drive(worker, done)
    d = env.job(job.id)
    assert (d.state, d.exit_code, d.failure_code) == ("succeeded", 0, None)
    assert (d.step, d.total_steps, d.progress) == (12, 12, 1.0)
    assert any(0 < s < 12 for s in seen_running), seen_running  # progress and metrics arrived while it ran
    assert [s for s, _ in d.metrics["train/loss"]] == list(range(1, 13))
    assert all(math.isfinite(v) for _, v in d.metrics["train/loss"])
    folder = Path(d.output_dir)
    assert json.loads((folder / "config.json").read_text())["output_dir"] == str(folder)
    assert f"--- job {job.id} attempt 1" in (folder / "job.log").read_text()
    # The registered checkpoint and its lineage.
    ck = d.output_checkpoint
    assert ck.path == str(folder / "final") and (ck.kind, ck.status, ck.name) == (
        "reward",
        "ready",
        "tiny rm",
    )
    lineage = (ck.parent_id, ck.recipe, ck.snapshot_id, ck.job_id)
    assert lineage == (env.base_id, "reward_model", env.snapshot_id, job.id)
    assert ck.manifest_sha256 == manifest_digest(folder / "final")
    verify_manifest(folder / "final")
    with env.db.read() as s:
        row = q.get_job(s, job.id)
    assert row.heartbeat_at > row.started_at and row.pid is None
    assert not worker.busy


def test_cancel_stops_with_a_checkpoint_and_resume_finishes_the_run(env, worker, monkeypatch):
    monkeypatch.setenv("STUDIO_FAULT_STEP_SLEEP_S", "0.4")
    job = env.launch(tiny_values(max_steps=10, checkpoint_every=0))
    drive(worker, lambda: env.job(job.id).step >= 2)
    assert env.services.jobs.cancel(ADMIN, job.id).cancel_requested
    drive(worker, finished(env, job.id))
    d = env.job(job.id)
    assert (d.state, d.exit_code) == ("cancelled", 143)
    ck = d.output_checkpoint  # the checkpoint the recipe wrote on SIGTERM
    assert ck is not None and Path(ck.path).parent.name == "stopped" and "cancelled" in ck.name
    stopped_at = json.loads((Path(ck.path) / "studio.json").read_text())["step"]
    assert 2 <= stopped_at < 10 and ck.status == "ready"

    monkeypatch.delenv("STUDIO_FAULT_STEP_SLEEP_S")
    again = env.services.jobs.resume(ADMIN, job.id)
    drive(worker, finished(env, again.id))
    d2 = env.job(again.id)
    assert (d2.state, d2.parent_job_id, d2.output_dir, d2.step) == ("succeeded", job.id, d.output_dir, 10)
    assert f"resuming from step-{stopped_at:06d}" in d2.log_tail
    assert d2.output_checkpoint.path == str(Path(d.output_dir) / "final")
    assert [s for s, _ in d2.metrics["train/loss"]] == list(range(1, 11))


def test_a_bad_config_fails_with_bad_input_naming_the_field(env, worker):
    job = env.launch(tiny_values(batch_size=64))  # more pairs per step than the snapshot has
    drive(worker, finished(env, job.id))
    d = env.job(job.id)
    assert (d.state, d.failure_code, d.exit_code) == ("failed", "bad_input", 2)
    assert "field 'batch_size'" in d.failure_message and "Traceback" not in d.failure_message
    with pytest.raises(Conflict, match="failed on its input"):
        env.services.jobs.resume(ADMIN, job.id)


def test_nan_at_step_k_fails_with_nan_loss_at_k_and_earlier_checkpoints_finite(env, worker, monkeypatch):
    monkeypatch.setenv("STUDIO_FAULT_NAN_STEP", "5")
    job = env.launch(tiny_values(checkpoint_every=2))
    drive(worker, finished(env, job.id))
    d = env.job(job.id)
    assert (d.state, d.failure_code, d.exit_code, d.step) == ("failed", "nan_loss", 3, 5)
    assert "at step 5" in d.failure_message
    checkpoints = Path(d.output_dir) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000002", "step-000004"]
    for name in ("step-000002", "step-000004"):
        verify_manifest(checkpoints / name)
        weights = load_file(checkpoints / name / "model.safetensors")
        assert all(math.isfinite(float(abs(w).max())) for w in weights.values())
    assert not (Path(d.output_dir) / "final").exists()
    assert [s for s, _ in d.metrics["train/loss"]] == [1, 2, 3, 4]


def test_a_job_past_its_time_limit_fails_with_timeout(env, worker):
    job = env.launch(tiny_values(), timeout_s=1)
    drive(worker, finished(env, job.id))
    d = env.job(job.id)
    assert (d.state, d.failure_code) == ("failed", "timeout")
    assert d.exit_code in (143, -signal.SIGTERM, -signal.SIGKILL)


def test_worker_shutdown_interrupts_the_job_and_the_next_worker_resumes_it(env, monkeypatch):
    monkeypatch.setenv("STUDIO_FAULT_STEP_SLEEP_S", "0.3")
    first = Worker(env.db, env.settings, **FAST)
    job = env.launch(tiny_values(max_steps=8, checkpoint_every=0))
    drive(first, lambda: env.job(job.id).step >= 2)
    first.shutdown()
    d = env.job(job.id)
    assert (d.state, d.exit_code, d.failure_message) == (
        "interrupted",
        143,
        "interrupted: the worker shut down",
    )
    monkeypatch.delenv("STUDIO_FAULT_STEP_SLEEP_S")
    second = Worker(env.db, env.settings, **FAST)
    try:
        drive(second, finished(env, job.id))  # its first pass requeues it (attempt 2) and runs it
    finally:
        second.shutdown()
    d = env.job(job.id)
    assert (d.state, d.attempt, d.step) == ("succeeded", 2, 8)
    assert "resuming from step-" in d.log_tail


def test_a_job_reaped_away_from_its_worker_is_not_run_twice(env, worker):
    job = env.launch(tiny_values())
    drive(worker, lambda: worker.busy)
    with env.db.write() as s:  # another worker decided this one is dead
        assert q.transition(s, job.id, JobState.interrupted, expected=[JobState.running])
    child = worker._child.proc
    drive(worker, lambda: not worker.busy, timeout=30)
    assert child.returncode == -signal.SIGKILL
    d = env.job(job.id)
    assert d.state == "interrupted" and d.exit_code is None  # the worker left the job alone


def test_the_heartbeat_goes_on_while_a_finished_checkpoint_is_hashed(env, monkeypatch):
    """Hashing a big ``final/`` takes long after the trainer exited; meanwhile another worker's reaper
    must not find the job stale (it would interrupt it and run the finished job again)."""
    import subprocess
    import sys
    import time

    from studio import worker as worker_module
    from studio.worker import _Child, try_lock
    from trainers.checkpoint import write_checkpoint

    w = Worker(env.db, env.settings, **{**FAST, "heartbeat_s": 0.1})
    job = env.launch(tiny_values(), name="slow hash")
    with env.db.write() as s:
        assert q.claim_next(s, worker_id=w.worker_id).id == job.id
    out = Path(job.output_dir)
    write_checkpoint(
        out / "final", lambda tmp: (tmp / "model.safetensors").write_bytes(b"w" * 64), {"step": 12}
    )
    monkeypatch.setattr(
        worker_module, "recipe_schemas", lambda *_: {"reward_model": {"checkpoint_kind": "reward"}}
    )
    real_facts = worker_module.checkpoint_facts
    reaped: list = []

    def slow_facts(path, *args):
        time.sleep(2.0)  # hashing gigabytes
        with env.db.write() as s:  # another worker's reaper, 1 s without a heartbeat = stale
            reaped.extend(q.reap_stale(s, stale_s=1.0))
        return real_facts(path, *args)

    monkeypatch.setattr(worker_module, "checkpoint_facts", slow_facts)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    now = time.monotonic()
    log = open(out / "job.log", "ab")  # noqa: SIM115 - closed by _finish
    child = _Child(job.id, "reward_model", out, proc, log, try_lock(out), None, now, now)
    w._child = child
    try:
        w._finish(child, 0)
    finally:
        w.shutdown()
    assert reaped == []
    d = env.job(job.id)
    assert (d.state, d.output_checkpoint.path) == ("succeeded", str(out / "final"))


def test_a_trainer_whose_pid_cannot_be_recorded_is_stopped_at_once(env, monkeypatch):
    from studio import worker as worker_module
    from studio.worker import try_lock

    def locked(*_args, **_kwargs):
        raise RuntimeError("database is locked")

    monkeypatch.setattr(worker_module.q, "set_pid", locked)
    w = Worker(env.db, env.settings, **FAST)
    job = env.launch(tiny_values())
    try:
        w.tick()
    finally:
        w.shutdown()
    d = env.job(job.id)
    assert (d.state, d.failure_code) == ("failed", "crashed") and "database is locked" in d.failure_message
    lock = try_lock(Path(d.output_dir))  # no untracked trainer goes on holding (and writing) the folder
    assert lock is not None
    lock.close()


def test_an_interrupted_job_without_a_folder_does_not_stop_the_requeue_of_the_others(env):
    import shutil

    w = Worker(env.db, env.settings, **FAST)
    jobs = [env.launch(tiny_values()) for _ in range(2)]
    Path(jobs[1].output_dir).mkdir(parents=True)
    with env.db.write() as s:
        for job in jobs:
            q.claim_next(s, worker_id="elsewhere:1:x")
            assert q.transition(s, job.id, JobState.interrupted, expected=[JobState.running])
    shutil.rmtree(jobs[0].output_dir, ignore_errors=True)  # never made (or deleted by hand)
    try:
        w.reap()
    finally:
        w.shutdown()
    assert [(env.job(j.id).state, env.job(j.id).attempt) for j in jobs] == [("queued", 2), ("queued", 2)]
