"""The config of the PPO recipe (and of NLPO, which extends it): typed, documented, nested by concern.

Defaults follow RL4LMs' IMDB settings scaled to a CPU demonstration (algorithms.md §1.6, §1.10,
§1.13): β0 0.1 with the RL4LMs adaptive controller towards 0.1 nats per token, γ 0.99, λ 0.95,
ε 0.2, value coefficient 0.5, no entropy bonus, 4 PPO epochs per rollout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from trainers.config import ConfigFieldError, OptimConfig, bounded
from trainers.rollout import SamplingConfig
from trainers.tasks import RewardConfig


@dataclass(frozen=True)
class PPOOptimConfig(OptimConfig):
    """AdamW for the policy (the critic has its own learning rate, ``critic_lr``), constant by default."""

    lr: float = bounded(1e-5, gt=0)
    """Policy learning rate (RL4LMs uses 1e-6–2e-6 for GPT-2/T5; 1e-5 suits SmolLM2-135M)."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Decay after warm-up over all optimizer steps of the run (RL4LMs: constant)."""
    max_grad_norm: float | None = bounded(1.0, gt=0)
    """Clip the policy's and the critic's gradient norms (each separately) to this (null: no clipping)."""


@dataclass(frozen=True)
class KLConfig:
    """The KL penalty in the reward: r_t = R_t − β·kl_t, with β fixed or adapted to a target (§1.3–§1.4)."""

    beta: float = bounded(0.1, ge=0)
    """The initial KL coefficient β (RL4LMs ``kl_div.coeff``)."""
    target: float | None = bounded(0.1, gt=0)
    """Target KL per response token (nats): β adapts towards it after each rollout (RL4LMs rule,
    ±2 % per iteration); null keeps β fixed."""
    horizon: int | None = bounded(None, ge=1)
    """With a target: null for the RL4LMs rule, or Ziegler et al.'s horizon (e.g. 10000 samples)."""
    estimator: Literal["k1", "k1_clamped", "k2", "k3"] = "k1"
    """Per-token KL estimator in the reward: k1 = log π − log π_ref (RL4LMs, OpenRLHF), max(0, k1)
    (DeepSpeed-Chat), k2 = ½ k1², k3 = e^{−k1} − 1 + k1. The controller always reads the k1 mean."""

    def __post_init__(self) -> None:
        if self.target is not None and not self.beta > 0:
            raise ConfigFieldError("beta", "an adaptive KL controller (target set) needs beta > 0")


@dataclass(frozen=True)
class PPOConfig:
    """Train a causal-LM policy with PPO on prompts and a reward (task reward, VADER or a reward model)."""

    output_dir: str
    """Run folder: checkpoints/, final/, metrics.jsonl. Rerunning into it resumes."""
    task: Literal["sentiment", "synthetic_translation"] = "sentiment"
    """Built-in task: its prompts (unless ``snapshot`` is given) and its reward (``reward.kind: task``)."""
    snapshot: str | None = None
    """A studio ``prompts`` snapshot to train on instead of the task's prompts (then choose a reward kind
    other than task)."""
    eval_snapshot: str | None = None
    """Held-out prompts snapshot; null holds out ``eval_fraction`` of ``snapshot`` by content hash."""
    eval_fraction: float = bounded(0.1, ge=0, lt=1)
    """Share of a snapshot's prompts held out when there is no ``eval_snapshot``."""
    n_train: int | None = bounded(None, ge=1)
    """Training prompts taken from the built-in task (null: all of its training pool)."""
    n_eval: int = bounded(32, ge=1)
    """Held-out prompts evaluated (at most; a task's held-out pool may be smaller)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """What is optimised: the task's reward, VADER, or a (segment) reward-model checkpoint."""
    reward_clip: float | None = bounded(10.0, gt=0)
    """Clip each per-token task reward to ±this before the KL term (OpenRLHF; null: no clipping)."""
    model: str = "smollm2"
    """Starting policy (also the frozen reference): a default model name, a local folder, or a hub id."""
    model_cache: str | None = None
    """Where default models live (default: $STUDIO_MODEL_CACHE or ~/.cache/feedback-studio/models)."""
    critic: Literal["separate", "shared"] = "separate"
    """separate: a second trunk plus value head (RL4LMs, OpenRLHF); shared: a value head on the
    policy's own trunk (half the memory and compute; the value loss then also shapes the trunk)."""
    critic_model: str | None = None
    """Initial trunk of a separate critic (null: the starting policy's)."""
    critic_lr: float | None = bounded(None, gt=0)
    """Learning rate of the critic (trunk and head; null: the policy's ``optim.lr``)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """How responses are sampled; log-probs of exactly this distribution are PPO's π_old."""
    max_prompt_tokens: int = bounded(64, ge=1)
    """Prompts are cut on the left to this many tokens."""
    stop_at_newline: bool | None = None
    """End responses at a newline as well as at EOS (null: the task's default)."""
    iterations: int = bounded(20, ge=1)
    """PPO iterations (one rollout and its epochs of updates each); the run's steps."""
    prompts_per_iteration: int = bounded(16, ge=1)
    """Prompts sampled per iteration (over all processes)."""
    samples_per_prompt: int = bounded(1, ge=1)
    """Responses per prompt; the iteration's rollout has prompts × samples rows."""
    rollout_batch_size: int = bounded(16, ge=1)
    """Rows per generation call (and per reference/critic scoring pass) per process."""
    ppo_epochs: int = bounded(4, ge=1)
    """Passes over the rollout per iteration (RL4LMs ``n_epochs``)."""
    minibatch_size: int = bounded(8, ge=1)
    """Rows per optimizer step per process (split into ``optim.grad_accum`` micro-batches)."""
    clip_eps: float = bounded(0.2, gt=0)
    """PPO ratio clip ε."""
    value_clip: float | None = bounded(0.2, gt=0)
    """Clip the new values to ±this around the rollout values in the value loss (null: off)."""
    vf_coef: float = bounded(0.5, ge=0)
    """Weight of the value loss."""
    ent_coef: float = bounded(0.0, ge=0)
    """Weight of the entropy bonus (0: off, RL4LMs' default)."""
    gamma: float = bounded(0.99, ge=0, le=1)
    """Discount γ."""
    lam: float = bounded(0.95, ge=0, le=1)
    """GAE λ."""
    kl: KLConfig = field(default_factory=KLConfig)
    """The KL penalty and its controller."""
    whiten_advantages: Literal["batch", "minibatch", "none"] = "batch"
    """Advantage normalisation: over the whole rollout (OpenRLHF), per minibatch (RL4LMs), or none."""
    loss_reduction: Literal["token_mean", "sequence_mean"] = "token_mean"
    """Per-token losses → scalar: mean over the minibatch's tokens, or mean of each row's token mean."""
    target_approx_kl: float | None = bounded(None, gt=0)
    """Stop an iteration's epochs when a minibatch's approximate KL to π_old exceeds 1.5 × this
    (that minibatch is not applied; null: never)."""
    optim: PPOOptimConfig = field(default_factory=PPOOptimConfig)
    """AdamW, schedule, clipping, accumulation of the policy."""
    eval_every: int = bounded(0, ge=0)
    """Evaluate on the held-out prompts every N iterations (0: only at the end)."""
    eval_at_start: bool = True
    """Also evaluate the starting policy before the first iteration (the "before" numbers)."""
    eval_batch_size: int = bounded(32, ge=1)
    """Prompts per generation call during evaluation."""
    checkpoint_every: int = bounded(0, ge=0)
    """Write a resumable checkpoint every N iterations (0: only the final model)."""
    keep_checkpoints: int = bounded(2, ge=0)
    """How many step checkpoints to keep (0: all)."""
    log_every: int = bounded(1, ge=1)
    """Write training metrics every N iterations."""
    seed: int = 0
    """Seeds prompt order, sampling and minibatch order (all pure functions of seed and iteration)."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on a GPU that supports it, else full fp32."""
    cpu: bool = False
    """Run on the CPU even when a GPU is present."""
    disable_dropout: bool = True
    """Set every dropout probability to 0 (the ratio then starts at exactly 1)."""
    chunk_steps: int = bounded(16, ge=1)
    """Response steps per chunk of float32 logits in the teacher-forced passes."""
    resume: bool = True
    """Continue from the latest complete checkpoint in output_dir; false refuses a non-empty run folder."""
    progress: bool = True
    """Show a tqdm progress bar on stderr."""

    def __post_init__(self) -> None:
        if not self.sampling.temperature > 0:
            raise ConfigFieldError(
                "sampling.temperature", "PPO samples its rollouts: temperature must be > 0"
            )
        if self.minibatch_size % self.optim.grad_accum:
            raise ConfigFieldError("minibatch_size", f"must be a multiple of optim.grad_accum "
                                   f"({self.optim.grad_accum}), got {self.minibatch_size}")  # fmt: skip
        if self.snapshot is None and self.eval_snapshot is not None:
            raise ConfigFieldError("eval_snapshot", "needs a training snapshot as well")
