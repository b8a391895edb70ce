"""The registry: a ``multiprocessing.Manager`` dict shared by every process, and how a manager uses it.

The Manager process is started by :func:`start_registry_manager` (spawn context,
:func:`manager_initializer`).  Torch's ``file_system`` sharing strategy must hold
on both sides: in the client processes (:func:`use_file_system_strategy`, run by
every :class:`~rapidfire_state.shm_manager.SharedMemoryManager`) and in the
Manager (its initializer); otherwise the Manager copies every tensor it hands out
and holds one file descriptor per tensor.

:class:`RegistryClient` is one manager's access to the dict: every call turns a
dead Manager into :class:`SHMRegistryUnavailableError`, metadata entries are read
and written as :class:`~.metadata.ObjectMeta`, and :meth:`RegistryClient.locked`
takes the registry lock with the manager's timeout.
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from loguru import logger

from rapidfire_state.shm_manager.errors import SHMLockTimeoutError, SHMRegistryUnavailableError
from rapidfire_state.shm_manager.metadata import ObjectMeta, new_generation
from rapidfire_state.shm_manager.packing import in_registry_process, keep_packed_in_this_process, packed_fetch
from rapidfire_state.threads import start_background_thread

#: Prefix of the registry keys holding each object's metadata entry.
META_PREFIX = "__rf_shm_meta__/"
#: Longest key an object can have (``shm_objects.key``).
MAX_KEY_LENGTH = 512


# --- the Manager process ------------------------------------------------------------------


def manager_initializer(parent_pid: Optional[int] = None) -> None:
    """Initializer of a registry Manager process (``SyncManager.start(manager_initializer)``).

    Sets torch's ``file_system`` sharing strategy (without it the Manager copies
    every tensor it hands out and holds one fd per tensor), keeps packed objects
    packed, ignores SIGINT (a Ctrl-C in the terminal must not take the registry
    down before the controller has cleaned up), and, given ``parent_pid``, exits
    when that process is gone (an orphaned registry would pin ``/dev/shm``).
    """
    import torch.multiprocessing as torch_mp

    torch_mp.set_sharing_strategy("file_system")
    keep_packed_in_this_process()
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

        start_background_thread(watch, "rf-shm-parent-watch")


def start_registry_manager() -> Any:
    """Start a registry Manager (spawn context, :func:`manager_initializer`); returns it."""
    import multiprocessing
    from multiprocessing.managers import SyncManager

    use_file_system_strategy()
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(manager_initializer, (os.getpid(),))
    return manager


def use_file_system_strategy() -> None:
    """Set torch's ``file_system`` sharing strategy in this process (process-wide)."""
    import torch.multiprocessing as torch_mp

    if torch_mp.get_sharing_strategy() != "file_system":
        torch_mp.set_sharing_strategy("file_system")


class _Probe:
    """Sent once into a registry we did not start: tells how its Manager was initialized."""

    def __reduce__(self) -> tuple:
        return (_probe_value, ())


def _probe_value() -> tuple:
    import sys

    torch_mp = sys.modules.get("torch.multiprocessing")
    strategy = torch_mp.get_sharing_strategy() if torch_mp is not None else None
    return (in_registry_process(), strategy)


def warn_if_not_initialized(registry: Any, manager_name: str) -> None:
    """Warn when a registry we did not start runs without :func:`manager_initializer`."""
    probe_key = f"{META_PREFIX}\x00probe-{os.getpid()}-{new_generation()}"
    try:
        registry[probe_key] = _Probe()
        answer = registry.pop(probe_key, None)
    except (EOFError, OSError) as exc:
        # still usable for reconcile() and disk objects; registry calls will raise
        logger.warning(f"the shared-memory registry passed to {manager_name!r} is unreachable: {exc!r}")
        return
    if isinstance(answer, _Probe):
        return  # an in-process dict: nothing is pickled, nothing is copied
    initialized, strategy = answer if isinstance(answer, tuple) else (False, None)
    if not initialized or strategy != "file_system":
        logger.warning(
            f"the registry Manager given to shared-memory manager {manager_name!r} was not started with "
            "rapidfire_state.shm_manager.manager_initializer (sharing strategy there: "
            f"{strategy or 'torch not loaded'}): tensors it hands out may be copied instead of shared and "
            "hold one file descriptor each; start it with start_registry_manager()"
        )


# --- one manager's access -----------------------------------------------------------------


class RegistryClient:
    """A manager's calls on the registry dict ``proxy`` and its ``lock``.

    Methods are looked up on the proxy at each call (a process may wrap one).
    ``lock_timeout`` (seconds, None: forever) is read whenever the lock is taken.
    """

    def __init__(self, owner: str, proxy: Any, lock: Any, lock_timeout: Optional[float]):
        self.owner = owner
        self.proxy = proxy
        self.lock = lock
        self.lock_timeout = lock_timeout

    def call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except (EOFError, OSError) as exc:
            raise SHMRegistryUnavailableError(
                f"the shared-memory registry of {self.owner!r} is unreachable ({what}: {exc!r}); its Manager "
                "process has probably exited — run reconcile() to bring the database in line"
            ) from exc

    def answers(self) -> bool:
        """Whether the Manager process still answers."""
        try:
            len(self.proxy)
            return True
        except (EOFError, OSError):
            return False

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the registry lock; :class:`SHMLockTimeoutError` after ``lock_timeout`` seconds."""
        if self.lock_timeout is None:
            acquired = self.call("lock", self.lock.acquire)
        else:
            acquired = self.call("lock", self.lock.acquire, True, self.lock_timeout)
        if not acquired:
            raise SHMLockTimeoutError(
                f"the shared-memory registry lock of {self.owner!r} was not acquired within {self.lock_timeout} s: "
                "a live process holds it (an SHMLock is released when its holder dies; a multiprocessing "
                "Manager lock passed in is not)"
            )
        try:
            yield
        finally:
            try:
                self.lock.release()
            except (EOFError, OSError):  # the Manager died meanwhile; nothing to release
                pass

    # --- metadata entries -------------------------------------------------------------

    def meta(self, key: str) -> Optional[ObjectMeta]:
        """``key``'s metadata entry, or None."""
        return self.meta_at(META_PREFIX + key)

    def meta_at(self, registry_key: str) -> Optional[ObjectMeta]:
        """The metadata entry stored under the registry key ``registry_key`` (``META_PREFIX + key``), or None."""
        return ObjectMeta.from_registry(self.call("get", self.proxy.get, registry_key))

    def set_meta(self, key: str, meta: ObjectMeta) -> None:
        self.call("set", self.proxy.__setitem__, META_PREFIX + key, meta.to_registry())

    def pop_meta(self, key: str) -> Optional[ObjectMeta]:
        return ObjectMeta.from_registry(self.call("pop", self.proxy.pop, META_PREFIX + key, None))

    def metas(self, manager_name: Optional[str] = None) -> dict[str, ObjectMeta]:
        """Every metadata entry by key (of ``manager_name`` only, when given)."""
        found = {}
        for registry_key in self.call("keys", self.proxy.keys):
            if isinstance(registry_key, str) and registry_key.startswith(META_PREFIX):
                meta = self.meta_at(registry_key)
                if meta is not None and (manager_name is None or meta.manager_name == manager_name):
                    found[registry_key[len(META_PREFIX):]] = meta
        return found

    # --- payloads ---------------------------------------------------------------------

    def fetch(self, key: str) -> Any:
        """``key``'s payload as the registry holds it (a :class:`~.packing.Packed` stays packed), or None."""
        with packed_fetch():
            return self.call("get", self.proxy.get, key)

    def pop(self, key: str) -> Any:
        return self.call("pop", self.proxy.pop, key, None)

    def contains(self, key: str) -> bool:
        return bool(self.call("contains", self.proxy.__contains__, key))

    def keys(self) -> list:
        return self.call("keys", self.proxy.keys)

    def publish(self, key: str, meta: ObjectMeta, payload: Any = None) -> None:
        """Set ``key``'s payload and metadata in one registry update (``payload`` None: the metadata only)."""
        update = {} if payload is None else {key: payload}
        update[META_PREFIX + key] = meta.to_registry()
        self.call("update", self.proxy.update, update)
