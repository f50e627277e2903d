"""Alembic environment: the studio's metadata, batch mode on SQLite, URL from the config."""

from __future__ import annotations

import os

import sqlalchemy as sa
from alembic import context

from storage import models

config = context.config
target_metadata = models.metadata


def _url() -> str:
    """`-x url=...` on the alembic command line, else STUDIO_DATABASE_URL, else the config's URL.

    The studio itself passes the URL through the config (storage.db.alembic_config).
    """
    return (
        context.get_x_argument(as_dictionary=True).get("url")
        or (os.environ.get("STUDIO_DATABASE_URL") if config.config_file_name else None)
        or config.get_main_option("sqlalchemy.url")
    )


def run_migrations_offline() -> None:
    url = _url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _configure_and_run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    given = config.attributes.get("connection")
    if given is not None:  # an in-memory database: only this connection sees it
        _configure_and_run(given)
        return
    url = _url()
    # A plain engine (no studio pragmas): batch mode copies tables, which must not trip
    # foreign-key enforcement half way.
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        _configure_and_run(connection)
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
