"""The ``shm_objects`` rows: written after the registry lock is released, then made to agree with it.

A database write can wait up to its retry limit, and other processes must not
wait with it, so rows are written without the lock: payload first, then row.
Two stores of one key may therefore write their rows in the other order; whoever
wrote a row checks the registry afterwards (:func:`follow_row`) and rewrites the
row from what it finds until the two agree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from loguru import logger

from rapidfire_state.shm_manager.errors import SHMRegistryUnavailableError
from rapidfire_state.shm_manager.metadata import ObjectMeta, same_publication
from rapidfire_state.shm_manager.registry import RegistryClient

if TYPE_CHECKING:  # pragma: no cover
    from rapidfire_state.db.records import SHMObjectRecord
    from rapidfire_state.db.store import StateDB

#: Rewrites :func:`follow_row` makes before it leaves the rest to reconcile().
_FOLLOW_ROUNDS = 16


def write_row(
    db: Optional["StateDB"],
    key: str,
    meta: ObjectMeta,
    *,
    claim: Any = None,
    replaced: Optional[list] = None,
) -> "SHMObjectRecord":
    """Upsert ``key``'s row from ``meta``; without a database, the record ``meta`` describes.

    ``claim`` fences the write (see ``StateDB.upsert_shm_object``); the copy path of
    the row replaced, if any, is appended to ``replaced`` (removed by the caller once
    no publication names it).
    """
    if db is None:
        return meta.to_record(key)
    record, old_copy = db.upsert_shm_object_replacing(key, claim=claim, **meta.row_fields())
    if old_copy is not None and replaced is not None:
        replaced.append(old_copy)
    return record


def follow_row(
    db: Optional["StateDB"],
    registry: RegistryClient,
    key: str,
    written: Optional[ObjectMeta],
    replaced: Optional[list] = None,
) -> None:
    """After writing ``written`` (None: deleting the row) without the lock, make the row agree with the registry.

    The last row written is then always the registry's current entry.  A key in
    the middle of an in-place store is left to that writer (or whoever finishes
    its copy); failures are logged and left to :meth:`SharedMemoryManager.reconcile`.
    """
    if db is None:
        return
    for _ in range(_FOLLOW_ROUNDS):
        try:
            current = registry.meta(key)
        except SHMRegistryUnavailableError:
            return
        if same_publication(current, written):
            return
        if current is not None and current.redo is not None:
            return  # mid-store: that writer (or whoever finishes its copy) writes the row
        written = current
        try:
            if current is None:
                for row in db.delete_shm_objects([key]):
                    if row.copy_path and replaced is not None:
                        replaced.append(row.copy_path)
            else:
                write_row(db, key, current, replaced=replaced)
        except Exception as exc:
            logger.warning(f"shm object {key!r}: row not brought in line with the registry ({exc!r}); reconcile() will")
            return
