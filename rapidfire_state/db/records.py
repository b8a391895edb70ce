"""Frozen records returned by :class:`~rapidfire_state.db.StateDB`.

Plain dataclasses whose fields are the column names: safe after the session
closes, picklable across processes, and status fields hold the enums.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

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
from rapidfire_state.exceptions import DBException


class _Plan:
    """How one record class is built from a row: computed once per class and shape.

    ``required`` columns must be in the row (a renamed or missing column fails
    loudly); ``absent`` fields may lack their column (the table has none) and are
    then None; ``supplied`` fields come from the caller, not the row; ``enums``
    maps the fields stored as an enum's value to that enum.
    """

    __slots__ = ("cls", "required", "absent", "enums", "direct")

    def __init__(self, cls: type, supplied: tuple[str, ...], absent: frozenset, enums: Mapping[str, type]):
        self.cls = cls
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        unknown = [name for name in supplied if name not in names]
        if unknown:
            raise TypeError(f"{cls.__name__} has no field {', '.join(unknown)}")
        from_row = [name for name in names if name not in supplied]
        self.required = tuple(name for name in from_row if name not in absent)
        self.absent = tuple(name for name in from_row if name in absent)
        # (field, {value: member}, enum class): the dict finds a stored value at the
        # cost of one lookup; anything else goes through the enum (and its error)
        self.enums = tuple(
            (name, dict(enum_cls._value2member_map_), enum_cls)  # type: ignore[attr-defined]
            for name, enum_cls in enums.items()
            if name in from_row
        )
        # Records are frozen dataclasses that validate nothing in __init__, so the
        # checked values can be placed as pickle restores a record, without the
        # generated __init__'s one object.__setattr__ per field (most of the cost
        # of a record on the hot path).  A class that gains a __post_init__ is
        # built through its __init__ again.
        self.direct = not hasattr(cls, "__post_init__")

    def missing(self, columns: Iterable[str]) -> DBException:
        present = list(columns)
        lost = [name for name in self.required if name not in present]
        return DBException(
            f"{self.cls.__name__} needs column{'s' if len(lost) > 1 else ''} {', '.join(map(repr, lost))}, "
            f"missing from the row; columns present: {', '.join(present) or '(none)'}"
        )

    def finish(self, values: dict[str, Any], extra: Mapping[str, Any]) -> Any:
        """The record of ``values`` (its fields from the row, enums still as stored) and ``extra``."""
        for name, members, enum_cls in self.enums:
            value = values[name]
            if value is not None:
                try:
                    values[name] = members[value]
                except (KeyError, TypeError):  # not a stored value (or unhashable): the enum decides
                    values[name] = enum_cls(value)
        if extra:
            values.update(extra)
        if not self.direct:
            return self.cls(**values)
        record = object.__new__(self.cls)
        object.__setattr__(record, "__dict__", values)
        return record

    def from_mapping(self, row: Mapping[str, Any], extra: Mapping[str, Any]) -> Any:
        try:
            values = {name: row[name] for name in self.required}
        except KeyError:
            raise self.missing(row.keys()) from None
        for name in self.absent:
            values[name] = row.get(name)
        return self.finish(values, extra)

    def values_loader(
        self,
        columns: Sequence[str],
        processors: Sequence[Optional[Callable[[Any], Any]]],
        extra: Mapping[str, Any],
    ) -> Callable[[Sequence[Any]], Any]:
        """A function from a row as a tuple in ``columns`` order to its record.

        ``processors`` (one per column, or None) turn stored values into Python
        ones, as a result's processing would.  The columns are checked here,
        once: a missing one raises as :meth:`from_mapping` would.
        """
        columns = tuple(columns)
        if any(name not in columns for name in self.required):
            raise self.missing(columns)
        fields_here = set(self.required) | set(self.absent)
        surplus = tuple(column for column in columns if column not in fields_here)
        lacking = tuple(name for name in self.absent if name not in columns)
        processed = tuple(
            (index, column, processor)
            for index, (column, processor) in enumerate(zip(columns, processors))
            if processor is not None and column in fields_here
        )
        extra = dict(extra)
        finish = self.finish

        def load(values: Sequence[Any]) -> Any:
            row = dict(zip(columns, values))
            for index, column, processor in processed:
                value = values[index]
                if value is not None:
                    row[column] = processor(value)
            for column in surplus:
                del row[column]
            for name in lacking:
                row[name] = None
            return finish(row, extra)

        return load


class _Record:
    """Shared helpers: construction from a row mapping, conversion to a dict."""

    _ENUMS: Mapping[str, type] = {}

    @classmethod
    def _plan(
        cls, supplied: tuple[str, ...] = (), absent: frozenset = frozenset(), enums: tuple[tuple[str, type], ...] = ()
    ) -> _Plan:
        # Per class (not inherited) and per shape: records are built on every
        # status change, so this is one dict lookup on the hot path.  ``enums``
        # adds to (or overrides) the class's own _ENUMS.
        plans = cls.__dict__.get("_rf_plans")
        if plans is None:
            plans = {}
            cls._rf_plans = plans
        key = (supplied, absent, enums)
        plan = plans.get(key)
        if plan is None:
            plan = plans[key] = _Plan(cls, supplied, absent, {**cls._ENUMS, **dict(enums)})
        return plan

    @classmethod
    def from_row(cls, row: Mapping[str, Any], **extra: Any):
        """The record of ``row`` (a mapping of column name to value); ``extra`` sets fields directly.

        Every field not given in ``extra`` needs its column in ``row``:
        a missing (say, renamed) column raises :class:`DBException` naming the
        record type, the column and the columns present, instead of a silent None.
        """
        return cls._plan(tuple(extra), cls._LATER).from_mapping(row, extra)

    #: fields whose column a later revision added (``schema.COLUMNS_SINCE``): a reader of a
    #: database behind head selects without it, and the field is None
    _LATER: frozenset = frozenset()

    @classmethod
    def values_loader(
        cls, columns: Sequence[str], processors: Sequence[Optional[Callable[[Any], Any]]], **extra: Any
    ) -> Callable[[Sequence[Any]], Any]:
        """A function from a row tuple in ``columns`` order (values processed by ``processors``) to a record.

        The same record as :meth:`from_row` of that row, for a caller that has
        the driver's tuple (the prepared SQLite path): no mapping in between.
        """
        return cls._plan(tuple(extra), cls._LATER).values_loader(columns, processors, extra)

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
    #: the owner's :func:`~rapidfire_state.db.store.processes.process_identity` (None before 0008)
    owner_process_identity: Optional[str] = None

    _ENUMS = {"status": ExperimentStatus, "current_task": ExperimentTask}
    _LATER = frozenset({"owner_process_identity"})


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
    #: the claimer's :func:`~rapidfire_state.db.store.processes.process_identity` (None before 0008)
    claim_process_identity: Optional[str] = None

    _ENUMS = {"status": TaskStatus}

    #: per kind, the fields whose column that kind's table does not have (None on its records),
    #: with those a later revision added (a reader of an older database selects without them)
    _ABSENT = {
        "worker": frozenset({"config_leaf", "claim_process_identity"}),
        "controller": frozenset({"worker_id", "chunk_id", "config_options", "claim_process_identity"}),
    }
    #: per kind, the enum of ``task_type``
    _TASK_TYPES = {"worker": (("task_type", WorkerTask),), "controller": (("task_type", ControllerTask),)}

    @classmethod
    def _kind_plan(cls, kind: str, extra: Mapping[str, Any]) -> _Plan:
        return cls._plan(("kind", *extra), cls._ABSENT[kind], cls._TASK_TYPES[kind])

    @classmethod
    def from_row(cls, row: Mapping[str, Any], **extra: Any) -> "TaskRecord":
        """The task of ``row``; ``kind`` (``"worker"`` or ``"controller"``) is required in ``extra``."""
        kind = extra.pop("kind")
        return cls._kind_plan(kind, extra).from_mapping(row, {"kind": kind, **extra})

    @classmethod
    def values_loader(
        cls, columns: Sequence[str], processors: Sequence[Optional[Callable[[Any], Any]]], **extra: Any
    ) -> Callable[[Sequence[Any]], "TaskRecord"]:
        """As :meth:`_Record.values_loader`; ``kind`` is required in ``extra``."""
        kind = extra.pop("kind")
        return cls._kind_plan(kind, extra).values_loader(columns, processors, {"kind": kind, **extra})

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
    #: the process's :func:`~rapidfire_state.db.store.processes.process_identity` (None before 0008)
    process_identity: Optional[str] = None

    _LATER = frozenset({"process_identity"})

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
        """The history row ``row``; its statuses become the enum of its entity's machine."""
        try:
            entity = row["entity"]
        except KeyError:
            raise cls._plan().missing(row.keys()) from None
        enums = _TRANSITION_ENUMS[entity]
        return cls._plan(tuple(extra), enums=enums).from_mapping(row, extra)


_ENTITY_STATUS = {
    "experiment": ExperimentStatus,
    "run": RunStatus,
    "worker_task": TaskStatus,
    "controller_task": TaskStatus,
}
_TRANSITION_ENUMS = {
    entity: (("from_status", enum_cls), ("to_status", enum_cls)) for entity, enum_cls in _ENTITY_STATUS.items()
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
    #: the host holding the payload (None: a row written before 0007_shm_host, taken as this host)
    host: Optional[str] = None
    #: a disk copy every host can read (cross-host placement, or ``copy_to_shared``); None when none
    copy_path: Optional[str] = None

    _ENUMS = {"object_type": SHMObjectType, "location": SHMLocation}
    #: the fields of 0007_shm_host: a reader of an older database selects without them (None here)
    _LATER = frozenset({"host", "copy_path"})

    def held_elsewhere(self, host: str) -> bool:
        """Whether the payload is held by a host other than ``host`` (a NULL host is taken as ``host``)."""
        return self.host is not None and self.host != host


@dataclass(frozen=True)
class StaleWorkerReport:
    """What :meth:`StateDB.fail_stale_workers` changed for one worker or one dead claimer.

    ``claim_pid`` is set when the tasks were failed by their own claim: a dead
    process that claimed them for ``worker``'s worker id, whose row may now name a
    live successor (``worker`` is that row, None when the worker id has none).

    ``released_run_ids``: with ``lost_runs="release"``, the runs of the failed
    tasks that were left in their status (ONGOING stays ONGOING) for the
    scheduler to give to a live worker; such runs are never in ``failed_run_ids``.
    """

    worker: Optional[WorkerRecord]
    reason: str
    failed_task_ids: tuple[int, ...]
    failed_run_ids: tuple[int, ...]
    claim_pid: Optional[int] = None
    released_run_ids: tuple[int, ...] = ()


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
