"""Schema, migrations and the open policy, on SQLite and (when configured) PostgreSQL.

Covers: the migrated schema equals the models (Alembic's ``compare_metadata``
and ``alembic check``); ``alembic upgrade head`` from the repository root;
downgrade/upgrade with and without data; ``migrate.REVISIONS`` against Alembic's
own walk; 8 processes opening one new database; the unknown-revision, behind-head
and backup paths; CHECK constraints and the partial unique index enforced by the
database itself; the inspection views; no Alembic import on an up-to-date open;
the metric outbox (0005): upgrade with data, a downgrade refused while rows are
pending, offline DDL, and its tables readable through ``sql`` and the reader role;
the claim indexes (0006): a round trip with rows, and offline DDL; the shm host
columns (0007): a round trip with rows (old rows have no host), a reader of a 0006
database, and offline DDL.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sqlite3
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import IntegrityError

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
from rapidfire_state.db import Base, migrate
from rapidfire_state.db.engine import resolve_url
from rapidfire_state.exceptions import (
    DatabaseDamagedError,
    DBException,
    MigrationError,
    RapidFireError,
    SchemaOutOfDateError,
    SchemaTooNewError,
)

REPO = Path(__file__).resolve().parents[1]
HEAD = migrate.HEAD_REVISION
FIRST = "0001_initial"
VIEWS = ("run_overview", "active_tasks", "shm_usage")


# --- helpers ----------------------------------------------------------------------------


def schema_diff(database: StateDB) -> list:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with database.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)


def raw_engine(url: str):
    """A plain engine (no StateDB policy) for raw SQL."""
    return create_engine(resolve_url(url))


def scalar(url: str, sql: str, **params):
    engine = raw_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(text(sql), params).scalar()
    finally:
        engine.dispose()


def execute(url: str, sql: str, **params) -> None:
    engine = raw_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text(sql), params)
    finally:
        engine.dispose()


def table_names(url: str) -> set[str]:
    engine = raw_engine(url)
    try:
        with engine.connect() as connection:
            return set(inspect(connection).get_table_names())
    finally:
        engine.dispose()


def check_constraint_names(url: str, table: str) -> set[str]:
    engine = raw_engine(url)
    try:
        with engine.connect() as connection:
            return {c["name"] for c in inspect(connection).get_check_constraints(table)}
    finally:
        engine.dispose()


def populate(database: StateDB, tmp_path: Path) -> dict:
    """Rows in every table, in every run status; returns what to look for later."""
    experiment = database.create_experiment("populated", str(tmp_path / "exps"), config_options={"k": 1})
    database.transition_experiment(experiment.experiment_id, "RUNNING")
    runs = {}
    for status in ("NEW", "ONGOING", "STOPPED", "COMPLETED", "FAILED", "KILLED"):
        run = database.create_run(experiment.experiment_id, {"lr": 0.1, "status": status})
        if status != "NEW":
            database.transition_run(run.run_id, "ONGOING")
            if status != "ONGOING":
                database.transition_run(run.run_id, status)
        runs[status] = run.run_id
    task = database.create_worker_task(experiment.experiment_id, runs["ONGOING"], 0, 3)
    database.claim_worker_task(0)
    database.create_controller_task(experiment.experiment_id, ControllerTask.IC_STOP, run_id=runs["STOPPED"])
    database.register_worker(experiment.experiment_id, 0, os.getpid())
    database.upsert_shm_object("model/1", object_type="MODEL", num_bytes=10, tensor_count=2,
                               experiment_id=experiment.experiment_id, run_id=runs["ONGOING"])
    return {"experiment_id": experiment.experiment_id, "runs": runs, "task_id": task.task_id}


COUNT_TABLES = ("experiments", "runs", "worker_tasks", "controller_tasks", "workers", "shm_objects", "state_transitions")


def row_counts(url: str) -> dict[str, int]:
    engine = raw_engine(url)
    try:
        with engine.connect() as connection:
            return {t: connection.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar() for t in COUNT_TABLES}
    finally:
        engine.dispose()


def run_statuses(url: str) -> dict[int, tuple]:
    engine = raw_engine(url)
    try:
        with engine.connect() as connection:
            return {
                r.run_id: (r.status, r.ended_by)
                for r in connection.execute(text("SELECT run_id, status, ended_by FROM runs"))
            }
    finally:
        engine.dispose()


def alembic_cli(*args: str, url: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["RF_DB_URL"] = url
    env.update(extra_env or {})
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )


# --- the schema equals the models -------------------------------------------------------


def test_fresh_database_is_migrated_and_equals_the_models(db, db_url):
    assert db.schema_revision() == HEAD
    assert db.last_migration == (None, HEAD)
    assert schema_diff(db) == []
    assert set(Base.metadata.tables) <= table_names(db_url)
    # reopening an up-to-date database migrates nothing
    again = StateDB(db_url)
    try:
        assert again.last_migration is None and again.backup_path is None
    finally:
        again.close()


def test_every_enum_column_has_its_named_check_constraint(db, db_url):
    expected = {
        "experiments": {"ck_experiments_status", "ck_experiments_current_task"},
        "runs": {"ck_runs_status", "ck_runs_source", "ck_runs_ended_by", "ck_runs_ended_by_matches_status"},
        "worker_tasks": {"ck_worker_tasks_status", "ck_worker_tasks_task_type"},
        "controller_tasks": {"ck_controller_tasks_status", "ck_controller_tasks_task_type"},
        "shm_objects": {"ck_shm_objects_object_type", "ck_shm_objects_location"},
        "state_transitions": {"ck_state_transitions_entity"},
    }
    for table, names in expected.items():
        assert names <= check_constraint_names(db_url, table), table


def test_alembic_check_finds_nothing(db, db_url):
    result = alembic_cli("check", url=db_url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No new upgrade operations detected" in result.stdout + result.stderr


def test_alembic_check_notices_a_drifted_schema(db, db_url):
    # the check above can fail: drop an index the models declare
    execute(db_url, "DROP INDEX ix_runs_status")
    result = alembic_cli("check", url=db_url)
    assert result.returncode != 0
    assert "ix_runs_status" in result.stdout + result.stderr


def test_alembic_upgrade_head_from_the_repository_root(db_url):
    result = alembic_cli("upgrade", "head", url=db_url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert scalar(db_url, "SELECT version_num FROM alembic_version") == HEAD
    database = StateDB(db_url)
    try:
        assert database.last_migration is None  # already at head: nothing to do
        assert schema_diff(database) == []
    finally:
        database.close()
    # a second upgrade is a no-op
    result = alembic_cli("upgrade", "head", url=db_url)
    assert result.returncode == 0, result.stderr


def test_alembic_upgrade_head_defaults_to_the_embedded_database(tmp_path):
    home = tmp_path / "other_home"
    env = dict(os.environ, RF_HOME=str(home))
    env.pop("RF_DB_URL", None)
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    path = home / "db" / "rapidfire_state.db"
    assert path.exists()
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT version_num FROM alembic_version").fetchone() == (HEAD,)


def test_downgrade_base_then_upgrade_head(db, db_url):
    db.downgrade("base")
    assert db.schema_revision() is None
    assert table_names(db_url) & set(Base.metadata.tables) == set()
    db.upgrade("head")
    assert db.schema_revision() == HEAD
    assert schema_diff(db) == []
    # the schema works after the round trip, foreign keys enforced on the pooled connection
    with pytest.raises(IntegrityError):
        with db.engine.begin() as connection:
            connection.execute(text("INSERT INTO workers (experiment_id, worker_id, pid, host) VALUES (999, 0, 1, 'h')"))
    experiment = db.create_experiment("after_round_trip", "/tmp/x")
    assert db.get_experiment(experiment.experiment_id).name == "after_round_trip"
    for view in VIEWS:
        scalar(db_url, f"SELECT COUNT(*) FROM {view}")


def test_data_bearing_downgrade_and_upgrade_keep_rows(db, db_url, tmp_path):
    info = populate(db, tmp_path)
    counts = row_counts(db_url)
    statuses = run_statuses(db_url)
    assert counts["runs"] == 6 and counts["state_transitions"] > 10

    db.downgrade(FIRST)
    assert db.schema_revision() == FIRST
    assert row_counts(db_url) == counts
    assert run_statuses(db_url) == statuses
    assert "ck_runs_ended_by_matches_status" not in check_constraint_names(db_url, "runs")
    # 0001's own CHECKs survived the table rebuild
    assert {"ck_runs_status", "ck_runs_ended_by"} <= check_constraint_names(db_url, "runs")
    # ... and still refuse a bogus status (alone now: no ended_by_matches_status to trip first)
    _refused(db_url, "UPDATE runs SET status = 'BOGUS' WHERE run_id = :r", "ck_runs_status", r=info["runs"]["NEW"])
    for view in VIEWS:
        scalar(db_url, f"SELECT COUNT(*) FROM {view}")

    db.upgrade("head")
    assert db.schema_revision() == HEAD
    assert row_counts(db_url) == counts
    assert run_statuses(db_url) == statuses
    assert "ck_runs_ended_by_matches_status" in check_constraint_names(db_url, "runs")
    assert schema_diff(db) == []
    assert scalar(db_url, "SELECT COUNT(*) FROM run_overview") == 6
    # the store still works on the migrated rows
    run = db.transition_run(info["runs"]["STOPPED"], "ONGOING")
    assert run.status is RunStatus.ONGOING
    assert [h.to_status for h in db.history("run", run.run_id)][-1] is RunStatus.ONGOING


CLAIMS = "0003_task_claims"
CLAIM_COLUMNS = ("claim_token", "claim_pid", "claim_host", "claim_process_started_at")


def column_names(url: str, table: str) -> list[str]:
    engine = raw_engine(url)
    try:
        with engine.connect() as connection:
            return [c["name"] for c in inspect(connection).get_columns(table)]
    finally:
        engine.dispose()


def test_task_claims_round_trip_keeps_rows_and_an_unrecorded_claim(db, db_url, tmp_path):
    info = populate(db, tmp_path)
    claimed = db.get_task("worker", info["task_id"])
    assert claimed.status is TaskStatus.IN_PROGRESS and claimed.claim_pid == os.getpid()
    counts = row_counts(db_url)
    db.downgrade(migrate.REVISIONS[migrate.REVISIONS.index(CLAIMS) - 1])
    for table in ("worker_tasks", "controller_tasks"):
        assert not set(CLAIM_COLUMNS) & set(column_names(db_url, table))
    assert row_counts(db_url) == counts
    for view in VIEWS:  # SQLite dropped the columns in place: the views still work
        scalar(db_url, f"SELECT COUNT(*) FROM {view}")
    db.upgrade("head")
    assert schema_diff(db) == []
    for table in ("worker_tasks", "controller_tasks"):
        names = column_names(db_url, table)
        assert names[names.index(CLAIM_COLUMNS[0]):][:4] == list(CLAIM_COLUMNS)
    assert row_counts(db_url) == counts
    # the task claimed before the revision has no recorded claim; it is judged by its
    # worker row (alive here), so neither a restart nor fail-stale takes it
    task = db.get_task("worker", info["task_id"])
    assert task.status is TaskStatus.IN_PROGRESS and task.claim_token is None and task.claim_pid is None
    db.register_worker(info["experiment_id"], 0, os.getpid())
    assert db.fail_stale_workers(60) == []
    assert db.get_task("worker", info["task_id"]).status is TaskStatus.IN_PROGRESS
    assert db.finish_worker_task(info["task_id"]).status is TaskStatus.COMPLETED


def test_task_claims_revision_in_offline_mode(db_url, tmp_path):
    # ``alembic upgrade … --sql`` prints the DDL without reading the database
    previous = migrate.REVISIONS[migrate.REVISIONS.index(CLAIMS) - 1]
    up = alembic_cli("upgrade", f"{previous}:{CLAIMS}", "--sql", url=db_url)
    assert up.returncode == 0, up.stdout + up.stderr
    for table in ("worker_tasks", "controller_tasks"):
        for column in CLAIM_COLUMNS:
            assert f"ALTER TABLE {table} ADD COLUMN {column}" in up.stdout
    assert f"version_num='{CLAIMS}'" in up.stdout
    down = alembic_cli("downgrade", f"{CLAIMS}:{previous}", "--sql", url=db_url)
    assert down.returncode == 0, down.stdout + down.stderr
    for table in ("worker_tasks", "controller_tasks"):
        for column in CLAIM_COLUMNS:
            assert f"ALTER TABLE {table} DROP COLUMN {column}" in down.stdout
    if db_url.startswith("sqlite"):
        assert not Path(db_url[len("sqlite:///"):]).exists()  # nothing was opened or created


# --- 0005: the metric outbox ------------------------------------------------------------------

OUTBOX = "0005_metric_outbox"
BEFORE_OUTBOX = migrate.REVISIONS[migrate.REVISIONS.index(OUTBOX) - 1]
OUTBOX_TABLES = ("metric_streams", "metric_outbox")
OUTBOX_URI = "file:///tmp/rf-test-mlruns"


def outbox_rows(url: str) -> dict[str, list[tuple]]:
    """Every row of both outbox tables, in key order (as text: equal means untouched)."""
    engine = raw_engine(url)
    try:
        with engine.connect() as connection:
            return {
                table: [tuple(map(str, row)) for row in connection.execute(text(f"SELECT * FROM {table} ORDER BY 1"))]
                for table in OUTBOX_TABLES
            }
    finally:
        engine.dispose()


def pending_index_sql(url: str) -> str:
    """The definition of the partial index on pending rows, as the database keeps it."""
    if url.startswith("sqlite"):
        return scalar(url, "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = 'ix_metric_outbox_pending'")
    return scalar(url, "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_metric_outbox_pending'")


def _outbox_with_pending_rows(database: StateDB, runs: dict) -> dict:
    """A stream linked to the ONGOING run with points and a status change, and a loose one; one batch delivered."""
    linked = database.metric_stream(OUTBOX_URI, "mlflow-ongoing", run_id=runs["ONGOING"])
    loose = database.metric_stream(OUTBOX_URI, "mlflow-loose")
    database.append_metric_rows([
        {"stream_id": linked, "kind": "METRIC", "key": "loss", "value": 1.0 / (i + 1), "step": i, "timestamp_ms": 1000 + i}
        for i in range(4)
    ])
    database.transition_run(runs["ONGOING"], "STOPPED")  # one STATUS row on the linked stream
    database.append_metric_rows([
        {"stream_id": loose, "kind": "PARAM", "key": "lr", "text_value": "0.1", "timestamp_ms": 2000},
        {"stream_id": loose, "kind": "TAG", "key": "team", "text_value": "rf", "timestamp_ms": 2001},
    ])
    batch = database.claim_metric_batch(OUTBOX_URI)
    assert [row.kind for row in batch.rows] == ["METRIC"] * 4
    assert database.settle_metric_batch(batch, delivered=[row.outbox_id for row in batch.rows])
    assert database.pending_metric_rows() == 3
    return {"linked": linked, "loose": loose}


def test_metric_outbox_upgrade_from_0004_keeps_rows_and_makes_empty_tables(db, db_url, tmp_path):
    info = populate(db, tmp_path)
    counts = row_counts(db_url)
    statuses = run_statuses(db_url)
    db.downgrade(BEFORE_OUTBOX)  # an empty outbox: nothing to refuse
    assert db.schema_revision() == BEFORE_OUTBOX
    assert not set(OUTBOX_TABLES) & table_names(db_url)
    assert row_counts(db_url) == counts and run_statuses(db_url) == statuses
    # the 0004 schema still runs its store: a run change with no outbox to write to
    for view in VIEWS:
        scalar(db_url, f"SELECT COUNT(*) FROM {view}")

    db.upgrade("head")
    assert db.schema_revision() == HEAD
    assert set(OUTBOX_TABLES) <= table_names(db_url)
    assert outbox_rows(db_url) == {"metric_streams": [], "metric_outbox": []}
    assert row_counts(db_url) == counts and run_statuses(db_url) == statuses
    assert schema_diff(db) == []
    index = " ".join(pending_index_sql(db_url).split())
    assert "WHERE" in index and "delivered_at IS NULL" in index and "failed_at IS NULL" in index
    # the new tables work on the old rows: a stream of an old run gets its next change
    stream_id = db.metric_stream(OUTBOX_URI, "after-upgrade", run_id=info["runs"]["STOPPED"])
    db.transition_run(info["runs"]["STOPPED"], "ONGOING")
    assert db.pending_metric_rows(run_id=info["runs"]["STOPPED"]) == 1
    assert db.pending_metric_rows_by_experiment() == {info["experiment_id"]: 1}
    with pytest.raises(IntegrityError):  # foreign keys of the new tables are enforced
        with db.engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO metric_outbox (stream_id, kind, key, timestamp_ms) VALUES (:s, 'METRIC', 'k', 1)"
            ), {"s": stream_id + 1000})


def test_metric_outbox_downgrade_is_refused_while_rows_are_pending(db, db_url, tmp_path):
    info = populate(db, tmp_path)
    streams = _outbox_with_pending_rows(db, info["runs"])
    counts = row_counts(db_url)
    before = outbox_rows(db_url)
    for target in (BEFORE_OUTBOX, "base"):
        with pytest.raises(MigrationError) as refused:
            db.downgrade(target)
        error = refused.value
        assert (error.table, error.row_count, error.revision) == ("metric_outbox", 3, OUTBOX)
        message = str(error)
        assert "3 metric row(s)" in message and "Nothing was changed" in message and "flush()" in message
        assert db.schema_revision() == HEAD
        assert outbox_rows(db_url) == before and row_counts(db_url) == counts
        assert schema_diff(db) == []  # not an index dropped
    # the database works on after the refusal (and the migration lock was released)
    db.append_metric_rows([{"stream_id": streams["loose"], "kind": "TAG", "key": "late", "text_value": "1",
                            "timestamp_ms": 3000}])
    assert db.pending_metric_rows() == 4

    # delivered (the status row) and given up (the rest): still one pending, still refused
    execute(db_url, "UPDATE metric_outbox SET delivered_at = CURRENT_TIMESTAMP WHERE kind = 'STATUS'")
    execute(db_url, "UPDATE metric_outbox SET failed_at = CURRENT_TIMESTAMP, error = 'given up' "
                    "WHERE kind = 'PARAM' OR key = 'team'")
    with pytest.raises(MigrationError) as refused:
        db.downgrade(BEFORE_OUTBOX)
    assert refused.value.row_count == 1
    execute(db_url, "UPDATE metric_outbox SET delivered_at = CURRENT_TIMESTAMP WHERE key = 'late'")
    assert db.pending_metric_rows() == 0

    db.downgrade(BEFORE_OUTBOX)
    assert db.schema_revision() == BEFORE_OUTBOX
    assert not set(OUTBOX_TABLES) & table_names(db_url)
    assert row_counts(db_url) == counts
    db.upgrade("head")
    assert outbox_rows(db_url) == {"metric_streams": [], "metric_outbox": []}
    assert schema_diff(db) == []
    assert db.pending_metric_rows() == 0 and db.claim_metric_batch(OUTBOX_URI) is None


def test_metric_outbox_revision_in_offline_mode(db_url):
    up = alembic_cli("upgrade", f"{BEFORE_OUTBOX}:{OUTBOX}", "--sql", url=db_url)
    assert up.returncode == 0, up.stdout + up.stderr
    script = " ".join(up.stdout.split())
    for table in OUTBOX_TABLES:
        assert f"CREATE TABLE {table} (" in script
    assert "CREATE UNIQUE INDEX uq_metric_streams_tracking_uri_metric_run_id ON metric_streams (tracking_uri, metric_run_id)" in script
    assert ("CREATE INDEX ix_metric_outbox_pending ON metric_outbox (stream_id, outbox_id) "
            "WHERE delivered_at IS NULL AND failed_at IS NULL") in script
    assert "CHECK (kind IN ('METRIC', 'PARAM', 'TAG', 'STATUS'))" in script
    assert "FOREIGN KEY(stream_id) REFERENCES metric_streams (stream_id)" in script
    grant = "GRANT SELECT ON metric_streams, metric_outbox TO rapidfire_reader"
    assert (grant in script) == db_url.startswith("postgresql")
    assert f"version_num='{OUTBOX}'" in script

    down = alembic_cli("downgrade", f"{OUTBOX}:{BEFORE_OUTBOX}", "--sql", url=db_url)
    assert down.returncode == 0, down.stdout + down.stderr
    script = " ".join(down.stdout.split())
    # offline there are no rows to count: the drops are emitted as they are, outbox first
    assert "count(*)" not in script.lower()
    assert script.index("DROP TABLE metric_outbox") < script.index("DROP TABLE metric_streams")
    assert "DROP INDEX ix_metric_outbox_pending" in script
    assert f"version_num='{BEFORE_OUTBOX}'" in script
    if db_url.startswith("sqlite"):
        assert not Path(db_url[len("sqlite:///"):]).exists()  # nothing was opened or created


def test_metric_outbox_check_constraint_has_the_models_name(db, db_url):
    # alembic check does not compare CHECK constraints: a name the convention
    # prefixed twice ("ck_metric_outbox_ck_metric_outbox_kind") would go unseen
    from rapidfire_state.db import schema as tables

    declared = {c.name for c in tables.metric_outbox.constraints if c.__class__.__name__ == "CheckConstraint"}
    assert declared == {"ck_metric_outbox_kind"}
    assert check_constraint_names(db_url, "metric_outbox") == declared


def test_metric_outbox_tables_are_readable_by_sql_and_its_reader_role(db, db_url, tmp_path, capsys):
    from rapidfire_state.cli import main

    def sql_json(statement: str):
        code = main(["--url", db_url, "sql", statement, "--json"])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return json.loads(captured.out)

    def sql_refused(statement: str) -> str:
        code = main(["--url", db_url, "sql", statement])
        captured = capsys.readouterr()
        assert code == 2 and captured.out == ""
        return captured.err

    def privileges() -> dict:
        return {
            (table, what): scalar(db_url, "SELECT has_table_privilege(:r, :t, :p)",
                                  r=migrate.SQL_READER_ROLE, t=table, p=what)
            for table in OUTBOX_TABLES for what in ("SELECT", "INSERT", "UPDATE", "DELETE")
        }

    info = populate(db, tmp_path)
    if not db.is_sqlite:
        # the grant comes back with the tables on a round trip through 0004
        db.downgrade(BEFORE_OUTBOX)
        db.upgrade("head")
        assert privileges() == {(t, p): p == "SELECT" for t in OUTBOX_TABLES for p in ("SELECT", "INSERT", "UPDATE", "DELETE")}
    _outbox_with_pending_rows(db, info["runs"])
    before = outbox_rows(db_url)
    assert sql_json("select count(*) as n from metric_outbox") == [{"n": 7}]
    assert sql_json("SELECT metric_run_id, run_id FROM metric_streams ORDER BY stream_id") == [
        {"metric_run_id": "mlflow-ongoing", "run_id": info["runs"]["ONGOING"]},
        {"metric_run_id": "mlflow-loose", "run_id": None},
    ]
    assert sql_json(
        "SELECT s.metric_run_id, count(*) AS pending FROM metric_outbox o JOIN metric_streams s "
        "ON s.stream_id = o.stream_id WHERE o.delivered_at IS NULL AND o.failed_at IS NULL "
        "GROUP BY s.metric_run_id ORDER BY s.metric_run_id"
    ) == [{"metric_run_id": "mlflow-loose", "pending": 2}, {"metric_run_id": "mlflow-ongoing", "pending": 1}]
    if not db.is_sqlite:
        assert "would write" in sql_refused("WITH d AS (DELETE FROM metric_outbox RETURNING 1) SELECT count(*) FROM d")
        assert "lock rows" in sql_refused("SELECT * FROM metric_streams FOR UPDATE")
    assert "refused" in sql_refused("UPDATE metric_outbox SET delivered_at = NULL")
    assert outbox_rows(db_url) == before


# --- 0006: the claim indexes ------------------------------------------------------------------

CLAIM_INDEXES_REVISION = "0006_claim_indexes"
BEFORE_CLAIM_INDEXES = migrate.REVISIONS[migrate.REVISIONS.index(CLAIM_INDEXES_REVISION) - 1]
CLAIM_INDEXES = {"ix_worker_tasks_claim": "worker_tasks", "ix_controller_tasks_claim": "controller_tasks"}


def index_sql(url: str, name: str) -> str | None:
    """An index's definition as the database keeps it, whitespace folded; None when absent."""
    if url.startswith("sqlite"):
        found = scalar(url, "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = :n", n=name)
    else:
        found = scalar(url, "SELECT indexdef FROM pg_indexes WHERE indexname = :n", n=name)
    return " ".join(found.split()) if found is not None else None


def task_rows(url: str) -> dict[str, list[tuple]]:
    """Both task tables' rows, without the claim's process identity (0008 drops it on the way down)."""
    engine = raw_engine(url)
    try:
        with engine.connect() as connection:
            rows = {}
            for table in ("worker_tasks", "controller_tasks"):
                names = [c["name"] for c in inspect(connection).get_columns(table) if c["name"] != "claim_process_identity"]
                rows[table] = [tuple(map(str, row)) for row in connection.execute(
                    text(f"SELECT {', '.join(names)} FROM {table} ORDER BY 1"))]
            return rows
    finally:
        engine.dispose()


def test_claim_indexes_round_trip_keeps_rows_and_claims_work_on_both_sides(db, db_url, tmp_path):
    info = populate(db, tmp_path)
    queued = db.create_worker_task(info["experiment_id"], info["runs"]["ONGOING"], 1, 3)
    counts, rows = row_counts(db_url), task_rows(db_url)
    for name in CLAIM_INDEXES:
        definition = index_sql(db_url, name)
        assert definition is not None and "WHERE" in definition and "SCHEDULED" in definition, definition

    db.downgrade(BEFORE_CLAIM_INDEXES)
    assert db.schema_revision() == BEFORE_CLAIM_INDEXES
    assert all(index_sql(db_url, name) is None for name in CLAIM_INDEXES)
    assert row_counts(db_url) == counts and task_rows(db_url) == rows
    # ... and the older indexes of 0001 are still there
    assert index_sql(db_url, "ix_worker_tasks_worker_id_status_task_id") is not None
    for view in VIEWS:
        scalar(db_url, f"SELECT COUNT(*) FROM {view}")

    db.upgrade("head")
    assert db.schema_revision() == HEAD
    assert schema_diff(db) == []
    assert row_counts(db_url) == counts and task_rows(db_url) == rows
    worker_index = index_sql(db_url, "ix_worker_tasks_claim")
    assert "(worker_id, task_id)" in worker_index and "status" in worker_index and "'SCHEDULED'" in worker_index
    assert "(experiment_id, task_id)" in index_sql(db_url, "ix_controller_tasks_claim")
    # the claim runs on the migrated rows: the task queued before the round trip is claimed
    claimed = db.claim_worker_task(1, experiment_id=info["experiment_id"])
    assert claimed is not None and claimed.task_id == queued.task_id and claimed.status is TaskStatus.IN_PROGRESS
    assert db.claim_worker_task(1) is None
    controller = db.claim_controller_task(info["experiment_id"])
    assert controller is not None and controller.task_type is ControllerTask.IC_STOP


def test_claim_indexes_revision_in_offline_mode(db_url):
    up = alembic_cli("upgrade", f"{BEFORE_CLAIM_INDEXES}:{CLAIM_INDEXES_REVISION}", "--sql", url=db_url)
    assert up.returncode == 0, up.stdout + up.stderr
    script = " ".join(up.stdout.split())
    assert "CREATE INDEX ix_worker_tasks_claim ON worker_tasks (worker_id, task_id) WHERE status = 'SCHEDULED'" in script
    assert ("CREATE INDEX ix_controller_tasks_claim ON controller_tasks (experiment_id, task_id) "
            "WHERE status = 'SCHEDULED'") in script
    assert "CREATE TABLE" not in script and "ALTER TABLE" not in script  # indexes only, no rebuild
    assert f"version_num='{CLAIM_INDEXES_REVISION}'" in script
    down = alembic_cli("downgrade", f"{CLAIM_INDEXES_REVISION}:{BEFORE_CLAIM_INDEXES}", "--sql", url=db_url)
    assert down.returncode == 0, down.stdout + down.stderr
    script = " ".join(down.stdout.split())
    for name in CLAIM_INDEXES:
        assert f"DROP INDEX {name}" in script
    assert f"version_num='{BEFORE_CLAIM_INDEXES}'" in script
    if db_url.startswith("sqlite"):
        assert not Path(db_url[len("sqlite:///"):]).exists()  # nothing was opened or created


# --- 0007: which host holds each shm object, and its cross-host copy ---------------------------

SHM_HOST_REVISION = "0007_shm_host"
BEFORE_SHM_HOST = migrate.REVISIONS[migrate.REVISIONS.index(SHM_HOST_REVISION) - 1]
SHM_HOST_COLUMNS = ("host", "copy_path")


def shm_rows(url: str) -> list[tuple]:
    """The columns of ``shm_objects`` every revision has, per row in key order (as text)."""
    engine = raw_engine(url)
    try:
        with engine.connect() as connection:
            return [tuple(map(str, row)) for row in connection.execute(text(
                "SELECT shm_object_id, key, experiment_id, run_id, chunk_id, object_type, location, disk_path, "
                "num_bytes, tensor_count, manager_name, created_at FROM shm_objects ORDER BY key"))]
    finally:
        engine.dispose()


def test_shm_host_round_trip_keeps_rows_and_old_rows_have_no_host(db, db_url, tmp_path):
    from rapidfire_state.db.store import processes

    populate(db, tmp_path)
    db.upsert_shm_object("spilled", location="DISK", disk_path=str(tmp_path / "x.pt"), copy_path=str(tmp_path / "c.pt"))
    assert db.get_shm_object("model/1").host == processes.HOST
    counts, rows = row_counts(db_url), shm_rows(db_url)

    db.downgrade(BEFORE_SHM_HOST)
    assert db.schema_revision() == BEFORE_SHM_HOST
    assert not set(SHM_HOST_COLUMNS) & set(column_names(db_url, "shm_objects"))
    assert row_counts(db_url) == counts and shm_rows(db_url) == rows
    for view in VIEWS:  # SQLite dropped the columns in place: the views still work
        scalar(db_url, f"SELECT COUNT(*) FROM {view}")
    # a reader of this code opens the database at 0006 as it is: rows without host or copy
    reader = StateDB(db_url, read_only=True)
    try:
        assert reader.probe.status == "behind"
        listed = reader.list_shm_objects()
        assert [r.key for r in listed] == ["model/1", "spilled"] and all(r.host is None and r.copy_path is None for r in listed)
        assert reader.get_shm_object("spilled").disk_path == str(tmp_path / "x.pt")
        assert reader.shm_page(limit=10)[0] == listed
        assert reader.list_shm_objects(copy_path=str(tmp_path / "c.pt")) == []
    finally:
        reader.close()

    db.upgrade("head")
    assert schema_diff(db) == []
    assert column_names(db_url, "shm_objects")[-2:] == list(SHM_HOST_COLUMNS)
    assert row_counts(db_url) == counts and shm_rows(db_url) == rows
    # rows written before 0007 have no host: taken as this host's, until written again
    old = db.get_shm_object("model/1")
    assert old.host is None and old.copy_path is None and not old.held_elsewhere(processes.HOST)
    assert db.upsert_shm_object("model/1", object_type="MODEL", num_bytes=10).host == processes.HOST


def test_shm_host_revision_in_offline_mode(db_url):
    up = alembic_cli("upgrade", f"{BEFORE_SHM_HOST}:{SHM_HOST_REVISION}", "--sql", url=db_url)
    assert up.returncode == 0, up.stdout + up.stderr
    script = " ".join(up.stdout.split())
    assert "ALTER TABLE shm_objects ADD COLUMN host VARCHAR(255)" in script
    assert "ALTER TABLE shm_objects ADD COLUMN copy_path TEXT" in script
    assert "CREATE TABLE" not in script  # no table rebuild
    assert f"version_num='{SHM_HOST_REVISION}'" in script
    down = alembic_cli("downgrade", f"{SHM_HOST_REVISION}:{BEFORE_SHM_HOST}", "--sql", url=db_url)
    assert down.returncode == 0, down.stdout + down.stderr
    for column in SHM_HOST_COLUMNS:
        assert f"ALTER TABLE shm_objects DROP COLUMN {column}" in down.stdout
    if db_url.startswith("sqlite"):
        assert not Path(db_url[len("sqlite:///"):]).exists()  # nothing was opened or created


# --- 0008: each recorded process named by its boot and its start since boot ---------------------

IDENTITY_REVISION = "0008_process_identity"
BEFORE_IDENTITY = migrate.REVISIONS[migrate.REVISIONS.index(IDENTITY_REVISION) - 1]
IDENTITY_COLUMNS = {
    "experiments": "owner_process_identity",
    "workers": "process_identity",
    "worker_tasks": "claim_process_identity",
    "controller_tasks": "claim_process_identity",
    "metric_streams": "claim_process_identity",
}


def test_process_identity_round_trip_keeps_rows_and_old_rows_are_judged_by_start_time(db, db_url, tmp_path):
    from rapidfire_state.db.store.processes import process_identity

    info = populate(db, tmp_path)
    e = info["experiment_id"]
    own = process_identity(os.getpid())
    assert own is not None  # Linux
    assert db.get_task("worker", info["task_id"]).claim_process_identity == own
    assert db.list_workers(e)[0].process_identity == own
    counts = row_counts(db_url)

    db.downgrade(BEFORE_IDENTITY)
    for table, column in IDENTITY_COLUMNS.items():
        assert column not in column_names(db_url, table)
    assert row_counts(db_url) == counts
    for view in VIEWS:  # SQLite dropped the columns in place: the views still work
        scalar(db_url, f"SELECT COUNT(*) FROM {view}")
    # a reader of this code opens the database at 0007 as it is: every listing, identities None
    reader = StateDB(db_url, read_only=True)
    try:
        assert reader.probe.status == "behind"
        assert [x.experiment_id for x in reader.list_experiments()] == [e]
        assert reader.get_experiment(e).owner_process_identity is None
        assert reader.get_running_experiment().experiment_id == e
        [worker] = reader.list_workers(e)
        assert worker.pid == os.getpid() and worker.process_identity is None
        task = reader.get_task("worker", info["task_id"])
        assert task.claim_pid == os.getpid() and task.claim_process_identity is None
        assert [t.task_id for t in reader.list_tasks("worker", statuses=["IN_PROGRESS"])] == [info["task_id"]]
        assert len(reader.list_tasks("controller", experiment_id=e)) == 1
        assert [w.worker_id for w, _ in reader.open_workers(e)] == [0]
        assert reader.status_counts(e).workers[0][0].process_identity is None
    finally:
        reader.close()

    db.upgrade("head")
    assert schema_diff(db) == []
    for table, column in IDENTITY_COLUMNS.items():
        assert column_names(db_url, table)[-1] == column
    assert row_counts(db_url) == counts
    # rows from before 0008 have no identity: judged by their OS start time, as before
    assert db.list_workers(e)[0].process_identity is None
    assert db.fail_stale_workers(60) == []
    assert db.get_task("worker", info["task_id"]).status is TaskStatus.IN_PROGRESS
    # a worker registered again records its identity
    assert db.register_worker(e, 0, os.getpid()).process_identity == own


def test_process_identity_revision_in_offline_mode(db_url):
    up = alembic_cli("upgrade", f"{BEFORE_IDENTITY}:{IDENTITY_REVISION}", "--sql", url=db_url)
    assert up.returncode == 0, up.stdout + up.stderr
    script = " ".join(up.stdout.split())
    for table, column in IDENTITY_COLUMNS.items():
        assert f"ALTER TABLE {table} ADD COLUMN {column} VARCHAR(64)" in script
    assert "CREATE TABLE" not in script  # no table rebuild
    assert f"version_num='{IDENTITY_REVISION}'" in script
    down = alembic_cli("downgrade", f"{IDENTITY_REVISION}:{BEFORE_IDENTITY}", "--sql", url=db_url)
    assert down.returncode == 0, down.stdout + down.stderr
    for table, column in IDENTITY_COLUMNS.items():
        assert f"ALTER TABLE {table} DROP COLUMN {column}" in down.stdout
    if db_url.startswith("sqlite"):
        assert not Path(db_url[len("sqlite:///"):]).exists()  # nothing was opened or created


# --- an upgrade the rows refuse ----------------------------------------------------------------


def test_upgrade_is_refused_when_data_violates_the_new_check(db, db_url, tmp_path):
    # a row 0001 accepts but 0002 forbids: the upgrade fails whole and changes nothing
    populate(db, tmp_path)
    db.downgrade(FIRST)
    run_id = min(run_statuses(db_url))
    execute(db_url, "UPDATE runs SET status = 'COMPLETED', ended_by = 'KILLED' WHERE run_id = :r", r=run_id)
    counts = row_counts(db_url)
    statuses = run_statuses(db_url)
    with pytest.raises(MigrationError) as info:
        db.upgrade("head")
    assert isinstance(info.value, DBException)
    assert (info.value.table, info.value.constraint) == ("runs", "ck_runs_ended_by_matches_status")
    assert info.value.row_ids == (run_id,) and info.value.row_count == 1
    assert info.value.revision == "0002_run_ended_by_check"
    assert db.schema_revision() == FIRST
    assert row_counts(db_url) == counts
    assert run_statuses(db_url) == statuses
    assert "ck_runs_ended_by_matches_status" not in check_constraint_names(db_url, "runs")
    for view in VIEWS:
        scalar(db_url, f"SELECT COUNT(*) FROM {view}")


def test_revisions_list_equals_alembic_script_directory():
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    for script in (
        ScriptDirectory(str(migrate.migrations_dir())),
        ScriptDirectory.from_config(Config(str(REPO / "alembic.ini"))),
    ):
        walked = [s.revision for s in script.walk_revisions("base", "heads")]
        assert tuple(reversed(walked)) == migrate.REVISIONS
        assert script.get_heads() == [migrate.HEAD_REVISION]
        assert script.get_bases() == [migrate.REVISIONS[0]]
        # a straight line: each revision's parent is the one before it
        for previous, revision in zip((None,) + migrate.REVISIONS, migrate.REVISIONS):
            assert script.get_revision(revision).down_revision == previous
    assert migrate.HEAD_REVISION == migrate.REVISIONS[-1]


# --- many processes opening one brand-new database --------------------------------------


def _open_concurrently(url: str, barrier, results) -> None:
    try:
        from rapidfire_state import StateDB as _StateDB

        barrier.wait(timeout=120)
        database = _StateDB(url)
        try:
            results.put(("ok", os.getpid(), database.last_migration, database.schema_revision()))
        finally:
            database.close()
    except BaseException:
        results.put(("error", os.getpid(), traceback.format_exc(), None))


def _race_open(url: str, processes: int = 8) -> list:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes)
    results = ctx.Queue()
    children = [ctx.Process(target=_open_concurrently, args=(url, barrier, results)) for _ in range(processes)]
    for child in children:
        child.start()
    try:
        outcomes = [results.get(timeout=180) for _ in children]
    finally:
        for child in children:
            child.join(timeout=60)
            if child.is_alive():
                child.kill()
    assert all(child.exitcode == 0 for child in children), [c.exitcode for c in children]
    return outcomes


def _assert_migrated_once(outcomes: list) -> None:
    errors = [o[2] for o in outcomes if o[0] != "ok"]
    assert not errors, "\n".join(errors)
    migrations = [o[2] for o in outcomes if o[2] is not None]
    assert migrations == [(None, HEAD)], outcomes
    assert all(o[3] == HEAD for o in outcomes)


@pytest.mark.slow
def test_eight_processes_open_a_new_sqlite_file_and_migrate_it_once(tmp_path):
    path = tmp_path / "brand_new" / "state.db"
    url = f"sqlite:///{path}"
    _assert_migrated_once(_race_open(url))
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT COUNT(*) FROM alembic_version").fetchone() == (1,)
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert not list(path.parent.glob("*.bak"))


@pytest.mark.slow
def test_eight_processes_open_a_new_postgresql_database_and_migrate_it_once(pg_database_url):
    _assert_migrated_once(_race_open(pg_database_url))
    assert scalar(pg_database_url, "SELECT COUNT(*) FROM alembic_version") == 1


# --- unknown, newer and older revisions ----------------------------------------------------


def _sqlite_files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.parent.iterdir()) if p.is_file()}


@pytest.mark.parametrize("stamp", ["9999_from_the_future", "0003_not_shipped_yet"])
def test_unknown_revision_on_sqlite_is_refused_and_file_untouched(tmp_path, stamp):
    path = tmp_path / "db" / "state.db"
    url = f"sqlite:///{path}"
    database = StateDB(url)
    database.create_experiment("keep_me", str(tmp_path))
    database.close()
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE alembic_version SET version_num = ?", (stamp,))
    connection.close()
    before = path.read_bytes()
    files_before = _sqlite_files(path)
    for auto_upgrade in (None, True, False):
        with pytest.raises(SchemaTooNewError) as info:
            StateDB(url, auto_upgrade=auto_upgrade)
        assert isinstance(info.value, RapidFireError)
        assert stamp in str(info.value)
    assert path.read_bytes() == before
    # no backup and no other file changed; a reader of a WAL database may leave
    # the shared-memory index and an empty WAL behind, never WAL frames
    after = _sqlite_files(path)
    wal = after.pop("state.db-wal", b"")
    after.pop("state.db-shm", None)
    files_before.pop("state.db-shm", None)
    files_before.pop("state.db-wal", None)
    assert wal == b""
    assert after == files_before
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT version_num FROM alembic_version").fetchone() == (stamp,)


def test_unknown_revision_refused_on_every_backend(db, db_url):
    db.create_experiment("keep_me", "/tmp/exps")
    db.close()
    execute(db_url, "UPDATE alembic_version SET version_num = 'ffff_unknown'")
    counts = row_counts(db_url)
    with pytest.raises(SchemaTooNewError, match="ffff_unknown"):
        StateDB(db_url, auto_upgrade=True)
    # the explicit upgrade refuses too
    assert scalar(db_url, "SELECT version_num FROM alembic_version") == "ffff_unknown"
    assert row_counts(db_url) == counts


def _database_at_first_revision(url: str, tmp_path: Path) -> dict:
    database = StateDB(url)
    info = populate(database, tmp_path)
    database.downgrade(FIRST)
    assert database.schema_revision() == FIRST
    database.close()
    info["counts"] = row_counts(url)
    info["statuses"] = run_statuses(url)
    return info


#: tables of the models that the first revision does not create
ADDED_AFTER_FIRST = {"metric_streams", "metric_outbox"}


def test_sqlite_behind_head_is_backed_up_then_upgraded(tmp_path):
    path = tmp_path / "db" / "state.db"
    url = f"sqlite:///{path}"
    info = _database_at_first_revision(url, tmp_path)

    database = StateDB(url)
    try:
        assert database.last_migration == (FIRST, HEAD)
        assert database.schema_revision() == HEAD
        assert row_counts(url) == info["counts"]
        assert run_statuses(url) == info["statuses"]
        assert schema_diff(database) == []
        backup = Path(database.backup_path)
    finally:
        database.close()
    assert backup.exists() and backup != path and backup.parent == path.parent
    with sqlite3.connect(f"{backup.as_uri()}?mode=ro", uri=True) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert connection.execute("SELECT version_num FROM alembic_version").fetchone() == (FIRST,)
        for table, count in info["counts"].items():
            assert connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone() == (count,), table
        names = {r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        # the backup is the database as it was: every table of the first revision,
        # none of those added later (the metric outbox, 0005)
        assert set(Base.metadata.tables) - ADDED_AFTER_FIRST <= names
        assert not ADDED_AFTER_FIRST & names
    connection.close()
    # the next open is a plain open: no second backup
    again = StateDB(url)
    again.close()
    assert again.last_migration is None and again.backup_path is None
    assert sorted(path.parent.glob("*.bak")) == [backup]


def test_sqlite_behind_head_with_auto_upgrade_false_is_refused(tmp_path):
    path = tmp_path / "db" / "state.db"
    url = f"sqlite:///{path}"
    info = _database_at_first_revision(url, tmp_path)
    with pytest.raises(SchemaOutOfDateError) as info_exc:
        StateDB(url, auto_upgrade=False)
    message = str(info_exc.value)
    assert migrate.UPGRADE_COMMAND in message and FIRST in message
    assert isinstance(info_exc.value, DBException)
    assert scalar(url, "SELECT version_num FROM alembic_version") == FIRST
    assert row_counts(url) == info["counts"]
    assert not list(path.parent.glob("*.bak"))


def test_postgresql_behind_head_is_refused_unless_auto_upgrade(pg_database_url, tmp_path):
    url = pg_database_url
    info = _database_at_first_revision(url, tmp_path)
    for auto_upgrade in (None, False):
        with pytest.raises(SchemaOutOfDateError) as exc_info:
            StateDB(url, auto_upgrade=auto_upgrade)
        assert "rapidfire-state db upgrade" in str(exc_info.value)
        assert FIRST in str(exc_info.value)
        assert scalar(url, "SELECT version_num FROM alembic_version") == FIRST
    database = StateDB(url, auto_upgrade=True)
    try:
        assert database.last_migration == (FIRST, HEAD)
        assert database.backup_path is None
        assert database.schema_revision() == HEAD
        assert schema_diff(database) == []
    finally:
        database.close()
    assert row_counts(url) == info["counts"]
    assert run_statuses(url) == info["statuses"]


def test_unversioned_database_with_foreign_tables_is_not_migrated_over(tmp_path):
    # tables that look like ours but no alembic_version: refuse rather than guess
    path = tmp_path / "db" / "state.db"
    path.parent.mkdir(parents=True)
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY, name TEXT)")
        connection.execute("INSERT INTO experiments (name) VALUES ('mine')")
    connection.close()
    with pytest.raises(DBException, match="alembic_version"):
        StateDB(f"sqlite:///{path}")
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT name FROM experiments").fetchall() == [("mine",)]
    connection.close()


# --- the database itself refuses bad values ------------------------------------------------


def _ids(db: StateDB, tmp_path: Path) -> dict:
    experiment = db.create_experiment("raw_sql", str(tmp_path))
    run = db.create_run(experiment.experiment_id, {"a": 1})
    task = db.create_worker_task(experiment.experiment_id, run.run_id, 0, 0)
    ctask = db.create_controller_task(experiment.experiment_id, ControllerTask.RUN_FIT)
    db.upsert_shm_object("k", experiment_id=experiment.experiment_id)
    return {"experiment": experiment.experiment_id, "run": run.run_id, "task": task.task_id, "ctask": ctask.task_id}


def _refused(url: str, sql: str, constraint, **params) -> None:
    """``sql`` fails with IntegrityError naming ``constraint`` (or one of a tuple of names)."""
    names = (constraint,) if isinstance(constraint, str) else constraint
    with pytest.raises(IntegrityError) as info:
        execute(url, sql, **params)
    assert any(name in str(info.value.orig) for name in names), str(info.value.orig)


BOGUS_UPDATES = [
    ("UPDATE experiments SET status = 'BOGUS' WHERE experiment_id = :experiment", "ck_experiments_status"),
    ("UPDATE experiments SET status = 'running' WHERE experiment_id = :experiment", "ck_experiments_status"),
    ("UPDATE experiments SET current_task = 'NAP' WHERE experiment_id = :experiment", "ck_experiments_current_task"),
    # a bogus run status breaks ended_by_matches_status as well; either may be reported
    ("UPDATE runs SET status = 'BOGUS' WHERE run_id = :run", ("ck_runs_status", "ck_runs_ended_by_matches_status")),
    ("UPDATE runs SET source = 'MAGIC' WHERE run_id = :run", "ck_runs_source"),
    ("UPDATE runs SET status = 'COMPLETED', ended_by = 'DONE' WHERE run_id = :run", "ck_runs_ended_by"),
    ("UPDATE worker_tasks SET status = 'BOGUS' WHERE task_id = :task", "ck_worker_tasks_status"),
    ("UPDATE worker_tasks SET task_type = 'SLEEP' WHERE task_id = :task", "ck_worker_tasks_task_type"),
    ("UPDATE controller_tasks SET status = 'ONGOING' WHERE task_id = :ctask", "ck_controller_tasks_status"),
    ("UPDATE controller_tasks SET task_type = 'TRAIN_VAL' WHERE task_id = :ctask", "ck_controller_tasks_task_type"),
    ("UPDATE shm_objects SET location = 'CLOUD' WHERE key = 'k'",
     ("ck_shm_objects_location", "ck_shm_objects_disk_path_matches_location")),
    ("UPDATE shm_objects SET object_type = 'TENSOR' WHERE key = 'k'", "ck_shm_objects_object_type"),
    ("UPDATE shm_objects SET location = 'DISK' WHERE key = 'k'", "ck_shm_objects_disk_path_matches_location"),
    ("UPDATE runs SET completed_steps = -1 WHERE run_id = :run", "ck_runs_steps_non_negative"),
    ("UPDATE runs SET required_workers = 0 WHERE run_id = :run", "ck_runs_required_workers_positive"),
]


def test_raw_update_of_a_bogus_value_is_refused_by_the_database(db, db_url, tmp_path):
    ids = _ids(db, tmp_path)

    def snapshot():
        return (db.get_experiment(ids["experiment"]), db.get_run(ids["run"]), db.get_task("worker", ids["task"]),
                db.get_task("controller", ids["ctask"]), db.get_shm_object("k"))

    before = snapshot()
    for sql, constraint in BOGUS_UPDATES:
        params = {k: v for k, v in ids.items() if f":{k}" in sql}
        _refused(db_url, sql, constraint, **params)
        assert snapshot() == before, sql


def test_raw_insert_of_a_bogus_status_is_refused_by_the_database(db, db_url, tmp_path):
    ids = _ids(db, tmp_path)
    e = ids["experiment"]
    _refused(db_url, "INSERT INTO experiments (name, status, current_task, experiments_path) "
                     "VALUES ('x', 'BOGUS', 'IDLE', '/tmp')", "ck_experiments_status")
    _refused(db_url, "INSERT INTO runs (experiment_id, status, source, completed_steps, total_steps, "
                     "num_chunks_visited, num_epochs_completed, chunk_offset, required_workers, progress) "
                     "VALUES (:e, 'BOGUS', 'USER', 0, 0, 0, 0, 0, 1, 0)",
             ("ck_runs_status", "ck_runs_ended_by_matches_status"), e=e)
    _refused(db_url, "INSERT INTO worker_tasks (experiment_id, worker_id, task_type, status) "
                     "VALUES (:e, 0, 'TRAIN_VAL', 'BOGUS')", "ck_worker_tasks_status", e=e)
    _refused(db_url, "INSERT INTO controller_tasks (experiment_id, task_type, status) "
                     "VALUES (:e, 'RUN_FIT', 'DONE')", "ck_controller_tasks_status", e=e)
    _refused(db_url, "INSERT INTO shm_objects (key, object_type, location, num_bytes, tensor_count) "
                     "VALUES ('k2', 'MODEL', 'NOWHERE', 0, 0)",
             ("ck_shm_objects_location", "ck_shm_objects_disk_path_matches_location"))
    _refused(db_url, "INSERT INTO shm_objects (key, object_type, location, disk_path, num_bytes, tensor_count) "
                     "VALUES ('k3', 'WEIGHTS', 'SHM', NULL, 0, 0)", "ck_shm_objects_object_type")
    _refused(db_url, "INSERT INTO state_transitions (entity, entity_id, to_status, pid) "
                     "VALUES ('workers', 1, 'NEW', 1)", "ck_state_transitions_entity")
    assert row_counts(db_url)["experiments"] == 1
    assert row_counts(db_url)["runs"] == 1


ENDED_BY_MISMATCHES = [
    ("COMPLETED", None),
    ("COMPLETED", "FAILED"),
    ("FAILED", "KILLED"),
    ("KILLED", "STOPPED"),
    ("ONGOING", "COMPLETED"),
    ("NEW", "STOPPED"),
    ("STOPPED", "KILLED"),
]


def test_ended_by_must_match_status(db, db_url, tmp_path):
    ids = _ids(db, tmp_path)
    for status, ended_by in ENDED_BY_MISMATCHES:
        _refused(db_url, "UPDATE runs SET status = :s, ended_by = :b WHERE run_id = :r",
                 "ck_runs_ended_by_matches_status", s=status, b=ended_by, r=ids["run"])
        assert db.get_run(ids["run"]).status is RunStatus.NEW


def test_ended_by_matching_status_is_accepted(db, db_url, tmp_path):
    # the CHECK is not stricter than the design: every legal pair is storable
    ids = _ids(db, tmp_path)
    for status, ended_by in [("NEW", None), ("ONGOING", None), ("STOPPED", None), ("STOPPED", "STOPPED"),
                             ("COMPLETED", "COMPLETED"), ("FAILED", "FAILED"), ("KILLED", "KILLED")]:
        execute(db_url, "UPDATE runs SET status = :s, ended_by = :b WHERE run_id = :r",
                s=status, b=ended_by, r=ids["run"])
        run = db.get_run(ids["run"])
        assert run.status.value == status
        assert (run.ended_by.value if run.ended_by else None) == ended_by


def test_one_running_experiment_per_database(db, db_url, tmp_path):
    first = db.create_experiment("first", str(tmp_path)).experiment_id
    second = db.create_experiment("second", str(tmp_path)).experiment_id
    third = db.create_experiment("third", str(tmp_path)).experiment_id
    execute(db_url, "UPDATE experiments SET status = 'RUNNING' WHERE experiment_id = :e", e=first)
    with pytest.raises(IntegrityError) as info:
        execute(db_url, "UPDATE experiments SET status = 'RUNNING' WHERE experiment_id = :e", e=second)
    assert "uq_experiments_one_running" in str(info.value.orig) or "unique" in str(info.value.orig).lower()
    # the index is partial: any number of ended experiments
    execute(db_url, "UPDATE experiments SET status = 'COMPLETED' WHERE experiment_id IN (:a, :b)", a=second, b=third)
    execute(db_url, "UPDATE experiments SET status = 'COMPLETED' WHERE experiment_id = :e", e=first)
    execute(db_url, "UPDATE experiments SET status = 'RUNNING' WHERE experiment_id = :e", e=second)
    assert scalar(db_url, "SELECT COUNT(*) FROM experiments WHERE status = 'RUNNING'") == 1
    assert scalar(db_url, "SELECT COUNT(*) FROM experiments WHERE status = 'COMPLETED'") == 2


def test_foreign_keys_are_enforced(db, db_url, tmp_path):
    # through the StateDB engine (SQLite: PRAGMA foreign_keys is per connection)
    with pytest.raises(IntegrityError):
        with db.engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO runs (experiment_id, status, source, completed_steps, total_steps, "
                "num_chunks_visited, num_epochs_completed, chunk_offset, required_workers, progress) "
                "VALUES (424242, 'NEW', 'USER', 0, 0, 0, 0, 0, 1, 0)"))
    with pytest.raises(IntegrityError):
        with db.engine.begin() as connection:
            connection.execute(text("INSERT INTO workers (experiment_id, worker_id, pid, host) VALUES (999, 0, 1, 'h')"))


# --- views -----------------------------------------------------------------------------------


def test_views_are_queryable_and_show_the_state(db, db_url, tmp_path):
    info = populate(db, tmp_path)
    engine = raw_engine(db_url)
    try:
        with engine.connect() as connection:
            overview = connection.execute(
                text("SELECT run_id, experiment_name, status, ended_by FROM run_overview ORDER BY run_id")
            ).all()
            assert len(overview) == 6
            assert {r.experiment_name for r in overview} == {"populated"}
            assert {r.status for r in overview} == {"NEW", "ONGOING", "STOPPED", "COMPLETED", "FAILED", "KILLED"}
            assert all((r.ended_by == r.status) == (r.status in ("COMPLETED", "FAILED", "KILLED")) for r in overview)
            active = connection.execute(text("SELECT kind, task_id, status FROM active_tasks ORDER BY kind")).all()
            assert [(r.kind, r.status) for r in active] == [("controller", "SCHEDULED"), ("worker", "IN_PROGRESS")]
            usage = connection.execute(text("SELECT * FROM shm_usage")).mappings().all()
            assert len(usage) == 1
            assert usage[0]["experiment_id"] == info["experiment_id"]
            assert (usage[0]["location"], usage[0]["object_type"], usage[0]["objects"]) == ("SHM", "MODEL", 1)
            assert int(usage[0]["total_bytes"]) == 10 and int(usage[0]["tensors"]) == 2
    finally:
        engine.dispose()
    # finished tasks leave active_tasks
    db.finish_worker_task(info["task_id"])
    assert scalar(db_url, "SELECT COUNT(*) FROM active_tasks WHERE kind = 'worker'") == 0


# --- cheap opens -------------------------------------------------------------------------------


def test_opening_an_up_to_date_database_does_not_import_alembic(db, db_url):
    code = (
        "import sys, json\n"
        "from rapidfire_state import StateDB\n"
        f"db = StateDB({db_url!r})\n"
        "db.create_experiment('via_subprocess', '/tmp/exps')\n"
        "print(json.dumps({'alembic': sorted(m for m in sys.modules if m == 'alembic' or m.startswith('alembic.')),"
        " 'migration': db.last_migration}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"alembic": [], "migration": None}
    assert db.get_experiment_by_name("via_subprocess").status is ExperimentStatus.NEW


def test_opening_an_empty_database_does_import_alembic(tmp_path):
    # the check above can fail: a migration does need Alembic
    code = (
        "import sys\n"
        "from rapidfire_state import StateDB\n"
        f"StateDB({str(tmp_path / 'fresh.db')!r}).close()\n"
        "print('alembic' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "True"


def test_enum_values_round_trip_through_records(db, tmp_path):
    # every enum the schema stores comes back as the enum
    ids = _ids(db, tmp_path)
    assert db.get_experiment(ids["experiment"]).current_task is ExperimentTask.IDLE
    run = db.get_run(ids["run"])
    assert run.source is RunSource.USER and run.ended_by is None
    task = db.get_task("worker", ids["task"])
    assert task.task_type is WorkerTask.TRAIN_VAL and task.status is TaskStatus.SCHEDULED
    shm = db.get_shm_object("k")
    assert shm.location is SHMLocation.SHM and shm.object_type is SHMObjectType.CHECKPOINT
    db.transition_run(ids["run"], "KILLED")
    assert db.get_run(ids["run"]).ended_by is RunEndedBy.KILLED


# --- the open policy refuses what it cannot explain ---------------------------------------


def _database_with_runs_only_in_its_log(directory: Path, runs: int = 300) -> tuple[Path, Path]:
    """A copy of a live database whose rows are still only in its WAL, with the main file
    truncated to 0 bytes: what a copy tool or a full disk can leave behind.

    A reader holds a snapshot from before the writes, so no checkpoint can move the new
    pages into the main file; main file and log are copied while the database is open.
    """
    source = directory / "live" / "state.db"
    database = StateDB(f"sqlite:///{source}")
    experiment = database.create_experiment("in_the_log", str(directory))
    reader = sqlite3.connect(source)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM runs").fetchone()
        for i in range(runs):
            database.create_run(experiment.experiment_id, {"i": i})
        damaged = directory / "damaged" / "state.db"
        damaged.parent.mkdir()
        shutil.copyfile(source, damaged)
        shutil.copyfile(f"{source}-wal", f"{damaged}-wal")
    finally:
        reader.close()
        database.close()
    # the copy is complete: main file + log hold every run
    check = directory / "check" / "state.db"
    check.parent.mkdir()
    shutil.copyfile(damaged, check)
    shutil.copyfile(f"{damaged}-wal", f"{check}-wal")
    with sqlite3.connect(check) as connection:
        assert connection.execute("SELECT COUNT(*) FROM runs").fetchone() == (runs,)
    connection.close()
    os.truncate(damaged, 0)
    return damaged, Path(f"{damaged}-wal")


@pytest.mark.parametrize("main_file", ["empty", "missing"])
def test_an_empty_database_file_beside_a_live_log_is_refused_as_damaged(tmp_path, main_file):
    path, wal = _database_with_runs_only_in_its_log(tmp_path)
    if main_file == "missing":
        path.unlink()
    before = _sqlite_files(wal)
    assert wal.stat().st_size > 0
    for auto_upgrade in (None, True, False):
        with pytest.raises(DatabaseDamagedError) as info:
            StateDB(f"sqlite:///{path}", auto_upgrade=auto_upgrade)
        message = str(info.value)
        assert str(path) in message and str(wal) in message
        assert info.value.paths == (str(path), str(wal))
        assert isinstance(info.value, DBException)
        assert _sqlite_files(wal) == before  # no byte changed, no file created (no -shm, no lock, no .bak)
    # readers refuse too: they would discard the log just the same
    with pytest.raises(DatabaseDamagedError):
        migrate.read_revision(resolve_url(str(path)))
    assert _sqlite_files(wal) == before


def test_an_empty_database_file_beside_an_empty_log_is_a_new_database(tmp_path):
    # not every empty file is damaged: an empty log holds nothing to lose
    path = tmp_path / "db" / "state.db"
    path.parent.mkdir()
    path.touch()
    Path(f"{path}-wal").touch()
    database = StateDB(f"sqlite:///{path}")
    try:
        assert database.last_migration == (None, HEAD)
    finally:
        database.close()


def _first_revision_with_a_bad_row(url: str, tmp_path: Path) -> tuple[int, dict]:
    """A database at 0001 with one COMPLETED run whose ended_by is NULL (0002 forbids it)."""
    info = _database_at_first_revision(url, tmp_path)
    run_id = info["runs"]["COMPLETED"]
    execute(url, "UPDATE runs SET ended_by = NULL WHERE run_id = :r", r=run_id)
    return run_id, run_statuses(url)


def test_opening_a_database_whose_rows_break_a_new_check_raises_migration_error(tmp_path):
    path = tmp_path / "db" / "state.db"
    url = f"sqlite:///{path}"
    run_id, statuses = _first_revision_with_a_bad_row(url, tmp_path)
    counts = row_counts(url)
    backups = set()
    for attempt in range(3):
        with pytest.raises(MigrationError) as info:
            StateDB(url)
        error = info.value
        assert (error.table, error.constraint, error.row_ids) == ("runs", "ck_runs_ended_by_matches_status", (run_id,))
        message = str(error)
        assert "runs" in message and "ck_runs_ended_by_matches_status" in message and f"run_id {run_id}" in message
        assert scalar(url, "SELECT version_num FROM alembic_version") == FIRST
        assert row_counts(url) == counts and run_statuses(url) == statuses
        backups = set(path.parent.glob("*.bak"))
        # one backup, however many attempts, and the message says where it is
        assert len(backups) == 1, sorted(backups)
        assert str(next(iter(backups))) in message
    backup = next(iter(backups))
    with sqlite3.connect(f"{backup.as_uri()}?mode=ro", uri=True) as connection:
        assert connection.execute("SELECT version_num FROM alembic_version").fetchone() == (FIRST,)
        assert connection.execute("SELECT ended_by FROM runs WHERE run_id = ?", (run_id,)).fetchone() == (None,)
    connection.close()
    # the operator corrects the row; the next open upgrades
    execute(url, "UPDATE runs SET ended_by = 'COMPLETED' WHERE run_id = :r", r=run_id)
    database = StateDB(url)
    try:
        assert database.last_migration == (FIRST, HEAD)
        assert database.backup_path not in (None, str(backup))  # the corrected state got its own backup
    finally:
        database.close()
    assert row_counts(url) == counts


def test_migration_error_on_postgresql_leaves_the_database_at_its_revision(pg_database_url, tmp_path):
    url = pg_database_url
    run_id, statuses = _first_revision_with_a_bad_row(url, tmp_path)
    counts = row_counts(url)
    for _ in range(2):
        with pytest.raises(MigrationError) as info:
            StateDB(url, auto_upgrade=True)
        assert (info.value.table, info.value.constraint, info.value.row_ids) == (
            "runs", "ck_runs_ended_by_matches_status", (run_id,))
        assert scalar(url, "SELECT version_num FROM alembic_version") == FIRST
        assert row_counts(url) == counts and run_statuses(url) == statuses
    assert "ck_runs_ended_by_matches_status" not in check_constraint_names(url, "runs")


def test_many_bad_rows_are_counted_and_listed(db, db_url, tmp_path):
    experiment = db.create_experiment("many", str(tmp_path))
    ids = [db.create_run(experiment.experiment_id, {"i": i}).run_id for i in range(30)]
    db.downgrade(FIRST)
    execute(db_url, "UPDATE runs SET status = 'FAILED', ended_by = NULL")
    with pytest.raises(MigrationError) as info:
        db.upgrade("head")
    assert info.value.row_ids == tuple(ids) and info.value.row_count == 30
    assert "30 row(s)" in str(info.value) and "and 10 more" in str(info.value)
    assert db.schema_revision() == FIRST


def test_the_database_own_refusal_maps_to_migration_error(db, db_url, tmp_path):
    # the fallback for a revision that did not declare its CHECK: a real
    # IntegrityError from the database becomes a MigrationError naming table and constraint
    experiment = db.create_experiment("refused", str(tmp_path))
    run = db.create_run(experiment.experiment_id, {})
    db.transition_run(run.run_id, "KILLED")
    if db.is_sqlite:
        # SQLite refuses the row the moment it is written (batch mode's table copy writes every row)
        statement = "UPDATE runs SET ended_by = 'STOPPED' WHERE run_id = :r"
    else:
        db.downgrade(FIRST)
        execute(db_url, "UPDATE runs SET ended_by = 'STOPPED' WHERE run_id = :r", r=run.run_id)
        statement = ("ALTER TABLE runs ADD CONSTRAINT ck_runs_ended_by_matches_status "
                     "CHECK (ended_by IS NULL OR ended_by = status)")
    with pytest.raises(IntegrityError) as raised:
        execute(db_url, statement, r=run.run_id)
    error = migrate.migration_error_from(raised.value, db.url_text)
    assert isinstance(error, MigrationError)
    assert (error.table, error.constraint) == ("runs", "ck_runs_ended_by_matches_status")
    assert error.row_ids == ()
    assert "ck_runs_ended_by_matches_status" in str(error) and "unchanged" in str(error)


def test_snapshots_in_the_helpers_equal_the_schema_they_describe(tmp_path):
    # offline mode on SQLite builds runs and the views from these; the online
    # migration must agree (tests/test_alembic_command.py compares whole schemas)
    from rapidfire_state.migrations import helpers

    db_url = f"sqlite:///{tmp_path / 'snap.db'}"
    db = StateDB(db_url)
    db.downgrade(FIRST)
    db.close()
    engine = raw_engine(db_url)
    try:
        with engine.connect() as connection:
            inspector = inspect(connection)
            reflected = {c["name"]: (str(c["type"]), c["nullable"]) for c in inspector.get_columns("runs")}
            checks = {c["name"] for c in inspector.get_check_constraints("runs")}
            indexes = {i["name"] for i in inspector.get_indexes("runs")}
            views = set(inspector.get_view_names())
    finally:
        engine.dispose()
    from sqlalchemy import MetaData

    snapshot = helpers.runs_table_0001(MetaData())
    compiled = {c.name: (str(c.type.compile(engine.dialect)), c.nullable) for c in snapshot.columns}
    assert compiled == reflected
    assert {c.name for c in snapshot.constraints if c.__class__.__name__ == "CheckConstraint"} == checks
    assert {i.name for i in snapshot.indexes} == indexes
    assert set(helpers.VIEWS_0001) == views
