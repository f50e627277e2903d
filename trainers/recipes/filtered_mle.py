"""Filtered MLE ("filtering alignment", Hu et al. 2023; ReST-style / rejection sampling): SFT on the
policy's own best samples.

1. Data (:mod:`trainers.weighted_sft` step 0): N samples per training prompt from the starting policy,
   scored and z-normalised over the set — or a finished data-stage folder (``samples``) — or a studio
   ``preferences`` snapshot, whose ``chosen`` responses are the kept samples as they are (a human
   already filtered them; no threshold applies).
2. Filter (:mod:`trainers.offline`): ``best_of_n`` keeps the highest-reward sample of each prompt
   (OpenRLHF / NeMo ``rs``), ``threshold`` every sample with z > ``threshold`` (NeMo ``rest``; 0: above
   the mean). The paper's own rule is not established (algorithms.md §2.3).
3. Plain SFT on the kept samples (all weights 1) with the shared weighted-SFT loop and its guarantees.

Example (``python -m trainers filtered_mle --config fmle.yaml``)::

    output_dir: runs/fmle-sentiment
    task: sentiment
    data: {samples_per_prompt: 4, sampling: {max_new_tokens: 24, temperature: 0.9}}
    filter: best_of_n
    epochs: 2

Left out: several rounds of generate → filter → train (ReST's "grow" loop; rerun with the result as
``model``), per-prompt thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trainers import weighted_sft
from trainers.config import run_recipe_cli
from trainers.offline import best_of_n, threshold_filter
from trainers.recipe_common import TrainResult
from trainers.weighted_sft import Method, OfflineData, SFTExample, WeightedSFTConfig

RECIPE = "filtered_mle"
CHECKPOINT_KIND = "policy"
"""What ``final/`` is, for the studio's checkpoint registry."""
SNAPSHOT_KINDS = ("prompts", "preferences")
"""A prompts snapshot to sample for, or a preferences snapshot whose chosen responses are trained on."""
BASE_KIND = "policy"
"""What the starting model must be: a causal-LM policy."""


@dataclass(frozen=True)
class FilteredMLEConfig(WeightedSFTConfig):
    """Train a causal-LM policy by SFT on its best pre-generated samples (filtered MLE)."""

    filter: Literal["best_of_n", "threshold"] = "best_of_n"
    """best_of_n: the best sample of each prompt; threshold: every sample with z > threshold."""
    threshold: float = 0.0
    """threshold filter: keep samples whose standardised reward is above this (0: above the mean)."""


def select(cfg: FilteredMLEConfig, data: OfflineData) -> list[SFTExample]:
    """The kept samples (or every pair's chosen response) as weight-1 examples."""
    if data.pairs is not None:
        return [
            SFTExample(p.prompt, chosen_text(p.chosen), eos=True, group=i, z=0.0)
            for i, p in enumerate(data.pairs)
        ]
    kept = (
        best_of_n(data.samples)
        if cfg.filter == "best_of_n"
        else threshold_filter(data.samples, cfg.threshold)
    )
    return [SFTExample(s.prompt, s.response, s.eos, s.prompt_index, s.z) for s in kept]


def chosen_text(chosen: str | list[dict[str, str]]) -> str:
    """A chosen completion as response text: the string, or the content of its one assistant message."""
    if isinstance(chosen, str):
        return chosen
    if len(chosen) != 1:
        raise ValueError(f"filtered MLE trains on single-turn completions, got {len(chosen)} messages")
    return chosen[0]["content"]


METHOD = Method(RECIPE, select, extra=lambda cfg: {"filter": cfg.filter, "threshold": cfg.threshold},
                accepts_preferences=True)  # fmt: skip


def train(cfg: FilteredMLEConfig, *, should_stop=None) -> TrainResult:
    """Train (or resume); see :func:`trainers.weighted_sft.train`."""
    return weighted_sft.train(cfg, METHOD, should_stop=should_stop)


CONFIG_CLASS = FilteredMLEConfig
"""The config dataclass (``python -m trainers --schema`` builds the studio's form from it)."""


def main(argv: list[str] | None = None) -> int:
    """``python -m trainers filtered_mle --config cfg.yaml [--set key=value ...]``."""
    return run_recipe_cli(FilteredMLEConfig, train, RECIPE, argv)


if __name__ == "__main__":
    raise SystemExit(main())
