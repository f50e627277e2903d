"""Proximal Policy Optimisation for a causal-LM policy (Schulman et al. 2017; RL4LMs' token-level MDP).

What one iteration does (algorithms.md §1.3–§1.6, §4.6):

1. **Rollout** (ESRL stage 1, :func:`trainers.rollout.rollout`): ``prompts_per_iteration`` prompts
   (× ``samples_per_prompt``) are sampled under ``no_grad`` with the KV cache. Each token's
   log-prob under the distribution it was actually drawn from (temperature, top-k, top-p, EOS
   rules — and in NLPO the action mask) is kept as π_old: no top-k mismatch (§1.12). The raw
   model's log-probs are kept for the KL.
2. **Score**: the reward source scores the response texts (task reward, VADER, a sequence RM, or
   a segment RM's dense rewards), aligned onto the sampled tokens (:func:`trainers.rl_eval.reward_tensor`);
   the frozen reference scores the tokens (stage 2, no grad); the critic gives V(s_t).
3. **Shape**: r_t = clip(R_t) − β·kl_t (k1 by default, from raw log-probs), GAE(γ, λ), advantages
   whitened over the rollout; the KL controller then adapts β to the rollout's mean k1 per token
   (fixed, RL4LMs ±2 %/iteration, or Ziegler's horizon rule).
4. **Update** (:mod:`trainers.ppo_update`): ``ppo_epochs`` passes over shuffled minibatches of whole
   sequences (per-token masks, OpenRLHF style): teacher-forced log-probs and entropies of the same processed distribution
   (stage 2, chunked, with grad), clipped surrogate, clipped value loss, entropy bonus; optional early
   stop when the approximate KL to π_old passes 1.5 × ``target_approx_kl``. Policy and critic have
   their own AdamW (and learning rate); each gradient norm is clipped separately.
5. **Log, evaluate, checkpoint.**

The critic is a separate trunk + value head, or a value head on the policy's trunk (``critic``).
NLPO (:mod:`trainers.recipes.nlpo`) is this loop with an :class:`ActionMasking` hook.

Guarantees (as the other recipes): ``accelerate`` (CPU, one GPU with bf16 autocast, DDP under
``accelerate launch -m trainers ppo``), every random choice a pure function of (seed, iteration) —
prompt order, per-row sampling streams (batch- and world-size invariant), minibatch order —,
atomic resumable checkpoints with optimizers, schedulers, critic, β (and the NLPO mask model), so a
resumed run equals an uninterrupted one; SIGTERM → checkpoint and exit 143; NaN/inf → exit 3 with
the iteration; ``metrics.jsonl`` every iteration (first row ``{"step": start, "run/total_steps": N}``);
``final/`` is the policy alone, loadable with ``AutoModelForCausalLM.from_pretrained``.

Example (``python -m trainers ppo --config ppo.yaml``)::

    output_dir: runs/ppo-sentiment
    task: sentiment
    iterations: 40
    sampling: {max_new_tokens: 24}
    kl: {beta: 0.1, target: 0.1}

Left out on purpose: token-level (flattened) minibatches of RL4LMs (we batch whole sequences; same
per-token loss), reward normalisation across the buffer, LoRA, FSDP/DeepSpeed, recomputing π_old
teacher-forced (in bf16 the ratio therefore starts within rounding of 1, not exactly 1).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from trainers.actor_critic import ActorCritic, ValueModel
from trainers.checkpoint import (
    TRAINING_STATE,
    find_latest_complete,
    folder_bytes,
    load_training_state,
    prune_checkpoints,
    step_dir,
    write_checkpoint,
)
from trainers.compute import Compute, non_embedding_params
from trainers.config import ConfigError, config_to_dict, run_recipe_cli
from trainers.data import StepSampler, snapshot_sha256
from trainers.metrics import MetricsWriter, check_finite
from trainers.optim import build_optimizer
from trainers.ppo_config import KLConfig, PPOConfig, PPOOptimConfig
from trainers.ppo_experience import Experience, cat_parts, rollout_metrics, shape_experience
from trainers.ppo_update import minibatch_loss as minibatch_loss  # re-exported (tests score one minibatch)
from trainers.ppo_update import update
from trainers.recipe_common import (
    HARMLESS_FIELDS,
    TrainResult,
    asked_to_stop,
    check_resumable,
    clean_run_folder,
    evaluation_due,
    info,
    make_accelerator,
    progress_bar,
    step_actions,
    train_result,
)
from trainers.rl_eval import (
    encode_prompts,
    evaluate_policy,
    pad_token_id,
    response_texts,
    reward_tensor,
    row_generators,
    stop_token_ids,
)
from trainers.rl_math import AdaptiveKLController, FixedKLController
from trainers.rollout import LogitsProcessor, left_pad, rollout, sampling_processors
from trainers.tasks import Task, first_line, get_task, snapshot_task
from trainers.teacher_forced import score_tokens

__all__ = ["KLConfig", "PPOConfig", "PPOOptimConfig", "main", "train"]

RECIPE = "ppo"
CHECKPOINT_KIND = "policy"
"""What ``final/`` is, for the studio's checkpoint registry."""
SNAPSHOT_KINDS = ("prompts",)
"""Dataset snapshot kinds this recipe takes (optional: without one it trains on a built-in task)."""
CRITIC_FILE = "critic.safetensors"
"""The critic's weights in a step checkpoint (the value head, or the separate trunk and head)."""
EVAL_SEED_OFFSET = 1_000
"""Evaluation samples with seed + this, fixed over the run, so every evaluation sees the same noise."""


class ActionMasking(Protocol):
    """A per-step action mask applied while sampling and replayed in the update (NLPO's hook)."""

    def processor(self) -> Any:
        """A fresh stage-1 :class:`trainers.rollout.SequenceProcessor` for one rollout call; after the
        call its ``masks()`` returns the (B, T, V) bool masks it applied."""
        ...

    def replay(self, masks: torch.Tensor) -> LogitsProcessor:
        """The stage-2 processor applying the recorded (b, T, V) ``masks`` to the same rows."""
        ...

    def after_rollout(self, iteration: int, policy: torch.nn.Module) -> dict[str, float]:
        """Called after the rollout of 1-based ``iteration``, before its update; returns metrics."""
        ...

    def save(self, folder: Path) -> None: ...

    def load(self, folder: Path) -> None: ...


@dataclass
class Run:
    """Everything ``setup`` builds for the loop."""

    cfg: PPOConfig
    recipe: str
    accelerator: Any
    actor: Any
    """The prepared :class:`ActorCritic` (policy, and the value head when the trunk is shared)."""
    critic: Any
    """The prepared separate :class:`ValueModel`, or None."""
    reference: Any
    tokenizer: Any
    optimizer: Any
    critic_optimizer: Any
    scheduler: Any
    critic_scheduler: Any
    kl_controller: FixedKLController | AdaptiveKLController
    masking: ActionMasking | None
    task: Task
    reward: Any
    prompt_ids: list[list[int]]
    """Token ids of every training prompt."""
    sampler: StepSampler
    """Which prompts each iteration takes."""
    stop_ids: list[int]
    stop_at_newline: bool
    pad_id: int
    total_steps: int
    start_step: int
    tokens: int
    resumed_from: Path | None
    metrics: MetricsWriter
    studio: dict[str, Any]
    compute: Compute | None = None
    """Tokens and FLOPs so far (:mod:`trainers.compute`): rollouts, reference and critic passes, updates."""

    @property
    def local_rows(self) -> int:
        return self.cfg.prompts_per_iteration * self.cfg.samples_per_prompt // self.accelerator.num_processes

    def policy(self) -> Any:
        """The unwrapped policy LM (for sampling and saving)."""
        return self.accelerator.unwrap_model(self.actor).lm

    def critic_module(self) -> torch.nn.Module:
        """What holds the critic's weights: the separate value model, or the shared value head."""
        if self.critic is not None:
            return self.accelerator.unwrap_model(self.critic)
        return self.accelerator.unwrap_model(self.actor).value

    def stage2_processors(self, masks: torch.Tensor | None) -> list[LogitsProcessor]:
        """Processors that reproduce the sampling distribution for rows with recorded ``masks``."""
        chain = [self.masking.replay(masks)] if self.masking is not None and masks is not None else []
        return chain + sampling_processors(self.cfg.sampling, self.stop_ids)


# ----------------------------------------------------------------------------- setup


def load_task(cfg: PPOConfig) -> Task:
    """The built-in task, or the prompts snapshot as a task (then the reward must not be ``task``)."""
    if cfg.snapshot:  # a bad snapshot raises SnapshotError naming the file and row
        return snapshot_task(cfg.snapshot, eval_snapshot=cfg.eval_snapshot, eval_fraction=cfg.eval_fraction,
                             seed=cfg.seed)  # fmt: skip
    try:
        task = get_task(cfg.task, seed=cfg.seed, n_train=None, n_eval=None)
    except ValueError as exc:
        raise ConfigError("<config>", "task", str(exc)) from exc
    n_train = len(task.train_prompts) if cfg.n_train is None else min(cfg.n_train, len(task.train_prompts))
    n_eval = min(cfg.n_eval, len(task.eval_prompts))
    return get_task(cfg.task, seed=cfg.seed, n_train=n_train, n_eval=n_eval)


def setup(cfg: PPOConfig, *, recipe: str = RECIPE,
          make_masking: Callable[[Any, Any], ActionMasking] | None = None) -> Run:  # fmt: skip
    """Load task, policy, reference and critic; build optimizers; restore the latest checkpoint.

    ``make_masking(policy_lm, tokenizer)`` builds NLPO's mask hook (None: plain PPO).
    """
    from safetensors.torch import load_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from trainers.models import resolve_model

    hf_logging.disable_progress_bar()
    accelerator, precision = make_accelerator(cfg.mixed_precision, cfg.cpu)
    out = Path(cfg.output_dir)
    clean_run_folder(accelerator, out)
    world = accelerator.num_processes
    rows = cfg.prompts_per_iteration * cfg.samples_per_prompt
    if rows % world or (rows // world) % cfg.minibatch_size:
        raise ConfigError("<config>", "minibatch_size",
                          f"an iteration's {rows} rows split over {world} process(es) must fill whole minibatches "
                          f"of {cfg.minibatch_size}")  # fmt: skip
    task = load_task(cfg)
    if cfg.prompts_per_iteration > len(task.train_prompts):
        raise ConfigError("<config>", "prompts_per_iteration",
                          f"{cfg.prompts_per_iteration} exceeds the {len(task.train_prompts)} training prompts")  # fmt: skip
    studio: dict[str, Any] = {
        "recipe": recipe,
        "kind": CHECKPOINT_KIND,
        "config": config_to_dict(cfg),
        "snapshot_sha256": snapshot_sha256(cfg.snapshot) if cfg.snapshot else None,
        "eval_snapshot_sha256": snapshot_sha256(cfg.eval_snapshot) if cfg.eval_snapshot else None,
        "world_size": world,
    }

    # Models: the policy from the latest checkpoint when resuming; the reference is always the start.
    base = resolve_model(cfg.model, Path(cfg.model_cache) if cfg.model_cache else None)
    studio["parent"] = {"model": cfg.model, "path": str(base)}
    latest = find_latest_complete(out / "checkpoints")
    state = None
    if latest is not None:
        harmless = HARMLESS_FIELDS | {"chunk_steps", "n_eval", "eval_at_start", "rollout_batch_size"}
        check_resumable(cfg.output_dir, cfg.resume, latest, studio, harmless=harmless)
        state = load_training_state(latest)  # verifies every file's sha256 before anything is loaded
    torch.manual_seed(cfg.seed)
    lm = AutoModelForCausalLM.from_pretrained(latest or base, dtype=torch.float32, use_safetensors=True)
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(latest or base)
    reference.requires_grad_(False).eval()
    actor = ActorCritic(lm, shared_value=cfg.critic == "shared", chunk_steps=cfg.chunk_steps)
    critic = None
    if cfg.critic == "separate":
        source = base if cfg.critic_model is None else resolve_model(cfg.critic_model, None)
        critic = ValueModel.from_pretrained(source)
    for module in (lm, reference, critic):
        if cfg.disable_dropout and module is not None:
            for layer in module.modules():
                if isinstance(layer, torch.nn.Dropout):
                    layer.p = 0.0
    critic_module = critic if critic is not None else actor.value
    masking = make_masking(lm, tokenizer) if make_masking is not None else None
    if latest is not None:
        load_model(critic_module, latest / CRITIC_FILE)
        if masking is not None:
            masking.load(latest)

    # Optimizers over all optimizer steps of the run; β from the checkpoint.
    steps_per_iteration = cfg.ppo_epochs * (rows // world) // cfg.minibatch_size
    total_updates = cfg.iterations * steps_per_iteration
    optimizer, scheduler = build_optimizer(lm, cfg.optim, total_updates)
    critic_optim = dataclasses.replace(cfg.optim, lr=cfg.critic_lr or cfg.optim.lr)
    critic_optimizer, critic_scheduler = build_optimizer(critic_module, critic_optim, total_updates)
    kl = cfg.kl
    controller = (FixedKLController(kl.beta) if kl.target is None
                  else AdaptiveKLController(kl.beta, kl.target, horizon=kl.horizon))  # fmt: skip
    start_step, tokens = 0, 0
    compute = Compute.from_state(state and state.get("compute"), non_embedding_params(lm))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        critic_optimizer.load_state_dict(state["critic_optimizer"])
        critic_scheduler.load_state_dict(state["critic_scheduler"])
        start_step, tokens, controller.beta = int(state["step"]), int(state["tokens"]), float(state["beta"])
    if critic is not None:
        actor, critic, optimizer, critic_optimizer = accelerator.prepare(
            actor, critic, optimizer, critic_optimizer
        )
    else:
        actor, optimizer, critic_optimizer = accelerator.prepare(actor, optimizer, critic_optimizer)
    reference.to(accelerator.device)

    pad_id = pad_token_id(tokenizer)
    stop_at_newline = task.stop_at_newline if cfg.stop_at_newline is None else cfg.stop_at_newline
    stop_ids = stop_token_ids(tokenizer, lm, stop_at_newline=stop_at_newline)
    reward = task.reward(tokenizer, cfg.reward, device=str(accelerator.device))
    prompt_ids = encode_prompts(tokenizer, task.train_prompts, cfg.max_prompt_tokens)
    sampler = StepSampler(len(prompt_ids), cfg.prompts_per_iteration, cfg.seed)
    info(accelerator,
         f"{recipe}: {len(prompt_ids)} train / {len(task.eval_prompts)} held-out prompts ({task.name}), "
         f"{cfg.iterations} iterations of {rows} rollouts × {cfg.ppo_epochs} epochs on {accelerator.device} "
         f"({precision}, {cfg.critic} critic)" + (f", resuming from {latest.name}" if latest else ""))  # fmt: skip
    metrics = MetricsWriter(out / "metrics.jsonl", resume_step=start_step if latest else None,
                            enabled=accelerator.is_main_process)  # fmt: skip
    return Run(cfg, recipe, accelerator, actor, critic, reference, tokenizer, optimizer, critic_optimizer, scheduler,
               critic_scheduler, controller, masking, task, reward, prompt_ids, sampler, stop_ids, stop_at_newline, pad_id,
               cfg.iterations, start_step, tokens, latest, metrics, studio, compute)  # fmt: skip


# ----------------------------------------------------------------------------- 1–2. rollout and scores


def iteration_rows(run: Run, step: int) -> list[tuple[int, int]]:
    """This process's rows of iteration ``step``: (global row index, prompt index), prompt-major."""
    cfg, rank = run.cfg, run.accelerator.process_index
    prompts = run.sampler.indices(step)
    rows = [(step * len(prompts) * cfg.samples_per_prompt + j * cfg.samples_per_prompt + s, p)
            for j, p in enumerate(prompts) for s in range(cfg.samples_per_prompt)]  # fmt: skip
    return rows[rank * run.local_rows : (rank + 1) * run.local_rows]


@torch.no_grad()
def collect(run: Run, step: int) -> Experience:
    """Sample this process's rows of iteration ``step`` and score them (reward, reference, critic)."""
    cfg, accelerator, device = run.cfg, run.accelerator, run.accelerator.device
    rows = iteration_rows(run, step)
    all_ids, all_mask = left_pad([run.prompt_ids[p] for _, p in rows], run.pad_id)
    policy, actor = run.policy(), run.accelerator.unwrap_model(run.actor)
    critic_n = non_embedding_params(run.critic_module()) if run.critic is not None else None
    policy.eval()
    parts = []
    for begin in range(0, len(rows), cfg.rollout_batch_size):
        chunk = rows[begin : begin + cfg.rollout_batch_size]
        ids, mask = (
            all_ids[begin : begin + len(chunk)].to(device),
            all_mask[begin : begin + len(chunk)].to(device),
        )
        recorder = run.masking.processor() if run.masking is not None else None
        with accelerator.autocast():
            batch = rollout(policy, ids, mask, cfg.sampling, eos_token_ids=run.stop_ids, pad_token_id=run.pad_id,
                            processors=[recorder] if recorder is not None else (),
                            generator=row_generators(cfg.seed, [g for g, _ in chunk]),
                            return_logprobs=True, return_raw_logprobs=True, return_entropy=True)  # fmt: skip
            scored = (ids, mask, batch.response_ids, batch.response_mask)
            ref = score_tokens(run.reference, *scored, chunk_steps=cfg.chunk_steps).logprobs
            if run.critic is not None:
                values = run.accelerator.unwrap_model(run.critic)(*scored)
            else:
                values = actor.values(*scored)
        p_tokens, r_tokens = int(mask.sum()), int(batch.response_mask.sum())
        run.compute.generate(p_tokens, r_tokens, len(chunk))
        if recorder is not None:  # NLPO's mask model follows the rollout with its own forwards
            run.compute.forward(p_tokens + r_tokens - len(chunk))
        run.compute.forward(p_tokens + r_tokens)  # reference
        run.compute.forward(p_tokens + r_tokens, critic_n)  # critic values (shared: the policy's trunk)
        texts = response_texts(run.tokenizer, batch)
        prompts = [run.task.train_prompts[p] for _, p in chunk]
        task_rewards, scores = reward_tensor(run.tokenizer, run.reward.score(prompts, texts), texts, batch)
        parts.append(Experience(
            prompt_ids=ids, prompt_mask=mask, response_ids=batch.response_ids, mask=batch.response_mask,
            old_logprobs=batch.logprobs, raw_logprobs=batch.raw_logprobs, ref_logprobs=ref.float(),
            old_values=values.float(), task_rewards=task_rewards, scores=scores, eos=batch.eos,
            action_masks=recorder.masks() if recorder is not None else None, entropy=batch.entropy))  # fmt: skip
    policy.train()
    return cat_parts(parts, run.pad_id)


# ----------------------------------------------------------------------------- evaluation and checkpoints


def evaluate(run: Run) -> dict[str, float]:
    """Held-out reward, KL, perplexity, distinct-n (and BLEU) of the current policy → ``eval/…`` (main process)."""
    cfg, task = run.cfg, run.task
    metrics: dict[str, float] = {}
    if run.accelerator.is_main_process and task.eval_prompts:
        with run.accelerator.autocast():
            metrics = evaluate_policy(
                run.policy(), run.reference, run.tokenizer, task.eval_prompts, run.reward, cfg.sampling,
                cfg.eval_batch_size, task.eval_references, seed=cfg.seed + EVAL_SEED_OFFSET,
                max_prompt_tokens=cfg.max_prompt_tokens, stop_at_newline=run.stop_at_newline,
                answer=first_line if task.eval_references else str.strip, chunk_steps=cfg.chunk_steps,
            )  # fmt: skip
    run.accelerator.wait_for_everyone()
    return metrics


def save(run: Run, step: int, metrics: dict[str, float], *, final: bool) -> Path:
    """Write ``checkpoints/step-N`` (resumable: policy, critic, mask model, optimizers, β) or ``final``."""
    from safetensors.torch import save_model

    accelerator = run.accelerator
    out = Path(run.cfg.output_dir)
    dest = out / "final" if final else step_dir(out / "checkpoints", step)
    state_dict = {k.removeprefix("lm."): v for k, v in accelerator.get_state_dict(run.actor).items()
                  if k.startswith("lm.")}  # fmt: skip
    if accelerator.is_main_process:
        studio = {**run.studio, "step": step, "final": final, "metrics": metrics,
                  "extra": {"kl_beta": run.kl_controller.beta, "train_tokens": run.tokens,
                            "compute": run.compute.as_dict()}}  # fmt: skip
        resume_state = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                        "critic_optimizer": run.critic_optimizer.state_dict(),
                        "critic_scheduler": run.critic_scheduler.state_dict(),
                        "step": step, "tokens": run.tokens, "beta": float(run.kl_controller.beta),
                        "compute": run.compute.state()}  # fmt: skip

        def write(tmp: Path) -> None:
            run.policy().save_pretrained(tmp, state_dict=state_dict)
            run.tokenizer.save_pretrained(tmp)
            if not final:
                save_model(run.critic_module(), str(tmp / CRITIC_FILE))
                if run.masking is not None:
                    run.masking.save(tmp)
                torch.save(resume_state, tmp / TRAINING_STATE)

        previous = find_latest_complete(out / "checkpoints")
        params = sum(p.numel() * p.element_size() for p in run.actor.parameters())
        write_checkpoint(
            dest, write, studio, expected_bytes=folder_bytes(previous) if previous else 4 * params
        )
        if not final:
            prune_checkpoints(out / "checkpoints", run.cfg.keep_checkpoints)
    accelerator.wait_for_everyone()
    return dest


# ----------------------------------------------------------------------------- the loop


def train(cfg: PPOConfig, *, should_stop: Callable[[int], bool] | None = None, recipe: str = RECIPE,
          make_masking: Callable[[Any, Any], ActionMasking] | None = None) -> TrainResult:  # fmt: skip
    """Train (or resume) to ``iterations``; ``should_stop(step)`` after an iteration checkpoints and stops."""
    started = time.perf_counter()
    run = setup(cfg, recipe=recipe, make_masking=make_masking)
    accelerator = run.accelerator
    reduce_sum = (lambda t: accelerator.reduce(t, "sum")) if accelerator.num_processes > 1 else None
    run.metrics.write(run.start_step, {"run/total_steps": run.total_steps})
    eval_metrics: dict[str, float] = {}
    last_saved = run.resumed_from
    bar = None
    try:
        if cfg.eval_at_start and run.resumed_from is None:
            eval_metrics = evaluate(run)
            run.metrics.write(0, eval_metrics)
        bar = progress_bar(accelerator, run.total_steps, run.start_step, recipe, cfg.progress)
        step = run.start_step
        while step < run.total_steps:
            # 1–2. Rollout and scores (reward, reference, critic): this process's rows of the iteration.
            t0 = time.perf_counter()
            exp = collect(run, step)
            # 3. Shape rewards with the current β, GAE, whitening; then adapt β to this rollout's KL.
            beta = run.kl_controller.beta
            exp = shape_experience(exp, beta=beta, estimator=cfg.kl.estimator, gamma=cfg.gamma, lam=cfg.lam,
                                   reward_clip=cfg.reward_clip, whiten=cfg.whiten_advantages, reduce=reduce_sum)  # fmt: skip
            rollout_stats = rollout_metrics(exp, beta, reduce_sum)
            check_finite(step + 1, reward=rollout_stats["reward"], kl=rollout_stats["kl"])
            run.kl_controller.update(
                rollout_stats["kl"], n_steps=cfg.prompts_per_iteration * cfg.samples_per_prompt
            )
            extra = run.masking.after_rollout(step + 1, run.policy()) if run.masking is not None else {}
            t1 = time.perf_counter()
            # 4. PPO epochs over minibatches.
            update_stats = update(run, exp, step)
            run.compute.settle(accelerator)
            tokens = exp.prompt_mask.sum() + exp.mask.sum()
            run.tokens += int(accelerator.reduce(tokens.reshape(1), "sum")) if reduce_sum else int(tokens)
            step += 1
            bar.update(1)
            # 5. Log.
            if step % cfg.log_every == 0 or step == run.total_steps:
                values = {f"train/{k}": v for k, v in {**rollout_stats, **update_stats, **extra}.items()}
                values.update({"train/lr": run.scheduler.get_last_lr()[0], "train/tokens": run.tokens,
                               "time/rollout_s": t1 - t0, "time/update_s": time.perf_counter() - t1,
                               **run.compute.metrics()})  # fmt: skip
                run.metrics.write(step, values)
                bar.set_postfix(reward=f"{rollout_stats['reward']:.3f}", kl=f"{rollout_stats['kl']:.3f}")
            # 6. Evaluate, then checkpoint and stop (recipe_common.step_actions).
            if evaluation_due(step, run.total_steps, cfg.eval_every):
                eval_metrics = evaluate(run)
                run.metrics.write(step, eval_metrics)
            stop = asked_to_stop(accelerator, should_stop, step)
            act = step_actions(step, run.total_steps, cfg.checkpoint_every, stop)
            if act.checkpoint:
                last_saved = save(run, step, eval_metrics, final=False)
            if act.stop:
                return train_result(run, started, step, eval_metrics, last_saved)
        # 7. Final evaluation and policy.
        eval_metrics = evaluate(run)
        run.metrics.write(step, eval_metrics)
        final = save(run, step, eval_metrics, final=True)
        return train_result(run, started, step, eval_metrics, last_saved, final)
    finally:
        if bar is not None:
            bar.close()
        run.metrics.close()


CONFIG_CLASS = PPOConfig
"""The config dataclass (``python -m trainers --schema`` builds the studio's form from it)."""
BASE_KIND = "policy"
"""What the starting model must be: a causal-LM policy."""


def main(argv: list[str] | None = None) -> int:
    """``python -m trainers ppo --config cfg.yaml [--set key=value ...]``."""
    return run_recipe_cli(PPOConfig, train, RECIPE, argv)


if __name__ == "__main__":
    raise SystemExit(main())
