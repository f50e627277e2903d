"""REINFORCE's experience (phases 1–4 of :mod:`trainers.recipes.reinforce`): one rollout batch, scored.

:func:`experience` turns one micro-batch of prompts into an :class:`Experience` (no graph anywhere):

* :func:`plan` — K samples per prompt, or (``dynamic.mode: adaptive``) per-prompt sample counts and
  temperatures from a first cheap sample's capability (:mod:`trainers.esrl`);
* :func:`sample` — stage 1 under ``no_grad`` with the KV cache (:func:`trainers.rollout.rollout`),
  keeping the raw per-step log-probs;
* then the reward of each response (the sum of its token rewards), the frozen reference's log-probs
  (:func:`run_reference`), the sequence KL, the shaped score s = R − β·KL, and with
  ``dynamic.mode: eliminate`` the most confident samples dropped before stage 2.

:func:`advantages` (phase 3) is s minus the configured baseline, optionally over the group's std; the
loop fills ``Experience.advantages`` with it once the step's micro-batches are all sampled.

These take the recipe's ``Run`` (policy, reference, reward, KL controller, running baseline, compute
counter); stage 2 (the loss with grad) and the loop stay in the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from trainers import esrl
from trainers.reinforce_config import ReinforceConfig
from trainers.rl_eval import encode_prompts, pad_token_id, response_texts
from trainers.rl_math import KL_ESTIMATORS, group_std, masked_sum
from trainers.rollout import left_pad, rollout

if TYPE_CHECKING:
    from trainers.recipes.reinforce import Run


@dataclass
class Experience:
    """One rollout batch after scoring (no tensor needs grad). B rows, prompt-major groups.

    Attributes:
        prompt_ids / prompt_mask: (B, P) left-padded prompts, repeated per sample.
        response_ids / response_mask: (B, T) sampled responses.
        temperatures: (B,) per-row sampling temperature (adaptive mode), else None.
        sizes: samples of each prompt, in order (sum = B).
        scores: (B,) task reward R; kl: (B,) sequence KL; shaped: (B,) R − β·KL.
        advantages: (B,) s − b (filled by :func:`advantages`).
        keep: (B,) bool, rows that go to stage 2.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    temperatures: torch.Tensor | None
    sizes: list[int]
    scores: torch.Tensor
    kl: torch.Tensor
    shaped: torch.Tensor
    keep: torch.Tensor
    eos: torch.Tensor
    advantages: torch.Tensor | None = None


def sample(run: Run, prompts: list[Any], sizes: list[int], temperatures: torch.Tensor | None,
           stats: esrl.StepStats | None = None) -> tuple[Any, list[str], list[Any]]:  # fmt: skip
    """Stage 1 for ``sizes[i]`` samples of ``prompts[i]`` (prompt-major); returns (rollout, texts, row prompts)."""
    cfg, device = run.cfg, run.accelerator.device
    rows = [p for p, k in zip(prompts, sizes, strict=True) for _ in range(k)]
    ids, mask = left_pad(
        encode_prompts(run.tokenizer, rows, cfg.max_prompt_tokens), pad_token_id(run.tokenizer)
    )
    processors = [p for p in (stats,) if p is not None] + row_processors(cfg, temperatures)
    with run.accelerator.autocast():
        batch = rollout(run.policy, ids.to(device), mask.to(device), cfg.sampling, eos_token_ids=run.eos_ids,
                        pad_token_id=pad_token_id(run.tokenizer), processors=processors,
                        return_logprobs=False, return_raw_logprobs=True)  # fmt: skip
    run.compute.generate(int(mask.sum()), int(batch.response_mask.sum()), len(rows))
    return batch, response_texts(run.tokenizer, batch), rows


def plan(run: Run, prompts: list[Any]) -> tuple[list[int], torch.Tensor | None]:
    """Samples per prompt and per-row temperatures: K each, or the adaptive plan from a first sample."""
    cfg, dyn = run.cfg, run.cfg.dynamic
    if dyn.mode != "adaptive":
        return [cfg.group_size] * len(prompts), None
    stats = esrl.StepStats()
    probe, texts, rows = sample(run, prompts, [1] * len(prompts), None, stats)
    if dyn.capability == "entropy":
        capability = esrl.capability_from_entropy(
            stats.stacked()[1], probe.response_mask, run.policy.config.vocab_size
        )
    else:
        totals = torch.tensor([s.total for s in run.reward.score(rows, texts)])
        capability = esrl.capability_from_reward(totals, dyn.reward_low, dyn.reward_high)
    k, tau = esrl.adaptive_plan(capability.cpu(), dyn.k_min, dyn.k_max, dyn.tau_min, dyn.tau_max)
    return k.tolist(), torch.repeat_interleave(tau, k)


def row_processors(cfg: ReinforceConfig, temperatures: torch.Tensor | None) -> list[Any]:
    """The per-row temperature processor of adaptive mode: τ_row / τ_sampling, since the sampling
    processors divide by ``sampling.temperature`` after it (empty without per-row temperatures)."""
    if temperatures is None:
        return []
    return [esrl.row_temperature(temperatures / cfg.sampling.temperature)]


@torch.no_grad()
def experience(run: Run, prompts: list[Any]) -> Experience:
    """Phases 1–2 for one rollout batch: plan, sample, reward, reference KL, eliminate."""
    cfg = run.cfg
    sizes, temperatures = plan(run, prompts)
    stats = esrl.StepStats() if cfg.dynamic.mode == "eliminate" else None
    batch, texts, rows = sample(run, prompts, sizes, temperatures, stats)
    # a sequence's reward is the sum of its token rewards (TokenRewards.total); REINFORCE needs no placement
    scores = torch.tensor([s.total for s in run.reward.score(rows, texts)], device=batch.response_ids.device)
    with run.accelerator.autocast():
        ref = run_reference(run, batch)
    m = batch.response_mask
    run.compute.forward(int(batch.prompt_mask.sum() + m.sum()))  # the reference pass
    per_token = KL_ESTIMATORS[cfg.kl.estimator](batch.raw_logprobs.float(), ref.float())
    kl = masked_sum(per_token, m, dim=-1)
    keep = torch.ones(len(rows), dtype=torch.bool, device=m.device)
    if stats is not None:
        max_prob, entropy = stats.stacked()
        conf = esrl.confidence(max_prob, entropy, m, cfg.dynamic.confidence, run.policy.config.vocab_size)
        keep = esrl.eliminate(conf, cfg.dynamic.eliminate_ratio)
    shaped = scores.float() - run.kl_control.beta * kl
    return Experience(batch.prompt_ids, batch.prompt_mask, batch.response_ids, m,
                      None if temperatures is None else temperatures.to(m.device), sizes, scores.float(), kl, shaped,
                      keep, batch.eos)  # fmt: skip


def run_reference(run: Run, batch: Any) -> torch.Tensor:
    """(B, T) reference log-probs of the sampled tokens (raw distribution, no grad)."""
    from trainers.teacher_forced import score_tokens

    return score_tokens(run.reference, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask,
                        chunk_steps=run.cfg.chunk_steps).logprobs  # fmt: skip


def advantages(run: Run, exp: Experience) -> torch.Tensor:
    """Phase 3: (B,) shaped score minus the configured baseline (optionally scaled by the group std)."""
    cfg, s = run.cfg, exp.shaped
    if cfg.baseline == "none":
        base = torch.zeros_like(s)
    elif cfg.baseline == "running":
        base = run.running.update(s)
    else:
        base = esrl.baseline_by_group(s, exp.sizes, cfg.baseline).to(s.device)
    adv = s - base
    if cfg.scale_by_std:
        std = torch.cat([group_std(s[a : a + k], k) if k > 1 else torch.zeros(k, device=s.device)
                         for a, k in zip(group_starts(exp.sizes), exp.sizes, strict=True)])  # fmt: skip
        adv = adv / (std + 1e-6)
    return adv


def group_starts(sizes: list[int]) -> list[int]:
    """The first row of each group of ``sizes`` rows (prompt-major): [0, s0, s0 + s1, …]."""
    return [sum(sizes[:i]) for i in range(len(sizes))]
