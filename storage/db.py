"""Engine factory, transactions and migrations.

SQLite (the embedded default) gets, on every connection: WAL, busy_timeout 5000 ms,
synchronous=NORMAL and foreign keys. pysqlite's legacy transaction handling is switched off
and we emit BEGIN ourselves: `BEGIN IMMEDIATE` for write transactions, because a deferred
transaction that reads then writes fails at once with SQLITE_BUSY under WAL when another writer
got in between (the busy timeout does not apply to that upgrade; see reliability.md §2.1).

PostgreSQL is reached through the same `make_engine(url)`; writes are ordinary transactions.

CRUD functions never commit: the caller opens `db.write()` (or `db.read()`) and owns the
transaction.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Engine
from sqlmodel import Session

SQLITE_PRAGMAS = {
    "journal_mode": "WAL",
    "busy_timeout": 5000,
    "synchronous": "NORMAL",
    "foreign_keys": "ON",
}
_BEGIN_OPTION = "studio_sqlite_begin"
MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def sqlite_url(path: str | os.PathLike[str]) -> str:
    return f"sqlite:///{Path(path).resolve()}"


POOL_SIZE = 10
MAX_OVERFLOW = 20
POOL_CAPACITY = POOL_SIZE + MAX_OVERFLOW
"""Connections one engine opens at most (Gradio's queue limits are checked against it in the UI)."""


def make_engine(
    url: str, *, pool_size: int = POOL_SIZE, max_overflow: int = MAX_OVERFLOW, echo: bool = False
) -> Engine:
    """Create an engine for a SQLite file or a PostgreSQL URL, with the studio's settings."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if not database or database == ":memory:":
            # One shared connection, or each pooled connection would see its own empty database.
            engine = sa.create_engine(
                url, echo=echo, connect_args={"check_same_thread": False}, poolclass=sa.pool.StaticPool
            )
            _install_sqlite_hooks(engine)
            return engine
        Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            url,
            echo=echo,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=pool_size,
            max_overflow=max_overflow,
        )
        _install_sqlite_hooks(engine)
        return engine
    return sa.create_engine(
        url,
        echo=echo,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_pre_ping=True,
        pool_recycle=1800,
    )


def _install_sqlite_hooks(engine: Engine) -> None:
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # pragma: no cover - exercised through every test
        # Autocommit at the driver level: SQLAlchemy's "begin" hook below emits BEGIN itself.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        for name, value in SQLITE_PRAGMAS.items():
            cur.execute(f"PRAGMA {name}={value}")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn):
        mode = conn.get_execution_options().get(_BEGIN_OPTION, "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def read_pragmas(engine: Engine) -> dict[str, str | int]:
    with engine.connect() as conn:
        return {name: conn.exec_driver_sql(f"PRAGMA {name}").scalar() for name in SQLITE_PRAGMAS}


class Database:
    """The engine plus the two kinds of transaction the services use."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._write_engine = engine.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})

    @classmethod
    def from_url(cls, url: str, **kw) -> Database:
        return cls(make_engine(url, **kw))

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """A write transaction (BEGIN IMMEDIATE on SQLite); commits on success, rolls back on error."""
        with Session(self._write_engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only unit of work; nothing is committed.

        Closing (not rolling back) ends the transaction while keeping loaded objects usable
        after the block: a rollback would expire them.
        """
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


# --------------------------------------------------------------------------- migrations


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """One process migrates at a time: a file lock beside a SQLite file, an advisory lock on PostgreSQL."""
    if is_sqlite(engine):
        database = engine.url.database
        if not database or database == ":memory:":
            yield
            return
        lock_path = Path(database).with_suffix(".migrate.lock")
        with open(lock_path, "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
    else:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT pg_advisory_lock(727274)")
            try:
                yield
            finally:
                conn.exec_driver_sql("SELECT pg_advisory_unlock(727274)")


def _in_memory(engine: Engine) -> bool:
    return is_sqlite(engine) and engine.url.database in (None, "", ":memory:")


def _run(engine: Engine, fn, *args) -> None:
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    if _in_memory(engine):
        # Alembic would open a second, empty in-memory database: hand it our one connection.
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            fn(cfg, *args)
        return
    fn(cfg, *args)


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to `revision` (idempotent)."""
    with _migration_lock(engine):
        _run(engine, command.upgrade, revision)


def downgrade(engine: Engine, revision: str = "base") -> None:
    with _migration_lock(engine):
        _run(engine, command.downgrade, revision)


def check(engine: Engine) -> None:
    """Raise `alembic.util.exc.AutogenerateDiffsDetected` if the models and migrations disagree."""
    _run(engine, command.check)
