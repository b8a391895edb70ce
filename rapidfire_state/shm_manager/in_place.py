"""In-place stores: a key already in shared memory with the same shapes and dtypes is overwritten
where it is, so every process's loaded views see the new weights — without ever leaving it torn.

The new values are first copied, without the lock, into a journal (a /dev/shm file
of the writing manager, :class:`~.copies.Journal`).  Under the lock the metadata
entry gets a :class:`~.metadata.RedoMarker` naming the journal, the journal is
copied into the shared tensors, and the marker is cleared in the same registry
update that publishes the new metadata.  A writer killed during that copy leaves
the marker behind, the OS releases its lock, and the next process that takes the
lock for this key (store, load, reconcile) finishes the copy from the journal
(:meth:`InPlaceWriter.redo`).
"""

from __future__ import annotations

from typing import Any, Optional

from loguru import logger

import rapidfire_state.shm_manager as _package
from rapidfire_state.constants import SHMLocation
from rapidfire_state.shm_manager.copies import Journal, JournalSlot
from rapidfire_state.shm_manager.files import unlink_quiet
from rapidfire_state.shm_manager.metadata import ObjectMeta, RedoMarker, new_generation
from rapidfire_state.shm_manager.packing import (
    CachedObject,
    ObjectCache,
    Packed,
    StoreRequest,
    layout_for,
    same_treedef,
    shapes_and_dtypes,
    tensor_views,
    unflatten,
)
from rapidfire_state.shm_manager.registry import RegistryClient

# The copies are made by ``_package._copy_tensors``, looked up on the package at each
# call: ``rapidfire_state.shm_manager._copy_tensors`` is where it has always been
# replaceable (the crash tests replace it in a writer to kill it mid-copy).


class InPlaceWriter:
    """A manager's in-place stores, and the redo of those a dead writer left half copied."""

    def __init__(self, registry: RegistryClient, cache: ObjectCache, journals: JournalSlot):
        self.registry = registry
        self.cache = cache
        self.journals = journals

    def current(self, key: str, meta: Optional[ObjectMeta]) -> Optional[CachedObject]:
        """The shared tensors of ``key`` in this process, refreshed if the generation moved."""
        if meta is None or meta.location != SHMLocation.SHM:
            return None
        cached = self.cache.get(key)
        if cached is not None and cached.gen == meta.gen:
            return cached
        payload = self.registry.fetch(key)
        if payload is None:
            self.cache.drop(key)
            return None
        return self.cache.remember(key, payload, meta.gen)

    def store(self, request: StoreRequest, min_free_bytes: int) -> Optional[tuple[ObjectMeta, Optional[ObjectMeta]]]:
        """Copy ``request``'s tensors into the key's existing shared tensors, crash-safely.

        Returns ``(new meta, old meta)``, or None when the key is no longer a
        same-layout shared object (or /dev/shm has no room for the journal) and
        must be replaced instead.
        """
        key = request.key
        layout, storage_bytes = layout_for(request.tensors)
        scratch: Optional[Journal] = self.journals.take(storage_bytes, min_free_bytes)
        if scratch is None:
            return None
        journal = tensor_views(scratch.storage, layout)
        _package._copy_tensors(journal, request.tensors)
        try:
            with self.registry.locked():
                meta = self.registry.meta(key)
                if meta is not None and meta.redo is not None:
                    meta = self.redo(key, meta)
                current = self.current(key, meta)
                if current is None or current.signature != request.signature:
                    return None
                changed = not same_treedef(request.treedef, current.treedef)
                new_treedef = request.treedef if changed else None
                new_meta = request.meta(new_generation() if changed else current.gen, SHMLocation.SHM)
                marker = new_meta.with_redo(RedoMarker(scratch.path, scratch.nbytes, layout, new_treedef))
                self.registry.set_meta(key, marker)
                try:
                    self.apply(key, current, journal, new_treedef, new_meta)
                except BaseException:
                    # The marker still names the journal: leave it to whoever takes the lock next.
                    scratch.abandon()
                    scratch = None
                    self.cache.drop(key)
                    raise
        finally:
            if scratch is not None:
                self.journals.give(scratch)
        return new_meta, meta

    def apply(self, key: str, current: CachedObject, journal: list, treedef: Any, new_meta: ObjectMeta) -> None:
        """Copy ``journal`` into the shared tensors and publish ``new_meta`` (lock held).

        ``treedef`` is the new structure, None when it did not change.
        """
        _package._copy_tensors(current.tensors, journal)
        payload = None
        if treedef is not None:
            # same tensors, new structure or plain values: re-send the (cheap) description
            if current.storage is not None:
                layout = tuple((t.storage_offset(), tuple(t.shape), t.dtype) for t in current.tensors)
                payload = Packed(current.storage, layout, treedef)
            else:
                payload = unflatten(treedef, current.tensors)
        self.registry.publish(key, new_meta, payload)
        self.cache.put(key, CachedObject(
            new_meta.gen, current.treedef if treedef is None else treedef, current.signature,
            current.tensors, current.storage,
        ))

    def redo(self, key: str, meta: ObjectMeta) -> Optional[ObjectMeta]:
        """Finish an in-place store whose writer died during the copy (lock held); the metadata after."""
        marker = meta.redo
        assert marker is not None
        clean = meta.without_redo()
        scratch = Journal.open(marker.journal_path, marker.journal_bytes)
        if scratch is None:
            # Cannot happen unless someone removed the file: the copy cannot be finished, and a
            # half-copied payload must not be loaded as if it were whole.
            self.registry.pop(key)  # payload first: a death between leaves the marker
            self.registry.pop_meta(key)
            self.cache.drop(key)
            logger.error(f"shm object {key!r}: the journal {marker.journal_path} of an interrupted in-place store "
                         "is gone; the half-copied object was removed")
            return None
        payload = self.registry.fetch(key)
        journal = tensor_views(scratch.storage, marker.layout)
        current = None if payload is None else self.cache.remember(key, payload, clean.gen)
        if current is None or current.signature != shapes_and_dtypes(journal):
            # replaced behind the marker (a raw registry write): that payload stands, reconcile() adopts it
            self.registry.pop_meta(key)
            self.cache.drop(key)
            del journal, scratch
            unlink_quiet(marker.journal_path)
            logger.warning(f"shm object {key!r}: an interrupted in-place store was overtaken by a raw registry write")
            return None
        self.apply(key, current, journal, marker.treedef, clean)
        del journal, scratch
        unlink_quiet(marker.journal_path)  # its writer abandoned it (died, or gave up after an error)
        logger.warning(f"shm object {key!r}: finished an in-place store that a dead process left half copied")
        return clean
