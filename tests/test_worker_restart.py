"""A restarted worker strands no task.

Real worker processes run the library's own loop (``run_worker``) and are
SIGKILLed at moments chosen by what the database shows (once the process has a
task IN_PROGRESS); a new process then registers the same worker id — sometimes
after the kill, sometimes while the doomed process still runs — and
``fail_stale_workers`` runs at the end.  Afterwards no task is IN_PROGRESS, no
task was claimed or handled twice, and every task a killed process left is
FAILED with an error naming that process.

The children are forked from the test process (no torch here), so a restart
costs milliseconds, not an interpreter start.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import pytest
from sqlalchemy import text

from rapidfire_state import StateDB
from rapidfire_state.constants import TaskStatus

WORKER_ID = 3
WAIT_SECONDS = 60.0

_fork = multiprocessing.get_context("fork")


def _worker_process(url: str, experiment_id: int, worker_id: int, marker: str, hold: float) -> None:
    """A restarted worker: registers its worker id, then runs the library's loop."""
    from rapidfire_state.worker_manager import run_worker

    db = StateDB(url)
    db.register_worker(experiment_id, worker_id, os.getpid())

    def handler(task: Any) -> None:
        fd = os.open(marker, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{task.task_id} {os.getpid()}\n".encode())  # one write: lines never interleave
        finally:
            os.close(fd)
        # the test flags the process it is about to kill: its next task stays in
        # progress, and says so, so the kill lands while the database shows it
        flag = _hold_flag(marker, os.getpid())
        if os.path.exists(flag):
            Path(flag + ".tmp").write_text(str(task.task_id))
            os.replace(flag + ".tmp", flag + ".held")
            time.sleep(WAIT_SECONDS)
        time.sleep(hold)

    run_worker(worker_id, db, handler, threading.Event(), experiment_id=experiment_id,
               heartbeat_seconds=0.5, poll_seconds=0.01)


def _hold_flag(marker: Any, pid: int) -> str:
    return f"{marker}.hold.{pid}"


def _claims_of(db: StateDB, pid: int) -> tuple[int, int]:
    """(tasks this pid claimed, of which still IN_PROGRESS), from the history the claims wrote."""
    with db.engine.connect() as connection:
        row = connection.execute(
            text(
                "SELECT COUNT(*), COALESCE(SUM(CASE WHEN t.status = 'IN_PROGRESS' THEN 1 ELSE 0 END), 0) "
                "FROM state_transitions h JOIN worker_tasks t ON t.task_id = h.entity_id "
                "WHERE h.entity = 'worker_task' AND h.to_status = 'IN_PROGRESS' AND h.pid = :pid"
            ),
            {"pid": pid},
        ).one()
    return int(row[0]), int(row[1])


def _registered_pid(db: StateDB, experiment_id: int, worker_id: int) -> Optional[int]:
    rows = [w for w in db.list_workers(experiment_id) if w.worker_id == worker_id]
    return rows[0].pid if rows else None


def _wait(condition, what: str, process: Any = None) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if process is not None and process.exitcode is not None:
            raise AssertionError(f"{what}: the worker process exited with {process.exitcode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting: {what}")
        time.sleep(0.003)


def _start(url: str, experiment_id: int, marker: Path, hold: float, db: StateDB) -> Any:
    process = _fork.Process(target=_worker_process, args=(url, experiment_id, WORKER_ID, str(marker), hold))
    process.start()
    _wait(lambda: _registered_pid(db, experiment_id, WORKER_ID) == process.pid,
          f"pid {process.pid} registered", process)
    return process


def _kill(process: Any) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.join(timeout=WAIT_SECONDS)
    assert process.exitcode == -signal.SIGKILL


def kill_restart_loop(db: StateDB, url: str, experiment_id: int, tmp_path: Path, *, kills: int, tasks: int,
                      hold: float = 0.02) -> dict:
    """Kill a worker with a task IN_PROGRESS ``kills`` times, restarting it each time; then fail-stale.

    Even rounds restart after the kill; odd rounds register the successor while
    the doomed process still runs (its tasks can then only be judged by their
    own claim).  The last successor is an idle process registered before the
    last kill, so the final ``fail_stale_workers`` finds a live row.
    """
    marker = tmp_path / "handled.txt"
    task_ids = [
        db.create_worker_task(experiment_id, None, WORKER_ID, chunk).task_id for chunk in range(tasks)
    ]
    killed: list[int] = []
    sleeper = None
    current = _start(url, experiment_id, marker, hold, db)
    try:
        for round_ in range(kills):
            pid = current.pid
            # let it finish a task or two first, then hold the next one until the kill
            _wait(lambda: _claims_of(db, pid)[0] >= round_ % 3, f"pid {pid} claiming", current)
            flag = Path(_hold_flag(marker, pid))
            flag.touch()
            held = Path(f"{flag}.held")
            _wait(held.exists, f"pid {pid} holding a task", current)
            held_task = int(held.read_text())
            assert db.get_task("worker", held_task).status is TaskStatus.IN_PROGRESS
            last = round_ == kills - 1
            if last:
                # the last successor: a live process that claims nothing
                sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
                db.register_worker(experiment_id, WORKER_ID, sleeper.pid)
                _kill(current)
            elif round_ % 2:
                successor = _start(url, experiment_id, marker, hold, db)
                _kill(current)
                current = successor
            else:
                _kill(current)
                current = _start(url, experiment_id, marker, hold, db)
            killed.append(pid)
        reports = db.fail_stale_workers(60, experiment_id=experiment_id)
        final_row = [w for w in db.list_workers(experiment_id) if w.worker_id == WORKER_ID][0]
        result = {
            "task_ids": task_ids,
            "tasks": {t.task_id: t for t in db.list_tasks("worker", experiment_id=experiment_id)},
            "killed": killed,
            "reports": reports,
            "final_row": final_row,
            "sleeper_pid": sleeper.pid,
            "handled": Counter(int(line.split()[0]) for line in marker.read_text().splitlines()),
        }
        with db.engine.connect() as connection:
            result["claims"] = Counter(
                row[0] for row in connection.execute(text(
                    "SELECT entity_id FROM state_transitions WHERE entity = 'worker_task' "
                    "AND to_status = 'IN_PROGRESS'"
                ))
            )
        return result
    finally:
        if current.exitcode is None:
            os.kill(current.pid, signal.SIGKILL)
            current.join(timeout=WAIT_SECONDS)
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait(timeout=WAIT_SECONDS)


def check_nothing_stranded(result: dict) -> dict[str, int]:
    tasks = result["tasks"]
    in_progress = [t.task_id for t in tasks.values() if t.status is TaskStatus.IN_PROGRESS]
    assert in_progress == [], f"{len(in_progress)} of {len(tasks)} tasks stranded IN_PROGRESS: {in_progress}"
    twice = {t: n for t, n in result["claims"].items() if n > 1}
    assert twice == {}, f"claimed more than once: {twice}"
    handled_twice = {t: n for t, n in result["handled"].items() if n > 1}
    assert handled_twice == {}, f"handled more than once: {handled_twice}"
    killed = set(result["killed"])
    completed = failed = 0
    for task in tasks.values():
        if task.status is TaskStatus.COMPLETED:
            completed += 1
            assert result["handled"][task.task_id] == 1  # its handler ran, once
        elif task.status is TaskStatus.FAILED:
            failed += 1
            # failed because its claimer died: the error names the killed process
            assert task.claim_pid in killed, (task.task_id, task.claim_pid, task.error)
            assert f"pid {task.claim_pid}" in task.error, task.error
    # every killed process had exactly one task in progress when it was killed
    assert failed == len(killed) and completed >= 1
    # the live successor was not failed with its predecessors
    row = result["final_row"]
    assert row.pid == result["sleeper_pid"] and row.exited_at is None
    return {"completed": completed, "failed": failed}


def test_kill_restart_fail_stale_strands_no_task(db, db_url, experiment, tmp_path):
    result = kill_restart_loop(db, db_url, experiment.experiment_id, tmp_path, kills=12, tasks=60)
    counts = check_nothing_stranded(result)
    # the last kill happened after the successor registered: only fail-stale could
    # fail that process's task, by the task's own claim
    last = result["killed"][-1]
    per_claim = [r for r in result["reports"] if r.claim_pid == last]
    assert per_claim and per_claim[0].worker.pid == result["sleeper_pid"]
    assert f"pid {last}" in per_claim[0].reason


@pytest.mark.slow
def test_kill_restart_loop_500_tasks(db, db_url, experiment, tmp_path):
    # the measure: 500 tasks through a kill/restart loop (32 stranded on SQLite before)
    result = kill_restart_loop(db, db_url, experiment.experiment_id, tmp_path, kills=60, tasks=500, hold=0.005)
    check_nothing_stranded(result)
