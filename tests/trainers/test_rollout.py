"""ESRL two-stage sampling on the tiny Llama: stage 1 (trainers.rollout) against stage 2 (trainers.teacher_forced).

algorithms.md §1.14.1–2 and §3.7.1–3: incremental KV-cached log-probs equal the teacher-forced
ones; stage 1 builds no graph; left padding changes nothing; REINFORCE gradients through stage 2
equal a naive implementation that keeps the graph through the decoding loop.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from trainers.config import ConfigFieldError
from trainers.recipes.nlpo import replay_masks
from trainers.rl_math import group_mean_baseline, ppo_policy_loss, reinforce_loss
from trainers.rollout import (
    SamplingConfig,
    SequenceProcessor,
    apply_chunk,
    draw,
    left_pad,
    positions,
    rollout,
    sampling_processors,
    suppress_tokens,
    temperature_processor,
    top_k_mask,
    top_k_processor,
    top_p_mask,
    top_p_processor,
)
from trainers.teacher_forced import TokenScorer, score_tokens

PROMPTS = ["the movie was", "I think that this long winded film really", "a"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request, tiny_model: Path):
    """The tiny Llama (rotary positions), or a tiny GPT-2 on its tokenizer (learned absolute positions,
    so a position-id mistake under left padding shows)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    if request.param == "llama":
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    else:
        config = GPT2Config(
            vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        model = GPT2LMHeadModel(config)
    return model.eval(), tokenizer


def prompt_batch(tokenizer, texts=PROMPTS) -> tuple[torch.Tensor, torch.Tensor]:
    return left_pad([tokenizer(t)["input_ids"] for t in texts], tokenizer.pad_token_id)


def boost(token_id: int, amount: float):
    """A caller's processor: add ``amount`` to one token's logit (makes the random model end rows early)."""

    def process(step: int, logits: torch.Tensor) -> torch.Tensor:
        bias = torch.zeros(logits.shape[-1], device=logits.device)
        bias[token_id] = amount
        return logits + bias

    return process


def generators(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def sample(model, tokenizer, ids, mask, config, processors=(), seeds=(0, 1, 2), **kw):
    return rollout(
        model,
        ids,
        mask,
        config,
        eos_token_ids=[tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
        processors=processors,
        generator=generators(seeds),
        **kw,
    )


EOS_ENDING = SamplingConfig(max_new_tokens=10, min_new_tokens=2, temperature=0.7, top_k=60, top_p=0.9)


# ----------------------------------------------------------------------------- stage 1 = stage 2


def test_stage2_logprobs_equal_stage1_step_logprobs(lm) -> None:
    model, tok = lm
    ids, mask = prompt_batch(tok)
    extra = [boost(tok.eos_token_id, 3.0)]
    r = sample(model, tok, ids, mask, EOS_ENDING, extra, seeds=(3, 4, 5), return_raw_logprobs=True)
    # rows end at different steps: a meaningful mix of EOS endings and padding
    assert len(set(r.lengths.tolist())) > 1 and bool(r.eos.any())
    for row, n in enumerate(r.lengths.tolist()):
        assert r.response_mask[row, :n].all() and not r.response_mask[row, n:].any()
        assert (r.response_ids[row, n:] == tok.pad_token_id).all()
        assert bool(r.eos[row]) == (r.response_ids[row, n - 1].item() == tok.eos_token_id)
    assert r.lengths.min() >= 2  # min_new_tokens

    chain = [*extra, *sampling_processors(EOS_ENDING, [tok.eos_token_id])]
    scored = score_tokens(model, ids, mask, r.response_ids, r.response_mask, processors=chain, chunk_steps=3)
    assert torch.allclose(scored.logprobs, r.logprobs, atol=1e-5)
    raw = score_tokens(model, ids, mask, r.response_ids, r.response_mask)
    assert torch.allclose(raw.logprobs, r.raw_logprobs, atol=1e-5)
    # the processed (behaviour) distribution is not the raw one: the test can tell them apart
    assert (r.logprobs - r.raw_logprobs).abs().max() > 0.1
    # §1.14.1: with π_old from stage 1 and π_new from stage 2 the first PPO ratio is 1
    _, stats = ppo_policy_loss(scored.logprobs, r.logprobs, torch.ones_like(r.logprobs), r.response_mask)
    assert abs(stats["ratio_max"].item() - 1) < 1e-5 and stats["approx_kl"].item() < 1e-10


def test_stage1_builds_no_graph(lm) -> None:
    model, tok = lm
    assert any(p.requires_grad for p in model.parameters())
    r = sample(model, tok, *prompt_batch(tok), EOS_ENDING, return_raw_logprobs=True)
    tensors = [
        r.prompt_ids,
        r.prompt_mask,
        r.response_ids,
        r.response_mask,
        r.logprobs,
        r.raw_logprobs,
        r.eos,
    ]
    assert all(not t.requires_grad and t.grad_fn is None for t in tensors)


def test_left_padding_gives_the_tokens_of_unpadded_generation(lm) -> None:
    model, tok = lm
    ids, mask = prompt_batch(tok)
    assert not mask.all()  # the batch really is padded
    for config in (EOS_ENDING, SamplingConfig(max_new_tokens=8, temperature=0.0)):
        batch = sample(model, tok, ids, mask, config, seeds=(7, 8, 9))
        for row, (text, seed) in enumerate(zip(PROMPTS, (7, 8, 9), strict=True)):
            alone = sample(model, tok, *prompt_batch(tok, [text]), config, seeds=(seed,))
            n = alone.lengths.item()
            assert n == batch.lengths[row].item()
            assert torch.equal(alone.response_ids[0, :n], batch.response_ids[row, :n])
            assert torch.allclose(alone.logprobs[0, :n], batch.logprobs[row, :n], atol=1e-5)


def test_greedy_is_the_argmax_and_seeds_matter_only_when_sampling(lm) -> None:
    model, tok = lm
    ids, mask = prompt_batch(tok)
    greedy = SamplingConfig(max_new_tokens=5, temperature=0.0)
    a = sample(model, tok, ids, mask, greedy, seeds=(1, 2, 3))
    b = sample(model, tok, ids, mask, greedy, seeds=(4, 5, 6))
    assert torch.equal(a.response_ids, b.response_ids)
    first = model(input_ids=ids, attention_mask=mask.long(), position_ids=positions(mask)).logits[:, -1]
    assert torch.equal(a.response_ids[:, 0], first.argmax(-1))
    config = SamplingConfig(max_new_tokens=5)
    assert not torch.equal(
        sample(model, tok, ids, mask, config, seeds=(1, 2, 3)).response_ids,
        sample(model, tok, ids, mask, config, seeds=(4, 5, 6)).response_ids,
    )


def test_fixed_length_never_emits_eos_and_min_new_tokens_holds(lm) -> None:
    model, tok = lm
    ids, mask = prompt_batch(tok)
    eager = [boost(tok.eos_token_id, 50.0)]  # EOS would win every step
    fixed = sample(model, tok, ids, mask, SamplingConfig(max_new_tokens=6, stop_at_eos=False), eager)
    assert fixed.response_ids.shape == (3, 6) and bool(fixed.response_mask.all())
    assert not (fixed.response_ids == tok.eos_token_id).any() and not fixed.eos.any()
    r = sample(model, tok, ids, mask, SamplingConfig(max_new_tokens=6, min_new_tokens=3), eager)
    assert r.lengths.tolist() == [4, 4, 4] and bool(r.eos.all())
    assert (r.response_ids[:, 3] == tok.eos_token_id).all()
    assert not (r.response_ids[:, :3] == tok.eos_token_id).any()
    assert r.response_ids.shape[1] == 4  # the loop stopped once every row had ended


# ----------------------------------------------------------------------------- REINFORCE gradients


def naive_sequence_logprobs(model, ids, mask, config, processors, seeds, eos_id, pad_id):
    """Single-stage sampling that keeps the autograd graph through the KV-cached decoding loop."""
    gens = generators(seeds)
    attention = mask.long()
    out = model(input_ids=ids, attention_mask=attention, position_ids=positions(attention), use_cache=True)
    next_position = attention.sum(-1, keepdim=True)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    logps, tokens, alive_steps = [], [], []
    for step in range(config.max_new_tokens):
        logits = out.logits[:, -1].float()
        for process in processors:
            logits = process(step, logits)
        logp = torch.log_softmax(logits, -1)
        alive = ~finished
        token = torch.where(alive, draw(logp.detach(), greedy=False, generator=gens), pad_id)
        logps.append(torch.where(alive, logp.gather(-1, token[:, None]).squeeze(-1), 0.0))
        tokens.append(token)
        alive_steps.append(alive)
        finished = finished | (alive & (token == eos_id))
        if bool(finished.all()):
            break
        attention = torch.cat([attention, alive.long()[:, None]], 1)
        out = model(
            input_ids=token[:, None],
            attention_mask=attention,
            position_ids=next_position,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
        next_position = next_position + 1
    return torch.stack(logps, 1), torch.stack(tokens, 1), torch.stack(alive_steps, 1)


def test_reinforce_gradient_two_stage_equals_naive(lm) -> None:
    model, tok = lm
    texts = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]  # two groups of K = 2
    ids, mask = prompt_batch(tok, texts)
    config = SamplingConfig(max_new_tokens=6, temperature=0.8, top_k=100)
    extra = [boost(tok.eos_token_id, 3.5)]
    chain = [*extra, *sampling_processors(config, [tok.eos_token_id])]
    seeds = (11, 12, 13, 14)
    scores = torch.tensor([1.0, -0.5, 2.0, 0.25])
    advantages = scores - group_mean_baseline(scores, 2)
    params = [p for p in model.parameters() if p.requires_grad]

    model.zero_grad()
    logp, tokens, alive = naive_sequence_logprobs(
        model, ids, mask, config, chain, seeds, tok.eos_token_id, tok.pad_token_id
    )
    reinforce_loss(logp, alive, advantages)[0].backward()
    naive = [p.grad.clone() for p in params]

    model.zero_grad()
    r = sample(model, tok, ids, mask, config, extra, seeds=seeds)  # stage 1: no graph
    assert torch.equal(r.response_ids, tokens) and torch.equal(r.response_mask, alive)
    assert len(set(r.lengths.tolist())) > 1  # some rows ended early
    scores2 = TokenScorer(model, chunk_steps=2)(ids, mask, r.response_ids, r.response_mask, processors=chain)
    reinforce_loss(scores2.logprobs, r.response_mask, advantages)[0].backward()
    two_stage = [p.grad.clone() for p in params]
    model.zero_grad()

    assert sum(g.abs().sum().item() for g in naive) > 0
    for a, b in zip(naive, two_stage, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a - b).abs().max()


# ----------------------------------------------------------------------------- the scorer


def test_chunked_scorer_equals_unchunked_and_the_full_softmax(lm) -> None:
    model, tok = lm
    ids, mask = prompt_batch(tok)
    r = sample(model, tok, ids, mask, EOS_ENDING, [boost(tok.eos_token_id, 3.0)], seeds=(3, 4, 5))
    chain = sampling_processors(SamplingConfig(temperature=0.9, top_p=0.95), [])
    results = []
    # recompute_above=0: checkpointed chunks even for this small vocabulary; None: the default budget,
    # under which this small response is scored in one chunk without recompute
    for chunk, direct, budget in ((1, None, 0), (4, None, 0), (64, None, 0), (3, False, 0), (4, None, None)):
        model.zero_grad()
        extra = {} if budget is None else {"recompute_above": budget}
        s = score_tokens(
            model, ids, mask, r.response_ids, r.response_mask, processors=chain, with_entropy=True,
            chunk_steps=chunk, direct=direct, **extra,
        )  # fmt: skip
        (s.logprobs.sum() + s.entropy.sum()).backward()
        results.append(
            (s.logprobs.detach(), s.entropy.detach(), [p.grad.clone() for p in model.parameters()])
        )
    model.zero_grad()
    ref_logp, ref_ent, ref_grads = results[2]
    for logp, ent, grads in results[:2] + results[3:]:
        assert torch.allclose(logp, ref_logp, atol=1e-6) and torch.allclose(ent, ref_ent, atol=1e-5)
        for a, b in zip(grads, ref_grads, strict=True):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    # the oracle: model logits → processors → full softmax, entropy over the finite tokens
    with torch.no_grad():
        full_ids = torch.cat([ids, r.response_ids], 1)
        attention = torch.cat([mask, r.response_mask], 1).long()
        logits = model(input_ids=full_ids, attention_mask=attention, position_ids=positions(attention)).logits
        logits = logits[:, ids.shape[1] - 1 : -1].float()
        steps = [chain[1](t, chain[0](t, logits[:, t])) for t in range(logits.shape[1])]
        logp_all = torch.log_softmax(torch.stack(steps, 1), -1)
        picked = logp_all.gather(-1, r.response_ids[..., None]).squeeze(-1)
        p = logp_all.exp()
        entropy = -(p * logp_all.nan_to_num(neginf=0.0)).sum(-1)
    m = r.response_mask
    assert torch.allclose(ref_logp[m], picked[m], atol=1e-5)
    assert torch.allclose(ref_ent[m], entropy[m], atol=1e-5)
    assert bool((ref_logp[~m] == 0).all()) and bool((ref_ent[~m] == 0).all())


def test_scorer_is_padding_invariant(lm) -> None:
    model, tok = lm
    ids, mask = prompt_batch(tok)
    r = sample(model, tok, ids, mask, EOS_ENDING, seeds=(1, 2, 3))
    with torch.no_grad():
        base = score_tokens(model, ids, mask, r.response_ids, r.response_mask).logprobs
        wider_ids = torch.cat([torch.full((3, 5), tok.pad_token_id), ids], 1)
        wider_mask = torch.cat([torch.zeros(3, 5, dtype=torch.bool), mask], 1)
        wider = score_tokens(model, wider_ids, wider_mask, r.response_ids, r.response_mask).logprobs
        longer_ids = torch.cat([r.response_ids, torch.full((3, 4), tok.pad_token_id)], 1)
        longer_mask = torch.cat([r.response_mask, torch.zeros(3, 4, dtype=torch.bool)], 1)
        longer = score_tokens(model, ids, mask, longer_ids, longer_mask).logprobs
        for row, text in enumerate(PROMPTS):
            alone_ids, alone_mask = prompt_batch(tok, [text])
            n = r.lengths[row].item()
            alone = score_tokens(model, alone_ids, alone_mask, r.response_ids[row : row + 1, :n],
                                 r.response_mask[row : row + 1, :n]).logprobs  # fmt: skip
            assert torch.allclose(alone[0], base[row, :n], atol=1e-5)
    assert torch.allclose(wider, base, atol=1e-5)
    assert torch.allclose(longer[:, : base.shape[1]], base, atol=1e-5) and bool(
        (longer[:, base.shape[1] :] == 0).all()
    )


class LargestLogits(TorchDispatchMode):
    """Records the largest new tensor of shape (…, V) any op allocates (forward and backward; aliases
    such as the transposed (H, V) head weight are not allocations): a logits-memory proxy."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.bytes = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if (
                isinstance(t, torch.Tensor)
                and t.dim() >= 2
                and t.shape[-1] == self.vocab
                and t.untyped_storage().data_ptr() not in inputs  # views and detach() alias their input
            ):
                self.bytes = max(self.bytes, t.numel() * t.element_size())
        return out


def test_detached_entropy_has_the_same_values_and_no_graph_or_recompute(lm) -> None:
    model, tok = lm
    ids, mask = prompt_batch(tok)
    r = sample(model, tok, ids, mask, EOS_ENDING, [boost(tok.eos_token_id, 3.0)], seeds=(3, 4, 5))
    chain = sampling_processors(SamplingConfig(temperature=0.9, top_p=0.95), [])  # -inf logits in play
    inputs = (ids, mask, r.response_ids, r.response_mask)
    model.zero_grad()
    full = score_tokens(model, *inputs, processors=chain, with_entropy=True, chunk_steps=4, recompute_above=0)
    full.logprobs.sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ops: list[str] = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(str(func))
            return func(*args, **(kwargs or {}))

    detached = score_tokens(model, *inputs, processors=chain, with_entropy="detached", chunk_steps=4,
                            recompute_above=0)  # fmt: skip
    assert not detached.entropy.requires_grad and detached.logprobs.requires_grad
    assert torch.allclose(detached.entropy, full.entropy, atol=1e-6) and bool(
        detached.entropy.isfinite().all()
    )
    with Count():
        detached.logprobs.sum().backward()
    for a, b in zip((p.grad for p in model.parameters()), want, strict=True):
        # the same up to fp32 rounding: the detached path back-propagates through picked_logprobs' fused backward
        assert float((a - b).norm()) <= 1e-6 * float(b.norm()) + 1e-12
    # the checkpointed chunks' recompute stops at the gather: no exp/nan_to_num of the entropy in backward
    assert not any("nan_to_num" in op for op in ops)


def logits_memory(
    model, vocab: int, *inputs: torch.Tensor, chunk_steps: int, budget: int = 0
) -> tuple[int, int, torch.Tensor]:
    """Score with grad and backprop; return (largest logits-shaped allocation, bytes of logits-shaped
    tensors saved for backward, the head's weight gradient)."""
    weight = model.lm_head.weight.untyped_storage().data_ptr()
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() >= 2 and t.shape[-1] == vocab and t.untyped_storage().data_ptr() != weight:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.zero_grad()
    with LargestLogits(vocab) as probe:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            s = score_tokens(
                model, *inputs, chunk_steps=chunk_steps, with_entropy=True, recompute_above=budget
            )
        (s.logprobs.sum() + s.entropy.sum()).backward()
    return probe.bytes, sum(saved.values()), model.lm_head.weight.grad.clone()


def test_chunked_scorer_never_holds_the_full_logits_for_a_large_vocabulary() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, batch, steps = 16_384, 2, 32
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    inputs = (
        torch.randint(vocab, (batch, 3)),
        torch.ones(batch, 3, dtype=torch.bool),
        torch.randint(vocab, (batch, steps)),
        torch.ones(batch, steps, dtype=torch.bool),
    )
    full_peak, full_kept, full_grad = logits_memory(model, vocab, *inputs, chunk_steps=steps)
    peak, kept, grad = logits_memory(model, vocab, *inputs, chunk_steps=4)
    full = batch * steps * vocab * 4  # float32 (B, T, V)
    assert full_peak >= full and full_kept >= full
    assert peak == batch * 4 * vocab * 4 and peak * 8 == full  # one chunk's logits at a time
    assert kept == 0  # chunks are recomputed in backward: no logits saved between the passes
    assert torch.allclose(grad, full_grad, rtol=1e-4, atol=1e-7)
    # under the recompute budget (the default, 64 MiB) the response is one chunk, saved, not recomputed
    _, small_kept, small_grad = logits_memory(model, vocab, *inputs, chunk_steps=4, budget=full)
    assert small_kept >= full and torch.allclose(small_grad, full_grad, rtol=1e-4, atol=1e-7)
    _, over_kept, _ = logits_memory(model, vocab, *inputs, chunk_steps=4, budget=full - 1)
    assert over_kept == 0


# ----------------------------------------------------------------------------- processors


class BanRepeats:
    """A SequenceProcessor: bans the token each row drew at the previous step, and records its masks."""

    def __init__(self) -> None:
        self.previous: torch.Tensor | None = None
        self.banned: list[torch.Tensor] = []

    def begin(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        self.previous = prompt_ids[:, -1].clone()
        self.banned = []

    def advance(self, step: int, tokens: torch.Tensor) -> None:
        self.previous = tokens.clone()

    def __call__(self, step: int, logits: torch.Tensor) -> torch.Tensor:
        banned = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, self.previous[:, None], True)
        self.banned.append(banned)
        return logits.masked_fill(banned, float("-inf"))


def test_sequence_processor_follows_the_tokens_and_its_masks_replay_in_stage2(lm) -> None:
    model, tok = lm
    ids, mask = prompt_batch(tok)
    ban = BanRepeats()
    assert isinstance(ban, SequenceProcessor)
    config = SamplingConfig(max_new_tokens=12, temperature=0.0, stop_at_eos=False)
    r = sample(model, tok, ids, mask, config, [ban])
    previous = torch.cat([ids[:, -1:], r.response_ids[:, :-1]], 1)
    assert not (r.response_ids == previous).any()
    masks = torch.stack(ban.banned, 1)  # (B, T, V), recorded in stage 1

    def replay(step: int, logits: torch.Tensor) -> torch.Tensor:
        return logits.masked_fill(masks[:, step], float("-inf"))

    chain = [replay, *sampling_processors(config, [tok.eos_token_id])]  # fixed length: EOS banned too
    scored = score_tokens(model, ids, mask, r.response_ids, r.response_mask, processors=chain, chunk_steps=5)
    assert torch.allclose(scored.logprobs, r.logprobs, atol=1e-5)


def test_top_p_and_top_k_masks_hand_worked() -> None:
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    # sorted: 0.5, 0.3, 0.15, 0.05; mass before each: 0, 0.5, 0.8, 0.95
    assert top_p_mask(logits, 0.7).tolist() == [[False, True, False, True]]  # 0.3 crosses 0.7: kept
    assert top_p_mask(logits, 0.5).tolist() == [
        [False, True, False, False]
    ]  # mass before 0.3 is 0.5, not < 0.5
    assert top_p_mask(logits, 0.01).tolist() == [[False, True, False, False]]  # the argmax always stays
    assert top_p_mask(logits, 0.5, min_tokens_to_keep=3).tolist() == [[False, True, True, True]]
    assert bool(top_p_mask(logits, 1.0).all())
    assert top_k_mask(logits, 2).tolist() == [[False, True, False, True]]
    assert top_k_mask(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), 1).tolist() == [
        [False, True, True, False]
    ]  # ties


def test_inputs_are_checked(lm) -> None:
    model, tok = lm
    with pytest.raises(ConfigFieldError):
        SamplingConfig(max_new_tokens=3, min_new_tokens=4)
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1, 2], []], 0)
    ids = torch.tensor([[5, 6, 0]])
    right_padded = torch.tensor([[True, True, False]])
    with pytest.raises(ValueError, match="left-padded"):
        sample(model, tok, ids, right_padded, EOS_ENDING, seeds=(0,))
    with pytest.raises(ValueError, match="left-padded"):
        score_tokens(model, ids, right_padded, ids, right_padded)
    with pytest.raises(ValueError, match="generators"):
        sample(model, tok, *prompt_batch(tok), EOS_ENDING, seeds=(0,))


def test_top_p_mask_ties_and_wide_nuclei_against_a_sort() -> None:
    # ties with the crossing logit are all kept
    logits = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.2]]))
    assert top_p_mask(logits, 0.5).tolist() == [[True, True, True, True]]
    assert top_p_mask(logits, 0.3).tolist() == [[True, False, False, False]]
    # peaked rows (settled by the first topk), wider ones (1 024, 8 192), near-flat ones (from the
    # bottom) and a flat one at a small p (the full sort), in one batch of (…, V) shape
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.02, 0.1, 1.0, 2.0, 3.0, 4.0, 8.0])
    logits = torch.randn(2, len(scales), 20000, generator=gen) * scales[None, :, None]
    sizes = set()
    for p, keep in ((0.9, 1), (0.5, 100), (0.99, 7), (0.05, 1), (0.97, 3000)):
        got = top_p_mask(logits, p, keep)
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        kept = (probs.cumsum(-1) - probs) < p
        kept[..., :keep] = True
        want = torch.zeros_like(kept).scatter(-1, order, kept)
        assert torch.equal(got, want), (p, keep, (got != want).sum(-1))
        sizes |= set(got.sum(-1).flatten().tolist())
    bands = [(1, 128), (129, 1024), (1025, 8192), (8193, 15000), (15001, 20000)]
    assert all(any(lo <= n <= hi for n in sizes) for lo, hi in bands)  # every path was taken


def test_chunked_processors_equal_step_by_step() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 40, generator=gen)
    masks = torch.rand(3, 9, 40, generator=gen) > 0.3
    chunked = [suppress_tokens([0, 7], before_step=4), temperature_processor(0.7), top_k_processor(20),
               top_p_processor(0.8), replay_masks(masks)]  # fmt: skip
    for first in (0, 2, 4):
        want = torch.stack(
            [apply_chunk(chunked, first + i, logits[:, i : i + 1])[:, 0] for i in range(5)], dim=1
        )
        stepwise = torch.stack([_apply_steps(chunked, first + i, logits[:, i]) for i in range(5)], dim=1)
        assert torch.equal(apply_chunk(chunked, first, logits), stepwise)
        owned = logits.clone()
        assert torch.equal(apply_chunk(chunked, first, owned, owned=True), stepwise)  # edited in place
        assert not torch.equal(owned, logits)
        assert torch.equal(want, stepwise)
    # a plain callable in the chain falls back to the step loop, with the same result
    plain = [*chunked, lambda step, row: row + step]
    stepwise = torch.stack([_apply_steps(plain, 2 + i, logits[:, i]) for i in range(5)], dim=1)
    assert torch.equal(apply_chunk(plain, 2, logits), stepwise)
    # the EOS ban reaches steps < before_step only
    banned = suppress_tokens([0], before_step=3).chunk(1, logits)
    assert torch.isinf(banned[:, :2, 0]).all() and torch.isfinite(banned[:, 2:, 0]).all()


def _apply_steps(processors, step, row):
    for process in processors:
        row = process(step, row)
    return row
