"""Synthetic preference pairs of exactly L words per side, the same bytes for both frameworks.

chosen = L filler words with k of them replaced by positive lexicon words; rejected = the same L filler
words with the same k positions replaced by negative lexicon words. Every word is one token of the
backbone's tokenizer (word-level vocab for the Llama shapes; single-wordpiece whole words for BERT),
so each side is exactly L tokens plus what the tokenizer/trainer adds (EOS for Llama, CLS/SEP for BERT)
and no pair needs padding.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from bench.harness.assets import SPECIALS, lexicon

SENTIMENT_THRESHOLD = 1.5
"""|valence| a lexicon word needs to count as clearly positive/negative."""


@dataclass(frozen=True)
class WordPools:
    """Words a pair is drawn from: sentiment-free filler, clearly positive, clearly negative."""

    filler: tuple[str, ...]
    positive: tuple[str, ...]
    negative: tuple[str, ...]


def pools_from_vocab(vocab: Iterable[str], *, bert: bool = False) -> WordPools:
    """Split a tokenizer vocabulary into pools (each entry is one whole-word token).

    ``bert=True`` keeps only lowercase ASCII alphabetic whole words of length ≥ 3 (no ``##`` pieces,
    no ``[CLS]``-style specials), so each chosen word is exactly one wordpiece.
    """
    lex = lexicon()
    words = sorted(set(vocab) - set(SPECIALS))
    if bert:
        words = [w for w in words if w.isascii() and w.isalpha() and w.islower() and len(w) >= 3]
    positive = tuple(w for w in words if lex.get(w, 0.0) >= SENTIMENT_THRESHOLD)
    negative = tuple(w for w in words if lex.get(w, 0.0) <= -SENTIMENT_THRESHOLD)
    filler = tuple(w for w in words if w not in lex)
    if min(len(positive), len(negative), len(filler)) < 8:
        raise ValueError(f"vocabulary too small for pairs: {len(filler)}/{len(positive)}/{len(negative)}")
    return WordPools(filler, positive, negative)


def make_pairs(pools: WordPools, n: int, length: int, k: int, *, seed: int) -> list[dict[str, str]]:
    """``n`` pairs ``{"chosen": str, "rejected": str}`` of exactly ``length`` space-separated words."""
    if not 0 < k <= length:
        raise ValueError(f"need 0 < k <= length, got k={k}, length={length}")
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        words = rng.choices(pools.filler, k=length)
        positions = rng.sample(range(length), k)
        chosen, rejected = list(words), list(words)
        for pos in positions:
            chosen[pos] = rng.choice(pools.positive)
            rejected[pos] = rng.choice(pools.negative)
        pairs.append({"chosen": " ".join(chosen), "rejected": " ".join(rejected)})
    return pairs


def write_jsonl(rows: list[dict], path: Path) -> Path:
    """One JSON object per line (UTF-8)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
