"""Hyperparameter forms from a recipe's config schema, and the submitted values back into typed values.

Pure (no gradio): the Training tab turns each `WidgetSpec` into a component, and `parse_form` turns
what the browser sent back into `{dotted field name: typed value}` for `services.jobs.launch`.

A schema field (one entry of `python -m trainers --schema`, as a dict or as the service's FieldSpec
dataclass, studio.services.jobs) reads::

    {"name": "optim.lr", "type": "float", "default": 5e-05, "help": "Peak learning rate.", "gt": 0}

Types: int, float, bool, str, choice (with "choices"), optional_<type> (empty means null), and
anything else (list, dict, json: `optim.betas`) as JSON text. Managed fields (snapshot, output_dir,
model, ...) are filled by the studio and never shown.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

WidgetKind = Literal["number", "int", "checkbox", "dropdown", "text"]
BOUND_WORDS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
_SCALAR_KINDS: dict[str, WidgetKind] = {
    "int": "int",
    "float": "number",
    "bool": "checkbox",
    "str": "text",
    "path": "text",
    "choice": "dropdown",
}


@dataclass(frozen=True)
class WidgetSpec:
    """One form widget for one config field."""

    name: str
    """Dotted field name, e.g. `optim.lr` (the key of the parsed value)."""
    kind: WidgetKind
    """number (float), int, checkbox, dropdown or text."""
    label: str
    """The field's own name within its group, e.g. `lr`."""
    default: Any
    """The widget's starting value: the config default as the widget holds it (None: empty)."""
    help: str
    """The field's documentation, plus its range and what an empty value means."""
    group: str = ""
    """Sub-heading the widget sits under: "" for top-level fields, else the section (`optim`)."""
    type: str = "str"
    """The schema type it parses back into (without `optional_`)."""
    optional: bool = False
    """An empty widget means null."""
    bounds: tuple[tuple[str, float], ...] = ()
    """(op, limit) with op in ge/gt/le/lt, checked on parse."""
    choices: tuple[Any, ...] = ()
    """Allowed values of a dropdown."""

    @property
    def minimum(self) -> float | None:
        """Lower limit for the browser's number input (strict `gt` is checked on parse)."""
        found = [v for op, v in self.bounds if op in ("ge", "gt")]
        return max(found) if found else None

    @property
    def maximum(self) -> float | None:
        found = [v for op, v in self.bounds if op in ("le", "lt")]
        return min(found) if found else None

    @property
    def step(self) -> float:
        """Spinner step of a number box: whole numbers 1; floats the power of ten of their default
        (5e-05 -> 1e-05, 0.1 -> 0.1, 1.0 -> 1), 0.01 when the default is 0 or empty."""
        if self.kind != "number":
            return 1
        if not isinstance(self.default, (int, float)) or not self.default or not math.isfinite(self.default):
            return 0.01
        return 10.0 ** math.floor(math.log10(abs(self.default)))


class FormError(ValueError):
    """Submitted values that do not fit the schema; `errors` maps each bad field to its problem."""

    def __init__(self, errors: Mapping[str, str]):
        self.errors = dict(errors)
        super().__init__("; ".join(f"{name}: {problem}" for name, problem in self.errors.items()))


def _get(field: Any, key: str, default: Any = None) -> Any:
    """A schema field's entry, whether it is a dict or a dataclass."""
    if isinstance(field, Mapping):
        return field.get(key, default)
    return getattr(field, key, default)


def _bounds(field: Any) -> tuple[tuple[str, float], ...]:
    return tuple((op, float(_get(field, op))) for op in BOUND_WORDS if _get(field, op) is not None)


def bounds_text(bounds: Iterable[tuple[str, float]]) -> str:
    """`[("gt", 0.0), ("le", 1.0)]` -> "> 0, ≤ 1"."""
    return ", ".join(f"{BOUND_WORDS[op]} {limit:g}" for op, limit in bounds)


def widget_spec(field: Any) -> WidgetSpec:
    """The widget for one (non-managed) schema field."""
    name = str(_get(field, "name"))
    raw_type = str(_get(field, "type") or "str")
    optional = raw_type.startswith("optional_")
    base_type = raw_type.removeprefix("optional_")
    choices = tuple(_get(field, "choices") or ())
    kind: WidgetKind = "dropdown" if choices else _SCALAR_KINDS.get(base_type, "text")
    if optional and kind == "checkbox":  # a checkbox cannot say "null"
        kind = "text"
    group, _, label = name.rpartition(".")
    bounds = _bounds(field)
    default = _get(field, "default")
    if kind == "text" and base_type not in ("str", "path") and default is not None:
        default = json.dumps(default)  # a list or other structure, edited as JSON
    notes = []
    if bounds:
        notes.append(f"Range: {bounds_text(bounds)}.")
    if optional:
        notes.append("Empty: none.")
    if kind == "text" and base_type not in ("str", "path", "bool"):
        notes.append("JSON.")
    if optional and base_type == "bool":
        notes.append("true or false.")
    doc = " ".join(str(_get(field, "help") or "").split())
    return WidgetSpec(
        name=name,
        kind=kind,
        label=label,
        default=default,
        help=" ".join([doc, *notes]).strip(),
        group=group,
        type=base_type,
        optional=optional,
        bounds=bounds,
        choices=choices,
    )


def form_specs(fields: Iterable[Any]) -> list[WidgetSpec]:
    """Widgets for every field the user sets (managed fields left out), in schema order."""
    return [widget_spec(f) for f in fields if not _get(f, "managed", False)]


def grouped(specs: Sequence[WidgetSpec]) -> list[tuple[str, list[WidgetSpec]]]:
    """[(group, widgets)]: top-level fields first, then each section in order of first appearance."""
    order: dict[str, list[WidgetSpec]] = {"": []}
    for spec in specs:
        order.setdefault(spec.group, []).append(spec)
    return [(group, items) for group, items in order.items() if items]


# ----------------------------------------------------------------------------- parsing


def _is_empty(raw: Any) -> bool:
    return raw is None or (isinstance(raw, str) and not raw.strip())


def _number(raw: Any, whole: bool) -> float | int:
    if isinstance(raw, bool):
        raise ValueError(f"expected a number, got {raw}")
    if isinstance(raw, str):
        text = raw.strip().replace("_", "")
        try:
            raw = int(text) if whole else float(text)
        except ValueError:
            try:
                raw = float(text)
            except ValueError:
                raise ValueError(
                    f"expected {'a whole number' if whole else 'a number'}, got {text!r}"
                ) from None
    if not isinstance(raw, (int, float)):
        raise ValueError(f"expected a number, got {type(raw).__name__}")
    if isinstance(raw, float) and not math.isfinite(raw):
        raise ValueError(f"must be finite, got {raw}")
    if whole:
        if isinstance(raw, float) and not raw.is_integer():
            raise ValueError(f"expected a whole number, got {raw:g}")
        return int(raw)
    return float(raw)


def _check_bounds(spec: WidgetSpec, value: float) -> None:
    for op, limit in spec.bounds:
        ok = {"ge": value >= limit, "gt": value > limit, "le": value <= limit, "lt": value < limit}[op]
        if not ok:
            raise ValueError(f"must be {BOUND_WORDS[op]} {limit:g}, got {value:g}")


def _bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def parse_value(spec: WidgetSpec, raw: Any) -> Any:
    """One submitted widget value → the typed config value (ValueError with the problem)."""
    if _is_empty(raw) and spec.type != "str":
        if spec.optional:
            return None
        raise ValueError("a value is required")
    if spec.choices:
        for choice in spec.choices:
            if raw == choice or str(raw) == str(choice):
                return choice
        raise ValueError(f"must be one of {', '.join(map(str, spec.choices))}, got {raw!r}")
    if spec.type in ("int", "float"):
        value = _number(raw, whole=spec.type == "int")
        _check_bounds(spec, value)
        return value
    if spec.type == "bool":
        return _bool(raw)
    if spec.type in ("str", "path"):
        text = "" if raw is None else str(raw).strip()
        if not text and spec.optional:
            return None
        return text
    try:
        value = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg})") from None
    for number in value if isinstance(value, list) else [value]:
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            _check_bounds(spec, float(number))
    return value


def parse_form(specs: Sequence[WidgetSpec], raws: Sequence[Any]) -> dict[str, Any]:
    """Submitted widget values (same order as `specs`) → `{dotted name: typed value}`.

    Raises FormError listing every bad field (`field 'optim.lr': must be > 0, got 0`).
    """
    if len(specs) != len(raws):
        raise ValueError(f"{len(raws)} value(s) for {len(specs)} field(s)")
    values: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for spec, raw in zip(specs, raws, strict=True):
        try:
            values[spec.name] = parse_value(spec, raw)
        except ValueError as exc:
            errors[spec.name] = str(exc)
    if errors:
        raise FormError(errors)
    return values


def nested(values: Mapping[str, Any]) -> dict[str, Any]:
    """`{"optim.lr": 1e-4, "seed": 3}` → `{"optim": {"lr": 1e-4}, "seed": 3}` (the config file's shape)."""
    result: dict[str, Any] = {}
    for dotted, value in values.items():
        *sections, leaf = dotted.split(".")
        node = result
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return result
