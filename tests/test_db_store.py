"""``StateDB``'s API on every backend: records, naming, transitions, tasks, workers,
shared-memory metadata, cleanup, and the unhappy paths (nothing stored on refusal)."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest
from sqlalchemy import select, text

from rapidfire_state import StateDB
from rapidfire_state.constants import (
    ControllerTask,
    ExperimentStatus,
    ExperimentTask,
    RunEndedBy,
    RunSource,
    RunStatus,
    SHMLocation,
    SHMObjectType,
    TaskStatus,
    WorkerTask,
)
from rapidfire_state.db import Base, Experiment, Run, WorkerTaskRow
from rapidfire_state.db.records import CancelReport, ExperimentRecord, RunRecord, TaskRecord
from rapidfire_state.exceptions import (
    ConfigError,
    DBException,
    ExperimentException,
    InvalidTransitionError,
    NotFoundError,
    RapidFireError,
    WorkerException,
)

# --- helpers ----------------------------------------------------------------------------


def snapshot(db: StateDB) -> dict[str, list[tuple]]:
    """Every row of every table, in key order: equal snapshots mean nothing was stored."""
    out = {}
    with db.session() as session:
        for table in Base.metadata.sorted_tables:
            order = list(table.primary_key.columns)
            out[table.name] = [tuple(row) for row in session.execute(select(table).order_by(*order))]
    return out


def chain(db: StateDB, entity: str, entity_id: int) -> list[tuple]:
    return [
        (None if h.from_status is None else h.from_status.value, h.to_status.value)
        for h in db.history(entity, entity_id)
    ]


def make_run(db: StateDB, experiment_id: int, status: str, **kwargs) -> RunRecord:
    """A run brought to ``status`` through legal transitions."""
    run = db.create_run(experiment_id, {"lr": 0.01, "layers": [1, 2]}, **kwargs)
    path = {
        "NEW": [],
        "ONGOING": ["ONGOING"],
        "STOPPED": ["ONGOING", "STOPPED"],
        "COMPLETED": ["ONGOING", "COMPLETED"],
        "FAILED": ["ONGOING", "FAILED"],
        "KILLED": ["ONGOING", "KILLED"],
    }[status]
    for step in path:
        run = db.transition_run(run.run_id, step)
    return run


# --- experiments and runs ---------------------------------------------------------------


def test_create_and_get_experiment(db, tmp_path):
    record = db.create_experiment("first", str(tmp_path / "exps"), config_options={"seed": 3})
    assert isinstance(record, ExperimentRecord)
    assert record.name == "first"
    assert record.status is ExperimentStatus.NEW
    assert record.current_task is ExperimentTask.IDLE
    assert record.experiments_path == str(tmp_path / "exps")
    assert record.config_options == {"seed": 3}
    assert record.created_at.tzinfo is not None and record.ended_at is None and record.started_at is None
    assert db.get_experiment(record.experiment_id) == record
    assert db.get_experiment_by_name("first") == record
    assert db.list_experiments() == [record]
    assert db.get_running_experiment() is None
    assert chain(db, "experiment", record.experiment_id) == [(None, "NEW")]


def test_create_and_get_run(db, experiment):
    config = {"optimizer": {"lr": 0.1, "betas": (0.9, 0.99)}, "name": "cfg"}
    parent = db.create_run(experiment.experiment_id, {"base": True})
    run = db.create_run(
        experiment.experiment_id, config, source=RunSource.CLONE_MODIFY, cloned_from=parent.run_id,
        warm_started_from=parent.run_id, total_steps=100, required_workers=2, metric_run_id="m-1",
    )
    assert isinstance(run, RunRecord)
    assert run.status is RunStatus.NEW and run.source is RunSource.CLONE_MODIFY and run.ended_by is None
    assert (run.cloned_from, run.warm_started_from) == (parent.run_id, parent.run_id)
    assert (run.total_steps, run.required_workers, run.metric_run_id) == (100, 2, "m-1")
    assert run.completed_steps == 0 and run.progress == 0.0
    assert run.config == config
    assert run.flattened_config["optimizer.lr"] == 0.1 and run.flattened_config["name"] == "cfg"
    assert db.get_run(run.run_id) == run
    assert chain(db, "run", run.run_id) == [(None, "NEW")]
    # a run of a missing parent is refused
    before = snapshot(db)
    with pytest.raises(NotFoundError):
        db.create_run(experiment.experiment_id, {}, cloned_from=99999)
    assert snapshot(db) == before


def test_records_are_frozen_picklable_and_outlive_the_database(db, db_url, experiment):
    run = db.create_run(experiment.experiment_id, {"lr": 1})
    task = db.create_worker_task(experiment.experiment_id, run.run_id, 0, 0)
    worker = db.register_worker(experiment.experiment_id, 0, os.getpid())
    shm = db.upsert_shm_object("obj")
    history = db.history("run", run.run_id)
    records = [experiment, run, task, worker, shm, *history]
    db.close()
    for record in records:
        with pytest.raises(dataclasses.FrozenInstanceError):
            record.status = "X"  # type: ignore[misc]
        copy = pickle.loads(pickle.dumps(record))
        assert copy == record and type(copy) is type(record)
    assert isinstance(run.status, RunStatus) and isinstance(task.status, TaskStatus)
    assert isinstance(task.task_type, WorkerTask) and isinstance(history[0].to_status, RunStatus)
    assert run.to_dict()["status"] == "NEW" and run.to_dict()["run_id"] == run.run_id
    # a pickled StateDB reopens by URL
    again = pickle.loads(pickle.dumps(StateDB(db_url)))
    try:
        assert again.get_run(run.run_id) == run
    finally:
        again.close()


def test_taken_name_is_refused_and_names_it(db, tmp_path):
    db.create_experiment("dup", str(tmp_path))
    before = snapshot(db)
    with pytest.raises(ExperimentException, match="'dup'") as info:
        db.create_experiment("dup", str(tmp_path))
    assert isinstance(info.value, RapidFireError)
    assert snapshot(db) == before


def test_unique_names(db, tmp_path):
    made = [db.create_experiment("my_exp", str(tmp_path), unique=True).name for _ in range(3)]
    assert made == ["my_exp", "my_exp_1", "my_exp_2"]
    # a taken name that already ends in _N continues from there
    assert db.create_experiment("x_3", str(tmp_path), unique=True).name == "x_3"
    assert db.create_experiment("x_3", str(tmp_path), unique=True).name == "x_4"
    # the bare stem is free, then continues after the highest x_<k>
    assert db.create_experiment("x", str(tmp_path), unique=True).name == "x"
    assert db.create_experiment("x", str(tmp_path), unique=True).name == "x_5"
    # names that merely share the prefix do not count
    db.create_experiment("y", str(tmp_path))
    db.create_experiment("y_abc", str(tmp_path))
    db.create_experiment("yy_9", str(tmp_path))
    assert db.create_experiment("y", str(tmp_path), unique=True).name == "y_1"
    # LIKE wildcards in the stem are literal
    db.create_experiment("a_b", str(tmp_path))
    db.create_experiment("aXb_7", str(tmp_path))
    assert db.create_experiment("a_b", str(tmp_path), unique=True).name == "a_b_1"


def test_bad_experiment_names_are_refused(db, tmp_path):
    before = snapshot(db)
    for bad in ["../escape", "a/b", ".hidden", "x" * 129, 5, b"bytes", "tab\tname"]:
        with pytest.raises(RapidFireError):
            db.create_experiment(bad, str(tmp_path))
    assert snapshot(db) == before


def test_list_runs_filters(db, experiment, tmp_path):
    other = db.create_experiment("other", str(tmp_path)).experiment_id
    ongoing = make_run(db, experiment.experiment_id, "ONGOING")
    stopped = make_run(db, experiment.experiment_id, "STOPPED")
    new = make_run(db, experiment.experiment_id, "NEW")
    foreign = make_run(db, other, "NEW")
    ids = lambda runs: [r.run_id for r in runs]  # noqa: E731
    assert ids(db.list_runs()) == [ongoing.run_id, stopped.run_id, new.run_id, foreign.run_id]
    assert ids(db.list_runs(experiment.experiment_id)) == [ongoing.run_id, stopped.run_id, new.run_id]
    assert ids(db.list_runs(other)) == [foreign.run_id]
    assert ids(db.list_runs(statuses=[RunStatus.NEW])) == [new.run_id, foreign.run_id]
    assert ids(db.list_runs(statuses="NEW")) == [new.run_id, foreign.run_id]
    assert ids(db.list_runs(experiment.experiment_id, statuses=["NEW", RunStatus.STOPPED])) == [stopped.run_id, new.run_id]
    assert db.list_runs(statuses=[]) == []
    assert db.list_runs(424242) == []
    for bad in (["nope"], [ExperimentStatus.RUNNING], "ongoing"):
        with pytest.raises(ConfigError):
            db.list_runs(statuses=bad)
    with pytest.raises(ConfigError):
        db.list_runs(experiment_id=True)


def test_experiment_transitions(db, tmp_path):
    first = db.create_experiment("one", str(tmp_path))
    second = db.create_experiment("two", str(tmp_path))
    running = db.transition_experiment(first.experiment_id, ExperimentStatus.RUNNING)
    assert running.status is ExperimentStatus.RUNNING and running.started_at is not None
    assert db.get_running_experiment() == running
    # a second RUNNING experiment is refused, naming the one that runs
    before = snapshot(db)
    with pytest.raises(InvalidTransitionError) as info:
        db.transition_experiment(second.experiment_id, "RUNNING")
    assert "'one'" in str(info.value) and "RUNNING" in str(info.value)
    assert snapshot(db) == before
    db.set_experiment_task(first.experiment_id, ExperimentTask.RUN_FIT)
    done = db.transition_experiment(first.experiment_id, "COMPLETED", reason="finished")
    assert done.status is ExperimentStatus.COMPLETED and done.ended_at is not None
    assert done.current_task is ExperimentTask.IDLE
    assert db.get_running_experiment() is None
    assert db.transition_experiment(second.experiment_id, "RUNNING").status is ExperimentStatus.RUNNING
    assert chain(db, "experiment", first.experiment_id) == [(None, "NEW"), ("NEW", "RUNNING"), ("RUNNING", "COMPLETED")]
    assert db.history("experiment", first.experiment_id)[-1].reason == "finished"
    with pytest.raises(InvalidTransitionError):
        db.transition_experiment(first.experiment_id, "RUNNING")
    failed = db.transition_experiment(second.experiment_id, "FAILED", error="oom")
    assert failed.error == "oom"
    assert [e.name for e in db.list_experiments(statuses=["FAILED"])] == ["two"]


def test_set_experiment_task(db, experiment):
    record = db.set_experiment_task(experiment.experiment_id, "IC_OPS")
    assert record.current_task is ExperimentTask.IC_OPS
    before = snapshot(db)
    for bad in ("SLEEP", ControllerTask.RUN_FIT, None, 1):
        with pytest.raises(ConfigError):
            db.set_experiment_task(experiment.experiment_id, bad)
    with pytest.raises(NotFoundError):
        db.set_experiment_task(424242, ExperimentTask.IDLE)
    assert snapshot(db) == before


# --- run transitions ------------------------------------------------------------------------


def test_terminal_run_sets_ended_at_and_ended_by(db, experiment):
    for terminal in ("COMPLETED", "FAILED", "KILLED"):
        _check_terminal(db, experiment, terminal)


def _check_terminal(db, experiment, terminal):
    run = make_run(db, experiment.experiment_id, "ONGOING")
    assert run.ended_at is None and run.ended_by is None
    ended = db.transition_run(run.run_id, terminal, error="why" if terminal == "FAILED" else None)
    assert ended.status is RunStatus(terminal)
    assert ended.ended_by is RunEndedBy(terminal)
    assert ended.ended_at is not None and ended.ended_at >= ended.started_at
    if terminal == "FAILED":
        assert ended.error == "why"
    # out of a terminal state nothing moves, and nothing is stored
    before = snapshot(db)
    for target in RunStatus:
        if target is RunStatus(terminal):
            continue
        with pytest.raises(InvalidTransitionError):
            db.transition_run(run.run_id, target)
    assert snapshot(db) == before


def test_new_run_may_end_without_running(db, experiment):
    for target in ("FAILED", "KILLED", "STOPPED"):
        run = db.create_run(experiment.experiment_id, {})
        moved = db.transition_run(run.run_id, target)
        assert moved.started_at is None
        assert moved.ended_by is (None if target == "STOPPED" else RunEndedBy(target))
    run = db.create_run(experiment.experiment_id, {})
    with pytest.raises(InvalidTransitionError):
        db.transition_run(run.run_id, "COMPLETED")


def test_ongoing_sets_started_at_once(db, experiment):
    run = db.create_run(experiment.experiment_id, {})
    assert run.started_at is None
    started = db.transition_run(run.run_id, "ONGOING")
    assert started.started_at is not None
    time.sleep(0.02)
    db.transition_run(run.run_id, "STOPPED")
    resumed = db.transition_run(run.run_id, "ONGOING")
    assert resumed.started_at == started.started_at
    assert resumed.updated_at >= started.updated_at
    assert resumed.ended_by is None and resumed.ended_at is None


def test_resume_only_while_experiment_running(db, tmp_path):
    experiment = db.create_experiment("not_yet", str(tmp_path))
    run = db.transition_run(db.create_run(experiment.experiment_id, {}).run_id, "STOPPED")
    before = snapshot(db)
    with pytest.raises(InvalidTransitionError) as info:
        db.transition_run(run.run_id, "ONGOING")
    message = str(info.value)
    assert "RUNNING" in message and "resumed only while its experiment" in message
    assert info.value.current is RunStatus.STOPPED and info.value.wanted is RunStatus.ONGOING
    assert snapshot(db) == before
    db.transition_experiment(experiment.experiment_id, "RUNNING")
    assert db.transition_run(run.run_id, "ONGOING").status is RunStatus.ONGOING
    db.transition_run(run.run_id, "STOPPED")
    db.transition_experiment(experiment.experiment_id, "COMPLETED")
    with pytest.raises(InvalidTransitionError, match="resumed only while"):
        db.transition_run(run.run_id, "ONGOING")
    # the rule is about resuming: a NEW run of a NEW experiment may start
    fresh = db.create_experiment("fresh", str(tmp_path))
    assert db.transition_run(db.create_run(fresh.experiment_id, {}).run_id, "ONGOING").status is RunStatus.ONGOING


def test_idempotent_repeat_writes_no_second_history_row(db, experiment):
    run = make_run(db, experiment.experiment_id, "ONGOING")
    before = snapshot(db)
    again = db.transition_run(run.run_id, "ONGOING")
    assert again == run
    assert snapshot(db) == before
    done = db.transition_run(run.run_id, RunStatus.COMPLETED)
    before = snapshot(db)
    assert db.transition_run(run.run_id, "COMPLETED") == done
    assert snapshot(db) == before
    assert chain(db, "run", run.run_id) == [(None, "NEW"), ("NEW", "ONGOING"), ("ONGOING", "COMPLETED")]
    # the same for experiments and tasks
    exp_before = snapshot(db)
    db.transition_experiment(experiment.experiment_id, "RUNNING")
    assert snapshot(db) == exp_before
    task = db.create_worker_task(experiment.experiment_id, None, 0, None)
    before = snapshot(db)
    db.transition_task("worker", task.task_id, "SCHEDULED")
    assert snapshot(db) == before


def test_invalid_transition_error_names_everything(db, experiment):
    run = make_run(db, experiment.experiment_id, "COMPLETED")
    with pytest.raises(InvalidTransitionError) as info:
        db.transition_run(run.run_id, RunStatus.ONGOING)
    error = info.value
    assert isinstance(error, RapidFireError)
    assert (error.entity, error.entity_id, error.current, error.wanted) == ("run", run.run_id, RunStatus.COMPLETED, RunStatus.ONGOING)
    assert set(error.allowed) == {RunStatus.NEW, RunStatus.STOPPED}
    message = str(error)
    for part in (f"run {run.run_id}", "COMPLETED", "ONGOING", "NEW", "STOPPED"):
        assert part in message, (part, message)

    task = db.create_worker_task(experiment.experiment_id, None, 3, None)
    with pytest.raises(InvalidTransitionError) as info:
        db.finish_worker_task(task.task_id)
    message = str(info.value)
    for part in (f"worker_task {task.task_id}", "SCHEDULED", "COMPLETED", "IN_PROGRESS"):
        assert part in message, (part, message)

    with pytest.raises(InvalidTransitionError) as info:
        db.transition_experiment(experiment.experiment_id, "NEW")
    assert "none" in str(info.value)  # nothing leads to NEW


def test_expected_narrows_the_compare_and_set(db, experiment):
    run = make_run(db, experiment.experiment_id, "STOPPED")
    before = snapshot(db)
    with pytest.raises(InvalidTransitionError, match="expected") as info:
        db.transition_run(run.run_id, "ONGOING", expected=RunStatus.NEW)
    assert info.value.current is RunStatus.STOPPED
    assert snapshot(db) == before
    moved = db.transition_run(run.run_id, "ONGOING", expected=["STOPPED", "NEW"])
    assert moved.status is RunStatus.ONGOING
    with pytest.raises(ConfigError):
        db.transition_run(run.run_id, "STOPPED", expected="PAUSED")


def test_not_found_for_unknown_ids(db, experiment):
    missing = 987654
    before = snapshot(db)
    calls = [
        lambda: db.get_experiment(missing),
        lambda: db.get_experiment_by_name("nobody"),
        lambda: db.transition_experiment(missing, "RUNNING"),
        lambda: db.get_run(missing),
        lambda: db.transition_run(missing, "ONGOING"),
        lambda: db.update_run_progress(missing, completed_steps=1),
        lambda: db.set_metric_run_id(missing, "m"),
        lambda: db.create_run(missing, {}),
        lambda: db.create_worker_task(missing, None, 0, 0),
        lambda: db.create_worker_task(experiment.experiment_id, missing, 0, 0),
        lambda: db.create_controller_task(missing, ControllerTask.RUN_FIT),
        lambda: db.get_task("worker", missing),
        lambda: db.get_task("controller", missing),
        lambda: db.transition_task("worker", missing, "FAILED"),
        lambda: db.finish_controller_task(missing),
        lambda: db.register_worker(missing, 0, os.getpid()),
        lambda: db.heartbeat(experiment.experiment_id, 77),
        lambda: db.mark_worker_exited(experiment.experiment_id, 77),
        lambda: db.history("run", missing),
        lambda: db.history("worker_task", missing),
        lambda: db.cleanup_experiment_state(missing),
    ]
    for call in calls:
        with pytest.raises(NotFoundError) as info:
            call()
        assert isinstance(info.value, RapidFireError)
    assert snapshot(db) == before


# --- bad input: a clear ConfigError and nothing stored ---------------------------------------


def test_wrong_types_are_config_errors_and_store_nothing(db, experiment):
    run = make_run(db, experiment.experiment_id, "ONGOING")
    task = db.create_worker_task(experiment.experiment_id, run.run_id, 0, 0)
    ctask = db.create_controller_task(experiment.experiment_id, ControllerTask.IC_STOP)
    e, r, t = experiment.experiment_id, run.run_id, task.task_id
    before = snapshot(db)
    calls = {
        "lowercase status": lambda: db.transition_run(r, "stopped"),
        "non-status string": lambda: db.transition_run(r, "PAUSED"),
        "other machine enum": lambda: db.transition_run(r, ExperimentStatus.COMPLETED),
        "task enum for run": lambda: db.transition_run(r, TaskStatus.COMPLETED),
        "int status": lambda: db.transition_run(r, 2),
        "None status": lambda: db.transition_run(r, None),
        "bool run id": lambda: db.transition_run(True, "STOPPED"),
        "str run id": lambda: db.transition_run(str(r), "STOPPED"),
        "float run id": lambda: db.transition_run(float(r), "STOPPED"),
        "negative run id": lambda: db.transition_run(-1, "STOPPED"),
        "run enum for experiment": lambda: db.transition_experiment(e, RunStatus.COMPLETED),
        "bool experiment id": lambda: db.transition_experiment(True, "COMPLETED"),
        "run status for task": lambda: db.transition_task("worker", t, RunStatus.COMPLETED),
        "bad task kind": lambda: db.transition_task("workers", t, "FAILED"),
        "None task kind": lambda: db.transition_task(None, t, "FAILED"),
        "bool task id": lambda: db.transition_task("worker", True, "FAILED"),
        "bad source": lambda: db.create_run(e, {}, source="ROBOT"),
        "bool experiment for run": lambda: db.create_run(True, {}),
        "bool total_steps": lambda: db.create_run(e, {}, total_steps=True),
        "zero workers": lambda: db.create_run(e, {}, required_workers=0),
        "controller type for worker": lambda: db.create_worker_task(e, r, 0, 0, task_type=ControllerTask.RUN_FIT),
        "worker type for controller": lambda: db.create_controller_task(e, WorkerTask.TRAIN_VAL),
        "task created IN_PROGRESS": lambda: db.create_worker_task(e, r, 0, 0, status="IN_PROGRESS"),
        "task created as run status": lambda: db.create_worker_task(e, r, 0, 0, status=RunStatus.NEW),
        "bool worker id": lambda: db.create_worker_task(e, r, False, 0),
        "bad get_task kind": lambda: db.get_task("job", t),
        "bool claim": lambda: db.claim_worker_task(True),
        "negative claim": lambda: db.claim_worker_task(-3),
        "history entity": lambda: db.history("runs", r),
        "history bool id": lambda: db.history("run", True),
        "experiment by bytes": lambda: db.get_experiment_by_name(b"exp"),
        "list_tasks worker filter on controller": lambda: db.list_tasks("controller", worker_id=0),
        "finish controller bad id": lambda: db.finish_controller_task("1"),
        "cleanup to RUNNING": lambda: db.cleanup_experiment_state(e, status="RUNNING"),
        "cleanup runs to COMPLETED": lambda: db.cleanup_experiment_state(e, run_status="COMPLETED"),
        "config_options not a dict": lambda: db.create_worker_task(e, r, 0, 0, config_options=[1]),
    }
    for name, call in calls.items():
        with pytest.raises(ConfigError) as info:
            call()
        assert isinstance(info.value, RapidFireError), name
        assert str(info.value), name
    assert snapshot(db) == before
    assert db.get_task("controller", ctask.task_id).status is TaskStatus.SCHEDULED


def test_config_error_messages_name_the_value_and_the_allowed(db, experiment):
    run = make_run(db, experiment.experiment_id, "NEW")
    with pytest.raises(ConfigError) as info:
        db.transition_run(run.run_id, "PAUSED")
    assert "'PAUSED'" in str(info.value)
    for status in RunStatus:
        assert status.value in str(info.value)
    with pytest.raises(ConfigError, match="True"):
        db.get_run(True)


# --- progress and metric ids -------------------------------------------------------------------


def test_update_run_progress(db, experiment):
    run = make_run(db, experiment.experiment_id, "ONGOING")
    updated = db.update_run_progress(
        run.run_id, completed_steps=5, total_steps=10, num_chunks_visited=2, num_epochs_completed=1,
        chunk_offset=3, estimated_runtime=12.5, required_workers=2, progress=0.5,
    )
    assert (updated.completed_steps, updated.total_steps, updated.num_chunks_visited) == (5, 10, 2)
    assert (updated.num_epochs_completed, updated.chunk_offset, updated.required_workers) == (1, 3, 2)
    assert updated.estimated_runtime == 12.5 and updated.progress == 0.5
    assert updated.status is RunStatus.ONGOING
    assert db.update_run_progress(run.run_id, estimated_runtime=None).estimated_runtime is None
    assert db.update_run_progress(run.run_id, progress=1).progress == 1.0
    # progress updates are not status changes
    assert chain(db, "run", run.run_id) == [(None, "NEW"), ("NEW", "ONGOING")]


PROGRESS_REFUSALS = [
    ({"status": "COMPLETED"}, "transition_run"),
    ({"ended_by": "KILLED"}, "transition_run"),
    ({"experiment_id": 5}, "not a progress counter"),
    ({"bogus_field": 1}, "not a progress counter"),
    ({"completed_steps": 3, "status": "COMPLETED"}, "transition_run"),
    ({"completed_steps": -1}, "completed_steps"),
    ({"chunk_offset": -5}, "chunk_offset"),
    ({"progress": -0.1}, "progress"),
    ({"progress": float("nan")}, "progress"),
    ({"estimated_runtime": float("inf")}, "estimated_runtime"),
    ({"required_workers": 0}, "required_workers"),
    ({"completed_steps": 1.5}, "completed_steps"),
    ({"completed_steps": True}, "completed_steps"),
    ({"completed_steps": "3"}, "completed_steps"),
    ({}, "at least one"),
]


def test_update_run_progress_refusals(db, experiment):
    run = make_run(db, experiment.experiment_id, "ONGOING")
    db.update_run_progress(run.run_id, completed_steps=2)
    before = snapshot(db)
    for counters, fragment in PROGRESS_REFUSALS:
        with pytest.raises(ConfigError, match=fragment):
            db.update_run_progress(run.run_id, **counters)
    assert snapshot(db) == before


def test_set_metric_run_id(db, experiment):
    run = make_run(db, experiment.experiment_id, "NEW")
    assert db.set_metric_run_id(run.run_id, "abc123").metric_run_id == "abc123"
    assert db.get_run(run.run_id).metric_run_id == "abc123"
    assert db.set_metric_run_id(run.run_id, None).metric_run_id is None
    before = snapshot(db)
    with pytest.raises(ConfigError):
        db.set_metric_run_id(run.run_id, 42)
    assert snapshot(db) == before


# --- tasks ---------------------------------------------------------------------------------------


def test_worker_task_lifecycle(db, experiment):
    run = make_run(db, experiment.experiment_id, "ONGOING")
    task = db.create_worker_task(
        experiment.experiment_id, run.run_id, 2, 7, task_type="CREATE_MODELS", config_options={"batch": 8}
    )
    assert isinstance(task, TaskRecord) and task.kind == "worker"
    assert task.status is TaskStatus.SCHEDULED and task.task_type is WorkerTask.CREATE_MODELS
    assert (task.worker_id, task.chunk_id, task.run_id) == (2, 7, run.run_id)
    assert task.config == {"batch": 8} and task.started_at is None
    claimed = db.claim_worker_task(2)
    assert claimed.task_id == task.task_id and claimed.status is TaskStatus.IN_PROGRESS
    assert claimed.started_at is not None
    done = db.finish_worker_task(task.task_id)
    assert done.status is TaskStatus.COMPLETED and done.ended_at is not None
    assert chain(db, "worker_task", task.task_id) == [(None, "SCHEDULED"), ("SCHEDULED", "IN_PROGRESS"), ("IN_PROGRESS", "COMPLETED")]
    failing = db.create_worker_task(experiment.experiment_id, run.run_id, 2, 8)
    db.claim_worker_task(2)
    failed = db.finish_worker_task(failing.task_id, ok=False, error="CUDA OOM")
    assert failed.status is TaskStatus.FAILED and failed.error == "CUDA OOM"
    # PENDING tasks are not claimable until scheduled
    pending = db.create_worker_task(experiment.experiment_id, None, 2, None, status="PENDING")
    assert db.claim_worker_task(2) is None
    assert db.transition_task("worker", pending.task_id, TaskStatus.SCHEDULED).status is TaskStatus.SCHEDULED
    assert db.claim_worker_task(2).task_id == pending.task_id
    assert [t.task_id for t in db.list_tasks("worker", statuses=["IN_PROGRESS"])] == [pending.task_id]
    assert [t.task_id for t in db.list_tasks("worker", run_id=run.run_id)] == [task.task_id, failing.task_id]


def test_claim_returns_oldest_first_and_none_when_idle(db, experiment, tmp_path):
    e = experiment.experiment_id
    mine = [db.create_worker_task(e, None, 1, chunk).task_id for chunk in range(4)]
    theirs = db.create_worker_task(e, None, 2, 0).task_id
    claimed = [db.claim_worker_task(1).task_id for _ in range(4)]
    assert claimed == mine
    assert db.claim_worker_task(1) is None
    assert db.claim_worker_task(99) is None
    assert db.get_task("worker", theirs).status is TaskStatus.SCHEDULED
    # the experiment filter
    other = db.create_experiment("other", str(tmp_path)).experiment_id
    foreign = db.create_worker_task(other, None, 2, 0).task_id
    assert db.claim_worker_task(2, experiment_id=other).task_id == foreign
    assert db.claim_worker_task(2, experiment_id=other) is None
    assert db.claim_worker_task(2, experiment_id=e).task_id == theirs
    # an idle claim stores nothing
    before = snapshot(db)
    assert db.claim_worker_task(1) is None
    assert snapshot(db) == before


def test_controller_task_lifecycle(db, experiment, tmp_path):
    e = experiment.experiment_id
    run = make_run(db, e, "ONGOING")
    first = db.create_controller_task(e, ControllerTask.IC_CLONE_MODIFY, run_id=run.run_id, config_leaf={"lr": 0.5, "fn": lambda x: x + 1})
    second = db.create_controller_task(e, "GET_RUN_METRICS")
    pending = db.create_controller_task(e, "IC_STOP", status=TaskStatus.PENDING)
    assert first.kind == "controller" and first.task_type is ControllerTask.IC_CLONE_MODIFY
    assert first.worker_id is None and first.config["lr"] == 0.5 and first.config["fn"](1) == 2
    other = db.create_experiment("other", str(tmp_path)).experiment_id
    foreign = db.create_controller_task(other, ControllerTask.RUN_FIT)
    assert db.claim_controller_task(e).task_id == first.task_id
    assert db.claim_controller_task(e).task_id == second.task_id
    assert db.claim_controller_task(e) is None  # the PENDING one waits
    assert db.claim_controller_task().task_id == foreign.task_id
    assert db.finish_controller_task(first.task_id).status is TaskStatus.COMPLETED
    assert db.finish_controller_task(second.task_id, ok=False, error="no metrics").error == "no metrics"
    assert db.transition_task("controller", pending.task_id, "FAILED").status is TaskStatus.FAILED
    with pytest.raises(InvalidTransitionError):
        db.transition_task("controller", pending.task_id, "SCHEDULED")
    assert chain(db, "controller_task", second.task_id) == [(None, "SCHEDULED"), ("SCHEDULED", "IN_PROGRESS"), ("IN_PROGRESS", "FAILED")]


def test_task_kind_is_checked(db, experiment):
    task = db.create_worker_task(experiment.experiment_id, None, 0, None)
    before = snapshot(db)
    for kind in ("Worker", "worker_task", "", None, 1, b"worker"):
        with pytest.raises(ConfigError, match="worker, controller"):
            db.transition_task(kind, task.task_id, "FAILED")
    # the right id in the wrong table is not found, never moved
    with pytest.raises(NotFoundError):
        db.transition_task("controller", task.task_id, "FAILED")
    assert snapshot(db) == before


# --- workers ---------------------------------------------------------------------------------------


def test_register_heartbeat_exit_and_list(db, experiment, tmp_path):
    e = experiment.experiment_id
    w0 = db.register_worker(e, 0, os.getpid())
    w1 = db.register_worker(e, 1, os.getpid(), host="elsewhere")
    assert (w0.pid, w0.worker_id, w0.exited_at, w0.alive) == (os.getpid(), 0, None, True)
    assert w0.process_started_at is not None  # this host: the process start time is recorded
    assert w1.host == "elsewhere" and w1.process_started_at is None
    beat1 = db.heartbeat(e, 0)
    time.sleep(0.05)
    beat2 = db.heartbeat(e, 0)
    assert beat2.heartbeat_at > beat1.heartbeat_at >= w0.heartbeat_at
    # the database clock, not this process's
    assert abs((db.now() - beat2.heartbeat_at).total_seconds()) < 5
    exited = db.mark_worker_exited(e, 1, exit_code=3)
    assert exited.exited_at is not None and exited.exit_code == 3 and not exited.alive
    assert db.mark_worker_exited(e, 1, exit_code=9) == exited  # the first exit is kept
    with pytest.raises(WorkerException, match="exited"):
        db.heartbeat(e, 1)
    assert [w.worker_id for w in db.list_workers(e)] == [0, 1]
    assert [w.worker_id for w in db.list_workers(e, alive_only=True)] == [0]
    other = db.create_experiment("other", str(tmp_path)).experiment_id
    db.register_worker(other, 0, os.getpid())
    assert len(db.list_workers()) == 3 and len(db.list_workers(other)) == 1
    # a restarted worker is re-recorded, alive again
    again = db.register_worker(e, 1, os.getpid())
    assert again.alive and again.exit_code is None and again.id == w1.id
    before = snapshot(db)
    for bad in (0, -5, True, "123", None):
        with pytest.raises(ConfigError):
            db.register_worker(e, 2, bad)
    with pytest.raises(ConfigError):
        db.mark_worker_exited(e, 0, exit_code="1")
    assert snapshot(db) == before


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=60)
    return child.pid


def test_fail_stale_workers_fails_a_dead_workers_task_and_run(db, experiment):
    e = experiment.experiment_id
    dead_pid = _dead_pid()
    dead_run = make_run(db, e, "ONGOING")
    live_run = make_run(db, e, "ONGOING")
    db.register_worker(e, 1, dead_pid)
    db.register_worker(e, 2, os.getpid())
    dead_task = db.create_worker_task(e, dead_run.run_id, 1, 0)
    waiting = db.create_worker_task(e, dead_run.run_id, 1, 1)  # SCHEDULED after the claim below
    live_task = db.create_worker_task(e, live_run.run_id, 2, 0)
    assert db.claim_worker_task(1).task_id == dead_task.task_id
    assert db.claim_worker_task(2).task_id == live_task.task_id
    db.heartbeat(e, 2)

    reports = db.fail_stale_workers(60)
    assert len(reports) == 1
    report = reports[0]
    assert report.worker.worker_id == 1 and report.worker.exited_at is not None
    assert "worker 1" in report.reason and str(dead_pid) in report.reason and "exited" in report.reason
    assert report.failed_task_ids == (dead_task.task_id,)
    assert report.failed_run_ids == (dead_run.run_id,)
    task = db.get_task("worker", dead_task.task_id)
    assert task.status is TaskStatus.FAILED and "worker 1" in task.error and task.ended_at is not None
    run = db.get_run(dead_run.run_id)
    assert run.status is RunStatus.FAILED and run.ended_by is RunEndedBy.FAILED and "worker 1" in run.error
    assert chain(db, "run", dead_run.run_id)[-1] == ("ONGOING", "FAILED")
    assert chain(db, "worker_task", dead_task.task_id)[-1] == ("IN_PROGRESS", "FAILED")
    # only IN_PROGRESS tasks fail; the live worker and its work are left alone
    assert db.get_task("worker", waiting.task_id).status is TaskStatus.SCHEDULED
    assert db.get_task("worker", live_task.task_id).status is TaskStatus.IN_PROGRESS
    assert db.get_run(live_run.run_id).status is RunStatus.ONGOING
    live = [w for w in db.list_workers(e) if w.worker_id == 2][0]
    assert live.alive
    # a second pass finds nothing more to do
    before = snapshot(db)
    assert db.fail_stale_workers(60) == []
    assert snapshot(db) == before


def test_stale_worker_keeps_an_ended_runs_outcome(db, experiment):
    e = experiment.experiment_id
    run = make_run(db, e, "ONGOING")
    db.register_worker(e, 4, _dead_pid())
    task = db.create_worker_task(e, run.run_id, 4, 0)
    db.claim_worker_task(4)
    db.transition_run(run.run_id, "COMPLETED")
    [report] = db.fail_stale_workers(60)
    assert report.failed_task_ids == (task.task_id,) and report.failed_run_ids == ()
    assert db.get_run(run.run_id).status is RunStatus.COMPLETED


def test_fail_stale_workers_by_heartbeat_age(db, experiment):
    e = experiment.experiment_id
    run = make_run(db, e, "ONGOING")
    db.register_worker(e, 0, os.getpid())  # alive by pid: only the heartbeat can condemn it
    db.register_worker(e, 1, os.getpid())
    task = db.create_worker_task(e, run.run_id, 0, 0)
    db.claim_worker_task(0)
    assert db.fail_stale_workers(0.5) == []
    time.sleep(1.2)
    db.heartbeat(e, 1)  # worker 1 keeps beating
    reports = db.fail_stale_workers(0.5)
    assert [r.worker.worker_id for r in reports] == [0]
    assert "heartbeat" in reports[0].reason
    assert db.get_task("worker", task.task_id).status is TaskStatus.FAILED
    assert db.get_run(run.run_id).status is RunStatus.FAILED
    with pytest.raises(WorkerException):
        db.heartbeat(e, 0)  # a worker failed as stale must stop
    assert [w.worker_id for w in db.list_workers(e, alive_only=True)] == [1]


def test_fail_stale_workers_refuses_a_bad_grace(db):
    for bad in (-1, True, "5", None):
        with pytest.raises(ConfigError):
            db.fail_stale_workers(bad)


# --- claims: who holds a task, judged per claim ----------------------------------------------------

_fork = multiprocessing.get_context("fork")


def _claimer(url: str, experiment_id: int, worker_id: int, register: bool, stay: bool, conn) -> None:
    database = StateDB(url)
    if register:
        database.register_worker(experiment_id, worker_id, os.getpid())
    task = database.claim_worker_task(worker_id, experiment_id=experiment_id)
    conn.send(None if task is None else task.task_id)
    if stay:
        time.sleep(300)


def claim_in_child(url: str, experiment_id: int, worker_id: int, *, register: bool = True, stay: bool = False):
    """A real process (registered as ``worker_id`` when ``register``) claims one task.

    Returns ``(process, task_id)``; without ``stay`` the process has exited (and
    been reaped) on return, so its claim names a dead pid.
    """
    parent, child = _fork.Pipe()
    process = _fork.Process(target=_claimer, args=(url, experiment_id, worker_id, register, stay, child))
    process.start()
    assert parent.poll(60), "the claiming process did not answer"
    task_id = parent.recv()
    if not stay:
        process.join(60)
        assert process.exitcode == 0
    return process, task_id


def test_claim_records_the_claiming_process_and_a_fresh_token(db, experiment):
    import psutil

    e = experiment.experiment_id
    first = db.create_worker_task(e, None, 1, 0)
    second = db.create_worker_task(e, None, 1, 1)
    assert (first.claim_token, first.claim_pid, first.claim_host, first.claim_process_started_at) == (None,) * 4
    claims = [db.claim_worker_task(1), db.claim_worker_task(1)]
    started = psutil.Process().create_time()
    for claim, task in zip(claims, (first, second)):
        assert claim.task_id == task.task_id
        assert claim.claim_pid == os.getpid() and claim.claim_host == socket.gethostname()
        assert abs(claim.claim_process_started_at - started) < 1.0
        assert isinstance(claim.claim_token, str) and len(claim.claim_token) == 32
        assert db.get_task("worker", task.task_id) == claim  # the claim returns the stored row
    assert claims[0].claim_token != claims[1].claim_token  # one token per claim
    controller = db.create_controller_task(e, ControllerTask.IC_STOP)
    claimed = db.claim_controller_task(e)
    assert claimed.task_id == controller.task_id and claimed.claim_pid == os.getpid() and len(claimed.claim_token) == 32
    # moving a task to IN_PROGRESS by hand is a claim too, recorded the same way
    manual = db.create_worker_task(e, None, 9, 0)
    moved = db.transition_task("worker", manual.task_id, "IN_PROGRESS")
    assert moved.claim_pid == os.getpid() and len(moved.claim_token) == 32
    assert moved.claim_token not in {c.claim_token for c in claims}
    # finishing keeps the claim on record
    done = db.finish_worker_task(first.task_id, claim_token=claims[0].claim_token)
    assert done.status is TaskStatus.COMPLETED and done.claim_token == claims[0].claim_token


def test_a_finish_with_another_claims_token_is_refused_and_changes_nothing(db, experiment):
    e = experiment.experiment_id
    run = make_run(db, e, "ONGOING")
    task = db.create_worker_task(e, run.run_id, 1, 0)
    claim = db.claim_worker_task(1)
    other = "0" * 32
    before = snapshot(db)
    for ok in (True, False):
        with pytest.raises(InvalidTransitionError, match="claim token") as info:
            db.finish_worker_task(task.task_id, ok=ok, error="late", claim_token=other)
        assert claim.claim_token in str(info.value) and str(os.getpid()) in str(info.value)
        assert snapshot(db) == before
    for bad in (1, b"x" * 32, True):
        with pytest.raises(ConfigError, match="claim_token"):
            db.finish_worker_task(task.task_id, claim_token=bad)
    assert snapshot(db) == before
    # the claim's own token finishes it; a repeat with that token is the usual idempotent repeat
    assert db.finish_worker_task(task.task_id, claim_token=claim.claim_token).status is TaskStatus.COMPLETED
    after = snapshot(db)
    assert db.finish_worker_task(task.task_id, claim_token=claim.claim_token).status is TaskStatus.COMPLETED
    assert snapshot(db) == after
    # ... but another claim's token does not get to confirm it
    with pytest.raises(InvalidTransitionError, match="claim token"):
        db.finish_worker_task(task.task_id, claim_token=other)
    with pytest.raises(InvalidTransitionError, match="claim token"):
        db.finish_worker_task(task.task_id, ok=False, claim_token=other)
    assert snapshot(db) == after
    # a task that was never claimed holds no token to match
    unclaimed = db.create_worker_task(e, None, 2, 0)
    before = snapshot(db)
    with pytest.raises(InvalidTransitionError, match="no recorded claim"):
        db.transition_task("worker", unclaimed.task_id, "FAILED", claim_token=other)
    assert snapshot(db) == before
    # controller tasks alike
    db.create_controller_task(e, ControllerTask.IC_STOP)
    controller = db.claim_controller_task(e)
    before = snapshot(db)
    with pytest.raises(InvalidTransitionError, match="claim token"):
        db.finish_controller_task(controller.task_id, claim_token=other)
    assert snapshot(db) == before
    assert db.finish_controller_task(controller.task_id, claim_token=controller.claim_token).status is TaskStatus.COMPLETED


def test_a_worker_failed_as_dead_cannot_overwrite_the_outcome(db, db_url, experiment):
    e = experiment.experiment_id
    run = make_run(db, e, "ONGOING")
    task = db.create_worker_task(e, run.run_id, 1, 0)
    db.register_worker(e, 1, os.getpid())
    claim = db.claim_worker_task(1)
    time.sleep(0.3)
    [report] = db.fail_stale_workers(0.1)  # declared dead by its heartbeat, although it runs
    assert report.failed_task_ids == (task.task_id,)
    failed = snapshot(db)
    with pytest.raises(InvalidTransitionError):
        db.finish_worker_task(task.task_id, ok=True, claim_token=claim.claim_token)
    assert snapshot(db) == failed
    assert db.get_task("worker", task.task_id).error == report.reason


def test_a_worker_failed_as_dead_is_told_its_own_failure_was_not_recorded(db, db_url, experiment):
    e = experiment.experiment_id
    task = db.create_worker_task(e, None, 1, 0)
    db.register_worker(e, 1, os.getpid())
    claim = db.claim_worker_task(1)
    time.sleep(0.3)
    [report] = db.fail_stale_workers(0.1)
    failed = snapshot(db)
    # the late worker's own failure is not what was recorded: refused, not confirmed as a repeat
    with pytest.raises(InvalidTransitionError, match="already FAILED") as info:
        db.finish_worker_task(task.task_id, ok=False, error="CUDA out of memory", claim_token=claim.claim_token)
    assert report.reason in str(info.value)
    assert snapshot(db) == failed
    # a true repeat of a recorded failure (same claim, same error) is still the idempotent no-op
    other = db.create_worker_task(e, None, 2, 0)
    db.register_worker(e, 2, os.getpid())
    mine = db.claim_worker_task(2)
    db.finish_worker_task(other.task_id, ok=False, error="boom", claim_token=mine.claim_token)
    done = snapshot(db)
    assert db.finish_worker_task(other.task_id, ok=False, error="boom", claim_token=mine.claim_token).error == "boom"
    assert snapshot(db) == done


def test_register_worker_fails_a_dead_predecessors_tasks_at_once(db, db_url, experiment):
    e = experiment.experiment_id
    run = make_run(db, e, "ONGOING")
    other_run = make_run(db, e, "ONGOING")
    held = db.create_worker_task(e, run.run_id, 5, 0)
    waiting = db.create_worker_task(e, run.run_id, 5, 1)
    neighbour = db.create_worker_task(e, other_run.run_id, 6, 0)
    dead, task_id = claim_in_child(db_url, e, 5)
    assert task_id == held.task_id
    _, neighbour_id = claim_in_child(db_url, e, 6)  # another worker id's dead claim: not ours to fail
    assert neighbour_id == neighbour.task_id
    assert db.get_task("worker", held.task_id).claim_pid == dead.pid

    row = db.register_worker(e, 5, os.getpid())  # the restarted worker 5
    assert row.pid == os.getpid() and row.alive
    task = db.get_task("worker", held.task_id)
    assert task.status is TaskStatus.FAILED and task.ended_at is not None
    assert f"pid {dead.pid}" in task.error and "registered again" in task.error and "exited" in task.error
    assert chain(db, "worker_task", held.task_id)[-1] == ("IN_PROGRESS", "FAILED")
    failed_run = db.get_run(run.run_id)
    assert failed_run.status is RunStatus.FAILED and f"pid {dead.pid}" in failed_run.error
    assert db.get_task("worker", waiting.task_id).status is TaskStatus.SCHEDULED
    assert db.get_task("worker", neighbour.task_id).status is TaskStatus.IN_PROGRESS
    assert db.get_run(other_run.run_id).status is RunStatus.ONGOING
    # registering again (the same live process) changes no task
    before = {t.task_id: t.status for t in db.list_tasks("worker")}
    db.register_worker(e, 5, os.getpid())
    assert {t.task_id: t.status for t in db.list_tasks("worker")} == before


def test_fail_stale_fails_a_dead_claimers_task_behind_a_live_successor(db, db_url, experiment):
    e = experiment.experiment_id
    run = make_run(db, e, "ONGOING")
    held = db.create_worker_task(e, run.run_id, 5, 0)
    waiting = db.create_worker_task(e, run.run_id, 5, 1)
    predecessor, task_id = claim_in_child(db_url, e, 5, stay=True)
    try:
        assert task_id == held.task_id
        # the successor registers while the predecessor still runs: its claim is live, left alone
        db.register_worker(e, 5, os.getpid())
        assert db.get_task("worker", held.task_id).status is TaskStatus.IN_PROGRESS
        assert db.fail_stale_workers(60) == []
    finally:
        os.kill(predecessor.pid, signal.SIGKILL)
        predecessor.join(60)
    assert predecessor.exitcode == -signal.SIGKILL
    db.heartbeat(e, 5)
    [report] = db.fail_stale_workers(60)
    assert report.claim_pid == predecessor.pid
    assert report.worker.pid == os.getpid() and report.worker.alive  # the live successor's row
    assert report.failed_task_ids == (held.task_id,) and report.failed_run_ids == (run.run_id,)
    assert f"pid {predecessor.pid}" in report.reason and f"now pid {os.getpid()}" in report.reason
    task = db.get_task("worker", held.task_id)
    assert task.status is TaskStatus.FAILED and task.error == report.reason
    assert db.get_run(run.run_id).status is RunStatus.FAILED
    assert db.get_task("worker", waiting.task_id).status is TaskStatus.SCHEDULED
    assert [w.pid for w in db.list_workers(e, alive_only=True)] == [os.getpid()]
    before = snapshot(db)
    assert db.fail_stale_workers(60) == []
    assert snapshot(db) == before


def _set_claim(db_url: str, task_id: int, **values) -> None:
    from sqlalchemy import create_engine

    engine = create_engine(db_url)
    try:
        with engine.begin() as connection:
            assignments = ", ".join(f"{name} = :{name}" for name in values)
            connection.execute(text(f"UPDATE worker_tasks SET {assignments} WHERE task_id = :t"), {"t": task_id, **values})
    finally:
        engine.dispose()


def test_a_claimers_recycled_pid_is_not_taken_for_it(db, db_url, experiment):
    e = experiment.experiment_id
    task = db.create_worker_task(e, None, 2, 0)
    db.register_worker(e, 2, os.getpid())
    claim = db.claim_worker_task(2)
    assert db.fail_stale_workers(60) == []
    # the claim's pid is running, but as a process started at another moment since boot: the claimer is gone
    boot, _, start = claim.claim_process_identity.partition(":")
    _set_claim(db_url, task.task_id, claim_process_identity=f"{boot}:{int(start) + 1}")
    [report] = db.fail_stale_workers(60)
    assert report.claim_pid == os.getpid() and "another process" in report.reason
    assert report.failed_task_ids == (task.task_id,) and report.worker.alive


def test_a_claim_without_an_identity_is_judged_by_its_start_time(db, db_url, experiment):
    """Claims recorded before revision 0008 (or off Linux) have only the OS start time."""
    e = experiment.experiment_id
    wandered, recycled = db.create_worker_task(e, None, 2, 0), db.create_worker_task(e, None, 2, 1)
    db.register_worker(e, 2, os.getpid())
    first, second = db.claim_worker_task(2), db.claim_worker_task(2)
    # the whole second the OS start time moves by as NTP slews the clock is not a recycled pid
    _set_claim(db_url, wandered.task_id, claim_process_identity=None,
               claim_process_started_at=first.claim_process_started_at - 1.0)
    _set_claim(db_url, recycled.task_id, claim_process_identity=None,
               claim_process_started_at=second.claim_process_started_at - 3600)
    [report] = db.fail_stale_workers(60)
    assert report.failed_task_ids == (recycled.task_id,) and "another process" in report.reason
    assert db.get_task("worker", wandered.task_id).status is TaskStatus.IN_PROGRESS


def test_claims_of_other_hosts_and_unrecorded_claims_are_judged_by_the_worker_row(db, db_url, experiment):
    e = experiment.experiment_id
    remote = db.create_worker_task(e, None, 3, 0)
    legacy = db.create_worker_task(e, None, 4, 0)
    db.register_worker(e, 3, os.getpid())
    db.register_worker(e, 4, os.getpid())
    db.claim_worker_task(3)
    db.claim_worker_task(4)
    # a claim made on another host: its pid means nothing here
    _set_claim(db_url, remote.task_id, claim_host="elsewhere", claim_pid=_dead_pid())
    # a claim made before claims were recorded (revision 0002)
    _set_claim(db_url, legacy.task_id, claim_token=None, claim_pid=None, claim_host=None,
               claim_process_started_at=None)
    assert db.fail_stale_workers(60) == []
    assert db.register_worker(e, 3, os.getpid()).alive
    # the row it was claimed under is alive: a re-registration leaves the unrecorded claim alone
    db.register_worker(e, 4, os.getpid())
    assert {t.task_id: t.status for t in db.list_tasks("worker")} == {
        remote.task_id: TaskStatus.IN_PROGRESS, legacy.task_id: TaskStatus.IN_PROGRESS,
    }
    # once the row's process is gone, a restart fails the unrecorded claim with it
    gone = _dead_pid()
    db.register_worker(e, 4, gone)
    db.register_worker(e, 4, os.getpid())
    task = db.get_task("worker", legacy.task_id)
    assert task.status is TaskStatus.FAILED and f"pid {gone}" in task.error
    # the remote claim falls with its worker row's heartbeat
    time.sleep(0.3)
    db.heartbeat(e, 4)
    reports = db.fail_stale_workers(0.2)
    assert [(r.worker.worker_id, r.failed_task_ids) for r in reports] == [(3, (remote.task_id,))]


def test_a_dead_worker_rows_local_pid_does_not_fail_a_claim_of_another_host(db, db_url, experiment):
    """The row names a dead pid of this host; a task claimed on another host falls only with the heartbeat."""
    e = experiment.experiment_id
    gone = _dead_pid()
    remote_run = make_run(db, e, "ONGOING")
    remote = db.create_worker_task(e, remote_run.run_id, 3, 0)
    own = db.create_worker_task(e, None, 3, 1)
    db.register_worker(e, 3, gone)
    db.claim_worker_task(3)
    db.claim_worker_task(3)
    _set_claim(db_url, remote.task_id, claim_host="elsewhere", claim_pid=gone)
    _set_claim(db_url, own.task_id, claim_pid=gone, claim_process_started_at=None)
    db.heartbeat(e, 3)  # the remote claimer beats under worker id 3
    [report] = db.fail_stale_workers(60)
    assert report.failed_task_ids == (own.task_id,) and f"pid {gone}" in report.reason
    assert {t.task_id: t.status for t in db.list_tasks("worker")} == {
        remote.task_id: TaskStatus.IN_PROGRESS, own.task_id: TaskStatus.FAILED,
    }
    assert db.get_run(remote_run.run_id).status is RunStatus.ONGOING
    # the row stays open while the remote claim holds a task: its heartbeat still judges it
    assert db.heartbeat(e, 3).alive
    before = snapshot(db)
    assert db.fail_stale_workers(60) == []
    assert snapshot(db) == before
    time.sleep(0.3)
    [report] = db.fail_stale_workers(0.2)
    assert report.failed_task_ids == (remote.task_id,) and not report.worker.alive
    assert db.get_run(remote_run.run_id).status is RunStatus.FAILED


# --- the ORM cannot bypass the state machine ---------------------------------------------------------


def test_assigning_status_on_a_persistent_object_is_refused(db, experiment):
    run = make_run(db, experiment.experiment_id, "ONGOING")
    task = db.create_worker_task(experiment.experiment_id, run.run_id, 0, 0)
    before = snapshot(db)
    for model, key, value in (
        (Run, run.run_id, "COMPLETED"),
        (Experiment, experiment.experiment_id, "COMPLETED"),
        (WorkerTaskRow, task.task_id, "COMPLETED"),
    ):
        with pytest.raises(InvalidTransitionError, match="transition_"):
            with db.transaction() as session:
                obj = session.get(model, key)
                obj.status = value
        with db.session() as session:
            obj = session.get(model, key)
            with pytest.raises(InvalidTransitionError):
                obj.status = value
    # an UPDATE through the ORM session is not a loophole for the other columns
    with db.transaction() as session:
        session.get(Run, run.run_id).completed_steps = 7
    after = snapshot(db)
    assert db.get_run(run.run_id).completed_steps == 7 and db.get_run(run.run_id).status is RunStatus.ONGOING
    assert after["state_transitions"] == before["state_transitions"]


def test_transaction_rolls_back_on_error(db, experiment):
    before = snapshot(db)
    with pytest.raises(ZeroDivisionError):
        with db.transaction() as session:
            session.execute(text("UPDATE runs SET completed_steps = 1"))
            session.execute(text("UPDATE experiments SET error = 'x'"))
            1 / 0
    assert snapshot(db) == before


# --- shared-memory metadata ------------------------------------------------------------------------


def test_shm_metadata(db, experiment, tmp_path):
    e = experiment.experiment_id
    run = make_run(db, e, "ONGOING")
    first = db.upsert_shm_object("model/1", object_type="MODEL", num_bytes=100, tensor_count=3,
                                 experiment_id=e, run_id=run.run_id, chunk_id=0, manager_name="mgr")
    assert first.location is SHMLocation.SHM and first.object_type is SHMObjectType.MODEL and first.disk_path is None
    moved = db.upsert_shm_object("model/1", object_type=SHMObjectType.MODEL, location=SHMLocation.DISK,
                                 disk_path=tmp_path / "model1.pt", num_bytes=200, tensor_count=3,
                                 experiment_id=e, run_id=run.run_id, manager_name="mgr")
    assert moved.shm_object_id == first.shm_object_id and moved.created_at == first.created_at
    assert moved.location is SHMLocation.DISK and moved.disk_path == str(tmp_path / "model1.pt")
    assert moved.num_bytes == 200 and moved.updated_at >= first.updated_at
    ckpt = db.upsert_shm_object("ckpt/1", experiment_id=e, manager_name="other")
    loose = db.upsert_shm_object("loose")
    assert db.get_shm_object("model/1") == moved
    assert db.get_shm_object("nope") is None
    assert [o.key for o in db.list_shm_objects()] == ["model/1", "ckpt/1", "loose"]
    assert [o.key for o in db.list_shm_objects(experiment_id=e)] == ["model/1", "ckpt/1"]
    assert [o.key for o in db.list_shm_objects(run_id=run.run_id)] == ["model/1"]
    assert [o.key for o in db.list_shm_objects(manager_name="other")] == ["ckpt/1"]
    assert [o.key for o in db.list_shm_objects(disk_path=tmp_path / "model1.pt")] == ["model/1"]
    assert db.list_shm_objects(disk_path=str(tmp_path / "model1.pt")) == db.list_shm_objects(disk_path=tmp_path / "model1.pt")
    assert db.list_shm_objects(disk_path=tmp_path / "elsewhere.pt") == []
    for bad in (3, b"/tmp/x", ""):
        with pytest.raises(ConfigError, match="disk_path="):
            db.list_shm_objects(disk_path=bad)
    before = snapshot(db)
    for bad in (
        dict(key="", ),
        dict(key=5),
        dict(key="x" * 513),
        dict(key="d", location="DISK"),  # DISK needs a path
        dict(key="s", location="SHM", disk_path="/tmp/x"),  # SHM has none
        dict(key="p", location="DISK", disk_path=7),  # not a path
        dict(key="t", object_type="TENSOR"),
        dict(key="l", location="CLOUD"),
        dict(key="n", num_bytes=-1),
        dict(key="r", run_id=True),
    ):
        with pytest.raises(ConfigError):
            db.upsert_shm_object(**bad)
    assert snapshot(db) == before
    removed = db.delete_shm_objects(["model/1", "missing"])
    assert removed == [moved]
    assert db.delete_shm_objects(["model/1"]) == [] and db.delete_shm_objects([]) == []
    assert [o.key for o in db.list_shm_objects()] == [ckpt.key, loose.key]


# --- experiment cleanup ---------------------------------------------------------------------------------


def test_cleanup_experiment_state(db, experiment, tmp_path):
    e = experiment.experiment_id
    runs = {status: make_run(db, e, status).run_id for status in ("NEW", "ONGOING", "STOPPED", "COMPLETED", "FAILED")}
    scheduled = db.create_worker_task(e, runs["ONGOING"], 0, 0).task_id
    in_progress = db.create_worker_task(e, runs["ONGOING"], 1, 0).task_id
    db.claim_worker_task(1)
    pending = db.create_worker_task(e, None, 0, None, status="PENDING").task_id
    finished = db.create_worker_task(e, runs["ONGOING"], 2, 0).task_id
    db.claim_worker_task(2)
    db.finish_worker_task(finished)
    ctask = db.create_controller_task(e, ControllerTask.IC_STOP).task_id
    db.register_worker(e, 0, os.getpid())
    db.register_worker(e, 1, os.getpid())
    db.mark_worker_exited(e, 1, exit_code=0)
    first_exit = db.list_workers(e)[1].exited_at
    db.upsert_shm_object("m/a", experiment_id=e, run_id=runs["ONGOING"])
    db.upsert_shm_object("m/b", experiment_id=e, location="DISK", disk_path=str(tmp_path / "b"))
    other = db.create_experiment("bystander", str(tmp_path)).experiment_id
    bystander_run = make_run(db, other, "NEW").run_id
    db.upsert_shm_object("other/a", experiment_id=other)
    db.register_worker(other, 0, os.getpid())
    history_before = {rid: chain(db, "run", rid) for rid in runs.values()}

    calls = []

    def hook(removed):
        # called after the commit: another connection already sees the rows gone
        view = StateDB(db.url.render_as_string(hide_password=False))
        try:
            calls.append(([r.key for r in removed], [o.key for o in view.list_shm_objects(experiment_id=e)]))
        finally:
            view.close()

    db.add_cleanup_hook(hook)
    db.add_cleanup_hook(hook)  # registered once
    report = db.cleanup_experiment_state(e, reason="test cleanup")
    assert report.changed and report.experiment_status is ExperimentStatus.COMPLETED
    assert sorted(report.failed_task_ids) == sorted([("worker", scheduled), ("worker", in_progress), ("worker", pending), ("controller", ctask)])
    assert report.ended_run_ids == tuple(sorted([runs["NEW"], runs["ONGOING"]]))
    assert report.frozen_run_ids == (runs["STOPPED"],)
    assert report.exited_worker_ids == (0,)
    assert sorted(o.key for o in report.removed_shm_objects) == ["m/a", "m/b"]
    assert calls == [(["m/a", "m/b"], [])]

    for task_id in (scheduled, in_progress, pending):
        task = db.get_task("worker", task_id)
        assert task.status is TaskStatus.FAILED and task.ended_at is not None and task.error
    assert db.get_task("worker", finished).status is TaskStatus.COMPLETED
    assert db.get_task("controller", ctask).status is TaskStatus.FAILED
    for status in ("NEW", "ONGOING"):
        run = db.get_run(runs[status])
        assert run.status is RunStatus.KILLED and run.ended_by is RunEndedBy.KILLED and run.ended_at is not None
        assert chain(db, "run", run.run_id) == history_before[run.run_id] + [(status, "KILLED")]
    stopped = db.get_run(runs["STOPPED"])
    assert stopped.status is RunStatus.STOPPED and stopped.ended_by is RunEndedBy.STOPPED and stopped.ended_at is not None
    assert chain(db, "run", runs["STOPPED"]) == history_before[runs["STOPPED"]]  # frozen, not a transition
    assert db.get_run(runs["COMPLETED"]).ended_by is RunEndedBy.COMPLETED
    assert db.get_run(runs["FAILED"]).status is RunStatus.FAILED
    workers = db.list_workers(e)
    assert all(not w.alive for w in workers) and workers[1].exited_at == first_exit
    assert db.list_shm_objects(experiment_id=e) == []
    assert db.get_experiment(e).status is ExperimentStatus.COMPLETED
    assert chain(db, "experiment", e)[-1] == ("RUNNING", "COMPLETED")
    # the bystander experiment is untouched
    assert db.get_run(bystander_run).status is RunStatus.NEW
    assert [o.key for o in db.list_shm_objects(experiment_id=other)] == ["other/a"]
    assert db.list_workers(other)[0].alive

    # a second cleanup changes nothing, calls no hook, and keeps history
    before = snapshot(db)
    again = db.cleanup_experiment_state(e)
    assert not again.changed and again.experiment_status is ExperimentStatus.COMPLETED
    assert snapshot(db) == before
    assert len(calls) == 1
    # a stopped, frozen run of an ended experiment cannot be resumed
    with pytest.raises(InvalidTransitionError):
        db.transition_run(runs["STOPPED"], "ONGOING")


def test_cleanup_after_a_crash_fails_runs_and_experiment(db, experiment):
    e = experiment.experiment_id
    run = make_run(db, e, "ONGOING").run_id
    report = db.cleanup_experiment_state(e, status="FAILED", run_status="FAILED", error="controller crashed")
    assert report.experiment_status is ExperimentStatus.FAILED
    failed = db.get_run(run)
    assert failed.status is RunStatus.FAILED and failed.ended_by is RunEndedBy.FAILED
    assert failed.error == "controller crashed"
    assert db.get_experiment(e).error == "controller crashed"


def test_cleanup_hook_errors_are_warnings(db, experiment):
    e = experiment.experiment_id
    db.upsert_shm_object("k", experiment_id=e)

    def broken(removed):
        raise RuntimeError("payload store gone")

    db.add_cleanup_hook(broken)
    with pytest.warns(RuntimeWarning, match="payload store gone"):
        report = db.cleanup_experiment_state(e)
    assert report.experiment_status is ExperimentStatus.COMPLETED
    assert db.list_shm_objects() == []
    db.remove_cleanup_hook(broken)


# --- SQLite: reads never take the write lock ------------------------------------------------------------


def test_open_read_session_does_not_block_a_writer_on_sqlite(tmp_path, monkeypatch):
    # a blocked writer would fail fast instead of hanging: short timeouts
    monkeypatch.setenv("RF_DB_BUSY_TIMEOUT_MS", "200")
    monkeypatch.setenv("RF_DB_WRITE_RETRY_SECONDS", "1")
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    reader = StateDB(url)
    writer = StateDB(url)
    try:
        reader.create_experiment("seen", str(tmp_path))
        with reader.session() as session:
            assert session.execute(text("SELECT COUNT(*) FROM experiments")).scalar() == 1
            started = time.monotonic()
            writer.create_experiment("written_meanwhile", str(tmp_path))
            writer.transition_experiment(writer.get_experiment_by_name("written_meanwhile").experiment_id, "RUNNING")
            elapsed = time.monotonic() - started
            # the read transaction keeps its snapshot
            assert session.execute(text("SELECT COUNT(*) FROM experiments")).scalar() == 1
        assert elapsed < 0.5, elapsed
        assert {e.name for e in reader.list_experiments()} == {"seen", "written_meanwhile"}
    finally:
        reader.close()
        writer.close()


def test_an_open_write_transaction_does_hold_the_lock_on_sqlite(tmp_path, monkeypatch):
    # the control for the test above: a write unit takes the lock up front
    monkeypatch.setenv("RF_DB_BUSY_TIMEOUT_MS", "100")
    monkeypatch.setenv("RF_DB_WRITE_RETRY_SECONDS", "1")
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    holder = StateDB(url)
    other = StateDB(url)
    try:
        with holder.transaction():
            before = time.monotonic()
            with pytest.raises(DBException, match="locked"):
                other.create_experiment("blocked", str(tmp_path))
            assert time.monotonic() - before >= 0.8
        assert other.list_experiments() == []
        assert other.create_experiment("later", str(tmp_path)).name == "later"
    finally:
        holder.close()
        other.close()


def _hold_write_lock(path, seconds: float):
    """Hold SQLite's write lock on ``path`` from another connection for ``seconds``, in a thread."""
    import sqlite3
    import threading

    taken = threading.Event()

    def hold() -> None:
        connection = sqlite3.connect(path, isolation_level=None)
        try:
            connection.execute("BEGIN IMMEDIATE")
            taken.set()
            time.sleep(seconds)
            connection.execute("ROLLBACK")
        finally:
            connection.close()

    thread = threading.Thread(target=hold)
    thread.start()
    assert taken.wait(5)
    return thread


def _open_with_a_run_and_a_task(tmp_path):
    """A SQLite database with a RUNNING experiment, one NEW run and one SCHEDULED task of worker 0."""
    path = tmp_path / "shared.db"
    database = StateDB(f"sqlite:///{path}")
    experiment = database.create_experiment("e", str(tmp_path))
    database.transition_experiment(experiment.experiment_id, "RUNNING")
    run = database.create_run(experiment.experiment_id, {"a": 1})
    database.create_worker_task(experiment.experiment_id, run.run_id, 0, 0)
    return path, database, run


def test_prepared_writes_wait_for_a_held_write_lock_then_commit(tmp_path):
    path, database, run = _open_with_a_run_and_a_task(tmp_path)
    try:
        writer = database._prepared_writer
        commits = writer.commits
        for write in (lambda: database.transition_run(run.run_id, "ONGOING"), lambda: database.claim_worker_task(0)):
            holder = _hold_write_lock(path, 0.3)
            started = time.monotonic()
            record = write()
            waited = time.monotonic() - started
            holder.join()
            assert record is not None and waited >= 0.25
        assert writer.commits == commits + 2  # both went through the prepared path, after waiting
        assert database.get_run(run.run_id).status is RunStatus.ONGOING
    finally:
        database.close()


def test_a_claim_gets_the_lock_soon_after_it_is_released(tmp_path):
    """A claim waits in short steps: not in SQLite's 25–100 ms sleeps, which would
    leave it asleep for tens of milliseconds after a lock held 0.24 s is released."""
    path = tmp_path / "shared.db"
    database = StateDB(f"sqlite:///{path}")
    try:
        experiment = database.create_experiment("e", str(tmp_path))
        database.create_worker_task(experiment.experiment_id, None, 0, 0)
        database.claim_worker_task(5)  # open the prepared connection (an idle poll)
        late = []
        for _ in range(3):
            holder = _hold_write_lock(path, 0.24)
            started = time.monotonic()
            database.claim_worker_task(7)  # an idle poll: it too waits for the lock
            late.append(time.monotonic() - started - 0.24)
            holder.join()
        # SQLite's steps would wake it 88 ms after the release (tries at 178, 228, 328 ms)
        assert min(late) < 0.04, late
        assert database.claim_worker_task(0) is not None
    finally:
        database.close()


def test_a_prepared_write_gives_up_after_the_busy_timeout_and_retry_time(tmp_path, monkeypatch):
    monkeypatch.setenv("RF_DB_BUSY_TIMEOUT_MS", "150")
    monkeypatch.setenv("RF_DB_WRITE_RETRY_SECONDS", "0")
    path, database, run = _open_with_a_run_and_a_task(tmp_path)
    try:
        history = len(database.history("run", run.run_id))
        for write in (lambda: database.transition_run(run.run_id, "ONGOING"), lambda: database.claim_worker_task(0)):
            holder = _hold_write_lock(path, 1.0)
            started = time.monotonic()
            with pytest.raises(DBException, match="cannot begin a write transaction.*locked"):
                write()
            assert 0.14 <= time.monotonic() - started < 0.9
            holder.join()
        assert database.get_run(run.run_id).status is RunStatus.NEW
        assert len(database.history("run", run.run_id)) == history
        assert database.list_tasks("worker", statuses=["IN_PROGRESS"]) == []
    finally:
        database.close()


def test_db_clock_is_utc(db):
    now = db.now()
    assert now.tzinfo is not None
    assert abs((now - datetime.now(timezone.utc)).total_seconds()) < 5


# --- a SQLite file deleted or replaced under an open StateDB ------------------------------------------


def _open_with_a_claim(path):
    database = StateDB(f"sqlite:///{path}")
    experiment = database.create_experiment("exp", str(path.parent / "experiments"))
    database.transition_experiment(experiment.experiment_id, "RUNNING")
    database.create_worker_task(experiment.experiment_id, None, 0, 0)
    database.create_worker_task(experiment.experiment_id, None, 0, 1)
    return database, experiment.experiment_id, database.claim_worker_task(0)


def test_writes_to_a_deleted_sqlite_file_are_refused_not_lost(tmp_path):
    path = tmp_path / "state.db"
    database, e, claim = _open_with_a_claim(path)
    try:
        for name in (path, path.with_name("state.db-wal"), path.with_name("state.db-shm")):
            name.unlink(missing_ok=True)
        writes = {
            "claim (prepared path)": lambda: database.claim_worker_task(0),
            "finish (prepared path)": lambda: database.finish_worker_task(claim.task_id, claim_token=claim.claim_token),
            "create (general path)": lambda: database.create_worker_task(e, None, 0, 2),
            "register (general path)": lambda: database.register_worker(e, 0, os.getpid()),
        }
        for what, write in writes.items():
            with pytest.raises(DBException, match="deleted") as info:
                write()
            assert str(path) in str(info.value), what
        assert not path.exists()  # and no empty database was made in its place
    finally:
        database.close()


def test_writes_to_a_replaced_sqlite_file_are_refused_and_the_new_file_is_untouched(tmp_path):
    path = tmp_path / "state.db"
    database, e, claim = _open_with_a_claim(path)
    try:
        other_path = tmp_path / "other.db"
        other, _, _ = _open_with_a_claim(other_path)
        other.close()
        os.replace(other_path, path)  # e.g. a restore from a backup
        replaced = StateDB(f"sqlite:///{path}")
        before = snapshot(replaced)
        for write in (
            lambda: database.claim_worker_task(0),
            lambda: database.finish_worker_task(claim.task_id, claim_token=claim.claim_token),
            lambda: database.create_worker_task(e, None, 0, 2),
        ):
            with pytest.raises(DBException, match="replaced"):
                write()
        assert snapshot(replaced) == before
        replaced.close()
    finally:
        database.close()


def test_cancel_current_task_fails_the_queued_and_running_tasks_in_one_unit(db, tmp_path):
    experiment = db.create_experiment("cancel", tmp_path)
    experiment_id = experiment.experiment_id
    db.transition_experiment(experiment_id, "RUNNING")
    db.set_experiment_task(experiment_id, "RUN_FIT")
    pending = db.create_worker_task(experiment_id, None, 0, None, status="PENDING")
    scheduled = db.create_worker_task(experiment_id, None, 0, None)
    running = db.create_worker_task(experiment_id, None, 1, None)
    db.claim_worker_task(1)
    done = db.create_controller_task(experiment_id, "RUN_FIT")
    db.claim_controller_task()
    db.finish_controller_task(done.task_id)
    queued_request = db.create_controller_task(experiment_id, "IC_STOP")
    other = db.create_experiment("other", tmp_path)
    untouched = db.create_worker_task(other.experiment_id, None, 0, None)

    report = db.cancel_current_task(experiment_id)

    assert report == CancelReport(
        experiment_id, ExperimentTask.RUN_FIT,
        (("worker", scheduled.task_id), ("worker", running.task_id), ("controller", queued_request.task_id)),
    )
    assert db.get_experiment(experiment_id).current_task is ExperimentTask.IDLE
    assert db.get_task("worker", pending.task_id).status is TaskStatus.PENDING
    assert db.get_task("controller", done.task_id).status is TaskStatus.COMPLETED
    assert db.get_task("worker", untouched.task_id).status is TaskStatus.SCHEDULED
    for kind, task_id, was in (
        ("worker", scheduled.task_id, TaskStatus.SCHEDULED),
        ("worker", running.task_id, TaskStatus.IN_PROGRESS),
        ("controller", queued_request.task_id, TaskStatus.SCHEDULED),
    ):
        task = db.get_task(kind, task_id)
        assert (task.status, task.error, task.ended_at is not None) == (TaskStatus.FAILED, "cancelled", True)
        last = db.history(f"{kind}_task", task_id)[-1]
        assert (last.from_status, last.to_status, last.reason) == (was, TaskStatus.FAILED, "cancelled")
    again = db.cancel_current_task(experiment_id)  # nothing left to cancel
    assert again == CancelReport(experiment_id, ExperimentTask.IDLE, ())


def test_cancel_current_task_refuses_bad_input_and_changes_nothing(db, tmp_path):
    experiment = db.create_experiment("cancel-bad", tmp_path)
    task = db.create_worker_task(experiment.experiment_id, None, 0, None)
    with pytest.raises(NotFoundError):
        db.cancel_current_task(experiment.experiment_id + 100)
    for bad in (True, -1, "1", None):
        with pytest.raises(ConfigError, match="experiment_id"):
            db.cancel_current_task(bad)
    for bad in ("", None, 3):
        with pytest.raises(ConfigError, match=r"reason=.*allowed: a non-empty string"):
            db.cancel_current_task(experiment.experiment_id, reason=bad)
    assert db.get_task("worker", task.task_id).status is TaskStatus.SCHEDULED
    assert len(db.history("worker_task", task.task_id)) == 1


def test_status_columns_are_written_by_the_status_change_builder_only():
    """``previous_status`` is set by one module: every other mention is a declaration or a read."""
    import ast
    from pathlib import Path

    import rapidfire_state

    package = Path(rapidfire_state.__file__).parent
    builder = package / "db" / "store" / "status_change.py"
    declarations = {package / "db" / "schema.py", package / "db" / "models.py"}
    writers = []
    for path in sorted(package.rglob("*.py")):
        if path == builder or path in declarations:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            named = (
                (isinstance(node, ast.keyword) and node.arg == "previous_status")
                or (isinstance(node, ast.Constant) and node.value == "previous_status")
                or (isinstance(node, ast.Attribute) and node.attr == "previous_status")
            )
            if named:
                writers.append(f"{path.relative_to(package)}:{node.lineno}")
    assert writers == [], f"status columns touched outside {builder.name}: {writers}"
