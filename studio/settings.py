"""Studio settings: one typed object, read from the environment once in `app.py` and passed in.

| variable              | default                                   | meaning                                   |
|-----------------------|-------------------------------------------|-------------------------------------------|
| STUDIO_DATA_DIR       | ./data                                    | SQLite file, uploads, exports, checkpoints|
| STUDIO_DATABASE_URL   | sqlite:///<data dir>/studio.db            | or postgresql+psycopg://user:pw@host/db   |
| STUDIO_MODEL          | smollm2                                   | default model: short name, folder, HF id  |
| STUDIO_MODEL_CACHE    | ~/.cache/feedback-studio/models           | where `studio fetch-models` puts models   |
| STUDIO_HOST           | 127.0.0.1                                 | bind address                              |
| STUDIO_PORT           | 7860                                      | port                                      |
| STUDIO_MAX_UPLOAD_MB  | 50                                        | largest import file accepted              |
| STUDIO_ALLOWED_ORIGINS| (none)                                    | extra origins for POSTs, comma-separated  |
| STUDIO_WORKER         | 1                                         | 0: the studio starts no job worker        |
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from storage.db import sqlite_url
from trainers.models import default_cache_dir

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
}
_ORIGIN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s?#,]+")
"""scheme://host[:port], nothing after it (an Origin header's shape)."""


def parse_origins(raw: str | None) -> tuple[str, ...]:
    """'https://a.example, https://b.example:8443' -> ('https://a.example', 'https://b.example:8443')."""
    return tuple(o.strip().rstrip("/") for o in (raw or "").split(",") if o.strip())


def set_offline_env() -> None:
    """Nothing may reach the model hub or Gradio's analytics at run time."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("data")
    """Folder for the SQLite database, uploads, exports and checkpoints (kept out of Gradio's file route)."""
    database_url: str = ""
    """SQLAlchemy URL; empty means the embedded SQLite file `<data_dir>/studio.db`."""
    default_model: str = "smollm2"
    """Model used for generation unless another checkpoint is chosen: a short name, folder or HF id."""
    model_cache: Path = field(default_factory=lambda: default_cache_dir())
    """Where the default models are fetched to and converted (shared between clones)."""
    host: str = "127.0.0.1"
    port: int = 7860
    max_upload_mb: int = 50
    """Largest file accepted for import, in MiB (checked before parsing)."""
    allowed_origins: tuple[str, ...] = ()
    """Origins (scheme://host[:port]) whose POST/PUT/PATCH/DELETE requests are accepted besides the
    studio's own Host: the public address when a reverse proxy forwards with another Host header."""
    start_worker: bool = True
    """Run a training-job worker in a thread of the studio (false: only `studio worker` processes run jobs)."""

    def __post_init__(self) -> None:
        if not self.database_url:
            object.__setattr__(self, "database_url", sqlite_url(Path(self.data_dir) / "studio.db"))
        if not 1 <= self.port <= 65535:
            raise ValueError(f"STUDIO_PORT must be 1..65535, got {self.port}")
        if self.max_upload_mb < 1:
            raise ValueError(f"STUDIO_MAX_UPLOAD_MB must be >= 1, got {self.max_upload_mb}")
        if isinstance(self.allowed_origins, str):
            object.__setattr__(self, "allowed_origins", parse_origins(self.allowed_origins))
        for origin in self.allowed_origins:
            if not _ORIGIN.fullmatch(origin):
                raise ValueError(
                    f"STUDIO_ALLOWED_ORIGINS: {origin!r} is not an origin like https://studio.example.org"
                )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> Settings:
        env = os.environ if env is None else env

        def _int(name: str, default: int) -> int:
            raw = env.get(name)
            if raw in (None, ""):
                return default
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"{name} must be an integer, got {raw!r}") from None

        values = {
            "data_dir": Path(env.get("STUDIO_DATA_DIR") or "data").expanduser().resolve(),
            "database_url": env.get("STUDIO_DATABASE_URL", ""),
            "default_model": env.get("STUDIO_MODEL") or "smollm2",
            "model_cache": default_cache_dir(env),
            "host": env.get("STUDIO_HOST") or "127.0.0.1",
            "port": _int("STUDIO_PORT", 7860),
            "max_upload_mb": _int("STUDIO_MAX_UPLOAD_MB", 50),
            "allowed_origins": parse_origins(env.get("STUDIO_ALLOWED_ORIGINS")),
            "start_worker": (env.get("STUDIO_WORKER") or "1").strip().lower()
            not in ("0", "false", "no", "off"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def uploads_dir(self) -> Path:
        return Path(self.data_dir) / "uploads"

    @property
    def exports_dir(self) -> Path:
        return Path(self.data_dir) / "exports"
