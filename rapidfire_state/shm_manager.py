"""Model weights in shared memory, their metadata in the state database.

:class:`SharedMemoryManager` keeps tensors (a tensor, a state dict, or an
``nn.Module``'s state dict) in CPU shared memory, reachable by every process
through a :class:`multiprocessing.Manager` dict (the *registry*) guarded by an
:class:`SHMLock` (a file lock the operating system releases when its holder
dies); one ``shm_objects`` row per object in the database says where it is, how
big it is and to which experiment/run/chunk it belongs.  Payloads never enter
the DB.

Usage::

    shm = SharedMemoryManager("controller-shm", db=StateDB())
    registry, lock = shm.get_shm_objects()          # hand these to the workers
    shm.store(f"{run_id}_model", model, experiment_id=e, run_id=run_id, chunk_id=c)
    state_dict = shm.load(f"{run_id}_model")         # zero-copy views, any process

    # in a spawned worker (the manager pickles: proxies + the database URL)
    shm = SharedMemoryManager("controller-shm", registry, lock, db)

The spec's raw pattern keeps working: ``with lock: registry[key] = state_dict``
puts a tensor dict into shared memory through torch's own reducers (such a key
is *adopted* — given a metadata row — by :meth:`~SharedMemoryManager.reconcile`),
and ``registry[key]`` of a key written by :meth:`~SharedMemoryManager.store`
returns the stored value itself (tensors as zero-copy views), never a wrapper.

Import cost: this module imports neither torch nor sqlalchemy; torch is imported
by the constructor (it must set the sharing strategy before any tensor is
pickled), the database records only when a method needs them.  It never imports
mlflow.

Sharing strategy (process-wide)
-------------------------------
The constructor sets ``torch.multiprocessing.set_sharing_strategy("file_system")``
in the calling process — **for the whole process**, not just for this object:
every tensor that process later sends through any ``multiprocessing`` channel is
shared by file name instead of by file descriptor.  The registry Manager that
this class starts runs :func:`manager_initializer`, which sets the same strategy
there.  Measured on the project machines (2 cores, spawned Manager, a raw
``registry["sd"] = sd`` of a 2000-tensor state dict of 16 floats each, then
``registry["sd"]`` back, then a write through the fetched tensor)::

    client strategy  Manager initializer   store   load    fds (client/manager)  zero-copy
    file_system      sets file_system      0.63 s  0.044 s   +2 / +2             yes
    file_descriptor  none (default fd)     1.00 s  0.53 s    +2002 / +2002       yes
    file_system      none (default fd)     0.71 s  0.96 s    +2002 / +2003       NO: copied
    file_descriptor  sets file_system      0.85 s  0.40 s    +2003 / +2          NO: copied

Only ``file_system`` on both sides is zero-copy without one descriptor per
tensor (a 2000-tensor dict, times a few runs, would hit a 1024-fd limit).  Its
known cost: a process killed by SIGKILL can leave its ``/dev/shm/torch_*`` files
until torch's ``torch_shm_manager`` daemon notices; storages are refcounted in
the files and unlinked when the last user goes.  A Manager you start yourself
must run :func:`manager_initializer` (``SyncManager(ctx=spawn).start(manager_initializer)``)
— or use :func:`start_registry_manager` — otherwise it copies every tensor it
hands out.

Layout and copies
-----------------
Each object stored by :meth:`~SharedMemoryManager.store` lives in **one** shared
storage (one ``/dev/shm`` file, one mapping per process however many tensors),
tensors packed at 64-byte-aligned offsets.  The registry holds a small packed
description (the storage handle, shapes/dtypes/offsets, the container structure);
unpickling it in a client builds the views, so a 2000-tensor load is one mapping
plus 2000 cheap views.  Storing:

* a new key (or a changed layout) allocates the shared storage once
  (``UntypedStorage._new_shared`` + ``posix_fallocate``, so a full ``/dev/shm``
  fails cleanly with ENOSPC instead of SIGBUS later) and copies each tensor once
  into it — outside the lock; the lock is held only to publish;
* a key that is already in shared memory with the same shapes and dtypes (in the
  same order) is written **in place**, so every process's loaded views see the
  new weights.  To survive a writer's death mid-copy it is copied twice: first,
  without the lock, into a *journal* (a file
  ``/dev/shm/rf-shm-journal.<tag>.<host>.<pid>.<random>`` the manager keeps for
  its next in-place store: one object's size of ``/dev/shm`` per writing
  process, removed by its close or exit), then, under the lock, from the
  journal into the shared tensors while
  the registry entry carries a redo marker naming the journal (see Crashes).
  When ``/dev/shm`` has no room for the journal the key is replaced instead of
  written in place.  A process-local cache keeps the shared tensors this process
  has seen; a random generation number in the registry entry tells whether
  another process has replaced the key since (then the cache is refreshed);
* CUDA tensors are copied straight into the shared CPU tensors (``copy_``,
  synchronous).

Plain CPU copies are ``memmove`` pieces of 8 MiB pulled by
``torch.get_num_threads()`` threads — one parallel section per object — rather
than a ``copy_`` per tensor: on the busy 2-core project machine a loop of 200
``copy_`` calls (one OpenMP region each, each waiting for its slowest thread)
took 190-730 ms against 48-80 ms for one ``copy_`` of the same 512 MB, while
the memmove pieces took 40-85 ms; on a quiet machine both take 25 ms.
``scripts/bench/shm.py`` measures the whole path (512 MB, 200 tensors, medians
of 3, SQLite rows).  On a quiet machine: memcpy 31 ms, first store 279 ms (page
faults of fresh shared memory), load in a second process 1.7 ms (0.05x; 0.16 ms
cached), clone + ``share_memory_`` + registry 677 ms (first store 0.41x of it),
``torch.save`` + ``torch.load`` through /dev/shm 448 ms.  The crash-safe swap
copies the bytes twice: measured back to back on the busy 2-core machine it
took 1.9-2.7x memcpy against 0.9-1.05x for the single, tearable copy it
replaced; a manager's first in-place store also allocates the journal (about a
first store's cost).

:meth:`~SharedMemoryManager.load` returns, for an object in shared memory, the
stored structure with **views of the shared tensors** (zero-copy: a write through
them is seen by every process; copy before mutating if that is not wanted).  An
``nn.Module`` is stored as its ``state_dict()`` and loads as that state dict.
One retained view keeps the whole object's storage alive.

Metadata and consistency
------------------------
Every registry mutation happens under the lock; the row is written after the
lock is released (a database write can wait up to its retry limit, and other
processes must not wait with it): payload first, then row; the writer then
re-reads the registry entry and rewrites the row until the two agree, so two
stores of one key racing to the database leave the newest entry's row.  If the
row write fails the payload is removed and the error re-raised (for a key that
existed, the key is then gone entirely — neither old nor new payload, nor row).
``db=None`` means no rows at all (registry-only mode; :meth:`~SharedMemoryManager.list_objects` then reads the
registry).  Each object also has a small metadata entry in the registry under
``"__rf_shm_meta__/<key>"`` (generation, location, size, ids); code that lists
the registry raw will see these keys.  Writers set a payload before its metadata
entry, so :meth:`~SharedMemoryManager.load` takes no lock (one metadata read,
plus one payload read when the generation moved).  Rows belong to the manager
*name*: :meth:`~SharedMemoryManager.list_objects`, ``reconcile()`` and the
experiment-cleanup hook (which drops the registry entries **and disk files** of
the rows a cleanup removed) act on the rows whose ``manager_name`` is this name.

Disk fallback
-------------
An object larger than ``max_object_bytes``, or one whose allocation would leave
``/dev/shm`` with less than ``min_free_bytes`` free, is written to disk
atomically (temp file in the same directory, write, flush, fsync, ``os.replace``,
fsync of the directory) and loaded with ``torch.load(weights_only=True)`` as a
private CPU copy.  Where: ``DataPath.checkpoint_path(run_id, chunk_id)`` when
DataPath is initialized and the object has both ids (``model_chunk_<c>.pt`` next
to it for type MODEL; a key-hash suffix when another key already owns the file);
otherwise ``<experiment dir>/shm_spill/<manager name>/<key>-<hash>.pt`` when
DataPath is initialized, else ``$RF_HOME/shm_spill/<manager name>/<key>-<hash>.pt``.
:class:`~rapidfire_state.exceptions.InsufficientSharedMemoryError` is raised only
when the disk would also keep less than ``min_free_disk_bytes`` free.  A warning
is logged (loguru) when ``/dev/shm`` use passes 90 % (:data:`SHM_WARN_FRACTION`;
the spec names no figure), once per crossing.

Crashes
-------
The lock held under registry mutations — only publishes and in-place copies;
allocation, disk writes and database writes happen outside it — is an
:class:`SHMLock`: a process killed while holding it (SIGKILL included) releases
it with its death, and the next process takes it without a restart.  The lock
file is ``<experiment dir>/shm_locks/<name>.<host>.<pid>.<random>.lock`` when
DataPath is initialized, else under ``$RF_HOME/shm_locks/``; one per manager
that starts a registry, removed by its :meth:`~SharedMemoryManager.close`.  A
lock passed to the constructor is used as given (a ``multiprocessing`` Manager
lock stays held when its holder is killed: other processes then raise
:class:`SHMLockTimeoutError` after ``lock_timeout`` seconds).

A key is never left torn: a new payload is published in one registry update, and
a writer killed during an in-place copy leaves a redo marker that the next
store, load or :meth:`reconcile` of that key completes from the journal under
the lock (a delete just removes the key), so the key loads as it was before the
store or as written (while the marker is up, a load waits for the lock).  The
journal of a killed writer is removed by whoever finishes its copy, else by the
next :meth:`reconcile` (or, once the registry's owner is dead too, by the next
lock file created in the same directory); a delete removes the payload before
its metadata, so a delete killed halfway never strips the marker off a
half-copied payload.  A raw ``registry[key]``
read sees the half-copied tensors until one of those runs.  A writer killed
during a disk write leaves only a temp file ``.ckpt-*.<pid>.rftmp`` next to the
target, never a partial checkpoint.  :meth:`reconcile` repairs rows and payloads
that disagree after a crash and deletes such temp files of dead writers.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import signal
import socket
import tempfile
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

from loguru import logger

from rapidfire_state.constants import SHMLocation, SHMObjectType, rf_home
from rapidfire_state.datapaths import fsync_directory
from rapidfire_state.exceptions import ConfigError, InsufficientSharedMemoryError, RapidFireError

if TYPE_CHECKING:  # pragma: no cover
    from rapidfire_state.db.records import SHMObjectRecord
    from rapidfire_state.db.store import StateDB

#: Where POSIX shared memory (torch's ``file_system`` storages) lives.
SHM_DIR = "/dev/shm"
#: A warning is logged when ``/dev/shm`` use passes this fraction.
SHM_WARN_FRACTION = 0.9
#: Default ``min_free_bytes``: keep this much of ``/dev/shm`` free.
DEFAULT_MIN_FREE_BYTES = 1 << 30
#: Default ``lock_timeout`` in seconds.
DEFAULT_LOCK_TIMEOUT = 300.0
#: Prefix of the registry keys holding each object's metadata entry.
META_PREFIX = "__rf_shm_meta__/"
#: Tensor offsets inside an object's shared storage are multiples of this.
ALIGNMENT = 64

_MAX_KEY_LENGTH = 512
_DISK_OVERHEAD_BYTES = 1 << 20


# --- errors ---------------------------------------------------------------------------


class SHMKeyError(RapidFireError, KeyError):
    """No object is stored under the key (also a :class:`KeyError`)."""

    def __init__(self, key: str, detail: str = ""):
        self.key = key
        message = f"no shared-memory object is stored under key {key!r}"
        super().__init__(f"{message}: {detail}" if detail else message)

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class SHMRegistryUnavailableError(RapidFireError):
    """The registry's Manager process cannot be reached (it exited or was killed)."""


class SHMLockTimeoutError(RapidFireError):
    """The registry lock was not acquired within ``lock_timeout`` seconds."""


# --- the registry lock ------------------------------------------------------------------

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
        folder = Path(directory) if directory is not None else _default_lock_dir()
        folder.mkdir(parents=True, exist_ok=True)
        _sweep_stale_locks(folder)
        host = _lock_host()
        while True:
            path = folder / f"{_safe_component(name, 64)}.{host}.{os.getpid()}.{os.urandom(6).hex()}.lock"
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
        _unlink_quiet(self.path)

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


def _lock_host() -> str:
    # no dots: the host must stay one field of the lock file name
    return _safe_component(socket.gethostname(), 64).replace(".", "_")


def _default_lock_dir() -> Path:
    from rapidfire_state.datapaths import DataPath

    base = DataPath.experiment_path() if DataPath.is_initialized() else rf_home()
    return base / "shm_locks"


def _sweep_stale_locks(directory: Path) -> None:
    """Remove this host's lock files whose creating process is dead and that nobody holds."""
    host = _lock_host()
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        match = _LOCK_NAME_RE.match(name)
        if not match or match.group("host") != host or _pid_alive(int(match.group("pid"))):
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
        _unlink_quiet(path)
        os.close(fd)
        _sweep_journals(_journal_tag(os.path.abspath(path)))  # its registry died with its owner


# --- the registry Manager ---------------------------------------------------------------

# True only inside a registry Manager process started with manager_initializer: there,
# a packed object stays packed (the Manager keeps one storage, not thousands of views).
_IN_REGISTRY_PROCESS = False
_TLS = threading.local()


def manager_initializer(parent_pid: Optional[int] = None) -> None:
    """Initializer of a registry Manager process (``SyncManager.start(manager_initializer)``).

    Sets torch's ``file_system`` sharing strategy (without it the Manager copies
    every tensor it hands out and holds one fd per tensor), keeps packed objects
    packed, ignores SIGINT (a Ctrl-C in the terminal must not take the registry
    down before the controller has cleaned up), and, given ``parent_pid``, exits
    when that process is gone (an orphaned registry would pin ``/dev/shm``).
    """
    global _IN_REGISTRY_PROCESS
    import torch.multiprocessing as torch_mp

    torch_mp.set_sharing_strategy("file_system")
    _IN_REGISTRY_PROCESS = True
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except (ValueError, OSError):  # pragma: no cover - not the main thread
        pass
    if parent_pid is not None:

        def watch() -> None:
            while True:
                time.sleep(1.0)
                if os.getppid() != parent_pid:
                    os._exit(0)

        threading.Thread(target=watch, name="rf-shm-parent-watch", daemon=True).start()


def start_registry_manager() -> Any:
    """Start a registry Manager (spawn context, :func:`manager_initializer`); returns it."""
    import multiprocessing
    from multiprocessing.managers import SyncManager

    _use_file_system_strategy()
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(manager_initializer, (os.getpid(),))
    return manager


def _use_file_system_strategy() -> None:
    import torch.multiprocessing as torch_mp

    if torch_mp.get_sharing_strategy() != "file_system":
        torch_mp.set_sharing_strategy("file_system")


# --- packed objects -----------------------------------------------------------------------


class _Packed:
    """An object's shared storage + layout + structure, as kept in the registry.

    Pickles to :func:`_rebuild_packed`, which in a client builds the stored value
    (views of the storage) and in the registry process keeps it packed.
    """

    __slots__ = ("storage", "layout", "treedef")

    def __init__(self, storage: Any, layout: tuple, treedef: Any):
        self.storage = storage  # one shared UntypedStorage, or None for an object without tensors
        self.layout = layout  # ((offset in elements, shape, dtype), ...)
        self.treedef = treedef

    def __reduce__(self) -> tuple:
        return (_rebuild_packed, (self.storage, self.layout, self.treedef))

    def views(self) -> list:
        return _views(self.storage, self.layout)

    def unpack(self) -> Any:
        return _unflatten(self.treedef, self.views())


def _rebuild_packed(storage: Any, layout: tuple, treedef: Any) -> Any:
    packed = _Packed(storage, layout, treedef)
    if _IN_REGISTRY_PROCESS or getattr(_TLS, "want_packed", False):
        return packed
    return packed.unpack()


class _Probe:
    """Sent once into a registry we did not start: tells how its Manager was initialized."""

    def __reduce__(self) -> tuple:
        return (_probe_value, ())


def _probe_value() -> tuple:
    import sys

    torch_mp = sys.modules.get("torch.multiprocessing")
    strategy = torch_mp.get_sharing_strategy() if torch_mp is not None else None
    return (_IN_REGISTRY_PROCESS, strategy)


@contextmanager
def _packed_fetch() -> Iterator[None]:
    previous = getattr(_TLS, "want_packed", False)
    _TLS.want_packed = True
    try:
        yield
    finally:
        _TLS.want_packed = previous


def _contiguous_stride(shape: tuple) -> tuple:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


def _views(storage: Any, layout: tuple) -> list:
    import torch

    return [
        torch.empty(0, dtype=dtype).set_(storage, offset, shape, _contiguous_stride(shape))
        for offset, shape, dtype in layout
    ]


# --- value structure ----------------------------------------------------------------------

# treedef nodes: ("T", i) tensor slot; ("V", value) plain leaf; ("D", keys, children) dict;
# ("O", keys, children, metadata) OrderedDict (state dicts keep their _metadata);
# ("L", children) list; ("U", children) tuple.


def _plain_leaf_types() -> tuple:
    import torch

    return (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


def _flatten(value: Any, tensors: list, *, strict: bool) -> Any:
    """The structure of ``value`` with tensors replaced by slots; appends the tensors.

    Two entries that are the same memory (tied weights: ``state_dict()`` returns a
    fresh ``detach()`` of the shared parameter under each name) share one slot, so
    they are stored once and load as one tensor.  ``strict`` checks what
    :meth:`SharedMemoryManager.store` accepts; fetched payloads are walked loosely.
    """
    import torch
    from collections import OrderedDict

    plain = _plain_leaf_types() if strict else ()
    seen: dict[tuple, int] = {}

    def slot(tensor: Any, path: str) -> tuple:
        if strict:
            _check_tensor(tensor, path)
        same = None
        if tensor.numel() and tensor.layout == torch.strided and tensor.device.type != "meta":
            same = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride(),
                    tensor.is_conj(), tensor.is_neg())
            if same in seen:
                return ("T", seen[same])
        tensors.append(tensor)
        if same is not None:
            seen[same] = len(tensors) - 1
        return ("T", len(tensors) - 1)

    def walk(item: Any, path: str) -> Any:
        if isinstance(item, torch.Tensor):
            return slot(item, path)
        if isinstance(item, torch.Size):
            return ("V", item)
        if isinstance(item, dict):
            keys = tuple(item.keys())
            if strict:
                for k in keys:
                    if not isinstance(k, plain) or isinstance(k, (torch.dtype, torch.device, torch.Size)):
                        raise ConfigError(
                            f"{path} has a key {k!r} of type {type(k).__name__}; dict keys must be "
                            "str, int, float, complex, bool, bytes or None"
                        )
            children = tuple(walk(item[k], f"{path}[{k!r}]") for k in keys)
            if isinstance(item, OrderedDict):
                return ("O", keys, children, getattr(item, "_metadata", None))
            return ("D", keys, children)
        if isinstance(item, list):
            return ("L", tuple(walk(v, f"{path}[{i}]") for i, v in enumerate(item)))
        if isinstance(item, tuple):
            return ("U", tuple(walk(v, f"{path}[{i}]") for i, v in enumerate(item)))
        if strict and not isinstance(item, plain):
            raise ConfigError(
                f"{path} is a {type(item).__module__}.{type(item).__qualname__}; a stored value may hold "
                "tensors, dicts, lists, tuples and plain values (None, bool, int, float, complex, str, bytes, "
                "torch.dtype, torch.device, torch.Size) only"
            )
        return ("V", item)

    return walk(value, "value")


def _unflatten(node: Any, tensors: Sequence[Any]) -> Any:
    tag = node[0]
    if tag == "T":
        return tensors[node[1]]
    if tag == "V":
        return node[1]
    if tag == "D":
        return {k: _unflatten(c, tensors) for k, c in zip(node[1], node[2])}
    if tag == "O":
        from collections import OrderedDict

        out: Any = OrderedDict((k, _unflatten(c, tensors)) for k, c in zip(node[1], node[2]))
        if node[3] is not None:
            out._metadata = node[3]
        return out
    if tag == "L":
        return [_unflatten(c, tensors) for c in node[1]]
    if tag == "U":
        return tuple(_unflatten(c, tensors) for c in node[1])
    raise ConfigError(f"corrupt structure node {node!r}")  # pragma: no cover


def _check_tensor(tensor: Any, path: str) -> None:
    import torch

    if tensor.is_nested or tensor.layout != torch.strided:
        raise ConfigError(f"{path} is a {tensor.layout} tensor; only dense (strided) tensors can be stored")
    if tensor.is_quantized:
        raise ConfigError(f"{path} is a quantized tensor; dequantize it before storing")
    if tensor.device.type == "meta":
        raise ConfigError(f"{path} is a meta tensor and has no data to store")


def _same_treedef(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # e.g. an adopted raw payload with an array leaf
        return False


def _signature(tensors: Sequence[Any]) -> tuple:
    return tuple((tuple(t.shape), t.dtype) for t in tensors)


def _to_cpu(tensor: Any) -> Any:
    """The tensor on the CPU: CPU tensors are returned as they are (no copy)."""
    if tensor.device.type == "cpu":
        return tensor
    return tensor.detach().to("cpu", non_blocking=False)


def _nbytes(tensor: Any) -> int:
    return tensor.numel() * tensor.element_size()


_COPY_PIECE_BYTES = 8 << 20
_COPY_PARALLEL_MIN_BYTES = 16 << 20
_copy_pool: Any = None
_copy_pool_key = (0, 0)  # (pid, workers): a forked child or a larger thread count gets a new pool
_copy_pool_lock = threading.Lock()


def _copy_workers(count: int) -> Any:
    global _copy_pool, _copy_pool_key
    with _copy_pool_lock:
        pid, workers = _copy_pool_key
        if _copy_pool is None or pid != os.getpid() or workers < count:
            from concurrent.futures import ThreadPoolExecutor

            if _copy_pool is not None and pid == os.getpid():
                _copy_pool.shutdown(wait=False)
            _copy_pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="rf-shm-copy")
            _copy_pool_key = (os.getpid(), count)
        return _copy_pool


def _copy_tensors(dsts: Sequence[Any], srcs: Sequence[Any]) -> None:
    """``dst.copy_(src)`` for each pair, with one parallel section for the whole object.

    A loop of ``copy_`` calls runs one OpenMP parallel region per tensor; on a busy
    machine each region waits for its slowest thread, and 200 regions measured 3-4x
    slower than one ``copy_`` of the same bytes.  Plain CPU pairs (same dtype,
    contiguous, no lazy conj/neg bit) are copied here instead as 8 MiB ``memmove``
    pieces pulled by ``torch.get_num_threads()`` threads (ctypes releases the GIL);
    everything else (CUDA sources, dtype or stride changes) goes through ``copy_``.
    """
    import ctypes

    import torch

    pieces: list[tuple[int, int, int]] = []
    total = 0
    for dst, src in zip(dsts, srcs):
        nbytes = _nbytes(dst)
        if (
            src.device.type == "cpu"
            and src.dtype == dst.dtype
            and src.numel() == dst.numel()
            and src.is_contiguous()
            and dst.is_contiguous()
            and not src.is_conj()
            and not src.is_neg()
            and src.layout == torch.strided
        ):
            if nbytes:
                dst_ptr, src_ptr = dst.data_ptr(), src.data_ptr()
                for offset in range(0, nbytes, _COPY_PIECE_BYTES):
                    pieces.append((dst_ptr + offset, src_ptr + offset, min(_COPY_PIECE_BYTES, nbytes - offset)))
                total += nbytes
        else:
            dst.copy_(src)
    threads = max(1, min(torch.get_num_threads(), len(pieces)))
    if threads == 1 or total < _COPY_PARALLEL_MIN_BYTES:
        for dst_ptr, src_ptr, nbytes in pieces:
            ctypes.memmove(dst_ptr, src_ptr, nbytes)
        return
    work = iter(pieces)  # list iterators are safe to share between threads

    def drain() -> None:
        for dst_ptr, src_ptr, nbytes in work:
            ctypes.memmove(dst_ptr, src_ptr, nbytes)

    pool = _copy_workers(threads - 1)
    futures = [pool.submit(drain) for _ in range(threads - 1)]
    drain()
    for future in futures:
        future.result()


def _layout_for(tensors: Sequence[Any]) -> tuple[tuple, int]:
    """Aligned offsets of ``tensors`` in one storage; returns (layout, storage bytes)."""
    layout, offset = [], 0
    for t in tensors:
        size = t.element_size()
        layout.append((offset // size, tuple(t.shape), t.dtype))
        offset += -(-_nbytes(t) // ALIGNMENT) * ALIGNMENT
    return tuple(layout), max(offset, ALIGNMENT)


# --- files --------------------------------------------------------------------------------


def _safe_component(text: str, limit: int = 64) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", text).lstrip(".")[:limit].replace("..", "_")
    return cleaned or "x"


def _key_file_name(key: str) -> str:
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    return f"{_safe_component(key)}-{digest}.pt"


_TEMP_RE = re.compile(r"^\..+\.(\d+)\.rftmp$")


def _write_temp(obj: Any, directory: Path) -> Path:
    """``torch.save(obj)`` into a fsynced temp file in ``directory``; returns its path."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".ckpt-", suffix=f".{os.getpid()}.rftmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        _unlink_quiet(Path(name))
        raise
    return Path(name)


def _commit_temp(temp: Path, final: Path) -> None:
    os.replace(temp, final)
    fsync_directory(final.parent)


def _unlink_quiet(path: Optional[Path | str]) -> bool:
    if path is None:
        return False
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        logger.warning(f"could not remove {path}: {exc}")
        return False


def atomic_torch_save(obj: Any, path: Path | str) -> Path:
    """``torch.save`` to ``path`` atomically: the file is either absent, the old one, or complete."""
    final = Path(path)
    _commit_temp(_write_temp(obj, final.parent), final)
    return final


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fs_free(path: Path | str) -> Optional[tuple[int, int]]:
    """(free bytes for an unprivileged user, total bytes) of the filesystem holding ``path``."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


class _NoSharedMemory(Exception):
    pass


#: Journal files of in-place stores: ``/dev/shm/<prefix><tag>.<host>.<pid>.<random>``.
JOURNAL_PREFIX = "rf-shm-journal."
_JOURNAL_RE = re.compile(r"^rf-shm-journal\.(?P<tag>[0-9a-f]{12})\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[0-9a-f]{12}$")


def _journal_tag(identity: str) -> str:
    """The journal files of one registry share this tag (a hash of its lock file, or its name)."""
    return hashlib.sha256(identity.encode("utf-8", "surrogateescape")).hexdigest()[:12]


class _Journal:
    """A writer's scratch file in /dev/shm, mapped shared: the redo journal of in-place stores.

    A file of our own rather than a torch shared storage: a torch storage whose
    creator is SIGKILLed keeps its reference count and stays in /dev/shm until every
    process of the experiment has exited (one object's size per killed writer).
    This one is named after its registry (tag), host and writer pid, so the next
    process to find the writer dead removes it (:meth:`SharedMemoryManager.reconcile`,
    and whoever finishes the copy it was left for).  The writer unlinks it itself
    on close, garbage collection or exit, unless a redo marker still names it.
    """

    __slots__ = ("path", "nbytes", "storage", "pid", "_finalizer", "__weakref__")

    def __init__(self, path: str, nbytes: int, storage: Any, *, owned: bool):
        self.path = path
        self.nbytes = nbytes
        self.storage = storage
        self.pid = os.getpid()
        self._finalizer: Any = None
        if owned:
            # multiprocessing's finalizer, not weakref.finalize: it also runs when a forked or
            # forkserver child returns (they end with os._exit, skipping atexit)
            from multiprocessing.util import Finalize

            self._finalizer = Finalize(self, _unlink_own_journal, (path, self.pid), exitpriority=0)

    @classmethod
    def create(cls, tag: str, nbytes: int) -> "_Journal":
        """A new journal of ``nbytes`` (pages reserved); raises :class:`_NoSharedMemory`."""
        while True:
            path = os.path.join(SHM_DIR, f"{JOURNAL_PREFIX}{tag}.{_lock_host()}.{os.getpid()}.{os.urandom(6).hex()}")
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:  # pragma: no cover - 48 random bits
                continue
            except OSError as exc:
                raise _NoSharedMemory(f"cannot create a journal in {SHM_DIR}: {exc}") from exc
            break
        try:
            try:
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as exc:
                raise _NoSharedMemory(f"/dev/shm cannot hold a {nbytes}-byte journal ({exc})") from exc
            storage = _map_file(fd, nbytes)
        except BaseException:
            _unlink_quiet(path)
            raise
        finally:
            os.close(fd)
        return cls(path, nbytes, storage, owned=True)

    @classmethod
    def open(cls, path: str, nbytes: int) -> Optional["_Journal"]:
        """Another process's journal, mapped (never created); None when it is gone."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            if os.fstat(fd).st_size < nbytes:
                return None
            return cls(path, nbytes, _map_file(fd, nbytes), owned=False)
        finally:
            os.close(fd)

    def abandon(self) -> None:
        """Leave the file to whoever finishes the copy a redo marker names it for."""
        if self._finalizer is not None:
            self._finalizer.cancel()

    def discard(self) -> None:
        """Unlink the file now (its owner's close)."""
        if self._finalizer is not None:
            self._finalizer()


def _map_file(fd: int, nbytes: int) -> Any:
    import mmap

    import torch

    if nbytes == 0:
        return torch.UntypedStorage(0)
    # frombuffer keeps the mmap object alive as long as the storage lives
    return torch.frombuffer(mmap.mmap(fd, nbytes), dtype=torch.uint8).untyped_storage()


def _unlink_own_journal(path: str, pid: int) -> None:
    if os.getpid() == pid:  # never from a forked child's copy
        _unlink_quiet(path)


def _sweep_journals(tag: str, keep: "set[str] | frozenset[str]" = frozenset()) -> list[str]:
    """Remove this host's journals of registry ``tag`` whose writer is dead (except ``keep``)."""
    host = _lock_host()
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return []
    removed = []
    for name in names:
        match = _JOURNAL_RE.match(name)
        if not match or match.group("tag") != tag or match.group("host") != host:
            continue
        path = os.path.join(SHM_DIR, name)
        if path in keep or _pid_alive(int(match.group("pid"))):
            continue
        if _unlink_quiet(path):
            removed.append(path)
    return removed


# --- records and reports ------------------------------------------------------------------


@dataclass(frozen=True)
class ReconcileReport:
    """What :meth:`SharedMemoryManager.reconcile` found and changed.

    ``removed``: keys whose row was deleted because the payload is gone (SHM rows
    without a registry payload, DISK rows without their file — those are also in
    ``missing_files``). ``adopted``: registry keys that had no row and got one.
    ``repaired``: rows rewritten to match the registry (location/size).
    ``ok``: rows found consistent. ``registry_alive``: whether the Manager answered
    (when not, every SHM row of this manager counts as missing).
    ``removed_temp_files``: temp files of interrupted disk writes, and /dev/shm
    journals of writers that died, that were deleted.
    ``skipped``: reprs of registry keys that cannot have a row (not a str, or
    longer than 512 characters); they are left as they are.
    """

    removed: tuple[str, ...] = ()
    missing_files: tuple[str, ...] = ()
    adopted: tuple[str, ...] = ()
    repaired: tuple[str, ...] = ()
    ok: int = 0
    registry_alive: bool = True
    removed_temp_files: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.removed or self.adopted or self.repaired or self.removed_temp_files)


@dataclass
class _Cached:
    gen: int
    treedef: Any
    signature: tuple
    tensors: list
    storage: Any  # the packed storage, or None for a raw (adopted) payload


# --- the manager --------------------------------------------------------------------------


class SharedMemoryManager:
    """Tensors in CPU shared memory, one metadata row each in the state database.

    Args:
        name: the manager's name (``shm_objects.manager_name``); processes that
            share a registry use the same name.
        registry, lock: the Manager dict proxy and the :class:`SHMLock` from
            :meth:`get_shm_objects` of another instance; both None starts a new
            registry Manager (spawn context, :func:`manager_initializer`) and a
            new lock file, owned by this instance and removed by :meth:`close`.
        db: a :class:`~rapidfire_state.db.store.StateDB` (or a database URL, then
            opened and closed by this instance); None keeps no rows.
        max_object_bytes: objects larger than this go to disk (None: no limit).
        min_free_bytes: an object whose allocation would leave ``/dev/shm`` with
            less free goes to disk.
        min_free_disk_bytes: the disk fallback refuses to leave less than this free
            on the target filesystem (then :class:`InsufficientSharedMemoryError`).
        lock_timeout: seconds to wait for the registry lock (None: forever).

    Instances pickle (registry and lock proxies, the database as its URL, the
    limits), so they can be passed to spawned processes; the copy never owns the
    Manager.  Constructing one sets the process-wide ``file_system`` sharing
    strategy (see the module documentation).
    """

    def __init__(
        self,
        name: str,
        registry: Any = None,
        lock: Any = None,
        db: Any = None,
        *,
        max_object_bytes: Optional[int] = None,
        min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
        min_free_disk_bytes: int = 0,
        lock_timeout: Optional[float] = DEFAULT_LOCK_TIMEOUT,
    ):
        if not isinstance(name, str) or not name.strip() or len(name) > 255:
            raise ConfigError(f"manager name {name!r} is not valid; a non-empty str of at most 255 characters is required")
        for what, number in (("min_free_bytes", min_free_bytes), ("min_free_disk_bytes", min_free_disk_bytes)):
            if isinstance(number, bool) or not isinstance(number, int) or number < 0:
                raise ConfigError(f"{what}={number!r} is not valid; a non-negative int is required")
        if max_object_bytes is not None and (
            isinstance(max_object_bytes, bool) or not isinstance(max_object_bytes, int) or max_object_bytes < 0
        ):
            raise ConfigError(f"max_object_bytes={max_object_bytes!r} is not valid; None or a non-negative int is required")
        if lock_timeout is not None and (isinstance(lock_timeout, bool) or not isinstance(lock_timeout, (int, float)) or lock_timeout <= 0):
            raise ConfigError(f"lock_timeout={lock_timeout!r} is not valid; None or a positive number of seconds is required")
        if (registry is None) != (lock is None):
            raise ConfigError("pass both registry and lock (from get_shm_objects()), or neither to start a new registry")
        self.name = name
        self.max_object_bytes = max_object_bytes
        self.min_free_bytes = min_free_bytes
        self.min_free_disk_bytes = min_free_disk_bytes
        self.lock_timeout = None if lock_timeout is None else float(lock_timeout)
        self._owns_db = False
        if isinstance(db, str):
            from rapidfire_state.db.store import StateDB

            db = StateDB(db)
            self._owns_db = True
        self.db: Optional[StateDB] = db
        self._cache: dict[str, _Cached] = {}
        self._local = threading.RLock()
        self._warned_full = False
        self._closed = False
        self._manager: Any = None

        self._owned_lock: Optional[SHMLock] = None
        self._scratch: Optional[_Journal] = None  # the journal of in-place stores, kept for the next one
        _use_file_system_strategy()
        if registry is None:
            self._owned_lock = SHMLock.create(name)
            try:
                self._manager = start_registry_manager()
            except BaseException:
                self._owned_lock.remove()
                raise
            registry, lock = self._manager.dict(), self._owned_lock
        else:
            self._probe(registry)
        self._registry = registry
        self._lock = lock
        # journals of one registry share a tag, so reconcile() finds its dead writers' ones
        self._journal_tag = _journal_tag(lock.path if isinstance(lock, SHMLock) else f"name:{name}")
        if self.db is not None:
            self.db.add_cleanup_hook(self._drop_payloads)

    # --- plumbing ---------------------------------------------------------------------

    def _probe(self, registry: Any) -> None:
        """Warn when a registry we did not start runs without :func:`manager_initializer`."""
        probe_key = f"{META_PREFIX}\x00probe-{os.getpid()}-{_new_gen()}"
        try:
            registry[probe_key] = _Probe()
            answer = registry.pop(probe_key, None)
        except (EOFError, OSError) as exc:
            # still usable for reconcile() and disk objects; registry calls will raise
            logger.warning(f"the shared-memory registry passed to {self.name!r} is unreachable: {exc!r}")
            return
        if isinstance(answer, _Probe):
            return  # an in-process dict: nothing is pickled, nothing is copied
        initialized, strategy = answer if isinstance(answer, tuple) else (False, None)
        if not initialized or strategy != "file_system":
            logger.warning(
                f"the registry Manager given to shared-memory manager {self.name!r} was not started with "
                "rapidfire_state.shm_manager.manager_initializer (sharing strategy there: "
                f"{strategy or 'torch not loaded'}): tensors it hands out may be copied instead of shared and "
                "hold one file descriptor each; start it with start_registry_manager()"
            )

    def __repr__(self) -> str:
        owner = f", manager pid {self.manager_pid}" if self._manager is not None else ""
        return f"SharedMemoryManager({self.name!r}, db={self.db!r}{owner})"

    def __getstate__(self) -> dict:
        if self._closed:
            raise RapidFireError(f"SharedMemoryManager {self.name!r} is closed and cannot be pickled")
        return {
            "name": self.name,
            "registry": self._registry,
            "lock": self._lock,
            "db": self.db,
            "max_object_bytes": self.max_object_bytes,
            "min_free_bytes": self.min_free_bytes,
            "min_free_disk_bytes": self.min_free_disk_bytes,
            "lock_timeout": self.lock_timeout,
        }

    def __setstate__(self, state: dict) -> None:
        self.__init__(  # type: ignore[misc]
            state["name"],
            state["registry"],
            state["lock"],
            state["db"],
            max_object_bytes=state["max_object_bytes"],
            min_free_bytes=state["min_free_bytes"],
            min_free_disk_bytes=state["min_free_disk_bytes"],
            lock_timeout=state["lock_timeout"],
        )

    def __enter__(self) -> "SharedMemoryManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def manager_pid(self) -> Optional[int]:
        """Pid of the registry Manager process this instance started (None otherwise)."""
        process = getattr(self._manager, "_process", None)
        return None if process is None else process.pid

    def get_shm_objects(self) -> tuple[Any, Any]:
        """``(registry, lock)``: the Manager dict proxy and its :class:`SHMLock`, to share with other processes."""
        return self._registry, self._lock

    def close(self) -> None:
        """Forget cached tensors, unregister the cleanup hook, stop an owned Manager. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with self._local:
            self._cache.clear()
            scratch, self._scratch = self._scratch, None
        if scratch is not None:
            scratch.discard()
        if self.db is not None:
            self.db.remove_cleanup_hook(self._drop_payloads)
            if self._owns_db:
                self.db.close()
        if self._manager is not None:
            try:
                self._manager.shutdown()
            except Exception as exc:  # pragma: no cover - already dead
                logger.debug(f"registry manager shutdown: {exc!r}")
            self._manager = None
        if self._owned_lock is not None:
            self._owned_lock.remove()  # after the registry: copies elsewhere now fail loudly
            self._owned_lock = None

    shutdown = close

    def _check_open(self) -> None:
        if self._closed:
            raise RapidFireError(f"SharedMemoryManager {self.name!r} is closed")

    # --- registry access --------------------------------------------------------------

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except (EOFError, OSError) as exc:
            raise SHMRegistryUnavailableError(
                f"the shared-memory registry of {self.name!r} is unreachable ({what}: {exc!r}); its Manager "
                "process has probably exited — run reconcile() to bring the database in line"
            ) from exc

    def _registry_answers(self) -> bool:
        try:
            len(self._registry)
            return True
        except (EOFError, OSError):
            return False

    def _meta(self, key: str) -> Optional[dict]:
        return self._call("get", self._registry.get, META_PREFIX + key)

    def _fetch(self, key: str) -> Any:
        with _packed_fetch():
            return self._call("get", self._registry.get, key)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        if self.lock_timeout is None:
            acquired = self._call("lock", self._lock.acquire)
        else:
            acquired = self._call("lock", self._lock.acquire, True, self.lock_timeout)
        if not acquired:
            raise SHMLockTimeoutError(
                f"the shared-memory registry lock of {self.name!r} was not acquired within {self.lock_timeout} s: "
                "a live process holds it (an SHMLock is released when its holder dies; a multiprocessing "
                "Manager lock passed in is not)"
            )
        try:
            yield
        finally:
            try:
                self._lock.release()
            except (EOFError, OSError):  # the Manager died meanwhile; nothing to release
                pass

    @staticmethod
    def _check_key(key: Any) -> str:
        if not isinstance(key, str) or key == "" or len(key) > _MAX_KEY_LENGTH:
            raise ConfigError(f"shm key {key!r} is not valid; a non-empty str of at most {_MAX_KEY_LENGTH} characters is required")
        if key.startswith(META_PREFIX):
            raise ConfigError(f"shm key {key!r} is not valid; the prefix {META_PREFIX!r} is reserved")
        return key

    # --- cache ------------------------------------------------------------------------

    def _cache_from_payload(self, key: str, payload: Any, gen: int) -> _Cached:
        if isinstance(payload, _Packed):
            tensors = payload.views()
            entry = _Cached(gen, payload.treedef, _signature(tensors), tensors, payload.storage)
        else:
            tensors: list = []
            treedef = _flatten(payload, tensors, strict=False)
            entry = _Cached(gen, treedef, _signature(tensors), tensors, None)
        with self._local:
            self._cache[key] = entry
        return entry

    def _drop_cache(self, *keys: str) -> None:
        with self._local:
            for key in keys:
                self._cache.pop(key, None)

    def _current(self, key: str, meta: Optional[dict]) -> Optional[_Cached]:
        """The shared tensors of ``key`` in this process, refreshed if the generation moved."""
        if meta is None or meta.get("location") != SHMLocation.SHM.value:
            return None
        with self._local:
            cached = self._cache.get(key)
        if cached is not None and cached.gen == meta.get("gen"):
            return cached
        payload = self._fetch(key)
        if payload is None:
            self._drop_cache(key)
            return None
        return self._cache_from_payload(key, payload, meta.get("gen"))

    # --- store ------------------------------------------------------------------------

    def store(
        self,
        key: str,
        value: Any,
        *,
        experiment_id: Optional[int] = None,
        run_id: Optional[int] = None,
        chunk_id: Optional[int] = None,
        object_type: Any = SHMObjectType.CHECKPOINT,
    ) -> "SHMObjectRecord":
        """Store ``value`` (a tensor, a state dict, an ``nn.Module``) under ``key``.

        ``value`` may nest dicts, lists and tuples of tensors and plain values
        (None, bool, int, float, complex, str, bytes, torch.dtype, torch.device,
        torch.Size — what ``torch.load(weights_only=True)`` reads back, so that the
        disk fallback loads the same thing); subclasses come back as their base
        type, except ``OrderedDict`` (and a state dict's ``_metadata``), which is
        kept.  Entries that are the same memory (tied weights) are stored once and
        load as one tensor.  An ``nn.Module`` is stored as its ``state_dict()``.
        The tensors may live on any device; they are copied into CPU shared memory
        (synchronously from CUDA).

        Returns the metadata record (the database row; without a database, a
        record built from the registry entry with ``shm_object_id`` 0).  Raises
        :class:`ConfigError` for bad input (nothing is touched),
        :class:`InsufficientSharedMemoryError` when the object fits neither in
        shared memory nor on disk, and whatever the database raises for the row
        (then neither payload nor row remains).
        """
        self._check_open()
        self._check_key(key)
        ids = {}
        for what, number in (("experiment_id", experiment_id), ("run_id", run_id), ("chunk_id", chunk_id)):
            if number is not None and (isinstance(number, bool) or not isinstance(number, int) or number < 0):
                raise ConfigError(f"{what}={number!r} is not valid; None or a non-negative int is required")
            ids[what] = number
        object_type = _coerce_type(object_type)
        import torch

        if isinstance(value, torch.nn.Module):
            value = value.state_dict()
        tensors: list = []
        treedef = _flatten(value, tensors, strict=True)
        signature = _signature(tensors)
        num_bytes = sum(_nbytes(t) for t in tensors)
        too_big = self.max_object_bytes is not None and num_bytes > self.max_object_bytes

        if not too_big and tensors and self._in_place_candidate(key, signature, num_bytes, len(tensors)):
            done = self._store_in_place(key, tensors, treedef, signature, num_bytes, ids, object_type)
            if done is not None:
                new_meta, old_meta = done
                return self._finish(key, new_meta, old_meta=old_meta, new_path=None)
        # A new payload: allocated and filled (or written to a temp file) before the lock.
        prepared: Optional[tuple] = self._prepare(key, tensors, treedef, num_bytes, too_big, ids, object_type)
        try:
            if prepared[0] == SHMLocation.DISK:
                prepared = prepared + self._claim_path(key, prepared[2])  # a database read: not under the lock
            with self._locked():
                meta = self._meta(key)
                new_meta, path = self._publish(key, prepared, meta, num_bytes, len(tensors), ids, object_type)
            prepared = None
        finally:
            if prepared is not None and prepared[0] == SHMLocation.DISK:
                _unlink_quiet(prepared[1])
        if path is not None:
            fsync_directory(path.parent)  # durability of the rename; visibility needed no fsync
        return self._finish(key, new_meta, old_meta=meta, new_path=path)

    def _in_place_candidate(self, key: str, signature: tuple, num_bytes: int, count: int) -> bool:
        """Whether ``key`` looks like a same-layout object in shared memory (checked again under the lock)."""
        with self._local:
            cached = self._cache.get(key)
        if cached is not None and cached.signature == signature:
            return True
        peek = self._meta(key)
        return bool(
            peek
            and peek.get("location") == SHMLocation.SHM.value
            and peek.get("num_bytes") == num_bytes
            and peek.get("tensor_count") == count
        )

    def _prepare(
        self, key: str, tensors: list, treedef: Any, num_bytes: int, too_big: bool, ids: dict, object_type: str
    ) -> tuple:
        """New payload, not yet published: ``(SHM, _Packed, tensors)`` or ``(DISK, temp path, final path)``."""
        layout, storage_bytes = _layout_for(tensors)
        shm_reason = None
        if not tensors and not too_big:
            return (SHMLocation.SHM, _Packed(None, (), treedef), [])
        if too_big:
            shm_reason = f"it is larger than max_object_bytes={self.max_object_bytes}"
        else:
            shm_reason = self._shm_short(storage_bytes)
        if shm_reason is None:
            try:
                packed = _Packed(self._allocate(storage_bytes), layout, treedef)
            except _NoSharedMemory as exc:
                shm_reason = str(exc)
            else:
                views = packed.views()
                _copy_tensors(views, tensors)
                self._check_usage()
                return (SHMLocation.SHM, packed, views)
        final = self._disk_path(key, ids["run_id"], ids["chunk_id"], object_type)
        directory = final.parent
        free = _fs_free(_existing_parent(directory))
        needed = num_bytes + _DISK_OVERHEAD_BYTES
        if free is not None and free[0] - needed < self.min_free_disk_bytes:
            raise InsufficientSharedMemoryError(
                f"object {key!r} ({num_bytes} bytes) fits neither in shared memory ({shm_reason}) nor on disk "
                f"({directory} has {free[0]} bytes free and min_free_disk_bytes={self.min_free_disk_bytes})"
            )
        disk_value = _unflatten(treedef, [_disk_tensor(t) for t in tensors])
        try:
            temp = _write_temp(disk_value, directory)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise InsufficientSharedMemoryError(
                    f"object {key!r} ({num_bytes} bytes) fits neither in shared memory ({shm_reason}) nor on disk "
                    f"({directory}: {exc})"
                ) from exc
            raise
        return (SHMLocation.DISK, temp, final)

    def _shm_short(self, storage_bytes: int) -> Optional[str]:
        """Why ``storage_bytes`` more of /dev/shm would break ``min_free_bytes`` (None: they fit)."""
        free = _fs_free(SHM_DIR)
        if free is not None and free[0] - storage_bytes < self.min_free_bytes:
            return f"/dev/shm has {free[0]} bytes free and min_free_bytes={self.min_free_bytes}"
        return None

    @staticmethod
    def _allocate(storage_bytes: int) -> Any:
        import torch

        try:
            storage = torch.UntypedStorage._new_shared(storage_bytes)
        except RuntimeError as exc:
            raise _NoSharedMemory(f"shared-memory allocation of {storage_bytes} bytes failed: {exc}") from exc
        # Reserve the pages now: tmpfs files are sparse, and a full /dev/shm would
        # otherwise surface as SIGBUS in the middle of the copy.
        try:
            handle = storage._share_filename_cpu_()[1]
            path = os.path.join(SHM_DIR, os.fsdecode(handle).lstrip("/"))
            fd = os.open(path, os.O_RDWR)
        except (OSError, RuntimeError, IndexError):
            fd = None
        if fd is not None:
            try:
                os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EDQUOT):
                    raise _NoSharedMemory(f"/dev/shm cannot hold {storage_bytes} more bytes ({exc})") from exc
            finally:
                os.close(fd)
        return storage

    # --- in-place stores: journal first, then the copy under the lock -------------------

    def _take_scratch(self, storage_bytes: int) -> Optional[_Journal]:
        """A journal of at least ``storage_bytes``, or None when /dev/shm is short."""
        with self._local:
            scratch = self._scratch
            if scratch is not None and scratch.pid != os.getpid():
                self._scratch = scratch = None  # forked: that mapping is the parent's journal
            if scratch is not None and scratch.nbytes >= storage_bytes:
                self._scratch = None
                return scratch
        if self._shm_short(storage_bytes) is not None:
            return None
        try:
            return _Journal.create(self._journal_tag, storage_bytes)
        except _NoSharedMemory:
            return None

    def _give_scratch(self, scratch: _Journal) -> None:
        with self._local:
            if not self._closed and (self._scratch is None or self._scratch.nbytes < scratch.nbytes):
                scratch, self._scratch = self._scratch, scratch
        if scratch is not None:
            scratch.discard()  # the smaller one, or all of it after close()

    def _store_in_place(
        self, key: str, tensors: list, treedef: Any, signature: tuple, num_bytes: int, ids: dict, object_type: str
    ) -> Optional[tuple[dict, Optional[dict]]]:
        """Copy ``tensors`` into the key's existing shared tensors, crash-safely.

        The new values are first copied, without the lock, into a journal (a shared
        scratch storage of this instance).  Under the lock the metadata entry gets a
        *redo marker* naming the journal, the journal is copied into the shared
        tensors, and the marker is cleared in the same registry update that
        publishes the new metadata.  A writer killed during that copy leaves the
        marker behind, the OS releases its lock, and the next process that takes
        the lock for this key (store, load, reconcile) finishes the copy from the
        journal: the key is never left torn.  Returns ``(new meta, old
        meta)``, or None when the key is no longer a same-layout shared object (or
        /dev/shm has no room for the journal) and must be replaced instead.
        """
        layout, storage_bytes = _layout_for(tensors)
        scratch = self._take_scratch(storage_bytes)
        if scratch is None:
            return None
        journal = _views(scratch.storage, layout)
        _copy_tensors(journal, tensors)
        try:
            with self._locked():
                meta = self._meta(key)
                if meta is not None and meta.get("redo") is not None:
                    meta = self._redo(key, meta)
                current = self._current(key, meta)
                if current is None or current.signature != signature:
                    return None
                changed = not _same_treedef(treedef, current.treedef)
                gen = _new_gen() if changed else current.gen
                new_meta = self._new_meta(gen, SHMLocation.SHM, None, num_bytes, len(tensors), ids, object_type)
                marker = dict(new_meta, redo=(scratch.path, scratch.nbytes, layout, treedef if changed else None))
                self._call("set", self._registry.__setitem__, META_PREFIX + key, marker)
                try:
                    self._apply_journal(key, current, journal, treedef if changed else None, new_meta)
                except BaseException:
                    # The marker still names the journal: leave it to whoever takes the lock next.
                    scratch.abandon()
                    scratch = None
                    self._drop_cache(key)
                    raise
        finally:
            if scratch is not None:
                self._give_scratch(scratch)
        return new_meta, meta

    def _apply_journal(self, key: str, current: _Cached, journal: list, treedef: Any, new_meta: dict) -> None:
        """Copy ``journal`` into the shared tensors and publish ``new_meta`` (lock held)."""
        _copy_tensors(current.tensors, journal)
        update: dict = {}
        if treedef is not None:
            # same tensors, new structure or plain values: re-send the (cheap) description
            if current.storage is not None:
                layout = tuple((t.storage_offset(), tuple(t.shape), t.dtype) for t in current.tensors)
                update[key] = _Packed(current.storage, layout, treedef)
            else:
                update[key] = _unflatten(treedef, current.tensors)
        update[META_PREFIX + key] = new_meta
        self._call("update", self._registry.update, update)
        with self._local:
            self._cache[key] = _Cached(
                new_meta["gen"], current.treedef if treedef is None else treedef, current.signature,
                current.tensors, current.storage,
            )

    def _redo(self, key: str, meta: dict) -> Optional[dict]:
        """Finish an in-place store whose writer died during the copy (lock held); the metadata after."""
        path, nbytes, layout, treedef = meta["redo"]
        clean = {k: v for k, v in meta.items() if k != "redo"}
        scratch = _Journal.open(path, nbytes)
        if scratch is None:
            # Cannot happen unless someone removed the file: the copy cannot be finished, and a
            # half-copied payload must not be loaded as if it were whole.
            self._call("pop", self._registry.pop, key, None)  # payload first: a death between leaves the marker
            self._call("pop", self._registry.pop, META_PREFIX + key, None)
            self._drop_cache(key)
            logger.error(f"shm object {key!r}: the journal {path} of an interrupted in-place store is gone; "
                         "the half-copied object was removed")
            return None
        payload = self._fetch(key)
        journal = _views(scratch.storage, layout)
        current = None if payload is None else self._cache_from_payload(key, payload, clean["gen"])
        if current is None or current.signature != _signature(journal):
            # replaced behind the marker (a raw registry write): that payload stands, reconcile() adopts it
            self._call("pop", self._registry.pop, META_PREFIX + key, None)
            self._drop_cache(key)
            del journal, scratch
            _unlink_quiet(path)
            logger.warning(f"shm object {key!r}: an interrupted in-place store was overtaken by a raw registry write")
            return None
        self._apply_journal(key, current, journal, treedef, clean)
        del journal, scratch
        _unlink_quiet(path)  # its writer abandoned it (died, or gave up after an error)
        logger.warning(f"shm object {key!r}: finished an in-place store that a dead process left half copied")
        return clean

    def _settle(self, key: str) -> Optional[dict]:
        """The metadata of ``key`` once no in-place store is half done: waits for a live writer's
        lock, finishes a dead one's copy (then writes its row)."""
        with self._locked():
            meta = self._meta(key)
            redone = meta is not None and meta.get("redo") is not None
            if redone:
                meta = self._redo(key, meta)
        if redone and meta is not None and self.db is not None:
            try:  # the dead writer never wrote its row
                self._write_row(key, meta)
                self._follow(key, meta)
            except Exception as exc:  # the payload is whole; only the row may lag
                logger.warning(f"shm object {key!r}: row not updated after finishing a store ({exc!r}); reconcile() will")
        return meta

    # --- publish and rows -------------------------------------------------------------

    def _publish(
        self, key: str, prepared: tuple, meta: Optional[dict], num_bytes: int, count: int, ids: dict, object_type: str
    ) -> tuple[dict, Optional[Path]]:
        """Make a prepared payload the key's (lock held): registry entries, rename, old file gone."""
        location = prepared[0]
        path: Optional[Path] = None
        if location == SHMLocation.SHM:
            packed, views = prepared[1], prepared[2]
            new_meta = self._new_meta(_new_gen(), location, None, num_bytes, count, ids, object_type)
            # one registry update: payload and metadata change together
            self._call("update", self._registry.update, {key: packed, META_PREFIX + key: new_meta})
            with self._local:
                self._cache[key] = _Cached(new_meta["gen"], packed.treedef, _signature(views), views, packed.storage)
        else:
            temp, final, path, ours = prepared[1], prepared[2], prepared[3], prepared[4]
            if path == final and not ours and (meta or {}).get("path") != str(final) and final.exists():
                path = _sibling_path(key, final)  # claimed since our check by a store not yet in the database
            os.replace(temp, path)
            new_meta = self._new_meta(_new_gen(), location, path, num_bytes, count, ids, object_type)
            try:
                # metadata first: a reader between the two calls loads the new file
                self._call("set", self._registry.__setitem__, META_PREFIX + key, new_meta)
                self._call("pop", self._registry.pop, key, None)
            except BaseException:
                _unlink_quiet(path)
                raise
            self._drop_cache(key)
        old_path = (meta or {}).get("path")
        if old_path and old_path != new_meta["path"]:
            _unlink_quiet(old_path)  # under the lock: a later store may reuse the name
        return new_meta, path

    def _finish(self, key: str, meta: dict, *, old_meta: Optional[dict], new_path: Optional[Path]) -> "SHMObjectRecord":
        """After a publish, lock released: the row; if it cannot be written, the publish is undone."""
        try:
            record = self._write_row(key, meta)
        except BaseException:
            self._rollback(key, meta, old_meta, new_path)
            raise
        self._follow(key, meta)
        return record

    def _write_row(self, key: str, meta: dict) -> "SHMObjectRecord":
        if self.db is None:
            return _record_from_meta(key, meta)
        return self.db.upsert_shm_object(
            key,
            object_type=meta.get("object_type") or SHMObjectType.CHECKPOINT.value,
            location=meta["location"],
            disk_path=meta.get("path"),
            num_bytes=int(meta.get("num_bytes") or 0),
            tensor_count=int(meta.get("tensor_count") or 0),
            experiment_id=meta.get("experiment_id"),
            run_id=meta.get("run_id"),
            chunk_id=meta.get("chunk_id"),
            manager_name=meta.get("manager_name") or self.name,
        )

    def _follow(self, key: str, written: Optional[dict]) -> None:
        """Make the row agree with the registry after a row write made without the lock.

        Rows are written after the lock is released, so two stores of one key may
        write their rows in the other order.  Whoever wrote a row checks the
        registry afterwards and rewrites the row from what it finds until the two
        agree; the last row written is then always the registry's current entry.
        """
        if self.db is None:
            return
        for _ in range(16):
            try:
                current = self._meta(key)
            except SHMRegistryUnavailableError:
                return
            if _same_publication(current, written):
                return
            if current is not None and current.get("redo") is not None:
                return  # mid-store: that writer (or whoever finishes its copy) writes the row
            written = current
            try:
                if current is None:
                    self.db.delete_shm_objects([key])
                else:
                    self._write_row(key, current)
            except Exception as exc:
                logger.warning(f"shm object {key!r}: row not brought in line with the registry ({exc!r}); reconcile() will")
                return

    def _rollback(self, key: str, written: dict, old_meta: Optional[dict], new_path: Optional[Path]) -> None:
        """After a failed row write: remove the payload we published (and any old file) and the row."""
        self._drop_cache(key)
        ours = False
        try:
            with self._locked():
                ours = _same_publication(self._meta(key), written)
                if ours:  # not replaced by a newer store meanwhile: remove it
                    self._call("pop", self._registry.pop, META_PREFIX + key, None)
                    self._call("pop", self._registry.pop, key, None)
                    _unlink_quiet(new_path)
                    if old_meta and old_meta.get("path"):
                        _unlink_quiet(old_meta["path"])
        except (SHMLockTimeoutError, SHMRegistryUnavailableError) as exc:
            logger.warning(f"shm object {key!r}: payload not removed after a failed store ({exc!r}); reconcile() will")
            _unlink_quiet(new_path)
        if ours and self.db is not None:
            try:
                self.db.delete_shm_objects([key])
                self._follow(key, None)
            except Exception as exc:
                logger.warning(f"shm object {key!r}: row not removed after a failed store ({exc!r}); reconcile() will")

    def _new_meta(
        self, gen: int, location: SHMLocation, path: Optional[Path], num_bytes: int, count: int, ids: dict, object_type: str
    ) -> dict:
        return {
            "gen": gen,
            "location": location.value,
            "path": None if path is None else str(path),
            "num_bytes": num_bytes,
            "tensor_count": count,
            "experiment_id": ids.get("experiment_id"),
            "run_id": ids.get("run_id"),
            "chunk_id": ids.get("chunk_id"),
            "object_type": object_type,
            "manager_name": self.name,
            "stored_at": time.time(),
            "token": _new_gen(),  # tells one publication from the next (in-place stores keep gen)
        }

    def _check_usage(self) -> None:
        free = _fs_free(SHM_DIR)
        if free is None or free[1] == 0:
            return
        used = 1.0 - free[0] / free[1]
        if used > SHM_WARN_FRACTION:
            if not self._warned_full:
                self._warned_full = True
                logger.warning(
                    f"/dev/shm is {used:.0%} full ({free[0]} of {free[1]} bytes free); shared-memory manager "
                    f"{self.name!r} will spill objects to disk below min_free_bytes={self.min_free_bytes}"
                )
        else:
            self._warned_full = False

    # --- disk paths -------------------------------------------------------------------

    def _spill_dir(self) -> Path:
        from rapidfire_state.datapaths import DataPath

        base = DataPath.experiment_path() if DataPath.is_initialized() else rf_home()
        return base / "shm_spill" / _safe_component(self.name, 128)

    def _disk_path(self, key: str, run_id: Optional[int], chunk_id: Optional[int], object_type: str) -> Path:
        from rapidfire_state.datapaths import DataPath

        if run_id is not None and chunk_id is not None and DataPath.is_initialized():
            path = DataPath.checkpoint_path(run_id, chunk_id)
            if object_type != SHMObjectType.CHECKPOINT.value:
                path = path.with_name(f"{object_type.lower()}_chunk_{chunk_id}.pt")
            return path
        return self._spill_dir() / _key_file_name(key)

    def _claim_path(self, key: str, final: Path) -> tuple[Path, bool]:
        """``(path, ours)``: ``final``, or a key-specific sibling when another key's row owns
        ``final``; ``ours`` when this key's own row already names the path.  A database read,
        made before the lock; :meth:`_publish` checks the file again under it."""
        if self.db is None:
            return final, False
        from rapidfire_state.db.models import SHMObject
        from sqlalchemy import select

        table = SHMObject.__table__
        with self.db.session() as session:
            owners = session.execute(
                select(table.c.key).where(table.c.disk_path == str(final)).limit(2)
            ).scalars().all()
        if any(owner != key for owner in owners):
            return _sibling_path(key, final), False
        return final, key in owners

    # --- load / exists / delete -------------------------------------------------------

    def load(self, key: str) -> Any:
        """The object stored under ``key``.

        Shared memory: the stored structure whose tensors are zero-copy views of
        the shared storage (writes through them are seen by every process).
        Disk: ``torch.load(path, weights_only=True)`` — private CPU tensors.
        A key written raw into the registry is returned as the registry has it.
        ``nn.Module`` values come back as their state dict.  The views are not a
        snapshot: another process's in-place store changes them; to copy out a
        consistent snapshot while others may store, hold the registry lock
        (``get_shm_objects()[1]``) while copying.

        Raises:
            SHMKeyError: nothing is stored under ``key`` (also a KeyError).
            SHMRegistryUnavailableError: the registry is gone and the database has
                no disk copy of ``key``.
        """
        self._check_open()
        self._check_key(key)
        try:
            meta = self._meta(key)
        except SHMRegistryUnavailableError:
            row = self._row(key)
            if row is not None and row.location == SHMLocation.DISK:
                return self._load_file(key, row.disk_path)
            raise
        if meta is not None and meta.get("redo") is not None:
            meta = self._settle(key)  # an in-place store is under way, or its writer died mid-copy
        if meta is not None:
            if meta.get("location") == SHMLocation.DISK.value:
                return self._load_file(key, meta["path"])
            with self._local:
                cached = self._cache.get(key)
            if cached is None or cached.gen != meta.get("gen"):
                # No lock needed: writers set the payload before its metadata, so the
                # payload read after `meta` is at least as new as meta's generation;
                # labelled with that generation, a newer payload only costs a refetch.
                payload = self._fetch(key)
                if payload is None:  # deleted or moved to disk meanwhile
                    return self._load_uncached(key)
                cached = self._cache_from_payload(key, payload, meta.get("gen"))
            return _unflatten(cached.treedef, cached.tensors)
        return self._load_uncached(key)

    def _load_uncached(self, key: str) -> Any:
        meta = self._meta(key)
        if meta is not None and meta.get("location") == SHMLocation.DISK.value:
            return self._load_file(key, meta["path"])
        payload = self._fetch(key)
        if payload is not None:
            return payload.unpack() if isinstance(payload, _Packed) else payload
        row = self._row(key)
        if row is not None and row.location == SHMLocation.DISK:
            return self._load_file(key, row.disk_path)
        raise SHMKeyError(key)

    def _row(self, key: str) -> Optional["SHMObjectRecord"]:
        return None if self.db is None else self.db.get_shm_object(key)

    @staticmethod
    def _load_file(key: str, path: Optional[str]) -> Any:
        import torch

        if not path or not os.path.exists(path):
            raise SHMKeyError(key, f"its disk copy {path!r} is missing (run reconcile())")
        return torch.load(path, weights_only=True, map_location="cpu")

    def exists(self, key: str) -> bool:
        """Whether :meth:`load` would find ``key`` (without reading the payload)."""
        self._check_open()
        self._check_key(key)
        try:
            meta = self._meta(key)
            if meta is not None:
                if meta.get("location") == SHMLocation.DISK.value:
                    return bool(meta.get("path")) and os.path.exists(meta["path"])
                return bool(self._call("contains", self._registry.__contains__, key))
            if self._call("contains", self._registry.__contains__, key):
                return True
        except SHMRegistryUnavailableError:
            pass
        row = self._row(key)
        return bool(row is not None and row.location == SHMLocation.DISK and row.disk_path and os.path.exists(row.disk_path))

    def delete(self, key: str) -> bool:
        """Remove ``key``'s payload (registry entry or disk file) and its row.

        Returns whether anything was removed.  Works on the database and disk side
        when the registry is gone.
        """
        self._check_open()
        self._check_key(key)
        self._drop_cache(key)
        meta = payload = None
        alive = True
        try:
            with self._locked():
                # payload first: a delete killed between the two leaves the metadata — with
                # its redo marker, if a dead writer left one — never a half-copied payload
                # without the marker that says so
                payload = self._call("pop", self._registry.pop, key, None)
                meta = self._call("pop", self._registry.pop, META_PREFIX + key, None)
                if meta and meta.get("path"):
                    _unlink_quiet(meta["path"])
        except SHMRegistryUnavailableError:
            if self._registry_answers():
                raise  # the lock file is gone, not the registry: the payload cannot be removed safely
            alive = False
        self._drop_cache(key)
        removed_rows = self.db.delete_shm_objects([key]) if self.db is not None else []  # not under the lock
        current = None
        if alive:
            try:
                current = self._meta(key)  # stored again since we let go of the lock?
            except SHMRegistryUnavailableError:
                pass
        for row in removed_rows:
            if row.disk_path and row.disk_path != (current or {}).get("path"):
                _unlink_quiet(row.disk_path)
        if current is not None:
            self._follow(key, None)
        return bool(removed_rows or meta is not None or payload is not None)

    # --- listing ----------------------------------------------------------------------

    def list_objects(self) -> list["SHMObjectRecord"]:
        """The metadata of this manager's objects: its database rows, or without a
        database, records built from the registry entries (``shm_object_id`` 0)."""
        self._check_open()
        if self.db is not None:
            return self.db.list_shm_objects(manager_name=self.name)
        records = []
        for registry_key in self._call("keys", self._registry.keys):
            if isinstance(registry_key, str) and registry_key.startswith(META_PREFIX):
                meta = self._call("get", self._registry.get, registry_key)
                if isinstance(meta, dict) and meta.get("manager_name") == self.name:
                    records.append(_record_from_meta(registry_key[len(META_PREFIX):], meta))
        return sorted(records, key=lambda r: r.created_at)

    # --- warm start -------------------------------------------------------------------

    def create_warm_start(self, from_key: str, to_key: str, *, run_id: Optional[int] = None) -> "SHMObjectRecord":
        """Store a copy of ``from_key`` under ``to_key`` for a clone-modify run.

        The copy has its own shared storage (never aliases the parent), its own row
        with ``run_id`` (the child run), the parent's experiment, chunk and type.
        """
        self._check_open()
        if self._check_key(from_key) == self._check_key(to_key):
            raise ConfigError(f"create_warm_start needs two different keys, got {from_key!r} twice")
        meta = None
        try:
            meta = self._meta(from_key)
        except SHMRegistryUnavailableError:
            pass
        source = meta or {}
        row = self._row(from_key)
        if row is not None and not meta:
            source = {"experiment_id": row.experiment_id, "chunk_id": row.chunk_id, "object_type": row.object_type.value}
        value = self.load(from_key)
        return self.store(
            to_key,
            value,
            experiment_id=source.get("experiment_id"),
            run_id=run_id,
            chunk_id=source.get("chunk_id"),
            object_type=source.get("object_type") or SHMObjectType.CHECKPOINT,
        )

    # --- cleanup hook -----------------------------------------------------------------

    def _drop_payloads(self, records: Sequence["SHMObjectRecord"]) -> None:
        """Cleanup hook: drop the payloads of rows an experiment cleanup removed."""
        mine = [r for r in records if r.manager_name == self.name]
        if not mine or self._closed:
            return
        try:
            with self._locked():
                for row in mine:
                    meta = self._call("get", self._registry.get, META_PREFIX + row.key)
                    if meta is not None and meta.get("experiment_id") not in (None, row.experiment_id):
                        continue  # re-stored for another experiment since
                    self._call("pop", self._registry.pop, META_PREFIX + row.key, None)
                    self._call("pop", self._registry.pop, row.key, None)
                    if meta and meta.get("path"):
                        _unlink_quiet(meta["path"])
        except SHMRegistryUnavailableError:
            pass
        for row in mine:
            self._drop_cache(row.key)
            if row.location == SHMLocation.DISK:
                _unlink_quiet(row.disk_path)

    # --- reconcile --------------------------------------------------------------------

    def reconcile(self) -> ReconcileReport:
        """Bring rows and payloads back in line after a crash; returns what it did.

        * in-place stores a dead writer left half copied are finished from their
          journal;
        * SHM rows of this manager whose registry payload is gone are removed
          (all of them when the Manager process is gone);
        * DISK rows whose file is missing are removed and listed in
          ``missing_files`` (and ``removed``);
        * registry keys without any row — written straight into the registry, or
          stored by a process that died before its row — are adopted: a row is
          created (ids from the registry metadata when there is one), never dropped;
        * rows whose location, size or ids disagree with the registry are rewritten;
        * temp files of interrupted disk writes whose writer is dead are deleted.

        The registry is repaired under the lock, the rows after it is released.
        Without a database only the registry side is repaired.
        """
        self._check_open()
        all_rows = self.db.list_shm_objects() if self.db is not None else []
        mine = [r for r in all_rows if r.manager_name == self.name]
        rows_by_key = {r.key: r for r in all_rows}
        try:
            with self._locked():
                scan = self._reconcile_registry(mine, rows_by_key)
        except SHMRegistryUnavailableError:
            if self._registry_answers():
                raise  # the lock file is gone, not the registry: dropping its rows would lose live payloads
            scan = None
            self._drop_cache(*list(self._cache))
        return self._reconcile_rows(mine, rows_by_key, scan)

    def _reconcile_registry(self, mine: list, rows_by_key: dict) -> dict:
        """The registry half of :meth:`reconcile` (lock held): repairs entries, returns what it saw."""
        payload_keys: set[str] = set()
        metas: dict[str, dict] = {}
        skipped: list[str] = []
        removed: list[str] = []
        missing: list[str] = []
        for registry_key in self._call("keys", self._registry.keys):
            if not isinstance(registry_key, str) or not registry_key or len(registry_key) > _MAX_KEY_LENGTH:
                skipped.append(repr(registry_key))  # cannot have a row; left alone
            elif registry_key.startswith(META_PREFIX):
                meta = self._call("get", self._registry.get, registry_key)
                if isinstance(meta, dict):
                    metas[registry_key[len(META_PREFIX):]] = meta
            else:
                payload_keys.add(registry_key)
        for key, meta in list(metas.items()):
            if meta.get("redo") is not None:
                fixed = self._redo(key, meta)
                if fixed is None:
                    del metas[key]
                else:
                    metas[key] = fixed
        # journals of writers that died outside a copy (no marker names them)
        journals = _sweep_journals(self._journal_tag)
        # registry-internal: metadata whose payload is gone; payloads a disk move left behind
        for key, meta in list(metas.items()):
            on_disk = meta.get("location") == SHMLocation.DISK.value
            gone = (not (meta.get("path") and os.path.exists(meta["path"]))) if on_disk else key not in payload_keys
            if gone:
                self._call("pop", self._registry.pop, META_PREFIX + key, None)
                del metas[key]
                self._drop_cache(key)
                if self.db is None:
                    removed.append(key)
                    if on_disk:
                        missing.append(key)
            elif on_disk and key in payload_keys:
                self._call("pop", self._registry.pop, key, None)
                payload_keys.discard(key)
        # metadata for rows and raw payloads that have none (the rows were read before the lock)
        drop_rows: set[str] = set()
        for row in mine:
            if row.location == SHMLocation.SHM:
                present = row.key in payload_keys
            else:
                present = bool(row.disk_path) and os.path.exists(row.disk_path)
            if row.key in metas or not present:
                continue
            meta = self._adopt_meta(row.key, row)
            if meta is None:
                drop_rows.add(row.key)
            else:
                metas[row.key] = meta
        unrowed: list[tuple[str, dict, bool]] = []
        for key in sorted(payload_keys | set(metas)):
            if key in rows_by_key:
                continue
            had_meta = key in metas
            meta = metas.get(key) or self._adopt_meta(key, None)
            if meta is not None:
                metas[key] = meta
                unrowed.append((key, meta, had_meta))
        return {
            "payload_keys": payload_keys, "metas": metas, "skipped": skipped, "removed": removed,
            "missing": missing, "drop_rows": drop_rows, "unrowed": unrowed, "journals": journals,
        }

    def _reconcile_rows(self, mine: list, rows_by_key: dict, scan: Optional[dict]) -> ReconcileReport:
        """The database half of :meth:`reconcile`, without the lock (``scan`` None: registry gone)."""
        alive = scan is not None
        metas: dict = scan["metas"] if alive else {}
        removed: list[str] = list(scan["removed"]) if alive else []
        missing: list[str] = list(scan["missing"]) if alive else []
        adopted: list[str] = []
        repaired: list[str] = []
        ok = 0
        if self.db is not None:
            to_remove: list[str] = []
            for row in mine:
                meta = metas.get(row.key)
                if row.location == SHMLocation.SHM:
                    present = alive and row.key in scan["payload_keys"] and row.key not in scan["drop_rows"]
                else:
                    present = bool(row.disk_path) and os.path.exists(row.disk_path)
                if meta is not None and meta.get("location") != row.location.value:
                    present = True  # the registry moved it; the row is repaired below
                if not present:
                    to_remove.append(row.key)
                    if row.location == SHMLocation.DISK:
                        missing.append(row.key)
                    continue
                if not alive or meta is None:
                    ok += 1
                    continue
                if _row_disagrees(row, meta):
                    self._write_row(row.key, meta)
                    self._follow(row.key, meta)
                    repaired.append(row.key)
                else:
                    ok += 1
            if to_remove:
                self.db.delete_shm_objects(to_remove)
                self._drop_cache(*to_remove)
                removed.extend(to_remove)
                if alive:
                    for key in to_remove:
                        self._follow(key, None)  # stored again since the scan?
        if alive:
            for key, meta, had_meta in scan["unrowed"]:
                if self.db is not None:
                    self._write_row(key, meta)
                    self._follow(key, meta)
                    adopted.append(key)
                elif not had_meta:
                    adopted.append(key)
                else:
                    ok += 1
        temps = self._sweep_temp_files(metas, rows_by_key) + (list(scan["journals"]) if alive else [])
        return ReconcileReport(
            removed=tuple(removed),
            missing_files=tuple(missing),
            adopted=tuple(adopted),
            repaired=tuple(repaired),
            ok=ok,
            registry_alive=alive,
            removed_temp_files=tuple(temps),
            skipped=tuple(scan["skipped"]) if alive else (),
        )

    def _adopt_meta(self, key: str, row: Any) -> Optional[dict]:
        """Create the registry metadata of ``key`` from its payload (and row, if any)."""
        if row is not None and row.location == SHMLocation.DISK:
            gen, location, path, num_bytes, count = _new_gen(), SHMLocation.DISK, Path(row.disk_path), row.num_bytes, row.tensor_count
        else:
            payload = self._fetch(key)
            if payload is None:
                return None
            entry = self._cache_from_payload(key, payload, _new_gen())
            gen, location, path = entry.gen, SHMLocation.SHM, None
            num_bytes, count = sum(_nbytes(t) for t in entry.tensors), len(entry.tensors)
        ids = {}
        if row is not None:
            ids = {"experiment_id": row.experiment_id, "run_id": row.run_id, "chunk_id": row.chunk_id}
        object_type = row.object_type.value if row is not None else SHMObjectType.CHECKPOINT.value
        meta = self._new_meta(gen, location, path, num_bytes, count, ids, object_type)
        if row is not None and row.manager_name:
            meta["manager_name"] = row.manager_name
        self._call("set", self._registry.__setitem__, META_PREFIX + key, meta)
        return meta

    def _sweep_temp_files(self, metas: dict, rows_by_key: dict) -> list[str]:
        directories = {self._spill_dir()}
        for meta in metas.values():
            if meta.get("path"):
                directories.add(Path(meta["path"]).parent)
        for row in rows_by_key.values():
            if row.disk_path and row.manager_name == self.name:
                directories.add(Path(row.disk_path).parent)
        removed = []
        for directory in directories:
            try:
                names = os.listdir(directory)
            except OSError:
                continue
            for name in names:
                match = _TEMP_RE.match(name)
                if match and not _pid_alive(int(match.group(1))):
                    if _unlink_quiet(directory / name):
                        removed.append(str(directory / name))
        return sorted(removed)


# --- helpers ------------------------------------------------------------------------------


def _new_gen() -> int:
    return int.from_bytes(os.urandom(8), "big") >> 1


def _same_publication(a: Optional[dict], b: Optional[dict]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.get("token") == b.get("token")


def _row_disagrees(row: Any, meta: dict) -> bool:
    return (
        meta.get("location") != row.location.value
        or meta.get("path") != row.disk_path
        or meta.get("num_bytes") != row.num_bytes
        or meta.get("tensor_count") != row.tensor_count
        or meta.get("experiment_id") != row.experiment_id
        or meta.get("run_id") != row.run_id
        or meta.get("chunk_id") != row.chunk_id
        or (meta.get("object_type") or SHMObjectType.CHECKPOINT.value) != row.object_type.value
    )


def _sibling_path(key: str, final: Path) -> Path:
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]
    return final.with_name(f"{final.stem}-{digest}{final.suffix}")


def _coerce_type(object_type: Any) -> str:
    if isinstance(object_type, SHMObjectType):
        return object_type.value
    if isinstance(object_type, str):
        try:
            return SHMObjectType(object_type).value
        except ValueError:
            pass
    allowed = ", ".join(t.value for t in SHMObjectType)
    raise ConfigError(f"object_type {object_type!r} is not a SHMObjectType; allowed: {allowed}")


def _disk_tensor(tensor: Any) -> Any:
    cpu = _to_cpu(tensor.detach())
    if cpu.untyped_storage().nbytes() != _nbytes(cpu) or not cpu.is_contiguous():
        cpu = cpu.contiguous().clone()  # don't write the rest of a larger (e.g. shared) storage
    return cpu


def _record_from_meta(key: str, meta: dict) -> "SHMObjectRecord":
    from datetime import datetime, timezone

    from rapidfire_state.db.records import SHMObjectRecord

    when = datetime.fromtimestamp(meta.get("stored_at") or 0.0, tz=timezone.utc)
    return SHMObjectRecord(
        shm_object_id=0,
        key=key,
        experiment_id=meta.get("experiment_id"),
        run_id=meta.get("run_id"),
        chunk_id=meta.get("chunk_id"),
        object_type=SHMObjectType(meta.get("object_type") or SHMObjectType.CHECKPOINT.value),
        location=SHMLocation(meta["location"]),
        disk_path=meta.get("path"),
        num_bytes=int(meta.get("num_bytes") or 0),
        tensor_count=int(meta.get("tensor_count") or 0),
        manager_name=meta.get("manager_name"),
        created_at=when,
        updated_at=when,
    )


__all__ = [
    "SharedMemoryManager",
    "ReconcileReport",
    "SHMKeyError",
    "SHMRegistryUnavailableError",
    "SHMLockTimeoutError",
    "SHMLock",
    "manager_initializer",
    "start_registry_manager",
    "atomic_torch_save",
    "SHM_DIR",
    "SHM_WARN_FRACTION",
    "DEFAULT_MIN_FREE_BYTES",
    "META_PREFIX",
]
