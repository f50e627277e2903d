"""trl 1.12 ``trl.experimental.ppo.PPOTrainer`` side of the PPO benchmark (research note §4.4).

trl 1.12 is the last release with PPOTrainer; it lives in ``bench/.cache/trl-1.12.0`` (installed with
``pip install --no-deps --target``) and only this worker process puts that folder first on
``sys.path`` (:func:`use_trl_112`), before anything imports ``trl``; every other process keeps the
venv's trl 1.16.

Models: policy and reference = two loads of the shared checkpoint; value model =
``AutoModelForSequenceClassification(num_labels=1)`` of the same checkpoint with its score head zeroed
(as our critic's head: V ≡ 0 at the start); reward model = :func:`bench.harness.rl_common.lexicon_reward_model`.
One iteration = rollout (HF ``generate`` keeping every step's scores), reference, value and reward
forwards, then ``num_ppo_epochs`` × one minibatch of all rows. TRL 1.12 hard-codes its
``GenerationConfig`` (no kwargs, huggingface/trl#2576); fixed lengths come from the policy's own
``generation_config``, which ``generate`` merges into TRL's: ``suppress_tokens`` = pad and EOS
(TRL sets ``eos_token_id = None`` itself when ``stop_token`` is None, so nothing stops a row early).
Timing: TRL 1.12 fires ``on_train_begin`` and ``on_step_end`` only, so each iteration runs from the
previous ``on_step_end`` (the first from ``on_train_begin``).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.harness.probes import StepProbe
from bench.harness.rl_common import (
    TRL_PPO_DIR,
    TRL_PPO_VERSION,
    LexiconScore,
    RLWorkload,
    lexicon_reward_model,
    optimizer_summary,
    probe_results,
    result_skeleton,
)
from bench.harness.rl_probes import RLWorkCounter
from bench.harness.rl_trl import common_args

INSTALL = f".venv/bin/pip install --no-deps --target {TRL_PPO_DIR.relative_to(TRL_PPO_DIR.parents[2])} trl=={TRL_PPO_VERSION}"


def use_trl_112(folder: Path = TRL_PPO_DIR) -> None:
    """Put trl 1.12 first on ``sys.path``; refuse if another trl is already imported or it is missing."""
    if "trl" in sys.modules:
        raise RuntimeError("trl is already imported in this process: call use_trl_112() first")
    if not (folder / "trl" / "experimental" / "ppo").is_dir():
        raise FileNotFoundError(f"trl {TRL_PPO_VERSION} is not installed in {folder}; run: {INSTALL}")
    sys.path.insert(0, str(folder))


def ppo_config(workload: RLWorkload, seed: int, output_dir: str):
    """The exact trl 1.12 ``PPOConfig``: B rows per iteration, E epochs × 1 minibatch, k1 KL in the reward."""
    from trl.experimental.ppo import PPOConfig

    return PPOConfig(
        **common_args(workload, seed, output_dir),
        per_device_train_batch_size=workload.rows,
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        num_ppo_epochs=workload.epochs,
        total_episodes=workload.rows * workload.steps,
        local_rollout_forward_batch_size=workload.rows,
        response_length=workload.completion_len,
        stop_token=None,
        stop_token_id=None,
        temperature=1.0,
        missing_eos_penalty=None,
        num_sample_generations=0,
        kl_coef=workload.beta,
        kl_estimator="k1",
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
        gamma=1.0,
        lam=0.95,
        whiten_rewards=False,
    )


def run(workload: RLWorkload, seed: int, path: Path, prompts: list[str], *, threads: int) -> dict[str, Any]:
    """Train ``workload.steps`` PPO iterations with trl 1.12's PPOTrainer; return the result record."""
    import datasets
    import torch
    import trl
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOTrainer

    if trl.__version__ != TRL_PPO_VERSION:
        raise RuntimeError(f"expected trl {TRL_PPO_VERSION}, imported {trl.__version__} from {trl.__file__}")
    result = result_skeleton("trl", trl.__version__, "experimental.ppo.PPOTrainer", workload, seed, threads)
    tokenizer = AutoTokenizer.from_pretrained(path)
    vocab = tokenizer.get_vocab()
    counter = RLWorkCounter()
    score = LexiconScore(vocab, workload.completion_len, clock=counter)
    probe = StepProbe(counter=counter)

    class ProbeCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            probe.begin()

        def on_step_end(self, args, state, control, **kwargs):
            probe.end()
            if probe.steps < workload.steps:
                probe.begin()

    torch.manual_seed(seed)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    policy.generation_config.suppress_tokens = [tokenizer.pad_token_id, tokenizer.eos_token_id]
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    value.config.pad_token_id = tokenizer.pad_token_id
    torch.nn.init.zeros_(value.score.weight)
    reward = lexicon_reward_model(score, vocab)
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    if any(len(i) != workload.prompt_len for i in ids):
        raise RuntimeError(f"prompts must be exactly {workload.prompt_len} tokens")
    dataset = datasets.Dataset.from_list([{"input_ids": i} for i in ids])
    with tempfile.TemporaryDirectory(prefix="bench-rl-trlppo-") as tmp:
        trainer = PPOTrainer(args=ppo_config(workload, seed, tmp), processing_class=tokenizer, model=policy,
                             ref_model=reference, reward_model=reward, train_dataset=dataset, value_model=value,
                             callbacks=[ProbeCallback()])  # fmt: skip
        counter.attach("policy", policy.model)
        counter.attach("reference", reference.model)
        counter.attach("value", value.model)
        trainer.train()
    result.update(probe_results(probe, counter, workload, score))
    result["optimizers"] = [optimizer_summary(trainer.optimizer)]
    counter.detach()
    return result
