""":class:`SharedMemoryManager`: the public API, tying the registry, packing, copies, files and rows together.

A store goes: flatten and check the value (:class:`~.packing.StoreRequest`); an
in-place store when the key is a same-layout object in shared memory
(:class:`~.in_place.InPlaceWriter`); otherwise a new payload, allocated and
filled (or written to a temp file) before the lock and published under it; then
the row, after the lock (:mod:`.rows`), undone with the payload if it cannot be
written.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

from loguru import logger

import rapidfire_state.shm_manager as _package
from rapidfire_state.constants import SHMLocation, SHMObjectType
from rapidfire_state.exceptions import ConfigError, InsufficientSharedMemoryError, RapidFireError
from rapidfire_state.shm_manager.copies import SHM_DIR, JournalSlot, allocate_shared, journal_tag, shm_shortfall
from rapidfire_state.shm_manager.errors import (
    NoSharedMemory,
    SHMKeyError,
    SHMLockTimeoutError,
    SHMNotOnThisHostError,
    SHMRegistryUnavailableError,
)
from rapidfire_state.shm_manager.files import (
    commit_temp,
    copy_file_path,
    disk_path,
    existing_parent,
    fs_free,
    load_file,
    sibling_path,
    this_host,
    unlink_quiet,
    write_temp,
)
from rapidfire_state.shm_manager.in_place import InPlaceWriter
from rapidfire_state.shm_manager.lock import SHMLock
from rapidfire_state.shm_manager.metadata import ObjectIds, ObjectMeta, new_generation, same_publication
from rapidfire_state.shm_manager.packing import (
    CachedObject,
    ObjectCache,
    Packed,
    StoreRequest,
    disk_tensor,
    layout_for,
    shapes_and_dtypes,
    unflatten,
)
from rapidfire_state.shm_manager.reconcile import ReconcileReport, Reconciler
from rapidfire_state.shm_manager.registry import (
    MAX_KEY_LENGTH,
    META_PREFIX,
    RegistryClient,
    start_registry_manager,
    use_file_system_strategy,
    warn_if_not_initialized,
)
from rapidfire_state.shm_manager.rows import follow_row, write_row
from rapidfire_state.validation import check_int, check_name, check_positive_number

if TYPE_CHECKING:  # pragma: no cover
    from rapidfire_state.db.records import SHMObjectRecord
    from rapidfire_state.db.store import StateDB

# ``_package._copy_tensors``, ``_package._write_temp``, ``_package.fsync_directory`` and
# ``_package.SHM_WARN_FRACTION`` are looked up on the package at each use:
# ``rapidfire_state.shm_manager.<name>`` is where they have always been replaceable
# (the tests replace them there to watch or interrupt a store).

#: A warning is logged when ``/dev/shm`` use passes this fraction (read as ``rapidfire_state.shm_manager.SHM_WARN_FRACTION``).
SHM_WARN_FRACTION = 0.9
#: Default ``min_free_bytes``: keep this much of ``/dev/shm`` free.
DEFAULT_MIN_FREE_BYTES = 1 << 30
#: Default ``lock_timeout`` in seconds.
DEFAULT_LOCK_TIMEOUT = 300.0

#: Room a disk write needs beyond the tensors' bytes (torch.save's framing).
_DISK_OVERHEAD_BYTES = 1 << 20

#: ``placement``: payloads stay on the host that stored them (as before hosts were recorded)
PLACEMENT_LOCAL = "local"
#: ``placement``: every store also writes a disk copy under ``shared_dir``, readable by every host
PLACEMENT_CROSS_HOST = "cross_host"
PLACEMENTS = (PLACEMENT_LOCAL, PLACEMENT_CROSS_HOST)


def _shared_dir(name: str, value: Any) -> Path:
    """``value`` (a str or os.PathLike naming a directory, existing or to be made) as an absolute Path."""
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{name}={value!r} is not valid; allowed: a directory path (str or os.PathLike)")
    text = os.fspath(value)
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{name}={value!r} is not valid; allowed: a non-empty directory path")
    path = Path(os.path.abspath(os.path.expanduser(text)))
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{name}={value!r} is not valid: {path} exists and is not a directory")
    return path


@dataclass(frozen=True)
class PreparedInMemory:
    """A new payload in shared memory, filled, not yet published."""

    packed: Packed
    views: list  # the packed tensors, as this process sees them


@dataclass(frozen=True)
class PreparedFile:
    """A new payload written to a temp file, not yet renamed into place.

    ``path``: where it will be renamed to — ``final``, or a key-specific sibling
    when another key's row owns ``final`` (see ``_claim_path``); ``ours``: this
    key's own row already names ``path``.
    """

    temp: Path
    final: Path
    path: Path
    ours: bool = False


Prepared = Union[PreparedInMemory, PreparedFile]


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
        placement: ``"local"`` (default): a payload lives on the host that stored
            it (the row names that host); ``"cross_host"``: every store also writes
            a disk copy under ``shared_dir`` (recorded in the row's ``copy_path``),
            and :meth:`load` checks the row first, so that a run moving to a worker
            on another host finds its checkpoint.
        shared_dir: the directory every host reads (a network file system), for
            the copies; required for ``"cross_host"``, the default of
            :meth:`copy_to_shared` otherwise.

    Instances pickle (registry and lock proxies, the database as its URL, the
    limits), so they can be passed to spawned processes; the copy never owns the
    Manager.  Constructing one sets torch's ``file_system`` sharing strategy for
    the whole process (see the README's shared-memory section).
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
        placement: str = PLACEMENT_LOCAL,
        shared_dir: Any = None,
    ):
        check_name("name", name, max_length=255)
        if placement not in PLACEMENTS:
            raise ConfigError(f"placement={placement!r} is not valid; allowed: {', '.join(map(repr, PLACEMENTS))}")
        shared = None if shared_dir is None else _shared_dir("shared_dir", shared_dir)
        if placement == PLACEMENT_CROSS_HOST and shared is None:
            raise ConfigError(
                "placement='cross_host' needs shared_dir=<a directory every host reads> for the disk copies"
            )
        check_int("min_free_bytes", min_free_bytes)
        check_int("min_free_disk_bytes", min_free_disk_bytes)
        check_int("max_object_bytes", max_object_bytes, optional=True)
        check_positive_number("lock_timeout", lock_timeout, optional=True)
        if (registry is None) != (lock is None):
            raise ConfigError("pass both registry and lock (from get_shm_objects()), or neither to start a new registry")
        self.name = name
        self.placement = placement
        self.shared_dir: Optional[Path] = shared
        self.max_object_bytes = max_object_bytes
        self.min_free_bytes = min_free_bytes
        self.min_free_disk_bytes = min_free_disk_bytes
        self._owns_db = False
        if isinstance(db, str):
            from rapidfire_state.db.store import StateDB

            db = StateDB(db)
            self._owns_db = True
        self.db: Optional[StateDB] = db
        self._cache = ObjectCache()
        self._warned_full = False
        self._closed = False
        self._manager: Any = None

        self._owned_lock: Optional[SHMLock] = None
        use_file_system_strategy()
        if registry is None:
            self._owned_lock = SHMLock.create(name)
            try:
                self._manager = start_registry_manager()
            except BaseException:
                self._owned_lock.remove()
                raise
            registry, lock = self._manager.dict(), self._owned_lock
        else:
            warn_if_not_initialized(registry, name)
        self._registry = registry
        self._lock = lock
        self._registry_client = RegistryClient(name, registry, lock, None if lock_timeout is None else float(lock_timeout))
        # journals of one registry share a tag, so reconcile() finds its dead writers' ones
        self._journal_tag = journal_tag(lock.path if isinstance(lock, SHMLock) else f"name:{name}")
        self._journals = JournalSlot(self._journal_tag)  # the journal of in-place stores, kept for the next one
        self._in_place = InPlaceWriter(self._registry_client, self._cache, self._journals)
        if self.db is not None:
            self.db.add_cleanup_hook(self._drop_payloads)

    # --- plumbing ---------------------------------------------------------------------

    @property
    def lock_timeout(self) -> Optional[float]:
        """Seconds to wait for the registry lock (None: forever); may be changed at any time."""
        return self._registry_client.lock_timeout

    @lock_timeout.setter
    def lock_timeout(self, seconds: Optional[float]) -> None:
        self._registry_client.lock_timeout = seconds

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
            "placement": self.placement,
            "shared_dir": None if self.shared_dir is None else str(self.shared_dir),
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
            placement=state.get("placement", PLACEMENT_LOCAL),
            shared_dir=state.get("shared_dir"),
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
        self._cache.clear()
        self._journals.close()
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

    @staticmethod
    def _check_key(key: Any) -> str:
        check_name("key", key, max_length=MAX_KEY_LENGTH, allow_blank=True)
        if key.startswith(META_PREFIX):
            raise ConfigError(f"shm key {key!r} is not valid; the prefix {META_PREFIX!r} is reserved")
        return key

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
        claim: Any = None,
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

        The row names this host (``shm_objects.host``), so a store of a key that
        another host held takes the row over.  With ``placement="cross_host"`` a
        disk copy is written under ``shared_dir`` too (atomically, before the
        payload is published) and named in the same row write; the copy of the
        replaced publication is removed once the new row has committed.

        ``claim`` (a worker :class:`~rapidfire_state.db.records.TaskRecord`, or
        ``(task_id, claim_token)``) fences the store: the row is written only
        while that task is IN_PROGRESS under that token (checked in the row's
        transaction), else :class:`~rapidfire_state.exceptions.InvalidTransitionError`.
        A claim already lost when the store begins is refused before anything is
        touched, so the previous payload and row stay as they were; one lost
        during the store has its payload removed again (as for any failed row write).

        Returns the metadata record (the database row; without a database, a
        record built from the registry entry with ``shm_object_id`` 0).  Raises
        :class:`ConfigError` for bad input (nothing is touched),
        :class:`InsufficientSharedMemoryError` when the object fits neither in
        shared memory nor on disk, and whatever the database raises for the row
        (then neither payload nor row remains).
        """
        self._check_open()
        self._check_key(key)
        for what, number in (("experiment_id", experiment_id), ("run_id", run_id), ("chunk_id", chunk_id)):
            check_int(what, number, optional=True)
        ids = ObjectIds(experiment_id, run_id, chunk_id)
        kind = _object_type(object_type)
        if claim is not None:
            if self.db is None:
                raise ConfigError(f"claim={claim!r}: a fenced store checks the claim in the database; this manager has none")
            self.db.check_shm_claim(claim)  # refused before the payload is touched
        import torch

        if isinstance(value, torch.nn.Module):
            value = value.state_dict()
        request = StoreRequest.of(key, value, ids, kind, self.name)
        if self.placement == PLACEMENT_CROSS_HOST:
            assert self.shared_dir is not None
            request = replace(request, copy_path=str(self._write_copy(request, self.shared_dir)))
            try:
                return self._store(request, claim)
            except BaseException:
                unlink_quiet(request.copy_path)  # no row names it
                raise
        return self._store(request, claim)

    def _store(self, request: StoreRequest, claim: Any) -> "SHMObjectRecord":
        key = request.key
        too_big = self.max_object_bytes is not None and request.num_bytes > self.max_object_bytes

        if not too_big and request.tensors and self._in_place_candidate(request):
            done = self._in_place.store(request, self.min_free_bytes)
            if done is not None:
                new_meta, old_meta = done
                return self._finish(key, new_meta, old_meta=old_meta, new_path=None, claim=claim)
        # A new payload: allocated and filled (or written to a temp file) before the lock.
        prepared: Optional[Prepared] = self._prepare(request, too_big)
        try:
            if isinstance(prepared, PreparedFile):
                prepared = self._claim_path(key, prepared)  # a database read: not under the lock
            with self._registry_client.locked():
                meta = self._registry_client.meta(key)
                new_meta, path = self._publish(request, prepared, meta)
            prepared = None
        finally:
            if isinstance(prepared, PreparedFile):
                unlink_quiet(prepared.temp)
        if path is not None:
            _package.fsync_directory(path.parent)  # durability of the rename; visibility needed no fsync
        return self._finish(key, new_meta, old_meta=meta, new_path=path, claim=claim)

    def _write_copy(self, request: StoreRequest, directory: Path) -> Path:
        """The value's disk copy under ``directory``, for every host: a fsynced temp file renamed
        into a per-publication name (``weights_only``-loadable, as the disk fallback is)."""
        final = copy_file_path(
            directory, self.name, request.key, request.ids.experiment_id, request.ids.run_id, new_generation()
        )
        disk_value = unflatten(request.treedef, [disk_tensor(t) for t in request.tensors])
        commit_temp(write_temp(disk_value, final.parent), final)
        return final

    def _in_place_candidate(self, request: StoreRequest) -> bool:
        """Whether the key looks like a same-layout object in shared memory (checked again under the lock)."""
        cached = self._cache.get(request.key)
        if cached is not None and cached.signature == request.signature:
            return True
        peek = self._registry_client.meta(request.key)
        return bool(
            peek
            and peek.location == SHMLocation.SHM
            and peek.num_bytes == request.num_bytes
            and peek.tensor_count == request.tensor_count
        )

    def _prepare(self, request: StoreRequest, too_big: bool) -> Prepared:
        """The new payload, not yet published: filled shared memory, or a temp file."""
        key, tensors, treedef, num_bytes = request.key, request.tensors, request.treedef, request.num_bytes
        layout, storage_bytes = layout_for(tensors)
        if not tensors and not too_big:
            return PreparedInMemory(Packed(None, (), treedef), [])
        if too_big:
            shm_reason = f"it is larger than max_object_bytes={self.max_object_bytes}"
        else:
            shm_reason = shm_shortfall(storage_bytes, self.min_free_bytes)
        if shm_reason is None:
            try:
                packed = Packed(allocate_shared(storage_bytes), layout, treedef)
            except NoSharedMemory as exc:
                shm_reason = str(exc)
            else:
                views = packed.views()
                _package._copy_tensors(views, tensors)
                self._check_usage()
                return PreparedInMemory(packed, views)
        final = disk_path(self.name, key, request.ids.run_id, request.ids.chunk_id, request.object_type.value)
        directory = final.parent
        free = fs_free(existing_parent(directory))
        needed = num_bytes + _DISK_OVERHEAD_BYTES
        if free is not None and free[0] - needed < self.min_free_disk_bytes:
            raise InsufficientSharedMemoryError(
                f"object {key!r} ({num_bytes} bytes) fits neither in shared memory ({shm_reason}) nor on disk "
                f"({directory} has {free[0]} bytes free and min_free_disk_bytes={self.min_free_disk_bytes})"
            )
        disk_value = unflatten(treedef, [disk_tensor(t) for t in tensors])
        try:
            temp = _package._write_temp(disk_value, directory)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise InsufficientSharedMemoryError(
                    f"object {key!r} ({num_bytes} bytes) fits neither in shared memory ({shm_reason}) nor on disk "
                    f"({directory}: {exc})"
                ) from exc
            raise
        return PreparedFile(temp, final, final)

    def _claim_path(self, key: str, prepared: PreparedFile) -> PreparedFile:
        """Where the file goes: ``final``, or a key-specific sibling when another key's row owns
        ``final``; ``ours`` when this key's own row already names it.  A database read, made
        before the lock; :meth:`_publish` checks the file again under it."""
        if self.db is None:
            return replace(prepared, path=prepared.final, ours=False)
        owners = [row.key for row in self.db.list_shm_objects(disk_path=str(prepared.final))]
        if any(owner != key for owner in owners):
            return replace(prepared, path=sibling_path(key, prepared.final), ours=False)
        return replace(prepared, path=prepared.final, ours=key in owners)

    def _publish(
        self, request: StoreRequest, prepared: Prepared, meta: Optional[ObjectMeta]
    ) -> tuple[ObjectMeta, Optional[Path]]:
        """Make a prepared payload the key's (lock held): registry entries, rename, old file gone."""
        key = request.key
        path: Optional[Path] = None
        if isinstance(prepared, PreparedInMemory):
            packed, views = prepared.packed, prepared.views
            new_meta = request.meta(new_generation(), SHMLocation.SHM)
            # one registry update: payload and metadata change together
            self._registry_client.publish(key, new_meta, packed)
            self._cache.put(key, CachedObject(new_meta.gen, packed.treedef, shapes_and_dtypes(views), views, packed.storage))
        else:
            final, path = prepared.final, prepared.path
            if path == final and not prepared.ours and (meta.path if meta else None) != str(final) and final.exists():
                path = sibling_path(key, final)  # claimed since our check by a store not yet in the database
            os.replace(prepared.temp, path)
            new_meta = request.meta(new_generation(), SHMLocation.DISK, path)
            try:
                # metadata first: a reader between the two calls loads the new file
                self._registry_client.set_meta(key, new_meta)
                self._registry_client.pop(key)
            except BaseException:
                unlink_quiet(path)
                raise
            self._cache.drop(key)
        old_path = meta.path if meta else None
        if old_path and old_path != new_meta.path:
            unlink_quiet(old_path)  # under the lock: a later store may reuse the name
        return new_meta, path

    def _finish(
        self, key: str, meta: ObjectMeta, *, old_meta: Optional[ObjectMeta], new_path: Optional[Path], claim: Any = None
    ) -> "SHMObjectRecord":
        """After a publish, lock released: the row; if it cannot be written, the publish is undone.

        Copies of the publications the row write replaced are removed after it
        has committed, unless the registry's current entry names them.
        """
        replaced: list = []
        try:
            record = write_row(self.db, key, meta, claim=claim, replaced=replaced)
        except BaseException:
            self._rollback(key, meta, old_meta, new_path)
            raise
        follow_row(self.db, self._registry_client, key, meta, replaced)
        if old_meta is not None and old_meta.copy_path:
            replaced.append(old_meta.copy_path)
        self._remove_copies(key, replaced)
        return record

    def _remove_copies(self, key: str, paths: Sequence[Optional[str]]) -> None:
        """Remove the copy files ``paths`` that neither the registry's entry of ``key`` nor any row names."""
        wanted = {p for p in paths if p}
        if not wanted:
            return
        try:
            current = self._registry_client.meta(key)
        except SHMRegistryUnavailableError:
            current = None
        if current is not None:
            wanted.discard(current.copy_path)
        if wanted and self.db is not None:
            try:
                wanted -= self.db.copy_paths_in_use(wanted)
            except Exception as exc:  # keep them: a copy left behind is only disk space
                logger.warning(f"shm object {key!r}: old copies not removed ({exc!r})")
                return
        for path in wanted:
            unlink_quiet(path)

    def _rollback(self, key: str, written: ObjectMeta, old_meta: Optional[ObjectMeta], new_path: Optional[Path]) -> None:
        """After a failed row write: remove the payload we published (and any old file) and the row."""
        self._cache.drop(key)
        ours = False
        try:
            with self._registry_client.locked():
                ours = same_publication(self._registry_client.meta(key), written)
                if ours:  # not replaced by a newer store meanwhile: remove it
                    self._registry_client.pop_meta(key)
                    self._registry_client.pop(key)
                    unlink_quiet(new_path)
                    if old_meta and old_meta.path:
                        unlink_quiet(old_meta.path)
        except (SHMLockTimeoutError, SHMRegistryUnavailableError) as exc:
            logger.warning(f"shm object {key!r}: payload not removed after a failed store ({exc!r}); reconcile() will")
            unlink_quiet(new_path)
        if ours and self.db is not None:
            try:
                row = self.db.get_shm_object(key)
                if row is not None and row.held_elsewhere(this_host()):
                    return  # another host's row (a refused fenced store): it is the truth, keep it
                copies = [r.copy_path for r in self.db.delete_shm_objects([key])]
                follow_row(self.db, self._registry_client, key, None, copies)
                self._remove_copies(key, copies + [old_meta.copy_path if old_meta else None])
            except Exception as exc:
                logger.warning(f"shm object {key!r}: row not removed after a failed store ({exc!r}); reconcile() will")

    def _check_usage(self) -> None:
        free = fs_free(SHM_DIR)
        if free is None or free[1] == 0:
            return
        used = 1.0 - free[0] / free[1]
        if used > _package.SHM_WARN_FRACTION:
            if not self._warned_full:
                self._warned_full = True
                logger.warning(
                    f"/dev/shm is {used:.0%} full ({free[0]} of {free[1]} bytes free); shared-memory manager "
                    f"{self.name!r} will spill objects to disk below min_free_bytes={self.min_free_bytes}"
                )
        else:
            self._warned_full = False

    def _settle(self, key: str) -> Optional[ObjectMeta]:
        """The metadata of ``key`` once no in-place store is half done: waits for a live writer's
        lock, finishes a dead one's copy (then writes its row)."""
        with self._registry_client.locked():
            meta = self._registry_client.meta(key)
            redone = meta is not None and meta.redo is not None
            if redone:
                meta = self._in_place.redo(key, meta)
        if redone and meta is not None and self.db is not None:
            try:  # the dead writer never wrote its row
                write_row(self.db, key, meta)
                follow_row(self.db, self._registry_client, key, meta)
            except Exception as exc:  # the payload is whole; only the row may lag
                logger.warning(f"shm object {key!r}: row not updated after finishing a store ({exc!r}); reconcile() will")
        return meta

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

        Another host's object (its row names another host): its disk file when
        that path exists here (a shared mount), else its cross-host copy
        (``copy_path``), as private CPU tensors.  With ``placement="local"`` the
        row is read only when this host's registry lacks the key; a registry
        entry left by a host that lost the row to another is dropped by
        :meth:`reconcile`.  With ``"cross_host"`` the row is read first, and an
        object of another registry of this host (a manager of another name) is
        read from its copy as well; with either placement a key this registry
        lacks is read from its row's copy when there is one.

        Raises:
            SHMKeyError: nothing is stored under ``key`` (also a KeyError).
            SHMNotOnThisHostError: another host holds ``key`` and no copy of it
                can be read here.
            SHMRegistryUnavailableError: the registry is gone and the database has
                no disk copy of ``key``.
        """
        self._check_open()
        self._check_key(key)
        if self.placement == PLACEMENT_CROSS_HOST and self.db is not None:
            row = self._row(key)
            if row is not None and self._held_by_another_registry(row):
                return self._load_foreign(key, row)
        try:
            meta = self._registry_client.meta(key)
        except SHMRegistryUnavailableError:
            row = self._row(key)
            if row is not None and row.held_elsewhere(this_host()):
                return self._load_foreign(key, row)
            if row is not None and row.location == SHMLocation.DISK:
                return load_file(key, row.disk_path)
            raise
        if meta is not None and meta.redo is not None:
            meta = self._settle(key)  # an in-place store is under way, or its writer died mid-copy
        if meta is not None:
            if meta.on_disk:
                return load_file(key, meta.path)
            cached = self._cache.get(key)
            if cached is None or cached.gen != meta.gen:
                # No lock needed: writers set the payload before its metadata, so the
                # payload read after `meta` is at least as new as meta's generation;
                # labelled with that generation, a newer payload only costs a refetch.
                payload = self._registry_client.fetch(key)
                if payload is None:  # deleted or moved to disk meanwhile
                    return self._load_uncached(key)
                cached = self._cache.remember(key, payload, meta.gen)
            return cached.value()
        return self._load_uncached(key)

    def _load_uncached(self, key: str) -> Any:
        meta = self._registry_client.meta(key)
        if meta is not None and meta.on_disk:
            return load_file(key, meta.path)
        payload = self._registry_client.fetch(key)
        if payload is not None:
            return payload.unpack() if isinstance(payload, Packed) else payload
        row = self._row(key)
        if row is not None and row.held_elsewhere(this_host()):
            return self._load_foreign(key, row)
        if row is not None and row.location == SHMLocation.DISK:
            return load_file(key, row.disk_path)
        if row is not None and row.copy_path and os.path.exists(row.copy_path):
            # held by another registry of this host (another manager's name): its copy
            return load_file(key, row.copy_path)
        raise SHMKeyError(key)

    def _held_by_another_registry(self, row: "SHMObjectRecord") -> bool:
        """Whether the row's payload is in a registry other than this manager's: another
        host's, or another manager's of this host (processes sharing a registry share its name)."""
        return row.held_elsewhere(this_host()) or (row.manager_name is not None and row.manager_name != self.name)

    @staticmethod
    def _foreign_file(row: "SHMObjectRecord") -> Optional[str]:
        """The file of another host's object that can be read here: its disk file when the
        path exists here (a shared mount), else its cross-host copy; None when neither."""
        if row.location == SHMLocation.DISK and row.disk_path and os.path.exists(row.disk_path):
            return row.disk_path
        if row.copy_path and os.path.exists(row.copy_path):
            return row.copy_path
        return None

    def _load_foreign(self, key: str, row: "SHMObjectRecord") -> Any:
        path = self._foreign_file(row)
        if path is None:
            detail = f"its copy {row.copy_path} is missing" if row.copy_path else "it has no cross-host copy"
            if row.location == SHMLocation.DISK:
                detail += f", and its disk file {row.disk_path} is not there on this host"
            raise SHMNotOnThisHostError(key, str(row.host), this_host(), detail)
        return load_file(key, path)

    def _row(self, key: str) -> Optional["SHMObjectRecord"]:
        return None if self.db is None else self.db.get_shm_object(key)

    def exists(self, key: str) -> bool:
        """Whether :meth:`load` would find ``key`` (without reading the payload)."""
        self._check_open()
        self._check_key(key)
        if self.placement == PLACEMENT_CROSS_HOST and self.db is not None:
            row = self._row(key)
            if row is not None and self._held_by_another_registry(row):
                return self._foreign_file(row) is not None
        try:
            meta = self._registry_client.meta(key)
            if meta is not None:
                if meta.on_disk:
                    return bool(meta.path) and os.path.exists(meta.path)
                return self._registry_client.contains(key)
            if self._registry_client.contains(key):
                return True
        except SHMRegistryUnavailableError:
            pass
        row = self._row(key)
        if row is not None and row.held_elsewhere(this_host()):
            return self._foreign_file(row) is not None
        if row is not None and row.location == SHMLocation.SHM:
            return bool(row.copy_path and os.path.exists(row.copy_path))  # another registry's, by its copy
        return bool(row is not None and row.location == SHMLocation.DISK and row.disk_path and os.path.exists(row.disk_path))

    def delete(self, key: str) -> bool:
        """Remove ``key``'s payload (registry entry or disk file) and its row.

        Returns whether anything was removed.  Works on the database and disk side
        when the registry is gone.  Its cross-host copies are removed too, after
        the row (never one that a row still names).
        """
        self._check_open()
        self._check_key(key)
        self._cache.drop(key)
        meta = payload = None
        alive = True
        try:
            with self._registry_client.locked():
                # payload first: a delete killed between the two leaves the metadata — with
                # its redo marker, if a dead writer left one — never a half-copied payload
                # without the marker that says so
                payload = self._registry_client.pop(key)
                meta = self._registry_client.pop_meta(key)
                if meta and meta.path:
                    unlink_quiet(meta.path)
        except SHMRegistryUnavailableError:
            if self._registry_client.answers():
                raise  # the lock file is gone, not the registry: the payload cannot be removed safely
            alive = False
        self._cache.drop(key)
        removed_rows = self.db.delete_shm_objects([key]) if self.db is not None else []  # not under the lock
        current = None
        if alive:
            try:
                current = self._registry_client.meta(key)  # stored again since we let go of the lock?
            except SHMRegistryUnavailableError:
                pass
        for row in removed_rows:
            if row.disk_path and row.disk_path != (current.path if current else None):
                unlink_quiet(row.disk_path)
        copies = [row.copy_path for row in removed_rows] + [meta.copy_path if meta else None]
        if current is not None:
            follow_row(self.db, self._registry_client, key, None, copies)
        self._remove_copies(key, copies)  # after the rows are gone; never one a row or the registry names
        return bool(removed_rows or meta is not None or payload is not None)

    # --- cross-host copies ------------------------------------------------------------

    def copy_to_shared(self, key: str, shared_dir: Any = None) -> "SHMObjectRecord":
        """Write a disk copy of ``key``, which this host holds, under ``shared_dir`` for every host.

        ``shared_dir`` defaults to the manager's.  The copy is written atomically
        (temp file, fsync, rename) and recorded as the row's ``copy_path``; the
        copy the row named before is removed after that.  Returns the row.

        Raises :class:`ConfigError` without a directory or a database,
        :class:`SHMKeyError` when nothing is stored under ``key``, and
        :class:`SHMNotOnThisHostError` when another host holds it (run it there).
        """
        self._check_open()
        self._check_key(key)
        directory = self.shared_dir if shared_dir is None else _shared_dir("shared_dir", shared_dir)
        if directory is None:
            raise ConfigError(
                f"copy_to_shared({key!r}) needs shared_dir=<a directory every host reads>; this manager was made without one"
            )
        if self.db is None:
            raise ConfigError(f"copy_to_shared({key!r}) records the copy in the object's row; this manager has no database")
        row = self._row(key)
        if row is None:
            raise SHMKeyError(key)
        here = this_host()
        if row.held_elsewhere(here):
            raise SHMNotOnThisHostError(
                key, str(row.host), here, f"copy_to_shared reads the payload, which only {row.host!r} has: run it there"
            )
        value = self.load(key)
        request = StoreRequest.of(key, value, ObjectIds(row.experiment_id, row.run_id, row.chunk_id), row.object_type,
                                  self.name)
        path = self._write_copy(request, directory)
        try:
            record = self.db.set_shm_object_copy(key, str(path), host=row.host)
        except BaseException:
            unlink_quiet(path)
            raise
        if record is None:
            unlink_quiet(path)
            raise RapidFireError(
                f"copy_to_shared({key!r}): the row changed hands while the copy was written (now held by "
                f"{getattr(self._row(key), 'host', None)!r}); no copy was recorded"
            )
        meta = None
        try:  # the registry entry carries the copy too, so rows rewritten from it keep naming it
            with self._registry_client.locked():
                meta = self._registry_client.meta(key)
                if meta is not None:
                    self._registry_client.set_meta(key, replace(meta, copy_path=str(path)))
        except (SHMLockTimeoutError, SHMRegistryUnavailableError) as exc:
            logger.warning(f"shm object {key!r}: copy recorded in the row only ({exc!r})")
        self._remove_copies(key, [row.copy_path, meta.copy_path if meta is not None else None])
        return record

    # --- listing ----------------------------------------------------------------------

    def list_objects(self) -> list["SHMObjectRecord"]:
        """The metadata of this manager's objects: its database rows, or without a
        database, records built from the registry entries (``shm_object_id`` 0)."""
        self._check_open()
        if self.db is not None:
            return self.db.list_shm_objects(manager_name=self.name)
        records = [meta.to_record(key) for key, meta in self._registry_client.metas(self.name).items()]
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
            meta = self._registry_client.meta(from_key)
        except SHMRegistryUnavailableError:
            pass
        experiment_id = chunk_id = None
        object_type = SHMObjectType.CHECKPOINT
        row = self._row(from_key)
        if meta is not None:
            experiment_id, chunk_id, object_type = meta.experiment_id, meta.chunk_id, meta.object_type
        elif row is not None:
            experiment_id, chunk_id, object_type = row.experiment_id, row.chunk_id, row.object_type
        value = self.load(from_key)
        return self.store(to_key, value, experiment_id=experiment_id, run_id=run_id, chunk_id=chunk_id,
                          object_type=object_type)

    # --- cleanup hook -----------------------------------------------------------------

    def _drop_payloads(self, records: Sequence["SHMObjectRecord"]) -> None:
        """Cleanup hook: drop the payloads of rows an experiment cleanup removed."""
        mine = [r for r in records if r.manager_name == self.name]
        if not mine or self._closed:
            return
        copies: dict[str, list] = {row.key: [row.copy_path] for row in mine}
        try:
            with self._registry_client.locked():
                for row in mine:
                    meta = self._registry_client.meta(row.key)
                    if meta is not None and meta.experiment_id not in (None, row.experiment_id):
                        continue  # re-stored for another experiment since
                    self._registry_client.pop_meta(row.key)
                    self._registry_client.pop(row.key)
                    if meta and meta.path:
                        unlink_quiet(meta.path)
                    if meta is not None:
                        copies[row.key].append(meta.copy_path)
        except SHMRegistryUnavailableError:
            pass
        for row in mine:
            self._cache.drop(row.key)
            if row.location == SHMLocation.DISK:
                unlink_quiet(row.disk_path)
            self._remove_copies(row.key, copies[row.key])  # cleanup removed them too; never one a row names

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
        reconciler = Reconciler(self.name, self.db, self._registry_client, self._cache, self._in_place, self._journal_tag)
        return reconciler.run()


def _object_type(object_type: Any) -> SHMObjectType:
    if isinstance(object_type, SHMObjectType):
        return object_type
    if isinstance(object_type, str):
        try:
            return SHMObjectType(object_type)
        except ValueError:
            pass
    allowed = ", ".join(t.value for t in SHMObjectType)
    raise ConfigError(f"object_type {object_type!r} is not a SHMObjectType; allowed: {allowed}")
