"""``rapidfire-state``: inspect and maintain the state database.

    rapidfire-state db upgrade            migrate the configured database to head
    rapidfire-state db current            show its revision and the library's head
    rapidfire-state experiments           list experiments
    rapidfire-state runs [-e ID]          list runs
    rapidfire-state tasks [-e ID]         list open (or --all) worker/controller tasks
    rapidfire-state workers [-e ID]       list worker processes
    rapidfire-state history ENTITY ID     status changes of one row
    rapidfire-state shm                   shared-memory objects
    rapidfire-state sql "SELECT …"        run read-only SQL (views: run_overview, active_tasks, shm_usage)
    rapidfire-state cleanup [-e ID]       end an experiment (tasks FAILED, runs KILLED, ...)
    rapidfire-state fail-stale --grace S  fail workers whose process died or heartbeat stopped

The database is ``--url``, else ``$RF_DB_URL``, else ``$RF_HOME/db/rapidfire_state.db``.
Importing this module (and ``--help``) loads neither torch nor mlflow; SQLAlchemy
is imported only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from enum import Enum
from typing import Any, Iterable, Optional, Sequence

from rapidfire_state.exceptions import RapidFireError


def _open(args: argparse.Namespace, *, auto_upgrade: Optional[bool] = None) -> Any:
    from rapidfire_state.db import StateDB

    return StateDB(args.url, auto_upgrade=auto_upgrade)


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

    url = resolve_url(args.url)
    revision = migrate.read_revision(url)
    if revision == migrate.HEAD_REVISION:
        status = "up to date"
    elif revision is None:
        status = "empty"
    elif revision in migrate.REVISIONS:
        status = "behind: run `rapidfire-state db upgrade`"
    else:
        status = "unknown to this library (newer?)"
    print(f"database: {url.render_as_string(hide_password=True)}")
    print(f"revision: {revision or '-'} ({status}); library head: {migrate.HEAD_REVISION}")
    return 0


def cmd_experiments(args: argparse.Namespace) -> int:
    database = _open(args)
    columns = ["experiment_id", "name", "status", "current_task", "owner_pid", "created_at", "ended_at", "error"]
    _emit(_records(database.list_experiments()), columns, args.json)
    database.close()
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    database = _open(args)
    columns = [
        "run_id", "experiment_id", "status", "source", "ended_by", "completed_steps", "total_steps",
        "num_chunks_visited", "num_epochs_completed", "metric_run_id", "error",
    ]
    records = database.list_runs(args.experiment, statuses=args.status or None)
    _emit(_records(records), columns, args.json)
    database.close()
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    database = _open(args)
    statuses = None if args.all else ["PENDING", "SCHEDULED", "IN_PROGRESS"]
    rows = []
    for kind in ("worker", "controller"):
        rows += _records(database.list_tasks(kind, experiment_id=args.experiment, statuses=statuses))
    columns = ["kind", "task_id", "experiment_id", "run_id", "worker_id", "chunk_id", "task_type", "status", "error"]
    _emit(rows, columns, args.json)
    database.close()
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    database = _open(args)
    columns = ["experiment_id", "worker_id", "pid", "host", "started_at", "heartbeat_at", "exited_at", "exit_code"]
    _emit(_records(database.list_workers(args.experiment, alive_only=args.alive)), columns, args.json)
    database.close()
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    database = _open(args)
    columns = ["transition_id", "from_status", "to_status", "at", "pid", "host", "reason"]
    _emit(_records(database.history(args.entity, args.entity_id)), columns, args.json)
    database.close()
    return 0


def cmd_shm(args: argparse.Namespace) -> int:
    database = _open(args)
    columns = ["key", "experiment_id", "run_id", "chunk_id", "object_type", "location", "num_bytes", "tensor_count", "disk_path"]
    _emit(_records(database.list_shm_objects(experiment_id=args.experiment)), columns, args.json)
    database.close()
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    database = _open(args)
    try:
        with database.session() as session:
            # Read-only at the database level, whatever the statement says.
            if database.is_sqlite:
                session.execute(text("PRAGMA query_only = ON"))
            else:
                session.execute(text("SET TRANSACTION READ ONLY"))
            try:
                result = session.execute(text(args.query))
            except SQLAlchemyError as exc:
                raise RapidFireError(f"query failed: {getattr(exc, 'orig', exc)}") from exc
            if not result.returns_rows:
                print("(statement returned no rows)")
                return 0
            columns = list(result.keys())
            rows = [dict(zip(columns, row)) for row in result]
            if database.is_sqlite:
                session.rollback()
                session.execute(text("PRAGMA query_only = OFF"))
        _emit(rows, columns, args.json)
    finally:
        database.close()
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    database = _open(args)
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
    database.close()
    return 0


def cmd_fail_stale(args: argparse.Namespace) -> int:
    database = _open(args)
    reports = database.fail_stale_workers(args.grace, experiment_id=args.experiment)
    for report in reports:
        print(f"{report.reason}: tasks failed {list(report.failed_task_ids)}, runs failed {list(report.failed_run_ids)}")
    if not reports:
        print("no stale workers")
    database.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rapidfire-state",
        description="Inspect and maintain the rapidfire_state database.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Database: --url, else $RF_DB_URL, else $RF_HOME/db/rapidfire_state.db",
    )
    parser.add_argument("--url", default=None, help="database URL or SQLite file path")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
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

    listing("experiments", cmd_experiments, "list experiments", experiment=False)
    runs = listing("runs", cmd_runs, "list runs")
    runs.add_argument("--status", action="append", help="only runs with this status (repeatable)")
    tasks = listing("tasks", cmd_tasks, "list open worker and controller tasks")
    tasks.add_argument("--all", action="store_true", help="include finished tasks")
    workers = listing("workers", cmd_workers, "list worker processes")
    workers.add_argument("--alive", action="store_true", help="only workers not marked exited")
    listing("shm", cmd_shm, "list shared-memory objects")
    history = listing("history", cmd_history, "status changes of one row", experiment=False)
    history.add_argument("entity", choices=["experiment", "run", "worker_task", "controller_task"])
    history.add_argument("entity_id", type=int)
    sql = listing("sql", cmd_sql, "run one read-only SQL statement", experiment=False)
    sql.add_argument("query", help="e.g. \"SELECT * FROM run_overview\"")

    cleanup = commands.add_parser("cleanup", help="end an experiment's state (default: the RUNNING one)")
    cleanup.add_argument("-e", "--experiment", type=int, default=None)
    cleanup.add_argument("--failed", action="store_true", help="end it FAILED (runs FAILED) instead of COMPLETED")
    cleanup.set_defaults(func=cmd_cleanup)
    stale = commands.add_parser("fail-stale", help="fail workers that died or stopped heartbeating")
    stale.add_argument("--grace", type=float, default=30.0, help="heartbeat age in seconds (default 30)")
    stale.add_argument("-e", "--experiment", type=int, default=None)
    stale.set_defaults(func=cmd_fail_stale)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``rapidfire-state`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RapidFireError as exc:
        print(f"rapidfire-state: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
