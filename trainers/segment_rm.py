"""The segment reward model of Yin et al. 2025 as objects: trunk + value head, frozen reference, spans.

What the recipe (``trainers/recipes/segment_reward_model.py``) trains and what
:class:`trainers.rewards.SegmentRMReward` loads for scoring, so that both tokenise, segment and
score in exactly one way (algorithms.md §4.9 invariant 3):

- :class:`SegmentRewardModel` — a causal-LM trunk with ``Linear(hidden, 1, bias=False)`` applied at
  every position, initialised N(0, std = 1/(hidden + 1)).
- :class:`Reference` — the frozen reference LM (the RM's initial checkpoint) whose next-token
  entropy decides the segments. Each sequence is run on its own, unpadded, so its entropies —
  hence its segments — never depend on what else is in the batch.
- :func:`encode` — prompt + response token ids, with the response forced to end in EOS and the
  code-point offsets of every response token (for human spans and for other tokenizers).
- :func:`segment_all` — the one segmentation code path (bandit mode needs no reference);
  :func:`segment_pairs` / :func:`span_data` apply it to preference pairs and span-labelled responses.
- :func:`sequence_scores` — S(y) = mean of the segment-end values, for a batch.
- :func:`span_targets` / :func:`span_logistic_loss` — the human-span extension (not in the paper).

**Checkpoint layout** (one folder, safetensors only)::

    config.json, model.safetensors, generation_config.json   the trunk: a plain causal-LM folder
                                                             (loads with AutoModelForCausalLM; its
                                                             LM head is the initial one, unused)
    tokenizer.json, tokenizer_config.json, ...               the trunk's tokenizer
    value_head.safetensors                                   {"weight": (1, hidden) float32}
    studio.json                                              recipe metadata; its "segment_rm" key
                                                             holds threshold, reference, normaliser,
                                                             prompt format (see :class:`SegmentRMInfo`)
    manifest.json, COMPLETE                                  sha256 manifest (trainers.checkpoint)

No database and no UI here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainers import segments as seg
from trainers.data import (
    EncodedText,
    RenderedText,
    Turns,
    encode_span_examples,
    encode_texts,
    render,
    render_messages_plain,
)

VALUE_HEAD_FILE = "value_head.safetensors"
STUDIO_FILE = "studio.json"
STUDIO_KEY = "segment_rm"


# ------------------------------------------------------------------------------------------- the model


class SegmentRewardModel(nn.Module):
    """A causal-LM trunk with a per-position scalar value head.

    ``forward(input_ids, attention_mask)`` returns (B, T) float32 values v(t) at every position;
    segment rewards are the values at segment ends. The trunk's LM head is not used; when it is
    not tied to the input embeddings it is frozen (no gradient, no optimizer state, and no
    unused-parameter errors under DDP).
    """

    def __init__(self, lm: nn.Module, value_head: nn.Linear | None = None) -> None:
        super().__init__()
        self.lm = lm
        hidden = int(lm.config.get_text_config().hidden_size)
        if value_head is None:
            value_head = nn.Linear(hidden, 1, bias=False)
            nn.init.normal_(value_head.weight, mean=0.0, std=1.0 / (hidden + 1))
        if tuple(value_head.weight.shape) != (1, hidden) or value_head.bias is not None:
            raise ValueError(f"value head must be Linear({hidden}, 1, bias=False)")
        self.value_head = value_head.float()
        head = lm.get_output_embeddings()
        if head is not None and head.weight is not lm.get_input_embeddings().weight:
            head.weight.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and mask (right padding) → (B, T) float32 values."""
        hidden = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.value_head(hidden.float()).squeeze(-1)

    @classmethod
    def from_pretrained(
        cls, folder: Path | str, *, device: str = "cpu", dtype: Any = None
    ) -> SegmentRewardModel:
        """Load a trunk folder; with ``value_head.safetensors`` present the trained head, else a fresh one."""
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        folder = Path(folder)
        lm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32, use_safetensors=True)
        head = None
        if (folder / VALUE_HEAD_FILE).is_file():
            weight = load_file(folder / VALUE_HEAD_FILE)["weight"]
            head = nn.Linear(weight.shape[1], 1, bias=False)
            with torch.no_grad():
                head.weight.copy_(weight)
        return cls(lm, head).to(device)

    def save_pretrained(self, folder: Path | str) -> None:
        """Write the trunk (``save_pretrained``) and ``value_head.safetensors`` into ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        self.lm.save_pretrained(folder)
        save_file(
            {"weight": self.value_head.weight.detach().float().cpu().contiguous()}, folder / VALUE_HEAD_FILE
        )


class Reference:
    """The frozen reference LM whose next-token entropies define the segments.

    Every sequence is run alone (batch of one, no padding) in float32, so its entropies are a
    function of its tokens only: the same text gets the same segments in training, normaliser
    fitting and scoring.
    """

    def __init__(self, folder: Path | str, *, device: str = "cpu") -> None:
        from transformers import AutoModelForCausalLM

        self.folder = Path(folder)
        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(
            self.folder, dtype=torch.float32, use_safetensors=True
        )
        self.model.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def entropies(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Per sequence (T_i,) float32 CPU entropies H_j of the distribution predicting token j + 1."""
        out = []
        for ids in sequences:
            x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
            logits = self.model(input_ids=x).logits
            out.append(seg.next_token_entropy(logits)[0].cpu())
        return out


# ------------------------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class Encoded:
    """One tokenised (prompt, response) pair, its response ending in exactly one EOS.

    Attributes:
        input_ids: (T,) prompt tokens then response tokens; the last token is EOS.
        response_start: s, index of the first response token (the EOS when the response is empty).
        offsets: (T − s,) code-point [start, end) of each response token in the response text,
            clipped to it; the EOS gets (n, n).
        keep: how many tokens of the source encoding come before the EOS fix-up (see
            :func:`finish_response`): masks aligned with that encoding are sliced ``[:keep]``.
        truncated: the text did not fit in ``max_length`` tokens.
    """

    input_ids: tuple[int, ...]
    response_start: int
    offsets: tuple[tuple[int, int], ...]
    keep: int
    truncated: bool = False

    @property
    def response_len(self) -> int:
        return len(self.input_ids) - self.response_start


def as_prompt(prompt: Turns, prompt_format: str) -> Turns:
    """A prompt in the form the RM was trained on: a string becomes a user turn for a chat RM, and
    messages become ``role: content`` lines (plus a newline) for a text RM."""
    if prompt_format == "chat" and isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if prompt_format == "text" and not isinstance(prompt, str):
        return render_messages_plain(prompt) + "\n"
    return prompt


def completion_turns(prompt: Turns, response: str) -> Turns:
    """The response as ``data.render`` wants it: a string after a string prompt, else an assistant turn."""
    return response if isinstance(prompt, str) else [{"role": "assistant", "content": response}]


def finish_response(enc: EncodedText, rendered: RenderedText, response: str, eos_id: int) -> Encoded:
    """Force the response to end in one EOS, as the paper does (algorithms.md §4.2).

    The response is the run of ``enc.response_mask``. It is cut after its first EOS (a chat
    template's end-of-turn token when it is the EOS, dropping the template's trailing newline);
    without one, an EOS is appended. Offsets move from the rendered text to the response text.
    """
    mask = enc.response_mask
    inside = [i for i, m in enumerate(mask) if m]
    start = inside[0] if inside else len(enc.ids)
    stop = inside[-1] + 1 if inside else len(enc.ids)
    first_eos = next((i for i in range(start, stop) if enc.ids[i] == eos_id), None)
    keep = first_eos if first_eos is not None else stop
    ids = (*enc.ids[:keep], eos_id)
    shift = (
        rendered.text.find(response, rendered.response_start)
        if rendered.templated
        else rendered.response_start
    )
    shift = rendered.response_start if shift < 0 else shift
    n = len(response)
    offsets = tuple(
        (min(max(a - shift, 0), n), min(max(b - shift, 0), n)) for a, b in enc.offsets[start:keep]
    )
    return Encoded(ids, start, (*offsets, (n, n)), keep, enc.truncated)


def encode(
    tokenizer: Any, prompts: Sequence[Turns], responses: Sequence[str], *, max_length: int = 512
) -> list[Encoded]:
    """Render and tokenise (prompt, response) pairs with :mod:`trainers.data`, then fix up the EOS.

    The same function serves training, normaliser fitting and scoring, so a text always gets the
    same tokens. ``max_length`` counts the EOS.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the reward model's tokenizer has no EOS token")
    rendered = [render(tokenizer, p, completion_turns(p, r)) for p, r in zip(prompts, responses, strict=True)]
    encoded = encode_texts(tokenizer, rendered, max_length - 1)
    return [
        finish_response(e, t, r, tokenizer.eos_token_id)
        for e, t, r in zip(encoded, rendered, responses, strict=True)
    ]


def segment_ends_of(encoded: Encoded, entropy: torch.Tensor, threshold: float) -> tuple[int, ...]:
    """Absolute positions (into ``input_ids``) of the segment ends of one encoded pair.

    Args:
        encoded: the pair.
        entropy: (T,) reference entropies of ``encoded.input_ids``.
        threshold: τ_H (0 token level, ≥ 1000 bandit).
    """
    T = len(encoded.input_ids)
    mask = torch.zeros(1, T, dtype=torch.bool)
    mask[0, encoded.response_start :] = True
    ends = seg.segment_ends(entropy[None, :T], mask, threshold, ends_with_eos=True)[0]
    return tuple(int(i) for i in ends.nonzero().flatten())


def response_text(completion: Turns) -> str:
    """The text of a completion: a string, or the content of a single assistant message."""
    if isinstance(completion, str):
        return completion
    if len(completion) == 1:
        return completion[0]["content"]
    raise ValueError(
        f"the segment reward model scores single responses; got a completion of {len(completion)} messages"
    )


def pad_rows(rows: Sequence[Sequence[Any]], length: int, fill: Any, dtype: torch.dtype) -> torch.Tensor:
    """(N, length) tensor of ragged rows, right-padded with ``fill``."""
    out = torch.full((len(rows), length), fill, dtype=dtype)
    for i, row in enumerate(rows):
        if len(row):
            out[i, : len(row)] = torch.as_tensor(list(row), dtype=dtype)
    return out


def calibrate(
    encoded: Sequence[Encoded], entropies: Sequence[torch.Tensor], target_mean_length: float
) -> float:
    """τ_H giving a pooled mean segment length closest to the target on these responses
    (``segments.calibrate_threshold`` over their padded entropies)."""
    T = max(len(e.input_ids) for e in encoded)
    entropy = pad_rows([h.tolist() for h in entropies], T, 0.0, torch.float32)
    mask = pad_rows(
        [[i >= e.response_start for i in range(len(e.input_ids))] for e in encoded], T, False, torch.bool
    )
    return seg.calibrate_threshold(entropy, mask, target_mean_length, ends_with_eos=True)


def segment_all(
    reference: Reference | None, encoded: Sequence[Encoded], threshold: float
) -> list[tuple[int, ...]]:
    """Segment ends (absolute positions) of every encoded pair; the one segmentation code path.

    Bandit mode needs no entropies (one segment ending at the EOS), so ``reference`` may be None.
    """
    if seg.is_bandit(threshold):
        return [(len(e.input_ids) - 1,) for e in encoded]
    if reference is None:
        raise ValueError("dense segmentation needs the reference model")
    entropies = reference.entropies([e.input_ids for e in encoded])
    return [segment_ends_of(e, h, threshold) for e, h in zip(encoded, entropies, strict=True)]


@dataclass
class Batch:
    """Right-padded tensors for a list of encoded pairs.

    Attributes:
        input_ids: (B, T) long, padded with ``pad_id``.
        attention_mask: (B, T) long, 1 on real tokens.
        response_mask: (B, T) bool, True on response tokens (EOS included).
        ends: (B, T) bool, True at segment ends.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    ends: torch.Tensor

    def to(self, device: Any) -> Batch:
        return Batch(
            *(t.to(device) for t in (self.input_ids, self.attention_mask, self.response_mask, self.ends))
        )


def collate(items: Sequence[Encoded], ends: Sequence[Sequence[int]], pad_id: int) -> Batch:
    """Stack encoded pairs and their segment ends (absolute positions) into a right-padded batch."""
    T = max(len(e.input_ids) for e in items)
    B = len(items)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.long)
    resp = torch.zeros(B, T, dtype=torch.bool)
    end_mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (e, en) in enumerate(zip(items, ends, strict=True)):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids)
        attn[b, :n] = 1
        resp[b, e.response_start : n] = True
        end_mask[b, list(en)] = True
    return Batch(ids, attn, resp, end_mask)


# ------------------------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class Side:
    """Encoded responses with their segment ends; chosen rows i pair with rejected rows i."""

    encoded: list[Encoded]
    ends: list[tuple[int, ...]]


@dataclass(frozen=True)
class SpanData:
    """Span-labelled responses: encodings, segment ends, and (T_i,) good / bad token masks."""

    encoded: list[Encoded]
    ends: list[tuple[int, ...]]
    good: list[list[bool]]
    bad: list[list[bool]]


def segment_pairs(
    tokenizer: Any, pairs: Sequence[Any], max_length: int, reference: Reference | None, threshold: float
) -> tuple[Side, Side]:
    """Encode and segment the chosen and the rejected responses of ``data.PreferencePair`` s."""
    prompts = [p.prompt for p in pairs]
    sides = []
    for responses in ([response_text(p.chosen) for p in pairs], [response_text(p.rejected) for p in pairs]):
        encoded = encode(tokenizer, prompts, responses, max_length=max_length)
        sides.append(Side(encoded, segment_all(reference, encoded, threshold)))
    return sides[0], sides[1]


def span_data(
    tokenizer: Any, examples: Sequence[Any], max_length: int, reference: Reference | None, threshold: float
) -> SpanData:
    """Encode ``data.SpanExample`` s exactly like preference responses and map their spans onto tokens
    (``data.encode_span_examples``; the EOS carries no span)."""
    encoded = encode(
        tokenizer, [x.prompt for x in examples], [x.completion for x in examples], max_length=max_length
    )
    masks = encode_span_examples(tokenizer, examples, max_length - 1)
    good, bad = [], []
    for e, mk in zip(encoded, masks, strict=True):
        if list(mk.ids[: e.keep]) != list(e.input_ids[: e.keep]):
            raise AssertionError("span masks and responses were tokenised differently")
        good.append([*mk.good_mask[: e.keep], False])
        bad.append([*mk.bad_mask[: e.keep], False])
    return SpanData(encoded, segment_all(reference, encoded, threshold), good, bad)


def sequence_scores(
    model: Any, encoded: Sequence[Encoded], ends: Sequence[Sequence[int]], pad_id: int, device: Any
) -> tuple[torch.Tensor, tuple[Batch, torch.Tensor]]:
    """S(y) = mean of the segment rewards v(e_k), (N,) float32, and the batch (with its ``values``)."""
    batch = collate(encoded, ends, pad_id).to(device)
    values = model(batch.input_ids, batch.attention_mask)
    return seg.aggregate_mean(values, batch.ends), (batch, values)


# ------------------------------------------------------------------------------------------- metadata


@dataclass
class SegmentRMInfo:
    """What a segment RM checkpoint needs besides weights (``studio.json["segment_rm"]``).

    Attributes:
        threshold: τ_H in nats (0 token level, ≥ 1000 bandit).
        reference: folder of the frozen reference LM (the RM's initial checkpoint).
        prompt_format: ``"chat"`` (prompts were messages, rendered with the chat template) or
            ``"text"`` (prompt and response strings concatenated as is); see :func:`as_prompt`.
        max_length: truncation used in training (and so in scoring), EOS included.
        truncation_side: which end of an over-long text was cut (``"left"`` keeps the response end).
        normaliser: ``normalise.*Normaliser.to_dict()`` (``kind`` location, or global in bandit
            mode), or None before fitting.
        mean_segment_length: pooled mean segment length on the calibration responses.
        extra: free-form provenance (e.g. how τ was chosen).
    """

    threshold: float
    reference: str
    prompt_format: str = "text"
    max_length: int = 512
    truncation_side: str = "left"
    normaliser: dict[str, Any] | None = None
    mean_segment_length: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, folder: Path | str) -> SegmentRMInfo:
        path = Path(folder) / STUDIO_FILE
        try:
            data = json.loads(path.read_text())[STUDIO_KEY]
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(
                f"{folder} is not a segment reward model checkpoint (no {STUDIO_KEY} in {path})"
            ) from exc
        return cls(**data)


# ------------------------------------------------------------------------------------------- spans


def segment_char_ranges(encoded: Encoded, ends: Sequence[int]) -> list[tuple[int, int]]:
    """Code-point range [a, b) of the response text covered by each segment.

    Segment k spans tokens (e_{k−1}, e_k] (the first from s); its range runs from its first
    token's start to its last token's end. The EOS contributes no characters.
    """
    s = encoded.response_start
    out = []
    first = s
    for e in ends:
        toks = encoded.offsets[first - s : e - s + 1]
        out.append((toks[0][0], max(b for _, b in toks)))
        first = e + 1
    return out


def span_targets(
    ends: torch.Tensor, ids: torch.Tensor, good: torch.Tensor, bad: torch.Tensor
) -> torch.Tensor:
    """Label each segment +1 (good), −1 (bad) or 0 (unlabelled) from human spans on its tokens.

    A segment takes the polarity of the majority of its labelled tokens: +1 if more of its tokens
    overlap good spans than bad ones, −1 if the reverse, 0 if none is labelled (or a tie).

    Args:
        ends: (B, T) bool segment ends.
        ids: (B, T) long segment index per position (``segments.segment_ids``), −1 outside.
        good: (B, T) bool, True on tokens overlapping a good span (``data.encode_span_examples``).
        bad: (B, T) bool, True on tokens overlapping a bad span.

    Returns:
        (B, T) float: y_k at the end position of segment k, 0 elsewhere.
    """
    votes = good.float() - bad.float()
    k_max = int(ids.max()) + 1 if ids.numel() else 0
    if k_max <= 0:
        return torch.zeros_like(votes)
    per_segment = torch.zeros(ids.shape[0], k_max, dtype=votes.dtype, device=votes.device)
    per_segment.scatter_add_(1, ids.clamp(min=0), torch.where(ids >= 0, votes, torch.zeros_like(votes)))
    at_pos = per_segment.gather(1, ids.clamp(min=0)).sign()
    return torch.where(ends.bool() & (ids >= 0), at_pos, torch.zeros_like(at_pos))


def span_logistic_loss(
    values: torch.Tensor, ends: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Auxiliary loss from human spans: mean over labelled segments of softplus(−y_k · r_k).

    Pushes the reward r_k = v(e_k) of a segment overlapping a good span up (y_k = +1) and of one
    overlapping a bad span down (y_k = −1), i.e. the logistic loss of reading sign(r_k) as
    "good"; unlabelled segments (y_k = 0) are ignored. This is our extension of the paper (which
    only uses sequence preferences); it also anchors the reward's level, which BT leaves free.

    Args:
        values: (B, T) value-head outputs.
        ends: (B, T) bool segment ends.
        targets: (B, T) float, y ∈ {−1, 0, +1} at segment ends (ignored elsewhere).

    Returns:
        loss (0-dim, 0 when nothing is labelled) and detached stats ``span_accuracy`` (fraction of
        labelled segments with sign(r_k) = y_k) and ``span_segments`` (count).
    """
    labelled = ends.bool() & (targets != 0)
    n = labelled.sum()
    if int(n) == 0:
        zero = values.sum() * 0.0
        return zero, {"span_accuracy": zero.detach(), "span_segments": n.detach().float()}
    y = targets[labelled].to(values.dtype)
    r = values[labelled]
    loss = F.softplus(-y * r).mean()
    acc = ((r * y) > 0).float().mean().detach()
    return loss, {"span_accuracy": acc, "span_segments": n.detach().float()}


def span_batch_loss(
    model: Any, data: SpanData, index: Sequence[int], pad_id: int, device: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`span_logistic_loss` on the span-labelled responses ``index`` of ``data`` (one forward)."""
    _, (batch, values) = sequence_scores(
        model, [data.encoded[i] for i in index], [data.ends[i] for i in index], pad_id, device
    )
    T = batch.input_ids.shape[1]
    good = pad_rows([data.good[i] for i in index], T, False, torch.bool).to(batch.ends.device)
    bad = pad_rows([data.bad[i] for i in index], T, False, torch.bool).to(batch.ends.device)
    targets = span_targets(batch.ends, seg.segment_ids(batch.ends, batch.response_mask), good, bad)
    return span_logistic_loss(values, batch.ends, targets)


@torch.no_grad()
def segment_rewards_of(
    model: Any,
    encoded: Sequence[Encoded],
    ends: Sequence[Sequence[int]],
    pad_id: int,
    device: Any,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw segment rewards of many responses, what the normalisers are fitted on.

    Returns:
        positions: (N,) float64 p_k = k/K of every segment of every response.
        rewards: (N,) float64 r_k = v(e_k) at those segments.
        scores: (M,) float64 S(y) of the M responses.
    """
    positions, rewards, scores = [], [], []
    for begin in range(0, len(encoded), batch_size):
        chunk = slice(begin, begin + batch_size)
        s, (batch, values) = sequence_scores(model, encoded[chunk], ends[chunk], pad_id, device)
        positions.append(seg.segment_positions(batch.ends)[batch.ends].double().cpu())
        rewards.append(values[batch.ends].double().cpu())
        scores.append(s.double().cpu())
    return torch.cat(positions), torch.cat(rewards), torch.cat(scores)
