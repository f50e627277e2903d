"""Who may do what, over raw HTTP against a real studio process (R-SEC-05, R-SEC-07, R-SEC-08).

Gradio events are called the way any client can: `POST /gradio_api/call/<api_name>` then the SSE
`GET /gradio_api/call/<api_name>/<event_id>`. Without a session every call is 401; with the wrong
role it ends in an error event and the database is unchanged (row counts and user rows compared).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import httpx
import pytest
from sqlmodel import func, select

from storage import models as m
from storage.db import Database, sqlite_url
from studio.auth import COOKIE_NAME

ROOT = Path(__file__).resolve().parents[2]
PASSWORDS = {"admin": "admin password 1", "ann": "annotator password", "ray": "rater password 1"}
EVIL = "https://evil.example"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, tmp: Path, model: Path):
        from studio.cli import main

        self.data_dir = tmp / "data"
        for name, role, command in [
            ("admin", "admin", ["create-admin"]),
            ("ann", "annotator", ["add-user", "--role", "annotator"]),
            ("ray", "rater", ["add-user", "--role", "rater"]),
        ]:
            with mock.patch.dict(os.environ, {"STUDIO_ADMIN_PASSWORD": PASSWORDS[name]}):
                assert main(["--data-dir", str(self.data_dir), *command, "--username", name]) == 0, role
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "STUDIO_DATA_DIR": str(self.data_dir),
            "STUDIO_PORT": str(self.port),
            "STUDIO_MODEL": str(model),
            "GRADIO_TEMP_DIR": str(tmp / "gradio"),
            "HF_HUB_OFFLINE": "1",
            "GRADIO_ANALYTICS_ENABLED": "False",
            "OMP_NUM_THREADS": "1",
        }
        env.pop("STUDIO_DATABASE_URL", None)
        self.log_path = tmp / "studio.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py")], env=env, stdout=self.log, stderr=subprocess.STDOUT
        )
        self.db = Database.from_url(sqlite_url(self.data_dir / "studio.db"))
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"studio exited early:\n{self.log_path.read_text()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"studio not ready:\n{self.log_path.read_text()}")

    def client(self, username: str | None = None) -> httpx.Client:
        client = httpx.Client(base_url=self.url, timeout=60, follow_redirects=False)
        if username:
            r = client.post("/login", data={"username": username, "password": PASSWORDS[username]})
            assert r.status_code == 303, r.text
            assert COOKIE_NAME in client.cookies
        return client

    def snapshot(self) -> dict:
        """Row counts of the tables a handler could write, plus every user row as stored."""
        tables = [m.Project, m.Prompt, m.GuidelineVersion, m.Checkpoint, m.Generation, m.Comparison]
        with self.db.read() as s:
            counts = {t.__tablename__: s.exec(select(func.count()).select_from(t)).one() for t in tables}
            users = [
                (u.username, str(u.role), u.is_active, u.password_hash, u.password_changed_at)
                for u in s.exec(select(m.User).order_by(m.User.id))
            ]
        return {**counts, "users": users}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        self.db.dispose()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    srv = Server(tmp_path_factory.mktemp("roles"), tiny_model)
    yield srv
    srv.stop()


def call(client: httpx.Client, api_name: str, data: list, **extra) -> tuple[str, object]:
    """Run one Gradio event; (event, payload): ("complete", outputs), ("error", message) or
    ("http <status>", body) when the POST itself is refused."""
    r = client.post(f"/gradio_api/call/{api_name}", json={"data": data, **extra})
    if r.status_code != 200:
        return f"http {r.status_code}", r.text
    event_id = r.json()["event_id"]
    event, payload = None, None
    with client.stream("GET", f"/gradio_api/call/{api_name}/{event_id}") as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                payload = json.loads(line.split(":", 1)[1].strip() or "null")
                break
    if event == "error" and isinstance(payload, dict):
        payload = payload.get("error")
    return event, payload


def _upload(client: httpx.Client, tmp_path: Path) -> dict:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": "x1", "prompt": "hello"}\n')
    r = client.post("/gradio_api/upload", files={"files": ("prompts.jsonl", path.read_bytes())})
    assert r.status_code == 200, r.text
    return {"path": r.json()[0], "orig_name": "prompts.jsonl", "meta": {"_type": "gradio.FileData"}}


TRAINING_EVENTS = ["training_snapshot", "training_launch", "training_jobs", "training_cancel", "training_resume",
                   "checkpoints_list", "checkpoints_verify"]  # fmt: skip
"""Training-tab events: admin-only, called with empty inputs (the role is checked first)."""


def _admin_events(file_data: dict, model: str) -> dict[str, list]:
    """Every admin-only event with inputs a client could send (hidden gr.State inputs excluded)."""
    return {
        "create_project": ["Stolen project", "", "", ""],
        "create_demo": [],
        "save_guidelines": ["new rules"],
        "import_prompts": [file_data, "strict", "skip"],
        "add_model": [model, "stolen"],
        "generate": [None, "two_samples", None, "all", "", 1, 0.8, 0.95, 8, 1, 1, 1],
        "browse_search": ["", "", 1],
        "browse_page": ["", "", 1],
        "browse_next": ["", "", 1],
        "users_refresh": [],
        "users_add": ["eve", "admin", "eve password 1"],
        "users_set_role": ["ann", "admin"],
        "users_set_password": ["admin", "hijacked password"],
        "users_deactivate": ["admin"],
        "users_activate": ["ann"],
    }


def test_every_admin_event_refuses_anonymous_annotator_and_rater(server, tmp_path, tiny_model):
    anonymous = server.client()
    before = server.snapshot()
    admin = server.client("admin")
    names = json.loads(admin.get("/gradio_api/info").text)["named_endpoints"]
    file_data = _upload(admin, tmp_path)  # only an admin may upload (anyone else could fill the disk)
    for username in ["ann", "ray"]:
        client = server.client(username)
        r = client.post("/gradio_api/upload", files={"files": ("prompts.jsonl", b"{}\n")})
        assert r.status_code == 403, (username, r.text)
        # An upload's path is all a client needs to send; the import still refuses them.
        events = _admin_events(file_data, str(tiny_model))
        for api_name in TRAINING_EVENTS:  # the role check comes before any input is read
            events[api_name] = [None] * len(names[f"/{api_name}"]["parameters"])
        for api_name, data in events.items():
            assert f"/{api_name}" in names, api_name
            assert call(anonymous, api_name, data)[0] == "http 401", api_name
            event, message = call(client, api_name, data)
            assert event == "error", (username, api_name, event, message)
            assert "needs the admin role" in str(message), (username, api_name, message)
            assert server.snapshot() == before, (username, api_name)


def test_the_admin_gets_through(server):
    admin = server.client("admin")
    before = server.snapshot()
    event, outputs = call(admin, "create_project", ["Admin project", "", "", ""])
    assert event == "complete", outputs
    assert "Created project" in outputs[3]
    event, outputs = call(admin, "users_refresh", [])
    assert event == "complete" and {"admin", "ann", "ray"} <= set(
        outputs[1]["choices"][i][0] for i in range(3)
    )
    assert server.snapshot()["projects"] == before["projects"] + 1


def test_identity_claimed_in_the_request_is_ignored(server):
    ann = server.client("ann")
    before = server.snapshot()
    # Gradio's request body has `username` and `session_hash` fields: neither names the caller.
    event, message = call(
        ann, "users_set_role", ["ann", "admin"], username="admin", session_hash="admin-session"
    )
    assert event == "error" and "signed in as annotator" in str(message)
    # A login form field cannot pick the account either: the cookie names who signed in.
    r = ann.post("/login", data={"username": "ann", "password": PASSWORDS["ann"], "user_id": "1"})
    assert r.status_code == 303
    event, message = call(ann, "users_add", ["mallory", "admin", "mallory password"], username="admin")
    assert event == "error" and "needs the admin role" in str(message)
    assert server.snapshot() == before


def test_deactivated_user_and_changed_password_lose_their_session(server):
    admin = server.client("admin")
    event, _ = call(admin, "users_add", ["temp", "annotator", "temp password 1"])
    assert event == "complete"
    PASSWORDS["temp"] = "temp password 1"
    temp = server.client("temp")
    assert temp.get("/gradio_api/info").status_code == 200
    assert call(admin, "users_set_password", ["temp", "temp password 2"])[0] == "complete"
    assert temp.get("/gradio_api/info").status_code == 401
    PASSWORDS["temp"] = "temp password 2"
    temp = server.client("temp")
    assert temp.get("/gradio_api/info").status_code == 200
    assert call(admin, "users_deactivate", ["temp"])[0] == "complete"
    assert temp.get("/gradio_api/info").status_code == 401
    r = temp.post("/login", data={"username": "temp", "password": "temp password 2"})
    assert r.status_code == 401


def test_security_headers_and_cross_origin_requests(server):
    anonymous = server.client()
    r = anonymous.get("/")
    assert r.status_code == 302 and r.headers["location"] == "/login"
    admin = server.client("admin")
    for response in [r, anonymous.get("/login"), admin.get("/"), admin.get("/gradio_api/info")]:
        csp = response.headers["content-security-policy"]
        assert "frame-ancestors 'self'" in csp and "object-src 'none'" in csp
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "same-origin"
    assert admin.get("/").status_code == 200
    assert anonymous.get("/healthz").status_code == 200

    before = server.snapshot()
    evil = {"origin": EVIL}
    r = admin.post("/gradio_api/call/create_project", json={"data": ["Evil", "", "", ""]}, headers=evil)
    assert r.status_code == 403
    r = admin.post("/login", data={"username": "admin", "password": PASSWORDS["admin"]}, headers=evil)
    assert r.status_code == 403
    assert admin.post("/gradio_api/upload", files={"files": ("x.txt", b"x")}, headers=evil).status_code == 403
    for origin in ["null", f"http://127.0.0.1:{server.port}.evil.example", f"http://localhost:{server.port}"]:
        r = admin.post("/gradio_api/call/create_demo", json={"data": []}, headers={"origin": origin})
        assert r.status_code == 403, origin
    assert server.snapshot() == before
    # No CORS grant for another site, even on a read.
    r = admin.get("/config", headers=evil)
    assert r.headers.get("access-control-allow-origin") not in (EVIL, "*")
    # The studio's own origin is fine.
    own = {"origin": server.url}
    r = admin.post("/gradio_api/call/users_refresh", json={"data": []}, headers=own)
    assert r.status_code == 200
