"""Reconcile: bring a manager's rows and the registry back in line after a crash.

Two halves: the registry is repaired under the lock (:meth:`Reconciler.scan_registry`:
finish half-done in-place stores, drop metadata whose payload is gone, give
metadata to payloads that have none), the rows after it is released
(:meth:`Reconciler.repair_rows`: remove rows whose payload is gone, rewrite rows
that disagree, adopt payloads without a row).  Temp files of dead disk writers
and journals of dead in-place writers are deleted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Optional

from rapidfire_state.constants import SHMLocation, SHMObjectType
from rapidfire_state.shm_manager.copies import sweep_journals
from rapidfire_state.shm_manager.errors import SHMRegistryUnavailableError
from rapidfire_state.shm_manager.files import spill_dir, sweep_temp_files, this_host, unlink_quiet
from rapidfire_state.shm_manager.in_place import InPlaceWriter
from rapidfire_state.shm_manager.metadata import ObjectIds, ObjectMeta, new_generation
from rapidfire_state.shm_manager.packing import ObjectCache, tensor_nbytes
from rapidfire_state.shm_manager.registry import MAX_KEY_LENGTH, META_PREFIX, RegistryClient
from rapidfire_state.shm_manager.rows import follow_row, write_row

if TYPE_CHECKING:  # pragma: no cover
    from rapidfire_state.db.records import SHMObjectRecord
    from rapidfire_state.db.store import StateDB

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
    ``dropped_elsewhere``: registry entries dropped because their row now names
    another host (the key was stored again there); those rows are not touched.
    """

    removed: tuple[str, ...] = ()
    missing_files: tuple[str, ...] = ()
    adopted: tuple[str, ...] = ()
    repaired: tuple[str, ...] = ()
    ok: int = 0
    registry_alive: bool = True
    removed_temp_files: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    dropped_elsewhere: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.removed or self.adopted or self.repaired or self.removed_temp_files or self.dropped_elsewhere)


class _Unrowed(NamedTuple):
    """A registry key that has no row (any manager's): it gets one."""

    key: str
    meta: ObjectMeta
    had_meta: bool  # False: the metadata was made by this reconcile (a raw payload)


@dataclass
class RegistryScan:
    """What the registry half of a reconcile saw and did (lock held), for the rows half."""

    payload_keys: set[str] = field(default_factory=set)
    metas: dict[str, ObjectMeta] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # without a database: metadata dropped
    missing: list[str] = field(default_factory=list)  # without a database: files gone
    drop_rows: set[str] = field(default_factory=set)  # rows whose payload vanished during the scan
    unrowed: list[_Unrowed] = field(default_factory=list)
    journals: list[str] = field(default_factory=list)  # dead writers' journals deleted
    elsewhere: list[str] = field(default_factory=list)  # entries dropped: their row names another host


class Reconciler:
    """One :meth:`SharedMemoryManager.reconcile` of the manager ``name``."""

    def __init__(
        self,
        name: str,
        db: Optional["StateDB"],
        registry: RegistryClient,
        cache: ObjectCache,
        in_place: InPlaceWriter,
        journal_tag: str,
    ):
        self.name = name
        self.db = db
        self.registry = registry
        self.cache = cache
        self.in_place = in_place
        self.journal_tag = journal_tag

    def run(self) -> ReconcileReport:
        all_rows = self.db.list_shm_objects() if self.db is not None else []
        here = this_host()
        # another host's rows are that host's to repair: only the stale entries they leave here go
        mine = [r for r in all_rows if r.manager_name == self.name and not r.held_elsewhere(here)]
        rows_by_key = {r.key: r for r in all_rows}
        scan: Optional[RegistryScan]
        try:
            with self.registry.locked():
                scan = self.scan_registry(mine, rows_by_key)
        except SHMRegistryUnavailableError:
            if self.registry.answers():
                raise  # the lock file is gone, not the registry: dropping its rows would lose live payloads
            scan = None
            self.cache.drop(*self.cache.keys())
        return self.repair_rows(mine, rows_by_key, scan)

    # --- the registry, lock held --------------------------------------------------------

    def scan_registry(self, mine: list["SHMObjectRecord"], rows_by_key: dict[str, "SHMObjectRecord"]) -> RegistryScan:
        """The registry half (lock held): repairs entries, returns what it saw."""
        scan = RegistryScan()
        metas = scan.metas
        payload_keys = scan.payload_keys
        for registry_key in self.registry.keys():
            if not isinstance(registry_key, str) or not registry_key or len(registry_key) > MAX_KEY_LENGTH:
                scan.skipped.append(repr(registry_key))  # cannot have a row; left alone
            elif registry_key.startswith(META_PREFIX):
                meta = self.registry.meta_at(registry_key)
                if meta is not None:
                    metas[registry_key[len(META_PREFIX):]] = meta
            else:
                payload_keys.add(registry_key)
        self.drop_elsewhere(scan, rows_by_key)
        for key, meta in list(metas.items()):
            if meta.redo is not None:
                fixed = self.in_place.redo(key, meta)
                if fixed is None:
                    del metas[key]
                else:
                    metas[key] = fixed
        # journals of writers that died outside a copy (no marker names them)
        scan.journals = sweep_journals(self.journal_tag)
        # registry-internal: metadata whose payload is gone; payloads a disk move left behind
        for key, meta in list(metas.items()):
            on_disk = meta.on_disk
            gone = (not (meta.path and os.path.exists(meta.path))) if on_disk else key not in payload_keys
            if gone:
                self.registry.pop_meta(key)
                del metas[key]
                self.cache.drop(key)
                if self.db is None:
                    scan.removed.append(key)
                    if on_disk:
                        scan.missing.append(key)
            elif on_disk and key in payload_keys:
                self.registry.pop(key)
                payload_keys.discard(key)
        # metadata for rows and raw payloads that have none (the rows were read before the lock)
        for row in mine:
            if row.location == SHMLocation.SHM:
                present = row.key in payload_keys
            else:
                present = bool(row.disk_path) and os.path.exists(row.disk_path)
            if row.key in metas or not present:
                continue
            adopted = self.adopt(row.key, row)
            if adopted is None:
                scan.drop_rows.add(row.key)
            else:
                metas[row.key] = adopted
        for key in sorted(payload_keys | set(metas)):
            if key in rows_by_key:
                continue
            had_meta = key in metas
            meta = metas.get(key) or self.adopt(key, None)
            if meta is not None:
                metas[key] = meta
                scan.unrowed.append(_Unrowed(key, meta, had_meta))
        return scan

    def drop_elsewhere(self, scan: RegistryScan, rows_by_key: dict[str, "SHMObjectRecord"]) -> None:
        """Drop the registry entries (lock held) whose row names another host: that host
        stored the key since, so the payload here is stale.  The rows are not touched."""
        here = this_host()
        for key in sorted(scan.payload_keys | set(scan.metas)):
            row = rows_by_key.get(key)
            if row is None or not row.held_elsewhere(here):
                continue
            meta = scan.metas.pop(key, None)
            scan.payload_keys.discard(key)
            self.registry.pop(key)
            self.registry.pop_meta(key)
            self.cache.drop(key)
            named = {row.disk_path, row.copy_path}
            if meta is not None:
                for path in (meta.path, meta.copy_path):
                    if path and path not in named:
                        unlink_quiet(path)  # this host's own file of the stale publication
            scan.elsewhere.append(key)

    def adopt(self, key: str, row: Optional["SHMObjectRecord"]) -> Optional[ObjectMeta]:
        """Create the registry metadata of ``key`` from its payload (and row, if any)."""
        if row is not None and row.location == SHMLocation.DISK:
            gen, location, path = new_generation(), SHMLocation.DISK, Path(row.disk_path)
            num_bytes, count = row.num_bytes, row.tensor_count
        else:
            payload = self.registry.fetch(key)
            if payload is None:
                return None
            entry = self.cache.remember(key, payload, new_generation())
            gen, location, path = entry.gen, SHMLocation.SHM, None
            num_bytes, count = sum(tensor_nbytes(t) for t in entry.tensors), len(entry.tensors)
        ids = ObjectIds()
        if row is not None:
            ids = ObjectIds(row.experiment_id, row.run_id, row.chunk_id)
        meta = ObjectMeta.new(
            gen=gen,
            location=location,
            path=path,
            num_bytes=num_bytes,
            tensor_count=count,
            ids=ids,
            object_type=row.object_type if row is not None else SHMObjectType.CHECKPOINT,
            manager_name=row.manager_name if row is not None and row.manager_name else self.name,
        )
        self.registry.set_meta(key, meta)
        return meta

    # --- the rows, lock released --------------------------------------------------------

    def repair_rows(
        self, mine: list["SHMObjectRecord"], rows_by_key: dict[str, "SHMObjectRecord"], scan: Optional[RegistryScan]
    ) -> ReconcileReport:
        """The database half, without the lock (``scan`` None: the registry is gone)."""
        alive = scan is not None
        metas: dict[str, ObjectMeta] = scan.metas if scan is not None else {}
        removed: list[str] = list(scan.removed) if scan is not None else []
        missing: list[str] = list(scan.missing) if scan is not None else []
        adopted: list[str] = []
        repaired: list[str] = []
        ok = 0
        if self.db is not None:
            to_remove: list[str] = []
            for row in mine:
                meta = metas.get(row.key)
                if row.location == SHMLocation.SHM:
                    present = scan is not None and row.key in scan.payload_keys and row.key not in scan.drop_rows
                else:
                    present = bool(row.disk_path) and os.path.exists(row.disk_path)
                if meta is not None and meta.location != row.location:
                    present = True  # the registry moved it; the row is repaired below
                if not present:
                    to_remove.append(row.key)
                    if row.location == SHMLocation.DISK:
                        missing.append(row.key)
                    continue
                if not alive or meta is None:
                    ok += 1
                    continue
                if meta.disagrees_with(row):
                    write_row(self.db, row.key, meta)
                    follow_row(self.db, self.registry, row.key, meta)
                    repaired.append(row.key)
                else:
                    ok += 1
            if to_remove:
                self.db.delete_shm_objects(to_remove)
                self.cache.drop(*to_remove)
                removed.extend(to_remove)
                if alive:
                    for key in to_remove:
                        follow_row(self.db, self.registry, key, None)  # stored again since the scan?
        if scan is not None:
            for unrowed in scan.unrowed:
                if self.db is not None:
                    write_row(self.db, unrowed.key, unrowed.meta)
                    follow_row(self.db, self.registry, unrowed.key, unrowed.meta)
                    adopted.append(unrowed.key)
                elif not unrowed.had_meta:
                    adopted.append(unrowed.key)
                else:
                    ok += 1
        temps = self._sweep_temp_files(metas, rows_by_key) + (list(scan.journals) if scan is not None else [])
        return ReconcileReport(
            removed=tuple(removed),
            missing_files=tuple(missing),
            adopted=tuple(adopted),
            repaired=tuple(repaired),
            ok=ok,
            registry_alive=alive,
            removed_temp_files=tuple(temps),
            skipped=tuple(scan.skipped) if scan is not None else (),
            dropped_elsewhere=tuple(scan.elsewhere) if scan is not None else (),
        )

    def _sweep_temp_files(self, metas: dict[str, ObjectMeta], rows_by_key: dict[str, "SHMObjectRecord"]) -> list[str]:
        directories = {spill_dir(self.name)}
        for meta in metas.values():
            if meta.path:
                directories.add(Path(meta.path).parent)
        here = this_host()
        for row in rows_by_key.values():
            # another host's directories may hold its writers' temp files: their pids mean nothing here
            if row.disk_path and row.manager_name == self.name and not row.held_elsewhere(here):
                directories.add(Path(row.disk_path).parent)
        return sweep_temp_files(directories)
