"""Records built from real rows: equal to what ``StateDB`` returns, and loud about a missing column.

``from_row`` used to read ``row.get(column)``, so a renamed or dropped column
became a silent None in every record.  Now a column a record needs must be in
the row; only fields whose table has no such column (a controller task has no
``worker_id``) may be absent.
"""

from __future__ import annotations

import dataclasses
import pickle

import pytest
from sqlalchemy import select, text

from rapidfire_state.constants import ControllerTask, RunStatus, TaskStatus, WorkerTask
from rapidfire_state.db import schema
from rapidfire_state.db.records import (
    ExperimentRecord,
    RunRecord,
    SHMObjectRecord,
    TaskRecord,
    TransitionRecord,
    WorkerRecord,
)
from rapidfire_state.exceptions import DBException


def _row(db, table, key_column, key):
    """The row as SQLAlchemy returns it (a RowMapping), read back from the database."""
    with db.engine.connect() as conn:
        return conn.execute(select(table).where(table.c[key_column] == key)).mappings().one()


@pytest.fixture
def filled(db, experiment):
    """One row of every record's table, made through the store."""
    run = db.create_run(experiment.experiment_id, {"lr": 0.1})
    run = db.transition_run(run.run_id, "ONGOING")
    worker_task = db.create_worker_task(experiment.experiment_id, run.run_id, 0, 3, config_options={"k": 1})
    controller_task = db.create_controller_task(experiment.experiment_id, ControllerTask.IC_STOP, run_id=run.run_id)
    worker = db.register_worker(experiment.experiment_id, 0, 4242, host="node-a")
    shm = db.upsert_shm_object("model/1", experiment_id=experiment.experiment_id, run_id=run.run_id, num_bytes=8)
    return {
        "experiment": experiment, "run": run, "worker_task": worker_task, "controller_task": controller_task,
        "worker": worker, "shm": shm, "history": db.history("run", run.run_id),
    }


def test_records_from_real_rows_equal_what_the_store_returns(db, filled):
    experiment, run = filled["experiment"], filled["run"]
    assert ExperimentRecord.from_row(_row(db, schema.experiments, "experiment_id", experiment.experiment_id)) == experiment
    assert RunRecord.from_row(_row(db, schema.runs, "run_id", run.run_id)) == run
    worker_row = _row(db, schema.worker_tasks, "task_id", filled["worker_task"].task_id)
    assert TaskRecord.from_row(worker_row, kind="worker") == filled["worker_task"]
    controller_row = _row(db, schema.controller_tasks, "task_id", filled["controller_task"].task_id)
    assert TaskRecord.from_row(controller_row, kind="controller") == filled["controller_task"]
    assert WorkerRecord.from_row(_row(db, schema.workers, "id", filled["worker"].id)) == filled["worker"]
    assert SHMObjectRecord.from_row(_row(db, schema.shm_objects, "key", "model/1")) == filled["shm"]
    last = filled["history"][-1]
    assert TransitionRecord.from_row(_row(db, schema.state_transitions, "transition_id", last.transition_id)) == last
    # a plain dict of the same row gives the same record
    assert RunRecord.from_row(dict(_row(db, schema.runs, "run_id", run.run_id))) == run


def test_records_from_rows_are_true_frozen_dataclasses(db, filled):
    run = RunRecord.from_row(_row(db, schema.runs, "run_id", filled["run"].run_id))
    assert run.status is RunStatus.ONGOING and run.flattened_config == {"lr": 0.1}
    assert run.config == {"lr": 0.1}
    assert run == RunRecord(**{f.name: getattr(run, f.name) for f in dataclasses.fields(run)})
    worker = WorkerRecord.from_row(_row(db, schema.workers, "id", filled["worker"].id))
    assert hash(worker) == hash(filled["worker"])  # a record without dict fields hashes as before
    assert pickle.loads(pickle.dumps(run)) == run
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.status = RunStatus.FAILED  # type: ignore[misc]
    assert dataclasses.replace(run, progress=0.5).progress == 0.5


def test_a_missing_column_names_the_record_the_column_and_the_columns_present(db, filled):
    row = dict(_row(db, schema.runs, "run_id", filled["run"].run_id))
    del row["num_chunks_visited"]
    with pytest.raises(DBException) as caught:
        RunRecord.from_row(row)
    message = str(caught.value)
    assert "RunRecord" in message and "'num_chunks_visited'" in message
    assert "columns present: run_id, experiment_id, status" in message and "num_epochs_completed" in message

    # an enum column, and a column read before the record is built
    task_row = dict(_row(db, schema.worker_tasks, "task_id", filled["worker_task"].task_id))
    for column in ("status", "task_type"):
        broken = {k: v for k, v in task_row.items() if k != column}
        with pytest.raises(DBException, match=f"TaskRecord needs column '{column}'"):
            TaskRecord.from_row(broken, kind="worker")
    history_row = dict(_row(db, schema.state_transitions, "transition_id", filled["history"][-1].transition_id))
    del history_row["to_status"]
    with pytest.raises(DBException, match="TransitionRecord needs column 'to_status'.*columns present: transition_id"):
        TransitionRecord.from_row(history_row)


def test_a_renamed_column_in_a_real_table_fails_loudly(db, filled):
    """What ``row.get`` hid: a column renamed in the database read back with SELECT *."""
    with db.engine.begin() as conn:
        conn.execute(text("ALTER TABLE workers RENAME COLUMN heartbeat_at TO last_seen_at"))
    with db.engine.connect() as conn:
        row = conn.execute(text("SELECT * FROM workers")).mappings().one()
    with pytest.raises(DBException) as caught:
        WorkerRecord.from_row(row)
    message = str(caught.value)
    assert "WorkerRecord needs column 'heartbeat_at'" in message and "last_seen_at" in message


def test_only_columns_the_table_lacks_may_be_absent(db, filled):
    # controller tasks have no worker, chunk or config_options column; worker tasks no config_leaf
    controller = TaskRecord.from_row(_row(db, schema.controller_tasks, "task_id", filled["controller_task"].task_id),
                                     kind="controller")
    assert (controller.worker_id, controller.chunk_id, controller.config_options) == (None, None, None)
    assert controller.task_type is ControllerTask.IC_STOP and controller.status is TaskStatus.SCHEDULED
    worker_row = dict(_row(db, schema.worker_tasks, "task_id", filled["worker_task"].task_id))
    worker = TaskRecord.from_row(worker_row, kind="worker")
    assert worker.config_leaf is None and worker.chunk_id == 3 and worker.task_type is WorkerTask.TRAIN_VAL
    # ... but a worker task's own columns are required
    del worker_row["chunk_id"]
    with pytest.raises(DBException, match="TaskRecord needs column 'chunk_id'"):
        TaskRecord.from_row(worker_row, kind="worker")


def test_a_value_outside_the_enum_is_refused_naming_it(db, filled):
    row = dict(_row(db, schema.runs, "run_id", filled["run"].run_id))
    row["status"] = "PAUSED"
    with pytest.raises(ValueError, match="'PAUSED' is not a valid RunStatus"):
        RunRecord.from_row(row)


def _driver_row(db, table, key_column, key):
    """``(columns, values)`` of one row as the driver returns it (a tuple), and the columns' processors."""
    statement = select(table).where(table.c[key_column] == key)
    with db.engine.connect() as conn:
        raw = conn.exec_driver_sql(*_compiled(db, statement)).fetchone()
    columns, processors = _columns(db, table)
    return columns, tuple(raw), processors


def _columns(db, table):
    """The table's column names, and each column's result processor on ``db``'s dialect."""
    dialect = db.engine.dialect
    columns = tuple(column.name for column in table.c)
    if not db.is_sqlite:  # as PostgreSQL's prepared path takes them
        from rapidfire_state.db.fastpath import _pg_result_processor

        return columns, tuple(_pg_result_processor(column, dialect) for column in table.c)
    return columns, tuple(column.type.dialect_impl(dialect).result_processor(dialect, None) for column in table.c)


def _compiled(db, statement):
    compiled = statement.compile(dialect=db.engine.dialect)
    params = compiled.construct_params()
    if compiled.positiontup is not None:
        return compiled.string, tuple(params[name] for name in compiled.positiontup)
    return compiled.string, params


def test_a_loader_of_driver_tuples_gives_the_records_from_row_gives(db, filled):
    run = filled["run"]
    columns, values, processors = _driver_row(db, schema.runs, "run_id", run.run_id)
    # an extra returned column (the prepared path returns previous_status too) is ignored
    load = RunRecord.values_loader(columns + ("extra",), processors + (None,))
    assert load(values + ("ignored",)) == run
    for kind, table, task in (("worker", schema.worker_tasks, filled["worker_task"]),
                              ("controller", schema.controller_tasks, filled["controller_task"])):
        columns, values, processors = _driver_row(db, table, "task_id", task.task_id)
        loaded = TaskRecord.values_loader(columns, processors, kind=kind)(values)
        assert loaded == task and loaded.kind == kind and type(loaded.task_type) is type(task.task_type)


def test_a_loader_refuses_missing_columns_when_it_is_made():
    columns = [column.name for column in schema.runs.c if column.name != "ended_at"]
    with pytest.raises(DBException, match="RunRecord needs column 'ended_at'.*columns present: run_id"):
        RunRecord.values_loader(columns, [None] * len(columns))


def test_prepared_path_records_equal_the_rows_read_back(db, tmp_path):
    """The prepared path (SQLite's and PostgreSQL's) builds records from driver tuples: the same records a SELECT gives."""
    database = db
    writer = database._prepared_writer
    experiment = database.create_experiment("e", str(tmp_path / "e"))
    database.transition_experiment(experiment.experiment_id, "RUNNING")
    run = database.create_run(experiment.experiment_id, {"a": {"b": 1}})
    database.create_worker_task(experiment.experiment_id, run.run_id, 0, 0, config_options={"x": [1, 2]})
    database.create_controller_task(experiment.experiment_id, ControllerTask.IC_CLONE_MODIFY, config_leaf={"lr": 1})
    commits = writer.commits
    changed = [
        database.transition_run(run.run_id, "ONGOING"),
        database.transition_run(run.run_id, "STOPPED", reason="paused"),
        database.transition_run(run.run_id, "ONGOING"),
        database.transition_run(run.run_id, "FAILED", error="boom"),
    ]
    assert changed[-1] == database.get_run(run.run_id) and changed[-1].ended_at is not None
    worker = database.claim_worker_task(0)
    assert worker == database.get_task("worker", worker.task_id) and worker.config_options == {"x": [1, 2]}
    done = database.finish_worker_task(worker.task_id, claim_token=worker.claim_token)
    assert done == database.get_task("worker", worker.task_id)
    controller = database.claim_controller_task(experiment.experiment_id)
    assert controller == database.get_task("controller", controller.task_id)
    assert controller.config == {"lr": 1} and controller.worker_id is None
    assert writer.commits == commits + 7  # every one of them went through the prepared path


@pytest.mark.parametrize("stored", [
    "2026-12-01 11:27:53.161000",  # db_now() and SQLAlchemy's own format
    "2026-12-01 11:27:53",
    "2026-12-01 11:27",
    "2026-12-01",
    "2026-12-01T11:27:53.161000",
    "2026-12-01 11:27:53.161000+02:00",
    "2026-12-01 11:27:53.1+0100xx",
    "2026-12-01 11:27:53.12345Z",
    "2026-12-01 11:27:53.¹²³⁴⁵⁶",
    "not a time at all, 26 chars",
])
def test_the_prepared_paths_timestamp_parser_agrees_with_sqlalchemys(tmp_path, stored):
    from rapidfire_state import StateDB
    from rapidfire_state.db.fastpath import _result_processor

    database = StateDB(tmp_path / "t.db")
    try:
        dialect = database.engine.dialect
        column = schema.runs.c.created_at
        general = column.type.dialect_impl(dialect).result_processor(dialect, None)
        fast = _result_processor(column, dialect)
        assert fast is not general  # the one-call parser is in use on SQLite
        try:
            expected = general(stored)
        except (TypeError, ValueError) as exc:
            with pytest.raises(type(exc)):
                fast(stored)
        else:
            got = fast(stored)
            assert got == expected and got.tzinfo == expected.tzinfo and repr(got) == repr(expected)
    finally:
        database.close()
