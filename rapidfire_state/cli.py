"""``rapidfire-state``: inspect and maintain the state database.

    rapidfire-state db upgrade            migrate the configured database to head
    rapidfire-state db current            show its revision and the library's head
    rapidfire-state experiments           list experiments (with their metric rows not yet in MLflow)
    rapidfire-state metrics [-e ID]       MLflow runs with rows pending in the metric outbox (--failed: refused rows)
    rapidfire-state status [-e ID]        the running experiment: task, runs, workers, shared memory, metrics
    rapidfire-state watch [-e ID]         a live table of its runs until it ends (plain lines in a pipe)
    rapidfire-state doctor [-e ID]        check the database and files; each problem with its repair (exit 3)
    rapidfire-state runs [-e ID]          list runs with their config and progress (--limit N, default 1000)
    rapidfire-state tasks [-e ID]         list open (or --all) worker/controller tasks
    rapidfire-state workers [-e ID]       list worker processes
    rapidfire-state history ENTITY ID     status changes of one row
    rapidfire-state shm                   shared-memory objects
    rapidfire-state sql "SELECT …"        run one read-only statement (views: run_overview, active_tasks, shm_usage)
    rapidfire-state cleanup [-e ID]       end an experiment (tasks FAILED, runs KILLED, ...)
    rapidfire-state fail-stale --grace S  fail workers whose process died or heartbeat stopped

The database is ``--url``, else ``$RF_DB_URL``, else ``$RF_HOME/db/rapidfire_state.db``.
Importing this module (and ``--help``) loads neither torch nor mlflow; SQLAlchemy
is imported only when a command runs.

Readers (the listings, ``history``, ``sql``, ``db current``) open the database
read-only (``StateDB(read_only=True)``): they never create, migrate, back up or
write it.  Every error is one line on stderr and a non-zero exit status
(``--debug`` adds the traceback); output cut short by a closed pipe
(``… | head -1``) ends the command quietly with status 141.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from datetime import date, datetime
from enum import Enum
from pathlib import Path
from typing import Any, Iterable, Iterator, NoReturn, Optional, Sequence

from rapidfire_state.exceptions import ConfigError, DBException, RapidFireError, SQLRefusedError

#: exit status of an error (any RapidFireError) and of an unexpected failure
EXIT_ERROR = 2
EXIT_UNEXPECTED = 1
#: exit status when stdout was closed under us (what a shell shows for SIGPIPE)
EXIT_BROKEN_PIPE = 141


@contextmanager
def _reader(args: argparse.Namespace, *, explain_behind: bool = True) -> Iterator[Any]:
    """The database opened read-only.

    On a database behind head the command reads what its schema has; when a read
    fails there (``explain_behind``), the error says which revision the database is
    at and the command that upgrades it — the reader itself never does.
    """
    from rapidfire_state.db import StateDB, migrate
    from rapidfire_state.exceptions import SchemaOutOfDateError

    database = StateDB(args.url, read_only=True)
    try:
        try:
            yield database
        except DBException as exc:
            probe = database.probe
            if explain_behind and probe is not None and probe.status == "behind":
                raise SchemaOutOfDateError(f"{migrate.behind_message(probe)} ({exc})") from exc
            raise
    finally:
        database.close()


@contextmanager
def _writer(args: argparse.Namespace) -> Iterator[Any]:
    """The database opened for writing (maintenance commands); a missing one is not created."""
    from rapidfire_state.db import StateDB, migrate
    from rapidfire_state.db.engine import resolve_url
    from rapidfire_state.exceptions import DatabaseMissingError

    url = resolve_url(args.url)
    probe = migrate.probe_database(url)
    if not probe.exists:
        raise DatabaseMissingError(f"no database at {probe.where} (`{migrate.UPGRADE_COMMAND}` creates one)")
    database = StateDB(url)
    try:
        yield database
    finally:
        database.close()


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    return value


def _emit(rows: Sequence[dict], columns: Sequence[str], as_json: bool, out: Any = None) -> None:
    out = out or sys.stdout
    if as_json:
        json.dump([{c: _plain(r.get(c)) for c in columns} for r in rows], out, default=str, indent=None)
        out.write("\n")
        return
    table = [[("" if _plain(r.get(c)) is None else str(_plain(r.get(c)))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in table]) for i, c in enumerate(columns)]
    out.write("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip() + "\n")
    for row in table:
        out.write("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() + "\n")
    if not table:
        out.write("(no rows)\n")


def _records(records: Iterable[Any]) -> list[dict]:
    return [record.to_dict() for record in records]


# --- commands ------------------------------------------------------------------------


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from rapidfire_state.db import StateDB

    # auto_upgrade=True: this *is* the explicit upgrade, so a server database
    # behind head is upgraded too (a SQLite file is backed up first).
    database = StateDB(args.url, auto_upgrade=True)
    try:
        migrated = database.last_migration
        if migrated is not None:
            print(f"upgraded {database.url_text} from {migrated[0] or 'empty'} to {migrated[1]}")
        else:
            print(f"{database.url_text} is already at {database.schema_revision()} (head)")
        if database.backup_path:
            print(f"backup of the previous version: {database.backup_path}")
    finally:
        database.close()
    return 0


def cmd_db_current(args: argparse.Namespace) -> int:
    from rapidfire_state.db import migrate
    from rapidfire_state.db.engine import resolve_url
    from rapidfire_state.exceptions import DatabaseMissingError

    url = resolve_url(args.url)
    probe = migrate.probe_database(url)  # reads only: no file, directory, -wal or -shm is created
    if not probe.exists:
        raise DatabaseMissingError(f"no database at {probe.where} (`{migrate.UPGRADE_COMMAND}` creates one)")
    status = {
        "head": "up to date",
        "empty": f"empty: `{migrate.UPGRADE_COMMAND}` creates the schema",
        "behind": f"behind: run `{migrate.UPGRADE_COMMAND}`",
        "unknown": "unknown to this library (written by a newer release?)",
    }[probe.status]
    print(f"database: {url.render_as_string(hide_password=True)}")
    print(f"revision: {probe.revision or '-'} ({status}); library head: {migrate.HEAD_REVISION}")
    return 0


#: the revision that made the metric outbox; a database before it has none to count
METRIC_OUTBOX_REVISION = "0005_metric_outbox"
#: what the listings show where the database's schema has no metric outbox yet
NO_OUTBOX = "-"


def _has_outbox(database: Any) -> bool:
    probe = database.probe  # readers always have one (read_only=True)
    return probe is None or probe.at_least(METRIC_OUTBOX_REVISION)


def cmd_experiments(args: argparse.Namespace) -> int:
    columns = [
        "experiment_id", "name", "status", "current_task", "metrics_pending", "owner_pid", "created_at",
        "ended_at", "error",
    ]
    with _reader(args) as database:
        rows = _records(database.list_experiments())
        # an older database is read as it is: no outbox there, so nothing is known to be pending
        pending = database.pending_metric_rows_by_experiment() if _has_outbox(database) else None
    for row in rows:
        if pending is None:
            row["metrics_pending"] = None if args.json else NO_OUTBOX
        else:
            row["metrics_pending"] = pending.get(row["experiment_id"], 0)
    _emit(rows, columns, args.json)
    unlinked = (pending or {}).get(None, 0)
    if unlinked and not args.json:
        print(f"metric rows pending for MLflow runs of no experiment: {unlinked} (see `rapidfire-state metrics`)")
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    from rapidfire_state.db import migrate
    from rapidfire_state.exceptions import SchemaOutOfDateError

    if args.failed and args.experiment is not None:
        raise ConfigError("metrics: --failed lists the refused rows of every experiment; -e does not apply to it")
    with _reader(args) as database:
        if not _has_outbox(database):
            raise SchemaOutOfDateError(
                migrate.behind_message(database.probe, METRIC_OUTBOX_REVISION, "`metrics` (the metric outbox)")
            )
        total = None
        if args.failed:
            columns = ["outbox_id", "tracking_uri", "metric_run_id", "kind", "key", "step", "error"]
            rows = database.failed_metric_rows(limit=args.limit)
        else:
            columns = [
                "experiment_id", "run_id", "tracking_uri", "metric_run_id", "pending", "claimed_by", "claimed_at",
                "last_error",
            ]
            rows = database.list_metric_streams(experiment_id=args.experiment, every=args.all)
            if not args.json:
                total = database.pending_metric_rows(experiment_id=args.experiment)
    _emit(rows, columns, args.json)
    if total is not None:
        scope = "in all" if args.experiment is None else f"for experiment {args.experiment}"
        print(f"rows pending {scope}: {total}")
    return 0


def _cut(args: argparse.Namespace, more: bool, shown: int, what: str) -> None:
    """Say that a listing stopped at ``--limit`` (on stderr under --json, so the JSON stays one array)."""
    if more:
        note = f"(listing cut at --limit {args.limit}: {shown} {what} shown, more exist)"
        print(note, file=sys.stderr if args.json else sys.stdout)


def _config_text(config: Any) -> Optional[str]:
    if not config:
        return None
    return " ".join(f"{key}={json.dumps(value) if not isinstance(value, str) else value}" for key, value in config.items())


def cmd_runs(args: argparse.Namespace) -> int:
    columns = [
        "run_id", "experiment_id", "status", "source", "ended_by", "progress", "completed_steps", "total_steps",
        "num_chunks_visited", "num_epochs_completed", "metric_run_id", "config", "error",
    ]
    with _reader(args) as database:
        rows, more = database.runs_page(args.experiment, statuses=args.status or None, limit=args.limit)
    for row in rows:
        config = row.get("flattened_config")
        row["config"] = config if args.json else _config_text(config)
        if not args.json:
            row["progress"] = f"{float(row['progress'] or 0.0):.3f}"
    _emit(rows, columns, args.json)
    _cut(args, more, len(rows), "runs")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    statuses = None if args.all else ["PENDING", "SCHEDULED", "IN_PROGRESS"]
    rows = []
    more = False
    with _reader(args) as database:
        for kind in ("worker", "controller"):
            found, cut = database.tasks_page(kind, experiment_id=args.experiment, statuses=statuses, limit=args.limit)
            rows += _records(found)
            more = more or cut
    if len(rows) > args.limit:
        rows, more = rows[: args.limit], True
    columns = ["kind", "task_id", "experiment_id", "run_id", "worker_id", "chunk_id", "task_type", "status", "error"]
    _emit(rows, columns, args.json)
    _cut(args, more, len(rows), "tasks")
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    columns = ["experiment_id", "worker_id", "pid", "host", "started_at", "heartbeat_at", "exited_at", "exit_code"]
    with _reader(args) as database:
        found, more = database.workers_page(args.experiment, alive_only=args.alive, limit=args.limit)
    rows = _records(found)
    _emit(rows, columns, args.json)
    _cut(args, more, len(rows), "workers")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    columns = ["transition_id", "from_status", "to_status", "at", "pid", "host", "reason"]
    with _reader(args) as database:
        rows = _records(database.history(args.entity, args.entity_id))
    _emit(rows, columns, args.json)
    return 0


def cmd_shm(args: argparse.Namespace) -> int:
    columns = [
        "key", "experiment_id", "run_id", "chunk_id", "object_type", "location", "host", "num_bytes", "tensor_count",
        "disk_path", "copy_path",
    ]
    with _reader(args) as database:
        found, more = database.shm_page(experiment_id=args.experiment, limit=args.limit)
    rows = _records(found)
    _emit(rows, columns, args.json)
    _cut(args, more, len(rows), "shm_objects rows")
    return 0


# --- the console: status, watch, doctor ----------------------------------------------

#: exit status of ``doctor`` when it found something wrong (1 and 2 keep their meanings)
EXIT_DOCTOR_FOUND = 3


def cmd_status(args: argparse.Namespace) -> int:
    from rapidfire_state import console

    with _reader(args) as database:
        report = console.status_report(database, args.experiment, grace_seconds=args.grace)
    if args.json:
        json.dump(report, sys.stdout, default=str)
        sys.stdout.write("\n")
    else:
        for line in console.status_lines(report):
            print(line)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from rapidfire_state import console

    with _reader(args) as database:
        return console.watch(database, args.experiment, interval=args.interval, limit=args.limit)


def cmd_doctor(args: argparse.Namespace) -> int:
    from rapidfire_state import console

    with _reader(args) as database:
        findings = console.doctor(database, args.experiment, grace_seconds=args.grace)
        where = database.url_text
    if args.json:
        json.dump({"database": where, "ok": not findings, "checks": list(console.DOCTOR_CHECKS),
                   "findings": [f.to_dict() for f in findings]}, sys.stdout)
        sys.stdout.write("\n")
    else:
        for finding in findings:
            print(finding.line())
        if findings:
            print(f"{len(findings)} problem{'s' if len(findings) != 1 else ''} found in {where}")
        else:
            print(f"no problems found in {where} ({', '.join(console.DOCTOR_CHECKS)})")
    return EXIT_DOCTOR_FOUND if findings else 0


# --- sql: one read-only statement ----------------------------------------------------

#: statements ``sql`` accepts, by first keyword (the database then enforces read-only)
SQL_KEYWORDS = {
    "sqlite": ("SELECT", "WITH", "VALUES", "EXPLAIN", "PRAGMA"),
    "postgresql": ("SELECT", "WITH", "VALUES", "TABLE"),
}

# PRAGMAs that only read: those that take a table/index name (or nothing) ...
_SQLITE_PRAGMAS_WITH_ARGUMENT = frozenset({
    "table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo",
    "foreign_key_list", "foreign_key_check", "integrity_check", "quick_check",
})
# ... and those that read a setting when given no value (with a value they would set it)
_SQLITE_PRAGMAS_READ = frozenset({
    "user_version", "schema_version", "application_id", "data_version", "page_count", "page_size",
    "freelist_count", "journal_mode", "encoding", "foreign_keys", "auto_vacuum", "query_only",
    "compile_options", "collation_list", "function_list", "module_list", "pragma_list", "database_list",
})
# load_extension loads code; fts3_tokenizer(name, pointer) swaps a tokenizer's C pointer
# (one argument: leaks one), and this build of SQLite has its two-argument form enabled
_SQLITE_DENIED_FUNCTIONS = frozenset({"load_extension", "fts3_tokenizer"})


def _first_keyword(statement: str, nested_comments: bool) -> str:
    """The statement's first keyword, past whitespace, comments and opening parentheses."""
    i, n = 0, len(statement)
    while i < n:
        if statement[i].isspace() or statement[i] == "(":
            i += 1
        elif statement.startswith("--", i):
            end = statement.find("\n", i)
            i = n if end < 0 else end + 1
        elif statement.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if nested_comments and statement.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif statement.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        else:
            break
    match = re.match(r"[A-Za-z_]+", statement[i:])
    return match.group(0).upper() if match else statement[i:i + 12]


def _check_keyword(statement: str, backend: str) -> None:
    allowed = SQL_KEYWORDS[backend]
    if statement.strip() == "":
        raise SQLRefusedError("refused: the statement is empty")
    keyword = _first_keyword(statement, nested_comments=backend == "postgresql")
    if keyword not in allowed:
        shown = keyword if keyword.isidentifier() else repr(keyword)
        raise SQLRefusedError(
            f"refused: {shown} statements are not allowed; `sql` runs exactly one read-only "
            f"{', '.join(allowed[:-1])} or {allowed[-1]} statement"
        )


def _check_timeout(value: Any) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"--timeout {value!r} is not valid; a positive number of seconds is required")
    return seconds


#: rows a listing shows unless --limit says otherwise
DEFAULT_LIMIT = 1000


def _check_interval(value: Any) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"--interval {value!r} is not valid; a positive number of seconds is required")
    return seconds


def _check_grace(value: Any) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(f"--grace {value!r} is not valid; a number of seconds >= 0 is required")
    return seconds


def _check_limit(value: Any) -> int:
    try:
        limit = int(value)
    except (TypeError, ValueError):
        limit = 0
    if limit < 1:
        raise argparse.ArgumentTypeError(f"--limit {value!r} is not valid; a positive whole number is required")
    return limit


def cmd_sql(args: argparse.Namespace) -> int:
    # a failing query on an older schema is the query's error, not the schema's
    with _reader(args, explain_behind=False) as database:
        backend = "sqlite" if database.is_sqlite else "postgresql"
        _check_keyword(args.query, backend)
        if database.is_sqlite:
            columns, rows = _sql_sqlite(Path(database.sqlite_path), args.query, args.timeout)
        else:
            columns, rows = _sql_postgresql(database, args.query, args.timeout)
    if columns is None:
        print("(statement returned no rows)")
        return 0
    labels = _unique_labels(columns)
    _emit([dict(zip(labels, row)) for row in rows], labels, args.json)
    return 0


def _unique_labels(columns: Sequence[str]) -> list[str]:
    """Column labels, a repeated one suffixed ``_2``, ``_3``… (JSON objects need distinct keys)."""
    seen: dict[str, int] = {}
    labels = []
    for column in columns:
        seen[column] = seen.get(column, 0) + 1
        labels.append(column if seen[column] == 1 else f"{column}_{seen[column]}")
    return labels


def _timeout_message(seconds: float) -> str:
    return f"refused: the statement ran past --timeout {seconds:g} s and was cancelled; nothing was changed"


# SQLite: a query_only connection that leaves no file behind, the authorizer, a progress handler.


def _sqlite_action(action: int, arg1: Any, arg2: Any) -> str:
    import sqlite3

    names = {
        sqlite3.SQLITE_INSERT: f"INSERT into {arg1}",
        sqlite3.SQLITE_UPDATE: f"UPDATE {arg1}.{arg2}",
        sqlite3.SQLITE_DELETE: f"DELETE from {arg1}",
        sqlite3.SQLITE_ATTACH: f"ATTACH {arg1!r}",
        sqlite3.SQLITE_DETACH: f"DETACH {arg1}",
        sqlite3.SQLITE_TRANSACTION: f"{arg1} (transaction control)",
        sqlite3.SQLITE_SAVEPOINT: f"SAVEPOINT {arg1} {arg2}",
        sqlite3.SQLITE_PRAGMA: f"PRAGMA {arg1}" + (f" = {arg2}" if arg2 is not None else ""),
        sqlite3.SQLITE_FUNCTION: f"call {arg2}()",
    }
    if action in names:
        return names[action]
    for name in dir(sqlite3):
        if name.startswith("SQLITE_") and getattr(sqlite3, name) == action and name not in ("SQLITE_OK", "SQLITE_DENY", "SQLITE_IGNORE"):
            return " ".join(part for part in (name[len("SQLITE_"):].replace("_", " "), arg1) if part)
    return f"action {action}"


def _sqlite_authorizer(denied: list[str]) -> Any:
    import sqlite3

    reading = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_RECURSIVE}

    def authorize(action: int, arg1: Any, arg2: Any, database: Any, trigger: Any) -> int:
        if action in reading:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_FUNCTION and str(arg2).lower() not in _SQLITE_DENIED_FUNCTIONS:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_UPDATE and arg1 in ("sqlite_master", "sqlite_temp_master"):
            # asked while SQLite declares a table-valued pragma (pragma_table_info(…)); the
            # schema table itself cannot be written: query_only is on and writable_schema
            # cannot be switched on (a PRAGMA with a value is denied below)
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_PRAGMA:
            pragma = str(arg1).lower()
            if pragma in _SQLITE_PRAGMAS_WITH_ARGUMENT or (pragma in _SQLITE_PRAGMAS_READ and arg2 is None):
                return sqlite3.SQLITE_OK
        denied.append(_sqlite_action(action, arg1, arg2))
        return sqlite3.SQLITE_DENY

    return authorize


def _sql_sqlite(path: Path, statement: str, timeout: float) -> tuple[Optional[list[str]], list[tuple]]:
    import sqlite3

    from rapidfire_state.db.engine import connect_sqlite_reader

    connection = connect_sqlite_reader(path)
    denied: list[str] = []
    state = {"deadline": math.inf, "timed_out": False}

    def progress() -> int:
        if time.monotonic() > state["deadline"]:
            state["timed_out"] = True
            return 1  # interrupts the statement
        return 0

    try:
        connection.execute("BEGIN")  # deferred: a read transaction the statement cannot end
        connection.set_authorizer(_sqlite_authorizer(denied))
        connection.set_progress_handler(progress, 1000)
        state["deadline"] = time.monotonic() + timeout
        try:
            cursor = connection.execute(statement)
            rows = cursor.fetchall()
        except sqlite3.Error as exc:
            if state["timed_out"]:
                raise SQLRefusedError(_timeout_message(timeout)) from exc
            if denied:
                raise SQLRefusedError(
                    f"refused: {denied[0]} is not allowed; `sql` only reads (SELECT, read-only PRAGMAs)"
                ) from exc
            if "one statement at a time" in str(exc):
                raise SQLRefusedError("refused: more than one statement; `sql` runs exactly one") from exc
            raise DBException(f"query failed: {' '.join(str(exc).split())}") from exc
        columns = [d[0] for d in cursor.description] if cursor.description else None
        cursor.close()
        if not connection.in_transaction:  # cannot happen: transaction control is denied above
            raise SQLRefusedError("refused: the statement ended the read transaction")
        return columns, rows
    finally:
        connection.set_authorizer(None)
        connection.set_progress_handler(None, 0)
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        connection.close()


# PostgreSQL: one statement, as the reader role, inside its security-definer function.

_PG_TIMESTAMP_TYPES = {1114, 1184}  # timestamp, timestamptz
_PG_DATE = 1082
_PG_BYTEA = 17
_PG_JSON_TYPES = {114, 3802}


class _Pairs(list):
    """A JSON object kept as its (key, value) pairs: order and repeated keys survive."""


def _unpair(value: Any) -> Any:
    if isinstance(value, _Pairs):
        return {key: _unpair(item) for key, item in value}
    if isinstance(value, list):
        return [_unpair(item) for item in value]
    return value


def _pg_value(value: Any, type_oid: int) -> Any:
    value = _unpair(value)
    if value is None:
        return None
    try:
        if type_oid in _PG_TIMESTAMP_TYPES:
            return datetime.fromisoformat(value)
        if type_oid == _PG_DATE:
            return date.fromisoformat(value)
        if type_oid == _PG_BYTEA and isinstance(value, str) and value.startswith("\\x"):
            return bytes.fromhex(value[2:])
    except (TypeError, ValueError):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value)  # as SQLite shows a JSON column: its text
    return value


def _pg_refusal(sqlstate: Optional[str], message: str, timeout: float) -> RapidFireError:
    from rapidfire_state.db import migrate

    message = " ".join((message or "").split())
    if sqlstate == "57014":  # query_canceled: statement_timeout, or our cancel
        return SQLRefusedError(_timeout_message(timeout))
    if "multiple commands" in message or "multi-query" in message:
        return SQLRefusedError("refused: more than one statement; `sql` runs exactly one")
    if sqlstate == "25006":  # read_only_sql_transaction
        return SQLRefusedError(f"refused: the statement would write ({message})")
    if "non-volatile function" in message:
        return SQLRefusedError(f"refused: the statement would write or lock rows ({message})")
    if sqlstate == "42501":  # insufficient_privilege
        return SQLRefusedError(
            f"refused: {message} (`sql` runs as the role {migrate.SQL_READER_ROLE}, which may only "
            "read this schema's tables and views)"
        )
    if sqlstate == "42P11" or "query as cursor" in message:  # invalid_cursor_definition
        return SQLRefusedError(f"refused: not a statement that returns rows ({message})")
    return DBException(f"query failed: {message}")


def _pg_check_reader(cursor: Any, database: Any, schemas: Sequence[str]) -> str:
    """Refuse unless the reader role and its function are what revision 0004 made.

    Returns the schema of the function: the first of ``schemas`` (the session's
    search path as it was) that has a ``rapidfire_sql_read(text)``.  Runs with the
    search path pinned to ``pg_catalog``, so no name here resolves to an object
    someone else planted.
    """
    from rapidfire_state.db import migrate

    role, function = migrate.SQL_READER_ROLE, migrate.SQL_READER_FUNCTION
    cursor.execute(
        "SELECT r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolbypassrls OR r.rolreplication,"
        " (SELECT string_agg(b.rolname, ', ') FROM pg_roles b"
        "   WHERE b.rolname IN ('pg_read_server_files', 'pg_write_server_files', 'pg_execute_server_program',"
        "                       'pg_signal_backend') AND pg_has_role(r.oid, b.oid, 'MEMBER')),"
        " f.prosecdef, pg_get_userbyid(f.proowner), f.nspname"
        " FROM pg_roles r"
        " LEFT JOIN LATERAL (SELECT p.prosecdef, p.proowner, n.nspname FROM pg_proc p"
        "   JOIN pg_namespace n ON n.oid = p.pronamespace"
        "   WHERE p.proname = %s AND p.pronargs = 1 AND p.proargtypes[0] = 'text'::regtype"
        "   AND n.nspname = ANY(%s::text[])"
        "   ORDER BY array_position(%s::text[], n.nspname::text) LIMIT 1) f ON true"
        " WHERE r.rolname = %s",
        (function, list(schemas), list(schemas), role),
    )
    row = cursor.fetchone()
    fix = f"run `{migrate.UPGRADE_COMMAND}`"
    if row is None:
        raise SQLRefusedError(
            f"refused: the reader role {role} does not exist on this server ({migrate.SQL_READER_REVISION} "
            f"creates it); {fix}"
        )
    privileged, memberships, security_definer, owner, schema = row
    if privileged or memberships:
        raise SQLRefusedError(
            f"refused: the reader role {role} has privileges a reader must not have "
            f"({'role attributes' if privileged else ''}{', ' if privileged and memberships else ''}"
            f"{'member of ' + memberships if memberships else ''}); remove them first"
        )
    if owner != role or not security_definer:
        raise SQLRefusedError(
            f"refused: the function {schema + '.' if schema else ''}{function}(text) is missing or not the one "
            f"{migrate.SQL_READER_REVISION} made (owner {owner or '-'}); {fix}"
        )
    return schema


def _sql_postgresql(database: Any, statement: str, timeout: float) -> tuple[Optional[list[str]], list[list]]:
    import codecs

    import psycopg
    import psycopg.sql
    from psycopg import pq

    from rapidfire_state.db import migrate

    probe = database.probe
    if not probe.at_least(migrate.SQL_READER_REVISION):
        raise SQLRefusedError(
            "refused: " + migrate.behind_message(
                probe, migrate.SQL_READER_REVISION, f"`sql` (its reader role {migrate.SQL_READER_ROLE})"
            )
        )
    raw = database.engine.raw_connection()
    connection = raw.driver_connection
    # A backstop to the server's statement_timeout: cancel from here a little later.
    watchdog = threading.Timer(timeout + 2.0, connection.cancel_safe)
    watchdog.daemon = True
    try:
        connection.rollback()  # whatever the pool's ping began
        connection.read_only = True  # BEGIN READ ONLY
        try:
            encoding = codecs.lookup(connection.info.encoding).name
        except LookupError:
            encoding = "utf-8"
        try:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT pg_catalog.set_config('statement_timeout', %s, true)",
                    (str(max(1, int(timeout * 1000))),),
                )
                # The URL's user may be a superuser: nothing it runs may resolve to an object
                # another user planted earlier in its search path ("$user" is the reader's own
                # name after SET ROLE, a schema anyone with CREATE on the database can make).
                # Names resolve in pg_catalog, then in the function's schema, the library's.
                cursor.execute("SELECT pg_catalog.current_schemas(false)")
                schemas = list(cursor.fetchone()[0])
                cursor.execute("SELECT pg_catalog.set_config('search_path', 'pg_catalog', true)")
                schema = _pg_check_reader(cursor, database, schemas)
                cursor.execute(
                    "SELECT set_config('search_path', 'pg_catalog, ' || quote_ident(%s), true)", (schema,)
                )
                try:
                    cursor.execute(f"SET LOCAL ROLE {migrate.SQL_READER_ROLE}")
                except psycopg.errors.InsufficientPrivilege as exc:
                    user = database.url.username or "the URL's user"
                    raise SQLRefusedError(
                        f"refused: {user} may not SET ROLE {migrate.SQL_READER_ROLE}, the role `sql` runs as; "
                        f"a superuser or a member may (GRANT {migrate.SQL_READER_ROLE} TO {user})"
                    ) from exc
                watchdog.start()
                # Parse (never executes): exactly one statement, and its columns even when no row comes.
                pgconn = connection.pgconn
                described = pgconn.prepare(b"", statement.encode(encoding, "replace"))
                if described.status != pq.ExecStatus.COMMAND_OK:
                    raise _pg_refusal(
                        (described.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode() or None,
                        (described.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) or b"").decode(encoding, "replace"),
                        timeout,
                    )
                described = pgconn.describe_prepared(b"")
                columns = [described.fname(i).decode(encoding, "replace") for i in range(described.nfields)]
                types = [described.ftype(i) for i in range(described.nfields)]
                cursor.execute(
                    psycopg.sql.SQL("SELECT rf_row::text FROM {}.{}(%s::text) AS rf_row").format(
                        psycopg.sql.Identifier(schema), psycopg.sql.Identifier(migrate.SQL_READER_FUNCTION)
                    ),
                    (statement,),
                )
                rows = []
                for (text,) in cursor.fetchall():
                    pairs = json.loads(text, object_pairs_hook=_Pairs)
                    rows.append([_pg_value(value, type_oid) for (_, value), type_oid in zip(pairs, types)])
                # cannot happen (the function can neither end the transaction nor change role): checked anyway
                if connection.info.transaction_status != pq.TransactionStatus.INTRANS:
                    raise SQLRefusedError("refused: the statement ended the read-only transaction")
                cursor.execute("SELECT current_user")
                if cursor.fetchone()[0] != migrate.SQL_READER_ROLE:
                    raise SQLRefusedError("refused: the statement changed the role it runs as")
        except psycopg.Error as exc:
            raise _pg_refusal(exc.sqlstate, exc.diag.message_primary or str(exc), timeout) from exc
        return columns, rows
    finally:
        watchdog.cancel()
        try:
            connection.rollback()
            # The server frees a closed session's locks only once its backend has
            # processed the close, which a busy server does a moment later: release
            # every session-level advisory lock the statement took, now.
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_catalog.pg_advisory_unlock_all()")
            connection.rollback()
        except Exception:  # noqa: BLE001 - the connection is closed next anyway
            pass
        # Never back into the pool: what the statement left on the session outlives
        # the rollback (a pg_advisory_lock() taken by it would be held until the
        # connection closes), so the connection is closed with the statement.
        raw.invalidate()
        raw.close()

def cmd_cleanup(args: argparse.Namespace) -> int:
    with _writer(args) as database:
        experiment_id = args.experiment
        if experiment_id is None:
            running = database.get_running_experiment()
            if running is None:
                print("no RUNNING experiment; nothing to clean up")
                return 0
            experiment_id = running.experiment_id
        status = "FAILED" if args.failed else "COMPLETED"
        report = database.cleanup_experiment_state(
            experiment_id, status=status, run_status="FAILED" if args.failed else "KILLED",
            reason="rapidfire-state cleanup",
        )
    print(
        f"experiment {experiment_id}: {report.experiment_status.value}; "
        f"tasks failed {len(report.failed_task_ids)}, runs ended {len(report.ended_run_ids)}, "
        f"runs frozen {len(report.frozen_run_ids)}, workers exited {len(report.exited_worker_ids)}, "
        f"shm rows removed {len(report.removed_shm_objects)}"
    )
    return 0


def cmd_fail_stale(args: argparse.Namespace) -> int:
    with _writer(args) as database:
        reports = database.fail_stale_workers(args.grace, experiment_id=args.experiment, lost_runs=args.lost_runs)
    for report in reports:
        released = f", runs released {list(report.released_run_ids)}" if args.lost_runs == "release" else ""
        print(
            f"{report.reason}: tasks failed {list(report.failed_task_ids)}, "
            f"runs failed {list(report.failed_run_ids)}{released}"
        )
    if not reports:
        print("no stale workers")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="rapidfire-state",
        description="Inspect and maintain the rapidfire_state database.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Database: --url, else $RF_DB_URL, else $RF_HOME/db/rapidfire_state.db",
    )
    parser.add_argument("--url", default=None, help="database URL or SQLite file path")
    parser.add_argument("--debug", action="store_true", help="on an error, print the traceback too")
    # --debug is accepted after the command as well
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_parser_with(common))
    commands.required = True

    db_parser = commands.add_parser("db", help="schema migrations")
    db_commands = db_parser.add_subparsers(dest="db_command", metavar="ACTION")
    db_commands.required = True
    upgrade = db_commands.add_parser("upgrade", help="migrate the database to the library's head revision")
    upgrade.set_defaults(func=cmd_db_upgrade)
    current = db_commands.add_parser("current", help="show the database's revision (never migrates)")
    current.set_defaults(func=cmd_db_current)

    def listing(name: str, func: Any, help_text: str, experiment: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        if experiment:
            sub.add_argument("-e", "--experiment", type=int, default=None, help="experiment id")
        sub.add_argument("--json", action="store_true", help="print JSON")
        sub.set_defaults(func=func)
        return sub

    listing("experiments", cmd_experiments, "list experiments and their metric rows not yet in MLflow", experiment=False)
    metrics = listing("metrics", cmd_metrics, "MLflow runs with metric rows not yet delivered (the metric outbox)")
    metrics.add_argument("--all", action="store_true", help="every MLflow run, also those with nothing pending")
    metrics.add_argument("--failed", action="store_true", help="the rows MLflow refused for good, with the error")
    metrics.add_argument("--limit", type=_check_limit, default=100, help="--failed: the newest N rows (default 100)")
    def limited(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--limit", type=_check_limit, default=DEFAULT_LIMIT,
                         help=f"show at most N rows (default {DEFAULT_LIMIT}; a note says when more exist)")
        return sub

    runs = limited(listing("runs", cmd_runs, "list runs with their config and progress"))
    runs.add_argument("--status", action="append", help="only runs with this status (repeatable)")
    tasks = limited(listing("tasks", cmd_tasks, "list open worker and controller tasks"))
    tasks.add_argument("--all", action="store_true", help="include finished tasks")
    workers = limited(listing("workers", cmd_workers, "list worker processes"))
    workers.add_argument("--alive", action="store_true", help="only workers not marked exited")
    limited(listing("shm", cmd_shm, "list shared-memory objects"))
    status = listing("status", cmd_status, "the running (else the latest) experiment at a glance")
    status.add_argument("--grace", type=_check_grace, default=30.0,
                        help="heartbeat age in seconds after which a worker is stale (default 30)")
    watch = commands.add_parser("watch", help="a live table of the running experiment's runs, until it ends")
    watch.add_argument("-e", "--experiment", type=int, default=None, help="experiment id (default: the running one)")
    watch.add_argument("--interval", type=_check_interval, default=1.0, help="seconds between refreshes (default 1)")
    watch.add_argument("--limit", type=_check_limit, default=200, help="show at most N runs (default 200)")
    watch.set_defaults(func=cmd_watch)
    doctor = listing("doctor", cmd_doctor, "check the database and the experiments' files; exit 3 when something is wrong")
    doctor.add_argument("--grace", type=_check_grace, default=30.0,
                        help="heartbeat age in seconds after which a worker is stale (default 30)")
    history = listing("history", cmd_history, "status changes of one row", experiment=False)
    history.add_argument("entity", choices=["experiment", "run", "worker_task", "controller_task"])
    history.add_argument("entity_id", type=int)
    sql = listing("sql", cmd_sql, "run one read-only SQL statement", experiment=False)
    sql.add_argument("query", help="e.g. \"SELECT * FROM run_overview\"")
    sql.add_argument(
        "--timeout", type=_check_timeout, default=30.0,
        help="cancel the statement after this many seconds (default 30)",
    )

    cleanup = commands.add_parser("cleanup", help="end an experiment's state (default: the RUNNING one)")
    cleanup.add_argument("-e", "--experiment", type=int, default=None)
    cleanup.add_argument("--failed", action="store_true", help="end it FAILED (runs FAILED) instead of COMPLETED")
    cleanup.set_defaults(func=cmd_cleanup)
    stale = commands.add_parser("fail-stale", help="fail workers that died or stopped heartbeating")
    stale.add_argument("--grace", type=float, default=30.0, help="heartbeat age in seconds (default 30)")
    stale.add_argument("-e", "--experiment", type=int, default=None)
    stale.add_argument(
        "--lost-runs", choices=("fail", "release"), default="fail",
        help="the lost tasks' runs: fail them (default) or leave them to be rescheduled",
    )
    stale.set_defaults(func=cmd_fail_stale)

    # interactive control: ic stop|resume|kill|clone (rapidfire_state/cli_ic.py)
    from rapidfire_state.cli_ic import add_ic_parser

    add_ic_parser(commands, _writer, _check_timeout)
    return parser


class _OneLineParser(argparse.ArgumentParser):
    """Bad arguments are one line too (argparse would print the usage first)."""

    def error(self, message: str) -> "NoReturn":  # type: ignore[override]
        self.exit(EXIT_ERROR, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _parser_with(common: argparse.ArgumentParser) -> type:
    class _SubParser(_OneLineParser):
        def __init__(self, *args: Any, **kwargs: Any):
            kwargs.setdefault("parents", [common])
            super().__init__(*args, **kwargs)

    return _SubParser


def one_line(exc: BaseException) -> str:
    """An error as one line: a driver's own message without SQLAlchemy's boilerplate."""
    from_driver = getattr(exc, "orig", None)
    text = str(from_driver if from_driver is not None else exc) or type(exc).__name__
    text = text.split("(Background on this error at:")[0]
    return " ".join(text.split())


def _stdout_gone() -> None:
    # Whatever is still buffered goes nowhere, so the interpreter's last flush cannot fail.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``rapidfire-state`` console script.

    Exit status: 0 on success; 2 for an error of the library (one line on stderr:
    a refusal, a missing database, a bad URL, a failed query); 1 for anything
    unexpected (also one line); 141 when stdout was closed (``… | head``), quietly.
    ``--debug`` prints the traceback before the line.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    from rapidfire_state.db.engine import set_application_name  # after parsing: --help loads no SQLAlchemy

    previous_role = set_application_name("cli")  # restored below: main() may run inside another program
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        _stdout_gone()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print("rapidfire-state: interrupted", file=sys.stderr)
        return 130
    except RapidFireError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"rapidfire-state: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback (--debug shows it)
        if debug:
            import traceback

            traceback.print_exc()
        hint = "" if debug else " (--debug shows the traceback)"
        print(f"rapidfire-state: error: {type(exc).__name__}: {one_line(exc)}{hint}", file=sys.stderr)
        return EXIT_UNEXPECTED
    finally:
        set_application_name(previous_role)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
