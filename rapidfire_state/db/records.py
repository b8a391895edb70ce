"""Frozen records returned by :class:`~rapidfire_state.db.StateDB`.

Plain dataclasses whose fields are the column names: safe after the session
closes, picklable across processes, and status fields hold the enums.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Mapping, Optional, Union

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


class _Record:
    """Shared helpers: construction from a row mapping, conversion to a dict."""

    _ENUMS: Mapping[str, type] = {}

    @classmethod
    def _layout(cls) -> tuple[tuple[str, Any], ...]:
        # (field name, enum class or None), computed once per class: records are
        # built on every status change, so this runs on the hot path.
        layout = cls.__dict__.get("_rf_layout")
        if layout is None:
            layout = tuple((f.name, cls._ENUMS.get(f.name)) for f in fields(cls))  # type: ignore[arg-type]
            cls._rf_layout = layout
        return layout

    @classmethod
    def from_row(cls, row: Mapping[str, Any], **extra: Any):
        values = {}
        for name, enum_cls in cls._layout():
            if name in extra:
                values[name] = extra[name]
                continue
            value = row.get(name)
            if enum_cls is not None and value is not None:
                value = enum_cls(value)
            values[name] = value
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The record as a plain dict (enums as their string values)."""
        out = {}
        for field in fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            out[field.name] = getattr(value, "value", value)
        return out


@dataclass(frozen=True)
class ExperimentRecord(_Record):
    experiment_id: int
    name: str
    status: ExperimentStatus
    current_task: ExperimentTask
    experiments_path: str
    metric_experiment_id: Optional[str]
    config_options: Optional[dict]
    error: Optional[str]
    owner_pid: Optional[int]
    owner_host: Optional[str]
    created_at: datetime
    updated_at: datetime
    started_at: Optional[datetime]
    ended_at: Optional[datetime]

    _ENUMS = {"status": ExperimentStatus, "current_task": ExperimentTask}


@dataclass(frozen=True)
class RunRecord(_Record):
    run_id: int
    experiment_id: int
    status: RunStatus
    source: RunSource
    ended_by: Optional[RunEndedBy]
    metric_run_id: Optional[str]
    config_leaf: Optional[bytes]
    flattened_config: Optional[dict]
    completed_steps: int
    total_steps: int
    num_chunks_visited: int
    num_epochs_completed: int
    chunk_offset: int
    estimated_runtime: Optional[float]
    required_workers: int
    progress: float
    error: Optional[str]
    cloned_from: Optional[int]
    warm_started_from: Optional[int]
    created_at: datetime
    started_at: Optional[datetime]
    updated_at: datetime
    ended_at: Optional[datetime]

    _ENUMS = {"status": RunStatus, "source": RunSource, "ended_by": RunEndedBy}

    @property
    def config(self) -> Any:
        """The run's configuration, decoded (and verified) from ``config_leaf``."""
        if self.config_leaf is None:
            return None
        from rapidfire_state.serialize import decode_db_payload

        return decode_db_payload(self.config_leaf)


@dataclass(frozen=True)
class TaskRecord(_Record):
    """A worker task (``kind == "worker"``) or a controller task (``"controller"``)."""

    kind: str
    task_id: int
    experiment_id: int
    run_id: Optional[int]
    worker_id: Optional[int]
    chunk_id: Optional[int]
    task_type: Union[WorkerTask, ControllerTask]
    status: TaskStatus
    config_options: Optional[dict]
    config_leaf: Optional[bytes]
    error: Optional[str]
    created_at: datetime
    started_at: Optional[datetime]
    ended_at: Optional[datetime]
    #: the claim: a random id per claim, and the claiming process (None until claimed)
    claim_token: Optional[str] = None
    claim_pid: Optional[int] = None
    claim_host: Optional[str] = None
    claim_process_started_at: Optional[float] = None

    _ENUMS = {"status": TaskStatus}

    @classmethod
    def from_row(cls, row: Mapping[str, Any], **extra: Any) -> "TaskRecord":
        kind = extra.pop("kind")
        task_enum = WorkerTask if kind == "worker" else ControllerTask
        return super().from_row(row, kind=kind, task_type=task_enum(row["task_type"]), **extra)

    @property
    def config(self) -> Any:
        """A controller task's decoded ``config_leaf``; a worker task's ``config_options``."""
        if self.config_leaf is not None:
            from rapidfire_state.serialize import decode_db_payload

            return decode_db_payload(self.config_leaf)
        return self.config_options


@dataclass(frozen=True)
class WorkerRecord(_Record):
    id: int
    experiment_id: int
    worker_id: int
    pid: int
    host: str
    process_started_at: Optional[float]
    started_at: datetime
    heartbeat_at: datetime
    exited_at: Optional[datetime]
    exit_code: Optional[int]

    @property
    def alive(self) -> bool:
        """Not yet marked exited (the database's view, not a pid check)."""
        return self.exited_at is None


@dataclass(frozen=True)
class TransitionRecord(_Record):
    """One row of ``state_transitions``; statuses are the entity machine's enum."""

    transition_id: int
    entity: str
    entity_id: int
    from_status: Optional[Union[ExperimentStatus, RunStatus, TaskStatus]]
    to_status: Union[ExperimentStatus, RunStatus, TaskStatus]
    at: datetime
    pid: int
    host: Optional[str]
    reason: Optional[str]

    @classmethod
    def from_row(cls, row: Mapping[str, Any], **extra: Any) -> "TransitionRecord":
        enum_cls = _ENTITY_STATUS[row["entity"]]
        return super().from_row(
            row,
            from_status=None if row["from_status"] is None else enum_cls(row["from_status"]),
            to_status=enum_cls(row["to_status"]),
            **extra,
        )


_ENTITY_STATUS = {
    "experiment": ExperimentStatus,
    "run": RunStatus,
    "worker_task": TaskStatus,
    "controller_task": TaskStatus,
}


@dataclass(frozen=True)
class SHMObjectRecord(_Record):
    shm_object_id: int
    key: str
    experiment_id: Optional[int]
    run_id: Optional[int]
    chunk_id: Optional[int]
    object_type: SHMObjectType
    location: SHMLocation
    disk_path: Optional[str]
    num_bytes: int
    tensor_count: int
    manager_name: Optional[str]
    created_at: datetime
    updated_at: datetime

    _ENUMS = {"object_type": SHMObjectType, "location": SHMLocation}


@dataclass(frozen=True)
class StaleWorkerReport:
    """What :meth:`StateDB.fail_stale_workers` changed for one worker or one dead claimer.

    ``claim_pid`` is set when the tasks were failed by their own claim: a dead
    process that claimed them for ``worker``'s worker id, whose row may now name a
    live successor (``worker`` is that row, None when the worker id has none).
    """

    worker: Optional[WorkerRecord]
    reason: str
    failed_task_ids: tuple[int, ...]
    failed_run_ids: tuple[int, ...]
    claim_pid: Optional[int] = None


@dataclass(frozen=True)
class CleanupReport:
    """What one experiment cleanup changed (empty tuples on a repeated cleanup)."""

    experiment_id: int
    experiment_status: ExperimentStatus
    failed_task_ids: tuple[tuple[str, int], ...]
    ended_run_ids: tuple[int, ...]
    frozen_run_ids: tuple[int, ...]
    exited_worker_ids: tuple[int, ...]
    removed_shm_objects: tuple[SHMObjectRecord, ...]

    @property
    def changed(self) -> bool:
        return bool(
            self.failed_task_ids
            or self.ended_run_ids
            or self.frozen_run_ids
            or self.exited_worker_ids
            or self.removed_shm_objects
        )


@dataclass(frozen=True)
class CancelReport:
    """What cancelling an experiment's current task changed (``StateDB.cancel_current_task``)."""

    experiment_id: int
    previous_task: ExperimentTask
    failed_task_ids: tuple[tuple[str, int], ...]  # ("worker" | "controller", task_id)
