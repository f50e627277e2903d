"""The supervised-step benchmark's script path end to end (`python -m bench.sft_vs_trl --smoke`): two fresh
worker processes (TRL, ours) on the smoke SFT cell, rows, summary and table. The tiny checkpoint is built
into a temporary cache and the results go to a temporary folder (nothing under bench/ is written).
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("trl")


@pytest.fixture
def cache(tmp_path_factory):
    from bench.harness.assets import model_dir

    folder = tmp_path_factory.mktemp("bench-cache")
    model_dir("tiny-128", cache=folder)
    return folder


def test_script_path_writes_a_valid_table(cache, tmp_path) -> None:
    from bench import sft_vs_trl

    code = sft_vs_trl.main(["--smoke", "--workloads", "sft-tiny", "--threads", "1", "--cache", str(cache),
                            "--results", str(tmp_path)])  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "sft_vs_trl_smoke.jsonl").read_text().splitlines()]
    assert sorted(r["framework"] for r in rows) == ["ours", "trl"] and all(r["ok"] for r in rows)
    report = json.loads((tmp_path / "sft_vs_trl_smoke.json").read_text())
    cell = report["cells"]["sft-tiny"]
    assert cell["valid"] and cell["invalid_reasons"] == [] and cell["speedup"] > 0
    assert "| C-sft-t | sft | tiny-128 | 8 seqs × 96 |" in (tmp_path / "sft_vs_trl_smoke.md").read_text()
