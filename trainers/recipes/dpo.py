"""Direct Preference Optimisation (Rafailov et al. 2023): a causal-LM policy trained on preference pairs.

What it does:

1. Reads a preference snapshot in TRL's columns (``prompt``/``chosen``/``rejected``, plain text or
   conversations, explicit or implicit prompt; :func:`trainers.data.read_preferences`) — the same file
   TRL's ``DPOTrainer`` takes. Plain-text completions get the EOS token appended, as TRL does
   (:mod:`trainers.policy_data`).
2. Loads the policy (default ``smollm2``; any local folder, e.g. a previous policy checkpoint) as
   ``AutoModelForCausalLM`` in float32 and wraps it in :class:`trainers.logprobs.ResponseLogps`: the
   summed log-prob of the response tokens only (prompt tokens are never in the loss), with the LM
   head run only at scored positions, in chunks, so the (B, T, V) logits are never materialised.
3. **Reference log-probs, once.** Before the first step the policy *is* the reference, so the
   log-probs of every training and held-out pair are computed with it (batched, no gradient, in the
   training precision) and kept, (N, 2) floats, in memory and in every step checkpoint. No second
   model is ever loaded; a resumed run takes them from its checkpoint.
4. Each step: chosen and rejected in one forward pass, the sigmoid DPO loss
   −log σ(β[(log π⁺ − log π_ref⁺) − (log π⁻ − log π_ref⁻)]) (:func:`trainers.losses.dpo_loss`,
   optional conservative label smoothing), AdamW with accumulation and clipping.
5. Held-out pairs are scored every ``eval_every`` steps and at the end: loss, reward accuracy
   (implicit rewards β·log π/π_ref), margins, chosen/rejected rewards and log-probs.

The loop and its guarantees are the reward-model recipe's: ``accelerate`` (CPU, one GPU in bf16
autocast, DDP under ``accelerate launch -m trainers dpo``), data order and randomness as functions
of (seed, step), atomic resumable checkpoints (``<output_dir>/checkpoints/step-N`` with optimizer,
scheduler and reference log-probs; a resumed run equals an uninterrupted one), SIGTERM → checkpoint
and exit 143, ``metrics.jsonl`` (first row ``{"step": start, "run/total_steps": N}``), and the final
policy in ``<output_dir>/final``, which loads with plain ``AutoModelForCausalLM.from_pretrained``.

Example (``python -m trainers dpo --config dpo.yaml --set beta=0.2``)::

    snapshot: data/snapshots/preferences.jsonl
    output_dir: runs/dpo-smollm2
    model: smollm2
    batch_size: 8
    max_steps: 200
    optim: {lr: 5.0e-6, warmup_ratio: 0.1}

Left out on purpose: TRL's other loss types (IPO, hinge, robust, …), reference-model syncing
(TR-DPO), the SFT term of RPO, LoRA, FSDP/DeepSpeed sharded saving (DDP only), and dropping pairs
whose prompt fills ``max_length`` (they are truncated, by default on the left, and reported).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from trainers.checkpoint import (
    find_latest_complete,
    folder_bytes,
    load_training_state,
    prune_checkpoints,
    save_checkpoint,
    step_dir,
)
from trainers.compute import Compute, non_embedding_params, text_tokens
from trainers.config import ConfigError, OptimConfig, bounded, run_recipe_cli
from trainers.data import EncodedPair, StepSampler, collate
from trainers.losses import dpo_loss
from trainers.metrics import MetricsWriter, check_finite
from trainers.optim import build_optimizer
from trainers.policy_data import encode_policy_pairs
from trainers.recipe_common import (
    HARMLESS_FIELDS,
    TrainResult,
    asked_to_stop,
    check_resumable,
    clean_run_folder,
    disable_dropout,
    evaluation_due,
    info,
    load_tokenizer,
    make_accelerator,
    plan_steps,
    progress_bar,
    run_metadata,
    shard,
    step_actions,
    train_and_held_out,
    train_result,
)

RECIPE = "dpo"
CHECKPOINT_KIND = "policy"
"""What ``final/`` is, for the studio's checkpoint registry."""
SNAPSHOT_KINDS = ("preferences",)
"""Dataset snapshot kinds (studio export kinds) this recipe trains on: explicit-prompt TRL pairs."""


@dataclass(frozen=True)
class DPOOptimConfig(OptimConfig):
    """AdamW, schedule, clipping and accumulation, with DPO's usual small learning rate."""

    lr: float = bounded(1e-6, gt=0)
    """Peak learning rate (TRL's DPO default; full fine-tuning of small models often uses 1e-6–1e-5)."""


@dataclass(frozen=True)
class DPOConfig:
    """Train a causal-LM policy with DPO on a preference snapshot."""

    snapshot: str
    """Preference snapshot: JSONL, Parquet or a datasets folder in TRL columns (see trainers.data)."""
    output_dir: str
    """Run folder: checkpoints/, final/, metrics.jsonl. Rerunning into it resumes."""
    eval_snapshot: str | None = None
    """Held-out snapshot; when null, ``eval_fraction`` of the pairs are held out by content hash."""
    eval_fraction: float = bounded(0.1, ge=0, lt=1)
    """Share of the snapshot held out when there is no ``eval_snapshot`` (0: no evaluation)."""
    model: str = "smollm2"
    """Starting policy (also the reference): a default model name, a local folder, or a hub id."""
    model_cache: str | None = None
    """Where default models live (default: $STUDIO_MODEL_CACHE or ~/.cache/feedback-studio/models)."""
    beta: float = bounded(0.1, gt=0)
    """β, the strength of the implicit KL penalty: larger keeps the policy closer to the reference."""
    label_smoothing: float = bounded(0.0, ge=0, lt=0.5)
    """Conservative DPO: the assumed fraction of flipped labels (0: plain sigmoid DPO)."""
    max_length: int = bounded(512, ge=8)
    """Tokens per sequence (prompt + response); longer ones are truncated."""
    truncation_side: Literal["left", "right"] = "left"
    """Which end of an over-long sequence to cut: left keeps the end of the response."""
    append_eos: bool = True
    """Append the EOS token to plain-text responses (as TRL does), so the policy learns to stop."""
    batch_size: int = bounded(4, ge=1)
    """Pairs per micro-batch per process."""
    eval_batch_size: int = bounded(16, ge=1)
    """Pairs per forward pass when scoring the reference log-probs and the held-out pairs."""
    max_steps: int = bounded(0, ge=0)
    """Optimizer steps; 0 means ``epochs`` passes over the training pairs."""
    epochs: float = bounded(1.0, gt=0)
    """Passes over the training pairs when ``max_steps`` is 0."""
    optim: DPOOptimConfig = field(default_factory=DPOOptimConfig)
    """AdamW, schedule, clipping, accumulation."""
    eval_every: int = bounded(0, ge=0)
    """Evaluate every N optimizer steps (0: only at the end)."""
    checkpoint_every: int = bounded(0, ge=0)
    """Write a resumable checkpoint every N optimizer steps (0: only the final model)."""
    keep_checkpoints: int = bounded(2, ge=0)
    """How many step checkpoints to keep (0: all)."""
    log_every: int = bounded(1, ge=1)
    """Write training metrics every N optimizer steps."""
    seed: int = 0
    """Seeds the batch order and dropout."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on a GPU that supports it, else full fp32."""
    cpu: bool = False
    """Run on the CPU even when a GPU is present."""
    disable_dropout: bool = True
    """Set every dropout probability to 0 (TRL's DPO default; makes runs reproducible)."""
    logps_chunk_tokens: int = bounded(1024, ge=1)
    """Response tokens per LM-head chunk: bounds the float32 logits in memory to this × vocabulary."""
    resume: bool = True
    """Continue from the latest complete checkpoint in output_dir; false refuses a non-empty run folder."""
    progress: bool = True
    """Show a tqdm progress bar on stderr."""


@dataclass
class Run:
    """Everything ``setup`` builds for the loop."""

    cfg: DPOConfig
    accelerator: Any
    model: Any
    """The prepared :class:`trainers.logprobs.ResponseLogps` around the policy."""
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    train_pairs: list[EncodedPair]
    eval_pairs: list[EncodedPair]
    ref_train: torch.Tensor | None
    """(N, 2) float32 reference log-probs (chosen, rejected) of the training pairs; None until computed."""
    ref_eval: torch.Tensor | None
    """(M, 2) float32, the held-out pairs'."""
    sampler: StepSampler
    total_steps: int
    start_step: int
    tokens: int
    """Tokens (prompt + both responses, no padding) the policy has been trained on so far."""
    resumed_from: Path | None
    metrics: MetricsWriter
    studio: dict[str, Any]
    """The studio.json fields every checkpoint of this run shares."""
    compute: Compute | None = None
    """Tokens and FLOPs so far (:mod:`trainers.compute`): reference pass and training steps."""


# ----------------------------------------------------------------------------- setup


def setup(cfg: DPOConfig) -> Run:
    """Load data and policy, build optimizer and schedule, restore the latest checkpoint (with its
    reference log-probs). The reference log-probs of a fresh run are computed in ``train``."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from trainers.logprobs import ResponseLogps
    from trainers.models import resolve_model

    hf_logging.disable_progress_bar()  # one progress bar: ours
    accelerator, precision = make_accelerator(cfg.mixed_precision, cfg.cpu)
    out = Path(cfg.output_dir)
    clean_run_folder(accelerator, out)

    # Data: read, split; the run's metadata (config, data hashes, parent).
    train_raw, eval_raw = train_and_held_out(cfg.snapshot, cfg.eval_snapshot, cfg.eval_fraction)
    if not train_raw:
        raise ConfigError(cfg.snapshot, None, "no training pairs left after the held-out split")
    base = resolve_model(cfg.model, Path(cfg.model_cache) if cfg.model_cache else None)
    studio = run_metadata(RECIPE, CHECKPOINT_KIND, cfg, accelerator.num_processes, base)

    # Policy: from the latest checkpoint when resuming, else the starting model (= the reference).
    latest = find_latest_complete(out / "checkpoints")
    state = None
    if latest is not None:
        check_resumable(cfg.output_dir, cfg.resume, latest, studio,
                        harmless=HARMLESS_FIELDS | {"logps_chunk_tokens"})  # fmt: skip
        state = load_training_state(latest)  # verifies every file's sha256 before anything is loaded
    torch.manual_seed(cfg.seed)
    source = latest or base
    lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, use_safetensors=True)
    tokenizer = load_tokenizer(source, cfg.truncation_side)
    if cfg.disable_dropout:
        disable_dropout(lm)

    train_pairs = encode_policy_pairs(tokenizer, train_raw, cfg.max_length, add_eos=cfg.append_eos)
    eval_pairs = encode_policy_pairs(tokenizer, eval_raw, cfg.max_length, add_eos=cfg.append_eos)
    sampler, total_steps = plan_steps(cfg, accelerator.num_processes, len(train_pairs))
    model = ResponseLogps(lm, chunk_tokens=cfg.logps_chunk_tokens)
    optimizer, scheduler = build_optimizer(model, cfg.optim, total_steps)
    start_step, tokens, ref_train, ref_eval = 0, 0, None, None
    compute = Compute.from_state(state and state.get("compute"), non_embedding_params(lm))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step, tokens = int(state["step"]), int(state["tokens"])
        ref_train, ref_eval = state["ref_train"], state["ref_eval"]
        if len(ref_train) != len(train_pairs) or len(ref_eval) != len(eval_pairs):
            raise ConfigError(
                cfg.output_dir, "snapshot", f"{latest.name} holds reference log-probs of other pairs"
            )
    model, optimizer = accelerator.prepare(model, optimizer)
    truncated = sum(p.chosen.truncated or p.rejected.truncated for p in train_pairs + eval_pairs)
    info(accelerator,
         f"{RECIPE}: {len(train_pairs)} train / {len(eval_pairs)} held-out pairs ({truncated} truncated to "
         f"{cfg.max_length} tokens), {total_steps} steps of {sampler.global_batch} pairs on {accelerator.device} "
         f"({precision}, {'direct' if model_direct(model) else 'full-logits'} LM head)"
         + (f", resuming from {latest.name}" if latest else ""))  # fmt: skip
    metrics = MetricsWriter(out / "metrics.jsonl", resume_step=start_step if latest else None,
                            enabled=accelerator.is_main_process)  # fmt: skip
    return Run(cfg, accelerator, model, tokenizer, optimizer, scheduler, train_pairs, eval_pairs, ref_train,
               ref_eval, sampler, total_steps, start_step, tokens, latest, metrics, studio, compute)  # fmt: skip


def model_direct(model: Any) -> bool:
    """Whether the (possibly DDP-wrapped) ResponseLogps runs the LM head itself."""
    return bool(getattr(getattr(model, "module", model), "direct", False))


# ----------------------------------------------------------------------------- scoring


def policy_logps(model: Any, pairs: Sequence[EncodedPair], pad_id: int, device: Any) -> torch.Tensor:
    """(B, 2) float32 summed response log-probs (chosen, rejected) of ``pairs``, one forward over 2B rows."""
    batch = collate(pairs, pad_id).to(device)
    ids, mask = batch.concatenated()
    response = torch.cat([batch.chosen_response_mask, batch.rejected_response_mask])
    return torch.stack(model(ids, mask, response).chunk(2), dim=1)


@torch.no_grad()
def score_pairs(run: Run, pairs: Sequence[EncodedPair], desc: str) -> torch.Tensor:
    """(N, 2) float32 CPU log-probs of every pair under the current policy (sharded over processes)."""
    accelerator, model = run.accelerator, run.model
    if not pairs:
        return torch.zeros(0, 2)
    mine = shard(len(pairs), accelerator.num_processes, accelerator.process_index)
    order = sorted(range(len(mine)), key=lambda j: -max(len(pairs[mine[j]].chosen.ids),
                                                         len(pairs[mine[j]].rejected.ids)))  # fmt: skip
    out = torch.zeros(len(mine), 2, device=accelerator.device)
    size = run.cfg.eval_batch_size
    show = run.cfg.progress and accelerator.is_main_process and "reference" in desc
    model.eval()
    for begin in tqdm(range(0, len(order), size), desc=f"{RECIPE} {desc}", file=sys.stderr, disable=not show):
        rows = order[begin : begin + size]
        out[rows] = policy_logps(model, [pairs[mine[j]] for j in rows], run.tokenizer.pad_token_id,
                                 accelerator.device)  # fmt: skip
    model.train()
    return accelerator.gather(out)[: len(pairs)].float().cpu()


def evaluate(run: Run) -> dict[str, float]:
    """Held-out DPO loss, reward accuracy and margins against the cached reference → ``eval/…``."""
    if not run.eval_pairs:
        return {}
    policy, ref = score_pairs(run, run.eval_pairs, "eval").double(), run.ref_eval.double()
    loss, stats = dpo_loss(
        policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], run.cfg.beta, run.cfg.label_smoothing
    )
    return {"eval/loss": float(loss), **{f"eval/{k}": float(v) for k, v in stats.items()},
            "eval/pairs": float(len(run.eval_pairs))}  # fmt: skip


def step_tokens(run: Run, step: int) -> int:
    """Unpadded tokens (prompt + chosen + rejected) of every pair in optimizer step ``step``, all processes."""
    return sum(len(run.train_pairs[i].chosen.ids) + len(run.train_pairs[i].rejected.ids)
               for i in run.sampler.indices(step))  # fmt: skip


# ----------------------------------------------------------------------------- checkpoints


def save(run: Run, step: int, metrics: dict[str, float], *, final: bool) -> Path:
    """Write ``checkpoints/step-N`` (resumable) or ``final`` (policy only) from the main process."""
    accelerator = run.accelerator
    out = Path(run.cfg.output_dir)
    dest = out / "final" if final else step_dir(out / "checkpoints", step)
    state_dict = {k.removeprefix("lm."): v for k, v in accelerator.get_state_dict(run.model).items()}
    if accelerator.is_main_process:
        studio = {
            **run.studio,
            "step": step,
            "final": final,
            "metrics": metrics,
            "extra": {
                "beta": run.cfg.beta,
                "label_smoothing": run.cfg.label_smoothing,
                "train_tokens": run.tokens,
                "compute": run.compute.as_dict(),
            },
        }  # no separate "reference" entry: the reference is the parent
        resume_state = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                        "step": step, "tokens": run.tokens, "ref_train": run.ref_train, "ref_eval": run.ref_eval,
                        "compute": run.compute.state()}  # fmt: skip
        previous = find_latest_complete(out / "checkpoints")
        params = sum(p.numel() * p.element_size() for p in run.model.parameters())
        save_checkpoint(dest, model=accelerator.unwrap_model(run.model).lm, tokenizer=run.tokenizer, studio=studio,
                        state_dict=state_dict, training_state=None if final else resume_state,
                        expected_bytes=folder_bytes(previous) if previous else 3 * params)  # fmt: skip
        if not final:
            prune_checkpoints(out / "checkpoints", run.cfg.keep_checkpoints)
    accelerator.wait_for_everyone()
    return dest


# ----------------------------------------------------------------------------- the loop


def train(cfg: DPOConfig, *, should_stop: Callable[[int], bool] | None = None) -> TrainResult:
    """Train (or resume) to ``total_steps``; ``should_stop(step)`` after a step checkpoints and stops."""
    started = time.perf_counter()
    run = setup(cfg)
    accelerator, model, optimizer = run.accelerator, run.model, run.optimizer
    world, rank, accum = accelerator.num_processes, accelerator.process_index, cfg.optim.grad_accum
    pad_id = run.tokenizer.pad_token_id
    run.metrics.write(run.start_step, {"run/total_steps": run.total_steps})
    eval_metrics: dict[str, float] = {}
    last_saved = run.resumed_from
    bar = None
    try:
        # 0. Reference log-probs, once: before any update the policy is the reference.
        if run.ref_train is None:
            run.ref_train = score_pairs(run, run.train_pairs, "reference")
            run.ref_eval = score_pairs(run, run.eval_pairs, "held-out reference")
            run.compute.forward(sum(text_tokens(t for p in run.train_pairs for t in (p.chosen, p.rejected))))
            run.compute.settle()  # the held-out pass is evaluation: not counted
            if asked_to_stop(accelerator, should_stop, run.start_step):
                last_saved = save(run, run.start_step, {}, final=False)  # keeps the pass for the rerun
                return train_result(run, started, run.start_step, {}, last_saved)
        bar = progress_bar(accelerator, run.total_steps, run.start_step, RECIPE, cfg.progress)
        model.train()
        step = run.start_step
        while step < run.total_steps:
            # 1. Randomness and batch: pure functions of (seed, step), so resuming replays them exactly.
            torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)
            totals: dict[str, torch.Tensor] = {}
            for micro in range(accum):
                index = run.sampler.micro_batch(step, rank=rank, world_size=world, micro=micro,
                                                micro_batch_size=cfg.batch_size)  # fmt: skip
                sync = micro == accum - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    # 2. Policy log-probs of chosen and rejected (one forward); DPO loss against the cache.
                    logps = policy_logps(
                        model, [run.train_pairs[i] for i in index], pad_id, accelerator.device
                    )
                    ref = run.ref_train[index].to(accelerator.device)
                    loss, stats = dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], cfg.beta,
                                           cfg.label_smoothing)  # fmt: skip
                    # 3. Backward; dividing by accum makes the summed gradient the big-batch mean.
                    accelerator.backward(loss / accum)
                for name, value in {"loss": loss.detach(), **stats}.items():
                    totals[name] = totals.get(name, 0) + value / accum
            # 4. Update: clip, step, schedule.
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm or math.inf)
            check_finite(step + 1, loss=totals["loss"], grad_norm=grad_norm)
            lr = run.scheduler.get_last_lr()[0]
            optimizer.step()
            run.scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            run.tokens += step_tokens(run, step)
            run.compute.train(*text_tokens(t for i in run.sampler.indices(step) for t in (run.train_pairs[i].chosen, run.train_pairs[i].rejected)))  # fmt: skip
            run.compute.settle()  # the step's pairs are every process's: nothing to all-reduce
            step += 1
            bar.update(1)
            # 5. Log.
            if step % cfg.log_every == 0 or step == run.total_steps:
                values = {
                    f"train/{k}": float(accelerator.reduce(v.reshape(1), "mean")) for k, v in totals.items()
                }
                values.update({"train/grad_norm": float(grad_norm), "train/lr": lr, "train/tokens": run.tokens,
                               "train/epoch": step / run.sampler.steps_per_epoch, **run.compute.metrics()})  # fmt: skip
                run.metrics.write(step, values)
                bar.set_postfix(
                    loss=f"{values['train/loss']:.4f}", acc=f"{values['train/rewards/accuracy']:.2f}"
                )
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


CONFIG_CLASS = DPOConfig
"""The config dataclass (``python -m trainers --schema`` builds the studio's form from it)."""
BASE_KIND = "policy"
"""What the starting model must be: a causal-LM policy."""


def main(argv: list[str] | None = None) -> int:
    """``python -m trainers dpo --config cfg.yaml [--set key=value ...]``."""
    return run_recipe_cli(DPOConfig, train, RECIPE, argv)


if __name__ == "__main__":
    raise SystemExit(main())
