"""Fresh-process runner for the RL benchmarks: one interpreter per cell, rows appended to one JSONL file.

Like :func:`bench.harness.runner.run_cells` (same child environment, same ABAB order from
:func:`bench.harness.runner.order`), but the worker module and its per-cell arguments are parameters,
so ``rl_vs_trl``, ``esrl_memory`` and ``nlpo_overhead`` share it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.harness.rm_common import REPO
from bench.harness.runner import child_env


def run_processes(
    cells: Sequence[Any],
    out: Path,
    *,
    module: str,
    args_for: Callable[[Any], list[str]],
    label_for: Callable[[Any], str],
    threads: int,
    log_dir: Path,
    timeout_s: float = 900,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run ``python -m module --out OUT <args_for(cell)>`` per cell; return the rows the children appended.

    A child that times out gets a failure row (``ok: false``) with ``label_for(cell)``'s fields missing, so
    the summary shows it instead of silently dropping the cell.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    before = len(read_rows(out))
    env = child_env(threads)
    for i, cell in enumerate(cells, start=1):
        cmd = [sys.executable, "-m", module, "--out", str(out), "--threads", str(threads), *args_for(cell)]
        label = label_for(cell)
        logfile = log_dir / f"{label}.log"
        start = time.perf_counter()
        with logfile.open("w") as handle:
            try:
                code: int | str = subprocess.run(cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                                 timeout=timeout_s).returncode  # fmt: skip
            except subprocess.TimeoutExpired:
                code = "timeout"
                _append(out, {"label": label, "ok": False, "error": f"timed out after {timeout_s:.0f} s",
                              **_cell_fields(cell)})  # fmt: skip
        log(
            f"[{i}/{len(cells)}] {label}: exit {code} in {time.perf_counter() - start:.1f} s (log: {logfile})"
        )
    return read_rows(out)[before:]


def _cell_fields(cell: Any) -> dict[str, Any]:
    fields = getattr(cell, "__dict__", None) or {}
    return {
        "framework": fields.get("framework"),
        "workload_key": fields.get("workload"),
        "seed": fields.get("seed"),
    }


def previous_wall(summary: Path) -> float | None:
    """The ``wall_s_this_run`` of an existing summary (kept when only the tables are rebuilt)."""
    try:
        return json.loads(summary.read_text()).get("wall_s_this_run")
    except (OSError, ValueError):
        return None


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _append(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
