"""Live agreement and rater calibration for admins (annotation-and-arena.md §5.3–5.4).

`QualityService.report(username, project_id)` reads the project's annotation votes and submitted
span sets once and computes, with the pure functions of `studio.quality`:
- Krippendorff's α over the comparisons with two or more votes: nominal (a / b / tie / both_bad)
  and ordinal (a < tie < b; both_bad counts as missing there), with bootstrap 95 % intervals;
- span agreement: mean character IoU and F1 (polarity-aware) over rater pairs on one response;
- per annotator: vote count, P(left) among decisive votes and its bias CI, tie and both-bad rates,
  gold accuracy, leave-one-out agreement with the majority, median seconds per vote.

Only `annotate` comparisons count (arena battles are judged by raters on other terms), and the
system user that owns imported preferences is left out: its votes are not human agreement data.
Undefined numbers (no overlap yet, no gold items, ...) are None, never NaN.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass

from storage import crud
from storage.db import Database
from storage.export_data import IMPORT_USERNAME, ComparisonData, VoteData, load_project_data
from studio import quality as qm
from studio.services.errors import NotFound
from studio.settings import Settings


@dataclass(frozen=True)
class AnnotatorQuality:
    username: str
    votes: int
    left_rate: float | None
    """P(choose the left response) among this rater's decisive votes (a or b)."""
    left_bias_ci: tuple[float, float] | None
    """Wilson 95 % interval of left_rate − 0.5; an interval away from 0 means position bias."""
    tie_rate: float | None
    gold_accuracy: float | None
    gold_n: int
    agreement_with_majority: float | None
    """Share of overlap items where the rater matches the majority of the *other* raters."""
    median_seconds: float | None
    decisive: int = 0
    both_bad_rate: float | None = None
    majority_n: int = 0
    """Items counted for agreement_with_majority (others present and not evenly split)."""
    span_sets: int = 0


@dataclass(frozen=True)
class QualityReport:
    pairwise_alpha_nominal: float | None
    pairwise_alpha_ordinal: float | None
    n_overlap_items: int
    """Comparisons with two or more (human) votes: the only ones α can use."""
    span_iou: float | None
    span_f1: float | None
    per_annotator: list[AnnotatorQuality]
    alpha_nominal_ci: tuple[float, float] | None = None
    alpha_ordinal_ci: tuple[float, float] | None = None
    n_votes: int = 0
    n_span_items: int = 0
    """Responses with span sets from two or more raters."""
    n_span_pairs: int = 0


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _ci(ci: tuple[float, float]) -> tuple[float, float] | None:
    lo, hi = ci
    return None if math.isnan(lo) or math.isnan(hi) else (float(lo), float(hi))


def chose_left(c: ComparisonData, v: VoteData) -> bool | None:
    """True/False for a decisive vote (the rater picked the left/right side), None otherwise."""
    if v.outcome not in ("a", "b"):
        return None
    chosen = c.generation_a_id if v.outcome == "a" else c.generation_b_id
    return chosen == v.left_generation_id


class QualityService:
    def __init__(self, db: Database, settings: Settings, users, *, n_boot: int = 500):
        self.db = db
        self.settings = settings
        self.users = users
        self.n_boot = n_boot

    def report(self, username: str | None, project_id: int) -> QualityReport:
        """Agreement and per-annotator calibration of one project (admin only)."""
        self.users.require(username, "admin")
        with self.db.read() as s:
            if crud.get_project(s, project_id) is None:
                raise NotFound(f"project {project_id} does not exist")
            data = load_project_data(s, project_id, purposes=("annotate",))
        comparisons = [(c, [v for v in c.votes if v.username != IMPORT_USERNAME]) for c in data.comparisons]
        triples = [(c.id, v.user_id, v.outcome) for c, votes in comparisons for v in votes]
        nominal = qm.pairwise_units(triples, "nominal")
        ordinal = qm.pairwise_units(triples, "ordinal")
        span_items: dict[int, dict[int, list]] = defaultdict(dict)
        span_counts: dict[str, int] = defaultdict(int)
        for ss in data.span_sets:
            if ss.username == IMPORT_USERNAME:
                continue
            span_items[ss.generation_id][ss.user_id] = [(x.start, x.end, x.polarity) for x in ss.spans]
            span_counts[ss.username] += 1
        spans = qm.span_agreement(span_items)
        majority = qm.agreement_with_majority(nominal)

        per_user: dict[int, list[tuple[ComparisonData, VoteData]]] = defaultdict(list)
        names: dict[int, str] = {}
        for c, votes in comparisons:
            for v in votes:
                per_user[v.user_id].append((c, v))
                names[v.user_id] = v.username
        for ss in data.span_sets:
            if ss.username != IMPORT_USERNAME:
                names.setdefault(ss.user_id, ss.username)
        annotators = [
            self._annotator(names[uid], per_user.get(uid, []), majority.get(uid), span_counts[names[uid]])
            for uid in sorted(names, key=lambda u: names[u].casefold())
        ]
        return QualityReport(
            pairwise_alpha_nominal=_num(qm.krippendorff_alpha(nominal, "nominal")),
            pairwise_alpha_ordinal=_num(qm.krippendorff_alpha(ordinal, "ordinal")),
            n_overlap_items=sum(len(u) >= 2 for u in nominal.values()),
            span_iou=_num(spans.iou),
            span_f1=_num(spans.f1),
            per_annotator=annotators,
            alpha_nominal_ci=_ci(qm.alpha_bootstrap_ci(nominal, "nominal", n_boot=self.n_boot)),
            alpha_ordinal_ci=_ci(qm.alpha_bootstrap_ci(ordinal, "ordinal", n_boot=self.n_boot)),
            n_votes=len(triples),
            n_span_items=spans.n_items,
            n_span_pairs=spans.n_pairs,
        )

    @staticmethod
    def _annotator(
        username: str,
        votes: list[tuple[ComparisonData, VoteData]],
        majority: tuple[float, int] | None,
        span_sets: int,
    ) -> AnnotatorQuality:
        n = len(votes)
        sides = [side for c, v in votes if (side := chose_left(c, v)) is not None]
        bias = qm.position_bias(sum(sides), len(sides))
        gold, gold_n = qm.gold_accuracy((v.outcome, c.gold_outcome) for c, v in votes if c.gold_outcome)
        seconds = [v.time_spent_ms / 1000.0 for _, v in votes if v.time_spent_ms is not None]
        rate, counted = majority if majority else (math.nan, 0)
        return AnnotatorQuality(
            username=username,
            votes=n,
            left_rate=_num(bias.left_rate),
            left_bias_ci=_ci(bias.ci),
            tie_rate=sum(v.outcome == "tie" for _, v in votes) / n if n else None,
            gold_accuracy=_num(gold),
            gold_n=gold_n,
            agreement_with_majority=_num(rate),
            median_seconds=statistics.median(seconds) if seconds else None,
            decisive=len(sides),
            both_bad_rate=sum(v.outcome == "both_bad" for _, v in votes) / n if n else None,
            majority_n=counted,
            span_sets=span_sets,
        )
