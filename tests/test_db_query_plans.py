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
index, which is as bounded; either is accepted there, a walk is not).
"""

from __future__ import annotations

from typing import Any, Iterator

from sqlalchemy import text

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


def _fill(db, backend: str) -> dict[str, Any]:
    """The history and the queue in both task tables; returns the claim parameters."""
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
            connection.execute(text(sql), {
                "experiment_id": experiment.experiment_id, "run_id": run.run_id, "task_type": task_type,
                "finished": finished, "total": finished + queued,
            })
    return {
        "rf_claim_worker_id": 0, "rf_claim_experiment_id": experiment.experiment_id,
        "rf_new_claim_token": "0" * 32, "rf_claim_pid": 1, "rf_claim_host": "plans", "rf_claim_started": 0.0,
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


def test_claim_plans_use_the_partial_claim_index_over_a_long_history(db, db_url):
    backend = "postgresql" if db_url.startswith("postgresql") else "sqlite"
    params = _fill(db, backend)
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
    assert first is not None and first.task_id == finished + 2  # ids start at 1; the queue's first even id
    controller = db.claim_controller_task(params["rf_claim_experiment_id"])
    assert controller is not None and controller.task_id == finished + 1
