"""A studio process and a browser for end-to-end checks (bench/training_default_setup.py).

`Studio`: `python app.py` on a fresh data folder and a free port, as the README runs it (its console in
`studio.log`, the first-run setup link read from there). `Ui`: Playwright steps on the studio's pages
(element ids of studio/tabs/*.py). `CpuMeter`: CPU seconds of the studio process and of the browser.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
ADMIN, PASSWORD = "admin", "default-setup-pw"
JOB_MS = 30 * 60_000
"""Milliseconds allowed for one training job in the browser."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Studio:
    """`python app.py` on a fresh data folder and a free port, as the README runs it."""

    def __init__(self, work: Path):
        self.data_dir = work / "data"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = work / "studio.log"
        env = {
            **os.environ,
            "STUDIO_DATA_DIR": str(self.data_dir),
            "STUDIO_PORT": str(self.port),
            "GRADIO_TEMP_DIR": str(work / "gradio"),
        }
        for key in ("STUDIO_MODEL", "STUDIO_WORKER", "STUDIO_DATABASE_URL", "STUDIO_FAULT_STEP_SLEEP_S"):
            env.pop(key, None)  # the default setup
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "app.py"], cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )
        self.ready_s = self._wait_ready()

    def _wait_ready(self, timeout: float = 180) -> float:
        import urllib.request

        while time.perf_counter() - self.started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the studio exited:\n{self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return round(time.perf_counter() - self.started, 2)
            except OSError:
                time.sleep(0.25)
        raise TimeoutError(f"the studio did not answer within {timeout} s")

    def setup_link(self) -> str:
        """The one-time link the console prints on a first start."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = re.search(r"http://\S+/setup\?token=\S+", self.log_path.read_text())
            if found:
                return found.group(0)
            time.sleep(0.2)
        raise RuntimeError("no setup link in the console output")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.log.close()
        return code


class Ui:
    """Playwright steps on the studio's pages (element ids of studio/tabs/*.py)."""

    def __init__(self, page, studio: Studio):
        from playwright.sync_api import expect

        self.page, self.studio, self.expect = page, studio, expect

    def first_admin(self) -> None:
        page = self.page
        page.goto(self.studio.setup_link())
        page.locator("#username").fill(ADMIN)
        page.locator("#password").fill(PASSWORD)
        page.locator("#password2").fill(PASSWORD)
        page.locator("#setup-button").click()
        self.expect(page.locator("#session-line")).to_contain_text(f"Signed in as {ADMIN}", timeout=60_000)

    def tab(self, name: str) -> None:
        self.page.get_by_role("tab", name=name).click()

    def number(self, elem_id: str, value: Any) -> None:
        box = self.page.locator(f"#{elem_id} input")
        box.fill(str(value))
        box.press("Tab")

    def choose(self, elem_id: str, option: str) -> None:
        self.page.locator(f"#{elem_id} input").click()
        self.page.get_by_role("option", name=re.compile(re.escape(option))).first.click()
        self.expect(self.page.locator(f"#{elem_id} input")).to_have_value(re.compile(re.escape(option)))

    def text(self, elem_id: str) -> str:
        return self.page.locator(f"#{elem_id}").inner_text()

    def project_with_pairs(self, pairs_file: Path, n: int) -> None:
        page = self.page
        page.get_by_text("New project").click()
        page.locator("#project-name textarea, #project-name input").first.fill("Default setup")
        page.locator("#create-project").click()
        self.expect(page.locator("#projects-status")).to_contain_text("Created project")
        self.tab("Datasets")
        page.locator("#ds-import-file input[type=file]").set_input_files(str(pairs_file))
        page.locator("#ds-import").click()
        self.expect(page.locator("#ds-import-result")).to_contain_text(
            f"Imported {n} row(s)", timeout=120_000
        )

    def prepare(self, recipe: str, base: str, fields: dict[str, Any], name: str) -> str:
        """Recipe, a fresh snapshot from the tab's button, the base, the form; returns the snapshot label."""
        page = self.page
        self.choose("train-recipe", recipe)
        page.locator("#train-make-snapshot").click()
        self.expect(page.locator("#train-launch-status")).to_contain_text("Made snapshot", timeout=120_000)
        self.choose("train-base", base)
        for key, value in fields.items():
            elem = f"train-{recipe}-{key.replace('.', '-')}"
            if isinstance(value, bool):
                box = page.locator(f"#{elem} input[type=checkbox]")
                box.set_checked(value)
            else:
                self.number(elem, value)
        page.get_by_text("Run options").click()
        page.locator("#train-job-name input, #train-job-name textarea").first.fill(name)
        page.get_by_text("Run options").click()
        return page.locator("#train-snapshot input").input_value()

    def launch(self) -> int:
        self.page.locator("#train-launch").click()
        status = self.page.locator("#train-launch-status")
        self.expect(status).to_contain_text(re.compile(r"Launched job #\d+"), timeout=120_000)
        return int(re.search(r"Launched job #(\d+)", status.inner_text()).group(1))

    def wait_progress(self, pattern: str, timeout_ms: int = JOB_MS) -> float:
        """Seconds until the progress line matches `pattern` (regex)."""
        start = time.perf_counter()
        self.expect(self.page.locator("#train-progress-text")).to_contain_text(
            re.compile(pattern), timeout=timeout_ms
        )
        return round(time.perf_counter() - start, 2)

    def verify(self, checkpoint_id: int) -> str:
        self.number("ckpt-id", checkpoint_id)
        self.page.locator("#ckpt-verify").click()
        status = self.page.locator("#ckpt-verify-status")
        self.expect(status).to_contain_text(f"Checkpoint #{checkpoint_id}", timeout=300_000)
        return status.inner_text().strip()


class CpuMeter:
    """CPU seconds (user + system) of the studio process itself (its trainer children left out) and of
    the browser (Playwright's driver and chromium): what watching a job costs beside the trainer."""

    def __init__(self, studio_pid: int):
        self.studio_pid = studio_pid

    def sample(self) -> dict[str, float]:
        import psutil

        def cpu(proc) -> float:
            try:
                t = proc.cpu_times()
                return t.user + t.system
            except psutil.Error:
                return 0.0

        studio = psutil.Process(self.studio_pid)
        studio_tree = {self.studio_pid, *(c.pid for c in studio.children(recursive=True))}
        browser = [c for c in psutil.Process().children(recursive=True) if c.pid not in studio_tree]
        return {"studio": cpu(studio), "browser": sum(cpu(c) for c in browser), "at": time.perf_counter()}

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        wall = after["at"] - before["at"]
        return {
            "studio_cpu_s": round(after["studio"] - before["studio"], 2),
            "browser_cpu_s": round(after["browser"] - before["browser"], 2),
            "wall_s": round(wall, 2),
            "load_avg_1min_after": round(os.getloadavg()[0], 2),
        }


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.perf_counter()
    while not predicate():
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"{what} not within {timeout} s")
        time.sleep(0.2)
    return round(time.perf_counter() - start, 2)
