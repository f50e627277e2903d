"""TRL 1.16 ``RewardTrainer`` side of the RM benchmark, configured exactly as research note §4.4 says.

Llama shapes get string pairs (TRL appends the EOS string and tokenises in ``__init__``, untimed);
the BERT encoder gets pre-tokenised ``chosen_ids``/``rejected_ids`` (its tokenizer has no EOS, and TRL
would fail appending ``None``), which TRL takes as already processed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness.probes import StepProbe, WorkCounter
from bench.harness.rm_common import RMWorkload, is_encoder, probe_results, result_skeleton


def reward_config(workload: RMWorkload, seed: int, output_dir: str, *, device: str, precision: str,
                  max_length: int):  # fmt: skip
    """The exact ``RewardConfig`` of the benchmark (equal-work, TRL-equivalent baseline)."""
    from trl import RewardConfig

    on_cpu = device == "cpu"
    return RewardConfig(
        output_dir=output_dir,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=10,
        disable_tqdm=True,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        max_steps=workload.steps,
        optim="adamw_torch_fused",
        learning_rate=workload.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        gradient_checkpointing=False,
        torch_compile=False,
        use_liger_kernel=False,
        use_cpu=on_cpu,
        bf16=precision == "bf16",
        fp16=False,
        per_device_train_batch_size=workload.pairs_per_step,
        gradient_accumulation_steps=1,
        max_length=max_length,
        pad_to_multiple_of=None,
        center_rewards_coefficient=None,
        disable_dropout=True,
        activation_offloading=False,
    )


def run(workload: RMWorkload, seed: int, path: Path, pairs: list[dict[str, str]], *, device: str,
        precision: str, threads: int, configure: Callable[[StepProbe], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Train ``workload.steps`` steps with TRL's RewardTrainer; return the result record."""
    import datasets
    import torch
    import trl
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    result = result_skeleton("trl", trl.__version__, workload, seed, device, precision, threads)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if is_encoder(path):
        rows = [
            {
                "chosen_ids": tokenizer(p["chosen"])["input_ids"],
                "rejected_ids": tokenizer(p["rejected"])["input_ids"],
            }
            for p in pairs
        ]
        max_length = max(max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows)
    else:
        rows = pairs
        max_length = 2 * workload.length  # ≥ L + 1 (EOS); longer pairs would be dropped silently
    dataset = datasets.Dataset.from_list(rows)

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    counter = WorkCounter().attach(model.base_model)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    probe = StepProbe(counter=counter, sync=sync)
    if sync is not None:
        probe.before_step(workload.warmup, torch.cuda.reset_peak_memory_stats)
    if configure is not None:
        configure(probe)

    class ProbeCallback(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            probe.begin()

        def on_step_end(self, args, state, control, **kwargs):
            probe.end()

    with tempfile.TemporaryDirectory(prefix="bench-trl-") as tmp:
        args = reward_config(workload, seed, tmp, device=device, precision=precision, max_length=max_length)
        trainer = trl.RewardTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[ProbeCallback()],
        )
        if len(trainer.train_dataset) != workload.n_pairs:
            raise RuntimeError(f"TRL dropped pairs: {len(trainer.train_dataset)} of {workload.n_pairs} kept")
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result.update(probe_results(probe, counter, workload, device))
    result["logged_losses"] = losses
    result["optimizer"] = type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                               else trainer.optimizer).__name__  # fmt: skip
    counter.detach()
    return result
