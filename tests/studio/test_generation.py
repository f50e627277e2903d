"""Batched, seeded generation on the tiny random Llama, and the per-process model cache."""

from __future__ import annotations

import shutil
import threading

import pytest
import torch

from studio.generation import GeneratedText, LoadedModel, ModelCache, SamplingParams, generate
from trainers.models import load_causal_lm

torch.set_num_threads(1)

PROMPTS = [
    "Write one sentence about the weather.",
    "Hi",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Explain why the sky is blue."}],
]


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return ModelCache().get(str(tiny_model))


@pytest.fixture(scope="module")
def varied(tiny_model):
    """The tiny model with larger random weights: its greedy outputs differ from prompt to prompt
    (the stock initialisation answers every prompt with the same token), so padding bugs show."""
    model, tokenizer = load_causal_lm(tiny_model)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0, 0.3)
    return LoadedModel(path=tiny_model, model=model, tokenizer=tokenizer)


def texts(results: list[list[GeneratedText]]) -> list[list[str]]:
    return [[g.text for g in samples] for samples in results]


# ----------------------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("max_new_tokens", 0),
        ("max_new_tokens", 4097),
        ("samples_per_prompt", 0),
        ("samples_per_prompt", 17),
        ("batch_size", 0),
        ("min_new_tokens", -1),
        ("min_new_tokens", 200),
    ],
)
def test_sampling_params_validation(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_sampling_params_record():
    assert SamplingParams().do_sample
    greedy = SamplingParams(temperature=0)
    assert not greedy.do_sample
    assert greedy.to_dict() == {"temperature": 0, "top_p": 0.95, "max_new_tokens": 128, "do_sample": False}


# ----------------------------------------------------------------------------- generate


def test_output_structure(loaded):
    params = SamplingParams(max_new_tokens=6, samples_per_prompt=3, batch_size=4, seed=5)
    results = generate(loaded, PROMPTS, params)
    assert len(results) == len(PROMPTS)
    for samples in results:
        assert [g.sample_index for g in samples] == [0, 1, 2]
        for g in samples:
            assert isinstance(g.text, str)
            assert 0 <= g.num_tokens <= 6
            assert g.finish_reason in {"eos", "length"}
    # 9 sequences in batches of 4: seeds 5, 5, 5 | 5, 6, 6 | 6, 6, 7
    assert [g.seed for samples in results for g in samples] == [5, 5, 5, 5, 6, 6, 6, 6, 7]


def test_greedy_batched_equals_one_by_one(varied):
    params = SamplingParams(temperature=0, max_new_tokens=12, batch_size=8)
    batched = generate(varied, PROMPTS, params)
    alone = [generate(varied, [p], params)[0] for p in PROMPTS]
    assert len({samples[0].text for samples in batched}) == len(PROMPTS)  # not a degenerate model
    assert texts(batched) == texts(alone)
    assert [b[0].num_tokens for b in batched] == [a[0].num_tokens for a in alone]


def test_chat_and_plain_prompts_use_the_template(varied):
    params = SamplingParams(temperature=0, max_new_tokens=8)
    plain = generate(varied, ["Hi", "Hello"], params)
    chat = generate(
        varied, [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Hello"}]], params
    )
    assert texts(plain) == texts(chat)
    assert texts(plain)[0] != texts(plain)[1]


def test_same_seed_same_texts_other_seed_other_texts(loaded):
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=16, samples_per_prompt=2, seed=11)
    first = generate(loaded, PROMPTS, params)
    again = generate(loaded, PROMPTS, params)
    other = generate(loaded, PROMPTS, SamplingParams(**{**params.__dict__, "seed": 12}))
    assert texts(first) == texts(again)
    assert texts(first) != texts(other)


def test_length_finish_reason_and_token_count(loaded):
    results = generate(loaded, PROMPTS, SamplingParams(max_new_tokens=3, min_new_tokens=3))
    for samples in results:
        assert samples[0].finish_reason == "length"
        assert samples[0].num_tokens == 3


class ScriptedModel:
    """Stands in for a causal LM: every row answers with the same scripted tokens."""

    def __init__(self, real, script: list[int]) -> None:
        self.generation_config = real.generation_config
        self.device = real.device
        self.script = script
        self.options: dict = {}

    def generate(self, input_ids, attention_mask, **options):
        self.options = options
        answer = torch.tensor([self.script] * input_ids.shape[0])
        return torch.cat([input_ids, answer], dim=1)


def test_eos_finish_reason_excludes_eos_and_padding(loaded):
    tok = loaded.tokenizer
    words = tok.encode(" sea", add_special_tokens=False)
    scripted = ScriptedModel(loaded.model, [*words, tok.eos_token_id, tok.pad_token_id, tok.pad_token_id])
    fake = LoadedModel(path=loaded.path, model=scripted, tokenizer=tok)
    [[g]] = generate(fake, ["Hi"], SamplingParams(temperature=0, max_new_tokens=8))
    assert (g.text, g.num_tokens, g.finish_reason) == (" sea", len(words), "eos")
    assert scripted.options["pad_token_id"] == tok.pad_token_id
    assert scripted.options["do_sample"] is False


def test_progress_counts_sequences(loaded):
    calls: list[tuple[float, int]] = []
    params = SamplingParams(max_new_tokens=2, samples_per_prompt=2, batch_size=4)
    generate(loaded, PROMPTS, params, progress=lambda done, total: calls.append((done, total)))
    # Per decoding step within a batch (fractional), and exact counts after each batch of 4 + 2.
    assert {total for _, total in calls} == {6}
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == 6 and 4 in done
    assert len(calls) > 2 and any(d != int(d) or d not in (4, 6) for d in done)


# ----------------------------------------------------------------------------- ModelCache


def test_model_cache_loads_once(tiny_model):
    cache = ModelCache()
    first = cache.get(str(tiny_model))
    assert cache.get(str(tiny_model)) is first
    assert cache.loads == 1


def test_model_cache_loads_once_across_threads(tiny_model):
    cache = ModelCache()
    got = []
    threads = [threading.Thread(target=lambda: got.append(cache.get(str(tiny_model)))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.loads == 1 and len({id(g) for g in got}) == 1


def test_model_cache_evicts_least_recently_used(tiny_model, tmp_path):
    a, b, c = (str(shutil.copytree(tiny_model, tmp_path / name)) for name in "abc")
    cache = ModelCache(max_models=2)
    cache.get(a)
    cache.get(b)
    cache.get(a)  # b is now the least recently used
    cache.get(c)
    assert cache.loads == 3 and len(cache) == 2
    assert cache.get(a).path == tmp_path / "a" and cache.loads == 3
    cache.get(b)
    assert cache.loads == 4


def test_model_cache_rejects_bad_size():
    with pytest.raises(ValueError, match="max_models"):
        ModelCache(max_models=0)
