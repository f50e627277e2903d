"""The arena service: blind battles, votes and reveals, roles, the leaderboard and the export.

Most tests seed arena generations directly (the arena's sampling settings, so battles reuse them and no
model is loaded): they run on SQLite and PostgreSQL. The generation tests use the tiny models.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from sqlmodel import func, select

from storage import arena as store
from storage import crud
from storage import users as user_crud
from storage.db import Database
from storage.models import (
    Assignment,
    Checkpoint,
    CheckpointKind,
    CheckpointStatus,
    Comparison,
    Generation,
    PairwiseVote,
    Prompt,
    Role,
    TaskKind,
)
from studio.services.annotation import AnnotationService
from studio.services.arena import ArenaConfig, ArenaService, BattleView, Reveal, pace
from studio.services.errors import Conflict, Forbidden, NotFound, ServiceError, Unauthorized
from studio.services.generate import GenerationService
from studio.services.users import UserService
from studio.settings import Settings

BASE_NAME, CHILD_NAME = "base-smolish-model", "child-dpo-checkpoint"


def count(db: Database, table, *where) -> int:
    with db.read() as s:
        return s.exec(select(func.count()).select_from(table).where(*where)).one()


def make_env(
    db: Database,
    tmp_path,
    *,
    base_path: str,
    child_path: str,
    prompts: int,
    seeded: bool,
    cache=None,
    **config,
):
    """Users (admin ada, raters rae and rob, annotator ann), a project with `prompts` eval prompts, a base
    checkpoint and its child entered into the arena (as a training job would), and the service."""
    settings = Settings(data_dir=tmp_path / "data", database_url="sqlite://")
    users = UserService(db, settings)
    generation = GenerationService(db, settings, cache=cache)
    arena = ArenaService(db, settings, users, generation, config=ArenaConfig(**config), seed=0)
    params = arena.config.params()
    now = datetime.now(UTC)
    with db.write() as s:
        for name, role in (
            ("ada", Role.admin),
            ("rae", Role.rater),
            ("rob", Role.rater),
            ("ann", Role.annotator),
        ):
            user_crud.insert_user(s, username=name, role=role, password_hash="x", changed_at=now)
        pid = crud.create_project(s, name=f"arena {now.timestamp()}").id
        base = Checkpoint(name=BASE_NAME, path=base_path, kind=CheckpointKind.policy)
        s.add(base)
        s.flush()
        child = Checkpoint(name=CHILD_NAME, path=child_path, kind=CheckpointKind.policy, parent_id=base.id,
                           project_id=pid, recipe="dpo")  # fmt: skip
        s.add(child)
        s.flush()
        prompt_ids = []
        for i in range(prompts):
            p = Prompt(project_id=pid, external_id=f"e{i}", kind="text", text=f"Question {i}?", tags=["eval"])
            s.add(p)
            s.flush()
            prompt_ids.append(p.id)
            if seeded:
                for ck, text in ((base, f"plain answer {i}"), (child, f"better answer {i}, with detail")):
                    crud.add_generation(
                        s, prompt_id=p.id, checkpoint_id=ck.id, text=text, params=params, seed=i
                    )
        s.add(Prompt(project_id=pid, external_id="train", kind="text", text="not for the arena"))
        store.enter_arena(s, pid, child.id)
    return SimpleNamespace(db=db, arena=arena, generation=generation, users=users, settings=settings, pid=pid,
                           base=base.id, child=child.id, prompts=prompt_ids)  # fmt: skip


@pytest.fixture
def seeded(any_db, tmp_path):
    return make_env(
        any_db, tmp_path, base_path="/nowhere/base", child_path="/nowhere/child", prompts=6, seeded=True
    )


def child_side(env, view: BattleView) -> str:
    """Which side shows the child's response (the test knows the seeded texts)."""
    return "left" if view.left.startswith("better") else "right"


# --------------------------------------------------------------------------- pure


def test_pace_grows_both_sides_equally_and_the_finished_side_waits():
    assert list(pace("abcdef", "xy", chunk_chars=4)) == [("abcd", "xy"), ("abcdef", "xy")]
    assert list(pace("ab", "wxyz", chunk_chars=1)) == [
        ("a", "w"),
        ("ab", "wx"),
        ("ab", "wxy"),
        ("ab", "wxyz"),
    ]
    assert list(pace("", "", chunk_chars=3)) == [("", "")]
    assert list(pace("😀é", "x", chunk_chars=1))[-1] == ("😀é", "x")
    with pytest.raises(ValueError):
        list(pace("a", "b", chunk_chars=0))


# --------------------------------------------------------------------------- battles and votes (no model)


def test_battle_is_blind_pending_until_voted_and_the_vote_reveals(seeded):
    env, arena = seeded, seeded.arena
    view = arena.next_battle("rae", env.pid)
    assert {f.name for f in dataclasses.fields(view)} == {"battle_id", "prompt", "left", "right"}
    for secret in (BASE_NAME, CHILD_NAME, "/nowhere", "dpo"):
        assert secret not in repr(view)
    assert {view.left, view.right} == {
        f"plain answer {view.prompt[9]}",
        f"better answer {view.prompt[9]}, with detail",
    }
    assert count(env.db, Generation) == 12  # both sides reused: nothing generated, no model loaded
    assert arena.next_battle("rae", env.pid) == view  # the unvoted battle comes back

    choice = child_side(env, view)
    reveal = arena.vote("rae", view.battle_id, choice, idempotency_key="key-1")
    child_label, base_label = f"#{env.child} {CHILD_NAME}", f"#{env.base} {BASE_NAME}"
    assert reveal == Reveal(
        battle_id=view.battle_id, outcome=reveal.outcome, choice=choice,
        left_name=child_label if choice == "left" else base_label,
        right_name=base_label if choice == "left" else child_label,
    )  # fmt: skip
    with env.db.read() as s:
        battle = s.get(Comparison, view.battle_id)
        winner = s.get(
            Generation, battle.generation_a_id if reveal.outcome == "a" else battle.generation_b_id
        )
        vote = s.exec(select(PairwiseVote)).one()
        left_gen = s.get(Generation, vote.left_generation_id)
    assert winner.checkpoint_id == env.child and left_gen.text == view.left
    assert arena.vote("rae", view.battle_id, choice, idempotency_key="key-1") == reveal  # replay
    with pytest.raises(Conflict, match="another choice"):
        arena.vote("rae", view.battle_id, "tie", idempotency_key="key-1")
    with pytest.raises(Conflict, match="already voted"):
        arena.vote("rae", view.battle_id, "tie", idempotency_key="key-2")
    for key in ("key-3", "key-1"):  # not rob's battle: even with rae's key, nothing is replayed to him
        with pytest.raises(NotFound):
            arena.vote("rob", view.battle_id, choice, idempotency_key=key)
    robs = arena.next_battle("rob", env.pid)
    with pytest.raises(Conflict, match="another vote"):  # rae's key on rob's own battle
        arena.vote("rob", robs.battle_id, "left", idempotency_key="key-1")
    assert count(env.db, PairwiseVote) == 1
    assert arena.next_battle("rae", env.pid).battle_id != view.battle_id


def test_raters_share_stored_responses_but_never_see_a_prompt_twice_for_a_pair(seeded):
    env, arena = seeded, seeded.arena
    seen = {}
    for user in ("rae", "rob"):
        for n in range(6):
            view = arena.next_battle(user, env.pid)
            arena.vote(user, view.battle_id, "tie", idempotency_key=f"{user}-{n}")
            seen.setdefault(user, []).append(view.prompt)
    assert sorted(seen["rae"]) == sorted(seen["rob"]) == [f"Question {i}?" for i in range(6)]
    assert (
        count(env.db, Generation) == 12 and count(env.db, Comparison) == 6
    )  # both raters judged each battle
    assert count(env.db, Assignment, Assignment.task == TaskKind.arena) == 12


def test_a_key_of_an_annotation_vote_replays_nothing_in_the_arena(seeded):
    # The battle check comes before the idempotency replay: the rater's key of an annotation vote on
    # that comparison must not bring back a Reveal naming its checkpoints.
    env, arena = seeded, seeded.arena
    with env.db.write() as s:
        gens = s.exec(
            select(Generation).where(Generation.prompt_id == env.prompts[0]).order_by(Generation.id)
        ).all()
        annotated = crud.add_comparison(s, project_id=env.pid, prompt_id=env.prompts[0], generation_a_id=gens[0].id,
                                        generation_b_id=gens[1].id, purpose="annotate", a_on_left=True)  # fmt: skip
        s.add(PairwiseVote(comparison_id=annotated.id, user_id=user_id(env, "rae"), outcome="a",
                           left_generation_id=gens[0].id, idempotency_key="annot-key"))  # fmt: skip
    for key in ("annot-key", "fresh-key"):
        with pytest.raises(NotFound):
            arena.vote("rae", annotated.id, "left", idempotency_key=key)
    view = arena.next_battle("rae", env.pid)
    with pytest.raises(Conflict, match="another vote"):  # on her own battle the key is simply taken
        arena.vote("rae", view.battle_id, "left", idempotency_key="annot-key")
    assert count(env.db, PairwiseVote) == 1


def test_roles(seeded):
    env, arena = seeded, seeded.arena
    view = arena.next_battle("ann", env.pid)  # annotators vote too
    arena.vote("ann", view.battle_id, "both_bad", idempotency_key="ann-1")
    # The arena reservation never shows up in the annotation queue.
    annotation = AnnotationService(env.db, env.settings, env.users)
    assert annotation.next_pairwise("ann", env.pid) is None
    for call in (
        lambda: arena.arena_models("rae", env.pid),
        lambda: arena.add_model("rae", env.pid, env.base),
        lambda: arena.remove_model("rae", env.pid, env.base),
        lambda: arena.set_anchor("rae", env.pid, env.child),
        lambda: arena.named_side_by_side("rae", env.pid, env.base, env.child, "hi"),
        lambda: arena.pregenerate("ann", env.pid),
        lambda: arena.export("ann", env.pid),
    ):
        with pytest.raises(Forbidden):
            call()
    with pytest.raises(Unauthorized):
        arena.next_battle(None, env.pid)
    with pytest.raises(Unauthorized):
        arena.vote("nobody", view.battle_id, "left", idempotency_key="x")
    board = arena.leaderboard("rae", env.pid)  # anyone signed in sees the board, not the raters
    assert board.rater_rows == [] and board.rater_names == {} and board.n_votes == 1
    assert [r.rater for r in arena.leaderboard("ada", env.pid).rater_rows] == [user_id(env, "ann")]
    assert [i for i, _ in arena.eval_prompts("rae", env.pid)] == env.prompts


def user_id(env, name: str) -> int:
    with env.db.read() as s:
        return user_crud.get_user_by_name(s, name).id


def test_bad_input_is_refused_without_writing(seeded):
    env, arena = seeded, seeded.arena
    view = arena.next_battle("rae", env.pid)
    for choice, key, match in (
        ("up", "k", "choice"), ("left", "", "idempotency_key"), ("left", "x" * 65, "idempotency_key"),
        ("left", "import:1", "reserved"), ("left", "a\x00b", "idempotency_key"),
    ):  # fmt: skip
        with pytest.raises(ServiceError, match=match):
            arena.vote("rae", view.battle_id, choice, idempotency_key=key)
    with pytest.raises(NotFound):
        arena.vote("rae", 10_000, "left", idempotency_key="k")
    for text in ("   ", "x" * 4001, "a\x00"):
        with pytest.raises(ServiceError):
            arena.next_battle("rae", env.pid, prompt_text=text)
    with pytest.raises(NotFound):
        arena.next_battle("rae", 10_000)
    assert count(env.db, PairwiseVote) == 0


def test_admin_manages_models_and_the_anchor(seeded):
    env, arena = seeded, seeded.arena
    infos = arena.arena_models("ada", env.pid)
    assert [(m.checkpoint_id, m.is_anchor, m.source, m.battles) for m in infos] == [
        (env.base, True, "auto", 0), (env.child, False, "auto", 0),
    ]  # fmt: skip
    view = arena.next_battle("rae", env.pid)
    arena.vote("rae", view.battle_id, "left", idempotency_key="k1")
    assert [m.battles for m in arena.arena_models("ada", env.pid)] == [1, 1]
    arena.set_anchor("ada", env.pid, env.child)
    assert arena.leaderboard("ada", env.pid).anchor == env.child
    arena.remove_model("ada", env.pid, env.base)
    assert [m.checkpoint_id for m in arena.arena_models("ada", env.pid)] == [env.child]
    with pytest.raises(ServiceError, match="at least two"):
        arena.next_battle("rob", env.pid)
    arena.add_model("ada", env.pid, env.base, anchor=True)
    assert [(m.checkpoint_id, m.is_anchor) for m in arena.arena_models("ada", env.pid)] == [
        (env.base, True), (env.child, False),
    ]  # fmt: skip
    with pytest.raises(NotFound):
        arena.add_model("ada", env.pid, 10_000)
    with pytest.raises(NotFound):
        arena.remove_model("ada", env.pid, 10_000)


def test_leaderboard_has_both_models_with_cis_is_cached_and_exports(seeded):
    env, arena = seeded, seeded.arena
    for user in ("rae", "rob"):
        for n in range(6):
            view = arena.next_battle(user, env.pid)
            # The child wins 5 of each rater's 6 battles.
            choice = child_side(env, view) if n else {"left": "right", "right": "left"}[child_side(env, view)]
            arena.vote(user, view.battle_id, choice, idempotency_key=f"{user}-{n}")
    view = arena.leaderboard("ada", env.pid)
    ratings = {r.model: r for r in view.board.ratings}
    assert set(ratings) == {env.base, env.child} and view.n_votes == 12
    assert ratings[env.base].rating == pytest.approx(1000.0)  # the anchor
    assert ratings[env.child].rating > ratings[env.base].rating
    for r in ratings.values():
        assert r.lower < r.rating < r.upper and r.battles == 12
    assert (ratings[env.child].wins, ratings[env.child].losses) == (10, 2)
    assert view.names == {env.base: BASE_NAME, env.child: CHILD_NAME} and view.anchor == env.base
    assert view.parents[env.child] == env.base
    assert [(new, parent) for new, parent, *_ in view.pair_tests] == [(env.child, env.base)]
    assert sorted(view.rater_names.values()) == ["rae", "rob"] and len(view.rater_rows) == 2

    hits = arena.boards.hits
    assert arena.leaderboard("rae", env.pid).board is view.board and arena.boards.hits == hits + 1
    from studio.rating import RatingOptions

    dropped = arena.leaderboard("ada", env.pid, RatingOptions(ties="drop"))
    assert dropped.board is not view.board and dropped.board.options.anchor == env.base
    assert len(arena.battles_for_rating(env.pid)) == 12

    battles_path, ratings_path = arena.export("ada", env.pid)
    assert battles_path.parent == ratings_path.parent
    assert battles_path.parent.parent == env.settings.data_dir / "exports" / "arena"
    lines = [json.loads(line) for line in battles_path.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 12 and {line["rater"] for line in lines} == {"rae", "rob"}
    first = lines[0]
    assert {first["name_a"], first["name_b"]} == {BASE_NAME, CHILD_NAME}
    assert first["shown_left"] in ("a", "b") and first["outcome"] in ("a", "b") and first["text_a"]
    doc = json.loads(ratings_path.read_text(encoding="utf-8"))
    assert {r["name"] for r in doc["ratings"]} == {BASE_NAME, CHILD_NAME} and doc["n_votes"] == 12
    assert doc["options"]["anchor"] == env.base
    assert not [p for p in battles_path.parent.parent.iterdir() if p.name.startswith(".tmp")]


def test_the_board_before_any_vote_is_empty(seeded):
    view = seeded.arena.leaderboard("rob", seeded.pid)
    assert view.board.ratings == [] and view.board.n_battles == 0 and view.n_votes == 0
    assert view.names == {seeded.base: BASE_NAME, seeded.child: CHILD_NAME} and view.anchor == seeded.base


# --------------------------------------------------------------------------- generation (tiny models, SQLite)


@pytest.fixture(scope="module")
def child_model(make_tiny_model):
    return make_tiny_model(1)


@pytest.fixture
def live(db, tmp_path, tiny_model, child_model):
    from studio.generation import ModelCache

    return make_env(db, tmp_path, base_path=str(tiny_model), child_path=str(child_model), prompts=3, seeded=False,
                    cache=ModelCache(max_models=3), max_new_tokens=6)  # fmt: skip


def test_missing_responses_are_generated_with_their_settings_and_seeds(live):
    env, arena = live, live.arena
    fractions = []
    view = arena.next_battle("rae", env.pid, progress=fractions.append)
    assert fractions[-1] == 1.0 and fractions == sorted(fractions)
    with env.db.read() as s:
        paths = [s.get(Checkpoint, c).path for c in (env.base, env.child)]
    for secret in (BASE_NAME, CHILD_NAME, *paths, "tiny-llama"):
        assert secret not in repr(view)
    with env.db.read() as s:
        gens = s.exec(select(Generation)).all()
    assert sorted(g.checkpoint_id for g in gens) == sorted([env.base, env.child])
    for g in gens:
        assert g.params == {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 6, "do_sample": True}
        assert isinstance(g.seed, int) and g.num_tokens is not None and g.finish_reason in ("eos", "length")
    assert {view.left, view.right} == {g.text for g in gens}
    reveal = arena.vote("rae", view.battle_id, "right", idempotency_key="r1")
    assert {reveal.left_name, reveal.right_name} == {f"#{env.base} {BASE_NAME}", f"#{env.child} {CHILD_NAME}"}


def test_typed_prompts_are_stored_once_and_their_responses_reused(live):
    env, arena = live, live.arena
    first = arena.next_battle("rae", env.pid, prompt_text="Write one sentence about the sea.")
    assert first.prompt == "Write one sentence about the sea."
    with env.db.read() as s:
        typed = s.exec(select(Prompt).where(Prompt.external_id.startswith("arena-typed-"))).one()
    assert typed.tags == ["arena-typed"] and count(env.db, Generation) == 2
    other = arena.next_battle("rob", env.pid, prompt_text="Write one sentence about the sea.")
    assert (
        other.battle_id == first.battle_id and count(env.db, Generation) == 2
    )  # same responses, no model run
    # rae asks again on the same prompt: this pair was already shown to her there, so fresh samples.
    again = arena.next_battle("rae", env.pid, prompt_text="Write one sentence about the sea.")
    assert again.battle_id != first.battle_id and count(env.db, Generation) == 4
    with pytest.raises(Conflict, match="replaced"):  # her unvoted first battle was given back
        arena.vote("rae", first.battle_id, "left", idempotency_key="late")
    assert count(env.db, Prompt, Prompt.external_id == typed.external_id) == 1
    assert typed.id not in [i for i, _ in arena.eval_prompts("rae", env.pid)]


def test_pregenerated_responses_are_used_by_battles(live):
    env, arena = live, live.arena
    fractions = []
    assert arena.pregenerate("ada", env.pid, max_prompts=2, progress=fractions.append) == 4
    assert fractions[-1] == 1.0 and arena.pregenerate("ada", env.pid, max_prompts=2) == 0
    loads = env.generation.cache.loads
    view = arena.next_battle("rae", env.pid)
    assert view.prompt in ("Question 0?", "Question 1?")  # the prompts with both responses ready
    assert count(env.db, Generation) == 4 and env.generation.cache.loads == loads


def test_named_side_by_side_is_admin_only_and_stores_nothing(live):
    env, arena = live, live.arena
    a, b = arena.named_side_by_side("ada", env.pid, env.base, env.child, "Say hello.")
    assert isinstance(a, str) and isinstance(b, str)
    assert count(env.db, Generation) == count(env.db, Comparison) == count(env.db, PairwiseVote) == 0
    with pytest.raises(ServiceError, match="two different"):
        arena.named_side_by_side("ada", env.pid, env.base, env.base, "Say hello.")


def test_unloadable_checkpoints_never_play(live, tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainers.checkpoint import manifest_digest, save_checkpoint

    env, arena = live, live.arena
    folder = save_checkpoint(tmp_path / "broken" / "final", model=AutoModelForCausalLM.from_pretrained(tiny_model),
                             tokenizer=AutoTokenizer.from_pretrained(tiny_model), studio={"recipe": "dpo"})  # fmt: skip
    with env.db.write() as s:
        broken = Checkpoint(name="broken-run", path=str(folder), kind=CheckpointKind.policy, parent_id=env.child,
                            project_id=env.pid, manifest_sha256=manifest_digest(folder))  # fmt: skip
        s.add(broken)
        s.flush()
        store.enter_arena(s, env.pid, broken.id)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # altered after registration
    weights.write_bytes(bytes(data))
    # The warm-up would pair the newest model (broken) with its parent first: the guard refuses it,
    # marks it unloadable, and the battle is scheduled again without it.
    view = arena.next_battle("rae", env.pid)
    with env.db.read() as s:
        assert s.get(Checkpoint, broken.id).status == CheckpointStatus.unloadable
        battle = s.get(Comparison, view.battle_id)
        sides = {s.get(Generation, g).checkpoint_id for g in (battle.generation_a_id, battle.generation_b_id)}
    assert sides == {env.base, env.child}
    arena.remove_model("ada", env.pid, env.base)
    with pytest.raises(ServiceError, match="at least two loadable"):
        arena.next_battle("rob", env.pid)


def add_policy(env, name: str, parent: int, *, path: str | None = None, texts: bool = True, **values) -> int:
    """Another policy of the project in the arena (as a training job would enter it), optionally with
    arena responses to every eval prompt ("<name> says <i>")."""
    params = env.arena.config.params()
    with env.db.write() as s:
        ck = Checkpoint(name=name, path=path or f"/nowhere/{name}", kind=CheckpointKind.policy, parent_id=parent,
                        project_id=env.pid, recipe="dpo", **values)  # fmt: skip
        s.add(ck)
        s.flush()
        for i, prompt_id in enumerate(env.prompts if texts else []):
            crud.add_generation(s, prompt_id=prompt_id, checkpoint_id=ck.id, text=f"{name} says {i}",
                                params=params, seed=i)  # fmt: skip
        store.enter_arena(s, env.pid, ck.id)
        return ck.id


def test_a_response_shown_to_a_rater_is_never_reused_in_her_blind_battles(db, tmp_path, tiny_model):
    # rae's votes named the base's stored responses; when a new model meets the base, the base's side
    # must be a fresh sample for her (only the base is loadable: the others' responses are stored).
    from studio.generation import ModelCache

    env = make_env(db, tmp_path, base_path=str(tiny_model), child_path="/nowhere/child", prompts=2, seeded=True,
                   cache=ModelCache(max_models=2), max_new_tokens=6)  # fmt: skip
    arena, named = env.arena, {}
    for n in range(2):
        view = arena.next_battle("rae", env.pid)
        reveal = arena.vote("rae", view.battle_id, "left", idempotency_key=f"k{n}")
        named |= {view.left: reveal.left_name, view.right: reveal.right_name}
    assert count(env.db, Generation) == 4  # both battles reused the stored responses
    newer = add_policy(env, "child2", env.base)
    for n in range(2):
        view = arena.next_battle("rae", env.pid)
        assert not {view.left, view.right} & set(named), "a text rae saw named is shown to her blind"
        reveal = arena.vote("rae", view.battle_id, "tie", idempotency_key=f"z{n}")
        assert {reveal.left_name, reveal.right_name} == {f"#{env.base} {BASE_NAME}", f"#{newer} child2"}
        assert {view.left, view.right} & {"child2 says 0", "child2 says 1"}  # never shown: reused
        named |= {view.left: reveal.left_name, view.right: reveal.right_name}
    assert count(env.db, Generation) == 8  # two fresh base samples
    # rob saw nothing yet: every stored response is fair game for him (nothing generated).
    arena.next_battle("rob", env.pid)
    assert count(env.db, Generation) == 8


def test_before_the_vote_errors_name_no_model_and_an_unloadable_one_is_skipped(
    db, tmp_path, tiny_model, child_model, monkeypatch
):
    from studio.generation import ModelCache
    from studio.services.arena import GENERATION_FAILED

    env = make_env(db, tmp_path, base_path=str(tiny_model), child_path=str(child_model), prompts=2, seeded=True,
                   cache=ModelCache(max_models=3), max_new_tokens=6)  # fmt: skip
    arena = env.arena
    # The newest model meets its parent first; its folder is gone (a base-like model: no manifest).
    gone = add_policy(env, "gone-run", env.base, texts=False)
    view = arena.next_battle("rae", env.pid, prompt_text="Say hi.")
    with env.db.read() as s:
        battle = s.get(Comparison, view.battle_id)
        sides = {s.get(Generation, g).checkpoint_id for g in (battle.generation_a_id, battle.generation_b_id)}
        assert (
            s.get(Checkpoint, gone).status == CheckpointStatus.ready
        )  # not marked: verify could not undo it
    assert sides == {env.base, env.child}  # scheduled again without the missing one
    assert gone in arena._load_failed
    # A trained one (it has a manifest) whose files cannot be read is marked unloadable, as the guard does.
    broken = add_policy(env, "broken-run", env.base, texts=False, manifest_sha256="f" * 64)
    monkeypatch.setattr(env.generation, "check_loadable", lambda ck: None)  # files "match": loading fails
    arena.next_battle("rae", env.pid, prompt_text="Say hello.")
    with env.db.read() as s:
        assert s.get(Checkpoint, broken).status == CheckpointStatus.unloadable
    # When no battle can be prepared, the rater reads nothing that names a model.
    import studio.generation

    def boom(loaded, prompts, params, progress=None):
        raise RuntimeError(f"CUDA error in {CHILD_NAME} at {tiny_model} (checkpoint {env.base})")

    monkeypatch.setattr(studio.generation, "generate", boom)
    with pytest.raises(ServiceError) as exc:
        arena.next_battle("rae", env.pid, prompt_text="Say goodbye.")
    assert str(exc.value) == GENERATION_FAILED
    for secret in (BASE_NAME, CHILD_NAME, "gone-run", "nowhere", str(tiny_model), f"{env.base}"):
        assert secret not in str(exc.value)


def test_typed_prompt_with_no_loadable_model_names_none(seeded):
    env, arena = seeded, seeded.arena
    with pytest.raises(ServiceError) as exc:  # neither folder exists: both are skipped in turn
        arena.next_battle("rae", env.pid, prompt_text="what is 2+2?")
    for secret in (BASE_NAME, CHILD_NAME, "/nowhere", f"#{env.base}", f"#{env.child}"):
        assert secret not in str(exc.value)
    assert count(env.db, Comparison) == 0


def test_concurrent_requests_of_one_rater_reserve_one_battle_and_record_one_vote(seeded):
    from concurrent.futures import ThreadPoolExecutor

    env, arena = seeded, seeded.arena
    with ThreadPoolExecutor(max_workers=4) as pool:
        views = list(pool.map(lambda _: arena.next_battle("rae", env.pid), range(4)))
    assert len({v.battle_id for v in views}) == 1
    assert count(env.db, Assignment, Assignment.task == TaskKind.arena) == 1
    battle = views[0].battle_id

    def vote(key: str):
        try:
            return arena.vote("rae", battle, "left", idempotency_key=key)
        except Conflict as exc:
            return exc

    keys = ["same", "same", "same", "other"]  # a double click (same key) and a second tab (another key)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(vote, keys))
    with env.db.read() as s:
        stored = s.exec(select(PairwiseVote)).one().idempotency_key
    assert count(env.db, PairwiseVote) == 1
    won = [r for k, r in zip(keys, results, strict=True) if k == stored]
    lost = [r for k, r in zip(keys, results, strict=True) if k != stored]
    assert all(isinstance(r, Reveal) for r in won) and len(set(won)) == 1
    assert all(isinstance(r, Conflict) for r in lost)
