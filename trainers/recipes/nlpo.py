"""NLPO — Natural Language Policy Optimisation (Ramamurthy et al., ICLR 2023): PPO with a learned action mask.

NLPO is :mod:`trainers.recipes.ppo` in which acting and the PPO ratio use a *masked* categorical
(algorithms.md §1.7):

* a **masking policy** π_mask starts as a copy of the policy and is **re-synced** to the policy
  every μ = ``mask_sync_every`` iterations (after the rollout of iteration k·μ, before its update);
  its parameters are never trained;
* at each generation step the mask M is π_mask's top-p nucleus of the next token (p = ``mask_top_p``,
  the token crossing p kept, at least ``mask_min_tokens`` tokens, every special token always kept),
  and the policy's logits outside M are set to −∞ before the sampling processors;
* the mask of every step is recorded with the rollout and replayed in the update, so π_old and
  π_new in ρ are both masked distributions (log-probs renormalised over M, entropy over M);
* the KL in the reward uses the **raw** (unmasked) policy log-probs.

**The released code's defect, fixed.** In RL4LMs the generation-time logits processor keeps a
reference to the *initial* mask model, so its periodic sync never reaches the rollouts, which in
effect are masked by the frozen reference. Here the stage-1 processor reads the owner's *current*
mask model at the start of every rollout, and a sync copies the policy's weights into that model in
place — the mask a rollout applies is always the latest synced policy's.

``mask_top_p ≥ 1`` masks nothing: the run is then exactly PPO (same samples, losses and weights).
Evaluation samples from the policy alone (no mask): the trained policy is what ``final/`` holds.
The mask model is saved in every step checkpoint (``mask_model.safetensors``), so a resumed run
equals an uninterrupted one.

Example (``python -m trainers nlpo --config nlpo.yaml``)::

    output_dir: runs/nlpo-sentiment
    task: sentiment
    mask_top_p: 0.9
    mask_sync_every: 5
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainers.config import bounded, run_recipe_cli
from trainers.ppo_config import PPOConfig
from trainers.recipe_common import TrainResult
from trainers.recipes import ppo
from trainers.rollout import ChunkProcessor, LogitsProcessor, positions, top_p_mask

RECIPE = "nlpo"
CHECKPOINT_KIND = ppo.CHECKPOINT_KIND
SNAPSHOT_KINDS = ppo.SNAPSHOT_KINDS
BASE_KIND = "policy"
MASK_FILE = "mask_model.safetensors"
"""The masking policy's weights in a step checkpoint."""


@dataclass(frozen=True)
class NLPOConfig(PPOConfig):
    """Train a causal-LM policy with NLPO: PPO restricted to the top-p tokens of a periodically synced masking policy."""

    mask_top_p: float = bounded(0.9, gt=0)
    """p of the masking policy's nucleus (RL4LMs ``top_mask``: 0.9; 0.5 for translation); ≥ 1 masks nothing."""
    mask_sync_every: int = bounded(5, ge=1)
    """μ: copy the policy into the masking policy every μ iterations (RL4LMs: 5 for IMDB, 20 elsewhere)."""
    mask_min_tokens: int = bounded(100, ge=1)
    """Always keep at least this many of the masking policy's most likely tokens (RL4LMs: 100)."""


# ----------------------------------------------------------------------------- the mask


def action_mask(
    mask_logits: torch.Tensor, top_p: float, min_tokens: int, special_ids: list[int]
) -> torch.Tensor:
    """(B, V) masking-policy logits → (B, V) bool M: its top-p nucleus ∪ the first ``min_tokens`` ∪ special ids.

    The argmax of π_mask is always in M and Σ_{a∈M} π_mask(a) ≥ p (§1.14.7); p ≥ 1 keeps every token.
    """
    allowed = top_p_mask(mask_logits.float(), top_p, min_tokens)
    if special_ids:
        allowed[:, special_ids] = True
    return allowed


def replay_masks(masks: torch.Tensor) -> ChunkProcessor:
    """The stage-2 processor for rows whose (b, T, V) masks were recorded: logits outside M → −∞
    (a whole chunk of steps in one ``masked_fill``)."""

    def banned(first_step: int, logits: torch.Tensor) -> torch.Tensor:
        return ~masks[:, first_step : first_step + logits.shape[-2]].to(logits.device)

    return ChunkProcessor(lambda first, logits: logits.masked_fill(banned(first, logits), float("-inf")),
                          lambda first, logits: logits.masked_fill_(banned(first, logits), float("-inf")))  # fmt: skip


class MaskProcessor:
    """Stage-1 processor: masks each step with the owner's current mask model and records the masks.

    A :class:`trainers.rollout.SequenceProcessor`: the mask model follows the sampled tokens with its
    own KV cache (the forward for a step's tokens runs lazily at the next step, none after the last).
    """

    def __init__(self, owner: NLPOMasking) -> None:
        self.owner = owner
        self._masks: list[torch.Tensor] = []
        self._pending: torch.Tensor | None = None

    def begin(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        self.model = self.owner.mask_model.to(prompt_ids.device)  # read now: the current masking policy
        self.attention = prompt_mask.long()
        self._step(prompt_ids, positions(self.attention), None, logits_to_keep=1)
        self.next_position = self.attention.sum(-1, keepdim=True)

    @torch.no_grad()
    def _step(self, ids: torch.Tensor, position_ids: torch.Tensor, past: Any, **kwargs: Any) -> None:
        out = self.model(input_ids=ids, attention_mask=self.attention, position_ids=position_ids,
                         past_key_values=past, use_cache=True, **kwargs)  # fmt: skip
        self.logits, self.past = out.logits[:, -1].float(), out.past_key_values

    def __call__(self, step: int, logits: torch.Tensor) -> torch.Tensor:
        if self._pending is not None:
            ones = torch.ones_like(self.attention[:, :1])
            self.attention = torch.cat([self.attention, ones], dim=1)
            self._step(self._pending[:, None], self.next_position, self.past)
            self.next_position = self.next_position + 1
            self._pending = None
        owner = self.owner
        allowed = action_mask(self.logits, owner.top_p, owner.min_tokens, owner.special_ids)
        self._masks.append(allowed)
        return logits.masked_fill(~allowed, float("-inf"))

    def advance(self, step: int, tokens: torch.Tensor) -> None:
        self._pending = tokens

    def masks(self) -> torch.Tensor:
        """(B, T, V) bool: the mask applied at each step of the rollout."""
        masks = torch.stack(self._masks, dim=1)
        self.owner.last_mask_tokens = float(masks.sum(-1).float().mean())
        return masks


class NLPOMasking:
    """The masking policy π_mask and its schedule: the :class:`trainers.recipes.ppo.ActionMasking` of NLPO."""

    def __init__(self, policy: torch.nn.Module, tokenizer: Any, *, top_p: float, sync_every: int,
                 min_tokens: int) -> None:  # fmt: skip
        self.mask_model = copy.deepcopy(policy).requires_grad_(False).eval()
        self.special_ids = sorted({int(i) for i in tokenizer.all_special_ids})
        self.top_p, self.sync_every, self.min_tokens = top_p, sync_every, min_tokens
        self.last_mask_tokens = 0.0

    def processor(self) -> MaskProcessor:
        return MaskProcessor(self)

    def replay(self, masks: torch.Tensor) -> LogitsProcessor:
        return replay_masks(masks)

    @torch.no_grad()
    def sync(self, policy: torch.nn.Module) -> None:
        """Copy the policy's weights into the mask model in place (the same object stays in use)."""
        self.mask_model.load_state_dict(policy.state_dict())

    def after_rollout(self, iteration: int, policy: torch.nn.Module) -> dict[str, float]:
        """Sync after the rollout of every μ-th iteration (1-based), before that iteration's update."""
        synced = iteration % self.sync_every == 0
        if synced:
            self.sync(policy)
        return {"mask_synced": float(synced), "mask_tokens": self.last_mask_tokens}

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_model

        save_model(self.mask_model, str(Path(folder) / MASK_FILE))

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_model

        load_model(self.mask_model, str(Path(folder) / MASK_FILE))


# ----------------------------------------------------------------------------- the recipe


def train(cfg: NLPOConfig, *, should_stop: Any = None) -> TrainResult:
    """PPO's loop (:func:`trainers.recipes.ppo.train`) with the NLPO masking policy."""

    def make_masking(policy: torch.nn.Module, tokenizer: Any) -> NLPOMasking:
        return NLPOMasking(policy, tokenizer, top_p=cfg.mask_top_p, sync_every=cfg.mask_sync_every,
                           min_tokens=cfg.mask_min_tokens)  # fmt: skip

    return ppo.train(cfg, should_stop=should_stop, recipe=RECIPE, make_masking=make_masking)


CONFIG_CLASS = NLPOConfig
"""The config dataclass (``python -m trainers --schema`` builds the studio's form from it)."""


def main(argv: list[str] | None = None) -> int:
    """``python -m trainers nlpo --config cfg.yaml [--set key=value ...]``."""
    return run_recipe_cli(NLPOConfig, train, RECIPE, argv)


if __name__ == "__main__":
    raise SystemExit(main())
