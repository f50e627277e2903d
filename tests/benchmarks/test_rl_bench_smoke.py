"""Smoke of the RL-vs-TRL benchmark's GRPO/RLOO sides on micro cells, in this process: our REINFORCE and
TRL 1.16's trainers do exactly the declared work (the PPO side and the script path: test_rl_bench_ppo.py).
The tiny checkpoint is built into a temporary cache (nothing under bench/ is written).
"""

from __future__ import annotations

import pytest

from bench.harness.rl_common import override, workload_prompts, workloads
from bench.harness.rl_stats import work_differences

MICRO = ["prompts=2", "group=2", "prompt_len=4", "completion_len=4", "warmup=1", "timed=1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from bench.harness.assets import model_dir

    folder = tmp_path_factory.mktemp("bench-cache")
    model_dir("tiny-128", cache=folder)
    return folder


@pytest.mark.parametrize("key", ["grpo-tiny", "rloo-tiny"])
def test_reinforce_and_trl_group_trainers_do_equal_work(cache, key) -> None:
    from bench.harness import rl_ours, rl_trl
    from bench.harness.rl_common import backbone_path

    workload = override(workloads(smoke=True)[key], MICRO)
    path = backbone_path(workload.backbone, cache)
    prompts = workload_prompts(workload, path, seed=0)
    ours = rl_ours.run(workload, 0, path, prompts, threads=1)
    trl = rl_trl.run(workload, 0, path, prompts, threads=1)
    for side in (ours, trl):
        side.update(ok=True, workload_key=key)
        assert side["steps_run"] == 2 and side["calls_outside_steps"] == 0
        assert all(r is not None for r in side["reward_per_step"])
    assert trl["implementation"] == ("GRPOTrainer" if key == "grpo-tiny" else "RLOOTrainer")
    assert work_differences([ours], [trl]) == []
    assert ours["work_per_step"][0]["policy.decode_rows"] == 4 * 3  # B rows × (Lc − 1) decode calls
