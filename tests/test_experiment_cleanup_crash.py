"""A cleanup killed with SIGKILL at random points leaves the database before or after.

A spawned child runs :meth:`ExperimentUtils.cleanup_experiment` on a prepared
experiment (hundreds of open tasks and live runs, workers, shm rows) and is
killed with SIGKILL after a random delay that spans the cleanup's own measured
duration.  Each iteration starts from a fresh copy of the prepared database.
After each kill the database must be exactly the "before" state or exactly the
"after" state (the state an unkilled cleanup leaves on another copy), comparing
every row of every table with timestamps reduced to set/unset and pids ignored —
and ``PRAGMA integrity_check`` must say ``ok``.

SQLite only: the atomicity under test is the embedded file's (WAL + one
``BEGIN IMMEDIATE`` transaction); on PostgreSQL a killed client's transaction is
rolled back by the server, which is the server's guarantee, not ours.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from rapidfire_state.constants import ControllerTask, ExperimentTask, RunStatus, SHMLocation, TaskStatus

ITERATIONS = 15
HOST = socket.gethostname()


# --- database snapshots -------------------------------------------------------------


def snapshot(path: Path) -> dict[str, list[tuple]]:
    """Every row of every table, timestamps as set/unset, writer pids dropped."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [
            row[0]
            for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            if not row[0].startswith("sqlite_")
        ]
        out: dict[str, list[tuple]] = {}
        for table in tables:
            cursor = connection.execute(f'SELECT * FROM "{table}" ORDER BY rowid')
            columns = [d[0] for d in cursor.description]
            rows = []
            for row in cursor:
                rows.append(tuple(_normalise(table, column, value) for column, value in zip(columns, row)))
            out[table] = rows
        return out
    finally:
        connection.close()


def _normalise(table: str, column: str, value: Any) -> Any:
    if column.endswith("_at") or column == "at":
        return value is not None
    if table == "state_transitions" and column == "pid":
        return None
    return value


def integrity(path: Path) -> list[str]:
    connection = sqlite3.connect(str(path))
    try:
        checks = [row[0] for row in connection.execute("PRAGMA integrity_check")]
        foreign = connection.execute("PRAGMA foreign_key_check").fetchall()
        return checks + [f"foreign key violation: {row}" for row in foreign]
    finally:
        connection.close()


def copy_database(source: Path, target: Path) -> Path:
    """A consistent copy through SQLite's backup API (WAL content included)."""
    src = sqlite3.connect(str(source))
    dst = sqlite3.connect(str(target))
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()
    return target


# --- the prepared experiment --------------------------------------------------------


def prepare(path: Path, experiments_path: Path) -> int:
    """A RUNNING experiment with enough open state that cleanup takes a while."""
    from rapidfire_state.db import StateDB

    db = StateDB(f"sqlite:///{path}")
    try:
        record = db.create_experiment("crash", str(experiments_path), owner_pid=os.getpid(), owner_host=HOST)
        experiment_id = record.experiment_id
        db.transition_experiment(experiment_id, "RUNNING")
        db.set_experiment_task(experiment_id, ExperimentTask.RUN_FIT)
        ongoing = []
        for i in range(100):
            status = [RunStatus.NEW, RunStatus.ONGOING, RunStatus.STOPPED, RunStatus.COMPLETED][i % 4]
            run = db.create_run(experiment_id, {"lr": i, "layers": {"n": i % 7}})
            if status != RunStatus.NEW:
                db.transition_run(run.run_id, RunStatus.ONGOING)
            if status in (RunStatus.STOPPED, RunStatus.COMPLETED):
                db.transition_run(run.run_id, status)
            if status == RunStatus.ONGOING:
                ongoing.append(run.run_id)
        for i in range(120):
            run_id = ongoing[i % len(ongoing)]
            task = db.create_worker_task(
                experiment_id, run_id, i % 4, i, status=TaskStatus.PENDING if i % 3 == 0 else TaskStatus.SCHEDULED
            )
            if i % 3 == 2:
                db.transition_task("worker", task.task_id, TaskStatus.IN_PROGRESS)
        for i in range(30):
            db.create_controller_task(experiment_id, ControllerTask.IC_STOP, run_id=ongoing[i % len(ongoing)])
        for worker_id in range(4):
            # Another host: the database rows are what matter here; no pid is signalled.
            db.register_worker(experiment_id, worker_id, 1000 + worker_id, host="elsewhere")
        for i in range(40):
            db.upsert_shm_object(
                f"run_{ongoing[i % len(ongoing)]}_chunk_{i}", experiment_id=experiment_id,
                run_id=ongoing[i % len(ongoing)], chunk_id=i, location=SHMLocation.SHM, num_bytes=1 << 20,
            )
        return experiment_id
    finally:
        db.close()


def _cleanup_child(url: str, experiment_id: int, ready, durations) -> None:
    """Spawned: open the database, say ready, run the cleanup, report its timeline.

    Reports ``(total, write_begin, write_commit)`` in seconds from the start of
    the cleanup: when its write transaction took the lock and when it committed.
    """
    from sqlalchemy import event

    from rapidfire_state.db import StateDB
    from rapidfire_state.db.engine import WRITE_OPTION
    from rapidfire_state.experiment_utils import ExperimentUtils

    utils = ExperimentUtils(StateDB(url))
    utils.db.get_experiment(experiment_id)  # connection open before the clock starts
    marks: dict[str, float] = {}

    @event.listens_for(utils.db.engine, "begin")
    def _begin(connection: Any) -> None:
        if connection.get_execution_options().get(WRITE_OPTION):
            marks.setdefault("begin", time.perf_counter())

    @event.listens_for(utils.db.engine, "commit")
    def _commit(connection: Any) -> None:
        if "begin" in marks:
            marks.setdefault("commit", time.perf_counter())

    ready.set()
    started = time.perf_counter()
    utils.cleanup_experiment(experiment_id, grace_seconds=0.0)
    ended = time.perf_counter()
    durations.put((ended - started, marks["begin"] - started, marks["commit"] - started))


@pytest.mark.slow
def test_sigkill_during_cleanup_leaves_before_or_after(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    template = tmp_path / "template.db"
    experiment_id = prepare(template, tmp_path / "experiments")
    before = snapshot(template)

    # The reference: an unkilled cleanup in a child like the ones we kill.
    reference = copy_database(template, tmp_path / "reference.db")
    ready, durations = ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_cleanup_child, args=(f"sqlite:///{reference}", experiment_id, ready, durations))
    child.start()
    duration, write_begin, write_commit = durations.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0
    after = snapshot(reference)
    assert after != before
    assert integrity(reference) == ["ok"]
    # the reference really is the full cleanup
    connection = sqlite3.connect(str(reference))
    statuses = dict(connection.execute("SELECT status, count(*) FROM runs GROUP BY status").fetchall())
    assert connection.execute("SELECT status FROM experiments").fetchone()[0] == "COMPLETED"
    assert "NEW" not in statuses and "ONGOING" not in statuses and statuses["KILLED"] == 50
    assert connection.execute("SELECT count(*) FROM shm_objects").fetchone()[0] == 0
    connection.close()

    # Delays spread over [0, 1.5 x duration]: one random point in each slice.
    span = 1.5 * duration
    rng = random.Random(os.getpid())
    delays = [rng.uniform(i * span / ITERATIONS, (i + 1) * span / ITERATIONS) for i in range(ITERATIONS)]
    outcomes = []
    for i, delay in enumerate(delays):
        database = copy_database(template, tmp_path / f"iteration_{i}.db")
        ready, durations = ctx.Event(), ctx.Queue()
        child = ctx.Process(target=_cleanup_child, args=(f"sqlite:///{database}", experiment_id, ready, durations))
        child.start()
        assert ready.wait(timeout=120)
        time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=30)
        assert child.exitcode in (-signal.SIGKILL, 0)
        assert integrity(database) == ["ok"], f"iteration {i}: corrupt after kill at {delay * 1000:.1f} ms"
        state = snapshot(database)
        if state == before:
            outcomes.append("before")
        elif state == after:
            outcomes.append("after")
        else:
            changed = sorted(t for t in state if state[t] != before[t])
            pytest.fail(
                f"iteration {i}: kill at {delay * 1000:.1f} ms left a state that is neither before nor "
                f"after; tables differing from before: {changed}"
            )
    # Most kills fell while the write transaction was open (by the reference
    # child's timeline; the killed children run the same code on the same data).
    inside = sum(write_begin <= d <= write_commit for d in delays)
    # Shown with -rP / -s: how the kills fell.
    print(
        f"cleanup took {duration * 1000:.1f} ms, write transaction open "
        f"{write_begin * 1000:.1f}-{write_commit * 1000:.1f} ms; kills at "
        f"{[round(d * 1000, 1) for d in delays]} ms ({inside} inside the transaction) "
        f"-> {outcomes.count('before')} before, {outcomes.count('after')} after"
    )
    assert inside >= 1
