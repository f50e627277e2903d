"""R-IMP-02: a 45 MiB valid JSONL file imports with bounded memory (in a fresh process, since
peak RSS is per process). The time is reported, not asserted tightly: CPU timings here are noisy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "import_scale.py"


def test_45_mib_import_has_bounded_memory():
    out = subprocess.run(
        [sys.executable, str(BENCH), "--mib", "45"], check=True, capture_output=True, text=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["committed"] and result["inserted"] == result["rows"] > 150_000
    assert result["peak_rss_growth_mb"] <= 300, result
    assert result["seconds"] <= 180, result  # target 60 s; 3x headroom for a noisy CI machine
