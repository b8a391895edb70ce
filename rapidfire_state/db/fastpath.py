"""Prepared compare-and-set units on SQLite: the hot path of status changes.

A status change is two statements (the compare-and-set ``UPDATE … RETURNING``
and its history ``INSERT``) inside ``BEGIN IMMEDIATE``.  Through SQLAlchemy's
execution machinery each of them costs several times what SQLite needs to run
it, and on SQLite that cost is paid while the database-wide write lock is held,
so it bounds every process's throughput.  This module runs the *same* Core
statements — compiled once by SQLAlchemy's SQLite dialect, with the same
result processing — on a driver connection of its own per thread, configured
by the same pragmas as the engine's connections (:func:`configure_sqlite`).

It is an optimisation of :meth:`StateDB._write` for one shape of unit, not a
second set of rules: it only ever *applies* a compare-and-set that matched.
When the UPDATE matches no row the unit is rolled back and the caller takes
the general path, which explains the refusal (missing row, idempotent repeat,
illegal transition) exactly as before.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from rapidfire_state.db.engine import configure_sqlite, is_retryable, retry_while_busy
from rapidfire_state.exceptions import DBException


@dataclass(frozen=True)
class PreparedStatement:
    """A Core statement compiled once: SQL text, parameter order, result processors."""

    sql: str
    names: tuple[str, ...]
    defaults: Mapping[str, Any]
    columns: tuple[str, ...]
    processors: tuple[Optional[Callable[[Any], Any]], ...]

    def arguments(self, params: Mapping[str, Any]) -> tuple:
        defaults = self.defaults
        return tuple([params[name] if name in params else defaults[name] for name in self.names])

    def row(self, values: Sequence[Any]) -> dict[str, Any]:
        return {
            column: (value if processor is None or value is None else processor(value))
            for column, processor, value in zip(self.columns, self.processors, values)
        }


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
        compiled = statement.compile(dialect=self._dialect)
        if any(bind.expanding for bind in compiled.binds.values()):
            raise ValueError("prepared statements need plain bound parameters, not expanding IN lists")
        returning = list(getattr(statement, "_returning", ()) or ())
        columns = tuple(column.name for column in returning)
        processors = tuple(
            column.type.dialect_impl(self._dialect).result_processor(self._dialect, None) for column in returning
        )
        prepared = PreparedStatement(
            sql=compiled.string,
            names=tuple(compiled.positiontup or ()),
            # values fixed when the statement was built; the required ones come per call
            defaults={name: bind.effective_value for name, bind in compiled.binds.items() if not bind.required},
            columns=columns,
            processors=processors,
        )
        with self._lock:
            self._prepared[id(statement)] = (statement, prepared)  # the reference keeps the id valid
        return prepared

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
    ) -> Optional[dict[str, Any]]:
        """Apply the UPDATE and its history row in one ``BEGIN IMMEDIATE`` unit.

        ``history_params(value)`` gives the history row's parameters from the
        updated row's ``history_column`` (a status change passes the column of
        the status it moved from; a claim, whose row is not known in advance,
        its key).
        Returns the updated row (processed like SQLAlchemy's), or None when the
        compare-and-set matched nothing (rolled back; nothing written).
        """
        try:
            connection = self._connection()
        except sqlite3.Error as exc:
            if self._check_file is not None:
                self._check_file()  # the usual cause: the file is gone; say so
            raise DBException(f"cannot open {self._path}: {exc}") from exc
        try:
            retry_while_busy(
                lambda: connection.execute("BEGIN IMMEDIATE"), retryable=is_retryable,
                retry_seconds=self._retry_seconds(),
            )
        except sqlite3.Error as exc:
            raise DBException(f"cannot begin a write transaction on {self._path}: {exc}") from exc
        try:
            if self._check_file is not None:
                self._check_file()
            try:
                values = connection.execute(update.sql, update.arguments(params)).fetchone()
            except sqlite3.IntegrityError:
                # a constraint refused the change (a second RUNNING experiment):
                # the general path runs it again and explains the refusal
                values = None
            if values is None:
                connection.execute("ROLLBACK")
                self.fallbacks += 1
                return None
            # Only what the history row needs is computed while the write lock
            # is held; the returned row is processed after COMMIT.
            key = values[update.columns.index(history_column)]
            connection.execute(history.sql, history.arguments(history_params(key)))
            connection.execute("COMMIT")
            self.commits += 1
        except BaseException as exc:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise DBException(f"database error on {self._path}: {exc}") from exc
            raise
        return update.row(values)

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for _, _, connection in connections:
            try:
                connection.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()
