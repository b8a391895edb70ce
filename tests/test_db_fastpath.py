"""The prepared compare-and-set path gives exactly what the general path gives.

``StateDB`` applies status changes through its prepared writer (SQLite's own
connections; on PostgreSQL the engine's pooled ones, see test_db_records for its records)
(``db._prepared_writer``); when the compare-and-set matches nothing the unit is
rolled back and the general SQLAlchemy path runs, which explains the refusal.
``_prepared_writer = None`` makes an instance use the general path only.

Besides the first tests (which this module had before), for every machine
(run, experiment, worker task, controller task) and every move read from the
tables in ``states.py``, a database driven on the fast path and one driven on
the general path, by the same creation sequence, must agree on the rows (every
column; timestamps, generated keys and claim tokens by presence) and on the
history; the writer's ``commits``/``fallbacks`` counters prove that the fast
path committed every legal move and committed nothing else, so these tests fail
if it silently always falls back.  The last test checks the general path of
every legal move on each backend (SQLite, and PostgreSQL with RF_TEST_PG_URL).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import uuid
from collections import deque
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional

import pytest
from sqlalchemy import Table, select

from rapidfire_state import (
    ControllerTask,
    ExperimentStatus,
    InvalidTransitionError,
    NotFoundError,
    RapidFireError,
    RunStatus,
    StateDB,
    TaskRecord,
    TaskStatus,
    states,
)
from rapidfire_state.db import schema
from rapidfire_state.db.schema import UTCDateTime
from rapidfire_state.states import EXPERIMENT_TRANSITIONS

if TYPE_CHECKING:
    from rapidfire_state.db.fastpath import SQLitePreparedWriter


@pytest.fixture
def sqlite_db(tmp_path):
    database = StateDB(tmp_path / "fast.db")
    yield database
    database.close()


def _general_path(database: StateDB) -> StateDB:
    """The same database with the prepared path switched off."""
    twin = StateDB(database.url)
    twin._prepared_writer.close()
    twin._prepared_writer = None
    return twin


def test_prepared_path_is_used_on_both_backends(sqlite_db, db):
    assert sqlite_db._prepared_writer is not None
    assert db._prepared_writer is not None  # SQLite's own connections; PostgreSQL's on the engine's pool
    experiment = sqlite_db.create_experiment("e", "/tmp/e")
    sqlite_db.transition_experiment(experiment.experiment_id, "RUNNING")
    run = sqlite_db.create_run(experiment.experiment_id, {"a": 1})
    sqlite_db.transition_run(run.run_id, "ONGOING")
    assert sqlite_db._prepared_writer._prepared, "the transition did not go through the prepared path"


def test_a_change_a_constraint_refuses_falls_back_and_is_explained_on_both_backends(db):
    """A second RUNNING experiment: the prepared unit is rolled back and the general path says why."""
    from rapidfire_state.exceptions import InvalidTransitionError

    first = db.create_experiment("one", "/tmp/e1")
    second = db.create_experiment("two", "/tmp/e2")
    db.transition_experiment(first.experiment_id, "RUNNING")
    writer = db._prepared_writer
    commits, fallbacks = writer.commits, writer.fallbacks
    with pytest.raises(InvalidTransitionError, match="already RUNNING"):
        db.transition_experiment(second.experiment_id, "RUNNING")
    assert (writer.commits, writer.fallbacks) == (commits, fallbacks + 1)
    assert db.get_experiment(second.experiment_id).status.value == "NEW"
    assert [h.to_status.value for h in db.history("experiment", second.experiment_id)] == ["NEW"]
    # and the writer's connection is fine afterwards
    assert db.transition_experiment(first.experiment_id, "COMPLETED").status.value == "COMPLETED"
    assert writer.commits == commits + 1


def test_records_and_history_match_the_general_path(sqlite_db):
    general = _general_path(sqlite_db)
    try:
        experiment = sqlite_db.create_experiment("e", "/tmp/e")
        sqlite_db.transition_experiment(experiment.experiment_id, "RUNNING")
        fast_run = sqlite_db.create_run(experiment.experiment_id, {"a": 1})
        slow_run = sqlite_db.create_run(experiment.experiment_id, {"a": 1})
        for target, error in (("ONGOING", None), ("STOPPED", None), ("ONGOING", None), ("FAILED", "boom")):
            fast = sqlite_db.transition_run(fast_run.run_id, target, error=error, reason="r")
            slow = general.transition_run(slow_run.run_id, target, error=error, reason="r")
            assert fast == sqlite_db.get_run(fast_run.run_id)  # the RETURNING row, processed like a SELECT
            ignored = {"run_id", "created_at", "started_at", "updated_at", "ended_at"}
            assert {k: v for k, v in fast.to_dict().items() if k not in ignored} == {
                k: v for k, v in slow.to_dict().items() if k not in ignored
            }
            assert type(fast.ended_at) is type(slow.ended_at) and type(fast.updated_at) is type(slow.updated_at)
        fast_history = [(h.from_status, h.to_status, h.reason, h.pid, h.host) for h in sqlite_db.history("run", fast_run.run_id)]
        slow_history = [(h.from_status, h.to_status, h.reason, h.pid, h.host) for h in general.history("run", slow_run.run_id)]
        assert fast_history == slow_history
        assert fast_history[-1][:2] == (RunStatus.ONGOING, RunStatus.FAILED)
    finally:
        general.close()


def test_refusals_fall_back_to_the_general_path(sqlite_db):
    experiment = sqlite_db.create_experiment("e", "/tmp/e")
    sqlite_db.transition_experiment(experiment.experiment_id, "RUNNING")
    run = sqlite_db.create_run(experiment.experiment_id, {"a": 1})
    sqlite_db.transition_run(run.run_id, "ONGOING")
    before = len(sqlite_db.history("run", run.run_id))
    assert sqlite_db.transition_run(run.run_id, "ONGOING").status == RunStatus.ONGOING  # idempotent repeat
    with pytest.raises(InvalidTransitionError, match="ONGOING to NEW"):
        sqlite_db.transition_run(run.run_id, "NEW")
    with pytest.raises(NotFoundError):
        sqlite_db.transition_run(run.run_id + 100, "STOPPED")
    assert len(sqlite_db.history("run", run.run_id)) == before


def test_task_transitions_use_the_prepared_path(sqlite_db):
    experiment = sqlite_db.create_experiment("e", "/tmp/e")
    run = sqlite_db.create_run(experiment.experiment_id, {"a": 1})
    task = sqlite_db.create_worker_task(experiment.experiment_id, run.run_id, 0, 0)
    claimed = sqlite_db.claim_worker_task(0)
    finished = sqlite_db.finish_worker_task(claimed.task_id, ok=False, error="trace")
    assert finished == sqlite_db.get_task("worker", task.task_id)
    assert finished.status == TaskStatus.FAILED and finished.error == "trace" and finished.ended_at is not None
    assert [h.to_status for h in sqlite_db.history("worker_task", task.task_id)] == [
        TaskStatus.SCHEDULED, TaskStatus.IN_PROGRESS, TaskStatus.FAILED
    ]


def test_short_lived_threads_do_not_leak_prepared_connections(sqlite_db):
    """One connection per thread, closed once its thread has ended: a thread per request stays bounded."""
    import threading

    import psutil

    experiment = sqlite_db.create_experiment("threads", "/tmp/threads")
    for chunk in range(100):
        sqlite_db.create_worker_task(experiment.experiment_id, None, 0, chunk)
    process = psutil.Process()
    claimed = []

    def claim() -> None:
        claimed.append(sqlite_db.claim_worker_task(0).task_id)
        sqlite_db.claim_worker_task(99)  # an idle poll too

    claim()
    baseline = process.num_fds()
    for _ in range(99):
        thread = threading.Thread(target=claim)
        thread.start()
        thread.join()
    assert len(set(claimed)) == 100
    assert process.num_fds() <= baseline + 4  # was 2 more per thread (the database and its -wal)
    sqlite_db.close()
    assert process.num_fds() < baseline


# --- every transition of every machine, on both paths -------------------------------
#
# One pair of databases per machine and module: ``fast`` keeps the prepared
# writer, ``general`` has it switched off (``_prepared_writer = None``, what the
# store reads at every call).  Each case creates its own rows, in the same order
# on both, so the pair's rows grow in step; the cases are read from the tables
# in ``states.py``, never from a list written here.


@dataclass(frozen=True)
class Machine:
    """One state machine as the store exposes it: its rows, API and history entity."""

    name: str  # test id, and the key of its pair of databases
    machine: str  # the machine of ``states.py``
    entity: str  # ``StateDB.history`` entity
    table: Table
    created: tuple[Enum, ...]  # the statuses a row may be created with

    @property
    def table_of_moves(self) -> Mapping[Enum, frozenset]:
        return states.MACHINES[self.machine][1]

    @property
    def statuses(self) -> list[Enum]:
        return list(states.MACHINES[self.machine][0])

    def order(self, status: Enum) -> int:
        return self.statuses.index(status)


def _entry_statuses(machine: str) -> tuple[Enum, ...]:
    """The statuses a row of ``machine`` may be created in, in the enum's order."""
    return tuple(status for status in states.MACHINES[machine][0] if status in states.ENTRY_STATES[machine])


MACHINES_UNDER_TEST = (
    Machine("run", "run", "run", schema.runs, _entry_statuses("run")),
    Machine("experiment", "experiment", "experiment", schema.experiments, _entry_statuses("experiment")),
    Machine("worker", "task", "worker_task", schema.worker_tasks, _entry_statuses("task")),
    Machine("controller", "task", "controller_task", schema.controller_tasks, _entry_statuses("task")),
)


def _path(machine: Machine, target: Enum) -> tuple[Enum, tuple[Enum, ...]]:
    """``(creation status, moves)``: a shortest way to ``target`` through the table (BFS)."""
    queue = deque((start, start, ()) for start in machine.created)
    seen = set(machine.created)
    while queue:
        start, status, moves = queue.popleft()
        if status == target:
            return start, moves
        for following in sorted(machine.table_of_moves[status], key=machine.order):
            if following not in seen:
                seen.add(following)
                queue.append((start, following, moves + (following,)))
    raise AssertionError(f"{machine.machine} status {target.value} cannot be reached from {machine.created}")


def _legal(machine: Machine) -> list[tuple[Enum, Enum]]:
    return [
        (source, target)
        for source in machine.statuses
        for target in sorted(machine.table_of_moves[source], key=machine.order)
    ]


def _illegal(machine: Machine) -> list[tuple[Enum, Enum]]:
    return [
        (source, target)
        for source in machine.statuses
        for target in machine.statuses
        if target != source and target not in machine.table_of_moves[source]
    ]


def _cases(pairs: Callable[[Machine], list[tuple[Enum, Enum]]]) -> list[Any]:
    return [
        pytest.param(machine, source, target, id=f"{machine.name}:{source.value}->{target.value}")
        for machine in MACHINES_UNDER_TEST
        for source, target in pairs(machine)
    ]


LEGAL = _cases(_legal)
ILLEGAL = _cases(_illegal)


class Pair:
    """The same database twice: ``fast`` on the prepared path, ``general`` without it."""

    def __init__(self, directory: Path, name: str):
        self.directory = directory
        self.fast = StateDB(directory / f"{name}-fast.db")
        assert self.fast._prepared_writer is not None, "SQLite opens with the prepared path"
        self.general = StateDB(directory / f"{name}-general.db")
        #: the general database's own writer, detached: nothing may ever count on it
        self.idle_writer: SQLitePreparedWriter = self.general._prepared_writer
        self.general._prepared_writer = None
        #: per side: the ids of the rows every case of this pair hangs from
        self.context: dict[str, dict[str, int]] = {"fast": {}, "general": {}}

    def sides(self) -> tuple[tuple[str, StateDB], tuple[str, StateDB]]:
        return (("fast", self.fast), ("general", self.general))

    def counters(self) -> tuple[int, int]:
        """``(commits, fallbacks)`` of the fast database's prepared writer."""
        writer = self.fast._prepared_writer
        return writer.commits, writer.fallbacks

    def assert_general_path_only(self) -> None:
        assert self.general._prepared_writer is None
        assert (self.idle_writer.commits, self.idle_writer.fallbacks) == (0, 0), "the disabled writer was used"

    def close(self) -> None:
        self.fast.close()
        self.general.close()
        self.idle_writer.close()


class PairPool:
    """One :class:`Pair` per machine, made on first use and kept for the module."""

    def __init__(self, directory: Path):
        self._directory = directory
        self._pairs: dict[str, Pair] = {}

    def get(self, machine: Machine) -> Pair:
        pair = self._pairs.get(machine.name)
        if pair is None:
            pair = self._pairs[machine.name] = Pair(self._directory, machine.name)
            for side, database in pair.sides():
                context = pair.context[side]
                experiment = database.create_experiment(f"{machine.name}-context", str(self._directory / "context"))
                context["experiment_id"] = experiment.experiment_id
                if machine.name == "run":
                    # a STOPPED run resumes only while its experiment is RUNNING
                    database.transition_experiment(experiment.experiment_id, ExperimentStatus.RUNNING)
                if machine.machine == "task":
                    context["run_id"] = database.create_run(experiment.experiment_id, {"lr": 0.1}).run_id
        return pair

    def settle(self) -> None:
        """Leave no experiment RUNNING in the experiment pair (at most one runs per database)."""
        pair = self._pairs.get("experiment")
        if pair is None:
            return
        out = sorted(states.terminal_states("experiment") & EXPERIMENT_TRANSITIONS[ExperimentStatus.RUNNING], key=str)
        for _, database in pair.sides():
            for experiment in database.list_experiments(statuses=[ExperimentStatus.RUNNING]):
                database.transition_experiment(experiment.experiment_id, out[0], reason="test cleanup")

    def close(self) -> None:
        for pair in self._pairs.values():
            pair.close()


@pytest.fixture(scope="module")
def pair_pool(tmp_path_factory) -> Iterator[PairPool]:
    pool = PairPool(tmp_path_factory.mktemp("fastpath-pairs"))
    yield pool
    pool.close()


@pytest.fixture
def pairs(pair_pool) -> Iterator[PairPool]:
    yield pair_pool
    pair_pool.settle()


def _create(database: StateDB, machine: Machine, context: Mapping[str, int], status: Enum, tag: str) -> int:
    if machine.name == "experiment":
        record = database.create_experiment(f"exp-{tag}", f"/tmp/rf-fastpath/{tag}", config_options={"tag": tag})
        entity_id = record.experiment_id
    elif machine.name == "run":
        record = database.create_run(context["experiment_id"], {"lr": 0.1, "tag": tag}, total_steps=10)
        entity_id = record.run_id
    elif machine.name == "worker":
        record = database.create_worker_task(
            context["experiment_id"], context["run_id"], 3, 7, config_options={"tag": tag}, status=status
        )
        entity_id = record.task_id
    else:
        record = database.create_controller_task(
            context["experiment_id"], next(iter(ControllerTask)), run_id=context["run_id"],
            config_leaf={"tag": tag}, status=status,
        )
        entity_id = record.task_id
    assert record.status == status, f"{machine.name} created {record.status.value}, not {status.value}"
    return entity_id


def _transition(database: StateDB, machine: Machine, entity_id: int, to: Enum, **kwargs: Any) -> Any:
    if machine.name == "experiment":
        return database.transition_experiment(entity_id, to, **kwargs)
    if machine.name == "run":
        return database.transition_run(entity_id, to, **kwargs)
    return database.transition_task(machine.name, entity_id, to, **kwargs)


def _get(database: StateDB, machine: Machine, entity_id: int) -> Any:
    if machine.name == "experiment":
        return database.get_experiment(entity_id)
    if machine.name == "run":
        return database.get_run(entity_id)
    return database.get_task(machine.name, entity_id)


def _reach(pair: Pair, machine: Machine, target: Enum) -> dict[str, int]:
    """A new row in ``target`` on both sides, by the same creation and moves; its id per side."""
    start, moves = _path(machine, target)
    tag = uuid.uuid4().hex[:10]
    ids = {}
    for side, database in pair.sides():
        entity_id = ids[side] = _create(database, machine, pair.context[side], start, tag)
        for status in moves:
            _transition(database, machine, entity_id, status, reason="path")
        assert _get(database, machine, entity_id).status == target
    return ids


def _row(database: StateDB, table: Table, key: str, entity_id: int) -> dict[str, Any]:
    """Every column of the row, with what differs legitimately between two databases
    reduced to its presence: the generated key, timestamps and the random claim token."""
    with database.engine.connect() as connection:
        row = connection.execute(select(table).where(table.c[key] == entity_id)).mappings().one()
    out: dict[str, Any] = {}
    for column in table.columns:
        if column.primary_key:
            continue
        value = row[column.name]
        if isinstance(column.type, UTCDateTime) or column.name == "claim_token":
            out[column.name] = "set" if value is not None else None
        else:
            out[column.name] = value
    return out


def _key(machine: Machine) -> str:
    return next(column.name for column in machine.table.columns if column.primary_key)


def _history(database: StateDB, entity: str, entity_id: int) -> list[tuple]:
    return [(h.from_status, h.to_status, h.reason, h.pid, h.host) for h in database.history(entity, entity_id)]


def _outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "ok", call()
    except RapidFireError as exc:
        return "error", exc


def _signature(exc: BaseException, ids: Mapping[str, Any]) -> tuple:
    """An error as comparable across the two databases: the side's own ids and tokens named."""
    message = str(exc)
    for name, value in ids.items():
        if value is not None:
            message = re.sub(rf"(?<![\w]){re.escape(str(value))}(?![\w])", f"<{name}>", message)
    return (
        type(exc), getattr(exc, "entity", None), getattr(exc, "current", None),
        getattr(exc, "wanted", None), getattr(exc, "allowed", None), message,
    )


def _snapshot(pair: Pair, machine: Machine, ids: Mapping[str, int]) -> dict[str, tuple]:
    key = _key(machine)
    return {
        side: (_row(database, machine.table, key, ids[side]), _history(database, machine.entity, ids[side]))
        for side, database in pair.sides()
    }


def _fast_path_delta(pair: Pair, before: tuple[int, int]) -> tuple[int, int]:
    commits, fallbacks = pair.counters()
    return commits - before[0], fallbacks - before[1]


@pytest.mark.parametrize("with_error", [False, True], ids=["plain", "error"])
@pytest.mark.parametrize("with_expected", [False, True], ids=["any", "expected"])
@pytest.mark.parametrize("machine, source, target", LEGAL)
def test_legal_transition_matches_the_general_path(pairs, machine, source, target, with_expected, with_error):
    """Each legal move gives the same row and history on both paths, and the fast path commits it."""
    pair = pairs.get(machine)
    kwargs: dict[str, Any] = {}
    if with_expected:
        kwargs["expected"] = {source}
    if with_error:
        kwargs.update(error="boom", reason="because")
    ids = _reach(pair, machine, target=source)
    before = _snapshot(pair, machine, ids)
    counters = pair.counters()
    fast = _transition(pair.fast, machine, ids["fast"], target, **kwargs)
    fast_delta = _fast_path_delta(pair, counters)
    general = _transition(pair.general, machine, ids["general"], target, **kwargs)
    assert _fast_path_delta(pair, counters) == fast_delta  # the general database never touches it

    after = _snapshot(pair, machine, ids)
    for side, record in (("fast", fast), ("general", general)):
        database = pair.fast if side == "fast" else pair.general
        assert record == _get(database, machine, ids[side])  # the returned row, processed like a read
        row, history = after[side]
        assert (row["status"], row["previous_status"]) == (target.value, source.value)
        assert row["error"] == ("boom" if with_error else before[side][0]["error"])
        assert history == before[side][1] + [(source, target, kwargs.get("reason"), os.getpid(), socket.gethostname())]
    assert after["fast"] == after["general"]
    assert type(fast) is type(general)
    pair.assert_general_path_only()
    assert fast_delta == (1, 0), (
        f"{machine.name} {source.value}->{target.value}: the prepared path made {fast_delta[0]} commit(s) and "
        f"{fast_delta[1]} fallback(s); one commit and no fallback expected"
    )


@pytest.mark.parametrize("machine", MACHINES_UNDER_TEST, ids=lambda m: m.name)
def test_a_disabled_writer_is_not_used(pairs, machine):
    """``_prepared_writer = None`` sends every change of the instance through the general
    path: the writer it had counts nothing, and the changes still apply."""
    pair = pairs.get(machine)
    writer = pair.fast._prepared_writer
    before = pair.counters()
    pair.fast._prepared_writer = None
    try:
        for source, target in _legal(machine):
            ids = _reach(pair, machine, target=source)
            assert _transition(pair.fast, machine, ids["fast"], target).status == target
            if machine.machine == "task":
                assert pair.fast.claim_worker_task(99) is None and pair.fast.claim_controller_task(10**6) is None
            pairs.settle()
    finally:
        pair.fast._prepared_writer = writer
    assert pair.counters() == before, "a disabled prepared writer still ran units"


def _refusal(
    pair: Pair,
    machine: Machine,
    ids: Mapping[str, int],
    target: Enum,
    *,
    named: Optional[Mapping[str, Mapping[str, Any]]] = None,
    **kwargs: Any,
) -> tuple[int, int]:
    """Try ``target`` on both sides; assert the same error and no change; the fast path's counter delta.

    ``named[side]`` names more of a side's own values (a claim token) in the messages compared.
    """
    before = _snapshot(pair, machine, ids)
    counters = pair.counters()
    fast = _outcome(lambda: _transition(pair.fast, machine, ids["fast"], target, **kwargs))
    delta = _fast_path_delta(pair, counters)
    general = _outcome(lambda: _transition(pair.general, machine, ids["general"], target, **kwargs))
    assert fast[0] == general[0] == "error", (fast, general)
    assert isinstance(general[1], (InvalidTransitionError, NotFoundError))
    names = {side: {"id": ids[side], **((named or {}).get(side) or {})} for side in ids}
    assert _signature(fast[1], names["fast"]) == _signature(general[1], names["general"])
    assert _snapshot(pair, machine, ids) == before  # nothing written on either side
    pair.assert_general_path_only()
    return delta


def _tried(machine: Machine, target: Enum, expected: Optional[set] = None) -> int:
    """1 when the prepared path has a compare-and-set to try (some status may move to
    ``target`` under ``expected``), else 0: with no status allowed there is no statement."""
    allowed = states.allowed_from(machine.machine, target)
    return int(bool(allowed if expected is None else allowed & expected))


@pytest.mark.parametrize("machine, source, target", LEGAL)
def test_narrowed_expected_is_refused_alike(pairs, machine, source, target):
    """``expected=`` without the row's status refuses a legal move, the same way on both paths."""
    pair = pairs.get(machine)
    ids = _reach(pair, machine, target=source)
    narrowed = set(machine.statuses) - {source}
    delta = _refusal(pair, machine, ids, target, expected=narrowed)
    assert delta == (0, _tried(machine, target, narrowed)), (
        f"{machine.name} {source.value}->{target.value} expected={sorted(s.value for s in narrowed)}: "
        f"(commits, fallbacks) moved by {delta}"
    )


@pytest.mark.parametrize("with_expected", [False, True], ids=["any", "expected"])
@pytest.mark.parametrize("machine, source, target", LEGAL)
def test_idempotent_repeat_matches_the_general_path(pairs, machine, source, target, with_expected):
    """Repeating a move returns the row unchanged on both paths; the fast path falls back."""
    pair = pairs.get(machine)
    ids = _reach(pair, machine, target=source)
    for side, database in pair.sides():
        _transition(database, machine, ids[side], target)
    before = _snapshot(pair, machine, ids)
    kwargs = {"expected": {source}} if with_expected else {}
    counters = pair.counters()
    records = {"fast": _transition(pair.fast, machine, ids["fast"], target, **kwargs)}
    delta = _fast_path_delta(pair, counters)
    records["general"] = _transition(pair.general, machine, ids["general"], target, **kwargs)
    for side, database in pair.sides():
        assert records[side] == _get(database, machine, ids[side])
        assert records[side].status == target
    assert _snapshot(pair, machine, ids) == before  # no row change, no history row
    assert before["fast"] == before["general"]
    pair.assert_general_path_only()
    assert delta == (0, 1), f"{machine.name} {target.value} repeated: (commits, fallbacks) moved by {delta}"


@pytest.mark.parametrize("machine, source, target", ILLEGAL)
def test_illegal_transition_is_refused_alike(pairs, machine, source, target):
    """A move the table does not allow is refused the same way on both paths; nothing is committed."""
    pair = pairs.get(machine)
    ids = _reach(pair, machine, target=source)
    delta = _refusal(pair, machine, ids, target)
    assert delta == (0, _tried(machine, target)), (
        f"{machine.name} {source.value}->{target.value}: (commits, fallbacks) moved by {delta}"
    )


@pytest.mark.parametrize("machine", MACHINES_UNDER_TEST, ids=lambda m: m.name)
def test_missing_row_is_refused_alike(pairs, machine):
    pair = pairs.get(machine)
    source, target = _legal(machine)[0]
    missing = 10**6
    counters = pair.counters()
    fast = _outcome(lambda: _transition(pair.fast, machine, missing, target))
    delta = _fast_path_delta(pair, counters)
    general = _outcome(lambda: _transition(pair.general, machine, missing, target))
    assert isinstance(fast[1], NotFoundError) and isinstance(general[1], NotFoundError)
    assert str(fast[1]) == str(general[1])
    pair.assert_general_path_only()
    assert delta == (0, 1), f"{machine.name} {missing} -> {target.value}: (commits, fallbacks) moved by {delta}"


def test_resuming_a_run_of_an_experiment_not_running_is_refused_alike(pairs):
    """STOPPED -> ONGOING is legal only while the experiment runs: the fast path's extra
    WHERE refuses it, and the general path explains it, alike."""
    machine = next(m for m in MACHINES_UNDER_TEST if m.name == "run")
    pair = pairs.get(machine)
    resume = next(
        (source, target) for source, target in _legal(machine)
        if source == RunStatus.STOPPED and target == RunStatus.ONGOING
    )
    start, moves = _path(machine, resume[0])
    tag = uuid.uuid4().hex[:10]
    ids, experiments = {}, {}
    for side, database in pair.sides():
        experiments[side] = database.create_experiment(f"idle-{tag}", "/tmp/rf-fastpath/idle").experiment_id
        ids[side] = _create(database, machine, {"experiment_id": experiments[side]}, start, tag)
        for status in moves:
            database.transition_run(ids[side], status)
    before = _snapshot(pair, machine, ids)
    counters = pair.counters()
    fast = _outcome(lambda: pair.fast.transition_run(ids["fast"], resume[1]))
    delta = _fast_path_delta(pair, counters)
    general = _outcome(lambda: pair.general.transition_run(ids["general"], resume[1]))
    assert isinstance(general[1], InvalidTransitionError) and "is RUNNING" in str(general[1])
    assert _signature(fast[1], {"id": ids["fast"], "experiment": experiments["fast"]}) == _signature(
        general[1], {"id": ids["general"], "experiment": experiments["general"]}
    )
    assert _snapshot(pair, machine, ids) == before
    pair.assert_general_path_only()
    assert delta == (0, 1)


def test_a_second_running_experiment_is_refused_alike(pairs):
    """At most one experiment runs per database: the second NEW -> RUNNING breaks the
    unique index, and both paths must explain it as the same refusal, writing nothing."""
    machine = next(m for m in MACHINES_UNDER_TEST if m.name == "experiment")
    pair = pairs.get(machine)
    running = _reach(pair, machine, target=ExperimentStatus.RUNNING)
    ids = _reach(pair, machine, target=states.INITIAL_STATES["experiment"])
    before = _snapshot(pair, machine, ids)
    counters = pair.counters()
    fast = _outcome(lambda: pair.fast.transition_experiment(ids["fast"], ExperimentStatus.RUNNING))
    delta = _fast_path_delta(pair, counters)
    general = _outcome(lambda: pair.general.transition_experiment(ids["general"], ExperimentStatus.RUNNING))
    assert isinstance(general[1], InvalidTransitionError) and "already RUNNING" in str(general[1])
    assert _signature(fast[1], {"id": ids["fast"], "running": running["fast"]}) == _signature(
        general[1], {"id": ids["general"], "running": running["general"]}
    )
    assert _snapshot(pair, machine, ids) == before
    pair.assert_general_path_only()
    # nothing committed; whether the fast path tried first (and rolled back) is its own business
    assert delta[0] == 0 and delta[1] in (0, 1), delta


# --- claims and finishes ---------------------------------------------------------------

TASK_MACHINES = [m for m in MACHINES_UNDER_TEST if m.machine == "task"]


@pytest.fixture(scope="module")
def empty_database_file(tmp_path_factory) -> Path:
    """A migrated, empty database, copied for the tests that need an empty queue."""
    path = tmp_path_factory.mktemp("fastpath-template") / "template.db"
    StateDB(path).close()
    return path


@pytest.fixture
def empty_pair(empty_database_file, tmp_path) -> Iterator[Pair]:
    for name in ("claims-fast.db", "claims-general.db"):
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{empty_database_file}{suffix}")
            if source.exists():
                shutil.copyfile(source, tmp_path / f"{name}{suffix}")
    pair = Pair(tmp_path, "claims")
    yield pair
    pair.close()


def _claim(database: StateDB, kind: str, worker_id: int, experiment_id: Optional[int]) -> Optional[TaskRecord]:
    if kind == "worker":
        return database.claim_worker_task(worker_id, experiment_id=experiment_id)
    return database.claim_controller_task(experiment_id)


def _new_task(database: StateDB, kind: str, experiment_id: int, worker_id: int, status: Enum, tag: str) -> int:
    if kind == "worker":
        return database.create_worker_task(
            experiment_id, None, worker_id, 0, config_options={"tag": tag}, status=status
        ).task_id
    return database.create_controller_task(
        experiment_id, next(iter(ControllerTask)), config_leaf={"tag": tag}, status=status
    ).task_id


@pytest.mark.parametrize("by_experiment", [False, True], ids=["any-experiment", "one-experiment"])
@pytest.mark.parametrize("machine", TASK_MACHINES, ids=lambda m: m.name)
def test_claims_match_the_general_path(empty_pair, machine, by_experiment):
    """Claims take the oldest SCHEDULED matching task on both paths alike; each claim is
    one fast-path commit, each idle poll one fallback."""
    pair, kind = empty_pair, machine.name
    # (experiment index, worker id, status) in creation order; worker id 1 is another worker
    layout = [
        (0, 0, TaskStatus.SCHEDULED), (1, 0, TaskStatus.SCHEDULED), (0, 0, TaskStatus.PENDING),
        (0, 1, TaskStatus.SCHEDULED), (0, 0, TaskStatus.SCHEDULED), (1, 0, TaskStatus.SCHEDULED),
    ]
    tasks: dict[str, list[int]] = {}
    experiments: dict[str, list[int]] = {}
    for side, database in pair.sides():
        experiments[side] = [database.create_experiment(f"claims-{n}", "/tmp/rf-fastpath/c").experiment_id for n in (0, 1)]
        tasks[side] = [
            _new_task(database, kind, experiments[side][e], w, status, f"t{n}")
            for n, (e, w, status) in enumerate(layout)
        ]
    wanted = [
        n for n, (e, w, status) in enumerate(layout)
        if status == TaskStatus.SCHEDULED and (kind == "controller" or w == 0) and (not by_experiment or e == 0)
    ]
    claimed: dict[str, list[int]] = {}
    for side, database in pair.sides():
        claimed[side] = []
        experiment_id = experiments[side][0] if by_experiment else None
        for _ in range(len(layout) + 1):
            counters = pair.counters()
            record = _claim(database, kind, 0, experiment_id)
            delta = _fast_path_delta(pair, counters)
            if side == "fast":
                assert delta == ((1, 0) if record is not None else (0, 1)), f"claim {record}: moved by {delta}"
            else:
                assert delta == (0, 0)
            if record is None:
                break
            assert record == database.get_task(kind, record.task_id)
            assert record.status == TaskStatus.IN_PROGRESS and record.claim_token is not None
            assert (record.claim_pid, record.claim_host) == (os.getpid(), socket.gethostname())
            claimed[side].append(tasks[side].index(record.task_id))
        assert _claim(database, kind, 0, experiment_id) is None
    assert claimed["fast"] == claimed["general"] == wanted
    key = _key(machine)
    for n in range(len(layout)):
        fast_id, general_id = tasks["fast"][n], tasks["general"][n]
        assert _row(pair.fast, machine.table, key, fast_id) == _row(pair.general, machine.table, key, general_id)
        assert _history(pair.fast, machine.entity, fast_id) == _history(pair.general, machine.entity, general_id)
    claimed_history = _history(pair.fast, machine.entity, tasks["fast"][wanted[0]])
    assert claimed_history[-1] == (
        TaskStatus.SCHEDULED, TaskStatus.IN_PROGRESS, "claimed", os.getpid(), socket.gethostname()
    )
    pair.assert_general_path_only()


@pytest.mark.parametrize("machine", TASK_MACHINES, ids=lambda m: m.name)
def test_transition_to_in_progress_records_the_claim_alike(pairs, machine):
    """``transition_task(..., IN_PROGRESS)`` records a claim like the claim methods, on both
    paths, and its token is the one a finish must present."""
    pair = pairs.get(machine)
    ids = _reach(pair, machine, target=TaskStatus.SCHEDULED)
    counters = pair.counters()
    records = {side: database.transition_task(machine.name, ids[side], "IN_PROGRESS") for side, database in pair.sides()}
    assert _fast_path_delta(pair, counters) == (1, 0)
    process_started = {record.claim_process_started_at for record in records.values()}
    for record in records.values():
        assert record.claim_token is not None and len(record.claim_token) == 32
        assert (record.claim_pid, record.claim_host) == (os.getpid(), socket.gethostname())
    assert len(process_started) == 1
    assert records["fast"].claim_token != records["general"].claim_token  # a fresh token per claim
    snapshot = _snapshot(pair, machine, ids)
    assert snapshot["fast"] == snapshot["general"]
    # the claim is one the holder can finish with, and one nobody else can
    wrong = _refusal(
        pair, machine, ids, TaskStatus.COMPLETED, claim_token="f" * 32,
        named={side: {"token": record.claim_token} for side, record in records.items()},
    )
    assert wrong == (0, 1)
    counters = pair.counters()
    for side, database in pair.sides():
        finished = database.transition_task(
            machine.name, ids[side], TaskStatus.COMPLETED, claim_token=records[side].claim_token
        )
        assert finished.status == TaskStatus.COMPLETED and finished.claim_token == records[side].claim_token
    assert _fast_path_delta(pair, counters) == (1, 0)
    snapshot = _snapshot(pair, machine, ids)
    assert snapshot["fast"] == snapshot["general"]
    pair.assert_general_path_only()


def _finish(database: StateDB, kind: str, task_id: int, **kwargs: Any) -> TaskRecord:
    finish = database.finish_worker_task if kind == "worker" else database.finish_controller_task
    return finish(task_id, **kwargs)


@pytest.mark.parametrize("token", ["right", "wrong", "none"])
@pytest.mark.parametrize("error", [None, "trace"], ids=["no-error", "error"])
@pytest.mark.parametrize("ok", [True, False], ids=["ok", "failed"])
@pytest.mark.parametrize("machine", TASK_MACHINES, ids=lambda m: m.name)
def test_finish_matches_the_general_path(pairs, machine, ok, error, token):
    """``finish_*_task`` with the claim's token, another token or none: same rows, history
    and refusals on both paths; the fast path commits each finish once and falls back on
    the repeat and the refusals."""
    pair, kind = pairs.get(machine), machine.name
    tag = uuid.uuid4().hex[:10]
    ids, claims, experiments = {}, {}, {}
    for side, database in pair.sides():
        # an experiment of this case only: its claim can take no other case's task
        experiments[side] = database.create_experiment(f"finish-{tag}", "/tmp/rf-fastpath/f").experiment_id
        ids[side] = _new_task(database, kind, experiments[side], 5, TaskStatus.SCHEDULED, tag)
        claims[side] = _claim(database, kind, 5, experiments[side])
        assert claims[side].task_id == ids[side]
    presented = {
        side: {"right": claims[side].claim_token, "wrong": "0" * 32, "none": None}[token] for side, _ in pair.sides()
    }
    target = TaskStatus.COMPLETED if ok else TaskStatus.FAILED

    def finish_both(**kwargs: Any) -> tuple[tuple[str, Any], tuple[str, Any], tuple[int, int]]:
        counters = pair.counters()
        fast = _outcome(lambda: _finish(pair.fast, kind, ids["fast"], claim_token=presented["fast"], **kwargs))
        delta = _fast_path_delta(pair, counters)
        general = _outcome(
            lambda: _finish(pair.general, kind, ids["general"], claim_token=presented["general"], **kwargs)
        )
        return fast, general, delta

    before = _snapshot(pair, machine, ids)
    fast, general, delta = finish_both(ok=ok, error=error)
    after = _snapshot(pair, machine, ids)
    assert after["fast"] == after["general"]
    if token == "wrong":
        assert fast[0] == general[0] == "error" and isinstance(general[1], InvalidTransitionError)
        assert _signature(fast[1], {"id": ids["fast"], "token": claims["fast"].claim_token}) == _signature(
            general[1], {"id": ids["general"], "token": claims["general"].claim_token}
        )
        assert after == before
        assert delta == (0, 1), f"refused finish: (commits, fallbacks) moved by {delta}"
        pair.assert_general_path_only()
        return
    assert fast[0] == general[0] == "ok", (fast, general)
    for side, database in pair.sides():
        record = fast[1] if side == "fast" else general[1]
        assert record == database.get_task(kind, ids[side])
        assert record.status == target and record.error == error and record.ended_at is not None
        assert record.claim_token == claims[side].claim_token  # the finish keeps the claim on record
        assert after[side][1] == before[side][1] + [
            (TaskStatus.IN_PROGRESS, target, None, os.getpid(), socket.gethostname())
        ]
    assert delta == (1, 0), f"finish: (commits, fallbacks) moved by {delta}"

    # the same finish again: an idempotent repeat, nothing written
    fast, general, delta = finish_both(ok=ok, error=error)
    assert fast[0] == general[0] == "ok", (fast, general)
    assert _snapshot(pair, machine, ids) == after
    assert delta == (0, 1), f"repeated finish: (commits, fallbacks) moved by {delta}"
    if not ok and token == "right":
        # FAILED already, under this claim, with another error: someone else failed it
        fast, general, delta = finish_both(ok=False, error="another failure")
        assert fast[0] == general[0] == "error" and "someone else" in str(general[1])
        assert _signature(fast[1], {"id": ids["fast"]}) == _signature(general[1], {"id": ids["general"]})
        assert _snapshot(pair, machine, ids) == after
        assert delta == (0, 1)
    pair.assert_general_path_only()


# --- the general path on each backend ---------------------------------------------------


@pytest.mark.parametrize("machine", MACHINES_UNDER_TEST, ids=lambda m: m.name)
def test_general_path_applies_every_legal_transition(db, machine, tmp_path):
    """On SQLite (prepared path off) and PostgreSQL: each legal move gives the status, the
    previous status and one history row that the table says."""
    if db._prepared_writer is not None:
        db._prepared_writer.close()
        db._prepared_writer = None
    context: dict[str, int] = {}
    experiment = db.create_experiment(f"{machine.name}-context", str(tmp_path / "context"))
    context["experiment_id"] = experiment.experiment_id
    if machine.name == "run":
        db.transition_experiment(experiment.experiment_id, ExperimentStatus.RUNNING)
    if machine.machine == "task":
        context["run_id"] = db.create_run(experiment.experiment_id, {"lr": 0.1}).run_id
    terminal = states.terminal_states(machine.machine)
    key = _key(machine)
    failures = []
    for source, target in _legal(machine):
        case = f"{machine.name} {source.value}->{target.value}"
        start, moves = _path(machine, source)
        entity_id = _create(db, machine, context, start, uuid.uuid4().hex[:10])
        for status in moves:
            _transition(db, machine, entity_id, status, reason="path")
        before = _history(db, machine.entity, entity_id)
        try:
            record = _transition(db, machine, entity_id, target, reason=case)
        except RapidFireError as exc:
            failures.append(f"{case}: {exc}")
            continue
        row = _row(db, machine.table, key, entity_id)
        history = _history(db, machine.entity, entity_id)
        found = (record.status, row["status"], row["previous_status"], row["ended_at"], history)
        wanted = (
            target, target.value, source.value, "set" if target in terminal else None,
            before + [(source, target, case, os.getpid(), socket.gethostname())],
        )
        if found != wanted:
            failures.append(f"{case}: found {found}, wanted {wanted}")
        if machine.name == "experiment" and target == ExperimentStatus.RUNNING:
            # at most one experiment runs per database: end this one before the next case
            out = sorted(terminal & EXPERIMENT_TRANSITIONS[target], key=str)[0]
            db.transition_experiment(entity_id, out, reason="test cleanup")
    assert not failures, "\n".join(failures)
