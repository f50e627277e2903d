"""Evaluation of a policy on prompts, and the glue every RL recipe shares around a rollout.

:func:`evaluate_policy` samples one response per prompt (stage 1, :func:`trainers.rollout.rollout`),
scores it under the frozen reference (stage 2, :func:`trainers.teacher_forced.score_tokens`) and
with the reward, and reports (keys prefixed ``eval/``):

* ``reward`` (mean sequence reward; ``reward_std`` too),
* ``kl``: KL(π‖π_ref) per sequence — k1 = Σ_t log π(y_t|…) − log π_ref(y_t|…) over the response,
  with the *raw* policy log-probs, averaged over prompts (an unbiased estimate when sampling is
  plain: temperature 1, no top-k/top-p),
* ``perplexity``: of the generated text under the reference model, exp(−Σ log π_ref / tokens) over
  all generated tokens (how fluent the reference finds the policy's text; GRUE reports the
  policy's perplexity on reference texts instead, §1.9),
* ``distinct_1`` / ``distinct_2``: distinct word uni-/bigrams over all uni-/bigrams of all
  responses (whitespace words),
* ``bleu``: corpus sacreBLEU (0–100) of the answers against ``references``, when given,
* ``response_tokens`` (mean) and ``eos_fraction``.

Glue shared by the RL recipes: :func:`encode_prompts` (text or chat prompts → token ids),
:func:`stop_token_ids`, :func:`response_texts` (rollout → strings for the reward) and
:func:`reward_tensor` (``TokenRewards`` → (B, T) rewards on the *sampled* tokens, sums preserved).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from trainers.rewards import Prompt, RewardSource, TokenRewards
from trainers.rollout import LogitsProcessor, Rollout, SamplingConfig, left_pad, rollout
from trainers.teacher_forced import score_tokens

# ----------------------------------------------------------------------------- prompts and stops


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt], max_prompt_tokens: int) -> list[list[int]]:
    """Token ids of each prompt, cut on the left to ``max_prompt_tokens``.

    Text is tokenised as is (with the tokenizer's usual special tokens, e.g. a BOS); chat messages go
    through the chat template with the generation prompt (``role: content`` lines without one).
    A prompt that tokenises to nothing gets the BOS (or EOS) token, so every row has one.
    """
    from trainers.data import render_messages_plain

    out = []
    for prompt in prompts:
        if isinstance(prompt, str):
            ids = tokenizer(prompt)["input_ids"]
        elif getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = tokenizer(render_messages_plain(prompt) + "\nassistant:")["input_ids"]
        ids = list(ids)[-max_prompt_tokens:]
        if not ids:
            ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
        out.append(ids)
    return out


def stop_token_ids(tokenizer: Any, model: Any = None, *, stop_at_newline: bool = False) -> list[int]:
    """The ids that end a response: the tokenizer's EOS, the model's generation-config EOS ids, and
    with ``stop_at_newline`` every vocabulary token whose text contains a newline."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    ids.update([extra] if isinstance(extra, int) else list(extra or []))
    if stop_at_newline:
        for token_id in range(len(tokenizer)):
            if "\n" in tokenizer.decode([token_id]):
                ids.add(token_id)
    if not ids:
        raise ValueError("the tokenizer has no EOS token and no stop tokens were given")
    return sorted(ids)


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id (filler after a response ended)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token")
    return int(pad)


def row_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per row, seeded by (seed, the row's global index): sampling does not
    depend on the batch a row lands in."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + int(i)) for i in indices]


# ----------------------------------------------------------------------------- texts and rewards


def response_texts(tokenizer: Any, batch: Rollout) -> list[str]:
    """The text of each response: its counted tokens decoded without special tokens (EOS dropped)."""
    ids, mask = batch.response_ids.cpu(), batch.response_mask.cpu()
    return [
        tokenizer.decode(row[m].tolist(), skip_special_tokens=True) for row, m in zip(ids, mask, strict=True)
    ]


def token_char_ends(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """(T,) length of the decoded text of ``ids[:t + 1]`` (special tokens skipped): where each token ends."""
    return [len(tokenizer.decode(list(ids[: t + 1]), skip_special_tokens=True)) for t in range(len(ids))]


def align_rewards(tokenizer: Any, scored: TokenRewards, text: str, sampled: Sequence[int]) -> list[float]:
    """(L,) rewards on the ``sampled`` response tokens from rewards on the re-tokenised ``text``.

    Equal token ids: used as they are. Otherwise (re-tokenising the decoded text gave other tokens,
    or the source appended an EOS the policy never emitted) each reward token's value moves to the
    sampled token that covers its last character; tokens without characters (an appended EOS) go to
    the last sampled token. The sum is preserved either way.
    """
    if tuple(sampled) == scored.token_ids:
        return list(scored.rewards)
    if not sampled:
        raise ValueError("a response without tokens cannot carry rewards")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ends = [int(e) for _, e in enc["offset_mapping"]]
    sampled_ends = token_char_ends(tokenizer, sampled)
    out = [0.0] * len(sampled)
    for j, value in enumerate(scored.rewards):
        if j >= len(ends) or ends[j] == 0:
            target = len(sampled) - 1
        else:
            target = next((t for t, e in enumerate(sampled_ends) if e >= ends[j]), len(sampled) - 1)
        out[target] += float(value)
    return out


def reward_tensor(
    tokenizer: Any, scored: Sequence[TokenRewards], texts: Sequence[str], batch: Rollout
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards on the rollout's tokens and per-sequence totals.

    Args:
        tokenizer: the policy's tokenizer (the one the reward source was built with).
        scored: (B,) the source's output for ``texts``.
        texts: (B,) :func:`response_texts` of ``batch``.
        batch: the rollout.

    Returns:
        rewards: (B, T) float32 on the rollout's device, 0 where ``response_mask`` is False.
        scores: (B,) float32, each row's total (= the row sum of ``rewards``).
    """
    ids, mask = batch.response_ids.cpu(), batch.response_mask.cpu()
    rewards = torch.zeros(ids.shape, dtype=torch.float32)
    for b, (tr, text) in enumerate(zip(scored, texts, strict=True)):
        sampled = ids[b][mask[b]].tolist()
        rewards[b, : len(sampled)] = torch.tensor(align_rewards(tokenizer, tr, text, sampled))
    scores = torch.tensor([float(tr.total) for tr in scored], dtype=torch.float32)
    return rewards.to(batch.response_ids.device), scores.to(batch.response_ids.device)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct word n-grams / all word n-grams over ``texts`` (whitespace words; 0 when none)."""
    grams = [
        tuple(words[i : i + n]) for t in texts for words in [t.split()] for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_policy(
    policy: Any,
    reference: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    reward: RewardSource,
    sampling: SamplingConfig,
    batch_size: int,
    references: Sequence[Sequence[str]] | None = None,
    *,
    seed: int = 0,
    max_prompt_tokens: int = 256,
    stop_at_newline: bool = False,
    answer: Callable[[str], str] = str.strip,
    processors: Sequence[LogitsProcessor] = (),
    chunk_steps: int = 16,
    prefix: str = "eval/",
    reference_prompts: Sequence[Prompt] | None = None,
) -> dict[str, float]:
    """Sample one response per prompt with ``policy`` and report the metrics of the module doc.

    Args:
        policy: the causal LM being trained (put in eval mode here, its mode restored after).
        reference: the frozen reference causal LM (same tokenizer), on the same device.
        tokenizer: their tokenizer.
        prompts: (N,) text or chat prompts.
        reward: scores (prompt, response text) pairs.
        sampling: how responses are drawn (temperature 0 = greedy).
        batch_size: prompts per rollout.
        references: (N,) reference answers per prompt, for ``bleu``; None skips it.
        seed: sampling seed; row i uses its own generator, so results do not depend on batch_size.
        max_prompt_tokens: prompts are cut on the left to this.
        stop_at_newline: responses also end at a token containing a newline.
        answer: response text → the answer compared with ``references`` (e.g. the first line).
        processors: extra logits processors of the policy's sampling (e.g. an NLPO mask).
        chunk_steps: response steps per chunk of reference logits.
        prefix: prepended to every key.
        reference_prompts: (N,) the prompts the reference scores the responses under, when they differ
            from the policy's (a Decision-Transformer policy reads a conditioned prompt; its KL and
            perplexity are measured against the starting policy on the original one). None: ``prompts``.

    Returns:
        ``{prefix + name: float}`` for reward, reward_std, kl, perplexity, distinct_1, distinct_2,
        response_tokens, eos_fraction (and bleu).
    """
    if not prompts:
        raise ValueError("no prompts to evaluate on")
    if references is not None and len(references) != len(prompts):
        raise ValueError(f"{len(references)} references for {len(prompts)} prompts")
    if reference_prompts is not None and len(reference_prompts) != len(prompts):
        raise ValueError(f"{len(reference_prompts)} reference prompts for {len(prompts)} prompts")
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    eos, pad = stop_token_ids(tokenizer, policy, stop_at_newline=stop_at_newline), pad_token_id(tokenizer)
    scores, kls, texts, lengths, eos_rows = [], [], [], [], []
    ref_logp_sum, n_tokens = 0.0, 0
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            ids, mask = left_pad(encode_prompts(tokenizer, chunk, max_prompt_tokens), pad)
            ids, mask = ids.to(device), mask.to(device)
            batch = rollout(policy, ids, mask, sampling, eos_token_ids=eos, pad_token_id=pad, processors=processors,
                            generator=row_generators(seed, range(start, start + len(chunk))),
                            return_logprobs=False, return_raw_logprobs=True)  # fmt: skip
            ref_ids, ref_mask = ids, mask
            if reference_prompts is not None:
                ref_chunk = list(reference_prompts[start : start + batch_size])
                ref_ids, ref_mask = left_pad(encode_prompts(tokenizer, ref_chunk, max_prompt_tokens), pad)
                ref_ids, ref_mask = ref_ids.to(device), ref_mask.to(device)
            ref = score_tokens(reference, ref_ids, ref_mask, batch.response_ids, batch.response_mask,
                               chunk_steps=chunk_steps).logprobs  # fmt: skip
            m = batch.response_mask
            kls.extend((batch.raw_logprobs - ref).masked_fill(~m, 0.0).sum(-1).tolist())
            ref_logp_sum += float(ref.masked_fill(~m, 0.0).sum())
            n_tokens += int(m.sum())
            chunk_texts = response_texts(tokenizer, batch)
            scores.extend(float(s.total) for s in reward.score(chunk, chunk_texts))
            texts.extend(chunk_texts)
            lengths.extend(batch.lengths.tolist())
            eos_rows.extend(batch.eos.tolist())
    finally:
        policy.train(was_training)
    score_t = torch.tensor(scores, dtype=torch.float64)
    out = {
        "reward": float(score_t.mean()),
        "reward_std": float(score_t.std()) if len(scores) > 1 else 0.0,
        "kl": sum(kls) / len(kls),
        "perplexity": float(torch.exp(torch.tensor(-ref_logp_sum / max(n_tokens, 1)))),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "response_tokens": sum(lengths) / len(lengths),
        "eos_fraction": sum(eos_rows) / len(eos_rows),
    }
    if references is not None:
        from trainers.tasks import corpus_bleu

        out["bleu"] = corpus_bleu([answer(t) for t in texts], references)
    return {prefix + k: v for k, v in out.items()}
