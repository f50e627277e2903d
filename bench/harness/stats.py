"""From per-process JSON rows to the summary: medians, IQRs, ratios, validity, memory, Markdown.

Per process: median and IQR of the timed steps' cycle times (end of one optimizer step to the end of
the next: batch fetch + forward + backward + clip + optimizer + framework bookkeeping). Per cell
(workload × framework): the median of the process medians, and the IQR of all timed steps pooled.
A speed-up counts when ours/TRL ≥ 1.10 and the pooled IQRs do not overlap (research note §4.1);
memory "no more" must hold in every seed. A cell whose work counters differ between frameworks is
flagged ``invalid: different work`` and gets no verdict.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

WORK_KEYS = ("grad_rows", "nograd_rows", "tokens", "backward_passes", "optimizer_steps")
"""Counters that must be equal per timed step for a comparison to be valid (forward *calls* may differ:
one concatenated forward and two half-size forwards are the same work)."""

BUSY_PER_S = 50
"""Involuntary context switches per second above which a process is reported as run on a busy machine."""

MIN_PROCESSES = 3
"""Seeds (processes) per side needed before a speed or memory verdict is given."""

SIGNIFICANT = 1.10
TARGET = 1.30


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3) with linear interpolation; one value gives (v, v, v)."""
    if not values:
        return (float("nan"),) * 3
    if len(values) == 1:
        return (values[0],) * 3
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[1], q[2]


def timed(row: dict[str, Any], key: str = "cycle_s") -> list[float]:
    start, stop = row["timed_steps"]
    return row[key][start:stop]


def work_signature(row: dict[str, Any]) -> dict[str, Any]:
    """Per-step work of a process: each counter's set of values over the timed steps (ideally one)."""
    steps = row["work_per_step"]
    return {key: sorted({s[key] for s in steps}) for key in (*WORK_KEYS, "grad_forward_calls", "token_slots")}


def process_summary(row: dict[str, Any]) -> dict[str, Any]:
    cycles = timed(row)
    q1, med, q3 = quartiles(cycles)
    steps = row["work_per_step"]
    pairs = statistics.median(s["grad_rows"] for s in steps) / 2
    tokens = statistics.median(s["tokens"] for s in steps)
    return {
        "seed": row["seed"],
        "median_cycle_s": med,
        "iqr_cycle_s": [q1, q3],
        "median_step_s": quartiles(timed(row, "step_s"))[1],
        "median_cpu_s": quartiles(timed(row, "cpu_s"))[1] if "cpu_s" in row else None,
        "median_minor_faults": quartiles(timed(row, "minor_faults"))[1] if "minor_faults" in row else None,
        "median_preempted": quartiles(timed(row, "preempted"))[1] if "preempted" in row else None,
        "pairs_per_s": pairs / med if med else float("nan"),
        "tokens_per_s": tokens / med if med else float("nan"),
        "peak_rss_mb": row["peak_rss_mb"],
        "peak_minus_first_step_mb": row["peak_minus_first_step_mb"],
        "rss_before_first_step_mb": row["rss_before_first_step_mb"],
        **({"cuda_max_allocated_mb": row["cuda_max_allocated_mb"]} if "cuda_max_allocated_mb" in row else {}),
    }


def _cell(rows: list[dict[str, Any]]) -> dict[str, Any]:
    procs = [process_summary(r) for r in rows]
    pooled = [t for r in rows for t in timed(r)]
    q1, _, q3 = quartiles(pooled)
    med = statistics.median(p["median_cycle_s"] for p in procs)
    first = rows[0]
    return {
        "framework_version": first.get("framework_version"),
        "processes": len(rows),
        "median_cycle_s": med,
        "pooled_iqr_cycle_s": [q1, q3],
        "median_step_s": statistics.median(p["median_step_s"] for p in procs),
        "median_cpu_s": _median_or_none(p["median_cpu_s"] for p in procs),
        "median_preempted": _median_or_none(p["median_preempted"] for p in procs),
        "preempted_per_s": _median_or_none(
            p["median_preempted"] / p["median_cycle_s"] for p in procs if p["median_preempted"] is not None
        ),
        "median_minor_faults": _median_or_none(p["median_minor_faults"] for p in procs),
        "pairs_per_s": statistics.median(p["pairs_per_s"] for p in procs),
        "tokens_per_s": statistics.median(p["tokens_per_s"] for p in procs),
        "peak_rss_mb": max(p["peak_rss_mb"] for p in procs),
        "cuda_max_allocated_mb": _max_or_none(p.get("cuda_max_allocated_mb") for p in procs),
        "peak_minus_first_step_mb": max(p["peak_minus_first_step_mb"] for p in procs),
        "work": work_signature(first),
        "per_process": procs,
    }


def _max_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return max(values) if values else None


def _median_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _differences(ours: list[dict[str, Any]], trl: list[dict[str, Any]]) -> list[str]:
    """Reasons the two sides did not do the same work (empty list = equal work)."""
    reasons = []
    signatures = {(r["framework"], r["seed"]): work_signature(r) for r in ours + trl}
    for key in WORK_KEYS:
        values = {
            fw: sorted({v for (f, _), sig in signatures.items() if f == fw for v in sig[key]})
            for fw in ("ours", "trl")
        }
        if values["ours"] != values["trl"]:
            reasons.append(f"{key} per step: ours {values['ours']} vs TRL {values['trl']}")
    checksums = defaultdict(dict)
    for r in ours + trl:
        checksums[r["seed"]][r["framework"]] = r["token_checksum"]
    for seed, by_fw in sorted(checksums.items()):
        if len(by_fw) == 2 and by_fw["ours"] != by_fw["trl"]:
            reasons.append(
                f"seed {seed}: different token ids forwarded (checksum {by_fw['ours']} vs {by_fw['trl']})"
            )
    for r in ours + trl:
        expected = r["workload"]["warmup"] + r["workload"]["timed"]
        if r["steps_run"] != expected:
            reasons.append(
                f"{r['framework']} seed {r['seed']}: ran {r['steps_run']} steps, expected {expected}"
            )
    return reasons


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Summary of all rows: one entry per workload key, with both sides, ratio and verdicts."""
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
            entry[fw] = _cell(fw_rows)
        if "ours" in sides and "trl" in sides:
            ours, trl = entry["ours"], entry["trl"]
            reasons = _differences(sides["ours"], sides["trl"])
            enough = min(len(sides["ours"]), len(sides["trl"])) >= MIN_PROCESSES
            ratio = trl["median_cycle_s"] / ours["median_cycle_s"]
            separated = ours["pooled_iqr_cycle_s"][1] < trl["pooled_iqr_cycle_s"][0]
            # GPU: device memory (max allocated over the timed steps); CPU: peak RSS.
            peaks = {
                (r["framework"], r["seed"]): r.get("cuda_max_allocated_mb", r["peak_rss_mb"])
                for r in sides["ours"] + sides["trl"]
            }
            seeds = sorted({s for _, s in peaks})
            memory_ok = all(peaks.get(("ours", s), 0) <= peaks.get(("trl", s), float("inf")) for s in seeds)
            entry.update(
                {
                    "valid": not reasons,
                    "enough_processes": enough,
                    "invalid_reasons": reasons,
                    "speedup": ratio,
                    "cpu_time_ratio": (
                        trl["median_cpu_s"] / ours["median_cpu_s"]
                        if trl["median_cpu_s"] and ours["median_cpu_s"]
                        else None
                    ),
                    "iqr_separated": separated,
                    "faster": bool(enough and not reasons and ratio >= SIGNIFICANT and separated),
                    "slower": bool(
                        enough
                        and not reasons
                        and ratio <= 1 / SIGNIFICANT
                        and trl["pooled_iqr_cycle_s"][1] < ours["pooled_iqr_cycle_s"][0]
                    ),
                    "memory_no_more_every_seed": memory_ok,
                    "target_met": bool(
                        enough and not reasons and ratio >= TARGET and separated and memory_ok
                    ),
                }
            )
        cells[key] = entry
    return {"cells": cells, "failures": failures}


def _fmt_iqr(cell: dict[str, Any]) -> str:
    q1, q3 = cell["pooled_iqr_cycle_s"]
    return f"{cell['median_cycle_s']:.3f} [{q1:.3f}–{q3:.3f}]"


def _mem(cell: dict[str, Any]) -> str:
    if cell.get("cuda_max_allocated_mb") is not None:
        return f"{cell['cuda_max_allocated_mb']:.0f} (CUDA)"
    return f"{cell['peak_rss_mb']:.0f} ({cell['peak_minus_first_step_mb']:+.0f})"


def _cpu(cell: dict[str, Any]) -> str:
    return "–" if cell.get("median_cpu_s") is None else f"{cell['median_cpu_s']:.2f}"


def markdown(summary: dict[str, Any], *, title: str, notes: list[str] = ()) -> str:
    """The results table (one row per workload) plus failures and notes."""
    lines = [f"# {title}", ""]
    lines += [
        "| workload | backbone | pairs/step × L | seeds | TRL s/step [IQR] | ours s/step [IQR] | TRL pairs/s | "
        "ours pairs/s | ours/TRL | CPU-s/step TRL / ours | TRL peak MB (Δ) | ours peak MB (Δ) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in summary["cells"].values():
        w = cell["workload"]
        trl, ours = cell.get("trl"), cell.get("ours")
        if trl is None or ours is None:
            lines.append(f"| {w['name']} | {w['backbone']} | {w['pairs_per_step']} × {w['length']} | – | "
                         f"{'missing' if trl is None else _fmt_iqr(trl)} | {'missing' if ours is None else _fmt_iqr(ours)} "
                         "| | | | | | | incomplete |")  # fmt: skip
            continue
        if not cell["valid"]:
            verdict = "invalid: different work"
        elif not cell["enough_processes"]:
            verdict = f"no verdict (< {MIN_PROCESSES} seeds)"
        elif cell["target_met"]:
            verdict = "target met (≥ 1.3×, ≤ memory)"
        elif cell["faster"]:
            verdict = (
                "faster, below 1.3× target" if cell["memory_no_more_every_seed"] else "faster, more memory"
            )
        elif cell["slower"]:
            verdict = "slower"
        else:
            verdict = "no clear difference"
        lines.append(
            f"| {w['name']} | {w['backbone']} | {w['pairs_per_step']} × {w['length']} | {ours['processes']} | "
            f"{_fmt_iqr(trl)} | {_fmt_iqr(ours)} | {trl['pairs_per_s']:.2f} | {ours['pairs_per_s']:.2f} | "
            f"**{cell['speedup']:.2f}×** | {_cpu(trl)} / {_cpu(ours)} | {_mem(trl)} | {_mem(ours)} | {verdict} |"
        )
    lines += ["", "s/step: median over seeds of each process's median timed cycle (end of one optimizer step to the "
              "next); [IQR]: all timed steps pooled. Δ: peak RSS minus RSS just before the first step (training "
              "working set); peak RSS is the process maximum (ru_maxrss) up to the last timed step, imports included. "
              "CPU-s/step: process CPU time (all threads) per step, a cross-check that other load on the machine "
              "inflates less than wall time."]  # fmt: skip
    for cell in summary["cells"].values():
        busy = [
            fw for fw in ("trl", "ours") if ((cell.get(fw) or {}).get("preempted_per_s") or 0) > BUSY_PER_S
        ]
        if busy:
            lines.append(
                f"- {cell['workload']['name']}: the machine was busy ({', '.join(busy)}: over {BUSY_PER_S} involuntary "
                "context switches per second in timed steps); wall times are inflated, compare CPU-s/step"
            )
        for reason in cell.get("invalid_reasons", []):
            lines.append(f"- {cell['workload']['name']}: {reason}")
    for failure in summary["failures"]:
        lines.append(
            f"- FAILED {failure['framework']} {failure['workload_key']} seed {failure['seed']}: {failure['error']}"
        )
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"
