"""Worker processes: spawned, registered in the ``workers`` table, stopped, and never orphaned.

Two public names:

* :class:`WorkerManager` — the controller side.  It starts one process per worker
  (one per GPU), records each one's pid in the ``workers`` table, stops them
  gracefully or by force, and reports their state.
* :func:`run_worker` — the worker side: the loop that heartbeats, claims the
  worker's next task from the database, runs a handler on it and records the
  outcome.

Usage::

    from rapidfire_state import StateDB
    from rapidfire_state.worker_manager import WorkerManager, run_worker

    def train_task(task):                       # runs inside the worker process
        ...

    def worker_main(*, worker_id, experiment_id, experiment_name, db, registry,
                    lock, shutdown_event):      # a top-level function: it is pickled
        run_worker(worker_id, db, train_task, shutdown_event, experiment_id=experiment_id)

    manager = WorkerManager(4, registry, lock, target=worker_main, db=StateDB())
    manager.spawn_workers(experiment_id, experiment_name)
    # ... the controller queues tasks with db.create_worker_task(...) ...
    manager.shutdown_workers()

Or, with no target of one's own, name the handler in the experiment's config and let
every worker run the library's loop with it::

    # mypkg/tasks.py:  def train_task(task, context): ...   (context: WorkerContext)
    db.create_experiment("exp", path, config_options={"worker_handler": "mypkg.tasks:train_task"})
    manager = WorkerManager(4, registry, lock)

Process model and the reasons behind it:

* **spawn, never fork.**  A forked child inherits the parent's OpenMP/CUDA thread
  state; its first multi-threaded torch op can deadlock after the parent ran torch
  ops.  Spawned children start a fresh interpreter, so a target is a picklable,
  top-level callable and every argument crosses by pickle (a
  :class:`~rapidfire_state.db.StateDB` pickles as its URL and reopens in the child).
  This module imports neither torch nor mlflow; a worker imports them only if its
  target does.
* **A process group per worker** (``os.setpgrp()`` first thing in the child), so
  that :meth:`WorkerManager.shutdown_workers` can kill whatever a worker started
  (DataLoader workers, shell pipelines) with one ``os.killpg`` after the worker
  itself is gone.  A side effect: Ctrl+C in a terminal reaches the controller
  only; the controller stops the workers.
* **Where process groups are forbidden** (Google Colab: ``os.setpgrp`` and
  ``os.getpgid`` raise :class:`PermissionError`), the child records the failure
  and carries on in the controller's group; the manager then never calls
  ``os.killpg`` for it (that would signal the controller's own group) and kills the
  worker and its descendants one pid at a time through psutil.  For the same
  behaviour as with a group, such a worker ignores SIGINT (Ctrl+C goes to the
  controller, which stops the workers).
* **Workers die with their controller, also when it is SIGKILLed.**  Every child runs
  a daemon watchdog thread that checks every :data:`WATCHDOG_INTERVAL_SECONDS`
  whether its controller is still its parent (``os.getppid()`` changes when a
  parent dies; psutil covers platforms where it does not) and leaves with
  ``os._exit(ORPHANED_EXIT_CODE)`` when it is not.  On Linux the child also asks the
  kernel for ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` (best effort, via ctypes): the
  signal arrives the moment the parent dies.  The kernel ties that signal to the
  parent *thread* that started the child, so it is requested only when
  :meth:`WorkerManager.spawn_workers` runs on the main thread; otherwise the
  watchdog alone does the job.  An orphaned worker does not touch the database on
  its way out: its row stays "alive" with a dead pid, which is exactly what
  :meth:`StateDB.fail_stale_workers` looks for to fail the task (and run) it had in
  progress.
* **Rows are marked exited only when nothing is left in progress.**  A worker marks
  itself exited when its loop or target ended cleanly; otherwise the manager does
  it after the process ended, first failing any task the worker left IN_PROGRESS
  (with an error naming the pid and exit code), because a row marked exited is
  invisible to ``fail_stale_workers``.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import inspect
import logging
import multiprocessing
import os
import pickle
import re
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Protocol

from rapidfire_state.constants import TaskStatus
from rapidfire_state.exceptions import ConfigError, InvalidTransitionError, RapidFireError, WorkerException
from rapidfire_state.threads import start_background_thread
from rapidfire_state.validation import check_int, check_number, check_positive_int, check_positive_number

if TYPE_CHECKING:  # imported for annotations only: keeps `import` of this module cheap
    import psutil

    from rapidfire_state.db import StateDB, TaskRecord

__all__ = [
    "WorkerManager",
    "run_worker",
    "default_worker_target",
    "resolve_worker_handler",
    "WorkerContext",
    "TaskResult",
    "WORKER_HANDLER_KEY",
    "ORPHANED_EXIT_CODE",
    "START_FAILED_EXIT_CODE",
    "WATCHDOG_INTERVAL_SECONDS",
]

_log = logging.getLogger(__name__)

#: exit code of a worker whose controller died (left through the watchdog)
ORPHANED_EXIT_CODE = 3
#: exit code of a worker whose controller abandoned it during start-up
START_FAILED_EXIT_CODE = 4
#: how often a worker's watchdog checks that its controller is alive
WATCHDOG_INTERVAL_SECONDS = 0.5

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# Keyword arguments the manager itself passes to every target.
_RESERVED_KWARGS = frozenset(
    {"worker_id", "experiment_id", "experiment_name", "db", "registry", "lock", "shutdown_event"}
)


class _EventLike(Protocol):
    def is_set(self) -> bool: ...

    def wait(self, timeout: Optional[float] = None) -> bool: ...


# --- child side: process group, parent death, bootstrap -----------------------------


def _create_process_group() -> tuple[bool, Optional[str]]:
    """Make the calling process the leader of a new process group.

    Returns ``(True, None)``, or ``(False, reason)`` where the OS forbids it
    (``PermissionError`` in Colab) or lacks it; never raises.  Module-level so that
    the whole child-side attempt is one replaceable call.
    """
    setpgrp = getattr(os, "setpgrp", None)
    if setpgrp is None:
        return False, "os.setpgrp is not available on this platform"
    try:
        setpgrp()
    except PermissionError as exc:
        return False, f"os.setpgrp() raised PermissionError: {exc}"
    except OSError as exc:
        return False, f"os.setpgrp() failed: {exc!r}"
    return True, None


def _set_parent_death_signal(sig: int) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent thread exits.

    Best effort: False on other platforms or when ``prctl`` is unavailable.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        result = libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(int(sig)), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    except (OSError, AttributeError, ValueError):
        return False
    return result == 0


def _parent_alive(parent_pid: int, parent: "Optional[psutil.Process]") -> bool:
    # getppid() changes the moment the parent dies (we are re-parented to init or a
    # subreaper); psutil (pid + creation time) covers platforms where it does not.
    if os.getppid() != parent_pid:
        return False
    if parent is not None:
        try:
            return parent.is_running()
        except Exception:  # psutil errors while probing: do not kill a healthy worker
            return True
    return True


def _start_parent_watchdog(parent_pid: int, worker_id: int) -> threading.Thread:
    """A daemon thread that ends this process when the controller is gone."""
    try:
        import psutil

        parent: Optional[psutil.Process] = psutil.Process(parent_pid)
    except Exception:
        parent = None

    def watch() -> None:
        while True:
            time.sleep(WATCHDOG_INTERVAL_SECONDS)
            if not _parent_alive(parent_pid, parent):
                # os._exit, not sys.exit: the main thread may be deep inside a
                # handler (or a C extension) and must not get a say.  The database
                # row is left alone on purpose: see the module docstring.
                try:
                    sys.stderr.write(
                        f"rapidfire worker {worker_id} (pid {os.getpid()}): controller pid {parent_pid} "
                        f"is gone; exiting with code {ORPHANED_EXIT_CODE}\n"
                    )
                    sys.stderr.flush()
                finally:
                    os._exit(ORPHANED_EXIT_CODE)

    return start_background_thread(watch, f"rf-worker-{worker_id}-watchdog")


def _mark_exited_quietly(db: "StateDB", experiment_id: int, worker_id: int, exit_code: Optional[int]) -> None:
    try:
        db.mark_worker_exited(experiment_id, worker_id, exit_code)
    except Exception as exc:  # the process is leaving anyway; the manager marks it too
        _log.warning("worker %s could not mark itself exited: %s", worker_id, exc)


def _worker_main(
    *,
    worker_id: int,
    experiment_id: int,
    experiment_name: str,
    db: "StateDB",
    registry: Any,
    lock: Any,
    shutdown_event: Any,
    target: Callable[..., Any],
    worker_kwargs: dict[str, Any],
    parent_pid: int,
    conn: Connection,
    parent_death_signal: Optional[int],
) -> None:
    """The entry point of every worker process (runs in the spawned child)."""
    from rapidfire_state.db.engine import set_application_name

    set_application_name(f"worker_{worker_id}")
    if not db.is_sqlite:
        # the unpickled StateDB connected before the role was set: reconnect under it
        db.engine.dispose()
    group_created, group_error = _create_process_group()
    if not group_created:
        # Without a group of its own the worker shares the controller's terminal
        # group; keep Ctrl+C for the controller, as it is when the group exists.
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except (ValueError, OSError):
            pass
    death_signal_set = _set_parent_death_signal(parent_death_signal) if parent_death_signal else False
    _start_parent_watchdog(parent_pid, worker_id)
    # The parent may have died before prctl took effect: then no signal will come.
    if os.getppid() != parent_pid:
        os._exit(ORPHANED_EXIT_CODE)
    try:
        conn.send(
            {
                "pid": os.getpid(),
                "process_group": group_created,
                "group_error": group_error,
                "parent_death_signal": death_signal_set,
            }
        )
        # The controller answers once the worker's row exists, so the target's
        # first heartbeat always finds it.
        conn.recv()
    except (EOFError, OSError):
        os._exit(START_FAILED_EXIT_CODE)
    finally:
        conn.close()
    try:
        target(
            worker_id=worker_id,
            experiment_id=experiment_id,
            experiment_name=experiment_name,
            db=db,
            registry=registry,
            lock=lock,
            shutdown_event=shutdown_event,
            **worker_kwargs,
        )
    except SystemExit as exc:
        if exc.code in (None, 0):
            _mark_exited_quietly(db, experiment_id, worker_id, 0)
        raise
    # Any other exception propagates: multiprocessing prints the traceback and the
    # process exits 1; the row stays open so the task it may have left IN_PROGRESS
    # is failed by the manager or by fail_stale_workers.
    _mark_exited_quietly(db, experiment_id, worker_id, 0)


# --- controller side ----------------------------------------------------------------


@dataclass
class _WorkerHandle:
    worker_id: int
    process: BaseProcess
    conn: Optional[Connection]
    pid: int
    registered: bool = False
    pgid: Optional[int] = None
    group_error: Optional[str] = None
    parent_death_signal: bool = False
    descendants: dict[int, "psutil.Process"] = field(default_factory=dict)
    exitcode: Optional[int] = None
    recorded: bool = False

    def alive(self) -> bool:
        if self.exitcode is not None:
            return False
        alive = self.process.is_alive()  # also reaps a finished child
        if not alive:
            self.exitcode = self.process.exitcode
        return alive


# Managers with live workers, held strongly: at interpreter exit their workers are
# terminated before multiprocessing's own exit handler would join them forever.
_LIVE_MANAGERS: set["WorkerManager"] = set()
_LIVE_LOCK = threading.Lock()


def _terminate_live_managers() -> None:
    with _LIVE_LOCK:
        managers = list(_LIVE_MANAGERS)
    for manager in managers:
        try:
            manager.terminate_workers()
        except Exception as exc:  # at exit: report, never raise
            _log.warning("terminating workers at exit failed: %s", exc)


# multiprocessing.util registers its own exit handler, which joins non-daemonic
# children (forever, for a worker still running) when it is imported.  Import it
# first, so that ours, registered after it, runs before it (atexit is LIFO).
import multiprocessing.util  # noqa: E402,F401

atexit.register(_terminate_live_managers)


def _still_running(process: "psutil.Process") -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class WorkerManager:
    """Spawns, tracks and stops the worker processes of one experiment.

    ``WorkerManager(num_workers, registry=None, lock=None, *, target=None, db=None,
    heartbeat_seconds=2.0, worker_kwargs=None, parent_death_signal=SIGTERM,
    start_timeout=120.0)``

    Without a ``target`` (``WorkerManager(4, registry, lock)``, as the spec writes it)
    every worker runs :func:`default_worker_target`: the library's own loop
    (:func:`run_worker`) with the task handler the experiment names in
    ``config_options["worker_handler"]`` (``"package.module:function"``, called as
    ``handler(task, context)``; see :func:`default_worker_target`).  ``worker_kwargs``
    may then hold only ``handler`` (a name that overrides the experiment's),
    ``heartbeat_seconds`` (default: the manager's) and ``poll_seconds``.

    A ``target`` runs in each worker process as::

        target(worker_id=..., experiment_id=..., experiment_name=..., db=...,
               registry=..., lock=..., shutdown_event=..., **worker_kwargs)

    where ``worker_id`` is 0..num_workers-1, ``db`` is a :class:`StateDB` on the
    same database (reopened in the child), ``registry``/``lock`` are passed through
    as given (for instance the proxies of :meth:`SharedMemoryManager.get_shm_objects`)
    and ``shutdown_event`` is a ``multiprocessing`` event the manager sets to ask for
    a graceful stop.  It must be a top-level (picklable) callable because workers
    are spawned, never forked.  A target usually calls :func:`run_worker`.  When it
    returns, the worker marks itself exited (exit code 0); when it raises, the
    process exits 1 and the manager records it.

    ``heartbeat_seconds`` is the interval the workers are expected to heartbeat at
    (pass the same value to :func:`run_worker`, e.g. through ``worker_kwargs``); the
    manager judges staleness by it (:meth:`get_worker_status`,
    :meth:`fail_stale_workers`).  ``parent_death_signal`` is the signal Linux sends a
    worker when the controller dies (``None`` leaves it to the watchdog thread).
    """

    #: a worker whose heartbeat is older than this many intervals counts as stale
    STALE_INTERVALS = 5

    def __init__(
        self,
        num_workers: int,
        registry: Any = None,
        lock: Any = None,
        *,
        target: Optional[Callable[..., Any]] = None,
        db: "Optional[StateDB]" = None,
        heartbeat_seconds: float = 2.0,
        worker_kwargs: Optional[dict[str, Any]] = None,
        parent_death_signal: Optional[int] = signal.SIGTERM,
        start_timeout: float = 120.0,
    ):
        check_positive_int("num_workers", num_workers)
        if target is None:
            worker_kwargs = _default_target_kwargs(worker_kwargs, heartbeat_seconds)
            target = default_worker_target
        if not callable(target):
            raise ConfigError(f"target={target!r} is not callable")
        try:
            pickle.dumps(target)
        except Exception as exc:
            raise ConfigError(
                f"target={target!r} cannot be pickled ({exc}); workers are spawned, so the target "
                "must be a top-level function (or a picklable callable object)"
            ) from exc
        worker_kwargs = dict(worker_kwargs or {})
        clash = sorted(_RESERVED_KWARGS & set(worker_kwargs))
        if clash:
            raise ConfigError(
                f"worker_kwargs may not contain {', '.join(clash)}: the manager passes those itself"
            )
        if parent_death_signal is not None:
            try:
                parent_death_signal = int(signal.Signals(parent_death_signal))
            except (ValueError, TypeError) as exc:
                raise ConfigError(
                    f"parent_death_signal={parent_death_signal!r} is not a signal (e.g. signal.SIGTERM, or None)"
                ) from exc
        if db is None:
            from rapidfire_state.db import StateDB

            db = StateDB()
        self.num_workers = num_workers
        self.registry = registry
        self.lock = lock
        self.target = target
        self.db = db
        self.heartbeat_seconds = check_positive_number("heartbeat_seconds", heartbeat_seconds)
        self.worker_kwargs = worker_kwargs
        self.parent_death_signal = parent_death_signal
        self.start_timeout = check_positive_number("start_timeout", start_timeout)
        self.experiment_id: Optional[int] = None
        self.experiment_name: Optional[str] = None
        self._ctx = multiprocessing.get_context("spawn")
        self._shutdown_event: Any = None
        self._handles: list[_WorkerHandle] = []
        self._state_lock = threading.RLock()

    def __repr__(self) -> str:
        return (
            f"WorkerManager(num_workers={self.num_workers}, experiment_id={self.experiment_id}, "
            f"pids={self.pids})"
        )

    # --- properties -------------------------------------------------------------------

    @property
    def shutdown_event(self) -> Any:
        """The event of the current (or last) set of workers; None before the first spawn."""
        return self._shutdown_event

    @property
    def processes(self) -> list[BaseProcess]:
        """The ``multiprocessing`` process objects, by worker id."""
        return [h.process for h in self._handles]

    @property
    def pids(self) -> list[int]:
        return [h.pid for h in self._handles]

    # --- spawning ---------------------------------------------------------------------

    def spawn_workers(self, experiment_id: int, experiment_name: str) -> list[int]:
        """Start ``num_workers`` processes for the experiment; returns their pids.

        Each worker's row exists in ``workers`` (pid, host) before this returns and
        before the target starts.  Raises :class:`WorkerException` when workers of
        this manager are still running, or when a worker fails to start (the ones
        already started are killed and marked exited).
        """
        check_positive_int("experiment_id", experiment_id)
        if not isinstance(experiment_name, str):
            raise ConfigError(f"experiment_name={experiment_name!r} is not a str")
        with self._state_lock:
            running = [h.worker_id for h in self._handles if h.alive()]
            if running:
                raise WorkerException(
                    f"workers {running} of experiment {self.experiment_id} are still running; "
                    "call shutdown_workers() or terminate_workers() first"
                )
            # Record the exits of any earlier set that ended on its own.
            for handle in self._handles:
                self._record_exit(handle)
            self.experiment_id = experiment_id
            self.experiment_name = experiment_name
            self._shutdown_event = self._ctx.Event()
            self._handles = []
            # The kernel sends PDEATHSIG when the *thread* that started the child
            # exits; from any thread but the main one that would be too early.
            death_signal = (
                self.parent_death_signal if threading.current_thread() is threading.main_thread() else None
            )
            with _LIVE_LOCK:
                _LIVE_MANAGERS.add(self)
            try:
                for worker_id in range(self.num_workers):
                    self._start_one(worker_id, death_signal)
                deadline = time.monotonic() + self.start_timeout
                for handle in self._handles:
                    self._await_ready(handle, deadline)
            except BaseException as exc:
                self._abort_spawn()
                if isinstance(exc, RapidFireError):
                    raise
                if isinstance(exc, Exception):
                    raise WorkerException(f"spawning workers for experiment {experiment_id} failed: {exc}") from exc
                raise
            pids = [h.pid for h in self._handles]
            _log.info("spawned %d workers for experiment %s: pids %s", len(pids), experiment_id, pids)
            return pids

    def _start_one(self, worker_id: int, death_signal: Optional[int]) -> None:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_worker_main,
            name=f"rf-worker-{worker_id}",
            kwargs=dict(
                worker_id=worker_id,
                experiment_id=self.experiment_id,
                experiment_name=self.experiment_name,
                db=self.db,
                registry=self.registry,
                lock=self.lock,
                shutdown_event=self._shutdown_event,
                target=self.target,
                worker_kwargs=self.worker_kwargs,
                parent_pid=os.getpid(),
                conn=child_conn,
                parent_death_signal=death_signal,
            ),
            # Not daemonic: multiprocessing forbids daemonic processes to have
            # children, and a training worker needs them (DataLoader workers).
            daemon=False,
        )
        try:
            process.start()
        finally:
            child_conn.close()  # so the child's death reads as EOF here
        assert process.pid is not None
        handle = _WorkerHandle(worker_id=worker_id, process=process, conn=parent_conn, pid=process.pid)
        self._handles.append(handle)  # before anything else can fail: an abort must find it
        # Registered by the parent right after start: the row exists as soon as
        # the pid does, even if the child is slow to import or dies on the way.
        self.db.register_worker(self.experiment_id, worker_id, process.pid)
        handle.registered = True
        parent_conn.send("go")

    def _await_ready(self, handle: _WorkerHandle, deadline: float) -> None:
        conn = handle.conn
        assert conn is not None
        message: Optional[dict[str, Any]] = None
        while message is None:
            remaining = deadline - time.monotonic()
            died = False
            try:
                if conn.poll(min(0.1, max(remaining, 0.0))):
                    message = conn.recv()
                    break
            except (EOFError, OSError):
                died = True  # the child's end closed: it is exiting
            if died or not handle.alive():
                handle.process.join(2.0)
                handle.alive()
                raise WorkerException(
                    f"worker {handle.worker_id} (pid {handle.pid}) exited with code "
                    f"{handle.process.exitcode} during start-up"
                )
            if remaining <= 0:
                raise WorkerException(
                    f"worker {handle.worker_id} (pid {handle.pid}) did not start within {self.start_timeout} s"
                )
        conn.close()
        handle.conn = None
        handle.parent_death_signal = bool(message.get("parent_death_signal"))
        handle.pgid, handle.group_error = self._verify_group(handle.pid, bool(message.get("process_group")),
                                                             message.get("group_error"))
        if handle.pgid is None:
            _log.warning(
                "worker %s (pid %s) has no process group of its own (%s); it will be stopped "
                "process by process through psutil",
                handle.worker_id, handle.pid, handle.group_error,
            )

    @staticmethod
    def _verify_group(pid: int, reported: bool, child_error: Optional[str]) -> tuple[Optional[int], Optional[str]]:
        """The worker's own process group id, or ``(None, why not)``.

        A group is used only when the child created it *and* the parent can see it
        (``os.getpgid``; forbidden in Colab, hence the psutil fallback).  The
        controller's own group is never returned: ``killpg`` on it would kill us.
        """
        try:
            pgid = os.getpgid(pid)
        except PermissionError as exc:
            return None, child_error or f"os.getpgid() raised PermissionError: {exc}"
        except (OSError, AttributeError) as exc:
            return None, child_error or f"os.getpgid() failed: {exc!r}"
        if not reported:
            return None, child_error or "the worker could not create a process group"
        try:
            own_group = os.getpgrp()
        except OSError:
            own_group = None
        if pgid != pid or pgid == own_group:
            return None, f"process group {pgid} of pid {pid} is not the worker's own"
        return pgid, None

    def _abort_spawn(self) -> None:
        handles = self._handles
        for handle in handles:
            if handle.conn is not None:
                handle.conn.close()  # a child waiting for "go" reads EOF and leaves
                handle.conn = None
            self._snapshot_descendants(handle)
            handle.process.kill()
        for handle in handles:
            handle.process.join(5.0)
            handle.alive()
            self._sweep(handle)
            self._record_exit(handle)
        with _LIVE_LOCK:
            _LIVE_MANAGERS.discard(self)

    # --- stopping ---------------------------------------------------------------------

    def shutdown_workers(self, timeout: float = 10.0, *, term_timeout: float = 5.0,
                         kill_timeout: float = 5.0) -> dict[int, Optional[int]]:
        """Stop the workers gracefully; returns ``{worker_id: exit code}``.

        Sets the shutdown event and waits up to ``timeout`` seconds (in all) for the
        workers to finish their current task and exit; then SIGTERM, up to
        ``term_timeout`` more; then SIGKILL; last, where a worker had its own
        process group, ``os.killpg(SIGKILL)`` on the group (whatever the worker
        left behind), else its descendants one by one through psutil.  Each worker
        is marked exited in the database with its exit code (negative: the
        signal), after any task it left IN_PROGRESS is failed.  Idempotent.
        """
        return self._stop(
            check_number("timeout", timeout),
            check_number("term_timeout", term_timeout),
            check_number("kill_timeout", kill_timeout),
        )

    def terminate_workers(self, *, term_timeout: float = 1.0, kill_timeout: float = 5.0) -> dict[int, Optional[int]]:
        """Stop the workers now: SIGTERM, SIGKILL after ``term_timeout``; as
        :meth:`shutdown_workers` otherwise (rows marked exited, groups swept).

        The shutdown event is not set: a worker that saw it could mark itself
        exited with code 0 an instant before the SIGTERM ends it with -15.
        """
        return self._stop(
            None,
            check_number("term_timeout", term_timeout),
            check_number("kill_timeout", kill_timeout),
        )

    def _stop(self, graceful: Optional[float], term_timeout: float, kill_timeout: float) -> dict[int, Optional[int]]:
        with self._state_lock:
            handles = [h for h in self._handles if not h.recorded]
            if handles:
                for handle in handles:
                    self._snapshot_descendants(handle)
                if graceful is not None:
                    if self._shutdown_event is not None:
                        self._shutdown_event.set()
                    self._join_all(handles, graceful)
                    self._join_finishing(handles, min(term_timeout, 2.0))
                for sig_name, wait in (("SIGTERM", term_timeout), ("SIGKILL", kill_timeout)):
                    living = [h for h in handles if h.alive()]
                    if not living:
                        break
                    for handle in living:
                        self._snapshot_descendants(handle)  # before it dies: orphans cannot be found
                        _log.warning("worker %s (pid %s) still running: sending %s", handle.worker_id,
                                     handle.pid, sig_name)
                        if sig_name == "SIGTERM":
                            handle.process.terminate()
                        else:
                            handle.process.kill()
                    self._join_all(living, wait)
                for handle in handles:
                    self._sweep(handle)
                for handle in handles:
                    self._record_exit(handle)
            if all(h.recorded for h in self._handles):
                with _LIVE_LOCK:
                    _LIVE_MANAGERS.discard(self)
            return {h.worker_id: h.exitcode for h in self._handles}

    def _join_finishing(self, handles: list[_WorkerHandle], timeout: float) -> None:
        """A bit more time for workers whose row says they already left their loop.

        Such a worker marked itself exited (code 0) and is only tearing down; a
        SIGTERM now would end it with -15 behind a row that says 0.
        """
        living = [h for h in handles if h.alive()]
        if not living or timeout <= 0 or self.experiment_id is None:
            return
        try:
            exited = {w.worker_id for w in self.db.list_workers(self.experiment_id) if w.exited_at is not None}
        except RapidFireError:
            return
        self._join_all([h for h in living if h.worker_id in exited], timeout)

    @staticmethod
    def _join_all(handles: list[_WorkerHandle], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for handle in handles:
            handle.process.join(max(0.0, deadline - time.monotonic()))
            handle.alive()

    @staticmethod
    def _snapshot_descendants(handle: _WorkerHandle) -> None:
        """Remember the worker's descendants while they can still be found.

        Once a worker dies its children are re-parented and psutil can no longer
        tell they were its; psutil.Process objects also guard against pid reuse.
        """
        if handle.exitcode is not None:
            return
        try:
            import psutil

            for child in psutil.Process(handle.pid).children(recursive=True):
                handle.descendants.setdefault(child.pid, child)
        except Exception:  # gone already, or access denied: nothing to remember
            pass

    @staticmethod
    def _sweep(handle: _WorkerHandle) -> None:
        """Kill what the (now dead) worker left behind: its group, then its known descendants."""
        if handle.pgid is not None:
            try:
                if handle.pgid != os.getpgrp():
                    os.killpg(handle.pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # the group is empty: nothing was left behind
            except OSError as exc:
                _log.warning("killpg(%s) for worker %s failed (%s); using psutil", handle.pgid,
                             handle.worker_id, exc)
        if not handle.descendants:
            return
        import psutil

        survivors = []
        for process in handle.descendants.values():
            try:
                process.kill()  # psutil checks the pid was not reused
                survivors.append(process)
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                pass
            except psutil.AccessDenied as exc:
                _log.warning("cannot kill pid %s left by worker %s: %s", process.pid, handle.worker_id, exc)
        # Wait briefly for them to die.  Not psutil.wait_procs: an orphan killed
        # here is re-parented, and if the adopting process does not reap it, it
        # stays a zombie that wait_procs would wait on for the whole timeout.
        deadline = time.monotonic() + 2.0
        while survivors and time.monotonic() < deadline:
            survivors = [p for p in survivors if _still_running(p)]
            if survivors:
                time.sleep(0.02)
        handle.descendants.clear()

    def _record_exit(self, handle: _WorkerHandle) -> None:
        """Fail what the dead worker left IN_PROGRESS, then mark its row exited."""
        if handle.recorded:
            return
        if handle.alive():
            _log.error("worker %s (pid %s) did not exit; its row stays open", handle.worker_id, handle.pid)
            return
        handle.exitcode = handle.process.exitcode
        if handle.conn is not None:
            handle.conn.close()
            handle.conn = None
        if not handle.registered or self.experiment_id is None:
            handle.recorded = True
            return
        try:
            orphaned = self.db.list_tasks(
                "worker", experiment_id=self.experiment_id, worker_id=handle.worker_id,
                statuses=[TaskStatus.IN_PROGRESS],
            )
            for task in orphaned:
                message = (
                    f"worker {handle.worker_id} (pid {handle.pid}) exited with code {handle.exitcode} "
                    "while the task was in progress"
                )
                try:
                    self.db.finish_worker_task(task.task_id, ok=False, error=message)
                except InvalidTransitionError:
                    pass  # finished meanwhile (e.g. by fail_stale_workers): keep that outcome
            row = self.db.mark_worker_exited(self.experiment_id, handle.worker_id, handle.exitcode)
            handle.recorded = True
            if row.exit_code != handle.exitcode:
                # The row was marked first (by the worker itself, or by
                # fail_stale_workers without a code) and keeps that account.
                _log.info("worker %s: row keeps exit code %s; the process ended with %s",
                          handle.worker_id, row.exit_code, handle.exitcode)
        except RapidFireError as exc:
            # Stopping must not fail on the database; the row is left for
            # fail_stale_workers (its pid is dead) and a later call retries.
            _log.warning("could not record the exit of worker %s: %s", handle.worker_id, exc)

    # --- inspection -------------------------------------------------------------------

    def get_worker_status(self) -> list[dict[str, Any]]:
        """One dict per worker, by worker id.

        Keys: ``worker_id``, ``pid``, ``alive`` (the process), ``exitcode`` (None
        while alive; negative: killed by that signal), ``pgid`` (its own process
        group, None in the psutil fallback), ``group_error`` (why there is no
        group), ``heartbeat_at`` (database clock, None when the row is missing),
        ``heartbeat_age_seconds``, ``stale`` (alive but the heartbeat is older than
        :attr:`STALE_INTERVALS` × ``heartbeat_seconds``), ``exited_at`` and
        ``exit_code`` as the database has them.
        """
        with self._state_lock:
            handles = list(self._handles)
        if not handles:
            return []
        rows = {w.worker_id: w for w in self.db.list_workers(self.experiment_id)}
        now = self.db.now()
        grace = self.STALE_INTERVALS * self.heartbeat_seconds
        status = []
        for handle in handles:
            alive = handle.alive()
            row = rows.get(handle.worker_id)
            age = (now - row.heartbeat_at).total_seconds() if row is not None else None
            status.append(
                {
                    "worker_id": handle.worker_id,
                    "pid": handle.pid,
                    "alive": alive,
                    "exitcode": None if alive else handle.exitcode,
                    "pgid": handle.pgid,
                    "group_error": handle.group_error,
                    "heartbeat_at": row.heartbeat_at if row is not None else None,
                    "heartbeat_age_seconds": age,
                    "stale": bool(alive and row is not None and row.exited_at is None and age is not None
                                  and age > grace),
                    "exited_at": row.exited_at if row is not None else None,
                    "exit_code": row.exit_code if row is not None else None,
                }
            )
        return status

    def fail_stale_workers(self, grace_seconds: Optional[float] = None, *, lost_runs: str = "fail") -> list[Any]:
        """:meth:`StateDB.fail_stale_workers` for this experiment; the grace defaults
        to :attr:`STALE_INTERVALS` × ``heartbeat_seconds``.

        ``lost_runs="fail"`` (the default) fails the lost tasks' runs with them;
        ``"release"`` leaves the runs in their status for the scheduler to give
        to a live worker (the reports' ``released_run_ids``)."""
        from rapidfire_state.db.store.workers import check_lost_runs

        check_lost_runs(lost_runs)
        if self.experiment_id is None:
            return []
        grace = self.STALE_INTERVALS * self.heartbeat_seconds if grace_seconds is None else grace_seconds
        return self.db.fail_stale_workers(grace, experiment_id=self.experiment_id, lost_runs=lost_runs)


# --- worker side: the task loop ----------------------------------------------------


class _Heartbeat:
    """Heartbeats from a daemon thread, so that a long handler does not look stale.

    The trade-off: a handler that hangs keeps heartbeating.  A heartbeat says
    "the process is alive", not "the task makes progress"; a controller that
    must catch hung tasks judges by the task's ``started_at``.
    """

    def __init__(self, db: "StateDB", experiment_id: int, worker_id: int, interval: float):
        self._db = db
        self._experiment_id = experiment_id
        self._worker_id = worker_id
        self._interval = interval
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        #: set when the row was found marked exited: the worker must stop
        self.revoked: Optional[WorkerException] = None

    def beat(self) -> None:
        try:
            self._db.heartbeat(self._experiment_id, self._worker_id)
        except WorkerException as exc:
            self.revoked = exc
            raise

    def start(self) -> None:
        self._thread = start_background_thread(self._run, f"rf-worker-{self._worker_id}-heartbeat")

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.beat()
            except WorkerException:
                return
            except Exception as exc:  # a transient database error: the next beat may work
                _log.warning("worker %s heartbeat failed: %s", self._worker_id, exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(self._interval, 5.0))


@dataclass(frozen=True)
class TaskResult:
    """What a task handler run by :func:`run_worker` may return instead of None.

    ``run_progress``: counters of the task's run (the names and values
    ``StateDB.update_run_progress`` takes), written in the same transaction as
    the task's finish and only if that finish is accepted — a worker declared
    dead meanwhile (its task failed by ``fail_stale_workers``) changes neither
    the task nor its run.  Progress that must survive a lost finish is better
    written as it happens, with ``update_run_progress``.
    """

    run_progress: Optional[Mapping[str, Any]] = None

    def __post_init__(self) -> None:
        if self.run_progress is not None and not isinstance(self.run_progress, Mapping):
            raise ConfigError(
                f"TaskResult(run_progress={self.run_progress!r}) is not valid; a mapping of progress counters"
                " or None is allowed"
            )
        if self.run_progress is not None:
            # a frozen record holds a copy: the handler's dict may change after it returns
            object.__setattr__(self, "run_progress", dict(self.run_progress))


def run_worker(
    worker_id: int,
    db: "StateDB",
    handler: Callable[["TaskRecord"], Any],
    shutdown_event: _EventLike,
    *,
    experiment_id: int,
    heartbeat_seconds: float = 2.0,
    poll_seconds: float = 0.2,
) -> int:
    """The worker loop; returns the number of tasks processed (completed or failed).

    Until ``shutdown_event`` is set: claim this worker's oldest SCHEDULED task
    (``db.claim_worker_task``, which moves it to IN_PROGRESS and records this
    process and a claim token on it), call ``handler(task)``, and finish the task
    COMPLETED — or FAILED with the traceback text when the handler raises an
    ``Exception`` (the loop goes on).  The handler returns None or a
    :class:`TaskResult`, whose ``run_progress`` is written with the finish, in
    its transaction; any other return value fails the task with an error
    naming its type (and is logged), as does a ``run_progress`` the database
    refuses.  The finish presents the claim's token, so it never overwrites
    what a restart or ``fail_stale_workers`` recorded; a refused finish is
    logged and the loop goes on.  With no task
    it waits ``poll_seconds`` (waking at once when the event is set).  The event
    is checked between tasks, so the current task is always finished.

    The worker heartbeats once at the start and then every ``heartbeat_seconds``
    from a background thread (also while a long handler runs).  When a heartbeat
    finds the row marked exited (for instance failed as stale by the controller),
    the loop stops after the current task.  On a clean stop the worker marks
    itself exited (exit code 0).  A ``BaseException`` from the handler
    (``KeyboardInterrupt``, ``SystemExit``) fails the task and is re-raised.
    """
    check_int("worker_id", worker_id)
    check_positive_int("experiment_id", experiment_id)
    if not callable(handler):
        raise ConfigError(f"handler={handler!r} is not callable")
    if not (hasattr(shutdown_event, "is_set") and hasattr(shutdown_event, "wait")):
        raise ConfigError(f"shutdown_event={shutdown_event!r} is not an event (needs is_set() and wait())")
    heartbeat_seconds = check_positive_number("heartbeat_seconds", heartbeat_seconds)
    poll_seconds = check_positive_number("poll_seconds", poll_seconds)

    heart = _Heartbeat(db, experiment_id, worker_id, heartbeat_seconds)
    try:
        heart.beat()
    except WorkerException as exc:
        _log.warning("worker %s not started: %s", worker_id, exc)
        return 0
    heart.start()
    processed = 0
    clean = False
    try:
        while not shutdown_event.is_set():
            if heart.revoked is not None:
                _log.warning("worker %s stops: %s", worker_id, heart.revoked)
                break
            task = db.claim_worker_task(worker_id, experiment_id=experiment_id)
            if task is None:
                shutdown_event.wait(poll_seconds)
                continue
            processed += 1
            _process_task(db, handler, task, worker_id)
        clean = True
    finally:
        heart.stop()
        # Only a clean stop leaves nothing IN_PROGRESS; otherwise the row stays
        # open so fail_stale_workers can fail what was left.
        if clean and heart.revoked is None:
            _mark_exited_quietly(db, experiment_id, worker_id, 0)
    return processed


def _process_task(db: "StateDB", handler: Callable[["TaskRecord"], Any], task: "TaskRecord", worker_id: int) -> None:
    try:
        result = handler(task)
    except Exception:
        _finish(db, task, worker_id, ok=False, error=traceback.format_exc())
        return
    except BaseException:
        _finish(db, task, worker_id, ok=False, error=traceback.format_exc())
        raise
    if result is None:
        _finish(db, task, worker_id, ok=True, error=None)
    elif isinstance(result, TaskResult):
        _finish(db, task, worker_id, ok=True, error=None, run_progress=result.run_progress)
    else:
        error = (
            f"the handler returned a {type(result).__module__}.{type(result).__qualname__}"
            f" ({_short_repr(result)}); allowed: None or rapidfire_state.worker_manager.TaskResult"
        )
        _log.error("worker %s fails task %s: %s", worker_id, task.task_id, error)
        _finish(db, task, worker_id, ok=False, error=error)


def _short_repr(value: Any, limit: int = 80) -> str:
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the type
        return "unprintable"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _finish(
    db: "StateDB", task: "TaskRecord", worker_id: int, *, ok: bool, error: Optional[str],
    run_progress: Optional[Mapping[str, Any]] = None,
) -> None:
    try:
        # The finish presents this claim's token: a worker declared dead (its
        # task failed by fail_stale_workers or a restart) cannot overwrite that.
        db.finish_worker_task(
            task.task_id, ok=ok, error=error, claim_token=task.claim_token, run_progress=run_progress
        )
    except InvalidTransitionError as exc:
        # Someone else ended it meanwhile (fail_stale_workers, experiment cleanup),
        # or the claim is no longer ours: theirs is the recorded outcome.
        _log.warning("worker %s could not finish task %s: %s", worker_id, task.task_id, exc)
    except ConfigError as exc:
        if run_progress is None:
            raise
        # The progress was refused (nothing written): the task must not stay IN_PROGRESS.
        message = f"the handler's TaskResult.run_progress was refused: {exc}"
        _log.error("worker %s fails task %s: %s", worker_id, task.task_id, message)
        _finish(db, task, worker_id, ok=False, error=message)



# --- the default target: run_worker with the handler the experiment names ----------

#: The key of an experiment's ``config_options`` that names the task handler run by
#: :func:`default_worker_target` (``"package.module:function"``).
WORKER_HANDLER_KEY = "worker_handler"

_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
_HANDLER_NAME = re.compile(f"{_DOTTED}:{_DOTTED}")
_DEFAULT_TARGET_KWARGS = frozenset({"handler", "heartbeat_seconds", "poll_seconds"})


@dataclass(frozen=True)
class WorkerContext:
    """What a task handler run by :func:`default_worker_target` may need besides the task.

    ``db`` is the worker's :class:`StateDB`; ``registry``/``lock`` are those the
    :class:`WorkerManager` was given (the shared-memory registry and its lock);
    ``shutdown_event`` is set when the controller asks the workers to stop.
    ``handler_name`` is the ``module:function`` the handler was resolved from.
    """

    worker_id: int
    experiment_id: int
    experiment_name: str
    db: "StateDB"
    registry: Any
    lock: Any
    shutdown_event: Any
    handler_name: str


def _default_target_kwargs(worker_kwargs: Optional[dict[str, Any]], heartbeat_seconds: Any) -> dict[str, Any]:
    """Check the ``worker_kwargs`` of a manager without a target; add the heartbeat."""
    kwargs = dict(worker_kwargs or {})
    unknown = sorted(set(kwargs) - _DEFAULT_TARGET_KWARGS)
    if unknown:
        raise ConfigError(
            f"worker_kwargs {unknown} are not accepted without a target; the default target takes "
            f"{', '.join(sorted(_DEFAULT_TARGET_KWARGS))} (pass target=... for other arguments)"
        )
    if "handler" in kwargs and not isinstance(kwargs["handler"], str):
        raise ConfigError(
            f"worker_kwargs['handler']={kwargs['handler']!r} is not a handler name; use 'package.module:function'"
        )
    for key in ("heartbeat_seconds", "poll_seconds"):
        # checked here: in the spawned worker, run_worker would refuse it and the
        # worker would exit before it could fail a single task with the reason
        if key in kwargs:
            check_positive_number(f"worker_kwargs[{key!r}]", kwargs[key])
    # The manager judges staleness by its own interval: the workers beat at it.
    kwargs.setdefault("heartbeat_seconds", heartbeat_seconds)
    return kwargs


def resolve_worker_handler(name: object, *, where: str = "the handler name") -> Callable[..., Any]:
    """Import and return the callable ``name`` (``"package.module:function"``).

    The part after the colon may be dotted (``module:Class.method``).  The callable
    must accept ``(task, context)`` or just ``(task)``.

    Raises:
        ConfigError: naming ``where`` and the value: not a string of that form, the
            module cannot be imported (with the import's own error), no such
            attribute, not callable, or a signature that accepts neither form.
    """
    if not isinstance(name, str) or _HANDLER_NAME.fullmatch(name.strip()) is None:
        raise ConfigError(
            f"{where}={name!r} is not a task handler name; use 'package.module:function' "
            "(a function called as handler(task, context))"
        )
    module_name, _, attribute = name.strip().partition(":")
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:
        # ImportError, or whatever the module raised while importing; SystemExit
        # too (a script that parses its command line when imported): that would
        # end the worker without a word in the database
        raise ConfigError(
            f"{where}={name!r}: cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    handler: Any = module
    for part in attribute.split("."):
        try:
            handler = getattr(handler, part)
        except AttributeError:
            raise ConfigError(f"{where}={name!r}: module {module_name!r} has no attribute {attribute!r}") from None
        except Exception as exc:  # a module __getattr__ or a property that raises
            raise ConfigError(
                f"{where}={name!r}: cannot read {attribute!r} of module {module_name!r}: {type(exc).__name__}: {exc}"
            ) from exc
    if not callable(handler):
        raise ConfigError(f"{where}={name!r} is a {type(handler).__name__}, not a callable")
    if _handler_arity(handler) is None:
        raise ConfigError(
            f"{where}={name!r}: {handler!r} accepts neither (task, context) nor (task); "
            "a task handler is called as handler(task, context)"
        )
    return handler


def _handler_arity(handler: Callable[..., Any]) -> Optional[int]:
    """2 when ``handler`` accepts (task, context), 1 for (task) only, None for neither."""
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):  # some builtins have none: assume the documented form
        return 2
    for arity in (2, 1):
        try:
            signature.bind(*([None] * arity))
        except TypeError:
            continue
        return arity
    return None


def default_worker_target(
    *,
    worker_id: int,
    experiment_id: int,
    experiment_name: str,
    db: "StateDB",
    registry: Any,
    lock: Any,
    shutdown_event: Any,
    handler: Optional[str] = None,
    heartbeat_seconds: float = 2.0,
    poll_seconds: float = 0.2,
) -> None:
    """The target of a :class:`WorkerManager` made without one: :func:`run_worker`
    with the task handler the experiment names.

    The handler is ``handler`` when given (``worker_kwargs={"handler": ...}``), else
    ``config_options["worker_handler"]`` of the experiment, read from the database in
    the worker; a ``"package.module:function"`` resolved in the worker (so it is
    imported where the work happens, also torch).  Each claimed task is passed to it
    as ``handler(task, context)`` (:class:`WorkerContext`) or ``handler(task)``.

    When the name is missing or cannot be resolved, the worker does not hang and
    does not die silently: it logs the error once and goes on claiming its tasks,
    failing each with that error, so the controller reads the reason on every task
    it queued (and none stays SCHEDULED for a worker that cannot run it) until it
    stops the workers.
    """
    # Beat while the handler's module imports: that may take longer than the
    # controller's stale window (torch, a model zoo), and a worker judged stale
    # before its loop starts would leave without running or failing a task.
    heart = _Heartbeat(db, experiment_id, worker_id, check_positive_number("heartbeat_seconds", heartbeat_seconds))
    heart.start()
    try:
        if handler is not None:
            where = "worker_kwargs['handler']"
            name: object = handler
        else:
            where = f"config_options[{WORKER_HANDLER_KEY!r}] of experiment {experiment_id} ({experiment_name!r})"
            options = db.get_experiment(experiment_id).config_options or {}
            if WORKER_HANDLER_KEY not in options:
                raise ConfigError(
                    f"{where} is not set: name the task handler of the workers there as "
                    "'package.module:function', or give the WorkerManager a target"
                )
            name = options[WORKER_HANDLER_KEY]
        function = resolve_worker_handler(name, where=where)
        task_handler = _bind_handler(
            function,
            WorkerContext(worker_id, experiment_id, experiment_name, db, registry, lock, shutdown_event, str(name)),
        )
    except RapidFireError as exc:
        message = f"worker {worker_id} cannot run tasks: {exc}"
        _log.error("%s", message)
        task_handler = functools.partial(_refuse_task, message)
    finally:
        heart.stop()
    run_worker(
        worker_id, db, task_handler, shutdown_event, experiment_id=experiment_id,
        heartbeat_seconds=heartbeat_seconds, poll_seconds=poll_seconds,
    )


def _bind_handler(function: Callable[..., Any], context: WorkerContext) -> Callable[["TaskRecord"], Any]:
    if _handler_arity(function) == 1:
        return function
    return functools.partial(_call_with_context, function, context)


def _call_with_context(function: Callable[..., Any], context: WorkerContext, task: "TaskRecord") -> Any:
    return function(task, context)


def _refuse_task(message: str, task: "TaskRecord") -> None:
    raise WorkerException(message)
