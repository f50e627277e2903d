"""PPO's experience: one iteration's rollout with everything the update needs, and the pure steps on it.

:class:`Experience` holds the (B, …) tensors of one iteration's rows on one process (glossary of
style.md: ``old_logprobs`` are the log-probs of the distribution that actually sampled — the
masked one in NLPO —, ``raw_logprobs`` the unprocessed policy's, used for the KL). The functions
here take tensors and floats only:

* :func:`cat_parts` joins rollout chunks of different response lengths;
* :func:`shape_experience` — clipped task rewards − β·KL (§1.3), GAE (§1.5) and advantage whitening;
* :func:`minibatch` — a row subset with the all-padding columns trimmed (fewer positions to score);
* :func:`global_whiten` — masked whitening whose statistics span every process;
* :func:`rollout_metrics` — the iteration's reward and KL statistics (the KL controller reads ``kl``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from trainers.rl_math import gae, kl_k1, kl_shaped_rewards, masked_whiten


@dataclass(frozen=True)
class Experience:
    """One iteration's rows (this process's share), all on one device; B rows, P prompt columns, T steps.

    Attributes:
        prompt_ids: (B, P) long, left-padded.
        prompt_mask: (B, P) bool.
        response_ids: (B, T) long, right-padded.
        mask: (B, T) bool, True on generated tokens (the actions).
        old_logprobs: (B, T) log π_old(a_t|s_t) of the sampling distribution (masked in NLPO).
        raw_logprobs: (B, T) log π_old of the unprocessed policy (the KL's).
        ref_logprobs: (B, T) log π_ref(a_t|s_t).
        old_values: (B, T) V(s_t) at rollout time.
        task_rewards: (B, T) per-token task rewards (a sequence reward sits at the last token).
        scores: (B,) per-sequence task rewards (totals).
        eos: (B,) bool, the row ended with a stop token.
        action_masks: (B, T, V) bool NLPO action masks per step, or None.
        rewards: (B, T) shaped rewards (after :func:`shape_experience`).
        kl: (B, T) per-token KL estimate of the reward's estimator.
        advantages: (B, T) (whitened over the batch when asked).
        returns: (B, T) value targets.
        entropy: (B, T) entropy of the sampling distribution at each step (stage 1), or None.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    mask: torch.Tensor
    old_logprobs: torch.Tensor
    raw_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    old_values: torch.Tensor
    task_rewards: torch.Tensor
    scores: torch.Tensor
    eos: torch.Tensor
    action_masks: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    entropy: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return int(self.response_ids.shape[0])


def pad_steps(x: torch.Tensor, steps: int, value: float | bool | int) -> torch.Tensor:
    """Right-pad dimension 1 of a (B, T, …) tensor to ``steps`` with ``value``."""
    missing = steps - x.shape[1]
    if missing <= 0:
        return x
    filler = torch.full((x.shape[0], missing, *x.shape[2:]), value, dtype=x.dtype, device=x.device)
    return torch.cat([x, filler], dim=1)


def cat_parts(parts: Sequence[Experience], pad_token_id: int) -> Experience:
    """Concatenate chunks along rows; responses right-padded to the longest (prompts must share P).

    Padded steps get ``pad_token_id``, mask False, zeros — and True action masks (no restriction,
    so a padded step's logits stay finite and its masked-out log-prob has a finite gradient).
    """
    steps = max(p.response_ids.shape[1] for p in parts)
    fills = {"response_ids": pad_token_id, "mask": False, "action_masks": True}
    out = {}
    for f in dataclasses.fields(Experience):
        values = [getattr(p, f.name) for p in parts]
        if values[0] is None:
            out[f.name] = None
        elif values[0].dim() >= 2 and f.name not in ("prompt_ids", "prompt_mask"):
            out[f.name] = torch.cat([pad_steps(v, steps, fills.get(f.name, 0)) for v in values])
        else:
            out[f.name] = torch.cat(values)
    return Experience(**out)


def global_whiten(
    x: torch.Tensor, mask: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """:func:`trainers.rl_math.masked_whiten` (mean 0, unbiased std 1) with statistics over all processes.

    ``reduce`` sums a (3,) tensor over processes (None: one process — exactly ``masked_whiten``).
    """
    if reduce is None:
        return masked_whiten(x, mask)
    m = mask.bool()
    x64 = torch.where(m, x.double(), 0.0)
    totals = reduce(torch.stack([x64.sum(), x64.square().sum(), m.sum().double()]))
    s, sq, n = totals.unbind()
    mean = s / n.clamp(min=1)
    var = (sq - n * mean.square()) / (n - 1).clamp(min=1)
    return torch.where(m, ((x.double() - mean) * torch.rsqrt(var + 1e-8)).to(x.dtype), 0.0)


def shape_experience(
    exp: Experience,
    *,
    beta: float,
    estimator: str,
    gamma: float,
    lam: float,
    reward_clip: float | None,
    whiten: str,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Experience:
    """Fill ``rewards``, ``kl``, ``advantages`` and ``returns`` (§1.3, §1.5, §4.6).

    r_t = clip(R_t, ±reward_clip) − β·kl_t with kl from the *raw* log-probs; GAE(γ, λ) on the
    rollout values; advantages whitened over the whole batch (all processes) when ``whiten="batch"``
    (per-minibatch whitening happens in the update).
    """
    task = exp.task_rewards if reward_clip is None else exp.task_rewards.clamp(-reward_clip, reward_clip)
    rewards, kl = kl_shaped_rewards(task, exp.raw_logprobs, exp.ref_logprobs, exp.mask, beta, estimator)
    advantages, returns = gae(rewards, exp.old_values, exp.mask, gamma, lam)
    if whiten == "batch":
        advantages = global_whiten(advantages, exp.mask, reduce)
    return dataclasses.replace(exp, rewards=rewards, kl=kl, advantages=advantages, returns=returns)


def k1_sums(exp: Experience) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) per-row Σ_t k1 over the response (raw log-probs), and (B,) token counts: the controller's KL̄."""
    k1 = torch.where(exp.mask, kl_k1(exp.raw_logprobs, exp.ref_logprobs), 0.0)
    return k1.sum(-1), exp.mask.sum(-1)


def rollout_metrics(
    exp: Experience, beta: float, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> dict[str, float]:
    """The rollout's statistics, over all processes (``reduce`` sums a tensor over them; None: one).

    ``reward``/``reward_std`` of the sequence scores, ``kl`` = mean k1 per response token (what the
    controller reads), ``kl_seq`` = mean Σ_t k1 per sequence, ``beta`` used, ``shaped_return`` (mean
    Σ_t r_t per sequence), ``value_mean`` per token, ``response_tokens``, ``eos_fraction``.
    """
    k1_rows, lengths = k1_sums(exp)
    local = torch.stack([
        exp.scores.sum(), exp.scores.square().sum(), k1_rows.sum(), lengths.sum(), exp.eos.sum(),
        torch.where(exp.mask, exp.rewards, 0.0).sum(), torch.where(exp.mask, exp.old_values, 0.0).sum(),
        torch.tensor(float(exp.rows), device=exp.scores.device),
    ]).double()  # fmt: skip
    s, sq, k1, n_tok, eos, shaped, values, n = (local if reduce is None else reduce(local)).tolist()
    return {"reward": s / n, "reward_std": math.sqrt(max(sq / n - (s / n) ** 2, 0.0)), "kl": k1 / n_tok,
            "kl_seq": k1 / n, "beta": beta, "shaped_return": shaped / n, "value_mean": values / n_tok,
            "response_tokens": n_tok / n, "eos_fraction": eos / n}  # fmt: skip


def minibatch(exp: Experience, rows: torch.Tensor) -> Experience:
    """The rows ``rows`` of ``exp``, without the prompt columns that are padding in all of them and the
    response steps after the longest of them (scores of the kept positions do not change)."""
    prompt_mask = exp.prompt_mask[rows]
    first = int(prompt_mask.any(0).long().argmax())
    steps = int(exp.mask[rows].sum(-1).max())
    out = {}
    for f in dataclasses.fields(Experience):
        value = getattr(exp, f.name)
        if value is None:
            out[f.name] = None
            continue
        value = value[rows]
        if f.name in ("prompt_ids", "prompt_mask"):
            value = value[:, first:]
        elif value.dim() >= 2:
            value = value[:, :steps]
        out[f.name] = value
    return Experience(**out)
