"""Where a step's time goes: torch.profiler over the timed steps, grouped into a few categories.

Used by ``python -m bench.rm_vs_trl --profile`` (separate processes; profiled runs are never timed
runs). Categories are matched on op names; "outside ops" is wall time minus the ops' self time on the
main thread, i.e. Python, framework bookkeeping and dispatch gaps.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

CATEGORIES: dict[str, tuple[str, ...]] = {
    "matmul (fwd+bwd)": (
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
        "aten::matmul",
        "aten::linear",
        "aten::baddbmm",
    ),
    "attention (sdpa)": ("scaled_dot_product", "_flash_attention", "_efficient_attention", "sdpa"),
    "optimizer": ("adam", "Optimizer.step"),
    "grad clip / norms": ("aten::linalg_vector_norm", "aten::norm", "_foreach_norm", "clip_grad"),
    "embedding": ("aten::embedding", "embedding_dense_backward", "aten::index_add", "aten::index_put"),
    "memory (alloc/zero/copy)": (
        "aten::empty",
        "aten::zero_",
        "aten::zeros",
        "aten::fill_",
        "aten::copy_",
        "aten::clone",
        "aten::contiguous",
        "aten::to",
        "aten::_to_copy",
        "aten::cat",
    ),
}


def _category(name: str) -> str:
    lowered = name.lower()
    for category, needles in CATEGORIES.items():
        if any(needle.lower() in lowered for needle in needles):
            return category
    return "other ops"


def attach(probe: Any, first: int, last: int, out: Path, label: str, *, cuda: bool = False) -> None:
    """Profile steps ``first..last`` (inclusive) of ``probe``; write ``<out>/<label>.{txt,json}``."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(activities=activities)
    clock: dict[str, float] = {}

    def start() -> None:
        prof.__enter__()
        clock["start"] = time.perf_counter()

    def stop() -> None:
        wall = time.perf_counter() - clock["start"]
        prof.__exit__(None, None, None)
        write(prof, wall, last - first + 1, out, label)

    probe.before_step(first, start)
    probe.after_step(last, stop)


def write(prof: Any, wall_s: float, steps: int, out: Path, label: str) -> dict[str, Any]:
    events = prof.key_averages()
    top_level = [e for e in events if e.key.startswith("aten::") or "adam" in e.key.lower()]
    by_category: dict[str, float] = {}
    for event in events:
        by_category[_category(event.key)] = (
            by_category.get(_category(event.key), 0.0) + event.self_cpu_time_total
        )
    ops_s = sum(by_category.values()) / 1e6
    report = {
        "label": label,
        "steps": steps,
        "wall_per_step_s": wall_s / steps,
        "ops_self_cpu_per_step_s": ops_s / steps,
        "outside_ops_per_step_s": max(0.0, wall_s - ops_s) / steps,
        "categories_per_step_s": {
            k: v / 1e6 / steps for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])
        },
        "op_calls_per_step": sum(e.count for e in top_level) / steps,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{label}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{label}.txt").write_text(events.table(sort_by="self_cpu_time_total", row_limit=40))
    return report
