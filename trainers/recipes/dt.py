"""Decision Transformer / conditional SFT ("conditional alignment", Hu et al. 2023): SFT on every
pre-generated sample with its standardised reward written into the prompt; at inference, ask for a
high reward.

1. Data (:mod:`trainers.weighted_sft` step 0): N samples per training prompt from the starting policy,
   scored and z-normalised over the set (or a finished data-stage folder, ``samples``).
2. Conditioning (:func:`trainers.offline.dt_prompt`): each prompt becomes ``"<rm_score>: 1.23\\n" + prompt``
   (``placement: prefix``) or ``prompt + " <rm_score>: 1.23"`` (``suffix``, OpenRLHF's place), the score
   being the sample's z with ``decimals`` decimals — plain text, no new tokens, no bucketing. Nothing is
   filtered: low-reward samples teach what a low score looks like. The conditioning is prompt, so it
   is never in the loss.
3. Plain SFT (all weights 1) with the shared weighted-SFT loop and its guarantees.
4. Evaluation: the held-out prompts conditioned on ``target`` (the same formatting function), and the
   controllability curve over ``curve_targets`` (reward achieved vs target, its slope;
   :mod:`trainers.offline_eval`).

Example (``python -m trainers dt --config dt.yaml``)::

    output_dir: runs/dt-sentiment
    task: sentiment
    target: 2.0
    curve_targets: [-1.0, 0.0, 1.0, 2.0]
    epochs: 2

Left out: scoring a mixture with human/reference responses (the paper's "with generation" variant mixes
OpenOrca and HH chosen responses in), NeMo's fixed mean/std, a learned reward head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from trainers import weighted_sft
from trainers.config import ConfigError, bounded, run_recipe_cli
from trainers.offline import dt_prompt, standardise_per_prompt
from trainers.offline_eval import EvalSetup, controllability_curve, curve_metrics, evaluate_dt
from trainers.recipe_common import TrainResult
from trainers.weighted_sft import Method, OfflineData, SFTExample, WeightedSFTConfig

RECIPE = "dt"
CHECKPOINT_KIND = "policy"
"""What ``final/`` is, for the studio's checkpoint registry."""
SNAPSHOT_KINDS = ("prompts",)
"""A prompts snapshot to sample for (optional: without one the built-in task's prompts)."""
BASE_KIND = "policy"
"""What the starting model must be: a causal-LM policy."""


@dataclass(frozen=True)
class DTConfig(WeightedSFTConfig):
    """Train a causal-LM policy by reward-conditioned SFT (Decision Transformer) on its scored samples."""

    placement: Literal["prefix", "suffix"] = "prefix"
    """Where the "<rm_score>: z" tag goes: before the prompt (keeps a continuation's words together)
    or after it (OpenRLHF)."""
    normalise: Literal["set", "prompt"] = "set"
    """The score written into the prompt: the reward standardised over the whole set (the paper's),
    or within each prompt's N samples (ours: the score then says only how the response compares
    with the other responses to the same prompt)."""
    decimals: int = bounded(2, ge=0, le=6)
    """Decimals of the score in the prompt (OpenRLHF 2, NeMo 1)."""
    target: float = 2.0
    """The standardised reward asked for at evaluation (OpenRLHF's default is 5.00)."""
    curve_targets: list[float] = field(default_factory=lambda: [-1.0, 0.0, 1.0, 2.0])
    """Targets of the controllability curve at the end (empty: no curve)."""


def select(cfg: DTConfig, data: OfflineData) -> list[SFTExample]:
    """Every sample, its prompt conditioned on its own z."""
    if data.samples is None:
        raise ConfigError(
            cfg.snapshot or "<config>", "snapshot", "DT needs scored samples, not preference pairs"
        )
    scores = [s.z for s in data.samples] if cfg.normalise == "set" else standardise_per_prompt(data.samples)
    return [SFTExample(dt_prompt(s.prompt, z, decimals=cfg.decimals, placement=cfg.placement), s.response, s.eos,
                       s.prompt_index, z) for s, z in zip(data.samples, scores, strict=True)]  # fmt: skip


def evaluate(cfg: DTConfig, policy: Any, reference: Any, setup: EvalSetup) -> dict[str, float]:
    """``eval/…`` at ``target`` and ``eval/dt/<target>/…`` along the curve (with its slope); a target on
    the curve is sampled once."""
    curve = controllability_curve(policy, reference, setup, cfg.curve_targets, decimals=cfg.decimals,
                                  placement=cfg.placement)  # fmt: skip
    at_target = [p for p in curve if p["target"] == cfg.target]
    if at_target:
        out = {f"eval/{k}": v for k, v in at_target[0].items() if k != "target"}
    else:
        out = evaluate_dt(
            policy, reference, setup, cfg.target, decimals=cfg.decimals, placement=cfg.placement
        )
    return {**out, **curve_metrics(curve)}


METHOD = Method(RECIPE, select, evaluate=evaluate,
                extra=lambda cfg: {"placement": cfg.placement, "decimals": cfg.decimals, "target": cfg.target,
                                  "normalise": cfg.normalise})  # fmt: skip


def train(cfg: DTConfig, *, should_stop=None) -> TrainResult:
    """Train (or resume); see :func:`trainers.weighted_sft.train`."""
    return weighted_sft.train(cfg, METHOD, should_stop=should_stop)


CONFIG_CLASS = DTConfig
"""The config dataclass (``python -m trainers --schema`` builds the studio's form from it)."""


def main(argv: list[str] | None = None) -> int:
    """``python -m trainers dt --config cfg.yaml [--set key=value ...]``."""
    return run_recipe_cli(DTConfig, train, RECIPE, argv)


if __name__ == "__main__":
    raise SystemExit(main())
