"""The DPO recipe on the tiny random Llama (CPU): learning, reference cache, invariants, resume, inputs, CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainers.__main__ import main as trainers_main
from trainers.checkpoint import (
    find_latest_complete,
    load_training_state,
    read_studio_json,
    step_dir,
    verify_manifest,
)
from trainers.config import ConfigError, config_from_dict, load_config
from trainers.data import read_preferences
from trainers.logprobs import ResponseLogps
from trainers.metrics import NonFiniteError, read_metrics
from trainers.policy_data import encode_policy_pairs
from trainers.recipes import dpo
from trainers.recipes.dpo import DPOConfig, DPOOptimConfig, train
from trainers.synthetic import SyntheticTask, write_synthetic_snapshot

REPO = Path(__file__).resolve().parents[2]
LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    return write_synthetic_snapshot(tmp_path_factory.mktemp("synthetic"), n_train=64, n_eval=32)


GOOD, BAD = ("good", "warm", "fair", "calm"), ("bad", "slow", "vast", "blue")
NEUTRAL = ("sea", "moon", "pizza", "service", "price", "weather", "sky", "words", "sentence", "hello")


def write_word_task(path: Path, n: int, seed: int) -> Path:
    """Chosen responses carry two GOOD words, rejected ones two BAD words, among neutral fillers.

    The tiny tokenizer (trained on the conftest corpus) has every one of these words as one token, so
    a random 2-layer model can generalise "GOOD words are preferred" to held-out pairs within a few
    steps (the VADER task's words are split into characters by this tokenizer).
    """
    rng = random.Random(seed)

    def response(marked: tuple[str, ...]) -> str:
        words = [rng.choice(NEUTRAL) for _ in range(6)]
        for position in rng.sample(range(6), 2):
            words[position] = rng.choice(marked)
        return " ".join(words)

    rows = [{"prompt": f"Write one sentence about the {rng.choice(NEUTRAL)}.\n", "chosen": response(GOOD),
             "rejected": response(BAD)} for _ in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def config(tmp_path, tiny_model, snapshot, **overrides) -> DPOConfig:
    base = DPOConfig(
        snapshot=str(snapshot.train),
        eval_snapshot=str(snapshot.eval),
        output_dir=str(tmp_path / "run"),
        model=str(tiny_model),
        max_length=80,  # the longest synthetic pair is 77 tokens: nothing is truncated
        batch_size=4,
        max_steps=6,
        optim=DPOOptimConfig(lr=1e-3, warmup_ratio=0.2),
        progress=False,
        cpu=True,
    )
    return dataclasses.replace(base, **overrides)


def weights_hash(folder: Path) -> str:
    return hashlib.sha256((Path(folder) / "model.safetensors").read_bytes()).hexdigest()


def train_rows(path: Path, key: str = "train/loss") -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_metrics(Path(path) / "metrics.jsonl") if key in r]


def test_short_run_raises_held_out_reward_accuracy_and_the_policy_loads_with_plain_transformers(
    tmp_path, tiny_model
):
    train_path, eval_path = (
        write_word_task(tmp_path / "train.jsonl", 64, 0),
        write_word_task(tmp_path / "eval.jsonl", 32, 1),
    )
    cfg = DPOConfig(snapshot=str(train_path), eval_snapshot=str(eval_path), output_dir=str(tmp_path / "run"),
                    model=str(tiny_model), max_length=64, batch_size=4, max_steps=12, eval_every=6,
                    optim=DPOOptimConfig(lr=1e-3, schedule="constant"), progress=False, cpu=True)  # fmt: skip
    result = train(cfg)
    assert result.steps == 12 and not result.stopped
    rows = read_metrics(result.output_dir / "metrics.jsonl")
    assert rows[0]["step"] == 0 and rows[0]["run/total_steps"] == 12  # the row the job worker reads
    first = next(r for r in rows if "train/loss" in r)
    # step 1 is computed before any update: the policy is the reference, every implicit reward is 0
    assert first["step"] == 1 and first["train/loss"] == pytest.approx(LN2, abs=1e-5)
    assert abs(first["train/rewards/margin"]) < 1e-5 and first["train/tokens"] > 0
    # held out: at step 0 every margin is 0 (loss ln 2, accuracy 0 since ties count wrong)
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert evals[0]["eval/rewards/margin"] < evals[1]["eval/rewards/margin"]  # still rising
    m = result.metrics
    assert m["eval/rewards/accuracy"] >= 0.85 and m["eval/rewards/margin"] > 0.15, m
    assert m["eval/loss"] < LN2 - 0.08 and m["eval/pairs"] == 32
    assert m["eval/rewards/chosen"] > m["eval/rewards/rejected"]

    final = result.final_checkpoint
    verify_manifest(final)
    studio = read_studio_json(final)
    assert studio["recipe"] == "dpo" and studio["kind"] == dpo.CHECKPOINT_KIND == "policy" and studio["final"]
    assert studio["metrics"] == m and studio["extra"]["beta"] == 0.1 and studio["step"] == 12
    assert (
        studio["parent"]["path"] == str(Path(tiny_model).resolve()) and len(studio["snapshot_sha256"]) == 64
    )
    assert not (final / "training_state.pt").exists()
    policy = AutoModelForCausalLM.from_pretrained(final)  # plain transformers, no studio code
    tokenizer = AutoTokenizer.from_pretrained(final)
    base = load_file(Path(tiny_model) / "model.safetensors")
    trained = policy.state_dict()
    assert not torch.equal(
        trained["model.layers.1.mlp.up_proj.weight"], base["model.layers.1.mlp.up_proj.weight"]
    )
    assert torch.equal(trained["lm_head.weight"], trained["model.embed_tokens.weight"])  # still tied
    prompt = tokenizer("Write a short review of the lamp.\n", return_tensors="pt")
    out = policy.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_cached_reference_logps_equal_the_starting_policy_scored_one_pair_at_a_time(
    tmp_path, tiny_model, snapshot
):
    cfg = config(tmp_path, tiny_model, snapshot, max_steps=1, checkpoint_every=1, eval_batch_size=5)
    train(cfg)
    state = load_training_state(step_dir(Path(cfg.output_dir) / "checkpoints", 1))
    ref_train, ref_eval = state["ref_train"], state["ref_eval"]
    assert ref_train.shape == (64, 2) and ref_eval.shape == (32, 2)
    # independently: the untouched starting weights, full logits, one unpadded sequence at a time
    lm = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    oracle = ResponseLogps(lm)
    pairs = encode_policy_pairs(tokenizer, read_preferences(snapshot.train), 80)
    for i in (0, 17, 63):
        for side, text in enumerate((pairs[i].chosen, pairs[i].rejected)):
            ids = torch.tensor([text.ids])
            value = oracle.reference_path(ids, torch.ones_like(ids), torch.tensor([text.response_mask]))
            assert ref_train[i, side].item() == pytest.approx(value.item(), abs=1e-4)
    assert (ref_train < 0).all() and not torch.equal(ref_train[:, 0], ref_train[:, 1])


def test_gradient_accumulation_equals_one_big_batch(tmp_path, tiny_model, snapshot):
    small = train(config(tmp_path / "a", tiny_model, snapshot, batch_size=2, max_steps=3,
                         optim=DPOOptimConfig(lr=1e-3, grad_accum=4)))  # fmt: skip
    big = train(config(tmp_path / "b", tiny_model, snapshot, batch_size=8, max_steps=3,
                       optim=DPOOptimConfig(lr=1e-3, grad_accum=1)))  # fmt: skip
    a, b = (
        load_file(small.final_checkpoint / "model.safetensors"),
        load_file(big.final_checkpoint / "model.safetensors"),
    )
    for name in a:  # not bit-identical: micro-batches pad to their own lengths and sum in another order
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=2e-5, msg=name)
    for key in ("train/loss", "train/grad_norm"):  # the norm is measured before clipping: it sees the scale
        small_values, big_values = ([v for _, v in train_rows(r.output_dir, key)] for r in (small, big))
        assert small_values == pytest.approx(big_values, rel=1e-4), key
    other = train(config(tmp_path / "c", tiny_model, snapshot, batch_size=2, max_steps=3,
                         optim=DPOOptimConfig(lr=1e-3, grad_accum=1)))  # fmt: skip
    c = load_file(other.final_checkpoint / "model.safetensors")
    assert any(not torch.allclose(a[n], c[n], rtol=1e-4, atol=2e-5) for n in a)  # the control differs


class Crash(Exception):
    pass


def test_resume_after_a_stop_or_a_crash_equals_an_uninterrupted_run(
    tmp_path, tiny_model, snapshot, monkeypatch
):
    common = {"max_steps": 7, "checkpoint_every": 2, "keep_checkpoints": 0, "eval_every": 3}
    straight = train(config(tmp_path / "straight", tiny_model, snapshot, **common))

    # a stop request (SIGTERM in main()) after step 3: checkpoint step-3, then a rerun finishes
    stopped_cfg = config(tmp_path / "stopped", tiny_model, snapshot, **common)
    stopped = train(stopped_cfg, should_stop=lambda step: step == 3)
    assert stopped.stopped and stopped.final_checkpoint is None and stopped.steps == 3
    assert stopped.last_checkpoint == step_dir(Path(stopped_cfg.output_dir) / "checkpoints", 3)

    reference_passes = []
    real_score = dpo.score_pairs
    monkeypatch.setattr(dpo, "score_pairs", lambda run, pairs, desc: reference_passes.append(desc) or real_score(run, pairs, desc))  # fmt: skip
    finished = train(stopped_cfg)
    assert finished.resumed_from == stopped.last_checkpoint and finished.steps == 7
    assert not [d for d in reference_passes if "reference" in d]  # the cache came back from the checkpoint

    # a stop request during the reference pass: a step-0 checkpoint keeps the pass for the rerun
    early_cfg = config(tmp_path / "early", tiny_model, snapshot, **common)
    early = train(early_cfg, should_stop=lambda step: True)
    assert early.stopped and early.steps == 0
    assert early.last_checkpoint == step_dir(Path(early_cfg.output_dir) / "checkpoints", 0)
    reference_passes.clear()
    early_done = train(early_cfg)
    assert early_done.resumed_from == early.last_checkpoint and set(reference_passes) == {"eval"}

    # a crash after step 5's update: step-4 is the latest checkpoint
    crashed_cfg = config(tmp_path / "crashed", tiny_model, snapshot, **common)

    def crash_at_5(step: int) -> bool:
        if step == 5:
            raise Crash
        return False

    with pytest.raises(Crash):
        train(crashed_cfg, should_stop=crash_at_5)
    resumed = train(crashed_cfg)
    assert resumed.resumed_from == step_dir(Path(crashed_cfg.output_dir) / "checkpoints", 4)

    # bit-identical on CPU: data order and randomness are functions of (seed, step); optimizer,
    # schedule and reference log-probs come back from the checkpoint
    expected = weights_hash(straight.final_checkpoint)
    for run in (finished, early_done, resumed):
        assert weights_hash(run.final_checkpoint) == expected
        assert run.metrics == straight.metrics
        assert train_rows(run.output_dir) == train_rows(straight.output_dir)  # each step logged once
        assert train_rows(run.output_dir, "train/tokens") == train_rows(straight.output_dir, "train/tokens")


def test_resume_refuses_a_changed_config(tmp_path, tiny_model, snapshot):
    cfg = config(tmp_path, tiny_model, snapshot, max_steps=3)
    train(cfg, should_stop=lambda step: step == 1)
    with pytest.raises(ConfigError, match="beta changed since it was written") as info:
        train(dataclasses.replace(cfg, beta=0.5))
    assert info.value.field == "beta"
    with pytest.raises(ConfigError, match="set resume: true"):
        train(dataclasses.replace(cfg, resume=False))
    assert train(dataclasses.replace(cfg, eval_batch_size=3, logps_chunk_tokens=7)).steps == 3  # harmless


def test_prompt_tokens_are_never_scored_plain_or_conversational(tmp_path, tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for conversational in (False, True):
        paths = write_synthetic_snapshot(tmp_path / str(conversational), n_train=3, n_eval=0,
                                         task=SyntheticTask(conversational=conversational))  # fmt: skip
        raw = read_preferences(paths.train)
        for pair, enc in zip(raw, encode_policy_pairs(tokenizer, raw, 200), strict=True):
            for completion, text in ((pair.chosen, enc.chosen), (pair.rejected, enc.rejected)):
                scored = tokenizer.decode([i for i, m in zip(text.ids, text.response_mask, strict=True) if m])
                context = tokenizer.decode(
                    [i for i, m in zip(text.ids, text.response_mask, strict=True) if not m]
                )
                if conversational:  # the assistant turn, closed by the template's end-of-turn
                    assert scored == completion[0]["content"] + "<|im_end|>\n"
                    assert (
                        context.endswith("<|im_start|>assistant\n") and pair.prompt[0]["content"] in context
                    )
                else:  # TRL appends EOS to plain-text completions
                    assert scored == completion + "<|im_end|>" and context == pair.prompt
                assert not text.response_mask[0] and all(text.response_mask[len(text.ids) - 2 :])


def test_non_finite_loss_fails_the_run_at_that_step(tmp_path, tiny_model, snapshot, monkeypatch):
    real, calls = dpo.dpo_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss, stats = real(*args, **kwargs)
        return (loss * float("nan"), stats) if len(calls) == 3 else (loss, stats)

    monkeypatch.setattr(dpo, "dpo_loss", poisoned)
    cfg = config(tmp_path, tiny_model, snapshot, max_steps=5, checkpoint_every=1, keep_checkpoints=0)
    with pytest.raises(NonFiniteError, match=r"non-finite loss .* at step 3") as info:
        train(cfg)
    assert info.value.code == "nan_loss"
    saved = sorted(p.name for p in (Path(cfg.output_dir) / "checkpoints").iterdir())
    assert saved == ["step-000001", "step-000002"]


def test_conversational_and_implicit_prompt_snapshots_train(tmp_path, tiny_model):
    conv = write_synthetic_snapshot(
        tmp_path / "conv", n_train=16, n_eval=0, task=SyntheticTask(conversational=True)
    )
    plain = write_synthetic_snapshot(tmp_path / "plain", n_train=16, n_eval=0)
    implicit = tmp_path / "implicit.jsonl"  # TRL's implicit prompt: the shared prefix is the prompt
    rows = [json.loads(line) for line in plain.train.read_text().splitlines()]
    implicit.write_text("".join(json.dumps({"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]})
                                + "\n" for r in rows))  # fmt: skip
    for name, path in (("conv", conv.train), ("implicit", implicit)):
        cfg = DPOConfig(snapshot=str(path), output_dir=str(tmp_path / f"run-{name}"), model=str(tiny_model),
                        eval_fraction=0.25, batch_size=2, max_steps=2, max_length=96, progress=False, cpu=True)  # fmt: skip
        result = train(cfg)
        assert result.steps == 2 and result.metrics["eval/pairs"] > 0
        assert all(math.isfinite(v) for v in result.metrics.values())


def test_a_studio_preferences_export_trains(db, tmp_path, tiny_model):
    """The studio's `preferences` snapshot (what TRL's DPOTrainer trains on, see test_trl_compat)."""
    from datasets_factory import add_user, seed_project, vote

    from studio.services.datasets import DatasetService
    from studio.services.users import UserService
    from studio.settings import Settings

    settings = Settings(data_dir=tmp_path / "data", database_url="sqlite://")
    add_user(db, "root", "admin")
    service = DatasetService(db, settings, UserService(db, settings))
    chat = [{"role": "user", "content": "Explain why the sky is blue."}]
    seed = seed_project(db, prompts=[chat, "The sea is", "Write one sentence", "Translate hello"])
    annotator = add_user(db, "ann")
    for i, comparison in enumerate(seed.comparisons):
        vote(db, comparison, annotator, "a" if i % 2 else "b")
    for fmt, filters in (("jsonl", {}), ("hf", {"prompt_format": "standard"})):
        [info] = service.export("root", seed.project_id, ["preferences"], fmt, filters)
        cfg = DPOConfig(snapshot=str(info.path), output_dir=str(tmp_path / f"run-{fmt}"), model=str(tiny_model),
                        eval_fraction=0.0, batch_size=2, max_steps=1, max_length=128, progress=False, cpu=True)  # fmt: skip
        result = train(cfg)
        assert result.steps == 1 and result.final_checkpoint.is_dir()
        assert train_rows(result.output_dir)[0][1] == pytest.approx(LN2, abs=1e-5)


def test_bad_input_exits_2_naming_the_row_or_field(tmp_path, tiny_model, snapshot, capsys):
    bad = tmp_path / "bad.jsonl"
    good = snapshot.train.read_text().splitlines()
    bad.write_text("\n".join([good[0], good[1], json.dumps({"prompt": "p", "chosen": "a"}), good[3]]) + "\n")
    cfg_path = tmp_path / "dpo.yaml"
    cfg_path.write_text(f"snapshot: {bad}\noutput_dir: {tmp_path / 'run'}\nmodel: {tiny_model}\ncpu: true\n")
    assert trainers_main(["dpo", "--config", str(cfg_path), "--set", "progress=false"]) == 2
    assert f"error[bad_input]: {bad}, row 3, column 'rejected': missing value" in capsys.readouterr().err
    bad.write_text(good[0] + "\n{not json\n")
    assert trainers_main(["dpo", "--config", str(cfg_path)]) == 2
    assert "row 2: invalid JSON" in capsys.readouterr().err
    assert trainers_main(["dpo", "--config", str(cfg_path), "--set", "beta=0"]) == 2
    assert f"error[bad_input]: {cfg_path}: field 'beta': out of range: must be > 0" in capsys.readouterr().err
    assert trainers_main(["dpo", "--config", str(cfg_path), "--set", "label_smoothing=0.5"]) == 2
    assert "field 'label_smoothing': out of range" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"needs 80 pairs .* has 64 training pairs") as info:
        train(config(tmp_path, tiny_model, snapshot, batch_size=20, optim=DPOOptimConfig(grad_accum=4)))
    assert info.value.field == "batch_size"
    # DPO's own learning-rate default survives a partial optim section
    cfg = config_from_dict(DPOConfig, {"snapshot": "s", "output_dir": "o", "optim": {"warmup_ratio": 0.1}})
    assert cfg.optim.lr == 1e-6 and cfg.optim.warmup_ratio == 0.1 and dpo.SNAPSHOT_KINDS == ("preferences",)


def test_cli_sigterm_writes_a_checkpoint_and_exits_143_and_the_run_resumes(tmp_path, tiny_model, snapshot):
    out = tmp_path / "run"
    cfg_path = tmp_path / "dpo.yaml"
    cfg_path.write_text(
        f"snapshot: {snapshot.train}\neval_snapshot: {snapshot.eval}\noutput_dir: {out}\nmodel: {tiny_model}\n"
        "max_length: 80\nbatch_size: 2\nmax_steps: 100000\ncpu: true\nprogress: false\noptim:\n  lr: 1e-4\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "trainers", "dpo", "--config", str(cfg_path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() or not train_rows(out):
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "no training step within 120 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr[-2000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["recipe"] == "dpo" and summary["stopped"] and summary["final_checkpoint"] is None
    latest = find_latest_complete(out / "checkpoints")
    assert latest is not None and str(latest) == summary["last_checkpoint"]
    first = read_metrics(out / "metrics.jsonl")[0]
    assert first["step"] == 0 and first["run/total_steps"] == 100000
    # the same config resumes in-process from the CLI's checkpoint (one more step, then stop again)
    resumed = train(load_config(DPOConfig, cfg_path), should_stop=lambda step: True)
    assert resumed.resumed_from == latest and resumed.steps == summary["steps"] + 1 and resumed.stopped


def test_two_processes_under_torchrun_equal_one_process(tmp_path, tiny_model, snapshot):
    """DDP on CPU (gloo): half of every batch and half of the reference pass per process; same result."""
    single = train(
        config(tmp_path / "one", tiny_model, snapshot, batch_size=4, max_steps=3, checkpoint_every=2)
    )
    cfg_path = tmp_path / "dpo.yaml"
    cfg_path.write_text(
        f"snapshot: {snapshot.train}\neval_snapshot: {snapshot.eval}\noutput_dir: {tmp_path / 'two'}\n"
        f"model: {tiny_model}\nmax_length: 80\nbatch_size: 2\nmax_steps: 3\ncpu: true\nprogress: false\n"
        "optim:\n  lr: 1.0e-3\n  warmup_ratio: 0.2\ncheckpoint_every: 2\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run([*launcher, "-m", "trainers", "dpo", "--config", str(cfg_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two" / "final"
    assert read_studio_json(two)["world_size"] == 2
    a, b = load_file(single.final_checkpoint / "model.safetensors"), load_file(two / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    # the reference pass was sharded and gathered: every pair once, in order
    two_state, one_state = (
        load_training_state(step_dir(run / "checkpoints", 2)) for run in (tmp_path / "two", single.output_dir)
    )
    for key in ("ref_train", "ref_eval"):
        torch.testing.assert_close(two_state[key], one_state[key], rtol=1e-5, atol=1e-4, msg=key)
    assert read_studio_json(two)["metrics"] == pytest.approx(single.metrics, rel=1e-4, abs=1e-5)
    assert len(train_rows(tmp_path / "two")) == 3  # written once, by the main process
