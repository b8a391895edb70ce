"""Engine construction: one place that knows how each backend is opened.

SQLite (the embedded default) is opened with WAL, ``synchronous=NORMAL``,
foreign keys on and a busy timeout.  pysqlite's own implicit transaction
handling is switched off so that we emit ``BEGIN`` ourselves: write units
(engines with the ``rf_write`` execution option) begin ``IMMEDIATE`` and take the
write lock up front — a deferred transaction that later tries to write cannot
upgrade its read lock while another writer waits, and fails at once with
"database is locked" whatever the busy timeout.  Reads begin deferred, so an
open read session never holds the write lock.

PostgreSQL goes through psycopg 3 with ``pool_pre_ping`` and the session time
zone pinned to UTC (``db_now()`` and ``CURRENT_TIMESTAMP`` defaults agree).
"""

from __future__ import annotations

import os
import random
import re
import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.engine.url import URL
from sqlalchemy.exc import ArgumentError

from rapidfire_state.constants import DBConfig
from rapidfire_state.exceptions import ConfigError

WRITE_OPTION = "rf_write"

_SUPPORTED = ("sqlite", "postgresql")


def resolve_url(url: str | URL | os.PathLike | None = None) -> URL:
    """The database URL: ``url``, else ``$RF_DB_URL``, else the embedded SQLite file.

    A bare filesystem path is taken as a SQLite file.  ``postgresql://`` and
    ``postgres://`` mean psycopg 3.
    """
    if url is None:
        url = DBConfig.URL
    if isinstance(url, os.PathLike) or (isinstance(url, str) and "://" not in url):
        url = f"sqlite:///{Path(url).expanduser()}"
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(
            f"database URL {str(url)!r} is not a valid URL; use sqlite:///PATH or "
            "postgresql+psycopg://USER@HOST:PORT/DB"
        ) from exc
    backend = parsed.get_backend_name()
    if backend == "postgres":
        parsed = parsed.set(drivername="postgresql+psycopg")
        backend = "postgresql"
    if backend not in _SUPPORTED:
        raise ConfigError(
            f"database URL {parsed.render_as_string(hide_password=True)!r} uses backend "
            f"{backend!r}; allowed: {', '.join(_SUPPORTED)}"
        )
    if backend == "postgresql" and parsed.get_driver_name() in ("", "psycopg2") and "+" not in parsed.drivername:
        parsed = parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ConfigError(
            "an in-memory SQLite database cannot be shared between processes; "
            "use sqlite:///PATH to a file"
        )
    return parsed


def sqlite_file(url: URL) -> Path | None:
    """The file of a SQLite URL, else None."""
    if url.get_backend_name() != "sqlite" or not url.database:
        return None
    database = url.database
    if database.startswith("file:"):
        database = re.sub(r"^file:", "", database).split("?", 1)[0]
    return Path(database).expanduser().resolve()


def create_state_engine(url: URL) -> Engine:
    """An engine configured for the state layer's transaction discipline."""
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    return _postgresql_engine(url)


def _sqlite_engine(url: URL) -> Engine:
    path = sqlite_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    busy_timeout_ms = int(DBConfig.BUSY_TIMEOUT_MS)
    engine = create_engine(
        url,
        connect_args={"timeout": busy_timeout_ms / 1000.0, "check_same_thread": False},
        pool_pre_ping=False,
    )

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, connection_record: Any) -> None:
        configure_sqlite(dbapi_connection, busy_timeout_ms)

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        if connection.get_execution_options().get(WRITE_OPTION):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            connection.exec_driver_sql("BEGIN")

    return engine


def configure_sqlite(dbapi_connection: Any, busy_timeout_ms: int) -> None:
    """The settings of every SQLite connection the library opens."""
    # Off: pysqlite would otherwise issue its own deferred BEGIN before DML.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _postgresql_engine(url: URL) -> Engine:
    from rapidfire_state.db.schema import attach_postgresql_options

    attach_postgresql_options()
    return create_engine(
        url,
        pool_pre_ping=True,
        connect_args={"options": "-c timezone=UTC"},
    )


def backoff(attempt: int) -> None:
    """Sleep before retrying a busy write unit: full jitter, so writers that
    collided do not collide again in lockstep."""
    time.sleep(random.uniform(0, min(0.25, 0.002 * (2 ** min(attempt, 10)))))


def is_retryable(exc: BaseException) -> bool:
    """True for errors after which the whole write unit may safely run again.

    SQLite: the database was busy/locked past the busy timeout.  PostgreSQL:
    serialization failure or deadlock (the transaction was rolled back).
    """
    orig = getattr(exc, "orig", None)
    if orig is None:
        return False
    sqlstate = getattr(orig, "sqlstate", None) or getattr(getattr(orig, "diag", None), "sqlstate", None)
    if sqlstate in ("40001", "40P01"):
        return True
    message = str(orig).lower()
    return "database is locked" in message or "database is busy" in message or "database table is locked" in message


def is_unique_violation(exc: BaseException) -> bool:
    """True when ``exc`` wraps a UNIQUE constraint violation on either backend."""
    orig = getattr(exc, "orig", None)
    if orig is None:
        return False
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate == "23505":
        return True
    return "unique constraint failed" in str(orig).lower()
