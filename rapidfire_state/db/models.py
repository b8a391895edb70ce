"""Typed ORM models of the state database.

Every constraint has a stable name (the MetaData naming convention), every enum
column is stored as its string value with a CHECK constraint named
``ck_<table>_<column>``, and timestamps are UTC (stored naive, returned aware).

Status columns are owned by the state machines: assigning ``.status`` on a
persistent object is refused (see :func:`_refuse_status_assignment`); status
changes go through the compare-and-set methods of :class:`~rapidfire_state.db.StateDB`.
"""

from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum
from typing import Any, Optional

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    event,
    inspect,
    text,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.expression import FunctionElement
from sqlalchemy.types import TypeDecorator

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
from rapidfire_state.exceptions import InvalidTransitionError

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: the entities whose status changes are recorded in ``state_transitions``
TRANSITION_ENTITIES = ("experiment", "run", "worker_task", "controller_task")


class Base(DeclarativeBase):
    """Declarative base of every table; its ``metadata`` is Alembic's target."""

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


def _enum_column_check(column: str, enum_cls: type[Enum], *, nullable: bool = False) -> CheckConstraint:
    values = ", ".join(f"'{member.value}'" for member in enum_cls)
    condition = f"{column} IN ({values})"
    if nullable:
        condition = f"{column} IS NULL OR {condition}"
    return CheckConstraint(condition, name=column)


def _status_column(enum_cls: type[Enum], default: Enum, length: int = 16) -> Mapped[Any]:
    return mapped_column(String(length), nullable=False, default=default.value)


def _created_at() -> Mapped[datetime]:
    return mapped_column(
        UTCDateTime(), nullable=False, default=db_now(), server_default=text("CURRENT_TIMESTAMP")
    )


def _updated_at() -> Mapped[datetime]:
    return mapped_column(
        UTCDateTime(),
        nullable=False,
        default=db_now(),
        onupdate=db_now(),
        server_default=text("CURRENT_TIMESTAMP"),
    )


_TERMINAL_RUN = ("COMPLETED", "FAILED", "KILLED")


class Experiment(Base):
    """One experiment: a named set of runs trained together by one controller."""

    __tablename__ = "experiments"
    __table_args__ = (
        _enum_column_check("status", ExperimentStatus),
        _enum_column_check("current_task", ExperimentTask),
        # At most one RUNNING experiment per database: the index holds one row at most.
        Index(
            "uq_experiments_one_running",
            "status",
            unique=True,
            sqlite_where=text("status = 'RUNNING'"),
            postgresql_where=text("status = 'RUNNING'"),
        ),
        Index("ix_experiments_status", "status"),
    )

    experiment_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), nullable=False, unique=True)
    status: Mapped[str] = _status_column(ExperimentStatus, ExperimentStatus.NEW)
    # set by each compare-and-set from the old value, so history knows where it came from
    previous_status: Mapped[Optional[str]] = mapped_column(String(16))
    current_task: Mapped[str] = mapped_column(
        String(32), nullable=False, default=ExperimentTask.IDLE.value
    )
    experiments_path: Mapped[str] = mapped_column(Text, nullable=False)
    metric_experiment_id: Mapped[Optional[str]] = mapped_column(String(64))
    config_options: Mapped[Optional[dict]] = mapped_column(JSON)
    error: Mapped[Optional[str]] = mapped_column(Text)
    owner_pid: Mapped[Optional[int]] = mapped_column(Integer)
    owner_host: Mapped[Optional[str]] = mapped_column(String(255))
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()
    started_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())
    ended_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())


class Run(Base):
    """One training configuration of an experiment and its progress."""

    __tablename__ = "runs"
    __table_args__ = (
        _enum_column_check("status", RunStatus),
        _enum_column_check("source", RunSource),
        _enum_column_check("ended_by", RunEndedBy, nullable=True),
        # A terminal run ended by exactly its status; a live run not ended; a
        # STOPPED run is frozen (ended_by STOPPED) only when its experiment ended.
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

    run_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    experiment_id: Mapped[int] = mapped_column(
        ForeignKey("experiments.experiment_id"), nullable=False
    )
    status: Mapped[str] = _status_column(RunStatus, RunStatus.NEW)
    # set by each compare-and-set from the old value, so history knows where it came from
    previous_status: Mapped[Optional[str]] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(16), nullable=False, default=RunSource.USER.value)
    ended_by: Mapped[Optional[str]] = mapped_column(String(16))
    metric_run_id: Mapped[Optional[str]] = mapped_column(String(64))
    config_leaf: Mapped[Optional[bytes]] = mapped_column(LargeBinary)
    flattened_config: Mapped[Optional[dict]] = mapped_column(JSON)
    completed_steps: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    num_chunks_visited: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    num_epochs_completed: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    chunk_offset: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    estimated_runtime: Mapped[Optional[float]] = mapped_column(Float)
    required_workers: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    progress: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    error: Mapped[Optional[str]] = mapped_column(Text)
    cloned_from: Mapped[Optional[int]] = mapped_column(ForeignKey("runs.run_id"))
    warm_started_from: Mapped[Optional[int]] = mapped_column(ForeignKey("runs.run_id"))
    created_at: Mapped[datetime] = _created_at()
    started_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = _updated_at()
    ended_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())


class WorkerTaskRow(Base):
    """A unit of work for one worker: train run R on chunk C, or create its model."""

    __tablename__ = "worker_tasks"
    __table_args__ = (
        _enum_column_check("status", TaskStatus),
        _enum_column_check("task_type", WorkerTask),
        # claim_worker_task: the oldest SCHEDULED task of a worker
        Index("ix_worker_tasks_worker_id_status_task_id", "worker_id", "status", "task_id"),
        Index("ix_worker_tasks_experiment_id_status", "experiment_id", "status"),
        Index("ix_worker_tasks_run_id", "run_id"),
    )

    task_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    experiment_id: Mapped[int] = mapped_column(
        ForeignKey("experiments.experiment_id"), nullable=False
    )
    run_id: Mapped[Optional[int]] = mapped_column(ForeignKey("runs.run_id"))
    worker_id: Mapped[int] = mapped_column(Integer, nullable=False)
    chunk_id: Mapped[Optional[int]] = mapped_column(Integer)
    task_type: Mapped[str] = mapped_column(String(32), nullable=False)
    status: Mapped[str] = _status_column(TaskStatus, TaskStatus.PENDING)
    # set by each compare-and-set from the old value, so history knows where it came from
    previous_status: Mapped[Optional[str]] = mapped_column(String(16))
    config_options: Mapped[Optional[dict]] = mapped_column(JSON)
    error: Mapped[Optional[str]] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()
    started_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())
    ended_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())


class ControllerTaskRow(Base):
    """A request for the controller: fit, interactive-control ops, metrics."""

    __tablename__ = "controller_tasks"
    __table_args__ = (
        _enum_column_check("status", TaskStatus),
        _enum_column_check("task_type", ControllerTask),
        Index("ix_controller_tasks_experiment_id_status_task_id", "experiment_id", "status", "task_id"),
        Index("ix_controller_tasks_status_task_id", "status", "task_id"),
        Index("ix_controller_tasks_run_id", "run_id"),
    )

    task_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    experiment_id: Mapped[int] = mapped_column(
        ForeignKey("experiments.experiment_id"), nullable=False
    )
    run_id: Mapped[Optional[int]] = mapped_column(ForeignKey("runs.run_id"))
    task_type: Mapped[str] = mapped_column(String(32), nullable=False)
    status: Mapped[str] = _status_column(TaskStatus, TaskStatus.SCHEDULED)
    # set by each compare-and-set from the old value, so history knows where it came from
    previous_status: Mapped[Optional[str]] = mapped_column(String(16))
    config_leaf: Mapped[Optional[bytes]] = mapped_column(LargeBinary)
    error: Mapped[Optional[str]] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()
    started_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())
    ended_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())


class Worker(Base):
    """One worker process of an experiment; liveness by pid and heartbeat."""

    __tablename__ = "workers"
    __table_args__ = (
        Index("uq_workers_experiment_id_worker_id", "experiment_id", "worker_id", unique=True),
        Index("ix_workers_exited_at", "exited_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    experiment_id: Mapped[int] = mapped_column(
        ForeignKey("experiments.experiment_id"), nullable=False
    )
    worker_id: Mapped[int] = mapped_column(Integer, nullable=False)
    pid: Mapped[int] = mapped_column(Integer, nullable=False)
    host: Mapped[str] = mapped_column(String(255), nullable=False)
    process_started_at: Mapped[Optional[float]] = mapped_column(Float)
    started_at: Mapped[datetime] = _created_at()
    heartbeat_at: Mapped[datetime] = _created_at()
    exited_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime())
    exit_code: Mapped[Optional[int]] = mapped_column(Integer)


class SHMObject(Base):
    """Metadata of one object held by the shared-memory manager (never its payload)."""

    __tablename__ = "shm_objects"
    __table_args__ = (
        _enum_column_check("object_type", SHMObjectType),
        _enum_column_check("location", SHMLocation),
        CheckConstraint(
            "(location = 'DISK' AND disk_path IS NOT NULL) OR (location = 'SHM' AND disk_path IS NULL)",
            name="disk_path_matches_location",
        ),
        Index("ix_shm_objects_experiment_id", "experiment_id"),
        Index("ix_shm_objects_run_id", "run_id"),
    )

    shm_object_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(512), nullable=False, unique=True)
    experiment_id: Mapped[Optional[int]] = mapped_column(ForeignKey("experiments.experiment_id"))
    run_id: Mapped[Optional[int]] = mapped_column(ForeignKey("runs.run_id"))
    chunk_id: Mapped[Optional[int]] = mapped_column(Integer)
    object_type: Mapped[str] = mapped_column(String(16), nullable=False)
    location: Mapped[str] = mapped_column(String(8), nullable=False)
    disk_path: Mapped[Optional[str]] = mapped_column(Text)
    num_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    tensor_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    manager_name: Mapped[Optional[str]] = mapped_column(String(255))
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()


class StateTransition(Base):
    """One status change of one row, written in the transaction that made it."""

    __tablename__ = "state_transitions"
    __table_args__ = (
        CheckConstraint(
            "entity IN (" + ", ".join(f"'{e}'" for e in TRANSITION_ENTITIES) + ")",
            name="entity",
        ),
        Index("ix_state_transitions_entity_entity_id", "entity", "entity_id", "transition_id"),
    )

    transition_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    entity: Mapped[str] = mapped_column(String(32), nullable=False)
    entity_id: Mapped[int] = mapped_column(Integer, nullable=False)
    from_status: Mapped[Optional[str]] = mapped_column(String(16))
    to_status: Mapped[str] = mapped_column(String(16), nullable=False)
    at: Mapped[datetime] = _created_at()
    pid: Mapped[int] = mapped_column(Integer, nullable=False)
    host: Mapped[Optional[str]] = mapped_column(String(255))
    reason: Mapped[Optional[str]] = mapped_column(Text)


#: ORM class of each table that carries a state-machine status
STATUS_MODELS = (Experiment, Run, WorkerTaskRow, ControllerTaskRow)


def _refuse_status_assignment(target: Any, value: Any, oldvalue: Any, initiator: Any) -> Any:
    # A pending object may be given its initial status; a persistent one must
    # change status through the compare-and-set methods, or history and the
    # transition rules would be bypassed.
    state = inspect(target)
    if state.persistent or state.detached:
        entity = type(target).__tablename__
        ident = state.identity[0] if state.identity else None
        raise InvalidTransitionError(
            entity,
            ident,
            oldvalue,
            value,
            detail="status is changed only through StateDB.transition_* (compare-and-set with history)",
        )
    return value


for _model in STATUS_MODELS:
    event.listen(_model.status, "set", _refuse_status_assignment, retval=True)
