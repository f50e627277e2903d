"""The offline recipes (filtered MLE, RWR, DT) on the shared weighted-SFT loop, with the tiny random Llama
(CPU): learning, resume, accumulation, RWR limits, one model per stage, NaN, human pairs, CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainers import weighted_sft
from trainers.__main__ import main as trainers_main
from trainers.checkpoint import read_studio_json
from trainers.config import config_from_dict, load_config
from trainers.metrics import NonFiniteError, read_metrics
from trainers.offline_data import OfflineDataConfig, load_samples, run_data_stage
from trainers.recipes import dt, filtered_mle, rwr
from trainers.rewards import CallableReward
from trainers.rollout import SamplingConfig
from trainers.tasks import Task

TRAIN = [f"The sea is {w}" for w in ("vast", "calm", "blue", "warm", "slow", "fair", "good", "bad")] + [
    f"Write one sentence about the {w}." for w in ("weather", "sky", "pizza", "service")
]
REPO = Path(__file__).resolve().parents[2]
EVAL = [f"Tell me about the {w}." for w in ("price", "moon", "sea", "words")]


def low_half(tokenizer) -> CallableReward:
    """Share of the response's tokens from the lower half of the vocabulary (a reward a tiny model can climb)."""

    def share(prompt, response: str) -> float:
        ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        return sum(i < len(tokenizer) // 2 for i in ids) / max(len(ids), 1)

    return CallableReward(share, tokenizer)


def toy_task(seed: int = 0, n_train: int | None = None, n_eval: int | None = None) -> Task:
    return Task("toy", TRAIN[:n_train], list(EVAL), task_reward=lambda tok, eos: low_half(tok))


@pytest.fixture(autouse=True)
def toy(monkeypatch):
    monkeypatch.setattr(weighted_sft, "get_task", lambda name, **kw: toy_task(**kw))


DATA = OfflineDataConfig(
    samples_per_prompt=4, sampling=SamplingConfig(max_new_tokens=8, temperature=1.0), batch_size=24
)


@pytest.fixture(scope="module")
def stage(tiny_model, tmp_path_factory) -> Path:
    """12 prompts × 4 samples of the starting policy, scored with the toy reward."""
    folder = tmp_path_factory.mktemp("stage")
    lm = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    run_data_stage(lm, tokenizer, TRAIN, folder, DATA, low_half(tokenizer), seed=0)
    return folder


def config(cls, out: Path, model: Path, stage: Path | None, **overrides):
    base = {"output_dir": str(out), "model": str(model), "samples": str(stage) if stage else None, "n_eval": 4,
            "eval_batch_size": 4, "eval_sampling": {"max_new_tokens": 8}, "data": dataclasses.asdict(DATA),
            "batch_size": 4, "max_steps": 4, "optim": {"lr": 1e-3, "schedule": "constant"}, "progress": False,
            "cpu": True, "eval_at_start": False}  # fmt: skip
    return config_from_dict(cls, {**base, **overrides})


def rows(out: Path, key: str = "train/loss") -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_metrics(Path(out) / "metrics.jsonl") if key in r]


def weights_hash(folder: Path) -> str:
    return hashlib.sha256((Path(folder) / "model.safetensors").read_bytes()).hexdigest()


def test_filtered_mle_loss_falls_and_every_step_is_logged_with_its_compute(tmp_path, tiny_model, stage):
    cfg = config(filtered_mle.FilteredMLEConfig, tmp_path / "run", tiny_model, stage, max_steps=12,
                 eval_at_start=True, optim={"lr": 3e-3, "schedule": "constant"})  # fmt: skip
    result = filtered_mle.train(cfg)
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert metrics[0]["step"] == 0 and metrics[0]["run/total_steps"] == 12
    losses = [v for _, v in rows(result.output_dir)]
    assert len(losses) == 12  # best-of-4 of 12 prompts = 12 examples: 3 steps an epoch, 4 epochs
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
    start = next(r for r in metrics if "eval/reward" in r)
    assert (
        start["step"] == 0 and abs(start["eval/kl"]) < 1e-3
    )  # before any update the policy is the reference
    assert result.metrics["eval/kl"] > 0.05  # the end: the trained policy against the loaded starting model
    # compute: the data stage's generation, then 12 steps of forward + backward over the kept sequences
    _, info = load_samples(stage)
    last = metrics[-2]
    assert last["step"] == 12 and last["compute/generated_tokens"] == info["compute"]["generated_tokens"]
    trained = last["compute/trained_tokens"]
    assert trained == last["train/tokens"] == last["compute/prompt_tokens"] + last["compute/response_tokens"]
    assert last["compute/backward_flops"] == 4 * 82240 * trained
    assert last["compute/forward_flops"] == info["compute"]["forward_flops"] + 2 * 82240 * trained
    studio = read_studio_json(result.final_checkpoint)
    assert (
        studio["recipe"] == "filtered_mle"
        and studio["kind"] == "policy"
        and studio["extra"]["examples"] == 12
    )
    assert studio["extra"]["compute"]["total_flops"] == last["compute/total_flops"]
    AutoModelForCausalLM.from_pretrained(result.final_checkpoint)  # plain transformers
    assert best_rewards_are_kept(stage)


def best_rewards_are_kept(stage: Path) -> bool:
    samples, _ = load_samples(stage)
    return len({s.prompt_index for s in samples}) == 12 and len(samples) == 48


def test_rwr_resume_and_accumulation_equal_an_uninterrupted_big_batch_run(tmp_path, tiny_model, stage):
    common = {"max_steps": 5, "checkpoint_every": 2, "keep_checkpoints": 0, "beta": 0.5, "max_weight": 3.0}
    straight = rwr.train(config(rwr.RWRConfig, tmp_path / "straight", tiny_model, stage, **common))
    stopped_cfg = config(rwr.RWRConfig, tmp_path / "stopped", tiny_model, stage, **common)
    stopped = rwr.train(stopped_cfg, should_stop=lambda step: step == 3)
    assert stopped.stopped and stopped.steps == 3 and stopped.final_checkpoint is None
    resumed = rwr.train(stopped_cfg)
    assert resumed.resumed_from == stopped.last_checkpoint and resumed.steps == 5
    assert weights_hash(resumed.final_checkpoint) == weights_hash(straight.final_checkpoint)
    assert rows(resumed.output_dir) == rows(straight.output_dir)  # each step logged once, same values
    assert rows(resumed.output_dir, "compute/total_flops") == rows(straight.output_dir, "compute/total_flops")
    # two micro-batches of 2 = one batch of 4: the weights are normalised over the whole step either way
    accum = rwr.train(config(rwr.RWRConfig, tmp_path / "accum", tiny_model, stage, **common, batch_size=2,
                             optim={"lr": 1e-3, "schedule": "constant", "grad_accum": 2}))  # fmt: skip
    a, b = (
        load_file(accum.final_checkpoint / "model.safetensors"),
        load_file(straight.final_checkpoint / "model.safetensors"),
    )
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=2e-5, msg=name)
    assert [v for _, v in rows(accum.output_dir)] == pytest.approx(
        [v for _, v in rows(straight.output_dir)], rel=1e-4
    )
    weight_max = [v for _, v in rows(straight.output_dir, "train/weight_max")]
    assert (
        max(weight_max) <= 3.0 and [v for _, v in rows(straight.output_dir, "train/weight_mean")] != [1.0] * 5
    )


def test_rwr_with_infinite_beta_trains_exactly_like_sft_on_every_sample(tmp_path, tiny_model, stage):
    sft = filtered_mle.train(config(filtered_mle.FilteredMLEConfig, tmp_path / "sft", tiny_model, stage,
                                    filter="threshold", threshold=-math.inf, n_eval=0))  # fmt: skip
    flat = rwr.train(config(rwr.RWRConfig, tmp_path / "rwr", tiny_model, stage, beta=1e12, n_eval=0))
    assert read_studio_json(sft.final_checkpoint)["extra"]["examples"] == 48
    a, b = (
        load_file(sft.final_checkpoint / "model.safetensors"),
        load_file(flat.final_checkpoint / "model.safetensors"),
    )
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)
    sharp = rwr.train(config(rwr.RWRConfig, tmp_path / "sharp", tiny_model, stage, beta=0.2, n_eval=0))
    c = load_file(sharp.final_checkpoint / "model.safetensors")
    assert any(not torch.allclose(a[n], c[n]) for n in a)  # the control: real weights change the update


def test_dt_trains_on_conditioned_prompts_holds_one_model_and_reports_its_curve(
    tmp_path, tiny_model, monkeypatch
):
    loads, real = [], AutoModelForCausalLM.from_pretrained

    def counting(*args, **kwargs):
        out_dir = tmp_path / "dt"
        loads.append(len(rows(out_dir)) if (out_dir / "metrics.jsonl").exists() else -1)
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counting)
    cfg = config(dt.DTConfig, tmp_path / "dt", tiny_model, None, n_train=6, max_steps=3, curve_targets=[-1.0, 0.0, 2.0],
                 data={**dataclasses.asdict(DATA), "samples_per_prompt": 2})  # fmt: skip
    result = dt.train(cfg)
    # the data stage ran inside the run, with the starting policy; the reference is loaded once, after step 3
    assert loads == [-1, 3]
    samples, info = load_samples(tmp_path / "dt" / "samples")
    assert len(samples) == 12 and info["compute"]["generated_tokens"] > 0
    m = result.metrics
    for target in ("-1.00", "0.00", "2.00"):
        assert math.isfinite(m[f"eval/dt/{target}/reward"]) and math.isfinite(m[f"eval/dt/{target}/kl"])
    assert m["eval/reward"] == m["eval/dt/2.00/reward"] and "eval/dt/slope" in m  # the target is on the curve
    assert read_studio_json(result.final_checkpoint)["extra"]["placement"] == "prefix"
    # with no evaluation, the run never holds a second model
    loads.clear()
    dt.train(dataclasses.replace(cfg, output_dir=str(tmp_path / "dt2"), n_eval=0))
    assert len(loads) == 1


def test_offline_trainers_build_no_value_model_and_no_reference_while_training():
    """§2.6.5, statically: no critic class anywhere in the offline code; the only second causal LM is the
    evaluation's reference, loaded in ``evaluate`` (the runtime count is in the DT test above)."""
    import inspect

    from trainers import offline_data

    for module in (weighted_sft, offline_data, filtered_mle, rwr, dt):
        source = inspect.getsource(module)
        assert not any(
            name in source for name in ("ValueModel", "ActorCritic", "AutoModel.", "value_head")
        ), module
    loads = [name for name, fn in vars(weighted_sft).items()
             if inspect.isfunction(fn) and "AutoModelForCausalLM.from_pretrained" in inspect.getsource(fn)]  # fmt: skip
    assert sorted(loads) == ["evaluate", "setup"]


def test_non_finite_loss_fails_the_run_at_that_step(tmp_path, tiny_model, stage, monkeypatch):
    real, calls = weighted_sft.weighted_sft_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss, stats = real(*args, **kwargs)
        return (loss * float("nan"), stats) if len(calls) == 3 else (loss, stats)

    monkeypatch.setattr(weighted_sft, "weighted_sft_loss", poisoned)
    cfg = config(rwr.RWRConfig, tmp_path / "run", tiny_model, stage, checkpoint_every=1, keep_checkpoints=0)
    with pytest.raises(NonFiniteError, match=r"non-finite loss .* at step 3") as info:
        rwr.train(cfg)
    assert info.value.code == "nan_loss"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step-000001",
        "step-000002",
    ]


def test_filtered_mle_trains_on_the_chosen_side_of_human_pairs(tmp_path, tiny_model):
    snapshot = tmp_path / "prefs.jsonl"
    pairs = [
        {"prompt": f"The sea is {w}", "chosen": " calm and good.", "rejected": " bad."} for w in "abcdef"
    ]
    snapshot.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    cfg = config(filtered_mle.FilteredMLEConfig, tmp_path / "run", tiny_model, None, snapshot=str(snapshot),
                 batch_size=2, max_steps=3, n_eval=0)  # fmt: skip
    result = filtered_mle.train(cfg)
    studio = read_studio_json(result.final_checkpoint)
    assert studio["extra"]["examples"] == 6 and len(studio["snapshot_sha256"]) == 64
    assert studio["extra"]["compute"]["generated_tokens"] == 0  # no data stage: the humans wrote them
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    response = len(tokenizer(" calm and good.", add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert studio["extra"]["compute"]["response_tokens"] == 6 * response  # 3 steps × 2 pairs, chosen only
    assert not (tmp_path / "run" / "samples").exists()


def test_cli_runs_a_recipe_and_refuses_bad_input(tmp_path, tiny_model, stage, capsys):
    cfg_path = tmp_path / "offline.yaml"
    cfg_path.write_text(f"output_dir: {tmp_path / 'run'}\nmodel: {tiny_model}\nsamples: {stage}\nn_eval: 0\n"
                        "batch_size: 4\nmax_steps: 2\ncpu: true\nprogress: false\n")  # fmt: skip
    rwr_args = ["--config", str(cfg_path), "--set", "normalise=prompt", "--set", "reduction=sequence_sum"]
    assert trainers_main(["rwr", *rwr_args]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["recipe"] == "rwr" and summary["steps"] == 2 and summary["final_checkpoint"]
    assert trainers_main(["rwr", *rwr_args, "--set", "beta=0"]) == 2
    assert "field 'beta': out of range" in capsys.readouterr().err
    missing = tmp_path / "none"
    assert trainers_main(["dt", "--config", str(cfg_path), "--set", f"samples={missing}",
                          "--set", f"output_dir={tmp_path / 'other'}"]) == 2  # fmt: skip
    assert f"error[bad_input]: {missing}: no scored samples" in capsys.readouterr().err
    assert trainers_main(["filtered_mle", "--config", str(cfg_path), "--set", "batch_size=64"]) == 2
    assert "needs 64" in capsys.readouterr().err


def test_sigterm_from_the_command_line_checkpoints_exits_143_and_the_run_resumes(tmp_path, tiny_model, stage):
    out = tmp_path / "run"
    cfg_path = tmp_path / "dt.yaml"
    cfg_path.write_text(f"output_dir: {out}\nmodel: {tiny_model}\nsamples: {stage}\nn_eval: 0\nbatch_size: 2\n"
                        "max_steps: 100000\ncpu: true\nprogress: false\n")  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "trainers", "dt", "--config", str(cfg_path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() or not rows(out):
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
    assert summary["recipe"] == "dt" and summary["stopped"] and summary["last_checkpoint"]
    resumed = dt.train(load_config(dt.DTConfig, cfg_path), should_stop=lambda step: True)
    assert str(resumed.resumed_from) == summary["last_checkpoint"] and resumed.steps == summary["steps"] + 1


def test_eval_samples_repeat_each_held_out_prompt_with_its_own_noise(tmp_path, tiny_model):
    from trainers.offline_eval import evaluate_plain

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    cfg = config(dt.DTConfig, tmp_path / "e", tiny_model, None, n_eval=2, eval_samples=3)
    setup = weighted_sft.make_eval_setup(cfg, toy_task(), tokenizer, "cpu")
    assert list(setup.prompts) == [EVAL[0]] * 3 + [EVAL[1]] * 3
    responses = []

    class Recording:
        def score(self, prompts, texts):
            responses.extend(texts)
            return low_half(tokenizer).score(prompts, texts)

    evaluate_plain(lm, lm, dataclasses.replace(setup, reward=Recording()))
    assert len(responses) == 6 and len(set(responses[:3])) > 1  # three different samples of one prompt
