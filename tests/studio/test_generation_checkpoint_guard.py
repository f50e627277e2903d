"""A trained checkpoint is re-hashed against the manifest digest recorded at registration before the
generation service reads its weights (R-JOB-07): altered files are refused and the checkpoint is marked
unloadable, and an unloadable checkpoint is never loaded again."""

from __future__ import annotations

import json

import pytest
from job_helpers import make_env
from transformers import AutoModelForCausalLM, AutoTokenizer

from storage.models import Checkpoint, CheckpointKind, CheckpointStatus
from studio.generation import SamplingParams
from studio.services import ServiceError
from trainers.checkpoint import manifest_digest, save_checkpoint


@pytest.fixture
def env(db, tmp_path, tiny_model):
    return make_env(db, tmp_path, tiny_model)


def test_altered_trained_checkpoint_is_refused_and_marked_unloadable(env, tmp_path, tiny_model):
    folder = save_checkpoint(
        tmp_path / "trained" / "final",
        model=AutoModelForCausalLM.from_pretrained(tiny_model),
        tokenizer=AutoTokenizer.from_pretrained(tiny_model),
        studio={"recipe": "dpo", "kind": "policy"},
    )
    with env.db.write() as s:
        row = Checkpoint(name="trained", path=str(folder), kind=CheckpointKind.policy, recipe="dpo",
                         manifest_sha256=manifest_digest(folder))  # fmt: skip
        s.add(row)
        s.flush()
        ckpt_id = row.id
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Say {i}."}) + "\n" for i in range(2)))
    env.services.prompts.import_file(env.project_id, prompts)
    params = SamplingParams(max_new_tokens=4, samples_per_prompt=2, seed=1, batch_size=4)

    report = env.services.generation.run(env.project_id, checkpoint_id=ckpt_id, params=params, limit=1)
    assert report.generations == 2  # intact: loads and generates

    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ServiceError, match="unloadable and was not loaded"):
        env.services.generation.run(env.project_id, checkpoint_id=ckpt_id, params=params)
    with env.db.read() as s:
        assert s.get(Checkpoint, ckpt_id).status == CheckpointStatus.unloadable
    with pytest.raises(ServiceError, match="is unloadable"):
        env.services.generation.run(env.project_id, checkpoint_id=ckpt_id, params=params)
    assert ckpt_id not in [m.checkpoint_id for m in env.services.generation.models(env.project_id)]
