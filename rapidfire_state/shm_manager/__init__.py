"""Model weights in shared memory, their metadata in the state database.

:class:`SharedMemoryManager` keeps tensors (a tensor, a state dict, or an
``nn.Module``'s state dict) in CPU shared memory, reachable by every process
through a ``multiprocessing.Manager`` dict (the *registry*) guarded by an
:class:`SHMLock`; one ``shm_objects`` row per object says where it is, how big it
is and whose it is.  Payloads never enter the database.  Objects too large, or
when ``/dev/shm`` is short, go to disk and their row says so; :meth:`~SharedMemoryManager.reconcile`
repairs rows and payloads that disagree after a crash.  The README's
shared-memory section describes the guarantees (locks, crashes, copies, files).

How the parts fit:

* :mod:`.registry` — the Manager process (:func:`start_registry_manager`,
  :func:`manager_initializer`) and a manager's calls on the registry dict;
* :mod:`.lock` — :class:`SHMLock`, released by the OS when its holder dies;
* :mod:`.metadata` — :class:`~.metadata.ObjectMeta`, the one typed record of an
  object's metadata (registry entry and row);
* :mod:`.packing` — a value's structure and tensors in one shared storage, and
  the process's cache of views;
* :mod:`.copies` — allocation in ``/dev/shm``, the parallel copy, journal files;
* :mod:`.in_place` — crash-safe in-place stores (journal, redo marker, redo);
* :mod:`.files` — disk files: spill paths, atomic writes, temp files;
* :mod:`.rows` — the ``shm_objects`` rows, written after the lock;
* :mod:`.reconcile` — repairs after a crash;
* :mod:`.manager` — :class:`SharedMemoryManager`, which ties them together.

Import cost: importing this package loads neither torch nor sqlalchemy (nor
mlflow).  Torch is imported when a manager is constructed (it sets the sharing
strategy before any tensor is pickled) or a Manager process is started; the
database layer only when a manager opens a database by URL or builds a record.
"""

from __future__ import annotations

from rapidfire_state.datapaths import fsync_directory
from rapidfire_state.shm_manager.copies import JOURNAL_PREFIX, SHM_DIR, copy_tensors
from rapidfire_state.shm_manager.errors import (
    SHMKeyError,
    SHMLockTimeoutError,
    SHMNotOnThisHostError,
    SHMRegistryUnavailableError,
)
from rapidfire_state.shm_manager.files import atomic_torch_save, host_component, write_temp
from rapidfire_state.shm_manager.lock import SHMLock
from rapidfire_state.shm_manager.packing import ALIGNMENT, to_cpu
from rapidfire_state.shm_manager.reconcile import ReconcileReport
from rapidfire_state.shm_manager.registry import META_PREFIX, manager_initializer, start_registry_manager
from rapidfire_state.shm_manager.manager import (
    DEFAULT_LOCK_TIMEOUT,
    DEFAULT_MIN_FREE_BYTES,
    SHM_WARN_FRACTION,
    SharedMemoryManager,
)

# The names this module offered before it became a package, for code that patches them here:
# the manager reads _copy_tensors, _write_temp, fsync_directory and SHM_WARN_FRACTION from
# this namespace at each use, so replacing them here takes effect.
_copy_tensors = copy_tensors
_write_temp = write_temp
_to_cpu = to_cpu
_lock_host = host_component

# Public names keep the module path they have always had (pickles, reprs, tracebacks).
for _public in (SharedMemoryManager, ReconcileReport, SHMKeyError, SHMNotOnThisHostError, SHMRegistryUnavailableError,
                SHMLockTimeoutError, SHMLock, manager_initializer, start_registry_manager, atomic_torch_save):
    _public.__module__ = __name__
del _public

__all__ = [
    "SharedMemoryManager",
    "ReconcileReport",
    "SHMKeyError",
    "SHMNotOnThisHostError",
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
