"""Scratch probes for the review (deleted afterwards)."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from test_annotation import Clock, add_users, make_service, seed_project
from test_api import _as, _services, _test_user

from studio.api import router
from studio.auth import api_user
from studio.services.errors import Conflict


def test_probe_cookie_non_ascii(tmp_path, db):
    from studio.auth import SessionCodec

    codec = SessionCodec(b"k" * 32)
    for value in ["é.x", "abc.é", "a\x80b.c"]:
        try:
            print(repr(value), codec.decode(value))
        except Exception as exc:  # noqa: BLE001
            print("RAISES", repr(value), type(exc).__name__, exc)


def test_probe_idempotency_squatting(db, tmp_path):
    services = _services(db, tmp_path)
    app = FastAPI()
    app.include_router(router)
    app.state.services = services
    app.dependency_overrides[api_user] = _test_user
    add_users(db, ["ann", "bob"])
    pid, _, _ = seed_project(db, comparisons=4)
    client = TestClient(app)
    item = client.post(f"/api/v1/projects/{pid}/pairwise/next", headers=_as("ann")).json()["item"]
    # ann burns the key the Gradio tab will use for the next assignment
    nxt = item["assignment_id"] + 1
    body = {"assignment_id": item["assignment_id"], "choice": "left", "idempotency_key": f"vote-{nxt}"}
    print(client.post("/api/v1/votes", json=body, headers=_as("ann")).json())
    bob_item = services.annotation.next_pairwise("bob", pid)
    assert bob_item.assignment_id == nxt
    try:
        r = services.annotation.submit_vote(
            "bob", nxt, "left", None, None, idempotency_key=f"vote-{nxt}", time_spent_ms=1000
        )
        print("bob ok", r)
    except Conflict as exc:
        print("BOB BLOCKED:", exc)


def test_probe_expired_segment_claim(db, tmp_path):
    clock = Clock()
    svc = make_service(db, tmp_path, clock=clock)
    add_users(db, ["ann", "bob"])
    pid, _, (gid,) = seed_project(db, generations=1)
    a = svc.next_segment("ann", pid)
    clock.advance(minutes=31)
    b = svc.next_segment("bob", pid)
    print("bob got", b and b.generation_id)
    svc.save_spans("bob", gid, [], 0, submit=True)
    r = svc.save_spans("ann", gid, [], 0, submit=True)
    print("ann submitted too:", r, a.generation_id)


@pytest.mark.parametrize("where", ["rationale", "comment"])
def test_probe_nul_on_pg(pg_db, tmp_path, where):
    svc = make_service(pg_db, tmp_path)
    add_users(pg_db, ["ann"])
    pid, _, (gid,) = seed_project(pg_db, comparisons=1, generations=1)
    try:
        if where == "rationale":
            item = svc.next_pairwise("ann", pid)
            svc.submit_vote("ann", item.assignment_id, "left", None, "a\x00b", "k1", 1)
        else:
            svc.next_segment("ann", pid)
            svc.save_spans("ann", gid, [{"start": 0, "end": 3, "polarity": "good", "comment": "x\x00"}], 0)
        print("stored")
    except Exception as exc:  # noqa: BLE001
        print("RAISES", type(exc).__mro__[:3], exc)


def test_probe_parallel_login_attempts(db, tmp_path):
    import threading
    from collections import Counter

    import gradio as gr

    from studio.auth import Auth
    from studio.server import build_server
    from studio.services import Services
    from studio.services.users import UserService
    from studio.settings import Settings

    settings = Settings(data_dir=tmp_path / "data", database_url="sqlite://")
    services = Services.build(settings, db)
    users = UserService(db, settings)  # real argon2 parameters
    services.users = users
    users.create_first_admin("root", "long enough pw")
    with gr.Blocks() as blocks:
        gr.Markdown("x")
    app = build_server(settings, services, blocks, auth=Auth(users, settings.data_dir))
    codes = Counter()
    barrier = threading.Barrier(20)

    def attempt(i):
        client = TestClient(app, follow_redirects=False)
        barrier.wait()
        r = client.post("/login", data={"username": "root", "password": f"guess {i}"})
        codes[r.status_code] += 1

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("parallel login answers:", dict(codes))
