"""Worker processes: registration, heartbeats, exits, and failing what the dead left behind.

Liveness is judged per claim (``worker_tasks.claim_*``): a task whose claimer
is gone from this host is failed, also after its worker id was registered again
by a live process; another host's claims fall only with their heartbeat (its
age by the database clock), since a pid means nothing off its own host.

What becomes of the runs of the tasks failed there is the caller's choice
(``lost_runs``): ``"fail"`` ends them FAILED with their tasks; ``"release"``
leaves them in their status (ONGOING stays ONGOING), so that the controller's
scheduler gives them to a live worker.  Either way the lost attempt's task is
FAILED, and a late finish of it is refused by its claim token.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from sqlalchemy import func, insert, or_, select, update
from sqlalchemy.engine import Connection

from rapidfire_state import states
from rapidfire_state.constants import RunStatus, TaskStatus
from rapidfire_state.db import schema as tables
from rapidfire_state.db.records import StaleWorkerReport, WorkerRecord
from rapidfire_state.db.schema import db_now
from rapidfire_state.db.store.core import StoreCore
from rapidfire_state.db.store.experiments import load_experiment
from rapidfire_state.db.store.lookups import all_columns, check_id, one_row, update_columns_without_commit
from rapidfire_state.db.store.processes import HOST, check_host, gone_here, process_identity, process_start_time
from rapidfire_state.db.store.runs import change_run_without_commit, plan_run_change
from rapidfire_state.db.store.status_change import WORKER_TASK, change_matching_without_commit
from rapidfire_state.exceptions import ConfigError, InvalidTransitionError, WorkerException
from rapidfire_state.validation import check_int, check_number, check_positive_int


#: what may become of the runs of the tasks failed for a lost worker (see the module's docstring)
LOST_RUNS = ("fail", "release")


def check_lost_runs(lost_runs: Any) -> str:
    """``lost_runs`` when it is one of :data:`LOST_RUNS`, else :class:`ConfigError` naming it."""
    if not isinstance(lost_runs, str) or lost_runs not in LOST_RUNS:
        raise ConfigError(
            f"lost_runs={lost_runs!r} is not valid; allowed: 'fail' (the lost tasks' runs FAILED with them)"
            " or 'release' (the runs keep their status, to be rescheduled on a live worker)"
        )
    return lost_runs


def _lost_message(message: str, lost_runs: str) -> str:
    """The error recorded on a lost task: with ``release``, it says the run was left to be rescheduled."""
    return message if lost_runs == "fail" else f"{message}; its run is left to be rescheduled"


def fail_dead_claims_without_commit(
    conn: Connection,
    experiment_id: int,
    worker_id: int,
    previous: Optional[WorkerRecord],
    context: str,
    lost_runs: str = "fail",
) -> list[StaleWorkerReport]:
    """Fail the IN_PROGRESS tasks of one worker id whose claimer is gone (their runs as ``lost_runs`` says)."""
    tasks = tables.worker_tasks
    open_tasks = conn.execute(
        select(tasks.c.task_id, tasks.c.claim_token, tasks.c.claim_pid, tasks.c.claim_host,
               tasks.c.claim_process_started_at, tasks.c.claim_process_identity)
        .where(tasks.c.experiment_id == experiment_id, tasks.c.worker_id == worker_id,
               tasks.c.status == TaskStatus.IN_PROGRESS.value)
        .order_by(tasks.c.task_id)
    ).all()
    if not open_tasks:
        return []
    previous_gone: Optional[str] = None
    if previous is not None:
        previous_gone = "was marked exited" if previous.exited_at is not None else gone_here(
            previous.host, previous.pid, previous.process_started_at, previous.process_identity
        )
    # one message (and one report) per dead claimer
    doomed: dict[tuple, list[int]] = {}
    messages: dict[tuple, str] = {}
    judged: dict[tuple, Optional[str]] = {}
    for task in open_tasks:
        if task.claim_token is None:
            # claimed before claims were recorded: judged by the row it was claimed under
            if previous is None or previous_gone is None:
                continue
            claimer = (previous.pid, previous.host, previous.process_started_at, previous.process_identity)
            why = previous_gone
        else:
            claimer = (task.claim_pid, task.claim_host, task.claim_process_started_at, task.claim_process_identity)
            if claimer not in judged:
                judged[claimer] = gone_here(
                    task.claim_host, task.claim_pid, task.claim_process_started_at, task.claim_process_identity
                )
            why = judged[claimer]
            if why is None:
                continue
        doomed.setdefault(claimer, []).append(task.task_id)
        messages[claimer] = _lost_message(
            f"worker {worker_id}'s process (pid {claimer[0]} on {claimer[1]}) {why}; {context}", lost_runs
        )
    reports = []
    for claimer, task_ids in doomed.items():
        failed, runs, released = fail_in_progress_without_commit(
            conn, [tasks.c.task_id.in_(task_ids)], messages[claimer], lost_runs=lost_runs
        )
        if failed:
            reports.append(StaleWorkerReport(
                worker=previous, reason=messages[claimer], failed_task_ids=failed, failed_run_ids=runs,
                claim_pid=claimer[0], released_run_ids=released,
            ))
    return reports


def fail_in_progress_without_commit(
    conn: Connection, conditions: Sequence[Any], message: str, *, lost_runs: str = "fail"
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """IN_PROGRESS worker tasks matching ``conditions`` → FAILED; their runs as ``lost_runs`` says.

    Compare-and-set: a task someone else finished meanwhile is left as it is,
    and so is a run that already ended (e.g. COMPLETED).  With ``"fail"`` the
    tasks' runs become FAILED; with ``"release"`` they keep their status (no
    run is written), to be given to a live worker.  Returns the failed task
    ids, the runs it failed and the runs it released (those not ended).
    """
    failed = change_matching_without_commit(
        conn, WORKER_TASK, TaskStatus.FAILED, conditions, expected={TaskStatus.IN_PROGRESS},
        values={"ended_at": db_now(), "error": message}, reason=message, returning=("run_id",),
    )
    task_ids = tuple(task["task_id"] for task in failed)
    lost: list[int] = []
    for task in failed:
        if task["run_id"] is not None and task["run_id"] not in lost:
            lost.append(task["run_id"])
    if lost_runs == "release":
        if not lost:
            return task_ids, (), ()
        runs = tables.runs
        ended = [status.value for status in states.terminal_states("run")]
        live = set(conn.execute(
            select(runs.c.run_id).where(runs.c.run_id.in_(lost), runs.c.status.not_in(ended))
        ).scalars())
        return task_ids, (), tuple(run_id for run_id in lost if run_id in live)
    run_ids: list[int] = []
    change, params = plan_run_change(RunStatus.FAILED, None, message)
    for run_id in lost:
        try:
            with conn.begin_nested():
                if change_run_without_commit(conn, run_id, change, params, message)[0] is not None:
                    run_ids.append(run_id)
        except InvalidTransitionError:
            pass  # the run already ended: keep its outcome
    return task_ids, tuple(run_ids), ()


def load_worker(conn: Connection, experiment_id: int, worker_id: int) -> WorkerRecord:
    """The worker's record inside ``conn``; :class:`NotFoundError` when missing."""
    table = tables.workers
    return WorkerRecord.from_row(one_row(
        conn, table, table.c.experiment_id == experiment_id, table.c.worker_id == worker_id,
        missing=("worker", f"{worker_id} of experiment {experiment_id}"),
    ))


def fail_worker_without_commit(
    conn: Connection, worker: WorkerRecord, reason: str, *, only_local_claims: bool = False, lost_runs: str = "fail"
) -> Optional[StaleWorkerReport]:
    """Fail the worker's IN_PROGRESS tasks (their runs as ``lost_runs`` says) and mark its row exited.

    With ``only_local_claims`` (the row's process is gone from this host but
    its heartbeat is fresh) the tasks claimed on another host are left alone:
    a local pid says nothing of them.  While such tasks remain the row stays
    open, so that its heartbeat still judges them.  Returns None when nothing
    changed.
    """
    tasks = tables.worker_tasks
    message = _lost_message(f"worker {worker.worker_id} (pid {worker.pid} on {worker.host}) {reason}", lost_runs)
    mine = [tasks.c.experiment_id == worker.experiment_id, tasks.c.worker_id == worker.worker_id]
    conditions = list(mine)
    if only_local_claims:
        # a claim of another host cannot be judged by this host's pid
        conditions.append(or_(tasks.c.claim_host.is_(None), tasks.c.claim_host == HOST))
    failed, run_ids, released = fail_in_progress_without_commit(conn, conditions, message, lost_runs=lost_runs)
    if only_local_claims:
        held = conn.execute(
            select(func.count()).select_from(tasks).where(tasks.c.status == TaskStatus.IN_PROGRESS.value, *mine)
        ).scalar_one()
        if held:
            if not failed:
                return None
            return StaleWorkerReport(
                worker=load_worker(conn, worker.experiment_id, worker.worker_id),
                reason=message, failed_task_ids=failed, failed_run_ids=run_ids, released_run_ids=released,
            )
    conn.execute(
        update(tables.workers)
        .where(tables.workers.c.id == worker.id, tables.workers.c.exited_at.is_(None))
        .values(exited_at=db_now())
    )
    if lost_runs == "release":
        # Tasks still queued for the lost worker would keep their runs waiting on a
        # worker that no longer answers: they fail with it, and their runs are free too.
        queued, queued_runs = fail_queued_without_commit(conn, mine, f"{message} before it claimed this task")
        failed += queued
        released += tuple(run_id for run_id in queued_runs if run_id not in released)
    return StaleWorkerReport(
        worker=load_worker(conn, worker.experiment_id, worker.worker_id),
        reason=message,
        failed_task_ids=failed,
        failed_run_ids=run_ids,
        released_run_ids=released,
    )


def fail_queued_without_commit(
    conn: Connection, conditions: Sequence[Any], message: str
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """PENDING or SCHEDULED worker tasks matching ``conditions`` → FAILED (compare-and-set).

    Returns the failed task ids and their runs that have not ended (left as
    they are, to be rescheduled).
    """
    queued = {TaskStatus.PENDING, TaskStatus.SCHEDULED}
    failed = change_matching_without_commit(
        conn, WORKER_TASK, TaskStatus.FAILED,
        conditions, expected=queued, values={"ended_at": db_now(), "error": message}, reason=message, returning=("run_id",),
    )
    run_ids = sorted({task["run_id"] for task in failed if task["run_id"] is not None})
    runs = tables.runs
    ended = [status.value for status in states.terminal_states("run")]
    live = set(conn.execute(
        select(runs.c.run_id).where(runs.c.run_id.in_(run_ids), runs.c.status.not_in(ended))
    ).scalars()) if run_ids else set()
    return tuple(task["task_id"] for task in failed), tuple(run_id for run_id in run_ids if run_id in live)


def staleness(worker: WorkerRecord, now: Any, grace_seconds: float) -> Optional[str]:
    """Why the worker counts as gone, or None while it looks alive."""
    gone = gone_here(worker.host, worker.pid, worker.process_started_at, worker.process_identity)
    if gone is not None:
        return gone
    age = (now - worker.heartbeat_at).total_seconds()
    if age > grace_seconds:
        return f"missed its heartbeat ({age:.1f} s old, grace {grace_seconds} s)"
    return None


class WorkerStore(StoreCore):
    """The worker methods of :class:`~rapidfire_state.db.StateDB`."""

    def register_worker(
        self, experiment_id: int, worker_id: int, pid: int, *, host: Optional[str] = None, lost_runs: str = "fail"
    ) -> WorkerRecord:
        """Record (or re-record, after a restart) worker ``worker_id``'s process.

        ``host`` defaults to this process's (``$RF_HOST``, else the system's name);
        one given is held to ``$RF_HOST``'s rules (:class:`ConfigError` naming it).
        A worker of this host is recorded with its OS start time and its process
        identity (``processes.process_identity``), by which a recycled pid is told apart.
        In the same transaction, the tasks of ``worker_id`` that a dead process
        left IN_PROGRESS are failed: every task whose own claim names a process of
        this host that is gone, and the tasks without a recorded claim when the
        previous process of the row is gone or marked exited.  Their runs are
        FAILED with them (``lost_runs="fail"``, the default) or keep their status
        to be rescheduled (``"release"``), as in :meth:`fail_stale_workers`.  A
        restart therefore never hides a predecessor's tasks from failure by
        overwriting its pid.  Claims made on another host are left to
        :meth:`fail_stale_workers` (heartbeats).
        """
        check_lost_runs(lost_runs)
        check_id("experiment_id", experiment_id)
        check_id("worker_id", worker_id)
        check_positive_int("pid", pid)
        host = HOST if host is None else check_host("host", host)
        started = process_start_time(pid) if host == HOST else None
        identity = process_identity(pid) if host == HOST else None
        table = tables.workers

        def unit(conn: Connection) -> WorkerRecord:
            load_experiment(conn, experiment_id)
            previous = conn.execute(
                select(table)
                .where(table.c.experiment_id == experiment_id, table.c.worker_id == worker_id)
                .with_for_update()  # PostgreSQL: registrations of one worker id run one after the other
            ).mappings().first()
            fail_dead_claims_without_commit(
                conn, experiment_id, worker_id,
                WorkerRecord.from_row(previous) if previous is not None else None,
                f"worker {worker_id} was registered again (pid {pid} on {host})", lost_runs,
            )
            values = dict(
                pid=pid, host=host, process_started_at=started, process_identity=identity, started_at=db_now(),
                heartbeat_at=db_now(), exited_at=None, exit_code=None,
            )
            if previous is not None:
                conn.execute(update(table).where(table.c.id == previous["id"]).values(**values))
            else:
                conn.execute(insert(table).values(experiment_id=experiment_id, worker_id=worker_id, **values))
            return load_worker(conn, experiment_id, worker_id)

        return self._write(unit, retry_on_unique=True)

    def heartbeat(self, experiment_id: int, worker_id: int) -> WorkerRecord:
        """Stamp the worker's heartbeat with the database clock.

        Raises :class:`WorkerException` when the worker was marked exited (for
        instance failed as stale): such a worker must stop, its tasks are gone.
        """
        check_id("experiment_id", experiment_id)
        check_id("worker_id", worker_id)
        table = tables.workers

        def unit(conn: Connection) -> WorkerRecord:
            result = conn.execute(
                update(table)
                .where(table.c.experiment_id == experiment_id, table.c.worker_id == worker_id, table.c.exited_at.is_(None))
                .values(heartbeat_at=db_now())
            )
            record = load_worker(conn, experiment_id, worker_id)
            if result.rowcount == 0:
                raise WorkerException(
                    f"worker {worker_id} of experiment {experiment_id} was marked exited at {record.exited_at}"
                )
            return record

        return self._write(unit)

    def mark_worker_exited(self, experiment_id: int, worker_id: int, exit_code: Optional[int] = None) -> WorkerRecord:
        """Mark the worker exited; idempotent.

        A second call keeps the first ``exited_at`` but fills an unknown exit
        code (a worker failed as stale is marked before its code is known).
        """
        check_id("experiment_id", experiment_id)
        check_id("worker_id", worker_id)
        check_int("exit_code", exit_code, minimum=None, optional=True)
        table = tables.workers

        def unit(conn: Connection) -> WorkerRecord:
            update_columns_without_commit(
                conn, table, table.c.experiment_id == experiment_id, table.c.worker_id == worker_id,
                values={
                    "exited_at": func.coalesce(table.c.exited_at, db_now()),
                    "exit_code": func.coalesce(table.c.exit_code, exit_code),
                },
                missing=("worker", f"{worker_id} of experiment {experiment_id}"),
            )
            return load_worker(conn, experiment_id, worker_id)

        return self._write(unit)

    def list_workers(
        self, experiment_id: Optional[int] = None, *, alive_only: bool = False, limit: Optional[int] = None
    ) -> list[WorkerRecord]:
        """Worker rows, optionally only those not marked exited; the first ``limit`` when given."""
        check_id("experiment_id", experiment_id, optional=True)
        table = tables.workers

        def unit(conn: Connection) -> list[WorkerRecord]:
            query = select(*all_columns(conn, table)).order_by(table.c.experiment_id, table.c.worker_id)
            if experiment_id is not None:
                query = query.where(table.c.experiment_id == experiment_id)
            if alive_only:
                query = query.where(table.c.exited_at.is_(None))
            if limit is not None:
                query = query.limit(check_positive_int("limit", limit))
            return [WorkerRecord.from_row(r) for r in conn.execute(query).mappings()]

        return self._read(unit)

    def fail_stale_workers(
        self, grace_seconds: float, *, experiment_id: Optional[int] = None, lost_runs: str = "fail"
    ) -> list[StaleWorkerReport]:
        """Fail every worker that is gone, and every task whose claimer is gone.

        Pids are judged only for this host (``$RF_HOST``, else the system's
        name); a worker of another host is judged by its heartbeat's age, by
        the database clock, so a host that stops answering (down, partitioned,
        frozen) is failed once its heartbeat is older than ``grace_seconds``.
        In one transaction:

        * each worker row not marked exited whose process is gone (its pid dead
          on this host, or the pid now another process's) or whose heartbeat is
          older than ``grace_seconds``: its IN_PROGRESS tasks become FAILED with
          an error naming the worker, its host and why, and the row is marked
          exited (its next heartbeat tells the worker to stop);
        * each other IN_PROGRESS worker task whose own claim names a process of
          this host that is gone — also when its worker id was registered again
          by a live process since: the task FAILED (the live successor's row is
          left alone; the report's ``claim_pid`` names the dead claimer).

        ``lost_runs`` says what becomes of those tasks' runs: ``"fail"`` (the
        default) ends them FAILED with the same error (``failed_run_ids``);
        ``"release"`` leaves them in their status — an ONGOING run stays
        ONGOING — so that the controller's scheduler gives them to a live worker
        (``released_run_ids``), and the tasks still queued for a worker it marks
        exited are FAILED too, their runs released likewise (with ``"fail"`` a
        queue is kept for a restarted worker).  The failed attempt stays on record either way,
        and its worker's late finish is refused by the claim token.  Anything
        else raises :class:`ConfigError`.

        Returns what changed, one report per worker or dead claimer.
        """
        # "not >= 0" also refuses NaN, which compares false with everything
        check_number("grace_seconds", grace_seconds)
        check_lost_runs(lost_runs)
        check_id("experiment_id", experiment_id, optional=True)
        table = tables.workers
        tasks = tables.worker_tasks

        def unit(conn: Connection) -> list[StaleWorkerReport]:
            now = conn.execute(select(db_now())).scalar_one()
            query = select(table).where(table.c.exited_at.is_(None))
            if experiment_id is not None:
                query = query.where(table.c.experiment_id == experiment_id)
            reports = []
            for row in conn.execute(query).mappings().all():
                worker = WorkerRecord.from_row(row)
                reason = staleness(worker, now, grace_seconds)
                if reason is None:
                    continue
                # Gone by its pid while the heartbeat is fresh: the claims of other
                # hosts under this worker id are left to the heartbeat.
                by_pid = (now - worker.heartbeat_at).total_seconds() <= grace_seconds
                report = fail_worker_without_commit(
                    conn, worker, reason, only_local_claims=by_pid, lost_runs=lost_runs
                )
                if report is not None:
                    reports.append(report)
            # Per claim: what a dead process of this host left, whoever the worker row names now.
            claimed = select(tasks.c.experiment_id, tasks.c.worker_id).distinct().where(
                tasks.c.status == TaskStatus.IN_PROGRESS.value, tasks.c.claim_host == HOST,
            )
            if experiment_id is not None:
                claimed = claimed.where(tasks.c.experiment_id == experiment_id)
            for owner in sorted(conn.execute(claimed).all()):
                row = conn.execute(
                    select(table).where(table.c.experiment_id == owner.experiment_id, table.c.worker_id == owner.worker_id)
                ).mappings().first()
                current = WorkerRecord.from_row(row) if row is not None else None
                context = (
                    f"worker {owner.worker_id} is now pid {current.pid} on {current.host}" if current is not None
                    else f"worker {owner.worker_id} has no worker row"
                )
                for report in fail_dead_claims_without_commit(
                    conn, owner.experiment_id, owner.worker_id, None, context, lost_runs
                ):
                    reports.append(dataclasses.replace(report, worker=current))
            return reports

        return self._write(unit)
