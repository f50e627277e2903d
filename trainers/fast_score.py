"""Sequence scores with the last transformer layer computed only where the score is read.

A ``…ForSequenceClassification`` reward model reads **one** position per sequence: the last non-pad
token for a causal LM (Llama, Qwen2, Mistral: ``GenericForSequenceClassification`` pools the score
head's output there) and the first token, [CLS], for BERT (its pooler reads ``hidden[:, 0]``). Every
other position of the *last* layer's output is computed and thrown away. So, exactly:

* the embeddings and layers ``0 … L−2`` run as usual, through the model's own forward (embeddings,
  rotary tables, attention-mask construction, DynamicCache, hooks): their outputs at *all* positions
  feed the last layer's keys and values;
* in layer ``L−1``, the keys and values are still computed for every position, but the query, the
  attention output, ``o_proj``, the residual adds, the norms and the MLP only for the scored position
  (one query row per sequence, ``(N, heads, 1, d)``). Attention is row-wise: query row *i* attends over
  all keys with row *i* of the mask and nothing else, so its output is the same number whether the
  other rows are computed or not. The mask row is taken from the mask the model built for that layer
  (causal + padding for a decoder, padding for BERT; when the model skipped the mask because there is
  no padding, it is rebuilt: keys ``0 … i`` for a decoder, all keys for BERT). The MLP, the norms and
  the residual are per position;
* then the final norm (decoder) or the pooler (BERT) and the score/classifier head, on that position.

Same parameters and the same operations, in the same order, for every scored position; only the
shapes of some matmuls change, which can change the summation order inside a dot product, i.e. the
last bits (fp32 scores agree to ~1e−7). The gradients are those of the same function (the discarded
positions received exactly zero gradient in the plain forward), so they agree to the same rounding;
as with any reordering, that rounding is magnified where a gradient is a difference of nearly equal
terms (a Bradley–Terry gradient on near-identical chosen/rejected texts), exactly as much as when the
plain forward is given one more pad column. Saved work: the query/output projections and the MLP of
``T − 1`` positions in the last layer, roughly ``1/L`` of the matmul FLOPs (4 layers: 23 % measured
on tiny-128; 6 layers: ≈ 14 %; 30 layers: ≈ 3 %).

How: :func:`last_layer_at_score_position` temporarily sets instance ``forward`` attributes on the last
layer (and, for decoders, on the score head, which gets the one position back broadcast to all ``T``
so the classifier's own pooling indexes it unchanged). The top-level ``model(...)`` call is untouched,
so DDP wrappers, accelerate's autocast wrapper and forward hooks on the trunk behave as before.
Anything not in the verified list below (other architectures, flash/flex attention, a torch.compile'd
or PEFT-wrapped model, modules that already carry an instance ``forward`` such as accelerate's
device-map hooks, no pad token) silently uses the plain forward. With dropout active the computation
is the same in distribution, not bit for bit (dropout masks are drawn for fewer positions); the
reward-model recipe turns dropout off by default. Under gradient checkpointing the (small) fast last
layer is not checkpointed; the other layers are, as before.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

DECODERS: dict[str, tuple[str, str]] = {
    "LlamaForSequenceClassification": ("LlamaDecoderLayer", "LlamaAttention"),
    "Qwen2ForSequenceClassification": ("Qwen2DecoderLayer", "Qwen2Attention"),
    "MistralForSequenceClassification": ("MistralDecoderLayer", "MistralAttention"),
}
"""Classifier class → (decoder layer, attention) classes whose transformers 5.x forwards this mirrors:
pre-norm residual blocks ``h + attn(norm(h))`` then ``h + mlp(norm(h))``, RoPE on q/k, GQA allowed."""
ENCODERS: dict[str, tuple[str, str]] = {"BertForSequenceClassification": ("BertLayer", "BertSelfAttention")}
"""Classifier class → (layer, self-attention) classes of post-norm encoders pooled at position 0."""
ATTENTION = ("sdpa", "eager")
"""Attention implementations whose interface takes a dense (N, 1, 1, T) mask row."""


def unwrap(model: Any) -> Any:
    """The module under DDP / DataParallel wrappers (a torch.compile'd model is left as is: no fast path)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def score_positions(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """(N,) long: the position ``GenericForSequenceClassification`` pools for each row of (N, T) ids.

    The rightmost token that is not ``pad_token_id`` (0 for an all-pad row), the same expression as
    transformers', so ties and pad == EOS behave identically.
    """
    non_pad = (input_ids != pad_token_id).to(torch.int32)
    index = torch.arange(input_ids.shape[-1], device=input_ids.device, dtype=torch.int32)
    return (index * non_pad).argmax(-1)


def family(model: Any) -> str | None:
    """``"decoder"``, ``"encoder"`` or None (use the plain forward) for an unwrapped classifier."""
    name = type(model).__name__
    if not type(model).__module__.startswith("transformers.models.") or name not in DECODERS | ENCODERS:
        return None
    config = model.config
    if getattr(config, "_attn_implementation", None) not in ATTENTION or getattr(config, "num_labels", 0) < 1:
        return None
    if name in DECODERS:
        layers = getattr(getattr(model, "model", None), "layers", None)
        head = getattr(model, "score", None)
        if config.get_text_config().pad_token_id is None or type(head) is not nn.Linear:
            return None
    else:
        trunk = getattr(model, "bert", None)
        layers = getattr(getattr(trunk, "encoder", None), "layer", None)
        if trunk is None or trunk.pooler is None or config.is_decoder or config.add_cross_attention:
            return None
        head = None
    n = config.num_hidden_layers
    if layers is None or not 1 <= n <= len(layers):
        return None
    last = layers[n - 1]
    layer_cls, attention_cls = (DECODERS | ENCODERS)[name]
    attention = last.self_attn if name in DECODERS else last.attention.self
    if type(last).__name__ != layer_cls or type(attention).__name__ != attention_cls:
        return None
    if any("forward" in vars(m) for m in (last, head) if m is not None):  # someone else patched it
        return None
    return "decoder" if name in DECODERS else "encoder"


@contextlib.contextmanager
def last_layer_at_score_position(model: Any, input_ids: torch.Tensor | None) -> Iterator[bool]:
    """Within the block, ``model(input_ids=input_ids, …)`` computes its last layer at the scored position only.

    ``model`` may be DDP-wrapped; call it exactly as before (same ``input_ids``). Yields True when the
    fast path is installed, False when the model is not supported (the block then runs the plain
    forward). The patches are removed on exit, also on an exception.
    """
    base = unwrap(model)
    kind = family(base) if input_ids is not None and input_ids.dim() == 2 else None
    if kind is None:
        yield False
        return
    config = base.config
    n = config.num_hidden_layers
    shape = tuple(input_ids.shape)
    patches: list[tuple[nn.Module, Callable[..., Any]]] = []
    if kind == "decoder":
        last = base.model.layers[n - 1]
        positions = score_positions(input_ids, config.get_text_config().pad_token_id)
        patches.append((last, lambda *a, **k: _decoder_layer_at(last, positions, shape, *a, **k)))
        head = base.score
        patches.append((head, lambda h: type(head).forward(head, h).expand(-1, shape[1], -1)))
    else:
        last = base.bert.encoder.layer[n - 1]
        patches.append((last, lambda *a, **k: _encoder_layer_at_first(last, shape, *a, **k)))
    for module, forward in patches:
        module.forward = forward
    try:
        yield True
    finally:
        for module, _ in patches:
            del module.forward  # back to the class's forward


def sequence_logits(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, score_position_only: bool = True
) -> torch.Tensor:
    """(N, num_labels) logits of a sequence classifier on (N, T) ids; the fast last layer where supported.

    Models with a KV cache get ``use_cache=False`` (as TRL's RewardTrainer passes): otherwise a
    decoder fills a DynamicCache, one K/V copy per layer, that scoring never reads.
    """
    config = getattr(unwrap(model), "config", None)
    extra = {"use_cache": False} if getattr(config, "use_cache", False) else {}
    fast = score_position_only and input_ids is not None
    with last_layer_at_score_position(model, input_ids) if fast else contextlib.nullcontext():
        return model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits


# ----------------------------------------------------------------------------- the last layers


def _decoder_layer_at(
    layer: nn.Module,
    positions: torch.Tensor,
    shape: tuple[int, int],
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    past_key_values: Any = None,
    use_cache: bool | None = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """A Llama-style decoder layer on (N, T, H) input, returning (N, 1, H): its output at ``positions``.

    Mirrors ``LlamaDecoderLayer.forward`` / ``LlamaAttention.forward`` (and Qwen2's, Mistral's) with
    the query side restricted to one row per sequence.
    """
    _check_shape(hidden_states, shape)
    attn = layer.self_attn
    n, t, _ = hidden_states.shape
    rows = torch.arange(n, device=hidden_states.device)
    residual = hidden_states[rows, positions].unsqueeze(1)  # (N, 1, H)
    normed = layer.input_layernorm(hidden_states)  # (N, T, H): every position feeds keys and values
    query = attn.q_proj(normed[rows, positions].unsqueeze(1)).view(n, 1, -1, attn.head_dim).transpose(1, 2)
    key = attn.k_proj(normed).view(n, t, -1, attn.head_dim).transpose(1, 2)  # (N, kv heads, T, d)
    value = attn.v_proj(normed).view(n, t, -1, attn.head_dim).transpose(1, 2)
    cos, sin = position_embeddings  # (1 or N, T, d)
    rotate_half = sys.modules[type(attn).__module__].rotate_half
    cos_q = cos.expand(n, -1, -1)[rows, positions].unsqueeze(1)  # (N, 1, d)
    sin_q = sin.expand(n, -1, -1)[rows, positions].unsqueeze(1)
    query = _rope(query, cos_q, sin_q, rotate_half)
    key = _rope(key, cos, sin, rotate_half)
    if past_key_values is not None:
        key, value = past_key_values.update(key, value, attn.layer_idx)
    mask = _query_row_mask(attention_mask, rows, positions, key.shape[-2], causal=True, eager=_is_eager(attn),
                           dtype=query.dtype)  # fmt: skip
    extra = {}
    if type(attn).__name__ == "Qwen2Attention":
        extra["sliding_window"] = attn.sliding_window
    elif type(attn).__name__ == "MistralAttention":
        extra["sliding_window"] = getattr(attn.config, "sliding_window", None)
    out, _ = _attention_interface(attn)(
        attn,
        query,
        key,
        value,
        mask,
        dropout=0.0 if not attn.training else attn.attention_dropout,
        scaling=attn.scaling,
        position_ids=position_ids,
        use_cache=use_cache,
        **extra,
        **kwargs,
    )
    out = attn.o_proj(out.reshape(n, 1, -1).contiguous())
    hidden = residual + out
    residual = hidden
    hidden = layer.mlp(layer.post_attention_layernorm(hidden))
    return residual + hidden


def _encoder_layer_at_first(
    layer: nn.Module,
    shape: tuple[int, int],
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    past_key_values: Any = None,
    **kwargs: Any,
) -> torch.Tensor:
    """A ``BertLayer`` on (N, T, H) input, returning (N, 1, H): its output at position 0 ([CLS]).

    Mirrors ``BertLayer.forward`` → ``BertAttention`` → ``BertSelfAttention`` (encoder: no cache, no
    cross-attention) and ``feed_forward_chunk`` (chunking only splits positions, so it is skipped).
    """
    _check_shape(hidden_states, shape)
    attn = layer.attention.self
    n, t, _ = hidden_states.shape
    first = hidden_states[:, :1]  # (N, 1, H)
    d = attn.attention_head_size
    query = attn.query(first).view(n, 1, -1, d).transpose(1, 2)  # (N, heads, 1, d)
    key = attn.key(hidden_states).view(n, t, -1, d).transpose(1, 2)
    value = attn.value(hidden_states).view(n, t, -1, d).transpose(1, 2)
    zeros = torch.zeros(n, dtype=torch.long, device=hidden_states.device)
    rows = torch.arange(n, device=hidden_states.device)
    mask = _query_row_mask(
        attention_mask, rows, zeros, t, causal=False, eager=_is_eager(attn), dtype=query.dtype
    )
    out, _ = _attention_interface(attn)(
        attn,
        query,
        key,
        value,
        mask,
        dropout=0.0 if not attn.training else attn.dropout.p,
        scaling=attn.scaling,
        **kwargs,
    )
    attention_output = layer.attention.output(out.reshape(n, 1, -1).contiguous(), first)
    return layer.feed_forward_chunk(attention_output)


# ----------------------------------------------------------------------------- helpers


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotate_half: Callable) -> torch.Tensor:
    """``apply_rotary_pos_emb`` for one tensor: x (N, heads, S, d), cos/sin (N or 1, S, d)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)


def _query_row_mask(
    mask: torch.Tensor | None,
    rows: torch.Tensor,
    positions: torch.Tensor,
    kv_length: int,
    *,
    causal: bool,
    eager: bool,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """The attention mask restricted to query row ``positions[b]`` of each sequence: (N, 1 or heads, 1, K).

    ``mask`` is what the model built for the layer: None (it relies on ``is_causal``, or no padding in
    an encoder) or a 4-D (N or 1, 1 or heads, T or 1, K) boolean (sdpa) or additive float (eager) mask.
    """
    if mask is None:
        if not causal:
            return None
        keys = torch.arange(kv_length, device=positions.device)
        keep = (keys[None, :] <= positions[:, None])[:, None, None, :]  # (N, 1, 1, K)
        if eager:
            return torch.where(keep, torch.zeros((), dtype=dtype, device=keep.device), torch.finfo(dtype).min)
        return keep
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise TypeError(f"unexpected attention mask {type(mask).__name__} for the score-position fast path")
    if mask.shape[-2] == 1:  # the same row for every query (encoder padding mask)
        return mask
    mask = mask.expand(rows.shape[0], *mask.shape[1:])
    return mask[rows, :, positions].unsqueeze(2)


def _attention_interface(attn: nn.Module) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = sys.modules[type(attn).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager)


def _is_eager(attn: nn.Module) -> bool:
    return attn.config._attn_implementation == "eager"


def _check_shape(hidden_states: torch.Tensor, shape: tuple[int, int]) -> None:
    if tuple(hidden_states.shape[:2]) != shape:
        raise ValueError(
            f"the model was called on {tuple(hidden_states.shape[:2])} tokens inside "
            f"last_layer_at_score_position({shape}): call it on the same input_ids"
        )
