"""Policy evaluation and the rollout glue on the tiny Llama: metrics against naive recomputations."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainers.rewards import CallableReward, LexiconReward, TokenRewards
from trainers.rl_eval import (
    align_rewards,
    distinct_n,
    encode_prompts,
    evaluate_policy,
    response_texts,
    reward_tensor,
    stop_token_ids,
)
from trainers.rollout import SamplingConfig, left_pad, rollout
from trainers.tasks import corpus_bleu

PROMPTS = ["The sea is", "Write one sentence about the weather.", "A good review says", "Numbers: 0 1",
           "The pizza was warm,", "Explain why"]  # fmt: skip


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def ref(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def other(make_tiny_model):
    return AutoModelForCausalLM.from_pretrained(make_tiny_model(7), dtype=torch.float32).eval()


def test_distinct_n_hand_values() -> None:
    # unigrams: a b a c | a → 5 total, {a, b, c} distinct; bigrams: ab ba ac → 3 of 3
    assert distinct_n(["a b a c", "a"], 1) == pytest.approx(3 / 5)
    assert distinct_n(["a b a c", "a"], 2) == pytest.approx(1.0)
    assert distinct_n(["a a", "a a"], 2) == pytest.approx(1 / 2)
    assert distinct_n(["", " "], 1) == 0.0


def test_encode_prompts_text_chat_and_left_truncation(tok) -> None:
    chat = [{"role": "user", "content": "The sea is"}]
    text_ids, chat_ids, cut = encode_prompts(tok, ["The sea is", chat, "The sea is vast and calm"], 4)
    assert text_ids == tok("The sea is")["input_ids"]
    rendered = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert chat_ids == tok(rendered, add_special_tokens=False)["input_ids"][-4:]
    assert cut == tok("The sea is vast and calm")["input_ids"][-4:]


def test_stop_tokens_add_every_newline_token(tok, ref) -> None:
    plain = stop_token_ids(tok, ref)
    assert plain == [tok.eos_token_id]
    lines = stop_token_ids(tok, ref, stop_at_newline=True)
    newline = [i for i in lines if i != tok.eos_token_id]
    assert newline and all("\n" in tok.decode([i]) for i in newline)
    assert tok("a\nb", add_special_tokens=False)["input_ids"][1] in newline


def test_align_rewards_passes_equal_tokens_and_moves_others_by_characters(tok) -> None:
    ids = tok(" calm sea", add_special_tokens=False)["input_ids"]
    same = TokenRewards(tuple(ids), tuple(float(i) for i in range(len(ids))), float(sum(range(len(ids)))))
    assert align_rewards(tok, same, " calm sea", ids) == list(same.rewards)
    # the source appended an EOS the policy never emitted: its reward lands on the last sampled token
    eos = TokenRewards((*ids, tok.eos_token_id), (*(0.0,) * len(ids), 2.5), 2.5)
    moved = align_rewards(tok, eos, " calm sea", ids)
    assert moved[-1] == 2.5 and sum(moved) == 2.5
    # the policy sampled other tokens for the same text (one id per character): sums are kept and each
    # value lands on the sampled token that holds its token's last character
    chars = [tok.convert_tokens_to_ids(tok.tokenize(c))[0] for c in " calm sea"]
    dense = TokenRewards(
        tuple(ids), tuple(1.0 + k for k in range(len(ids))), float(sum(1.0 + k for k in range(len(ids))))
    )
    spread = align_rewards(tok, dense, " calm sea", chars)
    assert len(spread) == len(chars) and sum(spread) == pytest.approx(dense.total)
    assert spread[-1] == dense.rewards[-1]


def test_reward_tensor_puts_sequence_rewards_on_the_last_sampled_token(tok, ref) -> None:
    ids, mask = left_pad([tok(p)["input_ids"] for p in PROMPTS[:3]], tok.pad_token_id)
    cfg = SamplingConfig(max_new_tokens=6)
    batch = rollout(ref, ids, mask, cfg, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id,
                    generator=[torch.Generator().manual_seed(i) for i in range(3)])  # fmt: skip
    texts = response_texts(tok, batch)
    source = CallableReward(lambda p, r: float(len(r)), tok, append_eos=True)
    rewards, scores = reward_tensor(tok, source.score(PROMPTS[:3], texts), texts, batch)
    assert rewards.shape == batch.response_ids.shape
    torch.testing.assert_close(scores, torch.tensor([float(len(t)) for t in texts]))
    torch.testing.assert_close(rewards.sum(-1), scores)
    last = batch.response_mask.sum(-1) - 1
    for b in range(3):
        assert rewards[b, last[b]] == scores[b] and bool(
            (rewards[b, batch.response_mask[b].logical_not()] == 0).all()
        )


def naive_metrics(model, reference, tok, prompts, max_new_tokens, ref_prompts=None):
    """Greedy answers one prompt at a time with HF generate; KL and perplexity by plain forwards (the
    reference reading the response after ``ref_prompts[i]`` when given)."""
    kl, nll, n, texts = [], 0.0, 0, []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)  # fmt: skip
        response = out[0, ids.shape[1] :]
        texts.append(tok.decode(response, skip_special_tokens=True))
        with torch.no_grad():
            lp = torch.log_softmax(model(out).logits[0, ids.shape[1] - 1 : -1], -1)
            ref_ids = ids if ref_prompts is None else torch.tensor([tok(ref_prompts[i])["input_ids"]])
            ref_seq = torch.cat([ref_ids, response[None]], dim=1)
            rp = torch.log_softmax(reference(ref_seq).logits[0, ref_ids.shape[1] - 1 : -1], -1)
        picked = response[:, None]
        kl.append(float((lp.gather(-1, picked) - rp.gather(-1, picked)).sum()))
        nll -= float(rp.gather(-1, picked).sum())
        n += len(response)
    return {"kl": sum(kl) / len(kl), "perplexity": math.exp(nll / n), "texts": texts}


def test_greedy_evaluation_matches_a_naive_one_prompt_at_a_time_computation(tok, ref, other) -> None:
    seen: list[str] = []
    reward = CallableReward(lambda p, r: seen.append(r) or float(len(r.split())), tok)
    cfg = SamplingConfig(max_new_tokens=7, temperature=0)
    other.train()
    got = evaluate_policy(other, ref, tok, PROMPTS, reward, cfg, batch_size=4)
    assert other.training  # the caller's mode comes back
    naive = naive_metrics(other, ref, tok, PROMPTS, 7)
    assert seen == naive["texts"]
    assert got["eval/kl"] == pytest.approx(naive["kl"], rel=1e-4, abs=1e-4) and got["eval/kl"] != 0
    assert got["eval/perplexity"] == pytest.approx(naive["perplexity"], rel=1e-4)
    assert got["eval/reward"] == pytest.approx(sum(len(t.split()) for t in seen) / len(seen))
    assert got["eval/distinct_1"] == pytest.approx(distinct_n(seen, 1))
    assert got["eval/distinct_2"] == pytest.approx(distinct_n(seen, 2))
    assert "eval/bleu" not in got
    # BLEU: corpus sacreBLEU of the stripped answers against the references
    refs = [[answer.strip()] if k % 2 else ["the sea is calm"] for k, answer in enumerate(seen)]
    again = evaluate_policy(other, ref, tok, PROMPTS, reward, cfg, batch_size=4, references=refs)
    assert again["eval/bleu"] == pytest.approx(corpus_bleu([t.strip() for t in seen], refs))
    assert again["eval/bleu"] > 0


def test_the_reference_can_read_other_prompts_than_the_policy(tok, ref, other) -> None:
    # a DT policy samples after a conditioned prompt; its KL is to the reference on the original prompt
    tagged = [f"<rm_score>: 2.00\n{p}" for p in PROMPTS]
    reward = CallableReward(lambda p, r: 0.0, tok)
    cfg = SamplingConfig(max_new_tokens=7, temperature=0)
    got = evaluate_policy(other, ref, tok, tagged, reward, cfg, batch_size=4, reference_prompts=PROMPTS)
    naive = naive_metrics(other, ref, tok, tagged, 7, ref_prompts=PROMPTS)
    assert got["eval/kl"] == pytest.approx(naive["kl"], rel=1e-4, abs=1e-4)
    assert got["eval/perplexity"] == pytest.approx(naive["perplexity"], rel=1e-4)
    same_prompt = evaluate_policy(other, ref, tok, tagged, reward, cfg, batch_size=4)
    assert got["eval/kl"] != pytest.approx(same_prompt["eval/kl"], rel=1e-3)
    with pytest.raises(ValueError, match="2 reference prompts for 6 prompts"):
        evaluate_policy(other, ref, tok, tagged, reward, cfg, batch_size=4, reference_prompts=PROMPTS[:2])


def test_sampled_evaluation_does_not_depend_on_the_batch_size_and_kl_to_itself_is_zero(tok, ref) -> None:
    reward = LexiconReward(tok)
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0)
    a = evaluate_policy(ref, ref, tok, PROMPTS, reward, cfg, batch_size=2, seed=3, prefix="")
    b = evaluate_policy(ref, ref, tok, PROMPTS, reward, cfg, batch_size=5, seed=3, prefix="")
    assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    assert a["kl"] == pytest.approx(0.0, abs=1e-4)  # stage-1 raw log-probs vs the same model teacher-forced
    c = evaluate_policy(ref, ref, tok, PROMPTS, reward, cfg, batch_size=5, seed=4, prefix="")
    assert c["perplexity"] != a["perplexity"]  # the seed matters
    assert set(a) == {"reward", "reward_std", "kl", "perplexity", "distinct_1", "distinct_2", "response_tokens",
                      "eos_fraction"}  # fmt: skip
    with pytest.raises(ValueError, match="2 references for 6 prompts"):
        evaluate_policy(ref, ref, tok, PROMPTS, reward, cfg, batch_size=5, references=[["a"], ["b"]])
