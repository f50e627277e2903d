"""Online RL at equal work: our REINFORCE vs TRL 1.16's GRPO and RLOO, our PPO vs trl 1.12's PPOTrainer.

Per-iteration time and peak memory on CPU (fp32), each (framework, workload, seed) in a fresh process,
frameworks interleaved (ABAB), work checked with counters (bench/harness/rl_stats.py). Target (issue 5):
ours ≥ 1.5× faster at ≤ 0.8× peak memory.

    python -m bench.rl_vs_trl --smoke                       # 1 seed, 1 warm-up + 1–2 timed iterations, every path
    python -m bench.rl_vs_trl --workloads grpo-tiny rloo-tiny ppo-tiny   # the tiny rows, 3 seeds
    python -m bench.rl_vs_trl --workloads grpo-smol rloo-smol ppo-smol   # the SmolLM2-135M-shape rows
    python -m bench.rl_vs_trl --summarise-only              # rebuild .json/.md from the saved .jsonl

TRL's PPO needs trl 1.12 in bench/.cache/trl-1.12.0 (``.venv/bin/pip install --no-deps --target
bench/.cache/trl-1.12.0 trl==1.12.0``); only the TRL-PPO worker process imports it.
Writes bench/results/rl_vs_trl[_smoke].{jsonl,json,md}; a run over a subset of workloads replaces those
workloads' rows and keeps the others', so tiny and smol rows can be measured at different times.
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
from datetime import UTC, datetime

from bench.harness.assets import DEFAULT_CACHE, model_dir
from bench.harness.rl_common import override, workloads
from bench.harness.rl_runner import previous_wall, read_rows, run_processes
from bench.harness.rl_stats import markdown, summarise
from bench.harness.rm_common import REPO
from bench.harness.runner import order

RESULTS = REPO / "bench" / "results"

NOTES = [
    "Equal work is checked per iteration: generated tokens, prefill/decode/teacher-forced rows and tokens with and "
    "without grad per trunk (policy, reference, value), backward passes, parameter updates, and a checksum of every "
    "prompt token; the only accepted difference is the declared one (RLOO's extra no-grad policy pass).",
    "Both sides: fp32 CPU, sdpa, temperature 1, no top-k/top-p, exactly Lc tokens per completion (pad and EOS "
    "suppressed), the same reward function (mean lexicon valence), fixed β, AdamW (fused) with constant lr 1e-5, "
    "weight decay 0, one optimizer step per GRPO/RLOO iteration, E per PPO iteration; dropout off; no gradient "
    "checkpointing; 1 thread per process.",
    "ours vs GRPO: REINFORCE with the group-mean baseline scaled by the group std and a token-mean loss; KL k1 in the "
    "reward (GRPO: k3 in the loss). ours vs RLOO: leave-one-out baseline, sequence-sum loss, k1 KL summed in the "
    "reward (as RLOO). ours vs PPO: separate critic, GAE(1, 0.95), whitened advantages, clipped value loss, vf 0.1.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="1 seed, 1 warm-up + 1-2 timed iterations")
    parser.add_argument(
        "--seeds", type=int, default=None, help="processes per cell (default 3; 1 with --smoke)"
    )
    parser.add_argument("--workloads", nargs="+", default=None, help="subset of the matrix keys")
    parser.add_argument("--frameworks", nargs="+", default=["trl", "ours"], choices=["trl", "ours"])
    parser.add_argument("--order", choices=["abab", "abba"], default="abab")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="built checkpoints (bench/.cache)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per process")
    parser.add_argument("--summarise-only", action="store_true")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="override fields of every workload (shrinks cells for quick checks; not for results)")  # fmt: skip
    args = parser.parse_args(argv)

    table = {k: override(w, args.set) for k, w in workloads(args.smoke).items()}
    keys = args.workloads or list(table)
    unknown = sorted(set(keys) - set(table))
    if unknown:
        parser.error(f"unknown workloads {unknown}; known: {sorted(table)}")
    seeds = args.seeds or (1 if args.smoke else 3)
    stem = "rl_vs_trl" + ("_smoke" if args.smoke else "") + ("_custom" if args.set else "")
    rows_path = RESULTS / f"{stem}.jsonl"
    start = time.perf_counter()
    if not args.summarise_only:
        for key in keys:  # build the random-init checkpoints here, never inside a timed process
            model_dir(table[key].backbone, seed=0, cache=args.cache)
        kept = [r for r in read_rows(rows_path) if r.get("workload_key") not in keys]
        rows_path.parent.mkdir(parents=True, exist_ok=True)
        rows_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        cells = order(keys, range(seeds), tuple(args.frameworks), args.order)
        print(
            f"{len(cells)} processes: {', '.join(keys)} × {'/'.join(args.frameworks)} × {seeds} seed(s)",
            flush=True,
        )

        def args_for(cell):
            extra = (["--smoke"] if args.smoke else []) + (["--set", *args.set] if args.set else [])
            return ["--framework", cell.framework, "--workload", cell.workload, "--seed", str(cell.seed),
                    "--cache", str(args.cache), *extra]  # fmt: skip

        run_processes(cells, rows_path, module="bench.harness.rl_worker", args_for=args_for,
                      label_for=lambda c: f"{c.workload}-{c.framework}-seed{c.seed}", threads=args.threads,
                      log_dir=args.cache / "logs" / stem, timeout_s=args.timeout,
                      log=lambda line: print(line, flush=True))  # fmt: skip
    rows = read_rows(rows_path)
    summary = summarise(rows)
    title = f"Online RL per iteration, ours vs TRL (CPU, fp32{', smoke' if args.smoke else ''})"
    report = {
        "benchmark": stem,
        "what": "per-iteration time and peak RSS at equal work: REINFORCE vs TRL GRPO/RLOO (1.16), PPO vs TRL PPO (1.12)",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_end": os.getloadavg(),
        },
        "threads": args.threads,
        "order": args.order,
        "seeds": seeds,
        "workloads": {
            k: table[k].__dict__ for k in sorted({r.get("workload_key") for r in rows} & set(table))
        },
        "wall_s_this_run": previous_wall(RESULTS / f"{stem}.json")
        if args.summarise_only
        else round(time.perf_counter() - start, 1),
        "notes": NOTES,
        **summary,
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(summary, title=title, notes=NOTES))
    print(markdown(summary, title=title))
    return 0 if not summary["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
