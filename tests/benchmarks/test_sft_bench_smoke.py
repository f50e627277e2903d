"""Smoke of the supervised-step benchmark: both real sides on micro cells in this process do exactly the
declared work, and a side that trains on other tokens is caught (the script path: test_sft_bench_script.py).

The tiny checkpoint is built into a temporary cache and results go to a temporary folder (nothing under
bench/ is written).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from bench.harness.sft_common import make_rows, workloads
from bench.harness.sft_stats import work_differences

pytest.importorskip("trl")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from bench.harness.assets import model_dir

    folder = tmp_path_factory.mktemp("bench-cache")
    model_dir("tiny-128", cache=folder)
    return folder


def _micro(key: str):
    return replace(workloads(smoke=True)[key], batch=2, prompt_len=4, completion_len=5, warmup=1, timed=1)


@pytest.mark.parametrize("key", ["sft-tiny", "dpo-tiny", "dpo-tiny-liveref"])
def test_both_sides_do_the_declared_work(cache, key) -> None:
    from transformers import AutoTokenizer

    from bench.harness import sft_ours, sft_trl
    from bench.harness.sft_common import backbone_path

    workload = _micro(key)
    path = backbone_path(workload.backbone, cache)
    rows = make_rows(AutoTokenizer.from_pretrained(path).get_vocab(), workload, seed=0)
    ours = sft_ours.run(workload, 0, path, rows, threads=1)
    trl = sft_trl.run(workload, 0, path, rows, threads=1)
    assert work_differences([ours], [trl]) == []
    assert ours["work_per_step"][0]["loss_tokens"] == workload.rows_per_step * 6  # (Lc + EOS) per row
    assert (
        ours["optimizer"]["fused"] and trl["optimizer"]["fused"] and trl["optimizer"]["weight_decay"] == [0.0]
    )
    if workload.method == "dpo":
        assert ours["reference_pass"]["rows"] == 2 * workload.n_examples and ours["reference_pass"]["s"] > 0
    # the same run over other completions (chosen := rejected: k words differ per row) is caught
    other = [{**r, "chosen": r["rejected"]} for r in rows]
    changed = sft_ours.run(workload, 0, path, other, threads=1)
    assert any("tokens in the loss" in reason for reason in work_differences([changed], [trl]))
