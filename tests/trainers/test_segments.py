"""Entropy segmentation, aggregation and densification (algorithms.md §4.2–4.5, invariants §4.9.1–5).

The vectorised functions are checked against hand-worked examples and against ``_oracle_*``: plain
Python loops that follow the paper's scan and end-of-response fix-ups literally.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainers.losses import bradley_terry_loss, preference_accuracy
from trainers.segments import (
    BANDIT,
    DENSIFY_MODES,
    aggregate_mean,
    calibrate_threshold,
    densify,
    mean_segment_length,
    next_token_entropy,
    num_segments,
    response_bounds,
    segment_ends,
    segment_ids,
    segment_lengths,
    segment_positions,
    segment_rewards,
)

LN2 = math.log(2.0)

# ------------------------------------------------------------------------------------------ oracles


def _oracle_ends(h: list[float], s: int, e: int, tau: float, eos: bool = True) -> list[int]:
    """The paper's rule as a loop over one response at positions s..e (e = EOS when ``eos``)."""
    if tau >= BANDIT:
        return [e]
    if e == s and eos:  # only EOS: no content token; documented fallback to one segment at EOS
        return [e]
    ends = [j for j in range(s, e + 1) if h[j] > tau]
    if not eos:  # truncated: the last token is content, so the last segment ends there
        if not ends or ends[-1] != e:
            ends.append(e)
        return ends
    if not ends:
        return [e - 1]
    if ends[-1] == e:
        if e - 1 in ends:
            ends.pop()
        else:
            ends[-1] = e - 1
    elif ends[-1] < e - 1:
        ends.append(e - 1)
    return ends


def _oracle_segments(ends: list[int], s: int) -> list[list[int]]:
    """Positions of each segment: (previous end, end]."""
    out, first = [], s
    for end in ends:
        out.append(list(range(first, end + 1)))
        first = end + 1
    return out


def _oracle_dense(seg_values: list[float], segs: list[list[int]], T: int, mode: str) -> list[float]:
    dense = [0.0] * T
    for value, seg in zip(seg_values, segs, strict=True):
        for t in seg:
            if mode == "even":
                dense[t] = value / len(seg)
            elif mode == "same" or (mode == "last" and t == seg[-1]):
                dense[t] = value
    if mode == "mean" and segs:
        dense[segs[-1][-1]] = sum(seg_values) / len(seg_values)
    return dense


def _batch(rows: list[tuple[int, int, int]], T: int) -> torch.Tensor:
    """Response mask from (start, length, _) per row."""
    m = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, (start, length, _) in enumerate(rows):
        m[b, start : start + length] = True
    return m


# ------------------------------------------------------------------------------------------ hand-worked


# Row 0 is right-padded: prompt at 0-1, response at 2..7 (EOS at 7), padding at 8.
# Row 1 is left-padded: padding 0, prompt 1-2, response at 3..8 (EOS at 8).
H = torch.tensor(
    [
        [0.0, 9.0, 3.0, 0.1, 2.5, 0.2, 3.0, 0.0, 9.0],
        [9.0, 0.0, 9.0, 3.0, 0.5, 2.5, 0.5, 0.1, 3.0],
    ]
)
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
VALUES = torch.arange(18.0).reshape(2, 9)


def test_hand_worked_dense_segmentation() -> None:
    # τ = 2. Row 0 scans j = 2..5 (c = e - 1 = 6): H = 3.0, 0.1, 2.5, 0.2 → peaks at 2 and 4; the
    # final end is 6. H_6 = 3.0 > τ is a peak *at* 6 that merges with the forced end; prompt and
    # padding entropies (9.0) are never read. Row 1 scans j = 3..6: peaks 3, 5; final end 7.
    ends = segment_ends(H, MASK, 2.0)
    assert ends.nonzero().tolist() == [[0, 2], [0, 4], [0, 6], [1, 3], [1, 5], [1, 7]]
    ids = segment_ids(ends, MASK)
    assert ids.tolist() == [[-1, -1, 0, 1, 1, 2, 2, -1, -1], [-1, -1, -1, 0, 1, 1, 2, 2, -1]]
    assert segment_lengths(ids).tolist() == [[1, 2, 2], [1, 2, 2]]
    assert num_segments(ends).tolist() == [3, 3]
    # p_k = k/K at ends
    p = segment_positions(ends)
    assert p[ends].tolist() == pytest.approx([1 / 3, 2 / 3, 1.0] * 2)
    assert p[~ends].abs().sum() == 0
    # S = mean of v at ends: row 0 (2 + 4 + 6)/3 = 4, row 1 (12 + 14 + 16)/3 = 14
    assert aggregate_mean(VALUES, ends).tolist() == [4.0, 14.0]
    r, valid = segment_rewards(VALUES, ends)
    assert r.tolist() == [[2.0, 4.0, 6.0], [12.0, 14.0, 16.0]] and valid.all()
    # even split: row 0 segments [2], [3,4], [5,6] get 2/1, 4/2, 6/2
    dense = densify(VALUES, ends, ids, "even")
    assert dense.tolist() == [
        [0.0, 0.0, 2.0, 2.0, 2.0, 3.0, 3.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 12.0, 7.0, 7.0, 8.0, 8.0, 0.0],
    ]
    assert densify(VALUES, ends, ids, "same")[0].tolist() == [0, 0, 2, 4, 4, 6, 6, 0, 0]
    assert densify(VALUES, ends, ids, "last")[0].tolist() == [0, 0, 2, 0, 4, 0, 6, 0, 0]
    assert densify(VALUES, ends, ids, "mean")[0].tolist() == [0, 0, 0, 0, 0, 0, 4, 0, 0]


def test_hand_worked_limits() -> None:
    # τ = 0: every content token ends a segment (the peak at EOS is dropped, e - 1 already ends one)
    ends = segment_ends(H, MASK, 0.0)
    assert ends.nonzero()[:, 1].tolist() == [2, 3, 4, 5, 6, 3, 4, 5, 6, 7]
    assert num_segments(ends).tolist() == [5, 5]  # 6 response tokens minus the EOS
    # bandit: one segment ending at the EOS covering the whole response
    ends = segment_ends(H, MASK, BANDIT)
    assert ends.nonzero().tolist() == [[0, 7], [1, 8]]
    assert segment_ids(ends, MASK).tolist() == [
        [-1, -1, 0, 0, 0, 0, 0, 0, -1],
        [-1, -1, -1, 0, 0, 0, 0, 0, 0],
    ]
    assert aggregate_mean(VALUES, ends).tolist() == [7.0, 17.0]  # v(EOS)
    # even split of v(EOS) over the 6 tokens
    dense = densify(VALUES, ends, segment_ids(ends, MASK), "even")
    assert dense[0, 2:8].tolist() == pytest.approx([7 / 6] * 6)


def test_boundary_is_decided_by_the_entropy_at_the_position_itself() -> None:
    # H_j predicts token j+1: a spike at j ends the segment *at* j, and j+1 starts the next one.
    mask = torch.tensor([[1, 1, 1, 1, 1, 1]], dtype=torch.bool)  # EOS at 5, content 0..4
    h = torch.tensor([[0.0, 0.0, 5.0, 0.0, 0.0, 0.0]])
    assert segment_ids(segment_ends(h, mask, 1.0), mask).tolist() == [[0, 0, 0, 1, 1, -1]]
    # a spike at the last content token e-1 changes nothing (e-1 always ends the last segment)
    h = torch.tensor([[0.0, 0.0, 0.0, 0.0, 5.0, 0.0]])
    assert segment_ends(h, mask, 1.0).nonzero()[:, 1].tolist() == [4]
    # strict inequality: H_j == τ is not a boundary
    h = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    assert segment_ends(h, mask, 1.0).nonzero()[:, 1].tolist() == [4]


def test_end_of_response_fixups() -> None:
    mask = torch.ones(1, 5, dtype=torch.bool)  # s = 0, e = 4
    cases = {
        # peaks → ends
        (): [3],  # no boundary → one segment ending at e - 1
        (4,): [3],  # boundary at e, e - 1 not a boundary → moved to e - 1
        (3, 4): [3],  # boundary at e and at e - 1 → e dropped
        (1,): [1, 3],  # last boundary < e - 1 → e - 1 appended
        (1, 4): [1, 3],
        (3,): [3],
    }
    for peaks, expected in cases.items():
        h = torch.zeros(1, 5)
        for j in peaks:
            h[0, j] = 5.0
        assert segment_ends(h, mask, 1.0).nonzero()[:, 1].tolist() == expected, peaks
        assert _oracle_ends(h[0].tolist(), 0, 4, 1.0) == expected


def test_short_responses_and_empty_rows() -> None:
    # row 0: only EOS (length 1) → one segment at the EOS in every mode (documented fallback)
    # row 1: length 2 (one content token + EOS) → one segment ending at the content token
    # row 2: no response at all → no segment, score 0, dense 0
    mask = torch.tensor([[0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    h = torch.full((3, 4), 5.0)
    values = torch.tensor([[9.0, 1.0, 9.0, 9.0], [9.0, 2.0, 3.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
    for tau in (-1.0, 0.0, 2.0, BANDIT):
        ends = segment_ends(h, mask, tau)
        expected = [[0, 1]] + ([[1, 2]] if tau >= BANDIT else [[1, 1]])
        assert ends.nonzero().tolist() == expected
        ids = segment_ids(ends, mask)
        S = aggregate_mean(values, ends)
        assert S[0] == 1.0 and S[2] == 0.0
        assert S[1] == (3.0 if tau >= BANDIT else 2.0)
        for mode in DENSIFY_MODES:
            dense = densify(values, ends, ids, mode)
            assert dense[2].abs().sum() == 0 and dense[:, [0, 3]].abs().sum() == 0
            if tau < BANDIT:
                assert dense[1].tolist() == [0.0, 2.0, 0.0, 0.0]  # EOS gets 0
    assert segment_positions(segment_ends(h, mask, 0.0)).tolist()[2] == [0.0] * 4


def test_all_rows_empty() -> None:
    mask = torch.zeros(2, 3, dtype=torch.bool)
    ends = segment_ends(torch.ones(2, 3), mask, 0.0)
    ids = segment_ids(ends, mask)
    assert not ends.any() and (ids == -1).all()
    r, valid = segment_rewards(torch.ones(2, 3), ends)
    assert r.shape == (2, 0) and valid.shape == (2, 0)
    for mode in DENSIFY_MODES:
        assert densify(torch.ones(2, 3), ends, ids, mode).abs().sum() == 0
    assert aggregate_mean(torch.ones(2, 3), ends).tolist() == [0.0, 0.0]


def test_truncated_response_without_eos_ends_at_its_last_token() -> None:
    mask = torch.ones(2, 4, dtype=torch.bool)
    h = torch.tensor([[0.0, 5.0, 0.0, 5.0], [0.0, 0.0, 0.0, 0.0]])
    ends = segment_ends(h, mask, 1.0, ends_with_eos=torch.tensor([False, True]))
    assert ends.nonzero().tolist() == [[0, 1], [0, 3], [1, 2]]


def test_non_contiguous_mask_raises() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        response_bounds(torch.tensor([[1, 0, 1]], dtype=torch.bool))
    with pytest.raises(ValueError):
        segment_ends(torch.zeros(1, 3), torch.ones(1, 4, dtype=torch.bool), 1.0)


# ------------------------------------------------------------------------------------------ property tests

_TAUS = st.one_of(
    st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0, BANDIT, math.inf]),
    st.floats(min_value=-0.5, max_value=3.0, allow_nan=False),
)


@st.composite
def _layouts(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, bool]], torch.Tensor]:
    """Random batches: any padding side, lengths 0..T, entropies on a 0.5 grid (ties with τ)."""
    T = draw(st.integers(1, 12))
    B = draw(st.integers(1, 4))
    rows = []
    for _ in range(B):
        length = draw(st.integers(0, T))
        start = draw(st.integers(0, T - length))
        rows.append((start, length, draw(st.booleans())))
    h = torch.tensor(draw(st.lists(st.integers(0, 6), min_size=B * T, max_size=B * T)), dtype=torch.float32)
    mask = _batch(rows, T)
    eos = torch.tensor([r[2] for r in rows])
    return h.reshape(B, T) / 2, mask, rows, eos


@settings(max_examples=150, deadline=None)
@given(_layouts(), _TAUS)
def test_segmentation_matches_the_loop_oracle(layout, tau: float) -> None:
    h, mask, rows, eos = layout
    B, T = h.shape
    ends = segment_ends(h, mask, tau, ends_with_eos=eos)
    ids = segment_ids(ends, mask)
    values = torch.randn(B, T, dtype=torch.float64)
    S = aggregate_mean(values, ends)
    p = segment_positions(ends)
    dense = {mode: densify(values, ends, ids, mode) for mode in DENSIFY_MODES}
    for b, (s, length, has_eos) in enumerate(rows):
        if length == 0:
            assert not ends[b].any() and (ids[b] == -1).all() and S[b] == 0
            continue
        e = s + length - 1
        want = _oracle_ends(h[b].tolist(), s, e, tau, has_eos)
        assert ends[b].nonzero()[:, 0].tolist() == want
        segs = _oracle_segments(want, s)
        want_ids = [-1] * T
        for k, seg in enumerate(segs):
            for t in seg:
                want_ids[t] = k
        assert ids[b].tolist() == want_ids
        K = len(want)
        assert p[b][ends[b]].tolist() == pytest.approx([(k + 1) / K for k in range(K)])
        seg_values = [values[b, end].item() for end in want]
        assert S[b].item() == pytest.approx(sum(seg_values) / K)
        for mode in DENSIFY_MODES:
            assert dense[mode][b].tolist() == pytest.approx(
                _oracle_dense(seg_values, segs, T, mode), abs=1e-12
            )


@settings(max_examples=150, deadline=None)
@given(_layouts(), _TAUS)
def test_partition_invariants(layout, tau: float) -> None:
    """§4.9.1: contiguous, non-overlapping, cover s..last end, length ≥ 1; last end e-1 (dense) or e (bandit)."""
    h, mask, rows, _ = layout
    ends = segment_ends(h, mask, tau)
    ids = segment_ids(ends, mask)
    assert not (ends & ~mask).any()  # ends only on response tokens
    for b, (s, length, _) in enumerate(rows):
        if length == 0:
            continue
        e = s + length - 1
        row_ends = ends[b].nonzero()[:, 0].tolist()
        last = row_ends[-1]
        if tau >= BANDIT or length == 1:
            assert row_ends == [e]
        else:
            assert last == e - 1  # EOS is never a segment end
        covered = [t for t in range(h.shape[1]) if ids[b, t] >= 0]
        assert covered == list(range(s, last + 1))
        seq = [ids[b, t].item() for t in covered]
        assert seq[0] == 0 and all(y - x in (0, 1) for x, y in itertools.pairwise(seq))
        lengths = segment_lengths(ids[b : b + 1])[0].tolist()
        assert len(lengths) == len(row_ends) and min(lengths) >= 1 and sum(lengths) == last - s + 1


@settings(max_examples=100, deadline=None)
@given(_layouts(), _TAUS, st.sampled_from(DENSIFY_MODES))
def test_densification_sums(layout, tau: float, mode: str) -> None:
    """§4.9.5: per-segment sums r̃_k (L_k·r̃_k for ``same``), total Σ_k r̃_k, zero outside segments."""
    h, mask, rows, _ = layout
    ends = segment_ends(h, mask, tau)
    ids = segment_ids(ends, mask)
    r = torch.randn(h.shape, dtype=torch.float64) * 3
    dense = densify(r, ends, ids, mode)
    assert dense[ids < 0].abs().sum() == 0  # prompt, padding, post-EOS and (dense modes) EOS
    for b, (s, length, _) in enumerate(rows):
        if length == 0:
            continue
        e = s + length - 1
        if tau < BANDIT and length > 1:
            assert dense[b, e] == 0  # EOS
        assert dense[b, e + 1 :].abs().sum() == 0  # post-EOS
        r_k = r[b][ends[b]]
        K = len(r_k)
        sums = torch.stack([dense[b][ids[b] == k].sum() for k in range(K)])
        L = torch.tensor([(ids[b] == k).sum().item() for k in range(K)], dtype=torch.float64)
        if mode == "same":
            assert torch.allclose(sums, L * r_k, atol=1e-6)
        elif mode == "mean":
            assert dense[b].sum().item() == pytest.approx(r_k.mean().item(), abs=1e-6)
        else:
            assert torch.allclose(sums, r_k, atol=1e-6)
            assert dense[b].sum().item() == pytest.approx(r_k.sum().item(), abs=1e-6)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 8), min_size=1, max_size=10), st.integers(0, 3), st.integers(0, 3), _TAUS)
def test_determinism_across_layouts_and_batches(h_ints: list[int], left: int, right: int, tau: float) -> None:
    """§4.9.3: the same response gives the same segments whatever its padding, batch or call."""
    n = len(h_ints)
    h_resp = torch.tensor(h_ints, dtype=torch.float32) / 4
    # alone, left-padded by `left`, right-padded by `right`, next to an unrelated row
    T = n + left + right
    h = torch.rand(2, T) * 4
    h[0, left : left + n] = h_resp
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[0, left : left + n] = True
    mask[1, : max(1, T // 2)] = True
    ids_batch = segment_ids(segment_ends(h, mask, tau), mask)[0, left : left + n]
    alone = segment_ids(segment_ends(h_resp[None], torch.ones(1, n, dtype=torch.bool), tau), torch.ones(1, n))
    assert ids_batch.tolist() == alone[0].tolist()
    again = segment_ids(segment_ends(h.clone(), mask.clone(), tau), mask)[0, left : left + n]
    assert again.tolist() == ids_batch.tolist()


# ------------------------------------------------------------------------------------------ limits (§4.9.2)


def test_bandit_limit_rm_loss_equals_standard_bt_loss() -> None:
    g = torch.Generator().manual_seed(0)
    B, T = 6, 10
    h_w, h_l = torch.rand(B, T, generator=g) * 5, torch.rand(B, T, generator=g) * 5
    v_w = torch.randn(B, T, generator=g, requires_grad=True)
    v_l = torch.randn(B, T, generator=g, requires_grad=True)
    # mixed layouts: chosen right-padded, rejected left-padded, various lengths
    m_w = torch.zeros(B, T, dtype=torch.bool)
    m_l = torch.zeros(B, T, dtype=torch.bool)
    eos_w, eos_l = [], []
    for b in range(B):
        m_w[b, 2 : 3 + b] = True
        eos_w.append(2 + b)
        m_l[b, T - 1 - b :] = True
        eos_l.append(T - 1)
    for tau in (BANDIT, math.inf):
        e_w, e_l = segment_ends(h_w, m_w, tau), segment_ends(h_l, m_l, tau)
        assert num_segments(e_w).tolist() == [1] * B and num_segments(e_l).tolist() == [1] * B
        S_w, S_l = aggregate_mean(v_w, e_w), aggregate_mean(v_l, e_l)
        rows = torch.arange(B)
        classic_w, classic_l = v_w[rows, eos_w], v_l[rows, eos_l]  # v(EOS): the classic RM
        assert torch.equal(S_w, classic_w) and torch.equal(S_l, classic_l)
        loss, stats = bradley_terry_loss(S_w, S_l)
        expected = (
            sum(
                math.log1p(math.exp(-(w - lo)))
                for w, lo in zip(classic_w.tolist(), classic_l.tolist(), strict=True)
            )
            / B
        )
        assert loss.item() == pytest.approx(expected, rel=1e-6)
        assert stats["accuracy"] == preference_accuracy(classic_w, classic_l)


def test_token_limit_counts_response_tokens_minus_eos() -> None:
    g = torch.Generator().manual_seed(1)
    mask = _batch([(0, 7, 0), (3, 4, 0), (1, 2, 0), (5, 1, 0)], 8)
    n = mask.sum(-1)
    positive = torch.rand(4, 8, generator=g) + 0.01
    assert num_segments(segment_ends(positive, mask, 0.0)).tolist() == [6, 3, 1, 1]  # n - 1 (≥ 1)
    assert num_segments(segment_ends(torch.zeros(4, 8), mask, -1.0)).tolist() == (n - 1).clamp(min=1).tolist()
    # zero entropies at τ = 0 give no peak: one segment per response instead
    assert num_segments(segment_ends(torch.zeros(4, 8), mask, 0.0)).tolist() == [1, 1, 1, 1]
    # token level: S is the mean content-token value
    values = torch.randn(4, 8, generator=g)
    S = aggregate_mean(values, segment_ends(positive, mask, 0.0))
    assert S[0].item() == pytest.approx(values[0, :6].mean().item(), abs=1e-6)


# ------------------------------------------------------------------------------------------ aggregation (§4.9.4)


def test_aggregation_and_bt_on_segment_scores() -> None:
    ends = segment_ends(H, MASK, 2.0)
    values = VALUES.clone().requires_grad_(True)
    S = aggregate_mean(values, ends)
    # equal scores → ln 2, sign symmetry, accuracy 1[S_w > S_l]
    loss, _ = bradley_terry_loss(S[:1], S[:1])
    assert loss.item() == pytest.approx(LN2)
    forward, stats = bradley_terry_loss(S[1:], S[:1])  # 14 vs 4
    backward, stats_back = bradley_terry_loss(S[:1], S[1:])
    assert (forward - backward).item() == pytest.approx(-10.0, abs=1e-5)
    assert stats["accuracy"] == 1.0 and stats_back["accuracy"] == 0.0
    # the gradient reaches only segment ends, 1/K each
    S.sum().backward()
    assert torch.equal(values.grad, ends.float() / 3)


# ------------------------------------------------------------------------------------------ entropy


def test_next_token_entropy_known_values() -> None:
    V = 8
    logits = torch.zeros(2, 3, V)  # uniform → ln V
    logits[0, 1] = torch.tensor([0.0] + [-math.inf] * (V - 1))  # one-hot via -inf → 0, not NaN
    logits[1, 2, :2] = 50.0  # two equal winners → ln 2
    logits[1, 2, 2:] = -50.0
    h = next_token_entropy(logits)
    assert h.dtype == torch.float32
    assert h[0, 0].item() == pytest.approx(math.log(V), abs=1e-6)
    assert h[0, 1].item() == 0.0
    assert h[1, 2].item() == pytest.approx(LN2, abs=1e-6)
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    masked = next_token_entropy(logits, mask)
    assert masked[~mask].abs().sum() == 0 and torch.equal(masked[mask], h[mask])


def test_next_token_entropy_matches_categorical_in_float32() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, 40, generator=g) * 4
    want = torch.distributions.Categorical(logits=logits.double()).entropy()
    h = next_token_entropy(logits.to(torch.bfloat16), rows_per_chunk=2)
    assert h.dtype == torch.float32
    want_bf16 = torch.distributions.Categorical(logits=logits.to(torch.bfloat16).double()).entropy()
    assert torch.allclose(h.double(), want_bf16, atol=1e-5)
    assert torch.allclose(next_token_entropy(logits).double(), want, atol=1e-5)


# ------------------------------------------------------------------------------------------ calibration


def test_calibrate_threshold_hand_worked() -> None:
    # one response, content 0..4, EOS at 5: scan entropies H_0..H_3 = 1, 2, 3, 4 (H_4, H_5 ignored)
    h = torch.tensor([[1.0, 2.0, 3.0, 4.0, 9.0, 9.0]])
    mask = torch.ones(1, 6, dtype=torch.bool)
    # 5 covered tokens; K(τ) = 1 + #{H > τ}: mean lengths 5/5, 5/4, 5/3, 5/2, 5/1
    assert calibrate_threshold(h, mask, 5.0) > 4.0  # no peak: one segment
    tau = calibrate_threshold(h, mask, 2.5)  # 2 segments: exactly one H above τ
    assert 3.0 <= tau < 4.0
    ends = segment_ends(h, mask, tau)
    assert mean_segment_length(ends, segment_ids(ends, mask)) == 2.5
    assert calibrate_threshold(h, mask, 1.0) == 0.0  # token level, the paper's τ = 0
    assert calibrate_threshold(h, mask, 0.2) == 0.0  # below 1 is unreachable: closest is token level


@settings(max_examples=60, deadline=None)
@given(_layouts(), st.floats(min_value=1.0, max_value=8.0))
def test_calibrate_threshold_is_the_best_achievable(layout, target: float) -> None:
    h, mask, _, eos = layout
    if not mask.any():
        with pytest.raises(ValueError):
            calibrate_threshold(h, mask, target)
        return
    tau = calibrate_threshold(h, mask, target, ends_with_eos=eos)
    assert tau < BANDIT

    def achieved(t: float) -> float:
        ends = segment_ends(h, mask, t, ends_with_eos=eos)
        return mean_segment_length(ends, segment_ids(ends, mask))

    got = abs(achieved(tau) - target)
    # brute force over every distinct threshold the data allows
    candidates = [-1.0, 100.0] + [v / 2 + d for v in range(7) for d in (-0.1, 0.0, 0.1)]
    assert got <= min(abs(achieved(t) - target) for t in candidates) + 1e-9
