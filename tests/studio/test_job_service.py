"""JobService: recipe schemas, form validation, launch/cancel/resume rules, job detail, the registry."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Literal

import pytest
import sqlalchemy as sa
from job_helpers import ADMIN, PASSWORD, make_env, tiny_values

from storage import jobs as q
from storage.models import (
    Checkpoint,
    CheckpointKind,
    DatasetSnapshot,
    FailureCode,
    Job,
    JobState,
    SnapshotKind,
    utcnow,
)
from studio.cli import build_parser
from studio.services.errors import Conflict, Forbidden, NotFound, ServiceError
from studio.services.jobs import FieldSpec, checkpoint_facts, coerce_field, nest, read_log_tail, tree_order
from studio.settings import Settings
from trainers.checkpoint import write_checkpoint
from trainers.config import bounded, config_schema


@dataclass(frozen=True)
class _Inner:
    """A section."""

    rate: float = bounded(0.5, gt=0, le=1)
    """How fast.

    More detail that is not shown."""
    pair: tuple[float, float] = (1.0, 2.0)
    """Two numbers."""


@dataclass(frozen=True)
class _Example:
    """An example config."""

    snapshot: str
    """Data file."""
    mode: Literal["a", "b"] = "a"
    """Which mode."""
    limit: int | None = None
    """Optional cap."""
    inner: _Inner = field(default_factory=_Inner)
    """Nested."""
    flag: bool = False


def test_config_schema_flattens_sections_with_docs_bounds_choices_and_managed_fields():
    assert config_schema(_Example) == [
        {"name": "snapshot", "type": "str", "help": "Data file.", "default": None, "required": True, "managed": True},
        {"name": "mode", "type": "choice", "choices": ["a", "b"], "help": "Which mode.", "default": "a"},
        {"name": "limit", "type": "optional_int", "help": "Optional cap.", "default": None},
        {"name": "inner.rate", "type": "float", "help": "How fast.", "default": 0.5, "gt": 0, "le": 1},
        {"name": "inner.pair", "type": "list", "items": ["float", "float"], "help": "Two numbers.", "default": [1.0, 2.0]},
        {"name": "flag", "type": "bool", "help": "", "default": False},
    ]  # fmt: skip


@pytest.fixture
def env(db, tmp_path, tiny_model):
    return make_env(db, tmp_path, tiny_model)


def test_recipes_come_from_the_schema_command(env):
    recipes = env.services.jobs.recipes()
    rm = recipes["reward_model"]
    assert (rm.checkpoint_kind, rm.base_kind) == ("reward", "encoder_or_policy")
    assert rm.snapshot_kinds == ("reward", "preferences")
    assert rm.doc.startswith("Train a sequence Bradley–Terry reward model")
    fields = {f.name: f for f in rm.fields}
    assert fields["optim.lr"] == FieldSpec("optim.lr", "float", 5e-05, "Peak learning rate.", gt=0)
    assert fields["snapshot"].managed and fields["snapshot"].required and not fields["max_steps"].managed
    assert recipes["segment_reward_model"].checkpoint_kind == "segment_reward"
    assert recipes["segment_reward_model"].base_kind == "policy"


def test_validate_coerces_form_strings(env):
    typed = env.services.jobs.validate(
        "reward_model",
        {"optim.lr": "3e-4", "max_steps": "12", "cpu": "true", "truncation_side": "right",
         "optim.betas": "[0.9, 0.99]", "optim.max_grad_norm": "", "seed": 7, "eval_fraction": ""},
    )  # fmt: skip
    assert typed == {"optim.lr": 3e-4, "max_steps": 12, "cpu": True, "truncation_side": "right",
                     "optim.betas": [0.9, 0.99], "optim.max_grad_norm": None, "seed": 7, "eval_fraction": 0.1}  # fmt: skip
    assert nest(typed)["optim"] == {"lr": 3e-4, "betas": [0.9, 0.99], "max_grad_norm": None}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"optim.lr": "-1"}, "field 'optim.lr': out of range: must be > 0, got -1"),
        ({"optim.lr": "fast"}, "field 'optim.lr': expected a number"),
        ({"optim.lr": "nan"}, "field 'optim.lr': must be finite"),
        ({"max_steps": "1.5"}, "field 'max_steps': expected a whole number"),
        ({"cpu": "maybe"}, "field 'cpu': expected true or false"),
        ({"truncation_side": "middle"}, "field 'truncation_side': must be one of left, right"),
        ({"optim.betas": "[0.9]"}, "field 'optim.betas': expected 2 values"),
        ({"snapshot": "/etc/passwd"}, "field 'snapshot': set by the studio"),
        (
            {"optim.lrr": "1"},
            "field 'optim.lrr': not a setting of reward_model \\(did you mean 'optim.lr'\\?\\)",
        ),
    ],
)
def test_validate_names_the_bad_field(env, values, message):
    with pytest.raises(ServiceError, match=message):
        env.services.jobs.validate("reward_model", values)


def test_coerce_field_empty_values():
    assert coerce_field(FieldSpec("a", "optional_float", 1.0), " ") is None
    assert coerce_field(FieldSpec("a", "int", 3), "") == 3
    with pytest.raises(ServiceError, match="field 'a': a value is required"):
        coerce_field(FieldSpec("a", "str", None, required=True), "")


def test_launch_fills_the_managed_fields_and_queues_the_job(env):
    info = env.launch(tiny_values(), name="  first run ", timeout_s=600)
    assert (info.state, info.attempt, info.name) == ("queued", 1, "first run")
    assert (info.timeout_s, info.processes) == (600, 1)
    with env.db.read() as s:
        job = s.get(Job, info.id)
        snapshot = s.get(DatasetSnapshot, env.snapshot_id)
        base = s.get(Checkpoint, env.base_id)
    assert job.output_dir == str(env.settings.data_dir / "jobs" / str(info.id))
    assert job.config["snapshot"] == snapshot.path and job.config["model"] == base.path
    assert job.config["output_dir"] == job.output_dir and job.config["progress"] is False
    assert job.config["model_cache"] == str(env.settings.model_cache)
    assert job.config["optim"] == {"lr": 2e-3} and job.config["max_steps"] == 12 and job.config["cpu"] is True
    no_base = env.launch(tiny_values(), base_checkpoint_id=None)
    with env.db.read() as s:
        assert s.get(Job, no_base.id).config["model"] == "minilm"  # the recipe's default


def test_launch_refuses_what_cannot_run(env, tmp_path):
    with env.db.write() as s:
        segments = DatasetSnapshot(project_id=env.project_id, kind=SnapshotKind.segments, format="jsonl",
                                   path=str(tmp_path / "s.jsonl"), sha256="0" * 64)  # fmt: skip
        gone = DatasetSnapshot(project_id=env.project_id, kind=SnapshotKind.reward, format="jsonl",
                               path=str(tmp_path / "gone.jsonl"), sha256="0" * 64)  # fmt: skip
        broken = Checkpoint(name="b", path="/x", kind=CheckpointKind.policy, status="unloadable")
        reward = Checkpoint(name="r", path="/y", kind=CheckpointKind.reward)
        s.add_all([segments, gone, broken, reward])
        s.flush()
        ids = segments.id, gone.id, broken.id, reward.id
    with pytest.raises(
        ServiceError, match=r"trains on reward or preferences snapshots; snapshot .* is segments"
    ):
        env.launch(tiny_values(), snapshot_id=ids[0])
    with pytest.raises(ServiceError, match=r"the file of snapshot .* is missing"):
        env.launch(tiny_values(), snapshot_id=ids[1])
    with pytest.raises(ServiceError, match="unloadable"):
        env.launch(tiny_values(), base_checkpoint_id=ids[2])
    with pytest.raises(ServiceError, match="needs a policy \\(causal LM\\) base"):
        env.launch({}, recipe="segment_reward_model", base_checkpoint_id=ids[3])
    with pytest.raises(NotFound):
        env.launch(tiny_values(), snapshot_id=999)
    with pytest.raises(ServiceError, match="processes must be"):
        env.launch(tiny_values(), processes=0)
    with pytest.raises(ServiceError, match="unknown recipe"):
        env.launch({}, recipe="nope")
    env.services.users.add_user(ADMIN, "ann", "annotator", PASSWORD)
    with pytest.raises(Forbidden):
        env.services.jobs.launch("ann", project_id=env.project_id, recipe="reward_model", snapshot_id=env.snapshot_id,
                                 base_checkpoint_id=None, values={})  # fmt: skip
    with pytest.raises(Forbidden):
        env.services.jobs.list_jobs("ann")
    with env.db.read() as s:
        assert s.exec(sa.select(sa.func.count()).select_from(Job)).one()[0] == 0


def set_state(env, job_id: int, state: JobState, **values) -> None:
    with env.db.write() as s:
        s.execute(sa.update(Job.__table__).where(Job.__table__.c.id == job_id).values(state=state, **values))


def test_cancel_rules(env):
    jobs = env.services.jobs
    queued = env.launch(tiny_values())
    assert jobs.cancel(ADMIN, queued.id).state == "cancelled"
    with pytest.raises(Conflict, match="already cancelled"):
        jobs.cancel(ADMIN, queued.id)
    running = env.launch(tiny_values())
    set_state(env, running.id, JobState.running)
    info = jobs.cancel(ADMIN, running.id)
    assert info.state == "running" and info.cancel_requested  # the worker stops it
    interrupted = env.launch(tiny_values())
    set_state(env, interrupted.id, JobState.interrupted)
    assert jobs.cancel(ADMIN, interrupted.id).state == "cancelled"
    with pytest.raises(NotFound):
        jobs.cancel(ADMIN, 999)


def test_resume_rules(env):
    jobs = env.services.jobs
    old = env.launch(tiny_values(), name="rm")
    jobs.cancel(ADMIN, old.id)
    new = jobs.resume(ADMIN, old.id)
    assert new.id != old.id and new.parent_job_id == old.id and new.output_dir == old.output_dir
    assert (new.state, new.name, new.attempt) == ("queued", "rm", 1)
    with env.db.read() as s:
        assert s.get(Job, new.id).config == s.get(Job, old.id).config
    with pytest.raises(Conflict, match=f"job {new.id} is already continuing this run"):
        jobs.resume(ADMIN, old.id)
    set_state(env, new.id, JobState.interrupted, attempt=1)
    again = jobs.resume(ADMIN, new.id)
    assert (again.id, again.state, again.attempt) == (new.id, "queued", 2)
    bad = env.launch(tiny_values())
    set_state(
        env, bad.id, JobState.failed, failure_code=FailureCode.bad_input, failure_message="field 'x': no"
    )
    with pytest.raises(Conflict, match="failed on its input"):
        jobs.resume(ADMIN, bad.id)
    done = env.launch(tiny_values())
    set_state(env, done.id, JobState.succeeded)
    with pytest.raises(Conflict, match="is succeeded"):
        jobs.resume(ADMIN, done.id)


def test_job_detail_progress_eta_metrics_and_plain_log(env):
    info = env.launch(tiny_values())
    set_state(env, info.id, JobState.running, started_at=utcnow() - timedelta(seconds=10))
    folder = Path(info.output_dir)
    folder.mkdir(parents=True)
    rows = [{"step": 0, "run/total_steps": 10}] + [{"step": i, "train/loss": 1 / i} for i in range(1, 6)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with env.db.write() as s:
        q.ingest_metrics(s, info.id, folder / "metrics.jsonl")
    (folder / "job.log").write_text("start\n\x1b[31mred\x1b[0m\nbar 10%\rbar 50%\rbar 90%\nerror[x]: y\n")
    detail = env.job(info.id)
    assert (detail.step, detail.total_steps, detail.progress) == (5, 10, 0.5)
    assert 8 < detail.eta_s < 14  # 10 s for 5 steps, 5 to go
    assert detail.metrics == {"train/loss": [(i, 1 / i) for i in range(1, 6)]}
    assert detail.log_tail == "start\nred\nbar 90%\nerror[x]: y"
    assert detail.snapshot_sha256 == "5" * 64 and detail.config["max_steps"] == 12
    listed = env.services.jobs.list_jobs(ADMIN, env.project_id)
    assert [j.id for j in listed] == [info.id] and listed[0].eta_s is not None


def test_read_log_tail_keeps_the_last_lines(tmp_path):
    path = tmp_path / "job.log"
    path.write_text("".join(f"line {i}\n" for i in range(500)))
    assert read_log_tail(path, lines=3) == "line 497\nline 498\nline 499"
    assert read_log_tail(tmp_path / "none.log") == ""


def fake_checkpoint(folder: Path, step: int = 3) -> Path:
    """A complete checkpoint folder written by trainers.checkpoint (no model needed)."""
    return write_checkpoint(
        folder,
        lambda tmp: (tmp / "model.safetensors").write_bytes(b"w" * 64),
        {"step": step, "metrics": {"eval/loss": 0.4}},
    )


def test_checkpoint_tree_and_verify_marks_a_tampered_checkpoint_unloadable(env, tmp_path):
    jobs = env.services.jobs
    job = env.launch(tiny_values())
    child_dir = fake_checkpoint(tmp_path / "ck" / "final")
    facts = checkpoint_facts(child_dir)
    assert facts.problem is None and facts.studio["step"] == 3 and len(facts.manifest_sha256) == 64
    with env.db.write() as s:
        row = q.register_checkpoint(s, job=q.get_job(s, job.id), path=facts.path, kind=CheckpointKind.reward,
                                    name="rm", manifest_sha256=facts.manifest_sha256, studio=facts.studio)  # fmt: skip
        s.execute(
            sa.update(Job.__table__).where(Job.__table__.c.id == job.id).values(output_checkpoint_id=row.id)
        )
        grandchild = Checkpoint(name="rm2", path="/z", kind=CheckpointKind.reward, parent_id=row.id)
        other = Checkpoint(name="other", path="/o", kind=CheckpointKind.policy)
        s.add_all([grandchild, other])
        s.flush()
        ids = row.id, grandchild.id, other.id
    listed = jobs.checkpoints(ADMIN, env.project_id)
    assert [(c.id, c.depth) for c in listed] == [(env.base_id, 0), (ids[0], 1), (ids[1], 2), (ids[2], 0)]
    rm = listed[1]
    assert (rm.parent_id, rm.job_id, rm.recipe, rm.snapshot_sha256, rm.metrics) == (
        env.base_id, job.id, "reward_model", "5" * 64, {"eval/loss": 0.4},
    )  # fmt: skip
    assert jobs.job(ADMIN, job.id).output_checkpoint.id == ids[0]

    assert jobs.verify_checkpoint(ADMIN, ids[0]).status == "ready"
    weights = child_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[10] ^= 1  # one altered byte
    weights.write_bytes(bytes(data))
    verified = jobs.verify_checkpoint(ADMIN, ids[0])
    assert verified.status == "unloadable" and "does not match its sha256" in verified.problem
    assert jobs.checkpoints(ADMIN)[1].status == "unloadable"
    assert checkpoint_facts(child_dir).problem is not None
    # A different but self-consistent checkpoint in its place does not pass for the registered one.
    fake_checkpoint(child_dir, step=4)
    assert jobs.verify_checkpoint(ADMIN, ids[0]).status == "unloadable"
    assert jobs.verify_checkpoint(ADMIN, ids[1]).status == "ready"  # no manifest recorded: left as is


def test_tree_order_survives_a_cycle():
    a = Checkpoint(id=1, name="a", path="a", kind="policy", parent_id=2)
    b = Checkpoint(id=2, name="b", path="b", kind="policy", parent_id=1)
    assert sorted(r.id for r, _ in tree_order([a, b])) == [1, 2]


def test_settings_and_cli_know_the_worker(monkeypatch):
    assert Settings.from_env({"STUDIO_WORKER": "0"}).start_worker is False
    assert Settings.from_env({}).start_worker is True
    args = build_parser().parse_args(["worker", "--poll-s", "0.2", "--stale-s", "5"])
    assert (args.poll_s, args.stale_s, args.heartbeat_s, args.grace_s) == (0.2, 5.0, 5.0, 30.0)


def test_the_studio_process_does_not_import_torch_for_jobs(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys; from studio.services.jobs import JobService, recipe_schemas; from studio import worker; "
        "s = recipe_schemas(); assert 'reward_model' in s, s; "
        "assert 'torch' not in sys.modules and 'trainers.recipes' not in sys.modules, 'torch imported'"
    )
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ}, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert time.monotonic() - started < 60


def test_two_resumes_of_one_run_at_the_same_moment_queue_one_job(any_db, tmp_path, tiny_model):
    """Two clicks on Resume (PostgreSQL: concurrent transactions) must not queue two jobs in one folder."""
    import threading

    env = make_env(any_db, tmp_path, tiny_model)
    jobs = env.services.jobs
    for _ in range(5):
        old = env.launch(tiny_values())
        jobs.cancel(ADMIN, old.id)
        barrier = threading.Barrier(2)
        results: list = []

        def resume(
            old_id: int = old.id, barrier: threading.Barrier = barrier, results: list = results
        ) -> None:
            barrier.wait()
            try:
                results.append(jobs.resume(ADMIN, old_id).id)
            except Conflict as exc:
                results.append(exc)

        threads = [threading.Thread(target=resume) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(results) == 2 and sum(isinstance(r, int) for r in results) == 1, results
        with env.db.read() as s:
            live = s.exec(
                sa.select(Job.id).where(Job.output_dir == old.output_dir, Job.state == "queued")
            ).all()
        assert len(live) == 1


def test_trainer_environment_is_offline_and_carries_no_studio_secrets(monkeypatch):
    from studio.services.job_support import child_env

    monkeypatch.setenv("STUDIO_DATABASE_URL", "postgresql://u:p@h/db")
    monkeypatch.setenv("STUDIO_ADMIN_PASSWORD", "hunter2")
    env = child_env()
    assert "STUDIO_DATABASE_URL" not in env and "STUDIO_ADMIN_PASSWORD" not in env
    assert env["HF_HUB_OFFLINE"] == "1"
