"""The supervised-step benchmark's equal-work checks and verdicts (bench/harness/sft_stats.py), by hand.

Rows are built from the workload's own invariants, then one thing at a time is broken: each break must
be reported, so a run that did other work than it claims can never get a verdict.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, replace

import pytest

from bench.harness.sft_common import (
    CPU_WORKLOADS,
    SFTWorkload,
    TargetTally,
    id_checksum,
    make_rows,
    workloads,
)
from bench.harness.sft_stats import (
    declared_difference,
    expected_reference_pass,
    expected_work,
    label,
    summarise,
    work_differences,
)

SFT = SFTWorkload("t-sft", "sft", "tiny-128", batch=2, prompt_len=3, completion_len=4, warmup=1, timed=2)
DPO = replace(SFT, name="t-dpo", method="dpo")
LIVE = replace(DPO, name="t-live", trl_reference="live")


def test_expected_work_by_hand() -> None:
    # SFT: 2 rows of 3 + 4 + EOS = 8 tokens; 2 × (4 + 1) = 10 tokens in the loss.
    assert expected_work(asdict(SFT), "trl") == {
        "grad_rows": 2, "nograd_rows": 0, "tokens": 16, "token_slots": 16, "loss_tokens": 10,
        "nograd_scored_tokens": 0, "backward_passes": 1, "optimizer_steps": 1, "ref_rows": 0, "ref_tokens": 0,
    }  # fmt: skip
    # DPO: chosen and rejected of 2 pairs = 4 rows; TRL's live reference forwards those 4 rows again.
    dpo = expected_work(asdict(DPO), "ours")
    assert (dpo["grad_rows"], dpo["tokens"], dpo["loss_tokens"], dpo["ref_rows"]) == (4, 32, 20, 0)
    assert expected_work(asdict(LIVE), "ours")["ref_rows"] == 0
    assert (
        expected_work(asdict(LIVE), "trl")["ref_rows"],
        expected_work(asdict(LIVE), "trl")["ref_tokens"],
    ) == (4, 32)


def test_expected_reference_pass_by_hand() -> None:
    # 2 pairs × 3 steps = 6 pairs → 12 rows of 8 tokens, 12 × 5 scored tokens, before the first step.
    assert expected_reference_pass(asdict(DPO), "trl") == {"rows": 12, "tokens": 96, "scored_tokens": 60}
    assert expected_reference_pass(asdict(DPO), "ours") == expected_reference_pass(asdict(DPO), "trl")
    assert expected_reference_pass(asdict(LIVE), "trl") == {"rows": 0, "tokens": 0, "scored_tokens": 0}
    assert expected_reference_pass(asdict(LIVE), "ours")["rows"] == 12
    assert expected_reference_pass(asdict(SFT), "ours")["rows"] == 0


def _row(workload: SFTWorkload, framework: str, seed: int, cycle: float = 1.0) -> dict:
    """A process row that did exactly the workload's work."""
    w = asdict(workload)
    step = expected_work(w, framework)
    ref = expected_reference_pass(w, framework)
    return {
        "ok": True, "framework": framework, "seed": seed, "workload": w, "workload_key": workload.name,
        "steps_run": workload.steps, "timed_steps": [workload.warmup, workload.steps],
        "cycle_s": [cycle] * workload.steps, "step_s": [cycle] * workload.steps, "cpu_s": [cycle] * workload.steps,
        "preempted": [0] * workload.steps, "work_per_step": [dict(step) for _ in range(workload.timed)],
        "token_checksum": 1000 + seed, "loss_checksum": 2000 + seed,
        "reference_pass": {**ref, "token_checksum": 3000 + seed if ref["rows"] else 0,
                           "scored_checksum": 4000 + seed if ref["rows"] else 0, "s": 0.5},
        "peak_rss_mb": 500.0, "peak_minus_first_step_mb": 100.0, "threads": 1,
    }  # fmt: skip


@pytest.mark.parametrize("workload", [SFT, DPO, LIVE])
def test_rows_that_did_the_work_are_valid(workload) -> None:
    assert work_differences([_row(workload, "ours", 0)], [_row(workload, "trl", 0)]) == []


BREAKS = {
    "loss tokens": lambda r: r["work_per_step"][1].update(loss_tokens=9),
    "padding": lambda r: r["work_per_step"][0].update(token_slots=18),
    "extra no-grad forward": lambda r: r["work_per_step"][0].update(nograd_rows=2),
    "second backward": lambda r: r["work_per_step"][0].update(backward_passes=2),
    "undeclared reference model": lambda r: r["work_per_step"][0].update(ref_rows=4, ref_tokens=32),
    "steps": lambda r: r.update(steps_run=2),
    "forwarded tokens": lambda r: r.update(token_checksum=1),
    "loss targets": lambda r: r.update(loss_checksum=1),
    "reference pass targets": lambda r: r["reference_pass"].update(scored_checksum=1),
    "reference pass rows": lambda r: r["reference_pass"].update(rows=10),
}


@pytest.mark.parametrize("name", list(BREAKS))
def test_every_break_of_equal_work_is_reported(name) -> None:
    ours, trl = _row(DPO, "ours", 0), _row(DPO, "trl", 0)
    broken = copy.deepcopy(ours)
    BREAKS[name](broken)
    reasons = work_differences([broken], [trl])
    assert reasons, name
    summary = summarise([broken, trl, *[_row(DPO, fw, s) for s in (1, 2) for fw in ("ours", "trl")]])
    cell = summary["cells"]["t-dpo"]
    assert not cell["valid"] and label(cell) == "invalid: different work"


def test_live_reference_rows_are_not_called_equal_work() -> None:
    rows = [_row(LIVE, fw, s, cycle=2.0 if fw == "trl" else 1.0) for s in range(3) for fw in ("trl", "ours")]
    cell = summarise(rows)["cells"]["t-live"]
    assert cell["valid"] and not cell["equal_work"] and cell["speedup"] == pytest.approx(2.0)
    assert not cell["target_met"] and label(cell).startswith("algorithmic (not equal work)")
    assert "4 extra no-grad rows" in declared_difference(asdict(LIVE))
    # a live row where ours also ran no reference pass would be different work
    broken = copy.deepcopy(rows[1])
    broken["reference_pass"].update(rows=0)
    assert work_differences([broken], [rows[0]])


def test_verdicts_need_three_seeds_ratio_and_separated_iqrs() -> None:
    fast = [_row(SFT, fw, s, cycle=1.5 if fw == "trl" else 1.0) for s in range(3) for fw in ("trl", "ours")]
    cell = summarise(fast)["cells"]["t-sft"]
    assert (
        cell["target_met"] and cell["speedup"] == pytest.approx(1.5) and label(cell) == "target met (≥ 1.3×)"
    )
    cell = summarise(fast[:2])["cells"]["t-sft"]
    assert not cell["target_met"] and label(cell).startswith("no verdict")
    close = [_row(SFT, fw, s, cycle=1.2 if fw == "trl" else 1.0) for s in range(3) for fw in ("trl", "ours")]
    cell = summarise(close)["cells"]["t-sft"]
    assert cell["faster"] and not cell["target_met"] and label(cell) == "faster, below 1.3×"
    bigger = copy.deepcopy(fast)
    bigger[1]["peak_rss_mb"] = 600.0  # ours, seed 0
    cell = summarise(bigger)["cells"]["t-sft"]
    assert not cell["memory_no_more_every_seed"] and label(cell).endswith("more peak memory")


def test_target_tally_counts_and_checksums_by_hand() -> None:
    import torch

    class Step:
        step = 3

    tally = TargetTally(Step())
    tally.add(torch.tensor([1, 2]))  # 1·8 + 2·9 = 26
    with torch.no_grad():
        tally.add(torch.tensor([5]))  # 5·12 = 60, no grad: a reference pass token
    assert int(id_checksum(torch.tensor([1, 2]))) == 26
    assert tally.per_step(3) == {"loss_tokens": 2, "nograd_scored_tokens": 1}
    assert (tally.checksum(grad=True), tally.checksum(grad=False), tally.count(grad=False, step=3)) == (
        26,
        60,
        1,
    )


def test_rows_have_the_workload_word_counts_and_split_at_the_boundary() -> None:
    from bench.harness.assets import build_tokenizer, vocabulary

    tokenizer = build_tokenizer(vocabulary(4096))
    rows = make_rows(tokenizer.get_vocab(), SFT, seed=0)
    assert len(rows) == SFT.n_examples == 6 and rows == make_rows(tokenizer.get_vocab(), SFT, seed=0)
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        # TRL concatenates the strings and appends the EOS string; the whitespace split keeps the boundary
        joined = tokenizer(row["prompt"] + row["chosen"] + tokenizer.eos_token)["input_ids"]
        assert (
            len(prompt) == SFT.prompt_len
            and len(joined) == SFT.seq_tokens
            and joined[: len(prompt)] == prompt
        )
        assert joined[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in joined
        chosen, rejected = row["chosen"].split(), row["rejected"].split()
        assert len(chosen) == len(rejected) == SFT.completion_len
        assert 0 < sum(a != b for a, b in zip(chosen, rejected, strict=True)) <= SFT.k


def test_matrix_shapes() -> None:
    assert CPU_WORKLOADS["dpo-tiny"].trl_reference == "precomputed"
    assert CPU_WORKLOADS["dpo-tiny-liveref"].trl_reference == "live"
    smoke = workloads(smoke=True)
    assert all(w.steps <= 3 for w in smoke.values()) and set(smoke) == set(CPU_WORKLOADS)
    # tiny completions + EOS fill exactly one of our scorer's 64-step logit chunks (documented in bench/README.md)
    assert CPU_WORKLOADS["sft-tiny"].completion_len + 1 == 64
