"""Equal-work checks, summary and Markdown of the online-RL benchmark rows.

Validity, per workload (every check can fail, and a failed one voids the verdict):

1. **Invariants** of every process's timed iterations (:func:`expected_work`): the policy generated
   exactly B·Lc tokens from B·Lp prompt tokens, ran E teacher-forced passes with grad over B rows of
   Lp + Lc tokens, E backward passes and E parameter updates.
2. **Sides agree**: every per-trunk counter (:data:`bench.harness.rl_probes.COUNTS`) of TRL equals
   ours plus the *declared* difference of the comparison (:func:`declared_differences`: RLOO's extra
   no-grad policy forward); anything else that differs is reported as different work.
3. **Same prompts**: per seed, the checksum of every prompt token prefilled is equal on both sides.
4. Both sides ran warm-up + timed iterations.

Timing: per process the median of the timed iterations' cycle (end of one iteration to the end of the
next), per cell the median over processes; a speed-up counts when TRL/ours ≥ 1.10 and the pooled IQRs do
not overlap (research note §4.1). Target (issue 5): ≥ 1.5× faster at ≤ 0.8× peak memory, the memory in
every seed. The processes run one thread each, so their CPU time per iteration is their own work even on
a shared machine (where other processes stretch the wall time): the CPU-time ratio is given beside it.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from bench.harness.rl_probes import COUNTS
from bench.harness.stats import BUSY_PER_S, MIN_PROCESSES, SIGNIFICANT, quartiles, timed

SPEED_TARGET = 1.5
MEMORY_TARGET = 0.8


def declared_differences(workload: dict[str, Any]) -> dict[str, int]:
    """Counter → (TRL − ours) per iteration that the comparison has by design.

    RLOO: TRL 1.16 always recomputes the policy's log-probs in an extra no-grad forward (its KL and
    π_old); our REINFORCE keeps stage 1's log-probs, so it does not run that pass.
    """
    if workload["algo"] != "rloo":
        return {}
    rows = workload["prompts"] * workload["group"]
    return {
        "policy.nograd_full_rows": rows,
        "policy.nograd_full_tokens": rows * (workload["prompt_len"] + workload["completion_len"]),
    }


def expected_work(workload: dict[str, Any]) -> dict[str, int]:
    """What every timed iteration must contain on both sides, from the workload alone."""
    rows, epochs = workload["prompts"] * workload["group"], workload.get("epochs", 1)
    lp, lc = workload["prompt_len"], workload["completion_len"]
    return {
        "policy.generated_tokens": rows * lc,
        "policy.prefill_tokens": rows * lp,
        "policy.grad_full_rows": epochs * rows,
        "policy.grad_full_tokens": epochs * rows * (lp + lc),
        "policy.backward": epochs,
        "policy.updates": epochs,
    }


def _values(row: dict[str, Any], key: str) -> list[int]:
    if key == "policy.generated_tokens":
        return [
            s.get("policy.prefill_rows", 0) + s.get("policy.decode_rows", 0) for s in row["work_per_step"]
        ]
    return [s.get(key, 0) for s in row["work_per_step"]]


def work_differences(ours: list[dict[str, Any]], trl: list[dict[str, Any]]) -> list[str]:
    """Reasons the two sides did not do the declared work (empty = valid)."""
    reasons: list[str] = []
    if not ours or not trl:
        return ["a side has no successful process"]
    workload = ours[0]["workload"]
    for row in ours + trl:
        expected = workload["warmup"] + workload["timed"]
        if row["steps_run"] != expected:
            reasons.append(
                f"{row['framework']} seed {row['seed']}: ran {row['steps_run']} iterations, expected {expected}"
            )
        for key, want in expected_work(workload).items():
            got = sorted(set(_values(row, key)))
            if got != [want]:
                reasons.append(
                    f"{row['framework']} seed {row['seed']}: {key} per iteration {got}, expected {want}"
                )
    declared = declared_differences(workload)
    roles = sorted({k.split(".")[0] for r in ours + trl for s in r["work_per_step"] for k in s})
    for key in (f"{role}.{name}" for role in roles for name in COUNTS):
        mine = sorted({v for r in ours for v in _values(r, key)})
        theirs = sorted({v - declared.get(key, 0) for r in trl for v in _values(r, key)})
        if mine != theirs:
            note = f" after the declared {declared[key]:+d}" if key in declared else ""
            reasons.append(
                f"{key} per iteration: ours {mine} vs TRL {sorted({v for r in trl for v in _values(r, key)})}{note}"
            )
    checksums: dict[int, dict[str, int]] = defaultdict(dict)
    for row in ours + trl:
        checksums[row["seed"]][row["framework"]] = row["prompt_checksum"]
    for seed, by_fw in sorted(checksums.items()):
        if len(by_fw) == 2 and by_fw["ours"] != by_fw["trl"]:
            reasons.append(f"seed {seed}: different prompts (checksum {by_fw['ours']} vs {by_fw['trl']})")
    return reasons


def process_summary(row: dict[str, Any]) -> dict[str, Any]:
    q1, med, q3 = quartiles(timed(row))
    return {
        "seed": row["seed"],
        "median_cycle_s": med,
        "iqr_cycle_s": [q1, q3],
        "median_cpu_s": quartiles(timed(row, "cpu_s"))[1],
        "median_preempted": quartiles(timed(row, "preempted"))[1],
        "peak_rss_mb": row["peak_rss_mb"],
        "peak_minus_first_step_mb": row["peak_minus_first_step_mb"],
        "rss_before_first_step_mb": row["rss_before_first_step_mb"],
        "mean_reward_timed": _mean(
            [r for r in row.get("reward_per_step", [])[row["timed_steps"][0] :] if r is not None]
        ),
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def cell(rows: list[dict[str, Any]]) -> dict[str, Any]:
    procs = [process_summary(r) for r in rows]
    q1, _, q3 = quartiles([t for r in rows for t in timed(r)])
    med = statistics.median(p["median_cycle_s"] for p in procs)
    return {
        "framework_version": rows[0].get("framework_version"),
        "implementation": rows[0].get("implementation"),
        "processes": len(rows),
        "median_cycle_s": med,
        "pooled_iqr_cycle_s": [q1, q3],
        "median_cpu_s": statistics.median(p["median_cpu_s"] for p in procs),
        "preempted_per_s": statistics.median(p["median_preempted"] / p["median_cycle_s"] for p in procs),
        "peak_rss_mb": max(p["peak_rss_mb"] for p in procs),
        "peak_minus_first_step_mb": max(p["peak_minus_first_step_mb"] for p in procs),
        "per_process": procs,
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One entry per workload key: both sides, validity, ratios and verdicts; plus failed processes."""
    by_workload: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    failures = []
    for row in rows:
        if not row.get("ok"):
            failures.append({k: row.get(k) for k in ("framework", "workload_key", "seed", "error")})
            continue
        by_workload[row["workload_key"]][row["framework"]].append(row)
    cells = {}
    for key, sides in by_workload.items():
        entry: dict[str, Any] = {"workload": next(iter(sides.values()))[0]["workload"]}
        for fw, fw_rows in sides.items():
            entry[fw] = cell(fw_rows)
        if "ours" in sides and "trl" in sides:
            entry.update(compare(sides["ours"], sides["trl"], entry["ours"], entry["trl"]))
        cells[key] = entry
    return {"cells": cells, "failures": failures}


def compare(ours_rows, trl_rows, ours: dict[str, Any], trl: dict[str, Any]) -> dict[str, Any]:
    """Ratios and verdicts of one workload (see the module doc)."""
    reasons = work_differences(ours_rows, trl_rows)
    enough = min(len(ours_rows), len(trl_rows)) >= MIN_PROCESSES
    speedup = trl["median_cycle_s"] / ours["median_cycle_s"]
    separated = ours["pooled_iqr_cycle_s"][1] < trl["pooled_iqr_cycle_s"][0]
    peaks = {(r["framework"], r["seed"]): r["peak_rss_mb"] for r in ours_rows + trl_rows}
    seeds = sorted({s for _, s in peaks})
    ratios = [
        peaks[("ours", s)] / peaks[("trl", s)] for s in seeds if ("ours", s) in peaks and ("trl", s) in peaks
    ]
    deltas = {(r["framework"], r["seed"]): r["peak_minus_first_step_mb"] for r in ours_rows + trl_rows}
    delta_ratios = [deltas[("ours", s)] / deltas[("trl", s)] for s in seeds
                    if deltas.get(("trl", s), 0) > 0 and ("ours", s) in deltas]  # fmt: skip
    valid = not reasons
    faster = bool(enough and valid and speedup >= SIGNIFICANT and separated)
    cpu_ratio = trl["median_cpu_s"] / ours["median_cpu_s"] if ours["median_cpu_s"] else None
    memory_ok = bool(ratios) and max(ratios) <= MEMORY_TARGET
    return {
        "valid": valid,
        "declared_differences": declared_differences(ours_rows[0]["workload"]),
        "invalid_reasons": reasons,
        "enough_processes": enough,
        "speedup": speedup,
        "cpu_time_ratio": cpu_ratio,
        "iqr_separated": separated,
        "faster": faster,
        "slower": bool(
            enough
            and valid
            and speedup <= 1 / SIGNIFICANT
            and trl["pooled_iqr_cycle_s"][1] < ours["pooled_iqr_cycle_s"][0]
        ),
        "peak_rss_ratio_max": max(ratios) if ratios else None,
        "peak_delta_ratio_max": max(delta_ratios) if delta_ratios else None,
        "memory_target_every_seed": memory_ok,
        "speed_target": bool(faster and speedup >= SPEED_TARGET),
        "speed_target_cpu": bool(enough and valid and cpu_ratio is not None and cpu_ratio >= SPEED_TARGET),
        "target_met": bool(faster and speedup >= SPEED_TARGET and memory_ok),
    }


def verdict(entry: dict[str, Any]) -> str:
    if "valid" not in entry:
        return "incomplete"
    if not entry["valid"]:
        return "invalid: different work"
    if not entry["enough_processes"]:
        return f"no verdict (< {MIN_PROCESSES} seeds)"
    if entry["target_met"]:
        return f"target met (≥ {SPEED_TARGET}×, ≤ {MEMORY_TARGET}× memory)"
    speed = "faster" if entry["faster"] else "slower" if entry["slower"] else "no clear speed difference"
    if entry["faster"] and not entry["speed_target"]:
        speed += f", below {SPEED_TARGET}×"
    memory = "memory ≤ 0.8×" if entry["memory_target_every_seed"] else "memory above 0.8×"
    cpu = f"CPU time {entry['cpu_time_ratio']:.2f}× ({'≥' if entry['speed_target_cpu'] else '<'} {SPEED_TARGET}×)"
    return f"{speed}; {memory}; {cpu}"


def markdown(summary: dict[str, Any], *, title: str, notes: list[str] = ()) -> str:
    lines = [f"# {title}", ""]
    lines += [
        "| workload | TRL trainer | model | P×G, Lp+Lc, E | seeds | TRL s/iter [IQR] | ours s/iter [IQR] | TRL/ours time | "
        "CPU-s/iter TRL / ours | TRL peak MB (Δ) | ours peak MB (Δ) | ours/TRL peak (Δ) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in summary["cells"].values():
        w, trl, ours = entry["workload"], entry.get("trl"), entry.get("ours")
        shape = f"{w['prompts']}×{w['group']}, {w['prompt_len']}+{w['completion_len']}, {w.get('epochs', 1)}"
        if trl is None or ours is None:
            lines.append(f"| {w['name']} | | {w['backbone']} | {shape} | | | | | | | | | incomplete |")
            continue
        lines.append(
            f"| {w['name']} | {trl['implementation']} {trl['framework_version']} | {w['backbone']} | {shape} | "
            f"{min(trl['processes'], ours['processes'])} | {_iqr(trl)} | {_iqr(ours)} | **{entry['speedup']:.2f}×** | "
            f"{trl['median_cpu_s']:.2f} / {ours['median_cpu_s']:.2f} | {_mem(trl)} | {_mem(ours)} | "
            f"{_ratio(entry['peak_rss_ratio_max'])} ({_ratio(entry['peak_delta_ratio_max'])}) | {verdict(entry)} |"
        )
    lines += ["", "s/iter: median over seeds of each process's median timed iteration (end of one iteration to the end "
              "of the next: generation, scoring, every forward/backward, optimizer step(s), logging); [IQR] of all timed "
              "iterations pooled. Peak: ru_maxrss up to the last timed iteration (imports included); Δ: peak minus RSS "
              "just before the first iteration. ours/TRL peak: the worst (largest) seed's ratio."]  # fmt: skip
    for entry in summary["cells"].values():
        name = entry["workload"]["name"]
        for key, diff in (entry.get("declared_differences") or {}).items():
            lines.append(f"- {name}: declared difference, checked: TRL {key} = ours {diff:+d} per iteration")
        busy = [
            fw for fw in ("trl", "ours") if ((entry.get(fw) or {}).get("preempted_per_s") or 0) > BUSY_PER_S
        ]
        if busy:
            lines.append(f"- {name}: busy machine ({', '.join(busy)}: > {BUSY_PER_S} involuntary context switches/s); "
                         "compare CPU-s/iter")  # fmt: skip
        for reason in entry.get("invalid_reasons", []):
            lines.append(f"- {name}: {reason}")
    for failure in summary["failures"]:
        lines.append(
            f"- FAILED {failure['framework']} {failure['workload_key']} seed {failure['seed']}: {failure['error']}"
        )
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def _iqr(c: dict[str, Any]) -> str:
    q1, q3 = c["pooled_iqr_cycle_s"]
    return f"{c['median_cycle_s']:.3f} [{q1:.3f}–{q3:.3f}]"


def _mem(c: dict[str, Any]) -> str:
    return f"{c['peak_rss_mb']:.0f} ({c['peak_minus_first_step_mb']:+.0f})"


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"
