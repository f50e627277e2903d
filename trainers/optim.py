"""AdamW and the learning-rate schedule of :class:`trainers.config.OptimConfig` (shared by recipes)."""

from __future__ import annotations

import math

import torch
from torch import nn

from trainers.config import OptimConfig


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warm-up over ``round(warmup_ratio × total)`` steps (the first step already gets
    1/(warmup+1) of the rate, never 0), then constant, linear to 0, or cosine to ``min_lr_ratio``.
    """
    warmup = round(cfg.warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total_steps - warmup)
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _fast_kernel(params: list[nn.Parameter]) -> dict[str, bool]:
    """The fused AdamW kernel where every parameter lives on CPU or CUDA, else the foreach one.

    The default per-parameter loop costs ~10x more per step on CPU (thousands of small ops for a
    BERT-sized model), which showed up as the main gap to TRL in bench/rm_vs_trl.py.
    """
    if params and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params):
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters (weight decay on matrices only) and its LambdaLR schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **_fast_kernel(params))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
    return optimizer, scheduler
