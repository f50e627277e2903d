"""Online-RL workloads and what both sides share: prompts, the reward, equal lengths, result records.

Research note §4.2–§4.4 (/work/shared/research/trainers-and-benchmarks.md). Every prompt is exactly
``prompt_len`` sentiment-free filler words (one token each, no padding anywhere), every response exactly
``completion_len`` tokens: both sides suppress the pad and EOS tokens at every step (TRL: ``suppress_tokens``
+ ``min_new_tokens``; ours: the two ids as stop tokens with ``stop_at_eos: false``, which bans them), so
TRL 1.12's PPO, which reads a sampled pad as the end of a response, never sees one.

The reward is one deterministic function on both sides: the mean VADER-lexicon valence of the response's
words, Σ valence / ``completion_len`` (unknown and special words 0). TRL GRPO/RLOO get it as a reward
function, ours as a :class:`trainers.rewards.CallableReward`, TRL 1.12 PPO (which only takes a
sequence-classifier module) as :class:`LexiconRewardModel`, whose last-token read-out is the same number.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from bench.harness.assets import model_dir
from bench.harness.rm_common import REPO, device_name, git_sha

TRL_PPO_VERSION = "1.12.0"
TRL_PPO_DIR = REPO / "bench" / ".cache" / f"trl-{TRL_PPO_VERSION}"
"""Where ``pip install --no-deps --target`` put trl 1.12 (the last release with PPOTrainer); only the
TRL-PPO worker process puts it on ``sys.path``."""


@dataclass(frozen=True)
class RLWorkload:
    """One online-RL iteration shape: which comparison, model, batch, lengths, KL, epochs, steps."""

    name: str
    """Protocol id, e.g. ``C-grpo-t`` (research note §4.3)."""
    algo: Literal["grpo", "rloo", "ppo"]
    """grpo / rloo: our REINFORCE recipe vs TRL 1.16's GRPOTrainer / RLOOTrainer; ppo: our PPO recipe
    vs trl 1.12's ``trl.experimental.ppo.PPOTrainer``."""
    backbone: str
    """``tiny-128`` or ``smol-135M`` (random-init Llama shapes, word-level vocab; bench.harness.assets)."""
    prompts: int
    """P, prompts per iteration."""
    group: int
    """G, completions per prompt (1 for PPO)."""
    prompt_len: int
    """Lp, words (= tokens) per prompt."""
    completion_len: int
    """Lc, tokens per completion (fixed: EOS and pad suppressed)."""
    beta: float
    """KL coefficient, fixed (same value on both sides)."""
    warmup: int
    """Iterations run but not timed."""
    timed: int
    """Iterations timed."""
    epochs: int = 1
    """PPO epochs per iteration (one minibatch of all rows per epoch); 1 for GRPO/RLOO."""
    lr: float = 1e-5
    """Constant learning rate, both sides."""

    @property
    def rows(self) -> int:
        """B = P·G sequences per iteration."""
        return self.prompts * self.group

    @property
    def steps(self) -> int:
        return self.warmup + self.timed

    @property
    def n_prompts(self) -> int:
        """Exactly one epoch of prompts: each is used once, so the prompt checksum is order-free."""
        return self.prompts * self.steps


CPU_WORKLOADS: dict[str, RLWorkload] = {
    "grpo-tiny": RLWorkload("C-grpo-t", "grpo", "tiny-128", 16, 4, 16, 32, 0.04, 2, 8),
    "rloo-tiny": RLWorkload("C-rloo-t", "rloo", "tiny-128", 16, 4, 16, 32, 0.04, 2, 8),
    "ppo-tiny": RLWorkload("C-ppo-t", "ppo", "tiny-128", 64, 1, 16, 32, 0.05, 2, 4, epochs=4),
    "grpo-smol": RLWorkload("C-grpo-s", "grpo", "smol-135M", 4, 4, 16, 16, 0.04, 2, 5),
    "rloo-smol": RLWorkload("C-rloo-s", "rloo", "smol-135M", 4, 4, 16, 16, 0.04, 2, 5),
    "ppo-smol": RLWorkload("C-ppo-s", "ppo", "smol-135M", 16, 1, 16, 16, 0.05, 2, 5, epochs=2),
}
"""The CPU matrix: the shapes of §4.3's tiny rows (C-grpo-t, C-rloo-t, C-ppo-t with E = 4) and of the
SmolLM2-135M shape (C-grpo-s; its RLOO twin; a PPO cell of the same size, B 16, E 2). Fewer iterations than
§4.3 (2 warm-up + 8 or 4 timed; smol 2 + 5) so that the whole tiny matrix fits in ~10 min of one CPU core."""

SMOKE_STEPS = {"tiny": (1, 2), "smol": (1, 1)}
"""(warm-up, timed) per backbone family for ``--smoke``: every path runs, nothing is measured."""


def workloads(smoke: bool = False) -> dict[str, RLWorkload]:
    """The CPU matrix, shortened when ``smoke``."""
    if not smoke:
        return dict(CPU_WORKLOADS)
    out = {}
    for key, w in CPU_WORKLOADS.items():
        warmup, timed = SMOKE_STEPS[key.rsplit("-", 1)[1]]
        out[key] = replace(w, warmup=warmup, timed=timed)
    return out


def override(workload: Any, assignments: list[str]) -> Any:
    """``workload`` with ``FIELD=VALUE`` assignments applied (numbers parsed as the field's type): shrinks a
    cell for tests and quick checks, e.g. ``["prompts=2", "completion_len=4"]``.

    Raises:
        ValueError: an unknown field or a malformed assignment.
    """
    import dataclasses

    types = {f.name: type(getattr(workload, f.name)) for f in dataclasses.fields(workload)}
    changes: dict[str, Any] = {}
    for item in assignments:
        name, sep, value = item.partition("=")
        if not sep or name not in types:
            raise ValueError(f"expected FIELD=VALUE with FIELD in {sorted(types)}, got {item!r}")
        changes[name] = types[name](value)
    return replace(workload, **changes)


def backbone_path(backbone: str, cache: Path | None = None) -> Path:
    return model_dir(backbone, seed=0, cache=cache)


# ----------------------------------------------------------------------------- prompts and reward


def make_prompts(vocab: dict[str, int], n: int, length: int, *, seed: int) -> list[str]:
    """``n`` prompts of exactly ``length`` filler words (not in the lexicon, not special)."""
    from bench.harness.pairs import pools_from_vocab

    filler = pools_from_vocab(vocab).filler
    rng = random.Random(seed)
    return [" ".join(rng.choices(filler, k=length)) for _ in range(n)]


def workload_prompts(workload: RLWorkload, path: Path, seed: int) -> list[str]:
    """The run's prompts (the same for both frameworks at a given seed)."""
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(path).get_vocab()
    return make_prompts(vocab, workload.n_prompts, workload.prompt_len, seed=2000 + seed)


class LexiconScore:
    """The benchmark reward: Σ lexicon valence of a response's words / ``length``, and its log.

    ``log`` gets (current step, value) for every scored response, so a run's per-iteration mean reward
    comes from this one function whatever framework called it.
    """

    def __init__(self, vocab: dict[str, int], length: int, clock: Any = None) -> None:
        from bench.harness.assets import lexicon

        table = lexicon()
        self.valence = {word: table[word] for word in vocab if word in table}
        self.length = length
        self.clock = clock
        """Anything with a ``step`` attribute (the work counter): which iteration a value belongs to."""
        self.log: list[tuple[int, float]] = []

    def record(self, value: float) -> float:
        self.log.append((self.clock.step if self.clock is not None else -1, value))
        return value

    def text(self, response: str) -> float:
        return self.record(sum(self.valence.get(word, 0.0) for word in response.split()) / self.length)

    def trl_reward_func(self):
        """A TRL ``reward_funcs`` entry: ``f(prompts, completions, **kw) -> list[float]``."""

        def lexicon_mean_valence(completions, **_kwargs):
            return [self.text(c if isinstance(c, str) else c[-1]["content"]) for c in completions]

        return lexicon_mean_valence

    def valence_by_id(self, vocab: dict[str, int]):
        """(V,) float32 tensor: the valence of each token id (0 for unknown and special tokens)."""
        import torch

        table = torch.zeros(max(vocab.values()) + 1)
        for word, index in vocab.items():
            table[index] = self.valence.get(word, 0.0)
        return table

    def per_step_means(self, steps: range) -> list[float | None]:
        out = []
        for step in steps:
            values = [v for s, v in self.log if s == step]
            out.append(sum(values) / len(values) if values else None)
        return out


def lexicon_reward_model(score: LexiconScore, vocab: dict[str, int]):
    """TRL 1.12 PPO's reward model for :class:`LexiconScore`: an ``nn.Module`` with ``base_model_prefix``
    and ``score``, whose "backbone" returns the running sum of token valences / ``length`` as the last
    hidden state (B, L, 1); TRL reads it at the last non-pad token. Prompts are filler (valence 0), so
    that is the response's Σ valence / length, the number our side computes from the text."""
    import torch
    from torch import nn

    length = score.length

    class CumulativeValence(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("valence", score.valence_by_id(vocab))

        def forward(self, input_ids, attention_mask=None, **_kwargs):
            values = self.valence[input_ids]
            if attention_mask is not None:
                values = values * attention_mask.to(values.dtype)
            hidden = (values.cumsum(dim=1) / length)[..., None]
            for value in hidden[
                :, -1, 0
            ].tolist():  # every row is full length: the read-out is the last token
                score.record(value)
            return _Output(hidden_states=(hidden,))

    class LexiconRewardModel(nn.Module):
        base_model_prefix = "backbone"

        def __init__(self) -> None:
            super().__init__()
            self.backbone = CumulativeValence()
            self.score = nn.Identity()

    model = LexiconRewardModel()
    model.requires_grad_(False)
    return model.to(torch.float32)


@dataclass
class _Output:
    hidden_states: tuple


# ----------------------------------------------------------------------------- result records


def result_skeleton(framework: str, version: str, implementation: str, workload: RLWorkload, seed: int,
                    threads: int) -> dict[str, Any]:  # fmt: skip
    import torch
    import transformers

    return {
        "framework": framework,
        "framework_version": version,
        "implementation": implementation,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git": git_sha(),
        "device": "cpu",
        "device_name": device_name("cpu"),
        "precision": "fp32",
        "threads": threads,
        "workload": asdict(workload),
        "seed": seed,
    }


def optimizer_summary(optimizer: Any) -> dict[str, Any]:
    """Type, kernel (fused/foreach), lr and the weight decay of each parameter group actually in use."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    groups = inner.param_groups
    return {
        "type": type(inner).__name__,
        "fused": inner.defaults.get("fused"),
        "foreach": inner.defaults.get("foreach"),
        "lr": sorted({g["lr"] for g in groups}),
        "weight_decay": sorted({g["weight_decay"] for g in groups}),
        "params": sum(p.numel() for g in groups for p in g["params"]),
    }


def probe_results(probe, counter, workload: RLWorkload, score: LexiconScore | None = None) -> dict[str, Any]:
    """Timings, per-iteration work counts and memory of a finished run (counts over the timed iterations)."""
    from bench.harness.probes import peak_rss_mb

    timed = range(workload.warmup, workload.steps)
    out: dict[str, Any] = {
        "steps_run": probe.steps,
        "step_s": probe.step_s,
        "cycle_s": probe.cycle_s,
        "cpu_s": probe.cpu_s,
        "minor_faults": probe.minor_faults,
        "preempted": probe.preempted,
        "timed_steps": [timed.start, timed.stop],
        "work_per_step": counter.per_step(timed),
        "prompt_checksum": counter.prompt_checksum(),
        "calls_outside_steps": counter.outside_steps(),
        "rss_before_first_step_mb": round(probe.rss_before_first_step_mb, 1),
        "peak_rss_mb": round(probe.peak_rss_at_last_end_mb, 1),
        "peak_rss_process_end_mb": round(peak_rss_mb(), 1),
    }
    out["peak_minus_first_step_mb"] = round(out["peak_rss_mb"] - out["rss_before_first_step_mb"], 1)
    if score is not None:
        out["reward_per_step"] = score.per_step_means(range(workload.steps))
    return out
