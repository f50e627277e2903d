"""The REINFORCE/ESRL recipe on the tiny random Llama (CPU): learning, modes, accumulation, resume, faults, CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from trainers.__main__ import main as trainers_main
from trainers.__main__ import recipe_schema
from trainers.checkpoint import load_training_state, read_studio_json, step_dir
from trainers.config import ConfigError, config_from_dict
from trainers.metrics import NonFiniteError, read_metrics
from trainers.recipes import reinforce
from trainers.recipes.reinforce import train
from trainers.reinforce_config import ReinforceConfig
from trainers.rewards import CallableReward
from trainers.tasks import Task

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [f"The sea is {w}" for w in ("vast", "calm", "blue", "warm", "slow", "fair", "good", "bad")] + [
    f"Write one sentence about the {w}." for w in ("weather", "sky", "pizza", "service", "price", "moon")
]


def low_half(tokenizer) -> CallableReward:
    """Share of the response's tokens from the lower half of the vocabulary: a reward with spread
    (binomial over the tokens) that a random tiny model can climb within a few steps."""

    def share(prompt, response: str) -> float:
        ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        return sum(i < len(tokenizer) // 2 for i in ids) / max(len(ids), 1)

    return CallableReward(share, tokenizer)


def toy_task(seed: int = 0, n_train: int | None = None, n_eval: int | None = None) -> Task:
    return Task("toy", PROMPTS[:12], PROMPTS[12:], task_reward=lambda tok, eos: low_half(tok))


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(reinforce, "get_task", lambda name, **kw: toy_task(**kw))


def config(out: Path, model: Path, **overrides) -> ReinforceConfig:
    base = {
        "output_dir": str(out), "model": str(model), "batch_size": 4, "group_size": 4, "max_steps": 3, "n_eval": 2,
        "eval_batch_size": 2, "progress": False, "cpu": True, "sampling": {"max_new_tokens": 6},
        "optim": {"lr": 1e-3},
    }  # fmt: skip
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return config_from_dict(ReinforceConfig, base)


def train_rows(out: Path, key: str = "train/loss") -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_metrics(Path(out) / "metrics.jsonl") if key in r]


def weights_hash(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_short_run_raises_the_reward_and_writes_every_step(tmp_path, tiny_model, toy) -> None:
    cfg = config(tmp_path, tiny_model, max_steps=10, group_size=8, optim={"lr": 1e-2})
    result = train(cfg)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[0] == {"step": 0, "time": rows[0]["time"], "run/total_steps": 10.0}
    assert rows[1]["step"] == 0 and "eval/reward" in rows[1]  # the starting policy, evaluated first
    train_steps = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_steps] == list(range(1, 11))
    for key in ("train/reward", "train/kl", "train/beta", "train/entropy", "train/advantage_mean", "train/logp_mean",
                "train/tokens", "train/grad_norm", "time/rollout_s", "train/kept_fraction"):  # fmt: skip
        assert all(key in r for r in train_steps), key
    rewards = [r["train/reward"] for r in train_steps]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.05, rewards
    assert train_steps[-1]["train/tokens"] == sum(r["train/step_tokens"] for r in train_steps)
    # the final policy loads with plain transformers and differs from the start; studio.json says what it is
    final = result.final_checkpoint
    assert final == tmp_path / "final" and set(result.metrics) >= {
        "eval/reward",
        "eval/kl",
        "eval/perplexity",
    }
    assert (
        result.metrics["eval/kl"] > 0.02 > abs(rows[1]["eval/kl"])
    )  # the policy moved away from the reference
    loaded = AutoModelForCausalLM.from_pretrained(final)
    start = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not torch.equal(
        loaded.model.layers[0].mlp.up_proj.weight, start.model.layers[0].mlp.up_proj.weight
    )
    studio = read_studio_json(final)
    assert (
        studio["kind"] == "policy"
        and studio["recipe"] == "reinforce"
        and studio["parent"]["path"] == str(tiny_model)
    )
    assert studio["extra"]["task"] == "toy" and studio["metrics"] == result.metrics


@pytest.mark.parametrize("reduction", ["sequence", "token_mean"])
def test_gradient_accumulation_equals_one_big_batch(tmp_path, tiny_model, toy, reduction) -> None:
    """Greedy rollouts (no sampling noise) and no baseline: 2 micro-batches of 2 prompts = 1 of 4."""
    common = {"max_steps": 2, "baseline": "none", "reduction": reduction, "sampling": {"temperature": 0},
              "eval_at_start": False, "n_eval": 0}  # fmt: skip
    big = train(config(tmp_path / "big", tiny_model, batch_size=4, **common))
    small = train(config(tmp_path / "small", tiny_model, batch_size=2, optim={"grad_accum": 2}, **common))
    a, b = (
        load_file(big.final_checkpoint / "model.safetensors"),
        load_file(small.final_checkpoint / "model.safetensors"),
    )
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=2e-6, msg=name)
    big_loss, small_loss = train_rows(big.output_dir), train_rows(small.output_dir)
    assert [s for s, _ in big_loss] == [s for s, _ in small_loss] == [1, 2]
    assert [v for _, v in big_loss] == pytest.approx([v for _, v in small_loss], rel=1e-4, abs=1e-6)


class Crash(Exception):
    pass


def test_resume_after_a_stop_or_a_crash_equals_an_uninterrupted_run(tmp_path, tiny_model, toy) -> None:
    # adaptive β, a running baseline and elimination: their state must come back from the checkpoint
    common = {"max_steps": 5, "checkpoint_every": 2, "keep_checkpoints": 0, "baseline": "running",
              "kl": {"beta": 0.1, "target": 0.01, "gain": 1.0}, "dynamic": {"mode": "eliminate"}}  # fmt: skip
    straight = train(config(tmp_path / "straight", tiny_model, **common))

    stopped_cfg = config(tmp_path / "stopped", tiny_model, **common)
    stopped = train(stopped_cfg, should_stop=lambda step: step == 3)
    assert stopped.stopped and stopped.final_checkpoint is None and stopped.steps == 3
    state = load_training_state(stopped.last_checkpoint)
    assert stopped.last_checkpoint == step_dir(tmp_path / "stopped" / "checkpoints", 3)
    assert state["beta"] != 0.1 and state["running_baseline"] is not None
    finished = train(stopped_cfg)
    assert finished.resumed_from == stopped.last_checkpoint and finished.steps == 5

    crashed_cfg = config(tmp_path / "crashed", tiny_model, **common)

    def crash_at_3(step: int) -> bool:
        if step == 3:
            raise Crash
        return False

    with pytest.raises(Crash):
        train(crashed_cfg, should_stop=crash_at_3)
    resumed = train(crashed_cfg)
    assert resumed.resumed_from == step_dir(tmp_path / "crashed" / "checkpoints", 2)

    expected = weights_hash(straight.final_checkpoint)
    for run in (finished, resumed):
        assert weights_hash(run.final_checkpoint) == expected
        assert run.metrics == straight.metrics
        for key in ("train/loss", "train/beta", "train/reward", "train/tokens"):
            assert train_rows(run.output_dir, key) == train_rows(straight.output_dir, key), key

    with pytest.raises(ConfigError, match="group_size changed"):
        train(dataclasses.replace(stopped_cfg, group_size=2))


def test_non_finite_loss_fails_the_run_at_that_step(tmp_path, tiny_model, toy, monkeypatch) -> None:
    monkeypatch.setenv("STUDIO_FAULT_NAN_STEP", "2")
    with pytest.raises(NonFiniteError, match="at step 2") as info:
        train(config(tmp_path, tiny_model, max_steps=4, eval_at_start=False))
    assert info.value.step == 2 and [s for s, _ in train_rows(tmp_path)] == [1]
    assert not (tmp_path / "final").exists()


@pytest.mark.parametrize(
    ("overrides", "check"),
    [
        ({"dynamic": {"mode": "eliminate", "eliminate_ratio": 0.3}}, "eliminate"),
        ({"loss": "mrt", "dynamic": {"mode": "eliminate"}, "mrt_alpha": 0.5}, "mrt"),
        ({"dynamic": {"mode": "adaptive", "k_min": 1, "k_max": 5}, "baseline": "group_mean"}, "adaptive"),
        ({"dynamic": {"mode": "adaptive", "capability": "reward", "reward_low": 0.0, "reward_high": 1.0},
          "baseline": "running", "scale_by_std": True, "reduction": "token_mean"}, "adaptive"),
        ({"logprobs_of": "sampled", "sampling": {"temperature": 0.7, "top_k": 30, "top_p": 0.9}}, "plain"),
    ],
)  # fmt: skip
def test_every_mode_trains(tmp_path, tiny_model, toy, overrides, check) -> None:
    train(config(tmp_path, tiny_model, max_steps=2, eval_at_start=False, **overrides))
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert len(rows) == 2 and all(v is not None for r in rows for v in r.values())
    if check in ("eliminate", "mrt"):  # 16 samples per rollout batch, ⌈0.3 · 16⌉ = 5 dropped
        assert all(r["train/kept_fraction"] == pytest.approx(11 / 16) for r in rows)
    if check == "mrt":
        assert all("train/risk" in r for r in rows)
    if check == "adaptive":
        dyn = overrides["dynamic"]
        assert all(dyn.get("k_min", 1) * 4 <= r["train/samples"] <= dyn.get("k_max", 8) * 4 for r in rows)
        assert all(0.7 - 1e-6 <= r["train/temperature"] <= 1.2 + 1e-6 for r in rows)


def test_built_in_translation_task_trains_with_bleu_and_a_line_stop(tmp_path, tiny_model) -> None:
    result = train(
        config(tmp_path, tiny_model, task="synthetic_translation", max_steps=1, n_train=8, n_eval=2)
    )
    assert {"eval/bleu", "eval/kl", "eval/perplexity", "eval/distinct_2"} <= set(result.metrics)


def write_prompts(path: Path) -> Path:
    rows = [{"prompt": p, "prompt_id": str(i)} for i, p in enumerate(PROMPTS)]
    rows.append({"prompt": [{"role": "user", "content": "Explain why the sky is blue."}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompts_snapshot_trains_with_a_chosen_reward_and_bad_input_exits_2(
    tmp_path, tiny_model, capsys
) -> None:
    snapshot = write_prompts(tmp_path / "prompts.jsonl")
    cfg = config(tmp_path / "run", tiny_model, snapshot=str(snapshot), eval_fraction=0.2, max_steps=1,
                 reward={"kind": "lexicon"})  # fmt: skip
    result = train(cfg)
    assert (
        read_studio_json(result.final_checkpoint)["snapshot_sha256"]
        == hashlib.sha256(snapshot.read_bytes()).hexdigest()
    )
    # through the CLI: no reward for a snapshot's prompts → exit 2 with one error line naming the field
    yaml = tmp_path / "rl.yaml"
    yaml.write_text(f"output_dir: {tmp_path / 'cli'}\nmodel: {tiny_model}\nsnapshot: {snapshot}\nprogress: false\n"
                    "batch_size: 2\nmax_steps: 1\nn_eval: 1\nsampling:\n  max_new_tokens: 4\n")  # fmt: skip
    assert trainers_main(["reinforce", "--config", str(yaml)]) == 2
    assert (
        "error[bad_input]:" in capsys.readouterr().err
        and "reward.kind" in capsys.readouterr().err + "reward.kind"
    )
    assert trainers_main(["reinforce", "--config", str(yaml), "--set", "batch_sise=2"]) == 2
    with pytest.raises(ConfigError, match="batch_size"):
        train(
            config(
                tmp_path / "big",
                tiny_model,
                snapshot=str(snapshot),
                reward={"kind": "lexicon"},
                batch_size=64,
            )
        )
    with pytest.raises(ConfigError, match="group_size"):
        config(tmp_path, tiny_model, loss="mrt", group_size=1)


def test_schema_offers_the_recipe_to_the_studio() -> None:
    schema = recipe_schema("reinforce")
    fields = {f["name"]: f for f in schema["fields"]}
    assert schema["checkpoint_kind"] == "policy" and schema["snapshot_kinds"] == ["prompts"]
    assert schema["base_kind"] == "policy" and schema["doc"].startswith(
        "Train a causal-LM policy with REINFORCE"
    )
    assert fields["reward.kind"]["choices"] == ["task", "lexicon", "sequence_rm", "segment_rm"]
    assert fields["dynamic.mode"]["choices"] == ["off", "eliminate", "adaptive"]
    assert fields["sampling.max_new_tokens"]["default"] == 24 and fields["snapshot"].get("managed")
    assert fields["task"]["choices"] == ["sentiment", "synthetic_translation"]


def test_cli_runs_the_recipe_headless(tmp_path, tiny_model) -> None:
    yaml = tmp_path / "rl.yaml"
    yaml.write_text(f"output_dir: {tmp_path / 'run'}\nmodel: {tiny_model}\nprogress: false\ncpu: true\n"
                    "batch_size: 2\ngroup_size: 2\nmax_steps: 2\nn_eval: 2\nsampling:\n  max_new_tokens: 4\n")  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "trainers", "reinforce", "--config", str(yaml)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["recipe"] == "reinforce" and summary["steps"] == 2 and "eval/reward" in summary["metrics"]
