"""Sequence reward model: Bradley–Terry on preference pairs, any backbone, one GPU or many.

The backbone (default: the MiniLM encoder ``minilm``; any causal LM such as SmolLM2 works too) is
loaded as ``AutoModelForSequenceClassification(num_labels=1)``: one scalar per sequence, read at [CLS]
(encoders) or at the last non-pad token (causal LMs). Each step takes the pairs of a fixed,
seed-determined batch, scores chosen and rejected in **one** forward pass (concatenated, 2B rows), and
minimises −log σ(r⁺ − r⁻ − margin) (:func:`trainers.losses.bradley_terry_loss`) with AdamW, gradient
accumulation and clipping. Held-out pairs are scored every ``eval_every`` steps and at the end:
accuracy, loss, calibration (ECE of σ(r⁺ − r⁻), 10 bins) and the mean reward gap. Since only the
scored token's output is used, the last transformer layer runs its query, attention output and MLP
at that token only (``score_position_only_last_layer``; exact, see :mod:`trainers.fast_score`).

Runs through ``accelerate``: CPU, one GPU with bf16 autocast (``mixed_precision: auto``), or DDP under
``accelerate launch -m trainers reward_model --config …``. ``batch_size`` is pairs per micro-batch per
process, so one optimizer step sees ``batch_size × optim.grad_accum × processes`` pairs.

Checkpoints (``<output_dir>/checkpoints/step-N``, atomic, see :mod:`trainers.checkpoint`) hold the
model, tokenizer, optimizer and scheduler state; a rerun with the same config resumes from the latest
complete one. Data order and dropout randomness are functions of (seed, step), so a resumed run
equals an uninterrupted one (bit for bit on CPU). The final model goes to ``<output_dir>/final`` and
loads with plain ``AutoModelForSequenceClassification.from_pretrained``; metrics stream to
``<output_dir>/metrics.jsonl``.

Example config (``python -m trainers reward_model --config rm.yaml --set optim.lr=1e-4``)::

    snapshot: data/snapshots/reward.jsonl
    output_dir: runs/rm-minilm
    model: minilm
    batch_size: 16
    max_steps: 200
    eval_every: 50
    checkpoint_every: 50
    optim: {lr: 3.0e-4, warmup_ratio: 0.1}

Left out on purpose: TRL's reward-centring term; the EOS TRL appends to standard text; dropping
over-long pairs (they are truncated, by default on the left so the response survives); LoRA; and
FSDP/DeepSpeed sharded optimizer state (DDP only: the optimizer state is saved from the main process).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from trainers.checkpoint import (
    find_latest_complete,
    folder_bytes,
    load_training_state,
    prune_checkpoints,
    save_checkpoint,
    step_dir,
)
from trainers.config import OptimConfig, bounded, run_recipe_cli
from trainers.data import (
    EncodedPair,
    StepSampler,
    collate,
    encode_pairs,
)
from trainers.fast_score import sequence_logits
from trainers.losses import bradley_terry_loss
from trainers.metrics import MetricsWriter, check_finite, reward_eval_metrics
from trainers.optim import build_optimizer
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

RECIPE = "reward_model"
CHECKPOINT_KIND = "reward"
"""What ``final/`` is, for the studio's checkpoint registry."""
SNAPSHOT_KINDS = ("reward", "preferences")
"""Dataset snapshot kinds (studio export kinds) this recipe trains on."""
BASE_KIND = "encoder_or_policy"
"""Which base checkpoints fit: ``policy`` (a causal LM) or ``encoder_or_policy``."""


@dataclass(frozen=True)
class RewardModelConfig:
    """Train a sequence Bradley–Terry reward model on a preference snapshot."""

    snapshot: str
    """Preference snapshot: JSONL, Parquet or a datasets folder in TRL columns (see trainers.data)."""
    output_dir: str
    """Run folder: checkpoints/, final/, metrics.jsonl. Rerunning into it resumes."""
    eval_snapshot: str | None = None
    """Held-out snapshot; when null, ``eval_fraction`` of the pairs are held out by content hash."""
    eval_fraction: float = bounded(0.1, ge=0, lt=1)
    """Share of the snapshot held out when there is no ``eval_snapshot`` (0: no evaluation)."""
    model: str = "minilm"
    """Backbone: a default model name (minilm, smollm2), a local folder, or a hub id."""
    model_cache: str | None = None
    """Where default models live (default: $STUDIO_MODEL_CACHE or ~/.cache/feedback-studio/models)."""
    max_length: int = bounded(256, ge=8)
    """Tokens per sequence (prompt + response); longer ones are truncated."""
    truncation_side: Literal["left", "right"] = "left"
    """Which end of an over-long sequence to cut: left keeps the end of the response."""
    batch_size: int = bounded(8, ge=1)
    """Pairs per micro-batch per process."""
    eval_batch_size: int = bounded(32, ge=1)
    """Pairs per forward pass during evaluation."""
    max_steps: int = bounded(0, ge=0)
    """Optimizer steps; 0 means ``epochs`` passes over the training pairs."""
    epochs: float = bounded(1.0, gt=0)
    """Passes over the training pairs when ``max_steps`` is 0."""
    optim: OptimConfig = field(default_factory=OptimConfig)
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
    """Seeds the score-head initialisation, the batch order and dropout."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on a GPU that supports it, else full fp32."""
    cpu: bool = False
    """Run on the CPU even when a GPU is present."""
    disable_dropout: bool = True
    """Set every dropout probability to 0 (usual for reward models; makes runs reproducible)."""
    score_position_only_last_layer: bool = True
    """Compute the last transformer layer only at the scored token (last non-pad / [CLS]): the same
    scores and gradients (exact up to float rounding), ≈ 1/layers fewer FLOPs. Llama, Qwen2, Mistral
    and BERT classifiers; other backbones use the plain forward (see trainers.fast_score)."""
    resume: bool = True
    """Continue from the latest complete checkpoint in output_dir; false refuses a non-empty run folder."""
    progress: bool = True
    """Show a tqdm progress bar on stderr."""


@dataclass
class Run:
    """Everything ``setup`` builds for the loop."""

    cfg: RewardModelConfig
    accelerator: Any
    model: Any
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    train_pairs: list[EncodedPair]
    eval_pairs: list[EncodedPair]
    sampler: StepSampler
    total_steps: int
    start_step: int
    resumed_from: Path | None
    metrics: MetricsWriter
    studio: dict[str, Any]
    """The studio.json fields every checkpoint of this run shares."""


# ----------------------------------------------------------------------------- setup


def setup(cfg: RewardModelConfig) -> Run:
    """Load data and model, build optimizer and schedule, and restore the latest checkpoint."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from trainers.models import resolve_model

    hf_logging.disable_progress_bar()  # one progress bar: ours

    accelerator, precision = make_accelerator(cfg.mixed_precision, cfg.cpu)
    out = Path(cfg.output_dir)
    clean_run_folder(accelerator, out)

    # Data: read, split; the run's metadata (config, data hashes, parent).
    train_raw, eval_raw = train_and_held_out(cfg.snapshot, cfg.eval_snapshot, cfg.eval_fraction)
    base = resolve_model(cfg.model, Path(cfg.model_cache) if cfg.model_cache else None)
    studio = run_metadata(RECIPE, CHECKPOINT_KIND, cfg, accelerator.num_processes, base)

    # Model: from the latest checkpoint when resuming, else the backbone with a fresh score head.
    latest = find_latest_complete(out / "checkpoints")
    state = None
    if latest is not None:
        check_resumable(cfg.output_dir, cfg.resume, latest, studio,
                        harmless=HARMLESS_FIELDS | {"score_position_only_last_layer"})  # fmt: skip
        state = load_training_state(latest)  # verifies every file's sha256 before anything is loaded
    torch.manual_seed(cfg.seed)
    source = latest or base
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=torch.float32)
    tokenizer = load_tokenizer(source, cfg.truncation_side)
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.disable_dropout:
        disable_dropout(model)

    train_pairs = encode_pairs(tokenizer, train_raw, cfg.max_length)
    eval_pairs = encode_pairs(tokenizer, eval_raw, cfg.max_length) if eval_raw else []
    sampler, total_steps = plan_steps(cfg, accelerator.num_processes, len(train_pairs))
    optimizer, scheduler = build_optimizer(model, cfg.optim, total_steps)
    start_step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step = int(state["step"])
    model, optimizer = accelerator.prepare(model, optimizer)
    truncated = sum(p.chosen.truncated or p.rejected.truncated for p in train_pairs + eval_pairs)
    info(
        accelerator,
        f"{RECIPE}: {len(train_pairs)} train / {len(eval_pairs)} held-out pairs ({truncated} truncated to "
        f"{cfg.max_length} tokens), {total_steps} steps of {sampler.global_batch} pairs on {accelerator.device} "
        f"({precision})" + (f", resuming from {latest.name}" if latest else ""),
    )
    metrics = MetricsWriter(
        out / "metrics.jsonl",
        resume_step=start_step if latest else None,
        enabled=accelerator.is_main_process,
    )
    return Run(cfg, accelerator, model, tokenizer, optimizer, scheduler, train_pairs, eval_pairs, sampler,
               total_steps, start_step, latest, metrics, studio)  # fmt: skip


# ----------------------------------------------------------------------------- scoring


def pair_rewards(
    model: Any, batch: Any, *, score_position_only: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen, rejected)`` rewards, each (B,) float32, from one forward pass over 2B sequences.

    ``score_position_only``: the last layer runs only at the scored token (:mod:`trainers.fast_score`).
    """
    ids, mask = batch.concatenated()
    logits = sequence_logits(model, ids, mask, score_position_only=score_position_only)
    return logits.squeeze(-1).float().chunk(2)


@torch.no_grad()
def evaluate(run: Run) -> dict[str, float]:
    """Score every held-out pair (sharded over processes) → ``eval/…`` metrics."""
    pairs, accelerator, model = run.eval_pairs, run.accelerator, run.model
    if not pairs:
        return {}
    mine = shard(len(pairs), accelerator.num_processes, accelerator.process_index)
    per = len(mine)
    order = sorted(
        range(per), key=lambda j: -max(len(pairs[mine[j]].chosen.ids), len(pairs[mine[j]].rejected.ids))
    )
    scores = torch.zeros(per, 3, device=accelerator.device)  # chosen, rejected, margin
    model.eval()
    for begin in range(0, per, run.cfg.eval_batch_size):
        rows = order[begin : begin + run.cfg.eval_batch_size]
        batch = collate([pairs[mine[j]] for j in rows], run.tokenizer.pad_token_id).to(accelerator.device)
        chosen, rejected = pair_rewards(
            model, batch, score_position_only=run.cfg.score_position_only_last_layer
        )
        scores[rows] = torch.stack([chosen, rejected, batch.margin], dim=1)
    model.train()
    scores = accelerator.gather(scores)[: len(pairs)].double().cpu()
    return reward_eval_metrics(*scores.unbind(1))


# ----------------------------------------------------------------------------- checkpoints


def save(run: Run, step: int, metrics: dict[str, float], *, final: bool) -> Path:
    """Write ``checkpoints/step-N`` (resumable) or ``final`` (model only) from the main process."""
    accelerator = run.accelerator
    out = Path(run.cfg.output_dir)
    dest = out / "final" if final else step_dir(out / "checkpoints", step)
    state_dict = accelerator.get_state_dict(run.model)
    if accelerator.is_main_process:
        studio = {**run.studio, "step": step, "final": final, "metrics": metrics}
        if "eval/reward_mean" in metrics:  # for reward normalisation downstream (z-score)
            studio["extra"] = {
                "reward_mean": metrics["eval/reward_mean"],
                "reward_std": metrics["eval/reward_std"],
            }
        resume_state = {
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "step": step,
        }
        previous = find_latest_complete(out / "checkpoints")
        params = sum(p.numel() * p.element_size() for p in run.model.parameters())
        save_checkpoint(
            dest,
            model=accelerator.unwrap_model(run.model),
            tokenizer=run.tokenizer,
            studio=studio,
            state_dict=state_dict,
            training_state=None if final else resume_state,
            expected_bytes=folder_bytes(previous) if previous else 3 * params,
        )
        if not final:
            prune_checkpoints(out / "checkpoints", run.cfg.keep_checkpoints)
    accelerator.wait_for_everyone()
    return dest


# ----------------------------------------------------------------------------- the loop


def train(cfg: RewardModelConfig, *, should_stop: Callable[[int], bool] | None = None) -> TrainResult:
    """Train (or resume) to ``total_steps``; ``should_stop(step)`` after a step checkpoints and stops."""
    started = time.perf_counter()
    run = setup(cfg)
    run.metrics.write(run.start_step, {"run/total_steps": run.total_steps})  # for the studio's progress bar
    accelerator, model, optimizer = run.accelerator, run.model, run.optimizer
    world, rank, accum = accelerator.num_processes, accelerator.process_index, cfg.optim.grad_accum
    pad_id = run.tokenizer.pad_token_id
    eval_metrics: dict[str, float] = {}
    last_saved = run.resumed_from
    bar = progress_bar(accelerator, run.total_steps, run.start_step, RECIPE, cfg.progress)
    model.train()
    step = run.start_step
    try:
        while step < run.total_steps:
            # 1. Randomness and batch: pure functions of (seed, step), so resuming replays them exactly.
            torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)
            totals: dict[str, torch.Tensor] = {}
            for micro in range(accum):
                index = run.sampler.micro_batch(step, rank=rank, world_size=world, micro=micro,
                                                micro_batch_size=cfg.batch_size)  # fmt: skip
                batch = collate([run.train_pairs[i] for i in index], pad_id).to(accelerator.device)
                # 2. Score chosen and rejected in one forward; Bradley–Terry loss.
                sync = micro == accum - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    chosen, rejected = pair_rewards(model, batch,
                                                    score_position_only=cfg.score_position_only_last_layer)  # fmt: skip
                    loss, stats = bradley_terry_loss(chosen, rejected, batch.margin)
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
            step += 1
            bar.update(1)
            # 5. Log.
            if step % cfg.log_every == 0 or step == run.total_steps:
                values = {
                    f"train/{k}": float(accelerator.reduce(v.reshape(1), "mean")) for k, v in totals.items()
                }
                values.update({"train/grad_norm": float(grad_norm), "train/lr": lr,
                               "train/epoch": step / run.sampler.steps_per_epoch})  # fmt: skip
                run.metrics.write(step, values)
                bar.set_postfix(loss=f"{values['train/loss']:.4f}", acc=f"{values['train/accuracy']:.2f}")
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
        # 7. Final evaluation and model.
        eval_metrics = evaluate(run)
        run.metrics.write(step, eval_metrics)
        final = save(run, step, eval_metrics, final=True)
        return train_result(run, started, step, eval_metrics, last_saved, final)
    finally:
        bar.close()
        run.metrics.close()


CONFIG_CLASS = RewardModelConfig
"""The config dataclass (``python -m trainers --schema`` builds the studio's form from it)."""


def main(argv: list[str] | None = None) -> int:
    """``python -m trainers reward_model --config cfg.yaml [--set key=value ...]``."""
    return run_recipe_cli(RewardModelConfig, train, RECIPE, argv)


if __name__ == "__main__":
    raise SystemExit(main())
