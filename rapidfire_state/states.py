"""The three state machines as data (the single source of truth), and how a
run's status shows in MLflow.

The database layer (every compare-and-set is built from these tables by
``rapidfire_state.db.store.status_change``), the API, the README's diagrams and
the tests all read the tables below.
"""

from __future__ import annotations

import functools
from enum import Enum
from types import MappingProxyType
from typing import Mapping

from rapidfire_state.constants import ExperimentStatus, RunStatus, TaskStatus
from rapidfire_state.exceptions import ConfigError

E, R, T = ExperimentStatus, RunStatus, TaskStatus

EXPERIMENT_TRANSITIONS: Mapping[ExperimentStatus, frozenset[ExperimentStatus]] = MappingProxyType(
    {
        E.NEW: frozenset({E.RUNNING, E.FAILED}),
        E.RUNNING: frozenset({E.COMPLETED, E.FAILED}),
        E.COMPLETED: frozenset(),
        E.FAILED: frozenset(),
    }
)

RUN_TRANSITIONS: Mapping[RunStatus, frozenset[RunStatus]] = MappingProxyType(
    {
        R.NEW: frozenset({R.ONGOING, R.STOPPED, R.FAILED, R.KILLED}),
        R.ONGOING: frozenset({R.STOPPED, R.COMPLETED, R.FAILED, R.KILLED}),
        R.STOPPED: frozenset({R.ONGOING, R.FAILED, R.KILLED}),
        R.COMPLETED: frozenset(),
        R.FAILED: frozenset(),
        R.KILLED: frozenset(),
    }
)

TASK_TRANSITIONS: Mapping[TaskStatus, frozenset[TaskStatus]] = MappingProxyType(
    {
        T.PENDING: frozenset({T.SCHEDULED, T.FAILED}),
        T.SCHEDULED: frozenset({T.IN_PROGRESS, T.FAILED}),
        T.IN_PROGRESS: frozenset({T.COMPLETED, T.FAILED}),
        T.COMPLETED: frozenset(),
        T.FAILED: frozenset(),
    }
)

#: machine name -> (status enum, transition table)
MACHINES: Mapping[str, tuple[type[Enum], Mapping]] = MappingProxyType(
    {
        "experiment": (ExperimentStatus, EXPERIMENT_TRANSITIONS),
        "run": (RunStatus, RUN_TRANSITIONS),
        "task": (TaskStatus, TASK_TRANSITIONS),
    }
)

#: the statuses a row of each machine may be created in: a task is queued either
#: PENDING (waiting for something before it may run) or SCHEDULED (claimable now)
ENTRY_STATES: Mapping[str, frozenset] = MappingProxyType(
    {"experiment": frozenset({E.NEW}), "run": frozenset({R.NEW}), "task": frozenset({T.PENDING, T.SCHEDULED})}
)

#: the status a row of each machine is created in when the caller names none
#: (one of its ENTRY_STATES): tasks are claimable at once unless asked PENDING
INITIAL_STATES: Mapping[str, Enum] = MappingProxyType(
    {"experiment": E.NEW, "run": R.NEW, "task": T.SCHEDULED}
)


#: the MLflow run status that mirrors each run status (MLflow's own vocabulary):
#: a stopped run is KILLED in MLflow until it is resumed (RUNNING again)
MLFLOW_RUN_STATUS: Mapping[RunStatus, str] = MappingProxyType(
    {
        R.NEW: "SCHEDULED",
        R.ONGOING: "RUNNING",
        R.STOPPED: "KILLED",
        R.COMPLETED: "FINISHED",
        R.FAILED: "FAILED",
        R.KILLED: "KILLED",
    }
)


def mlflow_status_for(run_status: object) -> str:
    """The MLflow run status for a RapidFire run status (:data:`MLFLOW_RUN_STATUS`).

    ``run_status`` is a :class:`RunStatus` or its exact string value; anything
    else raises :class:`ConfigError` naming the allowed values.
    """
    return MLFLOW_RUN_STATUS[coerce_status("run", run_status)]  # type: ignore[index]


@functools.lru_cache(maxsize=None)
def mlflow_status_may_follow(current: str, new: str) -> bool:
    """Whether an MLflow run in ``current`` may be set to ``new`` to mirror the run machine.

    True when some run status shown as ``current`` may move (by
    :data:`RUN_TRANSITIONS`) to one shown as ``new``, or when they are equal.
    So FINISHED (COMPLETED, terminal) and FAILED are never left, and KILLED may
    become RUNNING again only because a STOPPED run may be resumed.  An MLflow
    status no run status maps to (set by hand) is never changed.
    """
    if current == new:
        return True
    return any(
        MLFLOW_RUN_STATUS[target] == new
        for source, targets in RUN_TRANSITIONS.items()
        if MLFLOW_RUN_STATUS[source] == current
        for target in targets
    )


def _machine(machine: str) -> tuple[type[Enum], Mapping]:
    try:
        return MACHINES[machine]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown state machine {machine!r}; allowed: {', '.join(MACHINES)}"
        ) from None


#: machine -> (its enum, its members by value): coerce_status runs on every status change
_BY_VALUE: Mapping[str, tuple[type[Enum], Mapping[str, Enum]]] = MappingProxyType(
    {machine: (enum_cls, {member.value: member for member in enum_cls}) for machine, (enum_cls, _) in MACHINES.items()}
)


def coerce_status(machine: str, status: object) -> Enum:
    """Return ``status`` as the machine's enum; accept the enum or its exact string value."""
    known = _BY_VALUE.get(machine) if machine.__class__ is str else None
    if known is not None:
        if status.__class__ is known[0]:
            return status  # type: ignore[return-value]
        if status.__class__ is str:
            found = known[1].get(status)  # type: ignore[call-overload]
            if found is not None:
                return found
    enum_cls, _ = _machine(machine)
    if isinstance(status, enum_cls):
        return status
    if isinstance(status, str) and not isinstance(status, Enum):
        try:
            return enum_cls(status)
        except ValueError:
            pass
    allowed = ", ".join(member.value for member in enum_cls)
    raise ConfigError(
        f"{status!r} is not a {enum_cls.__name__} of the {machine} machine; allowed: {allowed}"
    )


def can_transition(machine: str, from_status: object, to_status: object) -> bool:
    """True when ``from_status -> to_status`` is a legal change of ``machine``."""
    _, table = _machine(machine)
    return coerce_status(machine, to_status) in table[coerce_status(machine, from_status)]


def allowed_from(machine: str, to_status: object) -> frozenset:
    """Every status from which ``to_status`` may be reached."""
    return _allowed_from(machine, coerce_status(machine, to_status))


@functools.lru_cache(maxsize=None)
def _allowed_from(machine: str, wanted: Enum) -> frozenset:
    _, table = _machine(machine)
    return frozenset(source for source, targets in table.items() if wanted in targets)


def terminal_states(machine: str) -> frozenset:
    """Statuses with no way out."""
    _, table = _machine(machine)
    return frozenset(status for status, targets in table.items() if not targets)


def mermaid_diagram(machine: str) -> str:
    """The machine as a Mermaid ``stateDiagram-v2``; the README embeds this text."""
    enum_cls, table = _machine(machine)
    lines = ["stateDiagram-v2"]
    for status in enum_cls:
        if status in ENTRY_STATES[machine]:
            lines.append(f"    [*] --> {status.value}")
    for source in enum_cls:
        for target in sorted(table[source], key=lambda s: list(enum_cls).index(s)):
            lines.append(f"    {source.value} --> {target.value}")
    for status in enum_cls:
        if status in terminal_states(machine):
            lines.append(f"    {status.value} --> [*]")
    return "\n".join(lines)


__all__ = [
    "EXPERIMENT_TRANSITIONS",
    "RUN_TRANSITIONS",
    "TASK_TRANSITIONS",
    "MACHINES",
    "ENTRY_STATES",
    "INITIAL_STATES",
    "coerce_status",
    "can_transition",
    "allowed_from",
    "terminal_states",
    "mermaid_diagram",
    "MLFLOW_RUN_STATUS",
    "mlflow_status_for",
    "mlflow_status_may_follow",
]
