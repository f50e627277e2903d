"""Our side of the RM benchmark: ``trainers.recipes.reward_model.train`` itself, with the same probes.

The loop is the recipe's; nothing here trains. The probes get in through two seams:

* ``setup`` is wrapped (for the duration of the run only) to attach the work counter to the model it
  built and to start the first step's clock when setup returns;
* ``should_stop(step)``, which the recipe calls once after every optimizer step (after logging), ends
  the step's clock and starts the next one — the same boundary as TRL's ``on_step_end``.

So ours has ``step_s == cycle_s`` (batch collation and logging included), which is what the headline
compares (TRL's ``cycle_s`` also spans its data loading and logging).

Equal work with TRL: the pairs are written as an implicit-prompt snapshot; for causal LMs the EOS
string is appended to both sides (TRL does that itself), so both frameworks score L + 1 tokens.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

from bench.harness.pairs import write_jsonl
from bench.harness.probes import StepProbe, WorkCounter
from bench.harness.rm_common import RMWorkload, is_encoder, probe_results, result_skeleton


def recipe_config(workload: RMWorkload, seed: int, snapshot: Path, output_dir: Path, model: Path, *,
                  device: str, precision: str, max_length: int):  # fmt: skip
    """The recipe config equivalent to :func:`bench.harness.rm_trl.reward_config`."""
    from trainers.config import OptimConfig
    from trainers.recipes.reward_model import RewardModelConfig

    optim = OptimConfig(lr=workload.lr, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, schedule="constant",
                        warmup_ratio=0.0, max_grad_norm=1.0, grad_accum=1)  # fmt: skip
    return RewardModelConfig(
        snapshot=str(snapshot),
        output_dir=str(output_dir),
        eval_fraction=0.0,
        model=str(model),
        max_length=max_length,
        batch_size=workload.pairs_per_step,
        max_steps=workload.steps,
        optim=optim,
        eval_every=0,
        checkpoint_every=0,
        log_every=10,  # TRL's logging_steps=10
        seed=seed,
        mixed_precision="bf16" if precision == "bf16" else "no",
        cpu=device == "cpu",
        disable_dropout=True,
        resume=False,
        progress=False,
    )


def run(workload: RMWorkload, seed: int, path: Path, pairs: list[dict[str, str]], *, device: str,
        precision: str, threads: int, configure: Callable[[StepProbe], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Train ``workload.steps`` steps with our recipe; return the result record."""
    import torch
    from transformers import AutoTokenizer

    from trainers.recipes import reward_model as recipe

    result = result_skeleton("ours", _version(), workload, seed, device, precision, threads)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if is_encoder(path):
        rows = pairs
        max_length = max(
            len(tokenizer(p[side])["input_ids"]) for p in pairs for side in ("chosen", "rejected")
        )
    else:
        eos = tokenizer.eos_token
        rows = [{"chosen": p["chosen"] + eos, "rejected": p["rejected"] + eos} for p in pairs]
        max_length = 2 * workload.length  # as TRL's max_length; nothing is truncated (L + 1 tokens)

    counter = WorkCounter()
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    probe = StepProbe(counter=counter, sync=sync)
    if sync is not None:
        probe.before_step(workload.warmup, torch.cuda.reset_peak_memory_stats)
    if configure is not None:
        configure(probe)
    original_setup = recipe.setup
    seen: dict[str, Any] = {}

    def setup_with_probes(cfg):
        built = original_setup(cfg)
        seen["optimizer"] = type(built.optimizer.optimizer if hasattr(built.optimizer, "optimizer")
                                 else built.optimizer).__name__  # fmt: skip
        seen["optimizer_defaults"] = {k: v for k, v in _optimizer(built).defaults.items()
                                      if k in ("fused", "foreach", "lr", "weight_decay")}  # fmt: skip
        counter.attach(built.accelerator.unwrap_model(built.model).base_model)
        probe.begin()
        return built

    def end_of_step(step: int) -> bool:
        probe.end()
        if step < workload.steps:
            probe.begin()
        return False

    with tempfile.TemporaryDirectory(prefix="bench-ours-") as tmp:
        snapshot = write_jsonl(rows, Path(tmp) / "pairs.jsonl")
        cfg = recipe_config(workload, seed, snapshot, Path(tmp) / "run", path, device=device, precision=precision,
                            max_length=max_length)  # fmt: skip
        with mock.patch.object(recipe, "setup", setup_with_probes):
            outcome = recipe.train(cfg, should_stop=end_of_step)
        losses = _logged_losses(Path(tmp) / "run" / "metrics.jsonl")
    result.update(probe_results(probe, counter, workload, device))
    result["logged_losses"] = losses
    result["optimizer"] = seen.get("optimizer")
    result["optimizer_defaults"] = seen.get("optimizer_defaults")
    result["recipe_steps"] = outcome.steps
    counter.detach()
    return result


def _optimizer(run: Any) -> Any:
    opt = run.optimizer
    return opt.optimizer if hasattr(opt, "optimizer") else opt


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
