"""Reward model vs humans: how often a reward model prefers the response the arena's raters chose.

`RMAgreementService(db, settings, users)`, ``services.rm_agreement``:

- `reward_models(project_id)`: the ready reward checkpoints (kinds ``reward`` and ``segment_reward``)
  of the project (and studio-wide ones), newest first; the first is the default everywhere below.
- `refresh(username, project_id, reward_checkpoint_id=None) -> int` (admin): scores the generations
  of the project's counted arena battles that this reward model has not scored yet. They go to a
  temporary JSONL file, ``python -m trainers score`` scores them in a subprocess (the studio never
  imports the trainers' torch code; the child verifies the checkpoint against the manifest digest
  recorded at registration, and formats and scores exactly as the RL recipes' reward sources do), and
  the scores are stored in one transaction. A failing child is a ServiceError carrying its
  ``error[code]`` line; altered checkpoint files also mark the checkpoint unloadable, as generation does.
- `agreement(username, project_id, reward_checkpoint_id=None) -> list[PairAgreement]` (any signed-in
  user): per unordered checkpoint pair, the decisive human votes (a or b; ties and both-bad are left
  out), how many of them the reward model agrees with (it scored the chosen side strictly higher; equal
  scores count as disagreement), the rate and its Wilson 95 % interval; the overall row comes last.

The counting is the pure function :func:`pair_agreement`.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import sqlalchemy as sa
from sqlmodel import Session, select

from storage import reward_scores as store
from storage.arena import checkpoint_names, counted_battles
from storage.db import Database
from storage.jobs import set_checkpoint_status
from storage.models import Checkpoint, CheckpointKind, CheckpointStatus
from storage.reward_scores import ScoreInput
from studio.quality import wilson_interval
from studio.services.annotation_admin import project_or_404
from studio.services.errors import NotFound, ServiceError
from studio.services.job_support import checkpoint_facts, child_env, last_error_line
from studio.services.users import UserService
from studio.settings import Settings

REWARD_KINDS = (CheckpointKind.reward, CheckpointKind.segment_reward)
DEFAULT_TIMEOUT_S = 1800.0
"""Longest a scoring subprocess may run (thousands of responses on a CPU take minutes)."""
BAD_CHECKPOINT_EXIT = 5
"""``python -m trainers``'s exit status for an incomplete, altered or unloadable checkpoint."""


# --------------------------------------------------------------------------- the pure counting


@dataclass(frozen=True)
class JudgedBattle:
    """One human vote on an arena battle, with the reward model's scores of both sides.

    ``model_a`` / ``model_b`` are the checkpoints of the comparison's generations A and B; ``outcome``
    (a | b | tie | both_bad) is in the same terms. A score is None while the generation is unscored.
    """

    model_a: int
    model_b: int
    outcome: str
    score_a: float | None
    score_b: float | None


@dataclass(frozen=True)
class PairAgreement:
    """Agreement of the reward model with the raters on one unordered checkpoint pair.

    ``model_a < model_b`` (checkpoint ids); both are None on the overall row.
    """

    model_a: int | None
    model_b: int | None
    decisive_votes: int
    """Votes for a or b whose two generations both have a reward-model score."""
    agree: int
    """Of those, the votes where the reward model scored the chosen side strictly higher."""
    rate: float | None
    """agree / decisive_votes; None without decisive votes."""
    lower: float | None
    upper: float | None
    """Wilson 95 % interval of ``rate``; None without decisive votes."""
    unscored: int = 0
    """Decisive votes left out because a side has no score yet (an admin's refresh scores them)."""
    name_a: str = ""
    name_b: str = ""

    @property
    def overall(self) -> bool:
        return self.model_a is None


def rm_choice(score_a: float, score_b: float) -> str | None:
    """The side the reward model prefers: ``a``, ``b``, or None for equal scores."""
    if score_a > score_b:
        return "a"
    if score_b > score_a:
        return "b"
    return None


def _row(pair: tuple[int, int] | None, decisive: int, agree: int, unscored: int) -> PairAgreement:
    lo, hi = wilson_interval(agree, decisive)
    rate = agree / decisive if decisive else None
    return PairAgreement(
        model_a=pair[0] if pair else None,
        model_b=pair[1] if pair else None,
        decisive_votes=decisive,
        agree=agree,
        rate=rate,
        lower=None if math.isnan(lo) else lo,
        upper=None if math.isnan(hi) else hi,
        unscored=unscored,
    )


def pair_agreement(battles: Sequence[JudgedBattle]) -> list[PairAgreement]:
    """Per unordered checkpoint pair, how often the reward model agrees with decisive human votes.

    A vote counts when its outcome is ``a`` or ``b`` (ties and both-bad say nothing about which side
    is better) and both sides are scored; it agrees when :func:`rm_choice` equals the outcome, so equal
    scores are a disagreement. Rows are sorted by (model_a, model_b), with the overall row (all pairs)
    last; it is present even without votes.
    """
    counts: dict[tuple[int, int], list[int]] = {}
    for b in battles:
        if b.outcome not in ("a", "b"):
            continue
        tally = counts.setdefault((min(b.model_a, b.model_b), max(b.model_a, b.model_b)), [0, 0, 0])
        if b.score_a is None or b.score_b is None:
            tally[2] += 1
            continue
        tally[0] += 1
        tally[1] += int(rm_choice(b.score_a, b.score_b) == b.outcome)
    rows = [_row(pair, *counts[pair]) for pair in sorted(counts)]
    totals = [sum(c[i] for c in counts.values()) for i in range(3)]
    return [*rows, _row(None, *totals)]


# --------------------------------------------------------------------------- the service


class RMAgreementService:
    """See the module docstring. ``python``: the interpreter that runs ``-m trainers score``;
    ``cpu``: score on the CPU even where a GPU is present."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        users: UserService,
        *,
        python: str = sys.executable,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        batch_size: int = 16,
        cpu: bool = False,
    ):
        self.db = db
        self.settings = settings
        self.users = users
        self.python = python
        self.timeout_s = timeout_s
        self.batch_size = batch_size
        self.cpu = cpu

    # ----------------------------------------------------------------------- reading

    def reward_models(self, project_id: int) -> list[tuple[int, str]]:
        """``[(checkpoint id, name)]`` of the project's ready reward models, newest first."""
        with self.db.read() as s:
            project_or_404(s, project_id)
            return [(c.id, c.name) for c in _reward_checkpoints(s, project_id)]

    def agreement(
        self, username: str | None, project_id: int, reward_checkpoint_id: int | None = None
    ) -> list[PairAgreement]:
        """Agreement rows per checkpoint pair plus the overall row (see :func:`pair_agreement`), with
        checkpoint names; the default reward model is the newest (:meth:`reward_models`)."""
        self.users.require(username)
        with self.db.read() as s:
            project_or_404(s, project_id)
            rm = _resolve(s, project_id, reward_checkpoint_id)
            judged = counted_battles(s, project_id=project_id)
            generation_ids = {g for j in judged for g in (j.generation_a_id, j.generation_b_id)}
            scores = store.get_scores(s, checkpoint_id=rm.id, generation_ids=generation_ids)
            names = checkpoint_names(s, {c for j in judged for c in (j.model_a, j.model_b)})
        battles = [
            JudgedBattle(j.model_a, j.model_b, j.outcome, scores.get(j.generation_a_id),
                         scores.get(j.generation_b_id))
            for j in judged
        ]  # fmt: skip
        return [
            replace(r, name_a=names.get(r.model_a, ""), name_b=names.get(r.model_b, ""))
            for r in pair_agreement(battles)
        ]

    # ----------------------------------------------------------------------- scoring

    def refresh(self, username: str | None, project_id: int, reward_checkpoint_id: int | None = None) -> int:
        """Score the project's not-yet-scored arena generations with the reward model (admin); returns
        how many scores were stored (0 when everything was scored already: no subprocess then)."""
        self.users.require(username, "admin")
        with self.db.read() as s:
            project_or_404(s, project_id)
            rm = _resolve(s, project_id, reward_checkpoint_id)
            judged = counted_battles(s, project_id=project_id)
            ids = {g for j in judged for g in (j.generation_a_id, j.generation_b_id)}
            inputs = store.score_inputs(s, store.unscored(s, checkpoint_id=rm.id, generation_ids=ids))
        if not inputs:
            return 0
        scores = self._run_scorer(rm, inputs)
        with self.db.write() as s:
            return store.upsert_scores(s, checkpoint_id=rm.id, scores=scores)

    def _run_scorer(self, rm: Checkpoint, inputs: Sequence[ScoreInput]) -> dict[int, float]:
        """``python -m trainers score`` over ``inputs`` → ``{generation id: score}``."""
        with tempfile.TemporaryDirectory(prefix="rm-scores-") as tmp:
            source, output = Path(tmp) / "generations.jsonl", Path(tmp) / "scores.jsonl"
            with source.open("w", encoding="utf-8") as handle:
                for item in inputs:
                    row = {"id": item.generation_id, "prompt": item.prompt, "response": item.response}
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            command = [self.python, "-m", "trainers", "score", "--checkpoint", rm.path, "--input", str(source),
                       "--output", str(output), "--batch-size", str(self.batch_size)]  # fmt: skip
            if rm.manifest_sha256:
                command += ["--manifest-sha256", rm.manifest_sha256]
            if self.cpu:
                command.append("--cpu")
            try:
                proc = subprocess.run(command, capture_output=True, text=True, timeout=self.timeout_s,
                                      env=child_env(), stdin=subprocess.DEVNULL)  # fmt: skip
            except subprocess.TimeoutExpired:
                raise ServiceError(
                    f"scoring with {rm.name} took longer than {self.timeout_s:g} s and was stopped"
                ) from None
            if proc.returncode != 0:
                if proc.returncode == BAD_CHECKPOINT_EXIT:
                    self._mark_if_altered(rm)
                raise ServiceError(f"scoring with {rm.name} failed: {last_error_line(proc.stderr)}")
            return _read_scores(output, {i.generation_id for i in inputs})

    def _mark_if_altered(self, rm: Checkpoint) -> None:
        """Mark the checkpoint unloadable when its files no longer match the registered manifest."""
        if rm.manifest_sha256 and checkpoint_facts(rm.path, rm.manifest_sha256).problem:
            with self.db.write() as s:
                set_checkpoint_status(s, rm.id, CheckpointStatus.unloadable)


# --------------------------------------------------------------------------- helpers


def _reward_checkpoints(s: Session, project_id: int) -> list[Checkpoint]:
    stmt = (
        select(Checkpoint)
        .where(
            Checkpoint.kind.in_(REWARD_KINDS),
            Checkpoint.status == CheckpointStatus.ready,
            sa.or_(Checkpoint.project_id == project_id, Checkpoint.project_id.is_(None)),
        )
        .order_by(Checkpoint.created_at.desc(), Checkpoint.id.desc())
    )
    return list(s.exec(stmt).all())


def _resolve(s: Session, project_id: int, reward_checkpoint_id: int | None) -> Checkpoint:
    """The chosen reward model (one of :func:`_reward_checkpoints`), or the newest one."""
    models = _reward_checkpoints(s, project_id)
    if reward_checkpoint_id is None:
        if not models:
            raise ServiceError(
                "this project has no reward model yet: train one (reward_model or segment_reward_model) first"
            )
        return models[0]
    for model in models:
        if model.id == reward_checkpoint_id:
            return model
    raise NotFound(f"checkpoint {reward_checkpoint_id} is not a ready reward model of this project")


def _read_scores(path: Path, expected: set[int]) -> dict[int, float]:
    """The child's output, checked: exactly the requested ids, each with a finite number."""
    scores: dict[int, float] = {}
    try:
        for line in filter(None, path.read_text(encoding="utf-8").split("\n")):  # not splitlines: U+2028
            row = json.loads(line)
            scores[int(row["id"])] = float(row["score"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ServiceError(f"the scorer's output could not be read: {exc}") from exc
    if set(scores) != expected or not all(math.isfinite(v) for v in scores.values()):
        raise ServiceError("the scorer's output does not match the generations it was given")
    return scores
