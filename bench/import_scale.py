"""Import a large valid JSONL file (default 45 MiB) through the service; report time and peak memory.

R-IMP-02: a 45 MB valid JSONL imports in <= 60 s on 2 cores with peak RSS growth <= 300 MB.
Run in a fresh process (peak RSS is per process):

    .venv/bin/python bench/import_scale.py --mib 45 --out bench/results/import_scale.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import tempfile
import time
from pathlib import Path


def write_file(path: Path, mib: float) -> int:
    rng = random.Random(0)
    words = [
        "the",
        "a",
        "review",
        "pizza",
        "service",
        "slow",
        "warm",
        "price",
        "fair",
        "sea",
        "calm",
        "moon",
        "explain",
        "why",
        "sky",
        "blue",
        "café",
        "東京",
    ]
    rows = 0
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < mib * 2**20:
            text = " ".join(rng.choice(words) for _ in range(40))
            f.write(
                json.dumps({"id": f"p{rows}", "prompt": text, "tags": ["bulk"]}, ensure_ascii=False) + "\n"
            )
            rows += 1
    return rows


def run(mib: float) -> dict:
    from storage.db import Database, sqlite_url, upgrade
    from studio.services import Services
    from studio.settings import Settings

    tmp = Path(tempfile.mkdtemp(prefix="studio-import-bench-"))
    path = tmp / "big.jsonl"
    rows = write_file(path, mib)
    db = Database.from_url(sqlite_url(tmp / "studio.db"))
    upgrade(db.engine)
    services = Services.build(Settings(data_dir=tmp, max_upload_mb=max(50, int(mib) + 1)), db)
    project = services.projects.create("bench").id
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    report = services.prompts.import_file(project, path)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "benchmark": "import_scale",
        "file_mib": round(path.stat().st_size / 2**20, 2),
        "rows": rows,
        "inserted": report.inserted,
        "committed": report.committed,
        "seconds": round(seconds, 2),
        "peak_rss_growth_mb": round(after - before, 1),
        "targets": {"seconds": 60, "peak_rss_growth_mb": 300},
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=float, default=45)
    parser.add_argument("--out")
    args = parser.parse_args()
    result = run(args.mib)
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
