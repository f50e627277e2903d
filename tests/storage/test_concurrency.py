"""R-DB-01: read-then-write transactions from many threads never hit "database is locked"."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from sqlmodel import func, select

from storage import models as m
from storage.db import Database


def test_fifty_threads_read_then_write_without_locking_errors(db: Database):
    with db.write() as s:
        project = m.Project(name="load")
        s.add(project)
        s.flush()
        project_id = project.id

    def worker(t: int) -> int:
        errors = 0
        for i in range(40):
            try:
                with db.write() as s:
                    # Read first, then write: the pattern that fails under deferred BEGIN in WAL mode.
                    taken = s.exec(
                        select(func.count(m.Prompt.id)).where(m.Prompt.external_id == f"{t}-{i}")
                    ).one()
                    if not taken:
                        s.add(m.Prompt(project_id=project_id, external_id=f"{t}-{i}", kind="text", text="x"))
            except Exception:
                errors += 1
        return errors

    with ThreadPoolExecutor(max_workers=50) as pool:
        errors = sum(pool.map(worker, range(50)))
    with db.read() as s:
        rows = s.exec(select(func.count(m.Prompt.id))).one()
    assert errors == 0
    assert rows == 2000
