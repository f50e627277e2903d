"""Our snapshot files load straight into TRL 1.16's RewardTrainer and DPOTrainer (tiny model, CPU).

The files are read exactly as a user would: `datasets.load_dataset("json", ...)` for JSONL and
`datasets.load_from_disk` for the hf format; the provenance columns ride along and are dropped
by the trainers' column filtering. Each run takes 2 optimizer steps and must change the weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from datasets_factory import add_user, seed_project, vote

from studio.services.datasets import DatasetService
from studio.services.users import UserService
from studio.settings import Settings

pytest.importorskip("trl")

CHAT = [{"role": "user", "content": "Explain why the sky is blue."}]


@pytest.fixture
def exported(db, tmp_path):
    """A project with 4 decisive comparisons (one chat prompt, three text prompts, mixed strengths)."""
    settings = Settings(data_dir=tmp_path / "data", database_url="sqlite://")
    add_user(db, "root", "admin")
    svc = DatasetService(db, settings, UserService(db, settings))
    seed = seed_project(db, prompts=[CHAT, "The sea is", "Write one sentence", "Translate hello"])
    u, v = add_user(db, "ann"), add_user(db, "bob")
    for i, c in enumerate(seed.comparisons):
        outcome = "a" if i % 2 else "b"
        vote(db, c, u, outcome, strength=("slight", "clear", "much", None)[i])
        vote(db, c, v, outcome, a_left=False)
    return svc, seed.project_id


def _changed(before: dict, model) -> bool:
    return any(not before[n].equal(p.detach()) for n, p in model.named_parameters() if n in before)


def _snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_reward_trainer_reads_our_jsonl(exported, tiny_model, tmp_path):
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    svc, project_id = exported
    [info] = svc.export("root", project_id, ["reward"], "jsonl")
    ds = datasets.load_dataset("json", data_files=info.path, split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == 4 and sorted(ds["margin"]) == [0.5, 1.0, 1.0, 2.0]
    assert isinstance(ds[0]["chosen"], list)  # conversational (one chat prompt in the project)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    before = _snapshot(model)
    args = RewardConfig(
        output_dir=str(tmp_path / "rm"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        max_length=128,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    assert "margin" in trainer.train_dataset.column_names
    result = trainer.train()
    assert math.isfinite(result.training_loss) and _changed(before, trainer.model)


@pytest.mark.parametrize("fmt", ["hf", "jsonl"])
def test_dpo_trainer_reads_our_preferences(exported, tiny_model, tmp_path, fmt):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    svc, project_id = exported
    filters = {"prompt_format": "standard"} if fmt == "hf" else {}
    [info] = svc.export("root", project_id, ["preferences"], fmt, filters)
    if fmt == "hf":
        ds = datasets.load_from_disk(info.path)
        assert isinstance(ds[0]["prompt"], str)  # standard format
    else:
        ds = datasets.load_dataset("json", data_files=info.path, split="train", cache_dir=str(tmp_path / "c"))
        assert ds[0]["prompt"] == CHAT  # conversational
    assert ds.num_rows == 4 and {"prompt_id", "pair_id", "rater_ids"} <= set(ds.column_names)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    before = _snapshot(model)
    args = DPOConfig(
        output_dir=str(tmp_path / "dpo"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        max_length=128,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    result = trainer.train()
    assert math.isfinite(result.training_loss) and _changed(before, trainer.model)
    assert Path(info.path).exists()
