"""A real studio process on a free port, and Debian's chromium driven by Playwright.

The studio starts with one admin (`studio.admin`, password `studio.admin_password`), created
through the CLI before the server starts; more with `studio.add_user(name, password, role)`.
The `login` fixture is `sign_in(page, studio, username=None, password=None)`: it signs a page in
through the login form and waits for the studio page.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ROOT = Path(__file__).resolve().parents[2]
ADMIN = "admin"
ADMIN_PASSWORD = "browser-test-admin-pw"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Studio:
    def __init__(self, tmp: Path, model: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = tmp / "data"
        self.admin, self.admin_password = ADMIN, ADMIN_PASSWORD
        self.add_user(ADMIN, ADMIN_PASSWORD, "admin")
        env = {
            **os.environ,
            "STUDIO_DATA_DIR": str(self.data_dir),
            "STUDIO_PORT": str(self.port),
            "STUDIO_MODEL": str(model),
            "GRADIO_TEMP_DIR": str(tmp / "gradio"),
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "GRADIO_ANALYTICS_ENABLED": "False",
            "OMP_NUM_THREADS": "1",
        }
        self.log = open(tmp / "studio.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py")], env=env, stdout=self.log, stderr=subprocess.STDOUT
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"studio exited early:\n{Path(self.log.name).read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.25)
        raise TimeoutError(f"studio not ready after {timeout} s:\n{Path(self.log.name).read_text()}")

    def add_user(self, username: str, password: str, role: str = "annotator") -> None:
        """Through the CLI (`studio create-admin` for the first admin, else `studio add-user`)."""
        from studio.cli import main

        first = not (self.data_dir / "studio.db").exists()
        args = ["create-admin"] if first and role == "admin" else ["add-user", "--role", role]
        with mock.patch.dict(os.environ, {"STUDIO_ADMIN_PASSWORD": password}):
            assert main(["--data-dir", str(self.data_dir), *args, "--username", username]) == 0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture
def studio(tmp_path, tiny_model):
    server = Studio(tmp_path, tiny_model)
    yield server
    server.stop()


def sign_in(page, studio: Studio, username: str | None = None, password: str | None = None) -> None:
    """Sign `page` in through the login form (the studio's admin unless told otherwise)."""
    from playwright.sync_api import expect

    username = username or studio.admin
    password = password or studio.admin_password
    page.goto(f"{studio.url}/login")
    page.locator("#username").fill(username)
    page.locator("#password").fill(password)
    page.locator("#login-button").click()
    expect(page.locator("#session-line")).to_contain_text(f"Signed in as {username}", timeout=30_000)


@pytest.fixture
def login():
    """`login(page, studio, username=None, password=None)`: sign a page in (default: the admin)."""
    return sign_in


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        message = f"{CHROMIUM} is missing (apt-get install chromium)"
        if os.environ.get("STUDIO_STRICT_TESTS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(20_000)
    outside: list[str] = []
    requested: list[str] = []
    dialogs: list[str] = []

    def _dialog(dialog):  # an alert() from injected text must not go unseen
        dialogs.append(dialog.message)
        dialog.dismiss()

    def _record(request):
        requested.append(request.url)
        host = urlparse(request.url).hostname
        if request.url.startswith(("data:", "blob:")) or host in ("127.0.0.1", "localhost"):
            return
        outside.append(request.url)

    page.on("request", _record)
    page.on("dialog", _dialog)
    page.requested = requested
    yield page
    context.close()
    assert not outside, f"the page reached outside loopback: {outside}"
    assert not dialogs, f"a dialog opened: {dialogs}"
