"""Segment reward model (Yin et al. 2025): a reward per entropy-delimited segment, trained from
ordinary sequence preferences; plus optional human good/bad spans as extra supervision.

What it does (algorithms.md §4.2–4.4):

1. A causal LM (default ``smollm2``) gets a per-position value head ``Linear(hidden, 1, bias=False)``
   (:class:`trainers.segment_rm.SegmentRewardModel`).
2. Every response is segmented once, before training, by the next-token entropy of a **frozen**
   copy of the same initial checkpoint: position j ends a segment when H_j > τ_H (with the paper's
   EOS fix-ups). τ_H is ``segmentation.threshold`` when given (0: token level, 1000: bandit), else
   the entropy quantile that gives ``segmentation.target_mean_segment_len`` tokens per segment on
   the first ``segmentation.calibration_responses`` training responses. Segments depend on the text
   and the reference only, so training, normaliser fitting and scoring
   (:class:`trainers.rewards.SegmentRMReward`) agree exactly.
3. Segment reward r_k = v(e_k); sequence score S(y) = mean_k r_k; loss −log σ(S(y⁺) − S(y⁻) − margin)
   (:func:`trainers.losses.bradley_terry_loss`); chosen and rejected in one forward pass.
4. Optional, **our extension** (``spans.weight`` λ > 0 with a segments snapshot): each step also
   takes a batch of responses with human good/bad spans and adds λ · mean softplus(−y_k r_k) over
   segments that overlap a labelled span (y_k = ±1 by majority of labelled tokens;
   :func:`trainers.segment_rm.span_logistic_loss`). ``bench/segment_rm_ablation.py`` measures
   whether it helps.
5. After training, the location-aware normaliser mean(p) = a ln p + c, std(p) = b ln p + d is
   Huber-fitted on the raw segment rewards of a calibration split (chosen and rejected responses;
   bandit mode: a global mean/std of sequence scores) and stored with τ_H and the reference path
   in ``final/studio.json["segment_rm"]`` (:class:`trainers.segment_rm.SegmentRMInfo`).

The loop is the sequence reward-model recipe's (``trainers/recipes/reward_model.py``): accelerate,
gradient accumulation, clipping, seed-determined batches, atomic resumable checkpoints in
``<output_dir>/checkpoints/step-N``, ``metrics.jsonl``, a progress bar; the final model goes to
``<output_dir>/final`` (layout in :mod:`trainers.segment_rm`).

Left out: the paper's length guards and PPO (separate recipes), LoRA, sharded (FSDP/ZeRO-3) saving,
and segmenting on the fly (responses are segmented up front on every process; for datasets far
larger than memory, segment ends would need caching on disk).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainers import recipe_common
from trainers import segments as seg
from trainers.checkpoint import (
    TRAINING_STATE,
    find_latest_complete,
    folder_bytes,
    load_training_state,
    prune_checkpoints,
    step_dir,
    write_checkpoint,
)
from trainers.config import ConfigError, run_recipe_cli
from trainers.data import (
    PreferencePair,
    StepSampler,
    is_held_out,
    read_span_examples,
    snapshot_sha256,
)
from trainers.losses import bradley_terry_loss
from trainers.metrics import MetricsWriter, check_finite, reward_eval_metrics
from trainers.normalise import fit_global_normaliser, fit_location_normaliser
from trainers.optim import build_optimizer
from trainers.recipe_common import (
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
from trainers.segment_rm import (
    STUDIO_KEY,
    Reference,
    SegmentRewardModel,
    SegmentRMInfo,
    Side,
    SpanData,
    calibrate,
    encode,
    response_text,
    segment_pairs,
    segment_rewards_of,
    sequence_scores,
    span_batch_loss,
    span_data,
)
from trainers.segment_rm_config import NormaliserConfig as NormaliserConfig  # re-exported
from trainers.segment_rm_config import SegmentationConfig as SegmentationConfig  # re-exported
from trainers.segment_rm_config import SegmentRewardModelConfig
from trainers.segment_rm_config import SpanConfig as SpanConfig  # re-exported

RECIPE = "segment_reward_model"
CHECKPOINT_KIND = "segment_reward"
"""What ``final/`` is, for the studio's checkpoint registry."""
SNAPSHOT_KINDS = ("reward", "preferences")
"""Dataset snapshot kinds (studio export kinds) this recipe trains on."""
BASE_KIND = "policy"
"""Which base checkpoints fit: ``policy`` (a causal LM) or ``encoder_or_policy``."""
RESUME_KEYS = (*recipe_common.RESUME_KEYS, "span_snapshot_sha256")
"""studio.json entries that must match for a run to resume: the common ones and the span snapshot."""


@dataclass(frozen=True)
class TrainResult(recipe_common.TrainResult):
    """What a run produced: the common fields (:class:`trainers.recipe_common.TrainResult`) and ``info``."""

    info: SegmentRMInfo
    """τ_H, reference, normaliser (the normaliser is None when stopped early)."""


@dataclass
class Run:
    """Everything ``setup`` builds for the loop."""

    cfg: SegmentRewardModelConfig
    accelerator: Any
    model: Any
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    train: tuple[Side, Side]
    held_out: tuple[Side, Side]
    calibration: tuple[Side, Side]
    train_margin: list[float]
    held_out_margin: list[float]
    spans: SpanData | None
    sampler: StepSampler
    span_sampler: StepSampler | None
    total_steps: int
    start_step: int
    resumed_from: Path | None
    metrics: MetricsWriter
    info: SegmentRMInfo
    studio: dict[str, Any]


# ----------------------------------------------------------------------------- setup


def _calibration_split(
    pairs: list[PreferencePair], fraction: float
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(kept for training, calibration) by a content hash salted apart from the held-out split."""
    salted = [hashlib.sha256(("calibration:" + p.key).encode()).hexdigest() for p in pairs]
    cal = [p for p, k in zip(pairs, salted, strict=True) if is_held_out(k, fraction)]
    kept = [p for p, k in zip(pairs, salted, strict=True) if not is_held_out(k, fraction)]
    return kept, cal


def setup(cfg: SegmentRewardModelConfig) -> Run:
    """Load data and models, segment every response, build the optimizer, restore the latest checkpoint."""
    from transformers.utils import logging as hf_logging

    from trainers.models import resolve_model

    hf_logging.disable_progress_bar()

    accelerator, precision = make_accelerator(cfg.mixed_precision, cfg.cpu)
    out = Path(cfg.output_dir)
    clean_run_folder(accelerator, out)

    # Data: read, split (held out, calibration), hash.
    train_raw, eval_raw = train_and_held_out(cfg.snapshot, cfg.eval_snapshot, cfg.eval_fraction)
    cal_raw: list[PreferencePair] = []
    if cfg.normaliser.calibration_fraction > 0:
        train_raw, cal_raw = _calibration_split(train_raw, cfg.normaliser.calibration_fraction)
        if not cal_raw:
            raise ConfigError(
                cfg.output_dir, "normaliser.calibration_fraction", "no pair fell into the calibration split"
            )
    if not train_raw:
        raise ConfigError(cfg.snapshot, None, "no training pairs left after the held-out split")
    if cfg.spans.weight > 0 and not cfg.spans.snapshot:
        raise ConfigError(cfg.output_dir, "spans.snapshot", "spans.weight > 0 needs a segments snapshot")
    base = resolve_model(cfg.model, Path(cfg.model_cache) if cfg.model_cache else None)
    studio = run_metadata(RECIPE, CHECKPOINT_KIND, cfg, accelerator.num_processes, base)
    studio["span_snapshot_sha256"] = snapshot_sha256(cfg.spans.snapshot) if cfg.spans.snapshot else None
    latest = find_latest_complete(out / "checkpoints")
    previous = None
    if latest is not None:
        previous = check_resumable(cfg.output_dir, cfg.resume, latest, studio, keys=RESUME_KEYS)
    tokenizer = load_tokenizer(base, cfg.truncation_side)

    # Segmentation: every response segmented once, by the frozen reference.
    train, held_out, calibration, spans, segment_info = _segment_data(
        cfg, tokenizer, base, str(accelerator.device), previous, train_raw, eval_raw, cal_raw
    )
    tau = segment_info.threshold

    # Model: from the latest checkpoint when resuming, else the backbone with a fresh value head.
    torch.manual_seed(cfg.seed)
    model = SegmentRewardModel.from_pretrained(latest or base)
    disable_dropout(model)
    sampler, total_steps = plan_steps(cfg, accelerator.num_processes, len(train_raw))
    span_sampler = None
    if spans is not None:
        span_global = cfg.spans.batch_size * cfg.optim.grad_accum * accelerator.num_processes
        if span_global > len(spans.encoded):
            raise ConfigError(cfg.spans.snapshot, "spans.batch_size",
                              f"one step needs {span_global} span-labelled responses, the snapshot has "
                              f"{len(spans.encoded)}")  # fmt: skip
        span_sampler = StepSampler(len(spans.encoded), span_global, cfg.seed + 1)
    optimizer, scheduler = build_optimizer(model, cfg.optim, total_steps)
    start_step = 0
    if latest is not None:
        state = load_training_state(latest)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step = int(state["step"])
    model, optimizer = accelerator.prepare(model, optimizer)
    info(
        accelerator,
        f"{RECIPE}: {len(train_raw)} train / {len(eval_raw)} held-out / {len(calibration[0].encoded)} calibration pairs, "
        f"τ_H = {tau:.4g}{' (calibrated)' if cfg.segmentation.threshold is None else ''}, mean segment length "
        f"{segment_info.mean_segment_length:.2f} tokens, {total_steps} steps of {sampler.global_batch} pairs on "
        f"{accelerator.device} ({precision})" + (f", resuming from {latest.name}" if latest else ""),
    )
    metrics = MetricsWriter(out / "metrics.jsonl", resume_step=start_step if latest else None,
                            enabled=accelerator.is_main_process)  # fmt: skip
    return Run(cfg, accelerator, model, tokenizer, optimizer, scheduler, train, held_out, calibration,
               [p.margin for p in train_raw], [p.margin for p in eval_raw], spans, sampler, span_sampler,
               total_steps, start_step, latest, metrics, segment_info, studio)  # fmt: skip


def _segment_data(
    cfg: SegmentRewardModelConfig,
    tokenizer: Any,
    base: Path,
    device: str,
    previous: dict[str, Any] | None,
    train_raw: list[PreferencePair],
    eval_raw: list[PreferencePair],
    cal_raw: list[PreferencePair],
) -> tuple[tuple[Side, Side], tuple[Side, Side], tuple[Side, Side], SpanData | None, SegmentRMInfo]:
    """Choose τ_H (explicit, from the checkpoint being resumed, or calibrated on the first training
    responses), then encode and segment every response once with the frozen reference (fp32).

    Returns the train, held-out and calibration sides, the span data (or None) and the run's info.
    """
    tau = cfg.segmentation.threshold
    if tau is None and previous is not None:
        tau = float(previous[STUDIO_KEY]["threshold"])
    reference = None if tau is not None and seg.is_bandit(tau) else Reference(base, device=device)
    if tau is None:
        sample = train_raw[: max(1, cfg.segmentation.calibration_responses // 2)]
        prompts = [p.prompt for p in sample] * 2
        responses = [response_text(p.chosen) for p in sample] + [response_text(p.rejected) for p in sample]
        encoded = encode(tokenizer, prompts, responses, max_length=cfg.max_length)
        tau = calibrate(encoded, reference.entropies([e.input_ids for e in encoded]),
                        cfg.segmentation.target_mean_segment_len)  # fmt: skip
    train = segment_pairs(tokenizer, train_raw, cfg.max_length, reference, tau)
    held_out = segment_pairs(tokenizer, eval_raw, cfg.max_length, reference, tau)
    # Normaliser data: the calibration split if asked for, else the held-out pairs, else training pairs.
    m = cfg.normaliser.max_pairs
    if cal_raw:
        calibration = segment_pairs(tokenizer, cal_raw[:m], cfg.max_length, reference, tau)
    else:
        calibration = tuple(
            Side(side.encoded[:m], side.ends[:m]) for side in (held_out if eval_raw else train)
        )
    spans = None
    if cfg.spans.snapshot and cfg.spans.weight > 0:
        spans = span_data(tokenizer, read_span_examples(cfg.spans.snapshot), cfg.max_length, reference, tau)
    # pooled mean segment length: tokens covered by segments (EOS excluded in dense modes) / segments
    pairs = [(e, x) for side in train for e, x in zip(side.encoded, side.ends, strict=True)]
    covered = sum(x[-1] - e.response_start + 1 for e, x in pairs)
    segment_info = SegmentRMInfo(
        threshold=float(tau),
        reference=str(base),
        prompt_format="text" if isinstance(train_raw[0].prompt, str) else "chat",
        max_length=cfg.max_length,
        truncation_side=cfg.truncation_side,
        mean_segment_length=covered / max(sum(len(x) for _, x in pairs), 1),
        extra={"threshold_calibrated": cfg.segmentation.threshold is None},
    )
    return train, held_out, calibration, spans, segment_info


# ----------------------------------------------------------------------------- scoring


def pair_scores(run: Run, sides: tuple[Side, Side], index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen, rejected)`` scores, each (B,), from one forward pass over 2B sequences."""
    chosen, rejected = sides
    encoded = [chosen.encoded[i] for i in index] + [rejected.encoded[i] for i in index]
    ends = [chosen.ends[i] for i in index] + [rejected.ends[i] for i in index]
    scores, _ = sequence_scores(run.model, encoded, ends, run.tokenizer.pad_token_id, run.accelerator.device)
    return scores.chunk(2)


def span_loss(run: Run, index: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The auxiliary span loss on span-labelled responses ``index`` (see the module docstring, step 4)."""
    return span_batch_loss(run.model, run.spans, index, run.tokenizer.pad_token_id, run.accelerator.device)


@torch.no_grad()
def _score_sides(run: Run, sides: tuple[Side, Side]) -> torch.Tensor:
    """(N, 2) chosen/rejected scores of every pair, sharded over processes, gathered."""
    n, accelerator = len(sides[0].encoded), run.accelerator
    mine = shard(n, accelerator.num_processes, accelerator.process_index)
    per = len(mine)
    out = torch.zeros(per, 2, device=accelerator.device)
    run.model.eval()
    for begin in range(0, per, run.cfg.eval_batch_size):
        rows = list(range(begin, min(begin + run.cfg.eval_batch_size, per)))
        chosen, rejected = pair_scores(run, sides, [mine[j] for j in rows])
        out[rows] = torch.stack([chosen, rejected], dim=1).float()
    run.model.train()
    return accelerator.gather(out)[:n].double().cpu()


def evaluate(run: Run) -> dict[str, float]:
    """Score every held-out pair → ``eval/…`` metrics (accuracy, loss, ECE, gap, reward mean/std)."""
    if not run.held_out[0].encoded:
        return {}
    chosen, rejected = _score_sides(run, run.held_out).unbind(1)
    return reward_eval_metrics(chosen, rejected, torch.tensor(run.held_out_margin, dtype=torch.float64))


@torch.no_grad()
def fit_normaliser(run: Run) -> dict[str, Any]:
    """Fit the normaliser on the calibration responses (chosen and rejected) with the trained model.

    Dense modes: Huber fits of the per-position mean and std of raw segment rewards
    (:func:`trainers.normalise.fit_location_normaliser`); bandit: the global mean/std of S(y).
    Every process computes the same fit from the same data (no communication needed).
    """
    encoded = [e for side in run.calibration for e in side.encoded]
    ends = [x for side in run.calibration for x in side.ends]
    run.model.eval()
    positions, rewards, scores = segment_rewards_of(
        run.model, encoded, ends, run.tokenizer.pad_token_id, run.accelerator.device, run.cfg.eval_batch_size
    )
    run.model.train()
    if seg.is_bandit(run.info.threshold):
        return fit_global_normaliser(scores).to_dict()
    return fit_location_normaliser(positions, rewards).to_dict()


# ----------------------------------------------------------------------------- checkpoints


def save(run: Run, step: int, metrics: dict[str, float], *, final: bool) -> Path:
    """Write ``checkpoints/step-N`` (resumable) or ``final`` (model + fitted normaliser), main process."""
    accelerator = run.accelerator
    out = Path(run.cfg.output_dir)
    dest = out / "final" if final else step_dir(out / "checkpoints", step)
    model = accelerator.unwrap_model(run.model)
    if accelerator.is_main_process:
        studio = {
            **run.studio,
            "step": step,
            "final": final,
            "metrics": metrics,
            STUDIO_KEY: run.info.to_dict(),
        }
        resume_state = {
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "step": step,
        }

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp)
            run.tokenizer.save_pretrained(tmp)
            if not final:
                torch.save(resume_state, tmp / TRAINING_STATE)

        previous = find_latest_complete(out / "checkpoints")
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        write_checkpoint(
            dest, write, studio, expected_bytes=folder_bytes(previous) if previous else 3 * params
        )
        if not final:
            prune_checkpoints(out / "checkpoints", run.cfg.keep_checkpoints)
    accelerator.wait_for_everyone()
    return dest


# ----------------------------------------------------------------------------- the loop


def train(cfg: SegmentRewardModelConfig, *, should_stop: Callable[[int], bool] | None = None) -> TrainResult:
    """Train (or resume) to ``total_steps``, then fit the normaliser and write ``final``.

    ``should_stop(step)`` is asked after every step; True checkpoints and stops.
    """
    started = time.perf_counter()
    run = setup(cfg)
    run.metrics.write(run.start_step, {"run/total_steps": run.total_steps})  # for the studio's progress bar
    accelerator, model, optimizer = run.accelerator, run.model, run.optimizer
    world, rank, accum = accelerator.num_processes, accelerator.process_index, cfg.optim.grad_accum
    lam = cfg.spans.weight if run.spans is not None else 0.0
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
                margin = torch.tensor([run.train_margin[i] for i in index], device=accelerator.device)
                sync = micro == accum - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    # 2. Segment scores S(y) = mean_k v(e_k) of chosen and rejected; Bradley–Terry loss.
                    chosen, rejected = pair_scores(run, run.train, index)
                    loss, stats = bradley_terry_loss(chosen, rejected, margin)
                    stats = {"bt_loss": loss.detach(), **stats}
                    # 3. Optional human-span loss on its own batch, weighted by λ.
                    if lam > 0:
                        span_index = run.span_sampler.micro_batch(step, rank=rank, world_size=world, micro=micro,
                                                                  micro_batch_size=cfg.spans.batch_size)  # fmt: skip
                        aux, span_stats = span_loss(run, span_index)
                        loss = loss + lam * aux
                        stats.update(span_loss=aux.detach(), **span_stats)
                    # 4. Backward; dividing by accum makes the summed gradient the big-batch mean.
                    accelerator.backward(loss / accum)
                for name, value in {"loss": loss.detach(), **stats}.items():
                    totals[name] = totals.get(name, 0) + value / accum
            # 5. Update: clip, step, schedule.
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm or math.inf)
            check_finite(step + 1, loss=totals["loss"], grad_norm=grad_norm)
            lr = run.scheduler.get_last_lr()[0]
            optimizer.step()
            run.scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            # 6. Log.
            if step % cfg.log_every == 0 or step == run.total_steps:
                values = {
                    f"train/{k}": float(accelerator.reduce(v.reshape(1).to(accelerator.device), "mean"))
                    for k, v in totals.items()
                }
                values.update({"train/grad_norm": float(grad_norm), "train/lr": lr,
                               "train/epoch": step / run.sampler.steps_per_epoch})  # fmt: skip
                run.metrics.write(step, values)
                bar.set_postfix(loss=f"{values['train/loss']:.4f}", acc=f"{values['train/accuracy']:.2f}")
            # 7. Evaluate, then checkpoint and stop (recipe_common.step_actions).
            if evaluation_due(step, run.total_steps, cfg.eval_every):
                eval_metrics = evaluate(run)
                run.metrics.write(step, eval_metrics)
            stop = asked_to_stop(accelerator, should_stop, step)
            act = step_actions(step, run.total_steps, cfg.checkpoint_every, stop)
            if act.checkpoint:
                last_saved = save(run, step, eval_metrics, final=False)
            if act.stop:
                return train_result(
                    run, started, step, eval_metrics, last_saved, cls=TrainResult, info=run.info
                )
        # 8. Final evaluation, normaliser fit on the calibration split, final model.
        eval_metrics = evaluate(run)
        run.metrics.write(step, eval_metrics)
        run.info.normaliser = fit_normaliser(run)
        final = save(run, step, eval_metrics, final=True)
        return train_result(
            run, started, step, eval_metrics, last_saved, final, cls=TrainResult, info=run.info
        )
    finally:
        bar.close()
        run.metrics.close()


CONFIG_CLASS = SegmentRewardModelConfig
"""The config dataclass (``python -m trainers --schema`` builds the studio's form from it)."""


def main(argv: list[str] | None = None) -> int:
    """``python -m trainers segment_reward_model --config cfg.yaml [--set key=value ...]``."""
    return run_recipe_cli(
        SegmentRewardModelConfig,
        train,
        RECIPE,
        argv,
        lambda result: {
            "threshold": result.info.threshold,
            "mean_segment_length": result.info.mean_segment_length,
        },
    )


if __name__ == "__main__":
    raise SystemExit(main())
