"""Recipe configs: YAML/JSON → typed dataclass, errors that name the file and the field."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from trainers.config import (
    ConfigError,
    OptimConfig,
    apply_overrides,
    config_from_dict,
    config_schema,
    config_to_dict,
    field_docs,
    load_config,
    parse_recipe_args,
)
from trainers.recipes.dpo import DPOConfig
from trainers.recipes.reward_model import RewardModelConfig

GOOD = """
snapshot: data/train.jsonl
output_dir: runs/rm
model: minilm
batch_size: 4
optim:
  lr: 1e-4          # YAML 1.1 reads this as a string; numbers in strings are accepted for floats
  betas: [0.9, 0.95]
  schedule: cosine
"""


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error(tmp_path, text, *overrides) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(RewardModelConfig, path, overrides)
    assert str(path) in str(info.value) or "--set" in str(info.value)
    return info.value


def test_yaml_loads_into_typed_nested_config_and_round_trips(tmp_path):
    cfg = load_config(RewardModelConfig, write(tmp_path, GOOD))
    assert cfg.batch_size == 4 and cfg.model == "minilm"
    assert cfg.optim == OptimConfig(lr=1e-4, betas=(0.9, 0.95), schedule="cosine")
    assert cfg.optim.grad_accum == 1 and cfg.eval_snapshot is None  # defaults
    plain = config_to_dict(cfg)
    assert plain["optim"]["betas"] == [0.9, 0.95]
    json.dumps(plain)  # JSON-able
    assert config_from_dict(RewardModelConfig, plain) == cfg
    again = load_config(RewardModelConfig, write(tmp_path, json.dumps(plain), "cfg.json"))
    assert again == cfg


def test_overrides_set_nested_fields_and_parse_values(tmp_path):
    path = write(tmp_path, GOOD)
    cfg = load_config(
        RewardModelConfig, path, ["optim.lr=3e-5", "max_steps=7", "eval_snapshot=null", "cpu=true"]
    )
    assert (cfg.optim.lr, cfg.max_steps, cfg.eval_snapshot, cfg.cpu) == (3e-5, 7, None, True)
    assert apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]"]) == {"a": {"b": 1, "c": [1, 2]}}
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["max_steps"])
    with pytest.raises(ConfigError, match="field 'model': is not a section"):
        apply_overrides({"model": "x"}, ["model.name=y"])


def test_unknown_field_is_named_with_a_suggestion(tmp_path):
    exc = error(tmp_path, GOOD + "batch_sise: 3\n")
    assert exc.field == "batch_sise"
    assert "unknown field" in str(exc) and "did you mean 'batch_size'" in str(exc)
    exc = error(tmp_path, GOOD.replace("schedule: cosine", "schedul: cosine"))
    assert exc.field == "optim.schedul" and "did you mean 'schedule'" in str(exc)


@pytest.mark.parametrize(
    ("line", "field", "words"),
    [
        ("batch_size: eight", "batch_size", "expected an integer, got str 'eight'"),
        ("batch_size: 2.5", "batch_size", "expected an integer"),
        ("batch_size: true", "batch_size", "expected an integer, got bool"),
        ("cpu: 1", "cpu", "expected true or false"),
        ("eval_fraction: lots", "eval_fraction", "expected a number"),
        ("model: [a, b]", "model", "expected a string"),
        ("mixed_precision: fp8", "mixed_precision", "must be one of 'auto', 'no', 'bf16', 'fp16'"),
        ("batch_size: 0", "batch_size", "out of range: must be >= 1, got 0"),
        ("eval_fraction: 1.0", "eval_fraction", "out of range: must be < 1"),
        ("optim: 3", "optim", "expected a mapping"),
    ],
)
def test_wrong_type_or_range_names_the_field(tmp_path, line, field, words):
    exc = error(tmp_path, GOOD + line + "\n")
    assert exc.field == field
    assert f"field '{field}'" in str(exc) and words in str(exc)


def test_nested_range_and_cross_field_errors_name_the_dotted_field(tmp_path):
    exc = error(tmp_path, GOOD, "optim.lr=-1")
    assert exc.field == "optim.lr" and "out of range: must be > 0" in str(exc)
    exc = error(tmp_path, GOOD, "optim.betas=[0.9, 1.5]")
    assert exc.field == "optim.betas" and "[0, 1)" in str(exc)
    exc = error(tmp_path, GOOD, "optim.betas=[0.9]")
    assert exc.field == "optim.betas" and "a list of 2 items" in str(exc)
    exc = error(tmp_path, GOOD, "optim.max_grad_norm=nan")
    assert exc.field == "optim.max_grad_norm" and "finite" in str(exc)


def test_missing_required_field_bad_yaml_and_bad_top_level(tmp_path):
    exc = error(tmp_path, "snapshot: a.jsonl\n")
    assert exc.field == "output_dir" and "required field is missing" in str(exc)
    exc = error(tmp_path, "snapshot: [unclosed\n")
    assert exc.field is None and "not valid YAML" in str(exc)
    exc = error(tmp_path, "- a\n- b\n")
    assert "top level must be a mapping" in str(exc)
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(RewardModelConfig, tmp_path / "missing.yaml")


def test_command_line_parsing(tmp_path):
    path = write(tmp_path, GOOD)
    cfg, args = parse_recipe_args(RewardModelConfig, ["--config", str(path), "--set", "seed=3"], prog="x")
    assert cfg.seed == 3 and not args.print_config
    cfg, _ = parse_recipe_args(RewardModelConfig, ["--set", "snapshot=a", "--set", "output_dir=b"], prog="x")
    assert (cfg.snapshot, cfg.output_dir) == ("a", "b")


@dataclass(frozen=True)
class _Base:
    rate: float = 0.1
    """Base rate."""
    size: int = 2
    """Base size."""
    quiet: bool = False


@dataclass(frozen=True)
class _Derived(_Base):
    rate: float = 0.5
    """Derived rate: overrides the parent's docstring."""
    size: int = 4  # redefined without a docstring: the parent's stays
    extra: str = "x"
    """Only here."""


def test_field_docs_merge_over_the_mro_parents_first():
    assert field_docs(_Base) == {"rate": "Base rate.", "size": "Base size."}
    assert field_docs(_Derived) == {
        "rate": "Derived rate: overrides the parent's docstring.",
        "size": "Base size.",
        "extra": "Only here.",
    }


def test_schema_of_an_inherited_section_has_the_parents_help():
    # DPO's optim section is DPOOptimConfig(OptimConfig): only lr is redefined there.
    dpo = {f["name"]: f["help"] for f in config_schema(DPOConfig) if f["name"].startswith("optim.")}
    rm = {f["name"]: f["help"] for f in config_schema(RewardModelConfig) if f["name"].startswith("optim.")}
    assert dpo.keys() == rm.keys() and all(dpo.values())
    assert dpo.pop("optim.lr").startswith("Peak learning rate (TRL's DPO default")
    assert rm.pop("optim.lr") == "Peak learning rate."
    assert dpo == rm and dpo["optim.betas"] == "Adam betas."
