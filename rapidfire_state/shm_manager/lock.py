"""The registry lock: :class:`SHMLock`, a file lock the operating system releases when its holder dies.

Lock files are ``<directory>/<name>.<host>.<pid>.<random>.lock``; the directory is
``<experiment dir>/shm_locks`` when DataPath is initialized, else ``$RF_HOME/shm_locks``.
Creating one sweeps this host's lock files of dead processes (and the journals of
their registries).
"""

from __future__ import annotations

import fcntl
import os
import re
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Optional

from loguru import logger

from rapidfire_state.constants import rf_home
from rapidfire_state.shm_manager.copies import journal_tag, sweep_journals
from rapidfire_state.shm_manager.errors import SHMRegistryUnavailableError
from rapidfire_state.shm_manager.files import host_component, pid_alive, safe_component, unlink_quiet

#: Longest sleep between two tries of a lock acquired with a timeout (flock has no timeout).
_LOCK_POLL_MAX = 0.005
#: Size of the holder record at the start of a lock file (a pid, space padded).
_HOLDER_BYTES = 24
_LOCK_NAME_RE = re.compile(r"^.+\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[0-9a-f]{12}\.lock$")
_ALL_LOCKS: "weakref.WeakSet[SHMLock]" = weakref.WeakSet()


class SHMLock:
    """A lock shared by processes that the operating system releases when its holder dies.

    An exclusive ``flock`` on a lock file, plus a thread lock so that the threads
    of one process exclude each other too (a ``flock`` belongs to an open file,
    which all threads of a process share).  Used like a ``multiprocessing.Lock``:
    ``with lock: ...``, ``acquire(blocking=True, timeout=None) -> bool``,
    ``release()``; not reentrant.  A process killed while holding it (SIGKILL
    included) holds it no more: the kernel drops the ``flock`` with the process's
    last descriptor of the file.

    It pickles as its path (hand it to spawned processes like the registry
    proxy); a copy opens the file on first use and never creates it, so a lock
    whose file was removed — its owner shut down — raises
    :class:`SHMRegistryUnavailableError` instead of silently locking a new file
    nobody else uses.  After ``os.fork()`` the child closes the descriptor it
    inherited (which would otherwise keep a parent's lock held after the parent
    died) and starts unlocked.

    Args:
        path: the lock file (created when missing, unless ``create=False``).
    """

    def __init__(self, path: "os.PathLike[str] | str", *, create: bool = True):
        self.path = os.path.abspath(os.fspath(path))
        self._fd: Optional[int] = None
        self._thread_lock = threading.Lock()
        self._held = False
        self._pid = os.getpid()
        if create:
            self._fd = self._open(create=True)
        _ALL_LOCKS.add(self)

    @classmethod
    def create(cls, name: str = "registry", directory: "os.PathLike[str] | str | None" = None) -> "SHMLock":
        """A new lock on a file of its own: ``<directory>/<name>.<host>.<pid>.<random>.lock``.

        ``directory`` defaults to ``<experiment dir>/shm_locks`` when
        :class:`~rapidfire_state.datapaths.DataPath` is initialized, else
        ``$RF_HOME/shm_locks``.  The file is created exclusively, so two locks made
        this way never share a file; lock files left by dead processes of this host
        are removed.  The caller owns the file: :meth:`remove` deletes it.
        """
        folder = Path(directory) if directory is not None else default_lock_dir()
        folder.mkdir(parents=True, exist_ok=True)
        sweep_stale_locks(folder)
        host = host_component()
        while True:
            path = folder / f"{safe_component(name, 64)}.{host}.{os.getpid()}.{os.urandom(6).hex()}.lock"
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:  # pragma: no cover - 48 random bits
                continue
            os.close(fd)
            return cls(path)

    # --- file ---------------------------------------------------------------------

    def _open(self, *, create: bool) -> int:
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        try:
            return os.open(self.path, flags, 0o600)
        except FileNotFoundError as exc:
            raise SHMRegistryUnavailableError(
                f"the shared-memory lock file {self.path} is gone: the manager that owned it has shut down"
            ) from exc

    def _forget(self) -> None:
        """In a forked child: drop the parent's descriptor (never unlock through it) and state."""
        fd, self._fd = self._fd, None
        self._thread_lock = threading.Lock()
        self._held = False
        self._pid = os.getpid()
        if fd is not None:
            try:
                os.close(fd)  # closing our copy leaves the parent's flock in place
            except OSError:  # pragma: no cover
                pass

    def _flock(self, fd: int, blocking: bool, deadline: Optional[float]) -> bool:
        if blocking and deadline is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return True
        delay = 0.0002
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                pass
            if not blocking:
                return False
            remaining = deadline - time.monotonic()  # type: ignore[operator]
            if remaining <= 0:
                return False
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, _LOCK_POLL_MAX)

    def _note_holder(self, fd: int) -> None:
        # The holder's pid sits at the start of the file while it holds the lock and
        # is blanked by release(): a pid found there on acquiring is a holder that
        # died holding the lock.  Diagnostic only; errors are ignored.
        try:
            previous = os.pread(fd, _HOLDER_BYTES, 0).strip()
            if previous and previous != str(os.getpid()).encode():
                logger.warning(
                    f"shared-memory lock {self.path}: pid {previous.decode(errors='replace')} died holding it; "
                    "the operating system released it"
                )
            os.pwrite(fd, str(os.getpid()).encode().ljust(_HOLDER_BYTES), 0)
        except OSError:
            pass

    # --- lock protocol --------------------------------------------------------------

    def acquire(self, blocking: bool = True, timeout: Optional[float] = None) -> bool:
        """Take the lock; False when ``blocking`` is false or ``timeout`` seconds pass first."""
        if self._pid != os.getpid():  # forked without the at-fork hook (e.g. by a C extension)
            self._forget()
        if timeout is not None and timeout < 0:
            timeout = 0.0
        deadline = None if timeout is None or not blocking else time.monotonic() + timeout
        if not blocking:
            got = self._thread_lock.acquire(False)
        elif deadline is None:
            got = self._thread_lock.acquire()
        else:
            got = self._thread_lock.acquire(True, timeout)
        if not got:
            return False
        try:
            if self._fd is None:
                self._fd = self._open(create=False)
            if self._flock(self._fd, blocking, deadline):
                if os.fstat(self._fd).st_nlink == 0:  # removed by its owner since we opened it
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
                    os.close(self._fd)
                    self._fd = None
                    raise SHMRegistryUnavailableError(
                        f"the shared-memory lock file {self.path} is gone: the manager that owned it has shut down"
                    )
                self._held = True
                self._note_holder(self._fd)
                return True
        except BaseException:
            self._thread_lock.release()
            raise
        self._thread_lock.release()
        return False

    def release(self) -> None:
        """Give the lock back; RuntimeError when this process does not hold it."""
        if not self._held or self._pid != os.getpid() or self._fd is None:
            raise RuntimeError(f"release of the unlocked shared-memory lock {self.path}")
        self._held = False
        try:
            os.pwrite(self._fd, b" " * _HOLDER_BYTES, 0)
        except OSError:
            pass
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # --- life cycle -------------------------------------------------------------------

    def close(self) -> None:
        """Close this process's descriptor (releasing the lock if this process holds it)."""
        fd, self._fd = self._fd, None
        if fd is not None and self._pid == os.getpid():
            if self._held:
                self._held = False
                self._thread_lock.release()
            try:
                os.close(fd)
            except OSError:  # pragma: no cover
                pass

    def remove(self) -> None:
        """Close and delete the lock file (its owner's shutdown); other processes' copies then raise."""
        self.close()
        unlink_quiet(self.path)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def __reduce__(self) -> tuple:
        return (_attach_lock, (self.path,))

    def __repr__(self) -> str:
        return f"SHMLock({self.path!r})"


def _attach_lock(path: str) -> SHMLock:
    return SHMLock(path, create=False)


def _forget_locks_after_fork() -> None:
    for lock in list(_ALL_LOCKS):
        lock._forget()


os.register_at_fork(after_in_child=_forget_locks_after_fork)


def default_lock_dir() -> Path:
    from rapidfire_state.datapaths import DataPath

    base = DataPath.experiment_path() if DataPath.is_initialized() else rf_home()
    return base / "shm_locks"


def sweep_stale_locks(directory: Path) -> None:
    """Remove this host's lock files whose creating process is dead and that nobody holds."""
    host = host_component()
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        match = _LOCK_NAME_RE.match(name)
        if not match or match.group("host") != host or pid_alive(int(match.group("pid"))):
            continue
        path = directory / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        unlink_quiet(path)
        os.close(fd)
        sweep_journals(journal_tag(os.path.abspath(path)))  # its registry died with its owner
