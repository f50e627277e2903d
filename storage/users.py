"""Keyword-only CRUD over the `users` table. Never commits: the service owns the transaction."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Session, func, select

from storage.models import Role, User


def lock_users(session: Session) -> None:
    """Serialise writers that decide from a count of users (first admin, last active admin).

    SQLite's write transactions are already exclusive (BEGIN IMMEDIATE); on PostgreSQL two
    transactions could both read the same count, so the table is locked against other writers.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.exec(sa.text("LOCK TABLE users IN SHARE ROW EXCLUSIVE MODE"))


def count_users(session: Session) -> int:
    return session.exec(select(func.count()).select_from(User)).one()


def has_users(session: Session) -> bool:
    return session.exec(select(User.id).limit(1)).first() is not None


def count_active_admins(session: Session) -> int:
    stmt = select(func.count()).select_from(User).where(User.role == Role.admin, User.is_active)
    return session.exec(stmt).one()


def get_user(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


def get_user_by_name(session: Session, username: str) -> User | None:
    return session.exec(select(User).where(User.username == username)).first()


def find_casefold_twin(session: Session, username: str) -> User | None:
    """A user whose name equals `username` ignoring ASCII case (names are ASCII by validation)."""
    stmt = select(User).where(func.lower(User.username) == username.lower())
    return session.exec(stmt).first()


def list_users(session: Session) -> list[User]:
    return list(session.exec(select(User).order_by(User.username)))


def insert_user(
    session: Session, *, username: str, role: Role, password_hash: str, changed_at: datetime
) -> User:
    user = User(
        username=username,
        role=role,
        password_hash=password_hash,
        is_active=True,
        password_changed_at=changed_at,
        created_at=changed_at,
    )
    session.add(user)
    session.flush()
    return user
