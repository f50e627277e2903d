"""Smoke of ``bench/rl_vs_trl.py``'s script path on a micro PPO cell: runner → worker subprocesses (ours, and
trl 1.12's PPOTrainer with trl 1.12 on ``sys.path`` in that process only) → summary files, at equal work.
The tiny checkpoint is built into a temporary cache and the results go to a temporary folder.
"""

from __future__ import annotations

import json

import pytest

from bench.harness.rl_common import TRL_PPO_DIR


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from bench.harness.assets import model_dir

    folder = tmp_path_factory.mktemp("bench-cache")
    model_dir("tiny-128", cache=folder)
    return folder


@pytest.mark.skipif(
    not (TRL_PPO_DIR / "trl").is_dir(), reason="trl 1.12 not installed in bench/.cache (bench/README.md)"
)
def test_rl_vs_trl_script_runs_ppo_against_trl_112_at_equal_work(cache, tmp_path, monkeypatch) -> None:
    import bench.rl_vs_trl as script

    monkeypatch.setattr(script, "RESULTS", tmp_path)
    code = script.main(["--smoke", "--workloads", "ppo-tiny", "--cache", str(cache), "--timeout", "300",
                        "--set", "prompts=4", "completion_len=4", "epochs=2", "warmup=1", "timed=1"])  # fmt: skip
    summary = json.loads((tmp_path / "rl_vs_trl_smoke_custom.json").read_text())
    assert code == 0, summary["failures"]
    cell = summary["cells"]["ppo-tiny"]
    assert cell["valid"], cell["invalid_reasons"]
    assert cell["trl"]["framework_version"] == "1.12.0"
    assert cell["trl"]["implementation"] == "experimental.ppo.PPOTrainer"
    assert cell["ours"]["implementation"] == "trainers.recipes.ppo"
    assert "C-ppo-t" in (tmp_path / "rl_vs_trl_smoke_custom.md").read_text()
    rows = [json.loads(line) for line in (tmp_path / "rl_vs_trl_smoke_custom.jsonl").read_text().splitlines()]
    step = rows[0]["work_per_step"][0]
    assert step["value.grad_full_rows"] == 2 * 4 and step["policy.updates"] == step["value.updates"] == 2
