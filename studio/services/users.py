"""Users and roles: argon2 password hashes, the first admin, and the role check every service uses.

Roles: `admin` does everything; `annotator` annotates (pairwise and segments); `rater` votes in
the arena. `require(username, *roles)` is the one place a role is checked; an admin passes every
check. There is no default password anywhere: the first admin is created through the one-time
setup page or `studio create-admin`, and every later account by an admin.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from storage import users as crud
from storage.db import Database
from storage.models import Role, User, utcnow
from studio.services.errors import Conflict, Forbidden, NotFound, ServiceError, Unauthorized
from studio.settings import Settings

USERNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MIN_PASSWORD = 8
MAX_PASSWORD = 1024
"""Upper bound so nobody can make the server hash megabytes per login attempt."""
ROLES = tuple(r.value for r in Role)


@dataclass(frozen=True)
class UserInfo:
    id: int
    username: str
    role: str
    is_active: bool
    created_at: datetime
    last_login_at: datetime | None


def as_utc(moment: datetime | None) -> datetime | None:
    """SQLite hands datetimes back without a zone; every stored time is UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def validate_username(username: str) -> str:
    if not isinstance(username, str) or not USERNAME_RE.fullmatch(username):
        raise ServiceError(
            "a username is 1 to 64 characters: letters A-Z and a-z, digits, and the characters _ . -"
        )
    return username


def validate_password(password: str, username: str = "") -> str:
    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        raise ServiceError(f"a password needs at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise ServiceError(f"a password has at most {MAX_PASSWORD} characters")
    if username and password.casefold() == username.casefold():
        raise ServiceError("the password must not be the username")
    return password


def validate_role(role: str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise ServiceError(f"role must be one of {', '.join(ROLES)}, got {role!r}") from None


def _info(user: User) -> UserInfo:
    return UserInfo(
        id=user.id,
        username=user.username,
        role=str(user.role),
        is_active=bool(user.is_active),
        created_at=as_utc(user.created_at),
        last_login_at=as_utc(user.last_login_at),
    )


class UserService:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        *,
        hasher: PasswordHasher | None = None,
        clock: Callable[[], datetime] = utcnow,
    ):
        self.db = db
        self.settings = settings
        self.hasher = hasher or PasswordHasher()
        self.clock = clock
        self._dummy_hash: str | None = None
        self._dummy_lock = threading.Lock()

    # ----------------------------------------------------------------------- first run

    def needs_setup(self) -> bool:
        """True while the database has no user at all (the server then offers the setup page)."""
        with self.db.read() as s:
            return not crud.has_users(s)

    def create_first_admin(self, username: str, password: str) -> UserInfo:
        """Create the first admin; refused (Conflict) once any user exists, also under a race."""
        validate_username(username)
        validate_password(password, username)
        password_hash = self.hasher.hash(password)
        with self.db.write() as s:
            crud.lock_users(s)
            if crud.has_users(s):
                raise Conflict("the studio already has users; an admin adds new ones")
            user = crud.insert_user(
                s, username=username, role=Role.admin, password_hash=password_hash, changed_at=self.clock()
            )
            return _info(user)

    def add_user_as_operator(self, username: str, role: str, password: str) -> UserInfo:
        """Add a user without a signed-in actor: only for `studio create-admin/add-user` on the server."""
        return self._insert(username, validate_role(role), password)

    # ----------------------------------------------------------------------- sign-in

    def authenticate(self, username: str, password: str) -> UserInfo | None:
        """The user if the password is right and the account active, else None.

        An unknown name costs one hash verification too, so timing does not tell which names exist.
        """
        if not isinstance(username, str) or not isinstance(password, str) or len(password) > MAX_PASSWORD:
            return None
        with self.db.read() as s:
            user = crud.get_user_by_name(s, username) if USERNAME_RE.fullmatch(username) else None
        if user is None or not user.is_active or not user.password_hash:
            self._verify(self._dummy(), password)
            return None
        if not self._verify(user.password_hash, password):
            return None
        with self.db.write() as s:
            row = crud.get_user(s, user.id)
            if row is None or not row.is_active:
                return None
            if self.hasher.check_needs_rehash(row.password_hash):
                row.password_hash = self.hasher.hash(password)
            row.last_login_at = self.clock()
            s.add(row)
            return _info(row)

    def by_id(self, user_id: int) -> User | None:
        """The stored user (detached) for a session's user id, or None."""
        with self.db.read() as s:
            return crud.get_user(s, user_id)

    def get(self, username: str) -> UserInfo | None:
        with self.db.read() as s:
            user = crud.get_user_by_name(s, username)
            return _info(user) if user else None

    # ----------------------------------------------------------------------- the role check

    def require(self, username: str | None, *roles: str) -> User:
        """The active user named `username`, if their role is one of `roles` (none given: any role).

        Raises Unauthorized when nobody is signed in or the account is unknown or deactivated, and
        Forbidden when the role does not allow the action. An admin passes every check.
        """
        if not username:
            raise Unauthorized("sign in first")
        with self.db.read() as s:
            user = crud.get_user_by_name(s, username)
        if user is None or not user.is_active:
            raise Unauthorized("this account does not exist or has been deactivated; sign in again")
        role = str(user.role)
        if roles and role != Role.admin and role not in roles:
            allowed = " or ".join(roles)
            raise Forbidden(f"this needs the {allowed} role; you are signed in as {role}")
        return user

    # ----------------------------------------------------------------------- admin actions

    def list_users(self, actor: str | None) -> list[UserInfo]:
        self.require(actor, Role.admin.value)
        with self.db.read() as s:
            return [_info(u) for u in crud.list_users(s)]

    def add_user(self, actor: str | None, username: str, role: str, password: str) -> UserInfo:
        self.require(actor, Role.admin.value)
        return self._insert(username, validate_role(role), password)

    def set_password(self, actor: str | None, username: str, password: str) -> None:
        """An admin sets anyone's password, a user their own; every session of that user ends."""
        me = self.require(actor)
        if me.role != Role.admin and me.username != username:
            raise Forbidden("only an admin can set another user's password")
        validate_password(password, username)
        password_hash = self.hasher.hash(password)
        with self.db.write() as s:
            user = self._target(s, username)
            user.password_hash = password_hash
            user.password_changed_at = self.clock()
            s.add(user)

    def set_role(self, actor: str | None, username: str, role: str) -> UserInfo:
        self.require(actor, Role.admin.value)
        new_role = validate_role(role)
        with self.db.write() as s:
            crud.lock_users(s)
            user = self._target(s, username)
            if user.role == Role.admin and new_role != Role.admin and user.is_active:
                self._keep_one_admin(s)
            user.role = new_role
            s.add(user)
            s.flush()
            return _info(user)

    def set_active(self, actor: str | None, username: str, active: bool) -> UserInfo:
        self.require(actor, Role.admin.value)
        with self.db.write() as s:
            crud.lock_users(s)
            user = self._target(s, username)
            if not active and user.is_active and user.role == Role.admin:
                self._keep_one_admin(s)
            user.is_active = bool(active)
            s.add(user)
            s.flush()
            return _info(user)

    # ----------------------------------------------------------------------- helpers

    def _insert(self, username: str, role: Role, password: str) -> UserInfo:
        validate_username(username)
        validate_password(password, username)
        password_hash = self.hasher.hash(password)
        with self.db.write() as s:
            twin = crud.find_casefold_twin(s, username)
            if twin is not None:
                same = twin.username == username
                raise Conflict(
                    f"a user named {twin.username!r} already exists"
                    + ("" if same else f" (names differ only in case from {username!r})")
                )
            return _info(
                crud.insert_user(
                    s, username=username, role=role, password_hash=password_hash, changed_at=self.clock()
                )
            )

    @staticmethod
    def _target(s, username: str) -> User:
        user = crud.get_user_by_name(s, username) if isinstance(username, str) else None
        if user is None:
            raise NotFound(f"no user named {username!r}")
        return user

    @staticmethod
    def _keep_one_admin(s) -> None:
        if crud.count_active_admins(s) <= 1:
            raise ServiceError("this is the last active admin; make another user admin first")

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return self.hasher.verify(password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def _dummy(self) -> str:
        with self._dummy_lock:
            if self._dummy_hash is None:
                self._dummy_hash = self.hasher.hash("not a password of anyone")
            return self._dummy_hash
