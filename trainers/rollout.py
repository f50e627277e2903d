"""ESRL stage 1: sample responses from a causal LM under ``no_grad`` with the KV cache (algorithms.md §3.2, §5.1).

:func:`rollout` is our own decoding loop (the model's forward with ``past_key_values``, not
``model.generate``), so that the distribution a token is drawn from is known exactly:

1. the raw next-token logits of the last position, in float32;
2. the caller's logits processors, in order — each a callable ``(step, logits) → logits`` on the
   (B, V) logits of response step ``step`` (0-based), e.g. NLPO's top-p action mask;
3. the sampling processors of :class:`SamplingConfig` (:func:`sampling_processors`): EOS
   suppression (fixed length, or before ``min_new_tokens``), temperature, top-k, top-p;
4. a draw from softmax of the result (Gumbel-max), or its argmax when ``temperature == 0``.

``logprobs`` are the log softmax of step 3's logits at the drawn token — the behaviour policy, π_old
for PPO (no top-k mismatch, §1.12). :func:`trainers.teacher_forced.score_tokens` given the same
processors recomputes them in one teacher-forced pass (stage 2, with grad). ``raw_logprobs`` are
the unprocessed model's, for the KL to the reference (§1.3).

Prompts are left-padded (:func:`left_pad`); positions count real tokens only (HF's
``cumsum(mask) − 1``), so a row's tokens and log-probs do not depend on the padding around it.
Responses are right-padded: once a row has emitted an EOS (``stop_at_eos``) it is finished, later
steps hold ``pad_token_id`` with ``response_mask`` False, and the loop stops when every row is done.

Randomness: ``generator`` may be one ``torch.Generator`` per row; each row then draws its noise from
its own stream, so a row samples the same tokens whatever else is in the batch (batch-size and
padding invariant, and reproducible on resume: e.g. seed row i from (run seed, iteration, row index)). The
caller puts the model in eval mode (dropout off).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from trainers.config import ConfigFieldError, bounded

LogitsProcessor = Callable[[int, torch.Tensor], torch.Tensor]
"""``(step, logits) → logits`` on float32 (B, V) logits of response step ``step``; ``-inf`` bans a token.

It returns a new tensor (never edits its input in place: stage 1 still reads the raw logits, and
stage 2 differentiates through the processors).

In stage 2 (:mod:`trainers.teacher_forced`) a processor must be a pure function of its arguments:
it is called once per step in order, and again for the same step when a chunk is recomputed in
backward. A processor whose mask depends on the sampled tokens records it in stage 1 and replays
it by ``step`` in stage 2 (as RL4LMs stores NLPO's per-transition masks).
"""


class ChunkProcessor:
    """A :data:`LogitsProcessor` that can also process ``c`` consecutive steps in one call.

    ``fn(first_step, logits)`` takes (B, c, V) logits of steps ``first_step … first_step + c − 1``.
    Called as a plain processor (stage 1, one step) it sees (B, 1, V). Stage 2 hands a whole chunk
    of steps to a chain made only of these (:func:`apply_chunk`): one tensor op per processor instead
    of one per step and processor, which is most of NLPO's replay cost.
    """

    def __init__(
        self,
        fn: Callable[[int, torch.Tensor], torch.Tensor],
        in_place: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.fn = fn
        self.in_place = in_place
        """The same on a tensor the caller owns, edited in place (no (B, c, V) copy), or None."""

    def __call__(self, step: int, logits: torch.Tensor) -> torch.Tensor:
        return self.fn(step, logits.unsqueeze(-2)).squeeze(-2)

    def chunk(self, first_step: int, logits: torch.Tensor) -> torch.Tensor:
        return self.fn(first_step, logits)


def apply_chunk(
    processors: Sequence[LogitsProcessor], first_step: int, logits: torch.Tensor, *, owned: bool = False
) -> torch.Tensor:
    """(B, c, V) logits of steps ``first_step …`` through ``processors``: chunk-wise when every one is a
    :class:`ChunkProcessor`, else step by step (same result).

    ``owned``: the caller's ``logits`` are a fresh tensor nobody else reads and autograd has not saved
    (stage 2's LM-head output), so processors may edit it in place; so may those after any processor
    that returned a new tensor.
    """
    if all(isinstance(p, ChunkProcessor) for p in processors):
        for process in processors:
            if owned and process.in_place is not None:
                logits = process.in_place(first_step, logits)
            else:
                new = process.chunk(first_step, logits)
                owned = owned or new is not logits
                logits = new
        return logits
    steps = []
    for j in range(logits.shape[1]):
        row = logits[:, j]
        for process in processors:
            row = process(first_step + j, row)
        steps.append(row)
    return torch.stack(steps, dim=1)


@runtime_checkable
class SequenceProcessor(Protocol):
    """A stage-1 logits processor that also follows the sequence (e.g. a mask model with its own cache).

    :func:`rollout` calls ``begin`` once with the padded prompts, the processor for each step, and
    ``advance`` with the tokens drawn at that step (``pad_token_id`` for finished rows).
    """

    def __call__(self, step: int, logits: torch.Tensor) -> torch.Tensor: ...

    def begin(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> None: ...

    def advance(self, step: int, tokens: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class SamplingConfig:
    """How stage 1 draws responses (nest it in a recipe config)."""

    max_new_tokens: int = bounded(24, ge=1)
    """Response length cap (RL4LMs ``max_episode_length``)."""
    min_new_tokens: int = bounded(0, ge=0)
    """EOS is suppressed before this many tokens (RL4LMs/HF ``min_length`` of the new tokens)."""
    stop_at_eos: bool = True
    """True: a row ends at its first EOS. False: fixed length — EOS is suppressed at every step and
    every row has exactly ``max_new_tokens`` tokens (RL4LMs' IMDB setting)."""
    temperature: float = bounded(1.0, ge=0)
    """Softmax temperature; 0 = greedy (argmax; log-probs are then those of the temperature-1
    processed distribution)."""
    top_k: int = bounded(0, ge=0)
    """Keep the k most likely tokens (ties at the k-th kept); 0 = off."""
    top_p: float = bounded(1.0, gt=0)
    """Nucleus: keep the most likely tokens until their mass reaches p (the one crossing p is kept);
    ≥ 1 = off."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigFieldError("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigFieldError(
                "min_new_tokens",
                f"must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}",
            )
        if self.temperature < 0 or self.top_k < 0 or not self.top_p > 0:
            raise ConfigFieldError("temperature", "temperature and top_k must be >= 0 and top_p > 0")


@dataclass(frozen=True)
class Rollout:
    """Stage-1 output: left-padded prompts and right-padded responses (no tensor requires grad).

    Attributes:
        prompt_ids: (B, P) long, left-padded.
        prompt_mask: (B, P) bool, True on real prompt tokens.
        response_ids: (B, T) long, T ≤ ``max_new_tokens``; ``pad_token_id`` after a row ended.
        response_mask: (B, T) bool, True on generated tokens (the EOS included).
        logprobs: (B, T) float32 log-prob of each token under the distribution it was drawn from
            (after all processors); 0 where ``response_mask`` is False. None unless requested.
        raw_logprobs: (B, T) float32 log-prob under the unprocessed model; 0 where masked. None
            unless requested.
        eos: (B,) bool, the row ended with an EOS.
        entropy: (B, T) float32 entropy of the distribution each token was drawn from (after all
            processors); 0 where masked. None unless requested.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor | None
    raw_logprobs: torch.Tensor | None
    eos: torch.Tensor
    entropy: torch.Tensor | None = None

    @property
    def input_ids(self) -> torch.Tensor:
        """(B, P + T) [prompt; response] ids."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P + T) long, 1 on real prompt and response tokens."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1).long()

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) long, number of response tokens per row."""
        return self.response_mask.sum(-1)


# ----------------------------------------------------------------------------- prompts


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists → (B, P) long ids left-padded with ``pad_token_id`` and (B, P) bool mask.

    Every prompt needs at least one token (a BOS or template token will do).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = True
    return ids, mask


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 0/1 mask → (B, L) long position ids counting real tokens only (padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# ----------------------------------------------------------------------------- processors


def suppress_tokens(token_ids: Sequence[int], before_step: int | None = None) -> ChunkProcessor:
    """Ban ``token_ids`` at steps < ``before_step`` (every step when None): EOS for min/fixed length."""
    banned = list(token_ids)

    def in_place(first_step: int, logits: torch.Tensor) -> torch.Tensor:
        n = (
            logits.shape[-2]
            if before_step is None
            else max(0, min(logits.shape[-2], before_step - first_step))
        )
        ids = torch.as_tensor(banned, device=logits.device)
        if n == logits.shape[-2]:  # the whole tensor, not a view: a view's in-place backward copies 3×
            return logits.index_fill_(-1, ids, float("-inf"))
        if n:
            logits[..., :n, :].index_fill_(-1, ids, float("-inf"))
        return logits

    def process(first_step: int, logits: torch.Tensor) -> torch.Tensor:
        if before_step is not None and first_step >= before_step:
            return logits  # nothing banned from here on: no copy
        return in_place(first_step, logits.clone())

    return ChunkProcessor(process, in_place)


def temperature_processor(temperature: float) -> ChunkProcessor:
    """Divide the logits by ``temperature`` > 0."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return ChunkProcessor(
        lambda step, logits: logits / temperature, lambda step, logits: logits.div_(temperature)
    )


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(…, V) → (…, V) bool: True on tokens whose logit is ≥ the k-th largest (ties kept)."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits >= kth


def top_p_mask(logits: torch.Tensor, p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """(…, V) → (…, V) bool nucleus of softmax(logits): the most likely tokens until their mass reaches p.

    A token is kept when the mass of the tokens ranked before it is < p, so the token that crosses p
    is kept and so is the argmax; the first ``min_tokens_to_keep`` ranked tokens always are (NLPO's
    ``learned_top_p`` rule, §1.7). Ties with the last kept logit are all kept (as :func:`top_k_mask`):
    the mask does not depend on how a sort orders equal logits, which bf16-trained models produce
    often. p ≥ 1 keeps everything (no rounding-error cut, §1.12).

    Only the threshold logit is needed, and a full sort of V = 49 152 logits costs ~20× a ``topk`` of
    128. So (:func:`_nucleus_threshold`) rows are ranked from the top with k = 128, then 1 024, 8 192
    (SmolLM2-135M-Instruct sampling review continuations at p 0.9: 58 % of rows need no more than
    128 tokens, 94 % no more than 1 024); rows that are near-flat (a random-init model) are ranked from
    the bottom instead, where their few excluded tokens are; what is still open gets one full sort.
    """
    if p >= 1:
        return torch.ones_like(logits, dtype=torch.bool)
    flat = logits.reshape(-1, logits.shape[-1]).float()
    return (flat >= _nucleus_threshold(flat, p, min_tokens_to_keep)).reshape(logits.shape)


NUCLEUS_TOP_K = (128, 1024, 8192)
"""Widths of the successive ``topk`` passes of :func:`_nucleus_threshold` from the top."""
FLAT_ROW_RATIO = 8.0
"""A row whose top-128 tokens are on average < 8× as likely as a uniform draw is near-flat: its
nucleus is most of the vocabulary, so it is ranked from the bottom."""


def _nucleus_threshold(flat: torch.Tensor, p: float, min_tokens: int) -> torch.Tensor:
    """(N, V) fp32 logits, 0 < p < 1 → (N, 1) the lowest kept logit of each row's nucleus (ties kept).

    From the top, the ``k`` ranked probabilities give each token's preceding mass (cumsum − itself)
    exactly as a full sort would, so the row is settled once the crossing token is among them. From
    the bottom, a token is kept iff the mass of itself and everything ranked below it is > 1 − p (the
    same condition; only the summation order differs, i.e. the last bits at the boundary).
    """
    vocab = flat.shape[-1]
    top = flat.max(dim=-1, keepdim=True).values
    total = torch.exp(flat - top).sum(-1, keepdim=True)  # softmax's own arithmetic
    threshold = torch.empty(flat.shape[0], 1, dtype=flat.dtype, device=flat.device)
    todo = torch.arange(flat.shape[0], device=flat.device)
    bottom = todo[:0]
    for k in (k for k in NUCLEUS_TOP_K if k < vocab):
        k = max(k, min_tokens)
        if not todo.numel() or k >= vocab:
            break
        ranked = torch.topk(flat[todo], k, dim=-1).values  # (n, k) descending
        probs = torch.exp(ranked - top[todo]) / total[todo]
        n_keep = ((probs.cumsum(-1) - probs) < p).sum(-1).clamp(min=min_tokens)
        done = n_keep < k  # the crossing token is inside the k ranked ones
        threshold[todo[done]] = ranked[done].gather(-1, (n_keep[done] - 1)[:, None])
        flat_rows = ~done & (probs.sum(-1) < FLAT_ROW_RATIO * k / vocab)
        bottom = torch.cat([bottom, todo[flat_rows]])
        todo = todo[~done & ~flat_rows]
    k = min(vocab - 1, max(NUCLEUS_TOP_K[1], vocab // 4))
    if bottom.numel() and k > 0:
        ranked = torch.topk(flat[bottom], k, dim=-1, largest=False).values  # (n, k) ascending
        tail = (torch.exp(ranked - top[bottom]) / total[bottom]).cumsum(-1)
        n_out = (tail <= 1 - p).sum(-1)
        done = (n_out < k) & (vocab - n_out >= min_tokens)
        threshold[bottom[done]] = ranked[done].gather(-1, n_out[done][:, None])
        todo = torch.cat([todo, bottom[~done]])
    elif bottom.numel():
        todo = torch.cat([todo, bottom])
    if todo.numel():
        ranked = torch.sort(flat[todo], dim=-1, descending=True).values
        probs = torch.exp(ranked - top[todo]) / total[todo]
        n_keep = ((probs.cumsum(-1) - probs) < p).sum(-1).clamp(min=min(min_tokens, vocab))
        threshold[todo] = ranked.gather(-1, (n_keep - 1)[:, None])
    return threshold


def top_k_processor(k: int) -> ChunkProcessor:
    """Set every logit outside :func:`top_k_mask` to −inf."""
    return ChunkProcessor(lambda step, logits: logits.masked_fill(~top_k_mask(logits, k), float("-inf")),
                          lambda step, logits: logits.masked_fill_(~top_k_mask(logits, k), float("-inf")))  # fmt: skip


def top_p_processor(p: float) -> ChunkProcessor:
    """Set every logit outside :func:`top_p_mask` to −inf."""
    return ChunkProcessor(lambda step, logits: logits.masked_fill(~top_p_mask(logits, p), float("-inf")),
                          lambda step, logits: logits.masked_fill_(~top_p_mask(logits, p), float("-inf")))  # fmt: skip


def sampling_processors(config: SamplingConfig, eos_token_ids: Sequence[int]) -> list[LogitsProcessor]:
    """The processors :func:`rollout` applies after the caller's: EOS ban, temperature, top-k, top-p.

    Pass ``[*your_processors, *sampling_processors(config, eos)]`` to stage 2 to score tokens under
    the distribution they were drawn from.
    """
    chain: list[LogitsProcessor] = []
    if eos_token_ids and not config.stop_at_eos:
        chain.append(suppress_tokens(eos_token_ids))
    elif eos_token_ids and config.min_new_tokens > 0:
        chain.append(suppress_tokens(eos_token_ids, before_step=config.min_new_tokens))
    if config.temperature > 0 and config.temperature != 1:
        chain.append(temperature_processor(config.temperature))
    if config.top_k > 0:
        chain.append(top_k_processor(config.top_k))
    if config.top_p < 1:
        chain.append(top_p_processor(config.top_p))
    return chain


# ----------------------------------------------------------------------------- sampling


def entropy_of(logp: torch.Tensor) -> torch.Tensor:
    """(…, V) log-probs, −inf on banned tokens → (…) entropy −Σ p log p over the finite ones (0·−inf
    counts 0, and so does its gradient)."""
    return -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)


def gumbel_noise(
    shape: tuple[int, int],
    device: torch.device,
    generator: torch.Generator | Sequence[torch.Generator] | None,
) -> torch.Tensor:
    """(B, V) float32 Gumbel(0, 1) noise on ``device``; with a sequence of generators, row i comes from generator i alone.

    Noise is drawn on each generator's own device and moved: CPU generators give the same draws
    whatever device the model is on (at the cost of a (B, V) copy per step).
    """
    if generator is None:
        uniform = torch.rand(shape, device=device)
    elif isinstance(generator, torch.Generator):
        uniform = torch.rand(shape, device=generator.device, generator=generator).to(device)
    else:
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for {shape[0]} rows")
        rows = [torch.rand(shape[1], device=g.device, generator=g).to(device) for g in generator]
        uniform = torch.stack(rows)
    return -torch.log(-torch.log(uniform))


def draw(
    logprobs: torch.Tensor,
    greedy: bool,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """(B, V) log-probs → (B,) long tokens: argmax, or a sample by Gumbel-max (argmax of log p + G)."""
    if greedy:
        return logprobs.argmax(-1)
    noise = gumbel_noise(tuple(logprobs.shape), logprobs.device, generator)
    return (logprobs + noise).argmax(-1)


def _apply(processors: Sequence[LogitsProcessor], step: int, logits: torch.Tensor) -> torch.Tensor:
    for process in processors:
        logits = process(step, logits)
    return logits


# ----------------------------------------------------------------------------- the decoding loop


@torch.no_grad()
def rollout(
    model: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    config: SamplingConfig,
    *,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    processors: Sequence[LogitsProcessor] = (),
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    return_logprobs: bool = True,
    return_raw_logprobs: bool = False,
    return_entropy: bool = False,
) -> Rollout:
    """Sample one response per row of a left-padded prompt batch (see the module doc for the order of steps).

    Args:
        model: a Hugging Face causal LM (``forward(input_ids, attention_mask, position_ids,
            past_key_values, use_cache, logits_to_keep)``), in eval mode.
        prompt_ids: (B, P) long, left-padded (:func:`left_pad`).
        prompt_mask: (B, P) bool/0-1, True on real tokens; the last column must be real in every row.
        config: lengths, temperature, top-k, top-p.
        eos_token_ids: the ids that end a response (and that fixed/min length suppress).
        pad_token_id: filler after a row ended.
        processors: caller's logits processors, applied before the sampling ones; instances of
            :class:`SequenceProcessor` are told the prompts and each step's tokens.
        generator: one generator, or one per row (batch-invariant sampling); None = global RNG.
        return_logprobs: fill :attr:`Rollout.logprobs`.
        return_raw_logprobs: fill :attr:`Rollout.raw_logprobs`.
        return_entropy: fill :attr:`Rollout.entropy` (one (B, V) pass per step: far cheaper than an
            entropy in every stage-2 pass of an update, when it is only logged).
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(
            f"expected (B, P) ids and mask, got {tuple(prompt_ids.shape)}, {tuple(prompt_mask.shape)}"
        )
    if not bool(prompt_mask[:, -1].bool().all()):
        raise ValueError("prompts must be left-padded: the last column must be a real token in every row")
    device = prompt_ids.device
    batch = prompt_ids.shape[0]
    chain = [*processors, *sampling_processors(config, eos_token_ids)]
    followers = [p for p in processors if isinstance(p, SequenceProcessor)]
    for p in followers:
        p.begin(prompt_ids, prompt_mask)
    eos = torch.as_tensor(list(eos_token_ids), dtype=torch.long, device=device)

    attention = prompt_mask.long()
    out = model(
        input_ids=prompt_ids,
        attention_mask=attention,
        position_ids=positions(attention),
        use_cache=True,
        logits_to_keep=1,
    )
    next_position = attention.sum(-1, keepdim=True)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, alive_steps, step_logps, step_raw, step_entropy = [], [], [], [], []
    for step in range(config.max_new_tokens):
        raw = out.logits[:, -1].float()
        logprobs = torch.log_softmax(_apply(chain, step, raw), dim=-1)
        token = draw(logprobs, greedy=config.temperature == 0, generator=generator)
        alive = ~finished
        token = torch.where(alive, token, pad_token_id)
        tokens.append(token)
        alive_steps.append(alive)
        if return_logprobs:
            step_logps.append(torch.where(alive, logprobs.gather(-1, token[:, None]).squeeze(-1), 0.0))
        if return_raw_logprobs:
            raw_logps = torch.log_softmax(raw, dim=-1).gather(-1, token[:, None]).squeeze(-1)
            step_raw.append(torch.where(alive, raw_logps, 0.0))
        if return_entropy:
            step_entropy.append(torch.where(alive, entropy_of(logprobs), 0.0))
        for p in followers:
            p.advance(step, token)
        if config.stop_at_eos:
            finished = finished | (alive & torch.isin(token, eos))
        if bool(finished.all()) or step == config.max_new_tokens - 1:
            break
        attention = torch.cat([attention, alive.long()[:, None]], dim=1)
        out = model(
            input_ids=token[:, None],
            attention_mask=attention,
            position_ids=next_position,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
        next_position = next_position + 1

    response_mask = torch.stack(alive_steps, dim=1)
    response_ids = torch.stack(tokens, dim=1)
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask.bool(),
        response_ids=response_ids,
        response_mask=response_mask,
        logprobs=torch.stack(step_logps, dim=1) if return_logprobs else None,
        raw_logprobs=torch.stack(step_raw, dim=1) if return_raw_logprobs else None,
        eos=finished,
        entropy=torch.stack(step_entropy, dim=1) if return_entropy else None,
    )
