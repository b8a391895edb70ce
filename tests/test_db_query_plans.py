"""The claim's plan with a long history: the partial claim index, never a walk of the history.

A large ``worker_tasks`` / ``controller_tasks`` is made in the database itself
(``generate_series`` on PostgreSQL, a recursive CTE on SQLite): many finished
tasks with low ids ahead of a queue of SCHEDULED ones, the shape in which
PostgreSQL, with statistics, walked the primary key and filtered every finished
task.  The claim statement is the store's own (:func:`claim_statement`), in each
filter shape the store uses.  PostgreSQL runs ``EXPLAIN (ANALYZE)`` in a
transaction that is rolled back, with a custom and a generic plan (the psycopg
driver prepares a statement it runs often, and the server may then keep a
generic plan), before and after ``ANALYZE``; SQLite runs ``EXPLAIN QUERY PLAN``
after ``ANALYZE`` (its planner already searched the older ``(…, status, task_id)``
index, which is as bounded; either is accepted there, a walk is not).  The
claim is also checked with 1,000,000 finished worker tasks on PostgreSQL (slow).

The other hot queries (run and task transitions, the listings by status, the
open-tasks listings) are checked the same way further down.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Optional

import pytest
from sqlalchemy import event, text

from rapidfire_state.db.store.status_change import claim_statement
from rapidfire_state.db.store.tasks import TASK_ENTITIES

#: (finished, queued) tasks per table; SQLite is kept smaller (its plan does not depend on the size)
SIZES = {"postgresql": (200_000, 1_000), "sqlite": (50_000, 500)}
WORKERS = 2

#: (kind, filter columns, the index the claim must use)
SHAPES = [
    ("worker", ("worker_id",), "ix_worker_tasks_claim"),
    ("worker", ("experiment_id", "worker_id"), "ix_worker_tasks_claim"),
    ("controller", ("experiment_id",), "ix_controller_tasks_claim"),
]
#: SQLite may instead search the older (…, status, task_id) index by status: as bounded
#: by the queue (its first entry for that status is the claim), and covering
SQLITE_ALSO = {
    "ix_worker_tasks_claim": "ix_worker_tasks_worker_id_status_task_id",
    "ix_controller_tasks_claim": "ix_controller_tasks_experiment_id_status_task_id",
}

_FILL_PG = """
INSERT INTO {table} (experiment_id, run_id, {worker} task_type, status)
SELECT :experiment_id, :run_id, {worker_value} :task_type, CASE WHEN g <= :finished THEN 'COMPLETED' ELSE 'SCHEDULED' END
FROM generate_series(1, :total) AS g
"""
_FILL_SQLITE = """
WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < :total)
INSERT INTO {table} (experiment_id, run_id, {worker} task_type, status, created_at)
SELECT :experiment_id, :run_id, {worker_value} :task_type, CASE WHEN n <= :finished THEN 'COMPLETED' ELSE 'SCHEDULED' END,
       CURRENT_TIMESTAMP
FROM g
"""


#: the long history of issue 12's target: 1,000,000 finished worker tasks (PostgreSQL only)
MILLION = 1_000_000


def _fill(db, backend: str, worker_finished: Optional[int] = None) -> dict[str, Any]:
    """The history and the queue in both task tables; returns the claim parameters.

    ``worker_finished`` replaces the size's finished worker tasks (the
    controller's table keeps the size's).
    """
    finished, queued = SIZES[backend]
    experiment = db.create_experiment("plans", "/tmp/rf-plans")
    run = db.create_run(experiment.experiment_id, {"lr": 0.1})
    template = _FILL_PG if backend == "postgresql" else _FILL_SQLITE
    counter = "g" if backend == "postgresql" else "n"
    with db.engine.begin() as connection:
        for table, task_type, worker in (
            ("worker_tasks", "TRAIN_VAL", True), ("controller_tasks", "IC_STOP", False)
        ):
            sql = template.format(
                table=table,
                worker="worker_id," if worker else "",
                worker_value=f"{counter} % {WORKERS}," if worker else "",
            )
            done = worker_finished if worker and worker_finished is not None else finished
            connection.execute(text(sql), {
                "experiment_id": experiment.experiment_id, "run_id": run.run_id, "task_type": task_type,
                "finished": done, "total": done + queued,
            })
    return {
        "rf_claim_worker_id": 0, "rf_claim_experiment_id": experiment.experiment_id,
        "rf_new_claim_token": "0" * 32, "rf_claim_pid": 1, "rf_claim_host": "plans", "rf_claim_started": 0.0,
        "rf_claim_identity": "plans:1",
    }


def _analyze(db) -> None:
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.exec_driver_sql("ANALYZE")


def _nodes(plan: dict) -> Iterator[dict]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from _nodes(child)


def _postgresql_plan(db, kind: str, filters: tuple[str, ...], params: dict, mode: str) -> list[dict]:
    """The claim's executed plan nodes under ``plan_cache_mode = mode``; the claim is rolled back."""
    from sqlalchemy.dialects.postgresql import psycopg

    compiled = claim_statement(TASK_ENTITIES[kind], filters).compile(dialect=psycopg.dialect(paramstyle="numeric_dollar"))
    values = compiled.construct_params(params)
    arguments = ", ".join(_pg_literal(values[name]) for name in compiled.positiontup)
    connection = db.engine.connect()
    try:
        transaction = connection.begin()
        connection.exec_driver_sql(f"SET LOCAL plan_cache_mode = {mode}")
        connection.exec_driver_sql(f"PREPARE rf_plan_claim AS {compiled}")
        try:
            (document,) = connection.exec_driver_sql(
                f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE rf_plan_claim({arguments})"
            ).scalar()
        finally:
            transaction.rollback()  # the claim is undone, and the prepared statement is per connection
            connection.exec_driver_sql("DEALLOCATE ALL")
            connection.commit()
    finally:
        connection.close()
    return list(_nodes(document["Plan"]))


def _pg_literal(value: Any) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)


def _assert_postgresql_claim_uses(nodes: list[dict], table: str, index: str) -> None:
    scans = [n for n in nodes if n.get("Relation Name") == table]
    shown = [(n["Node Type"], n.get("Index Name"), n.get("Rows Removed by Filter")) for n in scans]
    assert any(n.get("Index Name") == index for n in scans), shown
    assert not any(n["Node Type"] in ("Seq Scan", "Bitmap Heap Scan") for n in scans), shown
    # the primary key only fetches the chosen row (Index Cond task_id = $n), never walks the history
    for n in scans:
        if n.get("Index Name") == f"pk_{table}":
            assert "task_id" in n.get("Index Cond", ""), shown
    assert sum(n.get("Rows Removed by Filter", 0) for n in scans) == 0, shown
    claimed = [n for n in nodes if n["Node Type"] == "ModifyTable"]
    assert claimed and claimed[0]["Actual Rows"] == 1, shown


def _sqlite_plan(db, kind: str, filters: tuple[str, ...], params: dict) -> list[str]:
    from sqlalchemy.dialects.sqlite import pysqlite

    compiled = claim_statement(TASK_ENTITIES[kind], filters).compile(dialect=pysqlite.dialect(paramstyle="named"))
    with db.engine.connect() as connection:
        rows = connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", compiled.construct_params(params)).all()
        connection.rollback()
    return [row[-1] for row in rows]


@pytest.mark.parametrize("history", ["default", pytest.param("1M", marks=pytest.mark.slow)])
def test_claim_plans_use_the_partial_claim_index_over_a_long_history(db, db_url, history):
    backend = "postgresql" if db_url.startswith("postgresql") else "sqlite"
    worker_finished = None
    if history == "1M":
        if backend != "postgresql":
            pytest.skip("the 1M-task history is PostgreSQL's case (SQLite's plan does not depend on the size)")
        worker_finished = MILLION
    params = _fill(db, backend, worker_finished)
    if backend == "postgresql":
        # before ANALYZE (a fresh table, whatever autovacuum did meanwhile) and after it
        for analyzed in (False, True):
            if analyzed:
                _analyze(db)
            for kind, filters, index in SHAPES:
                for mode in ("force_custom_plan", "force_generic_plan"):
                    nodes = _postgresql_plan(db, kind, filters, params, mode)
                    _assert_postgresql_claim_uses(nodes, TASK_ENTITIES[kind].table.name, index)
    else:
        _analyze(db)
        for kind, filters, index in SHAPES:
            steps = _sqlite_plan(db, kind, filters, params)
            table = TASK_ENTITIES[kind].table.name
            searches = [step for step in steps if step.startswith(f"SEARCH {table} USING")]
            subquery = [step for step in searches if "PRIMARY KEY" not in step]
            assert len(subquery) == 1, steps
            assert (
                f"INDEX {index} " in subquery[0]
                or (f"INDEX {SQLITE_ALSO[index]} " in subquery[0] and "status=?" in subquery[0])
            ), steps
            assert not any(step.startswith(f"SCAN {table}") for step in steps), steps  # no full walk
            assert not any("TEMP B-TREE" in step for step in steps), steps  # the index gives the order
    # and the store's claims take the oldest queued task, the history untouched
    finished, _ = SIZES[backend]
    first = db.claim_worker_task(0, experiment_id=params["rf_claim_experiment_id"])
    # ids start at 1; the queue's first even id
    assert first is not None and first.task_id == (worker_finished or finished) + 2
    controller = db.claim_controller_task(params["rf_claim_experiment_id"])
    assert controller is not None and controller.task_id == finished + 1
    if worker_finished is not None:  # 1M: the whole history really was there
        with db.engine.connect() as connection:
            assert connection.exec_driver_sql("SELECT COUNT(*) FROM worker_tasks").scalar() == worker_finished + SIZES[backend][1]


# --- the other hot queries ------------------------------------------------------------------------
#
# A run transition and a task transition (compare-and-set UPDATE by primary key),
# the listings by status, and the open-tasks listings, each over a large table
# (many finished rows, a few open ones) with fresh statistics: each must reach
# its rows through an index whose leading column it constrains, never a walk of
# the table (a Seq Scan, or an index scanned whole under a filter).  The
# statements are the store's own: the planned changes compiled, the listings
# captured from the engine while the store runs them.

OPEN = ["PENDING", "SCHEDULED", "IN_PROGRESS"]
#: rows per big table; the target experiment holds every other finished row and a few open ones
HOT_SIZES = {"postgresql": 200_000, "sqlite": 50_000}
OPEN_ROWS = 30

_HOT_FILL_PG = {
    "runs": """
INSERT INTO runs (experiment_id, status, source, ended_by, completed_steps, total_steps, num_chunks_visited,
                  num_epochs_completed, chunk_offset, required_workers, progress)
SELECT CASE WHEN g % 2 = 0 THEN :target ELSE :other END, 'COMPLETED', 'USER', 'COMPLETED', 0, 0, 0, 0, 0, 1, 0
FROM generate_series(1, :finished) AS g""",
    "worker_tasks": """
INSERT INTO worker_tasks (experiment_id, worker_id, task_type, status)
SELECT CASE WHEN g % 2 = 0 THEN :target ELSE :other END, g % 4, 'TRAIN_VAL', 'COMPLETED'
FROM generate_series(1, :finished) AS g""",
    "controller_tasks": """
INSERT INTO controller_tasks (experiment_id, task_type, status)
SELECT CASE WHEN g % 2 = 0 THEN :target ELSE :other END, 'IC_STOP', 'COMPLETED'
FROM generate_series(1, :finished) AS g""",
}
_SQLITE_SERIES = "WITH RECURSIVE s(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM s WHERE g < :finished) "


def _hot_fill_sql(backend: str, table: str) -> str:
    sql = _HOT_FILL_PG[table]
    if backend == "postgresql":
        return sql
    # the same rows from a recursive CTE (and the timestamps SQLite has no server default for)
    body = sql.replace("FROM generate_series(1, :finished) AS g", "FROM s")
    insert, select_ = body.split("SELECT", 1)
    columns = insert.rstrip().rstrip(")") + ", created_at" + (", updated_at)" if table == "runs" else ")")
    values = "SELECT" + select_.replace("\nFROM s", ", CURRENT_TIMESTAMP" + (", CURRENT_TIMESTAMP" if table == "runs" else "") + "\nFROM s")
    return _SQLITE_SERIES + columns + values


def _hot_fill(db, backend: str) -> dict[str, int]:
    """Two experiments' worth of finished runs and tasks, and a few open ones in the target."""
    other = db.create_experiment("hot-other", "/tmp/rf-plans").experiment_id
    target = db.transition_experiment(db.create_experiment("hot", "/tmp/rf-plans").experiment_id, "RUNNING").experiment_id
    with db.engine.begin() as connection:
        for table in _HOT_FILL_PG:
            connection.execute(text(_hot_fill_sql(backend, table)),
                               {"target": target, "other": other, "finished": HOT_SIZES[backend]})
    run = db.transition_run(db.create_run(target, {"lr": 0.1}).run_id, "ONGOING").run_id
    for i in range(OPEN_ROWS):
        db.create_run(target, {"i": i})
        status = OPEN[i % 2]  # PENDING or SCHEDULED
        task = db.create_worker_task(target, run, i % 4, i, status=status).task_id
        if i % 3 == 0 and status == "SCHEDULED":
            db.transition_task("worker", task, "IN_PROGRESS")
        db.create_controller_task(target, "IC_STOP", run_id=run, status=status)
    _analyze(db)
    return {"target": target, "run": run, "worker_task": task}


def _captured(db, call) -> tuple[str, Any]:
    """The one SELECT the store sends for ``call()``: its SQL and parameters, as the driver got them."""
    seen: list[tuple[str, Any]] = []

    def remember(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, parameters))

    event.listen(db.engine, "before_cursor_execute", remember)
    try:
        call()
    finally:
        event.remove(db.engine, "before_cursor_execute", remember)
    assert len(seen) == 1, seen
    return seen[0]


def _compiled(db, statement, values: dict[str, Any]) -> tuple[str, Any]:
    """A store statement compiled for ``db``'s dialect, with its bound parameters."""
    dialect = db.engine.dialect
    if db.is_sqlite:  # named parameters, so that the dict of them binds
        from sqlalchemy.dialects.sqlite import pysqlite

        dialect = pysqlite.dialect(paramstyle="named")
    compiled = statement.compile(dialect=dialect)
    return compiled.string, compiled.construct_params(values)


def _hot_queries(db, ids: dict[str, int]) -> dict[str, tuple[str, tuple[str, Any]]]:
    """name -> (table, (sql, parameters)) of each hot query, from the store itself."""
    from rapidfire_state.constants import RunStatus, TaskStatus
    from rapidfire_state.db.store.runs import plan_run_change
    from rapidfire_state.db.store.status_change import WORKER_TASK
    from rapidfire_state.db.store.tasks import plan_task_change

    target = ids["target"]
    stop, _ = plan_run_change(RunStatus.STOPPED, None, None)
    resume, _ = plan_run_change(RunStatus.ONGOING, None, None)
    finish, finish_params = plan_task_change(WORKER_TASK, TaskStatus.COMPLETED, None, None, "0" * 32)
    return {
        "run transition (to STOPPED)": ("runs", _compiled(db, stop.statement, {"rf_entity_id": ids["run"]})),
        "run transition (resume, experiment RUNNING)": (
            "runs", _compiled(db, resume.statement, {"rf_entity_id": ids["run"]})
        ),
        "task transition (finish with claim token)": (
            "worker_tasks", _compiled(db, finish.statement, {"rf_entity_id": ids["worker_task"], **finish_params})
        ),
        "list_runs(experiment, statuses)": (
            "runs", _captured(db, lambda: db.list_runs(target, statuses=["ONGOING", "STOPPED"]))
        ),
        "list_tasks(worker, experiment, open statuses)": (
            "worker_tasks", _captured(db, lambda: db.list_tasks("worker", experiment_id=target, statuses=OPEN))
        ),
        "list_tasks(controller, experiment, open statuses)": (
            "controller_tasks", _captured(db, lambda: db.list_tasks("controller", experiment_id=target, statuses=OPEN))
        ),
        "list_tasks(controller, open statuses)": (
            "controller_tasks", _captured(db, lambda: db.list_tasks("controller", statuses=OPEN))
        ),
        "list_tasks(worker, open statuses)": (
            "worker_tasks", _captured(db, lambda: db.list_tasks("worker", statuses=OPEN))
        ),
    }


def _leading_columns(table: str) -> dict[str, str]:
    """index name -> its first column, for ``table`` (its primary key as ``pk_<table>``)."""
    from rapidfire_state.db import schema

    found = schema.metadata.tables[table]
    leading = {f"pk_{table}": next(iter(found.primary_key.columns)).name}
    for index in found.indexes:
        leading[index.name] = next(iter(index.columns)).name
    return leading


def _partial_indexes(table: str) -> set[str]:
    """The partial indexes of ``table``: they hold only the rows their WHERE selects, so a scan of
    one whole is bounded by those rows (open tasks, say), not by the history."""
    from rapidfire_state.db import schema

    return {
        index.name for index in schema.metadata.tables[table].indexes
        if index.dialect_options["sqlite"].get("where") is not None
    }


def _pg_explain(db, sql: str, parameters: dict[str, Any], mode: str) -> list[dict]:
    """Executed plan nodes of a pyformat statement as a prepared statement; rolled back."""
    names: list[str] = []

    def number(match: re.Match) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    prepared = re.sub(r"%\((\w+)\)s", number, sql).replace("%%", "%")
    arguments = ", ".join(_pg_literal(parameters[name]) for name in names)
    connection = db.engine.connect()
    try:
        transaction = connection.begin()
        connection.exec_driver_sql(f"SET LOCAL plan_cache_mode = {mode}")
        connection.exec_driver_sql(f"PREPARE rf_plan_hot AS {prepared}")
        try:
            (document,) = connection.exec_driver_sql(
                f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE rf_plan_hot{f'({arguments})' if names else ''}"
            ).scalar()
        finally:
            transaction.rollback()
            connection.exec_driver_sql("DEALLOCATE ALL")
            connection.commit()
    finally:
        connection.close()
    return list(_nodes(document["Plan"]))


def _pg_walks(nodes: list[dict], table: str) -> list[str]:
    """What is wrong with the plan's access to ``table`` (empty: every access is by an index's lead)."""
    leading = _leading_columns(table)
    partial = _partial_indexes(table)
    scans = [n for n in nodes if n.get("Relation Name") == table or n.get("Index Name") in leading]
    problems = []
    if not any(n.get("Index Name") in leading for n in scans):
        problems.append(f"no index of {table} used")
    for n in scans:
        kind, index = n["Node Type"], n.get("Index Name")
        if kind == "Seq Scan":
            problems.append(f"Seq Scan on {table} (Rows Removed by Filter {n.get('Rows Removed by Filter')})")
        elif index is not None and index not in partial and leading[index] not in n.get("Index Cond", ""):
            problems.append(f"{kind} using {index} without a condition on its leading column {leading[index]}")
    return problems


def _sqlite_walks(db, sql: str, parameters: Any, table: str) -> list[str]:
    with db.engine.connect() as connection:
        steps = [row[-1] for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", parameters).all()]
        connection.rollback()
    mine = [s for s in steps if re.match(rf"(SEARCH|SCAN) {table}\b", s)]
    partial = _partial_indexes(table)

    def bounded(step: str) -> bool:  # a search by an index, or a walk of a partial index
        found = re.search(r"USING (?:COVERING )?INDEX (\w+)", step)
        return step.startswith(f"SEARCH {table} USING") or (found is not None and found.group(1) in partial)

    problems = [f"{s!r} (plan {steps})" for s in mine if not bounded(s)]
    if not mine:
        problems.append(f"{table} not in the plan {steps}")
    return problems


def _walks(db, backend: str, table: str, sql: str, parameters: Any) -> list[str]:
    if backend == "sqlite":
        return _sqlite_walks(db, sql, parameters, table)
    problems = []
    for mode in ("force_custom_plan", "force_generic_plan"):
        problems += [f"{mode}: {p}" for p in _pg_walks(_pg_explain(db, sql, parameters, mode), table)]
    return problems


def test_hot_queries_reach_their_rows_through_an_index_over_a_large_table(db, db_url):
    backend = "postgresql" if db_url.startswith("postgresql") else "sqlite"
    queries = _hot_queries(db, _hot_fill(db, backend))
    problems = {
        name: found for name, (table, (sql, parameters)) in queries.items()
        if (found := _walks(db, backend, table, sql, parameters))
    }
    assert problems == {}


