"""Supervised-step throughput: our filtered-MLE (weighted-SFT) and DPO steps vs TRL 1.16's SFTTrainer and
DPOTrainer, at equal work, on CPU (issue 6: ≥ 1.3× TRL).

Matrix: workloads (SFT and DPO on tiny-128 and the SmolLM2-135M shape; DPO also against TRL's live
reference) × (ours, TRL) × seeds, each cell in a fresh process, frameworks interleaved (ABAB).

    python -m bench.sft_vs_trl --smoke --workloads sft-tiny           # path check (~1 min)
    python -m bench.sft_vs_trl --workloads sft-tiny dpo-tiny dpo-tiny-liveref --threads 1
    python -m bench.sft_vs_trl --workloads sft-smol dpo-smol          # the SmolLM2-shape rows (long)
    python -m bench.sft_vs_trl --summarise-only                       # rebuild .json/.md from the .jsonl

A run replaces the rows of the workloads it runs and keeps the others, so the tiny and the smol rows can
be measured at different times into one table. Writes bench/results/sft_vs_trl[_smoke].{jsonl,json,md}.
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

from bench.harness.assets import DEFAULT_CACHE
from bench.harness.rl_runner import read_rows, run_processes
from bench.harness.rm_common import REPO
from bench.harness.runner import Cell, order
from bench.harness.sft_common import backbone_path, workloads
from bench.harness.sft_stats import markdown, summarise

RESULTS = REPO / "bench" / "results"

NOTES = [
    "Equal work is checked, not assumed: per timed step the rows and tokens through the trunk with and without "
    "grad, padded slots, the tokens handed to the loss, backward passes and optimizer steps must equal what the "
    "workload implies, and per seed the checksums of every token forwarded with grad, every token in the loss and "
    "every reference-pass token must match between the sides.",
    "Both sides: fp32 CPU, sdpa, one micro-batch per step, AdamW fused (lr constant, no warm-up, weight decay 0, "
    "betas (0.9, 0.999), eps 1e-8), grad-clip 1.0, no gradient checkpointing, dropout off, no packing, no "
    "padding-free, logging every 10 steps. SFT: loss = mean NLL over completion tokens (+EOS); DPO: sigmoid, "
    "β 0.1, reference log-probs computed once before training on both sides (TRL precompute_ref_log_probs=True, "
    "in batches of one step).",
    "Not the same implementation (by design, same numbers): TRL on CPU (no Triton) runs its fused LM head over "
    "every position and masks the prompt afterwards, and also computes per-token entropy and top-1 accuracy "
    "(and for DPO the mean logit) for its logs; ours runs the LM head only at the scored (completion) positions "
    "and computes only the log-probs.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="1 seed, 1 warm-up + 1-2 timed steps, small batches"
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="processes per cell (default 3; 1 with --smoke)"
    )
    parser.add_argument(
        "--workloads", nargs="+", default=None, help="subset of the matrix keys (default: all)"
    )
    parser.add_argument("--frameworks", nargs="+", default=["trl", "ours"], choices=["trl", "ours"])
    parser.add_argument("--order", choices=["abab", "abba"], default="abab")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads per process (protocol: 2)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="built checkpoints (bench/.cache)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the .jsonl/.json/.md go")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per process")
    parser.add_argument("--summarise-only", action="store_true")
    args = parser.parse_args(argv)

    table = workloads(args.smoke)
    keys = args.workloads or list(table)
    unknown = sorted(set(keys) - set(table))
    if unknown:
        parser.error(f"unknown workloads {unknown}; known: {sorted(table)}")
    seeds = args.seeds or (1 if args.smoke else 3)
    stem = "sft_vs_trl" + ("_smoke" if args.smoke else "")
    rows_path = args.results / f"{stem}.jsonl"

    start = time.perf_counter()
    if not args.summarise_only:
        for key in keys:  # build the random-init checkpoints here, never inside a timed process
            backbone_path(table[key].backbone, args.cache)
        keep = [r for r in read_rows(rows_path) if r.get("workload_key") not in keys]
        args.results.mkdir(parents=True, exist_ok=True)
        rows_path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        cells = order(keys, range(seeds), tuple(args.frameworks), args.order)
        print(
            f"{len(cells)} processes: {', '.join(keys)} × {'/'.join(args.frameworks)} × {seeds} seed(s)",
            flush=True,
        )
        extra = ["--smoke"] if args.smoke else []
        run_processes(cells, rows_path, module="bench.harness.sft_worker",
                      args_for=lambda c: _cell_args(c, args.cache, extra), label_for=_label, threads=args.threads,
                      log_dir=args.cache / "logs" / stem, timeout_s=args.timeout,
                      log=lambda line: print(line, flush=True))  # fmt: skip
    rows = read_rows(rows_path)
    summary = summarise(rows)
    title = f"Supervised steps, ours vs TRL SFTTrainer / DPOTrainer (CPU{', smoke' if args.smoke else ''})"
    report = {
        "benchmark": stem,
        "what": "SFT (filtered MLE, weights 1) and DPO optimizer steps at equal work, ours vs trl 1.16",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "order": args.order,
        "workloads": {
            k: table[k].__dict__ for k in sorted({r.get("workload_key") for r in rows} & set(table))
        },
        "wall_s": None if args.summarise_only else round(time.perf_counter() - start, 1),
        "notes": NOTES,
        **summary,
    }
    (args.results / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.results / f"{stem}.md").write_text(markdown(summary, title=title, notes=NOTES))
    print(markdown(summary, title=title))
    return 0 if not summary["failures"] else 1


def _cell_args(cell: Cell, cache: Path, extra: list[str]) -> list[str]:
    return ["--framework", cell.framework, "--workload", cell.workload, "--seed", str(cell.seed),
            "--cache", str(cache), *extra]  # fmt: skip


def _label(cell: Cell) -> str:
    return f"{cell.workload}-{cell.framework}-seed{cell.seed}"


if __name__ == "__main__":
    sys.exit(main())
