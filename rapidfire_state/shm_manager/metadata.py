"""An object's metadata: one typed record, kept in the registry, written to its ``shm_objects`` row.

:class:`ObjectMeta` is the registry entry under ``META_PREFIX + key``: the
generation of the payload, where it is, how big, whose, and (during an in-place
store) the :class:`RedoMarker`.  It has one conversion to and from the registry
value (a plain dict, so that raw readers of the registry and any process see
builtins only) and one to the store's :meth:`~rapidfire_state.db.store.StateDB.upsert_shm_object`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

from rapidfire_state.constants import SHMLocation, SHMObjectType

if TYPE_CHECKING:  # pragma: no cover
    from rapidfire_state.db.records import SHMObjectRecord


def new_generation() -> int:
    """A random 63-bit number: generations and publication tokens."""
    return int.from_bytes(os.urandom(8), "big") >> 1


class ObjectIds(NamedTuple):
    """Whose object it is: the ids a store was given (each None or a non-negative int)."""

    experiment_id: Optional[int] = None
    run_id: Optional[int] = None
    chunk_id: Optional[int] = None


class RedoMarker(NamedTuple):
    """Set on the metadata while an in-place store copies its journal into the shared tensors.

    Names the journal file and what is needed to finish the copy from it, should
    the writer die: ``layout`` of the journal's tensors, and ``treedef`` when the
    store also changed the structure (None: unchanged).
    """

    journal_path: str
    journal_bytes: int
    layout: tuple
    treedef: Any


@dataclass(frozen=True)
class ObjectMeta:
    """The registry's metadata entry of one object.

    ``gen`` changes when the payload is replaced (an in-place store keeps it);
    ``token`` changes with every publication, so two entries are the same
    publication exactly when their tokens are equal.  ``path`` is the file of an
    object on disk.
    """

    gen: int
    location: SHMLocation
    path: Optional[str]
    num_bytes: int
    tensor_count: int
    experiment_id: Optional[int]
    run_id: Optional[int]
    chunk_id: Optional[int]
    object_type: SHMObjectType
    manager_name: str
    stored_at: float
    token: int
    redo: Optional[RedoMarker] = None
    #: the cross-host disk copy of this publication (None: none), carried so that a row
    #: rewritten from the registry (follow_row, reconcile) keeps naming it
    copy_path: Optional[str] = None

    @classmethod
    def new(
        cls,
        *,
        gen: int,
        location: SHMLocation,
        path: Optional[os.PathLike[str] | str],
        num_bytes: int,
        tensor_count: int,
        ids: ObjectIds,
        object_type: SHMObjectType,
        manager_name: str,
        copy_path: Optional[str] = None,
    ) -> "ObjectMeta":
        """The entry of a publication made now (a fresh token)."""
        return cls(
            gen=gen,
            location=location,
            path=None if path is None else os.fspath(path),
            num_bytes=num_bytes,
            tensor_count=tensor_count,
            experiment_id=ids.experiment_id,
            run_id=ids.run_id,
            chunk_id=ids.chunk_id,
            object_type=object_type,
            manager_name=manager_name,
            stored_at=time.time(),
            token=new_generation(),  # tells one publication from the next (in-place stores keep gen)
            copy_path=copy_path,
        )

    # --- the registry value -------------------------------------------------------------

    @classmethod
    def from_registry(cls, value: Any) -> Optional["ObjectMeta"]:
        """The entry a registry value holds; None when it is not a metadata entry this package wrote."""
        if not isinstance(value, dict):
            return None
        try:
            redo = value.get("redo")
            return cls(
                gen=value["gen"],
                location=SHMLocation(value["location"]),
                path=value.get("path"),
                num_bytes=value["num_bytes"],
                tensor_count=value["tensor_count"],
                experiment_id=value.get("experiment_id"),
                run_id=value.get("run_id"),
                chunk_id=value.get("chunk_id"),
                object_type=SHMObjectType(value.get("object_type") or SHMObjectType.CHECKPOINT.value),
                manager_name=value["manager_name"],
                stored_at=value.get("stored_at") or 0.0,
                token=value["token"],
                redo=None if redo is None else RedoMarker(*redo),
                copy_path=value.get("copy_path"),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def to_registry(self) -> dict:
        """The registry value: a dict of builtins (the redo marker a plain tuple, present only when set)."""
        value = {
            "gen": self.gen,
            "location": self.location.value,
            "path": self.path,
            "num_bytes": self.num_bytes,
            "tensor_count": self.tensor_count,
            "experiment_id": self.experiment_id,
            "run_id": self.run_id,
            "chunk_id": self.chunk_id,
            "object_type": self.object_type.value,
            "manager_name": self.manager_name,
            "stored_at": self.stored_at,
            "token": self.token,
        }
        if self.redo is not None:
            value["redo"] = tuple(self.redo)
        if self.copy_path is not None:
            value["copy_path"] = self.copy_path
        return value

    # --- the row --------------------------------------------------------------------------

    def row_fields(self) -> dict:
        """Keyword arguments of ``StateDB.upsert_shm_object(key, **fields)`` for this entry."""
        return {
            "object_type": self.object_type.value,
            "location": self.location.value,
            "disk_path": self.path,
            "num_bytes": self.num_bytes,
            "tensor_count": self.tensor_count,
            "experiment_id": self.experiment_id,
            "run_id": self.run_id,
            "chunk_id": self.chunk_id,
            "manager_name": self.manager_name,
            "copy_path": self.copy_path,
        }

    def disagrees_with(self, row: "SHMObjectRecord") -> bool:
        """Whether ``row`` says anything about the object other than this entry does."""
        return (
            self.location != row.location
            or self.path != row.disk_path
            or self.num_bytes != row.num_bytes
            or self.tensor_count != row.tensor_count
            or self.experiment_id != row.experiment_id
            or self.run_id != row.run_id
            or self.chunk_id != row.chunk_id
            or self.object_type != row.object_type
            or self.copy_path != row.copy_path
        )

    def to_record(self, key: str) -> "SHMObjectRecord":
        """The record a database row would give (``shm_object_id`` 0): what a manager without a database returns."""
        from datetime import datetime, timezone

        from rapidfire_state.db.records import SHMObjectRecord
        from rapidfire_state.db.store import processes

        when = datetime.fromtimestamp(self.stored_at, tz=timezone.utc)
        return SHMObjectRecord(
            shm_object_id=0,
            key=key,
            experiment_id=self.experiment_id,
            run_id=self.run_id,
            chunk_id=self.chunk_id,
            object_type=self.object_type,
            location=self.location,
            disk_path=self.path,
            num_bytes=self.num_bytes,
            tensor_count=self.tensor_count,
            manager_name=self.manager_name,
            created_at=when,
            updated_at=when,
            host=processes.HOST,
            copy_path=self.copy_path,
        )

    # --- states ---------------------------------------------------------------------------

    @property
    def on_disk(self) -> bool:
        return self.location == SHMLocation.DISK

    def without_redo(self) -> "ObjectMeta":
        return replace(self, redo=None)

    def with_redo(self, marker: RedoMarker) -> "ObjectMeta":
        return replace(self, redo=marker)


def same_publication(a: Optional[ObjectMeta], b: Optional[ObjectMeta]) -> bool:
    """Whether two entries (None: no entry) are one publication."""
    if a is None or b is None:
        return a is None and b is None
    return a.token == b.token
