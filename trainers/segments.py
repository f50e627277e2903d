"""Entropy-based dynamic segmentation, segment aggregation and densification (algorithms.md §4.2–4.5).

Pure tensor functions; no models, configs, devices or logging. Layout conventions:

* Every tensor is (B, T) over the *input* positions of the concatenated prompt + response, left- or
  right-padded — nothing here assumes a layout. ``response_mask`` (B, T) is True on response tokens
  (the generated ones, EOS included). Each row's response positions must be contiguous.
* ``entropy[b, j]`` is H_j, the entropy of the next-token distribution computed *at* position j, i.e.
  the distribution that predicts token j + 1 (exactly what ``logits[:, j]`` of a causal LM gives).
* Peak rule: response position j ends a segment iff H_j > τ; the uncertain token j + 1 then starts
  the next segment. s is the first response position, e the last (the EOS).
* Dense modes (τ < ``BANDIT``): the last segment ends at the last content token c = e − 1, so EOS is
  never a segment end and gets reward 0. The paper's end-of-response fix-ups (no boundary → end at
  e − 1; a boundary at e is dropped if e − 1 is a boundary, else moved to e − 1; a last boundary
  < e − 1 gets e − 1 appended) reduce to the closed form

      ends = {j ∈ [s, c − 1] : H_j > τ} ∪ {c}.

* Bandit mode (τ ≥ ``BANDIT``, the paper's sentinel 1000, +inf included): one segment ending at e.
* Documented edge cases (choices of ours; the paper never meets them):
  - a response that is only EOS (length 1) has no content token: it gets one segment ending at e
    in every mode, so its score is v(EOS) instead of undefined;
  - a response whose last token is *not* EOS (``ends_with_eos`` False: truncated generation) has
    c = e: its last segment ends at its last token;
  - an empty row (no response token, e.g. padding) has no segment: score 0, dense rewards 0.

Segments are contiguous, cover s..(last end), have length ≥ 1, and depend only on (entropy,
response_mask, τ) — the same response gives the same segments in RM training, fitting and PPO.
"""

from __future__ import annotations

from typing import Literal

import torch

BANDIT = 1000.0
"""Threshold sentinel of the paper: τ ≥ BANDIT means one segment per response, ending at EOS."""

DensifyMode = Literal["even", "last", "same", "mean"]
DENSIFY_MODES: tuple[str, ...] = ("even", "last", "same", "mean")


# --------------------------------------------------------------------------------------------- entropy


@torch.no_grad()
def next_token_entropy(
    logits: torch.Tensor, mask: torch.Tensor | None = None, *, rows_per_chunk: int = 1
) -> torch.Tensor:
    """Entropy in nats of each position's next-token distribution, H_j = −Σ_a p(a) ln p(a).

    Computed in float32 from ``log_softmax`` (masked-out vocabulary entries with logit −inf count 0).
    No gradient. Rows are processed ``rows_per_chunk`` at a time to bound the (B, T, V) float32
    temporaries.

    Args:
        logits: (B, T, V) logits of a causal LM; ``logits[:, j]`` predicts token j + 1.
        mask: (B, T) optional, True where the entropy counts; other positions get 0.

    Returns:
        (B, T) float32 entropies, ≥ 0, on the logits' device.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V), got {tuple(logits.shape)}")
    out = torch.empty(logits.shape[:2], dtype=torch.float32, device=logits.device)
    step = max(1, int(rows_per_chunk))
    for i in range(0, logits.shape[0], step):
        logp = torch.log_softmax(logits[i : i + step].float(), dim=-1)
        p = logp.exp()
        out[i : i + step] = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    out.clamp_(min=0.0)
    if mask is not None:
        out = out.masked_fill(~mask.bool(), 0.0)
    return out


# ------------------------------------------------------------------------------------------ segmentation


def is_bandit(threshold: float) -> bool:
    """True when ``threshold`` selects bandit mode (τ ≥ ``BANDIT``, +inf included)."""
    return float(threshold) >= BANDIT


def response_bounds(response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First and last response position of each row.

    Args:
        response_mask: (B, T) True on response tokens; each row's True positions contiguous.

    Returns:
        start: (B,) long, s (0 for an empty row).
        last: (B,) long, e (−1 for an empty row).
        nonempty: (B,) bool.

    Raises:
        ValueError: a row's response positions are not contiguous.
    """
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be (B, T), got {tuple(response_mask.shape)}")
    m = response_mask.bool()
    T = m.shape[1]
    pos = torch.arange(T, device=m.device).expand_as(m)
    nonempty = m.any(-1)
    start = torch.where(m, pos, T).amin(-1).masked_fill(~nonempty, 0)
    last = torch.where(m, pos, -1).amax(-1)
    if bool(((last - start + 1).clamp(min=0) != m.sum(-1)).any()):
        raise ValueError("each row's response_mask must be one contiguous run of True")
    return start, last, nonempty


def segment_ends(
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    threshold: float,
    ends_with_eos: bool | torch.Tensor = True,
) -> torch.Tensor:
    """Segment-end mask by the peak rule with the paper's end-of-response fix-ups (module docstring).

    Args:
        entropy: (B, T) H_j of the frozen reference LM at each input position (predicts token j+1).
            Only positions s..c−1 are read.
        response_mask: (B, T) True on response tokens (EOS included), contiguous per row.
        threshold: τ_H in nats. ≥ ``BANDIT`` → bandit (one segment ending at e); 0 → token level
            for positive entropies (every content token its own segment); −1 → token level always.
        ends_with_eos: bool or (B,) bool — whether each response's last token is EOS (the
            paper forces it; False for truncated generations, whose last token is content).

    Returns:
        (B, T) bool, True at the last token e_k of every segment k.
    """
    if entropy.shape != response_mask.shape:
        raise ValueError(
            f"entropy {tuple(entropy.shape)} and response_mask {tuple(response_mask.shape)} differ"
        )
    start, last, nonempty = response_bounds(response_mask)
    T = entropy.shape[1]
    pos = torch.arange(T, device=entropy.device).expand_as(entropy)
    if is_bandit(threshold):
        return (pos == last[:, None]) & nonempty[:, None]
    content = _last_content(start, last, ends_with_eos)  # (B,) c
    in_scan = (pos >= start[:, None]) & (pos < content[:, None])
    # Compare in float64: a Python float threshold would otherwise be rounded to the tensor's dtype,
    # so an entropy equal to float32(τ) could count as a peak for a τ just below it, or vice versa.
    peaks = in_scan & (entropy.double() > float(threshold))
    return (peaks | (pos == content[:, None])) & nonempty[:, None]


def segment_ids(ends: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Index of the segment each position belongs to.

    Args:
        ends: (B, T) bool from :func:`segment_ends`.
        response_mask: (B, T) the same response mask.

    Returns:
        (B, T) long: k ∈ [0, K) on positions s..e_K (segment k spans (e_{k−1}, e_k]), −1 elsewhere
        (prompt, padding, and EOS in dense modes).
    """
    ends = ends.bool()
    before = ends.long().cumsum(-1) - ends.long()  # ends strictly before t
    K = ends.sum(-1, keepdim=True)
    inside = response_mask.bool() & (before < K)
    return torch.where(inside, before, -1)


def num_segments(ends: torch.Tensor) -> torch.Tensor:
    """K per row. ends: (B, T) bool → (B,) long."""
    return ends.bool().sum(-1)


def segment_lengths(ids: torch.Tensor) -> torch.Tensor:
    """L_k per segment, packed. ids: (B, T) from :func:`segment_ids` → (B, K_max) long, 0 past K."""
    k_max = int(ids.max().item()) + 1 if ids.numel() else 0
    out = torch.zeros(ids.shape[0], k_max, dtype=torch.long, device=ids.device)
    if k_max > 0:
        out.scatter_add_(1, ids.clamp(min=0), (ids >= 0).long())
    return out


def segment_rewards(values: torch.Tensor, ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the segment rewards r_k = v(e_k), packed in order.

    Args:
        values: (B, T) per-position outputs of the reward head (gradient flows).
        ends: (B, T) bool segment ends.

    Returns:
        rewards: (B, K_max) r_k for k < K, 0 past K.
        valid: (B, K_max) bool, True for k < K.
    """
    ends = ends.bool()
    K = num_segments(ends)
    k_max = int(K.max().item()) if K.numel() else 0
    valid = torch.arange(k_max, device=values.device)[None, :] < K[:, None]
    out = values.new_zeros(values.shape[0], k_max)
    if k_max == 0:
        return out, valid
    slot = torch.where(ends, ends.long().cumsum(-1) - 1, 0)  # segment index at each end, 0 elsewhere
    out = out.scatter_add(1, slot, torch.where(ends, values, torch.zeros_like(values)))
    return out, valid


def aggregate_mean(values: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Sequence score S(y) = (1/K) Σ_k v(e_k), the paper's ``avg`` aggregation.

    Bandit ends give S = v(EOS); token-level ends give the mean token reward.

    Args:
        values: (B, T) per-position reward-head outputs (gradient flows to the end positions).
        ends: (B, T) bool segment ends.

    Returns:
        (B,) S per row; 0 for a row without segments.
    """
    ends = ends.bool()
    total = torch.where(ends, values, torch.zeros_like(values)).sum(-1)
    return total / num_segments(ends).clamp(min=1).to(values.dtype)


def segment_positions(ends: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised position p_k = k/K (k 1-based) of every segment end.

    Args:
        ends: (B, T) bool segment ends.

    Returns:
        (B, T) ``dtype``: k/K at segment ends, 0 elsewhere. The last segment has p_K = 1.
    """
    ends = ends.bool()
    k = ends.long().cumsum(-1).to(dtype)
    K = num_segments(ends).clamp(min=1).to(dtype)[:, None]
    return torch.where(ends, k / K, torch.zeros((), dtype=dtype, device=ends.device))


def densify(
    rewards: torch.Tensor,
    ends: torch.Tensor,
    ids: torch.Tensor,
    mode: DensifyMode = "even",
) -> torch.Tensor:
    """Spread (normalised) segment rewards over the tokens, algorithms.md §4.5.

    Modes (r̃_k is the value at e_k, L_k the segment length):

    * ``"even"`` (paper default ``segment_normalization``): every token of segment k gets r̃_k / L_k,
      so each segment sums to r̃_k and the response to Σ_k r̃_k.
    * ``"last"`` (``every_segment_last``): r̃_k at e_k only.
    * ``"same"`` (``same_segment_last``): every token of segment k gets r̃_k (segment sum L_k·r̃_k).
    * ``"mean"`` (``segment_last_avg``, bandit baseline): (1/K) Σ_k r̃_k at the last segment end
      only — not broadcast over the row as the reference code does.

    Positions outside every segment (prompt, padding, post-EOS, and EOS in dense modes) get 0.

    Args:
        rewards: (B, T) r̃_k at segment-end positions; other positions are ignored.
        ends: (B, T) bool segment ends.
        ids: (B, T) long from :func:`segment_ids`.
        mode: one of ``DENSIFY_MODES``.

    Returns:
        (B, T) dense per-token rewards, dtype of ``rewards``.
    """
    ends = ends.bool()
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    at_ends = torch.where(ends, rewards, zero)
    if mode == "last":
        return at_ends
    if mode == "mean":
        last_end = ends & (ends.long().cumsum(-1) == num_segments(ends)[:, None])
        return torch.where(last_end, aggregate_mean(rewards, ends)[:, None], zero)
    if mode not in ("even", "same"):
        raise ValueError(f"unknown densify mode {mode!r}; expected one of {DENSIFY_MODES}")
    seg_r, _ = segment_rewards(rewards, ends)  # (B, K_max)
    inside = ids >= 0
    idx = ids.clamp(min=0)
    if seg_r.shape[1] == 0:
        return torch.zeros_like(rewards)
    per_token = seg_r.gather(1, idx)
    if mode == "even":
        lengths = segment_lengths(ids)  # (B, K_max), the same K_max as seg_r
        per_token = per_token / lengths.gather(1, idx).clamp(min=1).to(rewards.dtype)
    return torch.where(inside, per_token, zero)


# ------------------------------------------------------------------------------------------ calibration


def calibrate_threshold(
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    target_mean_length: float,
    ends_with_eos: bool | torch.Tensor = True,
) -> float:
    """Pick τ_H so that the pooled mean segment length on a calibration set is closest to a target.

    A small model's entropy scale differs from the paper's 8B models, so τ is chosen as an entropy
    quantile instead of copying 1.75 or 2.0 (algorithms.md §4.8). Under the dense rule
    K(τ) = 1 + #{j ∈ [s, c−1] : H_j > τ} per response, so the pooled mean length
    Σ_rows (segment-covered tokens) / Σ_rows K(τ) only changes at the observed entropy values; every
    achievable value is tried (exact search, O(N log N)).

    Args:
        entropy: (B, T) reference-LM entropies, same alignment as :func:`segment_ends`.
        response_mask: (B, T) True on response tokens.
        target_mean_length: wanted mean tokens per segment (the paper's models give ~4–8); ≥ 1.
        ends_with_eos: as in :func:`segment_ends`.

    Returns:
        τ as a Python float, exactly representable in ``entropy``'s dtype, always < ``BANDIT``.
        0.0 (or below the smallest entropy if that is ≤ 0) when token level is closest.
    """
    if target_mean_length <= 0:
        raise ValueError("target_mean_length must be positive")
    start, last, nonempty = response_bounds(response_mask)
    content = _last_content(start, last, ends_with_eos)
    pos = torch.arange(entropy.shape[1], device=entropy.device).expand_as(entropy)
    in_scan = (pos >= start[:, None]) & (pos < content[:, None]) & nonempty[:, None]
    h = entropy[in_scan].detach().sort().values  # (N,) ascending, entropy's dtype
    rows = int(nonempty.sum())
    if rows == 0:
        raise ValueError("no response tokens to calibrate on")
    covered = float((content - start + 1)[nonempty].sum())  # tokens inside segments
    # Thresholds strictly between distinct observed values (robust to ">" vs ">="), plus one below all
    # (0.0, the paper's token level, when every entropy is positive) and one above all (no peak).
    hu = h.unique()
    lo = h.new_zeros(1) if hu.numel() == 0 or hu[0] > 0 else hu[:1] - 1
    hi = hu[-1:] + 1 if hu.numel() else h.new_ones(1)
    cands = torch.cat([lo, (hu[:-1] + hu[1:]) / 2, hi])
    above = h.numel() - torch.searchsorted(h, cands, right=True)  # #{h > τ}
    mean_len = covered / (rows + above).double()
    best = int((mean_len - float(target_mean_length)).abs().argmin())
    tau = float(cands[best])
    if is_bandit(tau):
        raise ValueError(f"entropies reach {float(h[-1])} nats; calibration would hit the bandit sentinel")
    return tau


def mean_segment_length(ends: torch.Tensor, ids: torch.Tensor) -> float:
    """Pooled mean segment length: tokens inside segments / number of segments (0 if none)."""
    K = int(num_segments(ends).sum())
    return float((ids >= 0).sum()) / K if K else 0.0


def _last_content(
    start: torch.Tensor, last: torch.Tensor, ends_with_eos: bool | torch.Tensor
) -> torch.Tensor:
    """c = e − 1 when the response ends with EOS (c = e otherwise), never before s."""
    eos = torch.as_tensor(ends_with_eos, dtype=torch.bool, device=last.device).expand_as(last)
    c = last - eos.long()
    return torch.where(c < start, last, c)
