"""Row lookups, plain column updates and argument checks shared by the entity stores.

A missing row is :class:`NotFoundError` here, in one place; every ``load_…``
helper of the entity modules goes through :func:`one_row`.
"""

from __future__ import annotations

import os
from enum import Enum
from typing import Any, Iterable, Mapping, Optional

from sqlalchemy import Table, select
from sqlalchemy.engine import Connection

from rapidfire_state import states
from rapidfire_state.exceptions import ConfigError, NotFoundError
from rapidfire_state.validation import check_int

#: the largest value of the schema's INTEGER columns (PostgreSQL's int4; SQLite would take
#: more, but a value the other backend refuses is refused on both, naming it)
MAX_INTEGER = 2**31 - 1


#: ``Connection.info`` key of the columns a reader's database lacks ({table: names}); unset at head
MISSING_COLUMNS_KEY = "rapidfire_state.missing_columns"


def columns_missing_at(probe: Any) -> dict[str, frozenset[str]]:
    """The columns of :data:`~rapidfire_state.db.schema.COLUMNS_SINCE` that a database at ``probe``'s revision lacks."""
    from rapidfire_state.db.schema import COLUMNS_SINCE

    missing: dict[str, set[str]] = {}
    for revision, added in COLUMNS_SINCE.items():
        if not probe.at_least(revision):
            for table_name, names in added.items():
                missing.setdefault(table_name, set()).update(names)
    return {name: frozenset(names) for name, names in missing.items()}


def all_columns(conn: Connection, table: Table) -> list[Any]:
    """The columns of ``table`` to select: all of them, but on a reader's database behind
    head only those its revision has (the records' fields of the others are None)."""
    missing = conn.info.get(MISSING_COLUMNS_KEY)
    lacking = missing.get(table.name) if missing else None
    if not lacking:
        return list(table.c)
    return [column for column in table.c if column.name not in lacking]


def one_row(conn: Connection, table: Table, *conditions: Any, missing: tuple[str, Any]) -> Mapping[str, Any]:
    """The one row of ``table`` matching ``conditions``; :class:`NotFoundError` ``(*missing)`` when none."""
    row = conn.execute(select(*all_columns(conn, table)).where(*conditions)).mappings().first()
    if row is None:
        raise NotFoundError(*missing)
    return row


def check_id(name: str, value: Any, *, optional: bool = False) -> Optional[int]:
    """``value`` as a stored id/count: an int from 0 to :data:`MAX_INTEGER` (None when ``optional``)."""
    return check_int(name, value, maximum=MAX_INTEGER, optional=optional)


def enum_value(enum_cls: type, value: Any, what: str) -> str:
    """The stored string of ``value`` as a member of ``enum_cls``, or :class:`ConfigError` naming it."""
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


def status_filter(machine: str, statuses: Optional[Iterable[Any]]) -> Optional[list[str]]:
    """The stored values of a listing's ``statuses`` argument (None: no filter)."""
    if statuses is None:
        return None
    if isinstance(statuses, (str, bytes)) or not isinstance(statuses, Iterable):
        statuses = [statuses]
    return sorted({states.coerce_status(machine, s).value for s in statuses})


def optional_path(name: str, value: Any) -> Optional[str]:
    """``value`` (a str or os.PathLike) as the text stored for a file, or None; :class:`ConfigError` otherwise."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{name}={value!r} is not valid; allowed: None or a path (str or os.PathLike)")
    text = os.fspath(value)
    if not isinstance(text, str) or text == "":
        raise ConfigError(f"{name}={value!r} is not valid; allowed: None or a non-empty text path")
    return text


def optional_str(name: str, value: Any) -> Optional[str]:
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{name} {value!r} is not a str")
    return value


def update_columns_without_commit(
    conn: Connection, table: Table, *conditions: Any, values: Mapping[str, Any], missing: tuple[str, Any]
) -> None:
    """Set columns other than a status on the row matching ``conditions``; :class:`NotFoundError` when none."""
    if conn.execute(table.update().where(*conditions).values(**values)).rowcount == 0:
        raise NotFoundError(*missing)
