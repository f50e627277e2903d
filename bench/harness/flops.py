"""Matmul work of one reward-model training step, counted from the model shape (no torch needed).

Why: on the CPU both frameworks spend most of a step in the same GEMM kernels, so the speedup one
implementation can have over another at equal work is bounded by how much matmul work it avoids and
by how long the unavoidable GEMMs take on the machine. ``linear_shapes`` lists every linear layer's
(rows, in, out) for one forward pass; ``step_flops`` counts forward + backward FLOPs; the ceiling
script (``bench/rm_ceiling.py``) times exactly those GEMMs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """The parts of a transformer classifier that decide its matmul work."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    gated_mlp: bool
    """Llama-style gate/up/down (3 matrices) vs BERT's up/down (2)."""
    pooler: bool
    """BERT's dense pooler on [CLS] before the score head."""

    @classmethod
    def from_config(cls, config: dict) -> Shape:
        """From a ``config.json`` dict (BERT or Llama/Qwen2/Mistral)."""
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        bert = config.get("model_type") == "bert"
        return cls(
            hidden=hidden,
            intermediate=config["intermediate_size"],
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            gated_mlp=not bert,
            pooler=bert,
        )


def layer_linears(shape: Shape, rows_q: int, rows_kv: int) -> list[tuple[int, int, int]]:
    """(rows, in, out) of each linear of one layer when ``rows_q`` positions need outputs and
    ``rows_kv`` positions need keys/values (equal in a full layer; fewer queries in a last-layer-only pass)."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    mlp = (
        [(rows_q, shape.hidden, shape.intermediate)] * (2 if shape.gated_mlp else 1)
        + [(rows_q, shape.intermediate, shape.hidden)]
    )  # fmt: skip
    return [(rows_q, shape.hidden, q), (rows_kv, shape.hidden, kv), (rows_kv, shape.hidden, kv),
            (rows_q, q, shape.hidden), *mlp]  # fmt: skip


def linear_shapes(shape: Shape, rows: int, seq: int, *, last_layer_only: bool) -> list[tuple[int, int, int]]:
    """Every linear (rows, in, out) of one forward over ``rows`` sequences of ``seq`` tokens.

    ``last_layer_only``: the last layer computes queries, attention output and MLP at one scored
    position per row (keys/values still at every position), as trainers/fast_score.py does.
    """
    tokens = rows * seq
    out = []
    for layer in range(shape.layers):
        last = layer == shape.layers - 1
        out += layer_linears(shape, rows if (last and last_layer_only) else tokens, tokens)
    if shape.pooler:
        out.append((rows, shape.hidden, shape.hidden))
    return out


def attention_flops(shape: Shape, rows: int, seq: int, *, last_layer_only: bool) -> int:
    """Forward FLOPs of QKᵀ and AV (full square, as SDPA computes without a causal fast path)."""
    per_query = 2 * 2 * seq * shape.heads * shape.head_dim
    full = rows * seq * per_query
    last = rows * per_query if last_layer_only else full
    return (shape.layers - 1) * full + last


def step_flops(shape: Shape, rows: int, seq: int, *, last_layer_only: bool) -> int:
    """Forward + backward matmul FLOPs of one step: 3× forward (dX and dW each cost a forward)."""
    linear = sum(
        2 * m * k * n for m, k, n in linear_shapes(shape, rows, seq, last_layer_only=last_layer_only)
    )
    return 3 * (linear + attention_flops(shape, rows, seq, last_layer_only=last_layer_only))
