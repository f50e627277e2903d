"""A built-in synthetic preference task with a known ground-truth reward: VADER lexicon valence.

Each response is ``response_words`` words: with probability ``sentiment_rate`` a word from a fixed
sample of strongly positive or negative VADER lexicon words, else a neutral filler noun. The
ground-truth reward of a text is the **mean VADER valence of its words** (words outside the lexicon
count 0), so the reward is known exactly and a reward model can be scored against it. Each pair shares a
neutral prompt; chosen is the response with the higher true reward and the gap is at least
``min_gap`` (so the oracle's accuracy is 100 %, minus ``label_noise``).

Everything is a pure function of the seed: the same seed writes byte-identical snapshots. The lexicon is
read from the ``vaderSentiment`` wheel's data file (MIT licence) without importing the package.

    python -m trainers.synthetic OUT_DIR --train 2000 --eval 400 --seed 0   # writes train.jsonl, eval.jsonl
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

_FILLER_TEXT = (
    "table river window garden letter pencil kitchen bottle market station ticket village corner paper engine "
    "bridge valley button cable circle desk door field floor forest glass hill island jacket lamp lane meadow "
    "mirror motor orange pocket rail road roof room sand shelf shirt shoe square stair stone street string tower "
    "train tree wall water wheel wire yard basket blanket bucket candle carpet chair clock coat cup drawer fence "
    "folder hammer helmet kettle ladder needle oven pillow plate rope saucer spoon stove tent towel wagon"
)
FILLER_WORDS = tuple(_FILLER_TEXT.split())
"""Neutral nouns (none is in the VADER lexicon), used as fillers and prompt topics."""

_WORD = re.compile(r"[a-z]{3,10}")


@functools.cache
def vader_lexicon() -> dict[str, float]:
    """``{token: mean valence}`` from ``vader_lexicon.txt`` (7.5 k entries, valence in [-4, 4])."""
    spec = importlib.util.find_spec("vaderSentiment")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise RuntimeError("the vaderSentiment package (a Feedback Studio dependency) is not installed")
    lexicon = {}
    for line in (Path(locations[0]) / "vader_lexicon.txt").read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            lexicon[parts[0]] = float(parts[1])
    return lexicon


def true_reward(text: str) -> float:
    """Ground truth: the mean VADER valence of the whitespace-separated words (punctuation stripped)."""
    lexicon = vader_lexicon()
    words = [w.strip(".,;:!?\"'()").lower() for w in text.split()]
    words = [w for w in words if w]
    return sum(lexicon.get(w, 0.0) for w in words) / max(len(words), 1)


@dataclass(frozen=True)
class SyntheticTask:
    """Sizes and knobs of the task; the defaults are what the tests and the 90 % check use."""

    seed: int = 0
    """Seeds the vocabulary sample and the pairs."""
    sentiment_words: int = 80
    """How many lexicon words are in play (half positive, half negative), drawn from strong entries."""
    min_valence: float = 1.5
    """Only lexicon words with |valence| at least this are drawn."""
    response_words: int = 8
    """Words per response (all responses have the same length, so length carries no signal)."""
    sentiment_rate: float = 0.35
    """Probability that a response word is a sentiment word rather than a filler."""
    min_gap: float = 0.4
    """Smallest true-reward gap between chosen and rejected."""
    label_noise: float = 0.0
    """Probability of swapping chosen and rejected (annotator noise)."""
    conversational: bool = False
    """Write prompt/chosen/rejected as chat messages instead of strings."""
    with_margin: bool = False
    """Add a ``margin`` column equal to the true reward gap."""

    @functools.cached_property
    def vocabulary(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``(positive, negative)`` lexicon words in play, a pure function of the seed."""
        lexicon = vader_lexicon()
        strong = sorted(w for w, v in lexicon.items() if _WORD.fullmatch(w) and abs(v) >= self.min_valence)
        rng = random.Random(f"vocabulary-{self.seed}")
        half = self.sentiment_words // 2
        positive = rng.sample([w for w in strong if lexicon[w] > 0], half)
        negative = rng.sample([w for w in strong if lexicon[w] < 0], self.sentiment_words - half)
        return tuple(positive), tuple(negative)

    def response(self, rng: random.Random) -> str:
        positive, negative = self.vocabulary
        words = []
        for _ in range(self.response_words):
            if rng.random() < self.sentiment_rate:
                words.append(rng.choice(positive if rng.random() < 0.5 else negative))
            else:
                words.append(rng.choice(FILLER_WORDS))
        return " ".join(words)

    def pairs(self, n: int, split: str) -> list[dict]:
        """``n`` rows in TRL's explicit-prompt columns plus ``chosen_reward``/``rejected_reward``."""
        rng = random.Random(f"{split}-{self.seed}")
        rows = []
        while len(rows) < n:
            topic = rng.choice(FILLER_WORDS)
            a, b = self.response(rng), self.response(rng)
            ra, rb = true_reward(a), true_reward(b)
            if abs(ra - rb) < self.min_gap:
                continue
            (chosen, rc), (rejected, rr) = sorted([(a, ra), (b, rb)], key=lambda item: -item[1])
            if rng.random() < self.label_noise:
                (chosen, rc), (rejected, rr) = (rejected, rr), (chosen, rc)
            prompt = f"Write a short review of the {topic}."
            row: dict = (
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
                if self.conversational
                else {"prompt": prompt + "\n", "chosen": chosen, "rejected": rejected}
            )
            if self.with_margin:
                row["margin"] = round(abs(rc - rr), 6)
            row.update(chosen_reward=rc, rejected_reward=rr)
            rows.append(row)
        return rows


@dataclass(frozen=True)
class SyntheticSnapshot:
    """Paths of the written train and held-out snapshots."""

    train: Path
    eval: Path


def write_synthetic_snapshot(
    folder: str | Path, *, n_train: int, n_eval: int, task: SyntheticTask | None = None
) -> SyntheticSnapshot:
    """Write ``train.jsonl`` and ``eval.jsonl`` (TRL preference columns) into ``folder``."""
    task = task or SyntheticTask()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = SyntheticSnapshot(folder / "train.jsonl", folder / "eval.jsonl")
    for path, n, split in ((paths.train, n_train, "train"), (paths.eval, n_eval, "eval")):
        with path.open("w", encoding="utf-8") as handle:
            for row in task.pairs(n, split):
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainers.synthetic", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("folder")
    parser.add_argument("--train", type=int, default=2000, help="training pairs (default 2000)")
    parser.add_argument("--eval", type=int, default=400, help="held-out pairs (default 400)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--conversational", action="store_true")
    parser.add_argument("--margin", action="store_true", help="add a margin column (the true reward gap)")
    parser.add_argument("--label-noise", type=float, default=0.0)
    args = parser.parse_args(argv)
    task = SyntheticTask(
        seed=args.seed,
        conversational=args.conversational,
        with_margin=args.margin,
        label_noise=args.label_noise,
    )
    paths = write_synthetic_snapshot(args.folder, n_train=args.train, n_eval=args.eval, task=task)
    print(f"{paths.train}\n{paths.eval}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
