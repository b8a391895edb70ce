"""Experiments: creation with transactional naming, lookups, status changes."""

from __future__ import annotations

import functools
import json
import os
import re
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Optional

from sqlalchemy import bindparam, func, insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from rapidfire_state import states
from rapidfire_state.constants import ExperimentStatus, ExperimentTask
from rapidfire_state.datapaths import MAX_COMPONENT_LENGTH, validate_component
from rapidfire_state.db import schema as tables
from rapidfire_state.db.engine import is_unique_violation
from rapidfire_state.db.records import ExperimentRecord
from rapidfire_state.db.schema import db_now
from rapidfire_state.db.store.core import StoreCore
from rapidfire_state.db.store.lookups import (
    all_columns,
    check_id,
    enum_value,
    one_row,
    optional_str,
    status_filter,
)
from rapidfire_state.db.store.processes import HOST, process_identity
from rapidfire_state.db.store.status_change import (
    EXPERIMENT,
    StatusChange,
    change_one_without_commit,
    plan_change,
    record_transition_without_commit,
    status_constant,
)
from rapidfire_state.exceptions import ConfigError, DataPathException, ExperimentException, InvalidTransitionError

DEFAULT_EXPERIMENT_NAME = "rf-exp"
MAX_EXPERIMENT_NAME_LENGTH = MAX_COMPONENT_LENGTH
_SUFFIX_PATTERN = re.compile(r"^(?P<stem>.+)_(?P<n>\d+)$")


def validate_experiment_name(name: Any) -> str:
    """The cleaned experiment name, or :class:`ExperimentException` naming the value.

    A name becomes a directory under ``experiments_path``, so it must be one
    safe path component (:func:`rapidfire_state.datapaths.validate_component`):
    at most 128 ASCII letters, digits, ``-``, ``_``, ``.``; no leading dot, no
    ``..``.  Surrounding whitespace is stripped; an empty name becomes ``rf-exp``.
    """
    if name is None:
        return DEFAULT_EXPERIMENT_NAME
    if not isinstance(name, str):
        raise ExperimentException(f"experiment name {name!r} is a {type(name).__name__}; a str is required")
    cleaned = name.strip()
    if cleaned == "":
        return DEFAULT_EXPERIMENT_NAME
    try:
        return validate_component(cleaned, "experiment name")
    except DataPathException as exc:
        raise ExperimentException(str(exc)) from None


def load_experiment(conn: Connection, experiment_id: int) -> ExperimentRecord:
    """The experiment's record inside ``conn``; :class:`NotFoundError` when missing."""
    table = tables.experiments
    return ExperimentRecord.from_row(
        one_row(conn, table, table.c.experiment_id == experiment_id, missing=("experiment", experiment_id))
    )


def choose_unique_name(conn: Connection, name: str) -> str:
    """``name``, or the next free ``name_N`` (continuing from the highest ``name_<k>`` taken)."""
    table = tables.experiments
    taken = conn.execute(select(table.c.name).where(table.c.name == name)).first()
    if taken is None:
        return name
    match = _SUFFIX_PATTERN.match(name)
    stem, start = (match["stem"], int(match["n"]) + 1) if match else (name, 1)
    escaped = stem.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    family = conn.execute(
        select(table.c.name).where(table.c.name.like(f"{escaped}\\_%", escape="\\"))
    ).scalars()
    highest = start - 1
    prefix = f"{stem}_"
    for existing in family:
        suffix = existing[len(prefix):]
        if suffix.isdigit():
            highest = max(highest, int(suffix))
    candidate = f"{stem}_{highest + 1}"
    if len(candidate) > MAX_EXPERIMENT_NAME_LENGTH:
        raise ExperimentException(
            f"no unique name can be made from {name!r} within {MAX_EXPERIMENT_NAME_LENGTH} characters"
        )
    return candidate


@functools.lru_cache(maxsize=None)
def _experiment_change_values(to_status: ExperimentStatus, with_error: bool) -> Mapping[str, Any]:
    """The columns an experiment's change to ``to_status`` sets besides the status (built once per shape)."""
    table = tables.experiments
    values: dict[str, Any] = {"updated_at": db_now()}
    if to_status == ExperimentStatus.RUNNING:
        values["started_at"] = func.coalesce(table.c.started_at, db_now())
    if to_status in states.terminal_states("experiment"):
        values["ended_at"] = db_now()
        values["current_task"] = status_constant(ExperimentTask.IDLE)
    if with_error:
        values["error"] = bindparam("rf_error")
    return MappingProxyType(values)


def plan_experiment_change(
    to_status: ExperimentStatus, expected: Optional[Iterable[Any]], error: Optional[str]
) -> tuple[StatusChange, dict[str, Any]]:
    """The planned change of an experiment to ``to_status`` and its bound parameters."""
    change = plan_change(
        EXPERIMENT, to_status, expected=expected,
        values=_experiment_change_values(to_status, error is not None), cacheable=True,
    )
    return change, ({} if error is None else {"rf_error": str(error)})


def change_experiment_without_commit(
    conn: Connection,
    experiment_id: int,
    change: StatusChange,
    params: Mapping[str, Any],
    reason: Optional[str] = None,
) -> tuple[Optional[Any], Mapping[str, Any]]:
    """Apply an experiment change inside ``conn``: ``(from_status or None for a repeat, row)``.

    A second RUNNING experiment is refused by the database (a partial unique
    index); the refusal names the one that runs.
    """
    try:
        with conn.begin_nested():
            return change_one_without_commit(conn, change, experiment_id, params=params, reason=reason)
    except IntegrityError as exc:
        if change.to_status != ExperimentStatus.RUNNING or not is_unique_violation(exc):
            raise
        table = tables.experiments
        running = conn.execute(
            select(table.c.experiment_id, table.c.name).where(table.c.status == ExperimentStatus.RUNNING.value)
        ).first()
        other = f"experiment {running.experiment_id} ({running.name!r})" if running else "another experiment"
        raise InvalidTransitionError(
            "experiment", experiment_id, ExperimentStatus.NEW, change.to_status, [ExperimentStatus.NEW],
            detail=f"{other} is already RUNNING; at most one experiment runs at a time",
        ) from exc


class ExperimentStore(StoreCore):
    """The experiment methods of :class:`~rapidfire_state.db.StateDB`."""

    def create_experiment(
        self,
        name: Any,
        experiments_path: Any,
        *,
        config_options: Optional[dict] = None,
        unique: bool = False,
        owner_pid: Optional[int] = None,
        owner_host: Optional[str] = None,
    ) -> ExperimentRecord:
        """Insert a NEW experiment named ``name``.

        With ``unique=False`` a taken name raises :class:`ExperimentException`.
        With ``unique=True`` the name is made unique in the same transaction
        that inserts it: ``my_exp`` → ``my_exp_1`` → ``my_exp_2``; a taken
        ``name_N`` continues from the highest ``name_<k>`` in use.
        """
        cleaned = validate_experiment_name(name)
        if not isinstance(experiments_path, (str, os.PathLike)) or str(experiments_path).strip() == "":
            raise ExperimentException(f"experiments_path {experiments_path!r} is not a path")
        if config_options is not None and not isinstance(config_options, dict):
            raise ConfigError(f"config_options {config_options!r} is not a dict")
        path_text = os.path.abspath(os.fspath(experiments_path))
        initial = states.INITIAL_STATES["experiment"]
        # the owner's identity on this host, so that no step of the clock makes it look gone
        owner_identity = process_identity(owner_pid) if owner_pid is not None and owner_host == HOST else None

        def unit(conn: Connection) -> ExperimentRecord:
            chosen = choose_unique_name(conn, cleaned) if unique else cleaned
            try:
                with conn.begin_nested():
                    experiment_id = conn.execute(
                        insert(tables.experiments)
                        .values(
                            name=chosen,
                            status=initial.value,
                            current_task=ExperimentTask.IDLE.value,
                            experiments_path=path_text,
                            config_options=config_options,
                            owner_pid=owner_pid,
                            owner_host=owner_host,
                            owner_process_identity=owner_identity,
                        )
                        .returning(tables.experiments.c.experiment_id)
                    ).scalar_one()
            except IntegrityError as exc:
                if is_unique_violation(exc) and not unique:
                    raise ExperimentException(
                        f"experiment name {chosen!r} is already taken; choose another name or pass unique=True"
                    ) from exc
                raise
            record_transition_without_commit(conn, EXPERIMENT, experiment_id, None, initial.value, "created")
            return load_experiment(conn, experiment_id)

        return self._write(unit, retry_on_unique=unique)

    def get_experiment(self, experiment_id: int) -> ExperimentRecord:
        """The experiment, or :class:`NotFoundError`."""
        check_id("experiment_id", experiment_id)
        return self._read(lambda conn: load_experiment(conn, experiment_id))

    def get_experiment_by_name(self, name: str) -> ExperimentRecord:
        """The experiment called ``name``, or :class:`NotFoundError`."""
        if not isinstance(name, str):
            raise ConfigError(f"experiment name {name!r} is not a str")
        table = tables.experiments
        return self._read(
            lambda conn: ExperimentRecord.from_row(one_row(conn, table, table.c.name == name, missing=("experiment", name)))
        )

    def get_running_experiment(self) -> Optional[ExperimentRecord]:
        """The one RUNNING experiment, or None."""
        table = tables.experiments

        def unit(conn: Connection) -> Optional[ExperimentRecord]:
            row = conn.execute(
                select(*all_columns(conn, table)).where(table.c.status == ExperimentStatus.RUNNING.value)
            ).mappings().first()
            return ExperimentRecord.from_row(row) if row is not None else None

        return self._read(unit)

    def list_experiments(self, statuses: Optional[Iterable[Any]] = None) -> list[ExperimentRecord]:
        """All experiments, oldest first, optionally only those with ``statuses``."""
        wanted = status_filter("experiment", statuses)
        table = tables.experiments

        def unit(conn: Connection) -> list[ExperimentRecord]:
            query = select(*all_columns(conn, table)).order_by(table.c.experiment_id)
            if wanted is not None:
                query = query.where(table.c.status.in_(wanted))
            return [ExperimentRecord.from_row(r) for r in conn.execute(query).mappings()]

        return self._read(unit)

    def transition_experiment(
        self,
        experiment_id: int,
        to: Any,
        *,
        error: Optional[str] = None,
        reason: Optional[str] = None,
        expected: Optional[Iterable[Any]] = None,
    ) -> ExperimentRecord:
        """Compare-and-set the experiment's status (NEW → RUNNING → COMPLETED/FAILED).

        ``expected`` narrows the statuses it may move from.  A move to RUNNING
        while another experiment runs is refused, naming that experiment.
        """
        check_id("experiment_id", experiment_id)
        to_status = states.coerce_status("experiment", to)
        change, params = plan_experiment_change(to_status, expected, error)
        return self._apply_change(
            change, experiment_id, params, reason,
            lambda conn: change_experiment_without_commit(conn, experiment_id, change, params, reason)[1],
            ExperimentRecord,
        )

    def set_experiment_task(self, experiment_id: int, task: Any) -> ExperimentRecord:
        """Set what the experiment is doing now (an :class:`ExperimentTask`)."""
        check_id("experiment_id", experiment_id)
        task_value = enum_value(ExperimentTask, task, "experiment task")
        return self._set_columns(EXPERIMENT, experiment_id, load_experiment, current_task=task_value)

    def set_experiment_config(self, experiment_id: int, config_options: Optional[dict]) -> ExperimentRecord:
        """Replace the experiment's ``config_options`` (a JSON object, or None)."""
        check_id("experiment_id", experiment_id)
        if config_options is not None:
            if not isinstance(config_options, dict):
                raise ConfigError(f"config_options {config_options!r} is not a dict")
            try:
                json.dumps(config_options)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"config_options {config_options!r} is not JSON: {exc}") from None
        return self._set_columns(EXPERIMENT, experiment_id, load_experiment, config_options=config_options)

    def set_experiment_metric_id(self, experiment_id: int, metric_experiment_id: Optional[str]) -> ExperimentRecord:
        """Record the metric store's (MLflow's) experiment id."""
        check_id("experiment_id", experiment_id)
        optional_str("metric_experiment_id", metric_experiment_id)
        return self._set_columns(EXPERIMENT, experiment_id, load_experiment, metric_experiment_id=metric_experiment_id)
