"""The main job (examples/demo_job.py) end to end, in real processes, and its signals.

Each test runs the demo as ``./scripts/demo`` would, with ``RF_HOME`` under
tmp_path, and reads what it left in the state database and the MLflow store.
Signals are sent at moments chosen by what the database shows.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from sqlalchemy import text

from rapidfire_state import StateDB
from rapidfire_state.constants import RunStatus, TaskStatus

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo_job.py"

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _state_url(home: Path) -> str:
    return f"sqlite:///{home / 'db' / 'rapidfire_state.db'}"


def _start(home: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "RF_HOME": str(home), "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, str(DEMO), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _query(home: Path, sql: str) -> list[tuple]:
    path = home / "db" / "rapidfire_state.db"
    if not path.exists():
        return []
    try:
        with StateDB(_state_url(home), read_only=True) as db, db.engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(sql)).all()]
    except Exception:  # not created or migrated yet
        return []


def _check_final_state(home: Path, *, interrupted: bool) -> None:
    with StateDB(_state_url(home), read_only=True) as db, db.engine.connect() as conn:
        [experiment] = conn.execute(text("SELECT experiment_id, status, error FROM experiments")).all()
        runs = conn.execute(text("SELECT run_id, status, ended_by, progress, metric_run_id FROM runs")).all()
        open_tasks = conn.execute(text(
            "SELECT COUNT(*) FROM worker_tasks WHERE status IN ('PENDING', 'SCHEDULED', 'IN_PROGRESS')")).scalar()
        open_requests = conn.execute(text(
            "SELECT COUNT(*) FROM controller_tasks WHERE status IN ('PENDING', 'SCHEDULED', 'IN_PROGRESS')")).scalar()
        shm_rows = conn.execute(text("SELECT COUNT(*) FROM shm_objects")).scalar()
        history = conn.execute(text(
            "SELECT entity, entity_id, from_status, to_status FROM state_transitions ORDER BY transition_id")).all()
        pending = conn.execute(text(
            "SELECT COUNT(*) FROM metric_outbox WHERE delivered_at IS NULL AND failed_at IS NULL")).scalar()
    assert open_tasks == 0 and open_requests == 0 and shm_rows == 0
    all_completed = bool(runs) and all(r.status == "COMPLETED" for r in runs)
    if interrupted and not all_completed:
        assert experiment.status == "FAILED" and "interrupted by SIG" in (experiment.error or "")
    else:
        assert experiment.status == "COMPLETED"
    for run in runs:
        assert run.ended_by is not None or run.status == "STOPPED", run  # every run ended, or frozen
        if run.status == "COMPLETED":
            assert run.progress == pytest.approx(1.0)
        if interrupted:
            assert run.status in ("COMPLETED", "KILLED"), run
    # each history chain is consistent: every change starts where the last one ended
    last: dict[tuple, str] = {}
    for entity, entity_id, from_status, to_status in history:
        assert last.get((entity, entity_id)) == from_status, (entity, entity_id, from_status, to_status)
        last[(entity, entity_id)] = to_status
    assert pending == 0
    tracked = [r for r in runs if r.metric_run_id]
    if tracked:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")
        expected = {"COMPLETED": "FINISHED", "KILLED": "KILLED", "STOPPED": "KILLED", "FAILED": "FAILED"}
        for run in tracked:
            assert client.get_run(run.metric_run_id).info.status == expected[run.status], run


def test_the_demo_trains_every_chunk_once_and_ends_truthfully(tmp_path):
    home = tmp_path / "home"
    demo = _start(home, "--runs", "3", "--chunks", "3", "--epochs", "2", "--workers", "2")
    out, err = demo.communicate(timeout=240)
    assert demo.returncode == 0, err[-3000:]
    assert "leaderboard" in out and "mlflow ui --backend-store-uri sqlite:///" in out
    assert "rapidfire-state runs -e 1" in out
    _check_final_state(home, interrupted=False)
    with StateDB(_state_url(home), read_only=True) as db:
        runs = db.list_runs(1)
        assert len(runs) == 4  # three from the grid, one warm clone of the best so far
        [clone] = [r for r in runs if r.cloned_from is not None]
        assert clone.warm_started_from == clone.cloned_from
        stopped_and_resumed = [r for r in runs if [t.to_status for t in db.history("run", r.run_id)].count(RunStatus.ONGOING) == 2]
        assert len(stopped_and_resumed) == 1
        for run in runs:
            tasks = sorted(db.list_tasks("worker", run_id=run.run_id, statuses=[TaskStatus.COMPLETED]),
                           key=lambda t: t.task_id)
            # its own schedule: chunk 0, 1, 2 of epoch 1, then of epoch 2, each exactly once
            assert [t.chunk_id for t in tasks] == [0, 1, 2, 0, 1, 2], (run.run_id, [t.chunk_id for t in tasks])
            assert run.status == RunStatus.COMPLETED and run.num_chunks_visited == 6 and run.num_epochs_completed == 2
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")
    for run in runs:
        history = client.get_metric_history(run.metric_run_id, "val_accuracy")
        assert sorted(int(m.step) for m in history) == [1, 2, 3, 4, 5, 6]
        assert client.get_run(run.metric_run_id).info.run_name == f"run_{run.run_id}"


def _wait_for(home: Path, demo: subprocess.Popen, sql: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert demo.poll() is None, demo.communicate()[1][-3000:]
        rows = _query(home, sql)
        if rows and rows[0][0]:
            return
        time.sleep(0.02)
    pytest.fail(f"the demo never reached: {sql}")


MOMENTS = {
    # the experiment row exists and MLflow is being imported / set up: no run yet
    "mlflow set-up": "SELECT COUNT(*) FROM experiments e WHERE NOT EXISTS (SELECT 1 FROM runs)",
    # runs exist, no worker has registered yet
    "before the workers": "SELECT COUNT(*) FROM runs WHERE status = 'ONGOING' AND NOT EXISTS (SELECT 1 FROM workers)",
    # a worker is training a chunk
    "mid-chunk": "SELECT COUNT(*) FROM worker_tasks WHERE status = 'IN_PROGRESS'",
    # every run has completed; the workers are being stopped, the experiment is still RUNNING
    "every run completed": (
        "SELECT COUNT(*) FROM experiments WHERE status = 'RUNNING' AND EXISTS (SELECT 1 FROM runs) "
        "AND NOT EXISTS (SELECT 1 FROM runs WHERE status != 'COMPLETED')"
    ),
}


@pytest.mark.parametrize(
    "moment, signum",
    [
        ("mlflow set-up", signal.SIGINT),
        ("before the workers", signal.SIGTERM),
        ("mid-chunk", signal.SIGINT),
        ("mid-chunk", signal.SIGTERM),
        ("every run completed", signal.SIGTERM),
    ],
)
def test_a_signal_at_any_moment_tells_the_truth(tmp_path, moment, signum):
    home = tmp_path / "home"
    demo = _start(home, "--runs", "2", "--chunks", "3", "--epochs", "3", "--workers", "2")
    try:
        _wait_for(home, demo, MOMENTS[moment])
        children = {p.pid for p in psutil.Process(demo.pid).children(recursive=True)}
        demo.send_signal(signum)
        out, err = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 128 + signum, (demo.returncode, err[-3000:])
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith(f"interrupted by {signal.Signals(signum).name}"), err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    deadline = time.monotonic() + 5
    while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in children):
        assert time.monotonic() < deadline, f"children still alive: {children}"
        time.sleep(0.1)
    _check_final_state(home, interrupted=True)


def test_a_signal_before_the_experiment_exists(tmp_path):
    home = tmp_path / "home"
    demo = _start(home)
    deadline = time.monotonic() + 60
    while not (home / "db").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    demo.send_signal(signal.SIGINT)
    out, err = demo.communicate(timeout=60)
    assert demo.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("interrupted by SIGINT"), err[-3000:]
    assert "Traceback" not in err
    rows = _query(home, "SELECT status, error FROM experiments")
    assert all(status in ("FAILED", "COMPLETED") for status, _ in rows), rows


def _ic(home: Path, *args: str) -> subprocess.CompletedProcess:
    cli = Path(sys.executable).with_name("rapidfire-state")
    env = {**os.environ, "RF_HOME": str(home), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([str(cli), "ic", *args], capture_output=True, text=True, timeout=120, env=env)


def test_interactive_control_from_a_second_terminal(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("RF_HOME", str(home))  # the demo's payload key signs the runs' configs
    # three epochs, and only one command before the stop: on a loaded machine each command
    # takes a second or more, and run 2 must still be ONGOING when the stop arrives
    demo = _start(home, "--interactive", "--runs", "2", "--chunks", "3", "--epochs", "3", "--workers", "1")
    try:
        _wait_for(home, demo, "SELECT COUNT(*) FROM runs WHERE run_id = 2 AND num_chunks_visited >= 1")
        refused = _ic(home, "resume", "2")  # an ONGOING run cannot be resumed: one line, nothing queued
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused
        assert _query(home, "SELECT COUNT(*) FROM controller_tasks")[0][0] == 0
        stopped = _ic(home, "stop", "2")
        assert stopped.returncode == 0 and "STOPPED" in stopped.stdout, stopped
        assert _ic(home, "clone", "9", "--config", '{"lr": 0.1}').returncode == 2  # no such run
        assert _ic(home, "clone", "1", "--config", "{not json").returncode == 2
        visited_when_stopped = _query(home, "SELECT num_chunks_visited FROM runs WHERE run_id = 2")[0][0]
        cloned = _ic(home, "clone", "1", "--config", '{"lr": 0.1}', "--warm")
        assert cloned.returncode == 0 and "created" in cloned.stdout, cloned
        time.sleep(1)
        assert _query(home, "SELECT num_chunks_visited FROM runs WHERE run_id = 2")[0][0] == visited_when_stopped
        resumed = _ic(home, "resume", "2")
        assert resumed.returncode == 0, resumed
        out, err = demo.communicate(timeout=240)  # ends once every run has ended
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 0, err[-3000:]
    _check_final_state(home, interrupted=False)
    with StateDB(_state_url(home), read_only=True) as db:
        runs = {r.run_id: r for r in db.list_runs(1)}
        assert len(runs) == 3 and runs[3].warm_started_from == 1 and runs[3].config["lr"] == 0.1
        assert all(r.status == RunStatus.COMPLETED for r in runs.values())
        chunks = [t.chunk_id for t in sorted(db.list_tasks("worker", run_id=2, statuses=[TaskStatus.COMPLETED]),
                                             key=lambda t: t.task_id)]
        assert chunks == [0, 1, 2] * 3  # it continued from its own next chunk
