"""Per-rater arena statistics and the always-valid "new vs parent" test (annotation-and-arena.md §2.7, §2.8.4).

Pure Python + numpy, re-exported by `studio.rating`. Votes are `BattleRecord`s in chronological
order (the sequential quantities depend on that order).

Position bias: the share of decisive votes that picked the left side, with a Wilson 95 % interval.

Crowd agreement: for each decisive vote of rater r on the unordered pair {i, j}, the *other*
raters' decisive votes on that pair must have a strict majority; the agreement is the share of
such votes that side with it (ties and split or empty crowds are not counted).

Outlier martingales (FastChat `elo_analysis.outlier_detect`): for the first ≤ 100 votes of a rater
with ≥ 5 votes, v = 1 / ½ / 0 (the lower model id of the pair won / tie / lost) is compared with the
crowd's decisive votes c on the same pair, p_up = P(c ≤ v), p_low = P(c ≥ v), and
M_up = Π 1/(2·p_up), M_low = Π 1/(2·p_low). Differences from FastChat, both deliberate: the crowd
excludes the rater's own votes (otherwise a lone rater is compared with himself), and the p-values
count the vote itself as one more crowd member, p = (#{c ≤ v} + 1)/(n + 1) (the conformal
p-value: never 0, and under exchangeability each factor has expectation ≤ 1, so M is a
supermartingale and Ville's inequality gives P(sup M ≥ 1/α) ≤ α). A vote on a pair nobody else
decided contributes a factor 1, and so does a tie / both_bad vote (v = ½): the crowd's counts are
decisive votes only, so a ½ would sit outside every crowd value and read as extreme on one side
(p = 1/(n + 1)), flagging a rater for honest ties; ties carry no direction to test. The rater is flagged as soon as either martingale exceeds 1/α
(α = 0.05 → 20); the martingales reported are the values at that moment (or after the last vote
examined). A flag is a warning: the leaderboard drops nothing unless asked to.

Sequential pair test: decisive votes between models a and b are coin flips x (1 = a won). Under
H0: P(a wins) = ½, the wealth W_t = Π 2·q_t(x_t), q_t = Krichevsky–Trofimov estimate from the past
votes ((wins + ½)/(t + 1) for x = 1), is the Beta(½, ½)-mixture likelihood ratio against the fair
coin: a non-negative martingale with W_0 = 1. By Ville's inequality P(W_t ever ≥ 1/α) ≤ α, so
stopping the first time W_t ≥ 1/α is valid however often the board is looked at. The bet is two-sided
(it backs whichever side has won more so far).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from studio.quality import wilson_interval

if TYPE_CHECKING:
    from studio.rating import BattleRecord

MIN_VOTES = 5
"""Raters with fewer votes are not tested (FastChat)."""
MAX_VOTES = 100
"""Only a rater's first votes are tested (FastChat's max_vote)."""


@dataclass(frozen=True)
class RaterStats:
    rater: int
    votes: int
    left_rate: float
    """Share of decisive votes for the left side; NaN without decisive votes."""
    left_ci: tuple[float, float]
    """Wilson 95 % interval of left_rate; (NaN, NaN) without decisive votes."""
    tie_rate: float
    """Share of votes that were "tie" or "both_bad"."""
    crowd_agreement: float | None
    """Share of decisive votes siding with the other raters' majority on the pair; None if none comparable."""
    martingale_up: float
    """FastChat's M_upper: grows when the rater keeps voting *against* the lower-id model the crowd favours."""
    martingale_low: float
    """M_lower: grows when the rater keeps voting *for* the lower-id model the crowd disfavours."""
    flagged: bool
    """A martingale exceeded 1/α: a warning, not a verdict."""


def _pair(battle: BattleRecord) -> tuple[int, int]:
    return (min(battle.model_a, battle.model_b), max(battle.model_a, battle.model_b))


def _score_of_first(battle: BattleRecord) -> float:
    """1 if the lower model id of the pair won, 0 if it lost, ½ for tie / both_bad."""
    if battle.outcome in ("tie", "both_bad"):
        return 0.5
    winner = battle.model_a if battle.outcome == "a" else battle.model_b
    return 1.0 if winner == min(battle.model_a, battle.model_b) else 0.0


def _chose_left(battle: BattleRecord) -> bool:
    return (battle.outcome == "a") == battle.left_is_a


def _pair_tallies(battles: Sequence[BattleRecord]) -> dict[tuple[int, int], Counter]:
    """(pair → Counter{1.0: first won, 0.0: first lost}) over decisive votes."""
    tallies: dict[tuple[int, int], Counter] = defaultdict(Counter)
    for battle in battles:
        score = _score_of_first(battle)
        if score != 0.5:
            tallies[_pair(battle)][score] += 1
    return tallies


def outlier_martingales(
    votes: Sequence[tuple[float, int, int]], alpha: float = 0.05, max_votes: int = MAX_VOTES
) -> tuple[float, float, bool]:
    """(M_up, M_low, flagged) for one rater's votes (v, crowd wins, crowd losses) in order.

    v ∈ {1, ½, 0} is the rater's score of the pair's first model; the crowd counts are the other
    raters' decisive votes on the same pair (module docstring). A tie (v = ½) and a pair without a
    crowd contribute a factor 1.
    """
    up = low = 1.0
    for v, crowd_wins, crowd_losses in votes[:max_votes]:
        n = crowd_wins + crowd_losses
        if n == 0 or v == 0.5:  # no crowd to compare with; a tie against decisive votes only is no evidence
            continue
        at_most = crowd_losses + (crowd_wins if v >= 1.0 else 0)  # crowd votes c ≤ v
        at_least = crowd_wins + (crowd_losses if v <= 0.0 else 0)  # crowd votes c ≥ v
        up *= (n + 1) / (2.0 * (at_most + 1))
        low *= (n + 1) / (2.0 * (at_least + 1))
        if up > 1.0 / alpha or low > 1.0 / alpha:
            return up, low, True
    return up, low, False


def _crowd_agreement(own: Sequence[BattleRecord], others: dict[tuple[int, int], Counter]) -> float | None:
    hits = counted = 0
    for battle in own:
        score = _score_of_first(battle)
        crowd = others.get(_pair(battle), Counter())
        if score == 0.5 or crowd[1.0] == crowd[0.0]:
            continue
        counted += 1
        hits += (crowd[1.0] > crowd[0.0]) == (score == 1.0)
    return hits / counted if counted else None


def rater_stats(
    battles: Sequence[BattleRecord],
    *,
    alpha: float = 0.05,
    min_votes: int = MIN_VOTES,
    max_votes: int = MAX_VOTES,
) -> list[RaterStats]:
    """Statistics of every rater (votes without a rater only feed the crowd), sorted by rater id."""
    everyone = _pair_tallies(battles)
    by_rater: dict[int, list[BattleRecord]] = defaultdict(list)
    for battle in battles:
        if battle.rater is not None:
            by_rater[battle.rater].append(battle)
    out = []
    for rater, own in sorted(by_rater.items()):
        mine = _pair_tallies(own)
        others = {pair: everyone[pair] - mine.get(pair, Counter()) for pair in everyone}
        decisive = [b for b in own if b.outcome in ("a", "b")]
        left = sum(_chose_left(b) for b in decisive)
        up = low = 1.0
        flagged = False
        if len(own) >= min_votes:
            crowd = [others.get(_pair(b), Counter()) for b in own]
            seq = [(_score_of_first(b), c[1.0], c[0.0]) for b, c in zip(own, crowd, strict=True)]
            up, low, flagged = outlier_martingales(seq, alpha, max_votes)
        out.append(
            RaterStats(
                rater=rater,
                votes=len(own),
                left_rate=left / len(decisive) if decisive else math.nan,
                left_ci=wilson_interval(left, len(decisive)),
                tie_rate=(len(own) - len(decisive)) / len(own),
                crowd_agreement=_crowd_agreement(own, others),
                martingale_up=up,
                martingale_low=low,
                flagged=flagged,
            )
        )
    return out


def flagged_raters(battles: Sequence[BattleRecord], alpha: float = 0.05) -> set[int]:
    """Ids of the raters the sequential outlier test flags."""
    return {s.rater for s in rater_stats(battles, alpha=alpha) if s.flagged}


def screen_votes(
    battles: Sequence[BattleRecord],
    models: Iterable[int],
    *,
    daily_cap: int | None = None,
    drop_flagged: bool = False,
) -> tuple[list[BattleRecord], dict[str, int]]:
    """Vote hygiene before rating, in the given (chronological) order → (kept votes, reason → count).

    Removed: votes naming a model outside `models` ("unknown_model"), a model against itself
    ("self_battle"), a rater's votes past the first `daily_cap` of a day ("daily_cap"; votes without
    rater or day are never capped), and with `drop_flagged` every vote of a flagged rater
    ("flagged_rater", tested on the votes that survived the cap). Only non-zero counts are reported.
    """
    known = set(models)
    dropped: Counter = Counter()
    kept: list[BattleRecord] = []
    per_day: Counter = Counter()
    for battle in battles:
        if battle.model_a not in known or battle.model_b not in known:
            dropped["unknown_model"] += 1
        elif battle.model_a == battle.model_b:
            dropped["self_battle"] += 1
        elif daily_cap is not None and battle.rater is not None and battle.day is not None:
            per_day[battle.rater, battle.day] += 1
            if per_day[battle.rater, battle.day] > daily_cap:
                dropped["daily_cap"] += 1
            else:
                kept.append(battle)
        else:
            kept.append(battle)
    if drop_flagged:
        bad = flagged_raters(kept)
        dropped["flagged_rater"] = sum(b.rater in bad for b in kept)
        kept = [b for b in kept if b.rater not in bad]
    return kept, {reason: n for reason, n in dropped.items() if n}


def sequential_pair_test(
    battles: Sequence[BattleRecord], a: int, b: int, alpha: float = 0.05
) -> tuple[bool, int | None, float]:
    """Always-valid test of "a and b are equally good" on their decisive votes, in order.

    Returns (decided, winner, evidence): decided once the KT betting wealth reaches 1/α (module
    docstring); winner = the model ahead at that moment (None if undecided); evidence = the wealth
    at the decision, or after the last vote if undecided.
    """
    wealth, wins, n = 1.0, 0, 0
    for battle in battles:
        if {battle.model_a, battle.model_b} != {a, b} or battle.outcome not in ("a", "b"):
            continue
        a_won = (battle.outcome == "a") == (battle.model_a == a)
        q_win = (wins + 0.5) / (n + 1.0)
        wealth *= 2.0 * (q_win if a_won else 1.0 - q_win)
        wins += a_won
        n += 1
        if wealth >= 1.0 / alpha:
            return True, (a if 2 * wins > n else b), wealth
    return False, None, wealth
