"""The offline processors (trainers/offline.py): z-scores, filters, RWR weights, DT conditioning — by hand
(algorithms.md §2.6 invariants)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer

from trainers.losses import weighted_sft_loss
from trainers.offline import (
    ScoredSample,
    best_of_n,
    best_worst_pairs,
    condition_text,
    curve_slope,
    dt_prompt,
    format_score,
    parse_dt_prompt,
    rwr_weights,
    standardise,
    standardise_per_prompt,
    threshold_filter,
)
from trainers.offline_eval import UnconditionedReward
from trainers.rewards import CallableReward
from trainers.rl_eval import encode_prompts
from trainers.weighted_sft import SFTExample, collate_examples, encode_examples


def sample(p: int, s: int, reward: float, z: float | None = None) -> ScoredSample:
    return ScoredSample(p, s, f"prompt {p}", f"response {p}.{s}", reward, reward if z is None else z)


# ----------------------------------------------------------------------------- z-scores


def test_standardise_by_hand_and_invariant_to_affine_rescaling():
    # mean 2, sample std sqrt(((−1)² + 0 + 1²)/2) = 1
    assert standardise([1.0, 2.0, 3.0]) == [-1.0, 0.0, 1.0]
    raw = [0.3, -1.2, 2.5, 0.0, 0.7]
    z = standardise(raw)
    assert math.fsum(z) == pytest.approx(0.0, abs=1e-12)
    assert math.fsum(v * v for v in z) / (len(z) - 1) == pytest.approx(1.0)
    assert standardise([3 * r + 5 for r in raw]) == pytest.approx(z, abs=1e-12)  # a > 0: same z
    assert standardise([7.0, 7.0, 7.0]) == [0.0, 0.0, 0.0] and standardise([4.0]) == [0.0]
    assert standardise([1.0, 3.0], mean=0.0, std=2.0) == [0.5, 1.5]  # fixed statistics (NeMo's option)


def test_standardise_per_prompt_by_hand():
    # prompt 0: rewards 1, 2, 3 → −1, 0, 1; prompt 1: 10, 14 → mean 12, sd √8 → ∓2/√8; prompt 2: constant → 0
    rows = [sample(0, 0, 1.0), sample(1, 0, 10.0), sample(0, 1, 2.0), sample(2, 0, 5.0), sample(1, 1, 14.0),
            sample(0, 2, 3.0), sample(2, 1, 5.0), sample(3, 0, 9.0)]  # fmt: skip
    half = 2 / math.sqrt(8)
    assert standardise_per_prompt(rows) == pytest.approx([-1.0, -half, 0.0, 0.0, half, 1.0, 0.0, 0.0])
    shifted = [sample(r.prompt_index, r.sample_index, r.reward + 100 * r.prompt_index) for r in rows]
    assert standardise_per_prompt(shifted) == pytest.approx(
        standardise_per_prompt(rows)
    )  # a prompt's level drops out


# ----------------------------------------------------------------------------- filters


def test_threshold_filter_is_strict_and_minus_infinity_keeps_everything():
    samples = [sample(0, 0, -1.0), sample(0, 1, 0.0), sample(1, 0, 0.5), sample(1, 1, 2.0)]
    assert [s.z for s in threshold_filter(samples)] == [0.5, 2.0]  # z > 0, the mean itself dropped
    assert [s.z for s in threshold_filter(samples, 1.0)] == [2.0]
    assert threshold_filter(samples, -math.inf) == samples


def test_best_of_n_keeps_one_row_per_prompt_the_best_and_n1_is_unchanged():
    samples = [
        sample(3, 0, 0.1),
        sample(3, 1, 0.9),
        sample(3, 2, 0.9),
        sample(1, 0, -2.0),
        sample(1, 1, -3.0),
    ]
    kept = best_of_n(samples)
    assert [(s.prompt_index, s.sample_index) for s in kept] == [(3, 1), (1, 0)]  # tie → lower sample index
    assert len(kept) == len({s.prompt_index for s in samples})
    singles = [sample(p, 0, float(p)) for p in range(4)]
    assert best_of_n(singles) == singles


def test_best_worst_pairs_skip_prompts_without_a_preference():
    samples = [sample(0, 0, 0.2), sample(0, 1, 0.8), sample(0, 2, -0.5), sample(1, 0, 0.4), sample(1, 1, 0.4)]
    assert best_worst_pairs(samples) == [
        {"prompt": "prompt 0", "chosen": "response 0.1", "rejected": "response 0.2"}
    ]


# ----------------------------------------------------------------------------- RWR weights


def test_rwr_batch_weights_by_hand_mean_one_and_clipping_only_lowers():
    z = torch.tensor([0.0, math.log(2.0)])
    # exp(z/1) = [1, 2], mean 1.5 → [2/3, 4/3]
    w = rwr_weights(z, 1.0, max_weight=None)
    assert w.tolist() == pytest.approx([2 / 3, 4 / 3]) and float(w.mean()) == pytest.approx(1.0)
    clipped = rwr_weights(z, 1.0, max_weight=1.2)
    assert clipped.tolist() == pytest.approx([2 / 3, 1.2]) and bool((clipped <= w).all())
    big = torch.tensor([-3.0, 0.0, 4.0, 9.0])
    for beta in (0.1, 1.0, 5.0):
        unclipped, cut = rwr_weights(big, beta, max_weight=None), rwr_weights(big, beta, max_weight=2.0)
        assert bool((cut >= 0).all()) and bool((cut <= unclipped).all()) and float(cut.max()) <= 2.0
        assert float(unclipped.mean()) == pytest.approx(1.0)
    assert rwr_weights(big, 1e12).tolist() == pytest.approx([1.0] * 4)  # β → ∞: all equal
    assert torch.isfinite(rwr_weights(big, 1e-6, max_weight=None)).all()  # tiny β neither overflows nor NaNs


def test_rwr_prompt_weights_are_a_softmax_per_prompt_and_tend_to_best_of_n():
    z = torch.tensor([0.0, math.log(3.0), 5.0])
    groups = torch.tensor([7, 7, 2])
    # prompt 7: softmax([0, ln 3]) = [1/4, 3/4]; prompt 2 alone: [1]
    assert rwr_weights(z, 1.0, normalise="prompt", groups=groups).tolist() == pytest.approx([0.25, 0.75, 1.0])
    assert rwr_weights(z, 1e-6, normalise="prompt", groups=groups).tolist() == pytest.approx([0.0, 1.0, 1.0])
    assert rwr_weights(z, 1e12, normalise="prompt", groups=groups).tolist() == pytest.approx([0.5, 0.5, 1.0])
    with pytest.raises(ValueError, match="groups"):
        rwr_weights(z, 1.0, normalise="prompt")
    with pytest.raises(ValueError, match="beta"):
        rwr_weights(z, 0.0)


def _logits_and_mask(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 5, 11, generator=generator, requires_grad=True)
    labels = torch.randint(0, 11, (4, 5), generator=generator)
    mask = torch.tensor(
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool
    )
    return logits, labels, mask


def _grad(logits, labels, mask, weights, reduction) -> tuple[float, torch.Tensor]:
    logps = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    loss, _ = weighted_sft_loss(logps, mask, weights, reduction)
    (grad,) = torch.autograd.grad(loss, logits)
    return float(loss.detach()), grad


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_sum"])
def test_rwr_with_huge_beta_is_sft_and_with_tiny_beta_per_prompt_is_best_of_n(reduction):
    logits, labels, mask = _logits_and_mask()
    z = torch.tensor([1.5, -0.3, 0.2, 2.0])
    sft = _grad(logits, labels, mask, None, reduction)
    rwr = _grad(logits, labels, mask, rwr_weights(z, 1e9).float(), reduction)
    assert rwr[0] == pytest.approx(sft[0], rel=1e-6)
    torch.testing.assert_close(rwr[1], sft[1])
    # prompts {0, 1} and {2, 3}: β → 0 puts all weight on rows 0 and 3, the best of each prompt
    groups = torch.tensor([0, 0, 1, 1])
    sharp = _grad(
        logits, labels, mask, rwr_weights(z, 1e-4, normalise="prompt", groups=groups).float(), reduction
    )
    best_only = _grad(logits, labels, mask, torch.tensor([1.0, 0.0, 0.0, 1.0]), reduction)
    assert sharp[0] == pytest.approx(best_only[0], rel=1e-6)
    torch.testing.assert_close(sharp[1], best_only[1])


# ----------------------------------------------------------------------------- Decision Transformer


def test_score_format_is_fixed_precision_and_the_prompt_round_trips():
    assert format_score(1.234) == "1.23" and format_score(-1.0) == "-1.00" and format_score(-0.001) == "0.00"
    assert format_score(2.5, decimals=1) == "2.5" and format_score(3.0, decimals=0) == "3"
    assert condition_text("The film was", 1.234) == "<rm_score>: 1.23\nThe film was"
    assert condition_text("The film was", -0.5, placement="suffix") == "The film was <rm_score>: -0.50"
    for placement in ("prefix", "suffix"):
        for z in (1.23456, -2.0, 0.004, 17.5):
            assert parse_dt_prompt(dt_prompt("Line one\nline two", z, placement=placement)) == (
                "Line one\nline two",
                round(z, 2),
            )
    chat = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Review the film."}]
    conditioned = dt_prompt(chat, 0.5)
    assert conditioned[0] == chat[0] and conditioned[1]["content"] == "<rm_score>: 0.50\nReview the film."
    assert (
        parse_dt_prompt(conditioned) == (chat, 0.5) and chat[1]["content"] == "Review the film."
    )  # no mutation
    with pytest.raises(ValueError, match="no <rm_score>"):
        parse_dt_prompt("The film was")
    with pytest.raises(ValueError, match="non-finite"):
        dt_prompt("x", math.nan)


def test_dt_training_and_inference_share_the_prompt_tokens_and_the_tag_is_never_a_label(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt, response = "The pizza was warm, the service", " slow and the price fair."
    encoded = encode_examples(
        tokenizer, [SFTExample(dt_prompt(prompt, z), response, True, 0, z) for z in (-1.0, 2.345)], 64, 64
    )
    for example, z in zip(encoded, (-1.0, 2.345), strict=True):
        # the inference path (offline_eval.evaluate_dt → evaluate_policy → encode_prompts) gives the same ids
        assert example.prompt_ids == encode_prompts(tokenizer, [dt_prompt(prompt, z)], 64)[0]
        assert tokenizer.decode(example.prompt_ids) == dt_prompt(prompt, z)
        assert example.response_ids[-1] == tokenizer.eos_token_id
    low, high = encoded
    assert low.prompt_ids != high.prompt_ids and low.response_ids == high.response_ids
    prompt_ids, prompt_mask, response_ids, response_mask = collate_examples(encoded, tokenizer.pad_token_id)
    assert (
        prompt_ids[0, -len(low.prompt_ids) :].tolist() == low.prompt_ids
    )  # left-padded: prompts end together
    # the loss sees response positions only: identical labels and masks whatever the conditioning number
    assert torch.equal(response_ids[0], response_ids[1]) and torch.equal(response_mask[0], response_mask[1])
    assert response_ids[0][response_mask[0]].tolist() == low.response_ids  # exactly the response (+ EOS)
    assert prompt_mask.sum(-1).tolist() == [len(low.prompt_ids), len(high.prompt_ids)]


def test_unconditioned_reward_scores_against_the_original_prompt(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    seen = []
    reward = UnconditionedReward(CallableReward(lambda p, r: seen.append(p) or 1.0, tokenizer))
    out = reward.score(
        [dt_prompt("The sea is", 1.0), dt_prompt("The sky is", -1.0, placement="suffix")], ["a", "b"]
    )
    assert seen == ["The sea is", "The sky is"] and [r.total for r in out] == [1.0, 1.0]


def test_curve_slope_by_hand():
    assert curve_slope([-1, 0, 1, 2], [0.0, 0.1, 0.2, 0.3]) == pytest.approx(0.1)
    assert curve_slope([0, 1], [0.5, 0.2]) == pytest.approx(-0.3)
    with pytest.raises(ValueError):
        curve_slope([1, 1], [0.0, 1.0])


def test_dt_writes_the_set_z_or_the_per_prompt_z_into_the_prompt():
    from trainers.recipes import dt
    from trainers.weighted_sft import OfflineData

    rows = [sample(0, 0, 1.0, z=-0.3), sample(0, 1, 3.0, z=0.9), sample(1, 0, 8.0, z=2.1)]
    data = OfflineData(rows, None, {}, "x")
    scores = {"set": [-0.3, 0.9, 2.1], "prompt": [-0.71, 0.71, 0.0]}  # ∓1/√2 within prompt 0; alone → 0
    for mode, want in scores.items():
        examples = dt.select(dt.DTConfig(output_dir="unused", normalise=mode), data)
        assert [parse_dt_prompt(e.prompt)[1] for e in examples] == want
        assert [parse_dt_prompt(e.prompt)[0] for e in examples] == [r.prompt for r in rows]
