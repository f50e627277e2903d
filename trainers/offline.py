"""Offline alignment processors (Hu et al. 2023, "Aligning LMs with Offline Learning from Human Feedback";
algorithms.md §2): pure functions from scored samples to what a weighted-SFT step trains on.

A :class:`ScoredSample` is one pre-generated response with its reward and its z-score over the whole
labelled set (:func:`standardise`). From those:

* **filtered MLE** keeps samples with z > threshold (:func:`threshold_filter`, NeMo's ``rest``
  processor) or the best sample of each prompt (:func:`best_of_n`, OpenRLHF's / NeMo's ``rs``);
* **RWR** weights every sample by w = exp(z/β), normalised to mean 1 over a batch or by a softmax over
  each prompt's samples, then clipped (:func:`rwr_weights`; algorithms.md §2.3 [design]: no public code);
* **Decision Transformer / conditional SFT** trains on every sample with its z rendered into the prompt
  (:func:`dt_prompt`), the *same* function at inference with a target score, and :func:`parse_dt_prompt`
  its inverse. The tag ``<rm_score>:`` is plain text and the score a fixed-precision decimal string
  (OpenRLHF's ``"{:.2f}"``); conditioning tokens sit in the prompt, so the loss never sees them.

Also :func:`best_worst_pairs` (DPO pairs from the same scored samples) and :func:`curve_slope` (the
DT controllability curve's least-squares slope). No models, files or devices here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

Prompt = str | list[dict[str, str]]
"""Plain text, or chat messages ``[{"role": ..., "content": ...}, ...]`` (as :data:`trainers.rewards.Prompt`)."""


@dataclass(frozen=True)
class ScoredSample:
    """One pre-generated response.

    Attributes:
        prompt_index: which prompt (the data stage numbers *distinct* prompts, so this is the group).
        sample_index: which of that prompt's N samples.
        prompt: the prompt as given to the policy (text or messages).
        response: the sampled response text.
        reward: the raw reward (sequence total of the :class:`trainers.rewards.RewardSource`).
        z: the reward standardised over the whole labelled set.
        eos: the sample ended with an end-of-sequence token (False: cut at the length cap); training
            appends the EOS token only to samples that had one.
    """

    prompt_index: int
    sample_index: int
    prompt: Prompt
    response: str
    reward: float
    z: float
    eos: bool = True


# ----------------------------------------------------------------------------- standardisation


def standardise(values: Sequence[float], mean: float | None = None, std: float | None = None) -> list[float]:
    """z = (r − mean) / std in float64, over the whole set (§2.2 step 4).

    ``mean``/``std`` default to the set's mean and *sample* standard deviation (n − 1); pass both to use
    fixed statistics (NeMo's option). A set of one value, or a constant set, gives z = 0 everywhere.
    Invariant: a·r + b with a > 0 gives the same z.
    """
    rs = [float(v) for v in values]
    if not rs:
        return []
    mu = math.fsum(rs) / len(rs) if mean is None else float(mean)
    if std is None:
        std = math.sqrt(math.fsum((r - mu) ** 2 for r in rs) / (len(rs) - 1)) if len(rs) > 1 else 0.0
    if not std > 0:
        return [0.0] * len(rs)
    return [(r - mu) / std for r in rs]


def standardise_per_prompt(samples: Sequence[ScoredSample]) -> list[float]:
    """(N,) samples → (N,) rewards standardised within each prompt's group (:func:`standardise` per
    ``prompt_index``; a group of one, or of equal rewards, gives 0). [ours, not the paper's]

    Over the whole set, part of z is which prompt a sample answers (some prompts invite positive
    text); within a prompt, z is only what the response itself did better or worse.
    """
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s.prompt_index, []).append(i)
    out = [0.0] * len(samples)
    for rows in groups.values():
        for i, z in zip(rows, standardise([samples[i].reward for i in rows]), strict=True):
            out[i] = z
    return out


# ----------------------------------------------------------------------------- filtered MLE


def threshold_filter(samples: Sequence[ScoredSample], threshold: float = 0.0) -> list[ScoredSample]:
    """Samples with z strictly above ``threshold`` (standard deviations), in order.

    0 keeps the above-mean samples (about half); −inf keeps everything (plain SFT on the set).
    """
    return [s for s in samples if s.z > threshold]


def best_of_n(samples: Sequence[ScoredSample]) -> list[ScoredSample]:
    """The highest-reward sample of each prompt (ties: the lowest sample index), prompts in first-seen order.

    One row per distinct ``prompt_index``; with one sample per prompt the set is unchanged.
    """
    best: dict[int, ScoredSample] = {}
    for s in samples:
        kept = best.get(s.prompt_index)
        if kept is None or (s.reward, -s.sample_index) > (kept.reward, -kept.sample_index):
            best[s.prompt_index] = s
    return list(best.values())


def best_worst_pairs(samples: Sequence[ScoredSample]) -> list[dict[str, Any]]:
    """DPO rows ``{"prompt", "chosen", "rejected"}``: each prompt's best vs worst sample (by reward).

    Prompts whose samples all score the same (no preference) are left out. Ties for best or worst go
    to the lowest sample index. Prompts in first-seen order.
    """
    groups: dict[int, list[ScoredSample]] = {}
    for s in samples:
        groups.setdefault(s.prompt_index, []).append(s)
    rows = []
    for group in groups.values():
        best = max(group, key=lambda s: (s.reward, -s.sample_index))
        worst = min(group, key=lambda s: (s.reward, s.sample_index))
        if best.reward > worst.reward:
            rows.append({"prompt": best.prompt, "chosen": best.response, "rejected": worst.response})
    return rows


# ----------------------------------------------------------------------------- RWR


def rwr_weights(
    z: torch.Tensor,
    beta: float,
    *,
    normalise: Literal["batch", "prompt"] = "batch",
    groups: torch.Tensor | None = None,
    max_weight: float | None = 20.0,
) -> torch.Tensor:
    """Reward-weighted-regression weights w = exp(z/β), normalised, then clipped at ``max_weight``.

    ``batch``: w_i / mean_j w_j over the given samples (mean 1 before clipping). ``prompt``: a softmax of
    z/β over each prompt's samples (``groups``: (B,) prompt ids; each group sums to 1), so β → 0 puts
    all weight on the best sample of a prompt (best-of-N) and β → ∞ spreads it evenly. Computed from
    z/β shifted by its maximum (per group), so small β neither overflows nor divides 0 by 0. Clipping
    only ever lowers a weight; with it active the batch mean can fall below 1. The weighted-SFT loss
    divides by Σ w, so scaling every weight by one constant changes nothing but the clip.

    Args:
        z: (B,) standardised rewards.
        beta: β > 0, the temperature.
        normalise: ``batch`` or ``prompt``.
        groups: (B,) long prompt ids; required for ``prompt``.
        max_weight: upper clip (None: no clip).

    Returns:
        (B,) float64 non-negative weights.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if z.dim() != 1:
        raise ValueError(f"z must be (B,), got {tuple(z.shape)}")
    logits = z.detach().double() / beta
    if normalise == "batch":
        if not len(logits):
            return logits
        w = torch.exp(logits - logits.max())
        w = w / w.mean()
    elif normalise == "prompt":
        if groups is None or groups.shape != z.shape:
            raise ValueError("prompt normalisation needs (B,) groups")
        index = torch.unique(groups, return_inverse=True)[1]
        n = int(index.max()) + 1 if len(index) else 0
        top = torch.full((n,), -math.inf, dtype=logits.dtype).scatter_reduce(0, index, logits, "amax")
        e = torch.exp(logits - top[index])
        w = e / torch.zeros(n, dtype=e.dtype).index_add(0, index, e)[index]
    else:
        raise ValueError(f"unknown normalise {normalise!r}")
    return w if max_weight is None else w.clamp(max=max_weight)


# ----------------------------------------------------------------------------- Decision Transformer

DT_TAG = "<rm_score>:"
"""The conditioning tag (plain text, not a special token), as in OpenRLHF's conditional SFT."""
Placement = Literal["prefix", "suffix"]


def format_score(score: float, decimals: int = 2) -> str:
    """The score as a fixed-precision decimal string: 1.234 → ``"1.23"``, −0.001 → ``"0.00"`` (no "−0.00")."""
    if not math.isfinite(score):
        raise ValueError(f"cannot condition on a non-finite score ({score})")
    rounded = round(float(score), decimals)
    return f"{0.0 if rounded == 0 else rounded:.{decimals}f}"


def condition_text(text: str, score: float, *, decimals: int = 2, placement: Placement = "prefix") -> str:
    """``text`` with the conditioning added: ``"<rm_score>: 1.23\\n" + text`` (prefix) or
    ``text + " <rm_score>: 1.23"`` (suffix, OpenRLHF's place, after the input).

    The prefix keeps a continuation prompt's last words next to the response; the newline keeps the
    prompt's own tokens unchanged.
    """
    tag = f"{DT_TAG} {format_score(score, decimals)}"
    if placement == "prefix":
        return f"{tag}\n{text}"
    if placement == "suffix":
        return f"{text} {tag}"
    raise ValueError(f"unknown placement {placement!r}")


def dt_prompt(prompt: Prompt, score: float, *, decimals: int = 2, placement: Placement = "prefix") -> Prompt:
    """The Decision-Transformer prompt for training (score = the sample's z) *and* inference (score = the
    target): :func:`condition_text` of a text prompt, or of the last user message of a conversation."""
    if isinstance(prompt, str):
        return condition_text(prompt, score, decimals=decimals, placement=placement)
    messages = [dict(m) for m in prompt]
    last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=len(messages) - 1)
    if last < 0:
        raise ValueError("an empty conversation cannot be conditioned")
    messages[last]["content"] = condition_text(
        messages[last]["content"], score, decimals=decimals, placement=placement
    )
    return messages


_PREFIX = re.compile(rf"^{re.escape(DT_TAG)} (-?\d+(?:\.\d+)?)\n(.*)$", re.DOTALL)
_SUFFIX = re.compile(rf"^(.*) {re.escape(DT_TAG)} (-?\d+(?:\.\d+)?)$", re.DOTALL)


def parse_condition(text: str) -> tuple[str, float]:
    """Inverse of :func:`condition_text` (either placement): ``(text, score)``; ValueError without a tag."""
    if m := _PREFIX.match(text):
        return m.group(2), float(m.group(1))
    if m := _SUFFIX.match(text):
        return m.group(1), float(m.group(2))
    raise ValueError(f"no {DT_TAG} conditioning in {text[:60]!r}")


def parse_dt_prompt(prompt: Prompt) -> tuple[Prompt, float]:
    """Inverse of :func:`dt_prompt`: the original prompt and the score, round(score, decimals)."""
    if isinstance(prompt, str):
        return parse_condition(prompt)
    messages = [dict(m) for m in prompt]
    for i in range(len(messages) - 1, -1, -1):
        try:
            text, score = parse_condition(messages[i]["content"])
        except ValueError:
            continue
        messages[i]["content"] = text
        return messages, score
    raise ValueError(f"no {DT_TAG} conditioning in the conversation")


def curve_slope(targets: Sequence[float], achieved: Sequence[float]) -> float:
    """Least-squares slope of achieved reward on target (the controllability curve's steepness; > 0 rises)."""
    if len(targets) != len(achieved) or len(targets) < 2:
        raise ValueError("need at least two (target, achieved) points")
    mx, my = math.fsum(targets) / len(targets), math.fsum(achieved) / len(achieved)
    sxx = math.fsum((x - mx) ** 2 for x in targets)
    if sxx == 0:
        raise ValueError("the targets are all equal")
    return math.fsum((x - mx) * (y - my) for x, y in zip(targets, achieved, strict=True)) / sxx
