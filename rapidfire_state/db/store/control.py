"""Interactive control: a person's requests to stop, resume, kill or clone a run, as controller tasks.

A request is checked against the database and queued in one write transaction
(:meth:`ControlStore.request_run_control`): the experiment is RUNNING, the run
exists and belongs to it, and its status allows the action.  On PostgreSQL the
experiment row is locked FOR SHARE and the run row FOR UPDATE first, so a
concurrent transition or cleanup either commits before the checks read (and
they see it) or waits until the request is queued; on SQLite the write lock
taken by ``BEGIN IMMEDIATE`` already orders them.  A refusal raises
:class:`ControlRequestError` and queues nothing.

Which statuses allow an action is read from the run machine
(:mod:`rapidfire_state.states`), never listed here: see :func:`needed_statuses`.

The controller applies a claimed stop/resume/kill with
:meth:`ControlStore.apply_run_control`: the run's compare-and-set, the
cancelling of the run's queued worker tasks and the task's finish are one
transaction, so a request is either applied and COMPLETED or FAILED with the
reason and nothing else changed.  Clones are applied by the service
:func:`rapidfire_state.interactive.apply_control_request`, which creates the run.
"""

from __future__ import annotations

import json
from types import MappingProxyType
from typing import Any, Mapping, Optional

from sqlalchemy import select
from sqlalchemy.engine import Connection

from rapidfire_state import states
from rapidfire_state.constants import ControllerTask, ExperimentStatus, RunStatus, TaskStatus
from rapidfire_state.db import schema as tables
from rapidfire_state.db.records import RunRecord, TaskRecord
from rapidfire_state.db.schema import db_now
from rapidfire_state.db.store.core import StoreCore
from rapidfire_state.db.store.lookups import check_id
from rapidfire_state.db.store.runs import change_run_without_commit, plan_run_change
from rapidfire_state.db.store.status_change import (
    CONTROLLER_TASK,
    WORKER_TASK,
    change_matching_without_commit,
)
from rapidfire_state.db.store.tasks import (
    change_task_without_commit,
    insert_task_without_commit,
    load_task,
    plan_task_change,
)
from rapidfire_state.exceptions import ConfigError, InvalidTransitionError


class ControlRequestError(ConfigError):
    """An interactive-control request that cannot be queued or applied; nothing was queued or changed.

    ``action`` and ``run_id`` name the request (either may be None when the
    request was malformed before they were known).
    """

    def __init__(self, message: str, *, action: Optional[str] = None, run_id: Optional[int] = None):
        self.action = action
        self.run_id = run_id
        super().__init__(message)


#: the actions, in the order the messages list them
ACTIONS: tuple[str, ...] = ("stop", "resume", "kill", "clone")

#: the run status each run-changing action moves the run to
ACTION_TARGETS: Mapping[str, RunStatus] = MappingProxyType(
    {"stop": RunStatus.STOPPED, "resume": RunStatus.ONGOING, "kill": RunStatus.KILLED}
)

#: the action a controller task type carries out
TASK_ACTIONS: Mapping[ControllerTask, str] = MappingProxyType(
    {
        ControllerTask.IC_STOP: "stop",
        ControllerTask.IC_RESUME: "resume",
        ControllerTask.IC_DELETE: "kill",
        ControllerTask.IC_CLONE_MODIFY: "clone",
        ControllerTask.IC_CLONE_MODIFY_WARM: "clone",
    }
)

#: what the history shows as the reason of each run change
ACTION_REASONS: Mapping[str, str] = MappingProxyType(
    {"stop": "stopped by user", "resume": "resumed by user", "kill": "killed by user"}
)

#: task statuses of a request still to be applied
_OPEN_TASKS = frozenset(s for s in TaskStatus if s not in states.terminal_states("task"))
#: the worker-task statuses a stop or kill cancels (IN_PROGRESS is the worker's to finish)
_QUEUED_WORKER_TASKS = frozenset(states.ENTRY_STATES["task"])


def task_type_for(action: str, *, warm: bool = False) -> ControllerTask:
    """The controller task type of ``action`` (``warm`` picks the warm-start clone)."""
    if action == "clone":
        return ControllerTask.IC_CLONE_MODIFY_WARM if warm else ControllerTask.IC_CLONE_MODIFY
    for task_type, named in TASK_ACTIONS.items():
        if named == action:
            return task_type
    raise ControlRequestError(f"action {action!r} is not valid; allowed: {', '.join(ACTIONS)}", action=None)


def needed_statuses(action: str) -> frozenset:
    """The run statuses from which ``action`` may be requested and applied.

    stop and kill: every status the run machine lets move to STOPPED or KILLED.
    resume: those from which ONGOING is reached other than the status a run is
    created in (leaving NEW for ONGOING is a start, not a resume).  clone: any
    status (a clone copies a run, it does not change it).
    """
    if action == "clone":
        return frozenset(RunStatus)
    target = ACTION_TARGETS.get(action)
    if target is None:
        raise ControlRequestError(f"action {action!r} is not valid; allowed: {', '.join(ACTIONS)}")
    found = states.allowed_from("run", target)
    if action == "resume":
        found = found - states.ENTRY_STATES["run"]
    return found


def _name(status: Any) -> str:
    return str(getattr(status, "value", status))


def _listed(statuses: frozenset) -> str:
    names = [s.value for s in RunStatus if s in statuses]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_clone_config(config: Any) -> dict:
    """``config`` if it is a JSON object (a dict with str keys that JSON can write).

    Anything else raises :class:`ControlRequestError` saying what it is.
    """
    if not isinstance(config, dict):
        what = "nothing" if config is None else f"a {type(config).__name__} ({config!r:.60})"
        raise ControlRequestError(
            f"clone needs config, a JSON object of the keys to change (e.g. {{\"lr\": 0.01}}); got {what}",
            action="clone",
        )
    bad = [key for key in config if not isinstance(key, str)]
    if bad:
        raise ControlRequestError(f"clone config keys must be strings; got {bad[0]!r}", action="clone")
    try:
        json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ControlRequestError(f"clone config is not JSON: {exc}", action="clone") from None
    return config


def _locked_running_experiment(conn: Connection, experiment_id: Optional[int], action: str) -> int:
    """The experiment the request goes to, locked against a concurrent end (PostgreSQL: FOR SHARE)."""
    table = tables.experiments
    query = select(table.c.experiment_id, table.c.status).with_for_update(read=True)
    if experiment_id is None:
        row = conn.execute(query.where(table.c.status == ExperimentStatus.RUNNING.value)).first()
        if row is None:
            raise ControlRequestError(
                f"no experiment is RUNNING, so nothing can {action} a run; start one, or name a RUNNING one",
                action=action,
            )
        return row.experiment_id
    row = conn.execute(query.where(table.c.experiment_id == experiment_id)).first()
    if row is None:
        raise ControlRequestError(f"experiment {experiment_id} does not exist", action=action)
    if row.status != ExperimentStatus.RUNNING.value:
        raise ControlRequestError(
            f"experiment {experiment_id} is {row.status}; requests go to a RUNNING experiment", action=action
        )
    return experiment_id


def _locked_run(conn: Connection, run_id: int, experiment_id: int, action: str) -> RunRecord:
    """The run, locked against a concurrent transition (PostgreSQL: FOR UPDATE), checked to belong."""
    table = tables.runs
    row = conn.execute(select(table).where(table.c.run_id == run_id).with_for_update()).mappings().first()
    if row is None:
        raise ControlRequestError(f"run {run_id} does not exist", action=action, run_id=run_id)
    run = RunRecord.from_row(row)
    if run.experiment_id != experiment_id:
        raise ControlRequestError(
            f"run {run_id} belongs to experiment {run.experiment_id}, not to experiment {experiment_id}",
            action=action, run_id=run_id,
        )
    return run


def _open_requests(conn: Connection, run_id: int, task_types: tuple[ControllerTask, ...]) -> list[Mapping[str, Any]]:
    table = tables.controller_tasks
    return list(
        conn.execute(
            select(table.c.task_id, table.c.task_type, table.c.status)
            .where(
                table.c.run_id == run_id,
                table.c.task_type.in_([t.value for t in task_types]),
                table.c.status.in_(sorted(s.value for s in _OPEN_TASKS)),
            )
            .order_by(table.c.task_id)
        ).mappings()
    )


def _status_refusal(run: RunRecord, action: str, conn: Connection) -> ControlRequestError:
    allowed = needed_statuses(action)
    message = (
        f"cannot {action} run {run.run_id}: it is {run.status.value}; {action} needs a run that is {_listed(allowed)}"
    )
    pending = _open_requests(conn, run.run_id, tuple(TASK_ACTIONS))
    if pending:
        shown = ", ".join(f"{TASK_ACTIONS[ControllerTask(r['task_type'])]} (task {r['task_id']})" for r in pending)
        message += f" (requests still open for it: {shown})"
    return ControlRequestError(message, action=action, run_id=run.run_id)


class ControlStore(StoreCore):
    """The interactive-control methods of :class:`~rapidfire_state.db.StateDB`."""

    def request_run_control(
        self,
        run_id: int,
        action: str,
        *,
        experiment_id: Optional[int] = None,
        config: Any = None,
        warm: bool = False,
    ) -> TaskRecord:
        """Check a request against the database and queue it as a controller task, in one transaction.

        ``action`` is ``"stop"``, ``"resume"``, ``"kill"`` or ``"clone"`` (task
        types IC_STOP, IC_RESUME, IC_DELETE, IC_CLONE_MODIFY or, with ``warm``,
        IC_CLONE_MODIFY_WARM).  The request goes to ``experiment_id``, which must
        be RUNNING (default: the RUNNING experiment); ``run_id`` must be one of
        its runs, in a status :func:`needed_statuses` allows.  A clone takes
        ``config``, a JSON object of the keys to change in the run's
        configuration, stored as the task's ``config_leaf``.  A second open stop,
        resume or kill of the same run is refused.  Returns the SCHEDULED task.

        Any refusal raises :class:`ControlRequestError`, naming the value and
        what is allowed; nothing is queued then.
        """
        if action not in ACTIONS:
            raise ControlRequestError(f"action {action!r} is not valid; allowed: {', '.join(ACTIONS)}")
        check_id("run_id", run_id)
        check_id("experiment_id", experiment_id, optional=True)
        if not isinstance(warm, bool):
            raise ControlRequestError(f"warm={warm!r} is not valid; a bool is required", action=action)
        payload = None
        if action == "clone":
            from rapidfire_state.serialize import encode_payload

            payload = encode_payload(check_clone_config(config))
        elif config is not None or warm:
            raise ControlRequestError(f"config and warm apply to clone only, not to {action}", action=action)
        task_type = task_type_for(action, warm=warm)
        allowed = needed_statuses(action)

        def unit(conn: Connection) -> TaskRecord:
            target_experiment = _locked_running_experiment(conn, experiment_id, action)
            run = _locked_run(conn, run_id, target_experiment, action)
            if run.status not in allowed:
                raise _status_refusal(run, action, conn)
            if action != "clone":
                duplicate = _open_requests(conn, run_id, (task_type,))
                if duplicate:
                    first = duplicate[0]
                    raise ControlRequestError(
                        f"a {action} request for run {run_id} is already open (controller task "
                        f"{first['task_id']}, {first['status']}); it is applied at the run's next task boundary",
                        action=action, run_id=run_id,
                    )
            return insert_task_without_commit(
                conn, "controller", target_experiment, run_id, task_type=task_type.value,
                status=states.INITIAL_STATES["task"].value, config_leaf=payload,
            )

        return self._write(unit)

    def apply_run_control(self, task_id: int, *, claim_token: Optional[str] = None) -> tuple[bool, str]:
        """Apply a claimed stop, resume or kill request; one transaction; ``(ok, outcome)``.

        The task (IN_PROGRESS; held to ``claim_token`` when given) names the run
        and the action.  Applied: the run moves (reason "stopped by user" etc.),
        a stop or kill also fails the run's queued (PENDING/SCHEDULED) worker
        tasks, and the task is COMPLETED with the outcome as the reason of its
        history row, e.g. ``(True, "run 3 STOPPED")``; a run already in the
        wanted status is ``(True, "run 3 was already STOPPED")``.  When the run's
        status no longer allows the action (it completed meanwhile) the task is
        FAILED with the reason as its error and nothing else changes:
        ``(False, error)``.  A task that is not an applicable request raises
        :class:`ControlRequestError` and nothing changes.
        """
        check_id("task_id", task_id)
        if claim_token is not None and not isinstance(claim_token, str):
            raise ConfigError(
                f"claim_token={claim_token!r} is not valid; the str of TaskRecord.claim_token is required"
            )

        def unit(conn: Connection) -> tuple[bool, str]:
            task = load_task(conn, "controller", task_id)
            action = TASK_ACTIONS.get(task.task_type)  # type: ignore[call-overload]
            if action is None or action == "clone" or task.run_id is None:
                raise ControlRequestError(
                    f"controller task {task_id} is {task.task_type.value}, not a stop, resume or kill request "
                    f"of a run; nothing was changed",
                )
            if task.status != TaskStatus.IN_PROGRESS:
                raise ControlRequestError(
                    f"controller task {task_id} is {task.status.value}; a request is applied once claimed "
                    f"(IN_PROGRESS); nothing was changed", action=action, run_id=task.run_id,
                )
            target = ACTION_TARGETS[action]
            run_id = task.run_id
            ok, outcome = True, f"run {run_id} {target.value}"
            needed = needed_statuses(action)
            change, params = plan_run_change(target, needed, None)
            try:
                from_status, _ = change_run_without_commit(
                    conn, run_id, change, params, f"{ACTION_REASONS[action]} (controller task {task_id})"
                )
            except InvalidTransitionError as exc:
                # the refused compare-and-set wrote nothing: the task alone records the refusal
                ok, from_status = False, None
                if exc.current in needed:  # e.g. a resume while the experiment is no longer RUNNING
                    outcome = f"cannot {action} run {run_id}: {exc}"
                else:
                    outcome = (
                        f"cannot {action} run {run_id}: it is {_name(exc.current)} now; {action} needs a run "
                        f"that is {_listed(needed)}"
                    )
            else:
                if from_status is None:
                    outcome = f"run {run_id} was already {target.value}"
                elif action in ("stop", "kill"):
                    cancelled = change_matching_without_commit(
                        conn, WORKER_TASK, TaskStatus.FAILED, [tables.worker_tasks.c.run_id == run_id],
                        expected=_QUEUED_WORKER_TASKS,
                        values={"ended_at": db_now(), "error": f"run {run_id} {ACTION_REASONS[action]}"},
                        reason=f"run {ACTION_REASONS[action]}",
                    )
                    if cancelled:
                        outcome += f"; {len(cancelled)} queued worker task{'s' if len(cancelled) > 1 else ''} cancelled"
            to = TaskStatus.COMPLETED if ok else TaskStatus.FAILED
            task_change, task_params = plan_task_change(CONTROLLER_TASK, to, None, None if ok else outcome, claim_token)
            change_task_without_commit(
                conn, task_id, task_change, task_params, reason=outcome if ok else "request no longer valid",
                error=None if ok else outcome, claim_token=claim_token,
            )
            return ok, outcome

        return self._write(unit)


__all__ = [
    "ACTIONS",
    "ACTION_REASONS",
    "ACTION_TARGETS",
    "TASK_ACTIONS",
    "ControlRequestError",
    "ControlStore",
    "check_clone_config",
    "needed_statuses",
    "task_type_for",
]
