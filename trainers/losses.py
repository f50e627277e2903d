"""Preference and likelihood losses: tensors in, ``(loss, stats)`` out.

Bradley–Terry (reward models), DPO (policies, from summed response log-probs), weighted SFT (filtered
MLE, RWR, Decision Transformer: algorithms.md §2.3), and the log-prob helpers they are fed by.
No models, configs, devices or logging here. ``stats`` values are detached 0-dim tensors (call
``float()`` when logging) so that a training step does not force a device sync.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def preference_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs ranked correctly: mean of 1[r⁺ > r⁻] (a tie counts as wrong).

    Args:
        chosen: (B,) scores of the preferred responses.
        rejected: (B,) scores of the other responses.

    Returns:
        0-dim float tensor in [0, 1], detached. NaN for an empty batch.
    """
    _check_pair(chosen, rejected)
    return (chosen.detach() > rejected.detach()).float().mean()


def bradley_terry_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley–Terry reward-model loss, mean over the batch of −log σ(r⁺ − r⁻ − m).

    Computed with ``logsigmoid`` so that large gaps neither overflow nor lose the gradient. With
    r⁺ = r⁻ and no margin the loss is ln 2. Swapping chosen and rejected turns the gap d into −d
    and the loss into mean softplus(d) (the same function of −d).

    Args:
        chosen: (B,) scores S(y_w) of the preferred responses (sequence or segment-aggregated).
        rejected: (B,) scores S(y_l) of the dispreferred responses.
        margin: (B,) optional non-negative margin m the chosen score must beat the rejected one
            by (for example from the vote strength); ``None`` means 0.

    Returns:
        loss: 0-dim tensor with gradient.
        stats: detached 0-dim tensors — ``accuracy`` (mean 1[r⁺ > r⁻], margin ignored),
        ``reward_gap`` (mean r⁺ − r⁻), ``chosen`` and ``rejected`` (mean scores).
    """
    _check_pair(chosen, rejected)
    gap = chosen - rejected
    logits = gap if margin is None else gap - margin
    loss = -F.logsigmoid(logits).mean()
    stats = {
        "accuracy": preference_accuracy(chosen, rejected),
        "reward_gap": gap.detach().mean(),
        "chosen": chosen.detach().mean(),
        "rejected": rejected.detach().mean(),
    }
    return loss, stats


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO loss (Rafailov et al. 2023, eq. 7), mean over the batch.

    With implicit rewards r⁺ = β(log π(y⁺|x) − log π_ref(y⁺|x)) and r⁻ likewise, and d = r⁺ − r⁻::

        loss = −(1 − ε) log σ(d) − ε log σ(−d)

    ε = ``label_smoothing`` is the conservative-DPO assumption that a fraction ε of the labels are
    flipped (ε = 0: plain DPO, TRL's ``loss_type="sigmoid"``; TRL 1.16 ignores ε there and applies it
    in its ``robust``/``aot`` variants only). At d = 0 the loss is ln 2 for every ε; the policy equals
    the reference at the start, so the first step's loss is ln 2.

    Args:
        policy_chosen_logps: (B,) log π(y⁺|x) summed over the chosen response tokens (with gradient).
        policy_rejected_logps: (B,) log π(y⁻|x), same.
        ref_chosen_logps: (B,) log π_ref(y⁺|x) of the frozen reference (no gradient is taken).
        ref_rejected_logps: (B,) log π_ref(y⁻|x).
        beta: β > 0, the KL-penalty strength; larger keeps the policy closer to the reference.
        label_smoothing: ε in [0, 0.5).

    Returns:
        loss: 0-dim tensor.
        stats: detached 0-dim tensors — ``rewards/chosen`` (mean r⁺), ``rewards/rejected`` (mean r⁻),
        ``rewards/margin`` (mean r⁺ − r⁻), ``rewards/accuracy`` (mean 1[r⁺ > r⁻], ties wrong),
        ``logps/chosen`` and ``logps/rejected`` (mean policy log-probs).
    """
    for tensor in (policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
        _check_pair(policy_chosen_logps, tensor)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen = beta * (policy_chosen_logps - ref_chosen_logps.detach())
    rejected = beta * (policy_rejected_logps - ref_rejected_logps.detach())
    d = chosen - rejected
    losses = -F.logsigmoid(d)
    if label_smoothing:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-d)
    stats = {
        "rewards/chosen": chosen.detach().mean(),
        "rewards/rejected": rejected.detach().mean(),
        "rewards/margin": d.detach().mean(),
        "rewards/accuracy": preference_accuracy(chosen, rejected),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
    }
    return losses.mean(), stats


# ----------------------------------------------------------------------------- log-probs and SFT


def token_logps(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """log softmax(logits)[label] per position, in float32, ``chunk_size`` rows at a time.

    Only one chunk of float32 logits exists at a time in the forward pass (the softmax of a bf16
    model is still taken in float32). The caller aligns the two: ``labels[..., t]`` is the token
    predicted by ``logits[..., t, :]`` (for a causal LM, ``logits[:, :-1]`` with ``ids[:, 1:]``).

    Args:
        logits: (..., V) e.g. (B, T, V) or (N, V).
        labels: (...) long, the same leading shape; every value a valid index (mask them afterwards).
        chunk_size: rows (positions) per chunk.

    Returns:
        (...) float32 log-probabilities, with gradient through ``logits``.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not align")
    flat, targets = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    parts = []
    for begin in range(0, flat.shape[0], chunk_size):
        rows = flat[begin : begin + chunk_size].float()
        picked = rows.gather(-1, targets[begin : begin + chunk_size, None]).squeeze(-1)
        parts.append(picked - rows.logsumexp(-1))
    out = torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.float32)
    return out.reshape(labels.shape)


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of per-token log-probs over the positions that count: (B, T), (B, T) → (B,), float32 or wider.

    ``mask`` is True (or 1) on the response tokens of each row, False on prompt and padding; a row
    with no True position gets 0.
    """
    if token_logps.shape != mask.shape or token_logps.dim() != 2:
        raise ValueError(
            f"expected (B, T) log-probs and mask, got {tuple(token_logps.shape)} and {tuple(mask.shape)}"
        )
    dtype = torch.promote_types(token_logps.dtype, torch.float32)
    return (token_logps.to(dtype) * mask.to(dtype)).sum(-1)


def weighted_sft_loss(
    token_logps: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor | None = None,
    reduction: Literal["token_mean", "sequence_sum"] = "token_mean",
    normalizer: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted negative log-likelihood of response tokens (filtered MLE, RWR, DT; algorithms.md §2.3).

    With w_i the weight of sequence i, n_i = Σ_t m_it its response tokens and s_i = Σ_t m_it log π_it::

        token_mean:    L = −Σ_i w_i s_i / Σ_i w_i n_i     (all w = 1: the usual SFT mean over tokens)
        sequence_sum:  L = −Σ_i w_i s_i / Σ_i w_i         (all w = 1: the mean over sequences of s_i)

    Both are invariant to scaling every weight by one constant, so RWR with β → ∞ (equal weights)
    is plain SFT. Under gradient accumulation, pass the whole window's denominator as
    ``normalizer`` (and sum the micro-batch losses) so the result is the big batch's loss, not a
    mean of per-micro-batch means.

    Args:
        token_logps: (B, T) log π(y_t | x, y_<t) at each target position.
        mask: (B, T) bool/0-1, True on response tokens (prompt, conditioning and padding excluded).
        weights: (B,) non-negative sequence weights; ``None`` means all 1.
        reduction: ``"token_mean"`` or ``"sequence_sum"``.
        normalizer: overrides the denominator (Σ w n or Σ w); ``None`` uses this batch's.

    Returns:
        loss: 0-dim tensor (0 when the denominator is 0).
        stats: detached — ``nll`` (the loss), ``tokens`` (Σ n_i), ``weight_mean`` (mean w_i).
    """
    if token_logps.dim() != 2 or token_logps.shape != mask.shape:
        raise ValueError(
            f"expected (B, T) log-probs and mask, got {tuple(token_logps.shape)} and {tuple(mask.shape)}"
        )
    if weights is None:
        weights = torch.ones(token_logps.shape[0], device=token_logps.device)
    if weights.shape != token_logps.shape[:1]:
        raise ValueError(f"weights must be (B,) = {tuple(token_logps.shape[:1])}, got {tuple(weights.shape)}")
    if bool((weights.detach() < 0).any()):
        raise ValueError("weights must be non-negative")
    dtype = torch.promote_types(token_logps.dtype, torch.float32)
    weights = weights.detach().to(dtype)
    m = mask.to(dtype)
    sums = (token_logps.to(dtype) * m).sum(-1)
    tokens = m.sum(-1)
    if reduction == "token_mean":
        denominator = (weights * tokens).sum()
    elif reduction == "sequence_sum":
        denominator = weights.sum()
    else:
        raise ValueError(f"unknown reduction {reduction!r}")
    if normalizer is not None:
        denominator = torch.as_tensor(normalizer, dtype=dtype, device=sums.device)
    loss = -(weights * sums).sum() / denominator.clamp(min=torch.finfo(dtype).tiny)
    stats = {"nll": loss.detach(), "tokens": tokens.sum().detach(), "weight_mean": weights.mean()}
    return loss, stats


def _check_pair(chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    if chosen.dim() != 1 or chosen.shape != rejected.shape:
        raise ValueError(
            f"chosen and rejected must both be (B,), got {tuple(chosen.shape)} and {tuple(rejected.shape)}"
        )
