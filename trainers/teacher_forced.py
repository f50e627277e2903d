"""ESRL stage 2: per-token log-probs (and entropies) of given responses in one teacher-forced pass.

:func:`score_tokens` runs the model once over the padded [prompt; response] batch — with grad
when grad is enabled, so REINFORCE/PPO losses backpropagate through it — and returns, for every
response step t, log π(y_t | x, y_<t) under the model's distribution after the given logits
processors (the same ``(step, logits) → logits`` callables as :func:`trainers.rollout.rollout`;
none = the raw model). With the processors stage 1 used, the numbers equal stage 1's
:attr:`Rollout.logprobs` (algorithms.md §1.14.2, §3.7.1).

Memory: the (B, T, V) float32 logits tensor is never materialised. The trunk runs on all
positions; then, ``chunk_steps`` response steps at a time, the LM head turns (B, c, H) hidden
states into (B, c, V) logits, the processors and the log-softmax run, and only the (B, c) picked
log-probs (and entropies) leave the chunk. With grad, each chunk runs under activation
checkpointing (recomputed in backward), so the saved logits are also one chunk's, not T's — unless
the whole response's float32 logits fit in ``recompute_above`` bytes (64 MiB by default): then one
chunk without recompute, as the second LM-head matmul and log-softmax per chunk cost more time
(~10 % of a small PPO iteration on CPU) than those few MiB are worth.

The direct head path is taken where ``logits == lm_head(last hidden state)`` holds
(:func:`trainers.logprobs.direct_head`: Llama, Qwen2/3, Mistral, GPT-2 without logit scaling);
other models run their own forward, whose full logits then exist once (same numbers, no saving).
Positions count real tokens only, like stage 1, so left padding changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainers.logprobs import direct_head, picked_logprobs
from trainers.rollout import LogitsProcessor, apply_chunk, entropy_of, positions

RECOMPUTE_ABOVE_BYTES = 64 * 2**20
"""Default of :func:`score_tokens`' ``recompute_above``: below it, training scores a response in one
chunk without checkpointing."""


@dataclass(frozen=True)
class TokenScores:
    """Stage-2 output.

    Attributes:
        logprobs: (B, T) float32 log π(y_t | x, y_<t) under the processed distribution; 0 where
            the response mask is False. Carries grad when computed with grad.
        entropy: (B, T) float32 entropy of that distribution at each step (0 where masked), or None.
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor | None


def chunk_scores(
    states: torch.Tensor,
    targets: torch.Tensor,
    first_step: int,
    head: Callable[[torch.Tensor], torch.Tensor],
    processors: Sequence[LogitsProcessor],
    with_entropy: bool | Literal["detached"],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (and entropies) of one chunk of steps: (B, c, H) or (B, c, V), (B, c) → (B, c), (B, c).

    ``states`` become float32 logits through ``head`` (the LM head, or identity for logits); step j
    of the chunk is response step ``first_step + j`` for the processors. Entropy is −Σ p log p over
    the tokens the processors left finite (0 everywhere when ``with_entropy`` is False; without a
    graph when it is ``"detached"``, for logging only).
    """
    logits = head(states).float()
    if processors:  # a fresh head output is ours to edit in place (no (B, c, V) copy per processor)
        logits = apply_chunk(processors, first_step, logits, owned=logits is not states)
    if with_entropy is True:  # the entropy carries a graph (an entropy bonus): autograd all the way
        logp = torch.log_softmax(logits, dim=-1)
        return logp.gather(-1, targets[..., None]).squeeze(-1), entropy_of(logp)
    picked, entropy = picked_logprobs(logits, targets, entropy=with_entropy == "detached")
    return picked, torch.zeros_like(picked) if entropy is None else entropy


def score_tokens(
    model: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    processors: Sequence[LogitsProcessor] = (),
    with_entropy: bool | Literal["detached"] = False,
    chunk_steps: int = 16,
    direct: bool | None = None,
    recompute_above: int = RECOMPUTE_ABOVE_BYTES,
) -> TokenScores:
    """Teacher-forced per-token log-probs of ``response_ids`` after left-padded ``prompt_ids``.

    Args:
        model: a Hugging Face causal LM (the caller picks train/eval mode and grad/no-grad).
        prompt_ids: (B, P) long, left-padded (the last column is real in every row).
        prompt_mask: (B, P) bool/0-1.
        response_ids: (B, T) long, right-padded.
        response_mask: (B, T) bool/0-1, True on the tokens to score.
        processors: ``(step, logits) → logits`` applied per response step (pure; see
            :data:`trainers.rollout.LogitsProcessor`).
        with_entropy: also return per-step entropies (``"detached"``: without a graph, for logging:
            much cheaper in training, where it skips the entropy's backward and recompute).
        chunk_steps: response steps per chunk of float32 logits.
        direct: None decides by :func:`trainers.logprobs.direct_head`; False forces the model's
            own forward (full logits).
        recompute_above: with grad, chunks are checkpointed only when the whole response's float32
            logits would take more bytes than this (0: always, when there are several chunks).

    Returns:
        :class:`TokenScores` with (B, T) tensors, 0 where ``response_mask`` is False.
    """
    if prompt_ids.shape != prompt_mask.shape or response_ids.shape != response_mask.shape:
        raise ValueError("ids and masks must have matching shapes")
    if prompt_ids.shape[0] != response_ids.shape[0] or prompt_ids.shape[1] < 1:
        raise ValueError(
            f"prompts {tuple(prompt_ids.shape)} and responses {tuple(response_ids.shape)} do not pair"
        )
    if not bool(prompt_mask[:, -1].bool().all()):
        raise ValueError("prompts must be left-padded: the last column must be a real token in every row")
    if chunk_steps < 1:
        raise ValueError(f"chunk_steps must be >= 1, got {chunk_steps}")
    n_prompt, n_steps = prompt_ids.shape[1], response_ids.shape[1]
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention = torch.cat([prompt_mask.long(), response_mask.long()], dim=1)
    inputs = {"input_ids": input_ids, "attention_mask": attention, "position_ids": positions(attention)}
    use_direct = direct_head(model) if direct is None else direct and direct_head(model)
    # states[:, t] predicts response token t: the last prompt column, then each response position
    if use_direct:
        hidden = model.base_model(**inputs, use_cache=False).last_hidden_state
        states = hidden[:, n_prompt - 1 : n_prompt - 1 + n_steps]
        lm_head = model.get_output_embeddings()

        def head(h: torch.Tensor) -> torch.Tensor:
            return F.linear(h, lm_head.weight, lm_head.bias)

    else:
        states = model(**inputs, use_cache=False).logits[:, n_prompt - 1 : n_prompt - 1 + n_steps]

        def head(h: torch.Tensor) -> torch.Tensor:
            return h

    recompute = torch.is_grad_enabled() and n_steps > chunk_steps
    if (
        recompute
        and use_direct
        and 4 * states.shape[0] * n_steps * lm_head.weight.shape[0] <= recompute_above
    ):
        chunk_steps, recompute = n_steps, False  # small enough: the whole response at once
    picked, entropies = [], []
    for start in range(0, n_steps, chunk_steps):
        part = (states[:, start : start + chunk_steps], response_ids[:, start : start + chunk_steps], start)
        if recompute:
            lp, ent = checkpoint(chunk_scores, *part, head, processors, with_entropy, use_reentrant=False)
        else:
            lp, ent = chunk_scores(*part, head, processors, with_entropy)
        picked.append(lp)
        entropies.append(ent)
    mask = response_mask.bool()
    logprobs = torch.where(mask, torch.cat(picked, dim=1), 0.0)
    entropy = torch.where(mask, torch.cat(entropies, dim=1), 0.0) if with_entropy else None
    return TokenScores(logprobs=logprobs, entropy=entropy)


class TokenScorer(nn.Module):
    """:func:`score_tokens` as a module, so DDP / ``accelerate.prepare`` wrap one ordinary forward.

    ``lm`` is the wrapped causal LM (save it with ``unwrap(...).lm.save_pretrained``).
    """

    def __init__(self, lm: nn.Module, *, chunk_steps: int = 16, direct: bool | None = None) -> None:
        super().__init__()
        self.lm = lm
        self.chunk_steps = chunk_steps
        self.direct = direct

    def forward(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
        processors: Sequence[LogitsProcessor] = (),
        with_entropy: bool | Literal["detached"] = False,
    ) -> TokenScores:
        """See :func:`score_tokens`."""
        return score_tokens(
            self.lm,
            prompt_ids,
            prompt_mask,
            response_ids,
            response_mask,
            processors=processors,
            with_entropy=with_entropy,
            chunk_steps=self.chunk_steps,
            direct=self.direct,
        )
