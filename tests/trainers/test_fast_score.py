"""The score-position-only last layer (trainers.fast_score) equals the plain forward: scores, gradients, training."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizer,
    GPT2Config,
    GPT2ForSequenceClassification,
    MistralConfig,
    MistralForSequenceClassification,
    Qwen2Config,
    Qwen2ForSequenceClassification,
)

from trainers import fast_score
from trainers.config import OptimConfig
from trainers.fast_score import last_layer_at_score_position, score_positions, sequence_logits
from trainers.losses import bradley_terry_loss
from trainers.recipes.reward_model import RewardModelConfig, train
from trainers.synthetic import write_synthetic_snapshot

TEXTS = [
    "The answer is short.",
    "A much longer response that goes on for a while, explaining the reasoning step by step in detail.",
    "ok",
    "Medium length reply with some words in it.",
    "Another long completion, with commas, numbers like 42 and 7, and a final sentence at the end.",
    "Two words",
]  # 6 rows = 3 chosen + 3 rejected, right-padded to the longest


def llama(tiny_model: Path, attn: str):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model, num_labels=1, dtype=torch.float32, attn_implementation=attn
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.padding_side = "right"
    model.config.pad_token_id = tokenizer.pad_token_id
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    return model, batch["input_ids"], batch["attention_mask"]


def small_decoder(kind: str, attn: str):
    """A random 3-layer Qwen2 / Mistral classifier with grouped-query attention (4 heads, 2 KV heads)."""
    shape = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, pad_token_id=0, num_labels=1, attn_implementation=attn)  # fmt: skip
    torch.manual_seed(1)
    if kind == "qwen2":
        return Qwen2ForSequenceClassification(Qwen2Config(**shape))
    return MistralForSequenceClassification(MistralConfig(**shape))


def bert(attn: str):
    torch.manual_seed(2)
    config = BertConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                        num_attention_heads=4, num_labels=1, attn_implementation=attn)  # fmt: skip
    model = BertForSequenceClassification(config)
    for module in model.modules():  # as the recipe does: dropout off
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def random_batch(lengths: list[int], *, pad: int = 0, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (N, max(lengths)) ids in 1..96 and their mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (len(lengths), max(lengths)), generator=generator)
    mask = torch.ones_like(ids)
    for row, length in enumerate(lengths):
        ids[row, length:], mask[row, length:] = pad, 0
    return ids, mask


def scores_and_grads(model, ids, mask, *, fast: bool):
    """Scores (N,) and every parameter's gradient of a Bradley–Terry loss over the rows' two halves."""
    model.zero_grad(set_to_none=True)
    scores = sequence_logits(model, ids, mask, score_position_only=fast).squeeze(-1)
    chosen, rejected = scores.chunk(2)
    loss, _ = bradley_terry_loss(chosen, rejected, torch.full_like(chosen, 0.1))
    (loss * 100).backward()  # a loss near ln 2 has small gradients; the comparison is relative anyway
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return scores.detach(), grads


def assert_same(model, ids, mask) -> None:
    """The fast path is taken, and its scores and gradients equal the plain forward's."""
    with last_layer_at_score_position(model, ids) as installed:
        assert installed
    plain_scores, plain_grads = scores_and_grads(model, ids, mask, fast=False)
    fast_scores, fast_grads = scores_and_grads(model, ids, mask, fast=True)
    torch.testing.assert_close(fast_scores, plain_scores, rtol=0, atol=1e-5)
    assert fast_grads.keys() == plain_grads.keys()
    assert len(plain_grads) == len(list(model.parameters()))  # every parameter is used either way
    # Relative per parameter, with a floor at 1e-7 of the whole gradient: a key bias's gradient is 0 in exact
    # arithmetic (it adds the same q·b to every score of a row), so both sides hold only rounding noise there.
    floor = 1e-7 * torch.stack([g.norm() for g in plain_grads.values()]).norm()
    for name, plain in plain_grads.items():
        error = (fast_grads[name] - plain).norm()
        assert error <= 1e-5 * plain.norm() + floor, (name, float(error), float(plain.norm()), float(floor))
    assert not any("forward" in vars(m) for m in model.modules())  # the patches are gone


# ----------------------------------------------------------------------------- equality with the plain forward


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llama_scores_and_gradients_equal_the_full_forward(tiny_model, attn):
    model, ids, mask = llama(tiny_model, attn)
    lengths = mask.sum(1).tolist()
    assert len(set(lengths)) >= 4 and min(lengths) < ids.shape[1]  # really right-padded, varied lengths
    assert_same(model, ids, mask)
    model.eval()
    with torch.no_grad():  # evaluation path
        torch.testing.assert_close(sequence_logits(model, ids, mask),
                                   sequence_logits(model, ids, mask, score_position_only=False),
                                   rtol=0, atol=1e-5)  # fmt: skip


def test_llama_without_padding_uses_the_causal_row_it_rebuilds(tiny_model):
    model, ids, mask = llama(tiny_model, "sdpa")
    length = int(mask.sum(1).min())
    ids = ids[:, :length]  # no padding: sdpa skips the mask (is_causal); the fast path rebuilds row i
    assert_same(model, ids, torch.ones_like(ids))


def test_llama_scored_position_is_the_classifier_pooling_position(tiny_model):
    model, ids, mask = llama(tiny_model, "sdpa")
    pad = model.config.pad_token_id
    ids = ids.clone()
    ids[0, 2] = (
        pad  # a pad id inside a sequence (pad == EOS here) is skipped only at the end, like transformers
    )
    positions = score_positions(ids, pad)
    assert positions.tolist() == [int((row != pad).nonzero().max()) for row in ids]
    assert_same(model, ids, mask)


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_grouped_query_decoders_equal_the_full_forward(kind, attn):
    model = small_decoder(kind, attn)
    assert_same(model, *random_batch([9, 4, 12, 1, 7, 12]))
    assert_same(model, *random_batch([10] * 4))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bert_cls_scores_and_gradients_equal_the_full_forward(attn):
    model = bert(attn)
    assert_same(model, *random_batch([9, 4, 12, 2, 7, 12]))
    assert_same(model, *random_batch([8] * 4))  # no padding: no mask at all


def test_a_ddp_style_wrapper_is_unwrapped():
    model = small_decoder("qwen2", "sdpa")
    wrapper = torch.nn.Module()
    ids, mask = random_batch([5, 3])
    assert fast_score.unwrap(wrapper) is wrapper
    wrapped = torch.nn.DataParallel(model)  # no GPUs: calls the module directly
    with last_layer_at_score_position(wrapped, ids) as installed:
        assert installed
        fast = wrapped(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(fast, model(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- fallbacks and safety


def test_unsupported_models_use_the_plain_forward():
    torch.manual_seed(0)
    gpt2 = GPT2ForSequenceClassification(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2, num_labels=1,
                                                     pad_token_id=0)).eval()  # fmt: skip
    ids, mask = random_batch([5, 3])
    with last_layer_at_score_position(gpt2, ids) as installed:
        assert not installed
    assert torch.equal(
        sequence_logits(gpt2, ids, mask), sequence_logits(gpt2, ids, mask, score_position_only=False)
    )
    no_pad = small_decoder("qwen2", "sdpa")
    no_pad.config.pad_token_id = None
    assert fast_score.family(no_pad) is None
    assert fast_score.family(small_decoder("qwen2", "flex_attention")) is None


def test_patches_are_removed_after_an_error_and_a_wrong_input_is_refused():
    model = bert("sdpa")
    ids, mask = random_batch([6, 4])
    with pytest.raises(ValueError, match="same input_ids"), last_layer_at_score_position(model, ids):
        model(input_ids=ids[:, :5], attention_mask=mask[:, :5])
    assert not any("forward" in vars(m) for m in model.modules())


def test_the_trunk_is_still_called_once_with_the_full_batch():
    """The benchmark counts work with a forward pre-hook on the trunk: it must see the same call."""
    model = small_decoder("mistral", "sdpa")
    ids, mask = random_batch([7, 3, 5, 7])
    seen = []
    model.model.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True
    )
    sequence_logits(model, ids, mask)
    assert len(seen) == 1
    args, kwargs = seen[0]
    assert torch.equal(args[0], ids) and torch.equal(kwargs["attention_mask"], mask)
    assert kwargs["use_cache"] is False  # no DynamicCache of every layer's K/V (TRL passes it too)


# ----------------------------------------------------------------------------- through the recipe


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    return write_synthetic_snapshot(tmp_path_factory.mktemp("synthetic"), n_train=48, n_eval=16)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, snapshot) -> Path:
    """A random 2-layer BERT classifier backbone with a character-level WordPiece vocabulary."""
    folder = tmp_path_factory.mktemp("models") / "tiny-bert"
    folder.mkdir(parents=True, exist_ok=True)
    text = snapshot.train.read_text(encoding="utf-8").lower()
    chars = sorted({c for c in text if not c.isspace()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    tokenizer = BertTokenizer(vocab={piece: i for i, piece in enumerate(vocab)})
    assert tokenizer.tokenize("ab") == ["a", "##b"]
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=512, pad_token_id=0, num_labels=1)  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def moved_apart(a: dict, b: dict, start: dict) -> float:
    """‖a − b‖ / ‖b − start‖ over all trained parameters of two final checkpoints (the score head excluded)."""
    names = [name for name in b if name in start]
    apart = torch.stack([(a[name] - b[name]).norm() for name in names]).norm()
    moved = torch.stack([(b[name] - start[name]).norm() for name in names]).norm()
    assert moved > 0  # the weights really trained
    return float(apart / moved)


@pytest.mark.parametrize("backbone", ["llama", "bert"])
def test_training_with_the_fast_last_layer_equals_training_without(tmp_path, tiny_model, tiny_bert, snapshot,
                                                                   backbone, monkeypatch):  # fmt: skip
    """Four AdamW steps with the option on and off end at the same weights.

    Not bit for bit: the fast path rounds differently in the last bits, and on these near-identical
    chosen/rejected pairs the Bradley–Terry gradient is a difference of nearly equal terms, which
    magnifies that (the plain forward alone moves as much when one pad column is added). So the
    check is relative to how far training moved the weights, with a control: a 5 % larger learning
    rate must land measurably further away.
    """
    calls = {"decoder": 0, "encoder": 0}
    for name, kind in (("_decoder_layer_at", "decoder"), ("_encoder_layer_at_first", "encoder")):
        original = getattr(fast_score, name)

        def counted(*args, _original=original, _kind=kind, **kwargs):
            calls[_kind] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(fast_score, name, counted)
    kind = "decoder" if backbone == "llama" else "encoder"
    base = RewardModelConfig(
        snapshot=str(snapshot.train),
        eval_snapshot=str(snapshot.eval),
        output_dir="",
        model=str(tiny_model if backbone == "llama" else tiny_bert),
        max_length=48,
        batch_size=4,
        max_steps=4,
        optim=OptimConfig(lr=3e-3, schedule="constant"),
        progress=False,
        cpu=True,
    )
    fast = train(dataclasses.replace(base, output_dir=str(tmp_path / "fast")))
    assert calls[kind] == 4 + 1  # 4 steps + one held-out batch of 16 pairs: the fast path ran every time
    plain = train(
        dataclasses.replace(base, output_dir=str(tmp_path / "plain"), score_position_only_last_layer=False)
    )
    other = train(dataclasses.replace(base, output_dir=str(tmp_path / "other"), score_position_only_last_layer=False,
                                      optim=dataclasses.replace(base.optim, lr=3.15e-3)))  # fmt: skip
    assert calls[kind] == 4 + 1  # ... and never when switched off
    weights = [load_file(r.final_checkpoint / "model.safetensors") for r in (fast, plain, other)]
    start = load_file(next(Path(base.model).glob("*.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert moved_apart(weights[0], weights[1], start) < 3e-3  # measured: Llama 4e-6, BERT 5e-4
    assert moved_apart(weights[2], weights[1], start) > 1e-2  # the control (≈ 0.05): the check can fail
    for key in ("eval/accuracy", "eval/loss"):
        assert fast.metrics[key] == pytest.approx(plain.metrics[key], abs=1e-5)
