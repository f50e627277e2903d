"""Time from `python app.py` to the first HTTP 200 from the server (models already cached).

Each run starts the studio on a fresh data folder (so migrations run from empty) and on a free
port, polls GET /healthz (the readiness route; `/` now redirects to the login page) until it
answers 200, and stops the process. Writes JSON with every run and the median.

    .venv/bin/python bench/startup_time.py --runs 5 --out bench/results/startup_time.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(timeout: float = 120) -> float:
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "STUDIO_DATA_DIR": tmp,
            "STUDIO_PORT": str(port),
            "GRADIO_TEMP_DIR": f"{tmp}/gradio",
        }
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py")],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            while time.perf_counter() - start < timeout:
                if proc.poll() is not None:
                    raise RuntimeError("the studio exited before answering")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                        if r.status == 200:
                            return time.perf_counter() - start
                except OSError:
                    time.sleep(0.05)
            raise TimeoutError(f"no HTTP 200 within {timeout} s")
        finally:
            proc.terminate()
            proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench/results/startup_time.json"))
    args = parser.parse_args()
    times = []
    for i in range(args.runs):
        t = one_run()
        times.append(round(t, 3))
        print(f"run {i + 1}: {t:.2f} s to first HTTP 200")
    result = {
        "benchmark": "startup_time",
        "what": "process start of `python app.py` (fresh SQLite data folder, migrations from empty) to first HTTP 200 on /healthz",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "runs_s": times,
        "median_s": statistics.median(times),
        "target_s": 10.0,
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"median {result['median_s']:.2f} s (target <= 10 s) -> {args.out}")


if __name__ == "__main__":
    main()
