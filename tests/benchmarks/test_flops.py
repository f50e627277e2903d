"""Matmul counting of bench/harness/flops.py, checked by hand on small shapes."""

from bench.harness.flops import Shape, attention_flops, layer_linears, linear_shapes, step_flops

# hidden 4, intermediate 8, 2 layers, 2 heads of dim 2, one kv head (GQA), Llama-style gated MLP.
LLAMA = Shape(
    hidden=4, intermediate=8, layers=2, heads=2, kv_heads=1, head_dim=2, gated_mlp=True, pooler=False
)
BERT = Shape(
    hidden=4, intermediate=8, layers=1, heads=2, kv_heads=2, head_dim=2, gated_mlp=False, pooler=True
)


def test_layer_linears_lists_q_k_v_o_and_mlp():
    assert layer_linears(LLAMA, 5, 7) == [
        (5, 4, 4),
        (7, 4, 2),
        (7, 4, 2),
        (5, 4, 4),
        (5, 4, 8),
        (5, 4, 8),
        (5, 8, 4),
    ]
    assert layer_linears(BERT, 3, 3) == [(3, 4, 4), (3, 4, 4), (3, 4, 4), (3, 4, 4), (3, 4, 8), (3, 8, 4)]


def test_full_forward_flops_by_hand():
    # 1 row × 3 tokens: per layer per token 2·(16 + 8 + 8 + 16 + 32 + 32 + 32) = 288 → ×3 tokens ×2 layers.
    linear = sum(2 * m * k * n for m, k, n in linear_shapes(LLAMA, 1, 3, last_layer_only=False))
    assert linear == 288 * 3 * 2
    # attention: QKᵀ and AV, 2 FLOPs per MAC, 3 keys × 4 query dims, per query token, 3 tokens, 2 layers.
    assert attention_flops(LLAMA, 1, 3, last_layer_only=False) == 2 * (2 * 2 * 3 * 4) * 3
    assert step_flops(LLAMA, 1, 3, last_layer_only=False) == 3 * (1728 + 288)


def test_last_layer_only_keeps_keys_and_values_for_every_token():
    shapes = linear_shapes(LLAMA, 1, 3, last_layer_only=True)
    last = shapes[7:]
    assert last == [(1, 4, 4), (3, 4, 2), (3, 4, 2), (1, 4, 4), (1, 4, 8), (1, 4, 8), (1, 8, 4)]
    saved = step_flops(LLAMA, 1, 3, last_layer_only=False) - step_flops(LLAMA, 1, 3, last_layer_only=True)
    # Two of three tokens skip q, o and the MLP (2·(16+16+96) = 256 each) and two attention queries (48 each).
    assert saved == 3 * (2 * 256 + 2 * 48)


def test_bert_pooler_counted_once_per_row():
    shapes = linear_shapes(BERT, 2, 3, last_layer_only=True)
    assert shapes[-1] == (2, 4, 4)
    assert Shape.from_config(
        {"model_type": "bert", "hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6,
         "num_attention_heads": 12}
    ) == Shape(384, 1536, 6, 12, 12, 32, gated_mlp=False, pooler=True)  # fmt: skip
