"""Feedback Studio entry point: settings → engine → migrations → services → UI → server → uvicorn."""

from __future__ import annotations

import signal

from studio.settings import Settings, set_offline_env

set_offline_env()  # before gradio / transformers are imported

from storage.db import Database, upgrade  # noqa: E402
from studio.services import Services  # noqa: E402
from studio.ui import build_app  # noqa: E402


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(settings: Settings | None = None) -> None:
    import uvicorn

    from studio.server import build_server

    settings = settings or Settings.from_env()
    db = Database.from_url(settings.database_url)
    upgrade(db.engine)
    services = Services.build(settings, db)
    app = build_server(settings, services, build_app(services))
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    host = f"[{host}]" if ":" in host else host
    base = f"http://{host}:{settings.port}"
    if app.state.setup_path:
        print(
            "\nNo user exists yet. Create the first admin here (one-time link, also saved in "
            f"{settings.data_dir / 'setup_token'}):\n\n    {base}{app.state.setup_path}\n"
            "\n(or run: studio create-admin --username NAME)\n",
            flush=True,
        )
    print(f"Feedback Studio at {base}", flush=True)
    worker = None
    if settings.start_worker:  # training jobs; STUDIO_WORKER=0 leaves them to `studio worker` processes
        from studio.worker import start_in_thread

        worker = start_in_thread(db, settings)
        # uvicorn re-raises a SIGTERM it caught once it has shut down; under the default handler that
        # would end the process before the `finally` below stops the worker (its trainer would die with
        # SIGKILL, without a checkpoint). Exit through SystemExit instead, so the `finally` runs.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    # One process, one worker: Gradio's queue and the login throttle live in this process's memory.
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, workers=1, log_level="warning")
    finally:
        if worker is not None:  # a running job gets SIGTERM, checkpoints, and resumes at the next start
            thread, stop = worker
            stop.set()
            thread.join(timeout=60)


if __name__ == "__main__":
    main()
