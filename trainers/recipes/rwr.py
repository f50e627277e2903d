"""Reward-weighted regression (Hu et al. 2023; Peters & Schaal 2007): SFT on every pre-generated sample,
each weighted by exp(z/β).

1. Data (:mod:`trainers.weighted_sft` step 0): N samples per training prompt from the starting policy,
   scored and z-normalised over the set (or a finished data-stage folder, ``samples``).
2. Weights (:func:`trainers.offline.rwr_weights`; algorithms.md §2.3 [design], no public code):
   w = exp(z/β), normalised per optimizer step to mean 1 (``normalise: batch``, computed over the
   whole step so accumulation and processes do not change it) or by a softmax over each prompt's
   samples (``prompt``), then clipped at ``max_weight``.
3. The weighted NLL of the responses, −Σ w·log π / Σ w·n (per-token mean) or −Σ w·log π / Σ w
   (per-sequence sum), with the shared weighted-SFT loop and its guarantees. β → ∞ is plain SFT on
   every sample; β → 0 with ``prompt`` normalisation is best-of-N filtered MLE.

Example (``python -m trainers rwr --config rwr.yaml``)::

    output_dir: runs/rwr-sentiment
    task: sentiment
    beta: 1.0
    normalise: batch
    epochs: 2

Left out: advantage-weighted variants (AWR's learned value baseline), iterating the data stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from trainers import weighted_sft
from trainers.config import ConfigError, bounded, run_recipe_cli
from trainers.offline import rwr_weights
from trainers.recipe_common import TrainResult
from trainers.weighted_sft import Method, OfflineData, SFTExample, WeightedSFTConfig

RECIPE = "rwr"
CHECKPOINT_KIND = "policy"
"""What ``final/`` is, for the studio's checkpoint registry."""
SNAPSHOT_KINDS = ("prompts",)
"""A prompts snapshot to sample for (optional: without one the built-in task's prompts)."""
BASE_KIND = "policy"
"""What the starting model must be: a causal-LM policy."""


@dataclass(frozen=True)
class RWRConfig(WeightedSFTConfig):
    """Train a causal-LM policy by reward-weighted regression on its pre-generated, scored samples."""

    beta: float = bounded(1.0, gt=0)
    """β, the weights' temperature: w = exp(z/β); large β → plain SFT, small β → best samples only."""
    normalise: Literal["batch", "prompt"] = "batch"
    """batch: weights / their mean over each optimizer step; prompt: softmax over each prompt's samples."""
    max_weight: float | None = bounded(20.0, gt=0)
    """Clip every normalised weight to at most this (variance control; null: no clip)."""


def select(cfg: RWRConfig, data: OfflineData) -> list[SFTExample]:
    """Every sample; with ``prompt`` normalisation its weight is fixed now (over its prompt's samples)."""
    if data.samples is None:
        raise ConfigError(
            cfg.snapshot or "<config>", "snapshot", "RWR needs scored samples, not preference pairs"
        )
    samples = data.samples
    weights = [1.0] * len(samples)
    if cfg.normalise == "prompt":
        z = torch.tensor([s.z for s in samples], dtype=torch.float64)
        groups = torch.tensor([s.prompt_index for s in samples])
        weights = rwr_weights(
            z, cfg.beta, normalise="prompt", groups=groups, max_weight=cfg.max_weight
        ).tolist()
    return [
        SFTExample(s.prompt, s.response, s.eos, s.prompt_index, s.z, w)
        for s, w in zip(samples, weights, strict=True)
    ]


def step_weights(cfg: RWRConfig, examples: Sequence[SFTExample]) -> torch.Tensor:
    """``batch``: exp(z/β) normalised over the step's examples, clipped; ``prompt``: the fixed weights."""
    if cfg.normalise == "prompt":
        return torch.tensor([e.weight for e in examples], dtype=torch.float64)
    z = torch.tensor([e.z for e in examples], dtype=torch.float64)
    return rwr_weights(z, cfg.beta, normalise="batch", max_weight=cfg.max_weight)


METHOD = Method(RECIPE, select, step_weights,
                extra=lambda cfg: {"beta": cfg.beta, "normalise": cfg.normalise, "max_weight": cfg.max_weight})  # fmt: skip


def train(cfg: RWRConfig, *, should_stop=None) -> TrainResult:
    """Train (or resume); see :func:`trainers.weighted_sft.train`."""
    return weighted_sft.train(cfg, METHOD, should_stop=should_stop)


CONFIG_CLASS = RWRConfig
"""The config dataclass (``python -m trainers --schema`` builds the studio's form from it)."""


def main(argv: list[str] | None = None) -> int:
    """``python -m trainers rwr --config cfg.yaml [--set key=value ...]``."""
    return run_recipe_cli(RWRConfig, train, RECIPE, argv)


if __name__ == "__main__":
    raise SystemExit(main())
