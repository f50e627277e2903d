"""ESRL two-stage sampling vs naive sampling-with-grad: one REINFORCE step each way, same samples, same gradient.

* ``two_stage`` (ours, algorithms.md §3.2): stage 1 samples the B responses under ``no_grad`` with the KV
  cache (:func:`trainers.rollout.rollout`); stage 2 scores them in one teacher-forced pass with grad
  (:func:`trainers.teacher_forced.score_tokens`: chunked LM head, no (B, T, V) logits kept).
* ``naive``: the same KV-cached decoding loop run *with* grad, keeping the autograd graph of every
  decoding step (its activations, the growing K/V caches, each step's (B, V) logits) until the loss's
  backward.

Both draw the same tokens (per-row generators seeded by (seed, step, row), the same Gumbel noise, pad
and EOS banned so every response is exactly Lc tokens), take the REINFORCE loss on the raw model's
log-probs with a group-mean baseline of the lexicon reward, clip to 1.0 and step a fused AdamW: the
gradient is the same up to float rounding (checked: the sampled-token checksum and the gradient norm
of the first step are recorded). By design the two-stage step runs one more forward (the
teacher-forced pass with grad over B·(Lp + Lc) tokens) and keeps no graph while decoding.

    python -m bench.harness.rl_esrl --variant naive --workload tiny --seed 0 --out rows.jsonl
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import contextlib
import json
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

VARIANTS = ("two_stage", "naive")


@dataclass(frozen=True)
class ESRLWorkload:
    """One REINFORCE step shape: model, P prompts × G samples, Lp + Lc tokens, steps."""

    name: str
    backbone: str
    prompts: int
    group: int
    prompt_len: int
    completion_len: int
    warmup: int
    timed: int
    lr: float = 1e-5

    @property
    def rows(self) -> int:
        return self.prompts * self.group

    @property
    def steps(self) -> int:
        return self.warmup + self.timed


WORKLOADS: dict[str, ESRLWorkload] = {
    "tiny": ESRLWorkload("E-t32", "tiny-128", 16, 4, 16, 32, 1, 4),
    "tiny-long": ESRLWorkload("E-t128", "tiny-128", 16, 4, 16, 128, 1, 3),
    "smol": ESRLWorkload("E-s16", "smol-135M", 4, 4, 16, 16, 1, 3),
    "smol-long": ESRLWorkload("E-s64", "smol-135M", 4, 4, 16, 64, 1, 2),
}
"""tiny: C-grpo-t's batch (B 64, Lc 32) and a 4× longer response; smol: C-grpo-s's (B 16, Lc 16) and Lc 64."""


def workloads(smoke: bool = False) -> dict[str, ESRLWorkload]:
    if not smoke:
        return dict(WORKLOADS)
    return {k: replace(w, warmup=1, timed=1) for k, w in WORKLOADS.items()}


# ----------------------------------------------------------------------------- one step each way


def banned(logits, ids: list[int]):
    """(B, V) logits with ``ids`` set to −inf (a new tensor)."""
    import torch

    return logits.index_fill(-1, torch.as_tensor(ids, device=logits.device), float("-inf"))


def naive_logprobs(model, ids, mask, length: int, ban: list[int], generators):
    """Sample ``length`` tokens per row with grad through the KV-cached loop: (B, Lc) raw log-probs
    (graph kept) and (B, Lc) tokens."""
    import torch

    from trainers.rollout import draw, positions

    attention = mask.long()
    out = model(input_ids=ids, attention_mask=attention, position_ids=positions(attention), use_cache=True,
                logits_to_keep=1)  # fmt: skip
    next_position = attention.sum(-1, keepdim=True)
    logps, tokens = [], []
    for step in range(length):
        raw = out.logits[:, -1].float()
        token = draw(torch.log_softmax(banned(raw.detach(), ban), -1), greedy=False, generator=generators)
        logps.append(torch.log_softmax(raw, -1).gather(-1, token[:, None]).squeeze(-1))
        tokens.append(token)
        if step == length - 1:
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        out = model(input_ids=token[:, None], attention_mask=attention, position_ids=next_position,
                    past_key_values=out.past_key_values, use_cache=True)  # fmt: skip
        next_position = next_position + 1
    return torch.stack(logps, 1), torch.stack(tokens, 1)


def two_stage_logprobs(model, ids, mask, length: int, ban: list[int], generators, pad_id: int):
    """Stage 1 (no graph) then stage 2 (one teacher-forced pass with grad): (B, Lc) raw log-probs, tokens."""
    from trainers.rollout import SamplingConfig, rollout
    from trainers.teacher_forced import score_tokens

    config = SamplingConfig(max_new_tokens=length, stop_at_eos=False, temperature=1.0)
    batch = rollout(model, ids, mask, config, eos_token_ids=ban, pad_token_id=pad_id, generator=generators,
                    return_logprobs=False)  # fmt: skip
    scores = score_tokens(model, ids, mask, batch.response_ids, batch.response_mask)
    return scores.logprobs, batch.response_ids


def run(variant: str, workload: ESRLWorkload, seed: int, path: Path, *, threads: int) -> dict[str, Any]:
    """``workload.steps`` REINFORCE steps with ``variant``; timings, memory, samples checksum, grad norms."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.harness.probes import StepProbe
    from bench.harness.rl_common import LexiconScore, make_prompts, result_skeleton
    from bench.harness.rl_probes import RLWorkCounter
    from trainers.rl_math import group_mean_baseline, reinforce_loss
    from trainers.rollout import left_pad

    tokenizer = AutoTokenizer.from_pretrained(path)
    pad_id, ban = tokenizer.pad_token_id, sorted({tokenizer.pad_token_id, tokenizer.eos_token_id})
    vocab = tokenizer.get_vocab()
    prompts = make_prompts(vocab, workload.prompts * workload.steps, workload.prompt_len, seed=2000 + seed)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=workload.lr, weight_decay=0.0, fused=True)
    counter = RLWorkCounter().attach("policy", model.model)
    score = LexiconScore(vocab, workload.completion_len, clock=counter)
    probe = StepProbe(counter=counter)
    checksums, grad_norms, losses = [], [], []
    for step in range(workload.steps):
        rows = [
            p
            for p in prompts[step * workload.prompts : (step + 1) * workload.prompts]
            for _ in range(workload.group)
        ]
        ids, mask = left_pad([tokenizer(r)["input_ids"] for r in rows], pad_id)
        generators = [
            torch.Generator().manual_seed((seed * 1_000_003 + step) * 10_007 + i) for i in range(len(rows))
        ]
        probe.begin()
        if variant == "naive":
            logprobs, tokens = naive_logprobs(model, ids, mask, workload.completion_len, ban, generators)
        else:
            logprobs, tokens = two_stage_logprobs(
                model, ids, mask, workload.completion_len, ban, generators, pad_id
            )
        texts = [tokenizer.decode(t.tolist(), skip_special_tokens=True) for t in tokens]
        rewards = torch.tensor([score.text(t) for t in texts])
        advantages = rewards - group_mean_baseline(rewards, workload.group)
        loss, _ = reinforce_loss(logprobs, torch.ones_like(tokens, dtype=torch.bool), advantages)
        loss.backward()
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        probe.end()
        checksums.append(int((tokens * (tokens + 7)).sum()))
        losses.append(float(loss.detach()))
    result = result_skeleton("ours", "dev", variant, workload, seed, threads)
    result["workload"] = {**asdict(workload), "algo": "reinforce"}
    timed = range(workload.warmup, workload.steps)
    result.update({
        "variant": variant, "steps_run": probe.steps, "step_s": probe.step_s, "cycle_s": probe.step_s,
        "cpu_s": probe.cpu_s, "preempted": probe.preempted, "timed_steps": [timed.start, timed.stop],
        "work_per_step": counter.per_step(timed), "sample_checksums": checksums, "grad_norms": grad_norms,
        "losses": losses, "rss_before_first_step_mb": round(probe.rss_before_first_step_mb, 1),
        "peak_rss_mb": round(probe.peak_rss_at_last_end_mb, 1),
    })  # fmt: skip
    result["peak_minus_first_step_mb"] = round(result["peak_rss_mb"] - result["rss_before_first_step_mb"], 1)
    counter.detach()
    return result


# ----------------------------------------------------------------------------- summary


def _median_timed(row: dict[str, Any], key: str) -> float:
    start, stop = row["timed_steps"]
    return statistics.median(row[key][start:stop])


def checks(rows: dict[str, list[dict[str, Any]]], workload: dict[str, Any]) -> list[str]:
    """Reasons the two variants did not do the same step (empty = same samples, same gradient)."""
    reasons = []
    rows_n, lc, lp = (
        workload["prompts"] * workload["group"],
        workload["completion_len"],
        workload["prompt_len"],
    )
    for variant, side in rows.items():
        for row in side:
            for step in row["work_per_step"]:
                generated = step["policy.prefill_rows"] + step["policy.decode_rows"]
                if generated != rows_n * lc or step["policy.backward"] != 1 or step["policy.updates"] != 1:
                    reasons.append(f"{variant} seed {row['seed']}: {generated} tokens generated (expected "
                                   f"{rows_n * lc}), {step['policy.backward']} backward, {step['policy.updates']} updates")  # fmt: skip
                    break
            expected_full = rows_n if variant == "two_stage" else 0
            fulls = {s["policy.grad_full_rows"] for s in row["work_per_step"]}
            if fulls != {expected_full}:
                reasons.append(f"{variant} seed {row['seed']}: teacher-forced rows with grad {sorted(fulls)}, "
                               f"expected {expected_full} (B·(Lp + Lc) = {rows_n * (lp + lc)} tokens)")  # fmt: skip
    by_seed: dict[int, dict[str, dict[str, Any]]] = {}
    for variant, side in rows.items():
        for row in side:
            by_seed.setdefault(row["seed"], {})[variant] = row
    for seed, pair in sorted(by_seed.items()):
        if len(pair) < 2:
            continue
        a, b = pair["two_stage"], pair["naive"]
        if a["sample_checksums"][0] != b["sample_checksums"][0]:
            reasons.append(f"seed {seed}: first step sampled different tokens")
        g1, g2 = a["grad_norms"][0], b["grad_norms"][0]
        if abs(g1 - g2) > 1e-3 * max(abs(g1), abs(g2), 1e-12):
            reasons.append(f"seed {seed}: first-step gradient norms differ ({g1:.6g} vs {g2:.6g})")
    return reasons


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_workload: dict[str, dict[str, list[dict[str, Any]]]] = {}
    failures = [r for r in rows if not r.get("ok")]
    for row in rows:
        if row.get("ok"):
            by_workload.setdefault(row["workload_key"], {}).setdefault(row["variant"], []).append(row)
    cells = {}
    for key, sides in by_workload.items():
        workload = next(iter(sides.values()))[0]["workload"]
        entry: dict[str, Any] = {"workload": workload}
        for variant, side in sides.items():
            entry[variant] = {
                "processes": len(side),
                "median_step_s": statistics.median(_median_timed(r, "step_s") for r in side),
                "median_cpu_s": statistics.median(_median_timed(r, "cpu_s") for r in side),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in side),
                "peak_minus_first_step_mb": max(r["peak_minus_first_step_mb"] for r in side),
                "first_grad_norm": [r["grad_norms"][0] for r in side],
            }
        if len(sides) == 2:
            two, naive = entry["two_stage"], entry["naive"]
            entry["invalid_reasons"] = checks(sides, workload)
            entry["valid"] = not entry["invalid_reasons"]
            entry["time_naive_over_two_stage"] = naive["median_step_s"] / two["median_step_s"]
            entry["cpu_naive_over_two_stage"] = naive["median_cpu_s"] / two["median_cpu_s"]
            entry["peak_two_stage_over_naive"] = two["peak_rss_mb"] / naive["peak_rss_mb"]
            entry["delta_two_stage_over_naive"] = (two["peak_minus_first_step_mb"] / naive["peak_minus_first_step_mb"]
                                                   if naive["peak_minus_first_step_mb"] > 0 else None)  # fmt: skip
        cells[key] = entry
    return {"cells": cells, "failures": [{k: f.get(k) for k in ("variant", "workload_key", "seed", "error")}
                                         for f in failures]}  # fmt: skip


def markdown(summary: dict[str, Any], *, title: str) -> str:
    lines = [f"# {title}", "",
             "| workload | model | B, Lp+Lc | seeds | two-stage s/step (CPU-s) | naive s/step (CPU-s) | "
             "naive/two-stage time (CPU) | two-stage peak MB (Δ) | naive peak MB (Δ) | two-stage/naive peak (Δ) | "
             "same samples & gradient |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for entry in summary["cells"].values():
        w, two, naive = entry["workload"], entry.get("two_stage"), entry.get("naive")
        if two is None or naive is None:
            lines.append(f"| {w['name']} | {w['backbone']} | | | | | | | | | incomplete |")
            continue
        delta = entry["delta_two_stage_over_naive"]
        lines.append(
            f"| {w['name']} | {w['backbone']} | {w['prompts'] * w['group']}, {w['prompt_len']}+{w['completion_len']} | "
            f"{min(two['processes'], naive['processes'])} | {two['median_step_s']:.3f} ({two['median_cpu_s']:.3f}) | "
            f"{naive['median_step_s']:.3f} ({naive['median_cpu_s']:.3f}) | "
            f"**{entry['time_naive_over_two_stage']:.2f}×** ({entry['cpu_naive_over_two_stage']:.2f}×) | "
            f"{two['peak_rss_mb']:.0f} ({two['peak_minus_first_step_mb']:+.0f}) | "
            f"{naive['peak_rss_mb']:.0f} ({naive['peak_minus_first_step_mb']:+.0f}) | "
            f"**{entry['peak_two_stage_over_naive']:.2f}** ({'–' if delta is None else f'{delta:.2f}'}) | "
            f"{'yes' if entry['valid'] else 'NO'} |"
        )
    lines += ["", "s/step: median over seeds of each process's median timed step (sampling, reward, loss, backward, "
              "clip, AdamW). Peak: ru_maxrss up to the last timed step; Δ: peak minus RSS before the first step (the "
              "step's working set). The two-stage step runs one extra forward by design (the teacher-forced pass with "
              "grad); naive keeps the graph of every decoding step instead. One thread per process: on a shared machine "
              "the wall time is stretched by other processes, the CPU time is the step's own work."]  # fmt: skip
    for entry in summary["cells"].values():
        for reason in entry.get("invalid_reasons", []):
            lines.append(f"- {entry['workload']['name']}: {reason}")
    for f in summary["failures"]:
        lines.append(f"- FAILED {f['variant']} {f['workload_key']} seed {f['seed']}: {f['error']}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- worker entry point


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--workload", required=True, choices=sorted(WORKLOADS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    workload = workloads(args.smoke)[args.workload]
    try:
        import torch

        from bench.harness.rl_common import backbone_path

        torch.set_num_threads(args.threads)
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)
        result = run(args.variant, workload, args.seed, backbone_path(workload.backbone, args.cache),
                     threads=args.threads)  # fmt: skip
        result["ok"] = True
    except Exception as exc:
        traceback.print_exc()
        result = {
            "variant": args.variant,
            "seed": args.seed,
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
        }
    result["workload_key"] = args.workload
    result["process_s"] = round(time.perf_counter() - start, 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(result) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
