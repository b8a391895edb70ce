"""Metadata rows of shared-memory objects (the payloads live in the manager's registry)."""

from __future__ import annotations

from typing import Any, Iterable, Optional

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection

from rapidfire_state.constants import SHMLocation, SHMObjectType
from rapidfire_state.db import schema as tables
from rapidfire_state.db.records import SHMObjectRecord
from rapidfire_state.db.schema import db_now
from rapidfire_state.db.store.core import StoreCore
from rapidfire_state.db.store.lookups import check_id, enum_value, one_row, optional_path
from rapidfire_state.exceptions import ConfigError
from rapidfire_state.validation import check_name, check_positive_int


class SHMObjectStore(StoreCore):
    """The shared-memory metadata methods of :class:`~rapidfire_state.db.StateDB`."""

    def upsert_shm_object(
        self,
        key: str,
        *,
        object_type: Any = SHMObjectType.CHECKPOINT,
        location: Any = SHMLocation.SHM,
        disk_path: Optional[str] = None,
        num_bytes: int = 0,
        tensor_count: int = 0,
        experiment_id: Optional[int] = None,
        run_id: Optional[int] = None,
        chunk_id: Optional[int] = None,
        manager_name: Optional[str] = None,
    ) -> SHMObjectRecord:
        """Insert or replace the metadata row of the shared-memory object ``key``."""
        check_name("key", key, max_length=512, allow_blank=True)
        values = dict(
            object_type=enum_value(SHMObjectType, object_type, "shm object type"),
            location=enum_value(SHMLocation, location, "shm location"),
            disk_path=optional_path("disk_path", disk_path),
            num_bytes=check_id("num_bytes", num_bytes),
            tensor_count=check_id("tensor_count", tensor_count),
            experiment_id=check_id("experiment_id", experiment_id, optional=True),
            run_id=check_id("run_id", run_id, optional=True),
            chunk_id=check_id("chunk_id", chunk_id, optional=True),
            manager_name=manager_name,
        )
        if (values["location"] == SHMLocation.DISK.value) != (values["disk_path"] is not None):
            raise ConfigError("disk_path is required for location DISK and not allowed for SHM")
        table = tables.shm_objects

        def unit(conn: Connection) -> SHMObjectRecord:
            result = conn.execute(
                update(table).where(table.c.key == key).values(updated_at=db_now(), **values)
            )
            if result.rowcount == 0:
                conn.execute(insert(table).values(key=key, **values))
            return SHMObjectRecord.from_row(one_row(conn, table, table.c.key == key, missing=("shm object", key)))

        return self._write(unit, retry_on_unique=True)

    def get_shm_object(self, key: str) -> Optional[SHMObjectRecord]:
        """The metadata row of ``key``, or None."""
        table = tables.shm_objects

        def unit(conn: Connection) -> Optional[SHMObjectRecord]:
            row = conn.execute(select(table).where(table.c.key == key)).mappings().first()
            return SHMObjectRecord.from_row(row) if row is not None else None

        return self._read(unit)

    def list_shm_objects(
        self,
        *,
        experiment_id: Optional[int] = None,
        run_id: Optional[int] = None,
        manager_name: Optional[str] = None,
        disk_path: Any = None,
        limit: Optional[int] = None,
    ) -> list[SHMObjectRecord]:
        """Metadata rows in id order, filtered (``disk_path``: the rows naming that file); at most ``limit``."""
        check_id("experiment_id", experiment_id, optional=True)
        check_id("run_id", run_id, optional=True)
        wanted_path = optional_path("disk_path", disk_path)
        table = tables.shm_objects

        def unit(conn: Connection) -> list[SHMObjectRecord]:
            query = select(table).order_by(table.c.shm_object_id)
            if experiment_id is not None:
                query = query.where(table.c.experiment_id == experiment_id)
            if run_id is not None:
                query = query.where(table.c.run_id == run_id)
            if manager_name is not None:
                query = query.where(table.c.manager_name == manager_name)
            if wanted_path is not None:
                query = query.where(table.c.disk_path == wanted_path)
            if limit is not None:
                query = query.limit(check_positive_int("limit", limit))
            return [SHMObjectRecord.from_row(r) for r in conn.execute(query).mappings()]

        return self._read(unit)

    def delete_shm_objects(self, keys: Iterable[str]) -> list[SHMObjectRecord]:
        """Delete the rows of ``keys``; returns the rows that existed."""
        wanted = list(keys)
        table = tables.shm_objects
        if not wanted:
            return []

        def unit(conn: Connection) -> list[SHMObjectRecord]:
            rows = conn.execute(
                table.delete().where(table.c.key.in_(wanted)).returning(*table.c)
            ).mappings().all()
            return [SHMObjectRecord.from_row(r) for r in rows]

        return self._write(unit)
