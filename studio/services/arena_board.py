"""The arena's leaderboard and export, built from counted battles (`storage.arena.counted_battles`).

Pure helpers for `ArenaService`: battle rows → `studio.rating.BattleRecord`s, the board with rater
statistics and "new vs parent" tests, a small cache keyed by what the board depends on, and the
export folder (battles.jsonl + ratings.json, written atomically). No gradio, no database sessions.

`studio.rating` is imported where it is used: the studio's services load without the rating maths
until a board is asked for.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from storage import arena as store
from storage.arena import BattleRow
from storage.db import Database
from studio.services.annotation_admin import project_or_404
from studio.services.arena_admin import ADMIN
from studio.settings import Settings

if TYPE_CHECKING:
    from studio.rating import BattleRecord, Leaderboard, RaterStats, RatingOptions

PairTest = tuple[int, int, bool, int | None, float]
"""(new checkpoint, its parent, decided, winner or None, evidence) of `rating.sequential_pair_test`."""


@dataclass(frozen=True)
class LeaderboardView:
    """Everything the Leaderboard tab shows; model ids are checkpoint ids.

    ``board`` is always a `Leaderboard` (empty, ``ratings == []``, before the first vote). ``rater_rows``
    and ``rater_names`` are filled for admins only.
    """

    board: Leaderboard
    names: dict[int, str]
    parents: dict[int, int | None]
    anchor: int | None
    rater_rows: list[RaterStats] = field(default_factory=list)
    rater_names: dict[int, str] = field(default_factory=dict)
    pair_tests: list[PairTest] = field(default_factory=list)
    n_votes: int = 0


@dataclass(frozen=True)
class Board:
    """A computed board with what is derived from the same battles (cached together)."""

    board: Leaderboard
    rater_rows: list[RaterStats]
    rater_names: dict[int, str]
    pair_tests: list[PairTest]


def to_records(rows: Sequence[BattleRow]) -> list[BattleRecord]:
    """Counted battle rows → rating records (model a = the comparison's generation a), with style
    features of both texts and the UTC day of the vote (for the per-rater daily cap)."""
    from studio.rating import BattleRecord, style_features

    return [
        BattleRecord(
            model_a=r.model_a,
            model_b=r.model_b,
            outcome=r.outcome,
            rater=r.user_id,
            left_is_a=r.left_is_a,
            style_a=style_features(r.text_a, r.tokens_a),
            style_b=style_features(r.text_b, r.tokens_b),
            day=r.created_at.date().isoformat(),
        )
        for r in rows
    ]


def empty_board(options: RatingOptions) -> Leaderboard:
    """The board before any vote: no models, no ratings."""
    from studio.rating import Leaderboard

    nothing = np.zeros((0, 0))
    return Leaderboard(
        ratings=[], models=[], win_fraction=nothing, battle_counts=nothing.copy(), diff_variance=nothing.copy(),
        win_prob=nothing.copy(), components=[], style_coefficients=None, options=options, n_battles=0, dropped={},
    )  # fmt: skip


def board_models(rows: Sequence[BattleRow]) -> list[int]:
    """The checkpoints that played at least one counted battle, by id (a model without battles has
    no rating yet and would only show up as a disconnected component)."""
    return sorted({r.model_a for r in rows} | {r.model_b for r in rows})


def with_anchor(options: RatingOptions, anchor: int | None, models: Sequence[int]) -> RatingOptions:
    """The options with the project's anchor filled in, when the caller set none and it played."""
    if options.anchor is None and anchor is not None and anchor in models:
        return dataclasses.replace(options, anchor=anchor)
    return options


def compute_board(
    rows: Sequence[BattleRow],
    options: RatingOptions,
    *,
    anchor: int | None,
    parents: Mapping[int, int | None],
) -> Board:
    """Fit the board, the rater statistics and a sequential test per (model, parent) pair."""
    from studio import rating

    models = board_models(rows)
    options = with_anchor(options, anchor, models)
    if not rows:
        return Board(empty_board(options), [], {}, [])
    records = to_records(rows)
    board = rating.leaderboard(records, models, options)
    tests: list[PairTest] = []
    for model in models:
        parent = parents.get(model)
        if parent is not None and parent in models and parent != model:
            decided, winner, evidence = rating.sequential_pair_test(records, model, parent)
            tests.append((model, parent, bool(decided), winner, float(evidence)))
    names = {r.user_id: r.username for r in rows}
    return Board(board, list(rating.rater_stats(records)), names, tests)


class BoardCache:
    """The last few boards, keyed by what they depend on; thread-safe (a computation runs outside
    the lock, so two concurrent misses may both compute: harmless)."""

    def __init__(self, size: int = 16):
        self.size = size
        self._items: OrderedDict[Hashable, Board] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Board | None:
        with self._lock:
            found = self._items.get(key)
            if found is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return found

    def put(self, key: Hashable, value: Board) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


# --------------------------------------------------------------------------- export


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: those become null (arrays element-wise)."""
    if isinstance(value, np.ndarray):
        return [_finite(v) for v in value.tolist()]
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer | np.bool_):
        return value.item()
    return value


def battle_lines(rows: Sequence[BattleRow], names: Mapping[int, str]) -> list[dict[str, Any]]:
    """One JSON object per raw vote: who saw what, on which side, and what they chose."""
    out = []
    for r in rows:
        left_a = r.left_is_a
        out.append({
            "battle_id": r.battle_id, "vote_id": r.vote_id, "prompt_id": r.prompt_id, "prompt": r.prompt_text,
            "checkpoint_a": r.model_a, "name_a": names.get(r.model_a), "checkpoint_b": r.model_b,
            "name_b": names.get(r.model_b), "generation_a": r.generation_a_id, "generation_b": r.generation_b_id,
            "shown_left": "a" if left_a else "b", "outcome": r.outcome, "rater": r.username,
            "created_at": r.created_at.isoformat(), "text_a": r.text_a, "text_b": r.text_b,
        })  # fmt: skip
    return out


def ratings_document(
    result: Board, names: Mapping[int, str], *, project_id: int, n_votes: int, created_at: datetime
) -> dict[str, Any]:
    board = result.board
    return _finite({
        "project_id": project_id, "created_at": created_at.isoformat(), "n_votes": n_votes,
        "n_battles": board.n_battles, "options": dataclasses.asdict(board.options),
        "ratings": [dataclasses.asdict(r) | {"name": names.get(r.model)} for r in board.ratings],
        "models": list(board.models), "win_fraction": board.win_fraction, "battle_counts": board.battle_counts,
        "win_prob": board.win_prob, "components": [list(c) for c in board.components],
        "style_coefficients": board.style_coefficients, "dropped": dict(board.dropped),
        "pair_tests": [
            {"model": m, "parent": p, "decided": d, "winner": w, "evidence": e} for m, p, d, w, e in result.pair_tests
        ],
    })  # fmt: skip


def write_export(
    parent: Path, folder_name: str, lines: Sequence[Mapping[str, Any]], ratings: Mapping
) -> Path:
    """Write ``<parent>/<folder_name>/{battles.jsonl, ratings.json}``: into a temp folder first, renamed
    into place when complete, so a reader never sees half an export. Returns the folder."""
    parent.mkdir(parents=True, exist_ok=True)
    final, tmp = parent / folder_name, parent / f".tmp-{folder_name}"
    if final.exists():
        raise FileExistsError(f"export folder {final} already exists")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with (tmp / "battles.jsonl").open("w", encoding="utf-8", newline="\n") as fh:
            for line in lines:
                fh.write(json.dumps(line, ensure_ascii=False, allow_nan=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        with (tmp / "ratings.json").open("w", encoding="utf-8") as fh:
            json.dump(ratings, fh, ensure_ascii=False, allow_nan=False, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


class ArenaBoards:
    """The leaderboard, the scheduling board and the export (mixed into `ArenaService`)."""

    db: Database
    settings: Settings
    users: Any
    config: Any
    """`ArenaConfig` (its `schedule_bootstrap`)."""
    clock: Callable[[], datetime]
    boards: BoardCache
    _schedule: dict[int, tuple[int, Board]]
    """project id → (votes when fitted, the scheduling board)."""
    _schedule_lock: threading.Lock

    def battles_for_rating(self, project_id: int) -> list[BattleRecord]:
        """The project's counted battles as rating records (blind arena votes only)."""
        with self.db.read() as s:
            return to_records(store.counted_battles(s, project_id=project_id))

    def _board(self, project_id: int, options: RatingOptions) -> tuple[Board, dict, dict, int | None, int]:
        """(board, names, parents, anchor, votes): from the cache when nothing it depends on changed."""
        with self.db.read() as s:
            project_or_404(s, project_id)
            entries = store.list_entries(s, project_id=project_id)
            anchor = store.anchor_of(s, project_id=project_id)
            n_votes, last_vote = store.vote_state(s, project_id=project_id)
            key = (project_id, n_votes, last_vote, options, anchor,
                   tuple((e.checkpoint_id, e.parent_id, e.active) for e in entries))  # fmt: skip
            result = self.boards.get(key)
            rows = None if result is not None else store.counted_battles(s, project_id=project_id)
            ids = {e.checkpoint_id for e in entries} | {m for r in rows or [] for m in (r.model_a, r.model_b)}
            if result is not None:
                ids |= set(result.board.models)
            names = store.checkpoint_names(s, ids)
            parents = store.checkpoint_parents(s, ids)
        if result is None:
            result = compute_board(rows, options, anchor=anchor, parents=parents)
            self.boards.put(key, result)
        return result, names, parents, anchor, n_votes

    def leaderboard(
        self, username: str | None, project_id: int, options: RatingOptions | None = None
    ) -> LeaderboardView:
        """The board of the project's counted votes (anyone signed in; rater statistics for admins)."""
        from studio.rating import RatingOptions

        user = self.users.require(username)
        result, names, parents, anchor, n_votes = self._board(project_id, options or RatingOptions())
        admin = str(user.role) == ADMIN
        return LeaderboardView(
            board=result.board, names=names, parents=parents, anchor=anchor,
            rater_rows=list(result.rater_rows) if admin else [], rater_names=dict(result.rater_names) if admin else {},
            pair_tests=list(result.pair_tests), n_votes=n_votes,
        )  # fmt: skip

    def _schedule_board(self, project_id: int):
        """A recent board for scheduling (fewer resamples), refitted when the votes grew by 10 % (at
        least one vote) since: the pairs' uncertainty changes slowly, a battle request should not wait."""
        from studio.rating import RatingOptions

        with self.db.read() as s:
            n_votes, _ = store.vote_state(s, project_id=project_id)
        if n_votes == 0:
            return None
        with self._schedule_lock:
            cached = self._schedule.get(project_id)
        if cached is not None and n_votes - cached[0] < max(1, cached[0] // 10):
            return cached[1].board
        result, *_ = self._board(project_id, RatingOptions(bootstrap=self.config.schedule_bootstrap))
        with self._schedule_lock:
            self._schedule[project_id] = (n_votes, result)
        return result.board

    def export(self, username: str | None, project_id: int) -> tuple[Path, Path]:
        """Write battles.jsonl (every raw vote) and ratings.json (the default board and its options) into
        a new folder under ``<data_dir>/exports/arena/`` (admins); returns both paths."""
        from studio.rating import RatingOptions

        self.users.require(username, ADMIN)
        result, names, _parents, _anchor, n_votes = self._board(project_id, RatingOptions())
        with self.db.read() as s:
            rows = store.counted_battles(s, project_id=project_id)
            names |= store.checkpoint_names(s, {m for r in rows for m in (r.model_a, r.model_b)})
        now = self.clock()
        folder = write_export(
            Path(self.settings.exports_dir) / "arena",
            f"project-{project_id}-{now:%Y%m%dT%H%M%S%fZ}",
            battle_lines(rows, names),
            ratings_document(result, names, project_id=project_id, n_votes=n_votes, created_at=now),
        )
        return folder / "battles.jsonl", folder / "ratings.json"
