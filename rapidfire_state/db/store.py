"""``StateDB``: the one entry point to the state database.

Transaction discipline
----------------------
* Every public write method is one unit of work run by :meth:`StateDB._write`:
  a fresh connection, ``BEGIN IMMEDIATE`` on SQLite, commit on success.  A unit that
  meets a busy database (or a PostgreSQL serialization failure/deadlock) is run
  again whole, with jittered exponential backoff, until
  ``DBConfig.WRITE_RETRY_SECONDS`` have passed.
* Helpers that take a connection (``_cas``, ``_record_transition``, ...) never commit.
* The store speaks SQLAlchemy Core to the tables of :mod:`rapidfire_state.db.schema`;
  the ORM is loaded only by :meth:`StateDB.session` / :meth:`StateDB.transaction`.
* Status changes are single compare-and-set statements
  (``UPDATE … SET previous_status = status, status = :to WHERE id = :id AND
  status IN (:allowed) RETURNING …``) plus one history row in the same
  transaction; legality is decided by the database, never by a prior read.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import secrets
import socket
import threading
import time
import weakref
from contextlib import contextmanager
from enum import Enum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, TypeVar

from sqlalchemy import String, Table, bindparam, func, insert, literal_column, null, or_, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from rapidfire_state import states
from rapidfire_state.constants import (
    ControllerTask,
    DBConfig,
    ExperimentStatus,
    ExperimentTask,
    RunEndedBy,
    RunSource,
    RunStatus,
    SHMLocation,
    SHMObjectType,
    TaskStatus,
    WorkerTask,
)
from rapidfire_state.datapaths import MAX_COMPONENT_LENGTH, validate_component
from rapidfire_state.db.engine import (
    WRITE_OPTION,
    create_state_engine,
    is_retryable,
    is_unique_violation,
    resolve_url,
    retry_while_busy,
    sqlite_file,
)
from rapidfire_state.db import schema as tables
from rapidfire_state.db.schema import TRANSITION_ENTITIES, db_now
from rapidfire_state.db.fastpath import SQLitePreparedWriter
from rapidfire_state.db.records import (
    CleanupReport,
    ExperimentRecord,
    RunRecord,
    SHMObjectRecord,
    StaleWorkerReport,
    TaskRecord,
    TransitionRecord,
    WorkerRecord,
)
from rapidfire_state.exceptions import (
    ConfigError,
    DataPathException,
    DBException,
    ExperimentException,
    InvalidTransitionError,
    NotFoundError,
    RapidFireError,
    ReadOnlyError,
    WorkerException,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session  # noqa: F401  (annotations only: the ORM loads lazily)

T = TypeVar("T")

DEFAULT_EXPERIMENT_NAME = "rf-exp"
MAX_EXPERIMENT_NAME_LENGTH = MAX_COMPONENT_LENGTH
_SUFFIX_PATTERN = re.compile(r"^(?P<stem>.+)_(?P<n>\d+)$")

#: the counters ``update_run_progress`` may set, and their kinds
PROGRESS_COUNTERS: Mapping[str, type] = {
    "completed_steps": int,
    "total_steps": int,
    "num_chunks_visited": int,
    "num_epochs_completed": int,
    "chunk_offset": int,
    "estimated_runtime": float,
    "required_workers": int,
    "progress": float,
}

_HOST = socket.gethostname()


class _Machine:
    """How one entity's status column is changed: its table, key and state machine."""

    def __init__(self, entity: str, machine: str, table: Table, key: str):
        self.entity = entity
        self.machine = machine
        self.table = table
        self.key = key

    @property
    def key_column(self) -> Any:
        return self.table.c[self.key]


_EXPERIMENT = _Machine("experiment", "experiment", tables.experiments, "experiment_id")
_RUN = _Machine("run", "run", tables.runs, "run_id")
_WORKER_TASK = _Machine("worker_task", "task", tables.worker_tasks, "task_id")
_CONTROLLER_TASK = _Machine("controller_task", "task", tables.controller_tasks, "task_id")
_TASK_MACHINES = {"worker": _WORKER_TASK, "controller": _CONTROLLER_TASK}
_HISTORY_MACHINES = {m.entity: m for m in (_EXPERIMENT, _RUN, _WORKER_TASK, _CONTROLLER_TASK)}

_OPEN_TASK_STATUSES = (TaskStatus.PENDING.value, TaskStatus.SCHEDULED.value, TaskStatus.IN_PROGRESS.value)

_LIVE_DATABASES: "weakref.WeakSet[StateDB]" = weakref.WeakSet()

# Statements built once and reused: SQLAlchemy memoises a statement object's
# cache key, so a reused object skips construction, coercion and cache-key work.
_INSERT_TRANSITION = insert(tables.state_transitions).values(
    entity=bindparam("entity"),
    entity_id=bindparam("entity_id"),
    from_status=bindparam("from_status"),
    to_status=bindparam("to_status"),
    at=db_now(),
    pid=bindparam("pid"),
    host=bindparam("host"),
    reason=bindparam("reason"),
)
_CAS_STATEMENTS: dict[tuple, Any] = {}
_CAS_PLANS: dict[tuple, tuple] = {}


def _dispose_after_fork() -> None:
    # A forked child must not reuse the parent's pooled connections.
    for database in list(_LIVE_DATABASES):
        database._engine.dispose(close=False)
        if database._write_engine is not None:
            database._write_engine = database._engine.execution_options(**{WRITE_OPTION: True})


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_dispose_after_fork)


def validate_experiment_name(name: Any) -> str:
    """The cleaned experiment name, or :class:`ExperimentException` naming the value.

    A name becomes a directory under ``experiments_path``, so it must be one
    safe path component (:func:`rapidfire_state.datapaths.validate_component`):
    at most 128 ASCII letters, digits, ``-``, ``_``, ``.``; no leading dot, no
    ``..``.  Surrounding whitespace is stripped; an empty name becomes ``rf-exp``.
    """
    if name is None:
        return DEFAULT_EXPERIMENT_NAME
    if not isinstance(name, str):
        raise ExperimentException(f"experiment name {name!r} is a {type(name).__name__}; a str is required")
    cleaned = name.strip()
    if cleaned == "":
        return DEFAULT_EXPERIMENT_NAME
    try:
        return validate_component(cleaned, "experiment name")
    except DataPathException as exc:
        raise ExperimentException(str(exc)) from None


#: the largest value of the schema's INTEGER columns (PostgreSQL's int4; SQLite would take
#: more, but a value the other backend refuses is refused on both, naming it)
_MAX_INTEGER = 2**31 - 1


def _check_id(name: str, value: Any, *, optional: bool = False) -> Optional[int]:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name}={value!r} is not valid; a non-negative int is required")
    if value > _MAX_INTEGER:
        raise ConfigError(f"{name}={value!r} is not valid; an int from 0 to {_MAX_INTEGER} is required")
    return value


def _enum_value(enum_cls: type, value: Any, what: str) -> str:
    if isinstance(value, enum_cls):
        return value.value
    # the exact string value, never another enum that happens to share it
    # (ControllerTask.RUN_FIT is not an ExperimentTask), as states.coerce_status
    if isinstance(value, str) and not isinstance(value, Enum):
        try:
            return enum_cls(value).value
        except ValueError:
            pass
    allowed = ", ".join(member.value for member in enum_cls)
    raise ConfigError(f"{what} {value!r} is not a {enum_cls.__name__}; allowed: {allowed}")


class StateDB:
    """The state database of one deployment (SQLite file or PostgreSQL).

    ``StateDB(url=None, *, auto_upgrade=None, read_only=False)``: ``url`` defaults
    to ``$RF_DB_URL``, else ``$RF_HOME/db/rapidfire_state.db``.  Opening for
    writing applies the open policy of :mod:`rapidfire_state.db.migrate` (empty →
    migrate under a lock; behind → SQLite backed up then upgraded, a server
    database refused unless ``auto_upgrade=True``; unknown/newer →
    :class:`SchemaTooNewError`).

    ``read_only=True`` is how readers open: it never creates, migrates or backs
    up anything (a missing or empty database raises
    :class:`DatabaseMissingError`, an unknown revision :class:`SchemaTooNewError`,
    one behind head is read as it is and :attr:`probe` says so), its connections
    refuse writes, and every write method raises :class:`ReadOnlyError`.

    Reads go through :meth:`session`, writes through :meth:`transaction` or the
    store methods, each of which is one unit of work.  Instances pickle as
    their URL, so they can be handed to spawned processes.
    """

    def __init__(self, url: Any = None, *, auto_upgrade: Optional[bool] = None, read_only: bool = False):
        self._url = resolve_url(url)
        self._auto_upgrade = auto_upgrade
        self._read_only = bool(read_only)
        self._prepared_writer: Optional[SQLitePreparedWriter] = None
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
        from rapidfire_state.db import migrate

        if self._read_only:
            # Readers: the database must exist and have a known revision; one behind
            # head is read as it is.  No migration, no backup, no file is created.
            self._engine = create_state_engine(self._url, read_only=True)
            self._write_engine = None
            try:
                self.probe = migrate.check_readable(self._url, self._engine)
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
        try:
            migrate.ensure_schema(self, auto_upgrade=auto_upgrade)
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
    def read_only(self) -> bool:
        """True when opened with ``read_only=True``: writes raise :class:`ReadOnlyError`."""
        return self._read_only

    # --- plumbing ------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"StateDB({self.url_text!r})"

    def __reduce__(self) -> tuple:
        return (_reopen, (self._url.render_as_string(hide_password=False), self._auto_upgrade, self._read_only))

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
        self._engine.dispose()
        self._write_engine = None
        if self._prepared_writer is not None:
            self._prepared_writer.close()
            self._prepared_writer = None
        _LIVE_DATABASES.discard(self)

    def __enter__(self) -> "StateDB":
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
                return unit(conn)
        except RapidFireError:
            raise
        except SQLAlchemyError as exc:
            raise _wrap(exc, self) from exc

    def now(self) -> Any:
        """The database clock (UTC, aware)."""
        return self._read(lambda s: s.execute(select(db_now())).scalar_one())

    # --- generic compare-and-set -------------------------------------------------------

    def _cas(
        self,
        conn: Connection,
        machine: _Machine,
        entity_id: Any,
        to: Any,
        *,
        expected: Optional[Iterable[Any]] = None,
        values: Optional[dict[str, Any]] = None,
        extra_where: Sequence[Any] = (),
        reason: Optional[str] = None,
        blocked_detail: Optional[Callable[[Any], Optional[str]]] = None,
        params: Optional[Mapping[str, Any]] = None,
        cacheable: bool = False,
    ) -> tuple[Optional[Any], Mapping[str, Any]]:
        """Move one row to ``to`` if its status allows it; never commits.

        Returns ``(from_status, row)``; ``from_status`` is None when the row
        already had status ``to`` (an idempotent repeat: nothing written).

        ``params`` binds the ``bindparam()`` placeholders of ``values``.  With
        ``cacheable`` the caller guarantees that the SQL of ``values`` and
        ``extra_where`` depends only on the entity, ``to``, the keys of
        ``values`` and the number of ``extra_where`` clauses (every other datum
        goes through ``params``): the UPDATE is then built once and reused, so
        SQLAlchemy neither rebuilds it nor recomputes its cache key.
        """
        _check_id(f"{machine.entity}_id", entity_id)
        to_status = states.coerce_status(machine.machine, to)
        allowed, cas_from, expected_set, statement = _cas_plan(
            machine, to_status, expected, values or {}, extra_where, cacheable
        )
        table = machine.table
        row = None
        bound = {"rf_entity_id": entity_id, **(params or {})}
        # On PostgreSQL (READ COMMITTED) the UPDATE may miss a row that a
        # concurrent transaction moved away and another moved back before our
        # re-read; the re-read then shows a status the compare-and-set accepts.
        # Compare-and-set again (a few times at most) rather than report a
        # refusal that names an allowed status.
        for _attempt in range(3):
            if cas_from:
                row = conn.execute(statement, bound).mappings().first()
            if row is not None:
                from_status = states.coerce_status(machine.machine, row["previous_status"])
                self._record_transition(conn, machine.entity, entity_id, from_status.value, to_status.value, reason)
                return from_status, row
            current_row = conn.execute(select(table).where(machine.key_column == entity_id)).mappings().first()
            if current_row is None:
                raise NotFoundError(machine.entity, entity_id)
            current = states.coerce_status(machine.machine, current_row["status"])
            if current == to_status:
                return None, current_row
            if current not in cas_from:
                break
        detail = blocked_detail(current_row) if blocked_detail else None
        if expected_set is not None and current in allowed and current not in cas_from:
            detail = f"expected one of {', '.join(sorted(str(e) for e in expected_set))}"
        raise InvalidTransitionError(machine.entity, entity_id, current, to_status, sorted(allowed, key=str), detail)

    def _prepared_cas(
        self,
        machine: _Machine,
        entity_id: Any,
        to_status: Any,
        *,
        expected: Optional[Iterable[Any]],
        values: Mapping[str, Any],
        extra_where: Sequence[Any],
        params: Mapping[str, Any],
        reason: Optional[str],
        record: type,
        record_extra: Mapping[str, Any] = MappingProxyType({}),
    ) -> Optional[Any]:
        """The whole unit of a status change on SQLite's prepared path.

        Returns the changed row's ``record`` (``record.from_row(row,
        **record_extra)``, built straight from the driver's tuple), or None when
        the prepared path does not apply or the compare-and-set matched
        nothing: the caller then runs the general unit, which explains the
        refusal (or the idempotent repeat).
        """
        writer = self._prepared_writer
        if writer is None:
            return None
        _check_id(f"{machine.entity}_id", entity_id)
        _, _, _, statement = _cas_plan(machine, to_status, expected, values, extra_where, True)
        if statement is None:
            return None

        def history(previous_status: Any) -> dict[str, Any]:
            return {
                "entity": machine.entity, "entity_id": entity_id, "from_status": previous_status,
                "to_status": to_status.value, "pid": os.getpid(), "host": _HOST, "reason": reason,
            }

        update = writer.prepare(statement)
        return writer.compare_and_set(
            update, {"rf_entity_id": entity_id, **params}, writer.prepare(_INSERT_TRANSITION), history,
            record=update.loader(record, **record_extra),
        )

    @staticmethod
    def _record_transition(
        conn: Connection,
        entity: str,
        entity_id: int,
        from_status: Optional[str],
        to_status: str,
        reason: Optional[str],
    ) -> None:
        conn.execute(
            _INSERT_TRANSITION,
            {
                "entity": entity,
                "entity_id": entity_id,
                "from_status": from_status,
                "to_status": to_status,
                "pid": os.getpid(),
                "host": _HOST,
                "reason": reason,
            },
        )

    # --- experiments -------------------------------------------------------------------

    def create_experiment(
        self,
        name: Any,
        experiments_path: Any,
        *,
        config_options: Optional[dict] = None,
        unique: bool = False,
        owner_pid: Optional[int] = None,
        owner_host: Optional[str] = None,
    ) -> ExperimentRecord:
        """Insert a NEW experiment named ``name``.

        With ``unique=False`` a taken name raises :class:`ExperimentException`.
        With ``unique=True`` the name is made unique in the same transaction
        that inserts it: ``my_exp`` → ``my_exp_1`` → ``my_exp_2``; a taken
        ``name_N`` continues from the highest ``name_<k>`` in use.
        """
        cleaned = validate_experiment_name(name)
        if not isinstance(experiments_path, (str, os.PathLike)) or str(experiments_path).strip() == "":
            raise ExperimentException(f"experiments_path {experiments_path!r} is not a path")
        if config_options is not None and not isinstance(config_options, dict):
            raise ConfigError(f"config_options {config_options!r} is not a dict")
        path_text = os.path.abspath(os.fspath(experiments_path))

        def unit(conn: Connection) -> ExperimentRecord:
            chosen = self._unique_name(conn, cleaned) if unique else cleaned
            try:
                with conn.begin_nested():
                    experiment_id = conn.execute(
                        insert(tables.experiments)
                        .values(
                            name=chosen,
                            status=ExperimentStatus.NEW.value,
                            current_task=ExperimentTask.IDLE.value,
                            experiments_path=path_text,
                            config_options=config_options,
                            owner_pid=owner_pid,
                            owner_host=owner_host,
                        )
                        .returning(tables.experiments.c.experiment_id)
                    ).scalar_one()
            except IntegrityError as exc:
                if is_unique_violation(exc) and not unique:
                    raise ExperimentException(
                        f"experiment name {chosen!r} is already taken; choose another name or pass unique=True"
                    ) from exc
                raise
            self._record_transition(conn, "experiment", experiment_id, None, ExperimentStatus.NEW.value, "created")
            return self._experiment(conn, experiment_id)

        return self._write(unit, retry_on_unique=unique)

    @staticmethod
    def _unique_name(conn: Connection, name: str) -> str:
        table = tables.experiments
        taken = conn.execute(select(table.c.name).where(table.c.name == name)).first()
        if taken is None:
            return name
        match = _SUFFIX_PATTERN.match(name)
        stem, start = (match["stem"], int(match["n"]) + 1) if match else (name, 1)
        escaped = stem.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        family = conn.execute(
            select(table.c.name).where(table.c.name.like(f"{escaped}\\_%", escape="\\"))
        ).scalars()
        highest = start - 1
        prefix = f"{stem}_"
        for existing in family:
            suffix = existing[len(prefix):]
            if suffix.isdigit():
                highest = max(highest, int(suffix))
        candidate = f"{stem}_{highest + 1}"
        if len(candidate) > MAX_EXPERIMENT_NAME_LENGTH:
            raise ExperimentException(
                f"no unique name can be made from {name!r} within {MAX_EXPERIMENT_NAME_LENGTH} characters"
            )
        return candidate

    def _experiment(self, conn: Connection, experiment_id: int) -> ExperimentRecord:
        row = conn.execute(
            select(tables.experiments).where(tables.experiments.c.experiment_id == experiment_id)
        ).mappings().first()
        if row is None:
            raise NotFoundError("experiment", experiment_id)
        return ExperimentRecord.from_row(row)

    def get_experiment(self, experiment_id: int) -> ExperimentRecord:
        """The experiment, or :class:`NotFoundError`."""
        _check_id("experiment_id", experiment_id)
        return self._read(lambda s: self._experiment(s, experiment_id))

    def get_experiment_by_name(self, name: str) -> ExperimentRecord:
        """The experiment called ``name``, or :class:`NotFoundError`."""
        if not isinstance(name, str):
            raise ConfigError(f"experiment name {name!r} is not a str")

        def unit(conn: Connection) -> ExperimentRecord:
            row = conn.execute(
                select(tables.experiments).where(tables.experiments.c.name == name)
            ).mappings().first()
            if row is None:
                raise NotFoundError("experiment", name)
            return ExperimentRecord.from_row(row)

        return self._read(unit)

    def get_running_experiment(self) -> Optional[ExperimentRecord]:
        """The one RUNNING experiment, or None."""

        def unit(conn: Connection) -> Optional[ExperimentRecord]:
            row = conn.execute(
                select(tables.experiments).where(tables.experiments.c.status == ExperimentStatus.RUNNING.value)
            ).mappings().first()
            return ExperimentRecord.from_row(row) if row is not None else None

        return self._read(unit)

    def list_experiments(self, statuses: Optional[Iterable[Any]] = None) -> list[ExperimentRecord]:
        """All experiments, oldest first, optionally only those with ``statuses``."""
        wanted = self._statuses("experiment", statuses)
        table = tables.experiments

        def unit(conn: Connection) -> list[ExperimentRecord]:
            query = select(table).order_by(table.c.experiment_id)
            if wanted is not None:
                query = query.where(table.c.status.in_(wanted))
            return [ExperimentRecord.from_row(r) for r in conn.execute(query).mappings()]

        return self._read(unit)

    def transition_experiment(
        self,
        experiment_id: int,
        to: Any,
        *,
        error: Optional[str] = None,
        reason: Optional[str] = None,
        expected: Optional[Iterable[Any]] = None,
    ) -> ExperimentRecord:
        """Compare-and-set the experiment's status (NEW → RUNNING → COMPLETED/FAILED)."""
        to_status = states.coerce_status("experiment", to)

        def unit(conn: Connection) -> ExperimentRecord:
            self._transition_experiment(conn, experiment_id, to_status, error=error, reason=reason, expected=expected)
            return self._experiment(conn, experiment_id)

        return self._write(unit)

    def _transition_experiment(
        self,
        conn: Connection,
        experiment_id: int,
        to_status: ExperimentStatus,
        *,
        error: Optional[str] = None,
        reason: Optional[str] = None,
        expected: Optional[Iterable[Any]] = None,
    ) -> Optional[Any]:
        table = tables.experiments
        values: dict[str, Any] = {"updated_at": db_now()}
        if to_status == ExperimentStatus.RUNNING:
            values["started_at"] = func.coalesce(table.c.started_at, db_now())
        if to_status in states.terminal_states("experiment"):
            values["ended_at"] = db_now()
            values["current_task"] = ExperimentTask.IDLE.value
        if error is not None:
            values["error"] = str(error)
        try:
            with conn.begin_nested():
                from_status, _ = self._cas(
                    conn, _EXPERIMENT, experiment_id, to_status, expected=expected, values=values, reason=reason
                )
        except IntegrityError as exc:
            if to_status == ExperimentStatus.RUNNING and is_unique_violation(exc):
                running = conn.execute(
                    select(table.c.experiment_id, table.c.name).where(table.c.status == ExperimentStatus.RUNNING.value)
                ).first()
                other = f"experiment {running.experiment_id} ({running.name!r})" if running else "another experiment"
                raise InvalidTransitionError(
                    "experiment",
                    experiment_id,
                    ExperimentStatus.NEW,
                    to_status,
                    [ExperimentStatus.NEW],
                    detail=f"{other} is already RUNNING; at most one experiment runs at a time",
                ) from exc
            raise
        return from_status

    def set_experiment_task(self, experiment_id: int, task: Any) -> ExperimentRecord:
        """Set what the experiment is doing now (an :class:`ExperimentTask`)."""
        _check_id("experiment_id", experiment_id)
        task_value = _enum_value(ExperimentTask, task, "experiment task")
        return self._set_columns(_EXPERIMENT, experiment_id, current_task=task_value, updated_at=db_now())

    def _set_columns(self, machine: _Machine, entity_id: int, **values: Any) -> Any:
        """Set columns other than the status of one row, as one unit; its record after.

        :class:`NotFoundError` when the row does not exist.
        """
        load = {"experiment": self._experiment, "run": self._run}[machine.entity]

        def unit(conn: Connection) -> Any:
            result = conn.execute(update(machine.table).where(machine.key_column == entity_id).values(**values))
            if result.rowcount == 0:
                raise NotFoundError(machine.entity, entity_id)
            return load(conn, entity_id)

        return self._write(unit)

    def set_experiment_metric_id(self, experiment_id: int, metric_experiment_id: Optional[str]) -> ExperimentRecord:
        """Record the metric store's (MLflow's) experiment id."""
        _check_id("experiment_id", experiment_id)
        if metric_experiment_id is not None and not isinstance(metric_experiment_id, str):
            raise ConfigError(f"metric_experiment_id {metric_experiment_id!r} is not a str")
        return self._set_columns(
            _EXPERIMENT, experiment_id, metric_experiment_id=metric_experiment_id, updated_at=db_now()
        )

    # --- runs --------------------------------------------------------------------------

    def create_run(
        self,
        experiment_id: int,
        config_leaf: Any,
        *,
        source: Any = RunSource.USER,
        cloned_from: Optional[int] = None,
        warm_started_from: Optional[int] = None,
        total_steps: int = 0,
        required_workers: int = 1,
        metric_run_id: Optional[str] = None,
    ) -> RunRecord:
        """Insert a NEW run; ``config_leaf`` is stored as a signed payload and flattened for SQL."""
        from rapidfire_state.serialize import encode_payload, flatten_config

        _check_id("experiment_id", experiment_id)
        source_value = _enum_value(RunSource, source, "run source")
        _check_id("cloned_from", cloned_from, optional=True)
        _check_id("warm_started_from", warm_started_from, optional=True)
        _check_id("total_steps", total_steps)
        if isinstance(required_workers, bool) or not isinstance(required_workers, int) or required_workers < 1:
            raise ConfigError(f"required_workers={required_workers!r} is not valid; an int >= 1 is required")
        if metric_run_id is not None and not isinstance(metric_run_id, str):
            raise ConfigError(f"metric_run_id {metric_run_id!r} is not a str")
        payload = encode_payload(config_leaf)
        flattened = flatten_config(config_leaf) if isinstance(config_leaf, dict) else None

        def unit(conn: Connection) -> RunRecord:
            self._experiment(conn, experiment_id)
            for field, parent in (("cloned_from", cloned_from), ("warm_started_from", warm_started_from)):
                if parent is not None and conn.execute(select(tables.runs.c.run_id).where(tables.runs.c.run_id == parent)).first() is None:
                    raise NotFoundError("run", parent)
            run_id = conn.execute(
                insert(tables.runs)
                .values(
                    experiment_id=experiment_id,
                    status=RunStatus.NEW.value,
                    source=source_value,
                    config_leaf=payload,
                    flattened_config=flattened,
                    cloned_from=cloned_from,
                    warm_started_from=warm_started_from,
                    total_steps=total_steps,
                    required_workers=required_workers,
                    metric_run_id=metric_run_id,
                )
                .returning(tables.runs.c.run_id)
            ).scalar_one()
            self._record_transition(conn, "run", run_id, None, RunStatus.NEW.value, "created")
            return self._run(conn, run_id)

        return self._write(unit)

    def _run(self, conn: Connection, run_id: int) -> RunRecord:
        row = conn.execute(select(tables.runs).where(tables.runs.c.run_id == run_id)).mappings().first()
        if row is None:
            raise NotFoundError("run", run_id)
        return RunRecord.from_row(row)

    def get_run(self, run_id: int) -> RunRecord:
        """The run, or :class:`NotFoundError`."""
        _check_id("run_id", run_id)
        return self._read(lambda s: self._run(s, run_id))

    def list_runs(self, experiment_id: Optional[int] = None, statuses: Optional[Iterable[Any]] = None) -> list[RunRecord]:
        """Runs in id order, filtered by experiment and/or statuses."""
        _check_id("experiment_id", experiment_id, optional=True)
        wanted = self._statuses("run", statuses)
        table = tables.runs

        def unit(conn: Connection) -> list[RunRecord]:
            query = select(table).order_by(table.c.run_id)
            if experiment_id is not None:
                query = query.where(table.c.experiment_id == experiment_id)
            if wanted is not None:
                query = query.where(table.c.status.in_(wanted))
            return [RunRecord.from_row(r) for r in conn.execute(query).mappings()]

        return self._read(unit)

    @staticmethod
    def _statuses(machine: str, statuses: Optional[Iterable[Any]]) -> Optional[list[str]]:
        if statuses is None:
            return None
        if isinstance(statuses, (str, bytes)) or not isinstance(statuses, Iterable):
            statuses = [statuses]
        return sorted({states.coerce_status(machine, s).value for s in statuses})

    def transition_run(
        self,
        run_id: int,
        to: Any,
        *,
        expected: Optional[Iterable[Any]] = None,
        error: Optional[str] = None,
        reason: Optional[str] = None,
    ) -> RunRecord:
        """Compare-and-set the run's status.

        ``expected`` narrows the statuses the run may move from (a caller's
        optimistic check).  Terminal statuses set ``ended_at`` and ``ended_by``;
        ONGOING sets ``started_at`` once; resuming a STOPPED run requires its
        experiment to be RUNNING.
        """
        to_status = states.coerce_status("run", to)
        values, extra_where = _run_cas_parts(to_status, error is not None)
        prepared = self._prepared_cas(
            _RUN, run_id, to_status, expected=expected, values=values, extra_where=extra_where,
            params={} if error is None else {"rf_error": str(error)}, reason=reason, record=RunRecord,
        )
        if prepared is not None:
            return prepared

        def unit(conn: Connection) -> RunRecord:
            _, row = self._transition_run_row(conn, run_id, to_status, expected=expected, error=error, reason=reason)
            return RunRecord.from_row(row)  # RETURNING gave the whole row: no second SELECT

        return self._write(unit)

    def _transition_run(
        self,
        conn: Connection,
        run_id: int,
        to_status: RunStatus,
        *,
        expected: Optional[Iterable[Any]] = None,
        error: Optional[str] = None,
        reason: Optional[str] = None,
    ) -> Optional[Any]:
        """Compare-and-set inside ``conn``; the status moved from, None for a repeat."""
        return self._transition_run_row(
            conn, run_id, to_status, expected=expected, error=error, reason=reason
        )[0]

    def _transition_run_row(
        self,
        conn: Connection,
        run_id: int,
        to_status: RunStatus,
        *,
        expected: Optional[Iterable[Any]] = None,
        error: Optional[str] = None,
        reason: Optional[str] = None,
    ) -> tuple[Optional[Any], Mapping[str, Any]]:
        values, extra_where = _run_cas_parts(to_status, error is not None)
        params: dict[str, Any] = {} if error is None else {"rf_error": str(error)}

        def blocked(row: Mapping[str, Any]) -> Optional[str]:
            if to_status == RunStatus.ONGOING and row["status"] == RunStatus.STOPPED.value:
                return f"a STOPPED run is resumed only while its experiment ({row['experiment_id']}) is RUNNING"
            return None

        return self._cas(
            conn, _RUN, run_id, to_status, expected=expected, values=values,
            extra_where=extra_where, reason=reason, blocked_detail=blocked,
            params=params, cacheable=True,
        )

    def update_run_progress(self, run_id: int, **counters: Any) -> RunRecord:
        """Set progress counters (see ``PROGRESS_COUNTERS``); never the status."""
        _check_id("run_id", run_id)
        if not counters:
            raise ConfigError(f"update_run_progress needs at least one of: {', '.join(PROGRESS_COUNTERS)}")
        values: dict[str, Any] = {}
        for field, value in counters.items():
            kind = PROGRESS_COUNTERS.get(field)
            if kind is None:
                raise ConfigError(
                    f"{field!r} is not a progress counter; allowed: {', '.join(PROGRESS_COUNTERS)}"
                    + ("; change status with transition_run" if field in ("status", "ended_by") else "")
                )
            if kind is int:
                minimum = 1 if field == "required_workers" else 0
                if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                    raise ConfigError(f"{field}={value!r} is not valid; an int >= {minimum} is required")
            else:
                if field == "estimated_runtime" and value is None:
                    values[field] = None
                    continue
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0) or value == float("inf"):
                    raise ConfigError(f"{field}={value!r} is not valid; a finite number >= 0 is required")
                value = float(value)
            values[field] = value
        values["updated_at"] = db_now()
        return self._set_columns(_RUN, run_id, **values)

    def set_metric_run_id(self, run_id: int, metric_run_id: Optional[str]) -> RunRecord:
        """Record the metric store's (MLflow's) run id of the run."""
        _check_id("run_id", run_id)
        if metric_run_id is not None and not isinstance(metric_run_id, str):
            raise ConfigError(f"metric_run_id {metric_run_id!r} is not a str")
        return self._set_columns(_RUN, run_id, metric_run_id=metric_run_id, updated_at=db_now())

    # --- tasks -------------------------------------------------------------------------

    def create_worker_task(
        self,
        experiment_id: int,
        run_id: Optional[int],
        worker_id: int,
        chunk_id: Optional[int],
        *,
        task_type: Any = WorkerTask.TRAIN_VAL,
        config_options: Optional[dict] = None,
        status: Any = TaskStatus.SCHEDULED,
    ) -> TaskRecord:
        """Queue a task for ``worker_id`` (SCHEDULED by default, or PENDING)."""
        _check_id("experiment_id", experiment_id)
        _check_id("run_id", run_id, optional=True)
        _check_id("worker_id", worker_id)
        _check_id("chunk_id", chunk_id, optional=True)
        type_value = _enum_value(WorkerTask, task_type, "worker task type")
        status_value = self._initial_task_status(status)
        if config_options is not None and not isinstance(config_options, dict):
            raise ConfigError(f"config_options {config_options!r} is not a dict")
        return self._write(
            lambda conn: self._insert_task(
                conn, "worker", experiment_id, run_id,
                worker_id=worker_id, chunk_id=chunk_id, task_type=type_value,
                status=status_value, config_options=config_options,
            )
        )

    def _insert_task(
        self, conn: Connection, kind: str, experiment_id: int, run_id: Optional[int], **values: Any
    ) -> TaskRecord:
        """Insert a task of ``kind`` and its creation history row; never commits."""
        machine = _TASK_MACHINES[kind]
        self._experiment(conn, experiment_id)
        if run_id is not None:
            self._run(conn, run_id)
        task_id = conn.execute(
            insert(machine.table)
            .values(experiment_id=experiment_id, run_id=run_id, **values)
            .returning(machine.table.c.task_id)
        ).scalar_one()
        self._record_transition(conn, machine.entity, task_id, None, values["status"], "created")
        return self._task(conn, kind, task_id)

    @staticmethod
    def _initial_task_status(status: Any) -> str:
        value = states.coerce_status("task", status)
        if value not in (TaskStatus.PENDING, TaskStatus.SCHEDULED):
            raise ConfigError(f"a task is created PENDING or SCHEDULED, not {value.value}")
        return value.value

    def _task(self, conn: Connection, kind: str, task_id: int) -> TaskRecord:
        machine = _TASK_MACHINES[kind]
        row = conn.execute(select(machine.table).where(machine.key_column == task_id)).mappings().first()
        if row is None:
            raise NotFoundError(machine.entity, task_id)
        return TaskRecord.from_row(row, kind=kind)

    @staticmethod
    def _task_kind(kind: Any) -> _Machine:
        machine = _TASK_MACHINES.get(kind) if isinstance(kind, str) else None
        if machine is None:
            raise ConfigError(f"task kind {kind!r} is not valid; allowed: worker, controller")
        return machine

    def get_task(self, kind: str, task_id: int) -> TaskRecord:
        """A worker or controller task, or :class:`NotFoundError`."""
        self._task_kind(kind)
        _check_id("task_id", task_id)
        return self._read(lambda s: self._task(s, kind, task_id))

    def list_tasks(
        self,
        kind: str,
        *,
        experiment_id: Optional[int] = None,
        statuses: Optional[Iterable[Any]] = None,
        worker_id: Optional[int] = None,
        run_id: Optional[int] = None,
    ) -> list[TaskRecord]:
        """Tasks of one kind in id order, filtered."""
        machine = self._task_kind(kind)
        wanted = self._statuses("task", statuses)
        for name, value in (("experiment_id", experiment_id), ("worker_id", worker_id), ("run_id", run_id)):
            _check_id(name, value, optional=True)
        if worker_id is not None and kind != "worker":
            raise ConfigError("worker_id filters worker tasks only")
        table = machine.table

        def unit(conn: Connection) -> list[TaskRecord]:
            query = select(table).order_by(table.c.task_id)
            if experiment_id is not None:
                query = query.where(table.c.experiment_id == experiment_id)
            if wanted is not None:
                query = query.where(table.c.status.in_(wanted))
            if worker_id is not None:
                query = query.where(table.c.worker_id == worker_id)
            if run_id is not None:
                query = query.where(table.c.run_id == run_id)
            return [TaskRecord.from_row(r, kind=kind) for r in conn.execute(query).mappings()]

        return self._read(unit)

    def _claim(self, kind: str, filters: Mapping[str, int]) -> Optional[TaskRecord]:
        """Claim the oldest SCHEDULED task of ``kind`` matching ``filters`` (column = value), as one unit.

        The claim is recorded on the task: a fresh random token and the claiming
        process, so liveness is judged per claim (:meth:`fail_stale_workers`,
        :meth:`register_worker`) and a finish can be held to the claim's token.
        """
        machine = _TASK_MACHINES[kind]
        statement = _claim_statement(machine, tuple(sorted(filters)))
        pid, process_started_at = _own_process()
        params = {f"rf_claim_{name}": value for name, value in filters.items()}
        params.update(
            rf_new_claim_token=secrets.token_hex(16), rf_claim_pid=pid, rf_claim_host=_HOST,
            rf_claim_started=process_started_at,
        )
        writer = self._prepared_writer
        if writer is not None:
            # SQLite: the whole unit on a prepared statement; an idle poll is
            # BEGIN IMMEDIATE, one UPDATE that matches nothing, ROLLBACK.
            update = writer.prepare(statement)
            return writer.compare_and_set(
                update, params, writer.prepare(_INSERT_TRANSITION),
                lambda task_id: {
                    "entity": machine.entity, "entity_id": task_id, "from_status": TaskStatus.SCHEDULED.value,
                    "to_status": TaskStatus.IN_PROGRESS.value, "pid": pid, "host": _HOST, "reason": "claimed",
                },
                history_column="task_id", record=update.loader(TaskRecord, kind=kind),
                prompt=True,  # a worker waits for its task: wait for the write lock in short steps
            )

        def unit(conn: Connection) -> Optional[TaskRecord]:
            row = conn.execute(statement, params).mappings().first()
            if row is None:
                return None
            self._record_transition(
                conn, machine.entity, row["task_id"], TaskStatus.SCHEDULED.value, TaskStatus.IN_PROGRESS.value,
                "claimed",
            )
            return TaskRecord.from_row(row, kind=kind)  # RETURNING gave the whole row

        return self._write(unit)

    def claim_worker_task(self, worker_id: int, *, experiment_id: Optional[int] = None) -> Optional[TaskRecord]:
        """Atomically move the oldest SCHEDULED task of ``worker_id`` to IN_PROGRESS; None when idle.

        The claim is recorded on the task: ``claim_token`` (a random id of this
        claim, to present to :meth:`finish_worker_task`) and the calling
        process (``claim_pid``, ``claim_host``, ``claim_process_started_at``).
        """
        _check_id("worker_id", worker_id)
        _check_id("experiment_id", experiment_id, optional=True)
        filters = {"worker_id": worker_id}
        if experiment_id is not None:
            filters["experiment_id"] = experiment_id
        return self._claim("worker", filters)

    def finish_worker_task(
        self, task_id: int, *, ok: bool = True, error: Optional[str] = None, claim_token: Optional[str] = None
    ) -> TaskRecord:
        """IN_PROGRESS → COMPLETED (``ok``) or FAILED with ``error``.

        With ``claim_token`` (the token of the claim, ``TaskRecord.claim_token``)
        the finish applies only to that claim: when the task's claim has another
        token (or none) :class:`InvalidTransitionError` says so and nothing changes.
        """
        return self.transition_task(
            "worker", task_id, TaskStatus.COMPLETED if ok else TaskStatus.FAILED, error=error, claim_token=claim_token
        )

    def create_controller_task(
        self,
        experiment_id: int,
        task_type: Any,
        *,
        run_id: Optional[int] = None,
        config_leaf: Any = None,
        status: Any = TaskStatus.SCHEDULED,
    ) -> TaskRecord:
        """Queue a request for the controller; ``config_leaf`` is stored as a signed payload."""
        _check_id("experiment_id", experiment_id)
        _check_id("run_id", run_id, optional=True)
        type_value = _enum_value(ControllerTask, task_type, "controller task type")
        status_value = self._initial_task_status(status)
        payload = None
        if config_leaf is not None:
            from rapidfire_state.serialize import encode_payload

            payload = encode_payload(config_leaf)
        return self._write(
            lambda conn: self._insert_task(
                conn, "controller", experiment_id, run_id,
                task_type=type_value, status=status_value, config_leaf=payload,
            )
        )

    def claim_controller_task(self, experiment_id: Optional[int] = None) -> Optional[TaskRecord]:
        """Atomically move the oldest SCHEDULED controller task to IN_PROGRESS; None when idle.

        The claim is recorded on the task as for :meth:`claim_worker_task`.
        """
        _check_id("experiment_id", experiment_id, optional=True)
        return self._claim("controller", {"experiment_id": experiment_id} if experiment_id is not None else {})

    def finish_controller_task(
        self, task_id: int, *, ok: bool = True, error: Optional[str] = None, claim_token: Optional[str] = None
    ) -> TaskRecord:
        """IN_PROGRESS → COMPLETED (``ok``) or FAILED with ``error``; ``claim_token`` as in :meth:`finish_worker_task`."""
        return self.transition_task(
            "controller", task_id, TaskStatus.COMPLETED if ok else TaskStatus.FAILED, error=error,
            claim_token=claim_token,
        )

    def transition_task(
        self,
        kind: str,
        task_id: int,
        to: Any,
        *,
        error: Optional[str] = None,
        reason: Optional[str] = None,
        expected: Optional[Iterable[Any]] = None,
        claim_token: Optional[str] = None,
    ) -> TaskRecord:
        """Compare-and-set a task's status; ``kind`` is ``"worker"`` or ``"controller"``.

        A move to IN_PROGRESS records the calling process as the task's claim
        (as the claim methods do).  With ``claim_token`` the change applies only
        while the task's claim has that token; otherwise
        :class:`InvalidTransitionError` names both claims and nothing changes.
        """
        machine = self._task_kind(kind)
        to_status = states.coerce_status("task", to)
        if claim_token is not None and not isinstance(claim_token, str):
            raise ConfigError(f"claim_token={claim_token!r} is not valid; the str of TaskRecord.claim_token is required")
        values, extra_where, params = _task_cas_arguments(machine.entity, to_status, error, claim_token)
        prepared = self._prepared_cas(
            machine, task_id, to_status, expected=expected, values=values,
            extra_where=extra_where, params=params, reason=reason, record=TaskRecord, record_extra={"kind": kind},
        )
        if prepared is not None:
            return prepared

        def unit(conn: Connection) -> TaskRecord:
            self._transition_task(
                conn, machine, task_id, to_status, error=error, reason=reason, expected=expected,
                claim_token=claim_token,
            )
            return self._task(conn, kind, task_id)

        return self._write(unit)

    def _transition_task(
        self,
        conn: Connection,
        machine: _Machine,
        task_id: int,
        to_status: TaskStatus,
        *,
        error: Optional[str] = None,
        reason: Optional[str] = None,
        expected: Optional[Iterable[Any]] = None,
        claim_token: Optional[str] = None,
    ) -> Optional[Any]:
        values, extra_where, params = _task_cas_arguments(machine.entity, to_status, error, claim_token)

        def other_claim(row: Mapping[str, Any]) -> Optional[str]:
            if claim_token is not None and row["claim_token"] != claim_token:
                return _claim_mismatch(row, claim_token)
            return None

        from_status, row = self._cas(
            conn, machine, task_id, to_status, expected=expected, values=values, extra_where=extra_where,
            reason=reason, blocked_detail=other_claim, params=params, cacheable=True,
        )
        if from_status is None and claim_token is not None and row["claim_token"] != claim_token:
            # the task already has the wanted status, but under another claim:
            # that outcome is not this caller's to confirm
            raise InvalidTransitionError(
                machine.entity, task_id, to_status, to_status,
                sorted(states.allowed_from("task", to_status), key=str), _claim_mismatch(row, claim_token),
            )
        if (
            from_status is None and claim_token is not None and to_status == TaskStatus.FAILED
            and row["error"] != (None if error is None else str(error))
        ):
            # FAILED under this claim, but with another error: someone else failed it
            # (fail_stale_workers, a restart, a cleanup), not a repeat of this finish
            raise InvalidTransitionError(
                machine.entity, task_id, to_status, to_status,
                sorted(states.allowed_from("task", to_status), key=str),
                f"the task was already FAILED by someone else ({row['error']!r}); this failure "
                f"({error!r}) was not recorded and nothing was changed",
            )
        return from_status

    # --- workers -----------------------------------------------------------------------

    def register_worker(self, experiment_id: int, worker_id: int, pid: int, *, host: Optional[str] = None) -> WorkerRecord:
        """Record (or re-record, after a restart) worker ``worker_id``'s process.

        In the same transaction, the tasks of ``worker_id`` that a dead process
        left IN_PROGRESS are failed (and their runs, as :meth:`fail_stale_workers`
        does): every task whose own claim names a process of this host that is
        gone, and the tasks without a recorded claim when the previous process of
        the row is gone or marked exited.  A restart therefore never hides a
        predecessor's tasks from failure by overwriting its pid.  Claims made on
        another host are left to :meth:`fail_stale_workers` (heartbeats).
        """
        _check_id("experiment_id", experiment_id)
        _check_id("worker_id", worker_id)
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise ConfigError(f"pid={pid!r} is not valid; a positive int is required")
        if host is not None and (not isinstance(host, str) or host == ""):
            raise ConfigError(f"host={host!r} is not valid; a non-empty str is required")
        host = host or _HOST
        started = _process_start_time(pid) if host == _HOST else None
        table = tables.workers

        def unit(conn: Connection) -> WorkerRecord:
            self._experiment(conn, experiment_id)
            previous = conn.execute(
                select(table)
                .where(table.c.experiment_id == experiment_id, table.c.worker_id == worker_id)
                .with_for_update()  # PostgreSQL: registrations of one worker id run one after the other
            ).mappings().first()
            self._fail_dead_claims(
                conn, experiment_id, worker_id,
                WorkerRecord.from_row(previous) if previous is not None else None,
                f"worker {worker_id} was registered again (pid {pid} on {host})",
            )
            values = dict(
                pid=pid, host=host, process_started_at=started, started_at=db_now(),
                heartbeat_at=db_now(), exited_at=None, exit_code=None,
            )
            if previous is not None:
                conn.execute(update(table).where(table.c.id == previous["id"]).values(**values))
            else:
                conn.execute(insert(table).values(experiment_id=experiment_id, worker_id=worker_id, **values))
            return self._worker(conn, experiment_id, worker_id)

        return self._write(unit, retry_on_unique=True)

    def _fail_dead_claims(
        self,
        conn: Connection,
        experiment_id: int,
        worker_id: int,
        previous: Optional[WorkerRecord],
        context: str,
    ) -> list[StaleWorkerReport]:
        """Fail the IN_PROGRESS tasks of one worker id whose claimer is gone; never commits."""
        tasks = tables.worker_tasks
        open_tasks = conn.execute(
            select(tasks.c.task_id, tasks.c.claim_token, tasks.c.claim_pid, tasks.c.claim_host,
                   tasks.c.claim_process_started_at)
            .where(tasks.c.experiment_id == experiment_id, tasks.c.worker_id == worker_id,
                   tasks.c.status == TaskStatus.IN_PROGRESS.value)
            .order_by(tasks.c.task_id)
        ).all()
        if not open_tasks:
            return []
        previous_gone: Optional[str] = None
        if previous is not None:
            previous_gone = "was marked exited" if previous.exited_at is not None else _gone_here(
                previous.host, previous.pid, previous.process_started_at
            )
        # one message (and one report) per dead claimer
        doomed: dict[tuple, list[int]] = {}
        messages: dict[tuple, str] = {}
        judged: dict[tuple, Optional[str]] = {}
        for task in open_tasks:
            if task.claim_token is None:
                # claimed before claims were recorded: judged by the row it was claimed under
                if previous is None or previous_gone is None:
                    continue
                claimer = (previous.pid, previous.host, previous.process_started_at)
                why = previous_gone
            else:
                claimer = (task.claim_pid, task.claim_host, task.claim_process_started_at)
                if claimer not in judged:
                    judged[claimer] = _gone_here(task.claim_host, task.claim_pid, task.claim_process_started_at)
                why = judged[claimer]
                if why is None:
                    continue
            doomed.setdefault(claimer, []).append(task.task_id)
            messages[claimer] = f"worker {worker_id}'s process (pid {claimer[0]} on {claimer[1]}) {why}; {context}"
        reports = []
        for claimer, task_ids in doomed.items():
            failed, runs = self._fail_in_progress(conn, [tasks.c.task_id.in_(task_ids)], messages[claimer])
            if failed:
                reports.append(StaleWorkerReport(
                    worker=previous, reason=messages[claimer], failed_task_ids=failed, failed_run_ids=runs,
                    claim_pid=claimer[0],
                ))
        return reports

    def _fail_in_progress(self, conn: Connection, conditions: Sequence[Any], message: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """IN_PROGRESS worker tasks matching ``conditions`` → FAILED, their runs FAILED; never commits.

        Compare-and-set: a task someone else finished meanwhile is left as it is.
        Returns the failed task ids and the runs it failed.
        """
        tasks = tables.worker_tasks
        failed = conn.execute(
            update(tasks)
            .where(tasks.c.status == TaskStatus.IN_PROGRESS.value, *conditions)
            .values(previous_status=tasks.c.status, status=TaskStatus.FAILED.value, ended_at=db_now(), error=message)
            .returning(tasks.c.task_id, tasks.c.run_id)
        ).all()
        run_ids: list[int] = []
        for task in sorted(failed):
            self._record_transition(
                conn, "worker_task", task.task_id, TaskStatus.IN_PROGRESS.value, TaskStatus.FAILED.value, message
            )
            if task.run_id is not None and task.run_id not in run_ids:
                try:
                    with conn.begin_nested():
                        if self._transition_run(conn, task.run_id, RunStatus.FAILED, error=message, reason=message):
                            run_ids.append(task.run_id)
                except InvalidTransitionError:
                    pass  # the run already ended (e.g. COMPLETED): keep its outcome
        return tuple(sorted(t.task_id for t in failed)), tuple(run_ids)

    def _worker(self, conn: Connection, experiment_id: int, worker_id: int) -> WorkerRecord:
        table = tables.workers
        row = conn.execute(
            select(table).where(table.c.experiment_id == experiment_id, table.c.worker_id == worker_id)
        ).mappings().first()
        if row is None:
            raise NotFoundError("worker", f"{worker_id} of experiment {experiment_id}")
        return WorkerRecord.from_row(row)

    def heartbeat(self, experiment_id: int, worker_id: int) -> WorkerRecord:
        """Stamp the worker's heartbeat with the database clock.

        Raises :class:`WorkerException` when the worker was marked exited (for
        instance failed as stale): such a worker must stop, its tasks are gone.
        """
        _check_id("experiment_id", experiment_id)
        _check_id("worker_id", worker_id)
        table = tables.workers

        def unit(conn: Connection) -> WorkerRecord:
            result = conn.execute(
                update(table)
                .where(table.c.experiment_id == experiment_id, table.c.worker_id == worker_id, table.c.exited_at.is_(None))
                .values(heartbeat_at=db_now())
            )
            record = self._worker(conn, experiment_id, worker_id)
            if result.rowcount == 0:
                raise WorkerException(
                    f"worker {worker_id} of experiment {experiment_id} was marked exited at {record.exited_at}"
                )
            return record

        return self._write(unit)

    def mark_worker_exited(self, experiment_id: int, worker_id: int, exit_code: Optional[int] = None) -> WorkerRecord:
        """Mark the worker exited; idempotent.

        A second call keeps the first ``exited_at`` but fills an unknown exit
        code (a worker failed as stale is marked before its code is known).
        """
        _check_id("experiment_id", experiment_id)
        _check_id("worker_id", worker_id)
        if exit_code is not None and (isinstance(exit_code, bool) or not isinstance(exit_code, int)):
            raise ConfigError(f"exit_code={exit_code!r} is not an int")
        table = tables.workers

        def unit(conn: Connection) -> WorkerRecord:
            result = conn.execute(
                update(table)
                .where(table.c.experiment_id == experiment_id, table.c.worker_id == worker_id)
                .values(
                    exited_at=func.coalesce(table.c.exited_at, db_now()),
                    exit_code=func.coalesce(table.c.exit_code, exit_code),
                )
            )
            if result.rowcount == 0:
                raise NotFoundError("worker", f"{worker_id} of experiment {experiment_id}")
            return self._worker(conn, experiment_id, worker_id)

        return self._write(unit)

    def list_workers(self, experiment_id: Optional[int] = None, *, alive_only: bool = False) -> list[WorkerRecord]:
        """Worker rows, optionally only those not marked exited."""
        _check_id("experiment_id", experiment_id, optional=True)
        table = tables.workers

        def unit(conn: Connection) -> list[WorkerRecord]:
            query = select(table).order_by(table.c.experiment_id, table.c.worker_id)
            if experiment_id is not None:
                query = query.where(table.c.experiment_id == experiment_id)
            if alive_only:
                query = query.where(table.c.exited_at.is_(None))
            return [WorkerRecord.from_row(r) for r in conn.execute(query).mappings()]

        return self._read(unit)

    def fail_stale_workers(self, grace_seconds: float, *, experiment_id: Optional[int] = None) -> list[StaleWorkerReport]:
        """Fail every worker that is gone, and every task whose claimer is gone.

        In one transaction:

        * each worker row not marked exited whose process is gone (its pid dead
          on this host, or the pid now another process's) or whose heartbeat is
          older than ``grace_seconds``: its IN_PROGRESS tasks become FAILED, their
          runs FAILED with an error naming the worker, and the row is marked exited;
        * each other IN_PROGRESS worker task whose own claim names a process of
          this host that is gone — also when its worker id was registered again
          by a live process since: the task and its run FAILED (the live
          successor's row is left alone; the report's ``claim_pid`` names the
          dead claimer).

        Returns what changed, one report per worker or dead claimer.
        """
        # "not >= 0" also refuses NaN, which compares false with everything
        if isinstance(grace_seconds, bool) or not isinstance(grace_seconds, (int, float)) or not grace_seconds >= 0:
            raise ConfigError(f"grace_seconds={grace_seconds!r} is not valid; a number >= 0 is required")
        _check_id("experiment_id", experiment_id, optional=True)
        table = tables.workers
        tasks = tables.worker_tasks

        def unit(conn: Connection) -> list[StaleWorkerReport]:
            now = conn.execute(select(db_now())).scalar_one()
            query = select(table).where(table.c.exited_at.is_(None))
            if experiment_id is not None:
                query = query.where(table.c.experiment_id == experiment_id)
            reports = []
            for row in conn.execute(query).mappings().all():
                worker = WorkerRecord.from_row(row)
                reason = _staleness(worker, now, grace_seconds)
                if reason is None:
                    continue
                # Gone by its pid while the heartbeat is fresh: the claims of other
                # hosts under this worker id are left to the heartbeat.
                by_pid = (now - worker.heartbeat_at).total_seconds() <= grace_seconds
                report = self._fail_worker(conn, worker, reason, only_local_claims=by_pid)
                if report is not None:
                    reports.append(report)
            # Per claim: what a dead process of this host left, whoever the worker row names now.
            claimed = select(tasks.c.experiment_id, tasks.c.worker_id).distinct().where(
                tasks.c.status == TaskStatus.IN_PROGRESS.value, tasks.c.claim_host == _HOST,
            )
            if experiment_id is not None:
                claimed = claimed.where(tasks.c.experiment_id == experiment_id)
            for owner in sorted(conn.execute(claimed).all()):
                row = conn.execute(
                    select(table).where(table.c.experiment_id == owner.experiment_id, table.c.worker_id == owner.worker_id)
                ).mappings().first()
                current = WorkerRecord.from_row(row) if row is not None else None
                context = (
                    f"worker {owner.worker_id} is now pid {current.pid} on {current.host}" if current is not None
                    else f"worker {owner.worker_id} has no worker row"
                )
                for report in self._fail_dead_claims(conn, owner.experiment_id, owner.worker_id, None, context):
                    reports.append(dataclasses.replace(report, worker=current))
            return reports

        return self._write(unit)

    def _fail_worker(
        self, conn: Connection, worker: WorkerRecord, reason: str, *, only_local_claims: bool = False
    ) -> Optional[StaleWorkerReport]:
        """Fail the worker's IN_PROGRESS tasks and mark its row exited; never commits.

        With ``only_local_claims`` (the row's process is gone from this host but
        its heartbeat is fresh) the tasks claimed on another host are left alone:
        a local pid says nothing of them.  While such tasks remain the row stays
        open, so that its heartbeat still judges them.  Returns None when nothing
        changed.
        """
        tasks = tables.worker_tasks
        message = f"worker {worker.worker_id} (pid {worker.pid} on {worker.host}) {reason}"
        mine = [tasks.c.experiment_id == worker.experiment_id, tasks.c.worker_id == worker.worker_id]
        conditions = list(mine)
        if only_local_claims:
            # a claim of another host cannot be judged by this host's pid
            conditions.append(or_(tasks.c.claim_host.is_(None), tasks.c.claim_host == _HOST))
        failed, run_ids = self._fail_in_progress(conn, conditions, message)
        if only_local_claims:
            held = conn.execute(
                select(func.count()).select_from(tasks).where(tasks.c.status == TaskStatus.IN_PROGRESS.value, *mine)
            ).scalar_one()
            if held:
                if not failed:
                    return None
                return StaleWorkerReport(
                    worker=self._worker(conn, worker.experiment_id, worker.worker_id),
                    reason=message, failed_task_ids=failed, failed_run_ids=run_ids,
                )
        conn.execute(
            update(tables.workers)
            .where(tables.workers.c.id == worker.id, tables.workers.c.exited_at.is_(None))
            .values(exited_at=db_now())
        )
        return StaleWorkerReport(
            worker=self._worker(conn, worker.experiment_id, worker.worker_id),
            reason=message,
            failed_task_ids=failed,
            failed_run_ids=run_ids,
        )

    # --- shared-memory object metadata ----------------------------------------------------

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
        if not isinstance(key, str) or key == "" or len(key) > 512:
            raise ConfigError(f"shm key {key!r} is not valid; a non-empty str of at most 512 characters is required")
        values = dict(
            object_type=_enum_value(SHMObjectType, object_type, "shm object type"),
            location=_enum_value(SHMLocation, location, "shm location"),
            disk_path=None if disk_path is None else os.fspath(disk_path),
            num_bytes=_check_id("num_bytes", num_bytes),
            tensor_count=_check_id("tensor_count", tensor_count),
            experiment_id=_check_id("experiment_id", experiment_id, optional=True),
            run_id=_check_id("run_id", run_id, optional=True),
            chunk_id=_check_id("chunk_id", chunk_id, optional=True),
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
            return self._shm_object(conn, key)

        return self._write(unit, retry_on_unique=True)

    def _shm_object(self, conn: Connection, key: str) -> SHMObjectRecord:
        table = tables.shm_objects
        row = conn.execute(select(table).where(table.c.key == key)).mappings().first()
        if row is None:
            raise NotFoundError("shm object", key)
        return SHMObjectRecord.from_row(row)

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
    ) -> list[SHMObjectRecord]:
        """Metadata rows in id order, filtered (``disk_path``: the rows naming that file)."""
        _check_id("experiment_id", experiment_id, optional=True)
        _check_id("run_id", run_id, optional=True)
        table = tables.shm_objects

        def unit(conn: Connection) -> list[SHMObjectRecord]:
            query = select(table).order_by(table.c.shm_object_id)
            if experiment_id is not None:
                query = query.where(table.c.experiment_id == experiment_id)
            if run_id is not None:
                query = query.where(table.c.run_id == run_id)
            if manager_name is not None:
                query = query.where(table.c.manager_name == manager_name)
            if disk_path is not None:
                query = query.where(table.c.disk_path == os.fspath(disk_path))
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

    def add_cleanup_hook(self, hook: Callable[[Sequence[SHMObjectRecord]], None]) -> None:
        """Call ``hook(removed_rows)`` after an experiment cleanup commits.

        The shared-memory manager registers one to drop the payloads whose
        metadata the cleanup removed.  Hook errors are logged, never raised.
        """
        with self._hooks_lock:
            if hook not in self._cleanup_hooks:
                self._cleanup_hooks.append(hook)

    def remove_cleanup_hook(self, hook: Callable[[Sequence[SHMObjectRecord]], None]) -> None:
        with self._hooks_lock:
            if hook in self._cleanup_hooks:
                self._cleanup_hooks.remove(hook)

    # --- experiment cleanup -----------------------------------------------------------------

    def cleanup_experiment_state(
        self,
        experiment_id: int,
        *,
        status: Any = ExperimentStatus.COMPLETED,
        run_status: Any = RunStatus.KILLED,
        reason: Optional[str] = None,
        error: Optional[str] = None,
    ) -> CleanupReport:
        """End an experiment's state in one transaction; idempotent.

        Open tasks → FAILED; NEW/ONGOING runs → ``run_status`` (KILLED, or FAILED
        after a crash); STOPPED runs frozen with ``ended_by = STOPPED``; workers
        marked exited; the experiment's ``shm_objects`` rows removed (cleanup
        hooks drop their payloads after commit); the experiment → ``status``
        (COMPLETED or FAILED) unless it already ended.  Runs and history stay.
        """
        _check_id("experiment_id", experiment_id)
        final = states.coerce_status("experiment", status)
        if final not in (ExperimentStatus.COMPLETED, ExperimentStatus.FAILED):
            raise ConfigError(f"cleanup ends an experiment COMPLETED or FAILED, not {final.value}")
        run_final = states.coerce_status("run", run_status)
        if run_final not in (RunStatus.KILLED, RunStatus.FAILED):
            raise ConfigError(f"cleanup ends live runs KILLED or FAILED, not {run_final.value}")
        why = reason or f"experiment cleanup ({final.value})"

        def unit(conn: Connection) -> CleanupReport:
            # Lock the experiment row first (PostgreSQL; SQLite's BEGIN IMMEDIATE
            # already serialises writers): concurrent cleanups of one experiment
            # then run one after the other, and the later one sees the final
            # status instead of failing its RUNNING -> COMPLETED/FAILED step.
            locked = conn.execute(
                select(tables.experiments.c.experiment_id)
                .where(tables.experiments.c.experiment_id == experiment_id)
                .with_for_update(key_share=True)  # FOR NO KEY UPDATE: FK inserts (KEY SHARE) still proceed
            ).first()
            if locked is None:
                raise NotFoundError("experiment", experiment_id)
            experiment = self._experiment(conn, experiment_id)
            failed_tasks: list[tuple[str, int]] = []
            for kind, machine in _TASK_MACHINES.items():
                table = machine.table
                rows = conn.execute(
                    update(table)
                    .where(table.c.experiment_id == experiment_id, table.c.status.in_(_OPEN_TASK_STATUSES))
                    .values(previous_status=table.c.status, status=TaskStatus.FAILED.value, ended_at=db_now(),
                            error=func.coalesce(table.c.error, why))
                    .returning(table.c.task_id, table.c.previous_status)
                ).all()
                for row in sorted(rows):
                    self._record_transition(conn, machine.entity, row.task_id, row.previous_status, TaskStatus.FAILED.value, why)
                    failed_tasks.append((kind, row.task_id))
            runs = tables.runs
            ended = conn.execute(
                update(runs)
                .where(runs.c.experiment_id == experiment_id,
                       runs.c.status.in_([RunStatus.NEW.value, RunStatus.ONGOING.value]))
                .values(previous_status=runs.c.status, status=run_final.value, ended_by=run_final.value,
                        ended_at=db_now(), updated_at=db_now(),
                        error=func.coalesce(runs.c.error, error) if error else runs.c.error)
                .returning(runs.c.run_id, runs.c.previous_status)
            ).all()
            for row in sorted(ended):
                self._record_transition(conn, "run", row.run_id, row.previous_status, run_final.value, why)
            frozen = conn.execute(
                update(runs)
                .where(runs.c.experiment_id == experiment_id, runs.c.status == RunStatus.STOPPED.value,
                       runs.c.ended_by.is_(None))
                .values(ended_by=RunEndedBy.STOPPED.value, ended_at=db_now(), updated_at=db_now())
                .returning(runs.c.run_id)
            ).scalars().all()
            workers = tables.workers
            exited = conn.execute(
                update(workers)
                .where(workers.c.experiment_id == experiment_id, workers.c.exited_at.is_(None))
                .values(exited_at=db_now())
                .returning(workers.c.worker_id)
            ).scalars().all()
            shm = tables.shm_objects
            removed = conn.execute(
                shm.delete().where(shm.c.experiment_id == experiment_id).returning(*shm.c)
            ).mappings().all()
            if experiment.status not in states.terminal_states("experiment"):
                self._transition_experiment(conn, experiment_id, final, error=error, reason=why)
            return CleanupReport(
                experiment_id=experiment_id,
                experiment_status=self._experiment(conn, experiment_id).status,
                failed_task_ids=tuple(failed_tasks),
                ended_run_ids=tuple(sorted(r.run_id for r in ended)),
                frozen_run_ids=tuple(sorted(frozen)),
                exited_worker_ids=tuple(sorted(exited)),
                removed_shm_objects=tuple(SHMObjectRecord.from_row(r) for r in removed),
            )

        report = self._write(unit)
        if report.removed_shm_objects:
            self._run_cleanup_hooks(report.removed_shm_objects)
        return report

    def _run_cleanup_hooks(self, removed: Sequence[SHMObjectRecord]) -> None:
        with self._hooks_lock:
            hooks = list(self._cleanup_hooks)
        for hook in hooks:
            try:
                hook(removed)
            except Exception as exc:  # a payload left behind is repaired by reconcile()
                import warnings

                warnings.warn(f"cleanup hook {hook!r} failed: {exc!r}", RuntimeWarning, stacklevel=2)

    # --- history -----------------------------------------------------------------------

    def history(self, entity: str, entity_id: int) -> list[TransitionRecord]:
        """Every status change of one row, oldest first (creation has ``from_status`` None)."""
        if entity not in TRANSITION_ENTITIES:
            raise ConfigError(f"history entity {entity!r} is not valid; allowed: {', '.join(TRANSITION_ENTITIES)}")
        _check_id(f"{entity}_id", entity_id)
        machine = _HISTORY_MACHINES[entity]
        table = tables.state_transitions

        def unit(conn: Connection) -> list[TransitionRecord]:
            rows = conn.execute(
                select(table)
                .where(table.c.entity == entity, table.c.entity_id == entity_id)
                .order_by(table.c.transition_id)
            ).mappings().all()
            if not rows and conn.execute(select(machine.key_column).where(machine.key_column == entity_id)).first() is None:
                raise NotFoundError(entity, entity_id)
            return [TransitionRecord.from_row(r) for r in rows]

        return self._read(unit)


@functools.lru_cache(maxsize=None)
def _run_cas_parts(to_status: RunStatus, with_error: bool) -> tuple[Mapping[str, Any], tuple[Any, ...]]:
    """The SET values and extra WHERE of a run's compare-and-set to ``to_status``.

    Built once per shape (every datum that varies is a bound parameter), so the
    cached UPDATE of :meth:`StateDB._cas` is found without rebuilding anything.
    """
    table = tables.runs
    values: dict[str, Any] = {"updated_at": db_now()}
    extra_where: list[Any] = []
    if to_status in states.terminal_states("run"):
        values["ended_at"] = db_now()
        values["ended_by"] = _constant(to_status)
    elif to_status == RunStatus.ONGOING:
        values["started_at"] = func.coalesce(table.c.started_at, db_now())
        values["ended_by"] = null()
        experiments = tables.experiments
        running = select(experiments.c.experiment_id).where(experiments.c.status == _constant(ExperimentStatus.RUNNING))
        # resuming a STOPPED run requires its experiment to be RUNNING
        extra_where.append(or_(table.c.status != _constant(RunStatus.STOPPED), table.c.experiment_id.in_(running)))
    if with_error:
        values["error"] = bindparam("rf_error")
    return MappingProxyType(values), tuple(extra_where)


def _constant(status: Any) -> Any:
    """A status as an SQL string constant (our own enum values: letters and '_' only)."""
    value = getattr(status, "value", status)
    if not value.replace("_", "").isalpha():
        raise ValueError(f"not a status constant: {value!r}")
    return literal_column(f"'{value}'", String)


@functools.lru_cache(maxsize=None)
def _task_cas_parts(entity: str, to_status: TaskStatus, with_error: bool) -> Mapping[str, Any]:
    """The SET values of a task's compare-and-set to ``to_status`` (built once per shape)."""
    table = _HISTORY_MACHINES[entity].table
    values: dict[str, Any] = {}
    if to_status == TaskStatus.IN_PROGRESS:
        values["started_at"] = func.coalesce(table.c.started_at, db_now())
        # a move to IN_PROGRESS is a claim: it is recorded like one
        values["claim_token"] = bindparam("rf_new_claim_token")
        values["claim_pid"] = bindparam("rf_claim_pid")
        values["claim_host"] = bindparam("rf_claim_host")
        values["claim_process_started_at"] = bindparam("rf_claim_started")
    if to_status in states.terminal_states("task"):
        values["ended_at"] = db_now()
    if with_error:
        values["error"] = bindparam("rf_error")
    return MappingProxyType(values)


@functools.lru_cache(maxsize=None)
def _claim_statement(machine: _Machine, filters: tuple[str, ...]) -> Any:
    """The claim UPDATE of ``machine`` filtered on the columns ``filters`` (built once per shape).

    Moves the oldest matching SCHEDULED task to IN_PROGRESS, records the claim
    (every datum a bound parameter) and returns the whole row.  On PostgreSQL a
    row locked by another claimer is skipped; on SQLite the write lock already
    serialises claimers.
    """
    table = machine.table
    conditions = [table.c[name] == bindparam(f"rf_claim_{name}") for name in filters]
    scheduled = _constant(TaskStatus.SCHEDULED)
    candidate = (
        select(table.c.task_id)
        .where(table.c.status == scheduled, *conditions)
        .order_by(table.c.task_id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return (
        update(table)
        .where(table.c.task_id == candidate, table.c.status == scheduled)
        .values(
            previous_status=table.c.status,
            status=_constant(TaskStatus.IN_PROGRESS),
            started_at=db_now(),
            claim_token=bindparam("rf_new_claim_token"),
            claim_pid=bindparam("rf_claim_pid"),
            claim_host=bindparam("rf_claim_host"),
            claim_process_started_at=bindparam("rf_claim_started"),
        )
        .returning(*table.c)
    )


@functools.lru_cache(maxsize=None)
def _claim_token_where(entity: str) -> tuple[Any, ...]:
    """The extra WHERE of a task change held to one claim (built once per entity)."""
    table = _HISTORY_MACHINES[entity].table
    return (table.c.claim_token == bindparam("rf_claim_token"),)


def _task_cas_arguments(
    entity: str, to_status: TaskStatus, error: Optional[str], claim_token: Optional[str]
) -> tuple[Mapping[str, Any], tuple[Any, ...], dict[str, Any]]:
    """``(values, extra_where, params)`` of a task's compare-and-set (cached shapes, per-call data)."""
    values = _task_cas_parts(entity, to_status, error is not None)
    params: dict[str, Any] = {}
    if error is not None:
        params["rf_error"] = str(error)
    if to_status == TaskStatus.IN_PROGRESS:
        pid, process_started_at = _own_process()
        params["rf_new_claim_token"] = secrets.token_hex(16)
        params["rf_claim_pid"] = pid
        params["rf_claim_host"] = _HOST
        params["rf_claim_started"] = process_started_at
    extra_where: tuple[Any, ...] = ()
    if claim_token is not None:
        extra_where = _claim_token_where(entity)
        params["rf_claim_token"] = claim_token
    return values, extra_where, params


def _claim_mismatch(row: Mapping[str, Any], claim_token: str) -> str:
    held = row["claim_token"]
    if held is None:
        return f"claim token {claim_token!r} was presented but the task has no recorded claim; nothing was changed"
    return (
        f"claim token {claim_token!r} is not the task's claim (token {held!r}, pid {row['claim_pid']}"
        f" on {row['claim_host']}); nothing was changed"
    )


def _cas_plan(
    machine: _Machine,
    to_status: Any,
    expected: Optional[Iterable[Any]],
    values: Mapping[str, Any],
    extra_where: Sequence[Any],
    cacheable: bool,
) -> tuple[frozenset, frozenset, Optional[set], Any]:
    """``(allowed, cas_from, expected_set, statement)`` of one compare-and-set.

    ``statement`` is None when no status may move to ``to_status`` (nothing to
    try).  With ``cacheable`` the caller guarantees the SQL depends only on the
    entity, ``to``, the keys of ``values`` and the number of ``extra_where``
    clauses (every datum goes through bound parameters), so the UPDATE is built
    once and reused: SQLAlchemy neither rebuilds it nor recomputes its cache key.
    """
    if expected is None and cacheable:
        # An unconditional change's plan depends on nothing else (``values`` and
        # ``extra_where`` come from the lru-cached *_cas_parts): reuse it whole.
        key = (machine.entity, to_status, id(values), id(extra_where))
        cached = _CAS_PLANS.get(key)
        if cached is None or cached[0] is not values or cached[1] is not extra_where:
            cached = (values, extra_where, _build_cas_plan(machine, to_status, None, values, extra_where, True))
            _CAS_PLANS[key] = cached
        return cached[2]
    return _build_cas_plan(machine, to_status, expected, values, extra_where, cacheable)


def _build_cas_plan(
    machine: _Machine,
    to_status: Any,
    expected: Optional[Iterable[Any]],
    values: Mapping[str, Any],
    extra_where: Sequence[Any],
    cacheable: bool,
) -> tuple[frozenset, frozenset, Optional[set], Any]:
    allowed = states.allowed_from(machine.machine, to_status)
    expected_set = None
    cas_from = allowed
    if expected is not None:
        if isinstance(expected, (str, bytes)) or not isinstance(expected, Iterable):
            expected = [expected]
        expected_set = {states.coerce_status(machine.machine, e) for e in expected}
        cas_from = allowed & expected_set
    if not cas_from:
        return allowed, cas_from, expected_set, None
    table = machine.table
    assignments = {"previous_status": table.c.status, "status": _constant(to_status), **values}
    from_values = tuple(sorted(s.value for s in cas_from))
    key = (machine.entity, to_status.value, from_values, tuple(sorted(assignments)), len(extra_where))
    statement = _CAS_STATEMENTS.get(key) if cacheable else None
    if statement is None:
        statement = (
            update(table)
            .where(machine.key_column == bindparam("rf_entity_id"))
            # statuses as SQL constants: the same text every call, and SQLite plans
            # (and uses the partial one-RUNNING index) as for literal SQL
            .where(table.c.status.in_([_constant(value) for value in from_values]))
            .where(*extra_where)
            .values(**assignments)
            .returning(*table.c)
        )
        if cacheable:
            _CAS_STATEMENTS[key] = statement
    return allowed, cas_from, expected_set, statement


def _reopen(url: str, auto_upgrade: Optional[bool], read_only: bool = False) -> StateDB:
    return StateDB(url, auto_upgrade=auto_upgrade, read_only=read_only)


def _wrap(exc: SQLAlchemyError, database: StateDB) -> DBException:
    orig = getattr(exc, "orig", None)
    detail = str(orig) if orig is not None else str(exc)
    return DBException(f"database error on {database.url_text}: {detail}")


def _file_identity(path: str) -> tuple[int, int]:
    """``(st_dev, st_ino)`` of ``path``: the same file, not just the same name."""
    status = os.stat(path)
    return status.st_dev, status.st_ino


def _process_start_time(pid: int) -> Optional[float]:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


_OWN_PROCESS: Optional[tuple[int, Optional[float]]] = None


def _own_process() -> tuple[int, Optional[float]]:
    """This process's pid and OS start time, for the claims it makes.

    Cached per pid: one psutil call per process, and a forked child (another
    pid) computes its own.
    """
    global _OWN_PROCESS
    pid = os.getpid()
    cached = _OWN_PROCESS
    if cached is None or cached[0] != pid:
        cached = (pid, _process_start_time(pid))
        _OWN_PROCESS = cached
    return cached


def _gone_here(host: Optional[str], pid: Optional[int], process_started_at: Optional[float]) -> Optional[str]:
    """Why the process ``pid`` started at ``process_started_at`` on ``host`` is gone.

    None while it runs, and whenever this host cannot tell: another host's
    pid means nothing here, and a process we may not inspect is taken as alive.
    """
    if host != _HOST or pid is None:
        return None
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return "has exited (zombie process)"
        if process_started_at is not None and abs(process.create_time() - process_started_at) > 1.0:
            return "has exited (its pid now belongs to another process)"
    except psutil.NoSuchProcess:
        return "has exited (pid not running)"
    except psutil.AccessDenied:
        return None
    return None


def _staleness(worker: WorkerRecord, now: Any, grace_seconds: float) -> Optional[str]:
    """Why the worker counts as gone, or None while it looks alive."""
    gone = _gone_here(worker.host, worker.pid, worker.process_started_at)
    if gone is not None:
        return gone
    age = (now - worker.heartbeat_at).total_seconds()
    if age > grace_seconds:
        return f"missed its heartbeat ({age:.1f} s old, grace {grace_seconds} s)"
    return None
