"""Dataset snapshots: read a project's annotations and turn them into TRL-shaped rows.

Three layers, so each can be tested on its own:
1. `storage.export_data.load_project_data(session, project_id, purposes)` reads prompts, generations, comparisons
   with their votes, and submitted span sets into plain frozen dataclasses (one read).
2. `build_rows(kind, data, filters, snapshot_id)` is pure: it turns that data into the rows of
   one snapshot kind and counts what it left out and why (`RowsResult.counts`).
3. `storage.exports_io.write_snapshot_folder` writes the rows (JSONL / Parquet / datasets folder)
   atomically and hashes them.

Kinds (storage/DATASETS.md has the full column list and the reasoning):
- preferences: TRL explicit-prompt preference rows (`prompt`, `chosen`, `rejected`) for DPO.
- reward: TRL implicit-prompt rows (`chosen`, `rejected` hold the whole conversation) + `margin`.
- unpaired: TRL unpaired rows (`prompt`, `completion`, `label`) for KTO.
- segments: response text + spans (polarity, label, comment, text, code-point offsets).
- stepwise: TRL stepwise supervision (`prompt`, `completions`, `labels`) rebuilt from the spans.
- votes: one row per raw vote (rater, outcome, strength, shown order, time, guideline version).
- prompts: prompt-only rows for online RL.

Consensus per comparison: the outcome with the most votes. A shared top count, or a top outcome
that is tie or both_bad, gives no preference pair. No torch, no gradio.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from storage.export_data import (
    ComparisonData,
    GenerationData,
    ProjectData,
    PromptData,
    SpanData,
    VoteData,
)

EXPORT_KINDS: tuple[str, ...] = (
    "preferences",
    "reward",
    "unpaired",
    "segments",
    "stepwise",
    "votes",
    "prompts",
)
STORED_KIND = {k: ("segments" if k == "stepwise" else k) for k in EXPORT_KINDS}
"""Export kind -> DatasetSnapshot.kind (the stepwise variant is stored as a segments snapshot)."""

STRENGTH_MARGIN: dict[str | None, float] = {"slight": 0.5, "clear": 1.0, "much": 2.0, None: 1.0}
"""Consensus strength -> RewardTrainer `margin` (loss −log σ(r⁺ − r⁻ − margin)); no strength = clear."""
STRENGTH_ORDER = ("slight", "clear", "much")


# --------------------------------------------------------------------------- filters


@dataclass(frozen=True)
class ExportFilters:
    """What goes into a snapshot; only these keys are accepted from a client (R-SEC-11)."""

    min_votes: int = 1
    """Comparisons with fewer votes give no consensus row (preferences, reward, unpaired)."""
    min_agreement: float = 0.0
    """Least share of votes that must equal the consensus outcome (0..1), e.g. 0.67."""
    tag: str | None = None
    """Only prompts carrying this tag."""
    include_ties: bool = False
    """reward only: a tie consensus gives two mirrored margin-0 rows (a≻b and b≻a)."""
    prompt_format: Literal["auto", "conversational", "standard"] = "auto"
    """auto: conversational when any prompt in the snapshot is a chat prompt, else plain strings."""
    purpose: Literal["annotate", "arena", "all"] = "annotate"
    """Which comparisons: annotation items, arena battles, or both."""

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> ExportFilters:
        """Validate a filter dict; ValueError names the bad key. Unknown keys are refused."""
        raw = dict(raw or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown export filter(s) {unknown}; allowed: {sorted(known)}")
        values: dict[str, Any] = {}
        if "min_votes" in raw:
            v = raw["min_votes"]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"min_votes must be an integer >= 1, got {v!r}")
            values["min_votes"] = v
        if "min_agreement" in raw:
            v = raw["min_agreement"]
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v <= 1.0:
                raise ValueError(f"min_agreement must be a number in [0, 1], got {v!r}")
            values["min_agreement"] = float(v)
        if raw.get("tag") not in (None, ""):
            if not isinstance(raw["tag"], str):
                raise ValueError(f"tag must be a string, got {raw['tag']!r}")
            values["tag"] = raw["tag"]
        if "include_ties" in raw:
            if not isinstance(raw["include_ties"], bool):
                raise ValueError(f"include_ties must be true or false, got {raw['include_ties']!r}")
            values["include_ties"] = raw["include_ties"]
        for key, allowed in (
            ("prompt_format", ("auto", "conversational", "standard")),
            ("purpose", ("annotate", "arena", "all")),
        ):
            if key in raw:
                if raw[key] not in allowed:
                    raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {raw[key]!r}")
                values[key] = raw[key]
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def purposes(self) -> tuple[str, ...]:
        return ("annotate", "arena") if self.purpose == "all" else (self.purpose,)


# --------------------------------------------------------------------------- consensus


@dataclass(frozen=True)
class Consensus:
    """The consensus of one comparison's votes."""

    outcome: str | None
    """Most voted outcome (a | b | tie | both_bad), None when no votes or the top count is shared."""
    n_votes: int
    agreement: float
    """Share of votes equal to `outcome` (0 when None)."""
    strength: str | None
    """Lower median strength of the votes that agree with the outcome (None if none gave one)."""


def consensus(votes: Sequence[VoteData]) -> Consensus:
    counts = Counter(v.outcome for v in votes)
    if not counts:
        return Consensus(None, 0, 0.0, None)
    top = counts.most_common(2)
    n = len(votes)
    if len(top) == 2 and top[0][1] == top[1][1]:
        return Consensus(None, n, 0.0, None)
    outcome = top[0][0]
    ranks = sorted(STRENGTH_ORDER.index(v.strength) for v in votes if v.outcome == outcome and v.strength)
    strength = STRENGTH_ORDER[ranks[(len(ranks) - 1) // 2]] if ranks else None
    return Consensus(outcome, n, top[0][1] / n, strength)


# --------------------------------------------------------------------------- rows


@dataclass
class RowsResult:
    kind: str
    rows: list[dict[str, Any]]
    counts: dict[str, Any] = field(default_factory=dict)


class _Prompts:
    """Renders prompts in the snapshot's format (decided once for all rows of a snapshot)."""

    def __init__(self, prompts: Sequence[PromptData], prompt_format: str):
        if prompt_format == "auto":
            self.conversational = any(p.kind == "chat" for p in prompts)
        else:
            self.conversational = prompt_format == "conversational"

    def messages(self, p: PromptData) -> list[dict[str, str]]:
        # A text prompt is one user turn: this is how the studio generated its responses.
        return (
            [dict(m) for m in p.messages]
            if p.kind == "chat" and p.messages
            else [{"role": "user", "content": p.text}]
        )

    def prompt(self, p: PromptData) -> str | list[dict[str, str]]:
        # Standard format: a chat prompt becomes its readable "role: content" rendering (Prompt.text).
        return self.messages(p) if self.conversational else p.text

    def completion(self, text: str) -> str | list[dict[str, str]]:
        return [{"role": "assistant", "content": text}] if self.conversational else text

    def full(self, p: PromptData, text: str) -> str | list[dict[str, str]]:
        """Implicit-prompt form: the whole conversation, or prompt text + response."""
        return (
            [*self.messages(p), {"role": "assistant", "content": text}]
            if self.conversational
            else p.text + text
        )


def _tagged(data: ProjectData, tag: str | None):
    return lambda prompt_id: tag is None or tag in data.prompts[prompt_id].tags


def _shown_order(c: ComparisonData, v: VoteData) -> str:
    """'ab' when the rater saw generation a on the left, else 'ba'."""
    return "ab" if v.left_generation_id == c.generation_a_id else "ba"


def _provenance(
    c: ComparisonData,
    cons: Consensus,
    p: PromptData,
    snapshot_id: str,
    chosen: GenerationData,
    rejected: GenerationData,
) -> dict[str, Any]:
    versions = [v.guideline_version for v in c.votes if v.guideline_version is not None]
    return {
        "prompt_id": p.sha256,
        "pair_id": c.id,
        "snapshot_id": snapshot_id,
        "rater_ids": [v.user_id for v in c.votes],
        "n_votes": cons.n_votes,
        "agreement": cons.agreement,
        "outcome": cons.outcome,
        "strength": cons.strength,
        "shown_order": [_shown_order(c, v) for v in c.votes],
        "guideline_version": max(versions) if versions else None,
        "chosen_model": chosen.model,
        "rejected_model": rejected.model,
        "chosen_generation_id": chosen.id,
        "rejected_generation_id": rejected.id,
    }


def _consensus_items(data: ProjectData, filters: ExportFilters, counts: Counter):
    """Comparisons that pass the filters, with their consensus; counts why others were left out."""
    keep_prompt = _tagged(data, filters.tag)
    for c in data.comparisons:
        if not keep_prompt(c.prompt_id):
            counts["other_tag"] += 1
            continue
        counts["comparisons"] += 1
        cons = consensus(c.votes)
        if cons.n_votes == 0:
            counts["no_votes"] += 1
        elif cons.n_votes < filters.min_votes:
            counts["below_min_votes"] += 1
        elif cons.outcome is None:
            counts["split"] += 1
        elif cons.agreement < filters.min_agreement:
            counts["below_min_agreement"] += 1
        else:
            counts[cons.outcome] += 1
            yield c, cons


def _decided(data: ProjectData, filters: ExportFilters) -> tuple[Counter, list, _Prompts]:
    """(counts, consensus items, prompt formatter): the start of every pairwise row builder."""
    counts: Counter = Counter()
    items = list(_consensus_items(data, filters, counts))
    return counts, items, _Prompts([data.prompts[c.prompt_id] for c, _ in items], filters.prompt_format)


def _pair(data: ProjectData, c: ComparisonData, outcome: str) -> tuple[GenerationData, GenerationData]:
    a, b = data.generations[c.generation_a_id], data.generations[c.generation_b_id]
    return (a, b) if outcome == "a" else (b, a)


def preference_rows(data: ProjectData, filters: ExportFilters, snapshot_id: str) -> RowsResult:
    """Explicit-prompt preference pairs: only decisive (a/b) consensus outcomes."""
    counts, items, fmt = _decided(data, filters)
    rows = []
    for c, cons in items:
        if cons.outcome not in ("a", "b"):
            continue
        p = data.prompts[c.prompt_id]
        chosen, rejected = _pair(data, c, cons.outcome)
        rows.append(
            {
                "prompt": fmt.prompt(p),
                "chosen": fmt.completion(chosen.text),
                "rejected": fmt.completion(rejected.text),
                **_provenance(c, cons, p, snapshot_id, chosen, rejected),
            }
        )
    return RowsResult("preferences", rows, {**counts, "conversational": fmt.conversational})


def reward_rows(data: ProjectData, filters: ExportFilters, snapshot_id: str) -> RowsResult:
    """Implicit-prompt pairs with `margin` from strength; ties as two mirrored margin-0 rows if asked."""
    counts, items, fmt = _decided(data, filters)
    rows = []
    for c, cons in items:
        p = data.prompts[c.prompt_id]
        if cons.outcome in ("a", "b"):
            pairs = [(*_pair(data, c, cons.outcome), STRENGTH_MARGIN[cons.strength])]
        elif cons.outcome == "tie" and filters.include_ties:
            a, b = data.generations[c.generation_a_id], data.generations[c.generation_b_id]
            pairs = [(a, b, 0.0), (b, a, 0.0)]
            counts["tie_rows"] += 2
        else:
            continue
        for chosen, rejected, margin in pairs:
            rows.append(
                {
                    "chosen": fmt.full(p, chosen.text),
                    "rejected": fmt.full(p, rejected.text),
                    "margin": margin,
                    **_provenance(c, cons, p, snapshot_id, chosen, rejected),
                }
            )
    return RowsResult("reward", rows, {**counts, "conversational": fmt.conversational})


def unpaired_rows(data: ProjectData, filters: ExportFilters, snapshot_id: str) -> RowsResult:
    """KTO rows: a decisive pair -> chosen True + rejected False; both_bad -> two False; tie -> none."""
    counts, items, fmt = _decided(data, filters)
    rows = []
    for c, cons in items:
        p = data.prompts[c.prompt_id]
        a, b = data.generations[c.generation_a_id], data.generations[c.generation_b_id]
        if cons.outcome in ("a", "b"):
            chosen, rejected = _pair(data, c, cons.outcome)
            labelled = [(chosen, True), (rejected, False)]
        elif cons.outcome == "both_bad":
            labelled = [(a, False), (b, False)]
        else:
            continue
        base = _provenance(c, cons, p, snapshot_id, a, b)
        for gen, label in labelled:
            rest = {k: v for k, v in base.items() if not k.startswith(("chosen_", "rejected_"))}
            rows.append(
                {
                    "prompt": fmt.prompt(p),
                    "completion": fmt.completion(gen.text),
                    "label": label,
                    **rest,
                    "model": gen.model,
                    "generation_id": gen.id,
                }
            )
    return RowsResult("unpaired", rows, {**counts, "conversational": fmt.conversational})


def _span_text(text: str, s: SpanData) -> str:
    return text[s.start : s.end]  # Python str indices are code points, like the stored offsets


def stepwise_segments(text: str, spans: Sequence[SpanData]) -> tuple[list[str], list[bool]]:
    """Split `text` at every span boundary into consecutive segments that rebuild it exactly.

    Label of a segment: False when any "bad" span covers it, else True (marked good, or not
    marked at all: an annotator who saw it and flagged nothing). "".join(segments) == text.
    """
    cuts = sorted(
        {
            0,
            len(text),
            *(min(max(s.start, 0), len(text)) for s in spans),
            *(min(s.end, len(text)) for s in spans),
        }
    )
    segments, labels = [], []
    for lo, hi in itertools.pairwise(cuts):
        if hi <= lo:
            continue
        bad = any(s.polarity == "bad" and s.start <= lo and hi <= s.end for s in spans)
        segments.append(text[lo:hi])
        labels.append(not bad)
    return segments, labels


def _span_sets(data: ProjectData, filters: ExportFilters, counts: Counter):
    keep_prompt = _tagged(data, filters.tag)
    for ss in data.span_sets:
        gen = data.generations.get(ss.generation_id)
        if gen is None or not keep_prompt(gen.prompt_id):
            counts["other_tag"] += 1
            continue
        counts["span_sets"] += 1
        counts["spans"] += len(ss.spans)
        yield ss, gen, data.prompts[gen.prompt_id]


def segment_rows(data: ProjectData, filters: ExportFilters, snapshot_id: str) -> RowsResult:
    """One row per submitted span set: the response, its spans (with their text) and provenance."""
    counts: Counter = Counter()
    items = list(_span_sets(data, filters, counts))
    fmt = _Prompts([p for _, _, p in items], filters.prompt_format)
    rows = [
        {
            "prompt": fmt.prompt(p),
            "response": gen.text,
            "spans": [
                {
                    "start": s.start,
                    "end": s.end,
                    "polarity": s.polarity,
                    "label": s.label,
                    "comment": s.comment,
                    "text": _span_text(gen.text, s),
                }
                for s in ss.spans
            ],
            "prompt_id": p.sha256,
            "response_sha256": hashlib.sha256(gen.text.encode("utf-8")).hexdigest(),
            "generation_id": gen.id,
            "model": gen.model,
            "rater_id": ss.user_id,
            "guideline_version": ss.guideline_version,
            "snapshot_id": snapshot_id,
        }
        for ss, gen, p in items
    ]
    return RowsResult(
        "segments", rows, {**counts, "conversational": fmt.conversational, "offsets": "codepoint"}
    )


def stepwise_rows(data: ProjectData, filters: ExportFilters, snapshot_id: str) -> RowsResult:
    """TRL stepwise supervision (standard format only): segments + one bool label each."""
    counts: Counter = Counter()
    rows = []
    for ss, gen, p in _span_sets(data, filters, counts):
        completions, labels = stepwise_segments(gen.text, ss.spans)
        if not completions:
            counts["empty_response"] += 1
            continue
        rows.append(
            {
                "prompt": p.text,
                "completions": completions,
                "labels": labels,
                "prompt_id": p.sha256,
                "generation_id": gen.id,
                "model": gen.model,
                "rater_id": ss.user_id,
                "guideline_version": ss.guideline_version,
                "snapshot_id": snapshot_id,
            }
        )
    return RowsResult("stepwise", rows, {**counts, "step_separator": ""})


def vote_rows(data: ProjectData, filters: ExportFilters, snapshot_id: str) -> RowsResult:
    """Every raw vote, unaggregated (only the tag and purpose filters apply)."""
    counts: Counter = Counter()
    keep_prompt = _tagged(data, filters.tag)
    items = [c for c in data.comparisons if keep_prompt(c.prompt_id)]
    fmt = _Prompts([data.prompts[c.prompt_id] for c in items], filters.prompt_format)
    rows = []
    for c in items:
        p = data.prompts[c.prompt_id]
        a, b = data.generations[c.generation_a_id], data.generations[c.generation_b_id]
        for v in c.votes:
            counts[v.outcome] += 1
            rows.append(
                {
                    "vote_id": v.id,
                    "pair_id": c.id,
                    "prompt_id": p.sha256,
                    "prompt": fmt.prompt(p),
                    "response_a": a.text,
                    "response_b": b.text,
                    "model_a": a.model,
                    "model_b": b.model,
                    "generation_a_id": a.id,
                    "generation_b_id": b.id,
                    "rater_id": v.user_id,
                    "rater": v.username,
                    "outcome": v.outcome,
                    "strength": v.strength,
                    "shown_order": _shown_order(c, v),
                    "time_spent_ms": v.time_spent_ms,
                    "created_at": v.created_at.isoformat(),
                    "guideline_version": v.guideline_version,
                    "rationale": v.rationale,
                    "gold_outcome": c.gold_outcome,
                    "purpose": c.purpose,
                    "snapshot_id": snapshot_id,
                }
            )
    return RowsResult("votes", rows, {**counts, "conversational": fmt.conversational})


def prompt_rows(data: ProjectData, filters: ExportFilters, snapshot_id: str) -> RowsResult:
    """Prompt-only rows (GRPO, RLOO, online DPO)."""
    keep_prompt = _tagged(data, filters.tag)
    items = [p for p in data.prompts.values() if keep_prompt(p.id)]
    fmt = _Prompts(items, filters.prompt_format)
    rows = [
        {
            "prompt": fmt.prompt(p),
            "prompt_id": p.sha256,
            "external_id": p.external_id,
            "tags": list(p.tags),
            "snapshot_id": snapshot_id,
        }
        for p in items
    ]
    return RowsResult("prompts", rows, {"prompts": len(rows), "conversational": fmt.conversational})


BUILDERS = {
    "preferences": preference_rows,
    "reward": reward_rows,
    "unpaired": unpaired_rows,
    "segments": segment_rows,
    "stepwise": stepwise_rows,
    "votes": vote_rows,
    "prompts": prompt_rows,
}


def build_rows(kind: str, data: ProjectData, filters: ExportFilters, snapshot_id: str) -> RowsResult:
    """The rows of one snapshot kind (see EXPORT_KINDS); counts say what was left out and why."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown export kind {kind!r}; use one of {', '.join(EXPORT_KINDS)}")
    result = BUILDERS[kind](data, filters, snapshot_id)
    result.counts = {"rows": len(result.rows), **dict(result.counts)}
    return result
