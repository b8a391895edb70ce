#!/usr/bin/env python
"""Cost of ``rapidfire-state status`` on a large database, against importing sqlalchemy.

The database (SQLite) holds one RUNNING experiment with 100,000 runs (``--runs``)
in mixed statuses, 1,000,000 history rows (``--history``), a worker task per
run, 4 workers, shared-memory rows and a metric outbox with pending rows; the
bulk is inserted with plain SQL (as ``transitions.py``'s ``bulk_runs``).

In one run, alternating, ``--n`` (default 5) fresh processes each of

* ``status``: the ``rapidfire-state`` console script, ``--url PATH status``;
* ``sqlalchemy``: ``python -c "import sqlalchemy"`` (the baseline).

Reports the medians and ``status_vs_sqlalchemy_import`` = status / sqlalchemy
(target <= 2).  For reference, also the median of ``runs --limit 1000 --json``
and the time of the status queries inside one process.  ``--json`` prints one JSON object on
the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = 2.0
NOW = "strftime('%Y-%m-%d %H:%M:%f000', 'now')"
STATUSES = ("COMPLETED", "ONGOING", "NEW", "STOPPED", "FAILED", "KILLED")


def console_script() -> list[str]:
    """The installed ``rapidfire-state`` script beside this interpreter (else the same entry point via -c)."""
    script = Path(sys.executable).parent / "rapidfire-state"
    if script.exists():
        return [str(script)]
    found = shutil.which("rapidfire-state")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from rapidfire_state.cli import main; sys.exit(main())"]


def make_database(path: str, runs: int, history: int) -> None:
    from rapidfire_state import StateDB

    db = StateDB(path)
    experiment = db.create_experiment("bench", str(Path(path).parent / "exps"), owner_pid=os.getpid(),
                                      owner_host=socket.gethostname())
    db.transition_experiment(experiment.experiment_id, "RUNNING")
    eid = experiment.experiment_id
    for worker_id in range(4):
        db.register_worker(eid, worker_id, os.getpid())
    db.close()

    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany(
            "INSERT INTO runs (run_id, experiment_id, status, source, ended_by, completed_steps, total_steps, "
            "num_chunks_visited, num_epochs_completed, chunk_offset, required_workers, progress, flattened_config, "
            f"created_at, updated_at) VALUES (?, ?, ?, 'USER', ?, ?, 100, ?, 0, 0, 1, ?, ?, {NOW}, {NOW})",
            (
                (run_id, eid, status, status if status in ("COMPLETED", "FAILED", "KILLED") else None,
                 100 if status == "COMPLETED" else run_id % 100, 4 if status == "COMPLETED" else run_id % 4,
                 1.0 if status == "COMPLETED" else (run_id % 100) / 100, json.dumps({"lr": run_id * 1e-6, "bs": 32}))
                for run_id in range(1, runs + 1)
                for status in (STATUSES[run_id % len(STATUSES)],)
            ),
        )
        connection.executemany(
            "INSERT INTO state_transitions (entity, entity_id, from_status, to_status, at, pid, host, reason) "
            f"VALUES ('run', ?, 'NEW', 'ONGOING', {NOW}, 1, 'bench', 'bench')",
            ((1 + i % runs,) for i in range(history)),
        )
        connection.executemany(
            "INSERT INTO worker_tasks (experiment_id, run_id, worker_id, chunk_id, task_type, status, created_at) "
            "VALUES (?, ?, ?, 0, 'TRAIN_VAL', ?, " + NOW + ")",
            ((eid, run_id, run_id % 4, "COMPLETED" if run_id > 8 else "SCHEDULED") for run_id in range(1, runs + 1)),
        )
        connection.executemany(
            "INSERT INTO shm_objects (key, experiment_id, run_id, object_type, location, num_bytes, tensor_count, "
            f"created_at, updated_at) VALUES (?, ?, ?, 'MODEL', 'SHM', 1048576, 10, {NOW}, {NOW})",
            ((f"{run_id}_model", eid, run_id) for run_id in range(1, 9)),
        )
        connection.executemany(
            "INSERT INTO metric_streams (stream_id, tracking_uri, metric_run_id, run_id, experiment_id, created_at) "
            f"VALUES (?, 'file:///bench', ?, ?, ?, {NOW})",
            ((run_id, f"m{run_id}", run_id, eid) for run_id in range(1, 1001)),
        )
        connection.executemany(
            "INSERT INTO metric_outbox (stream_id, kind, key, value, step, timestamp_ms, delivered_at, created_at) "
            f"VALUES (?, 'METRIC', 'train_loss', 0.5, ?, 1, CASE WHEN ? THEN {NOW} END, {NOW})",
            ((1 + i % 1000, i, i >= 2000) for i in range(100_000)),
        )
        connection.execute("COMMIT")
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        connection.close()


def timed(argv: list[str], env: dict) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"benchmark process failed ({' '.join(argv)}):\n{result.stderr}")
    return elapsed


def in_process_status_ms(path: str, repeat: int = 5) -> float:
    from rapidfire_state import StateDB
    from rapidfire_state.console import status_report

    db = StateDB(path, read_only=True)
    try:
        status_report(db)
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            status_report(db)
            times.append(time.perf_counter() - started)
    finally:
        db.close()
    return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5, help="processes of each kind (default 5)")
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--history", type=int, default=1_000_000)
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="rf_bench_cli_") as tmp:
        env = dict(os.environ, RF_HOME=str(Path(tmp) / "home"))
        env.pop("RF_DB_URL", None)
        os.environ["RF_HOME"] = env["RF_HOME"]
        path = str(Path(tmp) / "state.db")
        started = time.perf_counter()
        make_database(path, args.runs, args.history)
        built_s = time.perf_counter() - started
        size_mb = os.path.getsize(path) / 2**20
        script = console_script()
        commands = {
            "status": script + ["--url", path, "status"],
            "sqlalchemy": [sys.executable, "-c", "import sqlalchemy"],
            "runs_limit_1000_json": script + ["--url", path, "runs", "--limit", "1000", "--json"],
        }
        for command in commands.values():  # warm the page cache; not counted
            timed(command, env)
        times: dict[str, list[float]] = {kind: [] for kind in commands}
        for _ in range(args.n):
            for kind, command in commands.items():
                times[kind].append(timed(command, env))
        medians = {kind: statistics.median(values) for kind, values in times.items()}
        queries_ms = in_process_status_ms(path)
        ratio = medians["status"] / medians["sqlalchemy"]

    print(f"database: {args.runs:,} runs, {args.history:,} history rows, {args.runs:,} worker tasks, "
          f"100,000 outbox rows ({size_mb:.0f} MiB, built in {built_s:.1f} s)")
    print(f"fresh processes, {args.n} of each kind, alternating (medians; min..max)")
    labels = {"status": "rapidfire-state status", "sqlalchemy": "python -c 'import sqlalchemy'",
              "runs_limit_1000_json": "rapidfire-state runs --limit 1000 --json"}
    for kind, label in labels.items():
        values = times[kind]
        print(f"  {label:<42} {medians[kind] * 1000:8.1f} ms   ({min(values) * 1000:.1f}..{max(values) * 1000:.1f})")
    print(f"  status queries inside one process (median of 5): {queries_ms:.1f} ms")
    print(f"  status_vs_sqlalchemy_import = {ratio:.2f}  (target <= {TARGET}: {'met' if ratio <= TARGET else 'MISSED'})")
    if args.json:
        print(json.dumps({
            "runs": args.runs, "history": args.history,
            "status_ms": round(medians["status"] * 1000, 1), "sqlalchemy_import_ms": round(medians["sqlalchemy"] * 1000, 1),
            "runs_limit_1000_json_ms": round(medians["runs_limit_1000_json"] * 1000, 1),
            "status_queries_ms": round(queries_ms, 1), "status_vs_sqlalchemy_import": round(ratio, 3),
            "target": TARGET, "met": ratio <= TARGET,
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
