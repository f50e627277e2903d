"""Built-in RL tasks and prompt snapshots: deterministic disjoint splits, rewards, references, errors."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from trainers.config import ConfigError, config_from_dict
from trainers.data import SnapshotError
from trainers.rewards import LexiconReward, RewardSource
from trainers.tasks import (
    RewardConfig,
    corpus_bleu,
    first_line,
    get_task,
    lumo_lexicon,
    prompt_key,
    prompts_from_snapshot,
    sentence_bleu,
    sentiment_pool,
    snapshot_task,
    translate,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize("name", ["sentiment", "synthetic_translation"])
def test_splits_are_disjoint_deterministic_and_eval_ignores_the_seed(name) -> None:
    a = get_task(name, seed=0, n_train=40, n_eval=10)
    again = get_task(name, seed=0, n_train=40, n_eval=10)
    other = get_task(name, seed=1, n_train=40, n_eval=10)
    assert a == again  # same seed: the same prompts in the same order (the reward builder is not compared)
    assert len(a.train_prompts) == 40 and len(a.eval_prompts) == 10
    assert not set(a.train_prompts) & set(a.eval_prompts)
    assert a.eval_prompts == other.eval_prompts  # one held-out set for every seed
    assert a.train_prompts != other.train_prompts  # the seed picks and orders training prompts
    full = get_task(name)
    assert not set(full.train_prompts) & set(full.eval_prompts)
    assert len(set(full.train_prompts)) == len(full.train_prompts)
    with pytest.raises(ValueError, match="n_train=100000"):
        get_task(name, n_train=100_000)


def test_unknown_task_is_refused() -> None:
    with pytest.raises(ValueError, match="built-in tasks: sentiment, synthetic_translation"):
        get_task("imdb")


def test_sentiment_prompts_are_review_openings_and_the_reward_is_vader_of_the_continuation(tokenizer) -> None:
    pool = sentiment_pool()
    assert len(pool) == len(set(pool)) == 256
    assert "The acting in the sequel" in pool and "This comedy is" in pool
    task = get_task("sentiment", n_eval=5)
    assert task.train_references is None and task.eval_references is None and not task.stop_at_newline
    reward = task.reward(tokenizer)
    assert isinstance(reward, LexiconReward) and isinstance(reward, RewardSource)
    good, bad, neutral = reward.score(
        [task.eval_prompts[0]] * 3, [" a wonderful, great film", " awful and boring", ""]
    )
    assert good.total > 0.5 and bad.total < -0.5 and neutral.total == 0.0
    assert good.rewards[-1] == good.total and sum(good.rewards) == good.total  # at the last token


def test_lumo_is_fixed_one_to_one_and_reorders_adjective_and_noun() -> None:
    lexicon = lumo_lexicon()
    assert lexicon == lumo_lexicon() and len(set(lexicon.values())) == len(lexicon)
    assert (
        translate(("red", "cat", "sleeps"), lexicon)
        == f"{lexicon['cat']} {lexicon['red']} {lexicon['sleeps']}"
    )


def test_translation_prompts_give_the_words_and_one_example_and_bleu_rewards_the_reference(tokenizer) -> None:
    task = get_task("synthetic_translation", seed=0, n_train=20, n_eval=8)
    assert task.stop_at_newline and len(task.eval_references) == 8 and len(task.train_references) == 20
    prompt, (reference,) = task.eval_prompts[0], task.eval_references[0]
    assert prompt.startswith("Translate English to Lumo. Words: ") and prompt.endswith("\nLumo:")
    assert all(word in prompt for word in reference.split())  # every target word is given in the prompt
    reward = task.reward(tokenizer)
    exact, wrong, cut = reward.score(
        [prompt] * 3, [f" {reference}\nEnglish: more", " nothing alike", f" {reference} x"]
    )
    assert exact.total == pytest.approx(1.0) and wrong.total == 0.0 and 0 < cut.total < 1
    # train prompts are scored against their own references too
    first = reward.score([task.train_prompts[0]], [" " + task.train_references[0][0]])[0]
    assert first.total == pytest.approx(1.0)
    with pytest.raises(KeyError, match="no references"):
        reward.score(["an unknown prompt"], ["x"])


def test_bleu_helpers_hand_values() -> None:
    assert first_line("  a b c \n d e") == "a b c"
    assert sentence_bleu("a b c d", ["a b c d"]) == pytest.approx(1.0)
    assert sentence_bleu("x y", ["a b c d"]) == 0.0
    # corpus BLEU pads missing references: a row with one reference among rows with two still scores
    assert corpus_bleu(["a b c d", "e f g h"], [["a b c d"], ["x", "e f g h"]]) == pytest.approx(100.0)


def test_reward_config_picks_the_source(tokenizer) -> None:
    task = get_task("synthetic_translation", n_train=4, n_eval=2)
    vader = task.reward(tokenizer, RewardConfig(kind="lexicon", field="pos"), append_eos=True)
    scored = vader.score([task.eval_prompts[0]], ["great"])[0]
    assert (
        isinstance(vader, LexiconReward)
        and scored.token_ids[-1] == tokenizer.eos_token_id
        and scored.total > 0
    )
    with pytest.raises(ConfigError, match="path"):
        config_from_dict(RewardConfig, {"kind": "sequence_rm"})
    with pytest.raises(OSError):
        task.reward(tokenizer, RewardConfig(kind="sequence_rm", path="/nonexistent/rm"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_prompts_snapshot_reads_text_and_chat_prompts_once_each(tmp_path, tokenizer) -> None:
    chat = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Review this café."}]
    rows = [{"prompt": "Tell me about the sea.", "prompt_id": "x", "tags": ["a"], "snapshot_id": "s"},
            {"prompt": chat, "external_id": None}, {"prompt": "Tell me about the sea."}]  # fmt: skip
    prompts = prompts_from_snapshot(write_jsonl(tmp_path / "prompts.jsonl", rows))
    assert prompts == ["Tell me about the sea.", chat]
    assert prompt_key(chat) == prompt_key([dict(reversed(list(m.items()))) for m in chat])  # canonical JSON

    many = write_jsonl(tmp_path / "many.jsonl", [{"prompt": f"Prompt number {i}"} for i in range(200)])
    task = snapshot_task(many, eval_fraction=0.2, seed=1)
    assert task.name == "snapshot" and task.task_reward is None
    assert 20 < len(task.eval_prompts) < 60 and len(task.train_prompts) + len(task.eval_prompts) == 200
    assert snapshot_task(many, eval_fraction=0.2, seed=2).eval_prompts == task.eval_prompts
    with pytest.raises(ConfigError, match="no built-in reward"):
        task.reward(tokenizer)
    assert isinstance(task.reward(tokenizer, RewardConfig(kind="lexicon")), LexiconReward)
    held = snapshot_task(many, eval_snapshot=write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "Held out."}]))
    assert held.eval_prompts == ["Held out."] and len(held.train_prompts) == 200


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"text": "no prompt column"}, "missing the prompt column"),
        ({"prompt": "   "}, "non-empty text"),
        ({"prompt": [{"role": "user"}]}, "role, content"),
        ({"prompt": 3}, "non-empty text"),
    ],
)
def test_bad_prompt_rows_name_the_row(tmp_path, row, problem) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, row])
    with pytest.raises(SnapshotError, match=f"row 2.*{problem}"):
        prompts_from_snapshot(path)
    with pytest.raises(SnapshotError, match="no prompts"):
        prompts_from_snapshot(write_jsonl(tmp_path / "empty.jsonl", []))
