"""Candidate generation: sample responses for a project's prompts and pair them for annotation.

Models load once through a `ModelCache`; every chunk of prompts is written in its own
transaction (its generations and comparisons together), so a long run keeps what it finished.
Candidate pairs are two samples of one model, or one sample each from two checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from storage import crud
from storage.annotation_queue import overlap_selected
from storage.db import Database
from storage.models import Checkpoint, CheckpointKind, CheckpointStatus, Project
from storage.preference_store import is_import_placeholder
from studio.services.errors import ServiceError
from studio.settings import Settings

if TYPE_CHECKING:
    from studio.generation import ModelCache, SamplingParams

Pairing = Literal["none", "two_samples", "two_checkpoints"]
Selection = Literal["missing", "all"]
Progress = Callable[[float, str], None]

DEFAULT_MODEL_NAMES = {"smollm2": "SmolLM2-135M-Instruct (base)"}


@dataclass(frozen=True)
class ModelChoice:
    checkpoint_id: int
    name: str
    path: str
    recipe: str | None

    @property
    def label(self) -> str:
        return f"{self.name} [#{self.checkpoint_id}]"


@dataclass
class GenerationReport:
    prompts: int = 0
    generations: int = 0
    comparisons: int = 0
    identical_pairs: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    seed: int | None = None
    models: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        if not self.prompts:
            return "No prompts matched: nothing was generated."
        text = (
            f"Generated {self.generations} response(s) for {self.prompts} prompt(s) with "
            f"{' and '.join(self.models)} in {self.seconds:.1f} s ({self.tokens_per_second:.1f} new tokens/s, "
            f"seed {self.seed}); "
            f"{self.comparisons} candidate pair(s) created"
        )
        if self.identical_pairs:
            text += f"; {self.identical_pairs} pair(s) with identical responses left out"
        return text + "."


class GenerationService:
    def __init__(self, db: Database, settings: Settings, cache: ModelCache | None = None):
        self.db = db
        self.settings = settings
        self._cache = cache
        self._cache_lock = threading.Lock()

    @property
    def cache(self) -> ModelCache:
        # torch and transformers are imported on first use, not at studio start.
        with self._cache_lock:
            if self._cache is None:
                from studio.generation import ModelCache

                self._cache = ModelCache(cache_dir=self.settings.model_cache)
            return self._cache

    # ----------------------------------------------------------------------- models

    def ensure_default_model(self) -> ModelChoice:
        ref = self.settings.default_model
        name = DEFAULT_MODEL_NAMES.get(ref.lower(), f"{Path(ref).name or ref} (base)")
        return self._checkpoint_for(ref, name=name, recipe="base")

    def _checkpoint_for(self, ref: str, *, name: str, recipe: str) -> ModelChoice:
        """The policy checkpoint row for a model reference: looked up in a read, created once."""
        with self.db.read() as s:
            row = crud.find_checkpoint(s, path=ref, kind=CheckpointKind.policy)
        if row is None:
            try:
                with self.db.write() as s:
                    row = crud.get_or_create_checkpoint(s, path=ref, name=name, recipe=recipe)
            except IntegrityError:  # created by a concurrent request in between
                with self.db.read() as s:
                    row = crud.find_checkpoint(s, path=ref, kind=CheckpointKind.policy)
        return _choice(row)

    def models(self, project_id: int | None = None) -> list[ModelChoice]:
        """Policy checkpoints that can generate: the default model first, then the rest by id."""
        default = self.ensure_default_model()
        with self.db.read() as s:
            rows = crud.list_checkpoints(s, kind=CheckpointKind.policy, project_id=project_id)
        others = [
            _choice(r)
            for r in rows
            if r.id != default.checkpoint_id and r.status == "ready" and not is_import_placeholder(r.path)
        ]
        return [default, *others]

    def register_model(self, ref: str, *, name: str | None = None) -> ModelChoice:
        """Add a policy model by reference (local folder or HF id); it must resolve now."""
        from trainers.models import ModelNotFoundError, resolve_model

        ref = (ref or "").strip()
        if not ref:
            raise ServiceError("model reference is empty: give a local folder or an HF model id")
        try:
            resolve_model(ref, self.settings.model_cache)
        except ModelNotFoundError as exc:
            raise ServiceError(str(exc)) from None
        # Models are studio-wide: one registered in any project can generate in every project.
        return self._checkpoint_for(ref, name=name or Path(ref).name or ref, recipe="external")

    def check_loadable(self, ck: Checkpoint) -> None:
        """Refuse a checkpoint marked unloadable, and re-hash a trained one against the manifest digest
        recorded at registration before its weights are read (R-JOB-07); a mismatch marks it unloadable."""
        from studio.services.job_support import checkpoint_facts

        if ck.status == CheckpointStatus.unloadable:
            raise ServiceError(f"{ck.name} is unloadable: its files do not match its manifest")
        if not ck.manifest_sha256:  # a base model by name or folder: nothing was registered to check
            return
        problem = checkpoint_facts(ck.path, ck.manifest_sha256).problem
        if problem:
            with self.db.write() as s:
                s.execute(
                    sa.update(Checkpoint)
                    .where(Checkpoint.id == ck.id)
                    .values(status=CheckpointStatus.unloadable)
                )
            raise ServiceError(f"{ck.name} is unloadable and was not loaded: {problem}")

    # ----------------------------------------------------------------------- generation

    def run(
        self,
        project_id: int,
        *,
        checkpoint_id: int,
        params: SamplingParams,
        pairing: Pairing = "two_samples",
        second_checkpoint_id: int | None = None,
        selection: Selection = "missing",
        tag: str | None = None,
        limit: int | None = None,
        progress: Progress | None = None,
    ) -> GenerationReport:
        """Generate responses for the selected prompts and store them (and candidate pairs)."""
        from studio.generation import generate

        progress = progress or (lambda _f, _d: None)
        if pairing not in ("none", "two_samples", "two_checkpoints"):
            raise ServiceError(f"unknown pairing {pairing!r}")
        if pairing == "two_checkpoints" and (
            second_checkpoint_id is None or second_checkpoint_id == checkpoint_id
        ):
            raise ServiceError("pairing two checkpoints needs a second, different model")
        n = params.samples_per_prompt
        if pairing == "two_samples" and n < 2:
            n = 2  # a pair needs two samples of the same model
            params = dataclasses.replace(params, samples_per_prompt=2)

        with self.db.read() as s:
            project = s.get(Project, project_id)
            if project is None:
                raise ServiceError(f"project {project_id} does not exist")
            ckpt_ids = [checkpoint_id] + ([second_checkpoint_id] if pairing == "two_checkpoints" else [])
            ckpts = [s.get(Checkpoint, cid) for cid in ckpt_ids]
            for cid, ck in zip(ckpt_ids, ckpts, strict=True):
                if ck is None or ck.kind != CheckpointKind.policy:
                    raise ServiceError(f"checkpoint {cid} is not a policy model")
            prompts = crud.select_prompts_for_generation(
                s,
                project_id=project_id,
                tag=tag or None,
                without_generations_from=checkpoint_id if selection == "missing" else None,
                limit=limit or None,
            )
            overlap = (project.overlap_fraction, project.overlap_k)

        report = GenerationReport(models=[c.name for c in ckpts])
        if not prompts:
            return report
        progress(0.0, f"loading {report.models[0]}")
        loaded = []
        for ck in ckpts:
            self.check_loadable(ck)
            try:
                loaded.append(self.cache.get(ck.path))
            except ValueError as exc:  # ModelNotFoundError is a ValueError
                raise ServiceError(f"cannot load {ck.name}: {exc}") from None

        chunk = max(1, params.batch_size // n)
        report.seed = params.seed
        chunk_seed = params.seed
        started = time.perf_counter()
        for start in range(0, len(prompts), chunk):
            batch = prompts[start : start + chunk]
            # Continue the batch numbering across chunks: every batch of the run gets its own seed.
            chunk_params = dataclasses.replace(params, seed=chunk_seed)
            chunk_seed += math.ceil(len(batch) * n / params.batch_size)
            inputs = [p.messages if p.messages else p.text for p in batch]
            outputs = []
            size = len(batch)
            for k, model in enumerate(loaded):
                # Overall fraction: finished chunks, plus this chunk's share of this model's work.
                def step(done: float, total: int, k=k, start=start, size=size) -> None:
                    part = (k + done / total) / len(loaded)
                    progress((start + size * part) / len(prompts), f"{start}/{len(prompts)} prompts")

                outputs.append(generate(model, inputs, chunk_params, progress=step))
            self._store(project_id, batch, ckpts, outputs, params, pairing, overlap, report)
            progress((start + size) / len(prompts), f"{start + size}/{len(prompts)} prompts")
        report.seconds = time.perf_counter() - started
        return report

    def _store(self, project_id, batch, ckpts, outputs, params, pairing, overlap, report) -> None:
        settings = params.to_dict()
        with self.db.write() as s:
            for i, prompt in enumerate(batch):
                per_model = []
                for ck, out in zip(ckpts, outputs, strict=True):
                    gens = []
                    for sample in out[i]:
                        gens.append(
                            crud.add_generation(
                                s,
                                prompt_id=prompt.id,
                                checkpoint_id=ck.id,
                                text=sample.text,
                                params=settings,
                                seed=sample.seed,
                                sample_index=sample.sample_index,
                                num_tokens=sample.num_tokens,
                                finish_reason=sample.finish_reason,
                            )
                        )
                        report.new_tokens += sample.num_tokens
                    per_model.append(gens)
                report.generations += sum(len(g) for g in per_model)
                report.prompts += 1
                for a, b in _pairs(per_model, pairing):
                    if a.text == b.text:
                        report.identical_pairs += 1  # nothing to judge; never shown
                        continue
                    rng = random.Random(f"{params.seed}:{a.id}:{b.id}")
                    fraction, k = overlap
                    comparison = crud.add_comparison(
                        s,
                        project_id=project_id,
                        prompt_id=prompt.id,
                        generation_a_id=a.id,
                        generation_b_id=b.id,
                        a_on_left=rng.random() < 0.5,
                    )
                    # The overlap share is picked by the stable hash that `set_overlap` and the
                    # segment queue use, so the same items need k annotators whichever set them.
                    if overlap_selected(project_id, comparison.id, fraction):
                        comparison.required_votes = k
                    report.comparisons += 1


def _pairs(per_model: list[list], pairing: str) -> list[tuple]:
    """Candidate pairs: consecutive samples of one model, or sample i of model A with sample i of B."""
    if pairing == "two_samples":
        gens = per_model[0]
        return [(gens[j], gens[j + 1]) for j in range(0, len(gens) - 1, 2)]
    if pairing == "two_checkpoints":
        return list(zip(per_model[0], per_model[1], strict=False))
    return []


def _choice(row: Checkpoint) -> ModelChoice:
    return ModelChoice(checkpoint_id=row.id, name=row.name, path=row.path, recipe=row.recipe)
