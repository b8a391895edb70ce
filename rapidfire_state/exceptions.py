"""Every error the library raises derives from :class:`RapidFireError`.

The first group are the classes of the original utilities; the second group are
the state-layer errors.  Messages always name the offending value and, where it
helps, what would have been allowed.
"""

from __future__ import annotations

from typing import Any, Iterable


class RapidFireError(Exception):
    """Base class of every error raised by ``rapidfire_state``."""


# --- the original utilities' errors -------------------------------------------------


class ExperimentException(RapidFireError):
    """Experiment-level error (naming, lifecycle, cleanup)."""


class ControllerException(RapidFireError):
    """Error raised by controller code."""


class WorkerException(RapidFireError):
    """Error raised by worker code or worker process management."""


class DispatcherException(RapidFireError):
    """Error raised by the dispatcher service."""


class DBException(RapidFireError):
    """Database error: connection, driver or constraint failures are wrapped in it."""


class AutoMLException(RapidFireError):
    """Invalid AutoML configuration or search space."""


class NoGPUsFoundException(RapidFireError):
    """No GPU is available where one is required."""


# --- state-layer errors -------------------------------------------------------------


class ConfigError(RapidFireError, ValueError):
    """A configuration value (argument or environment variable) is invalid."""


class NotFoundError(RapidFireError, LookupError):
    """A row that the caller named does not exist."""

    def __init__(self, entity: str, entity_id: Any):
        self.entity = entity
        self.entity_id = entity_id
        super().__init__(f"{entity} {entity_id!r} does not exist")


class InvalidTransitionError(RapidFireError):
    """A status change that the state machine does not allow.

    Carries ``entity``, ``entity_id``, ``current`` (the status the row has),
    ``wanted`` and ``allowed`` (the statuses from which ``wanted`` may be reached).
    """

    def __init__(
        self,
        entity: str,
        entity_id: Any,
        current: Any,
        wanted: Any,
        allowed: Iterable[Any] = (),
        detail: str | None = None,
    ):
        self.entity = entity
        self.entity_id = entity_id
        self.current = current
        self.wanted = wanted
        self.allowed = tuple(allowed)
        allowed_text = ", ".join(_name(a) for a in self.allowed) or "none"
        message = (
            f"{entity} {entity_id}: cannot move from {_name(current)} to {_name(wanted)}"
            f" ({_name(wanted)} may be reached only from: {allowed_text})"
        )
        if detail:
            message = f"{message}; {detail}"
        super().__init__(message)


class SchemaOutOfDateError(DBException):
    """The database schema is behind this library's migrations."""


class SchemaTooNewError(DBException):
    """The database carries a migration revision this library does not know."""


class PayloadIntegrityError(RapidFireError):
    """A serialized payload failed its integrity check; nothing was unpickled."""


class InsufficientSharedMemoryError(RapidFireError):
    """An object fits neither in shared memory nor on disk."""


class DataPathException(RapidFireError):
    """A data path is used before initialisation or would escape its base directory."""


def _name(value: Any) -> str:
    return str(getattr(value, "value", value))


__all__ = [
    "RapidFireError",
    "ExperimentException",
    "ControllerException",
    "WorkerException",
    "DispatcherException",
    "DBException",
    "AutoMLException",
    "NoGPUsFoundException",
    "ConfigError",
    "NotFoundError",
    "InvalidTransitionError",
    "SchemaOutOfDateError",
    "SchemaTooNewError",
    "PayloadIntegrityError",
    "InsufficientSharedMemoryError",
    "DataPathException",
]


# --- migration and open-policy refusals ---------------------------------------------


class MigrationError(DBException):
    """A migration cannot be applied to the rows the database holds.

    Raised before anything is altered (or mapped from the database's refusal);
    the migration's transaction is rolled back, so the database stays at its old
    revision with its data intact.  Carries ``table``, ``constraint``,
    ``row_ids`` (the offending primary keys, at most 1000; empty when the
    database did not say which), ``row_count`` (None when unknown) and
    ``revision`` (the revision that could not be applied, when known).
    """

    def __init__(
        self,
        message: str,
        *,
        table: str | None = None,
        constraint: str | None = None,
        row_ids: Iterable[Any] = (),
        revision: str | None = None,
        row_count: int | None = None,
    ):
        self.table = table
        self.constraint = constraint
        self.row_ids = tuple(row_ids)
        self.revision = revision
        self.row_count = row_count
        super().__init__(message)


class DatabaseDamagedError(DBException):
    """The database files are in a state the library cannot explain; nothing was changed.

    ``paths`` names the files involved (for example an empty or missing SQLite
    file and the non-empty write-ahead log beside it).
    """

    def __init__(self, message: str, *, paths: Iterable[str] = ()):
        self.paths = tuple(str(p) for p in paths)
        super().__init__(message)


__all__ += ["MigrationError", "DatabaseDamagedError"]


# --- readers and the CLI (appended: readers that never write) -----------------------


class DatabaseMissingError(DBException):
    """A reader was pointed at a database that does not exist (or holds no schema).

    Readers never create a database; the message names where it looked and the
    command that creates one.
    """


class ReadOnlyError(DBException):
    """A write was attempted through a database opened with ``read_only=True``."""


class SQLRefusedError(RapidFireError):
    """``rapidfire-state sql`` refused a statement (it writes, escapes the reader
    role, is more than one statement, or ran past its timeout); nothing was changed."""


__all__ += ["DatabaseMissingError", "ReadOnlyError", "SQLRefusedError"]
