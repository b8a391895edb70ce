"""Every status change of the package, built in one place from :mod:`rapidfire_state.states`.

A status change is one compare-and-set statement —
``UPDATE … SET previous_status = status, status = :to … WHERE <key or filter>
AND status IN (<allowed>) RETURNING …`` — plus one ``state_transitions`` row per
changed row, in the caller's transaction.  ``<allowed>`` is always
:func:`states.allowed_from` of the target, narrowed (never widened) by what the
caller expects; legality is decided by the database, never by a prior read.

Three shapes, one rule:

* :func:`change_one_without_commit` — one row by key (transitions, finishes);
  when nothing matched it reads the row to say why (missing, already there,
  illegal, blocked by a caller's condition).
* :func:`change_matching_without_commit` — every row matching a filter (failing
  the tasks of a dead worker, cleanup, cancelling): rows someone else moved
  meanwhile are simply not matched.
* :func:`claim_statement` — the oldest SCHEDULED task of a filter (claims).

A run's change also appends its MLflow status (:data:`states.MLFLOW_RUN_STATUS`)
to the metric outbox of every MLflow run tracking it (none when untracked), in
the same transaction: MLflow learns each status the database recorded, in order,
and nothing the database did not record.

:func:`change_one_prepared` and :func:`claim_prepared` apply the same
statements on SQLite's prepared path (:mod:`rapidfire_state.db.fastpath`).
Nothing here commits; the caller's unit of work does.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from sqlalchemy import String, Table, bindparam, insert, literal, literal_column, select, update
from sqlalchemy.engine import Connection

from rapidfire_state import states
from rapidfire_state.constants import MetricRowKind, TaskStatus
from rapidfire_state.db import schema as tables
from rapidfire_state.db.schema import db_now
from rapidfire_state.db.store.lookups import one_row
from rapidfire_state.db.store.processes import HOST
from rapidfire_state.exceptions import InvalidTransitionError

@dataclass(frozen=True, eq=False)
class Entity:
    """A kind of row with a status: its history name, state machine, table and key."""

    #: the name in ``state_transitions.entity`` and in errors (``worker_task``, …)
    name: str
    #: the machine of :mod:`rapidfire_state.states` its status follows
    machine: str
    table: Table
    key: str

    @property
    def key_column(self) -> Any:
        return self.table.c[self.key]

    def __repr__(self) -> str:
        return f"Entity({self.name!r})"


EXPERIMENT = Entity("experiment", "experiment", tables.experiments, "experiment_id")
RUN = Entity("run", "run", tables.runs, "run_id")
WORKER_TASK = Entity("worker_task", "task", tables.worker_tasks, "task_id")
CONTROLLER_TASK = Entity("controller_task", "task", tables.controller_tasks, "task_id")
#: by the public API's task ``kind``
TASK_ENTITIES: Mapping[str, Entity] = {"worker": WORKER_TASK, "controller": CONTROLLER_TASK}
#: by history name
ENTITIES: Mapping[str, Entity] = {e.name: e for e in (EXPERIMENT, RUN, WORKER_TASK, CONTROLLER_TASK)}

# Statements built once and reused: SQLAlchemy memoises a statement object's
# cache key, so a reused object skips construction, coercion and cache-key work.
INSERT_TRANSITION = insert(tables.state_transitions).values(
    entity=bindparam("entity"),
    entity_id=bindparam("entity_id"),
    from_status=bindparam("from_status"),
    to_status=bindparam("to_status"),
    at=db_now(),
    pid=bindparam("pid"),
    host=bindparam("host"),
    reason=bindparam("reason"),
)


#: the MLflow status of a run's change, for each MLflow run tracking it (metric outbox)
INSERT_RUN_STATUS_FOR_MLFLOW = insert(tables.metric_outbox).from_select(
    ["stream_id", "kind", "key", "text_value", "timestamp_ms"],
    select(
        tables.metric_streams.c.stream_id,
        literal(MetricRowKind.STATUS.value, String),
        bindparam("rf_run_status", type_=String),
        bindparam("rf_mlflow_status", type_=String),
        bindparam("rf_timestamp_ms"),
    ).where(tables.metric_streams.c.run_id == bindparam("rf_run_id")),
)


def run_status_for_mlflow_params(run_id: int, to_status: str) -> dict[str, Any]:
    """The parameters of :data:`INSERT_RUN_STATUS_FOR_MLFLOW` for a change of run ``run_id``."""
    return {
        "rf_run_id": run_id, "rf_run_status": to_status,
        "rf_mlflow_status": states.MLFLOW_RUN_STATUS[states.coerce_status("run", to_status)],
        "rf_timestamp_ms": int(time.time() * 1000),
    }


def status_constant(status: Any) -> Any:
    """A status as an SQL string constant (our own enum values: letters and '_' only).

    The same SQL text every call, and SQLite plans it (and uses the partial
    one-RUNNING index) as it would literal SQL.
    """
    value = getattr(status, "value", status)
    if not value.replace("_", "").isalpha():
        raise ValueError(f"not a status constant: {value!r}")
    return literal_column(f"'{value}'", String)


def history_params(
    entity: Entity, entity_id: int, from_status: Optional[str], to_status: str, reason: Optional[str]
) -> dict[str, Any]:
    """The parameters of one ``state_transitions`` row written by this process."""
    return {
        "entity": entity.name, "entity_id": entity_id, "from_status": from_status,
        "to_status": to_status, "pid": os.getpid(), "host": HOST, "reason": reason,
    }


def record_transition_without_commit(
    conn: Connection, entity: Entity, entity_id: int, from_status: Optional[str], to_status: str,
    reason: Optional[str],
) -> None:
    """One history row (and a run's status for MLflow); a creation has ``from_status`` None."""
    conn.execute(INSERT_TRANSITION, history_params(entity, entity_id, from_status, to_status, reason))
    if entity is RUN and from_status is not None:
        conn.execute(INSERT_RUN_STATUS_FOR_MLFLOW, run_status_for_mlflow_params(entity_id, to_status))


def _as_set(statuses: Any) -> Iterable[Any]:
    if isinstance(statuses, (str, bytes, Enum)) or not isinstance(statuses, Iterable):
        return [statuses]
    return statuses


def starting_statuses(entity: Entity, to_status: Enum, expected: Optional[Iterable[Any]]) -> tuple[frozenset, Optional[frozenset]]:
    """``(from, expected)``: the statuses the change may start from, and the caller's set.

    ``from`` is the table's :func:`states.allowed_from`, narrowed by ``expected``
    when given: a caller can only ever ask for less than the machine allows.
    """
    allowed = states.allowed_from(entity.machine, to_status)
    if expected is None:
        return allowed, None
    expected_set = frozenset(states.coerce_status(entity.machine, e) for e in _as_set(expected))
    return allowed & expected_set, expected_set


@dataclass(frozen=True, eq=False)
class StatusChange:
    """A planned compare-and-set of one row of ``entity`` to ``to_status``; built once per change.

    ``statement`` is None when no status may move to ``to_status`` (nothing
    to try: the refusal is explained from the row).
    """

    entity: Entity
    to_status: Enum
    allowed: frozenset
    starting: frozenset
    expected: Optional[frozenset]
    statement: Any


_STATEMENTS: dict[tuple, Any] = {}
_PLANS: dict[tuple, tuple] = {}


def plan_change(
    entity: Entity,
    to_status: Enum,
    *,
    expected: Optional[Iterable[Any]] = None,
    values: Mapping[str, Any] = {},  # noqa: B006  (read only)
    extra_where: Sequence[Any] = (),
    cacheable: bool = False,
) -> StatusChange:
    """The compare-and-set of one row (by key) to ``to_status``.

    ``values`` are the other columns the change sets, ``extra_where`` further
    conditions (a resume that needs a RUNNING experiment, a claim token).  With
    ``cacheable`` the caller guarantees that their SQL depends only on the
    entity, ``to_status``, the keys of ``values`` and the number of
    ``extra_where`` clauses (every datum is a bound parameter): the statement is
    then built once and reused, so SQLAlchemy neither rebuilds it nor
    recomputes its cache key.
    """
    if expected is None and cacheable:
        # ``values``/``extra_where`` come from lru-cached builders: their identity is the shape
        key = (entity.name, to_status, id(values), id(extra_where))
        cached = _PLANS.get(key)
        if cached is None or cached[0] is not values or cached[1] is not extra_where:
            cached = (values, extra_where, _build_plan(entity, to_status, None, values, extra_where, True))
            _PLANS[key] = cached
        return cached[2]
    return _build_plan(entity, to_status, expected, values, extra_where, cacheable)


def _build_plan(
    entity: Entity, to_status: Enum, expected: Optional[Iterable[Any]], values: Mapping[str, Any],
    extra_where: Sequence[Any], cacheable: bool,
) -> StatusChange:
    allowed = states.allowed_from(entity.machine, to_status)
    starting, expected_set = starting_statuses(entity, to_status, expected)
    if not starting:
        return StatusChange(entity, to_status, allowed, starting, expected_set, None)
    table = entity.table
    assignments = {"previous_status": table.c.status, "status": status_constant(to_status), **values}
    from_values = tuple(sorted(s.value for s in starting))
    key = (entity.name, to_status.value, from_values, tuple(sorted(assignments)), len(extra_where))
    statement = _STATEMENTS.get(key) if cacheable else None
    if statement is None:
        statement = (
            update(table)
            .where(entity.key_column == bindparam("rf_entity_id"))
            .where(table.c.status.in_([status_constant(value) for value in from_values]))
            .where(*extra_where)
            .values(**assignments)
            .returning(*table.c)
        )
        if cacheable:
            _STATEMENTS[key] = statement
    return StatusChange(entity, to_status, allowed, starting, expected_set, statement)


def change_one_without_commit(
    conn: Connection,
    change: StatusChange,
    entity_id: int,
    *,
    params: Optional[Mapping[str, Any]] = None,
    reason: Optional[str] = None,
    blocked_detail: Optional[Callable[[Mapping[str, Any]], Optional[str]]] = None,
) -> tuple[Optional[Enum], Mapping[str, Any]]:
    """Apply ``change`` to the row ``entity_id`` and write its history row.

    Returns ``(from_status, row)``; ``from_status`` is None when the row already
    had the target status (an idempotent repeat: nothing written).  Raises
    :class:`NotFoundError` for a missing row and :class:`InvalidTransitionError`
    (with ``blocked_detail(row)`` when given) for a refused change.
    """
    entity = change.entity
    to_status = change.to_status
    bound = {"rf_entity_id": entity_id, **(params or {})}
    row = None
    current_row: Mapping[str, Any] = {}
    current = None
    # On PostgreSQL (READ COMMITTED) the UPDATE may miss a row that a concurrent
    # transaction moved away and another moved back before our re-read; the
    # re-read then shows a status the compare-and-set accepts.  Compare-and-set
    # again (a few times at most) rather than report a refusal that names an
    # allowed status.
    for _attempt in range(3):
        if change.statement is not None:
            row = conn.execute(change.statement, bound).mappings().first()
        if row is not None:
            from_status = states.coerce_status(entity.machine, row["previous_status"])
            record_transition_without_commit(conn, entity, entity_id, from_status.value, to_status.value, reason)
            return from_status, row
        current_row = one_row(conn, entity.table, entity.key_column == entity_id, missing=(entity.name, entity_id))
        current = states.coerce_status(entity.machine, current_row["status"])
        if current == to_status:
            return None, current_row
        if current not in change.starting:
            break
    detail = blocked_detail(current_row) if blocked_detail else None
    if change.expected is not None and current in change.allowed and current not in change.starting:
        detail = f"expected one of {', '.join(sorted(str(e) for e in change.expected))}"
    raise InvalidTransitionError(
        entity.name, entity_id, current, to_status, sorted(change.allowed, key=str), detail
    )


def change_one_prepared(
    writer: Optional[Any],
    change: StatusChange,
    entity_id: int,
    *,
    params: Mapping[str, Any],
    reason: Optional[str],
    record: type,
    record_extra: Mapping[str, Any] = MappingProxyType({}),
) -> Optional[Any]:
    """``change`` of the row ``entity_id`` as a whole unit on SQLite's prepared path.

    Returns the changed row's ``record`` (what ``record.from_row(row,
    **record_extra)`` gives, built straight from the driver's tuple), or None
    when there is no prepared path (``writer`` None: not SQLite) or the
    compare-and-set matched nothing (rolled back, nothing written): the caller
    then runs the general unit, which explains the refusal or the repeat.
    """
    if writer is None or change.statement is None:
        return None
    entity = change.entity
    to_value = change.to_status.value
    update_statement = writer.prepare(change.statement)
    follow_up = None
    if entity is RUN:
        follow_up = (
            writer.prepare(INSERT_RUN_STATUS_FOR_MLFLOW),
            lambda _previous: run_status_for_mlflow_params(entity_id, to_value),
        )
    return writer.compare_and_set(
        update_statement, {"rf_entity_id": entity_id, **params}, writer.prepare(INSERT_TRANSITION),
        lambda previous_status: history_params(entity, entity_id, previous_status, to_value, reason),
        history_column="previous_status", record=update_statement.loader(record, **record_extra),
        follow_up=follow_up,
    )


def change_matching_without_commit(
    conn: Connection,
    entity: Entity,
    to: Any,
    conditions: Sequence[Any],
    *,
    expected: Optional[Iterable[Any]] = None,
    values: Optional[Mapping[str, Any]] = None,
    reason: Optional[str] = None,
    returning: Sequence[str] = (),
) -> list[Mapping[str, Any]]:
    """Move every row matching ``conditions`` whose status allows it to ``to``.

    The statuses moved from are the table's, narrowed by ``expected``; a row in
    another status (finished meanwhile by someone else) is left as it is.
    One history row per moved row.  Returns the moved rows in key order, each
    with its key, ``previous_status`` and the columns named in ``returning``.
    """
    to_status = states.coerce_status(entity.machine, to)
    starting, _ = starting_statuses(entity, to_status, expected)
    if not starting:
        return []
    table = entity.table
    columns = [entity.key_column, table.c.previous_status, *(table.c[name] for name in returning)]
    moved = conn.execute(
        update(table)
        .where(table.c.status.in_(sorted(s.value for s in starting)), *conditions)
        .values(previous_status=table.c.status, status=to_status.value, **(values or {}))
        .returning(*columns)
    ).mappings().all()
    moved = sorted(moved, key=lambda row: row[entity.key])
    for row in moved:
        record_transition_without_commit(conn, entity, row[entity.key], row["previous_status"], to_status.value, reason)
    return moved


@functools.lru_cache(maxsize=None)
def claim_statement(entity: Entity, filters: tuple[str, ...]) -> Any:
    """The claim of ``entity``'s oldest SCHEDULED task matching ``filters`` (built once per shape).

    ``filters`` are columns compared with the bound parameters
    ``rf_claim_<column>``.  The task moves to IN_PROGRESS and records the claim
    (every datum a bound parameter); the whole row is returned.  On PostgreSQL a
    row locked by another claimer is skipped; on SQLite the write lock already
    serialises claimers.
    """
    (claimable,) = states.allowed_from(entity.machine, TaskStatus.IN_PROGRESS)
    table = entity.table
    conditions = [table.c[name] == bindparam(f"rf_claim_{name}") for name in filters]
    candidate = (
        select(entity.key_column)
        .where(table.c.status == status_constant(claimable), *conditions)
        .order_by(entity.key_column)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return (
        update(table)
        .where(entity.key_column == candidate, table.c.status == status_constant(claimable))
        .values(
            previous_status=table.c.status,
            status=status_constant(TaskStatus.IN_PROGRESS),
            started_at=db_now(),
            claim_token=bindparam("rf_new_claim_token"),
            claim_pid=bindparam("rf_claim_pid"),
            claim_host=bindparam("rf_claim_host"),
            claim_process_started_at=bindparam("rf_claim_started"),
            claim_process_identity=bindparam("rf_claim_identity"),
        )
        .returning(*table.c)
    )


def claim_without_commit(
    conn: Connection, entity: Entity, filters: tuple[str, ...], params: Mapping[str, Any]
) -> Optional[Mapping[str, Any]]:
    """Claim one task (see :func:`claim_statement`) and write its history row; None when idle."""
    row = conn.execute(claim_statement(entity, filters), params).mappings().first()
    if row is not None:
        record_transition_without_commit(
            conn, entity, row[entity.key], row["previous_status"], TaskStatus.IN_PROGRESS.value, "claimed"
        )
    return row


def claim_prepared(
    writer: Any, entity: Entity, filters: tuple[str, ...], params: Mapping[str, Any], pid: int, *,
    record: type, record_extra: Mapping[str, Any] = MappingProxyType({}),
) -> Optional[Any]:
    """:func:`claim_without_commit` as a whole unit on the prepared path; the claimed task's ``record``.

    An idle poll is ``BEGIN IMMEDIATE``, one UPDATE that matches nothing,
    ``ROLLBACK``.  A worker polling for its next task waits for the write lock
    in short steps (``prompt``), not in SQLite's growing sleeps.
    """
    (claimable,) = states.allowed_from(entity.machine, TaskStatus.IN_PROGRESS)

    def history(task_id: int) -> dict[str, Any]:
        found = history_params(entity, task_id, claimable.value, TaskStatus.IN_PROGRESS.value, "claimed")
        found["pid"] = pid
        return found

    update_statement = writer.prepare(claim_statement(entity, filters))
    return writer.compare_and_set(
        update_statement, params, writer.prepare(INSERT_TRANSITION), history, history_column=entity.key,
        record=update_statement.loader(record, **record_extra), prompt=True,
    )
