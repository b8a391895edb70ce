"""Schema versions and the open policy.

``REVISIONS`` lists the migration revisions this library ships, oldest first,
so that opening an up-to-date database costs one ``SELECT version_num`` and
never loads Alembic or its script directory.  A test checks that this list
equals Alembic's own view of ``migrations/versions``.

Open policy (``ensure_schema``):

* empty database → migrate to head under a lock (a file lock beside a SQLite
  file, an advisory lock on PostgreSQL), so that many processes opening a new
  database at once migrate it exactly once;
* behind head → a SQLite file is backed up (SQLite's online backup API) and
  upgraded; a server database raises :class:`SchemaOutOfDateError` naming the
  command, unless ``auto_upgrade=True``; ``auto_upgrade=False`` refuses SQLite too;
* unknown (for example newer) revision → :class:`SchemaTooNewError`, always;
  the database is not touched.
"""

from __future__ import annotations

import importlib.util
import sqlite3
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from rapidfire_state.exceptions import DBException, SchemaOutOfDateError, SchemaTooNewError

if TYPE_CHECKING:
    from rapidfire_state.db.store import StateDB

#: every shipped revision, oldest first; the last is head
REVISIONS: tuple[str, ...] = ("0001_initial", "0002_run_ended_by_check", "0003_task_claims")
HEAD_REVISION = REVISIONS[-1]
UPGRADE_COMMAND = "rapidfire-state db upgrade"

# 64-bit key of the PostgreSQL advisory lock held while migrating ("rfstate" in hex)
_PG_LOCK_KEY = 0x7266737461746500


def migrations_dir() -> Path:
    """Where ``env.py`` and ``versions/`` live: the installed package, else the repository."""
    spec = importlib.util.find_spec("rapidfire_state.migrations")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (Path(location) / "env.py").exists():
                return Path(location)
    repo = Path(__file__).resolve().parents[2] / "migrations"
    if (repo / "env.py").exists():
        return repo
    raise DBException("the migrations directory is missing from this installation of rapidfire_state")


def alembic_config(database: "StateDB", connection: Any = None) -> Any:
    """An Alembic ``Config`` for ``database`` (no ini file needed)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option(
        "sqlalchemy.url", database.url.render_as_string(hide_password=False).replace("%", "%%")
    )
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def current_revision(database: "StateDB") -> Optional[str]:
    """The revision stamped in the database, None when unversioned or missing."""
    return read_revision(database.url, database.engine)


def read_revision(url: Any, engine: Any = None) -> Optional[str]:
    """The revision stamped in the database at ``url``; never migrates or writes."""
    from rapidfire_state.db.engine import create_state_engine, sqlite_file

    path = sqlite_file(url)
    if path is not None:
        return _sqlite_revision(path)
    from sqlalchemy import inspect, text

    own_engine = engine is None
    engine = engine if engine is not None else create_state_engine(url)
    try:
        with engine.connect() as connection:
            if not inspect(connection).has_table("alembic_version"):
                return None
            return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        if own_engine:
            engine.dispose()


def _sqlite_revision(path: Path) -> Optional[str]:
    # A read-only connection without our pragmas: reading the revision must not
    # change a byte of a database we may refuse to open.
    if not path.exists() or path.stat().st_size == 0:
        return None
    try:
        connection = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as exc:
        raise DBException(f"cannot open SQLite database {path}: {exc}") from exc
    try:
        has_table = connection.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'"
        ).fetchone()
        if not has_table:
            return None
        row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
        return row[0] if row else None
    except sqlite3.DatabaseError as exc:
        raise DBException(f"{path} is not a readable SQLite database: {exc}") from exc
    finally:
        connection.close()


def _has_user_tables(database: "StateDB") -> bool:
    from sqlalchemy import inspect

    with database.engine.connect() as connection:
        names = set(inspect(connection).get_table_names())
    return bool(names & {"experiments", "runs"})


def ensure_schema(database: "StateDB", *, auto_upgrade: Optional[bool]) -> None:
    """Apply the open policy (see the module docstring)."""
    revision = current_revision(database)
    if revision == HEAD_REVISION:
        return
    _refuse_unknown(database, revision)
    with migration_lock(database):
        revision = current_revision(database)  # another process may have migrated meanwhile
        if revision == HEAD_REVISION:
            return
        _refuse_unknown(database, revision)
        if revision is None:
            if _has_user_tables(database):
                raise DBException(
                    f"{database.url_text} has rapidfire tables but no alembic_version: it was not created "
                    "by this library's migrations; stamp it with `alembic stamp` after checking its schema"
                )
            _upgrade_locked(database, "head")
            database.last_migration = (None, HEAD_REVISION)
            return
        allowed = auto_upgrade if auto_upgrade is not None else database.is_sqlite
        if not allowed:
            raise SchemaOutOfDateError(
                f"{database.url_text} is at schema revision {revision}, behind {HEAD_REVISION}; "
                f"run `{UPGRADE_COMMAND}` (or open it with auto_upgrade=True)"
            )
        if database.is_sqlite:
            database.backup_path = str(backup_sqlite(database, revision))
        _upgrade_locked(database, "head")
        database.last_migration = (revision, HEAD_REVISION)


def _refuse_unknown(database: "StateDB", revision: Optional[str]) -> None:
    if revision is not None and revision not in REVISIONS:
        raise SchemaTooNewError(
            f"{database.url_text} is at schema revision {revision!r}, which this version of "
            f"rapidfire_state does not know (it knows {', '.join(REVISIONS)}); it was probably "
            "written by a newer release: upgrade rapidfire_state. The database was not modified."
        )


def backup_sqlite(database: "StateDB", revision: str) -> Path:
    """Copy the SQLite file with the online backup API; returns the backup's path."""
    source_path = Path(database.sqlite_path or "")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    target = source_path.with_name(f"{source_path.name}.{revision}.{stamp}.bak")
    source = sqlite3.connect(str(source_path), timeout=30)
    try:
        destination = sqlite3.connect(str(target))
        try:
            source.backup(destination)
        finally:
            destination.close()
    finally:
        source.close()
    return target


@contextmanager
def migration_lock(database: "StateDB") -> Iterator[None]:
    """Held while migrating: a file lock for SQLite, an advisory lock for PostgreSQL."""
    path = database.sqlite_path
    if path is not None:
        from filelock import FileLock

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{path}.migrate.lock", timeout=300):
            yield
        return
    from sqlalchemy import text

    with database.engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _PG_LOCK_KEY})
        connection.commit()
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _PG_LOCK_KEY})
            connection.commit()


def _upgrade_locked(database: "StateDB", revision: str) -> None:
    from alembic import command

    with database.engine.connect() as connection:
        command.upgrade(alembic_config(database, connection), revision)


def run_upgrade(database: "StateDB", revision: str = "head") -> None:
    """Upgrade under the migration lock (what ``rapidfire-state db upgrade`` runs)."""
    current = current_revision(database)
    _refuse_unknown(database, current)
    with migration_lock(database):
        _upgrade_locked(database, revision)


def run_downgrade(database: "StateDB", revision: str) -> None:
    from alembic import command

    with migration_lock(database):
        with database.engine.connect() as connection:
            command.downgrade(alembic_config(database, connection), revision)
