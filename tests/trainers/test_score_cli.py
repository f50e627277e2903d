"""``python -m trainers score``: RM scores equal the RL reward sources', bad input and tampered
checkpoints are refused with a code, and the output file is replaced atomically."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from trainers.__main__ import main as trainers_main
from trainers.checkpoint import manifest_digest
from trainers.config import OptimConfig
from trainers.rewards import SegmentRMReward, SequenceRMReward
from trainers.synthetic import write_synthetic_snapshot

REPO = Path(__file__).resolve().parents[2]

ROWS = [
    {"id": 1, "prompt": "Write a short review of the table.\n", "response": "wonderful table, awful lamp"},
    {"id": "two", "prompt": "Write a short review of the river.\n", "response": "garden hate pillow"},
    {"id": 3, "prompt": [{"role": "user", "content": "Review the lamp."}], "response": "love desk tower"},
    {"id": 4, "prompt": "Write a short review of the desk.\n", "response": ""},
]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    return write_synthetic_snapshot(tmp_path_factory.mktemp("syn"), n_train=16, n_eval=8)


@pytest.fixture(scope="module")
def sequence_rm(tiny_model, snapshot, tmp_path_factory) -> Path:
    """A reward_model checkpoint: 2 steps of the recipe on the synthetic task."""
    from trainers.recipes.reward_model import RewardModelConfig, train

    cfg = RewardModelConfig(
        snapshot=str(snapshot.train), eval_snapshot=str(snapshot.eval), model=str(tiny_model),
        output_dir=str(tmp_path_factory.mktemp("seqrm") / "run"), max_length=48, batch_size=8, max_steps=2,
        optim=OptimConfig(lr=1e-3), progress=False, cpu=True,
    )  # fmt: skip
    return train(cfg).final_checkpoint


@pytest.fixture(scope="module")
def segment_rm(tiny_model, snapshot, tmp_path_factory) -> Path:
    """A segment_reward_model checkpoint (calibrated τ_H, fitted normaliser): 2 steps of the recipe."""
    from trainers.recipes.segment_reward_model import train
    from trainers.segment_rm_config import SegmentRewardModelConfig

    cfg = SegmentRewardModelConfig(
        snapshot=str(snapshot.train), eval_snapshot=str(snapshot.eval), model=str(tiny_model),
        output_dir=str(tmp_path_factory.mktemp("segrm") / "run"), max_length=64, batch_size=8, max_steps=2,
        optim=OptimConfig(lr=2e-3), progress=False,
    )  # fmt: skip
    return train(cfg).final_checkpoint


def write_input(path: Path, rows: list[dict] | list[str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_output(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def score(checkpoint: Path, inp: Path, out: Path, *extra: str) -> int:
    return trainers_main(["score", "--checkpoint", str(checkpoint), "--input", str(inp),
                          "--output", str(out), "--cpu", *extra])  # fmt: skip


def expected_totals(source, rows) -> list[float]:
    outs = source.score([r["prompt"] for r in rows], [r["response"] for r in rows])
    for out in outs:
        if out.rewards:  # the RL return: the token rewards sum to the sequence reward
            assert sum(out.rewards) == pytest.approx(out.total, abs=1e-5)
    return [o.total for o in outs]


# ----------------------------------------------------------------------------- scores


def test_sequence_rm_scores_equal_the_rl_reward_source(sequence_rm, tiny_model, tmp_path):
    inp = write_input(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out" / "scores.jsonl"
    assert score(sequence_rm, inp, out, "--batch-size", "3") == 0
    got = read_output(out)
    assert [r["id"] for r in got] == [1, "two", 3, 4]  # input order, ids as given
    # what a PPO run with reward {kind: sequence_rm, path: ...} computes, with the *policy's* tokenizer
    policy_tok = AutoTokenizer.from_pretrained(tiny_model)
    want = expected_totals(SequenceRMReward(sequence_rm, policy_tok, append_eos=True), ROWS)
    assert [r["score"] for r in got] == pytest.approx(want, abs=1e-5)
    assert len(set(want)) == len(want)  # the rows really get different scores
    # batching does not change a score
    assert score(sequence_rm, inp, tmp_path / "one.jsonl", "--batch-size", "1") == 0
    assert [r["score"] for r in read_output(tmp_path / "one.jsonl")] == pytest.approx(want, abs=1e-5)


def test_segment_rm_scores_equal_the_rl_reward_source(segment_rm, tiny_model, tmp_path):
    studio = json.loads((segment_rm / "studio.json").read_text())
    assert studio["kind"] == "segment_reward" and studio["segment_rm"]["normaliser"]
    inp = write_input(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "scores.jsonl"
    assert score(segment_rm, inp, out) == 0
    policy_tok = AutoTokenizer.from_pretrained(tiny_model)
    want = expected_totals(SegmentRMReward(segment_rm, policy_tok, append_eos=True), ROWS)
    assert [r["score"] for r in read_output(out)] == pytest.approx(want, abs=1e-5)
    assert len(set(want)) == len(want)


def test_a_segment_rm_without_a_normaliser_scores_raw_segment_rewards(segment_rm, tiny_model, tmp_path):
    from trainers.checkpoint import COMPLETE, MANIFEST, STUDIO_JSON, write_checkpoint

    studio = json.loads((segment_rm / STUDIO_JSON).read_text())
    studio["segment_rm"]["normaliser"] = None

    def payload(tmp: Path) -> None:
        for file in segment_rm.iterdir():
            if file.name not in (MANIFEST, COMPLETE, STUDIO_JSON):
                shutil.copy(file, tmp / file.name)

    raw = write_checkpoint(tmp_path / "raw", payload, studio)
    inp = write_input(tmp_path / "in.jsonl", ROWS)
    assert score(raw, inp, tmp_path / "out.jsonl") == 0
    policy_tok = AutoTokenizer.from_pretrained(tiny_model)
    want = expected_totals(SegmentRMReward(raw, policy_tok, normalise=False), ROWS)
    normalised = expected_totals(SegmentRMReward(segment_rm, policy_tok), ROWS)
    assert [r["score"] for r in read_output(tmp_path / "out.jsonl")] == pytest.approx(want, abs=1e-5)
    assert want != pytest.approx(normalised, abs=1e-3)


def test_the_cli_runs_as_a_subprocess(sequence_rm, tmp_path):
    inp = write_input(tmp_path / "in.jsonl", ROWS[:2])
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "trainers", "score", "--checkpoint", str(sequence_rm), "--input", str(inp),
            "--output", str(out), "--cpu", "--manifest-sha256", manifest_digest(sequence_rm)]  # fmt: skip
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["rows"] == 2 and summary["kind"] == "reward" and summary["device"] == "cpu"
    assert [r["id"] for r in read_output(out)] == [1, "two"]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": 9, "prompt": "p", "response": 5}', "in.jsonl:3: field 'response': must be a string, got int"),
        ('{"id": 9, "response": "r"}', "in.jsonl:3: field 'prompt': missing"),
        ('{"id": null, "prompt": "p", "response": "r"}', "in.jsonl:3: field 'id': must be an integer or a string"),
        ('{"id": 9, "prompt": [{"role": "user"}], "response": "r"}', "in.jsonl:3: field 'prompt': must be a string or"),
        ('{"id": 9, "prompt": "p", "response": "r"', "in.jsonl:3: not valid JSON"),
        ('["not", "an", "object"]', "in.jsonl:3: expected a JSON object, got list"),
        ('{"id": 1, "prompt": "p", "response": "r"}', "in.jsonl:3: field 'id': 1 repeats line 1"),
    ],
)  # fmt: skip
def test_a_bad_input_line_is_named_by_file_line_and_field(sequence_rm, tmp_path, capsys, line, message):
    inp = write_input(tmp_path / "in.jsonl", [ROWS[0], "", line, ROWS[1]])  # line 2 is blank: skipped
    out = tmp_path / "out.jsonl"
    assert score(sequence_rm, inp, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error[bad_input]: ") and message in err[-1], err
    assert not out.exists()


def test_bad_arguments_exit_2_with_an_error_line(sequence_rm, tmp_path, capsys):
    inp = write_input(tmp_path / "in.jsonl", ROWS[:1])
    assert trainers_main(["score", "--checkpoint", str(sequence_rm), "--input", str(inp)]) == 2
    assert "error[bad_input]: python -m trainers score: the following arguments are required: --output" in (
        capsys.readouterr().err
    )
    assert score(sequence_rm, inp, tmp_path / "o.jsonl", "--batch-size", "0") == 2
    assert "error[bad_input]: --batch-size must be at least 1" in capsys.readouterr().err
    assert score(sequence_rm, tmp_path / "missing.jsonl", tmp_path / "o.jsonl") == 2
    assert "missing.jsonl: cannot read the input" in capsys.readouterr().err


# ----------------------------------------------------------------------------- checkpoints


def _copy(checkpoint: Path, dest: Path) -> Path:
    shutil.copytree(checkpoint, dest)
    return dest


def test_a_tampered_checkpoint_is_refused_before_loading(sequence_rm, tmp_path, capsys):
    inp = write_input(tmp_path / "in.jsonl", ROWS[:2])
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")

    altered = _copy(sequence_rm, tmp_path / "altered")
    weights = altered / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size: only the sha256 can tell
    weights.write_bytes(bytes(data))
    assert score(altered, inp, out) == 5
    assert "error[bad_checkpoint]: " in (err := capsys.readouterr().err)
    assert "model.safetensors does not match its sha256" in err

    extra = _copy(sequence_rm, tmp_path / "extra")
    (extra / "pytorch_model.bin").write_bytes(b"pickle")
    assert score(extra, inp, out) == 5
    assert "files not in the manifest: pytorch_model.bin" in capsys.readouterr().err

    incomplete = _copy(sequence_rm, tmp_path / "incomplete")
    (incomplete / "COMPLETE").unlink()
    assert score(incomplete, inp, out) == 5
    assert "incomplete checkpoint" in capsys.readouterr().err

    assert score(sequence_rm, inp, out, "--manifest-sha256", "0" * 64) == 5
    assert "not the one recorded when the checkpoint was registered" in capsys.readouterr().err
    assert out.read_text() == "old\n"  # nothing was written


def test_a_policy_checkpoint_is_not_a_reward_model(tmp_path, tiny_model, capsys):
    from transformers import AutoModelForCausalLM

    from trainers.checkpoint import save_checkpoint

    policy = save_checkpoint(
        tmp_path / "policy",
        model=AutoModelForCausalLM.from_pretrained(tiny_model),
        tokenizer=AutoTokenizer.from_pretrained(tiny_model),
        studio={"recipe": "ppo", "kind": "policy"},
    )
    inp = write_input(tmp_path / "in.jsonl", ROWS[:1])
    assert score(policy, inp, tmp_path / "out.jsonl") == 5
    assert "a policy checkpoint is not a reward model" in capsys.readouterr().err


# ----------------------------------------------------------------------------- atomic output


def test_the_output_is_replaced_atomically(sequence_rm, tmp_path, monkeypatch, capsys):
    import trainers.score_cli as score_cli

    inp = write_input(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    out.write_text("the previous scores\n")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(score_cli.os, "fsync", disk_full)  # fails after every row was written to the temp file
        assert score(sequence_rm, inp, out) == 4
    assert "error[disk_full]: could not write" in capsys.readouterr().err
    assert out.read_text() == "the previous scores\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # no temp file left

    assert score(sequence_rm, inp, out) == 0
    assert [r["id"] for r in read_output(out)] == [1, "two", 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_a_response_with_a_unicode_line_separator_is_one_row(tmp_path):
    from trainers.score_cli import read_rows

    path = tmp_path / "in.jsonl"
    rows = [{"id": 1, "prompt": "p", "response": "a\u2028b"}, {"id": 2, "prompt": "q", "response": "c\x85d"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows), encoding="utf-8")
    assert [(r.id, r.response) for r in read_rows(path)] == [(1, "a\u2028b"), (2, "c\x85d")]
