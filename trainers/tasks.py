"""Built-in RL tasks (a small GRUE-like suite) and prompt snapshots as tasks, with their rewards.

A :class:`Task` is prompts plus a way to score responses: ``train_prompts`` and ``eval_prompts``
(disjoint), reference texts where the task has them, and :meth:`Task.reward`, which builds the
:class:`trainers.rewards.RewardSource` a recipe trains on — the task's own reward, or any reward
model by :class:`RewardConfig` (``reward: {kind: sequence_rm, path: runs/rm/final}``).

Tasks (all built in code: deterministic, offline, no downloads):

* ``sentiment`` — short review-style openings ("The acting in the sequel") to continue; reward =
  VADER compound of the continuation in [-1, 1] (:class:`trainers.rewards.LexiconReward`), the
  offline stand-in for GRUE's IMDB task (algorithms.md §1.10, whose reward is a DistilBERT
  classifier).
* ``synthetic_translation`` — English → "Lumo", a made-up word-level language: each English word
  has one Lumo word, the article is dropped and the adjective follows the noun ("the red cat
  sleeps" → "miro tasu pelo"). The prompt gives the words' translations and one worked example,
  so a pretrained model can start above zero; reward = sentence BLEU / 100 (sacreBLEU,
  ``effective_order``) of the response's first line against the reference (the toy MT of ESRL's
  CPU demonstration, §3.6).

A studio ``prompts`` snapshot becomes a task with :func:`snapshot_task` (prompts only: its reward
must come from a reward model or VADER, ``reward.kind`` ≠ ``task``).

Splits are pure functions of the prompt text: a prompt is held out by a stable hash (never by the
seed), ``eval_prompts`` are the first ``n_eval`` held-out prompts in a fixed order (the same for
every seed, so runs compare on one set), and ``seed`` only picks and orders ``train_prompts``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from trainers.config import ConfigError, bounded
from trainers.rewards import CallableReward, LexiconReward, Prompt, RewardSource

EVAL_FRACTION = 0.2
"""Share of a built-in task's prompt pool that is held out for evaluation (by hash)."""


# ----------------------------------------------------------------------------- reward config


@dataclass(frozen=True)
class RewardConfig:
    """Which reward an RL recipe optimises (nest it in a recipe config as ``reward``)."""

    kind: Literal["task", "lexicon", "sequence_rm", "segment_rm"] = "task"
    """task: the task's own reward (VADER for sentiment, sentence BLEU for synthetic_translation);
    lexicon: VADER sentiment of the response; sequence_rm / segment_rm: a reward-model checkpoint."""
    path: str | None = None
    """The reward-model folder (``<run>/final`` of the reward_model or segment_reward_model recipe)."""
    normalise: bool | None = None
    """Normalise reward-model scores with the statistics stored in the checkpoint (null: the source's
    default — off for a sequence RM, on for a segment RM)."""
    field: Literal["compound", "pos", "neg", "neu"] = "compound"
    """The VADER score used by the lexicon reward."""
    batch_size: int = bounded(16, ge=1)
    """Responses per reward-model forward pass."""

    def __post_init__(self) -> None:
        from trainers.config import ConfigFieldError

        if self.kind in ("sequence_rm", "segment_rm") and not self.path:
            raise ConfigFieldError("path", f"a {self.kind} reward needs the path of its checkpoint")


def build_reward(
    cfg: RewardConfig,
    tokenizer: Any,
    *,
    task_reward: Callable[[Any, bool], RewardSource] | None = None,
    append_eos: bool = False,
    device: str = "cpu",
) -> RewardSource:
    """The :class:`RewardSource` that ``cfg`` names, aligned to the policy ``tokenizer``'s tokens.

    Args:
        cfg: which reward.
        tokenizer: the policy's (fast) tokenizer.
        task_reward: ``(tokenizer, append_eos) -> RewardSource`` of the task, for ``kind: task``.
        append_eos: rewards also cover one EOS token after the response (see trainers.rewards).
        device: where a reward model runs.
    """
    if cfg.kind == "task":
        if task_reward is None:
            raise ConfigError("<config>", "reward.kind", "these prompts have no built-in reward; "
                              "choose lexicon, sequence_rm or segment_rm")  # fmt: skip
        return task_reward(tokenizer, append_eos)
    if cfg.kind == "lexicon":
        return LexiconReward(tokenizer, field=cfg.field, append_eos=append_eos)
    if cfg.kind == "sequence_rm":
        from trainers.rewards import SequenceRMReward

        return SequenceRMReward(cfg.path, tokenizer, append_eos=append_eos, normalise=bool(cfg.normalise),
                                batch_size=cfg.batch_size, device=device)  # fmt: skip
    from trainers.rewards import SegmentRMReward

    normalise = True if cfg.normalise is None else cfg.normalise
    return SegmentRMReward(cfg.path, tokenizer, append_eos=append_eos, normalise=normalise,
                           batch_size=cfg.batch_size, device=device)  # fmt: skip


# ----------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    """Prompts to train and evaluate on, and the task's reward.

    Attributes:
        name: the task's name (``sentiment``, ``synthetic_translation``, ``snapshot``).
        train_prompts: (N,) prompts (text, or chat messages for snapshots) to sample from.
        eval_prompts: (M,) held-out prompts, disjoint from ``train_prompts``.
        train_references: (N,) reference responses of each training prompt (one or more), or None.
        eval_references: (M,) the held-out prompts' references, or None.
        task_reward: ``(tokenizer, append_eos) -> RewardSource``, the task's own reward; None for
            snapshots.
        stop_at_newline: the task's answers are one line (a recipe may cut responses there).
    """

    name: str
    train_prompts: list[Prompt]
    eval_prompts: list[Prompt]
    train_references: list[list[str]] | None = None
    eval_references: list[list[str]] | None = None
    task_reward: Callable[[Any, bool], RewardSource] | None = field(default=None, repr=False, compare=False)
    stop_at_newline: bool = False

    def reward(
        self,
        tokenizer: Any,
        cfg: RewardConfig | None = None,
        *,
        append_eos: bool = False,
        device: str = "cpu",
    ) -> RewardSource:
        """The reward ``cfg`` names (default: the task's own), see :func:`build_reward`."""
        return build_reward(cfg or RewardConfig(), tokenizer, task_reward=self.task_reward,
                            append_eos=append_eos, device=device)  # fmt: skip


def get_task(name: str, *, seed: int = 0, n_train: int | None = None, n_eval: int | None = None) -> Task:
    """A built-in task by name (see the module doc).

    Args:
        name: ``sentiment`` or ``synthetic_translation``.
        seed: picks and orders the training prompts (evaluation prompts do not depend on it).
        n_train: training prompts (None: the whole training pool).
        n_eval: held-out prompts (None: the whole held-out pool).

    Raises:
        ValueError: an unknown name, or more prompts than the pool holds.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name](seed, n_train, n_eval)


def prompt_key(prompt: Prompt) -> str:
    """sha256 hex of a prompt: its UTF-8 text, or its messages as canonical JSON (the studio's prompt_id)."""
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_held_out(prompt: Prompt, fraction: float) -> bool:
    """Whether a prompt belongs to the held-out side: a pure function of its content."""
    return int(prompt_key(prompt)[:8], 16) / 0x1_0000_0000 < fraction


def split_pool(
    pool: Sequence[Prompt],
    *,
    seed: int,
    n_train: int | None,
    n_eval: int | None,
    fraction: float = EVAL_FRACTION,
) -> tuple[list[int], list[int]]:
    """Indices (train, eval) into ``pool``: held out by hash; eval in pool order, train shuffled by seed."""
    held = [i for i, p in enumerate(pool) if is_held_out(p, fraction)]
    kept = [i for i, p in enumerate(pool) if not is_held_out(p, fraction)]
    random.Random(seed).shuffle(kept)
    for label, want, have in (("n_train", n_train, kept), ("n_eval", n_eval, held)):
        if want is not None and not 0 <= want <= len(have):
            raise ValueError(f"{label}={want}: the pool has {len(have)} such prompts")
    return kept[: len(kept) if n_train is None else n_train], held[: len(held) if n_eval is None else n_eval]


# ----------------------------------------------------------------------------- sentiment

_OPENINGS = (
    "I watched {s} last night and",
    "Honestly, {s} was",
    "My friends told me that {s} would be",
    "The acting in {s}",
    "The ending of {s}",
    "Compared to the book, {s}",
    "I went to see {s} with my family and",
    "The soundtrack of {s}",
    "Critics said that {s} was",
    "{S} is",
    "The first half of {s}",
    "After seeing {s} twice, I think it",
    "The dialogue in {s}",
    "Halfway through {s}, I",
    "The special effects in {s}",
    "What I remember most about {s} is",
)
_SUBJECTS = (
    "this movie",
    "the film",
    "the sequel",
    "this documentary",
    "the new thriller",
    "the animated film",
    "this comedy",
    "the horror movie",
    "the director's latest work",
    "the remake",
    "this romantic drama",
    "the war film",
    "the musical",
    "this low-budget indie film",
    "the superhero movie",
    "the mystery series",
)


def sentiment_pool() -> list[str]:
    """All 256 review openings (16 openings × 16 subjects), in a fixed order."""
    out = []
    for opening in _OPENINGS:
        for subject in _SUBJECTS:
            out.append(opening.format(s=subject, S=subject[0].upper() + subject[1:]))
    return out


def sentiment_task(seed: int, n_train: int | None, n_eval: int | None) -> Task:
    """Continue a review opening; reward = VADER compound of the continuation (GRUE IMDB stand-in)."""
    pool = sentiment_pool()
    train, held = split_pool(pool, seed=seed, n_train=n_train, n_eval=n_eval)

    def reward(tokenizer: Any, append_eos: bool) -> RewardSource:
        return LexiconReward(tokenizer, append_eos=append_eos)

    return Task("sentiment", [pool[i] for i in train], [pool[i] for i in held], task_reward=reward)


# ----------------------------------------------------------------------------- synthetic translation

_ADJECTIVES = (
    "red",
    "big",
    "small",
    "old",
    "young",
    "happy",
    "quiet",
    "green",
    "tall",
    "brave",
    "tired",
    "clever",
)
_NOUNS = ("cat", "dog", "bird", "child", "farmer", "horse", "teacher", "fish", "king", "girl", "boy", "sailor",
          "baker", "wolf", "doctor", "mouse")  # fmt: skip
_VERBS = (
    "sleeps",
    "runs",
    "sings",
    "eats",
    "waits",
    "laughs",
    "swims",
    "reads",
    "dances",
    "works",
    "falls",
    "cries",
)
_SYLLABLES = ("ka", "mi", "ro", "ta", "su", "pe", "lo", "ve", "na", "di", "zu", "fo", "ri", "sa", "mo", "ne", "ku",
              "li", "da", "vo", "te", "pa", "gu", "ni")  # fmt: skip
_LANGUAGE_SEED = 20240308
"""Fixes the Lumo lexicon: the language is the same for every task seed."""


def lumo_lexicon() -> dict[str, str]:
    """English word → Lumo word (two or three syllables, all distinct), fixed forever."""
    rng = random.Random(_LANGUAGE_SEED)
    lexicon: dict[str, str] = {}
    used: set[str] = set()
    for word in (*_ADJECTIVES, *_NOUNS, *_VERBS):
        while True:
            lumo = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3))))
            if lumo not in used:
                break
        used.add(lumo)
        lexicon[word] = lumo
    return lexicon


def translate(sentence: tuple[str, str, str], lexicon: dict[str, str]) -> str:
    """(adjective, noun, verb) → the Lumo sentence: noun, adjective, verb (no article)."""
    adjective, noun, verb = sentence
    return f"{lexicon[noun]} {lexicon[adjective]} {lexicon[verb]}"


def translation_prompt(
    sentence: tuple[str, str, str], example: tuple[str, str, str], lexicon: dict[str, str]
) -> str:
    """The prompt: the sentence's words, one worked example, then the sentence to translate."""
    words = ", ".join(f"{w} = {lexicon[w]}" for w in sentence)
    return (
        f"Translate English to Lumo. Words: {words}.\n"
        f"English: the {' '.join(example)}\nLumo: {translate(example, lexicon)}\n"
        f"English: the {' '.join(sentence)}\nLumo:"
    )


def first_line(response: str) -> str:
    """The answer part of a one-line response: up to the first newline, stripped."""
    return response.split("\n", 1)[0].strip()


def sentence_bleu(hypothesis: str, references: Sequence[str]) -> float:
    """Sentence BLEU in [0, 1] (sacreBLEU with ``effective_order``, /100), as RL4LMs' ``sacre_bleu``."""
    from sacrebleu.metrics import BLEU

    return BLEU(effective_order=True).sentence_score(hypothesis, list(references)).score / 100.0


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU in [0, 100] (sacreBLEU); rows may have different numbers of references."""
    import sacrebleu

    width = max((len(r) for r in references), default=0)
    streams = [[r[k] if k < len(r) else "" for r in references] for k in range(width)]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)


class BleuReward(CallableReward):
    """Sentence BLEU / 100 of a response's first line against the references of its prompt."""

    def __init__(self, references: dict[str, list[str]], tokenizer: Any, *, append_eos: bool = False) -> None:
        def bleu(prompt: Prompt, response: str) -> float:
            key = prompt_key(prompt)
            if key not in self.references:
                raise KeyError(f"no references for the prompt {str(prompt)[:60]!r}")
            return sentence_bleu(first_line(response), self.references[key])

        super().__init__(bleu, tokenizer, append_eos=append_eos)
        self.references = references


def translation_task(seed: int, n_train: int | None, n_eval: int | None) -> Task:
    """English → Lumo with the words given; reward = sentence BLEU / 100 of the first line."""
    lexicon = lumo_lexicon()
    sentences = [(a, n, v) for a in _ADJECTIVES for n in _NOUNS for v in _VERBS]
    order = random.Random(_LANGUAGE_SEED).sample(range(len(sentences)), len(sentences))
    examples = {s: sentences[order[(i + 1) % len(order)]] for i, s in enumerate(sentences[j] for j in order)}
    pool = [translation_prompt(s, examples[s], lexicon) for s in sentences]
    refs = [[translate(s, lexicon)] for s in sentences]
    train, held = split_pool(pool, seed=seed, n_train=n_train, n_eval=n_eval)
    by_key = {prompt_key(pool[i]): refs[i] for i in (*train, *held)}

    def reward(tokenizer: Any, append_eos: bool) -> RewardSource:
        return BleuReward(by_key, tokenizer, append_eos=append_eos)

    return Task("synthetic_translation", [pool[i] for i in train], [pool[i] for i in held],
                [refs[i] for i in train], [refs[i] for i in held], task_reward=reward,
                stop_at_newline=True)  # fmt: skip


TASKS: dict[str, Callable[[int, int | None, int | None], Task]] = {
    "sentiment": sentiment_task,
    "synthetic_translation": translation_task,
}
"""Built-in task name → ``builder(seed, n_train, n_eval)``."""


# ----------------------------------------------------------------------------- prompt snapshots


def prompts_from_snapshot(path: str | Path) -> list[Prompt]:
    """The prompts of a studio ``prompts`` snapshot (JSONL, Parquet or a datasets folder).

    Each row needs ``prompt``: a non-empty string, or chat messages ``[{"role", "content"}, …]``
    (other columns — ``prompt_id``, ``tags``, … — are ignored). Duplicates are kept once, in file order.

    Raises:
        trainers.data.SnapshotError: naming the file, row and column of the first bad row.
    """
    from trainers.data import SnapshotError, read_rows

    out: list[Prompt] = []
    seen: set[str] = set()
    for number, row in enumerate(read_rows(path), start=1):
        if "prompt" not in row:
            raise SnapshotError(path, "missing the prompt column", row=number, column="prompt")
        prompt = row["prompt"]
        if isinstance(prompt, str):
            ok = bool(prompt.strip())
        else:
            ok = isinstance(prompt, list) and bool(prompt) and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in prompt
            )  # fmt: skip
            prompt = [{"role": m["role"], "content": m["content"]} for m in prompt] if ok else prompt
        if not ok:
            raise SnapshotError(path, "a prompt must be non-empty text or a list of {role, content} messages",
                                row=number, column="prompt")  # fmt: skip
        key = prompt_key(prompt)
        if key not in seen:
            seen.add(key)
            out.append(prompt)
    if not out:
        raise SnapshotError(path, "no prompts")
    return out


def snapshot_task(
    path: str | Path, *, eval_snapshot: str | Path | None = None, eval_fraction: float = 0.1, seed: int = 0
) -> Task:
    """A prompts snapshot as a task: held out by hash (or ``eval_snapshot``), training prompts shuffled by seed."""
    prompts = prompts_from_snapshot(path)
    if eval_snapshot is not None:
        train = list(prompts)
        random.Random(seed).shuffle(train)
        return Task("snapshot", train, prompts_from_snapshot(eval_snapshot))
    train_idx, held_idx = split_pool(prompts, seed=seed, n_train=None, n_eval=None, fraction=eval_fraction)
    if not train_idx:
        from trainers.data import SnapshotError

        raise SnapshotError(path, f"no training prompts left after holding out {eval_fraction:.0%}")
    return Task("snapshot", [prompts[i] for i in train_idx], [prompts[i] for i in held_idx])
