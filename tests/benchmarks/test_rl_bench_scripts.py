"""Smoke of the ESRL-memory and NLPO-overhead benchmark paths on micro cells, in this process.

Each variant runs for real (our recipes, tiny random Llama built into a temporary cache); the checks the
scripts rely on hold (same samples and gradient for ESRL; only the mask model's extra work for NLPO), and
the scripts' ``--summarise-only`` writes their tables from those rows.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from bench.harness import rl_esrl, rl_nlpo


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from bench.harness.assets import model_dir

    folder = tmp_path_factory.mktemp("bench-cache")
    model_dir("tiny-128", cache=folder)
    return folder


def write_rows(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_esrl_two_stage_and_naive_take_the_same_step(cache, tmp_path, monkeypatch) -> None:
    import bench.esrl_memory as script
    from bench.harness.rl_common import backbone_path

    workload = replace(
        rl_esrl.WORKLOADS["tiny"], prompts=2, group=2, prompt_len=4, completion_len=6, warmup=1, timed=1
    )
    rows = []
    for variant in rl_esrl.VARIANTS:
        row = rl_esrl.run(variant, workload, 0, backbone_path(workload.backbone, cache), threads=1)
        rows.append({**row, "ok": True, "workload_key": "tiny"})
    summary = rl_esrl.summarise(rows)
    entry = summary["cells"]["tiny"]
    assert entry["valid"], entry["invalid_reasons"]
    assert rows[0]["sample_checksums"] == rows[1]["sample_checksums"]  # the same tokens in both steps
    monkeypatch.setattr(script, "RESULTS", tmp_path)
    write_rows(tmp_path / "esrl_memory.jsonl", rows)
    assert script.main(["--summarise-only", "--workloads", "tiny"]) == 0
    assert "| yes |" in (tmp_path / "esrl_memory.md").read_text()


def test_nlpo_overhead_runs_both_recipes_and_times_the_masking(cache, tmp_path, monkeypatch) -> None:
    import bench.nlpo_overhead as script

    micro = ["prompts=4", "completion_len=4", "epochs=1", "warmup=1", "timed=1"]
    rows = []
    for variant in rl_nlpo.VARIANTS:
        row = rl_nlpo.run(variant, "ppo-tiny", 0, smoke=True, threads=1, cache=cache, overrides=micro)
        rows.append({**row, "ok": True, "workload_key": "ppo-tiny"})
    nlpo = rows[1]
    assert nlpo["recipe_steps"] == 2 and nlpo["implementation"] == "trainers.recipes.nlpo"
    phases = nlpo["phase_cpu_s"][0]
    assert {"collect", "update", "mask_forward", "top_p_mask", "replay", "mask_stack"} <= set(phases)
    assert "mask_forward" not in rows[0]["phase_cpu_s"][0]
    entry = rl_nlpo.summarise(rows)["cells"]["ppo-tiny"]
    assert entry["work_differences"] == []
    assert set(entry["breakdown_cpu_s"]) and entry["ppo"]["processes"] == 1
    monkeypatch.setattr(script, "RESULTS", tmp_path)
    write_rows(tmp_path / "nlpo_overhead.jsonl", rows)
    assert script.main(["--summarise-only"]) == 0
    assert "Overhead:" in (tmp_path / "nlpo_overhead.md").read_text()
