"""The tables of the state database, as SQLAlchemy Core.

The store works on these tables directly, so opening a database and every
status change run without loading the ORM (``sqlalchemy.orm`` and mapping the
classes cost as much as the rest of the open path).  The typed ORM classes in
:mod:`rapidfire_state.db.models` map onto these same ``Table`` objects.

Every constraint has a stable name (the MetaData naming convention), every enum
column is stored as its string value with a CHECK constraint named
``ck_<table>_<column>``, and timestamps are UTC (stored naive, returned aware).
"""

from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum
from typing import Any, Optional

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement
from sqlalchemy.types import TypeDecorator

from rapidfire_state.constants import (
    ControllerTask,
    ExperimentStatus,
    ExperimentTask,
    MetricRowKind,
    RunEndedBy,
    RunSource,
    RunStatus,
    SHMLocation,
    SHMObjectType,
    TaskStatus,
    WorkerTask,
)

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: the entities whose status changes are recorded in ``state_transitions``
TRANSITION_ENTITIES = ("experiment", "run", "worker_task", "controller_task")

metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator):
    """A timestamp stored as naive UTC and returned as an aware UTC datetime.

    Both backends store ``TIMESTAMP WITHOUT TIME ZONE`` so SQL written by people
    compares the same way on SQLite and PostgreSQL.
    """

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: Optional[datetime], dialect: Any) -> Optional[datetime]:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        return value

    def process_result_value(self, value: Optional[datetime], dialect: Any) -> Optional[datetime]:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


class db_now(FunctionElement):
    """The database clock in UTC, with sub-second precision on both backends.

    Heartbeats and staleness are judged by this one clock, so processes on
    different hosts with skewed clocks still agree.
    """

    type = UTCDateTime()
    inherit_cache = True


@compiles(db_now, "sqlite")
def _db_now_sqlite(element: db_now, compiler: Any, **kw: Any) -> str:
    # %f gives milliseconds; pad to microseconds so the value parses as a DATETIME
    return "strftime('%Y-%m-%d %H:%M:%f000', 'now')"


@compiles(db_now)
def _db_now_default(element: db_now, compiler: Any, **kw: Any) -> str:
    return "(now() AT TIME ZONE 'utc')"


def _enum_check(column: str, enum_cls: type[Enum], *, nullable: bool = False) -> CheckConstraint:
    values = ", ".join(f"'{member.value}'" for member in enum_cls)
    condition = f"{column} IN ({values})"
    if nullable:
        condition = f"{column} IS NULL OR {condition}"
    return CheckConstraint(condition, name=column)


def _claim() -> list[Column]:
    """Who claimed a task (moved it SCHEDULED -> IN_PROGRESS), set by the claim itself.

    Liveness is judged per claim: a task whose claimer died is found by these
    columns even after the worker id was registered again by a new process.
    ``claim_token`` is a random id per claim; a finish that presents another
    token is refused.
    """
    return [
        Column("claim_token", String(32)),
        Column("claim_pid", Integer),
        Column("claim_host", String(255)),
        # the OS start time of the claiming process (as workers.process_started_at),
        # so a recycled pid is not taken for the claimer
        Column("claim_process_started_at", Float),
    ]


def _process_identity(name: str) -> Column:
    """0008_process_identity: ``"<boot id>:<start ticks since boot>"`` of a recorded process.

    What decides whether a pid of this host is still the recorded process: no
    step of the wall clock moves it, unlike the OS start time beside it.  NULL
    on rows written before 0008, or off Linux (the start time is judged then).
    """
    return Column(name, String(64))


def _status(default: Enum) -> list[Column]:
    """The status column of a state machine, and the status it last moved from."""
    return [
        Column("status", String(16), nullable=False, default=default.value),
        # set by each compare-and-set from the old value, so history knows where it came from
        Column("previous_status", String(16)),
    ]


def _created_at(name: str = "created_at") -> Column:
    return Column(name, UTCDateTime(), nullable=False, default=db_now(), server_default=text("CURRENT_TIMESTAMP"))


def _updated_at() -> Column:
    return Column(
        "updated_at", UTCDateTime(), nullable=False, default=db_now(), onupdate=db_now(),
        server_default=text("CURRENT_TIMESTAMP"),
    )


def _timestamp(name: str) -> Column:
    return Column(name, UTCDateTime())


def _id(name: str) -> Column:
    return Column(name, Integer, primary_key=True, autoincrement=True)


def _experiment_fk(nullable: bool = False) -> Column:
    return Column("experiment_id", ForeignKey("experiments.experiment_id"), nullable=nullable)


def _run_fk(name: str = "run_id") -> Column:
    return Column(name, ForeignKey("runs.run_id"))


# The claim (status_change.claim_statement) takes the oldest SCHEDULED task of a
# filter.  These partial indexes hold the SCHEDULED rows only, ordered as the
# claim orders, so a claim costs the queue, not the history: with statistics,
# PostgreSQL otherwise judged a walk of the primary key cheaper than the
# (…, status, task_id) index and filtered every finished task ahead of the queue.
# Their PostgreSQL ``WHERE`` is attached like the one-RUNNING index's.
CLAIMABLE_WHERE = "status = 'SCHEDULED'"
WORKER_CLAIM_INDEX = "ix_worker_tasks_claim"
CONTROLLER_CLAIM_INDEX = "ix_controller_tasks_claim"

# At most one RUNNING experiment per database: a partial unique index holds one
# row at most.  Its PostgreSQL ``WHERE`` is attached when a PostgreSQL engine is
# created (:func:`attach_postgresql_options`): naming the option here would load
# the PostgreSQL dialect in every process that opens a SQLite file.
ONE_RUNNING_INDEX = "uq_experiments_one_running"
ONE_RUNNING_WHERE = "status = 'RUNNING'"

experiments = Table(
    "experiments",
    metadata,
    _id("experiment_id"),
    Column("name", String(128), nullable=False, unique=True),
    *_status(ExperimentStatus.NEW),
    Column("current_task", String(32), nullable=False, default=ExperimentTask.IDLE.value),
    Column("experiments_path", Text, nullable=False),
    Column("metric_experiment_id", String(64)),
    Column("config_options", JSON),
    Column("error", Text),
    Column("owner_pid", Integer),
    Column("owner_host", String(255)),
    _created_at(),
    _updated_at(),
    _timestamp("started_at"),
    _timestamp("ended_at"),
    _process_identity("owner_process_identity"),
    _enum_check("status", ExperimentStatus),
    _enum_check("current_task", ExperimentTask),
    Index(ONE_RUNNING_INDEX, "status", unique=True, sqlite_where=text(ONE_RUNNING_WHERE)),
    Index("ix_experiments_status", "status"),
)

runs = Table(
    "runs",
    metadata,
    _id("run_id"),
    _experiment_fk(),
    *_status(RunStatus.NEW),
    Column("source", String(16), nullable=False, default=RunSource.USER.value),
    Column("ended_by", String(16)),
    Column("metric_run_id", String(64)),
    Column("config_leaf", LargeBinary),  # signed dill payload (serialize.encode_payload)
    Column("flattened_config", JSON),  # the same configuration as JSON a.b.c keys, for SQL
    Column("completed_steps", Integer, nullable=False, default=0),
    Column("total_steps", Integer, nullable=False, default=0),
    Column("num_chunks_visited", Integer, nullable=False, default=0),
    Column("num_epochs_completed", Integer, nullable=False, default=0),
    Column("chunk_offset", Integer, nullable=False, default=0),
    Column("estimated_runtime", Float),
    Column("required_workers", Integer, nullable=False, default=1),
    Column("progress", Float, nullable=False, default=0.0),
    Column("error", Text),
    _run_fk("cloned_from"),
    _run_fk("warm_started_from"),
    _created_at(),
    _timestamp("started_at"),
    _updated_at(),
    _timestamp("ended_at"),
    _enum_check("status", RunStatus),
    _enum_check("source", RunSource),
    _enum_check("ended_by", RunEndedBy, nullable=True),
    # A terminal run is ended by exactly its status; a live run is not ended; a
    # STOPPED run is frozen (ended_by STOPPED) only when its experiment ended.
    # "IS NOT NULL": a CHECK that evaluates to NULL passes.
    CheckConstraint(
        "(status IN ('NEW', 'ONGOING') AND ended_by IS NULL)"
        " OR (status = 'STOPPED' AND (ended_by IS NULL OR ended_by = 'STOPPED'))"
        " OR (status IN ('COMPLETED', 'FAILED', 'KILLED') AND ended_by IS NOT NULL AND ended_by = status)",
        name="ended_by_matches_status",
    ),
    CheckConstraint("completed_steps >= 0 AND total_steps >= 0", name="steps_non_negative"),
    CheckConstraint("required_workers >= 1", name="required_workers_positive"),
    Index("ix_runs_experiment_id_status", "experiment_id", "status"),
    Index("ix_runs_status", "status"),
)

worker_tasks = Table(
    "worker_tasks",
    metadata,
    _id("task_id"),
    _experiment_fk(),
    _run_fk(),
    Column("worker_id", Integer, nullable=False),
    Column("chunk_id", Integer),
    Column("task_type", String(32), nullable=False),
    *_status(TaskStatus.PENDING),
    Column("config_options", JSON),
    Column("error", Text),
    _created_at(),
    _timestamp("started_at"),
    _timestamp("ended_at"),
    *_claim(),
    _process_identity("claim_process_identity"),
    _enum_check("status", TaskStatus),
    _enum_check("task_type", WorkerTask),
    # claim_worker_task: the oldest SCHEDULED task of a worker
    Index("ix_worker_tasks_worker_id_status_task_id", "worker_id", "status", "task_id"),
    Index("ix_worker_tasks_experiment_id_status", "experiment_id", "status"),
    Index("ix_worker_tasks_run_id", "run_id"),
    Index(WORKER_CLAIM_INDEX, "worker_id", "task_id", sqlite_where=text(CLAIMABLE_WHERE)),
)

controller_tasks = Table(
    "controller_tasks",
    metadata,
    _id("task_id"),
    _experiment_fk(),
    _run_fk(),
    Column("task_type", String(32), nullable=False),
    *_status(TaskStatus.SCHEDULED),
    Column("config_leaf", LargeBinary),
    Column("error", Text),
    _created_at(),
    _timestamp("started_at"),
    _timestamp("ended_at"),
    *_claim(),
    _process_identity("claim_process_identity"),
    _enum_check("status", TaskStatus),
    _enum_check("task_type", ControllerTask),
    Index("ix_controller_tasks_experiment_id_status_task_id", "experiment_id", "status", "task_id"),
    Index("ix_controller_tasks_status_task_id", "status", "task_id"),
    Index("ix_controller_tasks_run_id", "run_id"),
    Index(CONTROLLER_CLAIM_INDEX, "experiment_id", "task_id", sqlite_where=text(CLAIMABLE_WHERE)),
)

workers = Table(
    "workers",
    metadata,
    _id("id"),
    _experiment_fk(),
    Column("worker_id", Integer, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("host", String(255), nullable=False),
    # the OS start time of the process, so a recycled pid is not taken for the worker
    Column("process_started_at", Float),
    _created_at("started_at"),
    _created_at("heartbeat_at"),
    _timestamp("exited_at"),
    Column("exit_code", Integer),
    _process_identity("process_identity"),
    Index("uq_workers_experiment_id_worker_id", "experiment_id", "worker_id", unique=True),
    Index("ix_workers_exited_at", "exited_at"),
)

shm_objects = Table(
    "shm_objects",
    metadata,
    _id("shm_object_id"),
    Column("key", String(512), nullable=False, unique=True),
    _experiment_fk(nullable=True),
    _run_fk(),
    Column("chunk_id", Integer),
    Column("object_type", String(16), nullable=False),
    Column("location", String(8), nullable=False),
    Column("disk_path", Text),
    Column("num_bytes", BigInteger, nullable=False, default=0),
    Column("tensor_count", Integer, nullable=False, default=0),
    Column("manager_name", String(255)),
    _created_at(),
    _updated_at(),
    # 0007_shm_host: the host whose registry (or disk) holds the payload; NULL on rows
    # written before 0007, which readers take as this host
    Column("host", String(255)),
    # 0007_shm_host: a disk copy under a directory every host reads (cross-host placement)
    Column("copy_path", Text),
    _enum_check("object_type", SHMObjectType),
    _enum_check("location", SHMLocation),
    CheckConstraint(
        "(location = 'DISK' AND disk_path IS NOT NULL) OR (location = 'SHM' AND disk_path IS NULL)",
        name="disk_path_matches_location",
    ),
    Index("ix_shm_objects_experiment_id", "experiment_id"),
    Index("ix_shm_objects_run_id", "run_id"),
)

state_transitions = Table(
    "state_transitions",
    metadata,
    _id("transition_id"),
    Column("entity", String(32), nullable=False),
    Column("entity_id", Integer, nullable=False),
    Column("from_status", String(16)),
    Column("to_status", String(16), nullable=False),
    _created_at("at"),
    Column("pid", Integer, nullable=False),
    Column("host", String(255)),
    Column("reason", Text),
    CheckConstraint(
        "entity IN (" + ", ".join(f"'{e}'" for e in TRANSITION_ENTITIES) + ")",
        name="entity",
    ),
    Index("ix_state_transitions_entity_entity_id", "entity", "entity_id", "transition_id"),
)

# --- the metric outbox (revision 0005) ---------------------------------------------
#
# What a process logs for MLflow is appended here and sent later by a flusher
# (rapidfire_state.metric_manager), so that MLflow being slow or down never
# stalls training.  A stream is one MLflow run of one tracking store; its rows
# are delivered in outbox_id order, one batch in flight per stream at a time
# (the stream's claim).  Delivery is recorded by columns, not by a state
# machine: a row is pending while delivered_at and failed_at are both NULL.

metric_streams = Table(
    "metric_streams",
    metadata,
    _id("stream_id"),
    Column("tracking_uri", Text, nullable=False),
    Column("metric_run_id", String(64), nullable=False),
    # the RapidFire run and experiment it tracks, when known (pending counts per experiment)
    _run_fk(),
    _experiment_fk(nullable=True),
    # who holds the stream while a batch is in flight; NULL when nobody does
    Column("claim_token", String(32)),
    Column("claim_pid", Integer),
    Column("claim_host", String(255)),
    # the OS start time of the claiming process, so a recycled pid is not taken for it
    Column("claim_process_started_at", Float),
    Column("claimed_at", UTCDateTime()),
    Column("last_error", Text),
    _created_at(),
    _process_identity("claim_process_identity"),
    Index("uq_metric_streams_tracking_uri_metric_run_id", "tracking_uri", "metric_run_id", unique=True),
    Index("ix_metric_streams_run_id", "run_id"),
    Index("ix_metric_streams_experiment_id", "experiment_id"),
)

#: a row the flusher has still to deliver
OUTBOX_PENDING_WHERE = "delivered_at IS NULL AND failed_at IS NULL"

metric_outbox = Table(
    "metric_outbox",
    metadata,
    # the order of delivery within a stream
    Column("outbox_id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("stream_id", ForeignKey("metric_streams.stream_id"), nullable=False),
    Column("kind", String(8), nullable=False),
    Column("key", String(250), nullable=False),
    # METRIC: value, step, timestamp_ms; PARAM and TAG: text_value; STATUS: key is
    # the RapidFire run status, text_value the MLflow status, timestamp_ms its time
    Column("value", Float),
    Column("text_value", Text),
    Column("step", BigInteger),
    Column("timestamp_ms", BigInteger, nullable=False),
    # the batch this row was last sent in (a random token per batch): set while
    # in flight, kept after delivery; pending with a token = sent, outcome unknown
    Column("batch_token", String(32)),
    Column("delivered_at", UTCDateTime()),
    Column("failed_at", UTCDateTime()),
    # why MLflow refused the row for good (failed_at), or why a status was not applied
    Column("error", Text),
    _created_at(),
    _enum_check("kind", MetricRowKind),
    # per-key reads: a metric's latest value, a parameter's first one
    Index("ix_metric_outbox_stream_id_key", "stream_id", "key", "outbox_id"),
    Index(
        "ix_metric_outbox_pending", "stream_id", "outbox_id",
        sqlite_where=text(OUTBOX_PENDING_WHERE),  # PostgreSQL's: attach_postgresql_options
    ),
)

#: The columns each revision since 0006 added to a table that already existed, by revision:
#: a reader of a database behind head (``read_only``, never upgraded) selects without the
#: columns of the revisions it lacks, and their record fields are None.
COLUMNS_SINCE: dict[str, dict[str, tuple[str, ...]]] = {
    "0007_shm_host": {"shm_objects": ("host", "copy_path")},
    "0008_process_identity": {
        "experiments": ("owner_process_identity",),
        "workers": ("process_identity",),
        "worker_tasks": ("claim_process_identity",),
        "controller_tasks": ("claim_process_identity",),
        "metric_streams": ("claim_process_identity",),
    },
}


_postgresql_attached = False


def attach_postgresql_options() -> None:
    """Give the partial indexes their PostgreSQL ``WHERE`` (idempotent).

    Called when a PostgreSQL engine is created, i.e. once the PostgreSQL
    dialect is loaded anyway; DDL and Alembic's comparisons see the same
    partial index on both backends.
    """
    global _postgresql_attached
    if _postgresql_attached:
        return
    for index in experiments.indexes:
        if index.name == ONE_RUNNING_INDEX:
            index.dialect_options["postgresql"]["where"] = text(ONE_RUNNING_WHERE)
    for index in metric_outbox.indexes:
        if index.name == "ix_metric_outbox_pending":
            index.dialect_options["postgresql"]["where"] = text(OUTBOX_PENDING_WHERE)
    for table, name in ((worker_tasks, WORKER_CLAIM_INDEX), (controller_tasks, CONTROLLER_CLAIM_INDEX)):
        for index in table.indexes:
            if index.name == name:
                index.dialect_options["postgresql"]["where"] = text(CLAIMABLE_WHERE)
    _postgresql_attached = True
