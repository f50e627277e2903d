"""The PPO recipe on the tiny random Llama (CPU): §1.14 invariants on a real rollout, learning, resume,
accumulation, early stop, faults, CLI."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ppo_helpers import WORDS, toy_config, toy_task, train_rows, weights_hash, word_starts
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from trainers.__main__ import main as trainers_main
from trainers.__main__ import recipe_schema
from trainers.checkpoint import find_latest_complete, read_studio_json, verify_manifest
from trainers.config import ConfigError, config_from_dict
from trainers.metrics import NonFiniteError, read_metrics
from trainers.ppo_config import KLConfig, PPOConfig, PPOOptimConfig
from trainers.ppo_experience import minibatch, shape_experience
from trainers.recipes import ppo
from trainers.rl_math import kl_k1
from trainers.rollout import SamplingConfig
from trainers.teacher_forced import score_tokens

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def toy(monkeypatch):
    """Train on the toy task (prompts and a learnable reward) instead of a built-in task."""
    monkeypatch.setattr(ppo, "load_task", lambda cfg: toy_task())


def shaped(run, exp):
    cfg = run.cfg
    return shape_experience(exp, beta=run.kl_controller.beta, estimator=cfg.kl.estimator, gamma=cfg.gamma,
                            lam=cfg.lam, reward_clip=cfg.reward_clip, whiten=cfg.whiten_advantages)  # fmt: skip


@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_first_minibatch_has_ratio_one_values_reproduced_and_the_reference_stays_frozen(
    tmp_path, tiny_model, toy, critic
):
    # top-k, temperature and a minimum length: the behaviour policy differs from the raw softmax
    sampling = SamplingConfig(max_new_tokens=8, min_new_tokens=3, temperature=0.7, top_k=20)
    run = ppo.setup(toy_config(tmp_path / "run", tiny_model, critic=critic, sampling=sampling))
    exp = shaped(run, ppo.collect(run, 0))
    # π_old is the distribution actually sampled: the teacher-forced processed log-probs, not the raw ones
    tf = score_tokens(run.policy(), exp.prompt_ids, exp.prompt_mask, exp.response_ids, exp.mask,
                      processors=run.stage2_processors(None), with_entropy=True)  # fmt: skip
    assert torch.allclose(tf.logprobs, exp.old_logprobs, atol=1e-5)
    # the logged entropy is stage 1's, of the same sampling distribution
    assert torch.allclose(tf.entropy, exp.entropy, atol=1e-5) and float(exp.entropy[exp.mask].min()) > 0
    assert (exp.old_logprobs - exp.raw_logprobs).abs().max() > 0.05
    # §1.14.4: before any update the policy is the reference: the KL part of the reward vanishes
    assert (exp.raw_logprobs - exp.ref_logprobs).abs().max() < 1e-5
    assert torch.allclose(exp.rewards, exp.task_rewards * exp.mask, atol=1e-6)
    # §1.14.1: on the first minibatch ρ ≡ 1 and the critic reproduces the rollout values
    mb = minibatch(exp, torch.arange(run.cfg.minibatch_size))
    with torch.no_grad():
        logprobs, _, values = run.actor(mb.prompt_ids, mb.prompt_mask, mb.response_ids, mb.mask,
                                        run.stage2_processors(None))  # fmt: skip
        if run.critic is not None:
            values = run.critic(mb.prompt_ids, mb.prompt_mask, mb.response_ids, mb.mask)
        _, stats = ppo.minibatch_loss(run, mb, mb.advantages)
    assert (logprobs - mb.old_logprobs).exp().sub(1).abs().max() < 1e-5
    assert abs(float(stats["ratio_max"]) - 1) < 1e-5 and float(stats["clip_fraction"]) == 0
    assert torch.allclose(values, mb.old_values, atol=1e-6)
    # §1.14.10: an update changes policy and critic, never the reference
    before = {k: v.clone() for k, v in run.reference.state_dict().items()}
    policy_before = run.policy().model.embed_tokens.weight.clone()
    critic_before = [p.clone() for p in run.critic_module().parameters()]
    stats = ppo.update(run, exp, 0)
    assert stats["updates"] == 4 and stats["early_stopped"] == 0
    assert all(torch.equal(before[k], v) for k, v in run.reference.state_dict().items())
    assert not torch.equal(policy_before, run.policy().model.embed_tokens.weight)
    assert any(
        not torch.equal(a, b) for a, b in zip(critic_before, run.critic_module().parameters(), strict=True)
    )
    run.metrics.close()


def test_dense_rewards_reach_their_tokens_and_the_kl_uses_raw_logprobs(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(ppo, "load_task", lambda cfg: toy_task(dense=True))
    run = ppo.setup(toy_config(tmp_path / "run", tiny_model))
    exp = ppo.collect(run, 0)
    tok = run.tokenizer
    spread = 0
    for b in range(exp.rows):
        sampled = exp.response_ids[b][exp.mask[b]].tolist()
        text = tok.decode(sampled, skip_special_tokens=True)
        # oracle: each re-tokenised token's reward lands on the sampled token that holds its last character
        ends = [len(tok.decode(sampled[: t + 1], skip_special_tokens=True)) for t in range(len(sampled))]
        expected = torch.zeros(len(sampled))
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        for value, (_, end) in zip(word_starts(tok, text), enc["offset_mapping"], strict=True):
            expected[next(t for t, e in enumerate(ends) if e >= end)] += value
        assert torch.allclose(exp.task_rewards[b, : len(sampled)], expected, atol=1e-6)
        assert exp.task_rewards[b].sum() == pytest.approx(float(exp.scores[b]), abs=1e-6)  # sums preserved
        spread += int((exp.task_rewards[b, :-1] != 0).any())
    assert spread >= exp.rows // 2  # dense: rewards before the last token
    # a policy that moved: the KL reward is −β·k1 of the raw log-probs, summed per row
    moved = dataclasses.replace(exp, raw_logprobs=exp.raw_logprobs + 0.3 * exp.mask)
    out = shape_experience(
        moved, beta=0.5, estimator="k1", gamma=1.0, lam=1.0, reward_clip=None, whiten="none"
    )
    k1 = torch.where(exp.mask, kl_k1(moved.raw_logprobs, exp.ref_logprobs), 0.0)
    assert torch.allclose((out.rewards - exp.task_rewards * exp.mask).sum(-1), -0.5 * k1.sum(-1), atol=1e-5)
    # γ = λ = 1 and whitening off: the first advantage is the row's return minus its first value
    assert torch.allclose(out.advantages[:, 0], out.rewards.sum(-1) - exp.old_values[:, 0], atol=1e-5)
    run.metrics.close()


def test_short_run_raises_held_out_reward_and_the_policy_loads_with_plain_transformers(
    tmp_path, tiny_model, toy
):
    cfg = toy_config(tmp_path / "run", tiny_model, iterations=8, critic="shared", eval_at_start=True)
    result = ppo.train(cfg)
    assert result.steps == 8 and not result.stopped
    rows = read_metrics(result.output_dir / "metrics.jsonl")
    assert rows[0] == {"step": 0, "time": rows[0]["time"], "run/total_steps": 8}
    before = next(r for r in rows if "eval/reward" in r)
    assert before["step"] == 0 and abs(before["eval/kl"]) < 1e-4  # the start policy is the reference
    train = train_rows(result.output_dir)
    assert sorted(train) == list(range(1, 9))
    for key in ("reward", "kl", "kl_seq", "beta", "loss", "policy_loss", "value_loss", "entropy", "clip_fraction",
                "approx_kl", "grad_norm", "critic_grad_norm", "tokens", "lr", "response_tokens"):  # fmt: skip
        assert all(f"train/{key}" in r for r in train.values()), key
    after = result.metrics
    assert after["eval/reward"] > before["eval/reward"] + 0.1, (before, after)
    assert after["eval/kl"] > 0.1 and train[8]["train/kl"] > 0
    assert train[8]["train/tokens"] > train[1]["train/tokens"] > 0
    # final/: the policy alone, complete, loadable without this code
    verify_manifest(result.final_checkpoint)
    assert not (result.final_checkpoint / ppo.CRITIC_FILE).exists()
    studio = read_studio_json(result.final_checkpoint)
    assert studio["recipe"] == "ppo" and studio["kind"] == "policy" and studio["step"] == 8
    AutoModelForCausalLM.from_pretrained(result.final_checkpoint)


def test_resume_equals_uninterrupted_with_an_adaptive_controller_and_accumulation(tmp_path, tiny_model, toy):
    def cfg(name, **kw):
        return toy_config(tmp_path / name, tiny_model, iterations=4, checkpoint_every=2,
                          kl=KLConfig(beta=0.05, target=0.01), optim=PPOOptimConfig(lr=1e-2, grad_accum=2), **kw)  # fmt: skip

    whole = ppo.train(cfg("whole"))
    stopped = ppo.train(cfg("split"), should_stop=lambda step: step == 3)
    assert stopped.stopped and stopped.steps == 3 and stopped.final_checkpoint is None
    resumed = ppo.train(cfg("split"))
    assert resumed.resumed_from.name == "step-000003" and resumed.steps == 4
    assert weights_hash(whole.final_checkpoint) == weights_hash(resumed.final_checkpoint)
    a, b = train_rows(whole.output_dir), train_rows(resumed.output_dir)
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):  # the resumed iterations repeat the uninterrupted ones exactly (β restored)
        assert {k: v for k, v in a[step].items()} == pytest.approx(b[step], abs=0, rel=0)
    betas = [a[s]["train/beta"] for s in (1, 2, 3, 4)]
    assert betas[0] == 0.05 and len(set(betas)) == 4  # adapted after every rollout, by at most 2 %
    assert all(abs(y / x - 1) <= 0.02 + 1e-9 for x, y in itertools.pairwise(betas))
    assert a[1]["train/kl"] < 0.01 < a[4]["train/kl"] and betas[1] < betas[0] and betas[3] > betas[2]
    latest = find_latest_complete(tmp_path / "split" / "checkpoints")
    assert abs(read_studio_json(latest)["extra"]["kl_beta"] / betas[3] - 1) <= 0.02 + 1e-9


def test_accumulated_micro_batches_equal_one_minibatch(tmp_path, tiny_model, toy):
    # Adam's eps = 1 makes the first step ≈ lr·g (not lr·sign(g)), so equal gradients give equal weights
    results = []
    for accum in (1, 2):
        optim = PPOOptimConfig(lr=1e-2, grad_accum=accum, max_grad_norm=None, eps=1.0)
        cfg = toy_config(tmp_path / f"accum-{accum}", tiny_model, iterations=1, ppo_epochs=1, critic="shared",
                         optim=optim)  # fmt: skip
        results.append(load_file(ppo.train(cfg).final_checkpoint / "model.safetensors"))
    start = load_file(tiny_model / "model.safetensors")
    for name, tensor in results[0].items():
        assert not torch.equal(tensor, start[name]), name
        assert torch.allclose(tensor, results[1][name], atol=1e-8, rtol=0), name


def test_approximate_kl_early_stop_skips_the_remaining_minibatches(tmp_path, tiny_model, toy):
    cfg = toy_config(tmp_path / "run", tiny_model, iterations=1, ppo_epochs=4, target_approx_kl=1e-4)
    rows = train_rows(ppo.train(cfg).output_dir)
    assert rows[1]["train/early_stopped"] == 1 and 1 <= rows[1]["train/updates"] < 8
    assert rows[1]["train/approx_kl"] <= 1.5e-4  # only minibatches under the limit were applied


def test_non_finite_values_fail_the_run_with_their_iteration(tmp_path, tiny_model, toy, monkeypatch, capsys):
    monkeypatch.setenv("STUDIO_FAULT_NAN_STEP", "2")
    with pytest.raises(NonFiniteError) as info:
        ppo.train(toy_config(tmp_path / "run", tiny_model, iterations=3))
    assert info.value.step == 2
    code = trainers_main(["ppo", "--set", f"output_dir={tmp_path / 'cli'}", "--set", f"model={tiny_model}",
                          "--set", "iterations=3", "--set", "prompts_per_iteration=8", "--set", "minibatch_size=8",
                          "--set", "cpu=true", "--set", "progress=false", "--set", "eval_at_start=false"])  # fmt: skip
    assert code == 3 and "error[nan_loss]: non-finite" in capsys.readouterr().err


def test_bad_configs_are_refused_naming_the_field(tmp_path, tiny_model, toy):
    with pytest.raises(ConfigError, match="minibatch_size"):
        ppo.train(toy_config(tmp_path / "a", tiny_model, minibatch_size=5))
    with pytest.raises(ConfigError, match=r"sampling\.temperature"):
        config_from_dict(PPOConfig, {"output_dir": "x", "sampling": {"temperature": 0}})
    first = ppo.train(toy_config(tmp_path / "b", tiny_model, iterations=2, checkpoint_every=1),
                      should_stop=lambda step: True)  # fmt: skip
    assert first.stopped
    with pytest.raises(ConfigError, match="clip_eps"):
        ppo.train(toy_config(tmp_path / "b", tiny_model, iterations=2, checkpoint_every=1, clip_eps=0.3))
    schema = recipe_schema("ppo")
    names = {f["name"] for f in schema["fields"]}
    assert schema["checkpoint_kind"] == "policy" and schema["snapshot_kinds"] == ["prompts"]
    assert {"kl.target", "critic", "sampling.top_k", "reward.kind", "optim.lr"} <= names


def test_prompts_snapshot_with_vader_and_sigterm_from_the_command_line(tmp_path, tiny_model):
    snapshot = tmp_path / "prompts.jsonl"
    snapshot.write_text("".join(json.dumps({"prompt": f"The {w} was great and"}) + "\n" for w in WORDS))
    out = tmp_path / "run"
    args = [sys.executable, "-m", "trainers", "ppo", "--set", f"output_dir={out}", "--set", f"model={tiny_model}",
            "--set", f"snapshot={snapshot}", "--set", "reward.kind=lexicon", "--set", "iterations=50",
            "--set", "prompts_per_iteration=4", "--set", "minibatch_size=4", "--set", "sampling.max_new_tokens=6",
            "--set", "checkpoint_every=0", "--set", "cpu=true", "--set", "progress=false",
            "--set", "eval_at_start=false"]  # fmt: skip
    env = {**os.environ, "STUDIO_FAULT_STEP_SLEEP_S": "0.2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 240  # generous: a loaded machine imports torch slowly
    while time.time() < deadline and proc.poll() is None and not any("train/reward" in r for r in _rows(out)):
        time.sleep(0.2)
    if proc.poll() is not None or not any("train/reward" in r for r in _rows(out)):
        proc.kill()
        pytest.fail(f"no training iteration in time: {proc.communicate()[1][-2000:]}")
    proc.send_signal(signal.SIGTERM)  # in the middle of the run (iteration 2 or later)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr[-2000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["stopped"] and summary["final_checkpoint"] is None
    latest = find_latest_complete(out / "checkpoints")
    assert latest is not None and latest.name == f"step-{summary['steps']:06d}"
    studio = read_studio_json(latest)
    assert studio["snapshot_sha256"] and studio["recipe"] == "ppo"
    assert (latest / ppo.CRITIC_FILE).is_file()


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return read_metrics(path) if path.exists() else []


def test_config_defaults_are_the_documented_rl4lms_settings():
    cfg = PPOConfig(output_dir="x")
    assert (cfg.clip_eps, cfg.vf_coef, cfg.ent_coef, cfg.gamma, cfg.lam) == (0.2, 0.5, 0.0, 0.99, 0.95)
    assert (cfg.kl.beta, cfg.kl.target, cfg.kl.estimator) == (0.1, 0.1, "k1")
    assert cfg.sampling.temperature == 1 and cfg.sampling.top_k == 0  # π_old = the plain softmax by default


def test_separate_critic_backward_in_two_passes_gives_the_summed_loss_gradients(tmp_path, tiny_model, toy):
    # the critic's value loss is back-propagated before the policy's forward (its graph freed first)
    run = ppo.setup(toy_config(tmp_path / "run", tiny_model, critic="separate", ent_coef=0.01))
    exp = shaped(run, ppo.collect(run, 0))
    mb = minibatch(exp, torch.arange(run.cfg.minibatch_size))
    params = [*run.policy().parameters(), *run.critic_module().parameters()]
    loss, _ = ppo.minibatch_loss(run, mb, mb.advantages)
    (loss * 0.5).backward()
    want = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    detached, stats = ppo.minibatch_loss(run, mb, mb.advantages, backward_scale=0.5)
    assert not detached.requires_grad and float(detached) == pytest.approx(float(loss.detach()), rel=1e-6)
    assert float(stats["value_loss"]) > 0
    for p, g in zip(params, want, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-7, rtol=1e-5)
    run.metrics.close()
