"""studio.forms: recipe schema fields → widget specs, and submitted values → typed config values."""

from __future__ import annotations

import pytest

from studio.forms import (
    FormError,
    bounds_text,
    form_specs,
    grouped,
    nested,
    parse_form,
    parse_value,
    widget_spec,
)

# A hand-written schema in the shape of `python -m trainers --schema` (reward_model, abridged).
SCHEMA = [
    {"name": "snapshot", "type": "str", "default": None, "help": "Reward snapshot.", "managed": True},
    {"name": "output_dir", "type": "str", "default": None, "help": "Run folder.", "managed": True},
    {"name": "model", "type": "str", "default": "minilm", "help": "Base model.", "managed": True},
    {"name": "eval_fraction", "type": "float", "default": 0.1, "help": "Held-out share.", "ge": 0, "lt": 1},
    {"name": "max_length", "type": "int", "default": 256, "help": "Tokens per text.", "ge": 8},
    {
        "name": "truncation_side",
        "type": "choice",
        "default": "left",
        "help": "Cut.",
        "choices": ["left", "right"],
    },
    {"name": "max_steps", "type": "int", "default": 0, "help": "Steps (0: epochs).", "ge": 0},
    {"name": "optim.lr", "type": "float", "default": 5e-05, "help": "Peak learning rate.", "gt": 0},
    {"name": "optim.betas", "type": "tuple", "default": [0.9, 0.999], "help": "Adam betas."},
    {"name": "optim.max_grad_norm", "type": "optional_float", "default": 1.0, "help": "Clip.", "gt": 0},
    {"name": "cpu", "type": "bool", "default": False, "help": "Train on the CPU\n\neven with a GPU."},
    {"name": "resume", "type": "bool", "default": True, "help": "Resume.", "managed": True},
    {"name": "run_name", "type": "optional_str", "default": None, "help": "A name."},
]


def specs():
    return form_specs(SCHEMA)


def by_name(name):
    return next(s for s in specs() if s.name == name)


def test_managed_fields_are_not_shown():
    names = [s.name for s in specs()]
    assert names == [
        "eval_fraction",
        "max_length",
        "truncation_side",
        "max_steps",
        "optim.lr",
        "optim.betas",
        "optim.max_grad_norm",
        "cpu",
        "run_name",
    ]


def test_widget_kinds_labels_defaults_and_help():
    lr = by_name("optim.lr")
    assert (lr.kind, lr.label, lr.group, lr.default) == ("number", "lr", "optim", 5e-05)
    assert lr.help == "Peak learning rate. Range: > 0."
    assert lr.step == 1e-05 and by_name("eval_fraction").step == 0.1 and by_name("max_length").step == 1
    assert (lr.minimum, lr.maximum) == (0.0, None)
    length = by_name("max_length")
    assert (length.kind, length.default, length.group, length.minimum) == ("int", 256, "", 8.0)
    side = by_name("truncation_side")
    assert (side.kind, side.choices, side.default) == ("dropdown", ("left", "right"), "left")
    cpu = by_name("cpu")
    assert (cpu.kind, cpu.default) == ("checkbox", False)
    assert cpu.help == "Train on the CPU even with a GPU."  # whitespace folded to one line
    frac = by_name("eval_fraction")
    assert frac.help == "Held-out share. Range: ≥ 0, < 1."
    assert (frac.minimum, frac.maximum) == (0.0, 1.0)
    betas = by_name("optim.betas")
    assert (betas.kind, betas.default) == ("text", "[0.9, 0.999]")  # edited as JSON
    clip = by_name("optim.max_grad_norm")
    assert (clip.kind, clip.optional, clip.default) == ("number", True, 1.0)
    assert clip.help.endswith("Empty: none.")
    name = by_name("run_name")
    assert (name.kind, name.optional, name.default) == ("text", True, None)


def test_fields_are_grouped_top_level_first():
    groups = grouped(specs())
    assert [g for g, _ in groups] == ["", "optim"]
    assert [s.label for s in groups[0][1]] == [
        "eval_fraction",
        "max_length",
        "truncation_side",
        "max_steps",
        "cpu",
        "run_name",
    ]
    assert [s.label for s in groups[1][1]] == ["lr", "betas", "max_grad_norm"]


def test_defaults_parse_back_into_the_schema_defaults():
    ss = specs()
    values = parse_form(ss, [s.default for s in ss])
    assert values == {
        "eval_fraction": 0.1,
        "max_length": 256,
        "truncation_side": "left",
        "max_steps": 0,
        "optim.lr": 5e-05,
        "optim.betas": [0.9, 0.999],
        "optim.max_grad_norm": 1.0,
        "cpu": False,
        "run_name": None,
    }
    assert nested(values)["optim"] == {"lr": 5e-05, "betas": [0.9, 0.999], "max_grad_norm": 1.0}


def test_browser_values_and_strings_are_typed():
    ss = specs()
    # What Gradio hands back: floats from gr.Number (an int field too), strings from text boxes.
    raws = [0.25, 64.0, "right", "12", "3e-4", "[0.8, 0.95]", "", True, "  my run  "]
    values = parse_form(ss, raws)
    assert values["max_length"] == 64 and isinstance(values["max_length"], int)
    assert values["max_steps"] == 12 and isinstance(values["max_steps"], int)
    assert values["optim.lr"] == pytest.approx(3e-4)
    assert values["optim.betas"] == [0.8, 0.95]
    assert values["optim.max_grad_norm"] is None  # optional, left empty
    assert values["cpu"] is True
    assert values["run_name"] == "my run"
    assert values["truncation_side"] == "right"


@pytest.mark.parametrize(
    ("name", "raw", "problem"),
    [
        ("optim.lr", 0, "must be > 0, got 0"),  # gt is strict
        ("optim.lr", "-1e-3", "must be > 0, got -0.001"),
        ("optim.lr", "fast", "expected a number, got 'fast'"),
        ("optim.lr", "nan", "must be finite"),
        ("optim.lr", None, "a value is required"),
        ("eval_fraction", 1.0, "must be < 1, got 1"),  # lt is strict
        ("max_length", 7, "must be ≥ 8, got 7"),
        ("max_length", 8.5, "expected a whole number, got 8.5"),
        ("max_length", "", "a value is required"),
        ("truncation_side", "middle", "must be one of left, right, got 'middle'"),
        ("optim.betas", "[0.9,", "not valid JSON"),
        ("optim.max_grad_norm", -2, "must be > 0, got -2"),
        ("cpu", "maybe", "expected true or false"),
    ],
)
def test_bad_values_name_the_problem(name, raw, problem):
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace("[", r"\[")):
        parse_value(by_name(name), raw)


def test_a_bad_form_reports_every_bad_field():
    ss = specs()
    raws = [s.default for s in ss]
    raws[1] = 4  # max_length
    raws[4] = 0  # optim.lr
    with pytest.raises(FormError) as info:
        parse_form(ss, raws)
    assert info.value.errors == {"max_length": "must be ≥ 8, got 4", "optim.lr": "must be > 0, got 0"}
    assert str(info.value) == "max_length: must be ≥ 8, got 4; optim.lr: must be > 0, got 0"
    with pytest.raises(ValueError, match="2 value"):
        parse_form(ss, raws[:2])


def test_the_services_field_specs_work_too():
    from studio.services.jobs import FieldSpec

    fields = [
        FieldSpec("beta", "float", 0.1, "DPO temperature.", gt=0),
        FieldSpec("loss", "choice", "sigmoid", "Loss.", choices=("sigmoid", "ipo")),
        FieldSpec("model", "str", "x", managed=True),
    ]
    beta, loss = form_specs(fields)
    assert (beta.name, beta.kind, beta.bounds) == ("beta", "number", (("gt", 0.0),))
    assert (loss.kind, loss.choices) == ("dropdown", ("sigmoid", "ipo"))
    with pytest.raises(ValueError, match="must be > 0"):
        parse_value(beta, 0.0)


def test_every_real_recipe_form_parses_its_defaults_into_values_the_service_accepts(db, tmp_path):
    """The forms of `python -m trainers --schema` round-trip: widget defaults → parse_form → the same
    values as the schema defaults, and JobService.validate takes them unchanged."""
    from studio.services import Services
    from studio.settings import Settings

    services = Services.build(Settings(data_dir=tmp_path / "data", database_url="sqlite://"), db)
    recipes = services.jobs.recipes()
    assert "reward_model" in recipes
    for name, recipe in recipes.items():
        specs = form_specs(recipe.fields)
        assert specs and all(s.name not in ("snapshot", "output_dir", "model") for s in specs), name
        values = parse_form(specs, [s.default for s in specs])
        defaults = {f.name: f.default for f in recipe.fields if not f.managed}
        assert values == {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}, name
        assert services.jobs.validate(name, values) == values, name


def test_optional_bool_is_a_text_box_and_bounds_text():
    spec = widget_spec({"name": "flag", "type": "optional_bool", "default": None, "help": "Maybe."})
    assert (spec.kind, spec.optional) == ("text", True)
    assert parse_value(spec, "") is None and parse_value(spec, "false") is False
    assert bounds_text([("ge", 0.0), ("lt", 1.0)]) == "≥ 0, < 1"
    assert nested({"a.b.c": 1, "a.d": 2, "e": 3}) == {"a": {"b": {"c": 1}, "d": 2}, "e": 3}
