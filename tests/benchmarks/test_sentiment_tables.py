"""The sentiment tables' summaries (bench/rl_sentiment.py, bench/offline_sentiment.py) from hand-made rows."""

from __future__ import annotations

import pytest

from bench import offline_sentiment, rl_sentiment


def rl_row(algo: str, seed: int, settings: dict, start: float, end: float, **extra) -> dict:
    evals = {"reward": None, "kl": 0.5, "perplexity": 20.0, "distinct_1": 0.5, "distinct_2": 0.9}
    return {"algo": algo, "seed": seed, "settings": settings, "steps": 20, "minutes": 10.0 + seed,
            "start": {**evals, "reward": start}, "end": {**evals, "reward": end}, **extra}  # fmt: skip


def test_rl_table_keeps_current_settings_only_and_shows_kl_against_its_target() -> None:
    ppo, rf = rl_sentiment.SETTINGS["ppo"], rl_sentiment.SETTINGS["reinforce"]
    rows = [
        rl_row("ppo", 0, ppo, 0.1, 0.4, train_kl_per_token_last5=0.08, compute={"compute/total_flops": 2e12}),
        rl_row("ppo", 1, ppo, 0.2, 0.6, train_kl_per_token_last5=0.12, compute={"compute/total_flops": 4e12}),
        rl_row("ppo", 2, {**ppo, "iterations": 3}, 0.0, 0.0),  # an older setting: left out, counted
        rl_row("reinforce", 0, rf, 0.2, 0.5, train_kl_seq_last5=1.4),
    ]
    table = rl_sentiment.summarise(rows)
    assert table["ppo"]["seeds"] == [0, 1] and table["stale_rows"] == {"ppo": 1}
    assert table["ppo"]["end_reward"] == pytest.approx((0.5, 0.1414), abs=1e-4)
    assert table["ppo"]["tflops"] == pytest.approx((3.0, 1.4142), abs=1e-4)
    assert (table["ppo"]["kl_unit"], table["ppo"]["kl_target"]) == ("token", 0.1)  # the recipe default
    assert (table["reinforce"]["kl_unit"], table["reinforce"]["kl_target"]) == ("seq", rf["kl"]["target"])
    md = rl_sentiment.markdown(table)
    assert "0.100 ± 0.028 /token (0.1)" in md and "1.400 ± 0.000 /seq (2.4)" in md
    assert "{'ppo': 1}" in md


def test_offline_table_takes_ppo_compute_from_the_rl_rows(monkeypatch, tmp_path) -> None:
    rl_rows = tmp_path / "rl_sentiment.jsonl"
    rl_rows.write_text('{"algo": "ppo", "seed": 0, "compute": {"compute/total_flops": 4e12}}\n')
    monkeypatch.setattr(offline_sentiment, "RESULTS", tmp_path)
    evals = {"reward": 0.1, "kl": 1.0, "perplexity": 20.0, "distinct_2": 0.9}
    row = {"method": "rwr", "seed": 0, "settings": {}, "steps": 5, "minutes": 1.0, "start": evals,
           "end": {**evals, "reward": 0.3}, "curve": None, "compute": {"total_flops": 1e12}}  # fmt: skip
    table = offline_sentiment.summarise([row])
    assert table["rwr"]["fraction_of_ppo"] == pytest.approx((0.25, 0.0))
    assert "0.250 ± 0.000" in offline_sentiment.markdown(table, smoke=False)
