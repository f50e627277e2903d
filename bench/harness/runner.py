"""Process isolation and ordering: one fresh interpreter per (framework, workload, seed) cell.

Order: for each seed, for each workload, the frameworks back to back (ABAB…); ``abba`` swaps the pair
order every other seed, which also cancels a linear drift. Every child gets the same environment
(2 intra-op threads, offline hub, no telemetry, no tokenizer threads) and appends one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness.rm_common import REPO


@dataclass(frozen=True)
class Cell:
    """One process to run."""

    framework: str
    workload: str
    seed: int


def child_env(threads: int) -> dict[str, str]:
    """The environment of every benchmark child (research note §4.1.5)."""
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "OPENBLAS_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "TRL_EXPERIMENTAL_SILENCE": "1",
            "WANDB_DISABLED": "true",
            "TRANSFORMERS_VERBOSITY": "error",
            "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        }
    )
    return env


def order(
    workloads: Iterable[str], seeds: Iterable[int], frameworks: tuple[str, ...], scheme: str = "abab"
) -> list[Cell]:
    """Cells in run order: seed-major, workloads inside, frameworks interleaved."""
    cells = []
    for n, seed in enumerate(seeds):
        pair = frameworks[::-1] if scheme == "abba" and n % 2 else frameworks
        for workload in workloads:
            cells += [Cell(fw, workload, seed) for fw in pair]
    return cells


def run_cells(cells: list[Cell], out: Path, *, kind: str, smoke: bool, threads: int, cache: Path | None,
              log_dir: Path, timeout_s: float = 900, log: Callable[[str], None] = print,
              extra_args: list[str] = ()) -> list[dict[str, Any]]:  # fmt: skip
    """Run each cell in a child process; return the rows the children appended to ``out``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    before = _count_lines(out)
    env = child_env(threads)
    for i, cell in enumerate(cells, start=1):
        cmd = [sys.executable, "-m", "bench.harness.worker", "--framework", cell.framework, "--workload",
               cell.workload, "--kind", kind, "--seed", str(cell.seed), "--threads", str(threads), "--out", str(out)]  # fmt: skip
        cmd += list(extra_args)
        if smoke:
            cmd.append("--smoke")
        if cache is not None:
            cmd += ["--cache", str(cache)]
        logfile = log_dir / f"{cell.workload}-{cell.framework}-seed{cell.seed}.log"
        start = time.perf_counter()
        with logfile.open("w") as handle:
            try:
                code = subprocess.run(cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                      timeout=timeout_s).returncode  # fmt: skip
            except subprocess.TimeoutExpired:
                code = "timeout"
                _append(out, {"framework": cell.framework, "workload_key": cell.workload, "seed": cell.seed,
                              "ok": False, "error": f"timed out after {timeout_s:.0f} s"})  # fmt: skip
        log(f"[{i}/{len(cells)}] {cell.framework:4s} {cell.workload:8s} seed {cell.seed}: exit {code} "
            f"in {time.perf_counter() - start:.1f} s (log: {logfile})")  # fmt: skip
    return read_rows(out)[before:]


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _count_lines(path: Path) -> int:
    return len(read_rows(path))


def _append(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
