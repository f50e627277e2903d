"""Feedback Studio entry point: settings → engine → migrations → services → UI → launch."""

from __future__ import annotations

from studio.settings import Settings, set_offline_env

set_offline_env()  # before gradio / transformers are imported

from storage.db import Database, upgrade  # noqa: E402
from studio.services import Services  # noqa: E402
from studio.ui import build_app, launch_options  # noqa: E402


def main(settings: Settings | None = None) -> None:
    settings = settings or Settings.from_env()
    db = Database.from_url(settings.database_url)
    upgrade(db.engine)
    services = Services.build(settings, db)
    demo = build_app(services)
    demo.launch(**launch_options(settings))


if __name__ == "__main__":
    main()
