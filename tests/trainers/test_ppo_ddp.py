"""PPO under DDP on CPU (gloo, torchrun with 2 processes) equals one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from ppo_helpers import random_reward_model
from safetensors.torch import load_file

from trainers.checkpoint import read_studio_json
from trainers.config import config_from_dict
from trainers.metrics import read_metrics
from trainers.ppo_config import PPOConfig
from trainers.recipes import ppo

REPO = Path(__file__).resolve().parents[2]


def test_two_processes_under_torchrun_equal_one_process(tmp_path, tiny_model) -> None:
    """Per-row sampling streams give every process's rows the samples one process draws; fixed-length
    responses give each process the same token count, one epoch of one minibatch per process makes the
    DDP average of the per-process token means the one-process mean, and whitening and the KL controller
    use statistics over both processes."""
    rm = random_reward_model(tiny_model, tmp_path / "rm")
    common = {
        "model": str(tiny_model), "iterations": 2, "prompts_per_iteration": 8, "ppo_epochs": 1, "n_eval": 4,
        "eval_batch_size": 4, "eval_at_start": False, "critic": "separate", "progress": False, "cpu": True,
        "sampling": {"max_new_tokens": 5, "stop_at_eos": False}, "optim": {"lr": 1e-3}, "critic_lr": 1e-3,
        "reward": {"kind": "sequence_rm", "path": str(rm)}, "kl": {"beta": 0.05, "target": 0.01},
    }  # fmt: skip
    single = ppo.train(config_from_dict(PPOConfig, {**common, "output_dir": str(tmp_path / "one"),
                                                    "minibatch_size": 8}))  # fmt: skip
    cfg_path = tmp_path / "ppo.yaml"
    cfg_path.write_text(yaml.safe_dump({**common, "output_dir": str(tmp_path / "two"), "minibatch_size": 4}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run([*launcher, "-m", "trainers", "ppo", "--config", str(cfg_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two" / "final"
    assert read_studio_json(two)["world_size"] == 2
    a, b = load_file(single.final_checkpoint / "model.safetensors"), load_file(two / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=5e-5, msg=name)  # Adam: lr-sized steps
    ones = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "train/loss" in r]
    rows = [r for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2]  # written once, by the main process
    assert rows[0]["train/reward_std"] > 0  # the reward model scores the samples differently
    for mine, theirs in zip(rows, ones, strict=True):
        for key in ("train/reward", "train/kl", "train/beta", "train/tokens", "train/loss", "train/value_loss",
                    "train/grad_norm", "train/critic_grad_norm", "train/clip_fraction"):  # fmt: skip
            assert abs(mine[key] - theirs[key]) <= 1e-4 * max(1.0, abs(theirs[key])), key
