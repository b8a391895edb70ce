"""Ending an experiment's state in one transaction, cancelling its current task, and hooks."""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Optional, Sequence

from sqlalchemy import func, select, update
from sqlalchemy.engine import Connection

from rapidfire_state import states
from rapidfire_state.constants import ExperimentStatus, ExperimentTask, RunEndedBy, RunStatus, TaskStatus
from rapidfire_state.db import schema as tables
from rapidfire_state.db.records import CancelReport, CleanupReport, SHMObjectRecord
from rapidfire_state.db.schema import db_now
from rapidfire_state.db.store.core import StoreCore
from rapidfire_state.db.store.experiments import (
    change_experiment_without_commit,
    load_experiment,
    plan_experiment_change,
)
from rapidfire_state.db.store.lookups import check_id
from rapidfire_state.db.store.status_change import RUN, TASK_ENTITIES, change_matching_without_commit
from rapidfire_state.exceptions import ConfigError, NotFoundError
from rapidfire_state.validation import check_name

#: how cleanup may end an experiment, and its live runs
_CLEANUP_EXPERIMENT_STATUSES = (ExperimentStatus.COMPLETED, ExperimentStatus.FAILED)
_CLEANUP_RUN_STATUSES = (RunStatus.KILLED, RunStatus.FAILED)
#: the runs cleanup ends (a STOPPED run is frozen instead: it keeps its status)
_LIVE_RUNS = frozenset({RunStatus.NEW, RunStatus.ONGOING})
#: the tasks a cancel fails (PENDING tasks were not started and stay queued)
_CANCELLABLE_TASKS = frozenset({TaskStatus.SCHEDULED, TaskStatus.IN_PROGRESS})
CANCEL_REASON = "cancelled"


def lock_experiment_without_commit(conn: Connection, experiment_id: int) -> None:
    """Lock the experiment row for the rest of the transaction (PostgreSQL: FOR NO KEY UPDATE).

    Concurrent cleanups/cancels of one experiment then run one after the other
    (SQLite's BEGIN IMMEDIATE already serialises writers); inserts that only
    reference the row (KEY SHARE) still proceed.
    """
    table = tables.experiments
    locked = conn.execute(
        select(table.c.experiment_id).where(table.c.experiment_id == experiment_id).with_for_update(key_share=True)
    ).first()
    if locked is None:
        raise NotFoundError("experiment", experiment_id)


class CleanupStore(StoreCore):
    """Cleanup, cancel and cleanup hooks of :class:`~rapidfire_state.db.StateDB`."""

    def add_cleanup_hook(self, hook: Callable[[Sequence[SHMObjectRecord]], None]) -> None:
        """Call ``hook(removed_rows)`` after an experiment cleanup commits.

        The shared-memory manager registers one to drop the payloads whose
        metadata the cleanup removed.  Hook errors are logged, never raised.
        """
        with self._hooks_lock:
            if hook not in self._cleanup_hooks:
                self._cleanup_hooks.append(hook)

    def remove_cleanup_hook(self, hook: Callable[[Sequence[SHMObjectRecord]], None]) -> None:
        with self._hooks_lock:
            if hook in self._cleanup_hooks:
                self._cleanup_hooks.remove(hook)

    def cleanup_experiment_state(
        self,
        experiment_id: int,
        *,
        status: Any = ExperimentStatus.COMPLETED,
        run_status: Any = RunStatus.KILLED,
        reason: Optional[str] = None,
        error: Optional[str] = None,
    ) -> CleanupReport:
        """End an experiment's state in one transaction; idempotent.

        Open tasks → FAILED; NEW/ONGOING runs → ``run_status`` (KILLED, or FAILED
        after a crash); STOPPED runs frozen with ``ended_by = STOPPED``; workers
        marked exited; the experiment's ``shm_objects`` rows removed (cleanup
        hooks drop their payloads after commit); the experiment → ``status``
        (COMPLETED or FAILED) unless it already ended.  Runs and history stay.
        """
        check_id("experiment_id", experiment_id)
        final = states.coerce_status("experiment", status)
        if final not in _CLEANUP_EXPERIMENT_STATUSES:
            raise ConfigError(f"cleanup ends an experiment COMPLETED or FAILED, not {final.value}")
        run_final = states.coerce_status("run", run_status)
        if run_final not in _CLEANUP_RUN_STATUSES:
            raise ConfigError(f"cleanup ends live runs KILLED or FAILED, not {run_final.value}")
        why = reason or f"experiment cleanup ({final.value})"

        def unit(conn: Connection) -> CleanupReport:
            lock_experiment_without_commit(conn, experiment_id)
            experiment = load_experiment(conn, experiment_id)
            failed_tasks: list[tuple[str, int]] = []
            for kind, entity in TASK_ENTITIES.items():
                table = entity.table
                for row in change_matching_without_commit(
                    conn, entity, TaskStatus.FAILED, [table.c.experiment_id == experiment_id],
                    values={"ended_at": db_now(), "error": func.coalesce(table.c.error, why)}, reason=why,
                ):
                    failed_tasks.append((kind, row[entity.key]))
            runs = tables.runs
            ended = change_matching_without_commit(
                conn, RUN, run_final, [runs.c.experiment_id == experiment_id], expected=_LIVE_RUNS,
                values={
                    "ended_by": run_final.value, "ended_at": db_now(), "updated_at": db_now(),
                    "error": func.coalesce(runs.c.error, error) if error else runs.c.error,
                },
                reason=why,
            )
            frozen = conn.execute(
                update(runs)
                .where(runs.c.experiment_id == experiment_id, runs.c.status == RunStatus.STOPPED.value,
                       runs.c.ended_by.is_(None))
                .values(ended_by=RunEndedBy.STOPPED.value, ended_at=db_now(), updated_at=db_now())
                .returning(runs.c.run_id)
            ).scalars().all()
            workers = tables.workers
            exited = conn.execute(
                update(workers)
                .where(workers.c.experiment_id == experiment_id, workers.c.exited_at.is_(None))
                .values(exited_at=db_now())
                .returning(workers.c.worker_id)
            ).scalars().all()
            shm = tables.shm_objects
            removed = conn.execute(
                shm.delete().where(shm.c.experiment_id == experiment_id).returning(*shm.c)
            ).mappings().all()
            if experiment.status not in states.terminal_states("experiment"):
                change, params = plan_experiment_change(final, None, error)
                change_experiment_without_commit(conn, experiment_id, change, params, why)
            return CleanupReport(
                experiment_id=experiment_id,
                experiment_status=load_experiment(conn, experiment_id).status,
                failed_task_ids=tuple(failed_tasks),
                ended_run_ids=tuple(row["run_id"] for row in ended),
                frozen_run_ids=tuple(sorted(frozen)),
                exited_worker_ids=tuple(sorted(exited)),
                removed_shm_objects=tuple(SHMObjectRecord.from_row(r) for r in removed),
            )

        report = self._write(unit)
        if report.removed_shm_objects:
            self._remove_shared_copies(report.removed_shm_objects)
            self._run_cleanup_hooks(report.removed_shm_objects)
        return report

    def _remove_shared_copies(self, removed: Sequence[SHMObjectRecord]) -> None:
        """After the commit: remove the cross-host disk copies of the removed rows.

        Done here, not only by the managers' hooks, because a copy lives in a
        directory every host reads and a cleanup may run where no manager of the
        object is open.  A copy some live row still names is kept.
        """
        paths = [row.copy_path for row in removed if row.copy_path]
        if not paths:
            return
        try:
            kept = self.copy_paths_in_use(paths)  # type: ignore[attr-defined]
        except Exception as exc:  # the rows are gone; a copy left behind is only disk space
            warnings.warn(f"shm copies of the cleaned-up rows not removed: {exc!r}", RuntimeWarning, stacklevel=3)
            return
        for path in paths:
            if path in kept:
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                warnings.warn(f"could not remove the shm copy {path}: {exc}", RuntimeWarning, stacklevel=3)

    def cancel_current_task(self, experiment_id: int, *, reason: str = CANCEL_REASON) -> CancelReport:
        """Cancel what the experiment is doing, in one transaction.

        The experiment's ``current_task`` goes back to IDLE; its SCHEDULED and
        IN_PROGRESS worker and controller tasks become FAILED with ``reason`` as
        reason and error (history rows written).  PENDING tasks, runs and
        workers are left alone.  The report names the task this cancel really
        ended: it is read under the write lock.
        """
        check_id("experiment_id", experiment_id)
        check_name("reason", reason)
        experiments = tables.experiments

        def unit(conn: Connection) -> CancelReport:
            lock_experiment_without_commit(conn, experiment_id)
            before = load_experiment(conn, experiment_id).current_task
            conn.execute(
                update(experiments)
                .where(experiments.c.experiment_id == experiment_id)
                .values(current_task=ExperimentTask.IDLE.value, updated_at=db_now())
            )
            failed: list[tuple[str, int]] = []
            for kind, entity in TASK_ENTITIES.items():
                for row in change_matching_without_commit(
                    conn, entity, TaskStatus.FAILED, [entity.table.c.experiment_id == experiment_id],
                    expected=_CANCELLABLE_TASKS, values={"ended_at": db_now(), "error": reason},
                    reason=reason,
                ):
                    failed.append((kind, row[entity.key]))
            return CancelReport(experiment_id, ExperimentTask(before), tuple(failed))

        return self._write(unit)

    def _run_cleanup_hooks(self, removed: Sequence[SHMObjectRecord]) -> None:
        with self._hooks_lock:
            hooks = list(self._cleanup_hooks)
        for hook in hooks:
            try:
                hook(removed)
            except Exception as exc:  # a payload left behind is repaired by reconcile()
                warnings.warn(f"cleanup hook {hook!r} failed: {exc!r}", RuntimeWarning, stacklevel=2)
