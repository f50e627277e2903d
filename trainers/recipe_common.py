"""The plumbing every training recipe repeats: accelerator, data split, tokenizer, step plan, resume
check, the end of a step (evaluate, stop, checkpoint), the run's result, sharding.

Loops stay in the recipes (one readable ``train()`` each); only these small pieces, identical in every
recipe, live here. Used by the reward-model, segment reward-model, DPO, PPO (and NLPO), REINFORCE and
weighted-SFT (filtered MLE, RWR, DT) loops; where a recipe differs it says so through the arguments
(``harmless``/``keys`` of :func:`check_resumable`) or a subclass (the segment RM's ``TrainResult`` adds
``info``).

The end of optimizer step ``step`` (1-based: the step just done) is the same in every loop::

    if evaluation_due(step, total, cfg.eval_every):          # periodic held-out evaluation
        eval_metrics = evaluate(run)
    stop = asked_to_stop(accelerator, should_stop, step)     # should_stop(step), agreed by all processes
    act = step_actions(step, total, cfg.checkpoint_every, stop)
    if act.checkpoint:                                       # resumable step checkpoint (+ pruning)
        last_saved = save(run, step, eval_metrics, final=False)
    if act.stop:                                             # stopped early: no final model
        return train_result(run, started, step, eval_metrics, last_saved)

The stop is asked *after* the evaluation, so a SIGTERM that arrives during it stops the run at this
step; after the loop comes the final evaluation and ``train_result(..., final=<final folder>)``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from trainers.checkpoint import clean_orphans, read_studio_json
from trainers.config import ConfigError, config_to_dict
from trainers.data import PreferencePair, StepSampler, read_preferences, snapshot_sha256, split_pairs

HARMLESS_FIELDS = frozenset(
    {
        "progress",
        "resume",
        "eval_every",
        "eval_batch_size",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
        "output_dir",
        "snapshot",
        "eval_snapshot",
        "model_cache",
    }
)
"""Config fields a run may change between a stop and its resumption (they do not change the result)."""
RESUME_KEYS = ("snapshot_sha256", "eval_snapshot_sha256", "world_size")
"""studio.json entries besides ``config`` that must match for a run to resume: the data and the processes."""


@dataclass(frozen=True)
class TrainResult:
    """What a run produced."""

    output_dir: Path
    final_checkpoint: Path | None
    """``<output_dir>/final``; None when the run was stopped early."""
    last_checkpoint: Path | None
    """The newest resumable step checkpoint, if any."""
    steps: int
    """Optimizer steps done (in total, over all resumptions)."""
    metrics: dict[str, float]
    """The last held-out evaluation (``eval/…``), empty without held-out data."""
    resumed_from: Path | None
    stopped: bool
    seconds: float


def make_accelerator(mixed_precision: str, cpu: bool) -> tuple[Any, str]:
    """An ``Accelerator`` and the precision it runs: ``auto`` is bf16 on a GPU that supports it, else fp32."""
    from accelerate import Accelerator

    precision = mixed_precision
    if precision == "auto":
        gpu = torch.cuda.is_available() and not cpu
        precision = "bf16" if gpu and torch.cuda.is_bf16_supported() else "no"
    return Accelerator(cpu=cpu, mixed_precision=precision), precision


def clean_run_folder(accelerator: Any, output_dir: Path) -> None:
    """Remove leftovers of interrupted checkpoint writes (main process), then wait for everyone."""
    if accelerator.is_main_process:
        clean_orphans(output_dir / "checkpoints")
        clean_orphans(output_dir)
    accelerator.wait_for_everyone()


def train_and_held_out(
    snapshot: str, eval_snapshot: str | None, eval_fraction: float
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(training, held-out) pairs: all of ``snapshot`` and all of ``eval_snapshot`` when there is one,
    else ``snapshot`` split by content hash with ``eval_fraction`` held out."""
    pairs = read_preferences(snapshot)
    if eval_snapshot:
        return pairs, read_preferences(eval_snapshot)
    return split_pairs(pairs, eval_fraction)


def run_metadata(recipe: str, kind: str, cfg: Any, world_size: int, base: Path) -> dict[str, Any]:
    """The studio.json fields every checkpoint of a run shares: recipe, checkpoint kind, the config,
    the sha256 of its snapshots (``cfg.snapshot``, ``cfg.eval_snapshot``), processes, and the parent
    (``cfg.model`` as given and the folder ``base`` it resolved to)."""
    return {
        "recipe": recipe,
        "kind": kind,
        "config": config_to_dict(cfg),
        "snapshot_sha256": snapshot_sha256(cfg.snapshot),
        "eval_snapshot_sha256": snapshot_sha256(cfg.eval_snapshot) if cfg.eval_snapshot else None,
        "world_size": world_size,
        "parent": {"model": cfg.model, "path": str(base)},
    }


def load_tokenizer(source: str | Path, truncation_side: str) -> Any:
    """The tokenizer of ``source`` for training: right padding, EOS as the pad token when there is
    none (Llama-style tokenizers), over-long sequences cut on ``truncation_side``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {source} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side, tokenizer.truncation_side = "right", truncation_side
    return tokenizer


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability in ``model`` to 0."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def plan_steps(cfg: Any, world_size: int, n_train: int) -> tuple[StepSampler, int]:
    """The step sampler over ``n_train`` training pairs and the number of optimizer steps.

    One step takes ``cfg.batch_size × cfg.optim.grad_accum × world_size`` pairs (``ConfigError`` on
    ``batch_size`` when that is more than there are); the steps are ``cfg.max_steps``, or when it is
    0 ``cfg.epochs`` passes (at least one step).
    """
    global_batch = cfg.batch_size * cfg.optim.grad_accum * world_size
    if global_batch > n_train:
        raise ConfigError(
            cfg.snapshot or "<config>",  # the offline recipes may train on generated samples, no snapshot
            "batch_size",
            f"one step needs {global_batch} pairs (batch_size × grad_accum × processes) "
            f"but the snapshot has {n_train} training pairs",
        )
    sampler = StepSampler(n_train, global_batch, cfg.seed)
    return sampler, cfg.max_steps or max(1, int(cfg.epochs * sampler.steps_per_epoch))


def check_resumable(
    output_dir: str,
    resume: bool,
    latest: Path,
    studio: dict[str, Any],
    *,
    harmless: Iterable[str] = HARMLESS_FIELDS,
    keys: Iterable[str] = RESUME_KEYS,
) -> dict[str, Any]:
    """Refuse to continue a run whose data or training-relevant settings differ; return its studio.json.

    ``studio`` is the new run's metadata (``config`` plus ``keys``); ``latest`` the checkpoint found.
    ``harmless``: config fields that may change; ``keys``: other studio.json entries that must not
    (both in the order the error names them: changed config fields sorted, then ``keys``).
    """
    if not resume:
        raise ConfigError(
            output_dir,
            "resume",
            f"holds checkpoints ({latest.name}); set resume: true or use an empty folder",
        )
    previous = read_studio_json(latest)
    harmless = set(harmless)
    old, new = previous.get("config", {}), studio["config"]
    changed = sorted(k for k in set(old) | set(new) if k not in harmless and old.get(k) != new.get(k))
    changed += [key for key in keys if previous.get(key) != studio.get(key)]
    if changed:
        raise ConfigError(
            output_dir,
            changed[0],
            f"cannot resume {latest.name}: {', '.join(changed)} changed since it was written; "
            "use a new output_dir (or restore the old settings)",
        )
    return previous


def info(accelerator: Any, message: str) -> None:
    """One line on stderr, from the main process only."""
    if accelerator.is_main_process:
        print(message, file=sys.stderr, flush=True)


def agree_to_stop(accelerator: Any, stop: bool) -> bool:
    """True on every process when any wants to stop (a SIGTERM may reach only some)."""
    if accelerator.num_processes == 1:
        return stop
    flag = torch.tensor([float(stop)], device=accelerator.device)
    return bool(accelerator.reduce(flag, "sum") > 0)


def asked_to_stop(accelerator: Any, should_stop: Callable[[int], bool] | None, step: int) -> bool:
    """``should_stop(step)`` (None: never), agreed over the processes (:func:`agree_to_stop`).

    Called once at the end of every step, the last included (callers may time steps with it)."""
    return agree_to_stop(accelerator, should_stop is not None and should_stop(step))


def evaluation_due(step: int, total: int, eval_every: int) -> bool:
    """Whether step ``step`` (1-based, just done) of ``total`` ends with a periodic held-out evaluation:
    every ``eval_every`` steps (0: never), but not after the last one (the final evaluation follows)."""
    return eval_every > 0 and step % eval_every == 0 and step < total


@dataclass(frozen=True)
class StepActions:
    """What the end of a step does after its evaluation, in this order."""

    checkpoint: bool
    """Write a resumable step checkpoint (``checkpoints/step-N``; the recipe's ``save`` prunes old ones)."""
    stop: bool
    """Return now, stopped early, without a final model."""


def step_actions(step: int, total: int, checkpoint_every: int, stop_requested: bool) -> StepActions:
    """The checkpoint and stop of step ``step`` (1-based, just done) of ``total``.

    A checkpoint every ``checkpoint_every`` steps (0: none), and always before an early stop so that the
    rerun resumes from here. A stop asked for at the last step is not an early stop: the run finishes
    (final evaluation and model) as it would have anyway.
    """
    stop = stop_requested and step < total
    return StepActions(checkpoint=(checkpoint_every > 0 and step % checkpoint_every == 0) or stop, stop=stop)


def train_result(run: Any, started: float, step: int, metrics: dict[str, float], last_saved: Path | None,
                 final: Path | None = None, *, cls: type[TrainResult] = TrainResult, **extra: Any) -> TrainResult:  # fmt: skip
    """The result of a run that ended after ``step``: finished with its ``final`` folder, or (None) stopped.

    ``run`` is a recipe's ``Run`` (it reads ``run.cfg.output_dir`` and ``run.resumed_from``);
    ``started`` the ``time.perf_counter()`` at the start of ``train``; ``metrics`` the last held-out
    evaluation; ``last_saved`` the newest step checkpoint. ``cls``/``extra``: a recipe's subclass of
    :class:`TrainResult` and its own fields (the segment RM's ``info``).
    """
    return cls(Path(run.cfg.output_dir), final, last_saved, step, metrics, run.resumed_from, final is None,
               time.perf_counter() - started, **extra)  # fmt: skip


def progress_bar(accelerator: Any, total: int, initial: int, desc: str, enabled: bool) -> Any:
    """The run's tqdm bar over optimizer steps on stderr, shown by the main process when ``enabled``."""
    return tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, dynamic_ncols=True,
                disable=not (enabled and accelerator.is_main_process))  # fmt: skip


def shard(n: int, world: int, rank: int) -> list[int]:
    """This process's indices of ``range(n)``: ``ceil(n / world)`` each, the last shard padded with n − 1.

    Every process gets the same count, so ``accelerator.gather`` of per-item results followed by
    ``[:n]`` is every item exactly once, in order.
    """
    per = math.ceil(n / world)
    return [min(i, n - 1) for i in range(rank * per, (rank + 1) * per)]
