"""Preference pairs → token ids with response masks, the way a *policy* is trained on them.

Shared by the policy recipes (DPO now; filtered MLE, RWR and DT later). Reading and validating a
snapshot, rendering conversations through the chat template and finding the response tokens are
:mod:`trainers.data`'s; this module adds what a policy needs on top, following TRL's ``DPOTrainer``
so that the same snapshot means the same tokens in both:

* plain-text (non-conversational) completions get the tokenizer's EOS appended unless they already
  end with it (TRL's ``add_eos``), so the policy learns to stop; conversations end with the chat
  template's own end-of-turn tokens, which are part of the response;
* the loss mask is :attr:`trainers.data.EncodedText.response_mask`: the tokens overlapping the
  completion's characters (a token that straddles the prompt/completion boundary counts as
  completion, as in TRL's token-prefix split). Prompt tokens are never scored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from trainers.data import EncodedPair, PreferencePair, encode_pairs


def append_eos(pairs: Sequence[PreferencePair], eos_token: str | None) -> list[PreferencePair]:
    """Pairs whose plain-text chosen/rejected end with ``eos_token`` (conversations unchanged)."""
    if not eos_token:
        return list(pairs)

    def finish(text: Any) -> Any:
        return text + eos_token if isinstance(text, str) and not text.endswith(eos_token) else text

    return [dataclasses.replace(p, chosen=finish(p.chosen), rejected=finish(p.rejected)) for p in pairs]


def encode_policy_pairs(
    tokenizer: Any, pairs: Sequence[PreferencePair], max_length: int, *, add_eos: bool = True
) -> list[EncodedPair]:
    """Render, (EOS-terminate) and tokenise every pair; truncation follows ``tokenizer.truncation_side``."""
    if add_eos:
        pairs = append_eos(pairs, tokenizer.eos_token)
    return encode_pairs(tokenizer, pairs, max_length)


def response_tokens(pair: EncodedPair) -> tuple[int, int]:
    """``(chosen, rejected)`` numbers of scored (response) tokens; position 0 is never scored."""
    return sum(pair.chosen.response_mask[1:]), sum(pair.rejected.response_mask[1:])
