"""Typed recipe configs: YAML/JSON files → frozen dataclasses, with errors that name the file and field.

Every recipe declares one frozen dataclass (fields documented by a docstring under each, nested by
concern). This module turns a file plus ``--set key=value`` overrides into that dataclass and back::

    cfg = load_config(RewardModelConfig, "rm.yaml", ["optim.lr=3e-5", "max_steps=200"])
    config_to_dict(cfg)  # plain JSON-able dict, round-trips through config_from_dict

Checks: unknown fields (with a "did you mean"), missing required fields, wrong types (``bool`` is not an
``int``, ``int`` is accepted where ``float`` is expected, numeric strings such as YAML 1.1's ``1e-4`` are
accepted for numbers), ranges declared with :func:`bounded`, ``Literal`` choices, and whatever the
dataclass's ``__post_init__`` raises as :class:`ConfigFieldError`. Every problem becomes a
:class:`ConfigError` whose message reads ``<file>: field 'optim.lr': <problem>``.

Also here: the small config blocks shared by the preference recipes (:class:`OptimConfig`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be used. ``source`` is the file (or ``<dict>``/``--set``), ``field`` dotted."""

    def __init__(self, source: str, field: str | None, problem: str):
        self.source, self.field, self.problem = source, field, problem
        where = f"field '{field}': " if field else ""
        super().__init__(f"{source}: {where}{problem}")


class ConfigFieldError(ValueError):
    """Raised by a config's ``__post_init__`` for a cross-field problem; the loader adds the file name."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"field '{field}': {problem}")


def bounded(
    default: Any = dataclasses.MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A dataclass field with a numeric range checked at load time (``None`` values are not checked)."""
    metadata = {k: v for k, v in {"ge": ge, "gt": gt, "le": le, "lt": lt}.items() if v is not None}
    return field(default=default, metadata=metadata)


# ----------------------------------------------------------------------------- shared blocks


@dataclass(frozen=True)
class OptimConfig:
    """AdamW, learning-rate schedule, clipping and accumulation (shared by the preference recipes)."""

    lr: float = bounded(5e-5, gt=0)
    """Peak learning rate."""
    weight_decay: float = bounded(0.0, ge=0)
    """Decoupled weight decay, applied to matrices only (not to biases and norms)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = bounded(1e-8, gt=0)
    """Adam epsilon."""
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    """Decay after warm-up: constant, linear to 0, or cosine to ``min_lr_ratio`` × lr."""
    warmup_ratio: float = bounded(0.0, ge=0, le=1)
    """Fraction of the optimizer steps spent warming up linearly from 0."""
    min_lr_ratio: float = bounded(0.0, ge=0, le=1)
    """Floor of the cosine schedule, as a fraction of ``lr``."""
    max_grad_norm: float | None = bounded(1.0, gt=0)
    """Clip the global gradient norm to this value (``null``: no clipping, the norm is still logged)."""
    grad_accum: int = bounded(1, ge=1)
    """Micro-batches per optimizer step."""

    def __post_init__(self) -> None:
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigFieldError("betas", f"each beta must be in [0, 1), got {list(self.betas)}")


# ----------------------------------------------------------------------------- loading


def load_config(cls: type[T], path: str | Path, overrides: Iterable[str] = ()) -> T:
    """Read a YAML or JSON file into ``cls``, after applying ``key.sub=value`` overrides."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, None, f"cannot read the config file ({exc.strerror or exc})") from exc
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(
            source, None, f"not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}"
        ) from exc
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(source, None, f"the top level must be a mapping, got {type(data).__name__}")
    data = apply_overrides(dict(data), overrides)
    return config_from_dict(cls, data, source=source)


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``a.b=value`` set; values are parsed as YAML scalars/lists."""
    result = json.loads(json.dumps(data, default=str))  # deep copy of plain data
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError("--set", None, f"expected key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError("--set", key, f"cannot parse value {raw!r}: {exc}") from exc
        node = result
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    "--set", ".".join(parts[: i + 1]), "is not a section, cannot set a sub-field"
                )
            node = child
        node[parts[-1]] = value
    return result


def config_from_dict(cls: type[T], data: Mapping[str, Any], *, source: str = "<dict>") -> T:
    """Build and check ``cls`` from plain data (the inverse of :func:`config_to_dict`)."""
    return _build(cls, data, source, path="")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-able dict of a config dataclass (paths → str, tuples → lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        return value

    return plain(cfg)


def _build(cls: type, data: Any, source: str, path: str) -> Any:
    """``path`` is the dotted name of this section ("" at the top)."""
    if not isinstance(data, Mapping):
        raise ConfigError(source, path or None, f"expected a mapping, got {_describe(data)}")
    prefix = f"{path}." if path else ""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = str(unknown[0])
        close = difflib.get_close_matches(key, list(fields), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f"; known fields: {', '.join(fields)}"
        raise ConfigError(source, prefix + key, f"unknown field{hint}")
    kwargs = {}
    for name, f in fields.items():
        dotted = prefix + name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(source, dotted, "required field is missing")
            continue
        value = _coerce(hints[name], data[name], source, dotted)
        _check_range(f.metadata, value, source, dotted)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigFieldError as exc:
        raise ConfigError(source, prefix + exc.field, exc.problem) from exc


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '…' if len(text) > 60 else text}"


def _coerce(tp: Any, value: Any, source: str, dotted: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in the declared type."""

    def fail(expected: str) -> ConfigError:
        return ConfigError(source, dotted, f"expected {expected}, got {_describe(value)}")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise fail(" or ".join(_name(a) for a in args))
        for option in (a for a in args if a is not type(None)):
            with contextlib.suppress(ConfigError):
                return _coerce(option, value, source, dotted)
        raise fail(" or ".join(_name(a) for a in args))
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(source, dotted, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, source, dotted)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise fail("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise fail("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail("a string")
    if tp is Path:
        if isinstance(value, (str, Path)) and str(value):
            return Path(value)
        raise fail("a path")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise fail(f"a list ({_name(tp)})")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise fail(f"a list of {len(args)} items ({_name(tp)})")
            items = [
                _coerce(a, v, source, f"{dotted}[{i}]")
                for i, (a, v) in enumerate(zip(args, value, strict=True))
            ]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(item_tp, v, source, f"{dotted}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise fail("a mapping")
        value_tp = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(value_tp, v, source, f"{dotted}.{k}") for k, v in value.items()}
    raise ConfigError(source, dotted, f"unsupported field type {_name(tp)} (a bug in the config class)")


def _name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", None) if typing.get_origin(tp) is None else str(tp).replace("typing.", "")


def _check_range(metadata: Mapping[str, Any], value: Any, source: str, dotted: str) -> None:
    if value is None or not metadata:
        return
    numbers = value if isinstance(value, (tuple, list)) else [value]
    for number in numbers:
        if isinstance(number, float) and not math.isfinite(number):
            raise ConfigError(source, dotted, f"must be finite, got {number}")
        for key, op, word in (("ge", float.__ge__, ">="), ("gt", float.__gt__, ">"),
                              ("le", float.__le__, "<="), ("lt", float.__lt__, "<")):  # fmt: skip
            if key in metadata and not op(float(number), float(metadata[key])):
                raise ConfigError(
                    source, dotted, f"out of range: must be {word} {metadata[key]}, got {number}"
                )


# ----------------------------------------------------------------------------- schema for forms

MANAGED_FIELDS = frozenset(
    {"snapshot", "output_dir", "model", "eval_snapshot", "resume", "progress", "model_cache"}
)
"""Top-level fields the studio fills itself when it launches a job (never shown in its forms)."""


def config_schema(cls: type) -> list[dict[str, Any]]:
    """The fields of a config dataclass for a form, nested sections flattened to dotted names::

        [{"name": "optim.lr", "type": "float", "default": 5e-05, "help": "Peak learning rate.", "gt": 0}, ...]

    ``type``: int, float, bool, str, choice (with ``choices``), list (with ``items``: the item
    types), dict, or json; ``optional_`` in front when null is allowed. ``help`` is the first
    paragraph of the docstring under the field; ``ge``/``gt``/``le``/``lt`` come from :func:`bounded`;
    ``required`` marks a field without default; ``managed`` one of :data:`MANAGED_FIELDS`.
    """
    return _schema(cls, prefix="")


def _schema(cls: type, prefix: str) -> list[dict[str, Any]]:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    entries: list[dict[str, Any]] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        name, tp = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(tp):
            entries.extend(_schema(tp, prefix=f"{name}."))
            continue
        entry: dict[str, Any] = {"name": name, **_type_entry(tp), "help": docs.get(f.name, "")}
        if f.default is not dataclasses.MISSING:
            entry["default"] = config_to_dict(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            entry["default"] = config_to_dict(f.default_factory())
        else:
            entry["default"], entry["required"] = None, True
        entry.update({k: f.metadata[k] for k in ("ge", "gt", "le", "lt") if k in f.metadata})
        if not prefix and f.name in MANAGED_FIELDS:
            entry["managed"] = True
        entries.append(entry)
    return entries


def _type_entry(tp: Any) -> dict[str, Any]:
    """``{"type": ...}`` (+ ``choices`` / ``items``) for one annotation."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        inner = _type_entry(rest[0]) if len(rest) == 1 else {"type": "json"}
        return {**inner, "type": f"optional_{inner['type']}"}
    if origin is Literal:
        return {"type": "choice", "choices": list(args)}
    if origin in (tuple, list):
        items = [a for a in args if a is not Ellipsis] or [Any]
        return {"type": "list", "items": [_type_entry(a)["type"] for a in items]}
    if origin is dict or tp is dict:
        return {"type": "dict"}
    simple = {int: "int", float: "float", bool: "bool", str: "str", Path: "str"}
    return {"type": simple.get(tp, "json")}


def field_docs(cls: type) -> dict[str, str]:
    """``{field: first paragraph of the docstring under it}``, read from the class sources (ast).

    Merged over the MRO, parents first: an inherited field keeps its parent's docstring, and a
    subclass that redefines a field with a docstring of its own overrides it.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is not object:
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    """:func:`field_docs` of the fields written in ``cls``'s own class body."""
    import ast
    import inspect
    import itertools
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            first = inspect.cleandoc(after.value.value).split("\n\n")[0]
            docs[node.target.id] = " ".join(first.split())
    return docs


# ----------------------------------------------------------------------------- command line


def parse_recipe_args(cls: type[T], argv: list[str] | None, prog: str) -> tuple[T, argparse.Namespace]:
    """``--config FILE [--set key=value ...] [--print-config]`` → ``(config, parsed args)``.

    Without ``--config`` the config is built from the ``--set`` values alone.
    """
    parser = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").split("\n\n")[0])
    parser.add_argument("--config", help="YAML or JSON config file")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a field, e.g. optim.lr=3e-5"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as JSON and exit"
    )
    args = parser.parse_args(argv)
    if args.config:
        cfg = load_config(cls, args.config, args.set)
    else:
        cfg = config_from_dict(cls, apply_overrides({}, args.set), source="--set")
    return cfg, args


def run_recipe_cli(
    cls: type[T],
    train: Callable[..., Any],
    recipe: str,
    argv: list[str] | None,
    summary: Callable[[Any], dict[str, Any]] = lambda _result: {},
) -> int:
    """The ``main()`` every recipe shares: parse the config, train, print a one-line JSON summary.

    SIGTERM (a job cancelled by the worker) sets a flag the training loop checks after each step:
    it writes a checkpoint and returns, and the exit code is 143 so the caller can tell a stop from
    a finished run. `summary(result)` adds recipe-specific fields to the printed summary.
    """
    import signal
    import threading

    cfg, args = parse_recipe_args(cls, argv, prog=f"python -m trainers {recipe}")
    if args.print_config:
        print(json.dumps(config_to_dict(cfg), indent=2))
        return 0
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    result = train(cfg, should_stop=lambda _step: stop.is_set())
    print(
        json.dumps(
            {
                "recipe": recipe,
                "final_checkpoint": str(result.final_checkpoint) if result.final_checkpoint else None,
                "last_checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
                "steps": result.steps,
                "stopped": result.stopped,
                "seconds": round(result.seconds, 2),
                **summary(result),
                "metrics": result.metrics,
            }
        )
    )
    return 143 if result.stopped else 0
