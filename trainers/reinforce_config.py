"""Config of the ``reinforce`` recipe (REINFORCE / MRT with ESRL sampling): typed, documented, nested.

Kept apart from :mod:`trainers.recipes.reinforce` so the loop file stays readable; the studio's form
is built from :class:`ReinforceConfig` (``python -m trainers --schema``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from trainers.config import ConfigFieldError, OptimConfig, bounded
from trainers.rollout import SamplingConfig
from trainers.tasks import RewardConfig


@dataclass(frozen=True)
class KLConfig:
    """The KL penalty to the reference, subtracted from each sequence's reward."""

    beta: float = bounded(0.05, ge=0)
    """Initial KL coefficient β (0 with no target: no penalty)."""
    target: float | None = bounded(None, gt=0)
    """Target KL per sequence (summed over response tokens); null keeps β fixed."""
    estimator: Literal["k1", "k1_clamped", "k2", "k3"] = "k1"
    """Per-token KL estimator summed over the response (k1 = log π − log π_ref)."""
    gain: float = bounded(0.1, gt=0)
    """Step of the adaptive rule β ← β·(1 + gain·e), e = clip((KL − target)/target, ±0.2)."""


@dataclass(frozen=True)
class DynamicSamplingConfig:
    """ESRL dynamic sampling: which samples get a gradient (see trainers.esrl)."""

    mode: Literal["off", "eliminate", "adaptive"] = "off"
    """off; eliminate: drop the most confident samples (released ESRL); adaptive: k and τ per
    prompt from its estimated capability (ours, not the paper's)."""
    eliminate_ratio: float = bounded(0.3, ge=0, lt=1)
    """eliminate: share ρ of each rollout batch dropped (⌈ρ·B⌉ samples, at least one kept)."""
    confidence: Literal["max_prob", "entropy"] = "max_prob"
    """eliminate: mean max-probability, or 1 − mean entropy / log V, over the valid tokens."""
    capability: Literal["entropy", "reward"] = "entropy"
    """adaptive: c from the first sample's entropy, or from its reward scaled by reward_low/high."""
    reward_low: float = -1.0
    """adaptive with capability reward: the reward mapped to c = 0."""
    reward_high: float = 1.0
    """adaptive with capability reward: the reward mapped to c = 1."""
    k_min: int = bounded(1, ge=1)
    """adaptive: fewest samples of a prompt."""
    k_max: int = bounded(8, ge=1)
    """adaptive: most samples of a prompt."""
    tau_min: float = bounded(0.7, gt=0)
    """adaptive: temperature of a fully capable prompt."""
    tau_max: float = bounded(1.2, gt=0)
    """adaptive: temperature of a prompt with c = 0."""

    def __post_init__(self) -> None:
        if self.k_min > self.k_max or self.tau_min > self.tau_max:
            raise ConfigFieldError("k_min", "need k_min <= k_max and tau_min <= tau_max")
        if not self.reward_high > self.reward_low:
            raise ConfigFieldError("reward_high", "must be greater than reward_low")


@dataclass(frozen=True)
class ReinforceOptimConfig(OptimConfig):
    """AdamW, schedule, clipping and accumulation for policy-gradient fine-tuning."""

    lr: float = bounded(1e-5, gt=0)
    """Peak learning rate."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Decay after warm-up: constant, linear to 0, or cosine to ``min_lr_ratio`` × lr."""


@dataclass(frozen=True)
class ReinforceConfig:
    """Train a causal-LM policy with REINFORCE (or MRT) and ESRL sampling on a reward."""

    output_dir: str
    """Run folder: checkpoints/, final/, metrics.jsonl. Rerunning into it resumes."""
    task: Literal["sentiment", "synthetic_translation"] = "sentiment"
    """Built-in prompts and reward (used when no snapshot is given)."""
    snapshot: str | None = None
    """A studio prompts snapshot to train on instead of the task (needs a reward.kind other than task)."""
    eval_snapshot: str | None = None
    """Held-out prompts snapshot; when null, ``eval_fraction`` of the snapshot is held out by hash."""
    eval_fraction: float = bounded(0.1, ge=0, lt=1)
    """Share of a snapshot's prompts held out when there is no eval_snapshot."""
    n_train: int | None = bounded(None, ge=1)
    """Built-in task: training prompts (null: the whole training pool)."""
    n_eval: int = bounded(32, ge=0)
    """Held-out prompts evaluated (at most the pool; 0: no evaluation)."""
    model: str = "smollm2"
    """Starting policy (also the frozen reference): a default model name, a local folder, or a hub id."""
    model_cache: str | None = None
    """Where default models live (default: $STUDIO_MODEL_CACHE or ~/.cache/feedback-studio/models)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """The reward: the task's own, VADER, or a reward-model checkpoint."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Stage-1 sampling of training (and evaluation) responses."""
    max_prompt_tokens: int = bounded(128, ge=1)
    """Prompts are cut on the left to this many tokens."""
    group_size: int = bounded(4, ge=1)
    """K, responses sampled per prompt (adaptive mode: chosen per prompt between k_min and k_max)."""
    batch_size: int = bounded(8, ge=1)
    """Prompts per micro-batch per process (one rollout batch = batch_size × K responses)."""
    max_steps: int = bounded(100, ge=1)
    """Optimizer steps."""
    loss: Literal["reinforce", "mrt"] = "reinforce"
    """reinforce: −(s − b)·log p; mrt: minimum risk training over each group's sample set."""
    baseline: Literal["group_mean", "leave_one_out", "running", "none"] = "leave_one_out"
    """REINFORCE baseline b: the K samples' mean, the mean of the other K − 1 (RLOO), a running mean."""
    running_alpha: float = bounded(0.1, gt=0, le=1)
    """EMA rate of the running baseline."""
    scale_by_std: bool = False
    """Divide advantages by the group's score std (+1e-6), GRPO-style."""
    reduction: Literal["sequence", "token_mean"] = "sequence"
    """REINFORCE: average over samples, or over response tokens (length-normalised)."""
    mrt_alpha: float = bounded(5e-3, ge=0)
    """MRT sharpness α: Q ∝ p^α over the sample set."""
    mrt_dedup: bool = True
    """MRT: count a response sampled twice for a prompt once."""
    logprobs_of: Literal["raw", "sampled"] = "raw"
    """Stage-2 log-probs under the raw model (REINFORCE on π_θ) or the sampling distribution."""
    kl: KLConfig = field(default_factory=KLConfig)
    """KL penalty to the reference and its controller."""
    dynamic: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    """ESRL dynamic sampling."""
    optim: ReinforceOptimConfig = field(default_factory=ReinforceOptimConfig)
    """AdamW, schedule, clipping, accumulation."""
    eval_every: int = bounded(0, ge=0)
    """Evaluate every N steps (0: only at the start and the end)."""
    eval_at_start: bool = True
    """Evaluate the starting policy before the first step (the "before" numbers)."""
    eval_batch_size: int = bounded(16, ge=1)
    """Prompts per evaluation rollout."""
    checkpoint_every: int = bounded(0, ge=0)
    """Write a resumable checkpoint every N steps (0: only the final model)."""
    keep_checkpoints: int = bounded(2, ge=0)
    """How many step checkpoints to keep (0: all)."""
    log_every: int = bounded(1, ge=1)
    """Write training metrics every N steps."""
    seed: int = 0
    """Seeds the prompt order and sampling."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on a GPU that supports it, else full fp32."""
    cpu: bool = False
    """Run on the CPU even when a GPU is present."""
    disable_dropout: bool = True
    """Set every dropout probability to 0 (the policy that samples is the policy that learns)."""
    chunk_steps: int = bounded(16, ge=1)
    """Response steps per chunk of float32 logits in the teacher-forced passes."""
    resume: bool = True
    """Continue from the latest complete checkpoint in output_dir; false refuses a non-empty run folder."""
    progress: bool = True
    """Show a tqdm progress bar on stderr."""

    def __post_init__(self) -> None:
        if self.loss == "mrt" and self.dynamic.mode == "off" and self.group_size < 2:
            raise ConfigFieldError("group_size", "MRT compares samples of a prompt: needs group_size >= 2")
        if self.baseline == "leave_one_out" and self.group_size < 2 and self.dynamic.mode != "adaptive":
            raise ConfigFieldError("baseline", "leave_one_out needs group_size >= 2 (or use running)")
        if self.dynamic.mode == "adaptive" and self.sampling.temperature == 0:
            raise ConfigFieldError(
                "dynamic.mode", "adaptive sets temperatures: sampling.temperature must be > 0"
            )
