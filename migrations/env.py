"""Alembic environment of rapidfire_state.

Used both by ``alembic`` run from the repository root (``alembic.ini``) and by
the library (``StateDB``, ``rapidfire-state db upgrade``), which hands over an
open connection in ``config.attributes["connection"]``.

The URL is the configured ``sqlalchemy.url`` if any, else ``$RF_DB_URL``, else
the embedded SQLite file.  On SQLite, migrations run with ``render_as_batch``
(ALTER through table copies), inside one ``BEGIN IMMEDIATE`` transaction, with
foreign-key enforcement off while tables are rebuilt and a
``PRAGMA foreign_key_check`` before commit.
"""

from __future__ import annotations

from alembic import context

from rapidfire_state.db.engine import WRITE_OPTION, create_state_engine, resolve_url
from rapidfire_state.db.schema import metadata

config = context.config
target_metadata = metadata  # the same MetaData as rapidfire_state.db.Base


def _configured_url():
    configured = config.get_main_option("sqlalchemy.url")
    return resolve_url(configured or None)


def run_migrations_offline() -> None:
    url = _configured_url()
    context.configure(
        url=url.render_as_string(hide_password=False),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=url.get_backend_name() == "sqlite",
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_on(connection) -> None:
    is_sqlite = connection.dialect.name == "sqlite"
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
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=is_sqlite,
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
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
        _run_on(connection)
        return
    engine = create_state_engine(_configured_url())
    try:
        with engine.connect() as connection:
            _run_on(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
