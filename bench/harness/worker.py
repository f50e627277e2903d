"""One benchmark process: one (framework, workload, seed) cell, appended as a JSON line to ``--out``.

    python -m bench.harness.worker --framework trl --workload tiny --seed 0 --out /tmp/rows.jsonl

The runner starts this in a fresh interpreter with the thread/offline environment already set; the
defaults below only matter when it is started by hand. RSS is monotonic, so one cell per process.
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
    parser.add_argument(
        "--workload", required=True, help="key of the workload table (tiny, minilm, smol, ...)"
    )
    parser.add_argument("--kind", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=None, help="where built checkpoints live")
    parser.add_argument("--out", type=Path, required=True, help="JSONL file to append the result to")
    parser.add_argument("--profile", type=Path, default=None, help="profile the timed steps into this folder")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):  # already set: only when called inside a running process
        torch.set_num_interop_threads(1)
    from bench.harness.rm_common import backbone_path, workload_pairs, workloads

    workload = workloads(args.kind, args.smoke)[args.workload]
    device = "cuda" if args.kind == "gpu" else "cpu"
    precision = "bf16" if args.kind == "gpu" else "fp32"
    if args.framework == "trl":
        from bench.harness import rm_trl as side
    else:
        from bench.harness import rm_ours as side
    import_s = time.perf_counter() - start

    path = backbone_path(workload.backbone, args.cache)
    pairs = workload_pairs(workload, path, args.seed)
    configure = None
    if args.profile is not None:
        from bench.harness import profiling

        label = f"{args.workload}-{args.framework}-seed{args.seed}"

        def configure(probe):
            profiling.attach(
                probe, workload.warmup, workload.steps - 1, args.profile, label, cuda=device == "cuda"
            )

    try:
        result = side.run(workload, args.seed, path, pairs, device=device, precision=precision,
                          threads=args.threads, configure=configure)  # fmt: skip
        result["profiled"] = args.profile is not None
        result["ok"] = True
    except Exception as exc:  # recorded, so one broken cell does not lose the matrix
        traceback.print_exc()
        result = {"framework": args.framework, "workload": {"name": workload.name}, "seed": args.seed,
                  "ok": False, "error": f"{type(exc).__name__}: {exc}"}  # fmt: skip
    result["workload_key"] = args.workload
    result["backbone_path"] = str(path)
    result["import_s"] = round(import_s, 3)
    result["process_s"] = round(time.perf_counter() - start, 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(result) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
