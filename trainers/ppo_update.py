"""Phase 4 of the PPO recipe (:mod:`trainers.recipes.ppo`, also NLPO's): the update on one iteration's experience.

:func:`update` makes ``ppo_epochs`` shuffled passes of minibatches of whole sequences over the
:class:`trainers.ppo_experience.Experience` of an iteration. Each minibatch is split into
``optim.grad_accum`` micro-batches whose losses are weighted by their share of the minibatch's tokens
(or sequences), so the accumulated gradient is the minibatch's mean; policy and critic are clipped and
stepped with their own optimizers; the epochs stop early when the approximate KL to π_old passes
1.5 × ``target_approx_kl`` (that minibatch is not applied). :func:`minibatch_loss` is the loss of one
micro-batch: the stage-2 log-probs and entropies of the same processed (in NLPO: masked) distribution
that sampled, the clipped surrogate, the clipped value loss and the entropy bonus
(:mod:`trainers.rl_math`).

Both take the recipe's ``Run`` (models, optimizers, config, compute counter); the loop stays in
:func:`trainers.recipes.ppo.train`, which calls :func:`update` as ``ppo.update`` (benchmarks time it there).
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import torch

from trainers.compute import non_embedding_params
from trainers.metrics import check_finite
from trainers.ppo_experience import Experience, minibatch
from trainers.rl_math import entropy_bonus, masked_whiten, ppo_policy_loss, value_loss

if TYPE_CHECKING:
    from trainers.recipes.ppo import Run


def minibatch_loss(
    run: Run, mb: Experience, advantages: torch.Tensor, *, backward_scale: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO loss of one micro-batch: clipped surrogate + vf·value loss − ent·entropy, and its detached stats.

    With ``backward_scale`` the loss × scale is also back-propagated here (and returned detached). A
    separate critic then goes first and alone: its value loss is back-propagated before the policy's
    forward, so the critic's graph is freed and the two models' activations are never held together
    (peak memory: the larger of the two graphs, not their sum). The gradients are those of the summed
    loss: the two models share no parameter.
    """
    cfg = run.cfg
    scored = (mb.prompt_ids, mb.prompt_mask, mb.response_ids, mb.mask)
    separate = run.critic is not None
    if separate:
        vl, v_stats = value_loss(run.critic(*scored), mb.old_values, mb.returns, mb.mask, cfg.value_clip,
                                 cfg.loss_reduction)  # fmt: skip
        if backward_scale is not None:
            run.accelerator.backward(cfg.vf_coef * vl * backward_scale)
            vl = vl.detach()
    # The entropy needs a graph only when it is in the loss. Otherwise the logged entropy is the
    # sampling distribution's, recorded in stage 1 (one (B, V) pass per step instead of (B, T, V) ops in
    # every epoch), or from a detached pass when the experience has none.
    logged = cfg.ent_coef == 0 and mb.entropy is not None
    with_entropy = False if logged else True if cfg.ent_coef > 0 else "detached"
    logprobs, entropy, values = run.actor(*scored, run.stage2_processors(mb.action_masks), with_entropy)
    pg, p_stats = ppo_policy_loss(
        logprobs, mb.old_logprobs, advantages, mb.mask, cfg.clip_eps, cfg.loss_reduction
    )
    if not separate:
        vl, v_stats = value_loss(
            values, mb.old_values, mb.returns, mb.mask, cfg.value_clip, cfg.loss_reduction
        )
    ent, e_stats = entropy_bonus(mb.entropy if logged else entropy, mb.mask, cfg.loss_reduction)
    policy_part = pg + cfg.ent_coef * ent
    loss = policy_part + cfg.vf_coef * vl
    if backward_scale is not None:
        run.accelerator.backward((policy_part if separate else loss) * backward_scale)
        loss = loss.detach()
    stats = {"loss": loss.detach(), "policy_loss": pg.detach(), "value_loss": vl.detach(), **e_stats,
             "clip_fraction": p_stats["clip_fraction"], "approx_kl": p_stats["approx_kl"],
             "ratio_mean": p_stats["ratio_mean"], "ratio_max": p_stats["ratio_max"], "value_clip_fraction": v_stats["clip_fraction"],
             "value_mse": v_stats["mse"]}  # fmt: skip
    return loss, stats


def update(run: Run, exp: Experience, step: int) -> dict[str, float]:
    """``ppo_epochs`` shuffled passes of minibatches over ``exp``; returns the mean stats of the applied steps."""
    cfg, accelerator = run.cfg, run.accelerator
    accum = cfg.optim.grad_accum
    micro = cfg.minibatch_size // accum
    models = [m for m in (run.actor, run.critic) if m is not None]
    policy_params = list(run.policy().parameters())
    critic_params = list(run.critic_module().parameters())
    critic_n = non_embedding_params(run.critic_module()) if run.critic is not None else None
    order_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    totals: dict[str, float] = {}
    applied, ratio_max, stopped = 0, 0.0, False
    for model in models:
        model.train()
    for _epoch in range(cfg.ppo_epochs):
        order = torch.randperm(exp.rows, generator=order_gen)
        for begin in range(0, exp.rows, cfg.minibatch_size):
            rows = order[begin : begin + cfg.minibatch_size]
            mask = exp.mask[rows]
            count = mask.sum() if cfg.loss_reduction == "token_mean" else mask.any(-1).sum()
            advantages = exp.advantages[rows]
            if cfg.whiten_advantages == "minibatch":
                advantages = masked_whiten(advantages, mask)
            stats: dict[str, torch.Tensor] = {}
            for k in range(accum):
                part = slice(k * micro, (k + 1) * micro)
                mb = minibatch(exp, rows[part])
                # micro-batch means weighted by their share: the sum is the minibatch's mean
                weight = (
                    mb.mask.sum() if cfg.loss_reduction == "token_mean" else mb.mask.any(-1).sum()
                ) / count
                with contextlib.ExitStack() as stack:
                    if k < accum - 1:
                        for model in models:
                            stack.enter_context(accelerator.no_sync(model))
                    _, micro_stats = minibatch_loss(run, mb, advantages[part][:, : mb.mask.shape[1]],
                                                    backward_scale=weight)  # fmt: skip
                run.compute.train(int(mb.prompt_mask.sum()), int(mb.mask.sum()))
                if critic_n is not None:  # the separate critic's own forward and backward
                    run.compute.forward(int(mb.prompt_mask.sum() + mb.mask.sum()), critic_n)
                    run.compute.backward(int(mb.prompt_mask.sum() + mb.mask.sum()), critic_n)
                ratio_max = max(ratio_max, float(micro_stats.pop("ratio_max")))
                for name, value in micro_stats.items():
                    stats[name] = stats.get(name, 0) + value * weight
            approx_kl = float(accelerator.reduce(stats["approx_kl"].reshape(1), "mean"))
            if cfg.target_approx_kl is not None and approx_kl > 1.5 * cfg.target_approx_kl:
                run.optimizer.zero_grad(set_to_none=True)  # this minibatch is not applied
                run.critic_optimizer.zero_grad(set_to_none=True)
                stopped = True
                break
            limit = cfg.optim.max_grad_norm or math.inf
            grad_norm = accelerator.clip_grad_norm_(policy_params, limit)
            critic_norm = accelerator.clip_grad_norm_(critic_params, limit)
            check_finite(step + 1, loss=stats["loss"], grad_norm=grad_norm, critic_grad_norm=critic_norm)
            for opt, sched in ((run.optimizer, run.scheduler), (run.critic_optimizer, run.critic_scheduler)):
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            applied += 1
            stats.update(grad_norm=grad_norm, critic_grad_norm=critic_norm)
            for name, value in stats.items():
                totals[name] = totals.get(name, 0.0) + float(value)
        if stopped:
            break
    out = {name: value / max(applied, 1) for name, value in totals.items()}
    out.update(updates=float(applied), early_stopped=float(stopped), ratio_max=ratio_max)
    if accelerator.num_processes > 1:  # each process saw its own rows: report the mean over processes
        names = sorted(out)
        means = accelerator.reduce(torch.tensor([out[n] for n in names], device=accelerator.device), "mean")
        out = dict(zip(names, means.tolist(), strict=True))
        out["ratio_max"] = float(
            accelerator.gather(torch.tensor([ratio_max], device=accelerator.device)).max()
        )
    return out
