"""Reward model vs humans: the pure counting by hand, and the service end to end (a tiny RM trained
by the recipe, arena battles and votes stored directly, scores from the ``python -m trainers score``
subprocess), with its role checks."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlmodel import select

from storage import crud
from storage import models as m
from storage import reward_scores as store
from storage import users as user_crud
from storage.db import Database
from studio.services.errors import Forbidden, NotFound, ServiceError, Unauthorized
from studio.services.rm_agreement import (
    JudgedBattle,
    PairAgreement,
    RMAgreementService,
    pair_agreement,
    rm_choice,
)
from studio.services.users import UserService
from studio.settings import Settings

# ----------------------------------------------------------------------------- the pure counting


def test_rm_choice_prefers_the_higher_score_and_sees_equal_scores_as_no_preference():
    assert rm_choice(2.0, 1.0) == "a" and rm_choice(-1.0, 0.5) == "b" and rm_choice(0.3, 0.3) is None


def test_pair_agreement_by_hand():
    battles = [
        # pair (1, 2)
        JudgedBattle(1, 2, "a", 2.0, 1.0),  # RM prefers a, humans a: agree
        JudgedBattle(2, 1, "b", 0.5, 0.7),  # shown the other way round; RM prefers b, humans b: agree
        JudgedBattle(1, 2, "a", 1.0, 1.0),  # equal scores: a disagreement
        JudgedBattle(1, 2, "b", 3.0, 1.0),  # RM prefers a, humans b: disagree
        JudgedBattle(1, 2, "tie", 3.0, 1.0),  # not decisive: left out
        JudgedBattle(2, 1, "both_bad", 0.0, 1.0),  # not decisive: left out
        # pair (2, 3)
        JudgedBattle(3, 2, "a", None, 1.0),  # decisive but unscored: counted apart
        JudgedBattle(2, 3, "a", 5.0, 4.0),  # agree
        # pair (1, 3): only a tie, so no row
        JudgedBattle(1, 3, "tie", 1.0, 2.0),
    ]
    rows = pair_agreement(battles)
    assert [(r.model_a, r.model_b) for r in rows] == [(1, 2), (2, 3), (None, None)]
    one_two, two_three, overall = rows
    assert (one_two.decisive_votes, one_two.agree, one_two.unscored, one_two.rate) == (4, 2, 0, 0.5)
    # Wilson 2/4, z = 1.959964, z² = 3.841459: denom = 1 + z²/4 = 1.960365,
    # centre = (0.5 + z²/8) / denom = 0.5, half = z·sqrt(0.25/4 + z²/64) / denom = 0.349961
    assert one_two.lower == pytest.approx(0.150039, abs=1e-5)
    assert one_two.upper == pytest.approx(0.849961, abs=1e-5)
    assert (two_three.decisive_votes, two_three.agree, two_three.unscored, two_three.rate) == (1, 1, 1, 1.0)
    # Wilson 1/1: denom = 1 + z² = 4.841459, centre = (1 + z²/2) / denom = 0.603275,
    # half = z·sqrt(z²/4) / denom = z²/2 / denom = 0.396725 → (0.206549, 1.0)
    assert two_three.lower == pytest.approx(0.206549, abs=1e-5) and two_three.upper == pytest.approx(1.0)
    assert overall.overall and not one_two.overall
    assert (overall.decisive_votes, overall.agree, overall.unscored) == (5, 3, 1)
    assert overall.rate == pytest.approx(0.6)


def test_pair_agreement_without_votes_is_only_an_empty_overall_row():
    assert pair_agreement([]) == [PairAgreement(None, None, 0, 0, None, None, None)]
    [unscored, overall] = pair_agreement([JudgedBattle(4, 2, "b", None, None)])
    assert (unscored.model_a, unscored.model_b, unscored.decisive_votes, unscored.unscored) == (2, 4, 0, 1)
    assert unscored.rate is None and unscored.lower is None and overall.unscored == 1


# ----------------------------------------------------------------------------- the service


@pytest.fixture(scope="module")
def reward_checkpoint(tiny_model, tmp_path_factory) -> Path:
    """A reward_model checkpoint: 2 steps of the recipe on the synthetic task."""
    from trainers.config import OptimConfig
    from trainers.recipes.reward_model import RewardModelConfig, train
    from trainers.synthetic import write_synthetic_snapshot

    root = tmp_path_factory.mktemp("rm")
    snap = write_synthetic_snapshot(root / "data", n_train=16, n_eval=8)
    cfg = RewardModelConfig(
        snapshot=str(snap.train), eval_snapshot=str(snap.eval), output_dir=str(root / "run"), model=str(tiny_model),
        max_length=48, batch_size=8, max_steps=2, optim=OptimConfig(lr=1e-3), progress=False, cpu=True,
    )  # fmt: skip
    return train(cfg).final_checkpoint


PROMPTS = [
    ("Write a short review of the table.\n", None),
    ("Review the lamp.", [{"role": "user", "content": "Review the lamp."}]),
    ("Write a short review of the river.\n", None),
]
TEXTS = {
    "base": ["table river window", "lamp is fine", "garden pillow"],
    "tuned": ["wonderful table, love it", "awful lamp, hate it", "great river"],
    "other": ["a desk", "the lamp", "a tower"],
}


def add_user(db: Database, name: str, role: m.Role) -> int:
    with db.write() as s:
        return user_crud.insert_user(
            s, username=name, role=role, password_hash="x", changed_at=datetime.now(UTC)
        ).id


def register_rm(db: Database, project_id: int | None, path: Path, name: str) -> int:
    """A ready reward checkpoint row, with its manifest digest when the folder exists (as the worker does)."""
    from trainers.checkpoint import manifest_digest

    digest = manifest_digest(path) if path.is_dir() else None
    with db.write() as s:
        row = m.Checkpoint(project_id=project_id, name=name, path=str(path), kind=m.CheckpointKind.reward,
                           recipe="reward_model", manifest_sha256=digest)  # fmt: skip
        s.add(row)
        s.flush()
        return row.id


class Arena:
    """A project with three policy checkpoints, one generation per (prompt, checkpoint), and a way
    to store arena battles with votes directly (no arena service involved)."""

    def __init__(self, db: Database):
        self.db = db
        self.rater = add_user(db, "rita", m.Role.rater)
        with db.write() as s:
            project = crud.create_project(s, name="arena")
            self.project_id = project.id
            self.models, self.prompts, self.gen = {}, [], {}
            for name in TEXTS:
                ck = m.Checkpoint(project_id=project.id, name=name, path=f"/models/{name}", kind="policy")
                s.add(ck)
                s.flush()
                self.models[name] = ck.id
            for i, (text, messages) in enumerate(PROMPTS):
                kind = m.PromptKind.chat if messages else m.PromptKind.text
                prompt = m.Prompt(
                    project_id=project.id, external_id=f"p{i}", kind=kind, text=text, messages=messages
                )
                s.add(prompt)
                s.flush()
                self.prompts.append(prompt.id)
                for name, texts in TEXTS.items():
                    g = crud.add_generation(s, prompt_id=prompt.id, checkpoint_id=self.models[name], text=texts[i],
                                            params={}, seed=0)  # fmt: skip
                    self.gen[name, i] = g.id
        self._votes = 0

    def battle(
        self, a: str, b: str, prompt: int, outcome: str | None, purpose: str = "arena"
    ) -> tuple[int, int]:
        """Store a battle (a = side A) and, unless ``outcome`` is None, one rater vote on it."""
        ga, gb = self.gen[a, prompt], self.gen[b, prompt]
        with self.db.write() as s:
            c = crud.add_comparison(s, project_id=self.project_id, prompt_id=self.prompts[prompt],
                                    generation_a_id=ga, generation_b_id=gb, purpose=purpose)  # fmt: skip
            if outcome is not None:
                self._votes += 1
                s.add(m.PairwiseVote(comparison_id=c.id, user_id=self.rater, outcome=outcome,
                                     left_generation_id=gb, idempotency_key=f"k{self._votes}"))  # fmt: skip
        return ga, gb


@pytest.fixture
def env(db, tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    users = UserService(db, settings)
    add_user(db, "ada", m.Role.admin)
    add_user(db, "ann", m.Role.annotator)
    service = RMAgreementService(db, settings, users, cpu=True, timeout_s=300)
    return service, Arena(db)


def rl_scores(checkpoint: Path, rows: list[tuple[str | list, str]]) -> list[float]:
    """What an RL run's sequence_rm reward gives each (prompt, response): the reference for the service."""
    from transformers import AutoTokenizer

    from trainers.rewards import SequenceRMReward

    source = SequenceRMReward(checkpoint, AutoTokenizer.from_pretrained(checkpoint))
    return [o.total for o in source.score([p for p, _ in rows], [r for _, r in rows])]


def test_refresh_scores_the_counted_battles_through_the_subprocess_and_agreement_counts_them(
    env, db, reward_checkpoint
):
    service, arena = env
    rm = register_rm(db, arena.project_id, reward_checkpoint, "rm-1")
    voted = [
        arena.battle("tuned", "base", 0, "a"),
        arena.battle("base", "tuned", 1, "a"),  # a chat prompt
        arena.battle("tuned", "base", 2, "tie"),
        arena.battle("other", "tuned", 0, "b"),
        arena.battle("base", "other", 2, "both_bad"),
    ]
    arena.battle("other", "base", 1, None)  # reserved, never voted: not a counted battle
    arena.battle("other", "base", 0, "a", purpose="annotate")  # an annotation item, not the arena
    expected_ids = {g for pair in voted for g in pair}

    assert service.reward_models(arena.project_id) == [(rm, "rm-1")]
    assert service.refresh("ada", arena.project_id) == len(expected_ids) == 8
    with db.read() as s:
        stored = store.get_scores(s, checkpoint_id=rm)
    assert set(stored) == expected_ids
    # the stored scores are the RL reward source's, with each prompt in the form it was generated from
    rows, ids = [], []
    for (name, i), gid in arena.gen.items():
        if gid in expected_ids:
            text, messages = PROMPTS[i]
            rows.append((messages or text, TEXTS[name][i]))
            ids.append(gid)
    assert [stored[g] for g in ids] == pytest.approx(rl_scores(reward_checkpoint, rows), abs=1e-5)

    # everything is scored now: no subprocess at all (a broken interpreter path would fail)
    service.python = "/nonexistent/python"
    assert service.refresh("ada", arena.project_id) == 0

    rows = service.agreement("rita", arena.project_id)
    votes = [("tuned", "base", 0, "a"), ("base", "tuned", 1, "a"), ("other", "tuned", 0, "b")]
    expected = pair_agreement(
        [JudgedBattle(arena.models[a], arena.models[b], o, stored[arena.gen[a, i]], stored[arena.gen[b, i]])
         for a, b, i, o in votes]
    )  # fmt: skip
    assert [(r.model_a, r.model_b, r.decisive_votes, r.agree, r.rate, r.lower, r.upper) for r in rows] == [
        (r.model_a, r.model_b, r.decisive_votes, r.agree, r.rate, r.lower, r.upper) for r in expected
    ]
    assert [(r.model_a, r.model_b, r.decisive_votes) for r in rows] == [
        (arena.models["base"], arena.models["tuned"], 2),
        (arena.models["tuned"], arena.models["other"], 1),
        (None, None, 3),
    ]
    assert (rows[0].name_a, rows[0].name_b, rows[-1].name_a) == ("base", "tuned", "")

    # a new vote is unscored until the next refresh
    arena.battle("tuned", "other", 1, "a")  # "other" on prompt 1 was only in the unvoted battle
    assert service.agreement("ada", arena.project_id)[-1].unscored == 1


def test_roles_only_an_admin_refreshes_any_signed_in_user_reads(env, db, reward_checkpoint):
    service, arena = env
    register_rm(db, arena.project_id, reward_checkpoint, "rm")
    arena.battle("tuned", "base", 0, "a")
    for user in ("rita", "ann"):
        with pytest.raises(Forbidden):
            service.refresh(user, arena.project_id)
        assert service.agreement(user, arena.project_id)[-1].unscored == 1
    for user in (None, "nobody"):
        with pytest.raises(Unauthorized):
            service.refresh(user, arena.project_id)
        with pytest.raises(Unauthorized):
            service.agreement(user, arena.project_id)
    with db.read() as s:
        assert s.exec(select(m.RewardScore)).all() == []


def test_choosing_the_reward_model(env, db, reward_checkpoint):
    service, arena = env
    with pytest.raises(ServiceError, match="no reward model yet"):
        service.agreement("ada", arena.project_id)
    older = register_rm(db, arena.project_id, reward_checkpoint, "older")
    newer = register_rm(db, None, reward_checkpoint.parent / "final-copy", "studio-wide")
    with db.write() as s:
        other = crud.create_project(s, name="elsewhere").id
    elsewhere = register_rm(db, other, reward_checkpoint.parent / "other", "other project")
    broken = register_rm(db, arena.project_id, reward_checkpoint.parent / "broken", "broken")
    with db.write() as s:
        s.get(m.Checkpoint, broken).status = m.CheckpointStatus.unloadable

    assert service.reward_models(arena.project_id) == [(newer, "studio-wide"), (older, "older")]
    with pytest.raises(NotFound):
        service.agreement("ada", arena.project_id, elsewhere)
    with pytest.raises(NotFound):
        service.refresh("ada", arena.project_id, broken)
    with pytest.raises(NotFound):
        service.reward_models(999)
    arena.battle("tuned", "base", 0, "a")
    # scores of one reward model are not another's
    with db.write() as s:
        store.upsert_scores(
            s, checkpoint_id=older, scores={arena.gen["tuned", 0]: 1.0, arena.gen["base", 0]: 0.0}
        )
    assert service.agreement("ada", arena.project_id, older)[-1].agree == 1
    assert service.agreement("ada", arena.project_id)[-1].unscored == 1  # the default is the newest


def test_a_failing_scorer_is_a_service_error_with_the_childs_line(env, db, reward_checkpoint, tmp_path):
    service, arena = env
    altered = shutil.copytree(reward_checkpoint, tmp_path / "altered")
    rm = register_rm(db, arena.project_id, altered, "altered")
    arena.battle("tuned", "base", 0, "a")
    weights = altered / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ServiceError, match=r"scoring with altered failed: error\[bad_checkpoint\]: .*sha256"):
        service.refresh("ada", arena.project_id)
    with db.read() as s:
        assert s.get(m.Checkpoint, rm).status == m.CheckpointStatus.unloadable  # as generation does
        assert s.exec(select(m.RewardScore)).all() == []
    assert service.reward_models(arena.project_id) == []


def test_a_scorer_past_its_timeout_is_stopped(env, db, reward_checkpoint):
    service, arena = env
    register_rm(db, arena.project_id, reward_checkpoint, "rm")
    arena.battle("tuned", "base", 0, "a")
    service.timeout_s = 0.05
    with pytest.raises(ServiceError, match=r"took longer than 0\.05 s and was stopped"):
        service.refresh("ada", arena.project_id)


def test_upsert_replaces_a_score_and_rejects_non_finite_ones(any_db):
    db = any_db
    arena = Arena(db)
    g1, g2 = arena.gen["base", 0], arena.gen["tuned", 0]
    rm = register_rm_row(db)
    with db.write() as s:
        assert store.upsert_scores(s, checkpoint_id=rm, scores={g1: 0.5, g2: -1.0}) == 2
    with db.write() as s:
        assert store.upsert_scores(s, checkpoint_id=rm, scores={g1: 2.0}) == 1
        with pytest.raises(ValueError, match="not finite"):
            store.upsert_scores(s, checkpoint_id=rm, scores={g2: float("nan")})
    with db.read() as s:
        assert store.get_scores(s, checkpoint_id=rm) == {g1: 2.0, g2: -1.0}
        assert store.get_scores(s, checkpoint_id=rm, generation_ids=[g2, 12345]) == {g2: -1.0}
        assert store.unscored(s, checkpoint_id=rm, generation_ids=[g2, g1, arena.gen["other", 0]]) == [
            arena.gen["other", 0]
        ]
        assert len(s.exec(select(m.RewardScore)).all()) == 2


def register_rm_row(db: Database) -> int:
    with db.write() as s:
        row = m.Checkpoint(name="rm", path="/rm", kind=m.CheckpointKind.reward)
        s.add(row)
        s.flush()
        return row.id
