"""One supervised-step benchmark process: one (framework, workload, seed) cell, appended as a JSON line.

    python -m bench.harness.sft_worker --framework trl --workload sft-tiny --seed 0 --out /tmp/rows.jsonl

Started by :func:`bench.harness.rl_runner.run_processes` with :func:`bench.harness.runner.child_env`'s
environment (threads, offline hub, no telemetry); RSS is monotonic, so one cell per process.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's reference precompute bar

import argparse
import contextlib
import json
import sys
import time
import traceback
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--framework", choices=["trl", "ours"], required=True)
    parser.add_argument("--workload", required=True, help="key of bench.harness.sft_common.CPU_WORKLOADS")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=None, help="where built checkpoints live")
    parser.add_argument("--out", type=Path, required=True, help="JSONL file to append the result to")
    parser.add_argument(
        "--profile", type=Path, default=None, help="profile up to 5 timed steps into this folder"
    )
    args = parser.parse_args(argv)

    start = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):  # already set: only when called inside a running process
        torch.set_num_interop_threads(1)
    from transformers import AutoTokenizer

    from bench.harness.sft_common import backbone_path, make_rows, workloads

    workload = workloads(args.smoke)[args.workload]
    if args.framework == "trl":
        from bench.harness import sft_trl as side
    else:
        from bench.harness import sft_ours as side
    import_s = time.perf_counter() - start
    try:
        path = backbone_path(workload.backbone, args.cache)
        rows = make_rows(AutoTokenizer.from_pretrained(path).get_vocab(), workload, args.seed)
        configure = None
        if args.profile is not None:
            from bench.harness import profiling

            last = min(workload.steps, workload.warmup + 5) - 1
            label = f"{args.workload}-{args.framework}-seed{args.seed}"

            def configure(probe):
                profiling.attach(probe, workload.warmup, last, args.profile, label)

        result = side.run(workload, args.seed, path, rows, threads=args.threads, configure=configure)
        result["profiled"] = args.profile is not None
        result["ok"] = True
    except Exception as exc:  # recorded, so one broken cell does not lose the matrix
        traceback.print_exc()
        result = {"framework": args.framework, "workload": {"name": workload.name}, "seed": args.seed,
                  "ok": False, "error": f"{type(exc).__name__}: {exc}"}  # fmt: skip
    result["workload_key"] = args.workload
    result["import_s"] = round(import_s, 3)
    result["process_s"] = round(time.perf_counter() - start, 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(result) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
