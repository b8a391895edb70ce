"""Copies into shared memory: allocation in /dev/shm, the parallel memmove, and the journal files.

* :func:`allocate_shared` makes an object's one shared storage, its pages reserved
  so that a full /dev/shm fails cleanly (:class:`NoSharedMemory`) instead of with
  SIGBUS in the middle of a copy.
* :func:`copy_tensors` copies an object's tensors in one parallel section.
* :class:`Journal` is a writer's scratch file in /dev/shm, the redo journal of
  in-place stores (:mod:`.in_place`); :class:`JournalSlot` keeps a manager's
  journal for its next in-place store.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import threading
from typing import Any, Optional, Sequence

from rapidfire_state.shm_manager.errors import NoSharedMemory
from rapidfire_state.shm_manager.files import fs_free, host_component, pid_alive, unlink_quiet
from rapidfire_state.shm_manager.packing import tensor_nbytes

#: Where POSIX shared memory (torch's ``file_system`` storages) lives.
SHM_DIR = "/dev/shm"


# --- room and allocation ------------------------------------------------------------------


def shm_shortfall(storage_bytes: int, min_free_bytes: int) -> Optional[str]:
    """Why ``storage_bytes`` more of /dev/shm would leave less than ``min_free_bytes`` free (None: they fit)."""
    free = fs_free(SHM_DIR)
    if free is not None and free[0] - storage_bytes < min_free_bytes:
        return f"/dev/shm has {free[0]} bytes free and min_free_bytes={min_free_bytes}"
    return None


def allocate_shared(storage_bytes: int) -> Any:
    """A new shared ``UntypedStorage`` of ``storage_bytes``, pages reserved; raises :class:`NoSharedMemory`."""
    import torch

    try:
        storage = torch.UntypedStorage._new_shared(storage_bytes)
    except RuntimeError as exc:
        raise NoSharedMemory(f"shared-memory allocation of {storage_bytes} bytes failed: {exc}") from exc
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
                raise NoSharedMemory(f"/dev/shm cannot hold {storage_bytes} more bytes ({exc})") from exc
        finally:
            os.close(fd)
    return storage


# --- the copy -------------------------------------------------------------------------------

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


def copy_tensors(dsts: Sequence[Any], srcs: Sequence[Any]) -> None:
    """``dst.copy_(src)`` for each pair, with one parallel section for the whole object.

    A loop of ``copy_`` calls runs one OpenMP parallel region per tensor; on a busy
    machine each region waits for its slowest thread, and a few hundred regions are
    several times slower than one ``copy_`` of the same bytes.  Plain CPU pairs (same dtype,
    contiguous, no lazy conj/neg bit) are copied here instead as 8 MiB ``memmove``
    pieces pulled by ``torch.get_num_threads()`` threads (ctypes releases the GIL);
    everything else (CUDA sources, dtype or stride changes) goes through ``copy_``.
    """
    import ctypes

    import torch

    pieces: list[tuple[int, int, int]] = []
    total = 0
    for dst, src in zip(dsts, srcs):
        nbytes = tensor_nbytes(dst)
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


# --- journals ---------------------------------------------------------------------------------


#: Journal files of in-place stores: ``/dev/shm/<prefix><tag>.<host>.<pid>.<random>``.
JOURNAL_PREFIX = "rf-shm-journal."
_JOURNAL_RE = re.compile(r"^rf-shm-journal\.(?P<tag>[0-9a-f]{12})\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[0-9a-f]{12}$")


def journal_tag(identity: str) -> str:
    """The journal files of one registry share this tag (a hash of its lock file, or its name)."""
    return hashlib.sha256(identity.encode("utf-8", "surrogateescape")).hexdigest()[:12]


class Journal:
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
    def create(cls, tag: str, nbytes: int) -> "Journal":
        """A new journal of ``nbytes`` (pages reserved); raises :class:`NoSharedMemory`."""
        while True:
            path = os.path.join(SHM_DIR, f"{JOURNAL_PREFIX}{tag}.{host_component()}.{os.getpid()}.{os.urandom(6).hex()}")
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:  # pragma: no cover - 48 random bits
                continue
            except OSError as exc:
                raise NoSharedMemory(f"cannot create a journal in {SHM_DIR}: {exc}") from exc
            break
        try:
            try:
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as exc:
                raise NoSharedMemory(f"/dev/shm cannot hold a {nbytes}-byte journal ({exc})") from exc
            storage = map_file(fd, nbytes)
        except BaseException:
            unlink_quiet(path)
            raise
        finally:
            os.close(fd)
        return cls(path, nbytes, storage, owned=True)

    @classmethod
    def open(cls, path: str, nbytes: int) -> Optional["Journal"]:
        """Another process's journal, mapped (never created); None when it is gone."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            if os.fstat(fd).st_size < nbytes:
                return None
            return cls(path, nbytes, map_file(fd, nbytes), owned=False)
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


def map_file(fd: int, nbytes: int) -> Any:
    import mmap

    import torch

    if nbytes == 0:
        return torch.UntypedStorage(0)
    # frombuffer keeps the mmap object alive as long as the storage lives
    return torch.frombuffer(mmap.mmap(fd, nbytes), dtype=torch.uint8).untyped_storage()


def _unlink_own_journal(path: str, pid: int) -> None:
    if os.getpid() == pid:  # never from a forked child's copy
        unlink_quiet(path)


def sweep_journals(tag: str, keep: "set[str] | frozenset[str]" = frozenset()) -> list[str]:
    """Remove this host's journals of registry ``tag`` whose writer is dead (except ``keep``)."""
    host = host_component()
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
        if path in keep or pid_alive(int(match.group("pid"))):
            continue
        if unlink_quiet(path):
            removed.append(path)
    return removed


class JournalSlot:
    """The one journal a manager keeps for its next in-place store (the largest one it made).

    :meth:`take` hands it out (or a new one), :meth:`give` puts it back; the
    smaller of two, and the kept one once :meth:`close` has run, are unlinked.
    """

    def __init__(self, tag: str):
        self.tag = tag
        self._journal: Optional[Journal] = None
        self._closed = False
        self._journal_lock = threading.Lock()  # guards _journal and _closed

    def take(self, storage_bytes: int, min_free_bytes: int) -> Optional[Journal]:
        """A journal of at least ``storage_bytes``, or None when /dev/shm is short."""
        with self._journal_lock:
            journal = self._journal
            if journal is not None and journal.pid != os.getpid():
                self._journal = journal = None  # forked: that mapping is the parent's journal
            if journal is not None and journal.nbytes >= storage_bytes:
                self._journal = None
                return journal
        if shm_shortfall(storage_bytes, min_free_bytes) is not None:
            return None
        try:
            return Journal.create(self.tag, storage_bytes)
        except NoSharedMemory:
            return None

    def give(self, journal: Journal) -> None:
        """Keep ``journal`` for the next in-place store if it is the larger one."""
        spare: Optional[Journal] = journal
        with self._journal_lock:
            if not self._closed and (self._journal is None or self._journal.nbytes < journal.nbytes):
                spare, self._journal = self._journal, journal
        if spare is not None:
            spare.discard()  # the smaller one, or all of it after close()

    def close(self) -> None:
        """Unlink the kept journal; journals given back later are unlinked at once."""
        with self._journal_lock:
            self._closed = True
            journal, self._journal = self._journal, None
        if journal is not None:
            journal.discard()
