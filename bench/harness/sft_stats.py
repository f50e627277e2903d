"""Equal-work checks, summary and Markdown of the supervised-step benchmark rows (SFT, DPO vs TRL).

Validity, per workload (every check can fail, and a failed one voids the verdict):

1. **Invariants** of every process's timed steps (:func:`expected_work`): B (SFT) or 2B (DPO) rows of
   exactly Lp + Lc + 1 tokens through the trunk with grad and no padding, B·(Lc + 1) or 2B·(Lc + 1) tokens
   in the loss, no other trunk forward, one backward pass, one optimizer step; a live TRL reference adds
   its 2B rows per step on a second model, and nothing else.
2. **Reference pass** (DPO, :func:`expected_reference_pass`): before the first step, 2N rows forwarded
   without grad and 2N·(Lc + 1) tokens scored — on both sides when TRL precomputes, on ours only for the
   live rows.
3. **Same tokens**, per seed: the checksum of every token forwarded with grad, of every token in the loss,
   and of the reference pass (both sides precomputing) are equal on both sides.
4. Both sides ran warm-up + timed steps.

Timing as :mod:`bench.harness.stats`: per process the median of the timed cycles (end of one optimizer
step to the end of the next), per cell the median over processes, pooled IQR; "faster" needs ≥ 3 seeds,
TRL/ours ≥ 1.10 and non-overlapping IQRs; the issue's target is ≥ 1.3×. The live-reference rows are
labelled *algorithmic*: ours skips work TRL does, so their ratio is not an equal-work speed-up.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from bench.harness.stats import BUSY_PER_S, MIN_PROCESSES, SIGNIFICANT, TARGET, quartiles, timed

STEP_KEYS = ("grad_rows", "nograd_rows", "tokens", "token_slots", "loss_tokens", "nograd_scored_tokens",
             "backward_passes", "optimizer_steps", "ref_rows", "ref_tokens")  # fmt: skip
"""Per-step counters checked against :func:`expected_work` (forward *calls* may differ between sides)."""


def _live(workload: dict[str, Any], framework: str) -> bool:
    return workload["method"] == "dpo" and framework == "trl" and workload.get("trl_reference") == "live"


def expected_work(workload: dict[str, Any], framework: str) -> dict[str, int]:
    """What every timed step must contain, from the workload alone (``framework``: the live-reference rows)."""
    rows = workload["batch"] * (2 if workload["method"] == "dpo" else 1)
    seq = workload["prompt_len"] + workload["completion_len"] + 1
    ref = rows if _live(workload, framework) else 0
    return {"grad_rows": rows, "nograd_rows": 0, "tokens": rows * seq, "token_slots": rows * seq,
            "loss_tokens": rows * (workload["completion_len"] + 1), "nograd_scored_tokens": 0,
            "backward_passes": 1, "optimizer_steps": 1, "ref_rows": ref, "ref_tokens": ref * seq}  # fmt: skip


def expected_reference_pass(workload: dict[str, Any], framework: str) -> dict[str, int]:
    """Rows / tokens / scored tokens forwarded without grad before the first step."""
    if workload["method"] != "dpo" or _live(workload, framework):
        return {"rows": 0, "tokens": 0, "scored_tokens": 0}
    n = workload["batch"] * (workload["warmup"] + workload["timed"])
    seq = workload["prompt_len"] + workload["completion_len"] + 1
    return {"rows": 2 * n, "tokens": 2 * n * seq, "scored_tokens": 2 * n * (workload["completion_len"] + 1)}


def declared_difference(workload: dict[str, Any]) -> str | None:
    """The difference a comparison has by design (None: equal work)."""
    if _live(workload, "trl"):
        rows = 2 * workload["batch"]
        return (f"TRL forwards its reference model every step ({rows} extra no-grad rows); ours computed the "
                "reference log-probs once before the first step (the same pass TRL runs with "
                "precompute_ref_log_probs=True), so this ratio is an algorithmic saving, not equal work")  # fmt: skip
    return None


def work_differences(ours: list[dict[str, Any]], trl: list[dict[str, Any]]) -> list[str]:
    """Reasons the two sides did not do the declared work (empty = valid)."""
    if not ours or not trl:
        return ["a side has no successful process"]
    reasons: list[str] = []
    workload = ours[0]["workload"]
    for row in ours + trl:
        fw, seed = row["framework"], row["seed"]
        if row["steps_run"] != workload["warmup"] + workload["timed"]:
            reasons.append(f"{fw} seed {seed}: ran {row['steps_run']} steps, expected "
                           f"{workload['warmup'] + workload['timed']}")  # fmt: skip
        for key, want in expected_work(workload, fw).items():
            got = sorted({s.get(key, 0) for s in row["work_per_step"]})
            if got != [want]:
                reasons.append(f"{fw} seed {seed}: {key} per step {got}, expected {want}")
        passed = row["reference_pass"]
        for key, want in expected_reference_pass(workload, fw).items():
            if passed.get(key, 0) != want:
                reasons.append(
                    f"{fw} seed {seed}: reference pass {key} {passed.get(key, 0)}, expected {want}"
                )
    by_seed: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
    for row in ours + trl:
        by_seed[row["seed"]][row["framework"]] = row
    for seed, sides in sorted(by_seed.items()):
        if len(sides) != 2:
            continue
        checks = [("token_checksum", "tokens forwarded with grad"), ("loss_checksum", "tokens in the loss")]
        if workload["method"] == "dpo" and not _live(workload, "trl"):
            checks.append(("reference_pass.scored_checksum", "reference-pass scored tokens"))
        for key, what in checks:
            values = {fw: _get(row, key) for fw, row in sides.items()}
            if values["ours"] != values["trl"]:
                reasons.append(
                    f"seed {seed}: different {what} (checksum ours {values['ours']} vs TRL {values['trl']})"
                )
    return reasons


def _get(row: dict[str, Any], dotted: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def process_summary(row: dict[str, Any]) -> dict[str, Any]:
    """One process: median and IQR of its timed cycles, throughputs, memory."""
    q1, med, q3 = quartiles(timed(row))
    step = row["work_per_step"][0]
    return {
        "seed": row["seed"],
        "median_cycle_s": med,
        "iqr_cycle_s": [q1, q3],
        "median_cpu_s": quartiles(timed(row, "cpu_s"))[1],
        "median_preempted": quartiles(timed(row, "preempted"))[1],
        "tokens_per_s": step["tokens"] / med,
        "loss_tokens_per_s": step["loss_tokens"] / med,
        "rows_per_s": step["grad_rows"] / med,
        "peak_rss_mb": row["peak_rss_mb"],
        "peak_minus_first_step_mb": row["peak_minus_first_step_mb"],
        "reference_pass_s": row["reference_pass"].get("s", 0.0),
    }


def cell_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One (workload, framework): medians over processes, pooled IQR of every timed step, max memory."""
    procs = [process_summary(r) for r in rows]
    q1, _, q3 = quartiles([t for r in rows for t in timed(r)])

    def med(key: str) -> float:
        return statistics.median(p[key] for p in procs)

    return {
        "framework_version": rows[0].get("framework_version"),
        "threads": rows[0].get("threads"),
        "processes": len(rows),
        "median_cycle_s": med("median_cycle_s"),
        "pooled_iqr_cycle_s": [q1, q3],
        "median_cpu_s": med("median_cpu_s"),
        "preempted_per_s": statistics.median(p["median_preempted"] / p["median_cycle_s"] for p in procs),
        "tokens_per_s": med("tokens_per_s"),
        "loss_tokens_per_s": med("loss_tokens_per_s"),
        "rows_per_s": med("rows_per_s"),
        "peak_rss_mb": max(p["peak_rss_mb"] for p in procs),
        "peak_minus_first_step_mb": max(p["peak_minus_first_step_mb"] for p in procs),
        "reference_pass_s": med("reference_pass_s"),
        "optimizer": rows[0].get("optimizer"),
        "per_process": procs,
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One entry per workload key: both sides, the ratios, validity and verdicts."""
    by_key: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    failures = []
    for row in rows:
        if not row.get("ok"):
            failures.append({k: row.get(k) for k in ("framework", "workload_key", "seed", "error")})
            continue
        by_key[row["workload_key"]][row["framework"]].append(row)
    cells: dict[str, Any] = {}
    for key, sides in by_key.items():
        workload = next(iter(sides.values()))[0]["workload"]
        entry: dict[str, Any] = {"workload": workload, **{fw: cell_summary(r) for fw, r in sides.items()}}
        if "ours" in sides and "trl" in sides:
            entry.update(verdict(entry, sides["ours"], sides["trl"]))
        cells[key] = entry
    return {"cells": cells, "failures": failures}


def verdict(
    entry: dict[str, Any], ours_rows: list[dict[str, Any]], trl_rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """Ratios (TRL/ours time, ours/TRL memory) and the verdict flags of one workload."""
    ours, trl = entry["ours"], entry["trl"]
    reasons = work_differences(ours_rows, trl_rows)
    declared = declared_difference(entry["workload"])
    enough = min(len(ours_rows), len(trl_rows)) >= MIN_PROCESSES
    ratio = trl["median_cycle_s"] / ours["median_cycle_s"]
    separated = ours["pooled_iqr_cycle_s"][1] < trl["pooled_iqr_cycle_s"][0]
    peaks = {(r["framework"], r["seed"]): r["peak_rss_mb"] for r in ours_rows + trl_rows}
    seeds = sorted({s for _, s in peaks})
    memory_ok = all(peaks.get(("ours", s), 0) <= peaks.get(("trl", s), float("inf")) for s in seeds)
    valid = not reasons
    equal_work = valid and declared is None
    return {
        "valid": valid,
        "equal_work": equal_work,
        "declared_difference": declared,
        "invalid_reasons": reasons,
        "enough_processes": enough,
        "speedup": ratio,
        "cpu_time_ratio": trl["median_cpu_s"] / ours["median_cpu_s"] if ours["median_cpu_s"] else None,
        "memory_ratio": ours["peak_rss_mb"] / trl["peak_rss_mb"],
        "working_set_ratio": (
            ours["peak_minus_first_step_mb"] / trl["peak_minus_first_step_mb"]
            if trl["peak_minus_first_step_mb"] > 0
            else None
        ),
        "iqr_separated": separated,
        "memory_no_more_every_seed": memory_ok,
        "faster": bool(enough and valid and ratio >= SIGNIFICANT and separated),
        "slower": bool(
            enough
            and valid
            and ratio <= 1 / SIGNIFICANT
            and trl["pooled_iqr_cycle_s"][1] < ours["pooled_iqr_cycle_s"][0]
        ),
        "target_met": bool(enough and equal_work and ratio >= TARGET and separated),
    }


def label(cell: dict[str, Any]) -> str:
    """The verdict column."""
    if not cell["valid"]:
        return "invalid: different work"
    if not cell["enough_processes"]:
        return f"no verdict (< {MIN_PROCESSES} seeds)"
    prefix = "" if cell["equal_work"] else "algorithmic (not equal work): "
    if cell["target_met"]:
        text = f"target met (≥ {TARGET}×)"
    elif cell["faster"]:
        text = f"faster, below {TARGET}×" if cell["equal_work"] else "faster"
    elif cell["slower"]:
        text = "slower"
    else:
        text = "no clear difference"
    memory = "" if cell["memory_no_more_every_seed"] else ", more peak memory"
    return prefix + text + memory


def _iqr(cell: dict[str, Any]) -> str:
    q1, q3 = cell["pooled_iqr_cycle_s"]
    return f"{cell['median_cycle_s']:.3f} [{q1:.3f}–{q3:.3f}]"


def _mem(cell: dict[str, Any]) -> str:
    return f"{cell['peak_rss_mb']:.0f} ({cell['peak_minus_first_step_mb']:+.0f})"


def markdown(summary: dict[str, Any], *, title: str, notes: list[str] = ()) -> str:
    """The results table (one row per workload) plus warnings, failures and notes."""
    lines = [f"# {title}", "",
             "| workload | method | backbone | batch × tokens | thr | seeds | TRL s/step [IQR] | ours s/step [IQR] | "
             "TRL tok/s | ours tok/s | ours/TRL speed | CPU-s/step TRL / ours | TRL peak MB (Δ) | ours peak MB (Δ) | "
             "ours/TRL peak | ref pass s TRL / ours | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for cell in summary["cells"].values():
        w = cell["workload"]
        unit = "pairs" if w["method"] == "dpo" else "seqs"
        shape = f"{w['batch']} {unit} × {w['prompt_len'] + w['completion_len'] + 1}"
        method = w["method"] + (" (TRL live ref)" if _live(w, "trl") else "")
        trl, ours = cell.get("trl"), cell.get("ours")
        if trl is None or ours is None:
            lines.append(f"| {w['name']} | {method} | {w['backbone']} | {shape} | | | {_iqr(trl) if trl else 'missing'} | "
                         f"{_iqr(ours) if ours else 'missing'} | | | | | | | | | incomplete |")  # fmt: skip
            continue
        ref = (
            f"{trl['reference_pass_s']:.2f} / {ours['reference_pass_s']:.2f}" if w["method"] == "dpo" else "–"
        )
        lines.append(
            f"| {w['name']} | {method} | {w['backbone']} | {shape} | {ours['threads']} | {ours['processes']} | "
            f"{_iqr(trl)} | {_iqr(ours)} | {trl['tokens_per_s']:.0f} | {ours['tokens_per_s']:.0f} | "
            f"**{cell['speedup']:.2f}×** | {trl['median_cpu_s']:.2f} / {ours['median_cpu_s']:.2f} | {_mem(trl)} | "
            f"{_mem(ours)} | {cell['memory_ratio']:.2f} | {ref} | {label(cell)} |"
        )
    lines += ["", "s/step: median over seeds of each process's median timed cycle (end of one optimizer step to the "
              "next); [IQR]: all timed steps pooled. tok/s: tokens forwarded with grad per second (prompt + "
              "completion + EOS; DPO: chosen and rejected). Δ: peak RSS minus RSS just before the first step. "
              "ref pass: the one-off reference log-prob pass before training (DPO; not in s/step)."]  # fmt: skip
    for cell in summary["cells"].values():
        name = cell["workload"]["name"]
        busy = [fw for fw in ("trl", "ours") if (cell.get(fw) or {}).get("preempted_per_s", 0) > BUSY_PER_S]
        if busy:
            lines.append(f"- {name}: the machine was busy ({', '.join(busy)}: over {BUSY_PER_S} involuntary context "
                         "switches per second in timed steps); wall times are inflated, compare CPU-s/step")  # fmt: skip
        if cell.get("declared_difference"):
            lines.append(f"- {name}: {cell['declared_difference']}")
        lines += [f"- {name}: {reason}" for reason in cell.get("invalid_reasons", [])]
    lines += [
        f"- FAILED {f['framework']} {f['workload_key']} seed {f['seed']}: {f['error']}"
        for f in summary["failures"]
    ]
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"
