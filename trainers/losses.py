"""Pairwise preference losses: tensors in, ``(loss, stats)`` out.

No models, configs, devices or logging here. ``stats`` values are detached 0-dim tensors (call
``float()`` when logging) so that a training step does not force a device sync.
"""

from __future__ import annotations

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


def _check_pair(chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    if chosen.dim() != 1 or chosen.shape != rejected.shape:
        raise ValueError(
            f"chosen and rejected must both be (B,), got {tuple(chosen.shape)} and {tuple(rejected.shape)}"
        )
