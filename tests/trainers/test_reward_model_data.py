"""Snapshot readers, rendering, tokenisation, PreferenceBatch collation, spans and the synthetic task."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from trainers.data import (
    SnapshotError,
    StepSampler,
    collate,
    encode_pairs,
    encode_span_examples,
    encode_texts,
    extract_prompt,
    is_held_out,
    read_preferences,
    read_span_examples,
    render,
    snapshot_sha256,
    span_token_mask,
    split_pairs,
)
from trainers.synthetic import SyntheticTask, true_reward, vader_lexicon, write_synthetic_snapshot

ROWS = [
    {"prompt": "Q: sky?\n", "chosen": "blue", "rejected": "green", "margin": 1.5, "rater": "x"},
    {"prompt": "Q: sea?\n", "chosen": "wet and calm", "rejected": "dry", "margin": None},
    {"chosen": "Hi there friend", "rejected": "Hi there enemy"},
    {
        "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}],
    },
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.truncation_side = "left"
    return tokenizer


def test_jsonl_parquet_and_datasets_folder_read_the_same_pairs(tmp_path):
    import datasets

    rows = ROWS[:3]  # one format per file, as TRL requires within a dataset
    jsonl = write_jsonl(tmp_path / "p.jsonl", rows)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "hfdict"))
    expected = read_preferences(jsonl)
    for path in (tmp_path / "p.parquet", tmp_path / "hf", tmp_path / "hfdict"):
        assert read_preferences(path) == expected
    assert [p.margin for p in expected] == [1.5, 0.0, 0.0]
    assert (expected[0].prompt, expected[0].chosen, expected[0].rejected) == ("Q: sky?\n", "blue", "green")
    # implicit prompt: the common prefix, with the space kept on the completion side (TRL's rule)
    assert (expected[2].prompt, expected[2].chosen, expected[2].rejected) == ("Hi there", " friend", " enemy")
    assert snapshot_sha256(jsonl) == snapshot_sha256(jsonl) and len(snapshot_sha256(tmp_path / "hf")) == 64


def test_conversational_implicit_prompt_is_extracted_per_message():
    prompt, chosen, rejected = extract_prompt(ROWS[3]["chosen"], ROWS[3]["rejected"])
    assert prompt == [{"role": "user", "content": "Hi"}]
    assert chosen == [{"role": "assistant", "content": "Hello!"}]
    assert rejected == [{"role": "assistant", "content": "Go away."}]


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ({"chosen": "a"}, "row 1, column 'rejected': missing value"),
        ({"chosen": "a", "rejected": 3}, "row 1, column 'rejected': expected a string or a list"),
        ({"chosen": "a", "rejected": [{"role": "user"}]}, "column 'rejected': expected a string or a list"),
        ({"chosen": "a", "rejected": [{"role": "user", "content": "b"}]}, "both be strings or both"),
        (
            {"chosen": "a", "rejected": "b", "margin": "big"},
            "column 'margin': margin must be a finite number",
        ),
        ({"chosen": "a", "rejected": "b", "margin": float("inf")}, "margin must be a finite number"),
    ],
)
def test_bad_rows_are_named(tmp_path, row, words):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(SnapshotError, match=words.replace("(", r"\(")) as info:
        read_preferences(path)
    assert str(path) in str(info.value)


def test_unreadable_files_are_named(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"chosen": "a", "rejected": "b"}\nnot json\n')
    with pytest.raises(SnapshotError, match="row 2: invalid JSON"):
        read_preferences(tmp_path / "x.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SnapshotError, match="no rows"):
        read_preferences(tmp_path / "empty.jsonl")
    with pytest.raises(SnapshotError, match="no such file"):
        read_preferences(tmp_path / "missing.jsonl")
    (tmp_path / "x.parquet").write_text("nope")
    with pytest.raises(SnapshotError, match="not a readable Parquet file"):
        read_preferences(tmp_path / "x.parquet")


def test_held_out_split_depends_only_on_the_pair(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(400)]
    pairs = read_preferences(write_jsonl(tmp_path / "a.jsonl", rows))
    train, held = split_pairs(pairs, 0.2)
    assert 50 < len(held) < 110 and len(train) + len(held) == 400
    shuffled = read_preferences(write_jsonl(tmp_path / "b.jsonl", rows[::-1][:300]))
    _, held_again = split_pairs(shuffled, 0.2)
    assert {p.key for p in held_again} == {p.key for p in held if p.key in {q.key for q in shuffled}}
    assert not any(is_held_out(p.key, 0.0) for p in pairs)
    assert all(is_held_out(p.key, 1.0) for p in pairs)


def test_render_standard_chat_template_and_plain_fallback(tok):
    text = render(tok, "Q?\n", "yes")
    assert (text.text, text.response_start, text.templated) == ("Q?\nyes", 3, False)
    chat = render(tok, [{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Hello!"}])
    assert chat.templated and chat.text.startswith("<|im_start|>user\nHi<|im_end|>")
    assert chat.text[chat.response_start :] == "Hello!<|im_end|>\n"
    template = tok.chat_template
    try:
        tok.chat_template = None
        plain = render(tok, [{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Hello!"}])
    finally:
        tok.chat_template = template
    assert (plain.text, plain.response_start, plain.templated) == ("user: Hi\nassistant: Hello!", 9, False)


def test_encoding_masks_the_response_and_truncates_on_the_left(tok):
    pairs = read_preferences_from_rows(ROWS)
    encoded = encode_pairs(tok, pairs, max_length=64)
    first = encoded[0].chosen
    response = [i for i, m in zip(first.ids, first.response_mask, strict=True) if m]
    assert tok.decode(response) == "blue" and not first.truncated
    chat = encoded[3].rejected
    assert (
        tok.decode([i for i, m in zip(chat.ids, chat.response_mask, strict=True) if m])
        == "Go away.<|im_end|>\n"
    )
    assert tok.decode(chat.ids).startswith("<|im_start|>user")  # no special tokens added twice
    long = render(tok, "a " * 50, "the end")
    (cut,) = encode_texts(tok, [long], max_length=6)
    assert cut.truncated and len(cut.ids) == 6
    assert tok.decode(cut.ids).endswith("the end")  # left truncation keeps the response


def read_preferences_from_rows(rows):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        return read_preferences(write_jsonl(Path(tmp) / "p.jsonl", rows))


def test_collate_pads_both_sides_to_one_length(tok):
    encoded = encode_pairs(tok, read_preferences_from_rows(ROWS), max_length=64)
    batch = collate(encoded, pad_id=tok.pad_token_id)
    b, t = len(ROWS), max(max(len(p.chosen.ids), len(p.rejected.ids)) for p in encoded)
    for name in ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask", "chosen_response_mask"):
        assert tuple(getattr(batch, name).shape) == (b, t), name
    assert batch.margin.tolist() == [1.5, 0.0, 0.0, 0.0] and batch.margin.dtype == torch.float32
    assert batch.chosen_mask.sum(1).tolist() == [len(p.chosen.ids) for p in encoded]
    n = len(encoded[0].chosen.ids)
    assert (batch.chosen_ids[0, n:] == tok.pad_token_id).all() and not batch.chosen_response_mask[0, n:].any()
    ids, mask = batch.concatenated()
    assert (
        ids.shape == (2 * b, t)
        and torch.equal(ids[b:], batch.rejected_ids)
        and torch.equal(mask[:b], batch.chosen_mask)
    )
    assert collate(encoded, tok.pad_token_id, pad_to_multiple_of=8).chosen_ids.shape[1] % 8 == 0


def test_step_sampler_is_a_pure_function_of_seed_and_step():
    sampler = StepSampler(n=20, global_batch=8, seed=3)
    assert sampler.steps_per_epoch == 2
    first = [sampler.indices(s) for s in range(6)]
    assert first == [StepSampler(20, 8, 3).indices(s) for s in range(6)]  # fresh sampler, same batches
    assert len(set(first[0]) | set(first[1])) == 16  # no repeats inside an epoch
    assert first[0] != first[2]  # a new permutation each epoch
    micro = [
        sampler.micro_batch(4, rank=r, world_size=2, micro=m, micro_batch_size=2)
        for r in (0, 1)
        for m in (0, 1)
    ]
    assert [i for part in micro for i in part] == sampler.indices(
        4
    )  # processes × micro-batches cover exactly the big batch
    with pytest.raises(ValueError, match="cannot fill one batch"):
        StepSampler(n=4, global_batch=8, seed=0)


# ----------------------------------------------------------------------------- spans


SEGMENT_ROWS = [  # the studio's segments export: response + spans with extra keys
    {
        "prompt": "Review: ",
        "response": "Great food, awful service.",
        "spans": [
            {
                "start": 0,
                "end": 10,
                "polarity": "good",
                "label": "food",
                "comment": None,
                "text": "Great food",
            },
            {
                "start": 12,
                "end": 25,
                "polarity": "bad",
                "label": None,
                "comment": "rude",
                "text": "awful service",
            },
        ],
        "generation_id": 7,
    },
    {
        "prompt": [{"role": "user", "content": "Say hi"}],
        "response": "Hi 😀 there",
        "spans": '[{"start": 3, "end": 4, "polarity": "good"}]',
    },
    {"prompt": "x", "response": "no spans", "spans": []},
]


def test_span_examples_map_code_points_onto_tokens(tmp_path, tok):
    examples = read_span_examples(write_jsonl(tmp_path / "s.jsonl", SEGMENT_ROWS))
    assert [len(e.spans) for e in examples] == [2, 1, 0]
    assert examples[0].spans[0].label == "food" and examples[1].spans[0].polarity == "good"
    encoded = encode_span_examples(tok, examples, max_length=64)
    first = encoded[0]
    good = tok.decode([i for i, m in zip(first.ids, first.good_mask, strict=True) if m])
    bad = tok.decode([i for i, m in zip(first.ids, first.bad_mask, strict=True) if m])
    assert good.strip() == "Great food" and bad.strip() == "awful service"
    assert not any(g and b for g, b in zip(first.good_mask, first.bad_mask, strict=True))
    assert all(r for r, g in zip(first.response_mask, first.good_mask, strict=True) if g)
    emoji = encoded[1]  # chat prompt; the span is the emoji, one code point but 4 UTF-8 bytes
    assert tok.decode([i for i, m in zip(emoji.ids, emoji.good_mask, strict=True) if m]).strip() == "😀"
    assert not any(encoded[2].good_mask) and any(encoded[2].response_mask)


def test_span_token_mask_overlap_rule():
    offsets = [(0, 0), (0, 3), (3, 6), (6, 9)]  # a special token, then three 3-character tokens
    assert span_token_mask(offsets, [(4, 5)]) == [False, False, True, False]
    assert span_token_mask(offsets, [(2, 7)]) == [False, True, True, True]
    assert span_token_mask(offsets, [(3, 3)]) == [False] * 4


@pytest.mark.parametrize(
    ("spans", "words"),
    [
        (
            [{"start": 5, "end": 50, "polarity": "good"}],
            "span 0: \\[5, 50\\) is not inside the 8-character response",
        ),
        ([{"start": 2, "end": 2, "polarity": "good"}], "is not inside"),
        ([{"start": 0, "end": 2, "polarity": "meh"}], "polarity must be 'good' or 'bad'"),
        ([{"start": "0", "end": 2, "polarity": "bad"}], "start and end must be integers"),
        ("not json", "spans is not valid JSON"),
    ],
)
def test_bad_spans_are_named(tmp_path, spans, words):
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "p", "response": "no spans", "spans": spans}])
    with pytest.raises(SnapshotError, match=words):
        read_span_examples(path)


# ----------------------------------------------------------------------------- synthetic task


def test_true_reward_is_the_mean_lexicon_valence():
    lexicon = vader_lexicon()
    assert (lexicon["good"], lexicon["bad"]) == (1.9, -2.5)
    # (1.9 + 0 + −2.5 + 0) / 4 = −0.15; punctuation and case do not matter, unknown words count 0.
    assert true_reward("Good table, BAD chair!") == pytest.approx(-0.15)
    assert true_reward("") == 0.0


def test_synthetic_snapshot_is_deterministic_and_ranked_by_the_true_reward(tmp_path):
    a = write_synthetic_snapshot(tmp_path / "a", n_train=50, n_eval=20, task=SyntheticTask(seed=1))
    b = write_synthetic_snapshot(tmp_path / "b", n_train=50, n_eval=20, task=SyntheticTask(seed=1))
    c = write_synthetic_snapshot(tmp_path / "c", n_train=50, n_eval=20, task=SyntheticTask(seed=2))
    assert a.train.read_bytes() == b.train.read_bytes() and a.eval.read_bytes() == b.eval.read_bytes()
    assert a.train.read_bytes() != c.train.read_bytes()
    rows = [json.loads(line) for line in a.train.read_text().splitlines()]
    assert len(rows) == 50
    for row in rows:
        assert true_reward(row["chosen"]) - true_reward(row["rejected"]) >= 0.4 - 1e-9
        assert len(row["chosen"].split()) == len(row["rejected"].split()) == 8
    train_keys = {p.key for p in read_preferences(a.train)}
    assert not train_keys & {p.key for p in read_preferences(a.eval)}


def test_synthetic_conversational_with_margin_reads_as_preferences(tmp_path):
    task = SyntheticTask(seed=0, conversational=True, with_margin=True)
    paths = write_synthetic_snapshot(tmp_path, n_train=10, n_eval=5, task=task)
    pairs = read_preferences(paths.train)
    assert isinstance(pairs[0].prompt, list) and pairs[0].chosen[0]["role"] == "assistant"
    assert all(p.margin >= 0.4 for p in pairs)
