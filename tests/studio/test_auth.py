"""Users, sessions and sign-in: hashing, the cookie (tamper, idle expiry, password change), login
lockout with an injected clock, first-run setup, and the last-admin rule."""

from __future__ import annotations

import stat
import threading
import time
from datetime import UTC, datetime

import gradio as gr
import pytest
from argon2 import PasswordHasher
from fastapi.testclient import TestClient
from sqlmodel import func, select

from storage import models as m
from storage.db import Database, sqlite_url
from studio.auth import (
    COOKIE_NAME,
    IDLE_TIMEOUT_S,
    SECRET_FILE,
    SETUP_TOKEN_FILE,
    Auth,
    LoginThrottle,
    Session,
    SessionCodec,
    load_or_create_secret,
)
from studio.server import build_server
from studio.services import Services
from studio.services.errors import Conflict, Forbidden, NotFound, ServiceError, Unauthorized
from studio.services.users import UserService
from studio.settings import Settings

FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
T0 = 1_900_000_000.0


class FakeClock:
    """One clock for the auth layer (epoch seconds) and the user service (aware datetimes)."""

    def __init__(self, t: float = T0):
        self.t = t

    def time(self) -> float:
        return self.t

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.t, UTC)

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url="sqlite://")


@pytest.fixture
def users(db, settings, clock) -> UserService:
    return UserService(db, settings, hasher=FAST_HASHER, clock=clock.now)


@pytest.fixture
def auth(users, settings, clock) -> Auth:
    return Auth(users, settings.data_dir, clock=clock.time)


def _count_users(db) -> int:
    with db.read() as s:
        return s.exec(select(func.count()).select_from(m.User)).one()


# --------------------------------------------------------------------------- users and passwords


def test_passwords_are_stored_as_argon2_hashes_and_checked(db, users):
    users.create_first_admin("root", "correct horse")
    with db.read() as s:
        stored = s.exec(select(m.User.password_hash)).one()
    assert stored.startswith("$argon2id$") and "correct horse" not in stored
    assert users.authenticate("root", "correct horse").username == "root"
    assert users.authenticate("root", "correct horsE") is None
    assert users.authenticate("nobody", "correct horse") is None
    assert users.authenticate("root", "x" * 5000) is None
    assert users.get("root").last_login_at is not None


@pytest.mark.parametrize("name", ["", "a" * 65, "bad name", "ünï", "a/b", "x;y", "<b>"])
def test_bad_usernames_are_refused(users, name):
    with pytest.raises(ServiceError, match="username"):
        users.create_first_admin(name, "long enough pw")


def test_weak_passwords_are_refused(users):
    for password in ["", "short", "1234567"]:
        with pytest.raises(ServiceError, match="at least 8"):
            users.create_first_admin("root", password)
    with pytest.raises(ServiceError, match="must not be the username"):
        users.create_first_admin("rootroot", "RootRoot")
    assert users.needs_setup()


def test_first_admin_only_once_even_under_a_race(db, users):
    results: list[object] = []
    barrier = threading.Barrier(4)

    def attempt(i: int) -> None:
        barrier.wait()
        try:
            results.append(users.create_first_admin(f"admin{i}", "long enough pw"))
        except Conflict as exc:
            results.append(exc)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(not isinstance(r, Exception) for r in results) == 1
    assert _count_users(db) == 1
    assert not users.needs_setup()
    with pytest.raises(Conflict):
        users.create_first_admin("late", "long enough pw")


def test_roles_are_checked_in_the_database(users):
    users.create_first_admin("root", "long enough pw")
    users.add_user("root", "ann", "annotator", "ann password")
    users.add_user("root", "ray", "rater", "ray password")
    assert users.require("ann", "annotator").username == "ann"
    assert users.require("root", "annotator").username == "root"  # an admin passes every check
    assert users.require("ray").username == "ray"  # no roles: any active user
    with pytest.raises(Forbidden):
        users.require("ray", "annotator")
    with pytest.raises(Unauthorized):
        users.require(None)
    with pytest.raises(Unauthorized):
        users.require("ghost")
    with pytest.raises(Forbidden):
        users.add_user("ann", "eve", "admin", "eve password")
    with pytest.raises(Forbidden):
        users.set_role("ann", "ann", "admin")
    with pytest.raises(Forbidden):
        users.set_password("ann", "root", "taken over!")
    with pytest.raises(Conflict, match="differ only in case"):
        users.add_user("root", "ANN", "annotator", "other password")
    with pytest.raises(NotFound):
        users.set_role("root", "ghost", "rater")
    with pytest.raises(ServiceError, match="role must be one of"):
        users.add_user("root", "zed", "superuser", "zed password")
    users.set_active("root", "ann", False)
    with pytest.raises(Unauthorized):
        users.require("ann")
    assert users.authenticate("ann", "ann password") is None
    users.set_password("ray", "ray", "a new ray password")  # a user may change their own
    assert users.authenticate("ray", "a new ray password") is not None


def test_the_last_active_admin_cannot_be_demoted_or_deactivated(users):
    users.create_first_admin("root", "long enough pw")
    with pytest.raises(ServiceError, match="last active admin"):
        users.set_role("root", "root", "annotator")
    with pytest.raises(ServiceError, match="last active admin"):
        users.set_active("root", "root", False)
    users.add_user("root", "second", "admin", "second password")
    users.set_active("root", "second", False)  # an inactive admin does not count
    with pytest.raises(ServiceError, match="last active admin"):
        users.set_role("root", "root", "rater")
    users.set_active("root", "second", True)
    assert users.set_role("second", "root", "annotator").role == "annotator"
    with pytest.raises(ServiceError, match="last active admin"):
        users.set_active("second", "second", False)
    assert [u.role for u in users.list_users("second")] == ["annotator", "admin"]


# --------------------------------------------------------------------------- the cookie


def test_cookie_signature_detects_tampering():
    codec = SessionCodec(b"k" * 32)
    value = codec.encode(Session(user_id=7, issued_at=T0, last_seen=T0))
    assert codec.decode(value) == Session(7, T0, T0)
    body, sig = value.split(".")
    forged_body = SessionCodec(b"k" * 32).encode(Session(1, T0, T0)).split(".")[0]
    assert codec.decode(f"{forged_body}.{sig}") is None  # another user id under the old signature
    assert codec.decode(SessionCodec(b"x" * 32).encode(Session(7, T0, T0))) is None  # another key
    flipped = sig[:-1] + ("A" if sig[-1] != "A" else "B")
    for bad in [f"{body}.{flipped}", body, "", "a.b.c", "%%%.%%%", "x" * 600, None]:
        assert codec.decode(bad) is None


def test_session_expires_after_12_hours_idle_and_is_refreshed(users, auth, clock):
    info = users.create_first_admin("root", "long enough pw")
    cookie = auth.new_cookie(info.id)
    username, session = auth.resolve(cookie)
    assert username == "root"
    assert auth.refreshed(session) is None  # fresh: no new cookie yet
    clock.advance(6 * 60)
    refreshed = auth.refreshed(auth.resolve(cookie)[1])
    assert refreshed is not None and auth.codec.decode(refreshed).last_seen == clock.t
    clock.advance(IDLE_TIMEOUT_S - 60)
    assert auth.resolve(refreshed) is not None  # seen 11 h 59 min ago: still valid
    assert auth.resolve(cookie) is None  # never refreshed: idle more than 12 h
    clock.advance(120)
    assert auth.resolve(refreshed) is None


def test_password_change_and_deactivation_end_sessions(users, auth, clock):
    root = users.create_first_admin("root", "long enough pw")
    ann = users.add_user("root", "ann", "annotator", "ann password")
    clock.advance(10)
    root_cookie, ann_cookie = auth.new_cookie(root.id), auth.new_cookie(ann.id)
    clock.advance(10)
    users.set_password("root", "ann", "reset by admin")
    assert auth.resolve(ann_cookie) is None
    assert auth.resolve(root_cookie) is not None
    clock.advance(1)
    new_cookie = auth.new_cookie(users.authenticate("ann", "reset by admin").id)
    assert auth.resolve(new_cookie)[0] == "ann"
    users.set_active("root", "ann", False)
    assert auth.resolve(new_cookie) is None
    assert auth.resolve(auth.codec.encode(Session(999, clock.t, clock.t))) is None  # unknown user


def test_secret_key_is_private_stable_and_created_once(tmp_path):
    keys: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: keys.append(load_or_create_secret(tmp_path))) for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 1 and len(keys[0]) == 32
    assert stat.S_IMODE((tmp_path / SECRET_FILE).stat().st_mode) == 0o600
    assert load_or_create_secret(tmp_path) == keys[0]
    assert [p.name for p in tmp_path.iterdir()] == [SECRET_FILE]  # no temp files left


# --------------------------------------------------------------------------- over HTTP


def _server(db, settings, users, clock) -> tuple[TestClient, Auth]:
    services = Services.build(settings, db)
    services.users = users
    with gr.Blocks() as blocks:
        gr.Markdown("studio page")
    auth = Auth(users, settings.data_dir, clock=clock.time)
    app = build_server(settings, services, blocks, auth=auth)
    return TestClient(app, follow_redirects=False), auth


def _login(client: TestClient, username: str, password: str):
    return client.post("/login", data={"username": username, "password": password})


def test_login_lockout_after_five_failures_then_recovery(db, settings, users, clock):
    users.create_first_admin("root", "long enough pw")
    users.add_user("root", "ann", "annotator", "ann password")
    client, _auth = _server(db, settings, users, clock)
    for _ in range(5):
        clock.advance(5)
        r = _login(client, "root", "wrong password")
        assert r.status_code == 401 and "Wrong username or password" in r.text
    # Locked now, for 60 s from the 5th failure.
    r = _login(client, "root", "long enough pw")  # the right password, during the lockout
    assert r.status_code == 429 and COOKIE_NAME not in r.headers.get("set-cookie", "")
    assert int(r.headers["retry-after"]) > 0
    assert _login(client, "ROOT", "long enough pw").status_code == 429  # the name, any case
    assert _login(client, "ann", "ann password").status_code == 303  # other users are not locked
    clock.advance(59)
    assert _login(client, "root", "long enough pw").status_code == 429
    clock.advance(2)
    r = _login(client, "root", "long enough pw")
    assert r.status_code == 303 and r.headers["location"] == "/"
    assert r.headers["set-cookie"].startswith(f"{COOKIE_NAME}=")
    assert "HttpOnly" in r.headers["set-cookie"] and "SameSite=Lax" in r.headers["set-cookie"]


def test_guesses_sent_in_parallel_are_throttled_like_sequential_ones(db, settings, users, clock, monkeypatch):
    throttle = LoginThrottle(clock=clock.time)
    assert all(throttle.start("root") is None for _ in range(5))
    assert throttle.start("ROOT") == LoginThrottle.BUSY_RETRY_S  # five guesses are still being checked
    throttle.success("root")
    assert throttle.start("root") is None

    users.create_first_admin("root", "long enough pw")
    client, _auth = _server(db, settings, users, clock)
    slow = users.authenticate

    def authenticate(username, password):
        time.sleep(0.3)  # every guess is in flight while the others arrive
        return slow(username, password)

    monkeypatch.setattr(users, "authenticate", authenticate)
    answers: list[int] = []
    start = threading.Barrier(12)

    def guess(i: int) -> None:
        start.wait()
        answers.append(_login(client, "root", f"guess number {i}").status_code)

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(answers) == [401] * 5 + [429] * 7  # no more than five passwords were tried
    assert _login(client, "root", "long enough pw").status_code == 429  # and now the name is locked


def test_failures_spread_beyond_the_window_do_not_lock():
    clock = FakeClock()
    throttle = LoginThrottle(clock=clock.time)
    for _ in range(12):
        throttle.failure("root")
        clock.advance(16)  # at most 4 failures in any 60 s
    assert throttle.retry_after("root") is None
    for _ in range(5):
        throttle.failure("root")
    assert throttle.retry_after("root") == pytest.approx(60)


def test_session_cookie_over_http(db, settings, users, clock):
    users.create_first_admin("root", "long enough pw")
    client, _auth = _server(db, settings, users, clock)
    assert client.get("/").status_code == 302 and client.get("/").headers["location"] == "/login"
    assert client.get("/gradio_api/info").status_code == 401
    assert _login(client, "root", "long enough pw").status_code == 303
    assert client.get("/gradio_api/info").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "set-cookie" not in page.headers
    clock.advance(301)
    assert COOKIE_NAME in client.get("/gradio_api/info").headers["set-cookie"]  # last-seen refreshed
    value = client.cookies[COOKIE_NAME]
    client.cookies.clear()

    def info(cookie: str):
        return client.get("/gradio_api/info", headers={"cookie": f"{COOKIE_NAME}={cookie}"})

    assert info(value).status_code == 200
    assert info(value[:-2] + ("AA" if not value.endswith("AA") else "BB")).status_code == 401
    r = client.get("/logout")
    assert r.status_code == 303 and "Max-Age=0" in r.headers["set-cookie"]
    assert client.get("/gradio_api/info").status_code == 401
    clock.advance(IDLE_TIMEOUT_S - 1)
    assert info(value).status_code == 200
    clock.advance(2)
    assert info(value).status_code == 401  # idle too long


def test_a_cookie_with_non_ascii_bytes_is_no_session_not_a_server_error(db, settings, users, clock):
    codec = SessionCodec(b"k" * 32)
    value = codec.encode(Session(user_id=7, issued_at=T0, last_seen=T0))
    body, sig = value.split(".")
    for bad in ["é.x", f"{body}.{sig[:-1]}é", f"{body}\x80.{sig}"]:
        assert codec.decode(bad) is None
    users.create_first_admin("root", "long enough pw")
    client, _auth = _server(db, settings, users, clock)
    # Starlette decodes the Cookie header as latin-1: one stray byte reaches the codec as "é".
    junk = f"{COOKIE_NAME}=".encode() + b"\xe9.x"
    r = client.get("/gradio_api/info", headers={"cookie": junk})
    assert r.status_code == 401
    assert client.get("/", headers={"cookie": junk}).headers["location"] == "/login"


def test_origin_check_cors_and_headers_on_a_real_hostname(db, settings, users, clock):
    """Gradio alone would echo any Origin with credentials when the Host is not localhost."""
    users.create_first_admin("root", "long enough pw")
    client, _auth = _server(db, settings, users, clock)
    client.headers["host"] = "studio.example.org"
    ok = {"username": "root", "password": "long enough pw"}
    evil = {"origin": "https://evil.example"}
    assert client.post("/login", data=ok, headers=evil).status_code == 403
    assert client.post("/login", data=ok, headers={"origin": "null"}).status_code == 403
    r = client.post("/login", data=ok, headers={"origin": "https://studio.example.org"})
    assert r.status_code == 303
    r = client.get("/config", headers=evil)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    r = client.options("/gradio_api/call/x", headers={**evil, "access-control-request-method": "POST"})
    assert r.headers.get("access-control-allow-origin") != "https://evil.example"
    for path in ["/", "/login", "/config", "/healthz"]:
        headers = client.get(path).headers
        assert "frame-ancestors 'self'" in headers["content-security-policy"]
        assert "object-src 'none'" in headers["content-security-policy"]
        assert headers["x-frame-options"] == "DENY"
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "same-origin"


def test_allowed_origins_let_the_public_origin_behind_a_reverse_proxy_through(db, settings, users, clock):
    """The proxy forwards with its own upstream Host, so the browser's Origin never equals it."""
    from dataclasses import replace

    users.create_first_admin("root", "long enough pw")
    ok = {"username": "root", "password": "long enough pw"}
    public = {"origin": "https://studio.example.org"}
    client, _auth = _server(db, settings, users, clock)
    assert client.post("/login", data=ok, headers=public).status_code == 403
    proxied = replace(settings, allowed_origins=("https://studio.example.org",))
    client, _auth = _server(db, proxied, users, clock)
    assert client.post("/login", data=ok, headers=public).status_code == 303
    assert client.post("/login", data=ok, headers={"origin": "https://evil.example"}).status_code == 403
    assert client.post("/login", data=ok).status_code == 303  # no Origin header (not a browser form)


def test_only_admins_may_upload_files_to_gradio(db, settings, users, clock, tmp_path, monkeypatch):
    uploads = tmp_path / "gradio-cache"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(uploads))
    users.create_first_admin("root", "long enough pw")
    users.add_user("root", "ann", "annotator", "ann password")
    users.add_user("root", "ray", "rater", "ray password")
    client, _auth = _server(db, settings, users, clock)

    def upload(path: str = "/gradio_api/upload"):
        return client.post(path, files={"files": ("big.txt", b"x" * 1000, "text/plain")})

    assert upload().status_code == 401  # anonymous: Gradio's own login check
    for name in ("ann", "ray"):
        assert _login(client, name, f"{name} password").status_code == 303
        for path in ("/gradio_api/upload", "/gradio_api/upload/", "/gradio_api/upload?upload_id=x"):
            r = upload(path)
            assert r.status_code == 403 and r.json() == {"error": "only admins may upload files"}
        client.cookies.clear()
    assert not [f for f in uploads.rglob("*") if f.is_file()]  # nothing reached the disk
    assert _login(client, "root", "long enough pw").status_code == 303
    r = upload()
    assert r.status_code == 200 and len(r.json()) == 1
    users.set_role("root", "ann", "admin")  # the role is read from the database on each upload
    client.cookies.clear()
    assert _login(client, "ann", "ann password").status_code == 303
    assert upload().status_code == 200


def test_first_run_setup_needs_the_token_and_closes_afterwards(db, settings, users, clock):
    client, _auth = _server(db, settings, users, clock)
    token_file = settings.data_dir / SETUP_TOKEN_FILE
    token = token_file.read_text().strip()
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert client.app.state.setup_path == f"/setup?token={token}"
    assert client.get("/").headers["location"] == "/setup"
    assert client.get("/login").headers["location"] == "/setup"
    assert client.get("/setup").status_code == 403
    assert client.get("/setup", params={"token": "wrong"}).status_code == 403
    form = client.get("/setup", params={"token": token})
    assert form.status_code == 200 and "Create the first admin" in form.text
    good = {"token": token, "username": "root", "password": "long enough pw", "password2": "long enough pw"}
    assert client.post("/setup", data={**good, "token": "wrong"}).status_code == 403
    r = client.post("/setup", data={**good, "password2": "something else"})
    assert r.status_code == 400 and "differ" in r.text
    r = client.post("/setup", data={**good, "username": "<script>x</script>"})
    assert r.status_code == 400 and "<script>" not in r.text and "&lt;script&gt;" in r.text
    assert _count_users(db) == 0
    r = client.post("/setup", data=good)
    assert r.status_code == 303 and r.headers["set-cookie"].startswith(f"{COOKIE_NAME}=")
    assert client.get("/gradio_api/info").status_code == 200  # signed in as the new admin
    assert not token_file.exists()
    assert client.get("/setup", params={"token": token}).status_code == 404
    assert client.post("/setup", data={**good, "username": "second"}).status_code == 404
    assert _count_users(db) == 1
    assert users.require("root", "admin").username == "root"


def test_setup_closes_when_an_admin_is_made_elsewhere(db, settings, users, clock):
    client, auth = _server(db, settings, users, clock)
    token = auth.setup_token
    users.create_first_admin("cli-admin", "long enough pw")  # e.g. `studio create-admin`
    assert client.get("/setup", params={"token": token}).status_code == 404
    assert client.get("/").headers["location"] == "/login"
    assert not (settings.data_dir / SETUP_TOKEN_FILE).exists()


# --------------------------------------------------------------------------- the command line


def test_cli_create_admin_and_add_user(tmp_path, monkeypatch, capsys):
    from studio.cli import main

    data = ["--data-dir", str(tmp_path / "data")]
    monkeypatch.delenv("STUDIO_DATABASE_URL", raising=False)
    monkeypatch.delenv("STUDIO_ADMIN_PASSWORD", raising=False)
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert main([*data, "create-admin", "--username", "root"]) == 2  # no password source: refused
    assert "STUDIO_ADMIN_PASSWORD" in capsys.readouterr().err
    monkeypatch.setenv("STUDIO_ADMIN_PASSWORD", "root password")
    assert main([*data, "create-admin", "--username", "root"]) == 0
    assert main([*data, "create-admin", "--username", "second"]) == 2
    assert "already has users" in capsys.readouterr().err
    assert main([*data, "create-admin", "--username", "second", "--force-additional-admin"]) == 0
    monkeypatch.setenv("STUDIO_ADMIN_PASSWORD", "short")
    assert main([*data, "add-user", "--username", "ann"]) == 2
    monkeypatch.setenv("STUDIO_ADMIN_PASSWORD", "ann password")
    assert main([*data, "add-user", "--username", "ann"]) == 0
    assert main([*data, "add-user", "--username", "ray", "--role", "rater"]) == 0
    db = Database.from_url(sqlite_url(tmp_path / "data" / "studio.db"))
    service = UserService(db, Settings(data_dir=tmp_path / "data"))
    assert [(u.username, u.role) for u in service.list_users("root")] == [
        ("ann", "annotator"),
        ("ray", "rater"),
        ("root", "admin"),
        ("second", "admin"),
    ]
    assert service.authenticate("ann", "ann password") is not None
    db.dispose()
