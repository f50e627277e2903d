"""Held-out evaluation of offline-trained policies: plain prompts, Decision-Transformer inference at a
target reward, and the DT controllability curve (reward achieved vs target).

Everything goes through :func:`trainers.rl_eval.evaluate_policy` (the RL recipes' evaluation: one
sampled response per prompt, reward, KL to the reference, perplexity under the reference, distinct-n),
so offline and online runs are measured the same way.

**DT inference** (algorithms.md §2.3): each held-out prompt is rewritten by :func:`trainers.offline.dt_prompt`
— the very function that formatted the training prompts — with the *target* standardised reward in
place of the sample's, then sampled normally. The reward source scores the response against the
*original* prompt (:class:`UnconditionedReward` strips the conditioning first), so a reward model never
sees the tag. KL and perplexity compare against the starting policy on the *original* prompt:
KL(π(·|tagged x) ‖ π_ref(·|x)), the same quantity as the other methods' (scoring the tagged prompt under
the reference would charge the DT policy for the reference's surprise at the tag).

**Controllability curve**: the same prompts and sampling noise (same seed) at every target, so the
points differ only by the target; :func:`trainers.offline.curve_slope` summarises it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from trainers.offline import Placement, curve_slope, dt_prompt, format_score, parse_dt_prompt
from trainers.rewards import Prompt, RewardSource, TokenRewards
from trainers.rl_eval import evaluate_policy
from trainers.rollout import SamplingConfig


@dataclass(frozen=True)
class EvalSetup:
    """What every held-out evaluation of one run shares."""

    tokenizer: Any
    prompts: Sequence[Prompt]
    """(N,) held-out prompts, unconditioned."""
    reward: RewardSource
    sampling: SamplingConfig
    batch_size: int
    seed: int
    """Sampling seed (row i uses its own stream: the same noise for every policy and target)."""
    max_prompt_tokens: int = 256
    stop_at_newline: bool = False
    chunk_steps: int = 16


class UnconditionedReward:
    """A :class:`RewardSource` that scores each response against its prompt with the DT conditioning removed."""

    def __init__(self, reward: RewardSource) -> None:
        self.reward = reward

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[TokenRewards]:
        return self.reward.score([parse_dt_prompt(p)[0] for p in prompts], responses)


def evaluate_plain(policy: Any, reference: Any, setup: EvalSetup, prefix: str = "eval/") -> dict[str, float]:
    """``evaluate_policy`` on the held-out prompts as they are → ``{prefix}reward``, ``kl``, ``perplexity``, …"""
    return evaluate_policy(policy, reference, setup.tokenizer, setup.prompts, setup.reward, setup.sampling,
                           setup.batch_size, seed=setup.seed, max_prompt_tokens=setup.max_prompt_tokens,
                           stop_at_newline=setup.stop_at_newline, chunk_steps=setup.chunk_steps, prefix=prefix)  # fmt: skip


def evaluate_dt(
    policy: Any,
    reference: Any,
    setup: EvalSetup,
    target: float,
    *,
    decimals: int = 2,
    placement: Placement = "prefix",
    prefix: str = "eval/",
) -> dict[str, float]:
    """DT inference at ``target`` (a standardised reward): every prompt conditioned on it, then evaluated."""
    prompts = [dt_prompt(p, target, decimals=decimals, placement=placement) for p in setup.prompts]
    return evaluate_policy(policy, reference, setup.tokenizer, prompts, UnconditionedReward(setup.reward),
                           setup.sampling, setup.batch_size, seed=setup.seed,
                           max_prompt_tokens=setup.max_prompt_tokens, stop_at_newline=setup.stop_at_newline,
                           chunk_steps=setup.chunk_steps, prefix=prefix, reference_prompts=setup.prompts)  # fmt: skip


def controllability_curve(
    policy: Any,
    reference: Any,
    setup: EvalSetup,
    targets: Sequence[float],
    *,
    decimals: int = 2,
    placement: Placement = "prefix",
) -> list[dict[str, float]]:
    """One point per target: ``{"target", "reward", "reward_std", "kl", "perplexity", ...}`` (unprefixed)."""
    curve = []
    for target in targets:
        point = evaluate_dt(
            policy, reference, setup, target, decimals=decimals, placement=placement, prefix=""
        )
        curve.append({"target": float(target), **point})
    return curve


def curve_metrics(curve: Sequence[dict[str, float]], prefix: str = "eval/dt/") -> dict[str, float]:
    """Metrics of a curve: ``{prefix}{target}/reward`` and ``/kl`` per point (target as in the prompt,
    e.g. ``eval/dt/-1.00/reward``, with its ``reward_std`` over responses), and ``{prefix}slope`` (least-squares reward per unit of target)."""
    out: dict[str, float] = {}
    for point in curve:
        key = f"{prefix}{format_score(point['target'])}/"
        out[key + "reward"] = point["reward"]
        if "reward_std" in point:
            out[key + "reward_std"] = point["reward_std"]
        out[key + "kl"] = point["kl"]
    if len(curve) >= 2:
        out[prefix + "slope"] = curve_slope([p["target"] for p in curve], [p["reward"] for p in curve])
    return out
