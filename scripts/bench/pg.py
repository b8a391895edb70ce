#!/usr/bin/env python
"""Claims, finishes and run transitions on PostgreSQL: the library against raw psycopg.

In one run, on databases this script creates and drops (``rf_bench_pg_<hex>``;
nothing else on the server is touched):

1. ``throughput``: for N = 2, 4, 8 spawned processes, each process loops
   claim → finish of one of its worker tasks (``StateDB.claim_worker_task`` /
   ``finish_worker_task`` with the claim's token) and one run transition
   (``transition_run``, ONGOING <-> STOPPED on runs of its own): three write
   units per loop.  The same processes run, in alternating blocks (L R R L L R …,
   all processes in the same block at once), the same SQL through raw psycopg 3
   (autocommit off, one transaction per unit, one connection per process).
   The raw side's SQL is the library's own: its statements
   (``claim_statement``, the planned task and run changes, the history and
   MLflow-status inserts) compiled by SQLAlchemy's psycopg dialect with
   positional parameters, as the store's prepared path compiles them, and
   checked against what the library actually sent through the driver
   (``psycopg.Cursor.execute`` traced during warm-up): the run stops if the raw
   side runs a text the library did not send, and any statement the library
   sends beyond them is listed as ``extra_statements``.  Figures: write units per second
   of each side (median over its blocks), ``ratio_vs_raw_pg`` (target >= 0.8 at
   N = 4), claim p50/p99 of each side.
2. ``claim_ms_1m_finished_vs_empty``: one process claims (and, untimed,
   finishes) worker tasks on two databases in alternating blocks: one with
   an empty history, one with 1,000,000 COMPLETED worker tasks ahead of the
   queue (made with ``generate_series``), both after ``ANALYZE``.  The ratio
   of the claim medians (target <= 1.5).

Sizes (default / ``--quick``): ``--loops`` 900 / 240 loops per block, split
over the N processes; ``--rounds`` 3 / 1 (each round is one library and one raw
block); 1,000,000 / 200,000 finished tasks (``--history``); 10 / 4 blocks of 60
claims on each side of part 2.  The default run takes about a minute on the
2-core development machine (55–62 s; 2 minutes when other work loads it),
``--quick`` about 20 s.

``--url`` (default ``$RF_TEST_PG_URL``, else
``postgresql+psycopg://postgres@127.0.0.1:5432/test``) names the server and the
administrative database used to create and drop the benchmark's own.
``--json`` prints one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from typing import Any

from children import run_children  # scripts/bench/children.py, beside this script

TARGETS = {"ratio_vs_raw_pg_at_4": 0.8, "claim_ms_1m_finished_vs_empty": 1.5}
DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PROCESS_COUNTS = (2, 4, 8)
RUNS_PER_PROC = 4
WARM_LOOPS = 6  # per side and process, before the first block (compile caches, prepared statements)
FINISHED_WORKERS = 8  # the history's tasks are spread over this many worker ids


# --- databases ---------------------------------------------------------------------------------


def admin_engine(url: str):
    from sqlalchemy import create_engine

    from rapidfire_state.db.engine import resolve_url

    return create_engine(resolve_url(url), isolation_level="AUTOCOMMIT")


def create_database(admin, url: str, label: str) -> str:
    """A new empty database on the server of ``url``; returns its URL."""
    from sqlalchemy import text

    from rapidfire_state.db.engine import resolve_url

    name = f"rf_bench_pg_{label}_{uuid.uuid4().hex[:10]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    return resolve_url(url).set(database=name).render_as_string(hide_password=False)


def drop_database(admin, url: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    name = make_url(url).database
    assert name and name.startswith("rf_bench_pg_"), name  # only ever our own
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def conninfo(url: str) -> dict[str, Any]:
    """psycopg.connect() keywords for a SQLAlchemy URL, with the library's session options."""
    from sqlalchemy.engine import make_url

    from rapidfire_state.db.engine import postgresql_session_options

    parsed = make_url(url)
    found = {"host": parsed.host, "port": parsed.port, "user": parsed.username, "password": parsed.password,
             "dbname": parsed.database, "options": postgresql_session_options(),
             "application_name": f"rf_bench_raw:{os.getpid()}"}
    return {k: v for k, v in found.items() if v is not None}


def add_tasks(db, experiment_id: int, worker_id: int, count: int, status: str = "SCHEDULED") -> None:
    """``count`` tasks of ``worker_id`` (with their creation history rows), in the database itself."""
    from sqlalchemy import text

    with db.engine.begin() as connection:
        connection.execute(text(
            "WITH new AS (INSERT INTO worker_tasks (experiment_id, worker_id, chunk_id, task_type, status) "
            "SELECT :e, :w, g, 'TRAIN_VAL', :s FROM generate_series(1, :n) AS g RETURNING task_id) "
            "INSERT INTO state_transitions (entity, entity_id, from_status, to_status, at, pid, host, reason) "
            "SELECT 'worker_task', task_id, NULL, :s, CURRENT_TIMESTAMP, 1, 'bench', 'created' FROM new"
        ), {"e": experiment_id, "w": worker_id, "s": status, "n": count})


def analyze(db) -> None:
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.exec_driver_sql("ANALYZE")


# --- the library's SQL, for the raw side ----------------------------------------------------------


def library_statements() -> dict[str, tuple[str, tuple[str, ...], dict[str, Any]]]:
    """The store's own statements as the library sends them: ``name -> (sql, parameter order, fixed values)``.

    Compiled by SQLAlchemy's psycopg dialect with positional parameters, as the
    store's prepared PostgreSQL path compiles them (the benchmark checks the
    text against what the library really sent).  Fixed values are the ones
    bound when the statement was built (constants); the others come per call,
    under the names the store binds them.
    """
    from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

    from rapidfire_state.constants import RunStatus, TaskStatus
    from rapidfire_state.db.store.runs import plan_run_change
    from rapidfire_state.db.store.status_change import (
        INSERT_RUN_STATUS_FOR_MLFLOW,
        INSERT_TRANSITION,
        WORKER_TASK,
        claim_statement,
    )
    from rapidfire_state.db.store.tasks import plan_task_change

    statements = {
        "claim": claim_statement(WORKER_TASK, ("experiment_id", "worker_id")),
        "finish": plan_task_change(WORKER_TASK, TaskStatus.COMPLETED, None, None, "token")[0].statement,
        "to_STOPPED": plan_run_change(RunStatus.STOPPED, None, None)[0].statement,
        "to_ONGOING": plan_run_change(RunStatus.ONGOING, None, None)[0].statement,
        "history": INSERT_TRANSITION,
        "mlflow_status": INSERT_RUN_STATUS_FOR_MLFLOW,
    }
    dialect = PGDialect_psycopg(paramstyle="format")
    compiled = {}
    for name, statement in statements.items():
        c = statement.compile(dialect=dialect)
        if any(bind.expanding for bind in c.binds.values()):
            raise SystemExit(f"{name}: an expanding IN list cannot be replayed as it is")
        fixed = {key: bind.effective_value for key, bind in c.binds.items() if not bind.required}
        compiled[name] = (c.string, tuple(c.positiontup or ()), fixed)
    return compiled


class DriverCapture:
    """Every SQL text this process's psycopg cursors execute while active (the library's, in warm-up)."""

    def __init__(self) -> None:
        self.sent: set[str] = set()
        self._saved: list[tuple[str, Any]] = []

    def __enter__(self) -> "DriverCapture":
        import psycopg

        for method in ("execute", "executemany"):
            original = getattr(psycopg.Cursor, method)
            self._saved.append((method, original))

            def traced(cursor, query, *args, _original=original, **kwargs):
                self.sent.add(query if isinstance(query, str) else str(query))
                return _original(cursor, query, *args, **kwargs)

            setattr(psycopg.Cursor, method, traced)
        return self

    def __exit__(self, *exc: Any) -> None:
        import psycopg

        for method, original in self._saved:
            setattr(psycopg.Cursor, method, original)


class RawUnits:
    """The library's units, as a hand-written psycopg program would run them."""

    def __init__(self, url: str, sql: dict[str, tuple[str, tuple[str, ...], dict[str, Any]]], host: str):
        import psycopg

        self.connection = psycopg.connect(autocommit=False, **conninfo(url))
        self.cursor = self.connection.cursor()
        self.sql = sql
        self.host = host
        self.pid = os.getpid()
        self._previous: dict[str, int] = {}

    def _args(self, name: str, params: dict[str, Any]) -> tuple:
        _, names, fixed = self.sql[name]
        return tuple([params[n] if n in params else fixed[n] for n in names])

    def _row(self, name: str, params: dict[str, Any]):
        cursor = self.cursor
        cursor.execute(self.sql[name][0], self._args(name, params))
        row = cursor.fetchone()
        if name not in self._previous and cursor.description is not None:
            self._previous[name] = [d.name for d in cursor.description].index("previous_status")
        return row

    def _history(self, entity: str, entity_id: int, from_status: str, to_status: str, reason) -> None:
        self.cursor.execute(self.sql["history"][0], self._args("history", {
            "entity": entity, "entity_id": entity_id, "from_status": from_status, "to_status": to_status,
            "pid": self.pid, "host": self.host, "reason": reason,
        }))

    def claim(self, experiment_id: int, worker_id: int, token: str, started: Any, identity: Any):
        try:
            row = self._row("claim", {
                "rf_claim_experiment_id": experiment_id, "rf_claim_worker_id": worker_id,
                "rf_new_claim_token": token, "rf_claim_pid": self.pid, "rf_claim_host": self.host,
                "rf_claim_started": started, "rf_claim_identity": identity,
            })
            if row is not None:
                self._history("worker_task", row[0], row[self._previous["claim"]], "IN_PROGRESS", "claimed")
            self.connection.commit()
            return row
        except BaseException:
            self.connection.rollback()
            raise

    def finish(self, task_id: int, token: str) -> None:
        try:
            row = self._row("finish", {"rf_entity_id": task_id, "rf_claim_token": token})
            if row is None:
                raise RuntimeError(f"raw finish of task {task_id} matched nothing")
            self._history("worker_task", task_id, row[self._previous["finish"]], "COMPLETED", None)
            self.connection.commit()
        except BaseException:
            self.connection.rollback()
            raise

    def transition_run(self, run_id: int, target: str) -> None:
        from rapidfire_state.db.store.status_change import run_status_for_mlflow_params

        try:
            row = self._row(f"to_{target}", {"rf_entity_id": run_id})
            if row is None:
                raise RuntimeError(f"raw transition of run {run_id} to {target} matched nothing")
            self._history("run", run_id, row[self._previous[f"to_{target}"]], target, None)
            self.cursor.execute(self.sql["mlflow_status"][0],
                                self._args("mlflow_status", run_status_for_mlflow_params(run_id, target)))
            self.connection.commit()
        except BaseException:
            self.connection.rollback()
            raise

    def close(self) -> None:
        self.connection.close()


# --- the processes of part 1 --------------------------------------------------------------------


def throughput_child(url: str, worker_id: int, experiment_id: int, run_ids: list[int], plan: list[tuple[str, int]],
                     capture: bool, barrier, results) -> None:
    try:
        import secrets

        from rapidfire_state import StateDB
        from rapidfire_state.db.store.processes import HOST, own_process

        db = StateDB(url)
        sql = library_statements()
        raw = RawUnits(url, sql, HOST)
        _, process_started, process_identity = own_process()
        status = {run_id: "ONGOING" for run_id in run_ids}
        capture_sent = DriverCapture()

        def library_loop(i: int) -> float:
            started = time.perf_counter()
            task = db.claim_worker_task(worker_id, experiment_id=experiment_id)
            claimed = time.perf_counter() - started
            if task is None:
                raise RuntimeError(f"worker {worker_id} found no task to claim")
            db.finish_worker_task(task.task_id, claim_token=task.claim_token)
            run_id = run_ids[i % len(run_ids)]
            target = "STOPPED" if status[run_id] == "ONGOING" else "ONGOING"
            db.transition_run(run_id, target)
            status[run_id] = target
            return claimed

        def raw_loop(i: int) -> float:
            token = secrets.token_hex(16)  # as the library draws one per claim
            started = time.perf_counter()
            row = raw.claim(experiment_id, worker_id, token, process_started, process_identity)
            claimed = time.perf_counter() - started
            if row is None:
                raise RuntimeError(f"worker {worker_id} found no task to claim (raw)")
            raw.finish(row[0], token)
            run_id = run_ids[i % len(run_ids)]
            target = "STOPPED" if status[run_id] == "ONGOING" else "ONGOING"
            raw.transition_run(run_id, target)
            status[run_id] = target
            return claimed

        loops = {"library": library_loop, "raw": raw_loop}
        if capture:  # what the library sends through the driver, to hold the raw side to it
            with capture_sent:
                for i in range(WARM_LOOPS):
                    library_loop(i)
        else:
            for i in range(WARM_LOOPS):
                library_loop(i)
        for i in range(WARM_LOOPS):
            raw_loop(i)
        blocks = []
        for kind, count in plan:
            loop = loops[kind]
            claims = []
            barrier.wait(timeout=300)
            started = time.perf_counter()
            for i in range(count):
                claims.append(loop(i))
            blocks.append({"kind": kind, "started": started, "ended": time.perf_counter(), "units": 3 * count,
                           "claims": claims})
        raw.close()
        db.close()
        results.put({"worker_id": worker_id, "blocks": blocks, "sent": sorted(capture_sent.sent),
                     "raw_sql": sorted(entry[0] for entry in sql.values())})
    except BaseException:
        import traceback

        results.put({"error": traceback.format_exc()})


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))]


def block_plan(rounds: int, per_proc: int) -> list[tuple[str, int]]:
    """L R, R L, L R, …: each side first as often as second, so drift hits both alike."""
    plan = []
    for r in range(rounds):
        order = ("library", "raw") if r % 2 == 0 else ("raw", "library")
        plan.extend((kind, per_proc) for kind in order)
    return plan


def bench_throughput(url: str, procs: int, loops: int, rounds: int) -> dict:
    """Part 1 for ``procs`` processes, on the RUNNING experiment of ``url`` (made on first use)."""
    from sqlalchemy import text

    from rapidfire_state import StateDB

    per_proc = max(1, loops // procs)
    plan = block_plan(rounds, per_proc)
    db = StateDB(url)
    try:
        running = db.list_experiments(statuses=["RUNNING"])
        if running:
            e = running[0].experiment_id
        else:
            experiment = db.create_experiment("bench", "/tmp/rf-bench-pg")
            e = db.transition_experiment(experiment.experiment_id, "RUNNING").experiment_id
        base = 100 * procs  # worker ids of their own for each process count
        runs: dict[int, list[int]] = {}
        for p in range(base, base + procs):
            runs[p] = []
            for _ in range(RUNS_PER_PROC):
                run = db.create_run(e, {"proc": p})
                db.transition_run(run.run_id, "ONGOING")
                runs[p].append(run.run_id)
            add_tasks(db, e, p, 2 * WARM_LOOPS + per_proc * len(plan))
        analyze(db)
        outcomes = run_children(
            throughput_child, [(url, p, e, runs[p], plan, p == base) for p in range(base, base + procs)]
        )
        # every unit left its history: one claim and one finish row per claimed task
        with db.engine.connect() as connection:
            counts = dict(connection.execute(text(
                "SELECT h.to_status, COUNT(*) FROM state_transitions h JOIN worker_tasks t "
                "ON h.entity = 'worker_task' AND h.entity_id = t.task_id WHERE t.worker_id BETWEEN :lo AND :hi "
                "AND h.from_status IS NOT NULL GROUP BY h.to_status"), {"lo": base, "hi": base + procs - 1}).all())
            done = connection.execute(text(
                "SELECT COUNT(*) FROM worker_tasks WHERE worker_id BETWEEN :lo AND :hi AND status = 'COMPLETED'"),
                {"lo": base, "hi": base + procs - 1},
            ).scalar_one()
    finally:
        db.close()
    expected = procs * (2 * WARM_LOOPS + per_proc * len(plan))
    if done != expected or counts.get("IN_PROGRESS") != expected or counts.get("COMPLETED") != expected:
        raise SystemExit(f"history check failed: {done} tasks done, history {counts}, expected {expected} each")
    per_kind: dict[str, list[float]] = {"library": [], "raw": []}
    claims: dict[str, list[float]] = {"library": [], "raw": []}
    for b in range(len(plan)):
        blocks = [o["blocks"][b] for o in outcomes]
        kind = blocks[0]["kind"]
        span = max(x["ended"] for x in blocks) - min(x["started"] for x in blocks)
        per_kind[kind].append(sum(x["units"] for x in blocks) / span)
        claims[kind].extend(c for x in blocks for c in x["claims"])
    captured = next(o for o in outcomes if o["sent"])
    missing = sorted(set(captured["raw_sql"]) - set(captured["sent"]))
    extra = sorted(set(captured["sent"]) - set(captured["raw_sql"]))
    if missing:
        raise SystemExit("the raw side runs SQL the library did not send:\n" + "\n".join(missing))
    library = statistics.median(per_kind["library"])
    raw = statistics.median(per_kind["raw"])
    return {
        "procs": procs, "loops_per_proc_per_block": per_proc,
        "units_per_s_library": library, "units_per_s_raw": raw, "ratio_vs_raw_pg": library / raw,
        "blocks": per_kind,
        "claim_p50_ms_library": percentile(claims["library"], 50) * 1000,
        "claim_p99_ms_library": percentile(claims["library"], 99) * 1000,
        "claim_p50_ms_raw": percentile(claims["raw"], 50) * 1000,
        "claim_p99_ms_raw": percentile(claims["raw"], 99) * 1000,
        "extra_statements": extra,
    }


# --- part 2: the claim with a long history ------------------------------------------------------------


def fill_history(db, experiment_id: int, finished: int) -> None:
    """``finished`` COMPLETED worker tasks (no history rows: the claim never reads them)."""
    from sqlalchemy import text

    with db.engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO worker_tasks (experiment_id, worker_id, chunk_id, task_type, status, started_at, ended_at) "
            "SELECT :e, g % :workers, g, 'TRAIN_VAL', 'COMPLETED', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP "
            "FROM generate_series(1, :n) AS g"
        ), {"e": experiment_id, "workers": FINISHED_WORKERS, "n": finished})


def claim_plan_index(db, experiment_id: int) -> str:
    """The indexes the claim's plan scans worker_tasks with (EXPLAIN, not executed)."""
    from rapidfire_state.db.store.status_change import WORKER_TASK, claim_statement

    compiled = claim_statement(WORKER_TASK, ("experiment_id", "worker_id")).compile(dialect=db.engine.dialect)
    params = {**{k: b.effective_value for k, b in compiled.binds.items() if not b.required},
              "rf_claim_experiment_id": experiment_id, "rf_claim_worker_id": 0, "rf_new_claim_token": "0" * 32,
              "rf_claim_pid": 1, "rf_claim_host": "bench", "rf_claim_started": 0.0,
              "rf_claim_identity": None}
    with db.engine.connect() as connection:
        cursor = connection.connection.driver_connection.cursor()
        cursor.execute(f"EXPLAIN (FORMAT JSON) {compiled.string}", params)
        (document,) = cursor.fetchone()[0]
        connection.rollback()

    found = []

    def walk(node: dict) -> None:
        if node.get("Relation Name") == "worker_tasks":
            found.append(f"{node['Node Type']} {node.get('Index Name', '')}".strip())
        for child in node.get("Plans", ()):
            walk(child)

    walk(document["Plan"])
    return ", ".join(found)


def bench_history(admin, url: str, finished: int, blocks: int, per_block: int) -> dict:
    from rapidfire_state import StateDB

    urls = {}
    databases = {}
    experiments = {}
    fill_seconds = 0.0
    try:
        for label, history in (("empty", 0), ("history", finished)):
            urls[label] = create_database(admin, url, label)
            db = databases[label] = StateDB(urls[label])
            experiment = db.create_experiment("history", "/tmp/rf-bench-pg")
            e = experiments[label] = db.transition_experiment(experiment.experiment_id, "RUNNING").experiment_id
            started = time.perf_counter()
            if history:
                fill_history(db, e, history)
            add_tasks(db, e, 0, blocks * per_block + 10)  # the queue, after the history
            analyze(db)
            if history:
                fill_seconds = time.perf_counter() - started
        for label, db in databases.items():  # warm up (compile caches, prepared statements)
            for _ in range(5):
                task = db.claim_worker_task(0, experiment_id=experiments[label])
                db.finish_worker_task(task.task_id, claim_token=task.claim_token)
        timings: dict[str, list[float]] = {"empty": [], "history": []}
        for _ in range(blocks):
            for label, db in databases.items():
                for _ in range(per_block):
                    started = time.perf_counter()
                    task = db.claim_worker_task(0, experiment_id=experiments[label])
                    timings[label].append(time.perf_counter() - started)
                    db.finish_worker_task(task.task_id, claim_token=task.claim_token)
        plans = {label: claim_plan_index(db, experiments[label]) for label, db in databases.items()}
    finally:
        for db in databases.values():
            db.close()
        for u in urls.values():
            drop_database(admin, u)
    empty = statistics.median(timings["empty"])
    history = statistics.median(timings["history"])
    return {
        "finished_tasks": finished, "claims_per_side": len(timings["empty"]),
        "claim_ms_empty": empty * 1000, "claim_ms_1m_finished": history * 1000,
        "claim_ms_1m_finished_vs_empty": history / empty,
        "claim_p99_ms_empty": percentile(timings["empty"], 99) * 1000,
        "claim_p99_ms_1m_finished": percentile(timings["history"], 99) * 1000,
        "fill_seconds": fill_seconds, "plans": plans,
    }


# --- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("RF_TEST_PG_URL") or DEFAULT_URL,
                        help="the PostgreSQL server (its database is only used to create and drop the benchmark's)")
    parser.add_argument("--loops", type=int, default=None, help="claim→finish→transition loops per block, over all processes")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of one library and one raw block each")
    parser.add_argument("--history", type=int, default=None, help="finished tasks of part 2 (default 1,000,000)")
    parser.add_argument("--procs", type=int, nargs="+", default=list(PROCESS_COUNTS), help="process counts (default 2 4 8)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke test")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    args = parser.parse_args(argv)
    loops = args.loops or (240 if args.quick else 900)
    rounds = args.rounds or (1 if args.quick else 3)
    finished = args.history if args.history is not None else (200_000 if args.quick else 1_000_000)
    blocks, per_block = (4, 60) if args.quick else (10, 60)

    os.environ.pop("RF_DB_URL", None)
    import tempfile

    home = tempfile.TemporaryDirectory(prefix="rf_bench_pg_")
    os.environ["RF_HOME"] = home.name  # payload key and defaults stay in the sandbox
    admin = admin_engine(args.url)
    with admin.connect() as connection:
        server = connection.exec_driver_sql("SHOW server_version").scalar()
    began = time.perf_counter()
    results = []
    url = create_database(admin, args.url, "tput")
    try:
        print(f"PostgreSQL {server}; {loops} loops (claim, finish, run transition: 3 write units) per block "
              f"over N processes, {rounds} library + {rounds} raw blocks, alternated")
        print(f"{'N':>3} {'library u/s':>12} {'raw u/s':>9} {'ratio':>6}  {'claim p50/p99 ms lib':>21}  {'raw':>11}")
        for procs in args.procs:
            figures = bench_throughput(url, procs, loops, rounds)
            results.append(figures)
            print(f"{procs:>3} {figures['units_per_s_library']:>12.0f} {figures['units_per_s_raw']:>9.0f} "
                  f"{figures['ratio_vs_raw_pg']:>6.2f}  {figures['claim_p50_ms_library']:>10.2f} / "
                  f"{figures['claim_p99_ms_library']:<8.2f}  {figures['claim_p50_ms_raw']:.2f} / "
                  f"{figures['claim_p99_ms_raw']:.2f}   blocks lib "
                  + ", ".join(f"{x:.0f}" for x in figures["blocks"]["library"])
                  + "; raw " + ", ".join(f"{x:.0f}" for x in figures["blocks"]["raw"]))
    finally:
        drop_database(admin, url)
    extra = sorted({s for r in results for s in r["extra_statements"]})
    if extra:
        print("  statements the library sends beyond the raw side's: " + "; ".join(" ".join(s.split()) for s in extra))
    at_4 = next((r["ratio_vs_raw_pg"] for r in results if r["procs"] == 4), None)
    if at_4 is not None:
        print(f"  ratio_vs_raw_pg at N = 4: {at_4:.2f} (target >= {TARGETS['ratio_vs_raw_pg_at_4']}: "
              f"{'met' if at_4 >= TARGETS['ratio_vs_raw_pg_at_4'] else 'MISSED'})")
    history = bench_history(admin, args.url, finished, blocks, per_block)
    ratio = history["claim_ms_1m_finished_vs_empty"]
    print(f"claim with {finished:,} finished tasks (filled + ANALYZE in {history['fill_seconds']:.1f} s): "
          f"median {history['claim_ms_1m_finished']:.3f} ms vs {history['claim_ms_empty']:.3f} ms on an empty history "
          f"({history['claims_per_side']} claims each; p99 {history['claim_p99_ms_1m_finished']:.2f} vs "
          f"{history['claim_p99_ms_empty']:.2f} ms)")
    print(f"  plan: {history['plans']['history']}")
    print(f"  claim_ms_1m_finished_vs_empty = {ratio:.2f} (target <= {TARGETS['claim_ms_1m_finished_vs_empty']}: "
          f"{'met' if ratio <= TARGETS['claim_ms_1m_finished_vs_empty'] else 'MISSED'})")
    admin.dispose()
    elapsed = time.perf_counter() - began
    print(f"took {elapsed:.0f} s")
    if args.json:
        print(json.dumps({
            "server_version": server,
            "per_procs": {str(r["procs"]): {
                "units_per_s_library": round(r["units_per_s_library"], 1),
                "units_per_s_raw": round(r["units_per_s_raw"], 1),
                "ratio_vs_raw_pg": round(r["ratio_vs_raw_pg"], 3),
                "claim_p50_ms": round(r["claim_p50_ms_library"], 3),
                "claim_p99_ms": round(r["claim_p99_ms_library"], 3),
                "claim_p50_ms_raw": round(r["claim_p50_ms_raw"], 3),
                "claim_p99_ms_raw": round(r["claim_p99_ms_raw"], 3),
            } for r in results},
            "ratio_vs_raw_pg_at_4": None if at_4 is None else round(at_4, 3),
            "extra_statements": extra,
            "claim_ms_empty": round(history["claim_ms_empty"], 4),
            "claim_ms_1m_finished": round(history["claim_ms_1m_finished"], 4),
            "claim_ms_1m_finished_vs_empty": round(ratio, 3),
            "finished_tasks": finished,
            "loops_per_block": loops, "rounds": rounds, "quick": args.quick,
            "seconds": round(elapsed, 1),
            "targets": TARGETS,
        }))
    home.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
