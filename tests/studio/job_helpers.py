"""Shared set-up for the job service and worker tests: an admin, a project, a tiny preference
snapshot, the tiny model as base checkpoint, and a loop that drives a worker."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage import crud
from storage.db import Database
from storage.models import CheckpointKind, DatasetSnapshot, SnapshotKind
from studio.services import Services
from studio.settings import Settings
from trainers.synthetic import write_synthetic_snapshot

ADMIN = "root"
PASSWORD = "correct horse battery"


@dataclass
class JobEnv:
    services: Services
    db: Database
    settings: Settings
    project_id: int
    snapshot_id: int
    base_id: int

    def launch(self, values: dict[str, Any], **kwargs: Any):
        return self.services.jobs.launch(
            ADMIN,
            project_id=self.project_id,
            recipe=kwargs.pop("recipe", "reward_model"),
            snapshot_id=kwargs.pop("snapshot_id", self.snapshot_id),
            base_checkpoint_id=kwargs.pop("base_checkpoint_id", self.base_id),
            values=values,
            **kwargs,
        )

    def job(self, job_id: int):
        return self.services.jobs.job(ADMIN, job_id)


def make_env(db: Database, tmp_path: Path, tiny_model: Path, *, data_dir: Path | None = None) -> JobEnv:
    settings = Settings(data_dir=data_dir or tmp_path / "data", database_url="sqlite://", start_worker=False)
    services = Services.build(settings, db)
    services.users.create_first_admin(ADMIN, PASSWORD)
    project = services.projects.create("Jobs")
    snap = write_synthetic_snapshot(tmp_path / "snapshot", n_train=32, n_eval=0)
    with db.write() as s:
        row = DatasetSnapshot(project_id=project.id, kind=SnapshotKind.reward, format="jsonl",
                              path=str(snap.train), sha256="5" * 64, row_count=32)  # fmt: skip
        s.add(row)
        s.flush()
        base = crud.get_or_create_checkpoint(s, path=str(tiny_model), name="tiny", kind=CheckpointKind.policy)
        return JobEnv(services, db, settings, project.id, row.id, base.id)


def tiny_values(**overrides: Any) -> dict[str, Any]:
    """Form values of a tiny reward-model job (strings, as a form sends them)."""
    values = {
        "max_steps": "12",
        "batch_size": "4",
        "max_length": "48",
        "checkpoint_every": "3",
        "keep_checkpoints": "0",
        "cpu": "true",
        "eval_fraction": "0",
        "optim.lr": "2e-3",
    }
    values.update({k: str(v) for k, v in overrides.items()})
    return values


def drive(worker, until: Callable[[], bool], timeout: float = 90, pause: float = 0.05) -> None:
    """Tick ``worker`` until ``until()`` holds (AssertionError after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        worker.tick()
        if until():
            return
        time.sleep(pause)
    raise AssertionError(f"condition not reached within {timeout} s")


def wait_for(until: Callable[[], bool], timeout: float = 90, pause: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if until():
            return
        time.sleep(pause)
    raise AssertionError(f"condition not reached within {timeout} s")


def weights_sha256(checkpoint: str | Path) -> str:
    """The model weights' sha256 as recorded in the checkpoint's manifest."""
    manifest = json.loads((Path(checkpoint) / "manifest.json").read_text())
    return manifest["files"]["model.safetensors"]["sha256"]
