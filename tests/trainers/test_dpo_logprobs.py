"""ResponseLogps (trainers.logprobs): the direct, chunked LM head equals the model's own forward.

Tiny random models of every architecture on the direct-path list (and one that must fall back),
built from configs in a fraction of a second; the oracle is a plain ``log_softmax`` over the full
logits, summed over the response positions by hand.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from trainers.logprobs import PLAIN_HEADS, ResponseLogps, direct_head

VOCAB = 40
COMMON = {"vocab_size": VOCAB, "num_hidden_layers": 2}
CONFIGS = {
    "LlamaForCausalLM": ("LlamaConfig", {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                                          "num_key_value_heads": 1, "tie_word_embeddings": True}),
    "MistralForCausalLM": ("MistralConfig", {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                                              "num_key_value_heads": 1}),
    "Qwen2ForCausalLM": ("Qwen2Config", {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                                          "num_key_value_heads": 1}),
    "Qwen3ForCausalLM": ("Qwen3Config", {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                                          "num_key_value_heads": 1, "head_dim": 8}),
    "GPT2LMHeadModel": ("GPT2Config", {"n_embd": 16, "n_head": 2, "n_layer": 2, "n_positions": 64}),
    "Gemma2ForCausalLM": ("Gemma2Config", {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                                            "num_key_value_heads": 1, "head_dim": 8}),  # soft-capped: falls back
}  # fmt: skip


def tiny(name: str) -> torch.nn.Module:
    config_name, kwargs = CONFIGS[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**COMMON, **kwargs)
    return getattr(transformers, name)(config).float().eval()


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """3 right-padded rows: prompt tokens, then response tokens, then padding (row 2 has no response)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 9), generator=g)
    lengths, prompts = [9, 7, 5], [3, 4, 5]
    attention = torch.tensor([[1] * n + [0] * (9 - n) for n in lengths])
    response = torch.tensor([[p <= t < n for t in range(9)] for p, n in zip(prompts, lengths, strict=True)])
    return ids, attention, response


def oracle(lm: torch.nn.Module, ids, attention, response) -> torch.Tensor:
    """Σ_t log softmax(logits_{t-1})[ids_t] over response positions t ≥ 1, one row at a time, no padding."""
    out = []
    for row in range(ids.shape[0]):
        n = int(attention[row].sum())
        logits = lm(input_ids=ids[row : row + 1, :n]).logits[0].float()
        per_token = torch.log_softmax(logits[:-1], -1).gather(-1, ids[row, 1:n, None]).squeeze(-1)
        out.append((per_token * response[row, 1:n]).sum())
    return torch.stack(out)


def grads(module: torch.nn.Module, value: torch.Tensor) -> dict[str, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    value.backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_direct_chunked_head_equals_the_full_forward(name: str) -> None:
    lm = tiny(name)
    assert direct_head(lm) == (name in PLAIN_HEADS)
    ids, attention, response = batch()
    fast = ResponseLogps(lm, chunk_tokens=2)  # several chunks: 4 + 2 = 6 scored positions
    plain = ResponseLogps(lm, chunk_tokens=10_000, direct=False)
    assert fast.direct == (name in PLAIN_HEADS) and not plain.direct
    want = oracle(lm, ids, attention, response)
    got = fast(ids, attention, response)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain(ids, attention, response), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.reference_path(ids, attention, response), want, rtol=1e-5, atol=1e-5)
    assert got[2].item() == 0.0  # nothing scored: 0, never the prompt's log-prob
    weights = torch.tensor([0.7, -1.3, 2.0])
    g_fast = grads(fast, (fast(ids, attention, response) * weights).sum())
    g_plain = grads(plain, (plain(ids, attention, response) * weights).sum())
    assert g_fast.keys() == g_plain.keys() and g_fast
    for key in g_fast:
        torch.testing.assert_close(g_fast[key], g_plain[key], rtol=1e-4, atol=1e-6, msg=key)


def test_prompt_positions_never_count() -> None:
    """Changing which tokens are 'response' changes the sum by exactly their log-probs."""
    lm = tiny("LlamaForCausalLM")
    ids, attention, response = batch()
    model = ResponseLogps(lm)
    everything = attention.bool().clone()
    everything[:, 0] = False  # position 0 is never scored
    with torch.no_grad():
        logits = lm(input_ids=ids, attention_mask=attention).logits
    per_token = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    prompt_part = (per_token * (everything & ~response)[:, 1:]).sum(-1)
    with torch.no_grad():
        total, scored = model(ids, attention, everything), model(ids, attention, response)
    torch.testing.assert_close(total - scored, prompt_part, rtol=1e-5, atol=1e-5)
    assert (prompt_part < 0).all()  # the prompt's log-probs are real, and left out of `scored`


@pytest.mark.parametrize("entropy", [False, True])
def test_picked_logprobs_equal_log_softmax_gather_in_value_gradient_and_entropy(entropy):
    from trainers.logprobs import picked_logprobs
    from trainers.rollout import entropy_of

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, 50, generator=gen, dtype=torch.float64) * 3
    base[..., 7] = float("-inf")  # a banned token (a logits processor's −inf)
    targets = torch.randint(0, 50, (3, 5), generator=gen)
    targets[targets == 7] = 8
    weights = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    mine, ref = base.clone().requires_grad_(), base.clone().requires_grad_()
    picked, ent = picked_logprobs(mine, targets, entropy=entropy)
    logp = torch.log_softmax(ref, -1)
    want = logp.gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(picked, want)
    (picked * weights).sum().backward()
    (want * weights).sum().backward()
    torch.testing.assert_close(mine.grad, ref.grad)  # g·(onehot − p), 0 on the banned token
    assert mine.grad[..., 7].eq(0).all()
    if entropy:
        assert not ent.requires_grad
        torch.testing.assert_close(ent, entropy_of(logp.detach()))
    else:
        assert ent is None
    with torch.no_grad():  # the graph-free path gives the same numbers
        again, ent2 = picked_logprobs(base, targets, entropy=entropy)
    torch.testing.assert_close(again, picked.detach())
    if entropy:
        torch.testing.assert_close(ent2, ent)
