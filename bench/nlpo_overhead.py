"""NLPO's action-masking overhead as a share of a PPO iteration (issue 5 target: < 10 %), with a breakdown.

Our ``nlpo`` recipe vs our ``ppo`` recipe at equal settings (the PPO workloads of bench/rl_vs_trl.py:
same prompts, lengths, epochs, separate critic); NLPO with RL4LMs' IMDB mask settings (top-p 0.9, μ 5,
≥ 100 tokens). Each (variant, workload, seed) in a fresh process, variants interleaved, 1 thread;
the breakdown times every piece of the masking (bench/harness/rl_nlpo.py).

    python -m bench.nlpo_overhead --smoke                # 1 seed, 1 + 2 iterations
    python -m bench.nlpo_overhead                        # ppo-tiny, 3 seeds
    python -m bench.nlpo_overhead --workloads ppo-smol   # the SmolLM2-135M shape
    python -m bench.nlpo_overhead --summarise-only

Writes bench/results/nlpo_overhead[_smoke].{jsonl,json,md}; a subset run replaces only its workloads' rows.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench.harness` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from bench.harness.assets import DEFAULT_CACHE, model_dir
from bench.harness.rl_common import workloads
from bench.harness.rl_nlpo import NLPO_FIELDS, VARIANTS, markdown, summarise
from bench.harness.rl_runner import previous_wall, read_rows, run_processes
from bench.harness.rm_common import REPO

RESULTS = REPO / "bench" / "results"


@dataclass(frozen=True)
class Cell:
    variant: str
    workload: str
    seed: int


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument(
        "--seeds", type=int, default=None, help="processes per cell (default 3; 1 with --smoke)"
    )
    parser.add_argument("--workloads", nargs="+", default=None, help="PPO workloads (default: ppo-tiny)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--summarise-only", action="store_true")
    args = parser.parse_args(argv)
    table = {k: w for k, w in workloads(args.smoke).items() if w.algo == "ppo"}
    keys = args.workloads or ["ppo-tiny"]
    unknown = sorted(set(keys) - set(table))
    if unknown:
        parser.error(f"unknown workloads {unknown}; known: {sorted(table)}")
    seeds = args.seeds or (1 if args.smoke else 3)
    stem = "nlpo_overhead" + ("_smoke" if args.smoke else "")
    rows_path = RESULTS / f"{stem}.jsonl"
    start = time.perf_counter()
    if not args.summarise_only:
        for key in keys:
            model_dir(table[key].backbone, seed=0, cache=args.cache)
        kept = [r for r in read_rows(rows_path) if r.get("workload_key") not in keys]
        rows_path.parent.mkdir(parents=True, exist_ok=True)
        rows_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        cells = [Cell(v, k, s) for s in range(seeds) for k in keys
                 for v in (VARIANTS if s % 2 == 0 else VARIANTS[::-1])]  # fmt: skip
        print(
            f"{len(cells)} processes: {', '.join(keys)} × {'/'.join(VARIANTS)} × {seeds} seed(s)", flush=True
        )
        run_processes(cells, rows_path, module="bench.harness.rl_nlpo",
                      args_for=lambda c: ["--variant", c.variant, "--workload", c.workload, "--seed", str(c.seed),
                                          "--cache", str(args.cache), *(["--smoke"] if args.smoke else [])],
                      label_for=lambda c: f"{c.workload}-{c.variant}-seed{c.seed}", threads=args.threads,
                      log_dir=args.cache / "logs" / stem, timeout_s=args.timeout,
                      log=lambda line: print(line, flush=True))  # fmt: skip
    rows = read_rows(rows_path)
    summary = summarise(rows)
    title = f"NLPO masking overhead vs PPO (ours, CPU, fp32, {args.threads} thread{', smoke' if args.smoke else ''})"
    report = {
        "benchmark": stem,
        "what": "NLPO iteration minus PPO iteration over the PPO iteration, equal settings, with a CPU-time breakdown",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_end": os.getloadavg(),
        },
        "threads": args.threads,
        "seeds": seeds,
        "nlpo": NLPO_FIELDS,
        "workloads": {
            k: asdict(table[k]) for k in sorted({r.get("workload_key") for r in rows} & set(table))
        },
        "wall_s_this_run": previous_wall(RESULTS / f"{stem}.json")
        if args.summarise_only
        else round(time.perf_counter() - start, 1),
        **summary,
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(summary, title=title))
    print(markdown(summary, title=title))
    return 0 if not summary["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
