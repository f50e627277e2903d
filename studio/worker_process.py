"""The worker's process-level pieces: exit status → job outcome, the trainer command line, pids, folder locks.

Pure or OS-level helpers with no database session, split out of :mod:`studio.worker` (which re-exports them).
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from storage.models import FailureCode, JobState
from studio.services.job_support import last_error_line

LOCK_NAME = ".job.lock"
METRICS_NAME = "metrics.jsonl"
EXIT_FAILURES = {
    2: FailureCode.bad_input,
    3: FailureCode.nan_loss,
    4: FailureCode.disk_full,
    5: FailureCode.crashed,
    6: FailureCode.crashed,
}
STOPPED = 143
_OOM = re.compile(r"OutOfMemoryError|MemoryError|CUDA out of memory")
_ERROR_LINE = re.compile(r"^error\[(\w+)\]: ?(.*)$")
_AT_STEP = re.compile(r"at step (\d+)")
PDEATHSIG_SHIM = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGKILL)\n"  # PR_SET_PDEATHSIG: die with the thread that started us
    "os.getppid() == int(sys.argv[1]) or os._exit(137)\n"  # that thread's process died before prctl
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


# --------------------------------------------------------------------------- pure pieces


@dataclass(frozen=True)
class Outcome:
    """How a finished child ends its job."""

    state: JobState
    failure_code: FailureCode | None = None
    message: str | None = None
    step: int | None = None


def classify(
    returncode: int, stop_reason: str | None, log_tail: str, timeout_s: int | None = None
) -> Outcome:
    """Exit status + why we stopped it (None, "cancel", "shutdown", "timeout") + the log's tail → Outcome."""
    error = last_error_line(log_tail)
    match = _ERROR_LINE.match(error)
    message = match.group(2) if match else error
    stopped = returncode in (STOPPED, -signal.SIGTERM) or (
        stop_reason is not None and returncode == -signal.SIGKILL
    )
    if returncode == 0:
        return Outcome(JobState.succeeded)
    if stop_reason == "timeout" and stopped:
        return Outcome(JobState.failed, FailureCode.timeout, f"stopped after its time limit of {timeout_s} s")
    if stopped and stop_reason == "cancel":
        return Outcome(JobState.cancelled, message="cancelled")
    if stopped and stop_reason in (None, "shutdown"):
        why = "the worker shut down" if stop_reason else "the trainer was stopped by SIGTERM"
        return Outcome(JobState.interrupted, message=f"interrupted: {why}")
    if returncode in EXIT_FAILURES:
        code = EXIT_FAILURES[returncode]
        step = _AT_STEP.search(message) if code == FailureCode.nan_loss else None
        return Outcome(JobState.failed, code, message, int(step.group(1)) if step else None)
    if _OOM.search(log_tail):
        return Outcome(JobState.failed, FailureCode.oom, f"out of memory: {message}")
    if returncode < 0:
        number = -returncode
        name = signal.Signals(number).name if number in signal.valid_signals() else "?"
        return Outcome(
            JobState.failed,
            FailureCode.crashed,
            f"killed by signal {number} ({name}; often the out-of-memory killer)",
        )
    return Outcome(JobState.failed, FailureCode.crashed, f"exited with status {returncode}: {message}")


def trainer_command(python: str, recipe: str, config_path: str | Path, processes: int = 1) -> list[str]:
    """``python -m trainers <recipe> --config <path>``, under ``accelerate launch`` for several processes.

    ``--multi_gpu`` is accelerate's data-parallel launcher (torchrun underneath); without it, and with
    no accelerate config file, ``--num_processes N`` silently runs ONE process on a machine without a
    GPU. On CPU the ranks then train over gloo (tests/studio/test_worker_multiprocess.py)."""
    args = ["-m", "trainers", recipe, "--config", str(config_path)]
    if processes > 1:
        return [
            python,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            *args,
        ]
    return [python, *args]


def make_worker_id() -> str:
    """``host:pid:token`` (the token tells a restarted worker from an old one with the same pid)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def pid_alive(pid: int) -> bool:
    """True if process ``pid`` exists on this host and is not a zombie.

    A killed multi-threaded process (a trainer) shows its main thread as a zombie while its other
    threads still exit and hold its files (and our folder lock): it counts as alive until they are done.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True  # no /proc (not Linux): trust kill(0)
    for tid in tasks:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[-1].split()[:1] not in (["Z"], ["X"]):
            return True
    return False


def is_trainer(pid: int) -> bool:
    """Whether ``pid`` runs ``-m trainers`` (guards against killing a reused pid)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"trainers" in argv


def parse_worker_id(worker_id: str | None) -> tuple[str | None, int | None]:
    parts = (worker_id or "").split(":")
    if len(parts) < 2:
        return None, None
    try:
        return parts[0], int(parts[1])
    except ValueError:
        return parts[0], None


def try_lock(folder: Path) -> IO[str] | None:
    """An open, exclusively flock-ed ``<folder>/.job.lock``, or None if another process holds it."""
    handle = open(folder / LOCK_NAME, "a+")  # noqa: SIM115 - the caller keeps it open while the job runs
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle
