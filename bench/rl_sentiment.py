"""Online RL on the sentiment task with SmolLM2-135M on CPU: PPO, NLPO and REINFORCE+ESRL over seeds.

Each (algorithm, seed) run trains from the default policy and evaluates the held-out prompts at the
start and the end (reward, KL to the reference, perplexity, distinct-n). Rows are appended to
``bench/results/rl_sentiment.jsonl`` (a rerun of the same algorithm and seed replaces its row);
``--summarise-only`` rebuilds the table (``rl_sentiment.{json,md}``: mean ± sd over seeds), in the
spirit of the GRUE IMDB table.

    .venv/bin/python -m bench.rl_sentiment --algos ppo nlpo reinforce --seeds 0 1 2

One thread per run by default so that runs are comparable on a shared two-core machine.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = RESULTS / "rl_sentiment.jsonl"

# The settings of the committed table. PPO and NLPO share everything but the action mask; REINFORCE
# samples a group of 4 per prompt (leave-one-out baseline) with ESRL's two-stage sampling and the
# "eliminate" dynamic sampling, its KL held by an adaptive β towards a per-sequence target.
SETTINGS: dict[str, dict[str, Any]] = {
    "ppo": {"critic": "shared", "ppo_epochs": 2, "iterations": 20, "optim": {"lr": 3e-5}},
    "nlpo": {"critic": "shared", "ppo_epochs": 2, "iterations": 20, "optim": {"lr": 3e-5}},
    "reinforce": {
        "group_size": 4,
        "batch_size": 8,
        "max_steps": 30,
        "optim": {"lr": 5e-5},
        # 2.4 nats over 24 tokens: PPO's 0.1 per token. β starts where it can hold that and moves at most
        # ±2 % per step: with a gain of 1 (±20 %), β collapsed while the early KL was small (0.2 → 0.16
        # after one step) and the KL then ran to 5–6 nats before β could recover.
        "kl": {"beta": 0.3, "target": 2.4},
        "dynamic": {"mode": "eliminate"},
    },
}
EVAL_KEYS = ("reward", "kl", "perplexity", "distinct_1", "distinct_2")


def _recipe(algo: str):
    from trainers.recipes import nlpo, ppo, reinforce

    return {
        "ppo": (ppo, ppo.PPOConfig),
        "nlpo": (nlpo, nlpo.NLPOConfig),
        "reinforce": (reinforce, reinforce.ReinforceConfig),
    }[algo]


def run_one(algo: str, seed: int, workdir: Path) -> dict[str, Any]:
    """Train one (algorithm, seed) run and return its row (settings, start/end eval, timings)."""
    from trainers.config import config_from_dict
    from trainers.metrics import read_metrics

    module, config_class = _recipe(algo)
    out = workdir / f"{algo}-{seed}"
    shutil.rmtree(out, ignore_errors=True)
    settings = SETTINGS[algo]
    raw = {"output_dir": str(out), "task": "sentiment", "model": "smollm2", "cpu": True, "progress": False}
    cfg = config_from_dict(config_class, {**raw, **settings, "seed": seed})
    started = time.perf_counter()
    result = module.train(cfg)
    seconds = time.perf_counter() - started
    rows = list(read_metrics(out / "metrics.jsonl"))
    evals = [r for r in rows if "eval/reward" in r]
    train = [r for r in rows if "train/reward" in r]
    start, end = evals[0], evals[-1]
    row = {
        "algo": algo,
        "seed": seed,
        "settings": settings,
        "steps": result.steps,
        "minutes": round(seconds / 60, 2),
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0),
        "start": {k: start.get(f"eval/{k}") for k in EVAL_KEYS},
        "end": {k: end.get(f"eval/{k}") for k in EVAL_KEYS},
        # PPO/NLPO log train/kl per token and train/kl_seq per sequence; REINFORCE's train/kl is per sequence
        "train_kl_per_token_last5": None if algo == "reinforce" else _last5(train, "train/kl"),
        "train_kl_seq_last5": _last5(train, "train/kl" if algo == "reinforce" else "train/kl_seq"),
        # The run's compute ledger (trainers/compute.py): tokens and FLOPs, for "fraction of PPO's compute".
        "compute": {k: v for k, v in train[-1].items() if k.startswith("compute/")} if train else {},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    shutil.rmtree(out, ignore_errors=True)  # the weights are not kept: the table is the result
    return row


def _last5(rows: list[dict[str, Any]], key: str) -> float | None:
    """Mean of ``key`` over the last 5 training rows that have it (None if none do)."""
    values = [r[key] for r in rows[-5:] if key in r]
    return statistics.fmean(values) if values else None


def _load_rows() -> list[dict[str, Any]]:
    if not ROWS.exists():
        return []
    return [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()]


def _save_row(row: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    # Several seeds may run as parallel processes: the read-modify-write of the rows file is locked.
    with open(RESULTS / ".rl_sentiment.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = [r for r in _load_rows() if (r["algo"], r["seed"]) != (row["algo"], row["seed"])]
        rows.append(row)
        tmp = ROWS.with_suffix(f".jsonl.{os.getpid()}.tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        tmp.replace(ROWS)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def kl_target(algo: str, settings: dict[str, Any]) -> tuple[str, float | None]:
    """(unit, target) of the run's KL controller: per token for PPO/NLPO (recipe default 0.1), per
    sequence for REINFORCE."""
    kl = settings.get("kl", {})
    if algo == "reinforce":
        return "seq", kl.get("target")
    return "token", kl.get("target", 0.1)


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± sd over seeds per algorithm, with the starting policy's held-out figures. Only rows run
    with the current SETTINGS count (older rows stay in the file, reported as ``stale_rows``)."""
    table: dict[str, Any] = {}
    stale = {a: sum(1 for r in rows if r["algo"] == a and r["settings"] != SETTINGS[a]) for a in SETTINGS}
    if any(stale.values()):
        table["stale_rows"] = {a: n for a, n in stale.items() if n}
    for algo in ("ppo", "nlpo", "reinforce"):
        mine = [r for r in rows if r["algo"] == algo and r["settings"] == SETTINGS[algo]]
        if not mine:
            continue
        entry: dict[str, Any] = {"seeds": sorted(r["seed"] for r in mine), "settings": mine[0]["settings"]}
        for phase in ("start", "end"):
            for key in EVAL_KEYS:
                values = [r[phase][key] for r in mine if r[phase].get(key) is not None]
                if values:
                    entry[f"{phase}_{key}"] = _mean_sd(values)
        entry["reward_gain_per_seed"] = [r["end"]["reward"] - r["start"]["reward"] for r in mine]
        entry["minutes"] = _mean_sd([r["minutes"] for r in mine])
        entry["steps"] = mine[0]["steps"]
        kl_tok = [
            r["train_kl_per_token_last5"] for r in mine if r.get("train_kl_per_token_last5") is not None
        ]
        kl_seq = [r["train_kl_seq_last5"] for r in mine if r.get("train_kl_seq_last5") is not None]
        if kl_tok:
            entry["train_kl_per_token_last5"] = _mean_sd(kl_tok)
        if kl_seq:
            entry["train_kl_seq_last5"] = _mean_sd(kl_seq)
        entry["kl_unit"], entry["kl_target"] = kl_target(algo, mine[0]["settings"])
        flops = [
            r["compute"]["compute/total_flops"] / 1e12
            for r in mine
            if "compute/total_flops" in (r.get("compute") or {})
        ]
        if flops:
            entry["tflops"] = _mean_sd(flops)
        table[algo] = entry
    return table


def _fmt(pair: tuple[float, float] | None, digits: int = 3) -> str:
    if pair is None:
        return "–"
    return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def markdown(table: dict[str, Any]) -> str:
    lines = [
        "# Online RL on the sentiment task (SmolLM2-135M-Instruct, CPU)",
        "",
        "Held-out prompts, mean ± sd over seeds. Reward: VADER compound of the continuation in [−1, 1].",
        "KL: to the frozen reference, summed over the response (nats). Produced by `python -m bench.rl_sentiment`.",
        "",
        "Training KL: the controller's measure over the last 5 iterations (per token for PPO/NLPO, per",
        "sequence for REINFORCE) next to its target. TFLOP: the run's compute ledger (trainers/compute.py).",
        "",
        "| algorithm | seeds | steps | minutes/run | reward start → end | KL end | training KL (target) | perplexity end | distinct-2 end | TFLOP |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    algos = {a: e for a, e in table.items() if a != "stale_rows"}
    for algo, e in algos.items():
        measured = e.get("train_kl_per_token_last5" if e["kl_unit"] == "token" else "train_kl_seq_last5")
        target = "–" if e["kl_target"] is None else f"{e['kl_target']:g}"
        lines.append(
            f"| {algo} | {len(e['seeds'])} | {e['steps']} | {_fmt(e['minutes'], 1)} | "
            f"{_fmt(e.get('start_reward'))} → **{_fmt(e.get('end_reward'))}** | {_fmt(e.get('end_kl'), 2)} | "
            f"{_fmt(measured)} /{e['kl_unit']} ({target}) | {_fmt(e.get('end_perplexity'), 1)} | "
            f"{_fmt(e.get('end_distinct_2'))} | {_fmt(e.get('tflops'), 1)} |"
        )
    if table.get("stale_rows"):
        lines += [
            "",
            f"Rows with earlier settings, kept in the rows file but not in this table: {table['stale_rows']}.",
        ]
    lines += ["", "Settings (everything else at the recipe defaults):", ""]
    for algo, e in algos.items():
        lines.append(f"- {algo}: `{json.dumps(e['settings'], sort_keys=True)}`")
    return "\n".join(lines) + "\n"


def write_summary() -> dict[str, Any]:
    table = summarise(_load_rows())
    (RESULTS / "rl_sentiment.json").write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    (RESULTS / "rl_sentiment.md").write_text(markdown(table))
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algos", nargs="+", default=["ppo", "nlpo", "reinforce"], choices=sorted(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--summarise-only", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if not args.summarise_only:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
        with tempfile.TemporaryDirectory(prefix="rl-sentiment-") as work:
            for seed in args.seeds:
                for algo in args.algos:
                    row = run_one(algo, seed, Path(work))
                    _save_row(row)
                    print(json.dumps(row), flush=True)
    print(markdown(write_summary()))


if __name__ == "__main__":
    main()
