"""The real default model (SmolLM2-135M-Instruct) from the model cache filled by `studio fetch-models`.

Skipped when the cache is empty, unless STUDIO_STRICT_TESTS=1 (CI), where a missing model fails.
"""

from __future__ import annotations

import os
import re

import pytest

from studio.generation import ModelCache, SamplingParams, generate
from trainers.models import DEFAULT_MODELS, default_cache_dir, is_complete

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    folder = default_cache_dir() / DEFAULT_MODELS["smollm2"].folder
    if not is_complete(folder):
        message = f"SmolLM2 is not in the model cache ({folder}); run `studio fetch-models`"
        if os.environ.get("STUDIO_STRICT_TESTS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    cache = ModelCache(default_cache_dir())
    loaded = cache.get("smollm2")
    assert cache.get("SmolLM2-135M-Instruct") is loaded and cache.loads == 1
    return loaded


def test_default_model_answers_two_chat_prompts_in_a_batch(smollm2):
    prompts = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Write one sentence about the sea."}],
    ]
    results = generate(smollm2, prompts, SamplingParams(temperature=0, max_new_tokens=24, batch_size=2))
    assert [len(samples) for samples in results] == [1, 1]
    capital, sea = results[0][0], results[1][0]
    for g in (capital, sea):
        words = re.findall(r"[A-Za-z]+", g.text)
        assert len(words) >= 3, g.text
        assert sum(c.isascii() for c in g.text) / len(g.text) > 0.95, g.text
        assert 0 < g.num_tokens <= 24
        assert g.finish_reason in {"eos", "length"}
    assert "Paris" in capital.text
    assert capital.finish_reason == "eos"  # a short factual answer stops by itself
    assert "sea" in sea.text.lower()
