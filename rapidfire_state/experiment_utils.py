"""Experiment lifecycle on top of :class:`~rapidfire_state.db.StateDB`.

:class:`ExperimentUtils` is the spec's ``experiment_utils.ExperimentUtils``: it creates
experiments (unique names decided by the database), ends them, cancels the current
task, reports runs, cleans up (worker processes first, then one database transaction)
and installs SIGINT/SIGTERM handlers that do all of that before exiting::

    utils = ExperimentUtils()
    exp_id, exp_name, messages = utils.create_experiment("my_exp", "./experiments")
    utils.setup_signal_handlers(worker_processes)

A service module: it imports the state core (:mod:`rapidfire_state.db`) and leaf
modules only — never torch or mlflow; pandas is imported lazily, when a DataFrame is
asked for.  It knows nothing of the worker or shared-memory managers: it works with
the pids the database registered and with any objects that look like
``multiprocessing.Process`` (or a manager with ``shutdown_workers()``).
"""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable, Iterable, Optional, Union

from rapidfire_state.constants import ExperimentStatus, ExperimentTask, RunStatus
from rapidfire_state.datapaths import DataPath, resolve_base
from rapidfire_state.db import (
    CancelReport,
    CleanupReport,
    ExperimentRecord,
    StateDB,
    WorkerRecord,
    validate_experiment_name,
)
from rapidfire_state.db.store.processes import HOST, process_identity
from rapidfire_state.db.store.reports import OWNER_START_TOLERANCE_S, owner_gone
from rapidfire_state.exceptions import (
    DataPathException,
    ExperimentException,
    InvalidTransitionError,
)
from rapidfire_state.validation import check_number

#: How many times a create that lost the race for RUNNING ends the winner and
#: tries again.  Every lost attempt means another creator won and returned (it
#: never competes again), so N concurrent creators need at most N - 1 retries; the
#: bound only guards against something outside this protocol flipping experiments.
MAX_START_ATTEMPTS = 64


#: A worker row without a process identity (before revision 0008, or off Linux):
#: its ``process_started_at`` and the live process's create time must agree within
#: this many seconds for the pid to be signalled (the create time wanders by a whole
#: second as NTP slews the clock).
WORKER_START_TOLERANCE_S = 1.5

#: After SIGKILL, how long to wait for the processes to disappear.
KILL_WAIT_S = 5.0

_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)

SignalHandler = Union[Callable[[int, Optional[FrameType]], Any], int, None]


@dataclass(frozen=True)
class ProcessReport:
    """What :meth:`ExperimentUtils.terminate_worker_processes` did, pid by pid."""

    terminated: tuple[int, ...]  # exited after SIGTERM
    killed: tuple[int, ...]  # needed SIGKILL
    skipped: tuple[tuple[int, str], ...]  # (pid, why it was not signalled)
    survivors: tuple[int, ...]  # still present after SIGKILL and the wait (should be empty)


class ExperimentUtils:
    """Experiment lifecycle: create, end, cancel, report, clean up, signal handlers.

    Args:
        db: the state database; ``None`` opens the default one (``$RF_DB_URL``, else
            ``$RF_HOME/db/rapidfire_state.db``).  A URL or path string is opened too.
        metrics: an :class:`~rapidfire_state.metric_manager.MLflowManager` whose
            outbox this instance flushes (at most its ``exit_flush_seconds``) after
            ending an experiment, so the MLflow runs show how their runs ended
            (:meth:`cleanup_experiment`, :meth:`end_experiment`, the signal handlers).
            Without one, the statuses wait in the outbox for the next flush.

    Every method is safe to call from several processes at once: decisions that
    must be atomic (the unique name, the single RUNNING experiment, the cleanup) are
    made inside database transactions.
    """

    def __init__(self, db: Union[StateDB, str, os.PathLike, None] = None, *, metrics: Any = None) -> None:
        if db is None or isinstance(db, (str, os.PathLike)):
            db = StateDB(db)
        if not isinstance(db, StateDB):
            raise ExperimentException(f"db {db!r} is not a StateDB, a database URL or None")
        self._db = db
        self.metrics = metrics
        self._host = HOST  # $RF_HOST or the system's name: the name this process's records carry
        self._previous_handlers: dict[int, SignalHandler] = {}
        self._worker_processes: Any = None
        self._handling_signal = False

    @property
    def db(self) -> StateDB:
        """The state database this instance works on."""
        return self._db

    # --- creation ----------------------------------------------------------------------

    def create_experiment(self, given_name: Any, experiments_path: Any) -> tuple[int, str, list[str]]:
        """Create (or reuse) the running experiment; returns ``(id, name, messages)``.

        Steps, each reported in ``messages``:

        1. ``given_name`` is validated (stripped; empty → ``rf-exp``; at most 128
           ASCII letters, digits, ``-``, ``_``, ``.``; no leading dot, no ``..``) and
           ``experiments_path`` resolved.  A bad value raises
           :class:`ExperimentException` naming it, before the database or the disk
           is touched.
        2. If an experiment is RUNNING:

           * its owner process is dead (same host; pid gone, a zombie, or reused by a
             younger process) → it is cleaned up as FAILED, its live runs FAILED;
           * it has the name given and this process owns it (or no owner was
             recorded) → it is returned as is, its current task cancelled
             (:meth:`cancel_current`), its directories re-initialised;
           * otherwise (another name, or the same name owned by another live
             process) → it is ended with a full cleanup as COMPLETED: at most one
             experiment runs, and the newest request takes over, as in the spec.
        3. A NEW experiment is inserted with ``unique=True`` — ``my_exp`` →
           ``my_exp_1`` → … decided inside the inserting transaction — and owned by
           this process (``owner_pid``/``owner_host``), then moved NEW → RUNNING.
        4. ``DataPath.initialize(name, experiments_path)`` creates its directories.

        Race semantics: when several processes create at once, every one of them
        gets its own NEW row with a distinct name (step 3), and the database's
        one-RUNNING index lets exactly one NEW → RUNNING succeed at a time.  A
        creator whose NEW → RUNNING is refused because another experiment became
        RUNNING meanwhile does what step 2 does for a different name: it ends that
        experiment (cleanup, COMPLETED — or FAILED if its owner is dead) and tries
        again.  So N concurrent creators of ``my_exp`` all succeed, with the names
        ``my_exp``, ``my_exp_1`` … ``my_exp_<N-1>``; exactly one is RUNNING at the
        end (the last to start) and the others are COMPLETED — the same outcome as
        N calls made one after another.  Each refusal means another creator won
        and returned, so the retries are bounded by N - 1 (and by
        :data:`MAX_START_ATTEMPTS`; exhausting it marks our NEW row FAILED and
        raises :class:`ExperimentException`).

        Raises:
            ExperimentException: an invalid name or path; directories that cannot be
                created (the new experiment is then cleaned up as FAILED).
        """
        name = validate_experiment_name(given_name)
        try:
            base = resolve_base(experiments_path, "experiments_path")
        except DataPathException as exc:
            raise ExperimentException(str(exc)) from None
        messages: list[str] = []

        running = self._db.get_running_experiment()
        if running is not None:
            owner = self._owner_state(running)
            if owner == "dead":
                self._recover_dead_owner(running, messages)
            elif running.name == name and owner in ("self", "unknown"):
                return self._reuse(running, base, messages)
            else:
                self._end_for_takeover(running, name, messages)

        record = self._db.create_experiment(
            name, str(base), unique=True, owner_pid=os.getpid(), owner_host=self._host
        )
        self._start(record, messages)

        try:
            DataPath.initialize(record.name, base)
        except DataPathException as exc:
            self.cleanup_experiment(
                record.experiment_id, status=ExperimentStatus.FAILED, error=f"cannot create its directories: {exc}"
            )
            raise ExperimentException(
                f"experiment {record.name!r} could not create its directories under {str(base)!r}: {exc};"
                " it was ended as FAILED"
            ) from exc

        note = "" if record.name == name else f" (the name {name!r} was taken)"
        messages.append(
            f"Created experiment {record.name!r} (id {record.experiment_id}){note}; "
            f"its files are under {str(base / record.name)!r}."
        )
        return record.experiment_id, record.name, messages

    def _start(self, record: ExperimentRecord, messages: list[str]) -> None:
        """NEW → RUNNING for our new row, taking over from whoever is RUNNING meanwhile."""
        for attempt in range(1, MAX_START_ATTEMPTS + 1):
            try:
                self._db.transition_experiment(
                    record.experiment_id,
                    ExperimentStatus.RUNNING,
                    expected=[ExperimentStatus.NEW],
                    reason=f"started by pid {os.getpid()} on {self._host}",
                )
                return
            except InvalidTransitionError as exc:
                if exc.current != ExperimentStatus.NEW:
                    # Someone else moved our row (an operator, a CLI); never fight that.
                    raise ExperimentException(
                        f"experiment {record.name!r} (id {record.experiment_id}) was moved to "
                        f"{exc.current} by another process before it could start"
                    ) from exc
            # Another experiment became RUNNING between our check and our start.
            other = self._db.get_running_experiment()
            if other is not None:
                if self._owner_state(other) == "dead":
                    self._recover_dead_owner(other, messages)
                else:
                    self._end_for_takeover(other, record.name, messages, concurrent=True)
            # Full jitter: creators that collided do not collide again in lockstep.
            time.sleep(random.uniform(0, min(0.05, 0.002 * 2 ** min(attempt, 5))))
        error = f"could not become RUNNING after {MAX_START_ATTEMPTS} attempts (other experiments kept starting)"
        try:
            self._db.transition_experiment(record.experiment_id, ExperimentStatus.FAILED, error=error, reason=error)
        except InvalidTransitionError:
            pass  # it already ended; nothing more to record
        raise ExperimentException(f"experiment {record.name!r} (id {record.experiment_id}) {error}")

    def _reuse(self, running: ExperimentRecord, base: Any, messages: list[str]) -> tuple[int, str, list[str]]:
        cancelled = self._db.cancel_current_task(running.experiment_id)
        # Its files stay where they were created, whatever path this call gave.
        try:
            DataPath.initialize(running.name, running.experiments_path)
        except DataPathException as exc:
            raise ExperimentException(
                f"experiment {running.name!r} is running but its directories under "
                f"{running.experiments_path!r} cannot be used: {exc}"
            ) from exc
        detail = (
            f"its task {cancelled.previous_task.value} cancelled"
            if cancelled.previous_task != ExperimentTask.IDLE
            else "it was idle"
        )
        if cancelled.failed_task_ids:
            detail += f", {len(cancelled.failed_task_ids)} scheduled/in-progress task(s) FAILED"
        messages.append(
            f"Experiment {running.name!r} (id {running.experiment_id}) is already running; "
            f"reused it ({detail})."
        )
        if str(base) != running.experiments_path:
            messages.append(
                f"Experiment {running.name!r} keeps its files under {running.experiments_path!r}, "
                f"not {str(base)!r}."
            )
        return running.experiment_id, running.name, messages

    def _recover_dead_owner(self, running: ExperimentRecord, messages: list[str]) -> None:
        why = (
            f"owner process {running.owner_pid} on {running.owner_host} is no longer running "
            "(crashed or killed without cleanup)"
        )
        runs = self._db.list_runs(running.experiment_id)
        if runs and all(run.status == RunStatus.COMPLETED for run in runs):
            # the truth: the work was done, then the owner died before ending the experiment
            done = f"every run had completed, then the {why}"
            report = self._end(running, ExperimentStatus.COMPLETED, reason=done)
            if report is not None:
                messages.append(
                    f"Recovered experiment {running.name!r} (id {running.experiment_id}) as COMPLETED: {done}."
                )
                return
        report = self._end(running, ExperimentStatus.FAILED, reason=why, error=why)
        if report is None:
            messages.append(
                f"Experiment {running.name!r} (id {running.experiment_id}), whose {why}, "
                "was ended by another process meanwhile."
            )
            return
        messages.append(
            f"Recovered experiment {running.name!r} (id {running.experiment_id}) as FAILED: its {why}; "
            f"{len(report.ended_run_ids)} live run(s) marked FAILED."
        )

    def _end_for_takeover(
        self, running: ExperimentRecord, new_name: str, messages: list[str], *, concurrent: bool = False
    ) -> None:
        reason = f"ended to start experiment {new_name!r} (pid {os.getpid()} on {self._host})"
        if self._end(running, ExperimentStatus.COMPLETED, reason=reason) is None:
            messages.append(
                f"Running experiment {running.name!r} (id {running.experiment_id}) was ended by another "
                "process meanwhile."
            )
            return
        when = " (it started concurrently with this one)" if concurrent else ""
        messages.append(
            f"Ended running experiment {running.name!r} (id {running.experiment_id}) as COMPLETED "
            f"to start {new_name!r}{when}."
        )

    def _end(
        self, running: ExperimentRecord, status: ExperimentStatus, *, reason: str, error: Optional[str] = None
    ) -> Optional[CleanupReport]:
        """Clean ``running`` up; its report if this call ended it, None if another process did.

        Several creators may see the same RUNNING experiment and all clean it up
        (cleanup is idempotent); the history row of the final transition tells
        which one actually ended it, so each message says what really happened.
        """
        try:
            report = self.cleanup_experiment(running.experiment_id, status=status, reason=reason, error=error)
        except InvalidTransitionError:
            return None  # ended meanwhile with the other final status
        last = self._db.history("experiment", running.experiment_id)[-1]
        if last.to_status == status and last.pid == os.getpid() and last.host == self._host and last.reason == reason:
            return report
        return None

    def _owner_state(self, experiment: ExperimentRecord) -> str:
        """``"self"``, ``"alive"``, ``"dead"`` or ``"unknown"`` (no owner recorded, or another host)."""
        if experiment.owner_pid is None or experiment.owner_host is None:
            return "unknown"
        if experiment.owner_host != self._host:
            return "unknown"  # another node: its pids mean nothing here
        if owner_gone(experiment) is not None:
            return "dead"
        return "self" if experiment.owner_pid == os.getpid() else "alive"

    # --- ending and cancelling --------------------------------------------------------

    def end_experiment(self) -> Optional[CleanupReport]:
        """End the running experiment: full cleanup as COMPLETED; None when none runs."""
        return self.cleanup_experiment(status=ExperimentStatus.COMPLETED)

    def cancel_current(self, experiment_id: Optional[int] = None) -> Optional[CancelReport]:
        """Cancel what the experiment is doing, in one transaction.

        The experiment's ``current_task`` goes back to IDLE; its SCHEDULED and
        IN_PROGRESS worker and controller tasks become FAILED with reason and error
        ``"cancelled"`` (history rows written).  PENDING tasks, runs and workers are
        left alone.  ``experiment_id`` defaults to the running experiment; with none
        running this is a no-op returning None.
        """
        if experiment_id is None:
            running = self._db.get_running_experiment()
            if running is None:
                return None
            experiment_id = running.experiment_id
        return self._db.cancel_current_task(experiment_id)

    # --- reporting ---------------------------------------------------------------------

    def get_runs_info(self, experiment_id: Optional[int] = None, *, as_dataframe: Optional[bool] = None) -> Any:
        """The runs of the running experiment (or of ``experiment_id``), in id order.

        One row per run with every column of the ``runs`` table except the binary
        ``config_leaf`` (``flattened_config`` carries the configuration); enums as
        their string values.  Returned as a pandas DataFrame when pandas is
        importable (``as_dataframe=None``, the default) or asked for
        (``as_dataframe=True``), else as a list of dicts (``as_dataframe=False``).

        Raises:
            ExperimentException: no experiment given and none running, or
                ``as_dataframe=True`` without pandas.
            NotFoundError: an ``experiment_id`` that does not exist.
        """
        if experiment_id is None:
            running = self._db.get_running_experiment()
            if running is None:
                raise ExperimentException("no experiment is running; pass experiment_id to see an ended one")
            experiment_id = running.experiment_id
        else:
            self._db.get_experiment(experiment_id)  # NotFoundError for an unknown id
        rows = []
        for run in self._db.list_runs(experiment_id):
            row = run.to_dict()
            row.pop("config_leaf", None)
            rows.append(row)
        have_pandas = importlib.util.find_spec("pandas") is not None
        if as_dataframe is None:
            as_dataframe = have_pandas
        if not as_dataframe:
            return rows
        if not have_pandas:
            raise ExperimentException("as_dataframe=True needs pandas, which is not installed")
        import pandas

        return pandas.DataFrame(rows, columns=list(_RUN_INFO_COLUMNS))

    # --- cleanup -----------------------------------------------------------------------

    def cleanup_experiment(
        self,
        experiment_id: Optional[int] = None,
        *,
        status: Any = ExperimentStatus.COMPLETED,
        grace_seconds: float = 5.0,
        reason: Optional[str] = None,
        error: Optional[str] = None,
        run_status: Any = None,
    ) -> Optional[CleanupReport]:
        """End an experiment: its worker processes first, then its state in one transaction.

        ``run_status`` (KILLED or FAILED) is what live runs become; by default
        FAILED when the experiment ends FAILED (a crash), else KILLED.

        1. Processes (:meth:`terminate_worker_processes`): the pids the database
           registered for this experiment's live workers, each verified with psutil
           to be the very process registered (same host, create time within
           :data:`WORKER_START_TOLERANCE_S` of ``process_started_at``), get SIGTERM,
           then SIGKILL after ``grace_seconds``.  This process's own pid and any pid
           that fails verification are never signalled.
        2. Database (:meth:`StateDB.cleanup_experiment_state`, one transaction):
           open tasks FAILED; NEW/ONGOING runs KILLED — FAILED when ``status`` is
           FAILED (cleanup after a crash) — with ``ended_by``; STOPPED runs frozen;
           workers marked exited; shm metadata removed; the experiment COMPLETED or
           FAILED.  History is kept.

        Idempotent: a second call signals nobody and changes nothing.  A process
        killed in the middle leaves the database entirely before or entirely after
        step 2.  ``experiment_id`` defaults to the running experiment; with none
        running this is a no-op returning None.

        Returns:
            The database's :class:`~rapidfire_state.db.CleanupReport`, or None.
        """
        try:
            final = ExperimentStatus(getattr(status, "value", status))
        except ValueError:
            final = None
        if final not in (ExperimentStatus.COMPLETED, ExperimentStatus.FAILED):
            raise ExperimentException(f"cleanup ends an experiment COMPLETED or FAILED, not {status!r}")
        check_number("grace_seconds", grace_seconds, error=ExperimentException)
        if experiment_id is None:
            running = self._db.get_running_experiment()
            if running is None:
                return None
            experiment_id = running.experiment_id
        self.terminate_worker_processes(experiment_id, grace_seconds=grace_seconds)
        if run_status is None:
            run_status = RunStatus.FAILED if final == ExperimentStatus.FAILED else RunStatus.KILLED
        report = self._db.cleanup_experiment_state(
            experiment_id, status=final, run_status=run_status, reason=reason, error=error
        )
        self._flush_metrics()
        return report

    def _flush_metrics(self) -> None:
        """Deliver the runs' final statuses (and last points) to MLflow, bounded; never raises."""
        if self.metrics is None:
            return
        try:
            self.metrics.flush(timeout=self.metrics.exit_flush_seconds)
        except Exception as exc:  # noqa: BLE001 - MLflow trouble never fails the ending
            _report(f"could not flush metrics to MLflow: {exc!r}; they stay in the outbox")

    def terminate_worker_processes(self, experiment_id: int, *, grace_seconds: float = 5.0) -> ProcessReport:
        """SIGTERM, then SIGKILL after ``grace_seconds``, the experiment's verified worker pids.

        Only rows of ``db.list_workers(experiment_id, alive_only=True)`` are
        considered, and only pids that psutil confirms are the registered process;
        the database is not written (the cleanup transaction marks the workers
        exited).
        """
        import psutil

        skipped: list[tuple[int, str]] = []
        targets: list[psutil.Process] = []
        for worker in self._db.list_workers(experiment_id, alive_only=True):
            process, why = self._verified_worker(worker)
            if process is None:
                skipped.append((worker.pid, why))
            else:
                targets.append(process)

        terminated, alive = self._signal_and_wait(targets, signal.SIGTERM, grace_seconds)
        killed, survivors = self._signal_and_wait(alive, signal.SIGKILL, KILL_WAIT_S)
        return ProcessReport(
            terminated=tuple(sorted(p.pid for p in terminated)),
            killed=tuple(sorted(p.pid for p in killed)),
            skipped=tuple(skipped),
            survivors=tuple(sorted(p.pid for p in survivors)),
        )

    def _verified_worker(self, worker: WorkerRecord) -> tuple[Any, str]:
        """``(psutil.Process, "")`` when ``worker.pid`` is the registered process, else ``(None, why)``."""
        import psutil

        if worker.host != self._host:
            return None, f"registered on host {worker.host!r}, not this host"
        if worker.pid == os.getpid():
            return None, "is this process"
        if worker.pid <= 1:
            return None, "is not a worker pid"
        identity = process_identity(worker.pid) if worker.process_identity else None
        if identity is None and worker.process_started_at is None:
            return None, "has no recorded start time to verify it against"
        try:
            process = psutil.Process(worker.pid)
            if identity is not None:
                # no step of the wall clock moves it (the create time below moves with each)
                if identity != worker.process_identity:
                    return None, "now belongs to another process (process identity differs)"
            elif abs(process.create_time() - worker.process_started_at) > WORKER_START_TOLERANCE_S:
                return None, "now belongs to another process (create time differs)"
            if process.status() == psutil.STATUS_ZOMBIE:
                return None, "has already exited (zombie)"
        except psutil.NoSuchProcess:
            return None, "has already exited"
        except psutil.AccessDenied:
            return None, "cannot be inspected (access denied)"
        return process, ""

    @staticmethod
    def _signal_and_wait(processes: list[Any], sig: int, timeout: float) -> tuple[list[Any], list[Any]]:
        """Send ``sig`` to each process; wait up to ``timeout`` for them to go.

        Returns ``(gone, still_alive)``.  psutil re-checks the create time before
        signalling, so a pid reused since verification is not hit.  Nothing is
        reaped here: an exited child of ours stays a zombie (counted as gone) so
        that whoever holds its handle (``subprocess.Popen``,
        ``multiprocessing.Process``) still gets its exit status.
        """
        import psutil

        pending = []
        gone = []
        for process in processes:
            try:
                process.send_signal(sig)
                pending.append(process)
            except psutil.NoSuchProcess:
                gone.append(process)
            except psutil.AccessDenied:
                pending.append(process)  # still counted: it may exit on its own
        deadline = time.monotonic() + timeout
        while True:
            still = []
            for process in pending:
                (gone if _process_gone(process) else still).append(process)
            pending = still
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        return gone, pending

    # --- signal handlers -------------------------------------------------------------

    def setup_signal_handlers(self, worker_processes: Any = None) -> dict[int, SignalHandler]:
        """Make SIGINT and SIGTERM end the experiment truthfully, then ``sys.exit(128 + signal)``.

        The handler cancels the current task (:meth:`cancel_current`), shuts the
        workers down, cleans up the running experiment (:meth:`cleanup_experiment`)
        as what happened: FAILED with the reason and error "interrupted by SIGINT"
        (or SIGTERM), its live runs KILLED; COMPLETED only when every run had
        completed.  It then puts the previous handlers back and exits with status
        130 (SIGINT) or 143 (SIGTERM).  A second signal
        while it runs is ignored: interrupting the cleanup would only leave the
        workers half stopped (the database part is one transaction either way).

        Args:
            worker_processes: what to shut down: objects with
                ``terminate()``/``join()``/``is_alive()`` (``multiprocessing.Process``),
                an object with ``shutdown_workers()`` (a worker manager), an iterable
                of either, or None.

        Returns:
            The handlers that were installed before (signal number → handler), as
            first saved: calling this twice keeps the originals for
            :meth:`restore_signal_handlers`.

        Raises:
            ExperimentException: called from a thread other than the main thread
                (Python delivers signals to the main thread only).
        """
        if threading.current_thread() is not threading.main_thread():
            raise ExperimentException(
                "setup_signal_handlers must be called from the main thread "
                f"(called from {threading.current_thread().name!r}); Python runs signal handlers "
                "in the main thread only"
            )
        self._worker_processes = worker_processes
        for signum in _HANDLED_SIGNALS:
            previous = signal.signal(signum, self._handle_signal)
            self._previous_handlers.setdefault(signum, previous)
        return dict(self._previous_handlers)

    def restore_signal_handlers(self) -> None:
        """Put back the handlers saved by :meth:`setup_signal_handlers` (no-op if none)."""
        if not self._previous_handlers:
            return
        if threading.current_thread() is not threading.main_thread():
            raise ExperimentException("restore_signal_handlers must be called from the main thread")
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    def _interrupted_cleanup(self, name: str) -> None:
        """End the running experiment as the interruption left it: the truth, not "completed"."""
        running = self._db.get_running_experiment()
        if running is None:
            return
        runs = self._db.list_runs(running.experiment_id)
        every_run_completed = bool(runs) and all(run.status == RunStatus.COMPLETED for run in runs)
        reason = f"interrupted by {name}"
        self.cleanup_experiment(
            running.experiment_id,
            status=ExperimentStatus.COMPLETED if every_run_completed else ExperimentStatus.FAILED,
            run_status=RunStatus.KILLED, reason=reason, error=None if every_run_completed else reason,
        )

    def _handle_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        if self._handling_signal:
            return
        self._handling_signal = True
        name = signal.Signals(signum).name
        _report(f"received {name}: cancelling the current task, stopping workers, cleaning up")
        # Each step on its own: a failure in one must not skip the others.
        for step, action in (
            ("cancel the current task", self.cancel_current),
            ("shut the workers down", lambda: _shutdown_workers(self._worker_processes)),
            ("clean up the experiment", lambda: self._interrupted_cleanup(name)),
        ):
            try:
                action()
            except Exception as exc:  # noqa: BLE001 - report and go on; we are exiting
                _report(f"could not {step}: {exc!r}")
        try:
            self.restore_signal_handlers()
        except Exception as exc:  # noqa: BLE001
            _report(f"could not restore the previous signal handlers: {exc!r}")
        sys.exit(128 + signum)  # the shell's convention for "ended by this signal"

    def close(self) -> None:
        """Close the database connections of this instance's :class:`StateDB`."""
        self._db.close()


_RUN_INFO_COLUMNS = (
    "run_id",
    "experiment_id",
    "status",
    "source",
    "ended_by",
    "metric_run_id",
    "flattened_config",
    "completed_steps",
    "total_steps",
    "num_chunks_visited",
    "num_epochs_completed",
    "chunk_offset",
    "estimated_runtime",
    "required_workers",
    "progress",
    "error",
    "cloned_from",
    "warm_started_from",
    "created_at",
    "started_at",
    "updated_at",
    "ended_at",
)


def _process_gone(process: Any) -> bool:
    """True when ``process`` exited (a zombie counts: it only waits to be reaped)."""
    import psutil

    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False


def _shutdown_workers(workers: Any, grace_seconds: float = 5.0) -> None:
    """Stop ``workers``: a manager (``shutdown_workers()``), a process, or an iterable of them."""
    if workers is None:
        return
    if hasattr(workers, "shutdown_workers"):
        workers.shutdown_workers()
        return
    if hasattr(workers, "terminate") and hasattr(workers, "is_alive"):
        workers = [workers]
    if not isinstance(workers, Iterable):
        raise ExperimentException(
            f"worker_processes {workers!r} is neither a worker manager, a process nor an iterable of them"
        )
    processes = []
    for item in workers:
        if hasattr(item, "shutdown_workers"):
            item.shutdown_workers()
        elif hasattr(item, "terminate") and hasattr(item, "is_alive"):
            processes.append(item)
        else:
            raise ExperimentException(f"worker {item!r} has neither terminate()/is_alive() nor shutdown_workers()")
    # Terminate all first, then wait: the grace runs once, not once per worker.
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + grace_seconds
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive() and hasattr(process, "kill"):
            process.kill()
            process.join(KILL_WAIT_S)


def _report(message: str) -> None:
    # Inside a signal handler: stderr, unbuffered and always there; no logger set-up.
    try:
        sys.stderr.write(f"[rapidfire_state] {message}\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - a closed stderr must not stop the shutdown
        pass


__all__ = [
    "ExperimentUtils",
    "CancelReport",
    "ProcessReport",
    "MAX_START_ATTEMPTS",
    "OWNER_START_TOLERANCE_S",
    "WORKER_START_TOLERANCE_S",
]
