"""Runs: creation, lookups, status changes and progress counters."""

from __future__ import annotations

import functools
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Optional

from sqlalchemy import bindparam, func, insert, null, or_, select
from sqlalchemy.engine import Connection

from rapidfire_state import states
from rapidfire_state.constants import ExperimentStatus, RunSource, RunStatus
from rapidfire_state.db import schema as tables
from rapidfire_state.db.records import RunRecord
from rapidfire_state.db.schema import db_now
from rapidfire_state.db.store.core import StoreCore
from rapidfire_state.db.store.experiments import load_experiment
from rapidfire_state.db.store.lookups import (
    check_id,
    enum_value,
    one_row,
    optional_str,
    status_filter,
    update_columns_without_commit,
)
from rapidfire_state.db.store.status_change import (
    RUN,
    StatusChange,
    change_one_without_commit,
    plan_change,
    record_transition_without_commit,
    status_constant,
)
from rapidfire_state.exceptions import ConfigError
from rapidfire_state.validation import check_int, check_number, check_positive_int

#: the counters ``update_run_progress`` may set, and their kinds
PROGRESS_COUNTERS: Mapping[str, type] = {
    "completed_steps": int,
    "total_steps": int,
    "num_chunks_visited": int,
    "num_epochs_completed": int,
    "chunk_offset": int,
    "estimated_runtime": float,
    "required_workers": int,
    "progress": float,
}


def progress_values(counters: Mapping[str, Any], caller: str) -> dict[str, Any]:
    """``counters`` checked as :meth:`RunStore.update_run_progress` takes them: the column values to set.

    :class:`ConfigError` (naming ``caller`` when nothing is given) for no
    counter, an unknown one or a bad value.
    """
    if not counters:
        raise ConfigError(f"{caller} needs at least one of: {', '.join(PROGRESS_COUNTERS)}")
    values: dict[str, Any] = {}
    for field, value in counters.items():
        kind = PROGRESS_COUNTERS.get(field) if isinstance(field, str) else None
        if kind is None:
            raise ConfigError(
                f"{field!r} is not a progress counter; allowed: {', '.join(PROGRESS_COUNTERS)}"
                + ("; change status with transition_run" if field in ("status", "ended_by") else "")
            )
        if kind is int:
            values[field] = check_int(field, value, minimum=1 if field == "required_workers" else 0)
        else:
            values[field] = check_number(field, value, finite=True, optional=field == "estimated_runtime")
    return values


def set_progress_without_commit(conn: Connection, run_id: int, values: Mapping[str, Any]) -> None:
    """Set checked progress ``values`` (see :func:`progress_values`) of run ``run_id``; never the status."""
    table = tables.runs
    update_columns_without_commit(
        conn, table, table.c.run_id == run_id, values={**values, "updated_at": db_now()}, missing=("run", run_id)
    )


def load_run(conn: Connection, run_id: int) -> RunRecord:
    """The run's record inside ``conn``; :class:`NotFoundError` when missing."""
    return RunRecord.from_row(one_row(conn, tables.runs, tables.runs.c.run_id == run_id, missing=("run", run_id)))


@functools.lru_cache(maxsize=None)
def _run_change_parts(to_status: RunStatus, with_error: bool) -> tuple[Mapping[str, Any], tuple[Any, ...]]:
    """The other columns a run's change to ``to_status`` sets, and its extra conditions.

    Built once per shape (every datum that varies is a bound parameter), so the
    planned statement is found without rebuilding anything.
    """
    table = tables.runs
    values: dict[str, Any] = {"updated_at": db_now()}
    extra_where: list[Any] = []
    if to_status in states.terminal_states("run"):
        values["ended_at"] = db_now()
        values["ended_by"] = status_constant(to_status)
    elif to_status == RunStatus.ONGOING:
        values["started_at"] = func.coalesce(table.c.started_at, db_now())
        values["ended_by"] = null()
        experiments = tables.experiments
        running = select(experiments.c.experiment_id).where(
            experiments.c.status == status_constant(ExperimentStatus.RUNNING)
        )
        # resuming a STOPPED run requires its experiment to be RUNNING
        extra_where.append(
            or_(table.c.status != status_constant(RunStatus.STOPPED), table.c.experiment_id.in_(running))
        )
    if with_error:
        values["error"] = bindparam("rf_error")
    return MappingProxyType(values), tuple(extra_where)


def plan_run_change(
    to_status: RunStatus, expected: Optional[Iterable[Any]], error: Optional[str]
) -> tuple[StatusChange, dict[str, Any]]:
    """The planned change of a run to ``to_status`` and its bound parameters."""
    values, extra_where = _run_change_parts(to_status, error is not None)
    change = plan_change(RUN, to_status, expected=expected, values=values, extra_where=extra_where, cacheable=True)
    return change, ({} if error is None else {"rf_error": str(error)})


def _resume_blocked(row: Mapping[str, Any]) -> Optional[str]:
    if row["status"] == RunStatus.STOPPED.value:
        return f"a STOPPED run is resumed only while its experiment ({row['experiment_id']}) is RUNNING"
    return None


def change_run_without_commit(
    conn: Connection,
    run_id: int,
    change: StatusChange,
    params: Mapping[str, Any],
    reason: Optional[str] = None,
) -> tuple[Optional[Any], Mapping[str, Any]]:
    """Apply a run change inside ``conn``: ``(from_status or None for a repeat, whole row)``."""
    blocked = _resume_blocked if change.to_status == RunStatus.ONGOING else None
    return change_one_without_commit(conn, change, run_id, params=params, reason=reason, blocked_detail=blocked)


class RunStore(StoreCore):
    """The run methods of :class:`~rapidfire_state.db.StateDB`."""

    def create_run(
        self,
        experiment_id: int,
        config_leaf: Any,
        *,
        source: Any = RunSource.USER,
        cloned_from: Optional[int] = None,
        warm_started_from: Optional[int] = None,
        total_steps: int = 0,
        required_workers: int = 1,
        metric_run_id: Optional[str] = None,
    ) -> RunRecord:
        """Insert a NEW run; ``config_leaf`` is stored as a signed payload and flattened for SQL."""
        from rapidfire_state.serialize import encode_payload, flatten_config

        check_id("experiment_id", experiment_id)
        source_value = enum_value(RunSource, source, "run source")
        check_id("cloned_from", cloned_from, optional=True)
        check_id("warm_started_from", warm_started_from, optional=True)
        check_id("total_steps", total_steps)
        check_positive_int("required_workers", required_workers)
        optional_str("metric_run_id", metric_run_id)
        payload = encode_payload(config_leaf)
        flattened = flatten_config(config_leaf) if isinstance(config_leaf, dict) else None
        initial = states.INITIAL_STATES["run"]

        def unit(conn: Connection) -> RunRecord:
            load_experiment(conn, experiment_id)
            for parent in (cloned_from, warm_started_from):
                if parent is not None:
                    load_run(conn, parent)
            run_id = conn.execute(
                insert(tables.runs)
                .values(
                    experiment_id=experiment_id,
                    status=initial.value,
                    source=source_value,
                    config_leaf=payload,
                    flattened_config=flattened,
                    cloned_from=cloned_from,
                    warm_started_from=warm_started_from,
                    total_steps=total_steps,
                    required_workers=required_workers,
                    metric_run_id=metric_run_id,
                )
                .returning(tables.runs.c.run_id)
            ).scalar_one()
            record_transition_without_commit(conn, RUN, run_id, None, initial.value, "created")
            return load_run(conn, run_id)

        return self._write(unit)

    def get_run(self, run_id: int) -> RunRecord:
        """The run, or :class:`NotFoundError`."""
        check_id("run_id", run_id)
        return self._read(lambda conn: load_run(conn, run_id))

    def list_runs(self, experiment_id: Optional[int] = None, statuses: Optional[Iterable[Any]] = None) -> list[RunRecord]:
        """Runs in id order, filtered by experiment and/or statuses."""
        check_id("experiment_id", experiment_id, optional=True)
        wanted = status_filter("run", statuses)
        table = tables.runs

        def unit(conn: Connection) -> list[RunRecord]:
            query = select(table).order_by(table.c.run_id)
            if experiment_id is not None:
                query = query.where(table.c.experiment_id == experiment_id)
            if wanted is not None:
                # constants, not bound values: a generic (prepared) plan then knows
                # how few rows the statuses select (see status_constant)
                query = query.where(table.c.status.in_([status_constant(v) for v in wanted]))
            return [RunRecord.from_row(r) for r in conn.execute(query).mappings()]

        return self._read(unit)

    def transition_run(
        self,
        run_id: int,
        to: Any,
        *,
        expected: Optional[Iterable[Any]] = None,
        error: Optional[str] = None,
        reason: Optional[str] = None,
    ) -> RunRecord:
        """Compare-and-set the run's status.

        ``expected`` narrows the statuses the run may move from (a caller's
        optimistic check).  Terminal statuses set ``ended_at`` and ``ended_by``;
        ONGOING sets ``started_at`` once; resuming a STOPPED run requires its
        experiment to be RUNNING.
        """
        check_id("run_id", run_id)
        to_status = states.coerce_status("run", to)
        change, params = plan_run_change(to_status, expected, error)
        return self._apply_change(
            change, run_id, params, reason,
            lambda conn: change_run_without_commit(conn, run_id, change, params, reason)[1],  # RETURNING: whole row
            RunRecord,
        )

    def update_run_progress(self, run_id: int, **counters: Any) -> RunRecord:
        """Set progress counters (see ``PROGRESS_COUNTERS``); never the status."""
        check_id("run_id", run_id)
        return self._set_columns(RUN, run_id, load_run, **progress_values(counters, "update_run_progress"))

    def set_metric_run_id(self, run_id: int, metric_run_id: Optional[str]) -> RunRecord:
        """Record the metric store's (MLflow's) run id of the run."""
        check_id("run_id", run_id)
        optional_str("metric_run_id", metric_run_id)
        return self._set_columns(RUN, run_id, load_run, metric_run_id=metric_run_id)
