"""The offline data stage (algorithms.md §2.2 steps 2–4): pre-generate N samples per prompt with the
current policy, score them with any :class:`trainers.rewards.RewardSource`, z-normalise over the set.

A stage folder holds:

* ``samples.jsonl`` — one row per sample, appended batch by batch (flushed and fsynced), prompt-major:
  ``{"prompt_index", "sample_index", "prompt", "response", "eos", "prompt_tokens", "response_tokens",
  "seed", "sampling"}``. ``seed`` is the row's own sampling seed ((run seed, row index), see
  :func:`trainers.rl_eval.row_generators`) and ``sampling`` the :class:`trainers.rollout.SamplingConfig`,
  so a row is reproducible alone. **Resumable**: a rerun keeps the rows written (a torn last line from a
  crash is dropped), checks they were made with the same prompts and settings, and continues where it
  stopped; since every row samples from its own stream, the result equals an uninterrupted run whatever
  the batch boundaries.
* ``scored.jsonl`` — every row plus ``reward`` (the source's sequence total) and ``z`` (standardised over
  the whole set, :func:`trainers.offline.standardise`), written atomically once everything is scored.
  Its presence marks the stage as done. Scoring is not resumable mid-way (it is cheap next to sampling
  for VADER; a reward model rescores everything after a crash).
* ``data.json`` — the settings, the reward statistics and the stage's compute (generation forwards:
  :mod:`trainers.compute`), written with ``scored.jsonl``.

Samples come from :func:`trainers.rollout.rollout` (the RL recipes' engine: KV cache, per-row
generators, EOS handling). Prompts must be distinct: ``prompt_index`` is the group of best-of-N and of
per-prompt RWR normalisation.

Human pairwise data from a studio ``preferences`` snapshot is used directly rather than through this
stage: the DPO recipe trains on it, and filtered MLE takes each pair's ``chosen`` as a kept sample
(:mod:`trainers.recipes.filtered_mle`). RWR and DT need scalar rewards, so they train on scored samples.

Headless: ``python -m trainers.offline_data --config data.yaml`` (:class:`DataStageConfig`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from trainers.compute import Compute, non_embedding_params
from trainers.config import ConfigError, bounded, config_to_dict
from trainers.offline import ScoredSample, standardise
from trainers.rewards import Prompt, RewardSource
from trainers.rollout import SamplingConfig
from trainers.tasks import RewardConfig

SAMPLES = "samples.jsonl"
SCORED = "scored.jsonl"
INFO = "data.json"


@dataclass(frozen=True)
class OfflineDataConfig:
    """How the data stage samples and scores (nest it in a recipe config as ``data``)."""

    samples_per_prompt: int = bounded(4, ge=1)
    """N, responses sampled per prompt."""
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(max_new_tokens=24, temperature=0.9)
    )
    """How samples are drawn (§2.5: temperature 0.9, 24–48 tokens)."""
    batch_size: int = bounded(16, ge=1)
    """Rows (prompt × sample) per rollout batch."""
    max_prompt_tokens: int = bounded(128, ge=1)
    """Prompts are cut on the left to this many tokens."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """The reward that scores the samples: the task's own, VADER, or a reward-model checkpoint."""


# ----------------------------------------------------------------------------- generation (resumable)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of an appended JSONL file; a torn last line (a crash mid-write) is dropped from the file.

    A bad line anywhere else is an error (:class:`trainers.data.SnapshotError` naming the row).
    """
    from trainers.data import SnapshotError, jsonl_lines

    if not path.exists():
        return []
    lines = jsonl_lines(path.read_text(encoding="utf-8"))
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if any(rest.strip() for rest in lines[number:]):
                raise SnapshotError(path, f"invalid JSON ({exc.msg})", row=number) from exc
            tmp = path.with_name(path.name + ".tmp")  # new file, then rename: never half-truncated
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            os.replace(tmp, path)
    return rows


def _append(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        handle.flush()
        os.fsync(handle.fileno())


def _check_existing(rows: list[dict[str, Any]], prompts: Sequence[Prompt], n: int, sampling: dict[str, Any],
                    seed: int, path: Path) -> None:  # fmt: skip
    """Refuse to continue rows made from other prompts, settings or seed, or out of order."""
    for r, row in enumerate(rows):
        p, s = divmod(r, n)
        expected = {"prompt_index": p, "sample_index": s, "sampling": sampling, "seed": seed * 1_000_003 + r}
        got = {k: row.get(k) for k in expected}
        if got != expected or p >= len(prompts) or row.get("prompt") != prompts[p]:
            raise ConfigError(str(path), "data", f"row {r + 1} was generated with other prompts, settings or "
                              "seed; use a new folder (or restore the old settings)")  # fmt: skip


@torch.no_grad()
def generate_samples(
    policy: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    path: str | Path,
    *,
    samples_per_prompt: int,
    sampling: SamplingConfig,
    batch_size: int,
    seed: int,
    max_prompt_tokens: int = 128,
    stop_at_newline: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Sample ``samples_per_prompt`` responses for every prompt into ``path`` (JSONL), resuming a partial file.

    Args:
        policy: the causal LM (put in eval mode here, its mode restored after).
        tokenizer: its tokenizer.
        prompts: (P,) distinct text or chat prompts.
        path: the ``samples.jsonl`` to append to.
        samples_per_prompt: N.
        sampling: temperature, top-k/p, lengths.
        batch_size: rows per rollout.
        seed: the run seed; row r samples from its own generator seeded by (seed, r).
        max_prompt_tokens: prompts are cut on the left to this.
        stop_at_newline: responses also end at a token containing a newline.
        progress: ``progress(done_rows, total_rows)`` after each batch.

    Returns:
        All P·N rows (see the module doc), prompt-major.
    """
    from trainers.rl_eval import encode_prompts, pad_token_id, response_texts, row_generators, stop_token_ids
    from trainers.rollout import left_pad, rollout

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n, total = samples_per_prompt, len(prompts) * samples_per_prompt
    settings = config_to_dict(sampling)
    rows = read_jsonl(path)
    _check_existing(rows, prompts, n, settings, seed, path)
    if len(rows) > total:
        raise ConfigError(str(path), "data", f"holds {len(rows)} rows, more than {total} (other prompts?)")
    device = next(policy.parameters()).device
    eos, pad = stop_token_ids(tokenizer, policy, stop_at_newline=stop_at_newline), pad_token_id(tokenizer)
    encoded = encode_prompts(tokenizer, prompts, max_prompt_tokens)
    was_training = policy.training
    policy.eval()
    try:
        for begin in range(len(rows), total, batch_size):
            indices = list(range(begin, min(begin + batch_size, total)))
            ids, mask = left_pad([encoded[r // n] for r in indices], pad)
            batch = rollout(policy, ids.to(device), mask.to(device), sampling, eos_token_ids=eos, pad_token_id=pad,
                            generator=row_generators(seed, indices), return_logprobs=False)  # fmt: skip
            texts = response_texts(tokenizer, batch)
            new = [
                {
                    "prompt_index": r // n,
                    "sample_index": r % n,
                    "prompt": prompts[r // n],
                    "response": text,
                    "eos": bool(e),
                    "prompt_tokens": len(encoded[r // n]),
                    "response_tokens": int(length),
                    "seed": seed * 1_000_003 + r,
                    "sampling": settings,
                }
                for r, text, e, length in zip(
                    indices, texts, batch.eos.tolist(), batch.lengths.tolist(), strict=True
                )
            ]
            _append(path, new)
            rows.extend(new)
            if progress is not None:
                progress(len(rows), total)
    finally:
        policy.train(was_training)
    return rows


# ----------------------------------------------------------------------------- scoring and the stage


def score_rows(rows: Sequence[dict[str, Any]], reward: RewardSource, batch_size: int = 64) -> list[float]:
    """The reward source's sequence total of every (prompt, response) row, in order."""
    out: list[float] = []
    for begin in range(0, len(rows), batch_size):
        chunk = rows[begin : begin + batch_size]
        out.extend(
            float(s.total) for s in reward.score([r["prompt"] for r in chunk], [r["response"] for r in chunk])
        )
    return out


def generation_compute(
    rows: Sequence[dict[str, Any]], params: int, reward_params: int | None = None
) -> Compute:
    """The stage's compute from its rows (settled): the generation forwards with N = ``params``; with
    ``reward_params``, a reward-model forward over each row's prompt + response tokens too."""
    ledger = Compute(params)
    ledger.generate(sum(r["prompt_tokens"] for r in rows), sum(r["response_tokens"] for r in rows), len(rows))
    if reward_params:
        ledger.forward(sum(r["prompt_tokens"] + r["response_tokens"] for r in rows), reward_params)
    ledger.settle()
    return ledger


def write_scored(
    folder: Path, rows: Sequence[dict[str, Any]], rewards: Sequence[float], info: dict[str, Any]
) -> None:
    """``scored.jsonl`` (rows + reward + z) and ``data.json`` (``info`` + reward statistics), atomically."""
    z = standardise(rewards)
    scored = [{**row, "reward": r, "z": zi} for row, r, zi in zip(rows, rewards, z, strict=True)]
    values = torch.tensor(list(rewards), dtype=torch.float64)
    stats = {"rows": len(rows), "prompts": len({r["prompt_index"] for r in rows}),
             "reward_mean": float(values.mean()) if len(values) else 0.0,
             "reward_std": float(values.std()) if len(values) > 1 else 0.0}  # fmt: skip
    for name, text in ((INFO, json.dumps({**info, **stats}, indent=2, sort_keys=True) + "\n"),
                       (SCORED, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in scored))):  # fmt: skip
        tmp = folder / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(
            tmp, folder / name
        )  # data.json first: scored.jsonl (the "done" mark) is the last to appear


def scored_path(path: str | Path) -> Path:
    """``scored.jsonl`` of a stage folder, or the file itself."""
    path = Path(path)
    return path / SCORED if path.is_dir() else path


def load_samples(path: str | Path) -> tuple[list[ScoredSample], dict[str, Any]]:
    """The scored samples of a stage folder (or its ``scored.jsonl``) and its ``data.json`` ({} if absent)."""
    from trainers.data import SnapshotError

    file = scored_path(path)
    if not file.is_file():
        raise SnapshotError(
            file, "no scored samples (run the data stage first: python -m trainers.offline_data)"
        )
    samples = []
    for number, row in enumerate(read_jsonl(file), start=1):
        try:
            sample = ScoredSample(int(row["prompt_index"]), int(row["sample_index"]), row["prompt"], str(row["response"]),
                                  float(row["reward"]), float(row["z"]), bool(row.get("eos", True)))  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(file, f"not a scored sample ({exc})", row=number) from exc
        samples.append(sample)
    if not samples:
        raise SnapshotError(file, "no scored samples")
    info_file = file.parent / INFO
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    return samples, info


def run_data_stage(
    policy: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    folder: str | Path,
    cfg: OfflineDataConfig,
    reward: RewardSource,
    *,
    seed: int,
    stop_at_newline: bool = False,
    model: str = "",
    progress: bool = False,
) -> tuple[list[ScoredSample], dict[str, Any]]:
    """Generate (resuming), score and standardise into ``folder``; a finished folder is only read.

    Returns the scored samples and the ``data.json`` info (settings, reward statistics, ``compute``).
    """
    folder = Path(folder)
    if scored_path(folder).is_file():
        return load_samples(folder)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts) * cfg.samples_per_prompt, desc="offline data", file=sys.stderr)
    report = (lambda done, total: bar.update(done - bar.n)) if bar is not None else None
    try:
        rows = generate_samples(policy, tokenizer, prompts, folder / SAMPLES, samples_per_prompt=cfg.samples_per_prompt,
                                sampling=cfg.sampling, batch_size=cfg.batch_size, seed=seed,
                                max_prompt_tokens=cfg.max_prompt_tokens, stop_at_newline=stop_at_newline,
                                progress=report)  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    rewards = score_rows(rows, reward)
    scorer = getattr(reward, "model", None)
    ledger = generation_compute(rows, non_embedding_params(policy),
                                non_embedding_params(scorer) if isinstance(scorer, torch.nn.Module) else None)  # fmt: skip
    info = {"model": model, "seed": seed, "data": config_to_dict(cfg), "compute": ledger.as_dict()}
    write_scored(folder, rows, rewards, info)
    return load_samples(folder)


# ----------------------------------------------------------------------------- headless


@dataclass(frozen=True)
class DataStageConfig:
    """Pre-generate and score samples for the offline recipes (filtered MLE, RWR, DT; DPO pairs)."""

    output_dir: str
    """The stage folder (samples.jsonl, scored.jsonl, data.json); rerunning into it resumes."""
    task: Literal["sentiment", "synthetic_translation"] = "sentiment"
    """Built-in prompts and reward (used when no snapshot is given)."""
    snapshot: str | None = None
    """A studio prompts snapshot instead of the task (its reward must be lexicon or a reward model)."""
    n_train: int | None = bounded(None, ge=1)
    """Training prompts of the task or snapshot (null: all)."""
    model: str = "smollm2"
    """The policy that samples: a default model name, a local folder, or a hub id."""
    model_cache: str | None = None
    """Where default models live (default: $STUDIO_MODEL_CACHE or ~/.cache/feedback-studio/models)."""
    data: OfflineDataConfig = field(default_factory=OfflineDataConfig)
    """Samples per prompt, sampling, batch size, reward."""
    seed: int = 0
    """Picks the training prompts and seeds every row's sampling stream."""
    cpu: bool = False
    """Sample on the CPU even when a GPU is present."""
    progress: bool = True
    """Show a progress bar on stderr."""


def stage_prompts(task: str, snapshot: str | None, n_train: int | None, seed: int) -> Any:
    """The :class:`trainers.tasks.Task` whose ``train_prompts`` the stage samples for (snapshot or built-in)."""
    from trainers.tasks import get_task, snapshot_task

    if snapshot:
        built = snapshot_task(snapshot, seed=seed, eval_fraction=0.0)
        return dataclasses.replace(built, train_prompts=built.train_prompts[:n_train])
    try:
        return get_task(task, seed=seed, n_train=n_train)
    except ValueError as exc:
        raise ConfigError("<config>", "n_train", str(exc)) from exc


def main(argv: list[str] | None = None) -> int:
    """``python -m trainers.offline_data --config data.yaml [--set key=value ...]``: one JSON summary line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainers.config import parse_recipe_args
    from trainers.models import resolve_model

    try:
        cfg, args = parse_recipe_args(DataStageConfig, argv, prog="python -m trainers.offline_data")
        if args.print_config:
            print(json.dumps(config_to_dict(cfg), indent=2))
            return 0
        task = stage_prompts(cfg.task, cfg.snapshot, cfg.n_train, cfg.seed)
        base = resolve_model(cfg.model, Path(cfg.model_cache) if cfg.model_cache else None)
    except ValueError as exc:  # ConfigError, SnapshotError, ModelNotFoundError
        print(f"error[bad_input]: {exc}", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu"
    policy = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True).to(device)
    tokenizer = AutoTokenizer.from_pretrained(base)
    reward = task.reward(tokenizer, cfg.data.reward, device=device)
    samples, info = run_data_stage(policy, tokenizer, task.train_prompts, cfg.output_dir, cfg.data, reward,
                                   seed=cfg.seed, stop_at_newline=task.stop_at_newline, model=str(base),
                                   progress=cfg.progress)  # fmt: skip
    print(json.dumps({"output_dir": cfg.output_dir, "samples": len(samples), "prompts": info.get("prompts"),
                      "reward_mean": info.get("reward_mean"), "reward_std": info.get("reward_std"),
                      "total_flops": info.get("compute", {}).get("total_flops")}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
