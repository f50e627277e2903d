"""The pure maths of online RL for language models: tensors and floats in, tensors (and stats) out.

KL estimators and controllers, masked statistics and whitening, GAE and discounted returns,
sequence-level baselines, and the losses of PPO (clipped surrogate, clipped value loss, entropy
bonus), REINFORCE and minimum risk training (algorithms.md §1.4–§1.6, §3.4, §5.3–§5.5). The PPO,
NLPO and REINFORCE recipes are loops over these; nothing here takes a model, a config object or a
device, or logs. Losses return ``(loss, stats)`` with detached 0-dim ``stats`` (call ``float()``
when logging), like :mod:`trainers.losses`.

Conventions (style.md glossary): B rows, T response steps. ``mask`` (B, T) is True (or 1) on the
response tokens that count — the actions — and False on padding after a row ended. ``logprobs``,
``old_logprobs``, ``ref_logprobs``, ``values``, ``rewards``, ``advantages`` and ``returns`` are
(B, T); ``scores`` are (B,) per-sequence rewards. A group is ``group_size`` consecutive rows sampled
for one prompt (prompt-major: rows ``[p0s0, p0s1, …, p1s0, …]``). The maths runs in float32
(half-precision inputs are upcast; float64 stays float64, which the tests use).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

Reduction = Literal["token_mean", "sequence_mean"]
"""How a per-token loss becomes a scalar: the mean over every counted token of the batch
(``token_mean``), or the mean over rows of each row's token mean (``sequence_mean``)."""

# ----------------------------------------------------------------------------- KL estimators


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log π(a|s) − log π_ref(a|s): unbiased for KL(π‖π_ref) under a ~ π, can be negative. (…) → (…)."""
    return logprobs - ref_logprobs


def kl_k1_clamped(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """max(0, k1): the per-token penalty of the released ESRL/DeepSpeed-Chat RLHF code (§3.4). (…) → (…)."""
    return (logprobs - ref_logprobs).clamp(min=0)


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log π − log π_ref)²: biased, low variance, ≥ 0. (…) → (…)."""
    return 0.5 * (logprobs - ref_logprobs).square()


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = e^{−d} − 1 + d with d = log π − log π_ref: unbiased under a ~ π and ≥ 0 (e^x ≥ 1 + x). (…) → (…).

    ``expm1`` keeps it exact near d = 0 (no cancellation of 1 − 1).
    """
    d = logprobs - ref_logprobs
    return torch.expm1(-d) + d


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k1_clamped": kl_k1_clamped,
    "k2": kl_k2,
    "k3": kl_k3,
}
"""Estimator name (as a recipe config names it) → per-token function ``(logprobs, ref_logprobs) → kl``."""


def kl_shaped_rewards(
    task_rewards: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards with the KL penalty: r_t = R_t − β·kl_t on counted tokens, 0 elsewhere (§1.3).

    In NLPO, ``logprobs`` are the *raw* (unmasked) policy log-probs (§1.3, §1.7).

    Args:
        task_rewards: (B, T) per-token task rewards (e.g. :class:`trainers.rewards.TokenRewards`
            placed on the response tokens; a sequence reward sits at the last token).
        logprobs: (B, T) log π(a_t|s_t) of the policy that sampled (detached here).
        ref_logprobs: (B, T) log π_ref(a_t|s_t).
        mask: (B, T) True on counted tokens.
        beta: KL coefficient β ≥ 0.
        estimator: a key of :data:`KL_ESTIMATORS`.

    Returns:
        rewards: (B, T) shaped rewards, 0 where ``mask`` is False.
        kl: (B, T) per-token KL estimate, 0 where ``mask`` is False.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {sorted(KL_ESTIMATORS)}")
    _same_shape(task_rewards=task_rewards, logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    m = mask.bool()
    kl = KL_ESTIMATORS[estimator](_real(logprobs.detach()), _real(ref_logprobs.detach()))
    kl = torch.where(m, kl, 0.0)
    rewards = torch.where(m, _real(task_rewards.detach()) - beta * kl, 0.0)
    return rewards, kl


# ----------------------------------------------------------------------------- KL controllers


@dataclass
class FixedKLController:
    """A constant KL coefficient (RL4LMs with ``target_kl=None``; ESRL's RLHF code with β = 0.1)."""

    beta: float
    """The KL coefficient β ≥ 0."""

    def update(self, kl: float, n_steps: int = 1) -> float:
        """Ignore the observed KL; return β."""
        return self.beta


@dataclass
class AdaptiveKLController:
    """Adaptive KL coefficient with a target KL (RL4LMs rule; Ziegler et al. 2019 rule with a horizon).

    With e = clip((KL̄ − target) / target, −clip, +clip) after each rollout phase:

    * ``horizon=None`` (RL4LMs, algorithms.md §1.4): β ← β·(1 + gain·e), so at most ±2 % per update
      with the defaults;
    * ``horizon=H`` (Ziegler's controller): β ← β·(1 + e·n_steps/H), where ``n_steps`` is the number
      of samples (or steps) since the last update.

    KL̄ = target leaves β unchanged; KL̄ > target raises it. The fields are the whole state
    (``dataclasses.asdict`` to checkpoint it, ``AdaptiveKLController(**state)`` to restore).
    """

    beta: float
    """Current KL coefficient β > 0 (starts at RL4LMs' ``kl_div.coeff``)."""
    target: float
    """Target KL per token (RL4LMs ``kl_div.target_kl``), > 0."""
    horizon: int | None = None
    """None: the RL4LMs rule; an int: Ziegler's horizon (e.g. 10 000)."""
    gain: float = 0.1
    """RL4LMs' step size on the clipped proportional error (ignored with a horizon)."""
    clip: float = 0.2
    """Bound on the proportional error |e|."""

    def __post_init__(self) -> None:
        if not self.beta > 0 or not self.target > 0:
            raise ValueError(f"beta and target must be > 0, got {self.beta} and {self.target}")
        if self.horizon is not None and self.horizon <= 0:
            raise ValueError(f"horizon must be a positive int or None, got {self.horizon}")

    def update(self, kl: float, n_steps: int = 1) -> float:
        """Adapt β to the mean per-token KL ``kl`` of the last rollout phase; return the new β."""
        if not math.isfinite(kl):
            raise ValueError(f"observed KL must be finite, got {kl}")
        error = min(max((kl - self.target) / self.target, -self.clip), self.clip)
        step = self.gain if self.horizon is None else n_steps / self.horizon
        self.beta *= 1.0 + step * error
        return self.beta


# ----------------------------------------------------------------------------- masked statistics


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ x over the positions where ``mask`` is True: (…), (…) → 0-dim (``dim=None``) or reduced along ``dim``."""
    total = torch.where(mask.bool(), x, 0.0)
    return total.sum() if dim is None else total.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the counted positions; 0 where nothing counts. Shapes as :func:`masked_sum`."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over all counted positions: (…), (…) → 0-dim.

    ``unbiased`` applies Bessel's correction n/(n − 1) (as torchtune and TRL do). With n ≤ 1 counted
    positions the variance is 0 (not NaN).
    """
    m = mask.bool()
    n = m.sum()
    mean = masked_mean(x, m)
    var = masked_mean((x - mean).square(), m)
    if unbiased:
        var = torch.where(n > 1, var * n / (n - 1).clamp(min=1), torch.zeros_like(var))
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x − μ)/√(σ² + ε) with μ, σ² over the counted positions; 0 where ``mask`` is False. (…) → (…).

    ``shift_mean=True`` (advantages): the counted values get mean 0 and (unbiased) std 1.
    ``shift_mean=False`` (rewards, TRL's convention): the spread is scaled to std 1 but the mean μ
    is added back, so the counted values keep their mean. The statistics are over the whole tensor
    (per minibatch as in RL4LMs, or per buffer as in OpenRLHF: the caller chooses what to pass).
    """
    m = mask.bool()
    mean = masked_mean(x, m)
    whitened = (x - mean) * torch.rsqrt(masked_var(x, m) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, 0.0)


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, reduction: Reduction = "token_mean"
) -> torch.Tensor:
    """A per-token loss (B, T) → 0-dim by ``reduction`` (see :data:`Reduction`); rows with no token are skipped.

    Returns 0 (connected to the graph) when nothing counts.
    """
    m = mask.bool()
    if reduction == "token_mean":
        return masked_mean(per_token, m)
    if reduction == "sequence_mean":
        rows = m.any(-1)
        return masked_mean(masked_mean(per_token, m, dim=-1), rows)
    raise ValueError(f"unknown reduction {reduction!r}")


# ----------------------------------------------------------------------------- returns and GAE


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Monte-Carlo returns G_t = Σ_{k ≥ t} γ^(k−t) r_k over each row's counted steps.

    Uncounted steps are skipped (they neither add reward nor count as a discount step) and get
    G = 0; after a row's last counted step the episode has ended (bootstrap 0).

    Args:
        rewards: (B, T) per-token rewards.
        mask: (B, T) True on counted steps.
        gamma: discount γ in [0, 1].

    Returns:
        (B, T) returns, detached.
    """
    _same_shape(rewards=rewards, mask=mask)
    r, m = _real(rewards.detach()), mask.bool()
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        running = torch.where(m[:, t], r[:, t] + gamma * running, running)
        out[:, t] = torch.where(m[:, t], running, 0.0)
    return out


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each row as one episode (§1.5).

    With t' the next counted step after t in the same row (none after the last: V = 0, terminal)::

        δ_t = r_t + γ V(s_t') − V(s_t)
        A_t = δ_t + γλ A_t'
        R_t = A_t + V(s_t)

    Uncounted steps are skipped and get A = R = 0; nothing crosses from one row into another
    (each row is one episode, so there are no ``episode_start`` flags). λ = 1 gives A = G − V
    (:func:`discounted_returns`); λ = 0 gives A = δ.

    Args:
        rewards: (B, T) per-token rewards (KL-shaped; see :func:`kl_shaped_rewards`).
        values: (B, T) critic values V(s_t) at each step (detached here).
        mask: (B, T) True on counted steps.
        gamma: discount γ in [0, 1].
        lam: GAE λ in [0, 1].

    Returns:
        advantages: (B, T), 0 on uncounted steps.
        returns: (B, T) value targets, 0 on uncounted steps.
    """
    _same_shape(rewards=rewards, values=values, mask=mask)
    r, v, m = _real(rewards.detach()), _real(values.detach()), mask.bool()
    advantages = torch.zeros_like(r)
    next_value = torch.zeros_like(r[:, 0])
    next_advantage = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        a = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(m[:, t], a, 0.0)
        next_value = torch.where(m[:, t], v[:, t], next_value)
        next_advantage = torch.where(m[:, t], a, next_advantage)
    returns = torch.where(m, advantages + v, 0.0)
    return advantages, returns


# ----------------------------------------------------------------------------- baselines (per sequence)


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if scores.dim() != 1:
        raise ValueError(f"scores must be (B,), got {tuple(scores.shape)}")
    if group_size < 1 or scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} scores do not split into groups of {group_size}")
    return _real(scores.detach()).view(-1, group_size)


def group_mean_baseline(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """b_i = mean of the scores of row i's group (itself included). (B,) → (B,).

    With ``group_size=1`` the baseline is the score itself and every advantage is 0 (the known
    dr_grpo n = 1 trap): prefer :class:`RunningBaseline` there.
    """
    g = _groups(scores, group_size)
    return g.mean(-1, keepdim=True).expand_as(g).reshape(-1)


def leave_one_out_baseline(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """b_i = mean of the *other* scores of row i's group (RLOO; Kool et al. 2019). (B,) → (B,).

    Unbiased (b_i does not depend on sample i). Needs ``group_size ≥ 2``.
    """
    if group_size < 2:
        raise ValueError("a leave-one-out baseline needs group_size >= 2")
    g = _groups(scores, group_size)
    return ((g.sum(-1, keepdim=True) - g) / (group_size - 1)).reshape(-1)


def group_std(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """The (unbiased) std of each row's group, for GRPO-style scaling of advantages. (B,) → (B,).

    0 for a group of identical scores or ``group_size=1`` — divide by ``std + eps``.
    """
    g = _groups(scores, group_size)
    std = g.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(g)
    return std.expand_as(g).reshape(-1)


@dataclass
class RunningBaseline:
    """An exponential moving average of past scores: b ← (1 − α)·b + α·mean(scores).

    :meth:`update` returns the baseline to use for the batch it is given — the average of the
    *earlier* batches (the batch's first scores initialise it), so a sample never baselines itself.
    The fields are the whole state (checkpoint with ``dataclasses.asdict``).
    """

    alpha: float = 0.1
    """EMA rate α in (0, 1]."""
    value: float | None = None
    """Current average; None before the first batch."""

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")

    def update(self, scores: torch.Tensor) -> torch.Tensor:
        """(B,) scores → (B,) baseline (the average before this batch), then fold the batch in."""
        s = _real(scores.detach())
        if s.dim() != 1 or s.numel() == 0:
            raise ValueError(f"scores must be a non-empty (B,), got {tuple(s.shape)}")
        batch_mean = float(s.mean())
        before = batch_mean if self.value is None else self.value
        self.value = (
            batch_mean if self.value is None else (1 - self.alpha) * self.value + self.alpha * batch_mean
        )
        return torch.full_like(s, before)


# ----------------------------------------------------------------------------- PPO losses


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    reduction: Reduction = "token_mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017; §1.6), per token::

        ρ = exp(log π_new − log π_old)
        L = −mean(min(ρ·Â, clip(ρ, 1 − ε, 1 + ε)·Â))

    At ρ ≡ 1 the loss is −mean(Â). A token with Â > 0 and ρ > 1 + ε (or Â < 0 and ρ < 1 − ε) has
    zero gradient. For NLPO both log-probs are the masked ones (§1.7).

    Args:
        logprobs: (B, T) log π_new(a_t|s_t), with gradient.
        old_logprobs: (B, T) log π_old of the distribution that actually sampled (detached here).
        advantages: (B, T) Â (detached here).
        mask: (B, T) True on counted tokens.
        clip_eps: ε > 0.
        reduction: see :data:`Reduction`.

    Returns:
        loss: 0-dim.
        stats: ``clip_fraction`` (share of counted tokens where the clipped term was taken and
        differs, i.e. whose gradient is zeroed), ``approx_kl`` (mean of (ρ − 1) − log ρ, ≥ 0),
        ``ratio_mean``, ``ratio_max`` — over counted tokens.
    """
    _same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    if not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    m = mask.bool()
    adv = _real(advantages.detach())
    log_ratio = torch.where(m, _real(logprobs) - _real(old_logprobs.detach()), 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    loss = aggregate(-torch.minimum(unclipped, clipped), m, reduction)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean((clipped < unclipped).float(), m),
            "approx_kl": masked_mean((ratio - 1) - log_ratio, m),
            "ratio_mean": masked_mean(ratio, m),
            "ratio_max": torch.where(m, ratio, 0.0).max() if m.any() else ratio.new_zeros(()),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None = None,
    reduction: Reduction = "token_mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Squared-error value loss, optionally clipped around the rollout values (§1.6, §3.4)::

        unclipped:  (V − R)²
        clipped:    max((V − R)², (V_old + clip(V − V_old, −ε, ε) − R)²)

    No ½ factor (RL4LMs/stable-baselines3 MSE with ``vf_coef`` 0.5; TRL's loss is ½ of this).

    Args:
        values: (B, T) V(s_t) of the current critic, with gradient.
        old_values: (B, T) values stored at rollout time (detached here).
        returns: (B, T) targets R_t (detached here).
        mask: (B, T) True on counted tokens.
        clip_eps: ε for value clipping; None = off (RL4LMs' default).
        reduction: see :data:`Reduction`.

    Returns:
        loss: 0-dim.
        stats: ``clip_fraction`` (share of counted tokens where the clipped error was larger),
        ``mse`` (the unclipped mean squared error).
    """
    _same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    m = mask.bool()
    v, ret = _real(values), _real(returns.detach())
    error = (v - ret).square()
    per_token = error
    clip_fraction = torch.zeros((), device=v.device)
    if clip_eps is not None:
        old = _real(old_values.detach())
        clipped = (old + (v - old).clamp(-clip_eps, clip_eps) - ret).square()
        per_token = torch.maximum(error, clipped)
        clip_fraction = masked_mean((clipped > error).float(), m).detach()
    loss = aggregate(per_token, m, reduction)
    return loss, {"clip_fraction": clip_fraction, "mse": masked_mean(error, m).detach()}


def entropy_bonus(
    entropy: torch.Tensor, mask: torch.Tensor, reduction: Reduction = "token_mean"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_ent = −mean(H(π(·|s_t))): add ``ent_coef · L_ent`` to the loss to reward entropy (§1.6).

    Args:
        entropy: (B, T) per-step entropies of the (possibly masked, for NLPO) policy, with gradient.
        mask: (B, T) True on counted tokens.
        reduction: see :data:`Reduction`.

    Returns:
        loss: 0-dim; stats: ``entropy`` (the mean entropy).
    """
    _same_shape(entropy=entropy, mask=mask)
    mean = aggregate(_real(entropy), mask, reduction)
    return -mean, {"entropy": mean.detach()}


# ----------------------------------------------------------------------------- sequence-level losses


def reinforce_loss(
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    reduction: Literal["sequence", "token_mean"] = "sequence",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """REINFORCE with a baseline (Williams 1992; §3.4): L = −(1/B) Σ_i (r_i − b_i)·log p_θ(ŷ_i|x_i).

    log p_θ(ŷ_i|x_i) = Σ_t m_it log π(ŷ_it|…). ``reduction="token_mean"`` divides by the number of
    counted tokens of the batch instead of B (a length-normalised variant). If every advantage is 0
    (all K rewards of a group equal under a group baseline) the gradient is 0.

    Args:
        logprobs: (B, T) per-token log-probs from the teacher-forced pass, with gradient.
        mask: (B, T) True on response tokens.
        advantages: (B,) r_i − b_i per sequence, or (B, T) per token (detached here).
        reduction: ``"sequence"`` or ``"token_mean"``.

    Returns:
        loss: 0-dim; stats: ``advantage_mean``, ``logp_mean`` (mean sequence log-prob).
    """
    _same_shape(logprobs=logprobs, mask=mask)
    adv = _real(advantages.detach())
    if adv.shape not in (logprobs.shape[:1], logprobs.shape):
        raise ValueError(f"advantages must be (B,) or (B, T), got {tuple(adv.shape)}")
    m = mask.bool()
    weights = adv[:, None] if adv.dim() == 1 else adv
    weighted = masked_sum(-weights * _real(logprobs), m)
    if reduction == "sequence":
        loss = weighted / max(logprobs.shape[0], 1)
    elif reduction == "token_mean":
        loss = weighted / m.sum().clamp(min=1)
    else:
        raise ValueError(f"unknown reduction {reduction!r}")
    stats = {
        "advantage_mean": adv.mean(),
        "logp_mean": masked_sum(_real(logprobs.detach()), m, dim=-1).mean(),
    }
    return loss, stats


def duplicate_mask(response_ids: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """True for the first occurrence of each distinct response within its group, False for repeats. (B, T), (B, T) → (B,).

    Responses compare by their counted tokens only (padding ignored), for MRT's "duplicates removed".
    """
    _same_shape(response_ids=response_ids, mask=mask)
    rows = [tuple(ids[m].tolist()) for ids, m in zip(response_ids.cpu(), mask.bool().cpu(), strict=True)]
    if group_size < 1 or len(rows) % group_size:
        raise ValueError(f"{len(rows)} responses do not split into groups of {group_size}")
    keep = []
    for start in range(0, len(rows), group_size):
        seen: set[tuple[int, ...]] = set()
        for row in rows[start : start + group_size]:
            keep.append(row not in seen)
            seen.add(row)
    return torch.tensor(keep, dtype=torch.bool, device=response_ids.device)


def mrt_loss(
    sequence_logprobs: torch.Tensor,
    scores: torch.Tensor,
    group_size: int,
    alpha: float = 5e-3,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Minimum risk training (Shen et al. 2016; §3.4): expected cost under the renormalised sample set.

    Within each group S(x) of sampled responses::

        Q(ŷ_k|x) = p_θ(ŷ_k|x)^α / Σ_{j∈S} p_θ(ŷ_j|x)^α = softmax_k(α · log p_θ(ŷ_k|x))
        L = mean over groups of Σ_k Q_k · (−r_k)

    Σ_k Q_k = 1 per group; α = 0 gives uniform Q. The gradient flows through Q.

    Args:
        sequence_logprobs: (B,) log p_θ(ŷ|x) summed over response tokens, with gradient.
        scores: (B,) rewards r (cost = −r; detached here).
        group_size: K samples per prompt (consecutive rows).
        alpha: sharpness α ≥ 0.
        keep: (B,) bool, the rows in S(x) (e.g. :func:`duplicate_mask`); None keeps all.

    Returns:
        loss: 0-dim; stats: ``risk`` (the loss), ``q_max`` (mean over groups of max_k Q_k).
    """
    if sequence_logprobs.shape != scores.shape or sequence_logprobs.dim() != 1:
        raise ValueError(
            f"expected (B,) log-probs and scores, got {tuple(sequence_logprobs.shape)} and {tuple(scores.shape)}"
        )
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    r = _groups(scores, group_size)
    kept = torch.ones_like(r, dtype=torch.bool) if keep is None else keep.bool().view_as(r)
    if not bool(kept.any(-1).all()):
        raise ValueError("every group must keep at least one response")
    logits = (alpha * _real(sequence_logprobs).view_as(r)).masked_fill(~kept, float("-inf"))
    q = torch.softmax(logits, dim=-1)
    loss = (q * -r).sum(-1).mean()
    return loss, {"risk": loss.detach(), "q_max": q.detach().max(-1).values.mean()}


def _real(x: torch.Tensor) -> torch.Tensor:
    """x as float64 when it is float64, else float32 (half precision is upcast for the maths)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _same_shape(**tensors: Any) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shapes must match: {shapes}")
