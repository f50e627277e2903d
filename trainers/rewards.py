"""Reward sources: anything that scores (prompt, response) pairs as per-token rewards for RL.

One interface, :class:`RewardSource`, with ``score(prompts, responses) -> list[TokenRewards]``.

**Tokenisation contract.** Every source is built with the *policy's* tokenizer, and its rewards
align to the policy's tokens of each response: ``tokenizer(response, add_special_tokens=False)``
(plus one EOS token at the end when the source was built with ``append_eos=True``, for RL loops
whose responses end with the EOS the policy emitted). A reward model with another tokenizer scores
the *text* with its own tokenizer, and its rewards are carried onto the policy's tokens by
character offsets (code points of the Python string), so sums are preserved exactly.

- Sequence rewards (a sequence RM, VADER, a scalar callable) sit at the last response token —
  the EOS when ``append_eos`` — and every other token gets 0 (OpenRLHF's placement; algorithms.md
  §4.5 warns against broadcasting them instead).
- Segment rewards (Yin et al. 2025) are normalised with the location-aware normaliser stored in
  the checkpoint and spread evenly over each segment's tokens ("densified"), so the tokens of a
  segment sum to its normalised reward; in dense modes the EOS gets 0 (algorithms.md §4.2, §4.5).

Implementations: :class:`SequenceRMReward`, :class:`SegmentRMReward`, :class:`LexiconReward`,
:class:`CallableReward`. No database, no UI.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from trainers import segments as seg

Prompt = str | list[dict[str, str]]
"""Plain text, or chat messages ``[{"role": ..., "content": ...}, ...]``."""


@dataclass(frozen=True)
class TokenRewards:
    """The rewards of one response, aligned to the policy tokenizer's tokens of that response.

    Attributes:
        token_ids: (T,) the policy tokenizer's ids of the response (the alignment key; ends with
            the EOS id when the source appends one).
        rewards: (T,) reward of each token.
        total: the sequence reward; equals ``sum(rewards)`` for every source here (for a segment
            RM it is the sum of the normalised segment rewards).
        segment_ends: for segment rewards, the index (into ``token_ids``) of the last token of
            each segment, ascending; ``None`` for sequence rewards.
    """

    token_ids: tuple[int, ...]
    rewards: tuple[float, ...]
    total: float
    segment_ends: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.rewards):
            raise ValueError(f"{len(self.token_ids)} token ids but {len(self.rewards)} rewards")

    def as_tensor(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(T,) rewards as a tensor."""
        return torch.tensor(self.rewards, dtype=dtype)


@runtime_checkable
class RewardSource(Protocol):
    """Scores responses as per-token rewards on the policy tokenizer's tokens (see module doc)."""

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[TokenRewards]:
        """One :class:`TokenRewards` per (prompt, response) pair, in order."""
        ...


# ----------------------------------------------------------------------------- policy tokens


class PolicyTokens:
    """How a source turns a response into the policy's tokens (ids and character offsets).

    Args:
        tokenizer: the policy's tokenizer (a fast tokenizer: offsets are needed to align rewards
            from a model with another tokenizer).
        append_eos: add the tokenizer's EOS as a last token (it has no characters).
    """

    def __init__(self, tokenizer: Any, *, append_eos: bool = False) -> None:
        if append_eos and tokenizer.eos_token_id is None:
            raise ValueError("append_eos=True needs a tokenizer with an EOS token")
        self.tokenizer = tokenizer
        self.append_eos = append_eos

    def encode(self, response: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids (T,) and code-point offsets (T,) of the response's tokens; the EOS gets (n, n)."""
        enc = self.tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        if self.append_eos:
            ids.append(self.tokenizer.eos_token_id)
            offsets.append((len(response), len(response)))
        return ids, offsets

    def at_last_token(self, response: str, value: float) -> TokenRewards:
        """A sequence reward placed at the last token (0 elsewhere); no tokens -> only ``total``."""
        ids, _ = self.encode(response)
        rewards = [0.0] * len(ids)
        if rewards:
            rewards[-1] = float(value)
        return TokenRewards(tuple(ids), tuple(rewards), float(value))


def project_segment_ends(char_ends: Sequence[int], token_starts: Sequence[int]) -> list[int]:
    """Map segment end characters onto the policy tokens that carry each segment's last character.

    Segment k covers characters [char_ends[k-1], char_ends[k]) of the response. Its last policy
    token is the last token that *starts* before ``char_ends[k]`` (at least token 0, and never
    before the previous segment's token, so the result is non-decreasing). With the same
    tokenizer on both sides this is the identity on token indices.

    Args:
        char_ends: (K,) exclusive end character of each segment, non-decreasing.
        token_starts: (T,) start character of each policy token, non-decreasing.

    Returns:
        (K,) policy token index of each segment's end; equal entries mean several segments end
        in one policy token.
    """
    if not token_starts:
        raise ValueError("no policy tokens to project segments onto")
    out: list[int] = []
    previous = 0
    for end in char_ends:
        t = max(bisect.bisect_left(token_starts, end) - 1, 0, previous)
        out.append(t)
        previous = t
    return out


def merge_projected_segments(
    token_ends: Sequence[int], values: Sequence[float]
) -> tuple[list[int], list[float]]:
    """Merge segments that ended in the same policy token (their values add up).

    Args:
        token_ends: (K,) non-decreasing policy token index of each segment's end.
        values: (K,) value of each segment.

    Returns:
        strictly increasing ends (K',) and their summed values (K',).
    """
    ends: list[int] = []
    sums: list[float] = []
    for end, value in zip(token_ends, values, strict=True):
        if ends and ends[-1] == end:
            sums[-1] += float(value)
        else:
            ends.append(int(end))
            sums.append(float(value))
    return ends, sums


# ----------------------------------------------------------------------------- simple sources


class LexiconReward:
    """VADER sentiment of the response text (offline lexicon from ``vaderSentiment``).

    The sequence reward is VADER's ``compound`` score in [-1, 1] (or ``pos``/``neg``/``neu``),
    placed at the last response token. The prompt is ignored.
    """

    def __init__(self, tokenizer: Any, *, field: str = "compound", append_eos: bool = False) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        if field not in {"compound", "pos", "neg", "neu"}:
            raise ValueError(f"field must be compound, pos, neg or neu, got {field!r}")
        self.tokens = PolicyTokens(tokenizer, append_eos=append_eos)
        self.field = field
        self._analyzer = SentimentIntensityAnalyzer()

    def sentiment(self, text: str) -> float:
        return float(self._analyzer.polarity_scores(text)[self.field])

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[TokenRewards]:
        _check_lengths(prompts, responses)
        return [self.tokens.at_last_token(r, self.sentiment(r)) for r in responses]


class CallableReward:
    """Any Python function ``fn(prompt, response)`` returning a float or a per-token list.

    A float is a sequence reward (placed at the last token). A list must have one value per
    policy token of the response (see the module's tokenisation contract); it is used as is.
    """

    def __init__(
        self,
        fn: Callable[[Prompt, str], float | Sequence[float]],
        tokenizer: Any,
        *,
        append_eos: bool = False,
    ) -> None:
        self.fn = fn
        self.tokens = PolicyTokens(tokenizer, append_eos=append_eos)

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[TokenRewards]:
        _check_lengths(prompts, responses)
        out = []
        for prompt, response in zip(prompts, responses, strict=True):
            value = self.fn(prompt, response)
            if isinstance(value, int | float) or (isinstance(value, torch.Tensor) and value.dim() == 0):
                out.append(self.tokens.at_last_token(response, float(value)))
                continue
            ids, _ = self.tokens.encode(response)
            values = [float(v) for v in value]
            if len(values) != len(ids):
                raise ValueError(
                    f"the reward function returned {len(values)} per-token values for a response of "
                    f"{len(ids)} policy tokens"
                )
            out.append(TokenRewards(tuple(ids), tuple(values), float(sum(values))))
        return out


def _check_lengths(prompts: Sequence[Any], responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    for r in responses:
        if not isinstance(r, str):
            raise TypeError(f"responses must be strings, got {type(r).__name__}")


# ----------------------------------------------------------------------------- sequence RM


class SequenceRMReward:
    """A sequence reward model (``AutoModelForSequenceClassification``, one logit) as a reward.

    Built for checkpoints of the ``reward_model`` recipe: the text is rendered and tokenised with
    the RM's own tokenizer exactly as in training (:func:`trainers.data.render`,
    :func:`trainers.data.encode_texts`, with the ``max_length`` and ``truncation_side`` found in
    ``studio.json``), so an RM with another tokenizer than the policy's simply scores the text.
    The score sits at the last policy token of the response (the EOS with ``append_eos``).

    Args:
        checkpoint: the RM folder (``<run>/final``) or any sequence-classification folder.
        tokenizer: the policy's tokenizer.
        append_eos: see :class:`PolicyTokens`.
        normalise: z-score with the held-out ``reward_mean``/``reward_std`` the recipe stores in
            ``studio.json["extra"]`` (the bandit normaliser); an error when they are missing.
        max_length / truncation_side: override what ``studio.json`` says (defaults 256 / left).
        batch_size: texts per forward pass.
        device: torch device.
    """

    def __init__(
        self,
        checkpoint: Path | str,
        tokenizer: Any,
        *,
        append_eos: bool = False,
        normalise: bool = False,
        max_length: int | None = None,
        truncation_side: str | None = None,
        batch_size: int = 16,
        device: str = "cpu",
    ) -> None:
        import json

        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(checkpoint)
        studio_path = folder / "studio.json"
        studio = json.loads(studio_path.read_text()) if studio_path.is_file() else {}
        config = studio.get("config", {})
        self.tokens = PolicyTokens(tokenizer, append_eos=append_eos)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=1, dtype=torch.float32, use_safetensors=True
        )
        self.model.to(device).eval()
        self.rm_tokenizer = AutoTokenizer.from_pretrained(folder)
        if self.rm_tokenizer.pad_token is None:
            self.rm_tokenizer.pad_token = self.rm_tokenizer.eos_token
        self.rm_tokenizer.truncation_side = truncation_side or config.get("truncation_side", "left")
        self.model.config.pad_token_id = self.rm_tokenizer.pad_token_id
        self.max_length = int(max_length or config.get("max_length", 256))
        self.shift, self.scale = 0.0, 1.0
        if normalise:
            extra = studio.get("extra") or {}
            if "reward_mean" not in extra or "reward_std" not in extra:
                raise ValueError(f"{folder}/studio.json has no reward_mean/reward_std to normalise with")
            self.shift, self.scale = float(extra["reward_mean"]), max(float(extra["reward_std"]), 1e-6)
        self.batch_size = batch_size
        self.device = device

    @torch.no_grad()
    def raw_scores(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        """The RM's logit for each (prompt, response), before normalisation."""
        from trainers.data import encode_texts, render
        from trainers.segment_rm import completion_turns, pad_rows

        _check_lengths(prompts, responses)
        texts = [
            render(self.rm_tokenizer, p, completion_turns(p, r))
            for p, r in zip(prompts, responses, strict=True)
        ]
        encoded = encode_texts(self.rm_tokenizer, texts, self.max_length)
        out: list[float] = []
        for i in range(0, len(encoded), self.batch_size):
            chunk = encoded[i : i + self.batch_size]
            T = max(len(e.ids) for e in chunk)
            ids = pad_rows([e.ids for e in chunk], T, self.rm_tokenizer.pad_token_id, torch.long)
            mask = pad_rows([[1] * len(e.ids) for e in chunk], T, 0, torch.long)
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            out.extend(float(v) for v in logits[:, 0].float().cpu())
        return out

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[TokenRewards]:
        scores = self.raw_scores(prompts, responses)
        return [
            self.tokens.at_last_token(r, (s - self.shift) / self.scale)
            for r, s in zip(responses, scores, strict=True)
        ]


# ----------------------------------------------------------------------------- segment RM


@dataclass(frozen=True)
class ScoredSegments:
    """A segment RM's view of one response, in its own tokens (for scoring and for display).

    Attributes:
        char_ranges: (K,) code-point [a, b) of each segment in the response text.
        raw: (K,) raw segment rewards r_k = v(e_k).
        normalised: (K,) r̃_k after the checkpoint's normaliser (equal to ``raw`` without one).
        score: S(y) = mean_k r_k, the sequence score the RM was trained on.
        bandit: True when τ selects one segment per response (ending at the EOS).
    """

    char_ranges: tuple[tuple[int, int], ...]
    raw: tuple[float, ...]
    normalised: tuple[float, ...]
    score: float
    bandit: bool


class SegmentRMReward:
    """Dense rewards from a segment reward model checkpoint (Yin et al. 2025).

    Loads the trunk + value head, the frozen reference named in ``studio.json`` (or ``reference``),
    τ_H, the prompt format and the fitted normaliser. Each response is tokenised, segmented by the
    reference's entropy and scored exactly as in training (:mod:`trainers.segment_rm`); segment
    rewards are normalised (location-aware, or the global z-score in bandit mode) and densified
    evenly onto the *policy's* tokens: segment k's last policy token is the one carrying its last
    character, and the policy tokens of a segment share its r̃_k equally. Per segment the dense
    rewards sum to r̃_k; the EOS (``append_eos``) gets 0 in dense modes and the whole reward in
    bandit mode. Text past the RM's ``max_length`` is not scored (its tokens get 0).

    Args:
        checkpoint: folder written by the ``segment_reward_model`` recipe.
        tokenizer: the policy's tokenizer (fast).
        append_eos: see :class:`PolicyTokens`.
        reference: override the reference folder stored in the checkpoint.
        normalise: False to use raw segment rewards (e.g. before a normaliser was fitted).
        batch_size: responses per value-head forward pass.
        device: torch device for both models.
    """

    def __init__(
        self,
        checkpoint: Path | str,
        tokenizer: Any,
        *,
        append_eos: bool = False,
        reference: Path | str | None = None,
        normalise: bool = True,
        batch_size: int = 8,
        device: str = "cpu",
    ) -> None:
        from transformers import AutoTokenizer

        from trainers.normalise import normaliser_from_dict
        from trainers.segment_rm import Reference, SegmentRewardModel, SegmentRMInfo

        self.tokens = PolicyTokens(tokenizer, append_eos=append_eos)
        self.info = SegmentRMInfo.from_checkpoint(checkpoint)
        if normalise and self.info.normaliser is None:
            raise ValueError(f"{checkpoint} has no fitted normaliser; pass normalise=False for raw rewards")
        self.normaliser = normaliser_from_dict(self.info.normaliser) if normalise else None
        self.model = SegmentRewardModel.from_pretrained(checkpoint, device=device).eval()
        self.rm_tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.rm_tokenizer.truncation_side = self.info.truncation_side
        if self.rm_tokenizer.pad_token_id is None:
            self.rm_tokenizer.pad_token = self.rm_tokenizer.eos_token
        bandit = seg.is_bandit(self.info.threshold)
        self.reference = None if bandit else Reference(reference or self.info.reference, device=device)
        self.batch_size = batch_size
        self.device = device

    @torch.no_grad()
    def segments(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[ScoredSegments]:
        """Segment and score each response with the RM's tokenizer (no policy tokens involved)."""
        from trainers.segment_rm import as_prompt, encode, segment_all, segment_char_ranges, sequence_scores

        _check_lengths(prompts, responses)
        info = self.info
        out: list[ScoredSegments] = []
        for i in range(0, len(responses), self.batch_size):
            encoded = encode(
                self.rm_tokenizer,
                [as_prompt(p, info.prompt_format) for p in prompts[i : i + self.batch_size]],
                responses[i : i + self.batch_size],
                max_length=info.max_length,
            )
            ends = segment_all(self.reference, encoded, info.threshold)
            scores, (batch, values) = sequence_scores(
                self.model, encoded, ends, self.rm_tokenizer.pad_token_id, self.device
            )
            positions = seg.segment_positions(batch.ends)
            normed = (
                values
                if self.normaliser is None
                else self.normaliser.normalise(values, positions, batch.ends)
            )
            for b, (e, en) in enumerate(zip(encoded, ends, strict=True)):
                idx = list(en)
                out.append(
                    ScoredSegments(
                        char_ranges=tuple(segment_char_ranges(e, en)),
                        raw=tuple(float(v) for v in values[b, idx].cpu()),
                        normalised=tuple(float(v) for v in normed[b, idx].cpu()),
                        score=float(scores[b]),
                        bandit=seg.is_bandit(info.threshold),
                    )
                )
        return out

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[TokenRewards]:
        return [
            self._densify(r, s) for r, s in zip(responses, self.segments(prompts, responses), strict=True)
        ]

    def _densify(self, response: str, scored: ScoredSegments) -> TokenRewards:
        """Spread the normalised segment rewards evenly over the policy tokens of each segment."""
        total = float(sum(scored.normalised))
        ids, offsets = self.tokens.encode(response)
        content = len(ids) - int(self.tokens.append_eos)
        if scored.bandit or content == 0:
            return self.tokens.at_last_token(response, total)
        ends, values = merge_projected_segments(
            project_segment_ends([b for _, b in scored.char_ranges], [a for a, _ in offsets[:content]]),
            scored.normalised,
        )
        end_mask = torch.zeros(1, len(ids), dtype=torch.bool)
        end_mask[0, ends] = True
        at_ends = torch.zeros(1, len(ids), dtype=torch.float64)
        at_ends[0, ends] = torch.tensor(values, dtype=torch.float64)
        response_mask = torch.zeros(1, len(ids), dtype=torch.bool)
        response_mask[0, :content] = True
        dense = seg.densify(at_ends, end_mask, seg.segment_ids(end_mask, response_mask), mode="even")[0]
        return TokenRewards(tuple(ids), tuple(dense.tolist()), total, tuple(ends))
