"""Faults during a real tiny reward-model job (R-JOB-02/04/06): kill -9 of the trainer, kill -9 of a
`studio worker` process, and a full disk. Every recovered run must end with final weights identical
(same sha256) to an uninterrupted run of the same job."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from job_helpers import ADMIN, drive, make_env, tiny_values, wait_for, weights_sha256
from safetensors.numpy import load_file

from storage import jobs as q
from storage.db import Database, sqlite_url, upgrade
from studio.worker import Worker, pid_alive
from trainers.checkpoint import TMP_PREFIX, find_latest_complete, verify_manifest

FAST = {"poll_s": 0.05, "heartbeat_s": 0.2, "stale_s": 60, "grace_s": 10, "reap_every_s": 1000}
VALUES = tiny_values(max_steps=12, checkpoint_every=3)
REPO = Path(__file__).resolve().parents[2]


def finished(env, job_id: int):
    return lambda: env.job(job_id).state not in ("queued", "running")


def run_to_end(env, job_id: int) -> None:
    worker = Worker(env.db, env.settings, **FAST)
    try:
        drive(worker, finished(env, job_id))
    finally:
        worker.shutdown()


@pytest.fixture(scope="module")
def reference_sha(tmp_path_factory, tiny_model) -> str:
    """Final weights of the same job run without interruption."""
    tmp = tmp_path_factory.mktemp("reference")
    db = Database.from_url(sqlite_url(tmp / "studio.db"))
    upgrade(db.engine)
    env = make_env(db, tmp, tiny_model)
    job = env.launch(VALUES)
    run_to_end(env, job.id)
    detail = env.job(job.id)
    assert detail.state == "succeeded", detail.failure_message
    db.dispose()
    return weights_sha256(detail.output_checkpoint.path)


@pytest.fixture
def env(db, tmp_path, tiny_model):
    return make_env(db, tmp_path, tiny_model)


def checkpoint_reached(env, job_id: int, step: int):
    def check() -> bool:
        detail = env.job(job_id)
        latest = find_latest_complete(Path(detail.output_dir) / "checkpoints") if detail.output_dir else None
        return detail.step > step and latest is not None and int(latest.name.split("-")[1]) >= step

    return check


def test_kill_9_of_the_trainer_fails_the_job_and_resume_ends_identically(env, reference_sha, monkeypatch):
    monkeypatch.setenv("STUDIO_FAULT_STEP_SLEEP_S", "0.25")
    worker = Worker(env.db, env.settings, **FAST)
    try:
        job = env.launch(VALUES)
        drive(worker, checkpoint_reached(env, job.id, 3))
        with env.db.read() as s:
            pid = q.get_job(s, job.id).pid
        os.kill(pid, signal.SIGKILL)  # a signal the worker did not send (what the OOM killer does)
        drive(worker, finished(env, job.id))
        d = env.job(job.id)
        assert (d.state, d.failure_code, d.exit_code) == ("failed", "crashed", -9)
        assert d.failure_message == "killed by signal 9 (SIGKILL; often the out-of-memory killer)"
        assert 3 <= d.step < 12

        monkeypatch.delenv("STUDIO_FAULT_STEP_SLEEP_S")
        resumed = env.services.jobs.resume(ADMIN, job.id)
        drive(worker, finished(env, resumed.id))
    finally:
        worker.shutdown()
    d2 = env.job(resumed.id)
    assert d2.state == "succeeded" and "resuming from step-" in d2.log_tail
    assert weights_sha256(d2.output_checkpoint.path) == reference_sha


def test_kill_9_of_a_worker_process_then_a_new_worker_resumes_identically(env, db, tmp_path, reference_sha):
    job = env.launch(VALUES)
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115
    command = [sys.executable, "-m", "studio.cli", "--data-dir", str(env.settings.data_dir),
               "--database-url", sqlite_url(tmp_path / "studio.db"), "worker", "--poll-s", "0.05",
               "--heartbeat-s", "0.2", "--stale-s", "60", "--reap-every-s", "1000"]  # fmt: skip
    # Same thread count as the reference and the resumed half (the ambient one): fp32 sums split over
    # another number of threads round differently, and the weights would differ in the last bits.
    worker_env = {**os.environ, "STUDIO_FAULT_STEP_SLEEP_S": "0.25"}
    proc = subprocess.Popen(command, cwd=REPO, env=worker_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(checkpoint_reached(env, job.id, 3))
        with db.read() as s:
            trainer = q.get_job(s, job.id).pid
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    wait_for(lambda: not pid_alive(trainer), timeout=10)  # the trainer died with its worker
    assert env.job(job.id).state == "running"  # nobody has noticed yet

    worker = Worker(env.db, env.settings, **FAST)
    try:
        reaped = worker.reap()  # what every worker does at start
        assert [(r.job_id, r.reason) for r in reaped] == [(job.id, "its worker process is gone")]
        d = env.job(job.id)
        assert (d.state, d.attempt) == ("queued", 2)  # interrupted, then queued again
        drive(worker, finished(env, job.id))
    finally:
        worker.shutdown()
    d = env.job(job.id)
    assert (d.state, d.attempt) == ("succeeded", 2) and "resuming from step-" in d.log_tail
    assert weights_sha256(d.output_checkpoint.path) == reference_sha


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: int):
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        message = f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}"
        if os.environ.get("STUDIO_STRICT_TESTS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_full_disk_fails_cleanly_and_the_run_resumes_once_there_is_room(env, tiny_model, reference_sha):
    # Room for the first checkpoint (the free-space check wants 2 × 3 × the weights + 100 MiB) but
    # not for the second one (2 × the first checkpoint + 100 MiB).
    weights = (Path(tiny_model) / "model.safetensors").stat().st_size
    size = 100 * 2**20 + 6 * weights + 256 * 2**10
    jobs_dir = Path(env.settings.data_dir) / "jobs"
    with small_tmpfs(jobs_dir, size):
        worker = Worker(env.db, env.settings, **FAST)
        try:
            job = env.launch(VALUES)
            drive(worker, finished(env, job.id))
            d = env.job(job.id)
            assert (d.state, d.failure_code, d.exit_code) == ("failed", "disk_full", 4), d.log_tail
            assert d.failure_message.startswith("disk full:") and "Traceback" not in d.failure_message
            checkpoints = Path(d.output_dir) / "checkpoints"
            assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000003"]
            verify_manifest(checkpoints / "step-000003")  # the earlier checkpoint is intact
            weights_3 = load_file(checkpoints / "step-000003" / "model.safetensors")
            assert all(abs(w).max() < float("inf") for w in weights_3.values())
            (checkpoints / f"{TMP_PREFIX}step-000006-x").mkdir()  # what a crash mid-write leaves behind

            subprocess.run(["mount", "-o", f"remount,size={size + 64 * 2**20}", str(jobs_dir)], check=True)
            resumed = env.services.jobs.resume(ADMIN, job.id)
            drive(worker, finished(env, resumed.id))
        finally:
            worker.shutdown()
        d2 = env.job(resumed.id)
        assert d2.state == "succeeded" and "resuming from step-000003" in d2.log_tail
        assert not [p for p in checkpoints.iterdir() if p.name.startswith(TMP_PREFIX)]
        assert weights_sha256(d2.output_checkpoint.path) == reference_sha


def test_sigterm_to_the_studio_stops_its_worker_and_the_job_checkpoints(tmp_path, tiny_model):
    """`app.main` runs a worker thread; a SIGTERM to the studio (systemd stop, Ctrl-C in Docker) must
    reach its trainer as SIGTERM (checkpoint, exit 143, job interrupted), not kill it with the process."""
    import socket

    data = tmp_path / "data"
    data.mkdir()
    db = Database.from_url(sqlite_url(data / "studio.db"))
    upgrade(db.engine)
    env = make_env(db, tmp_path, tiny_model, data_dir=data)
    job = env.launch(tiny_values(max_steps=60, checkpoint_every=0))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    studio_env = {**os.environ, "STUDIO_DATA_DIR": str(data), "STUDIO_PORT": str(port), "OMP_NUM_THREADS": "1",
                  "STUDIO_FAULT_STEP_SLEEP_S": "0.3", "GRADIO_TEMP_DIR": str(tmp_path / "gradio"),
                  "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    studio_env.pop("STUDIO_DATABASE_URL", None)
    studio_env.pop("STUDIO_WORKER", None)
    log = open(tmp_path / "studio.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, str(REPO / "app.py")], cwd=REPO, env=studio_env, stdout=log,
                            stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for(lambda: env.job(job.id).step >= 1 or proc.poll() is not None, timeout=180)
        assert proc.poll() is None, (tmp_path / "studio.log").read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        proc.wait(90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    d = env.job(job.id)
    assert (d.state, d.exit_code, d.failure_message) == (
        "interrupted",
        143,
        "interrupted: the worker shut down",
    )
    assert find_latest_complete(Path(d.output_dir) / "checkpoints") is not None  # written on SIGTERM
    assert proc.returncode == 143
    db.dispose()
