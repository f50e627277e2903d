"""The metrics stream (JSONL) and the evaluation metrics every preference recipe reports.

Stream format, one JSON object per line, flushed per write::

    {"step": 10, "time": 1767312000.25, "train/loss": 0.52, "train/accuracy": 0.81, "train/lr": 4.9e-05}

``step`` (int) and ``time`` (Unix seconds) are reserved; every other key is a metric name, namespaced
``train/…`` or ``eval/…``, with a float value (non-finite values are written as ``null``, since JSON has
no NaN). The studio's worker tails this file into metric points; a resumed run first drops the lines
of steps after its checkpoint, so the file never holds two values for one (step, name).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from trainers.data import jsonl_lines
from trainers.losses import bradley_terry_loss


class MetricsWriter:
    """Append-only JSONL metrics; ``enabled=False`` (non-main processes) makes every call a no-op."""

    def __init__(self, path: str | Path, *, resume_step: int | None = None, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._handle = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None or self.path.exists():
            # Always a new file (new inode), never truncated in place: a reader tailing it (the studio's
            # worker) tells a rewrite from appended lines by the inode, as a rewrite may grow past its offset.
            kept = (
                []
                if resume_step is None
                else [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            )
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
            os.replace(tmp, self.path)
        self._handle = self.path.open("a", encoding="utf-8")

    def write(self, step: int, values: Mapping[str, float], *, when: float | None = None) -> None:
        """Append one line: ``{"step", "time", **values}``, flushed to the OS at once (no values: no line)."""
        if self._handle is None or not values:
            return
        row: dict[str, Any] = {"step": int(step), "time": round(time.time() if when is None else when, 3)}
        for name, value in values.items():
            number = float(value)
            row[name] = number if math.isfinite(number) else None
        self._handle.write(json.dumps(row) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All complete lines of a metrics file (a torn last line from a crash is skipped)."""
    rows = []
    for line in jsonl_lines(Path(path).read_text(encoding="utf-8")):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


# ----------------------------------------------------------------------------- evaluation metrics


def pairwise_ece(reward_diff: torch.Tensor, bins: int = 10) -> float:
    """Expected calibration error of P(chosen ≻ rejected) = σ(r⁺ − r⁻), in ``bins`` equal-width bins.

    ``reward_diff`` (N,). Each pair is counted twice, as (p, label 1) and (1 − p, label 0), so the
    measure does not depend on which side a snapshot lists first: ECE = Σ_b |B_b|/2N · |mean label −
    mean p| over the bins of [0, 1]. 0 for a calibrated model (and for one that always says 0.5);
    about 1 for a confident model that is always wrong.
    """
    p = torch.sigmoid(reward_diff.detach().double().flatten())
    probs = torch.cat([p, 1 - p])
    labels = torch.cat([torch.ones_like(p), torch.zeros_like(p)])
    which = torch.clamp((probs * bins).long(), max=bins - 1)
    total = torch.zeros((), dtype=torch.float64)
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            total += in_bin.sum() * (labels[in_bin].mean() - probs[in_bin].mean()).abs()
    return float(total / max(len(probs), 1))


def reward_eval_metrics(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor
) -> dict[str, float]:
    """A reward model's held-out metrics from its scores of N pairs, each argument (N,) float64.

    ``eval/accuracy``, ``eval/loss`` (Bradley–Terry with ``margin``), ``eval/ece``
    (:func:`pairwise_ece`), ``eval/margin`` (mean r⁺ − r⁻), ``eval/reward_mean`` and
    ``eval/reward_std`` (over both sides: z-scoring downstream) and ``eval/pairs``.
    """
    loss, stats = bradley_terry_loss(chosen, rejected, margin)
    both = torch.cat([chosen, rejected])
    return {
        "eval/accuracy": float(stats["accuracy"]),
        "eval/loss": float(loss),
        "eval/ece": pairwise_ece(chosen - rejected),
        "eval/margin": float(stats["reward_gap"]),
        "eval/reward_mean": float(both.mean()),
        "eval/reward_std": float(both.std()) if len(both) > 1 else 0.0,
        "eval/pairs": float(len(chosen)),
    }


class NonFiniteError(RuntimeError):
    """A loss or gradient norm that is NaN or infinite (the job fails; nothing after it is saved)."""

    code = "nan_loss"

    def __init__(self, step: int, name: str, value: float):
        self.step, self.name, self.value = step, name, value
        super().__init__(f"non-finite {name} ({value}) at step {step}")


FAULT_NAN_STEP = "STUDIO_FAULT_NAN_STEP"
"""Test-only: ``STUDIO_FAULT_NAN_STEP=k`` makes :func:`check_finite` see a NaN in its first value at step k."""
FAULT_STEP_SLEEP = "STUDIO_FAULT_STEP_SLEEP_S"
"""Test-only: ``STUDIO_FAULT_STEP_SLEEP_S=x`` sleeps x seconds in every :func:`check_finite` call, so a
test can stop or kill a job in the middle of a run. Never set either outside tests."""


def check_finite(step: int, **values: float | torch.Tensor) -> None:
    """Raise :class:`NonFiniteError` for the first NaN/inf among ``values`` (syncs the device).

    Every recipe calls it once per optimizer step, before the update; the two test-only fault
    variables above act here, so they work for every recipe.
    """
    values = _inject_faults(step, values)
    for name, value in values.items():
        number = float(value)
        if not math.isfinite(number):
            raise NonFiniteError(step, name, number)


def _inject_faults(step: int, values: dict[str, float | torch.Tensor]) -> dict[str, float | torch.Tensor]:
    sleep = os.environ.get(FAULT_STEP_SLEEP)
    if sleep:
        time.sleep(float(sleep))
    nan_step = os.environ.get(FAULT_NAN_STEP)
    if nan_step and values and int(nan_step) == step:
        first = next(iter(values))
        return {**values, first: float("nan")}
    return values
