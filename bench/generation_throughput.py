"""Generation throughput of `studio.generation.generate` (HF generate, left-padded batches).

Every run generates exactly ``--new-tokens`` tokens per sequence (EOS is suppressed with
``min_new_tokens``), so tokens/s compares across batch sizes. Timings on shared CPUs are noisy:
each batch size is repeated and the median is reported.

    python bench/generation_throughput.py --model smollm2 --batch-sizes 1 8 --new-tokens 64 --repeats 3
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import transformers

from studio.generation import ModelCache, SamplingParams, generate

TOPICS = ["the sea", "a city at night", "autumn", "a good teacher", "bread", "trains", "the moon", "music"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", help="folder, default model name or hub id")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default="bench/results/generation_throughput.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cache = ModelCache(max_models=1)
    start = time.perf_counter()
    loaded = cache.get(args.model)
    load_s = time.perf_counter() - start
    print(f"loaded {loaded.path} in {load_s:.2f} s", flush=True)

    warmup = SamplingParams(temperature=args.temperature, max_new_tokens=8, batch_size=1)
    generate(loaded, ["Say hello."], warmup)

    results = []
    for batch_size in args.batch_sizes:
        prompts = [f"Write a short paragraph about {TOPICS[i % len(TOPICS)]}." for i in range(batch_size)]
        runs = []
        for repeat in range(args.repeats):
            params = SamplingParams(
                temperature=args.temperature,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                batch_size=batch_size,
                seed=repeat,
            )
            start = time.perf_counter()
            out = generate(loaded, prompts, params)
            seconds = time.perf_counter() - start
            tokens = sum(g.num_tokens for samples in out for g in samples)
            runs.append(
                {"seconds": round(seconds, 4), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 2)}
            )
            print(
                f"bs={batch_size} run {repeat}: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.1f} tok/s"
            )
        median = statistics.median(r["tokens_per_s"] for r in runs)
        results.append({"batch_size": batch_size, "runs": runs, "median_tokens_per_s": median})
        print(f"bs={batch_size}: median {median:.1f} tok/s", flush=True)

    report = {
        "benchmark": "generation_throughput",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": args.model,
        "model_path": str(loaded.path),
        "dtype": str(cache.dtype),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "temperature": args.temperature,
        "load_seconds": round(load_s, 3),
        "device": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(),
            "device": str(loaded.model.device),
        },
        "results": results,
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out_path}")
    return report


if __name__ == "__main__":
    main()
