"""The one weighted-SFT loop behind the offline recipes: filtered MLE, RWR and Decision Transformer.

The three methods of Hu et al. (2023; algorithms.md §2) differ only in *which* scored samples are
trained on, with *what* weight and *which* prompt; the loop is one (a :class:`Method` supplies the
difference, see :mod:`trainers.recipes.filtered_mle`, :mod:`~trainers.recipes.rwr`, :mod:`~trainers.recipes.dt`):

0. **Data stage** (once, resumable; :mod:`trainers.offline_data`): N samples per training prompt from
   the starting policy, scored and z-normalised into ``<output_dir>/samples/`` — or a finished stage
   folder given as ``samples`` (several recipes can share one), or, for filtered MLE, a studio
   ``preferences`` snapshot whose ``chosen`` responses are the kept samples.
1. ``Method.select`` turns the samples into examples (prompt, response, weight, z, prompt group).
   Prompts are tokenised by :func:`trainers.rl_eval.encode_prompts` — the function sampling uses — and
   responses after them, with the EOS appended when the sample ended with one. Only response tokens
   are in the loss: prompt tokens, including any DT conditioning, never are.
2. Each step: the step's examples (a pure function of (seed, step)), their weights (``Method.step_weights``
   over the *whole* step, e.g. RWR's per-batch normalisation), per-token log-probs of the responses with
   grad (:class:`trainers.teacher_forced.TokenScorer`: chunked LM head, no (B, T, V) logits), and
   :func:`trainers.losses.weighted_sft_loss` (per-token mean or per-sequence sum) whose denominator is
   the whole step's, so micro-batches × accumulation × processes equal one big batch.
3. AdamW, clipping, schedule; ``metrics.jsonl`` every step with ``compute/…`` (:mod:`trainers.compute`,
   data stage included).
4. Evaluation on held-out prompts (:mod:`trainers.offline_eval`): at the start the policy *is* the
   reference (no second model); at the end the reference is loaded after the last update. **One model
   per stage**: training never holds a reference or a value model (``eval_every`` > 0 is the exception:
   it loads the reference for the intermediate evaluations).

The run guarantees are the other recipes': ``accelerate`` (CPU, one GPU in bf16 autocast, DDP under
``accelerate launch -m trainers <recipe>``; the data stage runs on the main process), atomic resumable
checkpoints (a resumed run equals an uninterrupted one), SIGTERM → checkpoint and exit 143, NaN/inf →
failure with the step, ``metrics.jsonl`` (first row ``{"step": start, "run/total_steps": N}``), and the
final policy in ``<output_dir>/final``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
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
from trainers.compute import Compute, non_embedding_params
from trainers.config import ConfigError, OptimConfig, bounded, config_to_dict
from trainers.data import StepSampler, read_preferences, read_rows, snapshot_sha256
from trainers.losses import weighted_sft_loss
from trainers.metrics import MetricsWriter, check_finite
from trainers.offline import Prompt, ScoredSample
from trainers.offline_data import OfflineDataConfig, load_samples, run_data_stage, scored_path
from trainers.offline_eval import EvalSetup, evaluate_plain
from trainers.optim import build_optimizer
from trainers.recipe_common import (
    HARMLESS_FIELDS,
    RESUME_KEYS,
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
    step_actions,
    train_result,
)
from trainers.rl_eval import encode_prompts
from trainers.rollout import SamplingConfig, left_pad
from trainers.tasks import Task, get_task, snapshot_task

CHECKPOINT_KIND = "policy"
EVAL_SEED_OFFSET = 1_000
"""Evaluation samples with seed + this (as the PPO recipe), the same noise at every evaluation."""


@dataclass(frozen=True)
class SFTOptimConfig(OptimConfig):
    """AdamW, schedule, clipping and accumulation for supervised fine-tuning of a policy."""

    lr: float = bounded(1e-5, gt=0)
    """Peak learning rate (§2.5: 1e-5 for SmolLM2; the paper's 7B runs used 5e-6)."""


@dataclass(frozen=True)
class WeightedSFTConfig:
    """Fields every offline recipe shares (each recipe adds its own)."""

    output_dir: str
    """Run folder: samples/, checkpoints/, final/, metrics.jsonl. Rerunning into it resumes."""
    task: Literal["sentiment", "synthetic_translation"] = "sentiment"
    """Built-in prompts and reward (used when no snapshot is given); its held-out prompts evaluate."""
    snapshot: str | None = None
    """A studio prompts snapshot to sample for instead of the task (filtered MLE also takes a
    preferences snapshot: its chosen responses are trained on directly)."""
    eval_snapshot: str | None = None
    """Held-out prompts snapshot; when null, ``eval_fraction`` of a prompts snapshot is held out by hash."""
    eval_fraction: float = bounded(0.1, ge=0, lt=1)
    """Share of a prompts snapshot held out for evaluation when there is no eval_snapshot."""
    samples: str | None = None
    """A finished data-stage folder (or its scored.jsonl) to train on; null runs the stage into
    ``<output_dir>/samples`` with the starting policy."""
    n_train: int | None = bounded(None, ge=1)
    """Training prompts the data stage samples for (null: all)."""
    n_eval: int = bounded(32, ge=0)
    """Held-out prompts evaluated (0: no evaluation)."""
    eval_samples: int = bounded(1, ge=1)
    """Responses sampled per held-out prompt, each with its own noise (more: a less noisy mean reward,
    e.g. for a DT curve whose points differ by less than one response's spread)."""
    model: str = "smollm2"
    """Starting policy (also the sampler of the data stage and the evaluation's reference)."""
    model_cache: str | None = None
    """Where default models live (default: $STUDIO_MODEL_CACHE or ~/.cache/feedback-studio/models)."""
    data: OfflineDataConfig = field(default_factory=OfflineDataConfig)
    """The data stage: samples per prompt, sampling, reward (also the evaluation's reward)."""
    reduction: Literal["token_mean", "sequence_sum"] = "token_mean"
    """Log-likelihood reduction: mean over response tokens (SFT), or sum per sequence averaged over sequences."""
    max_prompt_tokens: int = bounded(160, ge=1)
    """Training and evaluation prompts are cut on the left to this many tokens."""
    max_response_tokens: int = bounded(256, ge=1)
    """Responses are cut on the right to this many tokens."""
    batch_size: int = bounded(8, ge=1)
    """Examples per micro-batch per process."""
    max_steps: int = bounded(0, ge=0)
    """Optimizer steps; 0 means ``epochs`` passes over the examples."""
    epochs: float = bounded(1.0, gt=0)
    """Passes over the examples when ``max_steps`` is 0."""
    optim: SFTOptimConfig = field(default_factory=SFTOptimConfig)
    """AdamW, schedule, clipping, accumulation."""
    eval_sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """How evaluation responses are drawn (default: the RL recipes' temperature-1 sampling)."""
    eval_at_start: bool = True
    """Evaluate the starting policy before the first step (it is its own reference: no second model)."""
    eval_every: int = bounded(0, ge=0)
    """Also evaluate every N steps (loads the reference for it); 0: only at the start and the end."""
    eval_batch_size: int = bounded(16, ge=1)
    """Prompts per evaluation rollout."""
    checkpoint_every: int = bounded(0, ge=0)
    """Write a resumable checkpoint every N optimizer steps (0: only the final model)."""
    keep_checkpoints: int = bounded(2, ge=0)
    """How many step checkpoints to keep (0: all)."""
    log_every: int = bounded(1, ge=1)
    """Write training metrics every N optimizer steps."""
    seed: int = 0
    """Seeds the prompt choice, the data stage's sampling, the batch order and evaluation."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on a GPU that supports it, else full fp32."""
    cpu: bool = False
    """Run on the CPU even when a GPU is present."""
    disable_dropout: bool = True
    """Set every dropout probability to 0."""
    chunk_steps: int = bounded(64, ge=1)
    """Response steps per chunk of float32 logits (bounds the logits in memory)."""
    resume: bool = True
    """Continue from the latest complete checkpoint in output_dir; false refuses a non-empty run folder."""
    progress: bool = True
    """Show progress bars on stderr."""


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class OfflineData:
    """What a run trains from: scored samples, or (filtered MLE only) human preference pairs."""

    samples: list[ScoredSample] | None
    pairs: list[Any] | None
    """:class:`trainers.data.PreferencePair` rows of a preferences snapshot."""
    info: dict[str, Any]
    """The data stage's ``data.json`` ({} for pairs): settings, reward statistics, ``compute``."""
    sha256: str
    """Content hash of the scored samples or the snapshot (a resumed run must train on the same data)."""


@dataclass(frozen=True)
class SFTExample:
    """One training sequence: ``response`` after ``prompt``; only the response is in the loss."""

    prompt: Prompt
    """As the policy sees it (DT: with the conditioning)."""
    response: str
    eos: bool
    """Append the EOS token after the response."""
    group: int
    """The prompt's id (RWR per-prompt normalisation)."""
    z: float
    """Standardised reward (0 when unknown)."""
    weight: float = 1.0
    """Fixed loss weight (used when the method has no ``step_weights``)."""


@dataclass(frozen=True)
class EncodedExample:
    """An :class:`SFTExample` in token ids."""

    prompt_ids: list[int]
    response_ids: list[int]
    example: SFTExample


@dataclass(frozen=True)
class Method:
    """What makes one offline method: everything else is the shared loop."""

    name: str
    select: Callable[[Any, OfflineData], list[SFTExample]]
    """``(cfg, data) → examples`` (filter, weight or condition the samples)."""
    step_weights: Callable[[Any, Sequence[SFTExample]], torch.Tensor] | None = None
    """``(cfg, the step's examples) → (n,) weights`` over the whole optimizer step; None: each
    example's own ``weight``."""
    evaluate: Callable[[Any, Any, Any, EvalSetup], dict[str, float]] | None = None
    """``(cfg, policy, reference, setup) → eval metrics`` at the end; None: the plain prompts."""
    extra: Callable[[Any], dict[str, Any]] = lambda cfg: {}
    """The method's settings recorded in studio.json ``extra``."""
    accepts_preferences: bool = False
    """Whether ``snapshot`` may be a preferences snapshot (its chosen responses as examples)."""


def is_preferences_snapshot(path: str) -> bool:
    """Whether a snapshot holds preference pairs (a ``chosen`` column) rather than prompts."""
    rows = read_rows(path)
    return bool(rows) and "chosen" in rows[0]


def load_task(cfg: WeightedSFTConfig, prompts_snapshot: bool) -> Task:
    """Training prompts (for the data stage) and held-out prompts (for evaluation)."""
    try:
        if prompts_snapshot:
            task = snapshot_task(cfg.snapshot, eval_snapshot=cfg.eval_snapshot, eval_fraction=cfg.eval_fraction,
                                 seed=cfg.seed)  # fmt: skip
            task = dataclasses.replace(task, train_prompts=task.train_prompts[: cfg.n_train])
        else:
            task = get_task(cfg.task, seed=cfg.seed, n_train=cfg.n_train)
    except ValueError as exc:
        raise ConfigError(
            cfg.snapshot or "<config>", "snapshot" if cfg.snapshot else "n_train", str(exc)
        ) from exc
    return dataclasses.replace(task, eval_prompts=task.eval_prompts[: cfg.n_eval])


def encode_examples(tokenizer: Any, examples: Sequence[SFTExample], max_prompt_tokens: int,
                    max_response_tokens: int) -> list[EncodedExample]:  # fmt: skip
    """Prompt ids as sampling sees them (:func:`trainers.rl_eval.encode_prompts`, cut on the left) and
    response ids (no special tokens, + EOS when the example has one, cut on the right). Examples whose
    response has no token are dropped."""
    prompts = encode_prompts(tokenizer, [e.prompt for e in examples], max_prompt_tokens)
    responses = (
        tokenizer([e.response for e in examples], add_special_tokens=False)["input_ids"] if examples else []
    )
    out = []
    for example, prompt, response in zip(examples, prompts, responses, strict=True):
        ids = list(response) + ([tokenizer.eos_token_id] if example.eos else [])
        if ids[:max_response_tokens]:
            out.append(EncodedExample(prompt, ids[:max_response_tokens], example))
    return out


def collate_examples(
    examples: Sequence[EncodedExample], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, P) left-padded prompt ids and mask, (B, T) right-padded response ids and bool mask."""
    prompt_ids, prompt_mask = left_pad([e.prompt_ids for e in examples], pad_id)
    width = max(len(e.response_ids) for e in examples)
    response_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, e in enumerate(examples):
        response_ids[row, : len(e.response_ids)] = torch.tensor(e.response_ids, dtype=torch.long)
        response_mask[row, : len(e.response_ids)] = True
    return prompt_ids, prompt_mask, response_ids, response_mask


# ----------------------------------------------------------------------------- setup


@dataclass
class Run:
    """Everything ``setup`` builds for the loop."""

    cfg: Any
    method: Method
    accelerator: Any
    model: Any
    """The prepared :class:`trainers.teacher_forced.TokenScorer` around the policy."""
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    examples: list[EncodedExample]
    sampler: StepSampler
    total_steps: int
    start_step: int
    compute: Compute
    eval_setup: EvalSetup | None
    base: Path
    """The starting model's folder (the evaluation's reference)."""
    resumed_from: Path | None
    metrics: MetricsWriter
    studio: dict[str, Any]

    @property
    def policy(self) -> Any:
        """The unwrapped causal LM."""
        return self.accelerator.unwrap_model(self.model).lm


def acquire_data(cfg: Any, task: Task, lm: Any, tokenizer: Any, accelerator: Any, base: Path, *, pairs: bool,
                 has_checkpoint: bool) -> OfflineData:  # fmt: skip
    """Step 0: the human pairs, the given stage folder, or the data stage run now (main process)."""
    if pairs:
        return OfflineData(None, read_preferences(cfg.snapshot), {}, snapshot_sha256(cfg.snapshot))
    folder = Path(cfg.samples) if cfg.samples else Path(cfg.output_dir) / "samples"
    if not cfg.samples and not scored_path(folder).is_file():
        if has_checkpoint:
            raise ConfigError(
                cfg.output_dir, "samples", f"{folder} is incomplete but the run has checkpoints"
            )
        if accelerator.is_main_process:
            reward = task.reward(tokenizer, cfg.data.reward, device=str(accelerator.device))
            with accelerator.autocast():
                run_data_stage(lm.to(accelerator.device), tokenizer, task.train_prompts, folder, cfg.data, reward,
                               seed=cfg.seed, stop_at_newline=task.stop_at_newline, model=str(base),
                               progress=cfg.progress)  # fmt: skip
        accelerator.wait_for_everyone()
    samples, stage_info = load_samples(folder)
    return OfflineData(samples, None, stage_info, snapshot_sha256(scored_path(folder)))


def setup(cfg: Any, method: Method) -> Run:
    """Load prompts and policy, acquire the data (running the data stage if needed), select and encode
    the examples, build optimizer and schedule, restore the latest checkpoint."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from trainers.models import resolve_model
    from trainers.teacher_forced import TokenScorer

    hf_logging.disable_progress_bar()
    accelerator, precision = make_accelerator(cfg.mixed_precision, cfg.cpu)
    out = Path(cfg.output_dir)
    clean_run_folder(accelerator, out)
    pairs = bool(cfg.snapshot) and method.accepts_preferences and is_preferences_snapshot(cfg.snapshot)
    task = load_task(cfg, prompts_snapshot=bool(cfg.snapshot) and not pairs)
    base = resolve_model(cfg.model, Path(cfg.model_cache) if cfg.model_cache else None)
    latest = find_latest_complete(out / "checkpoints")
    torch.manual_seed(cfg.seed)
    lm = AutoModelForCausalLM.from_pretrained(latest or base, dtype=torch.float32, use_safetensors=True)
    tokenizer = load_tokenizer(latest or base, "left")
    if cfg.disable_dropout:
        disable_dropout(lm)
    data = acquire_data(
        cfg, task, lm, tokenizer, accelerator, base, pairs=pairs, has_checkpoint=latest is not None
    )
    eval_sha = snapshot_sha256(cfg.eval_snapshot) if cfg.eval_snapshot else None
    studio = {"recipe": method.name, "kind": CHECKPOINT_KIND, "config": config_to_dict(cfg),
              "snapshot_sha256": data.sha256, "eval_snapshot_sha256": eval_sha,
              "world_size": accelerator.num_processes, "parent": {"model": cfg.model, "path": str(base)}}  # fmt: skip
    state = None
    if latest is not None:
        check_resumable(cfg.output_dir, cfg.resume, latest, studio, keys=RESUME_KEYS,
                        harmless=HARMLESS_FIELDS | {"samples", "n_eval", "eval_samples", "eval_at_start", "chunk_steps"})  # fmt: skip
        state = load_training_state(latest)

    examples = encode_examples(
        tokenizer, method.select(cfg, data), cfg.max_prompt_tokens, cfg.max_response_tokens
    )
    if not examples:
        raise ConfigError(cfg.samples or cfg.output_dir, "samples", f"{method.name} kept no training example")
    sampler, total_steps = plan_steps(cfg, accelerator.num_processes, len(examples))
    model = TokenScorer(lm, chunk_steps=cfg.chunk_steps)
    optimizer, scheduler = build_optimizer(model, cfg.optim, total_steps)
    compute = Compute.from_state(state and state.get("compute"), non_embedding_params(lm))
    start_step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step = int(state["step"])
    else:  # a fresh run: the data stage's generation is part of the method's cost
        compute.merge(data.info.get("compute", {}))
        compute.settle()
    model, optimizer = accelerator.prepare(model, optimizer)
    eval_setup = make_eval_setup(cfg, task, tokenizer, str(accelerator.device))
    source = "preference pairs" if data.pairs is not None else f"{len(data.samples)} scored samples"
    info(accelerator,
         f"{method.name}: {len(examples)} examples from {source}, {total_steps} steps of {sampler.global_batch} "
         f"on {accelerator.device} ({precision})" + (f", resuming from {latest.name}" if latest else ""))  # fmt: skip
    metrics = MetricsWriter(out / "metrics.jsonl", resume_step=start_step if latest else None,
                            enabled=accelerator.is_main_process)  # fmt: skip
    return Run(cfg, method, accelerator, model, tokenizer, optimizer, scheduler, examples, sampler, total_steps,
               start_step, compute, eval_setup, base, latest, metrics, studio)  # fmt: skip


def make_eval_setup(cfg: Any, task: Task, tokenizer: Any, device: str) -> EvalSetup | None:
    """The held-out evaluation of a run (None without prompts): the task's first ``n_eval`` held-out
    prompts, each ``eval_samples`` times (row i has its own sampling stream, so the copies differ), the
    data stage's reward, ``eval_sampling`` with seed + :data:`EVAL_SEED_OFFSET`."""
    if not (task.eval_prompts and cfg.n_eval):
        return None
    prompts = [prompt for prompt in task.eval_prompts[: cfg.n_eval] for _ in range(cfg.eval_samples)]
    return EvalSetup(tokenizer, prompts, task.reward(tokenizer, cfg.data.reward, device=device),
                     cfg.eval_sampling, cfg.eval_batch_size, cfg.seed + EVAL_SEED_OFFSET, cfg.max_prompt_tokens,
                     task.stop_at_newline, cfg.chunk_steps)  # fmt: skip


# ----------------------------------------------------------------------------- the step's loss


def step_weights(run: Run, indices: Sequence[int]) -> dict[int, float]:
    """Weight of each example of one optimizer step (all processes): the method's, or the examples' own."""
    chosen = [run.examples[i].example for i in indices]
    if run.method.step_weights is None:
        values = [e.weight for e in chosen]
    else:
        values = run.method.step_weights(run.cfg, chosen).tolist()
    return dict(zip(indices, values, strict=True))


def step_denominator(run: Run, weights: dict[int, float]) -> float:
    """The step's Σ w·n (token mean) or Σ w (sequence sum), over every example of the step."""
    if run.cfg.reduction == "token_mean":
        return sum(w * len(run.examples[i].response_ids) for i, w in weights.items())
    return sum(weights.values())


def micro_loss(run: Run, index: Sequence[int], weights: dict[int, float], denominator: float) -> torch.Tensor:
    """This micro-batch's share of the step loss (the shares sum to the step's weighted NLL)."""
    device = run.accelerator.device
    batch = [run.examples[i] for i in index]
    prompt_ids, prompt_mask, response_ids, response_mask = (
        t.to(device) for t in collate_examples(batch, run.tokenizer.pad_token_id)
    )
    with run.accelerator.autocast():
        logprobs = run.model(prompt_ids, prompt_mask, response_ids, response_mask).logprobs
    w = torch.tensor([weights[i] for i in index], dtype=torch.float32, device=device)
    loss, _ = weighted_sft_loss(logprobs.float(), response_mask, w, run.cfg.reduction, normalizer=denominator)
    run.compute.train(int(prompt_mask.sum()), int(response_mask.sum()))
    return loss


# ----------------------------------------------------------------------------- evaluation and checkpoints


def evaluate(run: Run, *, final: bool, untouched: bool = False) -> dict[str, float]:
    """Held-out evaluation on the main process. ``untouched``: before any update the policy is its own
    reference; otherwise the starting model is loaded as the reference for the evaluation only."""
    setup_ = run.eval_setup
    out: dict[str, float] = {}
    if setup_ is not None and run.accelerator.is_main_process:
        from transformers import AutoModelForCausalLM

        policy = run.policy
        reference = policy if untouched else AutoModelForCausalLM.from_pretrained(
            run.base, dtype=torch.float32, use_safetensors=True).to(run.accelerator.device).eval()  # fmt: skip
        with run.accelerator.autocast():
            if final and run.method.evaluate is not None:
                out = run.method.evaluate(run.cfg, policy, reference, setup_)
            else:
                out = evaluate_plain(policy, reference, setup_)
        del reference
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
                  "extra": {**run.method.extra(run.cfg), "examples": len(run.examples),
                            "compute": run.compute.as_dict()}}  # fmt: skip
        resume_state = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                        "step": step, "compute": run.compute.state()}  # fmt: skip
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


def train(cfg: Any, method: Method, *, should_stop: Callable[[int], bool] | None = None) -> TrainResult:
    """Train (or resume) to ``total_steps``; ``should_stop(step)`` after a step checkpoints and stops."""
    started = time.perf_counter()
    run = setup(cfg, method)
    accelerator, model, optimizer = run.accelerator, run.model, run.optimizer
    world, rank, accum = accelerator.num_processes, accelerator.process_index, cfg.optim.grad_accum
    run.metrics.write(run.start_step, {"run/total_steps": run.total_steps})
    eval_metrics: dict[str, float] = {}
    last_saved = run.resumed_from
    bar = progress_bar(accelerator, run.total_steps, run.start_step, method.name, cfg.progress)
    try:
        if cfg.eval_at_start and run.start_step == 0 and run.resumed_from is None:
            eval_metrics = evaluate(run, final=False, untouched=True)
            run.metrics.write(0, eval_metrics)
        model.train()
        step = run.start_step
        while step < run.total_steps:
            # 1. Randomness, examples and weights: pure functions of (seed, step); weights over the whole step.
            torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)
            weights = step_weights(run, run.sampler.indices(step))
            denominator = step_denominator(run, weights)
            totals: dict[str, float] = {}
            for micro in range(accum):
                index = run.sampler.micro_batch(step, rank=rank, world_size=world, micro=micro,
                                                micro_batch_size=cfg.batch_size)  # fmt: skip
                sync = micro == accum - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    # 2. Response log-probs with grad; this micro-batch's share of the step's weighted NLL.
                    loss = micro_loss(run, index, weights, denominator)
                    # 3. Backward; × world because DDP averages the processes' gradients.
                    accelerator.backward(loss * world)
                totals["loss"] = totals.get("loss", 0.0) + float(loss.detach())
            # 4. Update: clip, step, schedule.
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm or math.inf)
            check_finite(step + 1, loss=totals["loss"], grad_norm=grad_norm)
            lr = run.scheduler.get_last_lr()[0]
            optimizer.step()
            run.scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            run.compute.settle(accelerator)
            step += 1
            bar.update(1)
            # 5. Log, evaluate, checkpoint.
            if step % cfg.log_every == 0 or step == run.total_steps:
                values = step_metrics(run, step, totals, weights, grad_norm, lr)
                run.metrics.write(step, values)
                bar.set_postfix(loss=f"{values['train/loss']:.4f}")
            if evaluation_due(step, run.total_steps, cfg.eval_every):
                eval_metrics = evaluate(run, final=False)
                run.metrics.write(step, eval_metrics)
            stop = asked_to_stop(accelerator, should_stop, step)
            act = step_actions(step, run.total_steps, cfg.checkpoint_every, stop)
            if act.checkpoint:
                last_saved = save(run, step, eval_metrics, final=False)
            if act.stop:
                return train_result(run, started, step, eval_metrics, last_saved)
        # 6. Final evaluation (the reference is loaded only now) and policy.
        eval_metrics = evaluate(run, final=True)
        run.metrics.write(step, eval_metrics)
        final = save(run, step, eval_metrics, final=True)
        return train_result(run, started, step, eval_metrics, last_saved, final)
    finally:
        bar.close()
        run.metrics.close()


def step_metrics(run: Run, step: int, totals: dict[str, float], weights: dict[int, float], grad_norm: Any,
                 lr: float) -> dict[str, float]:  # fmt: skip
    """``train/…`` and ``compute/…`` values of one step (the loss summed over processes)."""
    loss = totals["loss"]
    if run.accelerator.num_processes > 1:
        loss = float(run.accelerator.reduce(torch.tensor([loss], device=run.accelerator.device), "sum"))
    w = list(weights.values())
    return {"train/loss": loss, "train/weight_mean": sum(w) / len(w), "train/weight_max": max(w),
            "train/grad_norm": float(grad_norm), "train/lr": lr,
            "train/tokens": float(run.compute.totals["trained_tokens"]),
            "train/epoch": step / run.sampler.steps_per_epoch, **run.compute.metrics()}  # fmt: skip
