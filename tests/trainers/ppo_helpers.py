"""Shared by the PPO and NLPO tests: a toy task the tiny random Llama can learn, configs, weight hashes."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

from trainers.metrics import read_metrics
from trainers.ppo_config import KLConfig, PPOConfig, PPOOptimConfig
from trainers.rewards import CallableReward
from trainers.rollout import SamplingConfig
from trainers.tasks import Task

WORDS = ("sea", "moon", "pizza", "service", "price", "weather", "sky", "review", "sentence", "hello")
TRAIN_PROMPTS = [f"Write one sentence about the {w}." for w in WORDS] + [f"The {w} is" for w in WORDS]
EVAL_PROMPTS = [f"Tell me about the {w}." for w in WORDS]
MAX_NEW = 8


def word_starts(tokenizer: Any, response: str) -> list[float]:
    """Per policy token of ``response``: 1/MAX_NEW if the token begins a word (a leading space), else 0.

    About 30 % of the tiny tokenizer's tokens begin a word, so a random policy already earns some
    reward and a few PPO iterations visibly raise it.
    """
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return [float(tokenizer.decode([i]).startswith(" ")) / MAX_NEW for i in ids]


def toy_task(*, dense: bool = False) -> Task:
    """Toy prompts; reward = share of word-initial tokens (as one sequence reward, or per token when ``dense``)."""

    def reward(tokenizer: Any, append_eos: bool) -> CallableReward:
        def score(prompt: Any, response: str) -> float | list[float]:
            values = word_starts(tokenizer, response)
            return values if dense else sum(values)

        return CallableReward(score, tokenizer, append_eos=append_eos)

    return Task("toy", list(TRAIN_PROMPTS), list(EVAL_PROMPTS), task_reward=reward)


def toy_config(output_dir: Path, model: Path, **overrides: Any) -> PPOConfig:
    """A small PPO run on the toy task: 16 rollouts of 8 tokens per iteration, 2 epochs of 2 minibatches."""
    base = PPOConfig(
        output_dir=str(output_dir),
        model=str(model),
        iterations=2,
        prompts_per_iteration=16,
        rollout_batch_size=16,
        minibatch_size=8,
        ppo_epochs=2,
        sampling=SamplingConfig(max_new_tokens=MAX_NEW),
        optim=PPOOptimConfig(lr=1e-2),
        critic_lr=1e-3,
        kl=KLConfig(beta=0.01, target=None),
        eval_at_start=False,
        eval_batch_size=10,
        progress=False,
        cpu=True,
    )
    return dataclasses.replace(base, **overrides)


def as_kwargs(cfg: PPOConfig) -> dict[str, Any]:
    """The fields of a config (to build an NLPOConfig with the same settings)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def weights_hash(folder: Path) -> str:
    return hashlib.sha256((Path(folder) / "model.safetensors").read_bytes()).hexdigest()


def train_rows(output_dir: Path) -> dict[int, dict[str, float]]:
    """``{step: {train/… metric: value}}`` of a run's metrics file (times dropped)."""
    rows: dict[int, dict[str, float]] = {}
    for row in read_metrics(Path(output_dir) / "metrics.jsonl"):
        values = {k: v for k, v in row.items() if k.startswith("train/")}
        if values:
            rows.setdefault(row["step"], {}).update(values)
    return rows


def random_reward_model(tiny_model: Path, folder: Path) -> Path:
    """A randomly initialised one-logit classifier on the tiny tokenizer: a reward that is never flat."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    torch.manual_seed(1)
    config = AutoConfig.from_pretrained(tiny_model, num_labels=1)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return folder
