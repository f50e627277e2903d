"""Compute accounting: the tokens a run pushes through its models and the FLOPs that costs.

Every policy recipe keeps one :class:`Compute` ledger, writes it as ``compute/…`` metrics with each
training row, in ``studio.json["extra"]["compute"]`` and in its resumable state, so that methods on one
task can be compared by work done (the offline-RLHF paper's "fraction of PPO's compute").

**Convention** (Kaplan et al. 2020, "C ≈ 6·N per trained token"):

* N = the model's **non-embedding parameters** (:func:`non_embedding_params`): every parameter except
  the input embeddings, the output embedding / LM head (tied or not) and position embeddings; norms
  and biases count. For SmolLM2-135M N ≈ 106.2 M of 134.5 M.
* A **forward** pass costs 2·N FLOPs per token position, a **backward** pass 4·N (dX and dW each cost a
  forward). Attention's QKᵀ/AV terms and the LM head are not counted (for SmolLM2 at ≤ 100 tokens the
  attention term is ~2 % of 2·N); both are the same share for every method, so ratios hold.
* Tokens are **real (unpadded) tokens**: padding, and the steps a finished row idles through in a
  batched rollout, are not counted.
* **Generation** with a KV cache is one forward over the prompt (prefill) plus one single-token
  forward per generated token except each row's last, which is never fed back: P + T − rows.
* **Training** a sequence is a forward and a backward over all its tokens (prompt and response: the
  gradient flows through the prompt's activations); no-grad scoring passes (DPO's reference log-probs,
  PPO's reference and critic values) are forwards only. A reward model counts with its own N; a
  lexicon reward (VADER) costs 0 FLOPs.
* **Evaluation is not counted** (every method evaluates the same held-out prompts the same way).

Counters (:data:`COUNTERS`): ``prompt_tokens`` / ``response_tokens`` of trained sequences (a DPO
prompt counts once per side), ``trained_tokens`` (their sum: the tokens that went forward and
backward), ``generated_tokens`` (sampled by the policy), ``forward_tokens`` (every token position of
every forward, in any model), ``forward_flops``, ``backward_flops``, and ``total_flops`` (their sum).

Under DDP each process counts its own work into ``pending``; :meth:`Compute.settle` sums the pending
counts of all processes into the totals once per optimizer step, so every process holds the same totals.

The matmul-shape helpers below (:class:`Shape`, :func:`linear_shapes`, :func:`step_flops`) count the
same 2·(rows·in·out) per linear layer from a ``config.json`` alone (no torch); the benchmark harness
(``bench/harness/flops.py``) re-exports them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

COUNTERS = (
    "prompt_tokens",
    "response_tokens",
    "trained_tokens",
    "generated_tokens",
    "forward_tokens",
    "forward_flops",
    "backward_flops",
)
"""The ledger's counters, in the order they are reported and all-reduced."""


# ----------------------------------------------------------------------------- parameters


def non_embedding_params(model: Any) -> int:
    """N: parameters of ``model`` (a torch module) outside every ``nn.Embedding`` and the output embedding.

    Shared (tied) tensors count once; a PEFT/DDP wrapper is fine as long as ``modules()`` reaches the
    embeddings.
    """
    from torch import nn

    skip: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            skip.update(id(p) for p in module.parameters())
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if head is not None:
        skip.update(id(p) for p in head.parameters())
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def text_tokens(texts: Iterable[Any]) -> tuple[int, int]:
    """``(prompt, response)`` real tokens of encoded sequences (anything with ``ids`` and ``response_mask``).

    Response tokens are those of the response mask; every other token is context (prompt, template,
    conditioning). E.g. one ``EncodedText`` of 7 ids, 3 of them response → (4, 3).
    """
    prompt = response = 0
    for text in texts:
        scored = sum(bool(m) for m in text.response_mask)
        response += scored
        prompt += len(text.ids) - scored
    return prompt, response


# ----------------------------------------------------------------------------- the ledger


@dataclass
class Compute:
    """Token and FLOP counters of a run (see the module doc for what each counts).

    ``params`` is N of the policy (the default for every call); ``totals`` hold the settled counts of
    all processes, ``pending`` this process's counts since the last :meth:`settle`.
    """

    params: int
    totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    pending: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))

    # -- counting (into ``pending``)

    def _add(self, name: str, value: int) -> None:
        self.pending[name] += int(value)

    def forward(self, tokens: int, params: int | None = None) -> None:
        """A forward pass over ``tokens`` token positions of a model with N = ``params`` (default: the policy)."""
        self._add("forward_tokens", tokens)
        self._add("forward_flops", 2 * (self.params if params is None else params) * int(tokens))

    def backward(self, tokens: int, params: int | None = None) -> None:
        """A backward pass over ``tokens`` token positions: 4·N per token."""
        self._add("backward_flops", 4 * (self.params if params is None else params) * int(tokens))

    def train(self, prompt: int, response: int, params: int | None = None) -> None:
        """Sequences trained on (forward + backward over all their tokens): ``prompt`` + ``response`` tokens."""
        self._add("prompt_tokens", prompt)
        self._add("response_tokens", response)
        self._add("trained_tokens", prompt + response)
        self.forward(prompt + response, params)
        self.backward(prompt + response, params)

    def generate(self, prompt: int, generated: int, rows: int, params: int | None = None) -> None:
        """``rows`` responses sampled with a KV cache: ``prompt`` prefill tokens, ``generated`` new tokens
        (each row ≥ 1); forwards over prompt + generated − rows positions."""
        if generated < rows:
            raise ValueError(f"{rows} rows cannot have generated only {generated} tokens")
        self._add("generated_tokens", generated)
        self.forward(prompt + generated - rows, params)

    def merge(self, counts: Mapping[str, int]) -> None:
        """Add counts made elsewhere (e.g. a data stage's ledger, :meth:`as_dict`) to ``pending``."""
        for name in COUNTERS:
            self._add(name, int(counts.get(name, 0)))

    # -- settling, reporting, resuming

    def settle(self, accelerator: Any = None) -> None:
        """Move ``pending`` into ``totals``, summed over processes (one all-reduce when there are several)."""
        values = [self.pending[name] for name in COUNTERS]
        if accelerator is not None and accelerator.num_processes > 1:
            import torch

            summed = accelerator.reduce(
                torch.tensor(values, dtype=torch.int64, device=accelerator.device), "sum"
            )
            values = [int(v) for v in summed.tolist()]
        for name, value in zip(COUNTERS, values, strict=True):
            self.totals[name] += value
        self.pending = dict.fromkeys(COUNTERS, 0)

    def as_dict(self) -> dict[str, int]:
        """The settled totals plus ``total_flops`` and ``params`` (for studio.json and reports)."""
        out = dict(self.totals)
        out["total_flops"] = out["forward_flops"] + out["backward_flops"]
        out["params"] = self.params
        return out

    def metrics(self, prefix: str = "compute/") -> dict[str, float]:
        """``{prefix + counter: value}`` of :meth:`as_dict` for a metrics row."""
        return {prefix + name: float(value) for name, value in self.as_dict().items()}

    def state(self) -> dict[str, int]:
        """What a checkpoint stores (settled totals only)."""
        return dict(self.totals)

    @classmethod
    def from_state(cls, state: Mapping[str, int] | None, params: int) -> Compute:
        """A ledger with N = ``params``, continuing from a checkpoint's :meth:`state` (None: from 0)."""
        ledger = cls(params)
        for name in COUNTERS:
            ledger.totals[name] = int((state or {}).get(name, 0))
        return ledger


def ratio(
    numerator: Mapping[str, float], denominator: Mapping[str, float], key: str = "total_flops"
) -> float | None:
    """``numerator[key] / denominator[key]`` (e.g. an offline run's FLOPs as a fraction of PPO's); None
    when either is missing or the denominator is 0."""
    a, b = numerator.get(key), denominator.get(key)
    if a is None or not b:
        return None
    return float(a) / float(b)


# ----------------------------------------------------------------------------- matmul shapes (no torch)


@dataclass(frozen=True)
class Shape:
    """The parts of a transformer that decide its matmul work."""

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


def matmul_params(shape: Shape) -> int:
    """Weights of the transformer's linear layers (N without norms and biases): Σ in·out of one token's forward."""
    return sum(k * n for _, k, n in linear_shapes(shape, 1, 1, last_layer_only=False))


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
