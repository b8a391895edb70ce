"""Worker and controller tasks: queueing, claims, finishes and status changes."""

from __future__ import annotations

import functools
import secrets
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Optional

from sqlalchemy import bindparam, func, insert, select
from sqlalchemy.engine import Connection

from rapidfire_state import states
from rapidfire_state.constants import ControllerTask, TaskStatus, WorkerTask
from rapidfire_state.db import schema as tables
from rapidfire_state.db.records import TaskRecord
from rapidfire_state.db.schema import db_now
from rapidfire_state.db.store.core import StoreCore
from rapidfire_state.db.store.experiments import load_experiment
from rapidfire_state.db.store.lookups import all_columns, check_id, enum_value, one_row, status_filter
from rapidfire_state.db.store.processes import HOST, own_process
from rapidfire_state.db.store.runs import PROGRESS_COUNTERS, load_run, progress_values, set_progress_without_commit
from rapidfire_state.db.store.status_change import (
    TASK_ENTITIES,
    Entity,
    StatusChange,
    change_one_without_commit,
    claim_prepared,
    claim_without_commit,
    plan_change,
    record_transition_without_commit,
    status_constant,
)
from rapidfire_state.exceptions import ConfigError, InvalidTransitionError
from rapidfire_state.validation import check_positive_int

#: the statuses a task may be created in, and the default
_ENTRY_STATUSES = states.ENTRY_STATES["task"]
_DEFAULT_STATUS = states.INITIAL_STATES["task"]


def task_entity(kind: Any) -> Entity:
    """The entity of a task ``kind`` (``"worker"`` or ``"controller"``), or :class:`ConfigError`."""
    entity = TASK_ENTITIES.get(kind) if isinstance(kind, str) else None
    if entity is None:
        raise ConfigError(f"task kind {kind!r} is not valid; allowed: {', '.join(TASK_ENTITIES)}")
    return entity


def load_task(conn: Connection, kind: str, task_id: int) -> TaskRecord:
    """The task's record inside ``conn``; :class:`NotFoundError` when missing."""
    entity = TASK_ENTITIES[kind]
    row = one_row(conn, entity.table, entity.key_column == task_id, missing=(entity.name, task_id))
    return TaskRecord.from_row(row, kind=kind)


def entry_status(status: Any) -> str:
    """The stored value of a new task's status: one of ``states.ENTRY_STATES["task"]``."""
    value = states.coerce_status("task", status)
    if value not in _ENTRY_STATUSES:
        allowed = " or ".join(s.value for s in TaskStatus if s in _ENTRY_STATUSES)
        raise ConfigError(f"a task is created {allowed}, not {value.value}")
    return value.value


def insert_task_without_commit(
    conn: Connection, kind: str, experiment_id: int, run_id: Optional[int], **values: Any
) -> TaskRecord:
    """Insert a task of ``kind`` and its creation history row."""
    entity = TASK_ENTITIES[kind]
    load_experiment(conn, experiment_id)
    if run_id is not None:
        load_run(conn, run_id)
    task_id = conn.execute(
        insert(entity.table)
        .values(experiment_id=experiment_id, run_id=run_id, **values)
        .returning(entity.key_column)
    ).scalar_one()
    record_transition_without_commit(conn, entity, task_id, None, values["status"], "created")
    return load_task(conn, kind, task_id)


@functools.lru_cache(maxsize=None)
def _task_change_values(entity: Entity, to_status: TaskStatus, with_error: bool) -> Mapping[str, Any]:
    """The other columns a task's change to ``to_status`` sets (built once per shape)."""
    table = entity.table
    values: dict[str, Any] = {}
    if to_status == TaskStatus.IN_PROGRESS:
        values["started_at"] = func.coalesce(table.c.started_at, db_now())
        # a move to IN_PROGRESS is a claim: it is recorded like one
        values["claim_token"] = bindparam("rf_new_claim_token")
        values["claim_pid"] = bindparam("rf_claim_pid")
        values["claim_host"] = bindparam("rf_claim_host")
        values["claim_process_started_at"] = bindparam("rf_claim_started")
        values["claim_process_identity"] = bindparam("rf_claim_identity")
    if to_status in states.terminal_states("task"):
        values["ended_at"] = db_now()
    if with_error:
        values["error"] = bindparam("rf_error")
    return MappingProxyType(values)


@functools.lru_cache(maxsize=None)
def _held_to_claim(entity: Entity) -> tuple[Any, ...]:
    """The extra condition of a task change held to one claim (built once per entity)."""
    return (entity.table.c.claim_token == bindparam("rf_claim_token"),)


def _new_claim_params() -> dict[str, Any]:
    pid, process_started_at, identity = own_process()
    return {
        "rf_new_claim_token": secrets.token_hex(16), "rf_claim_pid": pid, "rf_claim_host": HOST,
        "rf_claim_started": process_started_at, "rf_claim_identity": identity,
    }


def plan_task_change(
    entity: Entity, to_status: TaskStatus, expected: Optional[Iterable[Any]], error: Optional[str],
    claim_token: Optional[str],
) -> tuple[StatusChange, dict[str, Any]]:
    """The planned change of a task to ``to_status`` and its bound parameters."""
    params: dict[str, Any] = {}
    if error is not None:
        params["rf_error"] = str(error)
    if to_status == TaskStatus.IN_PROGRESS:
        params.update(_new_claim_params())
    extra_where: tuple[Any, ...] = ()
    if claim_token is not None:
        extra_where = _held_to_claim(entity)
        params["rf_claim_token"] = claim_token
    change = plan_change(
        entity, to_status, expected=expected, values=_task_change_values(entity, to_status, error is not None),
        extra_where=extra_where, cacheable=True,
    )
    return change, params


def _claim_mismatch(row: Mapping[str, Any], claim_token: str) -> str:
    held = row["claim_token"]
    if held is None:
        return f"claim token {claim_token!r} was presented but the task has no recorded claim; nothing was changed"
    return (
        f"claim token {claim_token!r} is not the task's claim (token {held!r}, pid {row['claim_pid']}"
        f" on {row['claim_host']}); nothing was changed"
    )


def change_task_without_commit(
    conn: Connection,
    task_id: int,
    change: StatusChange,
    params: Mapping[str, Any],
    *,
    reason: Optional[str] = None,
    error: Optional[str] = None,
    claim_token: Optional[str] = None,
) -> tuple[Optional[Any], Mapping[str, Any]]:
    """Apply a task change inside ``conn``: ``(from_status or None for a repeat, whole row)``.

    A change held to ``claim_token`` is refused when the task's claim has
    another token, also when the task already has the wanted status under
    that other claim (that outcome is not this caller's to confirm).
    """
    entity, to_status = change.entity, change.to_status

    def other_claim(row: Mapping[str, Any]) -> Optional[str]:
        if claim_token is not None and row["claim_token"] != claim_token:
            return _claim_mismatch(row, claim_token)
        return None

    from_status, row = change_one_without_commit(
        conn, change, task_id, params=params, reason=reason, blocked_detail=other_claim
    )
    if from_status is None and claim_token is not None and row["claim_token"] != claim_token:
        raise InvalidTransitionError(
            entity.name, task_id, to_status, to_status, sorted(change.allowed, key=str),
            _claim_mismatch(row, claim_token),
        )
    if (
        from_status is None and claim_token is not None and to_status == TaskStatus.FAILED
        and row["error"] != (None if error is None else str(error))
    ):
        # FAILED under this claim, but with another error: someone else failed it
        # (fail_stale_workers, a restart, a cleanup), not a repeat of this finish
        raise InvalidTransitionError(
            entity.name, task_id, to_status, to_status, sorted(change.allowed, key=str),
            f"the task was already FAILED by someone else ({row['error']!r}); this failure "
            f"({error!r}) was not recorded and nothing was changed",
        )
    return from_status, row


class TaskStore(StoreCore):
    """The task methods of :class:`~rapidfire_state.db.StateDB`."""

    def create_worker_task(
        self,
        experiment_id: int,
        run_id: Optional[int],
        worker_id: int,
        chunk_id: Optional[int],
        *,
        task_type: Any = WorkerTask.TRAIN_VAL,
        config_options: Optional[dict] = None,
        status: Any = _DEFAULT_STATUS,
    ) -> TaskRecord:
        """Queue a task for ``worker_id`` (SCHEDULED by default, or PENDING)."""
        check_id("experiment_id", experiment_id)
        check_id("run_id", run_id, optional=True)
        check_id("worker_id", worker_id)
        check_id("chunk_id", chunk_id, optional=True)
        type_value = enum_value(WorkerTask, task_type, "worker task type")
        status_value = entry_status(status)
        if config_options is not None and not isinstance(config_options, dict):
            raise ConfigError(f"config_options {config_options!r} is not a dict")
        return self._write(
            lambda conn: insert_task_without_commit(
                conn, "worker", experiment_id, run_id,
                worker_id=worker_id, chunk_id=chunk_id, task_type=type_value,
                status=status_value, config_options=config_options,
            )
        )

    def create_controller_task(
        self,
        experiment_id: int,
        task_type: Any,
        *,
        run_id: Optional[int] = None,
        config_leaf: Any = None,
        status: Any = _DEFAULT_STATUS,
    ) -> TaskRecord:
        """Queue a request for the controller; ``config_leaf`` is stored as a signed payload."""
        check_id("experiment_id", experiment_id)
        check_id("run_id", run_id, optional=True)
        type_value = enum_value(ControllerTask, task_type, "controller task type")
        status_value = entry_status(status)
        payload = None
        if config_leaf is not None:
            from rapidfire_state.serialize import encode_payload

            payload = encode_payload(config_leaf)
        return self._write(
            lambda conn: insert_task_without_commit(
                conn, "controller", experiment_id, run_id,
                task_type=type_value, status=status_value, config_leaf=payload,
            )
        )

    def get_task(self, kind: str, task_id: int) -> TaskRecord:
        """A worker or controller task, or :class:`NotFoundError`."""
        task_entity(kind)
        check_id("task_id", task_id)
        return self._read(lambda conn: load_task(conn, kind, task_id))

    def list_tasks(
        self,
        kind: str,
        *,
        experiment_id: Optional[int] = None,
        statuses: Optional[Iterable[Any]] = None,
        worker_id: Optional[int] = None,
        run_id: Optional[int] = None,
        limit: Optional[int] = None,
    ) -> list[TaskRecord]:
        """Tasks of one kind in id order, filtered; the first ``limit`` of them when given."""
        entity = task_entity(kind)
        wanted = status_filter("task", statuses)
        for name, value in (("experiment_id", experiment_id), ("worker_id", worker_id), ("run_id", run_id)):
            check_id(name, value, optional=True)
        if worker_id is not None and kind != "worker":
            raise ConfigError("worker_id filters worker tasks only")
        table = entity.table

        def unit(conn: Connection) -> list[TaskRecord]:
            query = select(*all_columns(conn, table)).order_by(table.c.task_id)
            if experiment_id is not None:
                query = query.where(table.c.experiment_id == experiment_id)
            if wanted is not None:
                # constants, not bound values: a generic (prepared) plan then knows
                # how few rows the open statuses select (see status_constant)
                query = query.where(table.c.status.in_([status_constant(v) for v in wanted]))
                if experiment_id is None and kind == "worker":
                    # worker_tasks has no index leading with the status, but one on
                    # (experiment_id, status): naming every experiment (a task always
                    # has one) lets both backends probe it per experiment instead of
                    # walking the whole history for the few open tasks
                    query = query.where(table.c.experiment_id.in_(select(tables.experiments.c.experiment_id)))
            if worker_id is not None:
                query = query.where(table.c.worker_id == worker_id)
            if run_id is not None:
                query = query.where(table.c.run_id == run_id)
            if limit is not None:
                query = query.limit(check_positive_int("limit", limit))
            return [TaskRecord.from_row(r, kind=kind) for r in conn.execute(query).mappings()]

        return self._read(unit)

    def _claim(self, kind: str, filters: Mapping[str, int]) -> Optional[TaskRecord]:
        """Claim the oldest SCHEDULED task of ``kind`` matching ``filters`` (column = value), as one unit.

        The claim is recorded on the task: a fresh random token and the claiming
        process, so liveness is judged per claim (:meth:`fail_stale_workers`,
        :meth:`register_worker`) and a finish can be held to the claim's token.
        """
        entity = TASK_ENTITIES[kind]
        columns = tuple(sorted(filters))
        params = {f"rf_claim_{name}": value for name, value in filters.items()}
        params.update(_new_claim_params())
        writer = self._prepared_writer
        if writer is not None:
            return claim_prepared(
                writer, entity, columns, params, params["rf_claim_pid"], record=TaskRecord, record_extra={"kind": kind}
            )

        def unit(conn: Connection) -> Optional[TaskRecord]:
            row = claim_without_commit(conn, entity, columns, params)
            return TaskRecord.from_row(row, kind=kind) if row is not None else None  # RETURNING: the whole row

        return self._write(unit)

    def claim_worker_task(self, worker_id: int, *, experiment_id: Optional[int] = None) -> Optional[TaskRecord]:
        """Atomically move the oldest SCHEDULED task of ``worker_id`` to IN_PROGRESS; None when idle.

        The claim is recorded on the task: ``claim_token`` (a random id of this
        claim, to present to :meth:`finish_worker_task`) and the calling
        process (``claim_pid``, ``claim_host``, ``claim_process_started_at``).
        """
        check_id("worker_id", worker_id)
        check_id("experiment_id", experiment_id, optional=True)
        filters = {"worker_id": worker_id}
        if experiment_id is not None:
            filters["experiment_id"] = experiment_id
        return self._claim("worker", filters)

    def claim_controller_task(self, experiment_id: Optional[int] = None) -> Optional[TaskRecord]:
        """Atomically move the oldest SCHEDULED controller task to IN_PROGRESS; None when idle.

        The claim is recorded on the task as for :meth:`claim_worker_task`.
        """
        check_id("experiment_id", experiment_id, optional=True)
        return self._claim("controller", {"experiment_id": experiment_id} if experiment_id is not None else {})

    def finish_worker_task(
        self,
        task_id: int,
        *,
        ok: bool = True,
        error: Optional[str] = None,
        claim_token: Optional[str] = None,
        run_progress: Optional[Mapping[str, Any]] = None,
    ) -> TaskRecord:
        """IN_PROGRESS → COMPLETED (``ok``) or FAILED with ``error``.

        With ``claim_token`` (the token of the claim, ``TaskRecord.claim_token``)
        the finish applies only to that claim: when the task's claim has another
        token (or none) :class:`InvalidTransitionError` says so and nothing changes.

        ``run_progress``: counters of the task's run (the names and values
        :meth:`update_run_progress` takes, checked the same way, before anything
        is written), set in the same transaction as the finish and only when the
        finish's compare-and-set moves the task: a refused finish (the task
        already failed by :meth:`fail_stale_workers`, another claim's token)
        leaves the run's counters as they were, and so does a repeat of a finish
        already recorded.  A task without a run refuses it (:class:`ConfigError`,
        the task stays IN_PROGRESS).
        """
        to_status = TaskStatus.COMPLETED if ok else TaskStatus.FAILED
        if run_progress is None:
            return self.transition_task("worker", task_id, to_status, error=error, claim_token=claim_token)
        if not isinstance(run_progress, Mapping):
            raise ConfigError(
                f"run_progress={run_progress!r} is not valid; a mapping of progress counters"
                f" ({', '.join(PROGRESS_COUNTERS)}) or None is allowed"
            )
        values = progress_values(run_progress, "run_progress")
        entity = task_entity("worker")
        if claim_token is not None and not isinstance(claim_token, str):
            raise ConfigError(f"claim_token={claim_token!r} is not valid; the str of TaskRecord.claim_token is required")
        check_id("worker_task_id", task_id)
        change, params = plan_task_change(entity, to_status, None, error, claim_token)

        # Not the prepared path: the progress must land in the finish's own transaction.
        def unit(conn: Connection) -> TaskRecord:
            from_status, row = change_task_without_commit(
                conn, task_id, change, params, error=error, claim_token=claim_token
            )
            if from_status is not None:
                if row["run_id"] is None:
                    raise ConfigError(f"worker task {task_id} has no run; run_progress cannot be applied")
                set_progress_without_commit(conn, row["run_id"], values)
            return TaskRecord.from_row(row, kind="worker")

        return self._write(unit)

    def finish_controller_task(
        self, task_id: int, *, ok: bool = True, error: Optional[str] = None, claim_token: Optional[str] = None
    ) -> TaskRecord:
        """IN_PROGRESS → COMPLETED (``ok``) or FAILED with ``error``; ``claim_token`` as in :meth:`finish_worker_task`."""
        return self.transition_task(
            "controller", task_id, TaskStatus.COMPLETED if ok else TaskStatus.FAILED, error=error,
            claim_token=claim_token,
        )

    def transition_task(
        self,
        kind: str,
        task_id: int,
        to: Any,
        *,
        error: Optional[str] = None,
        reason: Optional[str] = None,
        expected: Optional[Iterable[Any]] = None,
        claim_token: Optional[str] = None,
    ) -> TaskRecord:
        """Compare-and-set a task's status; ``kind`` is ``"worker"`` or ``"controller"``.

        A move to IN_PROGRESS records the calling process as the task's claim
        (as the claim methods do).  With ``claim_token`` the change applies only
        while the task's claim has that token; otherwise
        :class:`InvalidTransitionError` names both claims and nothing changes.
        """
        entity = task_entity(kind)
        to_status = states.coerce_status("task", to)
        if claim_token is not None and not isinstance(claim_token, str):
            raise ConfigError(f"claim_token={claim_token!r} is not valid; the str of TaskRecord.claim_token is required")
        check_id(f"{entity.name}_id", task_id)
        change, params = plan_task_change(entity, to_status, expected, error, claim_token)
        return self._apply_change(
            change, task_id, params, reason,
            lambda conn: change_task_without_commit(
                conn, task_id, change, params, reason=reason, error=error, claim_token=claim_token
            )[1],
            TaskRecord, {"kind": kind},
        )
