"""Engine construction: one place that knows how each backend is opened.

SQLite (the embedded default) is opened with WAL, ``synchronous=NORMAL``,
foreign keys on and a busy timeout.  pysqlite's own implicit transaction
handling is switched off so that we emit ``BEGIN`` ourselves: write units
(engines with the ``rf_write`` execution option) begin ``IMMEDIATE`` and take the
write lock up front — a deferred transaction that later tries to write cannot
upgrade its read lock while another writer waits, and fails at once with
"database is locked" whatever the busy timeout.  Reads begin deferred, so an
open read session never holds the write lock.

PostgreSQL goes through psycopg 3, a pooled connection pinged before reuse only
when it sat in the pool for :data:`PING_AFTER_IDLE_S` or more (see
:func:`_ping_after_idle`), and the session time zone pinned to UTC (``db_now()`` and ``CURRENT_TIMESTAMP`` defaults agree).  Each
connection names its process in ``application_name`` (:func:`application_name`),
and carries an ``idle_in_transaction_session_timeout`` and a ``statement_timeout``
(``DBConfig``): a session forgotten inside a transaction would otherwise hold its
locks and its snapshot (and keep VACUUM from removing dead rows) for as long as
its process lives.
"""

from __future__ import annotations

import math
import os
import random
import re
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.engine.url import URL
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from rapidfire_state.constants import DBConfig
from rapidfire_state.exceptions import ConfigError, DatabaseMissingError, DBException

WRITE_OPTION = "rf_write"

T = TypeVar("T")

_SUPPORTED = ("sqlite", "postgresql")


#: what a database URL may look like, for error messages
EXPECTED_URL = (
    "expected sqlite:///RELATIVE/PATH, sqlite:////ABSOLUTE/PATH, a SQLite file path, "
    "or postgresql+psycopg://USER@HOST:PORT/DB"
)

# "name:" at the start of a string that has no "://": a URL with a mistyped separator
# (``sqlite:/abs/x.db``), not a file path.  A path that means to start like that can
# be written ``./name:…``.
_SCHEME_ONLY = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")


def resolve_url(url: str | URL | os.PathLike | None = None) -> URL:
    """The database URL: ``url``, else ``$RF_DB_URL``, else the embedded SQLite file.

    A bare filesystem path is taken as a SQLite file.  ``postgresql://`` and
    ``postgres://`` mean psycopg 3.  Refused with :class:`ConfigError` naming the
    value and what was expected: an empty URL, a scheme without ``://``
    (``sqlite:/abs/x.db``), a text that is not a URL, a SQLite URL with a host part
    (``sqlite://x.db``), a SQLite path that is a directory, an unsupported backend,
    and a driver that is not installed.  Nothing is created or opened here.
    """
    if url is None:
        url = DBConfig.URL
    if isinstance(url, URL):
        parsed = url
    else:
        if isinstance(url, os.PathLike):
            url = os.fspath(url)
        if not isinstance(url, str):
            raise ConfigError(f"database URL {url!r} is a {type(url).__name__}; {EXPECTED_URL}")
        if url.strip() == "":
            raise ConfigError(f"the database URL is empty ({url!r}); {EXPECTED_URL}")
        if "\x00" in url:
            raise ConfigError(f"database URL {url!r} contains a NUL character; {EXPECTED_URL}")
        if "://" not in url:
            if _SCHEME_ONLY.match(url):
                raise ConfigError(
                    f"database URL {url!r} is not a valid URL (no '://' after the scheme); {EXPECTED_URL} "
                    "(an absolute SQLite path takes three slashes after 'sqlite:', and a fourth for the root)"
                )
            url = f"sqlite:///{Path(url).expanduser()}"
        try:
            parsed = make_url(url)
        except (ArgumentError, ValueError) as exc:
            raise ConfigError(f"database URL {str(url)!r} is not a valid URL; {EXPECTED_URL}") from exc
    backend = parsed.get_backend_name()
    if backend == "postgres":
        parsed = parsed.set(drivername="postgresql+psycopg")
        backend = "postgresql"
    shown = parsed.render_as_string(hide_password=True)
    if backend not in _SUPPORTED:
        raise ConfigError(f"database URL {shown!r} uses backend {backend!r}; allowed: {', '.join(_SUPPORTED)}")
    if backend == "postgresql" and parsed.get_driver_name() in ("", "psycopg2") and "+" not in parsed.drivername:
        parsed = parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        if parsed.host:
            raise ConfigError(
                f"database URL {shown!r} has a host part {parsed.host!r}, which SQLite does not take; {EXPECTED_URL}"
            )
        if parsed.database in (None, "", ":memory:"):
            raise ConfigError(
                "an in-memory SQLite database cannot be shared between processes; "
                "use sqlite:///PATH to a file"
            )
        path = sqlite_file(parsed)
        if path is not None and path.is_dir():
            raise ConfigError(
                f"database path {str(path)!r} is a directory; expected a SQLite database file "
                f"(for example {str(path / 'rapidfire_state.db')!r})"
            )
    _check_driver(parsed)
    return parsed


def _check_driver(url: URL) -> None:
    """Refuse a URL whose SQLAlchemy dialect or DB-API module cannot be loaded."""
    from sqlalchemy.exc import NoSuchModuleError

    shown = url.render_as_string(hide_password=True)
    try:
        dialect = url.get_dialect()
    except NoSuchModuleError as exc:
        raise ConfigError(
            f"database URL {shown!r}: SQLAlchemy has no driver {url.drivername!r}; {EXPECTED_URL}"
        ) from exc
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        module = getattr(exc, "name", None) or url.get_driver_name()
        raise ConfigError(
            f"database URL {shown!r} needs the Python module {module!r} (driver {url.drivername!r}), "
            "which is not installed; use postgresql+psycopg://USER@HOST:PORT/DB (psycopg 3, a dependency "
            "of rapidfire_state)"
        ) from exc


def sqlite_file(url: URL) -> Path | None:
    """The file of a SQLite URL, else None."""
    if url.get_backend_name() != "sqlite" or not url.database:
        return None
    database = url.database
    if database.startswith("file:"):
        database = re.sub(r"^file:", "", database).split("?", 1)[0]
    return Path(database).expanduser().resolve()


def create_state_engine(url: URL, *, read_only: bool = False) -> Engine:
    """An engine configured for the state layer's transaction discipline.

    ``read_only=True`` (readers: listings, ``sql``, ``db current``): nothing is
    created — no directory, no database file, and on SQLite no ``-wal``/``-shm``
    left behind where it can be avoided (:func:`connect_sqlite_reader`); every
    connection refuses writes (``query_only`` on SQLite,
    ``default_transaction_read_only`` on PostgreSQL).
    """
    if url.get_backend_name() == "sqlite":
        return _sqlite_reader_engine(url) if read_only else _sqlite_engine(url)
    return _postgresql_engine(url, read_only=read_only)


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


def _sqlite_reader_engine(url: URL) -> Engine:
    path = sqlite_file(url)
    if path is None:
        raise ConfigError(f"database URL {url.render_as_string(hide_password=True)!r} names no SQLite file")
    busy_timeout_ms = int(DBConfig.BUSY_TIMEOUT_MS)
    # The URL names the file (so the pool is a file database's pool); the
    # creator opens it our way, never creating it.  Its query (``?mode=rwc``,
    # ``?uri=true`` ...) is dropped: the creator ignores it anyway, and
    # SQLAlchemy would warn about it in lines of its own.
    engine = create_engine(
        url.set(query={}), creator=lambda: connect_sqlite_reader(path, busy_timeout_ms), pool_pre_ping=False
    )

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN")

    return engine


def connect_sqlite_reader(path: Path, busy_timeout_ms: int | None = None) -> sqlite3.Connection:
    """A driver connection that reads ``path`` and never creates or changes a file.

    The file must exist (:class:`DatabaseMissingError` otherwise); the
    connection has ``query_only`` on and autocommit (no implicit ``BEGIN``).

    Why two modes: a ``mode=ro`` connection to a WAL database creates ``-wal`` and
    ``-shm`` beside it and, being read-only, can never remove them.  When no
    ``-wal`` exists (no writer has the database open) a read-write connection is
    opened instead, with ``query_only`` on: as the last connection it removes
    the two files again on close, and with an empty WAL nothing is checkpointed,
    so the database file keeps its bytes.  When a ``-wal`` exists, or the file
    or its directory is not writable, ``mode=ro`` is used and creates nothing new.
    A WAL database that cannot be read that way — no ``-wal``/``-shm`` beside it
    and a directory this process may not create them in (a read-only share,
    another user's directory) — is opened ``immutable``: with no ``-wal`` there
    is no writer, and no lock or file is needed to read it.
    """
    if busy_timeout_ms is None:
        busy_timeout_ms = int(DBConfig.BUSY_TIMEOUT_MS)
    if not path.exists():
        raise DatabaseMissingError(f"no database at {path}")
    if not path.is_file():
        raise ConfigError(f"database path {str(path)!r} is not a regular file; expected a SQLite database file")
    wal = path.with_name(path.name + "-wal")
    writable = os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)
    shm = path.with_name(path.name + "-shm")
    mode = "rw" if writable and not wal.exists() else "ro"
    options = f"mode={mode}"
    if mode == "ro" and not wal.exists() and not shm.exists() and not os.access(path.parent, os.W_OK):
        # mode=ro would need to create -shm (and -wal) to read a WAL database,
        # and fails with "attempt to write a readonly database"
        options += "&immutable=1"
    try:
        connection = sqlite3.connect(
            f"{path.as_uri()}?{options}", uri=True, timeout=busy_timeout_ms / 1000.0,
            check_same_thread=False, isolation_level=None,
        )
    except sqlite3.Error as exc:
        raise DBException(f"cannot open the SQLite database {path}: {exc}") from exc
    try:
        connection.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        connection.execute("PRAGMA query_only = ON")
    except sqlite3.Error:
        connection.close()
        raise
    return connection


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


#: a pooled PostgreSQL connection idle in the pool this long (seconds) is pinged before reuse
PING_AFTER_IDLE_S = 1.0


def _ping_after_idle(engine: Engine) -> None:
    """Ping a pooled connection on checkout only when it sat idle for :data:`PING_AFTER_IDLE_S`.

    ``pool_pre_ping`` pings on every checkout: one more round trip (and one
    more wake-up of the server process) for every unit of work, a fifth of a
    claim's.  A connection in steady use (a worker polling, a controller's
    loop) was checked in moments ago and is not pinged; one that waited in the
    pool (where the server, a restart or the network may have ended it) is,
    and a failed ping makes the pool replace it, as ``pool_pre_ping`` did.
    """
    dialect = engine.dialect

    @event.listens_for(engine, "checkin")
    def _checked_in(dbapi_connection: Any, connection_record: Any) -> None:
        connection_record.info["rf_checked_in"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, connection_record: Any, connection_proxy: Any) -> None:
        since = connection_record.info.pop("rf_checked_in", None)
        if since is None or time.monotonic() - since < PING_AFTER_IDLE_S:
            return  # just opened, or in use moments ago
        try:
            dialect.do_ping(dbapi_connection)
        except Exception as exc:
            from sqlalchemy.exc import DisconnectionError

            # the pool invalidates this connection and checks out a fresh one
            raise DisconnectionError(f"a pooled connection idle for {time.monotonic() - since:.1f} s is gone") from exc


def _postgresql_engine(url: URL, *, read_only: bool = False) -> Engine:
    from rapidfire_state.db.schema import attach_postgresql_options

    attach_postgresql_options()
    # SQLAlchemy's default QueuePool: 5 connections kept, 10 more under load
    engine = create_engine(
        url,
        pool_pre_ping=False,  # _ping_after_idle: only connections that sat in the pool
        connect_args={"options": postgresql_session_options(read_only=read_only)},
    )
    network = postgresql_network_parameters()
    _ping_after_idle(engine)

    @event.listens_for(engine, "do_connect")
    def _name(dialect: Any, connection_record: Any, cargs: Any, cparams: dict) -> None:
        # at connect time, not engine creation: the pid after a fork, the role set later;
        # an application_name (or a network parameter) in the URL's query is kept
        cparams.setdefault("application_name", application_name())
        for name, value in network.items():
            cparams.setdefault(name, value)

    return engine


#: the role this process gave itself (:func:`set_application_name`), else None
_role: str | None = None


def set_application_name(role: str | None) -> str | None:
    """Name this process's role in the PostgreSQL connections it opens from now on.

    Connections then show ``application_name = 'rapidfire_state:<role>:<pid>'`` in
    ``pg_stat_activity`` (the worker manager names its workers ``worker_<id>``, the
    command line ``cli``).  Connections already in a pool keep their name; dispose
    the engine to rename them.  ``None`` goes back to the default (see
    :func:`application_name`).  Returns the role it replaces.
    """
    global _role
    if role is not None and (not isinstance(role, str) or not role.strip()):
        raise ConfigError(f"application role {role!r} must be a non-empty string")
    previous, _role = _role, (role.strip() if role is not None else None)
    return previous


def application_name() -> str:
    """The ``application_name`` of a PostgreSQL connection opened now by this process.

    ``rapidfire_state:<role>:<pid>`` when the process named its role
    (:func:`set_application_name`); else ``$RF_DB_APPLICATION_NAME`` as it is; else
    ``rapidfire_state:<basename of argv[0]>:<pid>``.  The role goes first because a
    child inherits the environment but not the role.  The server keeps 63 bytes.
    """
    if _role is not None:
        return f"rapidfire_state:{_role}:{os.getpid()}"
    configured = os.environ.get("RF_DB_APPLICATION_NAME", "").strip()
    if configured:
        return configured
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return f"rapidfire_state:{program or 'python'}:{os.getpid()}"


def postgresql_session_options(*, read_only: bool = False) -> str:
    """The libpq ``options`` (``-c name=value`` …) of every library connection to PostgreSQL."""
    options = ["-c timezone=UTC"]
    idle = float(DBConfig.IDLE_IN_TRANSACTION_TIMEOUT_S)
    statement = float(DBConfig.STATEMENT_TIMEOUT_S)
    # milliseconds, at least 1 for a positive value (0 would mean no limit)
    options.append(f"-c idle_in_transaction_session_timeout={max(1, round(idle * 1000)) if idle > 0 else 0}")
    options.append(f"-c statement_timeout={max(1, round(statement * 1000)) if statement > 0 else 0}")
    if read_only:
        # every transaction of a reader is READ ONLY unless it says otherwise
        options.append("-c default_transaction_read_only=on")
    return " ".join(options)


def postgresql_network_parameters() -> dict[str, int]:
    """The libpq parameters that bound a connection's wait on a silent network.

    A host cut off from the server otherwise waits out TCP's retransmissions
    (about 15 minutes) inside whatever call it made.  With
    ``$RF_DB_NETWORK_TIMEOUT_S`` = T (default 30): a connect gives up after T,
    data unacknowledged for T ends the connection (``tcp_user_timeout``), and an
    idle connection is probed by TCP keepalives after T/3, so the call raises
    and the process can act (a worker stops; its tasks fall to its heartbeat).
    0 sets none of them.
    """
    seconds = float(DBConfig.NETWORK_TIMEOUT_S)
    if seconds <= 0:
        return {}
    return {
        "connect_timeout": max(2, math.ceil(seconds)),  # libpq rounds anything lower up to 2
        "tcp_user_timeout": max(1, round(seconds * 1000)),
        "keepalives": 1,
        "keepalives_idle": max(1, round(seconds / 3)),
        "keepalives_interval": max(1, round(seconds / 9)),
        "keepalives_count": 3,
    }


def backoff(attempt: int) -> None:
    """Sleep before retrying a busy write unit: full jitter, so writers that
    collided do not collide again in lockstep."""
    time.sleep(random.uniform(0, min(0.25, 0.002 * (2 ** min(attempt, 10)))))


#: the sleeps of SQLite's own busy handler between tries for a lock (seconds), the last repeated
_SQLITE_BUSY_STEPS = (0.001, 0.002, 0.005, 0.010, 0.015, 0.020, 0.025, 0.025, 0.025, 0.050, 0.050, 0.100)


def writer_pause(attempt: int) -> None:
    """Sleep before trying SQLite's write lock again, as SQLite's busy handler does.

    1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50 ms, then 100 ms per try: a waiter
    backs off far, so the process that holds the lock keeps taking it (with
    its page cache warm) while it has work, and few wake-ups interrupt it.
    That gives the most status changes per second when processes outnumber
    cores; its price is the wait of whoever is kept out, which
    :func:`prompt_pause` avoids for claims.
    """
    time.sleep(_SQLITE_BUSY_STEPS[min(attempt, len(_SQLITE_BUSY_STEPS)) - 1])


#: tries of :func:`prompt_pause` made at short intervals before the pause grows
PROMPT_TRIES = 20
#: the longest pause of :func:`prompt_pause` (seconds)
PROMPT_PAUSE_MAX = 0.010


def prompt_pause(attempt: int) -> None:
    """Sleep before trying SQLite's write lock again, briefly: the wait of a claim.

    A worker polling for its next task is idle until it gets one, and a status
    change holds the lock for well under a millisecond: with SQLite's steps
    (:func:`writer_pause`) a claim that meets the lock three or four times
    waited 8 or 18 ms, which set the claim p99 with four pollers.  Here the
    first :data:`PROMPT_TRIES` pauses are drawn from 0.05–0.4 ms (jittered, so
    pollers do not move in lockstep); after that the lock is held long (a
    large cleanup, a person's open ``BEGIN`` in ``sqlite3``) and the ceiling
    grows by a quarter per try up to :data:`PROMPT_PAUSE_MAX`, so a waiter
    does not spin.
    """
    ceiling = 0.0004 if attempt <= PROMPT_TRIES else min(PROMPT_PAUSE_MAX, 0.0004 * 1.25 ** (attempt - PROMPT_TRIES))
    time.sleep(random.uniform(0.00005, ceiling))


def retry_while_busy(
    attempt: Callable[[], T],
    *,
    retryable: Callable[[BaseException], bool],
    retry_seconds: float,
    pause: Callable[[int], None] = backoff,
) -> T:
    """``attempt()``, run again after each ``retryable`` error until ``retry_seconds`` have passed.

    The one busy-retry loop of the package: the engine path uses it to take the
    write lock and to rerun a whole unit, the prepared SQLite path to take the
    write lock.  Between attempts it calls ``pause(tries)``: :func:`backoff`
    unless told (the prepared path, which waits for the lock here rather than
    in SQLite's busy handler, passes :func:`writer_pause` or
    :func:`prompt_pause`).  The deadline starts at the first failure, so a free
    database costs no clock read.  The last error is raised as it is, for the
    caller to describe.
    """
    deadline = None
    tries = 0
    while True:
        try:
            return attempt()
        except Exception as exc:
            if not retryable(exc):
                raise
            now = time.monotonic()
            if deadline is None:
                deadline = now + retry_seconds
            if now >= deadline:
                raise
            tries += 1
            pause(tries)


def is_retryable(exc: BaseException) -> bool:
    """True for errors after which the whole write unit may safely run again.

    SQLite: the database was busy/locked past the busy timeout.  PostgreSQL:
    serialization failure or deadlock (the transaction was rolled back).
    """
    # a SQLAlchemy error wraps the driver's; the prepared path meets the driver's own
    orig = getattr(exc, "orig", None) if isinstance(exc, SQLAlchemyError) else exc
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
