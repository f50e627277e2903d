"""The job worker: runs queued training jobs as child processes (R-JOB-02).

One worker runs one job at a time. Any number of workers, on any machine that shares the database
and the data folder, can serve the same queue (``studio worker``); the studio starts one in a thread
unless ``STUDIO_WORKER=0``.

Each pass (:meth:`Worker.tick`):

1. every ``reap_every_s`` (and at start): running jobs whose heartbeat is older than ``stale_s`` or
   whose worker process on this host is gone become interrupted (a leftover trainer of a dead worker
   on this host is killed); interrupted jobs are queued again with ``attempt + 1`` (failed after
   ``max_attempts``);
2. with a child running: ingest new metrics lines, heartbeat every ``heartbeat_s``, stop the child on a
   cancel request or past the job's time limit (SIGTERM: the recipe checkpoints and exits 143;
   SIGKILL after ``grace_s`` plus twice its longest step), and when it has exited, map its exit
   status to the job's end state;
3. with no child: claim the oldest queued job, write ``config.json`` into its folder and start
   ``python -m trainers <recipe> --config <folder>/config.json`` (``accelerate launch --num_processes N
   -m trainers ...`` when the job asks for N > 1 processes), stdout and stderr to ``job.log``.

Exit status → state: 0 succeeded (``final/`` registered as a checkpoint with its lineage); 143 after
our cancel → cancelled (the last step checkpoint registered, as a hard-linked twin under ``stopped/`` that
a resumed run's pruning cannot remove); 143 or SIGTERM otherwise → interrupted
(resumed later); 2 bad_input, 3 nan_loss (with the step), 4 disk_full, 5/6 crashed; an out-of-memory
traceback → oom; a signal we did not send → crashed ("killed by signal N"); past the time limit →
timeout. The message is the child's ``error[code]: message`` line, never a traceback.

Safety nets: the child runs in its own process group and, on Linux, dies with the worker thread
that started it (PR_SET_PDEATHSIG); it holds an flock on ``<folder>/.job.lock``, so no second trainer
starts in a folder while a leftover one still writes there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from storage import jobs as q
from storage.db import Database
from storage.models import CheckpointKind, CheckpointStatus, FailureCode, Job, JobState, utcnow
from studio.services.errors import ServiceError
from studio.services.job_support import (
    CONFIG_NAME,
    LOG_NAME,
    checkpoint_facts,
    child_env,
    keep_stopped,
    read_log_tail,
    recipe_schemas,
)
from studio.settings import Settings
from studio.worker_process import (  # noqa: F401 - re-exported: tests and callers import them from here
    LOCK_NAME,
    METRICS_NAME,
    PDEATHSIG_SHIM,
    STOPPED,
    Outcome,
    classify,
    is_trainer,
    make_worker_id,
    parse_worker_id,
    pid_alive,
    trainer_command,
    try_lock,
)

log = logging.getLogger("studio.worker")
_LIVE_WORKERS: set[str] = set()
"""Ids of the workers running in this process (a job of another id with this pid lost its worker)."""

# --------------------------------------------------------------------------- the worker


@dataclass
class _Child:
    job_id: int
    recipe: str
    output_dir: Path
    proc: subprocess.Popen
    log: IO[bytes]
    lock: IO[str]
    timeout_s: int | None
    started: float
    last_beat: float
    cursor: q.MetricsCursor = field(default_factory=q.MetricsCursor)
    stop_reason: str | None = None
    """None, or why we sent SIGTERM: cancel, shutdown, timeout."""
    term_at: float | None = None
    killed: bool = False
    grew_at: float | None = None
    step_s: float = 0.0
    """Longest wait seen between two growths of metrics.jsonl: about one step (with its checkpoint)."""


class Worker:
    """Claims queued jobs and runs them one at a time; see the module docstring."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        worker_id: str | None = None,
        poll_s: float = 1.0,
        heartbeat_s: float = 5,
        stale_s: float = 60,
        grace_s: float = 30,
        *,
        reap_every_s: float = 30,
        max_attempts: int = 3,
        python: str = sys.executable,
    ):
        self.db = db
        self.settings = settings
        self.worker_id = worker_id or make_worker_id()
        self.poll_s, self.heartbeat_s, self.stale_s, self.grace_s = poll_s, heartbeat_s, stale_s, grace_s
        self.reap_every_s = reap_every_s
        self.max_attempts = max_attempts
        self.python = python
        self.host = socket.gethostname()
        self._child: _Child | None = None
        self._last_reap: float | None = None
        self._stopping = False
        _LIVE_WORKERS.add(self.worker_id)

    @property
    def busy(self) -> bool:
        return self._child is not None

    @property
    def current_job_id(self) -> int | None:
        return self._child.job_id if self._child else None

    # ----------------------------------------------------------------------- the loop

    def run_forever(self, stop_event: threading.Event) -> None:
        """Tick every ``poll_s`` until ``stop_event`` is set, then :meth:`shutdown`."""
        log.info("worker %s started", self.worker_id)
        try:
            while not stop_event.is_set():
                try:
                    self.tick()
                except Exception:  # a database hiccup must not end the worker
                    log.exception("worker pass failed; retrying")
                stop_event.wait(self.poll_s)
        finally:
            self.shutdown()
            log.info("worker %s stopped", self.worker_id)

    def tick(self) -> None:
        """One pass: reap (when due), look after the running child, or start the next job."""
        now = time.monotonic()
        if self._last_reap is None or now - self._last_reap >= self.reap_every_s:
            self.reap()
        if self._child is not None:
            self._poll_child()
        if self._child is None and not self._stopping:
            self._start_next()

    def shutdown(self) -> None:
        """Stop the running child (SIGTERM → it checkpoints; SIGKILL after grace): its job becomes
        interrupted and resumes later. No new job is claimed afterwards."""
        self._stopping = True
        _LIVE_WORKERS.discard(self.worker_id)
        child = self._child
        if child is None:
            return
        if child.proc.poll() is None:
            self._terminate(child, "shutdown")
            deadline = time.monotonic() + self.grace_s
            with self._beating(child):
                while child.proc.poll() is None and time.monotonic() < deadline:
                    self._ingest(child)
                    time.sleep(0.1)
            if child.proc.poll() is None:
                self._kill(child)
        child.proc.wait()
        self._finish(child, child.proc.returncode)

    # ----------------------------------------------------------------------- reaping

    def reap(self) -> list[q.Reaped]:
        """Interrupt jobs of dead workers (killing their leftover trainers here), then requeue."""
        self._last_reap = time.monotonic()
        with self.db.write() as s:
            reaped = q.reap_stale(s, stale_s=self.stale_s, worker_gone=self._worker_gone)
        for r in reaped:
            log.warning("job %s interrupted: %s", r.job_id, r.reason)
            self._kill_leftover(r)
        with self.db.write() as s:
            requeued, failed = q.requeue_interrupted(
                s, max_attempts=self.max_attempts, busy=self._folder_busy
            )
        for job_id in requeued:
            log.info("job %s queued again", job_id)
        for job_id in failed:
            log.warning("job %s failed: interrupted too often", job_id)
        return reaped

    def _worker_gone(self, worker_id: str | None) -> bool:
        host, pid = parse_worker_id(worker_id)
        if host != self.host or pid is None:
            return False  # another machine: only its heartbeat tells
        if pid == os.getpid():  # this process: gone unless it is a worker still running here
            return worker_id not in _LIVE_WORKERS
        return not pid_alive(pid)

    def _kill_leftover(self, reaped: q.Reaped) -> None:
        host, _ = parse_worker_id(reaped.worker_id)
        if host != self.host or not reaped.pid or reaped.pid == os.getpid():
            return
        if self._child is not None and self._child.proc.pid == reaped.pid:
            return
        if pid_alive(reaped.pid) and is_trainer(reaped.pid):
            log.warning("killing leftover trainer %s of job %s", reaped.pid, reaped.job_id)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(reaped.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while pid_alive(reaped.pid) and time.monotonic() < deadline:
                time.sleep(0.05)

    def _folder_busy(self, job: Job) -> bool:
        if not job.output_dir:
            return False
        try:
            lock = try_lock(Path(job.output_dir))
        except FileNotFoundError:  # no folder (deleted, or never made): no trainer writes there
            return False
        except OSError as exc:  # unreadable now: leave the job for a later pass, reap the others
            log.warning("job %s: cannot check its folder: %s", job.id, exc)
            return True
        if lock is None:
            return True
        lock.close()
        return False

    # ----------------------------------------------------------------------- starting

    def _start_next(self) -> None:
        with self.db.write() as s:
            job = q.claim_next(s, worker_id=self.worker_id)
        if job is None:
            return
        try:
            self._child = self._spawn(job)
        except Exception as exc:
            log.exception("job %s could not start", job.id)
            with self.db.write() as s:
                q.transition(s, job.id, JobState.failed, expected=[JobState.running], owner=self.worker_id,
                             failure_code=FailureCode.crashed, failure_message=f"could not start: {exc}")  # fmt: skip

    def _spawn(self, job: Job) -> _Child | None:
        out = Path(job.output_dir or Path(self.settings.data_dir) / "jobs" / str(job.id))
        out.mkdir(parents=True, exist_ok=True)
        lock = try_lock(out)
        if lock is None:  # a leftover trainer still writes here: let it die first
            with self.db.write() as s:
                q.transition(s, job.id, JobState.interrupted, expected=[JobState.running], owner=self.worker_id,
                             failure_message="interrupted: its folder is still in use by an earlier trainer")  # fmt: skip
            return None
        config_path = out / CONFIG_NAME
        tmp = config_path.with_name(CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps({**(job.config or {}), "output_dir": str(out)}, indent=2) + "\n")
        os.replace(tmp, config_path)
        command = trainer_command(self.python, job.recipe, config_path, job.processes or 1)
        handle = open(out / LOG_NAME, "ab")  # noqa: SIM115 - closed when the child is finished
        handle.write(
            f"--- job {job.id} attempt {job.attempt} on {self.worker_id} at {utcnow():%Y-%m-%d %H:%M:%S} UTC: "
            f"{' '.join(command[1:])}\n".encode()
        )
        handle.flush()
        if sys.platform == "linux":
            command = [self.python, "-c", PDEATHSIG_SHIM, str(os.getpid()), *command]
        try:
            proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT, cwd=out,
                env=child_env(), start_new_session=True, pass_fds=(lock.fileno(),),
            )  # fmt: skip
        except BaseException:
            handle.close()
            lock.close()
            raise
        try:
            with self.db.write() as s:
                q.set_pid(s, job.id, worker_id=self.worker_id, pid=proc.pid)
        except BaseException:  # untracked, it would train on (holding the folder lock) under a failed job
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            handle.close()
            lock.close()
            raise
        now = time.monotonic()
        log.info("job %s (%s) started as pid %s", job.id, job.recipe, proc.pid)
        return _Child(job.id, job.recipe, out, proc, handle, lock, job.timeout_s, now, now)

    # ----------------------------------------------------------------------- watching

    def _poll_child(self) -> None:
        child = self._child
        try:
            self._ingest(child)
        except Exception:  # best effort while running: heartbeats, cancel and kill must go on
            log.exception("job %s: metrics ingestion failed; retrying at the next poll", child.job_id)
        returncode = child.proc.poll()
        if returncode is not None:
            self._finish(child, returncode)
            return
        now = time.monotonic()
        if now - child.last_beat >= self.heartbeat_s:
            child.last_beat = now
            with self.db.write() as s:
                owned = q.heartbeat(s, worker_id=self.worker_id, job_ids=[child.job_id])
            if child.job_id not in owned:  # reaped by someone else meanwhile: it is not ours to run
                log.warning("job %s was taken away from this worker; stopping its trainer", child.job_id)
                self._kill(child)
                child.proc.wait()
                self._release(child)
                return
        if child.stop_reason is None:
            with self.db.read() as s:
                job = q.get_job(s, child.job_id)
            if job is not None and job.cancel_requested_at is not None:
                self._terminate(child, "cancel")
            elif child.timeout_s and now - child.started > child.timeout_s:
                self._terminate(child, "timeout")
        elif not child.killed and child.term_at is not None and now - child.term_at > self.grace_for(child):
            self._kill(child)

    def grace_for(self, child: _Child) -> float:
        """Seconds from SIGTERM to SIGKILL: ``grace_s`` plus twice the trainer's longest step so far (it
        stops at a step boundary, then checkpoints; a CPU policy step can take minutes), at most 10 × grace_s."""
        return min(self.grace_s + 2 * child.step_s, 10 * self.grace_s)

    def _ingest(self, child: _Child) -> None:
        path = child.output_dir / METRICS_NAME
        try:
            stat = path.stat()
        except FileNotFoundError:
            return
        if stat.st_ino == child.cursor.inode and stat.st_size == child.cursor.offset:
            return
        with self.db.write() as s:
            child.cursor = q.ingest_metrics(s, child.job_id, path, child.cursor)
        now = time.monotonic()
        if child.grew_at is not None:
            child.step_s = max(child.step_s, now - child.grew_at)
        child.grew_at = now

    def _terminate(self, child: _Child, reason: str) -> None:
        log.info("job %s: stopping its trainer (%s)", child.job_id, reason)
        child.stop_reason, child.term_at = reason, time.monotonic()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.proc.pid, signal.SIGTERM)

    def _kill(self, child: _Child) -> None:
        child.killed = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.proc.pid, signal.SIGKILL)

    # ----------------------------------------------------------------------- finishing

    def _finish(self, child: _Child, returncode: int) -> None:
        """Ingest the last metrics, map the exit status to the job's end state, register checkpoints."""
        try:
            self._ingest(child)
            child.log.flush()
            tail = read_log_tail(child.output_dir / LOG_NAME, lines=400)
            outcome = classify(returncode, child.stop_reason, tail, child.timeout_s)
            folder = None
            if outcome.state == JobState.succeeded:
                folder = child.output_dir / "final"
                if not folder.is_dir():
                    outcome = Outcome(JobState.failed, FailureCode.crashed, "finished without writing final/")
                    folder = None
            # Hashing a large checkpoint (and the first schema lookup) can take minutes: the job stays
            # running meanwhile, so its heartbeat must go on or another worker reaps it and runs it again.
            with self._beating(child):
                if outcome.state == JobState.cancelled:
                    from trainers.checkpoint import find_latest_complete  # hashlib/json only

                    folder = find_latest_complete(child.output_dir / "checkpoints")
                    if folder is not None:
                        try:
                            folder = keep_stopped(folder, child.output_dir, child.job_id)
                        except OSError:  # e.g. disk full: register it where it is (a resume may prune it)
                            log.exception("job %s: could not keep its stopped checkpoint", child.job_id)
                facts = checkpoint_facts(folder) if folder is not None else None
                kind = self._checkpoint_kind(child.recipe, facts.studio) if facts else None
            with self.db.write() as s:
                values: dict[str, Any] = {
                    "exit_code": returncode, "failure_code": outcome.failure_code,
                    "failure_message": outcome.message, "pid": None,
                }  # fmt: skip
                if outcome.step is not None:
                    values["step"] = outcome.step
                won = q.transition(s, child.job_id, outcome.state, expected=[JobState.running],
                                   owner=self.worker_id, **values)  # fmt: skip
                if won and facts is not None:
                    job = q.get_job(s, child.job_id)
                    step = facts.studio.get("step")
                    label = job.name or f"{job.recipe} #{job.id}"
                    name = (
                        label if outcome.state == JobState.succeeded else f"{label} (step {step}, cancelled)"
                    )
                    row = q.register_checkpoint(
                        s, job=job, path=facts.path, kind=kind, name=name, manifest_sha256=facts.manifest_sha256,
                        studio=facts.studio,
                        status=CheckpointStatus.unloadable if facts.problem else CheckpointStatus.ready,
                    )  # fmt: skip
                    job.output_checkpoint_id = row.id
                    s.add(job)
            if not won:
                log.warning(
                    "job %s: exit %s ignored, the job was no longer this worker's", child.job_id, returncode
                )
            else:
                log.info("job %s: %s (exit %s)%s", child.job_id, outcome.state, returncode,
                         f" {outcome.failure_code}: {outcome.message}" if outcome.failure_code else "")  # fmt: skip
        finally:
            self._release(child)

    @contextlib.contextmanager
    def _beating(self, child: _Child) -> Iterator[None]:
        """Heartbeat ``child``'s job from a helper thread while this one is busy (hashing a checkpoint,
        waiting for a stopping trainer), so that no reaper takes a job that is still being looked after."""
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.heartbeat_s):
                try:
                    with self.db.write() as s:
                        q.heartbeat(s, worker_id=self.worker_id, job_ids=[child.job_id])
                except Exception:  # a database hiccup: the next beat tries again
                    log.exception("job %s: heartbeat failed", child.job_id)

        thread = threading.Thread(target=beat, name=f"studio-worker-beat-{child.job_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def _release(self, child: _Child) -> None:
        with contextlib.suppress(OSError):
            child.log.close()
        with contextlib.suppress(OSError):
            child.lock.close()
        if self._child is child:
            self._child = None

    def _checkpoint_kind(self, recipe: str, studio: dict[str, Any]) -> CheckpointKind:
        """The recipe's CHECKPOINT_KIND (from the schema), else what its studio.json says."""
        try:
            return CheckpointKind(recipe_schemas(self.python)[recipe]["checkpoint_kind"])
        except (ServiceError, KeyError, ValueError):
            with contextlib.suppress(ValueError):
                return CheckpointKind(str(studio.get("kind", "")).replace("-", "_"))
            return CheckpointKind.policy


def start_in_thread(
    db: Database, settings: Settings, **kwargs: Any
) -> tuple[threading.Thread, threading.Event]:
    """A worker in a daemon thread (what ``app.main`` does): set the event, then join, to stop it."""
    stop = threading.Event()
    worker = Worker(db, settings, **kwargs)
    thread = threading.Thread(target=worker.run_forever, args=(stop,), name="studio-worker", daemon=True)
    thread.start()
    return thread, stop
