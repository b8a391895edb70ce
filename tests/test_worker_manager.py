"""WorkerManager and run_worker: real spawned processes against a real database.

The task loop is tested in-process first (threads, fast, both backends); the
process tests (``slow``) spawn real workers: the targets they run are in
``tests/worker_targets.py`` so that a fresh interpreter can import them.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import psutil
import pytest

import worker_targets
from rapidfire_state import StateDB
from rapidfire_state.constants import RunStatus, TaskStatus
from rapidfire_state.exceptions import ConfigError, WorkerException
from rapidfire_state import worker_manager as wm
from rapidfire_state.worker_manager import WorkerManager, run_worker


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def gone(pid: int) -> bool:
    """No such process, or only a zombie (PID 1 here may not reap orphans)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def processed_lines(record_dir: Path) -> list[tuple[int, int, int]]:
    path = record_dir / "processed.txt"
    if not path.exists():
        return []
    return [tuple(int(x) for x in line.split()) for line in path.read_text().splitlines()]


def task_status(db: StateDB, task_id: int) -> TaskStatus:
    return db.get_task("worker", task_id).status


@pytest.fixture
def record_dir(tmp_path) -> Path:
    path = tmp_path / "records"
    path.mkdir()
    return path


@pytest.fixture
def sqlite_db(tmp_path):
    """SQLite only: for process behaviour that does not depend on the backend."""
    database = StateDB(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        yield database
    finally:
        database.close()


@pytest.fixture
def sqlite_experiment(sqlite_db, tmp_path):
    record = sqlite_db.create_experiment("wm_exp", str(tmp_path / "experiments"))
    return sqlite_db.transition_experiment(record.experiment_id, "RUNNING")


@pytest.fixture
def managers():
    """Managers made by a test; whatever is still running is terminated afterwards."""
    made: list[WorkerManager] = []
    yield made
    for manager in made:
        manager.terminate_workers()


# --- run_worker in-process -----------------------------------------------------------


def start_loop(db, experiment_id, handler, *, worker_id=0, heartbeat_seconds=0.1, poll_seconds=0.02):
    event = threading.Event()
    result: dict[str, Any] = {}

    def body() -> None:
        try:
            result["processed"] = run_worker(
                worker_id, db, handler, event, experiment_id=experiment_id,
                heartbeat_seconds=heartbeat_seconds, poll_seconds=poll_seconds,
            )
        except BaseException as exc:  # surfaced by the test
            result["error"] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return event, thread, result


def test_run_worker_completes_fails_and_continues(db, experiment, record_dir):
    exp = experiment.experiment_id
    db.register_worker(exp, 0, os.getpid())
    first = db.create_worker_task(exp, None, 0, 0)
    failing = db.create_worker_task(exp, None, 0, 1, config_options={"fail": True})
    last = db.create_worker_task(exp, None, 0, 2)
    other = db.create_worker_task(exp, None, 1, 0)  # another worker's: never claimed here
    handler = lambda task: worker_targets.record_handler(str(record_dir), 0, db, task)  # noqa: E731
    event, thread, result = start_loop(db, exp, handler)

    wait_for(lambda: task_status(db, last.task_id) == TaskStatus.COMPLETED, 10, "the last task")
    event.set()
    thread.join(5)
    assert not thread.is_alive() and "error" not in result
    assert result["processed"] == 3
    assert [t for _, t, _ in processed_lines(record_dir)] == [first.task_id, last.task_id]
    assert task_status(db, first.task_id) == TaskStatus.COMPLETED
    failed = db.get_task("worker", failing.task_id)
    assert failed.status == TaskStatus.FAILED
    assert "Traceback (most recent call last)" in failed.error
    assert f"ValueError: boom in task {failing.task_id}" in failed.error
    assert task_status(db, other.task_id) == TaskStatus.SCHEDULED
    row = db.list_workers(exp)[0]
    assert row.exited_at is not None and row.exit_code == 0


def test_run_worker_heartbeats_while_a_long_handler_runs(db, experiment, record_dir):
    exp = experiment.experiment_id
    db.register_worker(exp, 0, os.getpid())
    task = db.create_worker_task(exp, None, 0, 0, config_options={"check_heartbeat": True, "sleep": 0.8})
    handler = lambda t: worker_targets.record_handler(str(record_dir), 0, db, t)  # noqa: E731
    event, thread, result = start_loop(db, exp, handler, heartbeat_seconds=0.1)
    wait_for(lambda: task_status(db, task.task_id) == TaskStatus.COMPLETED, 10, "the long task")
    event.set()
    thread.join(5)
    before, after = read_json(record_dir / f"heartbeat_{task.task_id}.json")
    assert after > before, "no heartbeat while the handler ran"


def test_run_worker_stops_when_marked_exited(db, experiment):
    exp = experiment.experiment_id
    db.register_worker(exp, 0, os.getpid())
    event, thread, result = start_loop(db, exp, lambda task: None, heartbeat_seconds=0.1)
    time.sleep(0.3)
    db.mark_worker_exited(exp, 0, 9)
    thread.join(5)
    assert not thread.is_alive() and "error" not in result and result["processed"] == 0
    late = db.create_worker_task(exp, None, 0, 0)
    time.sleep(0.2)
    assert task_status(db, late.task_id) == TaskStatus.SCHEDULED
    assert db.list_workers(exp)[0].exit_code == 9  # the loop did not overwrite who stopped it
    # Already marked exited at start: returns at once, claims nothing.
    assert run_worker(0, db, lambda task: None, threading.Event(), experiment_id=exp) == 0
    assert task_status(db, late.task_id) == TaskStatus.SCHEDULED


def test_shutdown_event_lets_the_current_task_finish(db, experiment, record_dir):
    exp = experiment.experiment_id
    db.register_worker(exp, 0, os.getpid())
    long_task = db.create_worker_task(exp, None, 0, 0, config_options={"sleep": 0.6})
    queued = db.create_worker_task(exp, None, 0, 1)
    handler = lambda t: worker_targets.record_handler(str(record_dir), 0, db, t)  # noqa: E731
    event, thread, result = start_loop(db, exp, handler)
    wait_for(lambda: task_status(db, long_task.task_id) == TaskStatus.IN_PROGRESS, 10, "the claim")
    event.set()
    thread.join(5)
    assert result["processed"] == 1
    assert task_status(db, long_task.task_id) == TaskStatus.COMPLETED
    assert task_status(db, queued.task_id) == TaskStatus.SCHEDULED


def test_run_worker_finishes_only_under_its_own_claim(db, db_url, experiment):
    from sqlalchemy import create_engine, text

    exp = experiment.experiment_id
    db.register_worker(exp, 0, os.getpid())
    taken = db.create_worker_task(exp, None, 0, 0)
    kept = db.create_worker_task(exp, None, 0, 1)
    newer = "f" * 32

    def handler(task):
        if task.task_id == taken.task_id:
            # while the handler runs, the task's claim becomes another one's (a newer truth
            # this worker does not know about): its finish must not overwrite it
            engine = create_engine(db_url)
            try:
                with engine.begin() as connection:
                    connection.execute(text("UPDATE worker_tasks SET claim_token = :t WHERE task_id = :i"),
                                       {"t": newer, "i": task.task_id})
            finally:
                engine.dispose()

    event, thread, result = start_loop(db, exp, handler)
    wait_for(lambda: task_status(db, kept.task_id) == TaskStatus.COMPLETED, 10, "the second task")
    event.set()
    thread.join(5)
    assert "error" not in result and result["processed"] == 2
    task = db.get_task("worker", taken.task_id)
    assert task.status is TaskStatus.IN_PROGRESS and task.claim_token == newer and task.ended_at is None
    assert [h.to_status for h in db.history("worker_task", taken.task_id)][-1] is TaskStatus.IN_PROGRESS


def test_a_handler_returns_progress_that_lands_with_the_finish(db, experiment, caplog):
    exp = experiment.experiment_id
    run = db.transition_run(db.create_run(exp, {"lr": 0.1}).run_id, "ONGOING")
    db.register_worker(exp, 0, os.getpid())
    with_progress = db.create_worker_task(exp, run.run_id, 0, 0, config_options={"result": "progress"})
    plain = db.create_worker_task(exp, run.run_id, 0, 1, config_options={"result": "none"})
    odd = db.create_worker_task(exp, run.run_id, 0, 2, config_options={"result": "int"})
    refused = db.create_worker_task(exp, run.run_id, 0, 3, config_options={"result": "bad progress"})
    results = {
        "progress": wm.TaskResult(run_progress={"completed_steps": 40, "num_chunks_visited": 2}),
        "none": None,
        "int": 42,
        "bad progress": wm.TaskResult(run_progress={"bogus": 1}),
    }
    event, thread, result = start_loop(db, exp, lambda task: results[task.config_options["result"]])
    wait_for(lambda: task_status(db, refused.task_id) != TaskStatus.SCHEDULED
             and task_status(db, refused.task_id) != TaskStatus.IN_PROGRESS, 10, "the last task")
    event.set()
    thread.join(5)
    assert "error" not in result and result["processed"] == 4
    assert task_status(db, with_progress.task_id) is TaskStatus.COMPLETED
    assert task_status(db, plain.task_id) is TaskStatus.COMPLETED
    progressed = db.get_run(run.run_id)
    assert (progressed.completed_steps, progressed.num_chunks_visited) == (40, 2)
    failed = db.get_task("worker", odd.task_id)
    assert failed.status is TaskStatus.FAILED
    assert "returned a builtins.int (42)" in failed.error and "TaskResult" in failed.error
    failed = db.get_task("worker", refused.task_id)
    assert failed.status is TaskStatus.FAILED and "run_progress was refused" in failed.error
    assert "'bogus' is not a progress counter" in failed.error
    assert any("returned a builtins.int" in r.getMessage() for r in caplog.records)


def test_task_result_is_a_frozen_record_of_a_mapping():
    import dataclasses

    source = {"completed_steps": 1}
    result = wm.TaskResult(run_progress=source)
    source["completed_steps"] = 2
    assert result.run_progress == {"completed_steps": 1}  # a copy, taken when returned
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.run_progress = {}  # type: ignore[misc]
    assert wm.TaskResult().run_progress is None and "TaskResult" in wm.__all__
    for bad in ([("completed_steps", 1)], 3, "completed_steps"):
        with pytest.raises(ConfigError, match="TaskResult"):
            wm.TaskResult(run_progress=bad)


def test_a_handler_base_exception_fails_the_task_and_propagates(db, experiment):
    exp = experiment.experiment_id
    db.register_worker(exp, 0, os.getpid())
    task = db.create_worker_task(exp, None, 0, 0)

    def interrupted(_task):
        raise KeyboardInterrupt("stop now")

    with pytest.raises(KeyboardInterrupt):
        run_worker(0, db, interrupted, threading.Event(), experiment_id=exp, heartbeat_seconds=0.1)
    failed = db.get_task("worker", task.task_id)
    assert failed.status == TaskStatus.FAILED and "KeyboardInterrupt: stop now" in failed.error
    assert db.list_workers(exp)[0].exited_at is None  # left open: not a clean stop


def test_arguments_are_validated(sqlite_db, sqlite_experiment):
    with pytest.raises(ConfigError, match="num_workers"):
        WorkerManager(0, target=worker_targets.task_worker, db=sqlite_db)
    with pytest.raises(ConfigError, match="cannot be pickled"):
        WorkerManager(1, target=lambda **kw: None, db=sqlite_db)
    with pytest.raises(ConfigError, match="worker_kwargs may not contain db"):
        WorkerManager(1, target=worker_targets.task_worker, db=sqlite_db, worker_kwargs={"db": 1})
    with pytest.raises(ConfigError, match="heartbeat_seconds"):
        WorkerManager(1, target=worker_targets.task_worker, db=sqlite_db, heartbeat_seconds=0)
    with pytest.raises(ConfigError, match="parent_death_signal"):
        WorkerManager(1, target=worker_targets.task_worker, db=sqlite_db, parent_death_signal=999)
    exp = sqlite_experiment.experiment_id
    with pytest.raises(ConfigError, match="handler"):
        run_worker(0, sqlite_db, None, threading.Event(), experiment_id=exp)
    with pytest.raises(ConfigError, match="shutdown_event"):
        run_worker(0, sqlite_db, print, object(), experiment_id=exp)
    with pytest.raises(ConfigError, match="poll_seconds"):
        run_worker(0, sqlite_db, print, threading.Event(), experiment_id=exp, poll_seconds=-1)
    manager = WorkerManager(1, target=worker_targets.task_worker, db=sqlite_db)
    assert manager.get_worker_status() == [] and manager.shutdown_workers() == {}


def test_process_group_helpers_fall_back_on_permission_error(monkeypatch):
    def forbidden(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setpgrp", forbidden)
    created, reason = wm._create_process_group()
    assert created is False and "PermissionError" in reason
    monkeypatch.setattr(os, "getpgid", forbidden)
    pgid, reason = WorkerManager._verify_group(os.getpid(), True, None)
    assert pgid is None and "PermissionError" in reason


def test_verify_group_never_returns_the_callers_own_group():
    # This process was not made a group leader by us: its group is not "its own".
    pgid, reason = WorkerManager._verify_group(os.getpid(), True, None)
    if os.getpgrp() == os.getpid():
        assert pgid is None  # a group leader's group is the controller's: never killed
    else:
        assert pgid is None and "not the worker's own" in reason


# --- real processes --------------------------------------------------------------------


@pytest.mark.slow
def test_spawned_workers_process_tasks_and_shut_down(db, experiment, record_dir, managers):
    exp = experiment.experiment_id
    tasks = {w: [db.create_worker_task(exp, None, w, c) for c in range(3)] for w in (0, 1)}
    failing = db.create_worker_task(exp, None, 1, 3, config_options={"fail": True})
    manager = WorkerManager(
        2, target=worker_targets.task_worker, db=db, heartbeat_seconds=0.5,
        worker_kwargs={"record_dir": str(record_dir)},
    )
    managers.append(manager)
    started = time.monotonic()
    pids = manager.spawn_workers(exp, experiment.name)
    spawn_seconds = time.monotonic() - started
    assert len(pids) == 2 and len(set(pids)) == 2
    rows = db.list_workers(exp)
    assert [(r.worker_id, r.pid) for r in rows] == [(0, pids[0]), (1, pids[1])]
    assert all(r.exited_at is None for r in rows)
    after_failure = db.create_worker_task(exp, None, 1, 4)  # queued behind the failing task

    everything = [t for ts in tasks.values() for t in ts] + [failing, after_failure]
    wait_for(
        lambda: all(task_status(db, t.task_id) in (TaskStatus.COMPLETED, TaskStatus.FAILED) for t in everything),
        30, "all tasks to finish",
    )
    done = processed_lines(record_dir)
    expected = {t.task_id: w for w, ts in tasks.items() for t in ts} | {after_failure.task_id: 1}
    assert sorted(t for _, t, _ in done) == sorted(expected), "each task exactly once"
    for worker_id, task_id, pid in done:
        assert expected[task_id] == worker_id and pid == pids[worker_id]
        assert task_status(db, task_id) == TaskStatus.COMPLETED
    failed = db.get_task("worker", failing.task_id)
    assert failed.status == TaskStatus.FAILED
    assert "Traceback" in failed.error and "ValueError: boom" in failed.error

    status = manager.get_worker_status()
    assert [(s["worker_id"], s["pid"], s["alive"], s["exitcode"]) for s in status] == [
        (0, pids[0], True, None), (1, pids[1], True, None)]
    for s in status:
        assert s["heartbeat_at"] is not None and s["heartbeat_age_seconds"] < 5 and not s["stale"]
        assert s["pgid"] == s["pid"] and s["group_error"] is None  # its own process group
    info = read_json(record_dir / "worker_0.json")
    assert info["pgrp"] == pids[0] and info["ppid"] == os.getpid()
    assert info["experiment_name"] == experiment.name

    started = time.monotonic()
    codes = manager.shutdown_workers(timeout=10)
    shutdown_seconds = time.monotonic() - started
    assert codes == {0: 0, 1: 0}
    assert all(gone(pid) for pid in pids)
    assert all(not p.is_alive() for p in manager.processes)
    assert [(r.exit_code, r.exited_at is not None) for r in db.list_workers(exp)] == [(0, True), (0, True)]
    assert read_json(record_dir / "done_0.json") == {"processed": 3}
    assert read_json(record_dir / "done_1.json") == {"processed": 5}
    assert [(s["alive"], s["exitcode"], s["exit_code"]) for s in manager.get_worker_status()] == [
        (False, 0, 0), (False, 0, 0)]
    assert manager.shutdown_workers() == {0: 0, 1: 0}  # idempotent
    print(f"spawn 2 workers: {spawn_seconds:.2f} s; graceful shutdown: {shutdown_seconds:.2f} s")


@pytest.mark.slow
def test_sigkilled_worker_is_failed_as_stale(db, experiment, record_dir, managers):
    exp = experiment.experiment_id
    run = db.create_run(exp, {"lr": 0.1})
    db.transition_run(run.run_id, RunStatus.ONGOING)
    task = db.create_worker_task(exp, run.run_id, 0, 0, config_options={"sleep": 60})
    manager = WorkerManager(1, target=worker_targets.task_worker, db=db, heartbeat_seconds=0.5,
                            worker_kwargs={"record_dir": str(record_dir)})
    managers.append(manager)
    (pid,) = manager.spawn_workers(exp, experiment.name)
    wait_for(lambda: task_status(db, task.task_id) == TaskStatus.IN_PROGRESS, 30, "the claim")
    assert db.fail_stale_workers(60, experiment_id=exp) == []  # alive and beating: not stale

    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: gone(pid), 5, "the killed worker")
    reports = db.fail_stale_workers(60, experiment_id=exp)
    assert len(reports) == 1
    assert reports[0].failed_task_ids == (task.task_id,) and reports[0].failed_run_ids == (run.run_id,)
    assert f"pid {pid}" in reports[0].reason
    assert task_status(db, task.task_id) == TaskStatus.FAILED
    assert db.get_run(run.run_id).status == RunStatus.FAILED
    assert db.list_workers(exp)[0].exited_at is not None
    assert manager.shutdown_workers(timeout=1) == {0: -signal.SIGKILL}


@pytest.mark.slow
@pytest.mark.parametrize("death_signal", [signal.SIGTERM, None], ids=["pdeathsig", "watchdog-only"])
def test_workers_exit_when_the_controller_is_sigkilled(sqlite_db, sqlite_experiment, record_dir, death_signal):
    ctx = multiprocessing.get_context("spawn")
    controller = ctx.Process(
        target=worker_targets.controller_main,
        args=(sqlite_db.url.render_as_string(hide_password=False), sqlite_experiment.experiment_id,
              str(record_dir), death_signal),
    )
    controller.start()
    try:
        info = wait_for(lambda: read_json(record_dir / "controller.json"), 60, "the controller's workers")
        workers = info["workers"]
        assert len(workers) == 2 and all(not gone(pid) for pid in workers)
        for pid in workers:
            assert psutil.Process(pid).ppid() == controller.pid
        os.kill(controller.pid, signal.SIGKILL)
        killed = time.monotonic()
        controller.join(5)
        wait_for(lambda: all(gone(pid) for pid in workers), 5, "the orphaned workers to exit")
        print(f"workers gone {time.monotonic() - killed:.2f} s after the controller's SIGKILL")
    finally:
        if controller.is_alive():
            controller.kill()
            controller.join()
    # The orphans left their rows open on purpose: fail_stale_workers explains them.
    reports = sqlite_db.fail_stale_workers(60, experiment_id=sqlite_experiment.experiment_id)
    assert sorted(r.worker.pid for r in reports) == sorted(workers)


def forbid_process_groups_here(monkeypatch) -> list[tuple]:
    """Colab in the test process (the parent side): setpgrp/getpgid raise, killpg is recorded."""
    calls: list[tuple] = []

    def forbidden(*args):
        raise PermissionError(1, "Operation not permitted")

    def killpg(*args):
        calls.append(args)
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setpgrp", forbidden)
    monkeypatch.setattr(os, "getpgid", forbidden)
    monkeypatch.setattr(os, "killpg", killpg)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize(
    "groups, stop",
    [("forbidden", "shutdown"), ("forbidden", "terminate"), ("allowed", "shutdown")],
)
def test_stop_kills_workers_and_what_they_started(
    sqlite_db, sqlite_experiment, record_dir, managers, monkeypatch, groups, stop
):
    exp = sqlite_experiment.experiment_id
    target: Any = worker_targets.grandchild_worker
    if groups == "forbidden":
        killpg_calls = forbid_process_groups_here(monkeypatch)
        target = worker_targets.ForbidProcessGroups(target)
    else:
        killpg_calls = []
        real_killpg = os.killpg

        def spy(pgid, sig):
            killpg_calls.append((pgid, sig))
            return real_killpg(pgid, sig)

        monkeypatch.setattr(os, "killpg", spy)
    manager = WorkerManager(2, target=target, db=sqlite_db, worker_kwargs={"record_dir": str(record_dir)})
    managers.append(manager)
    pids = manager.spawn_workers(exp, sqlite_experiment.name)
    infos = [wait_for(lambda w=w: read_json(record_dir / f"worker_{w}.json"), 30, f"worker {w}") for w in (0, 1)]
    grandchildren = [info["grandchild"] for info in infos]
    assert all(not gone(pid) for pid in grandchildren)
    status = manager.get_worker_status()
    if groups == "forbidden":
        for info, s in zip(infos, status):
            assert info["pgrp"] == os.getpgrp(), "the child must have stayed in the controller's group"
            assert s["pgid"] is None and "PermissionError" in s["group_error"]
    else:
        assert [s["pgid"] for s in status] == pids

    codes = manager.shutdown_workers(timeout=5) if stop == "shutdown" else manager.terminate_workers()
    assert codes == ({0: 0, 1: 0} if stop == "shutdown" else {0: -signal.SIGTERM, 1: -signal.SIGTERM})
    wait_for(lambda: all(gone(pid) for pid in pids + grandchildren), 5, "workers and their children")
    assert [r.exit_code for r in sqlite_db.list_workers(exp)] == list(codes.values())
    if groups == "forbidden":
        assert killpg_calls == [], "os.killpg must not be used without a process group"
    else:
        assert sorted(pgid for pgid, _ in killpg_calls) == sorted(pids)


@pytest.mark.slow
def test_terminate_kills_a_worker_that_ignores_sigterm(sqlite_db, sqlite_experiment, record_dir, managers):
    exp = sqlite_experiment.experiment_id
    task = sqlite_db.create_worker_task(exp, None, 0, 0)
    sqlite_db.claim_worker_task(0, experiment_id=exp)  # as if the worker had it in progress
    manager = WorkerManager(1, target=worker_targets.stubborn_worker, db=sqlite_db,
                            worker_kwargs={"record_dir": str(record_dir)})
    managers.append(manager)
    (pid,) = manager.spawn_workers(exp, sqlite_experiment.name)
    wait_for(lambda: read_json(record_dir / "worker_0.json"), 30, "the SIGTERM handler")
    started = time.monotonic()
    assert manager.terminate_workers(term_timeout=0.5) == {0: -signal.SIGKILL}
    elapsed = time.monotonic() - started
    assert gone(pid) and 0.5 <= elapsed < 5
    row = sqlite_db.list_workers(exp)[0]
    assert row.exited_at is not None and row.exit_code == -signal.SIGKILL
    failed = sqlite_db.get_task("worker", task.task_id)
    assert failed.status == TaskStatus.FAILED and f"exited with code {-signal.SIGKILL}" in failed.error


@pytest.mark.slow
def test_shutdown_escalates_from_event_to_sigterm_to_sigkill(sqlite_db, sqlite_experiment, record_dir, managers):
    exp = sqlite_experiment.experiment_id
    manager = WorkerManager(2, target=worker_targets.stubborn_worker, db=sqlite_db,
                            worker_kwargs={"record_dir": str(record_dir), "ignore_sigterm": [0]})
    managers.append(manager)
    manager.spawn_workers(exp, sqlite_experiment.name)
    for w in (0, 1):
        wait_for(lambda w=w: read_json(record_dir / f"worker_{w}.json"), 30, f"worker {w}")
    started = time.monotonic()
    codes = manager.shutdown_workers(timeout=0.5, term_timeout=0.5)
    elapsed = time.monotonic() - started
    assert codes == {0: -signal.SIGKILL, 1: -signal.SIGTERM}
    assert 1.0 <= elapsed < 5
    assert [r.exit_code for r in sqlite_db.list_workers(exp)] == [-signal.SIGKILL, -signal.SIGTERM]


@pytest.mark.slow
def test_spawn_refuses_while_running_and_respawns_after(sqlite_db, sqlite_experiment, record_dir, managers):
    exp = sqlite_experiment.experiment_id
    manager = WorkerManager(1, target=worker_targets.task_worker, db=sqlite_db,
                            worker_kwargs={"record_dir": str(record_dir)})
    managers.append(manager)
    (first,) = manager.spawn_workers(exp, sqlite_experiment.name)
    with pytest.raises(WorkerException, match="still running"):
        manager.spawn_workers(exp, sqlite_experiment.name)
    manager.shutdown_workers()
    (second,) = manager.spawn_workers(exp, sqlite_experiment.name)
    assert second != first
    row = sqlite_db.list_workers(exp)[0]
    assert row.pid == second and row.exited_at is None
    assert manager.shutdown_workers() == {0: 0}


@pytest.mark.slow
def test_a_worker_dying_during_startup_aborts_the_spawn(sqlite_db, sqlite_experiment, record_dir, managers):
    exp = sqlite_experiment.experiment_id
    manager = WorkerManager(2, target=worker_targets.BrokenInChild(worker_targets.task_worker), db=sqlite_db,
                            worker_kwargs={"record_dir": str(record_dir)})
    managers.append(manager)
    with pytest.raises(WorkerException, match=r"worker 1 \(pid \d+\) exited with code 1 during start-up"):
        manager.spawn_workers(exp, sqlite_experiment.name)
    assert all(gone(pid) for pid in manager.pids)
    rows = sqlite_db.list_workers(exp)
    assert [(r.worker_id, r.exited_at is not None) for r in rows] == [(0, True), (1, True)]
    assert rows[1].exit_code == 1 and rows[0].exit_code == -signal.SIGKILL


@pytest.mark.slow
def test_workers_left_running_are_terminated_at_interpreter_exit(sqlite_db, sqlite_experiment, record_dir):
    """A controller that exits without shutdown_workers() must neither hang (non-daemonic
    children are joined at exit) nor leave workers behind."""
    import subprocess
    import sys

    script = record_dir / "controller.py"
    script.write_text(
        "import sys\n"
        "import worker_targets\n"
        "from rapidfire_state import StateDB\n"
        "from rapidfire_state.worker_manager import WorkerManager\n"
        "if __name__ == '__main__':\n"
        "    manager = WorkerManager(1, target=worker_targets.stubborn_worker, db=StateDB(sys.argv[1]),\n"
        "                            worker_kwargs={'record_dir': sys.argv[3], 'ignore_sigterm': False})\n"
        "    print(manager.spawn_workers(int(sys.argv[2]), 'x')[0])\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, str(script), sqlite_db.url.render_as_string(hide_password=False),
         str(sqlite_experiment.experiment_id), str(record_dir)],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout.split()[0])
    assert gone(pid)
    row = sqlite_db.list_workers(sqlite_experiment.experiment_id)[0]
    assert row.pid == pid and row.exit_code == -signal.SIGTERM


# =====================================================================================
# WorkerManager without a target: the default target runs run_worker with the task
# handler the experiment names in config_options["worker_handler"].
# (A separate block: other tests of this module are above.)
# =====================================================================================


def handled_records(record_dir: Path) -> list[dict]:
    path = record_dir / "handled.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def handler_experiment(db: StateDB, tmp_path: Path, record_dir: Path, handler: Any = "worker_targets:context_handler"):
    options: dict[str, Any] = {"record_dir": str(record_dir)}
    if handler is not None:
        options[wm.WORKER_HANDLER_KEY] = handler
    record = db.create_experiment("handler_exp", str(tmp_path / "experiments"), config_options=options, unique=True)
    return record


class _Registry(dict):
    """A registry and lock as in-process threads see them (the spawned tests use a Manager's)."""


def test_manager_without_target_takes_the_spec_signature(sqlite_db):
    manager = WorkerManager(2, None, None, db=sqlite_db)
    assert manager.target is wm.default_worker_target
    assert manager.worker_kwargs == {"heartbeat_seconds": 2.0}
    manager = WorkerManager(2, {}, threading.Lock(), db=sqlite_db, heartbeat_seconds=0.5,
                            worker_kwargs={"handler": "worker_targets:context_handler", "poll_seconds": 0.05})
    assert manager.worker_kwargs == {"handler": "worker_targets:context_handler", "poll_seconds": 0.05,
                                     "heartbeat_seconds": 0.5}
    with pytest.raises(ConfigError, match=r"\['record_dir'\] are not accepted without a target"):
        WorkerManager(1, db=sqlite_db, worker_kwargs={"record_dir": "/x"})
    with pytest.raises(ConfigError, match="is not a handler name"):
        WorkerManager(1, db=sqlite_db, worker_kwargs={"handler": worker_targets.context_handler})
    # refused here, not in each spawned worker (which would exit 1 with its tasks left SCHEDULED)
    for bad in ({"poll_seconds": -1}, {"poll_seconds": 0}, {"heartbeat_seconds": "x"}, {"poll_seconds": True}):
        [(key, value)] = bad.items()
        with pytest.raises(ConfigError, match=re.escape(f"worker_kwargs['{key}']={value!r}")):
            WorkerManager(1, db=sqlite_db, worker_kwargs=bad)


def test_manager_without_target_uses_the_default_database(tmp_path, monkeypatch):
    # WorkerManager(num_workers, registry, lock), exactly as the spec constructs it.
    monkeypatch.setenv("RF_DB_URL", f"sqlite:///{tmp_path / 'default.db'}")
    manager = WorkerManager(4, {}, threading.Lock())
    assert manager.num_workers == 4 and manager.db.sqlite_path == str(tmp_path / "default.db")
    manager.db.close()


@pytest.mark.parametrize(
    "name, hint",
    [
        ("", "is not a task handler name"),
        ("worker_targets", "is not a task handler name"),
        ("worker_targets:context_handler:x", "is not a task handler name"),
        ("worker targets:f", "is not a task handler name"),
        (42, "is not a task handler name"),
        ("no_such_module_for_rf_tests:handler", "cannot import module 'no_such_module_for_rf_tests': ModuleNotFoundError"),
        ("worker_targets:no_such_function", "has no attribute 'no_such_function'"),
        ("worker_targets:NOT_CALLABLE", "is a int, not a callable"),
        ("worker_targets:three_arguments", "accepts neither (task, context) nor (task)"),
        ("rf_broken_handler_module:f", "cannot import module 'rf_broken_handler_module': RuntimeError: broken at import"),
        # a script-like module that parses its command line (or exits) when imported
        ("rf_exiting_handler_module:f", "cannot import module 'rf_exiting_handler_module': SystemExit: 2"),
        ("rf_getattr_handler_module:f", "cannot read 'f' of module 'rf_getattr_handler_module': RuntimeError: no attributes"),
    ],
)
def test_resolve_worker_handler_refuses_clearly(tmp_path, monkeypatch, name, hint):
    (tmp_path / "rf_broken_handler_module.py").write_text("raise RuntimeError('broken at import')\n")
    (tmp_path / "rf_exiting_handler_module.py").write_text("import sys\nsys.exit(2)\n")
    (tmp_path / "rf_getattr_handler_module.py").write_text(
        "def __getattr__(name):\n    raise RuntimeError('no attributes')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as info:
        wm.resolve_worker_handler(name, where="config_options['worker_handler']")
    message = str(info.value)
    assert hint in message and f"config_options['worker_handler']={name!r}" in message


def test_resolve_worker_handler_finds_functions_and_dotted_attributes():
    assert wm.resolve_worker_handler("worker_targets:context_handler") is worker_targets.context_handler
    assert wm.resolve_worker_handler(" worker_targets:HandlerHolder.handle ") is worker_targets.HandlerHolder.handle
    assert wm.resolve_worker_handler("worker_targets:task_only_handler") is worker_targets.task_only_handler


def start_default_target(db, experiment, **kwargs):
    event = threading.Event()
    registry, lock = _Registry(), threading.Lock()
    result: dict[str, Any] = {}

    def body() -> None:
        try:
            wm.default_worker_target(
                worker_id=0, experiment_id=experiment.experiment_id, experiment_name=experiment.name, db=db,
                registry=registry, lock=lock, shutdown_event=event, heartbeat_seconds=0.1, poll_seconds=0.02,
                **kwargs,
            )
        except BaseException as exc:  # surfaced by the test
            result["error"] = exc

    db.register_worker(experiment.experiment_id, 0, os.getpid())
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return event, thread, result, registry


def test_default_target_runs_the_named_handler_in_process(db, tmp_path, record_dir):
    experiment = handler_experiment(db, tmp_path, record_dir)
    ok = db.create_worker_task(experiment.experiment_id, None, 0, 0)
    bad = db.create_worker_task(experiment.experiment_id, None, 0, 1, config_options={"fail": True})
    event, thread, result, registry = start_default_target(db, experiment)
    try:
        wait_for(lambda: all(task_status(db, t.task_id) in (TaskStatus.COMPLETED, TaskStatus.FAILED)
                             for t in (ok, bad)), 20, "both tasks")
    finally:
        event.set()
        thread.join(10)
    assert not thread.is_alive() and "error" not in result
    assert task_status(db, ok.task_id) == TaskStatus.COMPLETED
    failed = db.get_task("worker", bad.task_id)
    assert failed.status == TaskStatus.FAILED and f"ValueError: handler failed task {bad.task_id}" in failed.error
    [record] = handled_records(record_dir)
    assert record["task_id"] == ok.task_id and record["handler_name"] == "worker_targets:context_handler"
    assert registry == {f"task_{ok.task_id}": 0, f"task_{bad.task_id}": 0}


def test_default_target_handler_override_and_task_only_handler(db, tmp_path, record_dir):
    experiment = handler_experiment(db, tmp_path, record_dir, handler="worker_targets:three_arguments")
    task = db.create_worker_task(experiment.experiment_id, None, 0, 0, config_options={"record_dir": str(record_dir)})
    event, thread, result, _ = start_default_target(db, experiment, handler="worker_targets:task_only_handler")
    try:
        wait_for(lambda: task_status(db, task.task_id) == TaskStatus.COMPLETED, 20, "the task")
    finally:
        event.set()
        thread.join(10)
    assert "error" not in result
    assert [r["task_id"] for r in handled_records(record_dir)] == [task.task_id]


@pytest.mark.parametrize(
    "handler, hint",
    [
        (None, "config_options['worker_handler'] of experiment"),
        ("worker_targets:no_such_function", "has no attribute 'no_such_function'"),
    ],
    ids=["missing", "no-such-function"],
)
def test_default_target_with_a_bad_handler_fails_each_task_with_the_reason(db, tmp_path, record_dir, handler, hint, caplog):
    experiment = handler_experiment(db, tmp_path, record_dir, handler=handler)
    tasks = [db.create_worker_task(experiment.experiment_id, None, 0, c) for c in range(2)]
    event, thread, result, _ = start_default_target(db, experiment)
    try:
        wait_for(lambda: all(task_status(db, t.task_id) == TaskStatus.FAILED for t in tasks), 20, "tasks failed")
        late = db.create_worker_task(experiment.experiment_id, None, 0, 9)  # queued after the error: failed too
        wait_for(lambda: task_status(db, late.task_id) == TaskStatus.FAILED, 20, "the late task failed")
    finally:
        event.set()
        thread.join(10)
    assert not thread.is_alive() and "error" not in result  # stopped on request, did not hang
    for task in tasks + [late]:
        error = db.get_task("worker", task.task_id).error
        assert "worker 0 cannot run tasks" in error and hint in error
    assert handled_records(record_dir) == []
    logged = [r.getMessage() for r in caplog.records if r.name == "rapidfire_state.worker_manager"]
    assert any("cannot run tasks" in m and hint in m for m in logged), logged


def test_a_slow_handler_import_keeps_the_worker_heartbeating(db, tmp_path, record_dir, monkeypatch):
    """Importing the handler's module (torch, a model zoo) may take longer than the stale window."""
    (tmp_path / "rf_slow_import_handler.py").write_text(
        "import time\ntime.sleep(1.5)\n\ndef handle(task):\n    return None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    experiment = handler_experiment(db, tmp_path, record_dir, handler="rf_slow_import_handler:handle")
    task = db.create_worker_task(experiment.experiment_id, None, 0, 0)
    event, thread, result, _ = start_default_target(db, experiment)
    try:
        time.sleep(1.0)  # the module is still importing
        assert db.fail_stale_workers(0.5) == []  # the worker beats meanwhile: not stale
        wait_for(lambda: task_status(db, task.task_id) == TaskStatus.COMPLETED, 20, "the task")
    finally:
        event.set()
        thread.join(10)
    assert not thread.is_alive() and "error" not in result


@pytest.mark.slow
def test_spawned_workers_without_target_run_the_handler_the_experiment_names(db, tmp_path, record_dir, managers, monkeypatch):
    monkeypatch.setenv("RF_DB_URL", db.url.render_as_string(hide_password=False))
    experiment = handler_experiment(db, tmp_path, record_dir)
    exp = experiment.experiment_id
    db.transition_experiment(exp, "RUNNING")
    tasks = {w: [db.create_worker_task(exp, None, w, c) for c in range(2)] for w in (0, 1)}
    failing = db.create_worker_task(exp, None, 1, 2, config_options={"fail": True})
    sync = multiprocessing.get_context("spawn").Manager()
    try:
        registry, lock = sync.dict(), sync.Lock()
        manager = WorkerManager(2, registry, lock, heartbeat_seconds=0.5)  # no target, default database
        managers.append(manager)
        pids = manager.spawn_workers(exp, experiment.name)
        everything = [t for ts in tasks.values() for t in ts] + [failing]
        wait_for(lambda: all(task_status(manager.db, t.task_id) in (TaskStatus.COMPLETED, TaskStatus.FAILED)
                             for t in everything), 60, "all tasks to finish")
        records = handled_records(record_dir)
        assert sorted(r["task_id"] for r in records) == sorted(t.task_id for ts in tasks.values() for t in ts)
        for r in records:
            assert r["worker_id"] == r["task_worker"] and r["pid"] == pids[r["worker_id"]] != os.getpid()
            assert (r["experiment_id"], r["experiment_name"]) == (exp, experiment.name)
            assert r["handler_name"] == "worker_targets:context_handler"
            assert task_status(db, r["task_id"]) == TaskStatus.COMPLETED
        failed = db.get_task("worker", failing.task_id)
        assert failed.status == TaskStatus.FAILED and "ValueError: handler failed task" in failed.error
        # The registry and lock the manager was given reached the handler in each worker.
        assert dict(registry) == {f"task_{t.task_id}": w for w, ts in tasks.items() for t in ts} | {
            f"task_{failing.task_id}": 1}
        assert manager.shutdown_workers(timeout=10) == {0: 0, 1: 0}
    finally:
        sync.shutdown()


@pytest.mark.slow
def test_spawned_worker_with_a_missing_handler_reports_it_and_stops_on_request(sqlite_db, tmp_path, record_dir, managers, capfd):
    experiment = handler_experiment(sqlite_db, tmp_path, record_dir, handler=None)
    exp = experiment.experiment_id
    task = sqlite_db.create_worker_task(exp, None, 0, 0)
    manager = WorkerManager(1, db=sqlite_db, heartbeat_seconds=0.5)
    managers.append(manager)
    manager.spawn_workers(exp, experiment.name)
    wait_for(lambda: task_status(sqlite_db, task.task_id) == TaskStatus.FAILED, 60, "the task to fail")
    error = sqlite_db.get_task("worker", task.task_id).error
    assert f"config_options['worker_handler'] of experiment {exp} ('handler_exp') is not set" in error
    assert manager.get_worker_status()[0]["alive"]  # neither dead nor hung: it answers the shutdown
    assert manager.shutdown_workers(timeout=10) == {0: 0}
    assert "worker 0 cannot run tasks" in capfd.readouterr().err  # the worker's log line (stderr)
