"""ESRL dynamic sampling (Wang et al., AAAI 2024; algorithms.md §3.3) as small pure functions.

Two modes decide how much of a rollout is worth a gradient:

* **eliminate** — the released rule: score each sample's *confidence* from the model's per-step
  distributions, and drop the ⌈ρ·B⌉ most confident samples (ρ = 0.3 in the released code) before
  the graph-building stage 2. Unlike the released code, which averages HF's processed scores over
  every step (post-EOS padding included), the confidence here is over the *valid* response tokens
  only, from the raw model distribution: the mean max-probability, or 1 − mean entropy / log V.
* **adaptive** — *ours, not the paper's* (the paper's estimator and formulas are not public): a
  capability c(x) ∈ [0, 1] per prompt, from a first cheap sample (1 − mean entropy / log V) or from
  its reward scaled into a known range, sets the number of samples and their temperature::

      k(x) = clamp(round(k_max · (1 − c)), k_min, k_max)
      τ(x) = τ_min + (τ_max − τ_min) · (1 − c)

  so confident prompts get few, cool samples and uncertain ones many, hot ones.

Shapes: B rollout rows, T response steps, N prompts. ``mask`` (B, T) is True on response tokens.
Also here: :class:`StepStats`, the stage-1 logits processor that records the per-step max
probability and entropy these scores need, and the per-row temperature processor adaptive mode
samples with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from trainers.rl_math import group_mean_baseline, leave_one_out_baseline, masked_mean

Confidence = Literal["max_prob", "entropy"]

# ----------------------------------------------------------------------------- stage-1 statistics


class StepStats:
    """A stage-1 logits processor that records, per step, the max probability and the entropy of
    the distribution it is given, and returns the logits unchanged.

    Put it first in ``processors`` so it sees the raw model distribution (before temperature,
    top-k/top-p). Never pass it to stage 2. :meth:`stacked` gives (B, T) tensors.
    """

    def __init__(self) -> None:
        self.max_prob: list[torch.Tensor] = []
        self.entropy: list[torch.Tensor] = []

    def __call__(self, step: int, logits: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits.float(), dim=-1)
        p = logp.exp()
        finite = torch.where(torch.isfinite(logp), logp, 0.0)
        self.max_prob.append(p.max(-1).values)
        self.entropy.append(-(p * finite).sum(-1))
        return logits

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) max probability and (B, T) entropy (nats) of each recorded step."""
        if not self.max_prob:
            raise ValueError("no steps were recorded")
        return torch.stack(self.max_prob, dim=1), torch.stack(self.entropy, dim=1)


def row_temperature(temperatures: torch.Tensor):
    """A logits processor dividing row b's logits by ``temperatures[b]`` > 0. (B,) → processor."""
    if bool((temperatures <= 0).any()):
        raise ValueError("temperatures must be > 0")
    column = temperatures.float()[:, None]
    return lambda step, logits: logits / column.to(logits.device)


# ----------------------------------------------------------------------------- eliminate


def confidence(
    max_prob: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor, kind: Confidence, vocab_size: int
) -> torch.Tensor:
    """(B,) confidence of each sample over its valid tokens: mean max-prob, or 1 − mean H / log V.

    Args:
        max_prob: (B, T) max_a p_t(a) per step.
        entropy: (B, T) H(p_t) per step, nats.
        mask: (B, T) True on the response tokens (padding steps are ignored).
        kind: ``max_prob`` or ``entropy``.
        vocab_size: V, for the entropy normalisation.
    """
    m = mask.bool()
    if kind == "max_prob":
        return masked_mean(max_prob, m, dim=-1)
    if kind == "entropy":
        return 1.0 - masked_mean(entropy, m, dim=-1) / math.log(vocab_size)
    raise ValueError(f"unknown confidence {kind!r}")


def eliminate(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """(B,) → (B,) bool keep-mask without the ⌈ratio·B⌉ highest scores (at least one row is kept).

    Ties are broken by position (the later row is dropped first), so every kept score is ≤ every
    dropped one and the result is deterministic. ``ratio=0`` keeps everything.
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    n = scores.shape[0]
    n_drop = min(math.ceil(ratio * n), n - 1)
    keep = torch.ones(n, dtype=torch.bool, device=scores.device)
    if n_drop > 0:
        order = sorted(range(n), key=lambda i: (float(scores[i]), i), reverse=True)
        keep[order[:n_drop]] = False
    return keep


# ----------------------------------------------------------------------------- adaptive (ours)


def capability_from_entropy(entropy: torch.Tensor, mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, T), (B, T) → (B,) c = 1 − mean H / log V over valid tokens, in [0, 1]."""
    return (1.0 - masked_mean(entropy, mask.bool(), dim=-1) / math.log(vocab_size)).clamp(0.0, 1.0)


def capability_from_reward(scores: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """(N,) → (N,) c = (r − low) / (high − low), clamped to [0, 1]."""
    if not high > low:
        raise ValueError(f"need high > low, got {low}, {high}")
    return ((scores.float() - low) / (high - low)).clamp(0.0, 1.0)


def adaptive_plan(
    capability: torch.Tensor, k_min: int, k_max: int, tau_min: float, tau_max: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) capability c ∈ [0, 1] → (N,) long sample counts k and (N,) temperatures τ (module doc).

    Both are non-increasing in c; c = 1 gives k_min and τ_min, c = 0 gives k_max and τ_max.
    """
    if not 1 <= k_min <= k_max:
        raise ValueError(f"need 1 <= k_min <= k_max, got {k_min}, {k_max}")
    if not 0 < tau_min <= tau_max:
        raise ValueError(f"need 0 < tau_min <= tau_max, got {tau_min}, {tau_max}")
    gap = 1.0 - capability.float().clamp(0.0, 1.0)
    k = torch.round(k_max * gap).long().clamp(k_min, k_max)
    tau = tau_min + (tau_max - tau_min) * gap
    return k, tau


# ----------------------------------------------------------------------------- groups of any size


def baseline_by_group(
    scores: torch.Tensor, sizes: Sequence[int], kind: Literal["group_mean", "leave_one_out"]
) -> torch.Tensor:
    """(B,) baseline of consecutive groups of the given sizes (adaptive mode varies k per prompt).

    ``leave_one_out`` falls back to 0 for a group of one (no other sample to compare with).
    """
    if sum(sizes) != scores.shape[0]:
        raise ValueError(f"group sizes sum to {sum(sizes)}, not {scores.shape[0]}")
    parts, start = [], 0
    for size in sizes:
        group = scores[start : start + size]
        if kind == "group_mean":
            parts.append(group_mean_baseline(group, size))
        elif size > 1:
            parts.append(leave_one_out_baseline(group, size))
        else:
            parts.append(torch.zeros_like(group, dtype=torch.float32))
        start += size
    return torch.cat(parts)
