"""The `studio` command: create a project, import (strict and lenient), generate, migrate."""

from __future__ import annotations

import json

import pytest

from studio.cli import main


@pytest.fixture
def env(tmp_path, monkeypatch, tiny_model):
    monkeypatch.setenv("STUDIO_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("STUDIO_MODEL", str(tiny_model))
    monkeypatch.delenv("STUDIO_DATABASE_URL", raising=False)
    return tmp_path


def test_import_and_generate_from_the_command_line(env, capsys):
    good = env / "p.jsonl"
    good.write_text("".join(json.dumps({"id": str(i), "prompt": f"Say {i}"}) + "\n" for i in range(3)))
    bad = env / "bad.csv"
    bad.write_text("id,prompt\n1,fine\n1,again\n")

    assert main(["create-project", "CLI"]) == 0
    assert main(["import", str(bad), "--project", "CLI", "--report", str(env / "r.json")]) == 1
    err = capsys.readouterr().err
    assert "bad.csv:3 [id] duplicate_id" in err
    assert json.loads((env / "r.json").read_text())[0]["code"] == "duplicate_id"

    assert main(["import", str(good), "--project", "CLI"]) == 0
    assert "Imported 3 new prompt(s)" in capsys.readouterr().out
    assert main(["import", str(good), "--project", "CLI"]) == 0
    assert "skipped 3 already in the project" in capsys.readouterr().out

    assert main(["generate", "--project", "CLI", "--max-new-tokens", "4", "--limit", "2"]) == 0
    assert "Generated 4 response(s) for 2 prompt(s)" in capsys.readouterr().out
    assert (env / "data" / "studio.db").exists()


def test_unknown_project_is_a_clear_error(env, capsys):
    assert main(["import", str(env / "x.jsonl"), "--project", "nope"]) == 2
    assert "no project named 'nope'" in capsys.readouterr().err
    assert main(["migrate"]) == 0
