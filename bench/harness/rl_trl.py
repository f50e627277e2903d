"""TRL 1.16 ``GRPOTrainer`` / ``RLOOTrainer`` side of the online-RL benchmark (research note §4.4).

One iteration = one ``training_step``: generate B = P·G completions (HF ``generate``), score them, the
reference forward (β > 0), for RLOO the old-log-prob forward of the policy, the training forward with
grad, backward, clip, one optimizer step. Timed by ``on_step_begin``/``on_step_end`` (generation happens
inside the step). Fixed lengths: ``min_new_tokens = max_completion_length = Lc`` and the pad and EOS ids
suppressed, so every completion has exactly Lc real tokens.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from bench.harness.probes import StepProbe
from bench.harness.rl_common import (
    LexiconScore,
    RLWorkload,
    optimizer_summary,
    probe_results,
    result_skeleton,
)
from bench.harness.rl_probes import RLWorkCounter


def common_args(workload: RLWorkload, seed: int, output_dir: str) -> dict[str, Any]:
    """The ``TrainingArguments`` part shared by the TRL configs (research note §4.4, CPU)."""
    return dict(
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
        use_cpu=True,
        bf16=False,
        fp16=False,
    )


def generation_args(workload: RLWorkload, pad_id: int, eos_id: int) -> dict[str, Any]:
    """GRPO/RLOO sampling: temperature 1, no top-k/top-p, exactly Lc tokens (pad and EOS banned)."""
    return dict(
        num_generations=workload.group,
        per_device_train_batch_size=workload.rows,  # counts completions
        gradient_accumulation_steps=1,
        num_iterations=1,
        max_completion_length=workload.completion_len,
        generation_kwargs={"min_new_tokens": workload.completion_len, "suppress_tokens": [pad_id, eos_id]},
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=None,
        repetition_penalty=1.0,
        cache_implementation=None,
        use_vllm=False,
        use_transformers_continuous_batching=False,
        pad_to_multiple_of=None,
        shuffle_dataset=False,
        disable_dropout=True,
        log_completions=False,
        mask_truncated_completions=False,
        beta=workload.beta,
        epsilon=0.2,
        epsilon_high=None,
    )


def trainer_config(workload: RLWorkload, seed: int, output_dir: str, pad_id: int, eos_id: int):
    """The exact ``GRPOConfig`` / ``RLOOConfig`` of the benchmark (the TRL-equivalent baseline)."""
    import trl

    args = {**common_args(workload, seed, output_dir), "max_steps": workload.steps,
            **generation_args(workload, pad_id, eos_id)}  # fmt: skip
    if workload.algo == "grpo":
        return trl.GRPOConfig(**args, loss_type="dapo", scale_rewards="group", importance_sampling_level="token",
                              use_bias_correction_kl=False, top_entropy_quantile=1.0, entropy_coef=0.0,
                              cast_lm_head_to_fp32=False, delta=None)  # fmt: skip
    return trl.RLOOConfig(**args, normalize_advantages=False, reward_clip_range=None)


def run(workload: RLWorkload, seed: int, path: Path, prompts: list[str], *, threads: int) -> dict[str, Any]:
    """Train ``workload.steps`` iterations with TRL's GRPO or RLOO trainer; return the result record."""
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    name = "GRPOTrainer" if workload.algo == "grpo" else "RLOOTrainer"
    result = result_skeleton("trl", trl.__version__, name, workload, seed, threads)
    tokenizer = AutoTokenizer.from_pretrained(path)
    counter = RLWorkCounter()
    score = LexiconScore(tokenizer.get_vocab(), workload.completion_len, clock=counter)
    probe = StepProbe(counter=counter)

    class ProbeCallback(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            probe.begin()

        def on_step_end(self, args, state, control, **kwargs):
            probe.end()

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    dataset = datasets.Dataset.from_list([{"prompt": p} for p in prompts])
    with tempfile.TemporaryDirectory(prefix="bench-rl-trl-") as tmp:
        args = trainer_config(workload, seed, tmp, tokenizer.pad_token_id, tokenizer.eos_token_id)
        cls = trl.GRPOTrainer if workload.algo == "grpo" else trl.RLOOTrainer
        trainer = cls(model=model, reward_funcs=[score.trl_reward_func()], args=args, train_dataset=dataset,
                      processing_class=tokenizer, callbacks=[ProbeCallback()])  # fmt: skip
        counter.attach("policy", trainer.accelerator.unwrap_model(trainer.model).model)
        if trainer.ref_model is not None:
            counter.attach("reference", trainer.accelerator.unwrap_model(trainer.ref_model).model)
        trainer.train()
    result.update(probe_results(probe, counter, workload, score))
    result["optimizers"] = [optimizer_summary(trainer.optimizer)]
    counter.detach()
    return result
