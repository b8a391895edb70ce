"""Host-aware liveness (``rapidfire_state/db/store/workers.py``), with real processes.

A worker's host is ``$RF_HOST`` (else the system's name).  Pids are judged only
for this host; a worker of another host falls when its heartbeat (database
clock) is older than the grace.  ``lost_runs`` says what becomes of the lost
tasks' runs, and a late finish (with ``run_progress``) of a worker declared dead
is refused by its claim token and writes nothing.

A subprocess with ``RF_HOST`` set stands for a worker of another host; SIGSTOP
stands for a host that stops answering (partitioned, frozen), SIGCONT for its
return.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from sqlalchemy import create_engine, select, text

from rapidfire_state import StateDB
from rapidfire_state.constants import RunStatus, TaskStatus
from rapidfire_state.db import Base
from rapidfire_state.db.store.processes import HOST
from rapidfire_state.exceptions import ConfigError, InvalidTransitionError, WorkerException

OTHER_HOST = "rf-partitioned-host-b"

#: a worker process: ``mode`` "run" runs run_worker with a handler that waits for
#: ``go_file`` and returns a TaskResult with progress; "claim" registers, claims one
#: task and exits (its pid is then dead)
WORKER_SCRIPT = r"""
import logging, os, sys, threading, time
from pathlib import Path
from rapidfire_state import StateDB
from rapidfire_state.worker_manager import TaskResult, run_worker

logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
mode, url, experiment_id, worker_id, go_file, out_file = sys.argv[1:]
experiment_id, worker_id = int(experiment_id), int(worker_id)
db = StateDB(url)
db.register_worker(experiment_id, worker_id, os.getpid())
if mode == "claim":
    task = db.claim_worker_task(worker_id, experiment_id=experiment_id)
    Path(out_file).write_text(str(task.task_id))
    sys.exit(0)

def handler(task):
    Path(out_file + ".claimed").write_text(str(task.task_id))
    while not os.path.exists(go_file):
        time.sleep(0.02)
    return TaskResult(run_progress={"completed_steps": 77, "num_chunks_visited": 3})

processed = run_worker(worker_id, db, handler, threading.Event(), experiment_id=experiment_id,
                       heartbeat_seconds=0.2, poll_seconds=0.05)
Path(out_file).write_text(str(processed))
"""


def start_worker(mode: str, url: str, experiment_id: int, worker_id: int, tmp_path: Path, *, host: str | None):
    env = dict(os.environ)
    env.pop("RF_HOST", None)
    if host is not None:
        env["RF_HOST"] = host
    go_file, out_file = tmp_path / f"go_{worker_id}", tmp_path / f"out_{worker_id}"
    process = subprocess.Popen(
        [sys.executable, "-c", WORKER_SCRIPT, mode, url, str(experiment_id), str(worker_id), str(go_file), str(out_file)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    return process, go_file, out_file


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def snapshot(db: StateDB) -> dict[str, list[tuple]]:
    with db.session() as session:
        return {
            table.name: [tuple(r) for r in session.execute(select(table).order_by(*table.primary_key.columns))]
            for table in Base.metadata.sorted_tables
        }


def chain(db: StateDB, entity: str, entity_id: int) -> list[tuple]:
    return [
        (None if h.from_status is None else h.from_status.value, h.to_status.value)
        for h in db.history(entity, entity_id)
    ]


def ongoing_run(db: StateDB, experiment_id: int):
    run = db.create_run(experiment_id, {"lr": 0.1})
    return db.transition_run(run.run_id, "ONGOING")


def heartbeat_age(db: StateDB, experiment_id: int, worker_id: int) -> float:
    [row] = [w for w in db.list_workers(experiment_id) if w.worker_id == worker_id]
    return (db.now() - row.heartbeat_at).total_seconds()


def holds_no_transaction(db: StateDB, db_url: str) -> bool:
    """No other connection of the test database is inside a transaction (the stopped worker holds no lock)."""
    if db.is_sqlite:
        connection = sqlite3.connect(db.sqlite_path, timeout=0)
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("ROLLBACK")
            return True
        except sqlite3.OperationalError:
            return False
        finally:
            connection.close()
    engine = create_engine(db_url)
    try:
        with engine.connect() as connection:
            busy = connection.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid() AND state IS NOT NULL AND state <> 'idle'"
            )).scalar_one()
    finally:
        engine.dispose()
    return busy == 0


def freeze(process: subprocess.Popen, db: StateDB, db_url: str) -> None:
    """SIGSTOP the worker at a moment it is outside any transaction (a lock held by a frozen
    process would stall everyone; that is not what a partition test is about)."""
    for _ in range(200):
        os.kill(process.pid, signal.SIGSTOP)
        if holds_no_transaction(db, db_url):
            return
        os.kill(process.pid, signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError("the worker was always inside a transaction when stopped")


# --- a partitioned host comes back: its late finish is refused ---------------------------------


def test_a_partitioned_hosts_late_finish_is_refused_and_its_run_released(db, db_url, experiment, tmp_path):
    e = experiment.experiment_id
    run = ongoing_run(db, e)
    task = db.create_worker_task(e, run.run_id, 1, 0)
    worker, go_file, out_file = start_worker("run", db_url, e, 1, tmp_path, host=OTHER_HOST)
    stopped = False
    try:
        # the moment is chosen by what the database shows: the task is claimed by the remote worker
        wait_for(lambda: db.get_task("worker", task.task_id).status is TaskStatus.IN_PROGRESS, "the claim")
        claimed = db.get_task("worker", task.task_id)
        assert (claimed.claim_host, claimed.claim_pid) == (OTHER_HOST, worker.pid) and OTHER_HOST != HOST
        [row] = db.list_workers(e)
        assert row.host == OTHER_HOST
        freeze(worker, db, db_url)
        stopped = True
        # its heartbeat is fresh: not failed, whatever its pid may mean here
        assert db.fail_stale_workers(30, lost_runs="release") == []
        wait_for(lambda: heartbeat_age(db, e, 1) > 1.0, "the frozen worker's heartbeat to age")
        [report] = db.fail_stale_workers(1.0, lost_runs="release")
        assert report.worker.worker_id == 1 and report.worker.host == OTHER_HOST and not report.worker.alive
        assert report.failed_task_ids == (task.task_id,)
        assert report.failed_run_ids == () and report.released_run_ids == (run.run_id,)
        assert "worker 1" in report.reason and OTHER_HOST in report.reason and "heartbeat" in report.reason
        assert "rescheduled" in report.reason
        failed = db.get_task("worker", task.task_id)
        assert failed.status is TaskStatus.FAILED and failed.error == report.reason
        kept = db.get_run(run.run_id)
        assert kept.status is RunStatus.ONGOING and kept.completed_steps == 0 and kept.num_chunks_visited == 0
        declared_dead = snapshot(db)

        # the host comes back: the handler returns, the finish (with progress) is refused
        go_file.write_text("go")
        os.kill(worker.pid, signal.SIGCONT)
        stopped = False
        _, stderr = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            if stopped:
                os.kill(worker.pid, signal.SIGCONT)
            worker.kill()
            worker.wait(30)
    assert worker.returncode == 0, stderr
    assert out_file.read_text() == "1"  # it processed its one task, then stopped: its heartbeat was revoked
    assert f"could not finish task {task.task_id}" in stderr and "stops" in stderr
    assert snapshot(db) == declared_dead  # the late finish wrote nothing: not the task, not the run
    assert db.get_run(run.run_id).completed_steps == 0
    assert chain(db, "worker_task", task.task_id) == [
        (None, "SCHEDULED"), ("SCHEDULED", "IN_PROGRESS"), ("IN_PROGRESS", "FAILED"),
    ]
    with pytest.raises(WorkerException):
        db.heartbeat(e, 1)


# --- by pid here, by heartbeat elsewhere -------------------------------------------------------


def test_a_local_worker_killed_with_a_fresh_heartbeat_is_failed_at_once(db, db_url, experiment, tmp_path):
    e = experiment.experiment_id
    run = ongoing_run(db, e)
    task = db.create_worker_task(e, run.run_id, 2, 0)
    worker, _, out_file = start_worker("run", db_url, e, 2, tmp_path, host=None)
    try:
        wait_for(lambda: Path(f"{out_file}.claimed").exists(), "the local worker's claim")
        assert db.get_task("worker", task.task_id).claim_host == HOST
        assert db.fail_stale_workers(60) == []  # alive: nothing to do
    finally:
        worker.kill()
        worker.wait(30)
    assert heartbeat_age(db, e, 2) < 60
    [report] = db.fail_stale_workers(60)  # its heartbeat is fresh, but its pid is gone from this host
    assert report.failed_task_ids == (task.task_id,) and report.failed_run_ids == (run.run_id,)
    assert report.released_run_ids == ()
    assert f"pid {worker.pid} on {HOST}" in report.reason and "exited" in report.reason
    assert db.get_run(run.run_id).status is RunStatus.FAILED


def test_a_foreign_workers_dead_pid_is_not_judged_here_only_its_heartbeat(db, db_url, experiment, tmp_path):
    e = experiment.experiment_id
    run = ongoing_run(db, e)
    task = db.create_worker_task(e, run.run_id, 3, 0)
    worker, _, out_file = start_worker("claim", db_url, e, 3, tmp_path, host=OTHER_HOST)
    _, stderr = worker.communicate(timeout=60)
    assert worker.returncode == 0, stderr
    assert out_file.read_text() == str(task.task_id)
    claimed = db.get_task("worker", task.task_id)
    assert (claimed.claim_host, claimed.claim_pid) == (OTHER_HOST, worker.pid)  # a pid dead here
    before = snapshot(db)
    assert db.fail_stale_workers(60) == []
    assert snapshot(db) == before
    db.register_worker(e, 4, os.getpid())  # a live bystander of this host, beating
    wait_for(lambda: heartbeat_age(db, e, 3) > 0.5, "the foreign worker's heartbeat to age")
    db.heartbeat(e, 4)
    [report] = db.fail_stale_workers(0.5)
    assert report.worker.worker_id == 3 and report.failed_task_ids == (task.task_id,)
    assert OTHER_HOST in report.reason and "heartbeat" in report.reason
    assert db.get_run(run.run_id).status is RunStatus.FAILED
    assert [w.worker_id for w in db.list_workers(e, alive_only=True)] == [4]


# --- lost_runs ------------------------------------------------------------------------------------


def test_release_leaves_live_runs_to_be_rescheduled_and_keeps_ended_ones(db, db_url, experiment, tmp_path):
    e = experiment.experiment_id
    live, done = ongoing_run(db, e), ongoing_run(db, e)
    first = db.create_worker_task(e, live.run_id, 5, 0)
    second = db.create_worker_task(e, done.run_id, 6, 0)
    third = db.create_worker_task(e, live.run_id, 7, 0)
    for worker_id, expected in ((5, first), (6, second), (7, third)):
        worker, _, out_file = start_worker("claim", db_url, e, worker_id, tmp_path, host=None)
        worker.communicate(timeout=60)
        assert out_file.read_text() == str(expected.task_id)
    db.transition_run(done.run_id, "COMPLETED")
    runs_history = {r: chain(db, "run", r) for r in (live.run_id, done.run_id)}
    # three workers of this host whose processes are gone
    reports = db.fail_stale_workers(60, lost_runs="release")
    assert sorted(t for r in reports for t in r.failed_task_ids) == [first.task_id, second.task_id, third.task_id]
    assert all(r.failed_run_ids == () for r in reports)
    assert sorted({run_id for r in reports for run_id in r.released_run_ids}) == [live.run_id]
    assert db.get_run(live.run_id).status is RunStatus.ONGOING
    assert db.get_run(done.run_id).status is RunStatus.COMPLETED
    assert {r: chain(db, "run", r) for r in runs_history} == runs_history  # no run was written
    for task in (first, second, third):
        failed = db.get_task("worker", task.task_id)
        assert failed.status is TaskStatus.FAILED and "rescheduled" in failed.error


def test_release_also_fails_what_was_still_queued_for_the_lost_worker(db, db_url, experiment, tmp_path):
    e = experiment.experiment_id
    claimed_run, queued_run, pending_run, other_run = (ongoing_run(db, e) for _ in range(4))
    claimed = db.create_worker_task(e, claimed_run.run_id, 8, 0)
    worker, _, out_file = start_worker("claim", db_url, e, 8, tmp_path, host=OTHER_HOST)
    worker.communicate(timeout=60)
    assert out_file.read_text() == str(claimed.task_id)
    queued = db.create_worker_task(e, queued_run.run_id, 8, 1)
    pending = db.create_worker_task(e, pending_run.run_id, 8, 2, status="PENDING")
    elsewhere = db.create_worker_task(e, other_run.run_id, 9, 0)  # another worker's queue: untouched
    wait_for(lambda: heartbeat_age(db, e, 8) > 0.5, "the foreign worker's heartbeat to age")
    [report] = db.fail_stale_workers(0.5, experiment_id=e, lost_runs="release")
    assert report.failed_task_ids == (claimed.task_id, queued.task_id, pending.task_id)
    assert report.released_run_ids == (claimed_run.run_id, queued_run.run_id, pending_run.run_id)
    assert report.failed_run_ids == ()
    for task, start in ((queued, "SCHEDULED"), (pending, "PENDING")):
        failed = db.get_task("worker", task.task_id)
        assert failed.status is TaskStatus.FAILED and "before it claimed this task" in failed.error
        assert [row[:2] for row in chain(db, "worker_task", task.task_id)] == [(None, start), (start, "FAILED")]
    assert db.get_task("worker", elsewhere.task_id).status is TaskStatus.SCHEDULED
    assert all(db.get_run(r.run_id).status is RunStatus.ONGOING for r in (claimed_run, queued_run, pending_run))
    # with "fail" (the default) a lost worker's queue is left as it was: a restarted worker claims it
    run = ongoing_run(db, e)
    kept = db.create_worker_task(e, run.run_id, 10, 0)
    db.register_worker(e, 10, 4242, host=OTHER_HOST)
    wait_for(lambda: heartbeat_age(db, e, 10) > 0.5, "the second foreign worker's heartbeat to age")
    [report] = db.fail_stale_workers(0.5, experiment_id=e)
    assert report.worker.worker_id == 10 and report.worker.exited_at is not None and report.failed_task_ids == ()
    assert db.get_task("worker", kept.task_id).status is TaskStatus.SCHEDULED


def test_register_worker_can_release_a_dead_predecessors_runs(db, db_url, experiment, tmp_path):
    e = experiment.experiment_id
    run = ongoing_run(db, e)
    task = db.create_worker_task(e, run.run_id, 6, 0)
    worker, _, _ = start_worker("claim", db_url, e, 6, tmp_path, host=None)
    worker.communicate(timeout=60)
    db.register_worker(e, 6, os.getpid(), lost_runs="release")
    failed = db.get_task("worker", task.task_id)
    assert failed.status is TaskStatus.FAILED and "registered again" in failed.error
    assert db.get_run(run.run_id).status is RunStatus.ONGOING


def test_a_bad_lost_runs_is_refused_and_changes_nothing(db, experiment):
    from rapidfire_state.worker_manager import WorkerManager

    e = experiment.experiment_id
    db.register_worker(e, 1, os.getpid())
    before = snapshot(db)
    for bad in ("FAIL", "requeue", "", None, 1, ("fail",)):
        with pytest.raises(ConfigError, match="lost_runs") as info:
            db.fail_stale_workers(0, lost_runs=bad)
        assert repr(bad) in str(info.value) and "'fail'" in str(info.value) and "'release'" in str(info.value)
        with pytest.raises(ConfigError, match="lost_runs"):
            db.register_worker(e, 1, os.getpid(), lost_runs=bad)
    with pytest.raises(ConfigError, match="lost_runs"):
        WorkerManager(1, db=db, target=print).fail_stale_workers(0, lost_runs="requeue")
    assert snapshot(db) == before


# --- progress that lands with the finish ------------------------------------------------------------


def test_run_progress_is_applied_with_the_finish(db, experiment):
    e = experiment.experiment_id
    run = ongoing_run(db, e)
    task = db.create_worker_task(e, run.run_id, 1, 0)
    claim = db.claim_worker_task(1)
    done = db.finish_worker_task(
        task.task_id, claim_token=claim.claim_token, run_progress={"completed_steps": 12, "progress": 0.5}
    )
    assert done.status is TaskStatus.COMPLETED
    after = db.get_run(run.run_id)
    assert (after.completed_steps, after.progress, after.status) == (12, 0.5, RunStatus.ONGOING)
    # a repeat of the recorded finish is the idempotent no-op: its progress is not applied again
    db.update_run_progress(run.run_id, completed_steps=20)
    repeat = db.finish_worker_task(task.task_id, claim_token=claim.claim_token, run_progress={"completed_steps": 12})
    assert repeat.status is TaskStatus.COMPLETED and db.get_run(run.run_id).completed_steps == 20
    # with a failed finish too
    other = db.create_worker_task(e, run.run_id, 1, 1)
    claim = db.claim_worker_task(1)
    db.finish_worker_task(other.task_id, ok=False, error="oom", claim_token=claim.claim_token,
                          run_progress={"num_chunks_visited": 4})
    assert db.get_run(run.run_id).num_chunks_visited == 4


def test_a_refused_finish_leaves_the_runs_counters(db, experiment):
    e = experiment.experiment_id
    run = ongoing_run(db, e)
    task = db.create_worker_task(e, run.run_id, 1, 0)
    db.register_worker(e, 1, os.getpid())
    claim = db.claim_worker_task(1)
    before = snapshot(db)
    with pytest.raises(InvalidTransitionError, match="claim token"):
        db.finish_worker_task(task.task_id, claim_token="0" * 32, run_progress={"completed_steps": 5})
    assert snapshot(db) == before
    wait_for(lambda: heartbeat_age(db, e, 1) > 0.2, "the heartbeat to age")
    [report] = db.fail_stale_workers(0.2, lost_runs="release")
    assert report.released_run_ids == (run.run_id,)
    failed = snapshot(db)
    with pytest.raises(InvalidTransitionError):
        db.finish_worker_task(task.task_id, claim_token=claim.claim_token, run_progress={"completed_steps": 5})
    assert snapshot(db) == failed and db.get_run(run.run_id).completed_steps == 0


def test_bad_run_progress_is_refused_and_the_task_stays_in_progress(db, experiment):
    e = experiment.experiment_id
    run = ongoing_run(db, e)
    task = db.create_worker_task(e, run.run_id, 1, 0)
    claim = db.claim_worker_task(1)
    before = snapshot(db)
    for bad in ({"bogus": 1}, {"status": "COMPLETED"}, {"completed_steps": -1}, {"progress": float("nan")},
                {"completed_steps": "3"}, {"required_workers": 0}):
        with pytest.raises(ConfigError) as expected:
            db.update_run_progress(run.run_id, **bad)
        with pytest.raises(ConfigError) as refused:
            db.finish_worker_task(task.task_id, claim_token=claim.claim_token, run_progress=bad)
        assert str(refused.value) == str(expected.value)  # the same check, the same message
    with pytest.raises(ConfigError, match="run_progress needs at least one of"):
        db.finish_worker_task(task.task_id, claim_token=claim.claim_token, run_progress={})
    for not_a_mapping in ([("completed_steps", 1)], 5, "completed_steps"):
        with pytest.raises(ConfigError, match="run_progress=") as info:
            db.finish_worker_task(task.task_id, claim_token=claim.claim_token, run_progress=not_a_mapping)
        assert repr(not_a_mapping) in str(info.value)
    # a task without a run has no counters to set: refused inside the unit, rolled back
    runless = db.create_worker_task(e, None, 2, 0)
    runless_claim = db.claim_worker_task(2)
    before = snapshot(db)
    with pytest.raises(ConfigError, match="has no run"):
        db.finish_worker_task(runless.task_id, claim_token=runless_claim.claim_token, run_progress={"progress": 1.0})
    assert snapshot(db) == before
    assert db.get_task("worker", task.task_id).status is TaskStatus.IN_PROGRESS
    assert db.get_task("worker", runless.task_id).status is TaskStatus.IN_PROGRESS


# --- RF_HOST --------------------------------------------------------------------------------------


def _python(code: str, host: Any) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("RF_HOST", None)
    if host is not None:
        env["RF_HOST"] = host
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_rf_host_names_this_process_in_every_record(tmp_path):
    code = f"""
import os
from rapidfire_state import StateDB
from rapidfire_state.experiment_utils import ExperimentUtils
from rapidfire_state.shm_manager.files import host_component
db = StateDB({f"sqlite:///{tmp_path / 'host.db'}"!r})
e = db.create_experiment("h", {str(tmp_path)!r}).experiment_id
db.transition_experiment(e, "RUNNING")
worker = db.register_worker(e, 0, os.getpid())
task = db.create_worker_task(e, None, 0, 0)
claim = db.claim_worker_task(0)
hosts = {{h.host for h in db.history("worker_task", task.task_id)}}
print(worker.host, claim.claim_host, ",".join(sorted(hosts)), ExperimentUtils(db)._host, host_component())
"""
    result = _python(code, "node-7.example")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["node-7.example"] * 4 + ["node-7_example"]


@pytest.mark.parametrize("bad", ["", "   ", "two words", "tab\there", "new\nline", "bell\x07", "x" * 256])
def test_a_bad_rf_host_is_refused_at_import(bad):
    result = _python("import rapidfire_state.db", bad)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("rapidfire_state.exceptions.ConfigError: RF_HOST=")
    assert repr(bad[:40]) in last and "allowed: 1-255 characters" in last and "whitespace" in last


@pytest.mark.parametrize("bad", ["", "   ", "two words", "new\nline", "x" * 256, 7, b"node"])
def test_a_bad_host_given_to_register_worker_is_refused_and_nothing_is_written(db, experiment, bad):
    e = experiment.experiment_id
    before = db.register_worker(e, 1, os.getpid())
    with pytest.raises(ConfigError, match=r"host=.*(allowed: 1-255 characters|not a host name)"):
        db.register_worker(e, 1, 4242, host=bad)
    assert db.list_workers(e) == [before]


def test_rf_host_unset_is_the_system_name_and_255_characters_are_allowed():
    import socket

    result = _python("from rapidfire_state.db.store.processes import HOST; print(HOST)", None)
    assert result.returncode == 0 and result.stdout.strip() == socket.gethostname()
    longest = "h" * 255
    result = _python("from rapidfire_state.db.store.processes import HOST; print(HOST)", longest)
    assert result.returncode == 0 and result.stdout.strip() == longest


def test_fail_stale_command_can_release_the_runs(db, db_url, experiment, tmp_path, capsys):
    from rapidfire_state.cli import main

    e = experiment.experiment_id
    run = ongoing_run(db, e)
    task = db.create_worker_task(e, run.run_id, 1, 0)
    worker, _, _ = start_worker("claim", db_url, e, 1, tmp_path, host=None)
    worker.communicate(timeout=60)
    before = snapshot(db)
    try:
        code = main(["--url", db_url, "fail-stale", "--lost-runs", "requeue"])
    except SystemExit as exc:
        code = exc.code
    assert code == 2 and "requeue" in capsys.readouterr().err
    assert snapshot(db) == before
    assert main(["--url", db_url, "fail-stale", "--lost-runs", "release"]) == 0
    out = capsys.readouterr().out
    assert f"tasks failed [{task.task_id}], runs failed [], runs released [{run.run_id}]" in out
    assert db.get_run(run.run_id).status is RunStatus.ONGOING
