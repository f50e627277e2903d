"""Shared fixtures: an offline environment, a migrated database per test (SQLite, and PostgreSQL
through `any_db`), tiny models.

Tests never touch the hub or the real default model (except the `slow` ones, which use the
model cache filled by `studio fetch-models`).
"""

from __future__ import annotations

import os

# Before anything imports transformers, gradio or huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import glob
import itertools
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from storage.db import Database, sqlite_url, upgrade

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = (
    "The sea is vast and calm under the moon. A good review says what was good and what was bad. "
    "Write one sentence about the weather. The pizza was warm, the service slow, the price fair. "
    "Explain why the sky is blue in simple words. Translate hello into French: bonjour. "
    "Numbers: 0 1 2 3 4 5 6 7 8 9. Punctuation: ! ? , . ; : ' \" ( ) [ ] { } < > / \\ - _ = + * & ^ % $ # @ ~ `. "
    "Ünïcödé: café, naïve, 東京, 😀, emoji and accents survive byte-level BPE."
)


@pytest.fixture(scope="session")
def _template_db(tmp_path_factory) -> Path:
    """A database migrated once per session; each test gets a copy (migrations take ~0.5 s)."""
    path = tmp_path_factory.mktemp("template") / "studio.db"
    db = Database.from_url(sqlite_url(path))
    upgrade(db.engine)
    db.dispose()
    return path


@pytest.fixture
def db(tmp_path, _template_db) -> Database:
    path = tmp_path / "studio.db"
    shutil.copy(_template_db, path)
    database = Database.from_url(sqlite_url(path))
    yield database
    database.dispose()


def build_tiny_model(folder: Path, *, seed: int = 0) -> Path:
    """A random 2-layer Llama with a byte-level BPE tokenizer trained on a tiny corpus (< 1 s)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    import torch

    torch.set_num_threads(1)
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def make_tiny_model(tmp_path_factory):
    """Build another tiny model with different random weights: `make_tiny_model(seed)` -> folder."""

    def make(seed: int) -> Path:
        return build_tiny_model(tmp_path_factory.mktemp("models") / f"tiny-llama-{seed}", seed=seed)

    return make


# --------------------------------------------------------------------------- PostgreSQL
# A real server for the session: a temp cluster on a free loopback port, stopped at the end.
# Missing server binaries skip these tests, except under STUDIO_STRICT_TESTS=1 (CI), where they fail.


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _as_postgres_user() -> list[str]:
    # The server refuses to run as root; CI runs as root, so switch to the distribution's user.
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@pytest.fixture(scope="session")
def pg_server():
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        message = "PostgreSQL server binaries (initdb, pg_ctl) are missing: apt-get install postgresql"
        if os.environ.get("STUDIO_STRICT_TESTS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    # Not under pytest's tmp folder: that is private to root, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="studio-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = _as_postgres_user()
    subprocess.run(
        [*run, initdb, "-D", str(data), "-U", "studio", "-A", "trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [*run, pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
    yield f"postgresql+psycopg://studio@127.0.0.1:{port}"
    subprocess.run([*run, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


_counter = itertools.count()


@pytest.fixture
def pg_db(pg_server) -> Database:
    """A fresh, migrated PostgreSQL database for one test."""
    admin = Database.from_url(f"{pg_server}/postgres")
    name = f"t{os.getpid()}_{next(_counter)}_{int(time.time())}"
    with admin.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    admin.dispose()
    db = Database.from_url(f"{pg_server}/{name}")
    upgrade(db.engine)
    yield db
    db.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def any_db(request) -> Database:
    return request.getfixturevalue("db" if request.param == "sqlite" else "pg_db")
