"""Alembic environment of rapidfire_state.

Used both by ``alembic`` run from the repository root (``alembic.ini``) and by
the library (``StateDB``, ``rapidfire-state db upgrade``), which hands over an
open connection in ``config.attributes["connection"]`` (and its URL in
``config.attributes["url"]``).

The database, first match wins:

1. ``alembic -x url=URL ...`` (a SQLAlchemy URL or a path to a SQLite file);
2. ``$RF_DB_URL``;
3. ``sqlalchemy.url`` in ``alembic.ini`` (unset in the shipped file);
4. the embedded SQLite file, ``$RF_HOME/db/rapidfire_state.db``.

Only ``upgrade`` creates a SQLite file that does not exist; every other
command (``current``, ``downgrade``, ``stamp``, ``check`` ...) says there is
no database and fails.  A SQLite file that is missing or empty while a
non-empty write-ahead log lies beside it is refused as damaged by every
command (opening it would discard the log).

Online, on SQLite, migrations run with ``render_as_batch`` (ALTER through
table copies), inside one ``BEGIN IMMEDIATE`` transaction, with foreign-key
enforcement off while tables are rebuilt and a ``PRAGMA foreign_key_check``
before commit.  Offline (``--sql``) the script starts with
``PRAGMA foreign_keys = OFF`` and wraps the DDL in ``BEGIN``/``COMMIT``;
revisions take what they cannot read from a database from the frozen
snapshots in ``migrations/helpers.py``.

Run from the command line, the logging of ``alembic.ini`` is applied (so
``Running upgrade ...`` lines are printed) and the library's errors end the
command with Alembic's one-line ``FAILED: ...`` instead of a traceback.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from alembic import context
from alembic.util import CommandError

from rapidfire_state.db.engine import WRITE_OPTION, create_state_engine, resolve_url, sqlite_file
from rapidfire_state.db.schema import metadata
from rapidfire_state.exceptions import RapidFireError

config = context.config
target_metadata = metadata  # the same MetaData as rapidfire_state.db.Base

#: commands that write to the database; the others only read it
_WRITING_COMMANDS = {"upgrade", "downgrade", "stamp"}

_from_library = "connection" in config.attributes or "url" in config.attributes

if config.config_file_name is not None and not _from_library:
    # The ini file's [loggers]: without them Alembic's INFO lines
    # ("Running upgrade ...") reach no handler and are not shown.
    from logging.config import fileConfig

    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _command_name() -> Optional[str]:
    """The alembic subcommand being run from the command line (None from the library)."""
    options = getattr(config, "cmd_opts", None)
    command = getattr(options, "cmd", None)
    if not command:
        return None
    return getattr(command[0], "__name__", None)


def _configured_url() -> Any:
    """The URL to migrate, in the order of the module docstring."""
    given = config.attributes.get("url")
    if given is None:
        # an empty "-x url=" (an unset shell variable) is refused by resolve_url,
        # never taken as "not given": that would migrate another database
        given = context.get_x_argument(as_dictionary=True).get("url")
    if given is None:
        given = os.environ.get("RF_DB_URL") or None
    if given is None:
        given = config.get_main_option("sqlalchemy.url") or None
    # resolve_url(None) is the embedded default
    return resolve_url(given)


@contextmanager
def _cli_errors() -> Iterator[None]:
    """From the command line, the library's errors become ``FAILED: <message>``."""
    if _from_library:
        yield
        return
    from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

    try:
        yield
    except RapidFireError as exc:
        raise CommandError(str(exc)) from exc
    except OperationalError as exc:
        # cannot connect, database locked, ...: the driver's first line says which
        lines = str(exc.orig or exc).strip().splitlines() or [type(exc).__name__]
        raise CommandError(f"database {_configured_url().render_as_string()}: {lines[0]}") from exc
    except IntegrityError as exc:
        # a revision that did not declare its CHECK: the database refused the
        # rows itself, and the migration's transaction was rolled back
        from rapidfire_state.db.migrate import migration_error_from

        raise CommandError(str(migration_error_from(exc, _configured_url().render_as_string()))) from exc
    except DBAPIError as exc:
        # any other refusal of the driver (a file that is not a database, ...): its first line
        lines = str(exc.orig or exc).strip().splitlines() or [type(exc).__name__]
        raise CommandError(f"database {_configured_url().render_as_string()}: {lines[0]}") from exc


def _check_sqlite_file(url: Any, *, may_create: bool) -> None:
    from rapidfire_state.db.migrate import refuse_damaged_sqlite

    path = sqlite_file(url)
    if path is None:
        return
    refuse_damaged_sqlite(path)
    if may_create:
        return
    if not path.exists():
        raise CommandError(f"no database at {path}; `alembic -x url=sqlite:///{path} upgrade head` creates it")
    if path.stat().st_size == 0:
        raise CommandError(
            f"no database at {path} (the file is empty); `alembic -x url=sqlite:///{path} upgrade head` creates it"
        )


def run_migrations_offline() -> None:
    url = _configured_url()
    is_sqlite = url.get_backend_name() == "sqlite"
    context.configure(
        url=url.render_as_string(hide_password=False),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=is_sqlite,
        # SQLite's DDL is transactional: a script applied with sqlite3 is all or nothing
        transactional_ddl=True,
        dialect_opts={"paramstyle": "named"},
    )
    if is_sqlite:
        # switched off outside the transaction (inside, SQLite ignores it): the
        # table copies drop tables that others reference
        context.execute("PRAGMA foreign_keys = OFF")
    with context.begin_transaction():
        context.run_migrations()


def _configure_and_run(connection: Any, is_sqlite: bool) -> None:
    """Run the migrations on ``connection`` inside the caller's transaction."""
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=is_sqlite,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_on(connection: Any, *, writes: bool) -> None:
    is_sqlite = connection.dialect.name == "sqlite"
    if not writes:
        # current, check, ...: a plain read transaction, no write lock, no pragmas
        with connection.begin():
            _configure_and_run(connection, is_sqlite)
        return
    raw = None
    if is_sqlite:
        # Table rebuilds (batch mode) drop and re-create tables that others
        # reference; enforcement must be off, and it can only be switched
        # outside a transaction.
        raw = connection.connection.driver_connection
        if connection.in_transaction():
            connection.commit()
        raw.execute("PRAGMA foreign_keys = OFF")
    connection.execution_options(**{WRITE_OPTION: True})
    try:
        with connection.begin():
            # Configured inside our transaction, Alembic sees an external
            # transaction and does not commit per migration (it would on
            # SQLite, whose DDL it treats as non-transactional): the whole
            # upgrade, and the foreign-key check, are one unit, and no
            # transaction is open when enforcement is switched back on below.
            if not is_sqlite:
                # a migration of a large table may run longer than the library's
                # statement timeout (RF_DB_STATEMENT_TIMEOUT_S), and pause between its
                # statements (loading revision scripts) longer than a short
                # RF_DB_IDLE_IN_TRANSACTION_TIMEOUT_S; SET LOCAL ends with this
                # transaction, so the pooled connection keeps its own settings
                connection.exec_driver_sql("SET LOCAL statement_timeout = 0")
                connection.exec_driver_sql("SET LOCAL idle_in_transaction_session_timeout = 0")
            _configure_and_run(connection, is_sqlite)
            if is_sqlite:
                problems = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if problems:
                    raise RuntimeError(f"migration left foreign-key violations: {problems[:5]}")
    finally:
        if raw is not None:
            raw.execute("PRAGMA foreign_keys = ON")
        connection.execution_options(**{WRITE_OPTION: False})


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection, writes=True)
        return
    command = _command_name()
    writes = command is None or command in _WRITING_COMMANDS
    url = _configured_url()
    _check_sqlite_file(url, may_create=command in (None, "upgrade"))
    # current, check ...: the readers' engine (on SQLite query_only, no journal-mode
    # switch, no -wal/-shm left behind; on PostgreSQL read-only transactions)
    engine = create_state_engine(url, read_only=not writes)
    try:
        with engine.connect() as connection:
            _run_on(connection, writes=writes)
    finally:
        engine.dispose()


with _cli_errors():
    if context.is_offline_mode():
        run_migrations_offline()
    else:
        run_migrations_online()
