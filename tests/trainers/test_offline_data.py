"""The offline data stage (trainers/offline_data.py) on the tiny random Llama: rows, resume, scoring, compute, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainers.compute import non_embedding_params
from trainers.config import ConfigError
from trainers.offline_data import (
    SAMPLES,
    OfflineDataConfig,
    generate_samples,
    load_samples,
    read_jsonl,
    run_data_stage,
)
from trainers.rewards import CallableReward
from trainers.rollout import SamplingConfig

PROMPTS = [
    "The sea is",
    "Write one sentence about the weather.",
    "The pizza was",
    "Explain why the sky is blue.",
]
SAMPLING = SamplingConfig(max_new_tokens=6, temperature=0.9)


@pytest.fixture(scope="module")
def policy(tiny_model):
    return AutoModelForCausalLM.from_pretrained(
        tiny_model, dtype=torch.float32
    ), AutoTokenizer.from_pretrained(tiny_model)


def generate(policy, path: Path, **overrides):
    lm, tokenizer = policy
    kwargs = {"samples_per_prompt": 3, "sampling": SAMPLING, "batch_size": 5, "seed": 7, **overrides}
    return generate_samples(lm, tokenizer, PROMPTS, path, **kwargs)


class Crash(Exception):
    pass


def test_rows_are_prompt_major_with_their_settings_and_seed(tmp_path, policy):
    rows = generate(policy, tmp_path / SAMPLES)
    assert len(rows) == 12 and read_jsonl(tmp_path / SAMPLES) == rows
    assert [(r["prompt_index"], r["sample_index"]) for r in rows[:4]] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    first = rows[0]
    assert (
        first["prompt"] == PROMPTS[0]
        and first["seed"] == 7 * 1_000_003 + 0
        and rows[5]["seed"] == 7 * 1_000_003 + 5
    )
    assert first["sampling"] == {"max_new_tokens": 6, "min_new_tokens": 0, "stop_at_eos": True, "temperature": 0.9,
                                 "top_k": 0, "top_p": 1.0}  # fmt: skip
    tokenizer = policy[1]
    assert first["prompt_tokens"] == len(tokenizer(PROMPTS[0])["input_ids"])
    assert all(1 <= r["response_tokens"] <= 6 and isinstance(r["response"], str) for r in rows)
    assert len({r["response"] for r in rows}) > 6  # samples of one prompt differ (temperature 0.9)


def test_a_resumed_generation_equals_an_uninterrupted_one_whatever_the_batches(tmp_path, policy):
    straight = generate(policy, tmp_path / "straight" / SAMPLES)
    resumed_path = tmp_path / "resumed" / SAMPLES

    def crash_after_one_batch(done: int, total: int) -> None:
        if done >= 5:
            raise Crash

    with pytest.raises(Crash):
        generate(policy, resumed_path, progress=crash_after_one_batch)
    assert len(read_jsonl(resumed_path)) == 5
    with resumed_path.open("a") as handle:  # a crash in the middle of the next write: a torn line
        handle.write('{"prompt_index": 1, "sample_in')
    resumed = generate(policy, resumed_path, batch_size=4)  # other batch boundaries: rows sample alone
    assert resumed == straight
    assert resumed_path.read_text() == (tmp_path / "straight" / SAMPLES).read_text()
    with pytest.raises(ConfigError, match="row 1 was generated with other prompts, settings or seed"):
        generate(policy, resumed_path, sampling=SamplingConfig(max_new_tokens=6, temperature=0.5))
    with pytest.raises(ConfigError, match="other prompts, settings or seed"):
        generate(policy, resumed_path, seed=8)


def test_the_stage_scores_standardises_and_counts_its_compute(tmp_path, policy, monkeypatch):
    lm, tokenizer = policy
    lengths = CallableReward(lambda prompt, response: float(len(response)), tokenizer)
    cfg = OfflineDataConfig(samples_per_prompt=3, sampling=SAMPLING, batch_size=6)
    samples, info = run_data_stage(lm, tokenizer, PROMPTS, tmp_path, cfg, lengths, seed=3, model="tiny")
    rows = read_jsonl(tmp_path / SAMPLES)
    assert [s.reward for s in samples] == [float(len(r["response"])) for r in rows]
    z = [s.z for s in samples]
    assert math.fsum(z) == pytest.approx(0, abs=1e-9) and math.fsum(v * v for v in z) / 11 == pytest.approx(1)
    assert [s.eos for s in samples] == [r["eos"] for r in rows]
    mean = sum(s.reward for s in samples) / 12
    assert info["reward_mean"] == pytest.approx(mean) and info["rows"] == 12 and info["prompts"] == 4
    assert info["data"]["samples_per_prompt"] == 3 and info["seed"] == 3 and info["model"] == "tiny"
    # compute: every row is a prefill of its prompt plus one forward per generated token but the last
    prompt_tokens, generated = sum(r["prompt_tokens"] for r in rows), sum(r["response_tokens"] for r in rows)
    n = non_embedding_params(lm)
    assert n == 82240
    compute = info["compute"]
    assert (
        compute["generated_tokens"] == generated
        and compute["forward_tokens"] == prompt_tokens + generated - 12
    )
    assert compute["forward_flops"] == 2 * n * (prompt_tokens + generated - 12) == compute["total_flops"]
    assert compute["backward_flops"] == 0 and compute["trained_tokens"] == 0  # sampling trains nothing
    # a finished folder is only read
    monkeypatch.setattr("trainers.offline_data.generate_samples", lambda *a, **k: pytest.fail("regenerated"))
    again, _ = run_data_stage(lm, tokenizer, PROMPTS, tmp_path, cfg, lengths, seed=3)
    assert again == samples and load_samples(tmp_path / "scored.jsonl")[0] == samples


def test_headless_stage_on_the_sentiment_task(tmp_path, tiny_model, capsys):
    from trainers.__main__ import main as trainers_main
    from trainers.offline_data import main

    args = ["--set", f"output_dir={tmp_path / 'stage'}", "--set", f"model={tiny_model}", "--set", "n_train=3",
            "--set", "data.samples_per_prompt=2", "--set", "data.sampling.max_new_tokens=4", "--set", "cpu=true",
            "--set", "progress=false"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples"] == 6 and summary["prompts"] == 3 and summary["total_flops"] > 0
    samples, info = load_samples(tmp_path / "stage")
    assert info["data"]["reward"]["kind"] == "task" and all(-1 <= s.reward <= 1 for s in samples)  # VADER
    assert trainers_main(["offline_data", *args]) == 0  # the same through `python -m trainers offline_data`
    assert main([*args[:-4], "--set", "n_train=100000"]) == 2
    assert "error[bad_input]" in capsys.readouterr().err


def test_text_with_unicode_line_separators_reads_back_whole(tmp_path):
    # json.dumps(ensure_ascii=False) leaves U+2028/U+2029/U+0085 raw; SmolLM2 samples contain them
    rows = [{"prompt_index": i, "response": f"one{sep}two"} for i, sep in enumerate("\u2028\u2029\x85")]
    path = tmp_path / SAMPLES
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert read_jsonl(path) == rows
    assert path.read_text(encoding="utf-8").count("\n") == 3  # nothing was taken for a torn line
