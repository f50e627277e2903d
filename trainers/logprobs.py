"""Summed response log-probs of a causal LM, with the LM head run only where a token is scored.

:class:`ResponseLogps` wraps a ``…ForCausalLM`` as a module whose forward returns, per row,
log π(response | prompt) = Σ_t m_t log π(x_t | x_<t) over the response positions m (the targets;
prompt and padding never count). Policy recipes (DPO now; RWR, DT and PPO later) prepare this wrapper
with ``accelerate`` instead of the bare LM, so DDP and mixed-precision autocast see one ordinary
top-level forward.

How (the "fused LM head" idea of TRL 1.16, in plain PyTorch):

* the trunk (``model.base_model``: embeddings, layers, final norm) runs on all positions;
* the hidden states of the positions whose *next* token is scored are gathered, (N, H) for N
  response tokens in the batch, and only they go through the LM head — prompt positions cost no
  head FLOPs, and the (B, T, V) logits tensor never exists;
* the head runs ``chunk_tokens`` rows at a time; each chunk's float32 logits live only inside
  :func:`head_logps`, and are recomputed during backward (activation checkpointing), so the logit
  memory is one chunk's whatever the batch.

This direct path is taken for architectures whose logits are exactly ``lm_head(final hidden state)``
(:data:`PLAIN_HEADS`); anything else (logit soft-capping or scaling, unknown classes, a PEFT wrapper)
uses the model's own forward and :func:`trainers.losses.token_logps` on its logits — the same numbers,
with the full logits in memory. :meth:`ResponseLogps.reference_path` is that plain forward, the oracle
of the tests.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainers.losses import sequence_logps, token_logps

PLAIN_HEADS = frozenset(
    {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "GPT2LMHeadModel",
    }
)
"""Causal-LM classes (transformers 5.x) whose forward computes ``logits = lm_head(base_model(...)[0])``."""

_SCALING_ATTRIBUTES = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier",
    "lm_head_multiplier",
)


def direct_head(lm: Any) -> bool:
    """True when :class:`ResponseLogps` may run the trunk and the LM head itself for ``lm``."""
    if type(lm).__name__ not in PLAIN_HEADS or not type(lm).__module__.startswith("transformers.models."):
        return False
    text = lm.config.get_text_config()
    if any(getattr(text, name, None) is not None for name in _SCALING_ATTRIBUTES):
        return False
    head = lm.get_output_embeddings()
    return type(head) is nn.Linear and "forward" not in vars(lm) and "forward" not in vars(head)


def head_logps(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    """log softmax(hidden @ weightᵀ + bias)[target] for each row: (N, H), (V, H), (V,), (N,) → (N,) float32."""
    return picked_logprobs(F.linear(hidden, weight, bias).float(), targets)[0]


class _PickedLogprob(torch.autograd.Function):
    """(N, V), (N,) → log softmax(logits)[target] (N,), and softmax(logits) (N, V) and logsumexp (N, 1)
    without gradient, with a one-pass backward: ∂/∂logits = g·(onehot(target) − p).

    Autograd's log_softmax → gather writes the (N, V) log-probs, then in backward a zero (N, V) gather
    gradient and a log_softmax backward that recomputes exp; here p is computed once, is what backward
    reads, and serves a logged entropy too.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor):  # type: ignore[override]
        lse = torch.logsumexp(logits, -1, keepdim=True)
        picked = (logits.gather(-1, targets[:, None]) - lse).squeeze(-1)
        p = torch.sub(logits, lse).exp_()
        ctx.save_for_backward(p, targets)
        ctx.mark_non_differentiable(p, lse)
        return picked, p, lse

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _grad_p: Any, _grad_lse: Any):  # type: ignore[override]
        p, targets = ctx.saved_tensors
        out = p * -grad[:, None]
        return out.scatter_add_(-1, targets[:, None], grad[:, None]), None


def picked_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, *, entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(…, V) float32 logits (−inf on banned tokens), (…) long targets → (…) log softmax(logits)[target]
    and, with ``entropy``, (…) the distribution's entropy without a graph (for logging), else None.

    Equal to ``log_softmax(logits).gather(target)`` up to rounding (~1e−7); the gradient flows to
    ``logits`` through a one-pass backward (:class:`_PickedLogprob`). The entropy is computed after
    the autograd node, so a checkpointed chunk's recompute (which stops once the saved tensors are
    rebuilt) never redoes it.
    """
    shape, vocab = targets.shape, logits.shape[-1]
    flat, flat_targets = logits.reshape(-1, vocab), targets.reshape(-1)
    if torch.is_grad_enabled() and logits.requires_grad:
        picked, p, lse = _PickedLogprob.apply(flat, flat_targets)
    else:
        lse = torch.logsumexp(flat, -1, keepdim=True)
        picked = (flat.gather(-1, flat_targets[:, None]) - lse).squeeze(-1)
        p = torch.sub(flat, lse).exp_() if entropy else None
    if not entropy:
        return picked.view(shape), None
    # H = lse − Σ p·logit over the finite logits (a banned token has p = 0 and logit −inf)
    with torch.no_grad():
        ent = lse.squeeze(-1) - torch.bmm(p[:, None, :], flat.nan_to_num(neginf=0.0)[:, :, None]).view(-1)
    return picked.view(shape), ent.view(shape)


def chunked_head_logps(
    hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, chunk_tokens: int
) -> torch.Tensor:
    """:func:`head_logps` over ``chunk_tokens`` rows at a time; chunks are recomputed in backward.

    A single chunk is computed directly (nothing to save by recomputing it).
    """
    n = hidden.shape[0]
    if n <= chunk_tokens:
        return head_logps(hidden, head.weight, head.bias, targets)
    parts = [
        checkpoint(
            head_logps,
            hidden[i : i + chunk_tokens],
            head.weight,
            head.bias,
            targets[i : i + chunk_tokens],
            use_reentrant=False,
        )
        for i in range(0, n, chunk_tokens)
    ]
    return torch.cat(parts)


class ResponseLogps(nn.Module):
    """A causal LM as ``(ids, attention_mask, response_mask) → (B,)`` summed response log-probs.

    ``lm`` is the wrapped model (saved with ``unwrap(...).lm.save_pretrained``). ``chunk_tokens``
    bounds the rows of float32 logits alive at once. ``direct``: None decides by :func:`direct_head`;
    False forces the model's own forward.
    """

    def __init__(self, lm: nn.Module, *, chunk_tokens: int = 1024, direct: bool | None = None) -> None:
        super().__init__()
        self.lm = lm
        self.chunk_tokens = chunk_tokens
        self.direct = direct_head(lm) if direct is None else direct and direct_head(lm)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor
    ) -> torch.Tensor:
        """Args: (B, T) long ids, (B, T) attention mask (1 = real token), (B, T) bool response mask.

        Returns (B,) float32: Σ over positions t ≥ 1 with ``response_mask[:, t]`` of log π(ids_t | ids_<t).
        Position 0 has no context and is never scored.
        """
        targets = input_ids[:, 1:]
        scored = response_mask[:, 1:].bool() & attention_mask[:, 1:].bool()
        if not self.direct:
            logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            per_token = token_logps(logits[:, :-1], targets, self.chunk_tokens)
            return sequence_logps(per_token, scored)
        hidden = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        picked = hidden.last_hidden_state[:, :-1][scored]  # (N, H): positions whose next token is scored
        logps = chunked_head_logps(
            picked, self.lm.get_output_embeddings(), targets[scored], self.chunk_tokens
        )
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(scored)[scored]
        # masked positions add nothing; index_add keeps an all-prompt batch connected to the graph
        return torch.zeros(input_ids.shape[0], device=logps.device, dtype=torch.float32).index_add(
            0, rows, logps
        )

    @torch.no_grad()
    def reference_path(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor
    ) -> torch.Tensor:
        """The same quantity from the model's full forward and full logits (the test oracle)."""
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        per_token = (
            torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        )
        return sequence_logps(per_token, response_mask[:, 1:].bool() & attention_mask[:, 1:].bool())
