"""Agreement maths (hand-checked and against a plain-loop oracle) and the admin quality report."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from datasets_factory import add_user, seed_project, set_gold, spans, vote

from storage.export_data import IMPORT_USERNAME
from studio import quality as q
from studio.services.errors import Forbidden, NotFound, Unauthorized
from studio.services.quality import QualityService
from studio.services.users import UserService
from studio.settings import Settings

N = None
# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 observers x 12 units,
# values 1..5, "." = missing. Published: nominal .743, ordinal .815, interval .849.
KRIPP_2011 = {
    "A": [1, 2, 3, 3, 2, 1, 4, 1, 2, N, N, N],
    "B": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, N, 3],
    "C": [N, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, N],
    "D": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, N],
}


def _units(table: dict[str, list]) -> dict:
    n = len(next(iter(table.values())))
    return {u: {r: table[r][u] for r in table} for u in range(n)}


# --------------------------------------------------------------------------- oracle


def _alpha_loop(units: dict, metric: str) -> float:
    """α = 1 − D_o / D_e by the textbook definition, with plain loops over value pairs.

    D_o = 1/n Σ_u 1/(m_u − 1) Σ_{i≠j in u} δ²(v_i, v_j)
    D_e = 1/(n(n − 1)) Σ_{i≠j over all pairable values} δ²(v_i, v_j)
    ordinal δ(c, k) = Σ_{g between c and k} n_g − (n_c + n_k)/2 with n_g the pooled value counts.
    """
    rows = [[v for v in u.values() if v is not None] for u in units.values()]
    rows = [r for r in rows if len(r) >= 2]
    pooled = [v for r in rows for v in r]
    n = len(pooled)
    values = sorted(set(pooled))
    n_g = {v: pooled.count(v) for v in values}

    def d2(c, k):
        if metric == "nominal":
            return 0.0 if c == k else 1.0
        if metric == "interval":
            return float(c - k) ** 2
        lo, hi = min(c, k), max(c, k)
        between = sum(n_g[g] for g in values if lo <= g <= hi)
        return (between - (n_g[c] + n_g[k]) / 2) ** 2

    d_o = 0.0
    for r in rows:
        s = 0.0
        for i in range(len(r)):
            for j in range(len(r)):
                if i != j:
                    s += d2(r[i], r[j])
        d_o += s / (len(r) - 1)
    d_o /= n
    d_e = 0.0
    for i in range(n):
        for j in range(n):
            if i != j:
                d_e += d2(pooled[i], pooled[j])
    d_e /= n * (n - 1)
    return 1.0 - d_o / d_e


@pytest.mark.parametrize(
    ("metric", "published"), [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849)]
)
def test_krippendorff_published_example(metric, published):
    alpha = q.krippendorff_alpha(_units(KRIPP_2011), metric)
    assert alpha == pytest.approx(published, abs=5e-4)
    assert alpha == pytest.approx(_alpha_loop(_units(KRIPP_2011), metric), abs=1e-12)


def test_nominal_alpha_by_hand_from_the_coincidence_matrix():
    # The paper's coincidence matrix: o_11 = 7, o_12 = 4/3, o_13 = o_14 = 1/3, ...; marginals
    # n_c = 9, 13, 10, 5, 3 (n = 40); off-diagonal total Σ_{c≠k} o_ck = 8.
    # Nominal α = 1 − (n − 1)·Σ_{c≠k} o_ck / (n² − Σ n_c²) = 1 − 39·8 / (1600 − 384) = 904/1216.
    counts, values = q._value_matrix(_units(KRIPP_2011), "nominal", None)
    o = q._coincidences(counts)
    assert list(values) == [1, 2, 3, 4, 5]
    assert o[0, 0] == pytest.approx(7) and o[0, 1] == pytest.approx(4 / 3) and o[0, 2] == pytest.approx(1 / 3)
    assert list(o.sum(axis=1)) == pytest.approx([9, 13, 10, 5, 3])
    assert q.krippendorff_alpha(_units(KRIPP_2011), "nominal") == pytest.approx(904 / 1216, abs=1e-12)


@pytest.mark.parametrize("metric", ["nominal", "ordinal", "interval"])
@pytest.mark.parametrize("seed", range(6))
def test_alpha_matches_plain_loop_oracle(metric, seed):
    rng = random.Random(seed)
    raters = [f"r{i}" for i in range(rng.randint(2, 5))]
    units = {
        u: {r: (rng.choice([1, 2, 3, 4]) if rng.random() > 0.3 else None) for r in raters}
        for u in range(rng.randint(5, 25))
    }
    expected = _alpha_loop(units, metric)
    assert q.krippendorff_alpha(units, metric) == pytest.approx(expected, abs=1e-10)


def test_alpha_perfect_agreement_is_one_and_constant_data_is_undefined():
    units = {i: {"x": v, "y": v, "z": v} for i, v in enumerate([1, 2, 3, 1, 2])}
    for metric in ("nominal", "ordinal", "interval"):
        assert q.krippendorff_alpha(units, metric) == pytest.approx(1.0)
    assert math.isnan(q.krippendorff_alpha({0: {"x": 1, "y": 1}, 1: {"x": 1, "y": 1}}))
    assert math.isnan(q.krippendorff_alpha({0: {"x": 1}, 1: {"y": 2}}))  # nothing pairable


def test_alpha_two_raters_total_disagreement_nominal():
    # Two units, two raters, swapped labels: o(1,2) = o(2,1) = 2, n = 4, n_1 = n_2 = 2.
    # α = 1 − (n−1)·Σo δ / Σ n_c n_k δ = 1 − 3·4/(2·2·2) = 1 − 12/8 = −0.5
    units = {0: {"x": 1, "y": 2}, 1: {"x": 2, "y": 1}}
    assert q.krippendorff_alpha(units) == pytest.approx(-0.5)


def test_pairwise_units_ordinal_drops_both_bad_and_orders_tie_in_the_middle():
    votes = [(1, "u", "a"), (1, "v", "tie"), (2, "u", "both_bad"), (2, "v", "b")]
    assert q.pairwise_units(votes, "nominal") == {1: {"u": "a", "v": "tie"}, 2: {"u": "both_bad", "v": "b"}}
    assert q.pairwise_units(votes, "ordinal") == {1: {"u": 0, "v": 1}, 2: {"v": 2}}
    # a vs tie is a half disagreement on the ordinal scale, a vs b a full one.
    near = {i: {"u": 0, "v": 1} for i in range(3)} | {9: {"u": 2, "v": 2}}
    far = {i: {"u": 0, "v": 2} for i in range(3)} | {9: {"u": 1, "v": 1}}
    assert q.krippendorff_alpha(near, "ordinal") > q.krippendorff_alpha(far, "ordinal")


def test_bootstrap_ci_brackets_the_estimate():
    units = _units(KRIPP_2011)
    lo, hi = q.alpha_bootstrap_ci(units, "nominal", n_boot=300)
    assert lo <= q.krippendorff_alpha(units) <= hi


# --------------------------------------------------------------------------- kappa, spans, calibration


def test_cohen_kappa_hand_computed():
    # 50 items: yes/yes 20, yes/no 5, no/yes 10, no/no 15.
    # p_o = 35/50 = 0.7; rater 1 says yes 25/50, rater 2 30/50 -> p_e = .5·.6 + .5·.4 = 0.5; κ = .2/.5 = 0.4
    a = ["y"] * 25 + ["n"] * 25
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert q.cohen_kappa(a, b) == pytest.approx(0.4)
    assert q.cohen_kappa([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    assert math.isnan(q.cohen_kappa([1, None, 2], [1, 2, None]))  # one pair left: p_e = 1
    with pytest.raises(ValueError):
        q.cohen_kappa([1], [1, 2])


def test_span_iou_f1_examples():
    # [0,10) vs [5,15): overlap 5, union 15 -> IoU 1/3; F1 = 2·5/(10+10) = 0.5
    assert q.span_iou_f1([(0, 10, "bad")], [(5, 15, "bad")]) == pytest.approx((1 / 3, 0.5))
    assert q.span_iou_f1([(0, 10, "bad")], [(0, 10, "good")]) == (0.0, 0.0)  # polarity matters
    assert q.span_iou_f1([], []) == (1.0, 1.0)
    assert q.span_iou_f1([(0, 4, "good")], []) == (0.0, 0.0)
    # Overlapping spans of one rater count once: A = {0..5} bad, B = {0..3} bad -> IoU 4/6, F1 8/10
    dicts = [{"start": 0, "end": 4, "polarity": "bad"}, {"start": 2, "end": 6, "polarity": "bad"}]
    assert q.span_iou_f1(dicts, [(0, 4, "bad")]) == pytest.approx((4 / 6, 0.8))


def test_span_agreement_averages_over_rater_pairs():
    items = {
        1: {"u": [(0, 10, "bad")], "v": [(5, 15, "bad")], "w": [(0, 10, "bad")]},  # pairs: 1/3, 1, 1/3
        2: {"u": [(0, 2, "good")]},  # one rater: not counted
    }
    got = q.span_agreement(items)
    assert (got.n_pairs, got.n_items) == (3, 1)
    assert got.iou == pytest.approx((1 / 3 + 1 + 1 / 3) / 3)
    assert got.f1 == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert math.isnan(q.span_agreement({}).iou)


def test_position_bias_wilson_interval():
    # 8 of 10 decisive votes on the left. Wilson, z = 1.96: centre = (.8 + z²/20)/(1 + z²/10) = 0.7167,
    # half = z·sqrt(.8·.2/10 + z²/400)/(1 + z²/10) = 0.2266 -> (0.4902, 0.9433); bias = that − 0.5.
    pb = q.position_bias(8, 10)
    assert pb.left_rate == pytest.approx(0.8) and pb.bias == pytest.approx(0.3)
    assert pb.ci == pytest.approx((0.4902 - 0.5, 0.9433 - 0.5), abs=1e-4)
    assert math.isnan(q.position_bias(0, 0).left_rate)


def test_gold_accuracy_and_majority_leave_one_out():
    assert q.gold_accuracy([("a", "a"), ("b", "a"), ("a", "a")]) == (pytest.approx(2 / 3), 3)
    assert math.isnan(q.gold_accuracy([])[0])
    units = {
        1: {"u": "a", "v": "a", "w": "b"},  # u: others {a, b} split -> skip; v: skip; w: others a,a -> miss
        2: {"u": "a", "v": "a", "w": "a"},  # everyone matches
        3: {"u": "tie", "v": "b"},  # u vs v: miss both
        4: {"u": "a"},  # alone: not counted
    }
    got = q.agreement_with_majority(units)
    assert got["u"] == (pytest.approx(1 / 2), 2)
    assert got["v"] == (pytest.approx(1 / 2), 2)
    assert got["w"] == (pytest.approx(1 / 2), 2)
    assert q.majority(["a", "a", "b"]) == ("a", 2, 3)
    assert q.majority(["a", "b"]) is None


# --------------------------------------------------------------------------- the service


@pytest.fixture
def quality(db, tmp_path):
    settings = Settings(data_dir=tmp_path / "data", database_url="sqlite://")
    return QualityService(db, settings, UserService(db, settings), n_boot=50)


def test_report_on_a_database_with_votes(any_db, tmp_path):
    db = any_db
    settings = Settings(data_dir=tmp_path / "data", database_url="sqlite://")
    quality = QualityService(db, settings, UserService(db, settings), n_boot=50)
    admin = add_user(db, "root", "admin")
    u, v, w = (add_user(db, name) for name in ("ann", "bob", "cyd"))
    imp = add_user(db, IMPORT_USERNAME)
    seed = seed_project(db, prompts=["p0", "p1", "p2", "p3"])
    c0, c1, c2, c3 = seed.comparisons
    # c0: a, a, b   c1: tie, tie   c2: b, both_bad   c3: only ann (gold = a)
    vote(db, c0, u, "a", a_left=True, time_ms=4000)
    vote(db, c0, v, "a", a_left=False, time_ms=6000)
    vote(db, c0, w, "b", a_left=True)
    vote(db, c1, u, "tie", time_ms=2000)
    vote(db, c1, v, "tie")
    vote(db, c2, u, "b", a_left=False)
    vote(db, c2, w, "both_bad")
    vote(db, c3, u, "a", a_left=True)
    vote(db, c3, imp, "b")  # the import user never counts
    set_gold(db, c3, "a")
    g0 = seed.generations[(0, "a")]
    spans(db, g0, u, [(0, 4, "bad")])
    spans(db, g0, v, [(2, 6, "bad")])  # IoU 2/6, F1 4/8
    spans(db, g0, w, [(0, 1, "good")], submitted=False)  # drafts do not count

    report = quality.report("root", seed.project_id)
    nominal = {
        c0: {u: "a", v: "a", w: "b"},
        c1: {u: "tie", v: "tie"},
        c2: {u: "b", w: "both_bad"},
        c3: {u: "a"},
    }
    assert report.pairwise_alpha_nominal == pytest.approx(q.krippendorff_alpha(nominal))
    ordinal = {c0: {u: 0, v: 0, w: 2}, c1: {u: 1, v: 1}, c2: {u: 2}, c3: {u: 0}}
    assert report.pairwise_alpha_ordinal == pytest.approx(q.krippendorff_alpha(ordinal, "ordinal"))
    assert report.n_overlap_items == 3 and report.n_votes == 8
    assert (report.span_iou, report.span_f1) == (pytest.approx(2 / 6), pytest.approx(0.5))
    assert report.n_span_pairs == 1
    assert report.alpha_nominal_ci is not None

    by_name = {a.username: a for a in report.per_annotator}
    assert set(by_name) == {"ann", "bob", "cyd"}  # admin never voted; the import user is left out
    ann = by_name["ann"]
    # ann's decisive votes: c0 a (a left -> left), c2 b (b left -> left), c3 a (a left -> left): 3/3 left
    assert (ann.votes, ann.decisive, ann.left_rate) == (4, 3, 1.0)
    # Wilson for 3/3: (0.4385, 1.0), minus 0.5
    assert ann.left_bias_ci == pytest.approx((0.4385 - 0.5, 0.5), abs=1e-4)
    assert ann.tie_rate == pytest.approx(1 / 4)
    assert (ann.gold_accuracy, ann.gold_n) == (1.0, 1)
    # majority of others: c0 others {a, b} split -> skip; c1 others tie -> hit; c2 others both_bad -> miss
    assert (ann.agreement_with_majority, ann.majority_n) == (pytest.approx(0.5), 2)
    assert ann.median_seconds == pytest.approx(3.0) and ann.span_sets == 1
    bob = by_name["bob"]
    assert bob.left_rate == 0.0 and bob.gold_n == 0 and bob.gold_accuracy is None  # c0: a shown right
    assert by_name["cyd"].both_bad_rate == pytest.approx(0.5) and by_name["cyd"].median_seconds is None
    assert admin  # an admin with no votes is not listed


def test_report_is_admin_only_and_handles_an_empty_project(db, quality):
    add_user(db, "root", "admin")
    add_user(db, "ann")
    seed = seed_project(db)
    with pytest.raises(Forbidden):
        quality.report("ann", seed.project_id)
    with pytest.raises(Unauthorized):
        quality.report(None, seed.project_id)
    with pytest.raises(NotFound):
        quality.report("root", 999)
    empty = quality.report("root", seed.project_id)
    assert empty.pairwise_alpha_nominal is None and empty.span_iou is None and empty.per_annotator == []


def test_alpha_on_many_raters_is_fast_and_consistent():
    rng = random.Random(1)
    units = {i: {r: rng.choice("ab") for r in range(8)} for i in range(2000)}
    assert abs(q.krippendorff_alpha(units)) < 0.05  # random labels: no agreement
    small = dict(itertools.islice(units.items(), 30))
    assert q.krippendorff_alpha(small) == pytest.approx(_alpha_loop(small, "nominal"))
