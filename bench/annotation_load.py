"""End-to-end load on the annotation REST API (R-DB-03): simulated annotators against the real server.

For each backend (SQLite, then PostgreSQL on a loopback cluster this script starts):

1. a fresh data folder and database; an admin and N annotators (real argon2 passwords); a
   project with enough comparisons (10 % of them need 2 annotators);
2. the real studio (`python app.py`) on a free loopback port;
3. N threads, one logged-in httpx client each (POST /login), each loop: POST next item, POST
   the vote with a fresh idempotency key, and every `--retry-every`-th vote sent again with the
   same key (a retry must be answered 200 `replayed` with the same vote id);
4. the database is checked: every key the clients got an answer for is stored exactly once,
   nothing else is stored, no comparison has more votes than it needs.

Runs: (1) SQLite, 50 annotators, 2,000 votes + 200 retries, each annotator pausing `--think-ms`
(mean 1 s, uniform 0.5-1.5x) between seeing an item and voting: 50 people voting about once a
second each, ~10-20x faster than real annotators; (2) the same without any pause (every client
fires as soon as it has an answer: the worst case, where latency is the queue of 50 requests);
(3) PostgreSQL, 10 annotators x 100 votes without pauses. Targets for (1): p95 of vote
submissions ≤ 300 ms, total ≤ 60 s; for all: 0 lost, 0 duplicated, 0 5xx. The machine's load
average is recorded with each run (timings on a shared machine are noisy).

    .venv/bin/python bench/annotation_load.py --out bench/results/annotation_load.json
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

PASSWORD = "load-test password"
CHOICES = ("left", "right", "tie", "both_bad")
TARGETS = {"vote_p95_ms": 300, "total_s": 60, "lost": 0, "duplicated": 0, "server_5xx": 0}


# --------------------------------------------------------------------------- setup


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed(url: str, data_dir: Path, n_users: int, n_comparisons: int) -> tuple[int, list[str]]:
    """Users and a project with `n_comparisons` comparisons; returns (project id, annotator names)."""
    import sqlalchemy as sa
    from sqlmodel import select

    from storage import crud
    from storage.db import Database, upgrade
    from storage.models import Comparison, ComparisonPurpose, Generation, Prompt, utcnow
    from studio.services.users import UserService
    from studio.settings import Settings

    db = Database.from_url(url)
    upgrade(db.engine)
    users = UserService(db, Settings(data_dir=data_dir, database_url=url))
    users.add_user_as_operator("admin", "admin", PASSWORD)
    names = [f"annotator{i:03d}" for i in range(n_users)]
    for name in names:
        users.add_user_as_operator(name, "annotator", PASSWORD)
    now = utcnow()
    with db.write() as s:
        project = crud.create_project(s, name="load", span_labels=["fact"], overlap_fraction=0.1, overlap_k=2)
        crud.add_guideline_version(s, project_id=project.id, text="Prefer the more helpful answer.")
        ckpt = crud.get_or_create_checkpoint(s, path="bench-model", name="bench-model")
        crud.insert_prompts(
            s,
            project_id=project.id,
            rows=[
                {
                    "external_id": f"p{i}",
                    "kind": "text",
                    "text": f"Prompt {i}: explain something.",
                    "messages": None,
                    "tags": None,
                    "source": None,
                }
                for i in range(n_comparisons)
            ],
        )
        prompt_ids = s.exec(
            select(Prompt.id).where(Prompt.project_id == project.id).order_by(Prompt.id)
        ).all()
        s.execute(
            sa.insert(Generation),
            [
                {
                    "prompt_id": pid,
                    "checkpoint_id": ckpt.id,
                    "text": f"Answer {side} to prompt {pid}. " * 20,
                    "params": {},
                    "seed": j,
                    "sample_index": j,
                    "created_at": now,
                }
                for pid in prompt_ids
                for j, side in enumerate("AB")
            ],
        )
        gens = s.exec(select(Generation.id, Generation.prompt_id).order_by(Generation.id)).all()
        by_prompt: dict[int, list[int]] = {}
        for gid, pid in gens:
            by_prompt.setdefault(pid, []).append(gid)
        rng = random.Random(0)
        s.execute(
            sa.insert(Comparison),
            [
                {
                    "project_id": project.id,
                    "prompt_id": pid,
                    "generation_a_id": by_prompt[pid][0],
                    "generation_b_id": by_prompt[pid][1],
                    "purpose": ComparisonPurpose.annotate,
                    "a_on_left": rng.random() < 0.5,
                    "required_votes": 2 if rng.random() < 0.1 else 1,
                    "created_at": now,
                }
                for pid in prompt_ids
            ],
        )
        project_id = project.id
    if db.engine.dialect.name == "postgresql":
        # Planner statistics for the freshly bulk-loaded tables (autovacuum would gather them
        # within a minute; without them the first queries run on empty-table estimates).
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("ANALYZE")
    db.dispose()
    return project_id, names


def start_server(data_dir: Path, url: str, port: int, log: Path) -> subprocess.Popen:
    env = os.environ | {
        "STUDIO_DATA_DIR": str(data_dir),
        "STUDIO_DATABASE_URL": url,
        "STUDIO_HOST": "127.0.0.1",
        "STUDIO_PORT": str(port),
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py")],
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"the server did not start within 180 s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


class PostgresCluster:
    """A throwaway PostgreSQL cluster on a loopback port (as tests/conftest.py's pg_server)."""

    def __init__(self) -> None:
        def binary(name: str) -> str | None:
            found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
            return found[-1] if found else shutil.which(name)

        self.initdb, self.pg_ctl = binary("initdb"), binary("pg_ctl")
        if not (self.initdb and self.pg_ctl):
            raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) are missing")
        self.run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.root = Path(tempfile.mkdtemp(prefix="studio-pg-bench-"))
        self.data, self.sock = self.root / "data", self.root / "sock"
        self.port = free_port()

    def start(self) -> str:
        self.sock.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.sock, "postgres")
        subprocess.run(
            [*self.run_as, self.initdb, "-D", str(self.data), "-U", "studio", "-A", "trust", "-E", "UTF8"],
            check=True,
            capture_output=True,
        )
        # synchronous_commit=off is PostgreSQL's counterpart of SQLite's WAL + synchronous=NORMAL.
        options = (
            f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c synchronous_commit=off "
            "-c max_connections=200"
        )
        subprocess.run(
            [
                *self.run_as,
                self.pg_ctl,
                "-D",
                str(self.data),
                "-o",
                options,
                "-l",
                str(self.root / "log"),
                "-w",
                "start",
            ],
            check=True,
            capture_output=True,
        )
        import sqlalchemy as sa

        engine = sa.create_engine(f"postgresql+psycopg://studio@127.0.0.1:{self.port}/postgres")
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("CREATE DATABASE studio")
        engine.dispose()
        return f"postgresql+psycopg://studio@127.0.0.1:{self.port}/studio"

    def stop(self) -> None:
        subprocess.run(
            [*self.run_as, self.pg_ctl, "-D", str(self.data), "-m", "fast", "stop"], capture_output=True
        )
        shutil.rmtree(self.root, ignore_errors=True)


# --------------------------------------------------------------------------- the simulated annotators


@dataclass
class Tally:
    """What the clients saw; merged over all threads under a lock."""

    next_ms: list[float] = field(default_factory=list)
    vote_ms: list[float] = field(default_factory=list)
    retry_ms: list[float] = field(default_factory=list)
    keys: dict[str, int] = field(default_factory=dict)
    """idempotency key -> vote id the server answered."""
    retries: int = 0
    retries_replayed: int = 0
    server_5xx: int = 0
    transport_errors: int = 0
    unexpected: Counter = field(default_factory=Counter)
    ran_out: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _send(client: httpx.Client, tally: Tally, what: str, url: str, **kw) -> tuple[httpx.Response, float]:
    """POST with retries on 5xx and transport errors (the same body: votes carry their key)."""
    for attempt in range(6):
        t0 = time.perf_counter()
        try:
            r = client.post(url, **kw)
        except httpx.TransportError:
            with tally.lock:
                tally.transport_errors += 1
            time.sleep(0.2 * (attempt + 1))
            continue
        ms = (time.perf_counter() - t0) * 1000
        if r.status_code >= 500:
            with tally.lock:
                tally.server_5xx += 1
            time.sleep(0.2 * (attempt + 1))
            continue
        return r, ms
    raise RuntimeError(f"{what}: no answer after 6 attempts")


def annotator(
    base: str,
    name: str,
    project_id: int,
    quota: int,
    retry_every: int,
    think_ms: float,
    start: threading.Barrier,
    tally: Tally,
    progress: Counter,
) -> None:
    rng = random.Random(name)
    with httpx.Client(base_url=base, timeout=60, follow_redirects=False) as client:
        login = client.post("/login", data={"username": name, "password": PASSWORD})
        if login.status_code != 303:
            raise RuntimeError(f"login of {name} failed: {login.status_code}")
        start.wait()
        for i in range(1, quota + 1):
            r, ms = _send(client, tally, "next", f"/api/v1/projects/{project_id}/pairwise/next")
            with tally.lock:
                tally.next_ms.append(ms)
            if r.status_code != 200:
                with tally.lock:
                    tally.unexpected[f"next:{r.status_code}"] += 1
                continue
            item = r.json()["item"]
            if item is None:
                with tally.lock:
                    tally.ran_out += 1
                return
            if think_ms:
                time.sleep(rng.uniform(0.5, 1.5) * think_ms / 1000)
            choice = rng.choice(CHOICES)
            body = {
                "assignment_id": item["assignment_id"],
                "choice": choice,
                "strength": rng.choice(["slight", "clear", "much"]) if choice in ("left", "right") else None,
                "idempotency_key": uuid.uuid4().hex,
                "time_spent_ms": rng.randint(2000, 60000),
            }
            r, ms = _send(client, tally, "vote", "/api/v1/votes", json=body)
            with tally.lock:
                tally.vote_ms.append(ms)
                if r.status_code == 201:
                    tally.keys[body["idempotency_key"]] = r.json()["vote_id"]
                else:
                    tally.unexpected[f"vote:{r.status_code}"] += 1
                progress["votes"] += 1
            if i % retry_every == 0:
                again, ms = _send(client, tally, "retry", "/api/v1/votes", json=body)
                with tally.lock:
                    tally.retries += 1
                    tally.retry_ms.append(ms)
                    tally.vote_ms.append(ms)
                    answer = again.json() if again.status_code == 200 else {}
                    if answer.get("replayed") and answer.get("vote_id") == tally.keys.get(
                        body["idempotency_key"]
                    ):
                        tally.retries_replayed += 1
                    else:
                        tally.unexpected[f"retry:{again.status_code}"] += 1


def _stats(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def pct(q: float) -> float:
        return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 1)  # nearest rank

    return {
        "n": len(ordered),
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "max_ms": round(ordered[-1], 1),
        "mean_ms": round(statistics.fmean(ordered), 1),
    }


def verify(url: str, tally: Tally) -> dict:
    """Compare what the clients were told with what the database holds."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT id, idempotency_key, comparison_id, user_id FROM pairwise_votes")
        ).all()
        over = conn.execute(
            sa.text(
                "SELECT count(*) FROM comparisons c WHERE (SELECT count(*) FROM pairwise_votes v "
                "WHERE v.comparison_id = c.id) > c.required_votes"
            )
        ).scalar()
        live = conn.execute(sa.text("SELECT count(*) FROM assignments WHERE status = 'reserved'")).scalar()
    engine.dispose()
    stored_keys = Counter(r.idempotency_key for r in rows)
    stored_ids = {r.idempotency_key: r.id for r in rows}
    told = tally.keys
    return {
        "votes_stored": len(rows),
        "lost": sum(1 for k in told if k not in stored_keys),
        "duplicated": sum(n - 1 for n in stored_keys.values())
        + (len(rows) - len({(r.comparison_id, r.user_id) for r in rows})),
        "unasked_rows": sum(1 for k in stored_keys if k not in told),
        "id_mismatch": sum(1 for k, vid in told.items() if stored_ids.get(k) not in (None, vid)),
        "over_required": over,
        "reservations_left": live,
    }


def run_backend(backend: str, n_users: int, n_votes: int, retry_every: int, think_ms: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"studio-load-{backend}-"))
    data_dir = tmp / "data"
    cluster = None
    proc = None
    try:
        if backend == "postgres":
            cluster = PostgresCluster()
            url = cluster.start()
        else:
            from storage.db import sqlite_url

            url = sqlite_url(data_dir / "studio.db")
        t_seed = time.perf_counter()
        project_id, names = seed(url, data_dir, n_users, n_comparisons=int(n_votes * 1.05) + n_users)
        seed_s = time.perf_counter() - t_seed
        port = free_port()
        t_start = time.perf_counter()
        proc = start_server(data_dir, url, port, tmp / "server.log")
        startup_s = time.perf_counter() - t_start
        base = f"http://127.0.0.1:{port}"

        quotas = [n_votes // n_users + (1 if i < n_votes % n_users else 0) for i in range(n_users)]
        tally, progress = Tally(), Counter()
        barrier = threading.Barrier(n_users + 1)
        threads = [
            threading.Thread(
                target=annotator,
                args=(base, name, project_id, quota, retry_every, think_ms, barrier, tally, progress),
                daemon=True,
            )
            for name, quota in zip(names, quotas, strict=True)
        ]
        for t in threads:
            t.start()
        barrier.wait()  # every client is logged in
        t0 = time.perf_counter()
        rss = {"start": rss_mb(proc.pid)}
        while any(t.is_alive() for t in threads):
            if "half" not in rss and progress["votes"] >= n_votes // 2:
                rss["half"] = rss_mb(proc.pid)
            time.sleep(0.05)
        total_s = time.perf_counter() - t0
        rss["end"] = rss_mb(proc.pid)
        result = {
            "backend": backend,
            "annotators": n_users,
            "votes_requested": n_votes,
            "retry_every": retry_every,
            "think_ms": think_ms,
            "total_s": round(total_s, 2),
            "votes_per_s": round(len(tally.keys) / total_s, 1),
            "vote": _stats(tally.vote_ms),
            "retry": _stats(tally.retry_ms),
            "next": _stats(tally.next_ms),
            "retries": tally.retries,
            "retries_replayed": tally.retries_replayed,
            "server_5xx": tally.server_5xx,
            "transport_errors": tally.transport_errors,
            "unexpected_status": dict(tally.unexpected),
            "clients_ran_out": tally.ran_out,
            "server_rss_mb": rss,
            "seed_s": round(seed_s, 1),
            "server_startup_s": round(startup_s, 1),
        }
        result |= verify(url, tally)
        result["pass"] = (
            result["lost"] == 0
            and result["duplicated"] == 0
            and result["unasked_rows"] == 0
            and result["server_5xx"] == 0
            and result["votes_stored"] == n_votes
            and result["retries_replayed"] == result["retries"]
        )
        if backend == "sqlite":
            result["meets_latency_targets"] = (
                result["vote"]["p95_ms"] <= TARGETS["vote_p95_ms"] and result["total_s"] <= TARGETS["total_s"]
            )
        return result
    finally:
        if proc is not None:
            stop(proc)
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=50)
    p.add_argument("--votes", type=int, default=2000)
    p.add_argument("--retry-every", type=int, default=10)
    p.add_argument(
        "--think-ms", type=float, default=1000.0, help="mean pause before each vote (uniform 0.5x-1.5x)"
    )
    p.add_argument("--no-stress", action="store_true", help="skip the extra SQLite run without pauses")
    p.add_argument("--pg-users", type=int, default=10)
    p.add_argument("--pg-votes", type=int, default=1000)
    p.add_argument("--skip-postgres", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "annotation_load.json")
    args = p.parse_args(argv)

    plan = [("sqlite", args.users, args.votes, args.think_ms)]
    if not args.no_stress and args.think_ms > 0:
        plan.append(("sqlite", args.users, args.votes, 0.0))
    if not args.skip_postgres:
        plan.append(("postgres", args.pg_users, args.pg_votes, 0.0))
    runs = []
    for backend, users, votes, think in plan:
        load_before = os.getloadavg()
        run = run_backend(backend, users, votes, args.retry_every, think)
        run["machine_load_avg_1m"] = {
            "before": round(load_before[0], 2),
            "after": round(os.getloadavg()[0], 2),
        }
        runs.append(run)
        print(json.dumps(run), file=sys.stderr, flush=True)
    report = {
        "benchmark": "annotation_load",
        "targets": TARGETS,
        "runs": runs,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
