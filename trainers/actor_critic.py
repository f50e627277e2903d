"""The PPO actor and critic as modules: a causal-LM policy with an optional value head on its own trunk
(shared trunk), or a separate value model (algorithms.md §1.2, §1.12, §4.6).

* :class:`ActorCritic` wraps the policy. One forward scores the response tokens with
  :func:`trainers.teacher_forced.score_tokens` (chunked LM head, never the full (B, T, V) logits) and,
  with a value head, reads the trunk's last hidden states of that same pass through a forward hook,
  so policy log-probs and values cost one trunk pass (the "shared trunk" option).
* :class:`ValueModel` is a separate trunk (``AutoModel``, no LM head) plus a value head (RL4LMs'
  choice: a full copy of the pretrained LM; OpenRLHF's critic is initialised the same way).

V(s_t) — the value of the state before response token t — is read from the hidden state of the
position that predicts token t (the last prompt token for t = 0), exactly the positions whose
logits give the log-probs, so values and log-probs line up as (B, T). The value head is
``Linear(hidden, 1, bias=False)`` initialised to zero: V ≡ 0 before the first update.

Both modules are plain ``nn.Module`` with one ``forward``, so ``accelerate.prepare`` / DDP wrap them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

from trainers.rollout import LogitsProcessor, positions
from trainers.teacher_forced import score_tokens


def value_head(hidden_size: int) -> nn.Linear:
    """``Linear(hidden, 1, bias=False)`` with zero weights (V ≡ 0 at the start)."""
    head = nn.Linear(hidden_size, 1, bias=False)
    nn.init.zeros_(head.weight)
    return head


def hidden_size(lm: Any) -> int:
    """The trunk's hidden size of a Hugging Face model."""
    return int(lm.config.get_text_config().hidden_size)


@contextlib.contextmanager
def last_hidden_state(trunk: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Capture ``trunk``'s ``last_hidden_state`` (B, L, H) of the forwards run inside the block.

    Yields a dict whose ``"hidden"`` entry is set by each forward of ``trunk`` (the graph is kept:
    a loss on it backpropagates into the trunk).
    """
    box: dict[str, torch.Tensor] = {}

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        box["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = trunk.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def response_states(hidden: torch.Tensor, n_prompt: int, n_steps: int) -> torch.Tensor:
    """(B, P + T, H) hidden states → (B, T, H): the state that predicts each response token."""
    return hidden[:, n_prompt - 1 : n_prompt - 1 + n_steps]


def head_values(head: nn.Linear, states: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H) states → (B, T) float32 values, 0 where ``response_mask`` is False."""
    values = head(states.to(head.weight.dtype)).squeeze(-1).float()
    return torch.where(response_mask.bool(), values, 0.0)


def trunk_values(
    trunk: nn.Module,
    head: nn.Linear,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """V(s_t) from one trunk pass over [prompt; response]: (B, P), (B, P), (B, T), (B, T) → (B, T) float32.

    Positions count real tokens only (as in sampling and scoring), so left padding changes nothing.
    """
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention = torch.cat([prompt_mask.long(), response_mask.long()], dim=1)
    hidden = trunk(input_ids=input_ids, attention_mask=attention, position_ids=positions(attention),
                   use_cache=False).last_hidden_state  # fmt: skip
    return head_values(
        head, response_states(hidden, prompt_ids.shape[1], response_ids.shape[1]), response_mask
    )


class ActorCritic(nn.Module):
    """The policy ``lm``, optionally with a value head on its trunk (``shared_value=True``).

    ``lm`` is saved with ``unwrap(...).lm.save_pretrained``; ``value`` is the head (None without).
    """

    def __init__(self, lm: nn.Module, *, shared_value: bool, chunk_steps: int = 16) -> None:
        super().__init__()
        self.lm = lm
        self.value = value_head(hidden_size(lm)) if shared_value else None
        self.chunk_steps = chunk_steps

    def forward(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
        processors: Sequence[LogitsProcessor] = (),
        with_entropy: bool | Literal["detached"] = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Teacher-forced scores of the responses.

        Args: as :func:`trainers.teacher_forced.score_tokens` ((B, P) left-padded prompts, (B, T)
        right-padded responses; ``processors`` the stage-2 replay of the sampling distribution).

        Returns:
            logprobs: (B, T) float32 log π(y_t | …) under the processed distribution (0 where masked).
            entropy: (B, T) float32 or None.
            values: (B, T) float32 V(s_t) from the shared trunk (0 where masked), or None without a head.
        """
        if self.value is None:
            scores = score_tokens(self.lm, prompt_ids, prompt_mask, response_ids, response_mask,
                                  processors=processors, with_entropy=with_entropy,
                                  chunk_steps=self.chunk_steps)  # fmt: skip
            return scores.logprobs, scores.entropy, None
        with last_hidden_state(self.lm.base_model) as box:
            scores = score_tokens(self.lm, prompt_ids, prompt_mask, response_ids, response_mask,
                                  processors=processors, with_entropy=with_entropy,
                                  chunk_steps=self.chunk_steps)  # fmt: skip
        states = response_states(box["hidden"], prompt_ids.shape[1], response_ids.shape[1])
        return scores.logprobs, scores.entropy, head_values(self.value, states, response_mask)

    def values(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
    ) -> torch.Tensor:
        """(B, T) V(s_t) from the shared trunk alone (no LM head): the same numbers as ``forward``'s."""
        if self.value is None:
            raise ValueError("this ActorCritic has no value head (the critic is a separate model)")
        return trunk_values(
            self.lm.base_model, self.value, prompt_ids, prompt_mask, response_ids, response_mask
        )


class ValueModel(nn.Module):
    """A separate critic: a transformer trunk (no LM head) and a zero-initialised value head."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = value_head(hidden_size(trunk))

    @classmethod
    def from_pretrained(cls, folder: Any, dtype: torch.dtype = torch.float32) -> ValueModel:
        """The trunk of the causal LM (or any ``AutoModel``) in ``folder``, with a fresh head."""
        from transformers import AutoModel

        return cls(AutoModel.from_pretrained(folder, dtype=dtype, use_safetensors=True))

    def forward(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
    ) -> torch.Tensor:
        """(B, P) left-padded prompts, (B, T) right-padded responses → (B, T) float32 V(s_t), 0 where masked."""
        return trunk_values(self.trunk, self.head, prompt_ids, prompt_mask, response_ids, response_mask)
