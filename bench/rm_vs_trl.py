"""Reward-model training throughput: our recipe vs TRL 1.16's RewardTrainer, at equal work.

Matrix: backbones (tiny-128 random Llama, the real MiniLM encoder, the SmolLM2-135M shape) × (ours,
TRL) × seeds, each cell in a fresh process with 2 threads, frameworks interleaved. Target (issue 4):
ours ≥ 1.3× TRL's pairs/s at no more peak memory, on every backbone, on CPU.

    python -m bench.rm_vs_trl --smoke            # 1 seed, few steps: checks every path (~3 min)
    python -m bench.rm_vs_trl                    # full CPU matrix, 3 seeds (≤ 20 min on 2 quiet cores)
    python -m bench.rm_vs_trl --gpu              # GPU variant: bf16 autocast, synced timers, CUDA peak memory
    python -m bench.rm_vs_trl --summarise-only   # rebuild the JSON/Markdown from the saved JSONL rows

Writes bench/results/rm_vs_trl[_smoke|_gpu].jsonl (one row per process), .json (summary) and .md (table).
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
from bench.harness.rm_common import REPO, workloads
from bench.harness.runner import order, read_rows, run_cells
from bench.harness.stats import markdown, summarise

RESULTS = REPO / "bench" / "results"

NOTES = [
    "Equal work is checked, not assumed: rows through the backbone with and without grad, non-pad tokens, "
    "backward passes and optimizer steps per timed step, plus a checksum of every token id trained on.",
    "Both sides: fp32, sdpa attention, AdamW with constant lr, weight decay 0, betas (0.9, 0.999), eps 1e-8, "
    "grad-clip 1.0, no gradient checkpointing, dropout off, one micro-batch per step; Llama sides score L words + EOS. "
    "TRL uses adamw_torch_fused; ours uses trainers/optim.py's AdamW (each row records its fused/foreach flags).",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="1 seed, 1-2 warm-up + 2-5 timed steps")
    parser.add_argument("--gpu", action="store_true", help="GPU variant (cuda, bf16 autocast)")
    parser.add_argument(
        "--seeds", type=int, default=None, help="processes per cell (default 3; 1 with --smoke)"
    )
    parser.add_argument("--workloads", nargs="+", default=None, help="subset of the matrix keys")
    parser.add_argument("--frameworks", nargs="+", default=["trl", "ours"], choices=["trl", "ours"])
    parser.add_argument("--order", choices=["abab", "abba"], default="abab")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="built checkpoints (bench/.cache)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per process")
    parser.add_argument("--summarise-only", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing: one profiled process per cell (seed 0), op-time breakdown")  # fmt: skip
    args = parser.parse_args(argv)

    kind = "gpu" if args.gpu else "cpu"
    table = workloads(kind, args.smoke)
    keys = args.workloads or list(table)
    unknown = sorted(set(keys) - set(table))
    if unknown:
        parser.error(f"unknown workloads {unknown}; known: {sorted(table)}")
    seeds = args.seeds or (1 if args.smoke else 3)
    stem = "rm_vs_trl" + ("_gpu" if args.gpu else "") + ("_smoke" if args.smoke else "")
    rows_path = RESULTS / f"{stem}.jsonl"

    if args.profile:
        return profile(args, kind, table, keys, stem)

    start = time.perf_counter()
    if not args.summarise_only:
        for key in keys:  # build the random-init checkpoints here, never inside a timed process
            if table[key].backbone != "minilm":
                model_dir(table[key].backbone, seed=0, cache=args.cache)
        rows_path.unlink(missing_ok=True)
        cells = order(keys, range(seeds), tuple(args.frameworks), args.order)
        print(
            f"{len(cells)} processes: {', '.join(keys)} × {'/'.join(args.frameworks)} × {seeds} seed(s)",
            flush=True,
        )
        run_cells(cells, rows_path, kind=kind, smoke=args.smoke, threads=args.threads, cache=args.cache,
                  log_dir=args.cache / "logs" / stem, timeout_s=args.timeout,
                  log=lambda line: print(line, flush=True))  # fmt: skip
    rows = read_rows(rows_path)
    summary = summarise(rows)
    title = f"RM training, ours vs TRL RewardTrainer ({kind.upper()}{', smoke' if args.smoke else ''})"
    report = {
        "benchmark": stem,
        "what": "Bradley–Terry reward-model training steps/s at equal work, ours vs trl.RewardTrainer",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "threads": args.threads,
        "order": args.order,
        "seeds": seeds,
        "workloads": {k: table[k].__dict__ for k in keys},
        "wall_s": round(time.perf_counter() - start, 1) if not args.summarise_only else _previous_wall(stem),
        "notes": NOTES,
        **summary,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(summary, title=title, notes=NOTES))
    print(markdown(summary, title=title))
    return 0 if not summary["failures"] else 1


def _previous_wall(stem: str) -> float | None:
    """The wall time of the run that wrote the rows (kept when only the summary is rebuilt)."""
    try:
        return json.loads((RESULTS / f"{stem}.json").read_text()).get("wall_s")
    except (OSError, ValueError):
        return None


def profile(args: argparse.Namespace, kind: str, table: dict, keys: list[str], stem: str) -> int:
    """One profiled process per (workload, framework); writes ``<stem>_profile.json`` and prints a table."""
    for key in keys:
        if table[key].backbone != "minilm":
            model_dir(table[key].backbone, seed=0, cache=args.cache)
    folder = args.cache / "profiles" / stem
    rows_path = folder / "rows.jsonl"
    rows_path.unlink(missing_ok=True)
    cells = order(keys, range(1), tuple(args.frameworks), args.order)
    run_cells(cells, rows_path, kind=kind, smoke=args.smoke, threads=args.threads, cache=args.cache,
              log_dir=folder / "logs", timeout_s=args.timeout, log=lambda line: print(line, flush=True),
              extra_args=["--profile", str(folder)])  # fmt: skip
    reports = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*-seed0.json"))}
    (RESULTS / f"{stem}_profile.json").write_text(json.dumps(reports, indent=2) + "\n")
    for label, rep in reports.items():
        cats = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in rep["categories_per_step_s"].items())
        print(f"{label}: {rep['wall_per_step_s'] * 1e3:.0f} ms/step (outside ops {rep['outside_ops_per_step_s'] * 1e3:.0f}; "
              f"{rep['op_calls_per_step']:.0f} aten calls) — {cats}")  # fmt: skip
    print(f"op tables: {folder}/*.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
