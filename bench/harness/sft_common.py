"""Supervised-step workloads (SFT, DPO) and what both sides share: data, lengths, work tallies, records.

Issue 6's last bullet: our supervised step vs TRL 1.16's ``SFTTrainer`` / ``DPOTrainer`` at equal work.

* **SFT**: our filtered-MLE recipe (the shared weighted-SFT loop; every weight 1, i.e. plain SFT on the
  response tokens) vs ``SFTTrainer`` on prompt/completion rows with completion-only NLL loss.
* **DPO**: our ``dpo`` recipe vs ``DPOTrainer`` with the sigmoid loss. Ours always computes the reference
  log-probs once before training; TRL does the same with ``precompute_ref_log_probs=True`` (the headline
  rows). The ``*-liveref`` rows run TRL's default instead (a second model forwarded every step) against
  the same ours, and say so: that is an algorithmic saving, not equal work.

Data (same bytes on both sides, research note §4.2): every prompt is exactly ``prompt_len`` filler words,
every completion (SFT) / chosen and rejected (DPO) exactly ``completion_len`` words, then the EOS token
that both frameworks append, so each sequence is ``prompt_len + completion_len + 1`` tokens, nothing is
padded and ``completion_len + 1`` tokens per sequence are in the loss. Exactly one epoch (``batch × steps``
examples), so the run's token checksums do not depend on either side's shuffling.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from bench.harness.assets import model_dir
from bench.harness.pairs import pools_from_vocab

METHODS = ("sft", "dpo")


@dataclass(frozen=True)
class SFTWorkload:
    """One supervised-step cell: method, model, batch, lengths, steps, and how TRL gets its reference."""

    name: str
    """Protocol-style id, e.g. ``C-sft-t``."""
    method: Literal["sft", "dpo"]
    backbone: str
    """``tiny-128`` or ``smol-135M`` (random-init Llama shapes, word-level vocab; bench.harness.assets)."""
    batch: int
    """Sequences (SFT) or preference pairs (DPO) per optimizer step; one micro-batch, no accumulation."""
    prompt_len: int
    """Words (= tokens) per prompt."""
    completion_len: int
    """Words per completion / chosen / rejected; the EOS token comes on top."""
    warmup: int
    """Optimizer steps run but not timed."""
    timed: int
    """Optimizer steps timed."""
    lr: float = 1e-5
    """Constant learning rate, both sides."""
    beta: float = 0.1
    """DPO β (TRL's default), both sides."""
    trl_reference: Literal["precomputed", "live"] = "precomputed"
    """DPO only. precomputed: TRL's ``precompute_ref_log_probs=True`` (equal work with ours); live: TRL's
    default, a reference model forwarded every step (ours still caches: a declared difference)."""
    k: int = 4
    """DPO: sentiment words per side (positive in chosen, negative in rejected); irrelevant to speed."""

    @property
    def steps(self) -> int:
        return self.warmup + self.timed

    @property
    def n_examples(self) -> int:
        """Exactly one epoch, so every example is trained on once whatever the order."""
        return self.batch * self.steps

    @property
    def seq_tokens(self) -> int:
        """Tokens per sequence: prompt + completion + EOS."""
        return self.prompt_len + self.completion_len + 1

    @property
    def rows_per_step(self) -> int:
        """Sequences through the trunk per step (DPO: chosen and rejected)."""
        return self.batch * (2 if self.method == "dpo" else 1)


CPU_WORKLOADS: dict[str, SFTWorkload] = {
    "sft-tiny": SFTWorkload("C-sft-t", "sft", "tiny-128", 32, 32, 63, 2, 10),
    "dpo-tiny": SFTWorkload("C-dpo-t", "dpo", "tiny-128", 16, 32, 63, 2, 10, lr=1e-6),
    "dpo-tiny-liveref": SFTWorkload(
        "C-dpo-t-live", "dpo", "tiny-128", 16, 32, 63, 2, 10, lr=1e-6, trl_reference="live"
    ),
    "sft-smol": SFTWorkload("C-sft-s", "sft", "smol-135M", 8, 32, 31, 2, 5),
    "dpo-smol": SFTWorkload("C-dpo-s", "dpo", "smol-135M", 4, 32, 31, 2, 5, lr=1e-6),
}
"""The CPU matrix. Tiny: 96-token sequences (32 + 63 + EOS); smol-135M: 64-token sequences."""

TINY_KEYS = ("sft-tiny", "dpo-tiny", "dpo-tiny-liveref")
SMOL_KEYS = ("sft-smol", "dpo-smol")

SMOKE = {"sft-tiny": (1, 2, 8), "dpo-tiny": (1, 2, 4), "dpo-tiny-liveref": (1, 2, 4), "sft-smol": (1, 1, 8),
         "dpo-smol": (1, 1, 4)}  # fmt: skip
"""(warm-up, timed, batch) for ``--smoke``: enough to exercise every path (and the equal-work checks), not to
measure."""


def workloads(smoke: bool = False) -> dict[str, SFTWorkload]:
    """The CPU matrix, shortened when ``smoke``."""
    if not smoke:
        return dict(CPU_WORKLOADS)
    return {
        k: replace(w, warmup=SMOKE[k][0], timed=SMOKE[k][1], batch=SMOKE[k][2])
        for k, w in CPU_WORKLOADS.items()
    }


def backbone_path(backbone: str, cache: Path | None = None) -> Path:
    """Folder of the random-init checkpoint (built once, seed 0)."""
    return model_dir(backbone, seed=0, cache=cache)


# ----------------------------------------------------------------------------- data


def make_rows(vocab: Any, workload: SFTWorkload, seed: int) -> list[dict[str, str]]:
    """``n_examples`` rows ``{"prompt", "chosen", "rejected"}`` of exactly the workload's word counts.

    Completions start with a space: TRL joins prompt and completion strings with no separator, and the
    whitespace pre-tokenizer then splits them at the same word boundary as a separate tokenisation.
    """
    pools = pools_from_vocab(vocab)
    rng = random.Random(10_000 + seed)
    n, lp, lc = workload.n_examples, workload.prompt_len, workload.completion_len
    rows = []
    for _ in range(n):
        prompt = rng.choices(pools.filler, k=lp)
        words = rng.choices(pools.filler, k=lc)
        positions = rng.sample(range(lc), min(workload.k, lc))
        chosen, rejected = list(words), list(words)
        for pos in positions:
            chosen[pos] = rng.choice(pools.positive)
            rejected[pos] = rng.choice(pools.negative)
        rows.append({"prompt": " ".join(prompt), "chosen": " " + " ".join(chosen),
                     "rejected": " " + " ".join(rejected)})  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- work tallies


def id_checksum(ids: Any) -> Any:
    """0-dim int64 tensor Σ id·(id + 7) over a tensor of token ids (order-free, like the trunk probe's)."""
    ids = ids.long()
    return (ids * (ids + 7)).sum()


@dataclass
class TargetTally:
    """The tokens a side hands to its loss (SFT/DPO log-prob) computation, attributed to the current step.

    Each side reports them from the inputs of its own log-prob call (TRL: the ``labels`` of the patched
    forward; ours: the response mask of the scorer), so a side that scored other tokens than it claims
    shows up in the checksum. ``step`` follows the step probe's counter (-1 before the first step).
    """

    counter: Any
    """The trunk :class:`bench.harness.probes.WorkCounter`: its ``step`` is the current step."""
    calls: list[tuple[int, bool, Any, Any]] = field(default_factory=list)
    """(step, grad enabled, 0-dim token count, 0-dim checksum) per call."""

    def add(self, targets: Any) -> None:
        import torch

        grad = torch.is_grad_enabled()  # read before no_grad below
        with torch.no_grad():
            self.calls.append((self.counter.step, grad, targets.numel(), id_checksum(targets)))

    def per_step(self, step: int) -> dict[str, int]:
        mine = [c for c in self.calls if c[0] == step]
        return {"loss_tokens": int(sum(int(c[2]) for c in mine if c[1])),
                "nograd_scored_tokens": int(sum(int(c[2]) for c in mine if not c[1]))}  # fmt: skip

    def checksum(self, *, grad: bool, step: int | None = None) -> int:
        """Checksum of every scored token with (``grad``) or without grad; ``step=-1``: the reference pass."""
        return int(sum(int(c[3]) for c in self.calls if c[1] == grad and (step is None or c[0] == step)))

    def count(self, *, grad: bool, step: int | None = None) -> int:
        return int(sum(int(c[2]) for c in self.calls if c[1] == grad and (step is None or c[0] == step)))


@dataclass
class RefTally:
    """Rows and tokens a separate reference model forwards per step (TRL's live reference only)."""

    counter: Any
    calls: list[tuple[int, int, Any]] = field(default_factory=list)

    def attach(self, trunk: Any) -> RefTally:
        def on_forward(_module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            self.calls.append((self.counter.step, ids.shape[0], ids.numel() if mask is None else mask.sum()))

        trunk.register_forward_pre_hook(on_forward, with_kwargs=True)
        return self

    def per_step(self, step: int) -> dict[str, int]:
        mine = [c for c in self.calls if c[0] == step]
        return {"ref_rows": sum(c[1] for c in mine), "ref_tokens": int(sum(int(c[2]) for c in mine))}


def reference_pass(counter: Any, targets: TargetTally) -> dict[str, int]:
    """What ran before the first step without grad: the reference log-prob pass (both sides, precomputed)."""
    before = [f for f in counter.forwards if f.step == -1 and not f.grad]
    return {
        "rows": sum(f.rows for f in before),
        "tokens": int(sum(int(f.tokens) for f in before)),
        "token_checksum": int(sum(int(f.checksum) for f in before)),
        "scored_tokens": targets.count(grad=False, step=-1),
        "scored_checksum": targets.checksum(grad=False, step=-1),
    }


def collect(probe: Any, counter: Any, targets: TargetTally, workload: SFTWorkload,
            ref: RefTally | None = None) -> dict[str, Any]:  # fmt: skip
    """Timings, per-step work, checksums and memory of a finished run (work over the timed steps)."""
    from bench.harness.probes import peak_rss_mb

    steps = range(workload.warmup, workload.steps)
    work = counter.per_step(steps)
    for step, row in zip(steps, work, strict=True):
        row.update(targets.per_step(step))
        row.update(ref.per_step(step) if ref is not None else {"ref_rows": 0, "ref_tokens": 0})
    out: dict[str, Any] = {
        "steps_run": probe.steps,
        "step_s": probe.step_s,
        "cycle_s": probe.cycle_s,
        "cpu_s": probe.cpu_s,
        "minor_faults": probe.minor_faults,
        "preempted": probe.preempted,
        "timed_steps": [steps.start, steps.stop],
        "work_per_step": work,
        "token_checksum": counter.checksum(),
        "loss_checksum": targets.checksum(grad=True),
        "loss_tokens_total": targets.count(grad=True),
        "reference_pass": reference_pass(counter, targets),
        "rss_before_first_step_mb": round(probe.rss_before_first_step_mb, 1),
        "peak_rss_mb": round(probe.peak_rss_at_last_end_mb, 1),
        "peak_rss_process_end_mb": round(peak_rss_mb(), 1),
    }
    out["peak_minus_first_step_mb"] = round(out["peak_rss_mb"] - out["rss_before_first_step_mb"], 1)
    return out


def skeleton(framework: str, version: str, workload: SFTWorkload, seed: int, threads: int) -> dict[str, Any]:
    """The fields every row starts with (versions, machine, workload, seed)."""
    import torch
    import transformers

    from bench.harness.rm_common import device_name, git_sha

    return {"framework": framework, "framework_version": version, "torch": torch.__version__,
            "transformers": transformers.__version__, "git": git_sha(), "device": "cpu",
            "device_name": device_name("cpu"), "precision": "fp32", "threads": threads,
            "workload": asdict(workload), "seed": seed}  # fmt: skip


def optimizer_info(optimizer: Any) -> dict[str, Any]:
    """Class and the kernel flags of the optimizer a side really stepped (unwrapping accelerate)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    keys = ("lr", "betas", "eps", "fused", "foreach")
    decays = sorted({g["weight_decay"] for g in inner.param_groups})
    return {"class": type(inner).__name__, **{k: inner.defaults.get(k) for k in keys}, "weight_decay": decays}
