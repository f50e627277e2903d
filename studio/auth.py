"""Sign-in for the studio's server: a signed session cookie, login throttling, first-run setup.

The cookie `studio_session` holds `base64url(json payload) . base64url(hmac-sha256)` with the
payload `{"uid": user id, "iat": issued at, "seen": last seen}` (epoch seconds). The key is 32
random bytes generated once into `<data_dir>/secret_key` (mode 0600). A session is valid while:
the signature matches, the user exists and is active, it was issued after the user's last
password change, and it was seen within the last 12 hours. `SessionMiddleware` checks it once
per request, puts the username into the ASGI scope (`gradio_user`/`api_user` read it from there),
and re-issues the cookie with a new last-seen at most every 5 minutes.

Logging out deletes the cookie in that browser only; changing the password ends every session.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastapi import HTTPException, Request, status
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.requests import cookie_parser
from starlette.responses import RedirectResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from studio.services.users import UserService, as_utc

COOKIE_NAME = "studio_session"
IDLE_TIMEOUT_S = 12 * 3600
REFRESH_AFTER_S = 5 * 60
CLOCK_SKEW_S = 60
SECRET_FILE = "secret_key"
SETUP_TOKEN_FILE = "setup_token"
SCOPE_USER = "studio.user"
"""ASGI scope key holding the signed-in username (or None), set by `SessionMiddleware`."""

Clock = Callable[[], float]


# --------------------------------------------------------------------------- files with secrets


def _write_private(path: Path, text: str, *, replace: bool) -> bool:
    """Write `text` to `path` with mode 0600, atomically (temp file + link/rename in the same folder).

    replace=False never overwrites: returns False when the file already exists (another process won).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def load_or_create_secret(data_dir: Path) -> bytes:
    """The server's signing key: 32 random bytes in `<data_dir>/secret_key`, created on first use."""
    path = Path(data_dir) / SECRET_FILE
    if not path.exists():
        _write_private(path, secrets.token_hex(32) + "\n", replace=False)
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)  # someone loosened it; the key is only for this server
    key = bytes.fromhex(path.read_text().strip())
    if len(key) < 32:
        raise ValueError(f"{path} holds a key shorter than 32 bytes; delete it to make a new one")
    return key


def write_setup_token(data_dir: Path) -> str:
    token = secrets.token_urlsafe(32)
    _write_private(Path(data_dir) / SETUP_TOKEN_FILE, token + "\n", replace=True)
    return token


def remove_setup_token(data_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (Path(data_dir) / SETUP_TOKEN_FILE).unlink()


# --------------------------------------------------------------------------- the cookie


@dataclass(frozen=True)
class Session:
    user_id: int
    issued_at: float
    last_seen: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionCodec:
    """Signs and checks cookie values; knows nothing about users."""

    def __init__(self, key: bytes):
        self._key = key

    def _sign(self, body: str) -> str:
        return _b64(hmac.new(self._key, body.encode("ascii"), hashlib.sha256).digest())

    def encode(self, session: Session) -> str:
        payload = {"uid": session.user_id, "iat": session.issued_at, "seen": session.last_seen}
        body = _b64(json.dumps(payload, separators=(",", ":")).encode())
        return f"{body}.{self._sign(body)}"

    def decode(self, value: str | None) -> Session | None:
        """The session in a cookie value, or None if it is malformed or the signature is wrong."""
        # Non-ASCII (the cookie header is decoded as latin-1) would make the ASCII signing and
        # compare_digest raise, turning a junk cookie into a 500 on every request.
        if not value or len(value) > 512 or not value.isascii() or value.count(".") != 1:
            return None
        body, signature = value.split(".")
        if not hmac.compare_digest(signature, self._sign(body)):
            return None
        try:
            data = json.loads(_unb64(body))
            uid, iat, seen = data["uid"], data["iat"], data["seen"]
        except (ValueError, KeyError, TypeError):
            return None
        if type(uid) is not int or not all(isinstance(x, int | float) for x in (iat, seen)):
            return None
        return Session(user_id=uid, issued_at=float(iat), last_seen=float(seen))


# --------------------------------------------------------------------------- login throttling


class LoginThrottle:
    """At `max_failures` failed logins for one username within `window_s`, that name is locked for
    `lockout_s`: every attempt is refused (HTTP 429), the right password included.

    Attempts still being checked (`start` .. `failure`/`success`) count toward `max_failures`, so
    guesses sent in parallel are throttled like guesses sent one after another.

    In memory (one server process), thread-safe; the clock is injectable for tests.
    """

    MAX_NAMES = 10_000
    BUSY_RETRY_S = 1.0
    """Retry-after for an attempt refused because `max_failures` attempts are still in flight."""

    def __init__(
        self, max_failures: int = 5, window_s: float = 60, lockout_s: float = 60, clock: Clock = time.time
    ):
        self.max_failures = max_failures
        self.window_s = window_s
        self.lockout_s = lockout_s
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._locked_until: dict[str, float] = {}
        self._in_flight: dict[str, int] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(username: str) -> str:
        return (username or "")[:128].casefold()

    def retry_after(self, username: str) -> float | None:
        """Seconds until `username` may try again, or None when it is not locked."""
        key, now = self._key(username), self.clock()
        with self._lock:
            until = self._locked_until.get(key)
            if until is None:
                return None
            if now >= until:
                del self._locked_until[key]
                self._failures.pop(key, None)
                return None
            return until - now

    def start(self, username: str) -> float | None:
        """`retry_after`; when None, one attempt is counted in flight until `failure` or `success`."""
        wait = self.retry_after(username)
        if wait is not None:
            return wait
        key, now = self._key(username), self.clock()
        with self._lock:
            recent = sum(1 for t in self._failures.get(key, ()) if now - t <= self.window_s)
            if recent + self._in_flight.get(key, 0) >= self.max_failures:
                return self.BUSY_RETRY_S
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
        return None

    def _done(self, key: str) -> None:
        left = self._in_flight.pop(key, 0) - 1
        if left > 0:
            self._in_flight[key] = left

    def failure(self, username: str) -> None:
        key, now = self._key(username), self.clock()
        with self._lock:
            self._done(key)
            if len(self._failures) >= self.MAX_NAMES:
                self._prune(now)
            recent = self._failures.setdefault(key, deque())
            recent.append(now)
            while recent and now - recent[0] > self.window_s:
                recent.popleft()
            if len(recent) >= self.max_failures:
                self._locked_until[key] = now + self.lockout_s

    def success(self, username: str) -> None:
        key = self._key(username)
        with self._lock:
            self._done(key)
            self._failures.pop(key, None)

    def _prune(self, now: float) -> None:
        for key in [k for k, q in self._failures.items() if not q or now - q[-1] > self.window_s]:
            del self._failures[key]
        for key in [k for k, t in self._locked_until.items() if now >= t]:
            del self._locked_until[key]
        if len(self._failures) >= self.MAX_NAMES:  # a flood of names: forget the oldest half
            for key in sorted(self._failures, key=lambda k: self._failures[k][-1])[: self.MAX_NAMES // 2]:
                del self._failures[key]


# --------------------------------------------------------------------------- sessions and setup


class Auth:
    """Everything the server needs to sign people in: users, the cookie codec, throttle, setup token."""

    def __init__(
        self,
        users: UserService,
        data_dir: Path,
        *,
        clock: Clock = time.time,
        throttle: LoginThrottle | None = None,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        refresh_after_s: float = REFRESH_AFTER_S,
    ):
        self.users = users
        self.data_dir = Path(data_dir)
        self.clock = clock
        self.codec = SessionCodec(load_or_create_secret(self.data_dir))
        self.throttle = throttle or LoginThrottle(clock=clock)
        self.idle_timeout_s = idle_timeout_s
        self.refresh_after_s = refresh_after_s
        self.setup_token: str | None = None

    # -- sessions

    def new_cookie(self, user_id: int) -> str:
        now = self.clock()
        return self.codec.encode(Session(user_id=user_id, issued_at=now, last_seen=now))

    def resolve(self, cookie: str | None) -> tuple[str, Session] | None:
        """(username, session) for a valid cookie value, else None. Reads the user from the database."""
        session = self.codec.decode(cookie)
        if session is None:
            return None
        now = self.clock()
        if now - session.last_seen > self.idle_timeout_s or session.issued_at > now + CLOCK_SKEW_S:
            return None
        user = self.users.by_id(session.user_id)
        if user is None or not user.is_active or not user.password_hash:
            return None
        changed = as_utc(user.password_changed_at)
        if changed is not None and session.issued_at < changed.timestamp():
            return None
        return user.username, session

    def refreshed(self, session: Session) -> str | None:
        """A new cookie value with last-seen = now, when the old one is at least 5 minutes stale."""
        now = self.clock()
        if now - session.last_seen < self.refresh_after_s:
            return None
        return self.codec.encode(Session(session.user_id, session.issued_at, now))

    # -- first run

    def prepare_setup(self) -> str | None:
        """On a database without users: a fresh one-time setup token (also in `<data_dir>/setup_token`)."""
        if self.users.needs_setup():
            self.setup_token = write_setup_token(self.data_dir)
        else:
            self.setup_token = None
            remove_setup_token(self.data_dir)
        return self.setup_token

    def setup_open(self) -> bool:
        """True while the setup page may be used: no user yet and a token was issued."""
        if self.setup_token is None:
            return False
        if not self.users.needs_setup():  # e.g. `studio create-admin` ran meanwhile
            self.finish_setup()
            return False
        return True

    def setup_token_ok(self, token: str | None) -> bool:
        expected = self.setup_token
        return bool(expected and token and hmac.compare_digest(token.encode(), expected.encode()))

    def finish_setup(self) -> None:
        self.setup_token = None
        remove_setup_token(self.data_dir)


def cookie_header(value: str, *, secure: bool, max_age: int = IDLE_TIMEOUT_S) -> str:
    parts = [f"{COOKIE_NAME}={value}", "Path=/", f"Max-Age={max_age}", "HttpOnly", "SameSite=Lax"]
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def clear_cookie_header(*, secure: bool) -> str:
    return cookie_header("", secure=secure, max_age=0)


class SessionMiddleware:
    """Resolves the session cookie once per request into `scope["studio.user"]`.

    Also: an anonymous browser GET of `/` is redirected to `/login` (or `/setup` before the first
    user exists), and a valid cookie is re-issued with a fresh last-seen every 5 minutes.
    """

    def __init__(self, app: ASGIApp, auth: Auth):
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        cookie = None
        for name, value in scope.get("headers", []):
            if name == b"cookie":
                cookie = cookie_parser(value.decode("latin-1")).get(COOKIE_NAME) or cookie
        found = await run_in_threadpool(self.auth.resolve, cookie) if cookie else None
        scope[SCOPE_USER] = found[0] if found else None
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if found is None and scope["method"] in ("GET", "HEAD") and scope["path"] == "/":
            setup = await run_in_threadpool(self.auth.setup_open)
            await RedirectResponse("/setup" if setup else "/login", status_code=302)(scope, receive, send)
            return
        new_value = self.auth.refreshed(found[1]) if found else None
        if new_value is None:
            await self.app(scope, receive, send)
            return
        secure = scope.get("scheme") == "https"

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                already = any(
                    v.startswith(f"{COOKIE_NAME}=") for k, v in headers.items() if k == "set-cookie"
                )
                if not already:
                    headers.append("set-cookie", cookie_header(new_value, secure=secure))
            await send(message)

        await self.app(scope, receive, send_with_cookie)


# --------------------------------------------------------------------------- identity for handlers


def gradio_user(request: Request) -> str | None:
    """The signed-in username for `gr.mount_gradio_app(auth_dependency=...)`; None → Gradio answers 401."""
    return request.scope.get(SCOPE_USER)


def api_user(request: Request) -> str:
    """FastAPI dependency: the signed-in username, or HTTP 401."""
    username = request.scope.get(SCOPE_USER)
    if not username:
        raise HTTPException(status_code=status.HTTP_401_UNAUTHORIZED, detail="sign in first")
    return username
