"""Metadata rows of shared-memory objects (the payloads live in the manager's registry).

Each row names the host that holds the payload (``host``, recorded from
:data:`processes.HOST <rapidfire_state.db.store.processes.HOST>` at the write;
NULL on rows written before ``0007_shm_host``, taken as this host) and, when one
was written, a disk copy under a directory every host reads (``copy_path``).

A store may be *fenced* by a worker task's claim (``claim=``): the row is
written only while that task is IN_PROGRESS under that claim token, checked in
the transaction of the write (the task row locked FOR SHARE on PostgreSQL, so a
concurrent ``fail_stale_workers`` waits for the write or the write sees its
change), so a worker declared dead cannot overwrite the newer checkpoint.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection

from rapidfire_state.constants import SHMLocation, SHMObjectType, TaskStatus
from rapidfire_state.db import schema as tables
from rapidfire_state.db.records import SHMObjectRecord, TaskRecord
from rapidfire_state.db.schema import db_now
from rapidfire_state.db.store import processes
from rapidfire_state.db.store.core import StoreCore
from rapidfire_state.db.store.lookups import check_id, enum_value, optional_path
from rapidfire_state.exceptions import ConfigError, InvalidTransitionError
from rapidfire_state.validation import check_name, check_positive_int



def claim_of(claim: Any) -> Optional[tuple[int, str]]:
    """``claim`` (None, a worker :class:`TaskRecord`, or ``(task_id, claim_token)``) as ``(task_id, token)``."""
    if claim is None:
        return None
    if isinstance(claim, TaskRecord):
        if claim.kind != "worker":
            raise ConfigError(f"claim={claim!r} is not valid; a worker task is required, got a {claim.kind} task")
        task_id, token = claim.task_id, claim.claim_token
    elif isinstance(claim, tuple) and len(claim) == 2:
        task_id, token = claim
    else:
        raise ConfigError(
            f"claim={claim!r} is not valid; allowed: None, a worker TaskRecord, or a (task_id, claim_token) tuple"
        )
    check_id("claim task_id", task_id)
    if not isinstance(token, str) or not token:
        raise ConfigError(
            f"claim token {token!r} of worker task {task_id} is not valid; the non-empty claim_token of the "
            "claimed TaskRecord is required (a task claimed before 0003_task_claims has none: it cannot fence)"
        )
    return int(task_id), token


def check_claim_without_commit(conn: Connection, claim: tuple[int, str]) -> None:
    """Raise :class:`InvalidTransitionError` unless worker task ``claim[0]`` is IN_PROGRESS under token ``claim[1]``.

    The task row is locked FOR SHARE (PostgreSQL; SQLite's write transaction
    already serialises), so the status cannot change before the caller commits.
    """
    task_id, token = claim
    tasks = tables.worker_tasks
    row = conn.execute(
        select(tasks.c.status, tasks.c.claim_token, tasks.c.claim_host, tasks.c.claim_pid)
        .where(tasks.c.task_id == task_id)
        .with_for_update(read=True)
    ).mappings().first()
    if row is None:
        raise InvalidTransitionError(
            "worker_task", task_id, None, TaskStatus.IN_PROGRESS, (TaskStatus.IN_PROGRESS,),
            f"no such worker task: the shm object row was not written under claim {token!r}",
        )
    if row["status"] != TaskStatus.IN_PROGRESS.value or row["claim_token"] != token:
        raise InvalidTransitionError(
            "worker_task", task_id, TaskStatus(row["status"]), TaskStatus.IN_PROGRESS, (TaskStatus.IN_PROGRESS,),
            f"the store is fenced by claim {token!r}, but the task is {row['status']} under claim "
            f"{row['claim_token']!r} (pid {row['claim_pid']} on {row['claim_host']!r}); the shm object row "
            "was not written and the previous one stands",
        )


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
        copy_path: Optional[str] = None,
        claim: Any = None,
    ) -> SHMObjectRecord:
        """Insert or replace the metadata row of the shared-memory object ``key``.

        The row records this host (``processes.HOST``) as the one holding the
        payload, and ``copy_path``, a disk copy readable by every host (None: none).
        ``claim`` (a worker :class:`TaskRecord` or ``(task_id, claim_token)``)
        fences the write: it happens only while that task is IN_PROGRESS under
        that token, checked in the same transaction; otherwise
        :class:`InvalidTransitionError` is raised and the row is left as it was.
        """
        return self.upsert_shm_object_replacing(
            key, object_type=object_type, location=location, disk_path=disk_path, num_bytes=num_bytes,
            tensor_count=tensor_count, experiment_id=experiment_id, run_id=run_id, chunk_id=chunk_id,
            manager_name=manager_name, copy_path=copy_path, claim=claim,
        )[0]

    def upsert_shm_object_replacing(
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
        copy_path: Optional[str] = None,
        claim: Any = None,
    ) -> tuple[SHMObjectRecord, Optional[str]]:
        """:meth:`upsert_shm_object`, and the ``copy_path`` of the row it replaced (None: none, or no row).

        For the manager, which removes a replaced copy once the new row is committed.
        """
        check_name("key", key, max_length=512, allow_blank=True)
        fence = claim_of(claim)
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
            copy_path=optional_path("copy_path", copy_path),
            host=processes.HOST,  # read at call time: RF_HOST may name this host
        )
        if (values["location"] == SHMLocation.DISK.value) != (values["disk_path"] is not None):
            raise ConfigError("disk_path is required for location DISK and not allowed for SHM")
        table = tables.shm_objects

        def unit(conn: Connection) -> tuple[SHMObjectRecord, Optional[str]]:
            if fence is not None:
                check_claim_without_commit(conn, fence)
            previous = conn.execute(
                select(table.c.copy_path).where(table.c.key == key).with_for_update()
            ).first()
            if previous is None:
                row = conn.execute(insert(table).values(key=key, **values).returning(*table.c)).mappings().one()
            else:
                row = conn.execute(
                    update(table).where(table.c.key == key).values(updated_at=db_now(), **values).returning(*table.c)
                ).mappings().one()
            replaced = previous[0] if previous is not None else None
            return SHMObjectRecord.from_row(row), (replaced if replaced != values["copy_path"] else None)

        return self._write(unit, retry_on_unique=True)

    def check_shm_claim(self, claim: Any) -> None:
        """Raise :class:`InvalidTransitionError` unless ``claim`` is still the IN_PROGRESS claim of its task.

        A read, for a caller that wants to refuse early (before touching a
        payload); the check that counts is the one inside the fenced write.
        """
        fence = claim_of(claim)
        if fence is None:
            return
        self._read(lambda conn: check_claim_without_commit(conn, fence))

    def set_shm_object_copy(self, key: str, copy_path: str, *, host: Optional[str]) -> Optional[SHMObjectRecord]:
        """Record ``copy_path`` on ``key``'s row if the row still names ``host``; the row, or None when it does not.

        Returns the new record; the copy the row named before is returned by
        :meth:`get_shm_object` beforehand, for the caller to remove.
        """
        text = optional_path("copy_path", copy_path)
        table = tables.shm_objects
        same_host = table.c.host.is_(None) if host is None else table.c.host == host

        def unit(conn: Connection) -> Optional[SHMObjectRecord]:
            row = conn.execute(
                update(table).where(table.c.key == key, same_host)
                .values(copy_path=text, updated_at=db_now()).returning(*table.c)
            ).mappings().first()
            return None if row is None else SHMObjectRecord.from_row(row)

        return self._write(unit)

    # --- reading ---------------------------------------------------------------------------

    def _shm_columns(self) -> list:
        """The columns to select: a reader of a database before 0007 selects without
        ``host``/``copy_path`` (their fields are None)."""
        lacking = self._missing_columns.get("shm_objects", frozenset())
        return [column for column in tables.shm_objects.c if column.name not in lacking]

    def get_shm_object(self, key: str) -> Optional[SHMObjectRecord]:
        """The metadata row of ``key``, or None."""
        table = tables.shm_objects
        columns = self._shm_columns()

        def unit(conn: Connection) -> Optional[SHMObjectRecord]:
            row = conn.execute(select(*columns).where(table.c.key == key)).mappings().first()
            return SHMObjectRecord.from_row(row) if row is not None else None

        return self._read(unit)

    def list_shm_objects(
        self,
        *,
        experiment_id: Optional[int] = None,
        run_id: Optional[int] = None,
        manager_name: Optional[str] = None,
        disk_path: Any = None,
        copy_path: Any = None,
        limit: Optional[int] = None,
    ) -> list[SHMObjectRecord]:
        """Metadata rows in id order, filtered (``disk_path``/``copy_path``: the rows naming that file); at most ``limit``."""
        check_id("experiment_id", experiment_id, optional=True)
        check_id("run_id", run_id, optional=True)
        wanted_path = optional_path("disk_path", disk_path)
        wanted_copy = optional_path("copy_path", copy_path)
        table = tables.shm_objects
        columns = self._shm_columns()
        if wanted_copy is not None and len(columns) != len(table.c):
            return []  # no copies before 0007

        def unit(conn: Connection) -> list[SHMObjectRecord]:
            query = select(*columns).order_by(table.c.shm_object_id)
            if experiment_id is not None:
                query = query.where(table.c.experiment_id == experiment_id)
            if run_id is not None:
                query = query.where(table.c.run_id == run_id)
            if manager_name is not None:
                query = query.where(table.c.manager_name == manager_name)
            if wanted_path is not None:
                query = query.where(table.c.disk_path == wanted_path)
            if wanted_copy is not None:
                query = query.where(table.c.copy_path == wanted_copy)
            if limit is not None:
                query = query.limit(check_positive_int("limit", limit))
            return [SHMObjectRecord.from_row(r) for r in conn.execute(query).mappings()]

        return self._read(unit)

    def copy_paths_in_use(self, paths: Iterable[str]) -> set[str]:
        """Those of ``paths`` that some row still names as its ``copy_path``."""
        wanted = sorted({p for p in paths if p})
        if not wanted:
            return set()
        table = tables.shm_objects

        def unit(conn: Connection) -> set[str]:
            return set(conn.execute(select(table.c.copy_path).where(table.c.copy_path.in_(wanted))).scalars())

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
