"""Reward sources: token alignment, placement of sequence rewards, densified segment rewards, VADER."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoTokenizer

from trainers import segments as seg
from trainers.normalise import LocationNormaliser
from trainers.rewards import (
    CallableReward,
    LexiconReward,
    PolicyTokens,
    RewardSource,
    SegmentRMReward,
    SequenceRMReward,
    TokenRewards,
    merge_projected_segments,
    project_segment_ends,
)
from trainers.segment_rm import STUDIO_FILE, SegmentRewardModel, SegmentRMInfo

PROMPTS = ["Write one sentence about the weather.", "Explain why the sky is blue in simple words."]
RESPONSES = ["The sea is vast and calm under the moon.", "The pizza was warm, the service slow."]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    """A different byte-level BPE (smaller vocabulary, so coarser merges differ from the tiny model's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["the sea is calm; pizza service weather moon"] * 8, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def test_sources_satisfy_the_protocol(tokenizer):
    assert isinstance(LexiconReward(tokenizer), RewardSource)
    assert isinstance(CallableReward(lambda p, r: 0.0, tokenizer), RewardSource)


# ----------------------------------------------------------------------------- sequence placement


def test_lexicon_reward_matches_vader_by_hand(tokenizer):
    # VADER: "good" has valence 1.9; nothing else in the sentence is in the lexicon, no booster,
    # no negation, a full stop adds no emphasis. compound = x / sqrt(x² + 15) = 1.9 / sqrt(18.61)
    # = 0.44043... → 0.4404 after VADER's rounding to 4 places.
    source = LexiconReward(tokenizer)
    [out] = source.score(["Review the food."], ["The food was good."])
    assert out.total == pytest.approx(0.4404, abs=1e-4)
    assert out.total == pytest.approx(round(1.9 / math.sqrt(1.9**2 + 15), 4))
    ids = tokenizer("The food was good.", add_special_tokens=False)["input_ids"]
    assert list(out.token_ids) == ids
    assert out.rewards[-1] == out.total and all(r == 0 for r in out.rewards[:-1])
    # negative sentence: lower than the positive one
    [neg] = source.score(["x"], ["The food was terrible."])
    assert neg.total < 0 < out.total


def test_sequence_reward_sits_at_the_eos_when_appended(tokenizer):
    source = LexiconReward(tokenizer, append_eos=True)
    [out] = source.score(["p"], ["The food was good."])
    assert out.token_ids[-1] == tokenizer.eos_token_id
    assert out.rewards[-1] == out.total and sum(out.rewards) == out.total


def test_callable_reward_scalar_and_per_token(tokenizer):
    scalar = CallableReward(lambda p, r: len(r) / 10, tokenizer)
    outs = scalar.score(PROMPTS, RESPONSES)
    for out, r in zip(outs, RESPONSES, strict=True):
        assert out.total == pytest.approx(len(r) / 10)
        assert out.rewards[-1] == out.total and sum(out.rewards) == pytest.approx(out.total)

    def per_token(prompt, response):
        n = len(tokenizer(response, add_special_tokens=False)["input_ids"])
        return [float(i) for i in range(n)]

    [out] = CallableReward(per_token, tokenizer).score(PROMPTS[:1], RESPONSES[:1])
    assert list(out.rewards) == [float(i) for i in range(len(out.token_ids))]
    assert out.total == sum(out.rewards)
    with pytest.raises(ValueError, match="per-token values"):
        CallableReward(lambda p, r: [1.0], tokenizer).score(PROMPTS[:1], RESPONSES[:1])
    with pytest.raises(ValueError, match="prompts"):
        scalar.score(PROMPTS, RESPONSES[:1])


def test_empty_response_keeps_the_total(tokenizer):
    [out] = CallableReward(lambda p, r: 2.5, tokenizer).score(["p"], [""])
    assert out.token_ids == () and out.total == 2.5
    [out] = CallableReward(lambda p, r: 2.5, tokenizer, append_eos=True).score(["p"], [""])
    assert out.rewards == (2.5,)


def test_token_rewards_checks_lengths():
    with pytest.raises(ValueError):
        TokenRewards((1, 2), (0.0,), 0.0)


# ----------------------------------------------------------------------------- projection


def test_projection_is_identity_with_the_same_tokenizer(tokenizer):
    text = RESPONSES[0]
    ids, offsets = PolicyTokens(tokenizer).encode(text)
    ends = [1, 4, len(ids) - 1]
    char_ends = [offsets[e][1] for e in ends]
    assert project_segment_ends(char_ends, [a for a, _ in offsets]) == ends


def test_projection_onto_coarser_tokens_merges_and_preserves_sums():
    # policy tokens: "ab" "cd" "ef" (starts 0, 2, 4); segments end after chars 1, 2, 5, 6
    token_starts = [0, 2, 4]
    ends = project_segment_ends([1, 2, 5, 6], token_starts)
    assert ends == [0, 0, 2, 2]  # "a" and "b" both end in token 0; "cde" and "f" in token 2
    merged, values = merge_projected_segments(ends, [1.0, 2.0, 3.0, 4.0])
    assert merged == [0, 2] and values == [3.0, 7.0]


# ----------------------------------------------------------------------------- segment RM


def _segment_checkpoint(tiny_model, folder, threshold, normaliser):
    """An untrained segment RM checkpoint written in the recipe's layout."""
    model = SegmentRewardModel.from_pretrained(tiny_model)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    info = SegmentRMInfo(threshold=threshold, reference=str(tiny_model), normaliser=normaliser)
    (folder / STUDIO_FILE).write_text(
        json.dumps({"recipe": "segment_reward_model", "segment_rm": info.to_dict()})
    )
    return folder


NORMALISER = LocationNormaliser(a=0.3, b=0.1, c=0.05, d=0.5, std_floor=0.05).to_dict()


def test_segment_rm_dense_rewards_sum_to_normalised_segment_rewards(tiny_model, tokenizer, tmp_path):
    # entropies of the random tiny model sit around ln(512) ≈ 6.2; 6.2 splits the responses
    ckpt = _segment_checkpoint(tiny_model, tmp_path / "seg", 6.2, NORMALISER)
    source = SegmentRMReward(ckpt, tokenizer)
    scored = source.segments(PROMPTS, RESPONSES)
    outs = source.score(PROMPTS, RESPONSES)
    assert any(1 < len(s.raw) < len(t.token_ids) for s, t in zip(scored, outs, strict=True))
    norm = LocationNormaliser.from_dict(NORMALISER)
    for s, out, text in zip(scored, outs, RESPONSES, strict=True):
        K = len(s.raw)
        # r̃_k = (r_k − mean(k/K)) / std(k/K)
        expected = [(r - norm.mean(k / K)) / norm.std(k / K) for k, r in enumerate(s.raw, start=1)]
        assert s.normalised == pytest.approx(expected, abs=1e-5)
        assert s.score == pytest.approx(sum(s.raw) / K, abs=1e-6)
        # same tokenizer: policy segments are the RM's; each segment's tokens sum to r̃_k
        assert len(out.segment_ends) == K
        first = 0
        for end, r_tilde in zip(out.segment_ends, s.normalised, strict=True):
            chunk = out.rewards[first : end + 1]
            assert sum(chunk) == pytest.approx(r_tilde, abs=1e-6)
            assert max(chunk) - min(chunk) < 1e-9  # spread evenly
            first = end + 1
        assert first == len(out.token_ids)
        assert out.total == pytest.approx(sum(s.normalised), abs=1e-6)
        assert sum(out.rewards) == pytest.approx(out.total, abs=1e-6)
        assert s.char_ranges[-1][1] == len(text)


def test_segment_rm_eos_gets_zero_in_dense_mode(tiny_model, tokenizer, tmp_path):
    ckpt = _segment_checkpoint(tiny_model, tmp_path / "seg", 0.0, NORMALISER)
    [out] = SegmentRMReward(ckpt, tokenizer, append_eos=True).score(PROMPTS[:1], RESPONSES[:1])
    assert out.token_ids[-1] == tokenizer.eos_token_id and out.rewards[-1] == 0.0
    # token level: every content token is a segment
    assert len(out.segment_ends) == len(out.token_ids) - 1


def test_segment_rm_bandit_reward_sits_at_the_last_token(tiny_model, tokenizer, tmp_path):
    glob = {"kind": "global", "mean": 0.1, "std": 2.0, "std_floor": 1e-6}
    ckpt = _segment_checkpoint(tiny_model, tmp_path / "seg", seg.BANDIT, glob)
    source = SegmentRMReward(ckpt, tokenizer)
    scored = source.segments(PROMPTS, RESPONSES)
    for s, out in zip(scored, source.score(PROMPTS, RESPONSES), strict=True):
        assert len(s.raw) == 1 and s.score == pytest.approx(s.raw[0])
        assert s.normalised[0] == pytest.approx((s.raw[0] - 0.1) / 2.0, abs=1e-6)
        assert out.rewards[-1] == pytest.approx(out.total) and not any(out.rewards[:-1])


def test_segment_rm_onto_another_policy_tokenizer(tiny_model, other_tokenizer, tokenizer, tmp_path):
    ckpt = _segment_checkpoint(tiny_model, tmp_path / "seg", 6.2, NORMALISER)
    same = SegmentRMReward(ckpt, tokenizer).score(PROMPTS, RESPONSES)
    other = SegmentRMReward(ckpt, other_tokenizer).score(PROMPTS, RESPONSES)
    for a, b, text in zip(same, other, RESPONSES, strict=True):
        assert list(b.token_ids) == other_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert b.total == pytest.approx(a.total, abs=1e-6)  # the RM's scores do not depend on the policy
        assert sum(b.rewards) == pytest.approx(a.total, abs=1e-6)


def test_segment_rm_is_deterministic_across_batches(tiny_model, tokenizer, tmp_path):
    ckpt = _segment_checkpoint(tiny_model, tmp_path / "seg", 6.2, NORMALISER)
    source = SegmentRMReward(ckpt, tokenizer, batch_size=2)
    together = source.segments(PROMPTS, RESPONSES)
    source.batch_size = 1
    alone = source.segments(PROMPTS, RESPONSES)
    for a, b in zip(together, alone, strict=True):
        assert a.char_ranges == b.char_ranges
        assert a.raw == pytest.approx(b.raw, abs=1e-5)


def test_segment_rm_without_normaliser_needs_opt_in(tiny_model, tokenizer, tmp_path):
    ckpt = _segment_checkpoint(tiny_model, tmp_path / "seg", 6.2, None)
    with pytest.raises(ValueError, match="normaliser"):
        SegmentRMReward(ckpt, tokenizer)
    raw = SegmentRMReward(ckpt, tokenizer, normalise=False).segments(PROMPTS[:1], RESPONSES[:1])[0]
    assert raw.normalised == raw.raw


def test_value_head_layout_and_init(tiny_model, tmp_path):
    model = SegmentRewardModel.from_pretrained(tiny_model)
    hidden = model.lm.config.hidden_size
    w = model.value_head.weight
    assert tuple(w.shape) == (1, hidden) and model.value_head.bias is None
    assert float(w.detach().std()) == pytest.approx(1 / (hidden + 1), rel=0.5)
    model.save_pretrained(tmp_path / "m")
    again = SegmentRewardModel.from_pretrained(tmp_path / "m")
    assert torch.equal(again.value_head.weight, w)
    x = torch.tensor([[5, 6, 7]])
    assert torch.allclose(again(x, torch.ones_like(x)), model(x, torch.ones_like(x)))


# ----------------------------------------------------------------------------- sequence RM


@pytest.fixture(scope="module")
def sequence_rm(tiny_model, tmp_path_factory):
    """A sequence RM checkpoint from the reward_model recipe (2 steps on the synthetic task)."""
    from trainers.config import OptimConfig
    from trainers.recipes.reward_model import RewardModelConfig
    from trainers.recipes.reward_model import train as train_rm
    from trainers.synthetic import write_synthetic_snapshot

    root = tmp_path_factory.mktemp("seqrm")
    snap = write_synthetic_snapshot(root / "data", n_train=16, n_eval=8)
    cfg = RewardModelConfig(
        snapshot=str(snap.train), eval_snapshot=str(snap.eval), output_dir=str(root / "run"), model=str(tiny_model),
        max_length=48, batch_size=8, max_steps=2, optim=OptimConfig(lr=1e-3), progress=False,
    )  # fmt: skip
    return train_rm(cfg).final_checkpoint


def test_sequence_rm_reward_sits_at_the_last_response_token(sequence_rm, tokenizer, other_tokenizer):
    from transformers import AutoModelForSequenceClassification

    clf = AutoModelForSequenceClassification.from_pretrained(sequence_rm, num_labels=1).eval()
    rm_tok = AutoTokenizer.from_pretrained(sequence_rm)
    expected = []
    for prompt, response in zip(PROMPTS, RESPONSES, strict=True):
        ids = rm_tok(prompt + response)["input_ids"]  # text prompts: the recipe concatenates as is
        with torch.no_grad():
            expected.append(float(clf(input_ids=torch.tensor([ids])).logits[0, 0]))
    for policy_tok in (tokenizer, other_tokenizer):
        outs = SequenceRMReward(sequence_rm, policy_tok).score(PROMPTS, RESPONSES)
        for out, text, value in zip(outs, RESPONSES, expected, strict=True):
            assert list(out.token_ids) == policy_tok(text, add_special_tokens=False)["input_ids"]
            assert out.total == pytest.approx(value, abs=1e-5)
            assert out.rewards[-1] == out.total and not any(out.rewards[:-1])
    # the bandit z-score with the held-out statistics the recipe stored
    extra = json.loads((sequence_rm / "studio.json").read_text())["extra"]
    normed = SequenceRMReward(sequence_rm, tokenizer, normalise=True, append_eos=True).score(
        PROMPTS, RESPONSES
    )
    for out, value in zip(normed, expected, strict=True):
        assert out.total == pytest.approx((value - extra["reward_mean"]) / extra["reward_std"], abs=1e-4)
        assert out.token_ids[-1] == tokenizer.eos_token_id and out.rewards[-1] == out.total
