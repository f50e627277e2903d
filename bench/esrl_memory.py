"""ESRL two-stage sampling vs naive sampling-with-grad: peak memory and time of one REINFORCE step.

Same samples (same per-row Gumbel noise), same loss, same gradient (checked); two-stage samples under
``no_grad`` with the KV cache and scores the responses in one chunked teacher-forced pass with grad,
naive keeps the autograd graph through the decoding loop (bench/harness/rl_esrl.py). Each (variant,
workload, seed) in a fresh process (RSS is monotonic), variants interleaved, 1 thread.

    python -m bench.esrl_memory --smoke                         # 1 seed, 1 + 1 steps, tiny rows
    python -m bench.esrl_memory --workloads tiny tiny-long      # the tiny rows, 3 seeds
    python -m bench.esrl_memory --workloads smol smol-long      # the SmolLM2-135M-shape rows
    python -m bench.esrl_memory --summarise-only

Writes bench/results/esrl_memory[_smoke].{jsonl,json,md}; a subset run replaces only its workloads' rows.
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
from bench.harness.rl_esrl import VARIANTS, markdown, summarise, workloads
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
    parser.add_argument("--workloads", nargs="+", default=None, help="default: tiny tiny-long")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--summarise-only", action="store_true")
    args = parser.parse_args(argv)
    table = workloads(args.smoke)
    keys = args.workloads or ["tiny", "tiny-long"]
    unknown = sorted(set(keys) - set(table))
    if unknown:
        parser.error(f"unknown workloads {unknown}; known: {sorted(table)}")
    seeds = args.seeds or (1 if args.smoke else 3)
    stem = "esrl_memory" + ("_smoke" if args.smoke else "")
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
        run_processes(cells, rows_path, module="bench.harness.rl_esrl",
                      args_for=lambda c: ["--variant", c.variant, "--workload", c.workload, "--seed", str(c.seed),
                                          "--cache", str(args.cache), *(["--smoke"] if args.smoke else [])],
                      label_for=lambda c: f"{c.workload}-{c.variant}-seed{c.seed}", threads=args.threads,
                      log_dir=args.cache / "logs" / stem, timeout_s=args.timeout,
                      log=lambda line: print(line, flush=True))  # fmt: skip
    rows = read_rows(rows_path)
    summary = summarise(rows)
    title = f"ESRL two-stage vs naive sampling-with-grad (CPU, fp32, {args.threads} thread{', smoke' if args.smoke else ''})"
    report = {
        "benchmark": stem,
        "what": "one REINFORCE step: stage-1 no-grad KV-cached sampling + one teacher-forced pass with grad, vs "
        "sampling with the graph kept through decoding; same samples and gradient",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_end": os.getloadavg(),
        },
        "threads": args.threads,
        "seeds": seeds,
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
