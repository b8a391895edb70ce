"""Prepared compare-and-set units on SQLite (and PostgreSQL): the hot path of status changes.

A status change is two statements (the compare-and-set ``UPDATE … RETURNING``
and its history ``INSERT``) inside ``BEGIN IMMEDIATE``.  Through SQLAlchemy's
execution machinery each of them costs several times what SQLite needs to run
it, and on SQLite that cost is paid while the database-wide write lock is held,
so it bounds every process's throughput.  This module runs the *same* Core
statements — compiled once by SQLAlchemy's SQLite dialect, with the same
result processing — on a driver connection of its own per thread, configured
by the same pragmas as the engine's connections (:func:`configure_sqlite`),
except that it waits for the write lock itself (``busy_timeout = 0`` and
:func:`retry_while_busy`): a claim in short steps, other changes in SQLite's.
The returned row becomes a record in one pass (:meth:`PreparedStatement.loader`).

It is an optimisation of :meth:`StateDB._write` for one shape of unit, not a
second set of rules: it only ever *applies* a compare-and-set that matched.
When the UPDATE matches no row the unit is rolled back and the caller takes
the general path, which explains the refusal (missing row, idempotent repeat,
illegal transition) exactly as before.

:class:`PostgreSQLPreparedWriter` runs the same units on PostgreSQL, on the
engine's pooled connections (see its docstring).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Optional, Sequence

from sqlalchemy import JSON
from sqlalchemy.engine import processors

from rapidfire_state.db.engine import configure_sqlite, is_retryable, prompt_pause, retry_while_busy, writer_pause
from rapidfire_state.db.schema import UTCDateTime
from rapidfire_state.exceptions import DBException


@dataclass(frozen=True)
class PreparedStatement:
    """A Core statement compiled once: SQL text, parameter order, result processors."""

    sql: str
    names: tuple[str, ...]
    defaults: Mapping[str, Any]
    columns: tuple[str, ...]
    processors: tuple[Optional[Callable[[Any], Any]], ...]
    #: ``(index, column, processor)`` of the returned columns that have a processor
    processed: tuple[tuple[int, str, Callable[[Any], Any]], ...] = field(init=False, repr=False, compare=False)
    #: record loaders of the returned row (see :meth:`loader`), by record class and fixed fields
    loaders: dict[tuple, Callable[[Sequence[Any]], Any]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        processed = tuple(
            (index, column, processor)
            for index, (column, processor) in enumerate(zip(self.columns, self.processors))
            if processor is not None
        )
        object.__setattr__(self, "processed", processed)
        object.__setattr__(self, "loaders", {})

    def loader(self, record_cls: Any, **extra: Any) -> Callable[[Sequence[Any]], Any]:
        """A function from the returned row (the driver's tuple) to a ``record_cls`` record.

        The record :meth:`row` then ``record_cls.from_row(row, **extra)`` would
        give, built in one pass (``values_loader`` of :mod:`rapidfire_state.db.records`);
        made once per record class and ``extra`` (hashable values, such as a task's kind).
        """
        key = (record_cls, *extra.items())
        load = self.loaders.get(key)
        if load is None:
            load = self.loaders[key] = record_cls.values_loader(self.columns, self.processors, **extra)
        return load

    def arguments(self, params: Mapping[str, Any]) -> tuple:
        """The bound values in SQL order: ``params``, else the value fixed when the statement was built."""
        defaults = self.defaults
        if not defaults:
            return tuple([params[name] for name in self.names])
        return tuple([params[name] if name in params else defaults[name] for name in self.names])

    def row(self, values: Sequence[Any]) -> dict[str, Any]:
        """The returned row as a dict, each value processed as SQLAlchemy's result would."""
        row = dict(zip(self.columns, values))
        # most columns (ints, strings) have no processor: only those that do are visited
        for index, column, processor in self.processed:
            value = values[index]
            if value is not None:
                row[column] = processor(value)
        return row


def _utc_datetime(value: Any) -> datetime:
    """What UTCDateTime's result processing gives on SQLite, in one call instead of three.

    That is ``datetime.fromisoformat`` with a naive result taken as UTC.  The
    shape every timestamp is stored in (``YYYY-MM-DD HH:MM:SS.ffffff``, naive
    UTC, written by SQLAlchemy and by ``db_now()``) is parsed with its offset
    appended, which costs a fifth of ``replace(tzinfo=...)``; anything else
    goes the general way.
    """
    if (
        value.__class__ is str and len(value) == 26 and value[10] == " " and value[19] == "."
        and value[20:].isascii() and value[20:].isdigit()
    ):
        return datetime.fromisoformat(value + "+00:00")
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=timezone.utc)


#: stored text -> its parsed value, for the columns a status change leaves as they were
#: (``created_at``, ``started_at``, a run's ``flattened_config``): a change returns
#: the whole row, and most of it is the same text as the last time
_PARSED: dict[tuple[int, str], Any] = {}
_PARSED_LIMIT = 4096
_SCALARS = (str, int, float, bool, type(None))


def _remembered(kind: int, parse: Callable[[Any], Any], value: Any) -> Any:
    key = (kind, value)
    found = _PARSED.get(key)
    if found is None:
        found = parse(value)
        if len(_PARSED) >= _PARSED_LIMIT:
            _PARSED.clear()
        _PARSED[key] = found
    return found


def _remembering_datetime(value: Any) -> datetime:
    """:func:`_utc_datetime`, remembered: a datetime is immutable, so one may be shared."""
    if value.__class__ is not str:
        return _utc_datetime(value)
    return _remembered(0, _utc_datetime, value)


def _remembering_json(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The JSON processor ``parse``, remembered for flat objects of scalars.

    Each caller gets a dict of its own (a shallow copy is a full copy when every
    value is a scalar); anything nested is parsed afresh, never shared.
    """

    def flat_or_none(text: Any) -> Any:
        parsed = parse(text)
        if parsed.__class__ is dict and all(value.__class__ in _SCALARS for value in parsed.values()):
            return parsed
        return False

    def process(value: Any) -> Any:
        if value.__class__ is not str:
            return parse(value)
        flat = _remembered(1, flat_or_none, value)
        return dict(flat) if flat is not False else parse(value)

    return process


def _result_processor(column: Any, dialect: Any) -> Optional[Callable[[Any], Any]]:
    """The processor of a returned column: SQLAlchemy's, or an equal and faster one."""
    processor = column.type.dialect_impl(dialect).result_processor(dialect, None)
    if isinstance(column.type, UTCDateTime):
        impl = column.type.impl_instance.dialect_impl(dialect).result_processor(dialect, None)
        if impl is processors.str_to_datetime:  # the dialect's stock parser: nothing else to keep
            return _remembering_datetime
    if processor is not None and isinstance(column.type, JSON):
        return _remembering_json(processor)
    return processor


def _identity(path: str) -> Optional[tuple[int, int]]:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def compile_prepared(
    statement: Any, dialect: Any, result_processor: Callable[[Any], Optional[Callable[[Any], Any]]]
) -> PreparedStatement:
    """``statement`` compiled once by ``dialect`` (positional parameters), with the
    processors of its returned columns from ``result_processor(column)``."""
    compiled = statement.compile(dialect=dialect)
    if any(bind.expanding for bind in compiled.binds.values()):
        raise ValueError("prepared statements need plain bound parameters, not expanding IN lists")
    returning = list(getattr(statement, "_returning", ()) or ())
    return PreparedStatement(
        sql=compiled.string,
        names=tuple(compiled.positiontup or ()),
        # values fixed when the statement was built; the required ones come per call
        defaults={name: bind.effective_value for name, bind in compiled.binds.items() if not bind.required},
        columns=tuple(column.name for column in returning),
        processors=tuple(result_processor(column) for column in returning),
    )


class SQLitePreparedWriter:
    """Runs prepared compare-and-set units on one driver connection per thread."""

    def __init__(
        self,
        path: str,
        dialect: Any,
        busy_timeout_ms: int,
        retry_seconds: Callable[[], float],
        *,
        check_file: Optional[Callable[[], None]] = None,
    ):
        self._path = path
        #: called with the write lock held; raises when the file is no longer the one opened
        self._check_file = check_file
        self._dialect = dialect
        self._busy_timeout_ms = busy_timeout_ms
        self._retry_seconds = retry_seconds
        #: the file identity (st_dev, st_ino) that check_file last accepted
        self._verified: Optional[tuple[int, int]] = None
        self._local = threading.local()
        self._prepared: dict[int, tuple[Any, PreparedStatement]] = {}
        #: (thread, pid, connection) of every connection opened here
        self._connections: list[tuple[threading.Thread, int, sqlite3.Connection]] = []
        self._lock = threading.Lock()
        #: units this writer committed, and units it rolled back because the
        #: compare-and-set matched nothing (the caller then took the general path):
        #: tests hold the fast path to these, so a path that always falls back fails
        self.commits = 0
        self.fallbacks = 0

    def prepare(self, statement: Any) -> PreparedStatement:
        """Compile ``statement`` once (keyed by identity: statements here are cached objects)."""
        cached = self._prepared.get(id(statement))
        if cached is not None and cached[0] is statement:
            return cached[1]
        prepared = compile_prepared(statement, self._dialect, lambda column: _result_processor(column, self._dialect))
        with self._lock:
            self._prepared[id(statement)] = (statement, prepared)  # the reference keeps the id valid
        return prepared

    def _cursor(self) -> sqlite3.Cursor:
        """This thread's cursor on its own connection (opened on first use, and again after a fork).

        One cursor per connection, reused by every statement of every unit: a
        new cursor per statement would cost more than some of the statements.
        """
        cursor = getattr(self._local, "cursor", None)
        if cursor is not None and self._local.pid == os.getpid():
            return cursor
        cursor = self._connection().cursor()
        self._local.cursor = cursor
        return cursor

    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is not None and self._local.pid == os.getpid():
            return connection
        # mode=rw: never create the file (the engine made it when the StateDB
        # opened); a deleted one is refused, not replaced by an empty database
        connection = sqlite3.connect(
            f"file:{urllib.parse.quote(self._path)}?mode=rw", uri=True,
            timeout=self._busy_timeout_ms / 1000.0, isolation_level=None, check_same_thread=False,
        )
        configure_sqlite(connection, self._busy_timeout_ms)
        # This connection waits for the write lock in compare_and_set (writer_pause
        # or prompt_pause), not in SQLite's busy handler, so that a claim can wait
        # differently from other changes.  In WAL mode, once BEGIN IMMEDIATE has
        # the lock (and its snapshot) nothing in the unit waits for a lock; a
        # database left in a rollback journal (WAL refused, e.g. by the file
        # system) waits for readers at COMMIT, so it keeps SQLite's busy handler.
        if str(connection.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
            connection.execute("PRAGMA busy_timeout = 0")
        self._local.connection = connection
        self._local.pid = os.getpid()
        with self._lock:
            self._close_orphans()
            self._connections.append((threading.current_thread(), os.getpid(), connection))
        return connection

    def _close_orphans(self) -> None:
        """Close the connections of this process's threads that have ended; lock held.

        Each thread gets a connection of its own, and a thread that ends leaves
        it (two file descriptors) behind: closed here, so a process that runs a
        thread per request keeps as many connections as it has live threads.
        Connections inherited through fork (another pid) are left alone, as
        before: closing them in the child is not ours to do.
        """
        pid = os.getpid()
        kept = []
        for entry in self._connections:
            thread, owner, connection = entry
            if owner == pid and not thread.is_alive():
                try:
                    connection.close()
                except sqlite3.Error:
                    pass
            else:
                kept.append(entry)
        self._connections = kept

    def compare_and_set(
        self,
        update: PreparedStatement,
        params: Mapping[str, Any],
        history: PreparedStatement,
        history_params: Callable[[Any], Mapping[str, Any]],
        *,
        history_column: str,
        record: Optional[Callable[[Sequence[Any]], Any]] = None,
        prompt: bool = False,
        follow_up: Optional[tuple[PreparedStatement, Callable[[Any], Mapping[str, Any]]]] = None,
    ) -> Optional[Any]:
        """Apply the UPDATE and its history row in one ``BEGIN IMMEDIATE`` unit.

        ``history_params(value)`` gives the history row's parameters from the
        updated row's ``history_column`` (a status change passes the column of
        the status it moved from; a claim, whose row is not known in advance,
        its key).  ``follow_up`` is a further statement of the same unit, with
        its parameters from the same value (a run's status for MLflow).
        Returns the updated row (processed like SQLAlchemy's; with ``record``,
        one of :meth:`PreparedStatement.loader`, the record of it), or None
        when the compare-and-set matched nothing (rolled back; nothing written).

        Waiting for the write lock: with ``prompt`` (claims: a worker waits for
        its task) in short pauses (:func:`~rapidfire_state.db.engine.prompt_pause`),
        otherwise in SQLite's own growing steps
        (:func:`~rapidfire_state.db.engine.writer_pause`); as patient as the
        engine's connections either way (the busy timeout plus the write-retry time).
        """
        cursor = self._begin(prompt)
        try:
            try:
                values = cursor.execute(update.sql, update.arguments(params)).fetchone()
            except sqlite3.IntegrityError:
                # a constraint refused the change (a second RUNNING experiment):
                # the general path runs it again and explains the refusal
                values = None
            if values is None:
                cursor.execute("ROLLBACK")
                self.fallbacks += 1
                return None
            # Only what the history row needs is computed while the write lock
            # is held; the returned row is processed after COMMIT.
            key = values[update.columns.index(history_column)]
            cursor.execute(history.sql, history.arguments(history_params(key)))
            if follow_up is not None:
                statement, follow_up_params = follow_up
                cursor.execute(statement.sql, statement.arguments(follow_up_params(key)))
            cursor.execute("COMMIT")
            self.commits += 1
        except BaseException as exc:
            self._abandon(cursor, exc)
            raise
        return update.row(values) if record is None else record(values)

    def insert_rows(
        self, statement: PreparedStatement, rows: Sequence[Mapping[str, Any]], *, prompt: bool = False
    ) -> None:
        """Run the INSERT ``statement`` once per row of ``rows`` in one ``BEGIN IMMEDIATE`` unit.

        ``prompt``: wait for the write lock in short steps, as a claim does.
        """
        cursor = self._begin(prompt)
        try:
            cursor.executemany(statement.sql, [statement.arguments(row) for row in rows])
            cursor.execute("COMMIT")
            self.commits += 1
        except BaseException as exc:
            self._abandon(cursor, exc)
            raise

    def _begin(self, prompt: bool) -> sqlite3.Cursor:
        """This thread's cursor inside ``BEGIN IMMEDIATE``, on the file this store opened."""
        try:
            cursor = self._cursor()
        except sqlite3.Error as exc:
            if self._check_file is not None:
                self._check_file()  # the usual cause: the file is gone; say so
            raise DBException(f"cannot open {self._path}: {exc}") from exc
        try:
            cursor.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            if not is_retryable(exc):
                raise DBException(f"cannot begin a write transaction on {self._path}: {exc}") from exc
            self._wait_for_lock(cursor, exc, prompt_pause if prompt else writer_pause)
        if self._check_file is not None:
            try:
                self._same_file()
            except BaseException as exc:
                self._abandon(cursor, exc)
                raise
        return cursor

    def _abandon(self, cursor: sqlite3.Cursor, exc: BaseException) -> None:
        """Roll back the unit that ``exc`` interrupted; a driver error is raised as DBException."""
        connection = cursor.connection
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise DBException(f"database error on {self._path}: {exc}") from exc

    def _wait_for_lock(self, cursor: sqlite3.Cursor, first: sqlite3.Error, pause: Callable[[int], None]) -> None:
        """``BEGIN IMMEDIATE`` again until it has the write lock (``first``: the busy error it met).

        :func:`retry_while_busy` (the package's one loop), sleeping ``pause``
        between tries, until the busy timeout and the write-retry time have
        passed since the first failure, which is ``first``.
        """
        failures = [first]

        def begin() -> None:
            if failures:
                raise failures.pop()  # the first try already failed: start the loop's clock now
            cursor.execute("BEGIN IMMEDIATE")

        try:
            retry_while_busy(
                begin, retryable=is_retryable, pause=pause,
                retry_seconds=self._busy_timeout_ms / 1000.0 + self._retry_seconds(),
            )
        except sqlite3.Error as exc:
            raise DBException(f"cannot begin a write transaction on {self._path}: {exc}") from exc

    def _same_file(self) -> None:
        """The caller's ``check_file``, run only when the file's identity changed since it last passed.

        ``check_file`` (the store's: the file must be the one it opened) costs a
        stat and the comparison; the identity it last accepted is kept here, so
        a write costs one ``os.stat`` while nothing changed.  An identity is
        kept only when the file had it both before and after the check passed.
        """
        identity = _identity(self._path)
        if identity is not None and identity == self._verified:
            return
        self._check_file()  # raises when the file was deleted or replaced
        if identity is not None and _identity(self._path) == identity:
            self._verified = identity

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for _, _, connection in connections:
            try:
                connection.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()


class PostgreSQLPreparedWriter:
    """The same prepared compare-and-set units on PostgreSQL, on the engine's pooled connections.

    Through SQLAlchemy's execution machinery a status change cost the client
    about 2.5 times the CPU that psycopg needs to send the same statements
    (``scripts/bench/pg.py``), and on a machine whose cores the server shares
    that CPU bounds throughput.  Here each unit checks a connection out of the
    engine's pool (so the same ``application_name``, timeouts, idle ping and
    fork handling apply), runs the statements compiled once by the engine's
    dialect on its psycopg cursor (autocommit off: psycopg begins the
    transaction), commits, and returns it.  A unit that meets a serialization
    failure or deadlock is run again whole (:func:`retry_while_busy`, as the
    engine path); a compare-and-set that matches nothing, or that a constraint
    refuses, is rolled back and the caller takes the general path, which
    explains it.  Nothing is read before the write: the rules are the same.
    """

    def __init__(self, engine: Any, url_text: str, retry_seconds: Callable[[], float]):
        from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

        self._engine = engine
        self._dialect = engine.dialect
        # positional %s parameters, for tuples in SQL order (result processing is the engine dialect's)
        self._sql_dialect = PGDialect_psycopg(paramstyle="format")
        self._url_text = url_text
        self._retry_seconds = retry_seconds
        self._prepared: dict[int, tuple[Any, PreparedStatement]] = {}
        self._lock = threading.Lock()
        #: units committed here, and compare-and-sets that matched nothing (see SQLitePreparedWriter)
        self.commits = 0
        self.fallbacks = 0

    def prepare(self, statement: Any) -> PreparedStatement:
        """Compile ``statement`` once (keyed by identity: statements here are cached objects)."""
        cached = self._prepared.get(id(statement))
        if cached is not None and cached[0] is statement:
            return cached[1]
        prepared = compile_prepared(
            statement, self._sql_dialect, lambda column: _pg_result_processor(column, self._dialect)
        )
        with self._lock:
            self._prepared[id(statement)] = (statement, prepared)  # the reference keeps the id valid
        return prepared

    def _unit(self, body: Callable[[Any], Any]) -> Any:
        """``body(cursor)`` in one transaction on a pooled connection, committed; retried whole when told."""
        from sqlalchemy.exc import SQLAlchemyError

        def attempt() -> Any:
            connection = self._engine.raw_connection()
            driver = connection.driver_connection
            try:
                with driver.cursor() as cursor:
                    outcome = body(cursor)
                if outcome is None:
                    driver.rollback()
                else:
                    driver.commit()
                return outcome
            except BaseException:
                if driver.broken or driver.closed:
                    connection.invalidate()  # the pool opens a new one; this one is gone
                else:
                    try:
                        driver.rollback()
                    except Exception:  # noqa: BLE001 - the error being raised is the one to report
                        connection.invalidate()
                raise
            finally:
                connection.close()  # back to the pool (or dropped, when invalidated)

        try:
            return retry_while_busy(attempt, retryable=is_retryable, retry_seconds=self._retry_seconds())
        except SQLAlchemyError as exc:  # the pool could not connect
            orig = getattr(exc, "orig", None)
            raise DBException(f"database error on {self._url_text}: {orig if orig is not None else exc}") from exc
        except Exception as exc:
            if _is_driver_error(exc):
                raise DBException(f"database error on {self._url_text}: {exc}") from exc
            raise

    def compare_and_set(
        self,
        update: PreparedStatement,
        params: Mapping[str, Any],
        history: PreparedStatement,
        history_params: Callable[[Any], Mapping[str, Any]],
        *,
        history_column: str,
        record: Optional[Callable[[Sequence[Any]], Any]] = None,
        prompt: bool = False,
        follow_up: Optional[tuple[PreparedStatement, Callable[[Any], Mapping[str, Any]]]] = None,
    ) -> Optional[Any]:
        """As :meth:`SQLitePreparedWriter.compare_and_set` (``prompt`` has no meaning here)."""
        import psycopg

        def body(cursor: Any) -> Optional[Sequence[Any]]:
            try:
                cursor.execute(update.sql, update.arguments(params))
            except psycopg.errors.IntegrityError:
                return None  # a constraint refused it: the general path explains
            values = cursor.fetchone()
            if values is None:
                return None
            key = values[update.columns.index(history_column)]
            cursor.execute(history.sql, history.arguments(history_params(key)))
            if follow_up is not None:
                statement, follow_up_params = follow_up
                cursor.execute(statement.sql, statement.arguments(follow_up_params(key)))
            return values

        values = self._unit(body)
        if values is None:
            self.fallbacks += 1
            return None
        self.commits += 1
        return update.row(values) if record is None else record(values)

    def insert_rows(
        self, statement: PreparedStatement, rows: Sequence[Mapping[str, Any]], *, prompt: bool = False
    ) -> None:
        """Run the INSERT ``statement`` once per row of ``rows`` in one transaction."""

        def body(cursor: Any) -> bool:
            cursor.executemany(statement.sql, [statement.arguments(row) for row in rows])
            return True

        self._unit(body)
        self.commits += 1

    def close(self) -> None:
        """Nothing of its own to close: the connections are the engine's pool's."""


def _pg_result_processor(column: Any, dialect: Any) -> Optional[Callable[[Any], Any]]:
    """SQLAlchemy's processor of a returned column on PostgreSQL (the result's, without a cursor).

    The dialect's numeric processor asks for the column's type OID, which only a
    cursor's description has: a float column (double precision, not Decimal)
    needs none, as psycopg returns a float.
    """
    from sqlalchemy import Float

    impl = column.type.dialect_impl(dialect)
    if isinstance(column.type, Float) and not column.type.asdecimal:
        return None
    return impl.result_processor(dialect, None)


def _is_driver_error(exc: BaseException) -> bool:
    try:
        import psycopg
    except ImportError:  # pragma: no cover - PostgreSQL needs it
        return False
    return isinstance(exc, psycopg.Error)
