"""Our side of the online-RL benchmarks: the ``reinforce``, ``ppo`` and ``nlpo`` recipes themselves.

Nothing here trains; the recipes' own ``train`` runs with the benchmark's config and three seams,
patched for the duration of the run only:

* ``load_task`` returns the benchmark's prompts as a task whose reward is the shared
  :class:`bench.harness.rl_common.LexiconScore` (a :class:`trainers.rewards.CallableReward`), no
  held-out prompts (so no evaluation runs);
* ``stop_token_ids`` returns EOS and pad: with ``sampling.stop_at_eos: false`` the recipes ban their
  stop ids at every step, so — as TRL's ``suppress_tokens`` does — every response has exactly Lc real
  tokens (the production recipes only ban EOS; pad is the harness's addition for TRL 1.12 PPO's sake);
* ``setup`` is wrapped to attach the work counter to the trunks it built and start the first clock.

The recipe calls ``should_stop(step)`` once after every iteration (after the optimizer step(s) and
logging): that ends the iteration's clock and starts the next, the boundary TRL's ``on_step_end`` has.
"""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from unittest import mock

from bench.harness.probes import StepProbe
from bench.harness.rl_common import (
    LexiconScore,
    RLWorkload,
    optimizer_summary,
    probe_results,
    result_skeleton,
)
from bench.harness.rl_probes import RLWorkCounter


def sampling(workload: RLWorkload):
    """Temperature 1, no top-k/top-p, exactly Lc tokens (stop ids banned at every step)."""
    from trainers.rollout import SamplingConfig

    return SamplingConfig(max_new_tokens=workload.completion_len, min_new_tokens=0, stop_at_eos=False,
                          temperature=1.0, top_k=0, top_p=1.0)  # fmt: skip


def optim_fields(workload: RLWorkload, *, clip: float | None) -> dict[str, Any]:
    return dict(lr=workload.lr, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, schedule="constant",
                warmup_ratio=0.0, max_grad_norm=clip, grad_accum=1)  # fmt: skip


def reinforce_config(workload: RLWorkload, seed: int, output_dir: Path, model: Path):
    """REINFORCE with ESRL two-stage sampling, matching TRL's GRPO (group-mean baseline scaled by the group
    std, token-mean loss) or RLOO (leave-one-out baseline, sequence-sum loss); dynamic sampling off."""
    from trainers.reinforce_config import (
        DynamicSamplingConfig,
        KLConfig,
        ReinforceConfig,
        ReinforceOptimConfig,
    )

    grpo = workload.algo == "grpo"
    return ReinforceConfig(
        output_dir=str(output_dir),
        n_eval=0,
        model=str(model),
        sampling=sampling(workload),
        max_prompt_tokens=max(128, workload.prompt_len),
        group_size=workload.group,
        batch_size=workload.prompts,
        max_steps=workload.steps,
        loss="reinforce",
        baseline="group_mean" if grpo else "leave_one_out",
        scale_by_std=grpo,
        reduction="token_mean" if grpo else "sequence",
        logprobs_of="raw",
        kl=KLConfig(beta=workload.beta, target=None, estimator="k1"),
        dynamic=DynamicSamplingConfig(mode="off"),
        optim=ReinforceOptimConfig(**optim_fields(workload, clip=1.0)),
        eval_every=0,
        eval_at_start=False,
        checkpoint_every=0,
        log_every=10,  # TRL's logging_steps
        seed=seed,
        mixed_precision="no",
        cpu=True,
        disable_dropout=True,
        resume=False,
        progress=False,
    )


def ppo_config(workload: RLWorkload, seed: int, output_dir: Path, model: Path, *, nlpo: dict | None = None,
               critic: str = "separate"):  # fmt: skip
    """PPO as trl 1.12's: separate critic, E epochs × one minibatch of all B rows, k1 KL in the reward
    with a fixed β, GAE(γ 1, λ 0.95), batch-whitened advantages, clipped value loss (vf 0.1), no reward
    clipping, no gradient clipping (TRL 1.12's PPO never clips). ``nlpo`` adds NLPO's mask fields."""
    from trainers.ppo_config import KLConfig, PPOConfig, PPOOptimConfig

    fields = dict(
        output_dir=str(output_dir),
        n_eval=1,
        reward_clip=None,
        model=str(model),
        critic=critic,
        critic_lr=workload.lr,
        sampling=sampling(workload),
        max_prompt_tokens=max(64, workload.prompt_len),
        iterations=workload.steps,
        prompts_per_iteration=workload.rows,
        samples_per_prompt=1,
        rollout_batch_size=workload.rows,
        ppo_epochs=workload.epochs,
        minibatch_size=workload.rows,
        clip_eps=0.2,
        value_clip=0.2,
        vf_coef=0.1,
        ent_coef=0.0,
        gamma=1.0,
        lam=0.95,
        kl=KLConfig(beta=workload.beta, target=None, estimator="k1"),
        whiten_advantages="batch",
        loss_reduction="token_mean",
        target_approx_kl=None,
        optim=PPOOptimConfig(**optim_fields(workload, clip=None)),
        eval_every=0,
        eval_at_start=False,
        checkpoint_every=0,
        log_every=10,
        seed=seed,
        mixed_precision="no",
        cpu=True,
        disable_dropout=True,
        resume=False,
        progress=False,
    )
    if nlpo is None:
        return PPOConfig(**fields)
    from trainers.recipes.nlpo import NLPOConfig

    return NLPOConfig(**fields, **nlpo)


def bench_task(prompts: list[str], score: LexiconScore):
    """The prompts as a :class:`trainers.tasks.Task` whose own reward is ``score`` (no held-out prompts)."""
    from trainers.rewards import CallableReward
    from trainers.tasks import Task

    def reward(tokenizer: Any, append_eos: bool):
        return CallableReward(
            lambda _prompt, response: score.text(response), tokenizer, append_eos=append_eos
        )

    return Task("bench", list(prompts), [], task_reward=reward)


def _trunks(recipe_name: str, built: Any) -> dict[str, Any]:
    """role → trunk of what ``setup`` built."""
    if recipe_name == "reinforce":
        lm = built.accelerator.unwrap_model(built.model).lm
        return {"policy": lm.base_model, "reference": built.reference.base_model}
    trunks = {"policy": built.policy().base_model, "reference": built.reference.base_model}
    if built.critic is not None:
        trunks["value"] = built.critic_module().trunk
    if built.masking is not None:
        trunks["mask"] = built.masking.mask_model.base_model
    return trunks


def run(workload: RLWorkload, seed: int, path: Path, prompts: list[str], *, threads: int,
        recipe_name: str | None = None, nlpo: dict | None = None, critic: str = "separate",
        extra_patches: list[Any] = ()) -> dict[str, Any]:  # fmt: skip
    """Train ``workload.steps`` iterations with our recipe; return the result record.

    ``recipe_name`` defaults to ``reinforce`` for grpo/rloo workloads and ``ppo`` for ppo ones; ``nlpo``
    (NLPO's mask fields) runs the ``nlpo`` recipe instead. ``extra_patches`` are entered around training
    (e.g. timers of :mod:`bench.nlpo_overhead`).
    """
    import torch
    from transformers import AutoTokenizer

    from trainers.recipes import nlpo as nlpo_recipe
    from trainers.recipes import ppo as ppo_recipe
    from trainers.recipes import reinforce as reinforce_recipe

    recipe_name = recipe_name or ("reinforce" if workload.algo in ("grpo", "rloo") else "ppo")
    if nlpo is not None:
        recipe_name = "nlpo"
    module = {"reinforce": reinforce_recipe, "ppo": ppo_recipe, "nlpo": ppo_recipe}[recipe_name]
    result = result_skeleton("ours", _version(), f"trainers.recipes.{recipe_name}", workload, seed, threads)
    tokenizer = AutoTokenizer.from_pretrained(path)
    stop_ids = sorted({tokenizer.eos_token_id, tokenizer.pad_token_id})
    counter = RLWorkCounter()
    score = LexiconScore(tokenizer.get_vocab(), workload.completion_len, clock=counter)
    probe = StepProbe(counter=counter)
    original_setup = module.setup
    seen: dict[str, Any] = {}

    def setup_with_probes(cfg, **kwargs):
        built = original_setup(cfg, **kwargs)
        for role, trunk in _trunks("reinforce" if module is reinforce_recipe else "ppo", built).items():
            counter.attach(role, trunk)
        optimizers = [built.optimizer] + [
            o for o in [getattr(built, "critic_optimizer", None)] if o is not None
        ]
        seen["optimizers"] = [optimizer_summary(o) for o in optimizers]
        probe.begin()
        return built

    def end_of_step(step: int) -> bool:
        probe.end()
        if step < workload.steps:
            probe.begin()
        return False

    with tempfile.TemporaryDirectory(prefix="bench-rl-ours-") as tmp, ExitStack() as stack:
        out = Path(tmp) / "run"
        task = bench_task(prompts, score)
        stack.enter_context(mock.patch.object(module, "load_task", lambda cfg: task))
        stack.enter_context(mock.patch.object(module, "stop_token_ids", lambda *a, **k: list(stop_ids)))
        stack.enter_context(mock.patch.object(module, "setup", setup_with_probes))
        for patch in extra_patches:
            stack.enter_context(patch)
        torch.manual_seed(seed)
        if recipe_name == "reinforce":
            cfg = reinforce_config(workload, seed, out, path)
            outcome = reinforce_recipe.train(cfg, should_stop=end_of_step)
        elif recipe_name == "ppo":
            cfg = ppo_config(workload, seed, out, path, critic=critic)
            outcome = ppo_recipe.train(cfg, should_stop=end_of_step)
        else:
            cfg = ppo_config(workload, seed, out, path, nlpo=nlpo, critic=critic)
            outcome = nlpo_recipe.train(cfg, should_stop=end_of_step)
    result.update(probe_results(probe, counter, workload, score))
    result["optimizers"] = seen.get("optimizers")
    result["recipe_steps"] = outcome.steps
    counter.detach()
    return result


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("feedback-studio")
    except PackageNotFoundError:
        return "dev"
