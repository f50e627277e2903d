"""The REST API (/api/v1): routes, 401 without a session, 403 for the wrong role with nothing
written, 422 for unknown fields; then through the real server (login cookie), and an exactness
run of the load benchmark over real HTTP."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import gradio as gr
import pytest
from annotation_service_helpers import add_users, seed_project
from argon2 import PasswordHasher
from fastapi import FastAPI, HTTPException, Request
from fastapi.testclient import TestClient
from sqlmodel import func, select

from storage import models as m
from studio.api import router
from studio.auth import api_user
from studio.server import build_server
from studio.services import Services
from studio.services.users import UserService
from studio.settings import Settings

BENCH = Path(__file__).resolve().parents[2] / "bench" / "annotation_load.py"
FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


def _services(db, tmp_path) -> Services:
    settings = Settings(data_dir=tmp_path / "data", database_url="sqlite://")
    return Services.build(settings, db)


def _test_user(request: Request) -> str:
    """Stands in for the session cookie: the `x-user` header names the signed-in user."""
    name = request.headers.get("x-user")
    if not name:
        raise HTTPException(status_code=401, detail="sign in first")
    return name


@pytest.fixture
def api(db, tmp_path):
    """A small app with only the API router; (client, db)."""
    services = _services(db, tmp_path)
    app = FastAPI()
    app.include_router(router)
    app.state.services = services
    app.dependency_overrides[api_user] = _test_user
    add_users(db, ["ann", "bob"])
    add_users(db, ["rita"], role=m.Role.rater)
    add_users(db, ["root"], role=m.Role.admin)
    return TestClient(app), db


def _as(name: str) -> dict[str, str]:
    return {"x-user": name}


def _counts(db) -> dict[str, int]:
    tables = [m.Assignment, m.PairwiseVote, m.SpanSet, m.SpanAnnotation, m.DatasetSnapshot, m.Comparison]
    with db.read() as s:
        out = {t.__tablename__: s.exec(select(func.count()).select_from(t)).one() for t in tables}
        out["gold"] = s.exec(select(func.count()).where(m.Comparison.gold_outcome.is_not(None))).one()
        return out


ROUTES = [
    ("get", "/api/v1/me", None),
    ("post", "/api/v1/projects/{pid}/pairwise/next", None),
    ("post", "/api/v1/votes", {"assignment_id": 1, "choice": "left", "idempotency_key": "k"}),
    ("post", "/api/v1/assignments/1/skip", None),
    ("post", "/api/v1/projects/{pid}/segments/next", None),
    ("put", "/api/v1/generations/{gid}/spans", {"spans": [], "version": 0}),
    ("get", "/api/v1/projects/{pid}/progress", None),
    ("get", "/api/v1/projects/{pid}/activity", None),
    ("post", "/api/v1/projects/{pid}/exports", {"kinds": ["votes"]}),
    ("get", "/api/v1/snapshots/1/download", None),
]


def _call(client, method, path, body, headers=None):
    kw = {"headers": headers or {}}
    if body is not None:
        kw["json"] = body
    return getattr(client, method)(path, **kw)


def test_every_route_needs_a_session(api):
    client, db = api
    pid, _, (gid,) = seed_project(db, comparisons=2, generations=1)
    before = _counts(db)
    for method, path, body in ROUTES:
        r = _call(client, method, path.format(pid=pid, gid=gid), body)
        assert r.status_code == 401, (path, r.text)
        assert r.json() == {"error": "sign in first"}
    assert _counts(db) == before


def test_wrong_role_gets_403_and_nothing_is_written(api):
    client, db = api
    pid, _, (gid,) = seed_project(db, comparisons=2, generations=1)
    item = client.post(f"/api/v1/projects/{pid}/pairwise/next", headers=_as("ann")).json()["item"]
    before = _counts(db)
    rater = [
        ("post", f"/api/v1/projects/{pid}/pairwise/next", None),
        (
            "post",
            "/api/v1/votes",
            {"assignment_id": item["assignment_id"], "choice": "left", "idempotency_key": "k"},
        ),
        ("post", f"/api/v1/assignments/{item['assignment_id']}/skip", None),
        ("post", f"/api/v1/projects/{pid}/segments/next", None),
        ("put", f"/api/v1/generations/{gid}/spans", {"spans": [], "version": 0}),
        ("get", f"/api/v1/projects/{pid}/progress", None),
    ]
    for method, path, body in rater:
        r = _call(client, method, path, body, _as("rita"))
        assert r.status_code == 403, (path, r.text)
        assert "annotator" in r.json()["error"]
    admin_only = [
        ("get", f"/api/v1/projects/{pid}/activity", None),
        ("post", f"/api/v1/projects/{pid}/exports", {"kinds": ["votes"]}),
        ("get", "/api/v1/snapshots/1/download", None),
    ]
    for who in ("ann", "rita"):
        for method, path, body in admin_only:
            r = _call(client, method, path, body, _as(who))
            assert r.status_code == 403, (who, path, r.text)
    assert _counts(db) == before
    # an unknown or deactivated account is 401, not 403
    assert client.get("/api/v1/me", headers=_as("ghost")).status_code == 401


def test_unknown_fields_and_bad_types_are_422(api):
    client, db = api
    pid, _, (gid,) = seed_project(db, comparisons=1, generations=1)
    item = client.post(f"/api/v1/projects/{pid}/pairwise/next", headers=_as("ann")).json()["item"]
    client.post(f"/api/v1/projects/{pid}/segments/next", headers=_as("ann"))
    before = _counts(db)
    vote = {"assignment_id": item["assignment_id"], "choice": "left", "idempotency_key": "k"}
    span = {"start": 0, "end": 3, "polarity": "bad"}
    cases = [
        ("post", "/api/v1/votes", vote | {"winner": "a"}),
        ("post", "/api/v1/votes", vote | {"choice": "a"}),
        ("post", "/api/v1/votes", vote | {"assignment_id": "1"}),
        ("post", "/api/v1/votes", vote | {"strength": "huge"}),
        ("post", "/api/v1/votes", vote | {"idempotency_key": "x" * 65}),
        ("post", "/api/v1/votes", vote | {"time_spent_ms": 1.5}),
        ("post", "/api/v1/votes", {"choice": "left", "idempotency_key": "k"}),
        ("put", f"/api/v1/generations/{gid}/spans", {"spans": [span], "version": 0, "force": True}),
        ("put", f"/api/v1/generations/{gid}/spans", {"spans": [span | {"colour": "red"}], "version": 0}),
        ("put", f"/api/v1/generations/{gid}/spans", {"spans": [span | {"start": 0.5}], "version": 0}),
        ("put", f"/api/v1/generations/{gid}/spans", {"spans": [span], "version": -1}),
        ("put", f"/api/v1/generations/{gid}/spans", {"spans": [span], "version": 0, "offsets": "bytes"}),
        ("post", f"/api/v1/projects/{pid}/exports", {"kinds": ["votes"], "path": "/etc"}),
    ]
    for method, path, body in cases:
        r = _call(client, method, path, body, _as("root" if "exports" in path else "ann"))
        assert r.status_code == 422, (body, r.text)
    assert _counts(db) == before


def test_pairwise_flow_with_idempotent_retries(api):
    client, db = api
    pid, _, _ = seed_project(db, comparisons=3)
    assert client.get("/api/v1/me", headers=_as("ann")).json()["role"] == "annotator"
    r = client.post(f"/api/v1/projects/{pid}/pairwise/next", headers=_as("ann"))
    item = r.json()["item"]
    assert r.status_code == 200 and item["prompt_text"].startswith("prompt")
    assert set(item) >= {
        "assignment_id",
        "left_text",
        "right_text",
        "expires_at",
        "progress",
        "guideline_text",
    }
    assert item["progress"]["remaining_for_user"] == 3
    # resumed, not a second reservation
    again = client.post(f"/api/v1/projects/{pid}/pairwise/next", headers=_as("ann")).json()["item"]
    assert again["assignment_id"] == item["assignment_id"]

    vote = {
        "assignment_id": item["assignment_id"],
        "choice": "right",
        "strength": "clear",
        "idempotency_key": "v1",
    }
    first = client.post("/api/v1/votes", json=vote, headers=_as("ann"))
    assert first.status_code == 201 and not first.json()["replayed"]
    replay = client.post("/api/v1/votes", json=vote, headers=_as("ann"))
    assert replay.status_code == 200 and replay.json() == first.json() | {"replayed": True}
    clash = client.post("/api/v1/votes", json=vote | {"choice": "left"}, headers=_as("ann"))
    assert clash.status_code == 409 and "idempotency key" in clash.json()["error"]
    twice = client.post("/api/v1/votes", json=vote | {"idempotency_key": "v2"}, headers=_as("ann"))
    assert twice.status_code == 409 and twice.json()["current"]["vote_id"] == first.json()["vote_id"]
    other = client.post("/api/v1/votes", json=vote | {"idempotency_key": "v3"}, headers=_as("bob"))
    assert other.status_code == 404
    with db.read() as s:
        (row,) = s.exec(select(m.PairwiseVote)).all()
    assert (row.id, row.outcome) == (first.json()["vote_id"], first.json()["outcome"])

    nxt = client.post(f"/api/v1/projects/{pid}/pairwise/next", headers=_as("ann")).json()["item"]
    assert (
        client.post(f"/api/v1/assignments/{nxt['assignment_id']}/skip", headers=_as("ann")).status_code == 200
    )
    progress = client.get(f"/api/v1/projects/{pid}/progress", headers=_as("ann")).json()
    assert progress == {"done_by_user": 1, "remaining_for_user": 1, "project_done": 1, "project_total": 3}
    assert client.get(f"/api/v1/projects/{pid}/progress?task=nope", headers=_as("ann")).status_code == 422
    assert client.post("/api/v1/projects/999/pairwise/next", headers=_as("ann")).status_code == 404
    rows = client.get(f"/api/v1/projects/{pid}/activity", headers=_as("root")).json()
    assert {r["username"]: (r["votes"], r["skips"]) for r in rows} == {"ann": (1, 1), "bob": (0, 0)}


def test_span_flow_with_stale_version_and_utf16(api):
    client, db = api
    text = "Nice 👍🏽 but wrong."
    pid, _, (gid,) = seed_project(db, generations=1, texts=(text,))
    item = client.post(f"/api/v1/projects/{pid}/segments/next", headers=_as("ann")).json()["item"]
    assert (item["generation_id"], item["version"], item["labels"]) == (gid, 0, ["tone", "fact"])
    url = f"/api/v1/generations/{gid}/spans"
    bad = {"start": 12, "end": 18, "polarity": "bad", "label": "fact"}
    r = client.put(url, json={"spans": [bad], "version": 0}, headers=_as("ann"))
    assert r.status_code == 200 and r.json() == {"version": 1, "spans": [bad | {"comment": None}]}
    stale = client.put(url, json={"spans": [], "version": 0}, headers=_as("ann"))
    assert stale.status_code == 409
    assert stale.json()["current"] == {"version": 1, "spans": [bad | {"comment": None}]}
    # the browser's UTF-16 offsets: "Nice 👍🏽" is 7 code points, 9 UTF-16 units
    r = client.put(
        url,
        json={
            "spans": [{"start": 0, "end": 9, "polarity": "good"}],
            "version": 1,
            "offsets": "utf16",
            "submit": True,
        },
        headers=_as("ann"),
    )
    assert r.status_code == 200 and r.json()["spans"][0]["end"] == 7
    inside = client.put(
        url,
        json={"spans": [{"start": 0, "end": 6, "polarity": "good"}], "version": 2, "offsets": "utf16"},
        headers=_as("ann"),
    )
    assert inside.status_code == 400 and "span 0: end" in inside.json()["error"]
    overlap = client.put(
        url,
        json={
            "spans": [{"start": 0, "end": 4, "polarity": "good"}, {"start": 2, "end": 5, "polarity": "bad"}],
            "version": 2,
        },
        headers=_as("ann"),
    )
    assert overlap.status_code == 400 and "span 1" in overlap.json()["error"]
    assert client.post(f"/api/v1/projects/{pid}/segments/next", headers=_as("ann")).json() == {"item": None}
    progress = client.get(f"/api/v1/projects/{pid}/progress?task=segment", headers=_as("ann")).json()
    assert progress["done_by_user"] == 1


def test_export_and_download(api):
    client, db = api
    pid, _, _ = seed_project(db, comparisons=2)
    for name in ("ann", "bob"):
        item = client.post(f"/api/v1/projects/{pid}/pairwise/next", headers=_as(name)).json()["item"]
        body = {"assignment_id": item["assignment_id"], "choice": "left", "idempotency_key": name}
        assert client.post("/api/v1/votes", json=body, headers=_as(name)).status_code == 201
    r = client.post(f"/api/v1/projects/{pid}/exports", json={"kinds": ["votes"]}, headers=_as("root"))
    assert r.status_code == 201, r.text
    (snap,) = r.json()
    assert snap["row_count"] == 2
    got = client.get(f"/api/v1/snapshots/{snap['id']}/download", headers=_as("root"))
    assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == snap["sha256"]
    assert len(got.content.decode().splitlines()) == 2
    hf = client.post(
        f"/api/v1/projects/{pid}/exports", json={"kinds": ["votes"], "format": "hf"}, headers=_as("root")
    )
    (folder,) = hf.json()
    archive = client.get(f"/api/v1/snapshots/{folder['id']}/download", headers=_as("root"))
    assert archive.status_code == 200 and archive.headers["content-type"] == "application/zip"
    assert zipfile.ZipFile(io.BytesIO(archive.content)).namelist()
    # a snapshot changed on disk is refused rather than served
    Path(snap["path"]).write_text("tampered\n")
    assert client.get(f"/api/v1/snapshots/{snap['id']}/download", headers=_as("root")).status_code == 409
    assert client.get("/api/v1/snapshots/999/download", headers=_as("root")).status_code == 404
    empty = client.post(f"/api/v1/projects/{pid}/exports", json={"kinds": ["segments"]}, headers=_as("root"))
    assert empty.status_code == 400 and "nothing to export" in empty.json()["error"]


# --------------------------------------------------------------------------- the real server


def test_through_the_real_server_with_a_login_cookie(db, tmp_path):
    settings = Settings(data_dir=tmp_path / "data", database_url="sqlite://")
    services = Services.build(settings, db)
    services.users = UserService(db, settings, hasher=FAST_HASHER)
    services.users.create_first_admin("root", "root password")
    services.users.add_user("root", "ann", "annotator", "ann password")
    services.users.add_user("root", "rita", "rater", "rita password")
    pid, _, _ = seed_project(db, comparisons=2)
    with gr.Blocks() as blocks:
        gr.Markdown("studio")
    client = TestClient(build_server(settings, services, blocks), follow_redirects=False)

    assert client.get("/api/v1/me").status_code == 401
    assert client.post(f"/api/v1/projects/{pid}/pairwise/next").json() == {"error": "sign in first"}
    assert client.post("/login", data={"username": "rita", "password": "rita password"}).status_code == 303
    before = _counts(db)
    assert client.post(f"/api/v1/projects/{pid}/pairwise/next").status_code == 403
    assert _counts(db) == before
    client.cookies.clear()
    assert client.post("/login", data={"username": "ann", "password": "ann password"}).status_code == 303
    assert client.get("/api/v1/me").json()["username"] == "ann"
    item = client.post(f"/api/v1/projects/{pid}/pairwise/next").json()["item"]
    body = {"assignment_id": item["assignment_id"], "choice": "tie", "idempotency_key": "one"}
    assert client.post("/api/v1/votes", json=body).status_code == 201
    assert client.post("/api/v1/votes", json=body).status_code == 200
    assert client.post("/api/v1/votes", json=body | {"extra": 1}).status_code == 422
    # a cross-site POST is refused by the server's Origin check before it reaches the API
    evil = client.post("/api/v1/votes", json=body, headers={"origin": "https://evil.example"})
    assert evil.status_code == 403
    assert count_votes(db) == 1


def count_votes(db) -> int:
    with db.read() as s:
        return s.exec(select(func.count()).select_from(m.PairwiseVote)).one()


def test_load_benchmark_is_exact_over_real_http(tmp_path):
    """10 annotators x 20 votes plus every 5th re-sent, through a real server on SQLite: exact counts."""
    out = tmp_path / "load.json"
    cmd = [
        sys.executable,
        str(BENCH),
        "--users",
        "10",
        "--votes",
        "200",
        "--retry-every",
        "5",
        "--think-ms",
        "0",
    ]
    subprocess.run([*cmd, "--skip-postgres", "--out", str(out)], check=True, capture_output=True, timeout=300)
    (run,) = json.loads(out.read_text())["runs"]
    assert run["backend"] == "sqlite"
    assert (run["votes_stored"], run["lost"], run["duplicated"], run["server_5xx"]) == (200, 0, 0, 0), run
    assert run["retries"] == 40 and run["retries_replayed"] == 40, run
    assert run["unexpected_status"] == {}, run
