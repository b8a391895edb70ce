"""The plumbing of :class:`~rapidfire_state.db.StateDB`: opening, units of work, reads.

Transaction discipline
----------------------
* Every public write method is one unit of work run by :meth:`StoreCore._write`:
  a fresh connection, ``BEGIN IMMEDIATE`` on SQLite, commit on success.  A unit
  that meets a busy database (or a PostgreSQL serialization failure/deadlock) is
  run again whole, with jittered exponential backoff
  (:func:`~rapidfire_state.db.engine.retry_while_busy`, the one busy-retry loop,
  also used by the prepared SQLite path), until ``DBConfig.WRITE_RETRY_SECONDS``
  have passed.
* Helpers that take a connection are named ``…_without_commit`` (or ``load_…`` for
  reads) and never commit.
* The store speaks SQLAlchemy Core to the tables of :mod:`rapidfire_state.db.schema`;
  the ORM is loaded only by :meth:`StoreCore.session` / :meth:`StoreCore.transaction`.
* Status changes are built by :mod:`.status_change` alone.
"""

from __future__ import annotations

import os
import threading
import weakref
from contextlib import contextmanager
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, Sequence, TypeVar

from sqlalchemy import select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from rapidfire_state.constants import DBConfig
from rapidfire_state.db.engine import (
    WRITE_OPTION,
    create_state_engine,
    is_retryable,
    is_unique_violation,
    resolve_url,
    retry_while_busy,
    sqlite_file,
)
from rapidfire_state.db.fastpath import PostgreSQLPreparedWriter, SQLitePreparedWriter
from rapidfire_state.db.records import SHMObjectRecord
from rapidfire_state.db.schema import db_now
from rapidfire_state.db.store.lookups import MISSING_COLUMNS_KEY, columns_missing_at, update_columns_without_commit
from rapidfire_state.db.store.status_change import Entity, StatusChange, change_one_prepared
from rapidfire_state.exceptions import DBException, RapidFireError, ReadOnlyError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session  # noqa: F401  (annotations only: the ORM loads lazily)

T = TypeVar("T")

_LIVE_DATABASES: "weakref.WeakSet[StoreCore]" = weakref.WeakSet()


def _dispose_after_fork() -> None:
    # A forked child must not reuse the parent's pooled connections.
    for database in list(_LIVE_DATABASES):
        database._engine.dispose(close=False)
        if database._write_engine is not None:
            database._write_engine = database._engine.execution_options(**{WRITE_OPTION: True})


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_dispose_after_fork)


class StoreCore:
    """Opening, closing, units of work and reads; the entity stores build on it."""

    def __init__(self, url: Any = None, *, auto_upgrade: Optional[bool] = None, read_only: bool = False):
        self._url = resolve_url(url)
        self._auto_upgrade = auto_upgrade
        self._read_only = bool(read_only)
        self._closed = False
        self._prepared_writer: Optional[SQLitePreparedWriter | PostgreSQLPreparedWriter] = None
        self._file_path: Optional[str] = None
        self._file_identity: Optional[tuple[int, int]] = None
        self._cleanup_hooks: list[Callable[[Sequence[SHMObjectRecord]], None]] = []
        self._hooks_lock = threading.Lock()
        #: ``(from_revision, to_revision)`` when this instance migrated the database
        self.last_migration: Optional[tuple[Optional[str], str]] = None
        #: the SQLite backup taken before an upgrade by this instance
        self.backup_path: Optional[str] = None
        #: read-only instances: what was found on opening (its ``revision``, ``status``)
        self.probe: Any = None
        #: read-only instances of a database behind head: the columns it has not yet ({table: names})
        self._missing_columns: dict[str, frozenset[str]] = {}
        from rapidfire_state.db import migrate

        if self._read_only:
            # Readers: the database must exist and have a known revision; one behind
            # head is read as it is.  No migration, no backup, no file is created.
            self._engine = create_state_engine(self._url, read_only=True)
            self._write_engine = None
            try:
                self.probe = migrate.check_readable(self._url, self._engine)
                self._missing_columns = columns_missing_at(self.probe)
            except BaseException:
                self._engine.dispose()
                raise
            _LIVE_DATABASES.add(self)
            return

        self._engine = create_state_engine(self._url)
        self._write_engine = self._engine.execution_options(**{WRITE_OPTION: True})
        if self.is_sqlite and self.sqlite_path is not None:
            self._prepared_writer = SQLitePreparedWriter(
                self.sqlite_path, self._engine.dialect, int(DBConfig.BUSY_TIMEOUT_MS),
                lambda: float(DBConfig.WRITE_RETRY_SECONDS), check_file=self._check_file,
            )
        elif self.dialect == "postgresql":
            self._prepared_writer = PostgreSQLPreparedWriter(
                self._engine, self.url_text, lambda: float(DBConfig.WRITE_RETRY_SECONDS)
            )
        try:
            outcome = migrate.ensure_schema(self, auto_upgrade=auto_upgrade)
            self.last_migration = outcome.migrated
            self.backup_path = outcome.backup_path
            if self.is_sqlite and self.sqlite_path is not None:
                # the file every write of this instance must still go to (see _check_file)
                self._file_path = self.sqlite_path
                self._file_identity = _file_identity(self._file_path)
        except SQLAlchemyError as exc:
            # e.g. a refused connection: one line naming the database, not a traceback
            self._engine.dispose()
            raise DBException(f"cannot open {self.url_text}: {migrate.driver_message(exc)}") from exc
        except BaseException:
            self._engine.dispose()
            raise
        _LIVE_DATABASES.add(self)

    def _check_file(self) -> None:
        """Refuse a write when the SQLite file was deleted or replaced since it was opened.

        Called with the write lock held.  A connection opened before keeps writing
        to the old (unlinked) file, where every change would be lost without a
        word; a connection opened since would write to a file this instance never
        checked.  Either way: refuse, naming the file.
        """
        expected = self._file_identity
        if expected is None:
            return
        try:
            found = _file_identity(self._file_path)
        except FileNotFoundError:
            found = None
        if found == expected:
            return
        what = "deleted" if found is None else "replaced by another file"
        raise DBException(
            f"the database file {self._file_path!r} was {what} after {self!r} opened it; nothing was "
            "written (the write would be lost): open StateDB again"
        )

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    @property
    def read_only(self) -> bool:
        """True when opened with ``read_only=True``: writes raise :class:`ReadOnlyError`."""
        return self._read_only

    # --- plumbing ------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"StateDB({self.url_text!r})"

    def __reduce__(self) -> tuple:
        return (_reopen, (type(self), self._url.render_as_string(hide_password=False), self._auto_upgrade, self._read_only))

    @property
    def url(self) -> Any:
        """The SQLAlchemy URL of the database."""
        return self._url

    @property
    def url_text(self) -> str:
        """The URL as text with any password hidden."""
        return self._url.render_as_string(hide_password=True)

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (reads begin deferred)."""
        return self._engine

    @property
    def dialect(self) -> str:
        return self._url.get_backend_name()

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @property
    def sqlite_path(self) -> Optional[str]:
        path = sqlite_file(self._url)
        return str(path) if path is not None else None

    def close(self) -> None:
        """Close every pooled connection; the instance may not be used afterwards."""
        self._closed = True
        self._engine.dispose()
        self._write_engine = None
        if self._prepared_writer is not None:
            self._prepared_writer.close()
            self._prepared_writer = None
        _LIVE_DATABASES.discard(self)

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def schema_revision(self) -> Optional[str]:
        """The Alembic revision the database is at (None when unversioned)."""
        from rapidfire_state.db import migrate

        if self._read_only:  # the readers' probe leaves no -wal/-shm behind
            return migrate.probe_database(self._url, self._engine).revision
        return migrate.current_revision(self)

    def upgrade(self, revision: str = "head") -> None:
        """Migrate to ``revision`` (SQLite: the whole upgrade is one transaction)."""
        from rapidfire_state.db import migrate

        self._refuse_read_only("upgrade")
        migrate.run_upgrade(self, revision)

    def downgrade(self, revision: str) -> None:
        """Migrate down to ``revision`` (``"base"`` drops everything)."""
        from rapidfire_state.db import migrate

        self._refuse_read_only("downgrade")
        migrate.run_downgrade(self, revision)

    def _refuse_read_only(self, what: str) -> None:
        if self._read_only:
            raise ReadOnlyError(f"cannot {what} {self.url_text}: it was opened read-only")

    @contextmanager
    def session(self) -> Iterator["Session"]:
        """A read session: a deferred transaction that never takes the write lock.

        The ORM classes of :mod:`rapidfire_state.db.models` may be queried in it
        (the ORM is loaded on first use).  Writes belong in :meth:`transaction`.
        """
        from sqlalchemy.orm import Session

        session = Session(self._engine, expire_on_commit=False, autoflush=False)
        try:
            yield session
        finally:
            session.close()

    @contextmanager
    def _write_connection(self) -> Iterator[Connection]:
        """A connection inside ``BEGIN IMMEDIATE`` (SQLite), committed on success.

        Waiting for the write lock is retried here, before the body runs.
        """
        write_engine = self._write_engine
        if write_engine is None:
            if self._read_only:
                raise ReadOnlyError(f"{self!r} was opened read-only; open StateDB(url) to write")
            raise DBException(f"{self!r} is closed")

        def begin() -> Connection:
            conn = write_engine.connect()
            try:
                conn.begin()  # emits BEGIN IMMEDIATE: take the write lock now
            except BaseException:
                conn.close()
                raise
            return conn

        try:
            conn = retry_while_busy(
                begin, retryable=is_retryable, retry_seconds=float(DBConfig.WRITE_RETRY_SECONDS)
            )
        except SQLAlchemyError as exc:
            raise DBException(f"cannot begin a write transaction on {self.url_text}: {exc}") from exc
        if self._file_identity is not None:
            try:
                self._check_file()
            except BaseException:
                conn.rollback()
                conn.close()
                raise
        try:
            yield conn
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        finally:
            conn.close()

    @contextmanager
    def transaction(self) -> Iterator["Session"]:
        """One write unit as an ORM session: ``BEGIN IMMEDIATE`` on SQLite, commit on success.

        Waiting for the write lock is retried here before the body runs; the
        body itself runs once.  For a unit that may be retried whole, use
        :meth:`run_in_transaction`.
        """
        from sqlalchemy.orm import Session

        with self._write_connection() as conn:
            # The session joins the connection's transaction; the connection commits.
            session = Session(bind=conn, expire_on_commit=False, autoflush=False)
            try:
                yield session
                session.flush()
            finally:
                session.close()

    def run_in_transaction(self, unit: Callable[["Session"], T], *, retry_on_unique: bool = False) -> T:
        """Run ``unit(session)`` as one write transaction, retried whole when busy.

        Retried on a busy/locked SQLite database, a PostgreSQL serialization
        failure or deadlock, and (when ``retry_on_unique``) a UNIQUE violation.
        Other driver errors are raised as :class:`DBException`.
        """

        def attempt() -> T:
            with self.transaction() as session:
                return unit(session)

        return self._retrying(attempt, retry_on_unique=retry_on_unique)

    def _write(self, unit: Callable[[Connection], T], *, retry_on_unique: bool = False) -> T:
        """The store's own units: Core statements on a write connection, retried whole."""

        def attempt() -> T:
            with self._write_connection() as conn:
                return unit(conn)

        return self._retrying(attempt, retry_on_unique=retry_on_unique)

    def _retrying(self, attempt: Callable[[], T], *, retry_on_unique: bool) -> T:
        def retryable(exc: BaseException) -> bool:
            return isinstance(exc, SQLAlchemyError) and (
                is_retryable(exc) or (retry_on_unique and is_unique_violation(exc))
            )

        try:
            return retry_while_busy(
                attempt, retryable=retryable, retry_seconds=float(DBConfig.WRITE_RETRY_SECONDS)
            )
        except RapidFireError:
            raise
        except SQLAlchemyError as exc:
            raise _wrap(exc, self) from exc

    def _read(self, unit: Callable[[Connection], T]) -> T:
        try:
            with self._engine.connect() as conn:  # deferred BEGIN: never the write lock
                if self._missing_columns:
                    # what lookups.all_columns selects on this reader's older schema
                    conn.info[MISSING_COLUMNS_KEY] = self._missing_columns
                return unit(conn)
        except RapidFireError:
            raise
        except SQLAlchemyError as exc:
            raise _wrap(exc, self) from exc

    def _apply_change(
        self,
        change: StatusChange,
        entity_id: int,
        params: Mapping[str, Any],
        reason: Optional[str],
        general: Callable[[Connection], Mapping[str, Any]],
        record: Any,
        record_extra: Mapping[str, Any] = MappingProxyType({}),
    ) -> Any:
        """One status change as one unit: the prepared path when it applies, else ``general(conn)``.

        ``general`` applies the change on a write connection (explaining any
        refusal) and returns the whole row; either way the result is the
        changed row's ``record``.
        """
        prepared = change_one_prepared(
            self._prepared_writer, change, entity_id, params=params, reason=reason, record=record,
            record_extra=record_extra,
        )
        if prepared is not None:
            return prepared
        return self._write(lambda conn: record.from_row(general(conn), **record_extra))

    def _set_columns(
        self, entity: Entity, entity_id: int, load: Callable[[Connection, int], T], **values: Any
    ) -> T:
        """Set columns other than the status (and ``updated_at``) of one row, as one unit; its record after.

        :class:`NotFoundError` when the row does not exist.
        """

        def unit(conn: Connection) -> T:
            update_columns_without_commit(
                conn, entity.table, entity.key_column == entity_id, values={**values, "updated_at": db_now()},
                missing=(entity.name, entity_id),
            )
            return load(conn, entity_id)

        return self._write(unit)

    def now(self) -> Any:
        """The database clock (UTC, aware)."""
        return self._read(lambda s: s.execute(select(db_now())).scalar_one())


def _reopen(cls: type, url: str, auto_upgrade: Optional[bool], read_only: bool = False) -> Any:
    """Unpickle a database handle: instances pickle as their class, URL and options."""
    return cls(url, auto_upgrade=auto_upgrade, read_only=read_only)


def _wrap(exc: SQLAlchemyError, database: StoreCore) -> DBException:
    orig = getattr(exc, "orig", None)
    detail = str(orig) if orig is not None else str(exc)
    return DBException(f"database error on {database.url_text}: {detail}")


def _file_identity(path: str) -> tuple[int, int]:
    """``(st_dev, st_ino)`` of ``path``: the same file, not just the same name."""
    status = os.stat(path)
    return status.st_dev, status.st_ino
