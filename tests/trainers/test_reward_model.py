"""The sequence reward-model recipe on the tiny random Llama (CPU): learning, invariants, resume, CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from trainers.__main__ import main as trainers_main
from trainers.checkpoint import find_latest_complete, read_studio_json, step_dir, verify_manifest
from trainers.config import ConfigError, OptimConfig
from trainers.metrics import NonFiniteError, read_metrics
from trainers.recipes import reward_model as rm
from trainers.recipes.reward_model import RewardModelConfig, train
from trainers.synthetic import SyntheticTask, write_synthetic_snapshot

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    return write_synthetic_snapshot(tmp_path_factory.mktemp("synthetic"), n_train=64, n_eval=32)


def config(tmp_path, tiny_model, snapshot, **overrides) -> RewardModelConfig:
    base = RewardModelConfig(
        snapshot=str(snapshot.train),
        eval_snapshot=str(snapshot.eval),
        output_dir=str(tmp_path / "run"),
        model=str(tiny_model),
        max_length=48,
        batch_size=4,
        max_steps=6,
        optim=OptimConfig(lr=2e-3, warmup_ratio=0.2),
        progress=False,
        cpu=True,
    )
    return dataclasses.replace(base, **overrides)


def final_weights(result) -> dict[str, torch.Tensor]:
    return load_file(result.final_checkpoint / "model.safetensors")


def assert_same_weights(a, b, *, exact: bool, **tolerance) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], msg=name, **tolerance)


def test_parameters_change_loss_decreases_and_final_model_loads_with_plain_transformers(
    tmp_path, tiny_model, snapshot
):
    cfg = config(tmp_path, tiny_model, snapshot, batch_size=8, max_steps=30,
                 optim=OptimConfig(lr=3e-3, schedule="constant"))  # fmt: skip
    result = train(cfg)
    assert result.steps == 30 and not result.stopped and result.resumed_from is None
    losses = [
        row["train/loss"] for row in read_metrics(result.output_dir / "metrics.jsonl") if "train/loss" in row
    ]
    assert len(losses) == 30
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert first > 0.6 and last < first - 0.15, (first, last)  # 8 epochs over 64 pairs: it fits them
    assert set(result.metrics) >= {"eval/accuracy", "eval/loss", "eval/ece", "eval/margin"}
    assert 0 <= result.metrics["eval/ece"] <= 1 and result.metrics["eval/pairs"] == 32

    final = result.final_checkpoint
    verify_manifest(final)
    studio = read_studio_json(final)
    assert studio["recipe"] == "reward_model" and studio["final"] and studio["step"] == 30
    assert studio["config"]["optim"]["lr"] == 3e-3 and len(studio["snapshot_sha256"]) == 64
    assert studio["metrics"] == result.metrics and "reward_std" in studio["extra"]
    model = AutoModelForSequenceClassification.from_pretrained(final)  # plain transformers, no studio code
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    backbone = load_file(Path(tiny_model) / "model.safetensors")
    trained = model.state_dict()
    assert not torch.equal(trained["model.embed_tokens.weight"], backbone["model.embed_tokens.weight"])
    assert not torch.equal(
        trained["model.layers.1.mlp.up_proj.weight"], backbone["model.layers.1.mlp.up_proj.weight"]
    )
    with torch.no_grad():
        scores = model(**tokenizer(["good table", "bad chair"], return_tensors="pt", padding=True)).logits
    assert scores.shape == (2, 1) and torch.isfinite(scores).all()


def test_gradient_accumulation_equals_one_big_batch(tmp_path, tiny_model, snapshot):
    small = train(config(tmp_path / "a", tiny_model, snapshot, batch_size=2, max_steps=3,
                         optim=OptimConfig(lr=2e-3, grad_accum=4)))  # fmt: skip
    big = train(config(tmp_path / "b", tiny_model, snapshot, batch_size=8, max_steps=3,
                       optim=OptimConfig(lr=2e-3, grad_accum=1)))  # fmt: skip
    # Not bit-identical: micro-batches pad to their own lengths and sum in another order.
    assert_same_weights(final_weights(small), final_weights(big), exact=False, rtol=1e-4, atol=2e-5)
    # The weights alone would not catch a missing ``/ accum`` (clipping to 1.0 and Adam's scale
    # invariance hide it); the logged gradient norm is measured before clipping, so it sees the scale.
    for key in ("train/loss", "train/grad_norm"):
        small_values, big_values = (
            [row[key] for row in read_metrics(r.output_dir / "metrics.jsonl") if key in row]
            for r in (small, big)
        )
        assert len(small_values) == 3 and small_values == pytest.approx(big_values, rel=1e-4), key
    # Control: 3 steps of 2 pairs (no accumulation) end somewhere measurably different.
    other = train(config(tmp_path / "c", tiny_model, snapshot, batch_size=2, max_steps=3,
                         optim=OptimConfig(lr=2e-3, grad_accum=1)))  # fmt: skip
    with pytest.raises(AssertionError):
        assert_same_weights(final_weights(small), final_weights(other), exact=False, rtol=1e-4, atol=2e-5)


class Crash(Exception):
    pass


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, tiny_model, snapshot):
    common = {"max_steps": 7, "checkpoint_every": 2, "keep_checkpoints": 0, "eval_every": 3}
    straight = train(config(tmp_path / "straight", tiny_model, snapshot, **common))

    cfg = config(tmp_path / "crashed", tiny_model, snapshot, **common)

    def crash_at_5(step: int) -> bool:
        if step == 5:
            raise Crash  # after step 5's update, before its (non-existent) checkpoint: step-4 is the latest
        return False

    with pytest.raises(Crash):
        train(cfg, should_stop=crash_at_5)
    run = Path(cfg.output_dir)
    assert find_latest_complete(run / "checkpoints") == step_dir(run / "checkpoints", 4)
    resumed = train(cfg)
    assert resumed.resumed_from == step_dir(run / "checkpoints", 4) and resumed.steps == 7
    # Bit-identical on CPU: data order and randomness are functions of (seed, step); optimizer and
    # schedule state come back from the checkpoint.
    assert_same_weights(final_weights(straight), final_weights(resumed), exact=True)
    assert resumed.metrics == straight.metrics
    rows = read_metrics(run / "metrics.jsonl")
    losses = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    assert losses == [(r["step"], r["train/loss"]) for r in read_metrics(straight.output_dir / "metrics.jsonl")
                      if "train/loss" in r]  # fmt: skip
    assert [s for s, _ in losses] == list(range(1, 8))  # step 5 logged once, though it ran twice


def test_stop_request_checkpoints_and_a_rerun_finishes_identically(tmp_path, tiny_model, snapshot):
    straight = train(config(tmp_path / "straight", tiny_model, snapshot, max_steps=5))
    cfg = config(tmp_path / "stopped", tiny_model, snapshot, max_steps=5)
    stopped = train(cfg, should_stop=lambda step: step == 2)  # what SIGTERM does in main()
    assert stopped.stopped and stopped.final_checkpoint is None and stopped.steps == 2
    assert stopped.last_checkpoint == step_dir(Path(cfg.output_dir) / "checkpoints", 2)
    finished = train(cfg)
    assert finished.resumed_from == stopped.last_checkpoint
    assert_same_weights(final_weights(straight), final_weights(finished), exact=True)


def test_resume_refuses_a_changed_config(tmp_path, tiny_model, snapshot):
    cfg = config(tmp_path, tiny_model, snapshot, max_steps=4)
    train(cfg, should_stop=lambda step: step == 2)
    with pytest.raises(ConfigError, match="optim changed since it was written") as info:
        train(dataclasses.replace(cfg, optim=OptimConfig(lr=1e-4)))
    assert info.value.field == "optim"
    with pytest.raises(ConfigError, match="set resume: true"):
        train(dataclasses.replace(cfg, resume=False))
    # harmless changes resume (the fast last layer is this recipe's own harmless field)
    harmless = dataclasses.replace(cfg, eval_every=1, progress=True, score_position_only_last_layer=False)
    assert train(harmless).steps == 4


def test_non_finite_loss_fails_the_run_at_that_step(tmp_path, tiny_model, snapshot, monkeypatch):
    real = rm.bradley_terry_loss
    calls = []

    def poisoned(chosen, rejected, margin=None):
        calls.append(1)
        loss, stats = real(chosen, rejected, margin)
        return (loss * float("nan"), stats) if len(calls) == 3 else (loss, stats)

    monkeypatch.setattr(rm, "bradley_terry_loss", poisoned)
    cfg = config(tmp_path, tiny_model, snapshot, max_steps=5, checkpoint_every=1, keep_checkpoints=0)
    with pytest.raises(NonFiniteError, match=r"non-finite loss .* at step 3") as info:
        train(cfg)
    assert info.value.code == "nan_loss"
    saved = sorted(p.name for p in (Path(cfg.output_dir) / "checkpoints").iterdir())
    assert saved == ["step-000001", "step-000002"]  # nothing from the failed step or after
    weights = load_file(Path(cfg.output_dir) / "checkpoints" / "step-000002" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_batch_larger_than_the_data_is_a_config_error(tmp_path, tiny_model, snapshot):
    with pytest.raises(ConfigError, match=r"needs 80 pairs .* has 64 training pairs") as info:
        train(config(tmp_path, tiny_model, snapshot, batch_size=20, optim=OptimConfig(grad_accum=4)))
    assert info.value.field == "batch_size"


def test_conversational_snapshot_with_margins_trains_through_the_chat_template(tmp_path, tiny_model):
    task = SyntheticTask(conversational=True, with_margin=True)
    paths = write_synthetic_snapshot(tmp_path / "data", n_train=16, n_eval=0, task=task)
    cfg = config(tmp_path, tiny_model, paths, eval_snapshot=None, eval_fraction=0.25, max_steps=2)
    result = train(cfg)
    assert result.steps == 2 and result.metrics["eval/pairs"] > 0


def run_cli(args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=180, **kwargs)


def test_cli_end_to_end_writes_a_checkpoint_plain_transformers_loads(tmp_path, tiny_model, snapshot):
    cfg_path = tmp_path / "rm.yaml"
    cfg_path.write_text(
        f"snapshot: {snapshot.train}\neval_snapshot: {snapshot.eval}\noutput_dir: {tmp_path / 'run'}\n"
        f"model: {tiny_model}\nmax_length: 48\nbatch_size: 4\nmax_steps: 3\ncpu: true\n"
        "optim:\n  lr: 1e-3\n"
    )
    proc = run_cli([sys.executable, "-m", "trainers", "reward_model", "--config", str(cfg_path),
                    "--set", "checkpoint_every=2", "--set", "progress=false"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["final_checkpoint"] == str(tmp_path / "run" / "final")
    assert "eval/accuracy" in summary["metrics"]
    model = AutoModelForSequenceClassification.from_pretrained(summary["final_checkpoint"])
    assert model.config.num_labels == 1
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "COMPLETE").is_file()
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) >= 3


def test_cli_failures_print_a_code_and_exit_with_its_status(tmp_path, snapshot, capsys):
    cfg_path = tmp_path / "rm.yaml"
    cfg_path.write_text(f"snapshot: {snapshot.train}\noutput_dir: {tmp_path / 'run'}\n")
    assert trainers_main(["reward_model", "--config", str(cfg_path), "--set", "optim.lr=-1"]) == 2
    assert f"error[bad_input]: {cfg_path}: field 'optim.lr': out of range" in capsys.readouterr().err
    assert trainers_main(["reward_model", "--config", str(cfg_path), "--set", f"model={tmp_path}/none"]) == 2
    assert "error[bad_input]" in capsys.readouterr().err
    assert trainers_main(["no_such_recipe"]) == 2
    assert "unknown recipe 'no_such_recipe'" in capsys.readouterr().err
    assert trainers_main(["reward_model", "--config", str(cfg_path), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["optim"]["lr"] == 5e-5


def test_studio_train_runs_the_trainer_in_a_subprocess(tmp_path, tiny_model, snapshot):
    cfg_path = tmp_path / "rm.json"
    cfg_path.write_text(json.dumps({"snapshot": str(snapshot.train), "output_dir": str(tmp_path / "run"),
                                    "model": str(tiny_model), "max_steps": 1, "batch_size": 2, "cpu": True,
                                    "progress": False, "eval_fraction": 0.0, "max_length": 32}))  # fmt: skip
    code = (
        "import sys; from studio.cli import main; "
        "assert 'torch' not in sys.modules and 'trainers.recipes' not in sys.modules; "
        f"sys.exit(main(['train', 'reward_model', '--config', {str(cfg_path)!r}, '--set', 'seed=1']))"
    )
    proc = run_cli([sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_studio_json(tmp_path / "run" / "final")["config"]["seed"] == 1


def test_two_processes_under_torchrun_equal_one_process(tmp_path, tiny_model, snapshot):
    """DDP on CPU (gloo): each process takes half of every batch; the averaged gradients match."""
    single = train(config(tmp_path / "one", tiny_model, snapshot, batch_size=4, max_steps=3))
    cfg_path = tmp_path / "rm.yaml"
    cfg_path.write_text(
        f"snapshot: {snapshot.train}\neval_snapshot: {snapshot.eval}\noutput_dir: {tmp_path / 'two'}\n"
        f"model: {tiny_model}\nmax_length: 48\nbatch_size: 2\nmax_steps: 3\ncpu: true\nprogress: false\n"
        "optim:\n  lr: 2.0e-3\n  warmup_ratio: 0.2\ncheckpoint_every: 2\n"
    )
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = run_cli([*launcher, "-m", "trainers", "reward_model", "--config", str(cfg_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two" / "final"
    assert read_studio_json(two)["world_size"] == 2
    assert_same_weights(
        final_weights(single), load_file(two / "model.safetensors"), exact=False, rtol=1e-4, atol=1e-5
    )
    assert read_studio_json(two)["metrics"]["eval/pairs"] == 32  # sharded evaluation gathered every pair once
    # 3 train rows, 1 eval row and the run/total_steps row, written once, by the main process
    assert len(read_metrics(tmp_path / "two" / "metrics.jsonl")) == 3 + 1 + 1


@pytest.mark.slow
def test_minilm_reaches_90_percent_held_out_accuracy_on_the_synthetic_task(tmp_path):
    """The "Done when" check: 480 pairs, one epoch (30 steps of 16), 200 held-out pairs."""
    from trainers.models import DEFAULT_MODELS, default_cache_dir, is_complete

    folder = default_cache_dir() / DEFAULT_MODELS["minilm"].folder
    if not is_complete(folder):
        message = f"MiniLM is not in the model cache ({folder}); run `studio fetch-models`"
        if os.environ.get("STUDIO_STRICT_TESTS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    paths = write_synthetic_snapshot(tmp_path / "data", n_train=480, n_eval=200)
    cfg = RewardModelConfig(
        snapshot=str(paths.train),
        eval_snapshot=str(paths.eval),
        output_dir=str(tmp_path / "run"),
        model="minilm",
        batch_size=16,
        max_length=48,
        optim=OptimConfig(lr=3e-4, warmup_ratio=0.1),
        progress=False,
        cpu=True,
    )
    wall, cpu = time.perf_counter(), time.process_time()
    result = train(cfg)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"MiniLM RM: {result.steps} steps, {result.metrics} in {wall:.0f} s wall, {cpu:.0f} s CPU")
    assert result.steps == 30
    assert result.metrics["eval/accuracy"] >= 0.90, result.metrics
