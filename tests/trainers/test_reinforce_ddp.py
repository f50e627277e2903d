"""The REINFORCE recipe under DDP on CPU (gloo, torchrun with 2 processes) equals one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from trainers.checkpoint import read_studio_json
from trainers.config import config_from_dict
from trainers.metrics import read_metrics
from trainers.recipes.reinforce import train
from trainers.reinforce_config import ReinforceConfig

REPO = Path(__file__).resolve().parents[2]
COMMON = (
    "group_size: 2\nmax_steps: 2\nn_eval: 2\neval_batch_size: 2\nprogress: false\ncpu: true\nbaseline: none\n"
    "sampling:\n  max_new_tokens: 5\n  temperature: 0\noptim:\n  lr: 1.0e-3\nn_train: 16\n"
)


def random_reward_model(tiny_model: Path, folder: Path) -> Path:
    """A randomly initialised one-logit classifier on the tiny tokenizer: a reward that is never flat."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    torch.manual_seed(1)
    config = AutoConfig.from_pretrained(tiny_model, num_labels=1)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return folder


def test_two_processes_under_torchrun_equal_one_process(tmp_path, tiny_model) -> None:
    """Greedy rollouts and no baseline make every sample a pure function of its prompt, so half the
    prompts per process with DDP's gradient average is exactly the one-process step."""
    import yaml

    rm = random_reward_model(tiny_model, tmp_path / "rm")
    common = COMMON + f"reward:\n  kind: sequence_rm\n  path: {rm}\n"
    one_cfg = {**yaml.safe_load(common), "output_dir": str(tmp_path / "one"), "model": str(tiny_model),
               "batch_size": 4}  # fmt: skip
    single = train(config_from_dict(ReinforceConfig, one_cfg))
    cfg_path = tmp_path / "rl.yaml"
    cfg_path.write_text(f"output_dir: {tmp_path / 'two'}\nmodel: {tiny_model}\nbatch_size: 2\n" + common)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run([*launcher, "-m", "trainers", "reinforce", "--config", str(cfg_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two" / "final"
    assert read_studio_json(two)["world_size"] == 2
    a, b = load_file(single.final_checkpoint / "model.safetensors"), load_file(two / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=5e-5, msg=name)  # Adam: lr-sized steps
    rows = [r for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if "train/loss" in r]
    ones = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2]  # written once, by the main process
    for mine, theirs in zip(rows, ones, strict=True):
        # equal gradient norms: DDP averages what one process would have summed over the whole batch
        for key in (
            "train/reward",
            "train/kl",
            "train/step_tokens",
            "train/samples",
            "train/grad_norm",
            "train/loss",
        ):
            assert abs(mine[key] - theirs[key]) <= 1e-4 * max(1.0, abs(theirs[key])), key
    assert rows[0]["train/reward_std"] > 0  # the reward model gives the samples different rewards
    assert rows[0]["train/reward_std"] > 0  # the reward model gives the samples different rewards
    assert read_studio_json(two)["metrics"]["eval/reward"] == single.metrics["eval/reward"]
