"""Our side of the supervised-step benchmark: the real recipes, with the same probes as TRL's side.

* SFT: ``trainers.recipes.filtered_mle.train`` on a finished data-stage folder (``samples``) with one
  sample per prompt, so the best-of-N filter keeps every row and every weight is 1 — plain SFT on the
  response tokens with the per-token-mean loss, through the shared weighted-SFT loop.
* DPO: ``trainers.recipes.dpo.train`` on a preference snapshot (reference log-probs computed once
  before the first step, as always).

Nothing here trains; the probes get in through two seams, as in :mod:`bench.harness.rm_ours`:
the recipe's ``setup`` is wrapped (for this run only) to attach the counters to the model it built,
and ``should_stop(step)``, called after every optimizer step, ends a step's clock and starts the next
one (TRL: ``on_step_end``). The DPO recipe also calls ``should_stop(0)`` once the reference pass is done:
that call starts the first step's clock instead, and the pass is timed on its own.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

from bench.harness.pairs import write_jsonl
from bench.harness.probes import StepProbe, WorkCounter
from bench.harness.sft_common import SFTWorkload, TargetTally, collect, optimizer_info, skeleton


def optim_config(workload: SFTWorkload, cls: type) -> Any:
    """Constant lr, no warm-up, weight decay 0, AdamW (0.9, 0.999, 1e-8), clip 1.0: TRL's side exactly."""
    return cls(lr=workload.lr, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, schedule="constant",
               warmup_ratio=0.0, max_grad_norm=1.0, grad_accum=1)  # fmt: skip


def sft_config(workload: SFTWorkload, seed: int, samples: Path, output_dir: Path, model: Path) -> Any:
    """The filtered-MLE config equivalent to :func:`bench.harness.sft_trl.sft_config`."""
    from trainers.recipes.filtered_mle import FilteredMLEConfig
    from trainers.weighted_sft import SFTOptimConfig

    return FilteredMLEConfig(
        output_dir=str(output_dir),
        samples=str(samples),
        filter="best_of_n",
        n_eval=0,
        eval_at_start=False,
        model=str(model),
        reduction="token_mean",
        max_prompt_tokens=workload.prompt_len,
        max_response_tokens=workload.completion_len + 1,
        batch_size=workload.batch,
        max_steps=workload.steps,
        optim=optim_config(workload, SFTOptimConfig),
        checkpoint_every=0,
        log_every=10,  # TRL's logging_steps=10
        seed=seed,
        mixed_precision="no",
        cpu=True,
        disable_dropout=True,
        resume=False,
        progress=False,
    )


def dpo_config(workload: SFTWorkload, seed: int, snapshot: Path, output_dir: Path, model: Path) -> Any:
    """The DPO config equivalent to :func:`bench.harness.sft_trl.dpo_config`."""
    from trainers.recipes.dpo import DPOConfig, DPOOptimConfig

    return DPOConfig(
        snapshot=str(snapshot),
        output_dir=str(output_dir),
        eval_fraction=0.0,
        model=str(model),
        beta=workload.beta,
        max_length=2 * workload.seq_tokens,  # nothing is truncated
        batch_size=workload.batch,
        eval_batch_size=workload.batch,  # the reference pass in batches of one step, as TRL's precompute
        max_steps=workload.steps,
        optim=optim_config(workload, DPOOptimConfig),
        checkpoint_every=0,
        log_every=10,
        seed=seed,
        mixed_precision="no",
        cpu=True,
        disable_dropout=True,
        resume=False,
        progress=False,
    )


def write_samples(rows: list[dict[str, str]], folder: Path) -> Path:
    """A finished data-stage folder: one scored sample per prompt (the completion), all rewards equal."""
    from trainers.offline_data import SCORED

    folder.mkdir(parents=True, exist_ok=True)
    scored = [{"prompt_index": i, "sample_index": 0, "prompt": r["prompt"], "response": r["chosen"].strip(),
               "reward": 0.0, "z": 0.0, "eos": True} for i, r in enumerate(rows)]  # fmt: skip
    write_jsonl(scored, folder / SCORED)
    return folder


def run(workload: SFTWorkload, seed: int, path: Path, rows: list[dict[str, str]], *, threads: int,
        configure: Callable[[StepProbe], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Train ``workload.steps`` steps with our recipe; return the result record."""
    import torch

    result = skeleton("ours", _version(), workload, seed, threads)
    counter = WorkCounter()
    targets = TargetTally(counter)
    probe = StepProbe(counter=counter)
    if configure is not None:  # e.g. a profiler over some timed steps
        configure(probe)
    seen: dict[str, Any] = {}

    if workload.method == "sft":
        from trainers import weighted_sft as loop
        from trainers.recipes import filtered_mle as recipe

        # TokenScorer(prompt_ids, prompt_mask, response_ids, response_mask): the response tokens are the targets
        def on_scorer(_module, args, kwargs):
            targets.add(args[2][args[3].bool()])
    else:
        from trainers.recipes import dpo as recipe

        loop = recipe

        def on_scorer(_module, args, kwargs):  # ResponseLogps(input_ids, attention_mask, response_mask)
            ids, mask, response = args
            targets.add(ids[:, 1:][response[:, 1:].bool() & mask[:, 1:].bool()])

    original_setup = loop.setup

    def setup_with_probes(*a, **kw):
        built = original_setup(*a, **kw)
        seen["optimizer"] = optimizer_info(built.optimizer)
        scorer = built.accelerator.unwrap_model(built.model)
        counter.attach(scorer.lm.base_model)
        scorer.register_forward_pre_hook(on_scorer, with_kwargs=True)
        seen["setup_end"] = time.perf_counter()
        if workload.method == "sft":
            probe.begin()
        return built

    def end_of_step(step: int) -> bool:
        if step == 0:  # DPO: the reference pass is done, the first step starts now
            seen["reference_pass_s"] = time.perf_counter() - seen["setup_end"]
            probe.begin()
            return False
        probe.end()
        if step < workload.steps:
            probe.begin()
        return False

    with tempfile.TemporaryDirectory(prefix="bench-sft-ours-") as tmp:
        if workload.method == "sft":
            data = write_samples(rows, Path(tmp) / "samples")
            cfg = sft_config(workload, seed, data, Path(tmp) / "run", path)
        else:
            data = write_jsonl(rows, Path(tmp) / "pairs.jsonl")
            cfg = dpo_config(workload, seed, data, Path(tmp) / "run", path)
        torch.manual_seed(seed)
        with mock.patch.object(loop, "setup", setup_with_probes):
            outcome = recipe.train(cfg, should_stop=end_of_step)
        losses = _logged_losses(Path(tmp) / "run" / "metrics.jsonl")
    result.update(collect(probe, counter, targets, workload))
    result["reference_pass"]["s"] = round(seen.get("reference_pass_s", 0.0), 3)
    result["logged_losses"] = losses
    result["optimizer"] = seen.get("optimizer")
    result["recipe_steps"] = outcome.steps
    result["config"] = {"recipe": "filtered_mle" if workload.method == "sft" else "dpo",
                        "chunk": getattr(cfg, "chunk_steps", None) or getattr(cfg, "logps_chunk_tokens", None)}  # fmt: skip
    counter.detach()
    return result


def _logged_losses(path: Path) -> list[float]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["train/loss"] for r in rows if r.get("train/loss") is not None]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("feedback-studio")
    except PackageNotFoundError:
        return "dev"
