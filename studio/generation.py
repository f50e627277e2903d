"""Candidate responses for annotation and the arena: batched, seeded, reproducible HF generation.

Every generation is stored with its sampling settings and seed, so the same settings must give the
same texts: batch ``i`` is sampled after ``torch.manual_seed(params.seed + i)`` and that seed is
recorded on each of its samples. Models are loaded once per process through :class:`ModelCache`.

No gradio and no database here; the services layer stores what this returns.
"""

from __future__ import annotations

import functools
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteriaList

from trainers.models import load_causal_lm, resolve_model

_GENERATE_LOCK = threading.Lock()
"""``torch.manual_seed`` is process-global: two concurrent calls would interleave their random
streams and lose reproducibility. Generation is compute-bound, so serialising costs nothing."""

PromptInput = str | list[dict[str, str]]
"""Plain text, or chat messages ``[{"role": ..., "content": ...}, ...]``."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample; ``temperature == 0`` means greedy decoding.

    ``min_new_tokens`` (0 = off) suppresses EOS until that many tokens exist; benchmarks use it
    to generate exactly ``max_new_tokens`` tokens.
    """

    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 128
    samples_per_prompt: int = 1
    seed: int = 0
    batch_size: int = 8
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 1 <= self.max_new_tokens <= 4096:
            raise ValueError(f"max_new_tokens must be between 1 and 4096, got {self.max_new_tokens}")
        if not 1 <= self.samples_per_prompt <= 16:
            raise ValueError(f"samples_per_prompt must be between 1 and 16, got {self.samples_per_prompt}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be between 0 and max_new_tokens ({self.max_new_tokens}), "
                f"got {self.min_new_tokens}"
            )

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    def to_dict(self) -> dict[str, Any]:
        """The settings stored with each generation (the seed is stored per sample)."""
        settings: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
        }
        if self.min_new_tokens:
            settings["min_new_tokens"] = self.min_new_tokens
        return settings


def random_seed() -> int:
    """A fresh seed for a run that did not ask for one; it is stored with every sample."""
    return secrets.randbelow(2**31)


@dataclass(frozen=True)
class GeneratedText:
    """One sample. ``finish_reason`` is "eos" (the model stopped) or "length" (cut at max_new_tokens)."""

    text: str
    num_tokens: int
    finish_reason: str
    seed: int
    sample_index: int


@dataclass(eq=False)
class LoadedModel:
    """A model ready for :func:`generate`, with the folder it was loaded from."""

    path: Path
    model: Any
    tokenizer: Any


class ModelCache:
    """Loads each model once per process and keeps the ``max_models`` most recently used.

    Thread-safe: concurrent ``get`` calls for the same model load it once (the lock is held during
    the load, which takes about a second for SmolLM2 from safetensors).
    """

    def __init__(
        self,
        cache_dir: Path | None = None,
        max_models: int = 2,
        *,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
    ) -> None:
        if max_models < 1:
            raise ValueError(f"max_models must be >= 1, got {max_models}")
        self.cache_dir = cache_dir
        self.max_models = max_models
        self.dtype = dtype
        self.device = device
        self.loads = 0
        self._models: OrderedDict[Path, LoadedModel] = OrderedDict()
        self._resolved: dict[str, Path] = {}
        self._lock = threading.Lock()

    def get(self, ref: str) -> LoadedModel:
        """The loaded model for a folder, default model name or hub id (see ``resolve_model``)."""
        with self._lock:
            path = self._resolved.get(ref)
            if path is None:
                path = resolve_model(ref, self.cache_dir)
                self._resolved[ref] = path
            loaded = self._models.get(path)
            if loaded is None:
                model, tokenizer = load_causal_lm(path, dtype=self.dtype, device=self.device)
                loaded = LoadedModel(path=path, model=model, tokenizer=tokenizer)
                self.loads += 1
                self._models[path] = loaded
                while len(self._models) > self.max_models:
                    self._models.popitem(last=False)
            self._models.move_to_end(path)
            return loaded

    def __contains__(self, path: object) -> bool:
        return path in self._models

    def __len__(self) -> int:
        return len(self._models)


def _prompt_text(tokenizer: Any, prompt: PromptInput) -> str:
    """Render a prompt with the chat template when there is one (plain text = one user message)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if isinstance(prompt, str):
        return prompt
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def _eos_ids(loaded: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for value in (loaded.model.generation_config.eos_token_id, loaded.tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(value)
    return ids


def _scaled(
    progress: Callable[[float, int], None], start: int, size: int, total: int, fraction: float
) -> None:
    progress(start + size * fraction, total)


class _StepProgress:
    """A stopping criterion that never stops: it reports decoding steps, so a single long batch
    still moves the progress bar (a batch of SmolLM2 on CPU can take a minute)."""

    def __init__(self, report: Callable[[float], None], max_new_tokens: int, prompt_length: int):
        self.report, self.max_new_tokens, self.prompt_length = report, max_new_tokens, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.report(min(1.0, (input_ids.shape[1] - self.prompt_length) / self.max_new_tokens))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def generate(
    loaded: LoadedModel,
    prompts: Sequence[PromptInput],
    params: SamplingParams,
    progress: Callable[[float, int], None] | None = None,
) -> list[list[GeneratedText]]:
    """Sample ``params.samples_per_prompt`` responses per prompt; one list per prompt, in input order.

    Sequences are (prompt, sample) pairs in prompt-major order, cut into batches of
    ``params.batch_size``; batch ``i`` uses seed ``params.seed + i``. ``progress(done, total)`` is
    called after every decoding step with counts of sequences (``done`` is fractional within a batch).
    """
    tokenizer, model = loaded.tokenizer, loaded.model
    tokenizer.padding_side = "left"
    has_template = bool(getattr(tokenizer, "chat_template", None))
    texts = [_prompt_text(tokenizer, p) for p in prompts]
    sequences = [(i, s) for i in range(len(prompts)) for s in range(params.samples_per_prompt)]
    eos_ids = _eos_ids(loaded)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    options: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens,
        "do_sample": params.do_sample,
        "pad_token_id": pad_id,
        "eos_token_id": sorted(eos_ids),
    }
    if params.do_sample:  # top_k=0: nucleus sampling only, as the recorded settings say
        options.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
    else:  # unset the model's sampling defaults so greedy decoding does not warn about them
        options.update(temperature=None, top_p=None, top_k=None)
    if params.min_new_tokens:
        options["min_new_tokens"] = params.min_new_tokens

    results: list[list[GeneratedText | None]] = [[None] * params.samples_per_prompt for _ in prompts]
    total = len(sequences)
    with _GENERATE_LOCK:
        for batch_index, start in enumerate(range(0, total, params.batch_size)):
            batch = sequences[start : start + params.batch_size]
            encoded = tokenizer(
                [texts[i] for i, _ in batch],
                return_tensors="pt",
                padding=True,
                add_special_tokens=not has_template,
            ).to(model.device)
            seed = params.seed + batch_index
            torch.manual_seed(seed)
            extra: dict[str, Any] = {}
            if progress is not None:
                step = _StepProgress(
                    functools.partial(_scaled, progress, start, len(batch), total),
                    params.max_new_tokens,
                    encoded["input_ids"].shape[1],
                )
                extra["stopping_criteria"] = StoppingCriteriaList([step])
            output = model.generate(**encoded, **options, **extra)
            new_tokens = output[:, encoded["input_ids"].shape[1] :].tolist()
            for (prompt_index, sample_index), tokens in zip(batch, new_tokens, strict=True):
                end = next((k for k, token in enumerate(tokens) if token in eos_ids), None)
                kept = tokens if end is None else tokens[:end]
                results[prompt_index][sample_index] = GeneratedText(
                    text=tokenizer.decode(kept, skip_special_tokens=True),
                    num_tokens=len(kept),
                    finish_reason="length" if end is None else "eos",
                    seed=seed,
                    sample_index=sample_index,
                )
            if progress is not None:
                progress(start + len(batch), total)
    return results  # type: ignore[return-value]
