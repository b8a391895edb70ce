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
  the database is not touched;
* a SQLite file that is missing or empty while a non-empty ``-wal`` lies
  beside it → :class:`DatabaseDamagedError`, always (the log holds the data;
  opening the file would discard it); nothing is created or changed;
* rows that a newer revision's CHECK forbids → :class:`MigrationError` naming
  the table, the constraint and the row ids; the upgrade's transaction is
  rolled back, so the database stays at its revision with its rows.

Backups: before upgrading a SQLite file behind head, a copy named
``<file>.<revision>.<UTC time>.bak`` is written beside it; when an existing
backup of the same revision has exactly the same bytes (a previous attempt
that failed and changed nothing), it is reused instead, so repeated failing
attempts leave one backup, not one each.

Readers (``StateDB(read_only=True)``, the CLI's listings, ``sql``, ``db current``)
go through :func:`probe_database` / :func:`check_readable` instead and never
migrate, back up, lock or create anything: missing or empty →
:class:`DatabaseMissingError`; unknown → :class:`SchemaTooNewError`; behind →
read as it is (a read its schema cannot serve names the revision and
``rapidfire-state db upgrade``).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol

from rapidfire_state.exceptions import (
    DatabaseDamagedError,
    DatabaseMissingError,
    DBException,
    MigrationError,
    SchemaOutOfDateError,
    SchemaTooNewError,
)



class Database(Protocol):
    """What the migrations runner needs of an open database (a ``StateDB`` has it)."""

    @property
    def url(self) -> Any: ...
    @property
    def url_text(self) -> str: ...
    @property
    def engine(self) -> Any: ...
    @property
    def is_sqlite(self) -> bool: ...
    @property
    def sqlite_path(self) -> Optional[str]: ...


@dataclass(frozen=True)
class SchemaOutcome:
    """What :func:`ensure_schema` did on opening."""

    #: ``(from_revision, to_revision)`` when it migrated the database, else None
    migrated: Optional[tuple[Optional[str], str]] = None
    #: the SQLite backup it took before an upgrade, else None
    backup_path: Optional[str] = None

#: every shipped revision, oldest first; the last is head
REVISIONS: tuple[str, ...] = (
    "0001_initial",
    "0002_run_ended_by_check",
    "0003_task_claims",
    "0004_sql_reader_role",
    "0005_metric_outbox",
    "0006_claim_indexes",
    "0007_shm_host",
    "0008_process_identity",
)
HEAD_REVISION = REVISIONS[-1]
UPGRADE_COMMAND = "rapidfire-state db upgrade"

#: the revision that creates what ``rapidfire-state sql`` runs as on PostgreSQL
SQL_READER_REVISION = "0004_sql_reader_role"
#: the NOLOGIN role (cluster-wide) that may only SELECT this schema's tables and views
SQL_READER_ROLE = "rapidfire_reader"
#: the SECURITY DEFINER function, owned by the reader role, that runs one statement
SQL_READER_FUNCTION = "rapidfire_sql_read"

#: seconds a process waits for another's migration before giving up (both backends)
MIGRATION_LOCK_WAIT_S = 300

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


def alembic_config(database: Database, connection: Any = None) -> Any:
    """An Alembic ``Config`` for ``database`` (no ini file needed)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option(
        "sqlalchemy.url", database.url.render_as_string(hide_password=False).replace("%", "%%")
    )
    # env.py prefers this over -x url, $RF_DB_URL and sqlalchemy.url: the
    # library names the database it opened, whatever the environment says
    config.attributes["url"] = database.url
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def current_revision(database: Database) -> Optional[str]:
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


def refuse_damaged_sqlite(path: Path) -> None:
    """Raise :class:`DatabaseDamagedError` when ``path`` is missing or empty but its WAL is not.

    SQLite would take such a file for a new, empty database and discard the
    log, with every row that was still only in it.  Only the file sizes are
    looked at; nothing is opened or created.
    """
    wal = Path(f"{path}-wal")
    try:
        wal_size = wal.stat().st_size
    except FileNotFoundError:
        return
    try:
        main_size: Optional[int] = path.stat().st_size
    except FileNotFoundError:
        main_size = None
    if wal_size == 0 or (main_size or 0) > 0:
        return
    state = "does not exist" if main_size is None else "is empty (0 bytes)"
    raise DatabaseDamagedError(
        f"database {path} {state}, but its write-ahead log {wal} holds {wal_size} bytes: the database "
        "file was lost or truncated while its log was not, and opening it would discard the log. Nothing "
        f"was changed. Restore {path.name} from a copy or backup (a `{path.name}.*.bak` beside it, if "
        f"any) and keep {wal.name} with it, or move both files aside to start a new database",
        paths=(str(path), str(wal)),
    )


def _sqlite_revision(path: Path) -> Optional[str]:
    # A read-only connection without our pragmas: reading the revision must not
    # change a byte of a database we may refuse to open.
    refuse_damaged_sqlite(path)
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


# --- the readers' path: never creates, migrates, backs up or writes ----------------------


@dataclass(frozen=True)
class DatabaseProbe:
    """What a reader found at a URL, without changing anything there."""

    #: where it looked (a SQLite path, or the URL with any password hidden)
    where: str
    #: False when there is no database at all (no file; no PostgreSQL database)
    exists: bool
    #: the stamped revision; None when unversioned (empty) or missing
    revision: Optional[str]

    @property
    def status(self) -> str:
        """``missing``, ``empty``, ``head``, ``behind`` or ``unknown``."""
        if not self.exists:
            return "missing"
        if self.revision is None:
            return "empty"
        if self.revision == HEAD_REVISION:
            return "head"
        if self.revision in REVISIONS:
            return "behind"
        return "unknown"

    def at_least(self, revision: str) -> bool:
        """True when the database has ``revision`` applied (an unknown one counts as newer)."""
        if self.revision is None:
            return False
        if self.revision not in REVISIONS:
            return True
        return REVISIONS.index(self.revision) >= REVISIONS.index(revision)


def probe_database(url: Any, engine: Any = None) -> DatabaseProbe:
    """Whether a database exists at ``url`` and its revision; creates and changes nothing.

    SQLite: a missing file is ``exists=False`` (no directory or file is made); a
    0-byte file is an empty database — unless a non-empty ``-wal`` lies beside it,
    which is refused as damaged, naming both files.  The file is read through
    :func:`rapidfire_state.db.engine.connect_sqlite_reader`, which leaves no
    ``-wal``/``-shm`` behind when none were there.  PostgreSQL: a database that
    does not exist (SQLSTATE 3D000) is ``exists=False``; a refused connection
    raises :class:`DBException` in one line.
    """
    from rapidfire_state.db.engine import connect_sqlite_reader, create_state_engine, sqlite_file

    path = sqlite_file(url)
    if path is not None:
        where = str(path)
        if not path.exists():
            return DatabaseProbe(where, False, None)
        if path.is_file() and path.stat().st_size == 0:
            wal = path.with_name(path.name + "-wal")
            if wal.exists() and wal.stat().st_size > 0:
                raise DBException(
                    f"{path} is empty but {wal} holds {wal.stat().st_size} bytes: the database looks damaged "
                    "(its pages may exist only in the WAL); it was not opened or changed"
                )
            return DatabaseProbe(where, True, None)
        connection = connect_sqlite_reader(path)
        try:
            has_table = connection.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'"
            ).fetchone()
            if not has_table:
                return DatabaseProbe(where, True, None)
            row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
            return DatabaseProbe(where, True, row[0] if row else None)
        except sqlite3.DatabaseError as exc:
            raise DBException(f"{path} is not a readable SQLite database: {exc}") from exc
        finally:
            connection.close()

    from sqlalchemy import inspect, text
    from sqlalchemy.exc import SQLAlchemyError

    where = url.render_as_string(hide_password=True)
    own_engine = engine is None
    engine = engine if engine is not None else create_state_engine(url, read_only=True)
    try:
        with engine.connect() as connection:
            if not inspect(connection).has_table("alembic_version"):
                return DatabaseProbe(where, True, None)
            revision = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
            return DatabaseProbe(where, True, revision)
    except SQLAlchemyError as exc:
        orig = getattr(exc, "orig", None)
        message = driver_message(exc)
        # invalid_catalog_name; at connection time psycopg may carry only the server's text
        if getattr(orig, "sqlstate", None) == "3D000" or re.search(r'database ".*" does not exist', message):
            return DatabaseProbe(where, False, None)
        raise DBException(f"cannot open {where}: {message}") from exc
    finally:
        if own_engine:
            engine.dispose()


def check_readable(url: Any, engine: Any = None) -> DatabaseProbe:
    """The readers' open policy: a database that exists, has a schema, and a known revision.

    Missing or empty → :class:`DatabaseMissingError` ("no database at …", with the
    command that creates it); unknown (newer) revision → :class:`SchemaTooNewError`;
    behind head → returned as is: readers read what its schema allows and never
    upgrade it.  Nothing is created, migrated, backed up or written.
    """
    probe = probe_database(url, engine)
    if probe.status == "missing":
        raise DatabaseMissingError(f"no database at {probe.where} (readers never create one; `{UPGRADE_COMMAND}` does)")
    if probe.status == "empty":
        raise DatabaseMissingError(
            f"no rapidfire_state schema in the database at {probe.where} (it is empty); "
            f"`{UPGRADE_COMMAND}` creates it"
        )
    if probe.status == "unknown":
        raise SchemaTooNewError(
            f"{probe.where} is at schema revision {probe.revision!r}, which this version of rapidfire_state "
            f"does not know (it knows {', '.join(REVISIONS)}); it was probably written by a newer release: "
            "upgrade rapidfire_state. The database was not modified."
        )
    return probe


def behind_message(probe: DatabaseProbe, needed: str = HEAD_REVISION, what: str = "this command") -> str:
    """"at revision X, behind Y: run the upgrade command" for a reader that cannot go on."""
    return (
        f"{probe.where} is at schema revision {probe.revision}, before {needed}, which {what} needs; "
        f"run `{UPGRADE_COMMAND}` (readers never upgrade a database)"
    )


def driver_message(exc: BaseException) -> str:
    """The driver's own message of a SQLAlchemy error, on one line, without SQLAlchemy's boilerplate."""
    orig = getattr(exc, "orig", None)
    text = str(orig) if orig is not None else str(exc)
    text = text.split("(Background on this error at:")[0]
    return " ".join(text.split())


def _has_user_tables(database: Database) -> bool:
    from sqlalchemy import inspect

    with database.engine.connect() as connection:
        names = set(inspect(connection).get_table_names())
    return bool(names & {"experiments", "runs"})


def ensure_schema(database: Database, *, auto_upgrade: Optional[bool]) -> SchemaOutcome:
    """Apply the open policy (see the module docstring); says what it did."""
    revision = current_revision(database)
    if revision == HEAD_REVISION:
        return SchemaOutcome()
    _refuse_unknown(database, revision)
    with migration_lock(database):
        revision = current_revision(database)  # another process may have migrated meanwhile
        if revision == HEAD_REVISION:
            return SchemaOutcome()
        _refuse_unknown(database, revision)
        if revision is None:
            if _has_user_tables(database):
                raise DBException(
                    f"{database.url_text} has rapidfire tables but no alembic_version: it was not created "
                    "by this library's migrations; stamp it with `alembic stamp` after checking its schema"
                )
            _upgrade_locked(database, "head")
            return SchemaOutcome(migrated=(None, HEAD_REVISION))
        allowed = auto_upgrade if auto_upgrade is not None else database.is_sqlite
        if not allowed:
            raise SchemaOutOfDateError(
                f"{database.url_text} is at schema revision {revision}, behind {HEAD_REVISION}; "
                f"run `{UPGRADE_COMMAND}` (or open it with auto_upgrade=True)"
            )
        backup_path = str(backup_sqlite(database, revision)) if database.is_sqlite else None
        try:
            _upgrade_locked(database, "head")
        except MigrationError as exc:
            raise _with_backup_note(exc, backup_path) from exc
        return SchemaOutcome(migrated=(revision, HEAD_REVISION), backup_path=backup_path)


def _refuse_unknown(database: Database, revision: Optional[str]) -> None:
    if revision is not None and revision not in REVISIONS:
        raise SchemaTooNewError(
            f"{database.url_text} is at schema revision {revision!r}, which this version of "
            f"rapidfire_state does not know (it knows {', '.join(REVISIONS)}); it was probably "
            "written by a newer release: upgrade rapidfire_state. The database was not modified."
        )


def backup_sqlite(database: Database, revision: str) -> Path:
    """Copy the SQLite file with the online backup API; returns the backup's path.

    The copy is ``<file>.<revision>.<UTC time>.bak`` beside the database.  When
    an existing backup of the same revision has the same bytes (an earlier
    attempt that failed left the database unchanged), the new copy is dropped
    and that backup returned: failing attempts do not pile up backups.
    """
    source_path = Path(database.sqlite_path or "")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    prefix = f"{source_path.name}.{revision}."
    target = source_path.with_name(f"{prefix}{stamp}.bak")
    partial = source_path.with_name(f".{prefix}{stamp}.bak.partial")
    source = sqlite3.connect(str(source_path), timeout=30)
    try:
        destination = sqlite3.connect(str(partial))
        try:
            source.backup(destination)
        finally:
            destination.close()
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        source.close()
    for existing in sorted(source_path.parent.glob(f"{glob.escape(prefix)}*.bak"), reverse=True):
        if _same_bytes(existing, partial):
            partial.unlink()
            return existing
    # renamed into place only when complete: a *.bak is never a torn copy
    os.replace(partial, target)
    return target


def _same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            chunk_a, chunk_b = fa.read(1 << 20), fb.read(1 << 20)
            if chunk_a != chunk_b:
                return False
            if not chunk_a:
                return True


def _with_backup_note(exc: MigrationError, backup_path: Optional[str]) -> MigrationError:
    note = f" The database is unchanged; a copy from before the attempt is at {backup_path}." if backup_path else ""
    return MigrationError(
        f"{exc}.{note}" if note else str(exc),
        table=exc.table,
        constraint=exc.constraint,
        row_ids=exc.row_ids,
        revision=exc.revision,
        row_count=exc.row_count,
    )


@contextmanager
def migration_lock(database: Database) -> Iterator[None]:
    """Held while migrating: a file lock for SQLite, an advisory lock for PostgreSQL."""
    path = database.sqlite_path
    if path is not None:
        from filelock import FileLock

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{path}.migrate.lock", timeout=MIGRATION_LOCK_WAIT_S):
            yield
        return
    from sqlalchemy import text

    from sqlalchemy.exc import OperationalError

    with database.engine.connect() as connection:
        # The wait is bounded as SQLite's is, by its own timeout: the library's
        # statement timeout (RF_DB_STATEMENT_TIMEOUT_S) is for its own short
        # statements and may be shorter than another process's migration.
        connection.exec_driver_sql(f"SET LOCAL statement_timeout = {MIGRATION_LOCK_WAIT_S * 1000}")
        try:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _PG_LOCK_KEY})
        except OperationalError as exc:
            if getattr(getattr(exc, "orig", None), "sqlstate", None) != "57014":  # query_canceled
                raise
            raise DBException(
                f"waited {MIGRATION_LOCK_WAIT_S} s for the migration lock of {database.url_text}: another "
                "process holds it (its session shows in pg_locks as an advisory lock with objid "
                f"{_PG_LOCK_KEY & 0xFFFFFFFF}); nothing was changed"
            ) from exc
        connection.commit()  # ends the SET LOCAL; the session-level advisory lock stays
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _PG_LOCK_KEY})
            connection.commit()


def _upgrade_locked(database: Database, revision: str) -> None:
    from alembic import command
    from sqlalchemy.exc import IntegrityError

    try:
        with database.engine.connect() as connection:
            command.upgrade(alembic_config(database, connection), revision)
    except IntegrityError as exc:
        # a revision that did not declare its CHECK for refuse_violating_rows:
        # the database refused the rows itself (and the upgrade was rolled back)
        raise migration_error_from(exc, database.url_text) from exc


def migration_error_from(exc: Any, url_text: str) -> MigrationError:
    """A :class:`MigrationError` for the database's own refusal during a migration.

    The constraint and table are taken from the driver's message where it
    names them; which rows broke it the database does not say.
    """
    import re

    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    detail = lines[0] if lines else type(exc).__name__
    constraint = table = None
    match = re.search(r'constraint "([^"]+)" of relation "([^"]+)"', detail)  # PostgreSQL
    if match:
        constraint, table = match.group(1), match.group(2)
    else:
        match = re.search(r"constraint failed: (\w+)", detail)  # SQLite
        if match:
            constraint = match.group(1)
            # names follow ck_<table>_<name>; the longest table name that fits
            fitting = [t for t in _table_names() if constraint.startswith(f"ck_{t}_")]
            table = max(fitting, key=len) if fitting else None
    return MigrationError(
        f"the migration of {url_text} was refused by the database ({detail}): rows of table "
        f"{table or '?'} break constraint {constraint or '?'}. The migration was rolled back and the "
        "database is unchanged at its revision; correct those rows and upgrade again",
        table=table,
        constraint=constraint,
    )


def _table_names() -> list[str]:
    from rapidfire_state.db.schema import metadata

    return list(metadata.tables)


def run_upgrade(database: Database, revision: str = "head") -> None:
    """Upgrade under the migration lock (what ``rapidfire-state db upgrade`` runs)."""
    current = current_revision(database)
    _refuse_unknown(database, current)
    with migration_lock(database):
        _upgrade_locked(database, revision)


def run_downgrade(database: Database, revision: str) -> None:
    from alembic import command

    with migration_lock(database):
        with database.engine.connect() as connection:
            command.downgrade(alembic_config(database, connection), revision)
