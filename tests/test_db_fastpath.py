"""The prepared compare-and-set path on SQLite gives exactly what the general path gives."""

from __future__ import annotations

import pytest

from rapidfire_state import InvalidTransitionError, NotFoundError, RunStatus, StateDB, TaskStatus


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


def test_prepared_path_is_used_on_sqlite_only(sqlite_db, db):
    assert sqlite_db._prepared_writer is not None
    assert (db._prepared_writer is not None) == db.is_sqlite
    experiment = sqlite_db.create_experiment("e", "/tmp/e")
    sqlite_db.transition_experiment(experiment.experiment_id, "RUNNING")
    run = sqlite_db.create_run(experiment.experiment_id, {"a": 1})
    sqlite_db.transition_run(run.run_id, "ONGOING")
    assert sqlite_db._prepared_writer._prepared, "the transition did not go through the prepared path"


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
