from __future__ import annotations

from pathlib import Path

import pytest

from studio.settings import Settings


def test_defaults_put_sqlite_in_the_data_folder(tmp_path):
    s = Settings.from_env({"STUDIO_DATA_DIR": str(tmp_path), "HOME": str(tmp_path)})
    assert s.database_url == f"sqlite:///{tmp_path.resolve()}/studio.db"
    assert (s.host, s.port, s.default_model, s.max_upload_mb) == ("127.0.0.1", 7860, "smollm2", 50)


def test_environment_and_overrides(tmp_path):
    env = {
        "STUDIO_DATABASE_URL": "postgresql+psycopg://u:p@db/studio",
        "STUDIO_PORT": "8000",
        "STUDIO_MODEL": "/models/mine",
        "STUDIO_MODEL_CACHE": str(tmp_path / "cache"),
    }
    s = Settings.from_env(env, port=9000)
    assert s.database_url.startswith("postgresql") and s.port == 9000 and s.default_model == "/models/mine"
    assert s.model_cache == Path(tmp_path / "cache")
    # Overriding the data folder moves the default SQLite file with it.
    assert Settings.from_env({}, data_dir=tmp_path / "d").database_url.endswith("/d/studio.db")


def test_allowed_origins_from_the_environment():
    env = {"STUDIO_ALLOWED_ORIGINS": " https://studio.example.org/ ,http://10.0.0.5:8080,, "}
    assert Settings.from_env(env).allowed_origins == ("https://studio.example.org", "http://10.0.0.5:8080")
    assert Settings.from_env({}).allowed_origins == ()
    with pytest.raises(ValueError, match=r"STUDIO_ALLOWED_ORIGINS: 'studio\.example\.org' is not an origin"):
        Settings.from_env({"STUDIO_ALLOWED_ORIGINS": "studio.example.org"})
    with pytest.raises(ValueError, match="is not an origin"):
        Settings.from_env({"STUDIO_ALLOWED_ORIGINS": "https://studio.example.org/path"})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"STUDIO_PORT": "eighty"}, "STUDIO_PORT must be an integer"),
        ({"STUDIO_PORT": "0"}, "1..65535"),
        ({"STUDIO_MAX_UPLOAD_MB": "0"}, ">= 1"),
    ],
)
def test_bad_values_are_clear_errors(env, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env)
