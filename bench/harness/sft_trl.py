"""TRL 1.16 side of the supervised-step benchmark: ``SFTTrainer`` and ``DPOTrainer``, configured as the
research note's §4.4 common part says (fp32 CPU, AdamW fused, constant lr, no warm-up, weight decay 0,
clip 1.0, no gradient checkpointing, no packing, no padding-free, dropout off, ``logging_steps=10``).

SFT: prompt/completion string rows (TRL appends the EOS string to the completion and tokenises in
``__init__``, untimed) with ``completion_only_loss=True`` and ``loss_type="nll"``.
DPO: prompt/chosen/rejected string rows, ``loss_type=["sigmoid"]``, ``beta`` as ours; the reference either
precomputed once in ``__init__`` (``precompute_ref_log_probs=True``, batches of one step, no second model)
or, for the ``live`` rows, TRL's default: a second load of the same checkpoint forwarded every step.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness.probes import StepProbe, WorkCounter
from bench.harness.sft_common import RefTally, SFTWorkload, TargetTally, collect, optimizer_info, skeleton


def common_args(workload: SFTWorkload, seed: int, output_dir: str) -> dict[str, Any]:
    """The ``TrainingArguments`` part both TRL configs share (research note §4.4, CPU)."""
    return {
        "output_dir": output_dir,
        "report_to": "none",
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_steps": 10,
        "disable_tqdm": True,
        "seed": seed,
        "data_seed": seed,
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,
        "max_steps": workload.steps,
        "optim": "adamw_torch_fused",
        "learning_rate": workload.lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_epsilon": 1e-8,
        "max_grad_norm": 1.0,
        "gradient_checkpointing": False,
        "torch_compile": False,
        "use_liger_kernel": False,
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "per_device_train_batch_size": workload.batch,
        "gradient_accumulation_steps": 1,
    }


def sft_config(workload: SFTWorkload, seed: int, output_dir: str) -> Any:
    """The exact ``SFTConfig`` of the benchmark."""
    from trl import SFTConfig

    return SFTConfig(
        **common_args(workload, seed, output_dir),
        max_length=2 * workload.seq_tokens,  # nothing is truncated
        packing=False,
        padding_free=False,
        pad_to_multiple_of=None,
        completion_only_loss=True,
        assistant_only_loss=False,
        loss_type="nll",
        shuffle_dataset=False,
        activation_offloading=False,
        dataset_num_proc=None,
    )


def dpo_config(workload: SFTWorkload, seed: int, output_dir: str) -> Any:
    """The exact ``DPOConfig`` of the benchmark."""
    from trl import DPOConfig

    return DPOConfig(
        **common_args(workload, seed, output_dir),
        beta=workload.beta,
        loss_type=["sigmoid"],
        label_smoothing=0.0,
        max_length=2 * workload.seq_tokens,
        padding_free=False,
        precompute_ref_log_probs=workload.trl_reference == "precomputed",
        precompute_ref_batch_size=workload.batch,
        sync_ref_model=False,
        use_weighting=False,
        disable_dropout=True,
    )


def run(workload: SFTWorkload, seed: int, path: Path, rows: list[dict[str, str]], *, threads: int,
        configure: Callable[[StepProbe], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Train ``workload.steps`` steps with TRL; return the result record."""
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    result = skeleton("trl", trl.__version__, workload, seed, threads)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if workload.method == "sft":
        dataset = datasets.Dataset.from_list(
            [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
        )
    else:
        dataset = datasets.Dataset.from_list(rows)

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    counter = WorkCounter().attach(model.base_model)
    targets = TargetTally(counter)
    probe = StepProbe(counter=counter)
    if configure is not None:  # e.g. a profiler over some timed steps
        configure(probe)

    def on_labels(_module, args, kwargs):  # TRL's fused forward: model(..., labels=..., fused_lm_head=True)
        labels = kwargs.get("labels")
        if labels is not None:
            shifted = labels[:, 1:]
            targets.add(shifted[shifted != -100])

    model.register_forward_pre_hook(on_labels, with_kwargs=True)
    ref, ref_model = None, None
    if workload.method == "dpo" and workload.trl_reference == "live":
        ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # §4.4: a second load
        ref = RefTally(counter).attach(ref_model.base_model)

    class ProbeCallback(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            probe.begin()

        def on_step_end(self, args, state, control, **kwargs):
            probe.end()

    timing: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-sft-trl-") as tmp:
        if workload.method == "sft":
            trainer = trl.SFTTrainer(model=model, args=sft_config(workload, seed, tmp), train_dataset=dataset,
                                     processing_class=tokenizer, callbacks=[ProbeCallback()])  # fmt: skip
        else:
            original = trl.DPOTrainer._precompute_ref_logps

            def timed_precompute(self, *a, **kw):
                start = time.perf_counter()
                out = original(self, *a, **kw)
                timing["reference_pass_s"] = timing.get("reference_pass_s", 0.0) + time.perf_counter() - start
                return out

            trl.DPOTrainer._precompute_ref_logps = timed_precompute
            try:
                trainer = trl.DPOTrainer(model=model, ref_model=ref_model, args=dpo_config(workload, seed, tmp),
                                         train_dataset=dataset, processing_class=tokenizer,
                                         callbacks=[ProbeCallback()])  # fmt: skip
            finally:
                trl.DPOTrainer._precompute_ref_logps = original
        if len(trainer.train_dataset) != workload.n_examples:
            raise RuntimeError(
                f"TRL dropped rows: {len(trainer.train_dataset)} of {workload.n_examples} kept"
            )
        trainer.train()
    result.update(collect(probe, counter, targets, workload, ref))
    result["reference_pass"]["s"] = round(timing.get("reference_pass_s", 0.0), 3)
    result["logged_losses"] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    result["optimizer"] = optimizer_info(trainer.optimizer)
    result["config"] = {"trainer": type(trainer).__name__, "reference": workload.trl_reference
                        if workload.method == "dpo" else None}  # fmt: skip
    counter.detach()
    return result
