"""Typed ORM classes of the state database, for queries inside ``db.session()``.

Each class maps onto the Core table of :mod:`rapidfire_state.db.schema` (one
definition of every column and constraint; the store uses the tables directly,
so nothing on the open path or the status-change path loads the ORM).

Status columns are owned by the state machines: assigning ``.status`` on a
persistent object is refused; status changes go through the compare-and-set
methods of :class:`~rapidfire_state.db.StateDB`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Optional

from sqlalchemy import event, inspect
from sqlalchemy.orm import DeclarativeBase, Mapped

from rapidfire_state.db import schema
from rapidfire_state.db.schema import TRANSITION_ENTITIES, UTCDateTime, db_now  # noqa: F401  (re-exported)
from rapidfire_state.exceptions import InvalidTransitionError


class Base(DeclarativeBase):
    """Declarative base of every table; its ``metadata`` is Alembic's target."""

    metadata = schema.metadata


class Experiment(Base):
    """One experiment: a named set of runs trained together by one controller."""

    __table__ = schema.experiments

    experiment_id: Mapped[int]
    name: Mapped[str]
    status: Mapped[str]
    previous_status: Mapped[Optional[str]]
    current_task: Mapped[str]
    experiments_path: Mapped[str]
    metric_experiment_id: Mapped[Optional[str]]
    config_options: Mapped[Optional[dict]]
    error: Mapped[Optional[str]]
    owner_pid: Mapped[Optional[int]]
    owner_host: Mapped[Optional[str]]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    started_at: Mapped[Optional[datetime]]
    ended_at: Mapped[Optional[datetime]]
    owner_process_identity: Mapped[Optional[str]]


class Run(Base):
    """One training configuration of an experiment and its progress."""

    __table__ = schema.runs

    run_id: Mapped[int]
    experiment_id: Mapped[int]
    status: Mapped[str]
    previous_status: Mapped[Optional[str]]
    source: Mapped[str]
    ended_by: Mapped[Optional[str]]
    metric_run_id: Mapped[Optional[str]]
    config_leaf: Mapped[Optional[bytes]]
    flattened_config: Mapped[Optional[dict]]
    completed_steps: Mapped[int]
    total_steps: Mapped[int]
    num_chunks_visited: Mapped[int]
    num_epochs_completed: Mapped[int]
    chunk_offset: Mapped[int]
    estimated_runtime: Mapped[Optional[float]]
    required_workers: Mapped[int]
    progress: Mapped[float]
    error: Mapped[Optional[str]]
    cloned_from: Mapped[Optional[int]]
    warm_started_from: Mapped[Optional[int]]
    created_at: Mapped[datetime]
    started_at: Mapped[Optional[datetime]]
    updated_at: Mapped[datetime]
    ended_at: Mapped[Optional[datetime]]


class WorkerTaskRow(Base):
    """A unit of work for one worker: train run R on chunk C, or create its model."""

    __table__ = schema.worker_tasks

    task_id: Mapped[int]
    experiment_id: Mapped[int]
    run_id: Mapped[Optional[int]]
    worker_id: Mapped[int]
    chunk_id: Mapped[Optional[int]]
    task_type: Mapped[str]
    status: Mapped[str]
    previous_status: Mapped[Optional[str]]
    config_options: Mapped[Optional[dict]]
    error: Mapped[Optional[str]]
    created_at: Mapped[datetime]
    started_at: Mapped[Optional[datetime]]
    ended_at: Mapped[Optional[datetime]]
    claim_token: Mapped[Optional[str]]
    claim_pid: Mapped[Optional[int]]
    claim_host: Mapped[Optional[str]]
    claim_process_started_at: Mapped[Optional[float]]
    claim_process_identity: Mapped[Optional[str]]


class ControllerTaskRow(Base):
    """A request for the controller: fit, interactive-control ops, metrics."""

    __table__ = schema.controller_tasks

    task_id: Mapped[int]
    experiment_id: Mapped[int]
    run_id: Mapped[Optional[int]]
    task_type: Mapped[str]
    status: Mapped[str]
    previous_status: Mapped[Optional[str]]
    config_leaf: Mapped[Optional[bytes]]
    error: Mapped[Optional[str]]
    created_at: Mapped[datetime]
    started_at: Mapped[Optional[datetime]]
    ended_at: Mapped[Optional[datetime]]
    claim_token: Mapped[Optional[str]]
    claim_pid: Mapped[Optional[int]]
    claim_host: Mapped[Optional[str]]
    claim_process_started_at: Mapped[Optional[float]]
    claim_process_identity: Mapped[Optional[str]]


class Worker(Base):
    """One worker process of an experiment; liveness by pid and heartbeat."""

    __table__ = schema.workers

    id: Mapped[int]
    experiment_id: Mapped[int]
    worker_id: Mapped[int]
    pid: Mapped[int]
    host: Mapped[str]
    process_started_at: Mapped[Optional[float]]
    started_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime]
    exited_at: Mapped[Optional[datetime]]
    exit_code: Mapped[Optional[int]]
    process_identity: Mapped[Optional[str]]


class SHMObject(Base):
    """Metadata of one object held by the shared-memory manager (never its payload)."""

    __table__ = schema.shm_objects

    shm_object_id: Mapped[int]
    key: Mapped[str]
    experiment_id: Mapped[Optional[int]]
    run_id: Mapped[Optional[int]]
    chunk_id: Mapped[Optional[int]]
    object_type: Mapped[str]
    location: Mapped[str]
    disk_path: Mapped[Optional[str]]
    num_bytes: Mapped[int]
    tensor_count: Mapped[int]
    manager_name: Mapped[Optional[str]]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    host: Mapped[Optional[str]]
    copy_path: Mapped[Optional[str]]


class StateTransition(Base):
    """One status change of one row, written in the transaction that made it."""

    __table__ = schema.state_transitions

    transition_id: Mapped[int]
    entity: Mapped[str]
    entity_id: Mapped[int]
    from_status: Mapped[Optional[str]]
    to_status: Mapped[str]
    at: Mapped[datetime]
    pid: Mapped[int]
    host: Mapped[Optional[str]]
    reason: Mapped[Optional[str]]


class MetricStream(Base):
    """One MLflow run of one tracking store, fed by the metric outbox."""

    __table__ = schema.metric_streams

    stream_id: Mapped[int]
    tracking_uri: Mapped[str]
    metric_run_id: Mapped[str]
    run_id: Mapped[Optional[int]]
    experiment_id: Mapped[Optional[int]]
    claim_token: Mapped[Optional[str]]
    claim_pid: Mapped[Optional[int]]
    claim_host: Mapped[Optional[str]]
    claim_process_started_at: Mapped[Optional[float]]
    claimed_at: Mapped[Optional[datetime]]
    last_error: Mapped[Optional[str]]
    created_at: Mapped[datetime]
    claim_process_identity: Mapped[Optional[str]]


class MetricOutboxRow(Base):
    """A metric point, parameter, tag or run status waiting for (or delivered to) MLflow."""

    __table__ = schema.metric_outbox

    outbox_id: Mapped[int]
    stream_id: Mapped[int]
    kind: Mapped[str]
    key: Mapped[str]
    value: Mapped[Optional[float]]
    text_value: Mapped[Optional[str]]
    step: Mapped[Optional[int]]
    timestamp_ms: Mapped[int]
    batch_token: Mapped[Optional[str]]
    delivered_at: Mapped[Optional[datetime]]
    failed_at: Mapped[Optional[datetime]]
    error: Mapped[Optional[str]]
    created_at: Mapped[datetime]


#: ORM class of each table that carries a state-machine status
STATUS_MODELS = (Experiment, Run, WorkerTaskRow, ControllerTaskRow)


def _refuse_status_assignment(target: Any, value: Any, oldvalue: Any, initiator: Any) -> Any:
    # A pending object may be given its initial status; a persistent one must
    # change status through the compare-and-set methods, or history and the
    # transition rules would be bypassed.
    state = inspect(target)
    if state.persistent or state.detached:
        entity = type(target).__table__.name
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
