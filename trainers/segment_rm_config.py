"""Configuration of the segment reward-model recipe (:mod:`trainers.recipes.segment_reward_model`).

The recipe's frozen config dataclasses, documented field by field (see :mod:`trainers.config`);
re-exported by the recipe module, which is where callers import them from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from trainers.config import OptimConfig, bounded


@dataclass(frozen=True)
class SegmentationConfig:
    """How responses are cut into segments (by the frozen reference's next-token entropy)."""

    threshold: float | None = bounded(None, ge=-1)
    """τ_H in nats. null: calibrate to ``target_mean_segment_len``; 0: token level; 1000: bandit."""
    target_mean_segment_len: float = bounded(6.0, ge=1)
    """Wanted mean tokens per segment when τ_H is calibrated (the paper's models give ~4–8)."""
    calibration_responses: int = bounded(512, ge=1)
    """How many training responses calibrate τ_H (chosen and rejected of the first pairs in file order)."""


@dataclass(frozen=True)
class SpanConfig:
    """Human good/bad spans as auxiliary supervision (not in the paper; default off)."""

    snapshot: str | None = None
    """Segments snapshot (prompt, response/completion, spans with code-point offsets)."""
    weight: float = bounded(0.0, ge=0)
    """λ: weight of the span loss added to the BT loss (0: spans unused)."""
    batch_size: int = bounded(8, ge=1)
    """Span-labelled responses per micro-batch per process."""


@dataclass(frozen=True)
class NormaliserConfig:
    """The location-aware normaliser fitted after training."""

    calibration_fraction: float = bounded(0.0, ge=0, lt=1)
    """Share of the training pairs set aside (by content hash) to fit it; 0: fit on the held-out
    pairs, or on the training pairs when there are none."""
    max_pairs: int = bounded(2000, ge=1)
    """At most this many calibration pairs (2 responses each) are scored."""


@dataclass(frozen=True)
class SegmentRewardModelConfig:
    """Train a segment-level Bradley–Terry reward model on a preference snapshot."""

    snapshot: str
    """Preference snapshot: JSONL, Parquet or a datasets folder in TRL columns (see trainers.data)."""
    output_dir: str
    """Run folder: checkpoints/, final/, metrics.jsonl. Rerunning into it resumes."""
    eval_snapshot: str | None = None
    """Held-out snapshot; when null, ``eval_fraction`` of the pairs are held out by content hash."""
    eval_fraction: float = bounded(0.1, ge=0, lt=1)
    """Share of the snapshot held out when there is no ``eval_snapshot`` (0: no evaluation)."""
    model: str = "smollm2"
    """Causal-LM backbone, also the frozen entropy reference: a default name, a folder or a hub id."""
    model_cache: str | None = None
    """Where default models live (default: $STUDIO_MODEL_CACHE or ~/.cache/feedback-studio/models)."""
    max_length: int = bounded(256, ge=8)
    """Tokens per sequence (prompt + response + EOS); longer ones are truncated."""
    truncation_side: Literal["left", "right"] = "left"
    """Which end of an over-long sequence to cut: left keeps the end of the response."""
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    """τ_H: explicit or calibrated."""
    spans: SpanConfig = field(default_factory=SpanConfig)
    """Optional human-span supervision."""
    normaliser: NormaliserConfig = field(default_factory=NormaliserConfig)
    """Calibration data of the location-aware normaliser."""
    batch_size: int = bounded(8, ge=1)
    """Pairs per micro-batch per process."""
    eval_batch_size: int = bounded(32, ge=1)
    """Pairs per forward pass during evaluation and normaliser fitting."""
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
    """Seeds the value-head initialisation, the batch order and dropout."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on a GPU that supports it, else full fp32 (entropies are always fp32)."""
    cpu: bool = False
    """Run on the CPU even when a GPU is present."""
    resume: bool = True
    """Continue from the latest complete checkpoint in output_dir; false refuses a non-empty run folder."""
    progress: bool = True
    """Show a tqdm progress bar on stderr."""
