"""Atomic checkpoints, manifests, safe loading, the metrics stream and the calibration metric."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from trainers import checkpoint as ck
from trainers.checkpoint import (
    COMPLETE,
    CheckpointWriteError,
    ManifestError,
    clean_orphans,
    find_latest_complete,
    is_complete,
    load_training_state,
    manifest_digest,
    prune_checkpoints,
    read_studio_json,
    step_dir,
    verify_manifest,
    write_checkpoint,
)
from trainers.metrics import MetricsWriter, NonFiniteError, check_finite, pairwise_ece, read_metrics

REPO = Path(__file__).resolve().parents[2]


def payload(state: dict | None = None):
    """A write_files callable: a fake weights file, a nested file and an optional training state."""

    def write(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"\x00" * 64)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "tokenizer.json").write_text("{}")
        if state is not None:
            torch.save(state, tmp / ck.TRAINING_STATE)

    return write


def test_write_verify_and_find_latest(tmp_path):
    for step in (2, 10, 4):
        write_checkpoint(step_dir(tmp_path, step), payload(), {"step": step, "recipe": "t"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002", "step-000004", "step-000010"]
    latest = find_latest_complete(tmp_path)
    assert latest == tmp_path / "step-000010"
    manifest = verify_manifest(latest)
    assert manifest["step"] == 10
    assert set(manifest["files"]) == {"model.safetensors", "sub/tokenizer.json", "studio.json"}
    assert (latest / COMPLETE).read_text().strip() == manifest_digest(latest)
    studio = read_studio_json(latest)
    assert studio["recipe"] == "t" and studio["format"] == 1
    # A hand-made folder with a higher step but no COMPLETE marker is never picked.
    fake = step_dir(tmp_path, 999)
    fake.mkdir()
    (fake / "model.safetensors").write_bytes(b"x")
    assert find_latest_complete(tmp_path) == latest
    assert find_latest_complete(tmp_path / "nothing-here") is None


def test_tampered_missing_or_extra_files_fail_verification(tmp_path):
    good = write_checkpoint(tmp_path / "ckpt", payload(), {"step": 1})
    verify_manifest(good)
    weights = good / "model.safetensors"
    weights.write_bytes(b"\x00" * 63 + b"\x01")  # one byte altered, same size
    assert is_complete(good)  # the quick check only compares sizes
    with pytest.raises(ManifestError, match=r"model\.safetensors does not match its sha256"):
        verify_manifest(good)
    weights.write_bytes(b"\x00" * 64)
    verify_manifest(good)
    (good / "optim.pt").write_bytes(b"dropped in")
    with pytest.raises(ManifestError, match=r"files not in the manifest: optim\.pt"):
        verify_manifest(good)
    (good / "optim.pt").unlink()
    (good / "sub" / "tokenizer.json").unlink()
    with pytest.raises(ManifestError, match=r"tokenizer\.json is missing"):
        verify_manifest(good)
    assert not is_complete(good)
    (good / COMPLETE).write_text("0" * 64)
    with pytest.raises(ManifestError, match="does not match COMPLETE"):
        verify_manifest(good)


def test_crash_while_writing_leaves_no_complete_looking_checkpoint(tmp_path):
    write_checkpoint(step_dir(tmp_path, 1), payload(), {"step": 1})

    def crashing(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        write_checkpoint(step_dir(tmp_path, 2), crashing, {"step": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["step-000001"]  # no step-2, no temp folder
    assert find_latest_complete(tmp_path) == step_dir(tmp_path, 1)


def test_disk_full_while_syncing_is_a_clean_error(tmp_path, monkeypatch):
    calls = []

    def full(path: Path) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "_fsync_file", full)
    with pytest.raises(CheckpointWriteError) as info:
        write_checkpoint(step_dir(tmp_path, 3), payload(), {"step": 3})
    assert info.value.code == "disk_full"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("number", "code"),
    [(errno.EFBIG, "disk_full"), (errno.EDQUOT, "disk_full"), (errno.EACCES, "io")],
)
def test_file_too_large_counts_as_disk_full_other_errors_as_io(tmp_path, monkeypatch, number, code):
    # EFBIG is what a write past RLIMIT_FSIZE (``ulimit -f``) gets (with SIGXFSZ ignored).
    def write_manifest(path: Path, text: str) -> None:
        raise OSError(number, os.strerror(number))

    monkeypatch.setattr(ck, "_write_synced", write_manifest)
    with pytest.raises(CheckpointWriteError) as info:
        write_checkpoint(step_dir(tmp_path, 3), payload(), {"step": 3})
    assert info.value.code == code
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone


def test_a_real_file_size_limit_is_disk_full(tmp_path):
    # The real thing, in a child process: RLIMIT_FSIZE 4 KiB, SIGXFSZ ignored, so a 64 KiB write gets EFBIG.
    script = textwrap.dedent(
        f"""
        import resource, signal
        from pathlib import Path
        from trainers.checkpoint import CheckpointWriteError, write_checkpoint

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            write_checkpoint(Path({str(tmp_path)!r}) / "big", lambda tmp: (tmp / "w.bin").write_bytes(bytes(2**16)), {{}})
        except CheckpointWriteError as exc:
            print(exc.code, exc.__cause__.errno)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.stdout.split() == ["disk_full", str(errno.EFBIG)], proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_free_space_check_refuses_before_writing(tmp_path):
    with pytest.raises(CheckpointWriteError, match="disk full") as info:
        write_checkpoint(tmp_path / "big", payload(), {}, expected_bytes=2**60)
    assert info.value.code == "disk_full"
    assert list(tmp_path.iterdir()) == []


def test_kill_9_mid_write_leaves_an_orphan_that_is_ignored_and_cleaned(tmp_path):
    write_checkpoint(step_dir(tmp_path, 1), payload(), {"step": 1})
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from pathlib import Path
        from trainers.checkpoint import write_checkpoint, step_dir

        def dying(tmp):
            (tmp / "model.safetensors").write_bytes(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)

        write_checkpoint(step_dir(Path({str(tmp_path)!r}), 2), dying, {{"step": 2}})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=60)
    assert proc.returncode == -9
    orphans = [p for p in tmp_path.iterdir() if p.name.startswith(ck.TMP_PREFIX)]
    assert len(orphans) == 1
    assert find_latest_complete(tmp_path) == step_dir(tmp_path, 1)
    assert clean_orphans(tmp_path) == orphans
    assert [p.name for p in tmp_path.iterdir()] == ["step-000001"]


def test_rewriting_a_checkpoint_replaces_it(tmp_path):
    write_checkpoint(tmp_path / "final", payload(), {"step": 1})
    write_checkpoint(tmp_path / "final", payload(), {"step": 2})
    assert read_studio_json(tmp_path / "final")["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_studio_json_keeps_keys_written_by_the_payload(tmp_path):
    def write(tmp: Path) -> None:
        (tmp / "studio.json").write_text(json.dumps({"segment_rm": {"threshold": 2.0}, "step": -1}))

    path = write_checkpoint(tmp_path / "c", write, {"step": 5})
    assert read_studio_json(path)["segment_rm"] == {"threshold": 2.0}
    assert read_studio_json(path)["step"] == 5


def test_training_state_round_trip_and_manifest_check(tmp_path):
    state = {
        "optimizer": {"state": {0: {"exp_avg": torch.arange(3.0)}}, "param_groups": [{"lr": 0.1}]},
        "step": 7,
    }
    path = write_checkpoint(tmp_path / "c", payload(state), {"step": 7})
    loaded = load_training_state(path)
    assert loaded["step"] == 7
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], torch.arange(3.0))
    torch.save({"step": 8}, path / ck.TRAINING_STATE)  # replaced after the manifest was written
    with pytest.raises(ManifestError, match=r"training_state\.pt has the wrong size"):
        load_training_state(path)
    bare = write_checkpoint(tmp_path / "bare", payload(), {"step": 1})
    with pytest.raises(ManifestError, match="not a resumable checkpoint"):
        load_training_state(bare)


class _Exploit:
    """A pickle that writes a marker file when unpickled by an unsafe loader."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_crafted_pickle_is_refused_even_with_a_matching_manifest(tmp_path):
    marker = tmp_path / "pwned.txt"

    def write(tmp: Path) -> None:
        torch.save({"step": _Exploit(str(marker))}, tmp / ck.TRAINING_STATE)

    path = write_checkpoint(tmp_path / "evil", write, {"step": 1})
    verify_manifest(path)  # the hashes match: only the safe loader stands in the way
    with pytest.raises(ManifestError, match="refused by the safe loader"):
        load_training_state(path)
    assert not marker.exists()


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        write_checkpoint(step_dir(tmp_path, step), payload(), {"step": step})
    removed = prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == ["step-000001", "step-000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000003", "step-000004"]
    assert prune_checkpoints(tmp_path, keep=0) == []


# ----------------------------------------------------------------------------- metrics


def test_metrics_stream_is_flushed_per_write_and_trimmed_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path) as writer:
        writer.write(1, {"train/loss": 0.5}, when=100.0)
        assert read_metrics(path) == [{"step": 1, "time": 100.0, "train/loss": 0.5}]  # visible while open
        writer.write(2, {"train/loss": float("nan"), "eval/accuracy": torch.tensor(0.75)})
        writer.write(3, {"train/loss": 0.25})
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["train/loss"] is None and rows[1]["eval/accuracy"] == 0.75
    with path.open("a") as handle:
        handle.write('{"step": 4, "train/lo')  # torn line from a crash
    assert len(read_metrics(path)) == 3
    with MetricsWriter(path, resume_step=2) as writer:  # resumed from the step-2 checkpoint
        writer.write(3, {"train/loss": 0.3})
    assert [(r["step"], r["train/loss"]) for r in read_metrics(path)] == [(1, 0.5), (2, None), (3, 0.3)]
    MetricsWriter(path).close()  # a fresh run starts an empty file
    assert read_metrics(path) == []
    disabled = MetricsWriter(tmp_path / "other.jsonl", enabled=False)
    disabled.write(1, {"x": 1.0})
    assert not (tmp_path / "other.jsonl").exists()


def test_check_finite_names_the_value_and_step():
    check_finite(3, loss=torch.tensor(0.1), grad_norm=2.0)
    with pytest.raises(NonFiniteError, match=r"non-finite grad_norm \(inf\) at step 4") as info:
        check_finite(4, loss=0.1, grad_norm=torch.tensor(math.inf))
    assert info.value.code == "nan_loss" and info.value.step == 4


def test_pairwise_ece_hand_worked():
    # Zero gaps: p = 0.5 for every pair; the bin [0.5, 0.6) holds (0.5, label 1) and (0.5, label 0):
    # mean label 0.5 = mean p 0.5 → ECE 0.
    assert pairwise_ece(torch.zeros(4)) == pytest.approx(0.0)
    # Gap ln 3: p = σ(ln 3) = 0.75. Points (0.75, 1) in bin 7 and (0.25, 0) in bin 2, half the mass each:
    # ECE = ½·|1 − 0.75| + ½·|0 − 0.25| = 0.25.
    assert pairwise_ece(torch.full((5,), math.log(3))) == pytest.approx(0.25)
    # Confidently wrong (gap −20): p ≈ 0 with label 1, 1 − p ≈ 1 with label 0 → ECE ≈ 1.
    assert pairwise_ece(torch.full((3,), -20.0)) == pytest.approx(1.0, abs=1e-6)
    # Mixed: gaps ln 3 and −ln 3 → p = 0.75 and 0.25. Bin 7 gets (0.75, 1) and (0.75, 0): mean label 0.5
    # vs 0.75; bin 2 gets (0.25, 0) and (0.25, 1): 0.5 vs 0.25 → ECE = ½·0.25 + ½·0.25 = 0.25.
    assert pairwise_ece(torch.tensor([math.log(3), -math.log(3)])) == pytest.approx(0.25)


def test_no_unsafe_loading_in_the_trainers_package():
    for path in (REPO / "trainers").rglob("*.py"):
        text = path.read_text()
        assert "weights_only=False" not in text, path
        assert "trust_remote_code=True" not in text, path
