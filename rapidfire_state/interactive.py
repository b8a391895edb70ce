"""Applying interactive-control requests in the controller.

A person (``rapidfire-state ic …``, or a dashboard) queues a request with
:meth:`StateDB.request_run_control`; the controller claims it
(:meth:`StateDB.claim_controller_task`) at the run's next task boundary and
hands it to :func:`apply_control_request`, which carries it out and finishes
the task, so the requesting terminal reads the outcome from the task::

    while (task := db.claim_controller_task(experiment_id)) is not None:
        outcome = apply_control_request(db, task, clone_hook=copy_weights)
        log(outcome.message)

A stop, resume or kill is one transaction of the store
(:meth:`StateDB.apply_run_control`).  A clone creates the new run, lets
``clone_hook`` prepare it (its model, its MLflow run), starts it, and finishes
the task; when the hook fails, the new run is FAILED with the hook's error and
so is the task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from rapidfire_state.constants import ControllerTask, RunSource, RunStatus
from rapidfire_state.db.store.control import TASK_ACTIONS, ControlRequestError, check_clone_config
from rapidfire_state.exceptions import RapidFireError

#: ``clone_hook(new_run, parent, warm)``: prepares the new run (e.g. copies the parent's weights when warm)
CloneHook = Callable[[Any, Any, bool], None]


@dataclass(frozen=True)
class ControlOutcome:
    """What became of one request: ``ok``, the one-line ``message``, and the run it concerns.

    ``run_id`` is the run the request named, except for a clone applied ok,
    where it is the new run.
    """

    task_id: int
    action: str
    ok: bool
    message: str
    run_id: Optional[int]

    def __str__(self) -> str:
        return self.message


def clone_config(parent_config: Any, changes: dict) -> Any:
    """The configuration of a clone: the parent's, with the top-level keys of ``changes`` replaced.

    A parent whose configuration is not a dict is replaced by ``changes`` whole.
    """
    if isinstance(parent_config, dict):
        return {**parent_config, **changes}
    return dict(changes)


def apply_control_request(
    db: Any,
    task: Any,
    *,
    clone_hook: Optional[CloneHook] = None,
    start_clone: bool = True,
) -> ControlOutcome:
    """Carry out one claimed interactive-control request and finish its controller task.

    ``task`` is the :class:`TaskRecord` returned by ``claim_controller_task``
    (IN_PROGRESS; the finish is held to its claim token).  stop/resume/kill
    change the run as :meth:`StateDB.apply_run_control` does.  A clone
    (IC_CLONE_MODIFY, IC_CLONE_MODIFY_WARM) creates a run with source
    CLONE_MODIFY, ``cloned_from`` the parent, ``warm_started_from`` the parent
    when warm, the configuration :func:`clone_config` makes, and the parent's
    ``total_steps`` and ``required_workers``; calls ``clone_hook(new_run,
    parent, warm)``; then, with ``start_clone``, moves the new run to ONGOING.

    A request that is no longer valid (its run completed meanwhile) finishes
    FAILED with the reason and changes nothing else; the outcome says so
    (``ok`` False).  Only a task that is no interactive-control request at all,
    or is not claimed, raises :class:`ControlRequestError` (nothing changed).
    """
    action = TASK_ACTIONS.get(getattr(task, "task_type", None))  # type: ignore[arg-type]
    if action is None or getattr(task, "kind", None) != "controller":
        raise ControlRequestError(f"{task!r:.120} is not an interactive-control request (a controller task IC_…)")
    if action != "clone":
        ok, message = db.apply_run_control(task.task_id, claim_token=task.claim_token)
        return ControlOutcome(task.task_id, action, ok, message, task.run_id)
    return _apply_clone(db, task, clone_hook, start_clone)


def _fail(db: Any, task: Any, message: str) -> ControlOutcome:
    db.finish_controller_task(task.task_id, ok=False, error=message, claim_token=task.claim_token)
    return ControlOutcome(task.task_id, "clone", False, message, task.run_id)


def _apply_clone(db: Any, task: Any, clone_hook: Optional[CloneHook], start_clone: bool) -> ControlOutcome:
    warm = task.task_type == ControllerTask.IC_CLONE_MODIFY_WARM
    if task.run_id is None:
        return _fail(db, task, "clone request names no run to clone")
    parent = db.get_run(task.run_id)
    if parent.experiment_id != task.experiment_id:
        return _fail(
            db, task, f"cannot clone run {parent.run_id}: it belongs to experiment {parent.experiment_id}, "
            f"not to experiment {task.experiment_id}",
        )
    try:
        changes = check_clone_config(task.config)
        config = clone_config(parent.config, changes)
    except RapidFireError as exc:  # a payload signed with another key, or not a JSON object
        return _fail(db, task, f"cannot clone run {parent.run_id}: {exc}")
    new_run = db.create_run(
        task.experiment_id, config, source=RunSource.CLONE_MODIFY, cloned_from=parent.run_id,
        warm_started_from=parent.run_id if warm else None, total_steps=parent.total_steps,
        required_workers=parent.required_workers,
    )
    start = "warm start" if warm else "cold start"
    try:
        if clone_hook is not None:
            clone_hook(new_run, parent, warm)
        if start_clone:
            db.transition_run(
                new_run.run_id, RunStatus.ONGOING,
                reason=f"clone of run {parent.run_id} by user (controller task {task.task_id})",
            )
    except Exception as exc:  # noqa: BLE001 - a failed set-up fails this request, not the controller
        error = f"setting up run {new_run.run_id}, the clone of run {parent.run_id}, failed: {exc!r}"
        db.transition_run(new_run.run_id, RunStatus.FAILED, error=error, reason="clone set-up failed")
        return _fail(db, task, error)
    message = f"run {new_run.run_id} created from run {parent.run_id} ({start})"
    db.transition_task(
        "controller", task.task_id, "COMPLETED", reason=message, claim_token=task.claim_token,
    )
    return ControlOutcome(task.task_id, "clone", True, message, new_run.run_id)


__all__ = ["ControlOutcome", "CloneHook", "apply_control_request", "clone_config"]
