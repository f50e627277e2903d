"""Reward-model workloads and what both sides share: backbone folder, pairs, device, result skeleton."""

from __future__ import annotations

import json
import platform
import subprocess
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench.harness.assets import minilm_shape_dir, model_dir
from bench.harness.pairs import make_pairs, pools_from_vocab

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class RMWorkload:
    """One Bradley–Terry RM training cell: backbone, pairs per optimizer step, words per side, steps."""

    name: str
    """Protocol id, e.g. ``C-rm-t`` (research note §4.3)."""
    backbone: str
    """``tiny-128``/``smol-135M`` (random-init Llama shapes, word-level vocab) or ``minilm`` (the real encoder)."""
    pairs_per_step: int
    """Preference pairs per optimizer step (one micro-batch, no accumulation)."""
    length: int
    """Words per side; each word is one token (+EOS for Llama, +CLS/SEP for BERT)."""
    k: int
    """Sentiment words per side (positive in chosen, negative in rejected)."""
    warmup: int
    """Optimizer steps run but not timed."""
    timed: int
    """Optimizer steps timed."""
    lr: float = 1e-4
    """Constant learning rate (TRL's RewardConfig default)."""

    @property
    def steps(self) -> int:
        return self.warmup + self.timed

    @property
    def n_pairs(self) -> int:
        """Exactly one epoch: each pair is seen once, so the run's token checksum is order-free."""
        return self.pairs_per_step * self.steps


CPU_WORKLOADS: dict[str, RMWorkload] = {
    "tiny": RMWorkload("C-rm-t", "tiny-128", 64, 64, 8, 3, 30),
    "minilm": RMWorkload("C-rm-m", "minilm", 16, 64, 8, 2, 10),
    "smol": RMWorkload("C-rm-s", "smol-135M", 8, 32, 4, 2, 5),
}
"""The CPU matrix (tiny and smol from §4.3; minilm is our real default RM encoder)."""

SMOKE_STEPS = {"tiny": (2, 5), "minilm": (1, 3), "smol": (1, 2)}
"""(warm-up, timed) for ``--smoke``: enough to exercise every path, not to measure."""

GPU_WORKLOADS: dict[str, RMWorkload] = {
    "smol-128": RMWorkload("G-rm-s128", "smol-135M", 64, 128, 16, 5, 30),
    "smol-512": RMWorkload("G-rm-s512", "smol-135M", 64, 512, 64, 5, 30),
    "minilm": RMWorkload("G-rm-m", "minilm", 64, 128, 16, 5, 30),
}
"""G-rm (§4.3) on the SmolLM2-135M shape, plus MiniLM at the same batch."""


def workloads(kind: str, smoke: bool) -> dict[str, RMWorkload]:
    """The matrix for ``kind`` (``cpu``/``gpu``), shortened when ``smoke``."""
    table = CPU_WORKLOADS if kind == "cpu" else GPU_WORKLOADS
    if not smoke:
        return dict(table)
    return {
        key: replace(w, warmup=SMOKE_STEPS.get(key, (1, 3))[0], timed=SMOKE_STEPS.get(key, (1, 3))[1])
        for key, w in table.items()
    }


def backbone_path(backbone: str, cache: Path | None = None) -> Path:
    """Folder of the backbone: built once for Llama shapes; for ``minilm`` the model cache's real encoder,
    else (machines without it) a random-init encoder of its exact shape (:func:`minilm_shape_dir`)."""
    if backbone == "minilm":
        from trainers.models import ModelNotFoundError, resolve_model

        try:
            return resolve_model("minilm")
        except ModelNotFoundError:
            return minilm_shape_dir(seed=0, cache=cache)
    return model_dir(backbone, seed=0, cache=cache)


def is_encoder(path: Path) -> bool:
    """True for BERT-style folders (tokenizer adds CLS/SEP; no EOS)."""
    return json.loads((path / "config.json").read_text()).get("model_type") == "bert"


def workload_pairs(workload: RMWorkload, path: Path, seed: int) -> list[dict[str, str]]:
    """The run's pairs (same for both frameworks at a given seed)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    pools = pools_from_vocab(tokenizer.get_vocab(), bert=is_encoder(path))
    return make_pairs(pools, workload.n_pairs, workload.length, workload.k, seed=1000 + seed)


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        sha = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
        return sha + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def result_skeleton(framework: str, version: str, workload: RMWorkload, seed: int, device: str, precision: str,
                    threads: int) -> dict[str, Any]:  # fmt: skip
    import torch
    import transformers

    return {
        "framework": framework,
        "framework_version": version,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git": git_sha(),
        "device": device,
        "device_name": device_name(device),
        "precision": precision,
        "threads": threads,
        "workload": asdict(workload),
        "seed": seed,
    }


def probe_results(probe, counter, workload: RMWorkload, device: str) -> dict[str, Any]:
    """Timings, counters and memory of a finished run (counters only over the timed steps)."""
    from bench.harness.probes import peak_rss_mb

    timed = range(workload.warmup, workload.warmup + workload.timed)
    out: dict[str, Any] = {
        "steps_run": probe.steps,
        "step_s": probe.step_s,
        "cycle_s": probe.cycle_s,
        "cpu_s": probe.cpu_s,
        "minor_faults": probe.minor_faults,
        "preempted": probe.preempted,
        "timed_steps": [timed.start, timed.stop],
        "work_per_step": counter.per_step(timed),
        "token_checksum": counter.checksum(),
        "forwards_outside_steps": counter.outside_steps(),
        "rss_before_first_step_mb": round(probe.rss_before_first_step_mb, 1),
        "peak_rss_mb": round(probe.peak_rss_at_last_end_mb, 1),
        "peak_rss_process_end_mb": round(peak_rss_mb(), 1),
    }
    out["peak_minus_first_step_mb"] = round(out["peak_rss_mb"] - out["rss_before_first_step_mb"], 1)
    if device.startswith("cuda"):
        import torch

        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["cuda_max_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    return out
