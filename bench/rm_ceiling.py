"""How much faster than TRL can any RM trainer be on this CPU at equal work? A GEMM-time ceiling.

For each CPU workload of ``bench.rm_vs_trl``:

1. count the matmul FLOPs of one training step for TRL (full forward) and ours (last layer only at
   the scored position, trainers/fast_score.py), from the backbone's config (bench/harness/flops.py);
2. time exactly our step's GEMMs in isolation (forward, dX and dW of every linear, 2 threads, fp32,
   median of repeats) — a lower bound on our step time, since attention, norms, activations, the
   embedding and the optimizer are left out;
3. read TRL's measured median step time from bench/results/rm_vs_trl.json and report
   ``ceiling = TRL step / our GEMM-only time``: no implementation that does our matmul work can beat
   TRL by more than that on this machine, in fp32 (what the protocol fixes for CPU).

    python -m bench.rm_ceiling          # writes bench/results/rm_ceiling.json and .md (~1 min)
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json
import os
import statistics
import time
from datetime import UTC, datetime

from bench.harness.flops import Shape, linear_shapes, step_flops
from bench.harness.rm_common import CPU_WORKLOADS, REPO, backbone_path, is_encoder

RESULTS = REPO / "bench" / "results"


def gemm_seconds(shapes: list[tuple[int, int, int]], repeats: int = 7) -> float:
    """Median wall time of forward + dX + dW GEMMs for every (rows, in, out), fp32, current threads."""
    import torch

    gen = torch.Generator().manual_seed(0)
    mats = [
        (torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen), torch.randn(m, n, generator=gen))
        for m, k, n in shapes
    ]

    def once() -> float:
        start = time.perf_counter()
        for x, w, g in mats:
            torch.mm(x, w)  # forward
            torch.mm(g, w.t())  # dX
            torch.mm(x.t(), g)  # dW
        return time.perf_counter() - start

    once()  # warm-up: MKL's first-call setup
    return statistics.median(once() for _ in range(repeats))


def main() -> int:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    measured = json.loads((RESULTS / "rm_vs_trl.json").read_text())
    rows_out = []
    for key, workload in CPU_WORKLOADS.items():
        path = backbone_path(workload.backbone)
        shape = Shape.from_config(json.loads((path / "config.json").read_text()))
        rows = 2 * workload.pairs_per_step
        seq = workload.length + (2 if is_encoder(path) else 1)  # CLS/SEP or EOS
        flops_trl = step_flops(shape, rows, seq, last_layer_only=False)
        flops_ours = step_flops(shape, rows, seq, last_layer_only=True)
        gemm_s = gemm_seconds(linear_shapes(shape, rows, seq, last_layer_only=True))
        cell = measured["cells"][key]
        trl_s, ours_s = cell["trl"]["median_cycle_s"], cell["ours"]["median_cycle_s"]
        linear_ours = sum(2 * m * k * n for m, k, n in linear_shapes(shape, rows, seq, last_layer_only=True))
        rows_out.append(
            {
                "workload": workload.name,
                "backbone": workload.backbone,
                "rows_x_seq": [rows, seq],
                "gflop_per_step_trl": round(flops_trl / 1e9, 2),
                "gflop_per_step_ours": round(flops_ours / 1e9, 2),
                "flop_saving": round(1 - flops_ours / flops_trl, 4),
                "gemm_only_s_ours": round(gemm_s, 4),
                "gemm_gflops": round(3 * linear_ours / gemm_s / 1e9, 1),
                "measured_trl_s": round(trl_s, 4),
                "measured_ours_s": round(ours_s, 4),
                "achieved_gflops_trl": round(flops_trl / trl_s / 1e9, 1),
                "achieved_gflops_ours": round(flops_ours / ours_s / 1e9, 1),
                "measured_speedup": round(trl_s / ours_s, 3),
                "ceiling_speedup": round(trl_s / gemm_s, 3),
            }
        )
        print(json.dumps(rows_out[-1]), flush=True)
    result = {
        "benchmark": "rm_ceiling",
        "what": "upper bound on RM training speedup over TRL at equal fp32 work: TRL's measured step time "
        "over the time of our step's GEMMs alone",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "threads": torch.get_num_threads(),
        "source_of_measured": "bench/results/rm_vs_trl.json (" + measured["date"] + ")",
        "rows": rows_out,
    }
    (RESULTS / "rm_ceiling.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "rm_ceiling.md").write_text(markdown(result))
    return 0


def markdown(result: dict) -> str:
    lines = [
        "# RM training on CPU: the GEMM-time ceiling on any speedup over TRL (fp32, equal work)",
        "",
        "| workload | backbone | rows × seq | GFLOP/step TRL / ours | our FLOP saving | our GEMMs alone (s) "
        "| GEMM GFLOP/s | TRL step (s) | ours step (s) | achieved GFLOP/s TRL / ours | measured | ceiling |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['workload']} | {r['backbone']} | {r['rows_x_seq'][0]} × {r['rows_x_seq'][1]} "
            f"| {r['gflop_per_step_trl']} / {r['gflop_per_step_ours']} | {100 * r['flop_saving']:.1f} % "
            f"| {r['gemm_only_s_ours']} | {r['gemm_gflops']} | {r['measured_trl_s']} | {r['measured_ours_s']} "
            f"| {r['achieved_gflops_trl']} / {r['achieved_gflops_ours']} | {r['measured_speedup']}× "
            f"| **{r['ceiling_speedup']}×** |"
        )
    lines += [
        "",
        "ceiling = TRL's measured step time ÷ the time of our step's GEMMs alone (forward, dX and dW of every "
        "linear, timed in isolation, median of 7). It leaves out attention, norms, activations, the embedding and "
        "the optimizer, so it is an upper bound: no trainer doing our matmul work in fp32 on this machine can be "
        "faster than TRL by more than this. Measured step times: " + result["source_of_measured"] + ".",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
