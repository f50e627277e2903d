"""Preference snapshots → token ids → padded :class:`PreferenceBatch` tensors.

Input: a dataset snapshot file in TRL's column conventions — JSONL, Parquet, or a ``datasets``
``save_to_disk`` folder (its ``train`` split when it holds several):

* implicit prompt ``{"chosen", "rejected"}`` (the prompt is the common prefix, as in TRL's
  ``extract_prompt``) or explicit prompt ``{"prompt", "chosen", "rejected"}``;
* standard (strings) or conversational (lists of ``{"role", "content"}`` messages): conversations go
  through the tokenizer's chat template when it has one, else a plain ``role: content`` rendering;
* an optional ``margin`` column (missing or null → 0); other (provenance) columns are ignored.

Segment snapshots (one response per row with human spans) are read by :func:`read_span_examples`:
``prompt`` (string or messages), ``completion`` (or ``response``) text, and ``spans``: a list (or a
JSON string of a list) of ``{"start", "end", "polarity": "good"|"bad", "label"?}`` with half-open
**code-point** offsets into the completion (Python string indices). :func:`encode_span_example` turns
them into token masks through the fast tokenizer's offset mapping (a token belongs to a span when their
character ranges overlap).

The held-out split is a pure function of the pair's content (:func:`is_held_out`), so a pair stays on
the same side whatever the seed, the file order or the other rows. Batch order is a pure function of
``(seed, step)`` (:class:`StepSampler`), so a resumed run sees exactly the batches an uninterrupted run
would have seen, and micro-batch × accumulation covers exactly the pairs of one big batch.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

Message = dict[str, str]
Turns = str | list[Message]


class SnapshotError(ValueError):
    """A snapshot that cannot be read; the message names the file, the row (1-based) and the column."""

    def __init__(self, path: str | Path, problem: str, *, row: int | None = None, column: str | None = None):
        where = (
            str(path)
            + (f", row {row}" if row is not None else "")
            + (f", column '{column}'" if column else "")
        )
        super().__init__(f"{where}: {problem}")


# ----------------------------------------------------------------------------- reading files


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a JSONL / Parquet file or a ``datasets.save_to_disk`` folder, as plain dicts."""
    path = Path(path)
    if not path.exists():
        raise SnapshotError(path, "no such file or folder")
    if path.is_dir():
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as exc:
            raise SnapshotError(path, f"not a datasets save_to_disk folder ({exc})") from exc
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise SnapshotError(path, f"a DatasetDict without a 'train' split (splits: {list(loaded)})")
            loaded = loaded["train"]
        return loaded.to_list()
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several unrelated types for a bad file
            raise SnapshotError(path, f"not a readable Parquet file ({exc})") from exc
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SnapshotError(path, f"invalid JSON ({exc.msg})", row=number) from exc
            if not isinstance(row, dict):
                raise SnapshotError(path, "each line must be a JSON object", row=number)
            rows.append(row)
    return rows


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSON Lines text, split at "\\n" only.

    ``str.splitlines`` also splits at U+2028, U+2029 and U+0085, which ``json.dumps(ensure_ascii=False)``
    writes raw inside strings, and sampled model text contains them: one such response would read as
    two broken rows.
    """
    return text.split("\n")


def snapshot_sha256(path: str | Path) -> str:
    """sha256 of a snapshot: of a file's bytes, or of a folder's ``sha256sum``-style manifest.

    The same value the studio records for a dataset snapshot (``<sha256>  <relative path>`` per file,
    sorted by path).
    """
    path = Path(path)
    if path.is_file():
        return _file_sha256(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    lines = [f"{_file_sha256(p)}  {p.relative_to(path).as_posix()}\n" for p in files]
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- preference pairs


@dataclass(frozen=True)
class PreferencePair:
    """One preference, prompt made explicit. ``prompt`` is ``""`` / ``[]`` when nothing is shared."""

    prompt: Turns
    chosen: Turns
    rejected: Turns
    margin: float
    key: str
    """sha256 hex of the canonical (prompt, chosen, rejected) JSON: the split key."""


def read_preferences(path: str | Path) -> list[PreferencePair]:
    """Read and validate a preference snapshot (TRL columns, see the module docstring)."""
    rows = read_rows(path)
    if not rows:
        raise SnapshotError(path, "the snapshot has no rows")
    return [_pair_from_row(row, path, number) for number, row in enumerate(rows, start=1)]


def _check_turns(value: Any, path: str | Path, row: int, column: str) -> Turns:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    ):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise SnapshotError(
        path, "expected a string or a list of {role, content} messages", row=row, column=column
    )


def _pair_from_row(row: Mapping[str, Any], path: str | Path, number: int) -> PreferencePair:
    for column in ("chosen", "rejected"):
        if column not in row or row[column] is None:
            raise SnapshotError(
                path,
                "missing value (a preference snapshot needs chosen and rejected)",
                row=number,
                column=column,
            )
    chosen = _check_turns(row["chosen"], path, number, "chosen")
    rejected = _check_turns(row["rejected"], path, number, "rejected")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise SnapshotError(
            path, "chosen and rejected must both be strings or both be conversations", row=number
        )
    prompt = row.get("prompt")
    if prompt is not None:
        prompt = _check_turns(prompt, path, number, "prompt")
    if prompt is None or isinstance(prompt, str) != isinstance(chosen, str):
        # implicit prompt (also TRL's rule when a string prompt sits next to full conversations)
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
    margin = row.get("margin")
    if margin is None:
        margin = 0.0
    elif isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise SnapshotError(
            path, f"margin must be a finite number, got {margin!r}", row=number, column="margin"
        )
    key = hashlib.sha256(
        json.dumps([prompt, chosen, rejected], ensure_ascii=False, sort_keys=True).encode()
    ).hexdigest()
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, margin=float(margin), key=key)


def extract_prompt(chosen: Turns, rejected: Turns) -> tuple[Turns, Turns, Turns]:
    """Split the longest common prefix off two completions (messages, or characters), like TRL."""
    n = min(len(chosen), len(rejected))
    idx = next((i for i in range(n) if chosen[i] != rejected[i]), n)
    if isinstance(chosen, str) and idx > 0 and chosen[idx - 1] == " ":
        idx -= 1  # keep the space with the completion
    return chosen[:idx], chosen[idx:], rejected[idx:]


def is_held_out(key: str, fraction: float) -> bool:
    """True for about ``fraction`` of keys, decided by the key alone (top 64 bits of the sha256)."""
    return int(key[:16], 16) / 2.0**64 < fraction


def split_pairs(
    pairs: Sequence[PreferencePair], eval_fraction: float
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """``(train, held_out)`` by :func:`is_held_out` on each pair's content hash; file order kept."""
    train = [p for p in pairs if not is_held_out(p.key, eval_fraction)]
    held = [p for p in pairs if is_held_out(p.key, eval_fraction)]
    return train, held


# ----------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class RenderedText:
    """Prompt and completion as one string; the completion starts at character ``response_start``."""

    text: str
    response_start: int
    templated: bool
    """True when the text came from a chat template (which already holds the special tokens)."""


def render_messages_plain(messages: Sequence[Message]) -> str:
    """The fallback rendering for tokenizers without a chat template: ``role: content`` lines."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def render(tokenizer: Any, prompt: Turns, completion: Turns) -> RenderedText:
    """Prompt + completion as the model sees them (TRL: standard text is concatenated as is)."""
    if isinstance(completion, str):
        if not isinstance(prompt, str):
            raise ValueError("a string completion needs a string prompt")
        return RenderedText(prompt + completion, len(prompt), templated=False)
    messages = list(prompt) + list(completion) if isinstance(prompt, list) else list(completion)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        if not prompt:
            return RenderedText(text, 0, templated=True)
        prefix = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        start = len(prefix) if text.startswith(prefix) else _common_prefix_length(text, prefix)
        return RenderedText(text, start, templated=True)
    head = render_messages_plain(prompt) + "\n" if prompt else ""
    return RenderedText(head + render_messages_plain(completion), len(head), templated=False)


def _common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


# ----------------------------------------------------------------------------- tokenising


@dataclass(frozen=True)
class EncodedText:
    """One tokenised sequence. ``ids`` (T,), ``offsets`` (T, 2) character ranges in the rendered text."""

    ids: list[int]
    response_mask: list[bool]
    """(T,) True on tokens of the completion, end-of-turn tokens of a chat template included."""
    offsets: list[tuple[int, int]]
    """(T,) ``[start, end)`` of each token in :attr:`RenderedText.text`; ``(0, 0)`` for added specials."""
    truncated: bool


def encode_texts(
    tokenizer: Any, texts: Sequence[RenderedText], max_length: int, *, batch_size: int = 1024
) -> list[EncodedText]:
    """Tokenise with truncation to ``max_length`` tokens, on ``tokenizer.truncation_side``.

    Needs a fast tokenizer (offset mapping). Texts from a chat template are tokenised without adding
    special tokens again; others get the tokenizer's usual ones (BERT's [CLS] … [SEP]).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("a fast (Rust) tokenizer is needed for offset mappings")
    out: list[tuple[int, EncodedText]] = []
    for begin in range(0, len(texts), batch_size):
        chunk = texts[begin : begin + batch_size]
        for templated in (False, True):
            picked = [i for i, t in enumerate(chunk) if t.templated == templated]
            if not picked:
                continue
            encoded = tokenizer(
                [chunk[i].text for i in picked],
                add_special_tokens=not templated,
                truncation=False,
                return_offsets_mapping=True,
            )
            long_rows = [j for j, ids in enumerate(encoded["input_ids"]) if len(ids) > max_length]
            if long_rows:
                cut = tokenizer(
                    [chunk[picked[j]].text for j in long_rows],
                    add_special_tokens=not templated,
                    truncation=True,
                    max_length=max_length,
                    return_offsets_mapping=True,
                )
                for k, j in enumerate(long_rows):
                    encoded["input_ids"][j] = cut["input_ids"][k]
                    encoded["offset_mapping"][j] = cut["offset_mapping"][k]
            long_set = set(long_rows)
            for j, i in enumerate(picked):
                offsets = [tuple(o) for o in encoded["offset_mapping"][j]]
                start = chunk[i].response_start
                mask = [e > s and e > start for s, e in offsets]
                out.append(
                    (begin + i, EncodedText(list(encoded["input_ids"][j]), mask, offsets, j in long_set))
                )
    out.sort(key=lambda item: item[0])
    return [text for _, text in out]


@dataclass(frozen=True)
class EncodedPair:
    """A tokenised preference pair."""

    chosen: EncodedText
    rejected: EncodedText
    margin: float


def encode_pairs(tokenizer: Any, pairs: Sequence[PreferencePair], max_length: int) -> list[EncodedPair]:
    """Render and tokenise every pair (chosen and rejected in one batched tokenizer call)."""
    texts = [render(tokenizer, p.prompt, p.chosen) for p in pairs] + [
        render(tokenizer, p.prompt, p.rejected) for p in pairs
    ]
    encoded = encode_texts(tokenizer, texts, max_length)
    n = len(pairs)
    return [EncodedPair(encoded[i], encoded[n + i], pairs[i].margin) for i in range(n)]


# ----------------------------------------------------------------------------- batches


class PreferenceBatch(NamedTuple):
    """B pairs, both sides right-padded to one length T so they can share a forward pass."""

    chosen_ids: torch.Tensor
    """(B, T) long token ids of prompt + chosen completion."""
    chosen_mask: torch.Tensor
    """(B, T) long attention mask, 1 = real token."""
    rejected_ids: torch.Tensor
    """(B, T) long."""
    rejected_mask: torch.Tensor
    """(B, T) long."""
    margin: torch.Tensor
    """(B,) float32 margin per pair (0 when the snapshot has none)."""
    chosen_response_mask: torch.Tensor
    """(B, T) bool, True on completion tokens (what a segment reward model segments)."""
    rejected_response_mask: torch.Tensor
    """(B, T) bool."""

    def concatenated(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, mask)`` of shape (2B, T): chosen rows first, then rejected rows."""
        return torch.cat([self.chosen_ids, self.rejected_ids]), torch.cat(
            [self.chosen_mask, self.rejected_mask]
        )

    def to(self, device: torch.device | str) -> PreferenceBatch:
        return PreferenceBatch(*(t.to(device) for t in self))


def collate(
    pairs: Sequence[EncodedPair], pad_id: int, pad_to_multiple_of: int | None = None
) -> PreferenceBatch:
    """Right-pad both sides of every pair to the longest sequence in the batch."""
    if not pairs:
        raise ValueError("cannot collate an empty batch")
    longest = max(max(len(p.chosen.ids), len(p.rejected.ids)) for p in pairs)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of

    def side(texts: list[EncodedText]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.full((len(texts), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), longest), dtype=torch.long)
        response = torch.zeros((len(texts), longest), dtype=torch.bool)
        for row, text in enumerate(texts):
            n = len(text.ids)
            ids[row, :n] = torch.tensor(text.ids, dtype=torch.long)
            mask[row, :n] = 1
            response[row, :n] = torch.tensor(text.response_mask, dtype=torch.bool)
        return ids, mask, response

    c_ids, c_mask, c_resp = side([p.chosen for p in pairs])
    r_ids, r_mask, r_resp = side([p.rejected for p in pairs])
    margin = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    return PreferenceBatch(c_ids, c_mask, r_ids, r_mask, margin, c_resp, r_resp)


class StepSampler:
    """Which pairs make up optimizer step ``step``: a pure function of ``(n, global_batch, seed, step)``.

    Each epoch is a fresh permutation (``torch.randperm`` seeded by ``seed`` and the epoch); the last
    incomplete batch of an epoch is dropped, so every step has exactly ``global_batch`` pairs.
    ``indices(step)`` has length ``global_batch``; :meth:`micro_batch` slices it for one process and
    one micro-batch (process-major: rank r owns the r-th contiguous block).
    """

    def __init__(self, n: int, global_batch: int, seed: int):
        if global_batch > n:
            raise ValueError(f"{n} training pairs cannot fill one batch of {global_batch} pairs")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.steps_per_epoch = n // global_batch
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, step: int) -> list[int]:
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=generator)
        begin = position * self.global_batch
        return self._perm[begin : begin + self.global_batch].tolist()

    def micro_batch(
        self, step: int, *, rank: int, world_size: int, micro: int, micro_batch_size: int
    ) -> list[int]:
        per_rank = self.global_batch // world_size
        block = self.indices(step)[rank * per_rank : (rank + 1) * per_rank]
        return block[micro * micro_batch_size : (micro + 1) * micro_batch_size]


# ----------------------------------------------------------------------------- human spans


@dataclass(frozen=True)
class CharSpan:
    """A human span: ``[start, end)`` in code points of the completion."""

    start: int
    end: int
    polarity: Literal["good", "bad"]
    label: str | None = None


@dataclass(frozen=True)
class SpanExample:
    """One response of a segments snapshot with its human spans."""

    prompt: Turns
    completion: str
    spans: tuple[CharSpan, ...]
    key: str


def read_span_examples(path: str | Path) -> list[SpanExample]:
    """Read a segments snapshot (see the module docstring); spans are validated against the text."""
    rows = read_rows(path)
    examples = []
    for number, row in enumerate(rows, start=1):
        column = "completion" if "completion" in row else "response"
        completion = row.get(column)
        if not isinstance(completion, str):
            raise SnapshotError(path, "expected the response text (a string)", row=number, column=column)
        prompt = row.get("prompt")
        prompt = "" if prompt is None else _check_turns(prompt, path, number, "prompt")
        spans = _parse_spans(row.get("spans"), completion, path, number)
        key = hashlib.sha256(
            json.dumps([prompt, completion], ensure_ascii=False, sort_keys=True).encode()
        ).hexdigest()
        examples.append(SpanExample(prompt, completion, spans, key))
    return examples


def _parse_spans(raw: Any, text: str, path: str | Path, row: int) -> tuple[CharSpan, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise SnapshotError(
                path, f"spans is not valid JSON ({exc.msg})", row=row, column="spans"
            ) from exc
    if not isinstance(raw, list):
        raise SnapshotError(path, "spans must be a list", row=row, column="spans")
    spans = []
    for i, span in enumerate(raw):
        where = f"span {i}: "
        if not isinstance(span, Mapping):
            raise SnapshotError(path, where + "expected an object", row=row, column="spans")
        start, end, polarity = span.get("start"), span.get("end"), span.get("polarity")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)):
            raise SnapshotError(path, where + "start and end must be integers", row=row, column="spans")
        if not 0 <= start < end <= len(text):
            raise SnapshotError(
                path,
                where + f"[{start}, {end}) is not inside the {len(text)}-character response",
                row=row,
                column="spans",
            )
        if polarity not in ("good", "bad"):
            raise SnapshotError(
                path, where + f"polarity must be 'good' or 'bad', got {polarity!r}", row=row, column="spans"
            )
        label = span.get("label")
        spans.append(CharSpan(start, end, polarity, label if isinstance(label, str) else None))
    return tuple(spans)


def span_token_mask(offsets: Sequence[tuple[int, int]], spans: Iterable[tuple[int, int]]) -> list[bool]:
    """(T,) True where a token's ``[s, e)`` character range overlaps any span ``[a, b)``.

    Empty ranges (added special tokens) never match. Offsets and spans must use one coordinate system.
    """
    spans = list(spans)
    return [e > s and any(s < b and e > a for a, b in spans) for s, e in offsets]


@dataclass(frozen=True)
class EncodedSpans:
    """A tokenised span example; every mask has the shape of ``ids`` (T,)."""

    ids: list[int]
    response_mask: list[bool]
    good_mask: list[bool]
    bad_mask: list[bool]
    truncated: bool


def encode_span_examples(
    tokenizer: Any, examples: Sequence[SpanExample], max_length: int
) -> list[EncodedSpans]:
    """Render prompt + completion, tokenise, and map the completion's character spans onto tokens."""
    rendered = [
        render(
            tokenizer, ex.prompt, ex.completion if isinstance(ex.prompt, str) else _assistant(ex.completion)
        )
        for ex in examples
    ]
    out = []
    for ex, text, enc in zip(examples, rendered, encode_texts(tokenizer, rendered, max_length), strict=True):
        # A chat template puts the completion verbatim after the prompt prefix: find where.
        shift = text.text.find(ex.completion, text.response_start)
        if shift < 0:
            raise ValueError("the chat template changed the response text; cannot place its spans")
        masks = {
            polarity: span_token_mask(
                enc.offsets, [(s.start + shift, s.end + shift) for s in ex.spans if s.polarity == polarity]
            )
            for polarity in ("good", "bad")
        }
        out.append(EncodedSpans(enc.ids, enc.response_mask, masks["good"], masks["bad"], enc.truncated))
    return out


def _assistant(text: str) -> list[Message]:
    return [{"role": "assistant", "content": text}]
