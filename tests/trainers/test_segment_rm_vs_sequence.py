"""Issue 4: on the synthetic preference task the segment RM matches or beats the sequence RM.

Slow (~2 min on 2 cores): a tiny Llama is first trained briefly as a language model on the task's
responses (the stand-in for an SFT checkpoint, so that its next-token entropies mean something);
then the sequence RM (``reward_model`` recipe) and the segment RM (``segment_reward_model``,
calibrated τ_H) are trained from it with the same data, steps, batch, learning rate and seed, and
compared on 400 held-out pairs. The figures are printed (``-s``) for the record.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from trainers.config import OptimConfig
from trainers.recipes.reward_model import RewardModelConfig
from trainers.recipes.reward_model import train as train_sequence
from trainers.recipes.segment_reward_model import SegmentRewardModelConfig
from trainers.recipes.segment_reward_model import train as train_segment
from trainers.synthetic import write_synthetic_snapshot

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_segment_rm_matches_or_beats_the_sequence_rm(tiny_model, tmp_path):
    sys.path.insert(0, str(ROOT))
    from bench.segment_rm_ablation import pretrain_lm

    snap = write_synthetic_snapshot(tmp_path / "data", n_train=1000, n_eval=400)
    rows = [json.loads(line) for line in snap.train.read_text().splitlines()]
    texts = [r["prompt"] + r[side] for r in rows for side in ("chosen", "rejected")]
    backbone = pretrain_lm(tiny_model, texts, tmp_path / "lm", steps=300)
    common = dict(
        snapshot=str(snap.train), eval_snapshot=str(snap.eval), model=str(backbone), max_length=128,
        batch_size=16, max_steps=300, optim=OptimConfig(lr=1e-3, schedule="constant"), progress=False,
    )  # fmt: skip
    sequence = train_sequence(RewardModelConfig(output_dir=str(tmp_path / "seq"), **common))
    segment = train_segment(SegmentRewardModelConfig(output_dir=str(tmp_path / "seg"), **common))
    seq_acc, seg_acc = sequence.metrics["eval/accuracy"], segment.metrics["eval/accuracy"]
    print(
        f"\nheld-out accuracy: sequence RM {seq_acc:.4f} ({sequence.seconds:.0f} s), segment RM {seg_acc:.4f} "
        f"({segment.seconds:.0f} s; τ_H {segment.info.threshold:.3f}, "
        f"{segment.info.mean_segment_length:.2f} tokens per segment)"
    )
    assert 3 <= segment.info.mean_segment_length <= 9  # really segmented (target 6)
    assert seg_acc >= 0.8  # it learned the task
    assert seg_acc >= seq_acc
