"""One online-RL benchmark process: one (framework, workload, seed) cell, appended as a JSON line to ``--out``.

    python -m bench.harness.rl_worker --framework trl --workload ppo-tiny --seed 0 --out /tmp/rows.jsonl

``--framework trl`` on a ``ppo`` workload runs trl 1.12's PPOTrainer: this process puts
``bench/.cache/trl-1.12.0`` first on ``sys.path`` before anything imports trl. Started by
:func:`bench.harness.runner.child_env`'s environment (threads, offline hub, no telemetry); RSS is
monotonic, so one cell per process.
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
    parser.add_argument("--workload", required=True, help="key of bench.harness.rl_common.CPU_WORKLOADS")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=None, help="where built checkpoints live")
    parser.add_argument("--out", type=Path, required=True, help="JSONL file to append the result to")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="FIELD=VALUE", help="override workload fields"
    )
    args = parser.parse_args(argv)

    start = time.perf_counter()
    from bench.harness.rl_common import backbone_path, override, workload_prompts, workloads

    workload = override(workloads(args.smoke)[args.workload], args.set)
    result: dict = {}
    try:
        if args.framework == "trl" and workload.algo == "ppo":
            from bench.harness import rl_trl_ppo

            rl_trl_ppo.use_trl_112()  # before torch/transformers import trl anywhere
            side = rl_trl_ppo
        elif args.framework == "trl":
            from bench.harness import rl_trl as side
        else:
            from bench.harness import rl_ours as side
        import torch

        torch.set_num_threads(args.threads)
        with contextlib.suppress(RuntimeError):  # already set: only when called inside a running process
            torch.set_num_interop_threads(1)
        import_s = time.perf_counter() - start
        path = backbone_path(workload.backbone, args.cache)
        prompts = workload_prompts(workload, path, args.seed)
        result = side.run(workload, args.seed, path, prompts, threads=args.threads)
        result["import_s"] = round(import_s, 3)
        result["ok"] = True
    except Exception as exc:  # recorded, so one broken cell does not lose the matrix
        traceback.print_exc()
        result = {"framework": args.framework, "workload": {"name": workload.name}, "seed": args.seed,
                  "ok": False, "error": f"{type(exc).__name__}: {exc}"}  # fmt: skip
    result["workload_key"] = args.workload
    result["process_s"] = round(time.perf_counter() - start, 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(result) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
