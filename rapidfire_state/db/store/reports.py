"""Read-only reports for the console (``status``, ``watch``, ``doctor``, limited listings).

Every query here reads; none loads a whole table.  They are written for
databases of 100k runs and millions of history rows: counts are aggregated in
SQL over an index (``ix_runs_experiment_id_status``,
``ix_worker_tasks_experiment_id_status``, ...), listings stop at ``limit + 1``
rows (to say that they were cut), and metric values are read past a cursor so
that a refreshing reader only reads what is new.

The queries name only columns that exist since ``0001_initial`` (the outbox
ones since ``0005_metric_outbox``, used only when the caller knows the database
has it), so databases behind head are read as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from rapidfire_state import states
from rapidfire_state.constants import ExperimentStatus, MetricRowKind, RunStatus, SHMLocation, TaskStatus
from rapidfire_state.db import schema as tables
from rapidfire_state.db.records import ExperimentRecord, SHMObjectRecord, TaskRecord, WorkerRecord
from rapidfire_state.db.schema import db_now
from rapidfire_state.db.store.core import StoreCore
from rapidfire_state.db.store.experiments import load_experiment
from rapidfire_state.db.store.lookups import all_columns, check_id, status_filter
from rapidfire_state.db.store.processes import HOST, identity_changed, process_identity
from rapidfire_state.db.store.workers import staleness
from rapidfire_state.exceptions import ConfigError
from rapidfire_state.validation import check_positive_int

#: task statuses that are still open (waiting or running)
OPEN_TASK_STATUSES = (TaskStatus.PENDING.value, TaskStatus.SCHEDULED.value, TaskStatus.IN_PROGRESS.value)
#: run statuses after which no worker task of the run may stay open (STOPPED: skipped until resumed)
RUN_STATUSES_WITHOUT_WORK = (
    RunStatus.COMPLETED.value, RunStatus.FAILED.value, RunStatus.KILLED.value, RunStatus.STOPPED.value,
)
#: a COMPLETED run's progress may fall short of 1.0 by float rounding only
PROGRESS_TOLERANCE = 1e-9
#: metric rows re-read before the cursor on each refresh: on PostgreSQL a row with a lower id
#: can become visible after one with a higher id (its transaction committed later)
METRIC_CURSOR_OVERLAP = 1000

#: the columns of a run that listings and the live table show (not the config payload)
_RUN_COLUMNS = (
    "run_id", "experiment_id", "status", "source", "ended_by", "metric_run_id", "flattened_config",
    "completed_steps", "total_steps", "num_chunks_visited", "num_epochs_completed", "chunk_offset", "progress",
    "error", "cloned_from", "warm_started_from", "created_at", "started_at", "updated_at", "ended_at",
)


@dataclass(frozen=True)
class StatusCounts:
    """What ``rapidfire-state status`` shows of one experiment, read in one transaction."""

    now: Any
    runs: dict[str, int]
    worker_tasks: dict[str, int]
    controller_tasks: dict[str, int]
    #: location -> (objects, bytes)
    shm: dict[str, tuple[int, int]]
    #: workers not marked exited, each with why it counts as stale (None: alive)
    workers: list[tuple[WorkerRecord, Optional[str]]]
    workers_exited: int


@dataclass(frozen=True)
class RunMetrics:
    """The last metric values per run, and the cursor to read on from."""

    #: run_id -> key -> (outbox_id, value)
    values: dict[int, dict[str, tuple[int, float]]] = field(default_factory=dict)
    cursor: int = 0


def _counts(conn: Connection, table: Any, experiment_id: int, statuses: Optional[Sequence[str]] = None) -> dict[str, int]:
    query = select(table.c.status, func.count()).where(table.c.experiment_id == experiment_id)
    if statuses is not None:
        query = query.where(table.c.status.in_(statuses))
    return {status: int(n) for status, n in conn.execute(query.group_by(table.c.status)).all()}


def _page(rows: list, limit: Optional[int]) -> tuple[list, bool]:
    if limit is None or len(rows) <= limit:
        return rows, False
    return rows[:limit], True


def _limit(limit: Optional[int]) -> Optional[int]:
    return None if limit is None else check_positive_int("limit", limit)


def _one_more(limit: Optional[int]) -> Optional[int]:
    # one row past the page tells whether the listing was cut
    return None if limit is None else limit + 1


class ReportStore(StoreCore):
    """The console's read-only report methods of :class:`~rapidfire_state.db.StateDB`."""

    # --- which experiment -----------------------------------------------------------------

    def latest_experiment(self) -> Optional[ExperimentRecord]:
        """The experiment created last (highest id), or None on a database without experiments."""
        table = tables.experiments

        def unit(conn: Connection) -> Optional[ExperimentRecord]:
            latest = select(*all_columns(conn, table)).order_by(table.c.experiment_id.desc()).limit(1)
            row = conn.execute(latest).mappings().first()
            return ExperimentRecord.from_row(row) if row is not None else None

        return self._read(unit)

    # --- status ----------------------------------------------------------------------------

    def run_status_counts(self, experiment_id: int) -> dict[str, int]:
        """How many runs of the experiment have each status (one aggregate over the index)."""
        check_id("experiment_id", experiment_id)
        return self._read(lambda conn: _counts(conn, tables.runs, experiment_id))

    def status_counts(self, experiment_id: int, *, grace_seconds: float = 30.0) -> StatusCounts:
        """Runs by status, open tasks by status, shared memory by location and the workers of one experiment.

        One read transaction (one snapshot); each count is one aggregate over an
        index on ``experiment_id``.  A worker is stale when its process is gone
        from this host or its heartbeat is older than ``grace_seconds`` by the
        database clock (as ``fail_stale_workers`` judges it).
        """
        check_id("experiment_id", experiment_id)

        def unit(conn: Connection) -> StatusCounts:
            load_experiment(conn, experiment_id)
            now = conn.execute(select(db_now())).scalar_one()
            shm = tables.shm_objects
            usage = {
                location: (int(n), int(total or 0))
                for location, n, total in conn.execute(
                    select(shm.c.location, func.count(), func.sum(shm.c.num_bytes))
                    .where(shm.c.experiment_id == experiment_id)
                    .group_by(shm.c.location)
                ).all()
            }
            workers = tables.workers
            live = [
                WorkerRecord.from_row(row) for row in conn.execute(
                    select(*all_columns(conn, workers))
                    .where(workers.c.experiment_id == experiment_id, workers.c.exited_at.is_(None))
                    .order_by(workers.c.worker_id)
                ).mappings()
            ]
            exited = conn.execute(
                select(func.count()).select_from(workers)
                .where(workers.c.experiment_id == experiment_id, workers.c.exited_at.is_not(None))
            ).scalar_one()
            return StatusCounts(
                now=now,
                runs=_counts(conn, tables.runs, experiment_id),
                worker_tasks=_counts(conn, tables.worker_tasks, experiment_id, OPEN_TASK_STATUSES),
                controller_tasks=_counts(conn, tables.controller_tasks, experiment_id, OPEN_TASK_STATUSES),
                shm=usage,
                workers=[(w, staleness(w, now, grace_seconds)) for w in live],
                workers_exited=int(exited),
            )

        return self._read(unit)

    # --- listings with a limit ---------------------------------------------------------------

    def runs_page(
        self,
        experiment_id: Optional[int] = None,
        statuses: Optional[Iterable[Any]] = None,
        *,
        limit: Optional[int] = 1000,
    ) -> tuple[list[dict[str, Any]], bool]:
        """Runs in id order as plain dicts (without the config payload), and whether more were left out."""
        check_id("experiment_id", experiment_id, optional=True)
        wanted = status_filter("run", statuses)
        limit = _limit(limit)
        table = tables.runs

        def unit(conn: Connection) -> list[dict[str, Any]]:
            query = select(*(table.c[name] for name in _RUN_COLUMNS)).order_by(table.c.run_id)
            if experiment_id is not None:
                query = query.where(table.c.experiment_id == experiment_id)
            if wanted is not None:
                query = query.where(table.c.status.in_(wanted))
            if limit is not None:
                query = query.limit(limit + 1)
            return [dict(row) for row in conn.execute(query).mappings()]

        return _page(self._read(unit), limit)

    def tasks_page(
        self,
        kind: str,
        *,
        experiment_id: Optional[int] = None,
        statuses: Optional[Iterable[Any]] = None,
        limit: Optional[int] = 1000,
    ) -> tuple[list[TaskRecord], bool]:
        """Tasks of one kind (``worker``/``controller``) in id order, and whether more were left out."""
        if kind not in ("worker", "controller"):
            raise ConfigError(f"task kind {kind!r} is not valid; allowed: worker, controller")
        limit = _limit(limit)
        return _page(self.list_tasks(kind, experiment_id=experiment_id, statuses=statuses, limit=_one_more(limit)), limit)

    def workers_page(
        self, experiment_id: Optional[int] = None, *, alive_only: bool = False, limit: Optional[int] = 1000
    ) -> tuple[list[WorkerRecord], bool]:
        """Worker rows (experiment, worker id order), and whether more were left out."""
        limit = _limit(limit)
        return _page(self.list_workers(experiment_id, alive_only=alive_only, limit=_one_more(limit)), limit)

    def shm_page(
        self, experiment_id: Optional[int] = None, *, limit: Optional[int] = 1000
    ) -> tuple[list[SHMObjectRecord], bool]:
        """``shm_objects`` rows in id order, and whether more were left out."""
        limit = _limit(limit)
        return _page(self.list_shm_objects(experiment_id=experiment_id, limit=_one_more(limit)), limit)

    # --- the last metric values of each run (metric outbox, revision 0005) -------------------

    def last_run_metrics(
        self, experiment_id: int, keys: Sequence[str], *, since: Optional[RunMetrics] = None
    ) -> RunMetrics:
        """The last METRIC value of each of ``keys`` per run of the experiment, from the metric outbox.

        Rows stay in the outbox after delivery, so this needs no MLflow.  With
        ``since`` (the previous answer) only rows past its cursor are read (less
        an overlap, for rows that became visible late): a refreshing reader pays
        for what is new, not for the whole history.
        """
        check_id("experiment_id", experiment_id)
        wanted = sorted(set(keys))
        outbox, streams = tables.metric_outbox, tables.metric_streams
        after = max(0, since.cursor - METRIC_CURSOR_OVERLAP) if since is not None else 0

        def unit(conn: Connection) -> RunMetrics:
            values = {run: dict(found) for run, found in (since.values.items() if since is not None else ())}
            cursor = conn.execute(select(func.max(outbox.c.outbox_id))).scalar() or 0
            if not wanted:
                return RunMetrics(values, int(cursor))
            run_of = {
                stream_id: run_id for stream_id, run_id in conn.execute(
                    select(streams.c.stream_id, streams.c.run_id)
                    .where(streams.c.experiment_id == experiment_id, streams.c.run_id.is_not(None))
                ).all()
            }
            if not run_of or cursor <= after:
                return RunMetrics(values, int(max(cursor, since.cursor if since else 0)))
            last = (
                select(func.max(outbox.c.outbox_id).label("outbox_id"))
                .where(
                    outbox.c.outbox_id > after, outbox.c.outbox_id <= cursor,
                    outbox.c.stream_id.in_(list(run_of)), outbox.c.kind == MetricRowKind.METRIC.value,
                    outbox.c.key.in_(wanted),
                )
                .group_by(outbox.c.stream_id, outbox.c.key)
                .subquery()
            )
            rows = conn.execute(
                select(outbox.c.outbox_id, outbox.c.stream_id, outbox.c.key, outbox.c.value)
                .join(last, last.c.outbox_id == outbox.c.outbox_id)
            ).all()
            for outbox_id, stream_id, key, value in rows:
                per_run = values.setdefault(run_of[stream_id], {})
                known = per_run.get(key)
                if known is None or known[0] <= outbox_id:
                    per_run[key] = (int(outbox_id), math.nan if value is None else float(value))
            return RunMetrics(values, int(cursor))

        return self._read(unit)

    # --- doctor's checks ---------------------------------------------------------------------

    def sqlite_integrity(self) -> list[str]:
        """``PRAGMA integrity_check``'s complaints (empty when the file is sound); SQLite only."""
        if not self.is_sqlite:
            return []
        found = self._read(lambda conn: [row[0] for row in conn.exec_driver_sql("PRAGMA integrity_check").all()])
        return [] if found == ["ok"] else found

    def sqlite_foreign_key_problems(self, *, limit: int = 100) -> list[dict[str, Any]]:
        """``PRAGMA foreign_key_check``: rows whose parent row is missing (at most ``limit``); SQLite only."""
        if not self.is_sqlite:
            return []

        def unit(conn: Connection) -> list[dict[str, Any]]:
            found = []
            for table, rowid, parent, _ in conn.exec_driver_sql("PRAGMA foreign_key_check"):
                found.append({"table": table, "rowid": rowid, "parent": parent})
                if len(found) >= limit:
                    break
            return found

        return self._read(unit)

    def running_experiments(self) -> list[ExperimentRecord]:
        """The RUNNING experiment(s) (the partial unique index allows one; read as a list anyway)."""
        table = tables.experiments

        def unit(conn: Connection) -> list[ExperimentRecord]:
            rows = conn.execute(
                select(*all_columns(conn, table))
                .where(table.c.status == ExperimentStatus.RUNNING.value)
                .order_by(table.c.experiment_id)
            ).mappings()
            return [ExperimentRecord.from_row(r) for r in rows]

        return self._read(unit)

    def open_workers(self, experiment_id: Optional[int] = None, *, grace_seconds: float = 30.0) -> list[tuple[WorkerRecord, Optional[str]]]:
        """Workers not marked exited, each with why it is stale (None while it looks alive)."""
        check_id("experiment_id", experiment_id, optional=True)
        table = tables.workers

        def unit(conn: Connection) -> list[tuple[WorkerRecord, Optional[str]]]:
            now = conn.execute(select(db_now())).scalar_one()
            query = (
                select(*all_columns(conn, table)).where(table.c.exited_at.is_(None))
                .order_by(table.c.experiment_id, table.c.worker_id)
            )
            if experiment_id is not None:
                query = query.where(table.c.experiment_id == experiment_id)
            return [
                (worker, staleness(worker, now, grace_seconds))
                for worker in (WorkerRecord.from_row(r) for r in conn.execute(query).mappings())
            ]

        return self._read(unit)

    def completed_runs_short_of_progress(
        self, experiment_id: Optional[int] = None, *, limit: int = 100
    ) -> tuple[list[dict[str, Any]], int]:
        """COMPLETED runs whose progress is below 1.0: up to ``limit`` of them, and how many there are."""
        check_id("experiment_id", experiment_id, optional=True)
        check_positive_int("limit", limit)
        runs = tables.runs
        conditions = [runs.c.status == RunStatus.COMPLETED.value, runs.c.progress < 1.0 - PROGRESS_TOLERANCE]
        if experiment_id is not None:
            conditions.append(runs.c.experiment_id == experiment_id)

        def unit(conn: Connection) -> tuple[list[dict[str, Any]], int]:
            total = conn.execute(select(func.count()).select_from(runs).where(*conditions)).scalar_one()
            listed = conn.execute(
                select(runs.c.run_id, runs.c.experiment_id, runs.c.progress, runs.c.completed_steps,
                       runs.c.total_steps, runs.c.num_chunks_visited, runs.c.num_epochs_completed)
                .where(*conditions).order_by(runs.c.run_id).limit(limit)
            ).mappings()
            return [dict(row) for row in listed], int(total)

        return self._read(unit)

    def open_tasks_of_ended_runs(self, experiment_id: Optional[int] = None, *, limit: int = 100) -> list[dict[str, Any]]:
        """Open tasks (PENDING/SCHEDULED/IN_PROGRESS) whose run can have no work.

        Worker tasks of COMPLETED, FAILED, KILLED or STOPPED runs; controller
        tasks of COMPLETED, FAILED or KILLED runs (a STOPPED run waits for its
        IC_RESUME).  The tasks are found through the ``(experiment_id, status)``
        index, one experiment at a time, never by scanning every task.
        """
        check_id("experiment_id", experiment_id, optional=True)
        check_positive_int("limit", limit)
        runs, experiments = tables.runs, tables.experiments
        terminal = tuple(s.value for s in states.terminal_states("run"))

        def unit(conn: Connection) -> list[dict[str, Any]]:
            if experiment_id is not None:
                ids = [experiment_id]
            else:
                ids = list(conn.execute(select(experiments.c.experiment_id)).scalars())
            found: list[dict[str, Any]] = []
            for kind, table, ended in (
                ("worker", tables.worker_tasks, RUN_STATUSES_WITHOUT_WORK),
                ("controller", tables.controller_tasks, terminal),
            ):
                for start in range(0, len(ids), 500):
                    rows = conn.execute(
                        select(table.c.task_id, table.c.experiment_id, table.c.run_id, table.c.task_type,
                               table.c.status, runs.c.status.label("run_status"))
                        .join(runs, runs.c.run_id == table.c.run_id)
                        .where(table.c.experiment_id.in_(ids[start:start + 500]),
                               table.c.status.in_(OPEN_TASK_STATUSES), runs.c.status.in_(ended))
                        .order_by(table.c.task_id).limit(limit - len(found))
                    ).mappings()
                    found += [{"kind": kind, **row} for row in rows]
                    if len(found) >= limit:
                        return found
            return found

        return self._read(unit)

    def shm_rows_by_experiment_status(self) -> list[dict[str, Any]]:
        """``shm_objects`` rows per experiment with its status: (experiment_id, status, location, objects, bytes)."""
        shm, experiments = tables.shm_objects, tables.experiments
        statement = (
            select(shm.c.experiment_id, experiments.c.status, shm.c.location, func.count().label("objects"),
                   func.sum(shm.c.num_bytes).label("bytes"))
            .select_from(shm.outerjoin(experiments, experiments.c.experiment_id == shm.c.experiment_id))
            .group_by(shm.c.experiment_id, experiments.c.status, shm.c.location)
            .order_by(shm.c.experiment_id, shm.c.location)
        )
        return [dict(row) for row in self._read(lambda conn: conn.execute(statement).mappings().all())]

    def disk_shm_rows(self) -> list[dict[str, Any]]:
        """The DISK rows of ``shm_objects``: key, experiment, disk path (spilled objects: few, by design)."""
        shm = tables.shm_objects
        statement = (
            select(shm.c.key, shm.c.experiment_id, shm.c.run_id, shm.c.disk_path)
            .where(shm.c.location == SHMLocation.DISK.value).order_by(shm.c.shm_object_id)
        )
        return [dict(row) for row in self._read(lambda conn: conn.execute(statement).mappings().all())]

    def experiment_directories(self) -> list[dict[str, Any]]:
        """Each experiment's id, name, status and base path (its files are under ``<path>/<name>``)."""
        table = tables.experiments
        statement = select(table.c.experiment_id, table.c.name, table.c.status, table.c.experiments_path).order_by(
            table.c.experiment_id
        )
        return [dict(row) for row in self._read(lambda conn: conn.execute(statement).mappings().all())]


#: An owner row without a process identity (before revision 0008, or off Linux): a live
#: pid whose process started more than this many seconds after the experiment row was
#: written only inherited the owner's pid.  The row's time is the database clock:
#: generous enough for a PostgreSQL server whose clock is a little off this host's.
OWNER_START_TOLERANCE_S = 5.0


def owner_gone(experiment: ExperimentRecord) -> Optional[str]:
    """Why the experiment's owner process is gone, or None while it runs or cannot be judged.

    Judged on this host only (another host's pid means nothing here), as the
    experiment service judges it on start: no such pid, a zombie, or a pid now
    held by another process: by the owner's recorded process identity (no step
    of the wall clock moves it), or on a row without one (before revision 0008),
    a process started after the experiment row was created.
    """
    if experiment.owner_pid is None or experiment.owner_host != HOST:
        return None
    import psutil

    try:
        process = psutil.Process(experiment.owner_pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return "has exited (zombie process)"
        if experiment.owner_process_identity and process_identity(experiment.owner_pid) is not None:
            return identity_changed(experiment.owner_process_identity, experiment.owner_pid)
        if process.create_time() > experiment.created_at.timestamp() + OWNER_START_TOLERANCE_S:
            return "has exited (its pid now belongs to a younger process)"
    except psutil.NoSuchProcess:
        return "has exited (pid not running)"
    except psutil.AccessDenied:
        return None
    return None


__all__ = ["ReportStore", "StatusCounts", "RunMetrics", "OPEN_TASK_STATUSES", "owner_gone"]
