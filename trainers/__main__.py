"""``python -m trainers <recipe> --config cfg.yaml [--set key=value ...]`` — run a recipe headless.

``python -m trainers --schema`` prints every recipe's form schema as JSON (see :func:`recipe_schema`).
``python -m trainers score ...`` scores (prompt, response) rows with a reward model (see ``COMMANDS``).

Also under ``accelerate launch -m trainers <recipe> …`` on several GPUs. Recipes are registered by
name → module (imported only when chosen); each module has ``main(argv) -> int``.

Exit status: 0 done; 143 stopped by SIGTERM after writing a checkpoint; 2 bad config or data;
3 non-finite loss or gradient; 4 disk full; 5 an untrustworthy checkpoint; 6 other checkpoint I/O.
Failures print one line ``error[<code>]: <message>`` on stderr (codes: bad_input, nan_loss,
disk_full, bad_checkpoint, io), which the studio's job worker stores as the failure reason.
"""

from __future__ import annotations

import importlib
import os
import sys

RECIPES: dict[str, str] = {
    "reward_model": "trainers.recipes.reward_model",
    "segment_reward_model": "trainers.recipes.segment_reward_model",
    "dpo": "trainers.recipes.dpo",
    "reinforce": "trainers.recipes.reinforce",
    "ppo": "trainers.recipes.ppo",
    "nlpo": "trainers.recipes.nlpo",
    "filtered_mle": "trainers.recipes.filtered_mle",
    "rwr": "trainers.recipes.rwr",
    "dt": "trainers.recipes.dt",
}
"""Recipe name → module with ``main(argv)``."""

COMMANDS: dict[str, str] = {"score": "trainers.score_cli", "offline_data": "trainers.offline_data"}
"""Subcommands that are not recipes (no config schema, no checkpoint written) → module with ``main(argv)``.
``score``: ``python -m trainers score --checkpoint DIR --input in.jsonl --output out.jsonl`` (reward-model
scores of (prompt, response) rows; see :mod:`trainers.score_cli`). ``offline_data``: ``python -m trainers
offline_data --config data.yaml`` (the offline recipes' data stage; see :mod:`trainers.offline_data`)."""

EXIT_CODES = {"bad_input": 2, "nan_loss": 3, "disk_full": 4, "bad_checkpoint": 5, "io": 6}


def _usage() -> str:
    names = "\n".join(f"  {name}" for name in RECIPES)
    return (
        f"usage: python -m trainers <recipe> --config cfg.yaml [--set key=value ...]\n\nrecipes:\n{names}\n\n"
        "other commands:\n  score --checkpoint DIR --input in.jsonl --output out.jsonl"
    )


def failure_code(exc: BaseException) -> str | None:
    """The machine-readable failure code of an exception a recipe raised (None: a bug, re-raise)."""
    from trainers.config import ConfigError
    from trainers.data import SnapshotError
    from trainers.models import ModelNotFoundError

    code = getattr(exc, "code", None)
    if isinstance(code, str) and code in EXIT_CODES:
        return code
    if isinstance(exc, (ConfigError, SnapshotError, ModelNotFoundError)):
        return "bad_input"
    return None


def recipe_schema(name: str) -> dict:
    """What the studio needs to offer recipe ``name`` in a form (see ``--schema`` above).

    From the recipe module's constants ``CONFIG_CLASS``, ``CHECKPOINT_KIND``, ``SNAPSHOT_KINDS`` and
    ``BASE_KIND`` (default ``policy``).
    """
    from trainers.config import config_schema

    module = importlib.import_module(RECIPES[name])
    cls = module.CONFIG_CLASS
    return {
        "doc": " ".join((cls.__doc__ or "").split("\n\n")[0].split()),
        "checkpoint_kind": module.CHECKPOINT_KIND,
        "snapshot_kinds": list(module.SNAPSHOT_KINDS),
        "base_kind": getattr(module, "BASE_KIND", "policy"),
        "fields": config_schema(cls),
    }


def print_schema() -> int:
    """``--schema``: JSON ``{recipe: recipe_schema(recipe)}`` on stdout; a recipe that fails to import
    is left out with an ``error[bad_input]`` line on stderr (exit status 2 if any did)."""
    import json

    schemas, failed = {}, False
    for name in RECIPES:
        try:
            schemas[name] = recipe_schema(name)
        except Exception as exc:  # one broken recipe must not hide the others
            print(f"error[bad_input]: recipe {name!r}: {type(exc).__name__}: {exc}", file=sys.stderr)
            failed = True
    print(json.dumps(schemas))
    return 2 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--schema":
        return print_schema()
    name, rest = argv[0], argv[1:]
    if name not in RECIPES and name not in COMMANDS:
        print(f"error[bad_input]: unknown recipe {name!r}\n{_usage()}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    module = importlib.import_module(RECIPES.get(name) or COMMANDS[name])
    try:
        return module.main(rest)
    except Exception as exc:
        code = failure_code(exc)
        if code is None:
            raise
        print(f"error[{code}]: {exc}", file=sys.stderr)
        return EXIT_CODES[code]


if __name__ == "__main__":
    sys.exit(main())
