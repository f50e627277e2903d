"""REINFORCE (or MRT) with ESRL sampling: online RL of a causal-LM policy on any reward source.

What it does, per optimizer step (Wang et al., "ESRL", AAAI 2024; algorithms.md §3):

1. **Stage 1 — explore without a graph.** For each prompt of the step, K responses are sampled
   under ``no_grad`` with the KV cache (:func:`trainers.rollout.rollout`), keeping the raw per-step
   log-probs.
2. **Score.** The reward source scores the response texts (the task's own reward, VADER, a sequence
   RM or a segment RM; a sequence's reward is the sum of its token rewards). The frozen reference
   (the starting model) scores the same tokens in one teacher-forced pass; the sequence KL
   Σ_t kl(log π, log π_ref) (estimator k1 by default) shapes the score: s = R − β·KL.
3. **Advantages.** s minus a baseline: the group mean of the K samples, leave-one-out (RLOO), a
   running mean, or none; optionally divided by the group's std.
4. **Dynamic sampling** (optional). ``eliminate`` (the released ESRL rule): the ⌈ρ·B⌉ most
   confident samples of each rollout batch are dropped before stage 2. ``adaptive`` (*ours*,
   labelled so: the paper's estimator is not public): a first cheap sample per prompt estimates
   its capability c, which sets that prompt's number of samples k and temperature τ
   (:mod:`trainers.esrl`).
5. **Stage 2 — one pass with a graph.** The kept samples are scored teacher-forced with grad
   (:func:`trainers.teacher_forced.score_tokens`, chunked so the (B, T, V) logits never exist) and
   the REINFORCE loss −(1/B) Σ (s − b)·log p_θ(ŷ|x) — or MRT's expected risk over each group's
   renormalised sample set — is backpropagated, normalised over the whole accumulation window.
   By default the loss uses the raw model distribution (REINFORCE on π_θ, the ESRL code's choice,
   §3.2); ``logprobs_of: sampled`` scores under the temperature/top-k/top-p distribution that drew
   the samples instead.
6. AdamW update; the KL coefficient adapts to ``kl.target`` (per-sequence KL) when one is set.

Phases 1–4 make the step's experience (:mod:`trainers.reinforce_experience`); stage 2, the update and
the loop are here.

Prompts come from a built-in task (:mod:`trainers.tasks`: ``sentiment``, ``synthetic_translation``)
or from a studio ``prompts`` snapshot. Evaluation (:func:`trainers.rl_eval.evaluate_policy`) on the
held-out prompts, at the start, every ``eval_every`` steps and at the end: reward, KL to the
reference, perplexity under the reference, distinct-1/2 (and BLEU with references).

The run guarantees are the other recipes': ``accelerate`` (CPU, one GPU in bf16 autocast, DDP under
``accelerate launch -m trainers reinforce``), randomness as a function of (seed, step), atomic
resumable checkpoints (optimizer, scheduler, KL coefficient, running baseline; a resumed run equals
an uninterrupted one), SIGTERM → checkpoint and exit 143, NaN/inf → failure with the step number,
``metrics.jsonl`` every step (first row ``{"step": start, "run/total_steps": N}``), and the final
policy in ``<output_dir>/final``.

Example (``python -m trainers reinforce --config rl.yaml``)::

    output_dir: runs/reinforce-sentiment
    task: sentiment
    model: smollm2
    group_size: 4
    batch_size: 8            # prompts per micro-batch
    max_steps: 40
    kl: {beta: 0.05, target: 2.0}
    dynamic: {mode: eliminate, eliminate_ratio: 0.3}

Left out on purpose: PPO-style ratios and several updates per rollout (see the ppo recipe), a value
model, per-token advantages from dense rewards (dense rewards are summed per sequence here), a FIFO
baseline, LoRA, and sharded (FSDP/DeepSpeed) saving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainers.checkpoint import (
    find_latest_complete,
    folder_bytes,
    load_training_state,
    prune_checkpoints,
    save_checkpoint,
    step_dir,
)
from trainers.compute import Compute, non_embedding_params
from trainers.config import ConfigError, config_to_dict, run_recipe_cli
from trainers.data import StepSampler, snapshot_sha256
from trainers.metrics import MetricsWriter, check_finite
from trainers.optim import build_optimizer
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
from trainers.reinforce_config import ReinforceConfig
from trainers.reinforce_experience import Experience, advantages, experience, group_starts, row_processors
from trainers.rl_eval import (
    evaluate_policy,
    stop_token_ids,
)
from trainers.rl_math import (
    AdaptiveKLController,
    FixedKLController,
    RunningBaseline,
    duplicate_mask,
    masked_mean,
    masked_sum,
    mrt_loss,
    reinforce_loss,
)
from trainers.rollout import sampling_processors
from trainers.tasks import Task, first_line, get_task, snapshot_task

RECIPE = "reinforce"
CHECKPOINT_KIND = "policy"
"""What ``final/`` is, for the studio's checkpoint registry."""
SNAPSHOT_KINDS = ("prompts",)
"""Dataset snapshot kinds this recipe trains on (optional: without one it uses a built-in task)."""
BASE_KIND = "policy"
"""What the starting model must be: a causal-LM policy."""


@dataclass
class Run:
    """Everything ``setup`` builds for the loop."""

    cfg: ReinforceConfig
    accelerator: Any
    model: Any
    """The prepared :class:`trainers.teacher_forced.TokenScorer` around the policy."""
    reference: Any
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    task: Task
    reward: Any
    kl_control: FixedKLController | AdaptiveKLController
    running: RunningBaseline
    sampler: StepSampler
    eos_ids: list[int]
    total_steps: int
    start_step: int
    tokens: int
    """Response tokens sampled so far (all processes)."""
    resumed_from: Path | None
    metrics: MetricsWriter
    studio: dict[str, Any]
    compute: Compute | None = None
    """Tokens and FLOPs so far (:mod:`trainers.compute`): sampling, reference passes, stage 2."""

    @property
    def policy(self) -> Any:
        """The unwrapped causal LM (stage 1 and evaluation run it directly)."""
        return self.accelerator.unwrap_model(self.model).lm


# ----------------------------------------------------------------------------- setup


def load_task(cfg: ReinforceConfig) -> Task:
    """The prompts: a snapshot when given, else the built-in task."""
    if cfg.snapshot:
        task = snapshot_task(cfg.snapshot, eval_snapshot=cfg.eval_snapshot, eval_fraction=cfg.eval_fraction,
                             seed=cfg.seed)  # fmt: skip
        task = dataclasses.replace(task, train_prompts=task.train_prompts[: cfg.n_train])
    else:
        task = get_task(cfg.task, seed=cfg.seed, n_train=cfg.n_train)
    return dataclasses.replace(task, eval_prompts=task.eval_prompts[: cfg.n_eval],
                               eval_references=task.eval_references and task.eval_references[: cfg.n_eval])  # fmt: skip


def setup(cfg: ReinforceConfig) -> Run:
    """Load prompts, policy, reference and reward; build optimizer and schedule; restore the latest checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from trainers.models import resolve_model
    from trainers.teacher_forced import TokenScorer

    hf_logging.disable_progress_bar()
    accelerator, precision = make_accelerator(cfg.mixed_precision, cfg.cpu)
    out = Path(cfg.output_dir)
    clean_run_folder(accelerator, out)
    try:
        task = load_task(cfg)
    except ValueError as exc:
        raise ConfigError(
            cfg.snapshot or "<config>", "snapshot" if cfg.snapshot else "n_train", str(exc)
        ) from exc
    studio: dict[str, Any] = {
        "recipe": RECIPE,
        "kind": CHECKPOINT_KIND,
        "config": config_to_dict(cfg),
        "snapshot_sha256": snapshot_sha256(cfg.snapshot) if cfg.snapshot else None,
        "eval_snapshot_sha256": snapshot_sha256(cfg.eval_snapshot) if cfg.eval_snapshot else None,
        "world_size": accelerator.num_processes,
    }
    base = resolve_model(cfg.model, Path(cfg.model_cache) if cfg.model_cache else None)
    studio["parent"] = {"model": cfg.model, "path": str(base)}
    latest = find_latest_complete(out / "checkpoints")
    state = None
    if latest is not None:
        check_resumable(cfg.output_dir, cfg.resume, latest, studio,
                        harmless=HARMLESS_FIELDS | {"chunk_steps", "n_eval", "eval_at_start"})  # fmt: skip
        state = load_training_state(latest)
    torch.manual_seed(cfg.seed)
    lm = AutoModelForCausalLM.from_pretrained(latest or base, dtype=torch.float32, use_safetensors=True)
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True)
    reference.requires_grad_(False).eval()
    tokenizer = AutoTokenizer.from_pretrained(latest or base)
    if cfg.disable_dropout:
        for module in [*lm.modules(), *reference.modules()]:
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    global_batch = cfg.batch_size * cfg.optim.grad_accum * accelerator.num_processes
    if global_batch > len(task.train_prompts):
        raise ConfigError("<config>", "batch_size",
                          f"one step needs {global_batch} prompts (batch_size × grad_accum × processes) "
                          f"but there are {len(task.train_prompts)} training prompts")  # fmt: skip
    sampler = StepSampler(len(task.train_prompts), global_batch, cfg.seed)
    model = TokenScorer(lm, chunk_steps=cfg.chunk_steps)
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.max_steps)
    kl_control: FixedKLController | AdaptiveKLController = (
        AdaptiveKLController(cfg.kl.beta, cfg.kl.target, gain=cfg.kl.gain)
        if cfg.kl.target is not None and cfg.kl.beta > 0 else FixedKLController(cfg.kl.beta)
    )  # fmt: skip
    running = RunningBaseline(alpha=cfg.running_alpha)
    start_step, tokens = 0, 0
    compute = Compute.from_state(state and state.get("compute"), non_embedding_params(lm))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step, tokens = int(state["step"]), int(state["tokens"])
        kl_control.beta, running.value = float(state["beta"]), state["running_baseline"]
    model, optimizer = accelerator.prepare(model, optimizer)
    reference.to(accelerator.device)
    reward = task.reward(tokenizer, cfg.reward, device=str(accelerator.device))
    eos_ids = stop_token_ids(tokenizer, lm, stop_at_newline=task.stop_at_newline)
    info(accelerator,
         f"{RECIPE}: task {task.name}, {len(task.train_prompts)} train / {len(task.eval_prompts)} held-out prompts, "
         f"{cfg.max_steps} steps of {global_batch} prompts × {cfg.group_size} samples on {accelerator.device} "
         f"({precision}), loss {cfg.loss}, dynamic sampling {cfg.dynamic.mode}"
         + (f", resuming from {latest.name}" if latest else ""))  # fmt: skip
    metrics = MetricsWriter(out / "metrics.jsonl", resume_step=start_step if latest else None,
                            enabled=accelerator.is_main_process)  # fmt: skip
    return Run(cfg, accelerator, model, reference, tokenizer, optimizer, scheduler, task, reward, kl_control, running,
               sampler, eos_ids, cfg.max_steps, start_step, tokens, latest, metrics, studio, compute)  # fmt: skip


# ----------------------------------------------------------------------------- stage 2


def loss_and_stats(
    run: Run, exp: Experience, denominator: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Phase 5 for one rollout batch: teacher-forced log-probs of the kept rows with grad, and the
    loss scaled so that summing it over the micro-batches gives the step's mean (``denominator``:
    kept samples, kept tokens or groups of the whole step)."""
    cfg = run.cfg
    idx = exp.keep.nonzero().squeeze(-1)
    width = max(int(exp.response_mask[idx].sum(-1).max()), 1)
    mask = exp.response_mask[idx, :width]
    processors = []
    if cfg.logprobs_of == "sampled":
        temperatures = None if exp.temperatures is None else exp.temperatures[idx]
        processors = row_processors(cfg, temperatures) + sampling_processors(cfg.sampling, run.eos_ids)
    with run.accelerator.autocast():
        scores = run.model(exp.prompt_ids[idx], exp.prompt_mask[idx], exp.response_ids[idx, :width], mask,
                           processors, with_entropy="detached")  # fmt: skip
    logprobs = scores.logprobs.float()
    run.compute.train(int(exp.prompt_mask[idx].sum()), int(mask.sum()))
    stats = {"entropy": masked_mean(scores.entropy.detach().float(), mask)}
    if cfg.loss == "reinforce":
        loss, parts = reinforce_loss(logprobs, mask, exp.advantages[idx], reduction=cfg.reduction)
        share = len(idx) if cfg.reduction == "sequence" else int(mask.sum())
        return loss * share / denominator, {**stats, **parts}
    # MRT: Q over each group's kept (with mrt_dedup: distinct) samples; a group with none kept is skipped.
    sequence_logp = masked_sum(logprobs, mask, dim=-1)
    total, risks = logprobs.new_zeros(()), []
    for first, last in groups_of_kept(exp):
        members = idx[first:last]
        n = last - first
        distinct = duplicate_mask(exp.response_ids[members], exp.response_mask[members], n)
        kept = distinct if cfg.mrt_dedup else torch.ones_like(distinct)
        risk, _ = mrt_loss(sequence_logp[first:last], exp.shaped[members], n, cfg.mrt_alpha, kept)
        total = total + risk
        risks.append(risk.detach())
    stats["logp_mean"] = sequence_logp.detach().mean()
    stats["risk"] = torch.stack(risks).mean()
    return total / denominator, stats


def groups_of_kept(exp: Experience) -> list[tuple[int, int]]:
    """[first, last) positions, among the kept rows, of each group that kept at least one row."""
    out, position = [], 0
    for start, k in zip(group_starts(exp.sizes), exp.sizes, strict=True):
        n = int(exp.keep[start : start + k].sum())
        if n:
            out.append((position, position + n))
        position += n
    return out


def step_denominator(cfg: ReinforceConfig, batch: list[Experience]) -> float:
    """What the step's loss is averaged over: kept samples, kept response tokens, or MRT groups."""
    if cfg.loss == "mrt":
        return float(max(sum(len(groups_of_kept(e)) for e in batch), 1))
    if cfg.reduction == "sequence":
        return float(max(sum(int(e.keep.sum()) for e in batch), 1))
    return float(max(sum(int(e.response_mask[e.keep].sum()) for e in batch), 1))


# ----------------------------------------------------------------------------- evaluation and checkpoints


def evaluate(run: Run) -> dict[str, float]:
    """Held-out reward, KL, perplexity, distinct-n (and BLEU) on the main process → ``eval/…``."""
    task, cfg = run.task, run.cfg
    out: dict[str, float] = {}
    if task.eval_prompts and cfg.n_eval and run.accelerator.is_main_process:
        with run.accelerator.autocast():
            out = evaluate_policy(run.policy, run.reference, run.tokenizer, task.eval_prompts, run.reward,
                                  cfg.sampling, cfg.eval_batch_size, task.eval_references, seed=cfg.seed,
                                  max_prompt_tokens=cfg.max_prompt_tokens, stop_at_newline=task.stop_at_newline,
                                  answer=first_line if task.stop_at_newline else str.strip,
                                  chunk_steps=cfg.chunk_steps)  # fmt: skip
    run.accelerator.wait_for_everyone()
    return out


def save(run: Run, step: int, metrics: dict[str, float], *, final: bool) -> Path:
    """Write ``checkpoints/step-N`` (resumable) or ``final`` (policy only) from the main process."""
    accelerator = run.accelerator
    out = Path(run.cfg.output_dir)
    dest = out / "final" if final else step_dir(out / "checkpoints", step)
    state_dict = {k.removeprefix("lm."): v for k, v in accelerator.get_state_dict(run.model).items()}
    if accelerator.is_main_process:
        studio = {**run.studio, "step": step, "final": final, "metrics": metrics,
                  "extra": {"task": run.task.name, "kl_beta": run.kl_control.beta, "sampled_tokens": run.tokens,
                            "compute": run.compute.as_dict()}}  # fmt: skip
        resume_state = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                        "step": step, "tokens": run.tokens, "beta": run.kl_control.beta,
                        "running_baseline": run.running.value, "compute": run.compute.state()}  # fmt: skip
        previous = find_latest_complete(out / "checkpoints")
        params = sum(p.numel() * p.element_size() for p in run.model.parameters())
        save_checkpoint(dest, model=run.policy, tokenizer=run.tokenizer, studio=studio, state_dict=state_dict,
                        training_state=None if final else resume_state,
                        expected_bytes=folder_bytes(previous) if previous else 3 * params)  # fmt: skip
        if not final:
            prune_checkpoints(out / "checkpoints", run.cfg.keep_checkpoints)
    accelerator.wait_for_everyone()
    return dest


# ----------------------------------------------------------------------------- the loop


def train(cfg: ReinforceConfig, *, should_stop: Callable[[int], bool] | None = None) -> TrainResult:
    """Train (or resume) to ``max_steps``; ``should_stop(step)`` after a step checkpoints and stops."""
    started = time.perf_counter()
    run = setup(cfg)
    accelerator, model, optimizer = run.accelerator, run.model, run.optimizer
    world, rank, accum = accelerator.num_processes, accelerator.process_index, cfg.optim.grad_accum
    run.metrics.write(run.start_step, {"run/total_steps": run.total_steps})
    eval_metrics: dict[str, float] = {}
    last_saved = run.resumed_from
    bar = progress_bar(accelerator, run.total_steps, run.start_step, RECIPE, cfg.progress)
    try:
        if cfg.eval_at_start and run.start_step == 0:
            eval_metrics = evaluate(run)
            run.metrics.write(0, eval_metrics)
        step = run.start_step
        while step < run.total_steps:
            # 1. Randomness and prompts: pure functions of (seed, step), so resuming replays them.
            torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)
            timer = time.perf_counter()
            batch = []
            for micro in range(accum):
                index = run.sampler.micro_batch(step, rank=rank, world_size=world, micro=micro,
                                                micro_batch_size=cfg.batch_size)  # fmt: skip
                # 2. Stage 1 (no graph), rewards, reference KL, shaped scores, elimination.
                batch.append(experience(run, [run.task.train_prompts[i] for i in index]))
            # 3. Advantages: shaped score minus the baseline, per group.
            for exp in batch:
                exp.advantages = advantages(run, exp)
            rollout_s, timer = time.perf_counter() - timer, time.perf_counter()
            # 4. Stage 2 with grad, one micro-batch at a time; the loss averages over the whole step.
            denominator = step_denominator(cfg, batch)
            model.train()
            totals: dict[str, float] = {}
            for micro, exp in enumerate(batch):
                sync = micro == accum - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    loss, stats = loss_and_stats(run, exp, denominator)
                    accelerator.backward(loss)
                totals["loss"] = totals.get("loss", 0.0) + float(loss.detach())
                for name, value in stats.items():
                    totals[name] = totals.get(name, 0.0) + float(value) / accum
            # 5. Update: clip, step, schedule; then adapt β to the observed KL.
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm or math.inf)
            check_finite(step + 1, loss=totals["loss"], grad_norm=grad_norm)
            lr = run.scheduler.get_last_lr()[0]
            optimizer.step()
            run.scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            update_s = time.perf_counter() - timer
            run.compute.settle(accelerator)
            values = step_metrics(run, batch, totals)
            beta = run.kl_control.beta
            run.kl_control.update(values["train/kl"])
            run.tokens += int(values["train/step_tokens"])
            step += 1
            bar.update(1)
            # 6. Log, evaluate, checkpoint.
            if step % cfg.log_every == 0 or step == run.total_steps:
                values.update({"train/beta": beta, "train/grad_norm": float(grad_norm), "train/lr": lr,
                               "train/tokens": run.tokens, "time/rollout_s": rollout_s, "time/update_s": update_s,
                               **run.compute.metrics()})  # fmt: skip
                run.metrics.write(step, values)
                bar.set_postfix(reward=f"{values['train/reward']:.3f}", kl=f"{values['train/kl']:.2f}")
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
        bar.close()
        run.metrics.close()


TOTALS = ("samples", "step_tokens")
"""Step metrics summed over processes (the others are averaged)."""


def step_metrics(run: Run, batch: list[Experience], totals: dict[str, float]) -> dict[str, float]:
    """``train/…`` values of one step, averaged over all processes."""
    cat = lambda name: torch.cat([getattr(e, name).float() for e in batch])  # noqa: E731
    lengths = torch.cat([e.response_mask.sum(-1).float() for e in batch])
    keep = cat("keep")
    local = {
        "reward": cat("scores").mean(), "reward_std": cat("scores").std() if len(keep) > 1 else keep.new_zeros(()),
        "kl": cat("kl").mean(), "shaped_reward": cat("shaped").mean(), "advantage_abs": cat("advantages").abs().mean(),
        "response_tokens": lengths.mean(), "eos_fraction": cat("eos").mean(), "kept_fraction": keep.mean(),
        "samples": keep.new_tensor(float(len(keep))), "step_tokens": lengths.sum(),
    }  # fmt: skip
    if batch[0].temperatures is not None:
        local["temperature"] = cat("temperatures").mean()
    local.update(
        {name: torch.tensor(value) for name, value in totals.items()}
    )  # loss parts: mean of processes
    out: dict[str, float] = {}
    for name, value in local.items():
        reduced = run.accelerator.reduce(value.reshape(1).to(run.accelerator.device), "mean")
        out[f"train/{name}"] = float(reduced) * (run.accelerator.num_processes if name in TOTALS else 1)
    return out


CONFIG_CLASS = ReinforceConfig
"""The config dataclass (``python -m trainers --schema`` builds the studio's form from it)."""


def main(argv: list[str] | None = None) -> int:
    """``python -m trainers reinforce --config cfg.yaml [--set key=value ...]``."""
    return run_recipe_cli(ReinforceConfig, train, RECIPE, argv)


if __name__ == "__main__":
    raise SystemExit(main())
