"""Identical measurement probes for both frameworks: step timers, work counters, memory readings.

One :class:`StepProbe` per process. A framework calls ``begin()`` just before an optimizer step's
work starts and ``end()`` right after the optimizer step (TRL: ``on_step_begin`` / ``on_step_end``;
ours: the recipe's step callbacks). ``step_s`` is begin→end; ``cycle_s`` is end→end, i.e. everything
a user pays per step including batch fetch/collation and logging. The headline uses ``cycle_s``.

:class:`WorkCounter` counts the work with hooks that do not depend on framework code: a forward
pre-hook on the backbone trunk (rows, real tokens, padded slots, a checksum of the token ids,
grad-enabled or not), a gradient hook on one trunk parameter (backward passes) and torch's global
optimizer-step hook (optimizer steps). Hooks store Python ints and 0-dim tensors only; tensors are
turned into numbers after training, so no probe adds a device sync inside the timed region.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux /proc; 0.0 elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE / 2**20
    except OSError:
        return 0.0


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class _Forward:
    step: int
    grad: bool
    rows: int
    slots: int
    tokens: Any  # 0-dim tensor: non-pad tokens
    checksum: Any  # 0-dim int64 tensor: sum over real tokens of id * (id + 7)


@dataclass
class WorkCounter:
    """Counts forwards, backwards and optimizer steps of one model, attributed to the current step."""

    step: int = -1
    forwards: list[_Forward] = field(default_factory=list)
    backwards: list[int] = field(default_factory=list)
    optimizer_steps: list[int] = field(default_factory=list)
    _handles: list[Any] = field(default_factory=list)

    def attach(self, trunk: Any) -> WorkCounter:
        """Hook ``trunk`` (the backbone module under the scoring head, e.g. ``model.model``/``model.bert``)."""
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        def on_forward(_module, args, kwargs):
            ids = kwargs.get("input_ids")
            if ids is None and args:
                ids = args[0]
            if ids is None:  # an inputs_embeds call: count rows only
                embeds = kwargs.get("inputs_embeds")
                rows, slots = (
                    (embeds.shape[0], embeds.shape[0] * embeds.shape[1]) if embeds is not None else (0, 0)
                )
                tokens = checksum = torch.zeros((), dtype=torch.long)
            else:
                mask = kwargs.get("attention_mask")
                mask = torch.ones_like(ids) if mask is None else mask.to(ids.dtype)
                rows, slots = ids.shape[0], ids.numel()
                with torch.no_grad():
                    tokens = mask.sum()
                    checksum = (ids * (ids + 7) * mask).sum()
            self.forwards.append(_Forward(self.step, torch.is_grad_enabled(), rows, slots, tokens, checksum))

        def on_grad(grad):
            self.backwards.append(self.step)
            return grad

        def on_optimizer_step(_optimizer, _args, _kwargs):
            self.optimizer_steps.append(self.step)

        first_param = next(p for p in trunk.parameters() if p.requires_grad)
        self._handles = [
            trunk.register_forward_pre_hook(on_forward, with_kwargs=True),
            first_param.register_hook(on_grad),
            register_optimizer_step_post_hook(on_optimizer_step),
        ]
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def per_step(self, steps: range) -> list[dict[str, int]]:
        """Counts for each step index in ``steps`` (materialises the token tensors: call after training)."""
        out = []
        for step in steps:
            fwd = [f for f in self.forwards if f.step == step]
            grad = [f for f in fwd if f.grad]
            out.append(
                {
                    "grad_forward_calls": len(grad),
                    "grad_rows": sum(f.rows for f in grad),
                    "nograd_rows": sum(f.rows for f in fwd if not f.grad),
                    "tokens": int(sum(int(f.tokens) for f in grad)),
                    "token_slots": sum(f.slots for f in grad),
                    "backward_passes": self.backwards.count(step),
                    "optimizer_steps": self.optimizer_steps.count(step),
                }
            )
        return out

    def checksum(self) -> int:
        """Checksum of every grad-enabled token forwarded in the run (order-free: same pairs ⇒ same sum)."""
        return int(sum(int(f.checksum) for f in self.forwards if f.grad))

    def outside_steps(self) -> int:
        """Forward calls made outside any step (before the first begin or between end and begin)."""
        return sum(1 for f in self.forwards if f.step < 0)


@dataclass
class StepProbe:
    """Per-step wall times; ``sync`` is called before each clock read (``torch.cuda.synchronize`` on GPU)."""

    counter: WorkCounter | None = None
    sync: Any = None
    step_s: list[float] = field(default_factory=list)
    cycle_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    """Process CPU time (user + sys, all threads) per cycle: less sensitive than wall time to other
    processes on a shared machine (a contended run shows up in ``preempted`` instead)."""
    minor_faults: list[int] = field(default_factory=list)
    """Minor page faults per cycle (fresh memory touched: allocator churn)."""
    preempted: list[int] = field(default_factory=list)
    """Involuntary context switches per cycle: how often other processes took this one's core."""
    rss_before_first_step_mb: float = 0.0
    peak_rss_at_last_end_mb: float = 0.0
    """``ru_maxrss`` read at each ``end()``: the peak of the training steps, not of saving afterwards."""
    _t_begin: float = 0.0
    _t_last_end: float | None = None
    _usage_last_end: Any = None
    _usage_begin: Any = None
    _n: int = 0
    _before: dict[int, list[Any]] = field(default_factory=dict)
    _after: dict[int, list[Any]] = field(default_factory=dict)

    def before_step(self, index: int, fn) -> None:
        """Run ``fn()`` right before step ``index``'s clock starts (e.g. reset GPU peak stats after warm-up)."""
        self._before.setdefault(index, []).append(fn)

    def after_step(self, index: int, fn) -> None:
        """Run ``fn()`` right after step ``index``'s clock stopped (e.g. stop a profiler)."""
        self._after.setdefault(index, []).append(fn)

    def begin(self) -> None:
        if self._n == 0:
            self.rss_before_first_step_mb = rss_mb()
        for fn in self._before.get(self._n, []):
            fn()
        if self.counter is not None:
            self.counter.step = self._n
        if self.sync is not None:
            self.sync()
        self._usage_begin = resource.getrusage(resource.RUSAGE_SELF)
        self._t_begin = time.perf_counter()

    def end(self) -> None:
        if self.sync is not None:
            self.sync()
        now = time.perf_counter()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.step_s.append(now - self._t_begin)
        self.cycle_s.append(now - (self._t_last_end if self._t_last_end is not None else self._t_begin))
        last = self._usage_last_end or self._usage_begin
        self.cpu_s.append(usage.ru_utime + usage.ru_stime - last.ru_utime - last.ru_stime)
        self.minor_faults.append(usage.ru_minflt - last.ru_minflt)
        self.preempted.append(usage.ru_nivcsw - last.ru_nivcsw)
        self._t_last_end, self._usage_last_end = now, usage
        self.peak_rss_at_last_end_mb = peak_rss_mb()
        for fn in self._after.get(self._n, []):
            fn()
        self._n += 1
        if self.counter is not None:
            self.counter.step = -1 - self._n  # between steps: attributed to no step

    @property
    def steps(self) -> int:
        return self._n
