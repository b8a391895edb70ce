#!/usr/bin/env python
"""Throughput and latency of state transitions on a SQLite WAL file.

In one run:

1. ``statedb``: ``--procs`` (4) spawned processes × ``--tx`` (2000) run transitions
   through ``StateDB.transition_run`` (each one compare-and-set UPDATE plus its
   ``state_transitions`` row, one ``BEGIN IMMEDIATE`` transaction), cycling
   ONGOING <-> STOPPED on the runs of a RUNNING experiment, each process on runs
   of its own.
2. ``raw``: the same SQL statements (``UPDATE runs SET previous_status = status,
   status = ? … WHERE run_id = ? AND status IN (…) RETURNING …`` and the
   ``INSERT INTO state_transitions``) through plain ``sqlite3`` with the same
   pragmas (WAL, ``synchronous=NORMAL``, ``busy_timeout``, foreign keys) and
   ``BEGIN IMMEDIATE``, same process count and work: the baseline.
   ``ratio_vs_raw`` = statedb / raw transactions per second (target >= 0.85).
3. ``claim``: ``--claimers`` (4) processes poll ``claim_worker_task`` at once,
   each for its own worker id (claim, finish, claim … as fast as they go, then
   some idle polls 2 ms apart): p50/p99 latency of one ``claim_worker_task``
   call, claims and idle polls together (``claim_p99_ms``, target <= 10 with
   4 pollers).
4. ``scale``: the cost of one transition with 100 runs in the table against
   100,000 runs (bulk-inserted with plain SQL, with their history rows), in
   alternating blocks: ``scale_ratio_100k_vs_100`` (target <= 1.3).

``--quick`` shrinks the counts; ``--rounds N`` alternates more throughput rounds
(the medians are compared), which steadies the ratio on a loaded machine.  ``--profile`` adds a cProfile of one process's
StateDB transitions.  ``--json`` prints one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from children import run_children  # scripts/bench/children.py, beside this script

TARGETS = {"ratio_vs_raw": 0.85, "claim_p99_ms": 10.0, "scale_ratio_100k_vs_100": 1.3}
#: the number of claim pollers the claim_p99_ms target is set for
CLAIM_TARGET_PROCS = 4
RUNS_PER_PROC = 10
BUSY_TIMEOUT_MS = 5000
NOW = "strftime('%Y-%m-%d %H:%M:%f000', 'now')"


# --- set-up --------------------------------------------------------------------------------


def make_database(path: str, procs: int, runs_per_proc: int) -> dict[int, list[int]]:
    """A migrated database with a RUNNING experiment and ONGOING runs; runs per process."""
    from rapidfire_state import StateDB

    db = StateDB(path)
    try:
        experiment = db.create_experiment("bench", str(Path(path).parent))
        db.transition_experiment(experiment.experiment_id, "RUNNING")
        runs: dict[int, list[int]] = {}
        for proc in range(procs):
            runs[proc] = []
            for _ in range(runs_per_proc):
                run = db.create_run(experiment.experiment_id, {"proc": proc})
                db.transition_run(run.run_id, "ONGOING")
                runs[proc].append(run.run_id)
        return runs
    finally:
        db.close()


def bulk_runs(path: str, count: int) -> None:
    """Add ``count`` runs (and their creation history rows) with plain SQL."""
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        experiment_id = connection.execute("SELECT experiment_id FROM experiments").fetchone()[0]
        first = connection.execute("SELECT COALESCE(MAX(run_id), 0) + 1 FROM runs").fetchone()[0]
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany(
            "INSERT INTO runs (run_id, experiment_id, status, source, completed_steps, total_steps, "
            "num_chunks_visited, num_epochs_completed, chunk_offset, required_workers, progress, "
            f"created_at, updated_at) VALUES (?, ?, 'NEW', 'USER', 0, 0, 0, 0, 0, 1, 0, {NOW}, {NOW})",
            ((run_id, experiment_id) for run_id in range(first, first + count)),
        )
        connection.executemany(
            "INSERT INTO state_transitions (entity, entity_id, from_status, to_status, at, pid, host, reason) "
            f"VALUES ('run', ?, NULL, 'NEW', {NOW}, 1, 'bench', 'created')",
            ((run_id,) for run_id in range(first, first + count)),
        )
        connection.execute("COMMIT")
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        connection.close()


# --- children ----------------------------------------------------------------------------------


def statedb_worker(path: str, run_ids: list[int], count: int, profile: bool, barrier, results) -> None:
    try:
        from rapidfire_state import StateDB

        db = StateDB(path)
        status = {run_id: "ONGOING" for run_id in run_ids}
        # warm up: compile and cache both statements (not counted)
        for run_id in run_ids[:2]:
            for target in ("STOPPED", "ONGOING"):
                db.transition_run(run_id, target)
        profiler = None
        if profile:
            import cProfile

            profiler = cProfile.Profile()
        barrier.wait()
        if profiler:
            profiler.enable()
        started = time.perf_counter()
        for i in range(count):
            run_id = run_ids[i % len(run_ids)]
            target = "STOPPED" if status[run_id] == "ONGOING" else "ONGOING"
            db.transition_run(run_id, target)
            status[run_id] = target
        elapsed = time.perf_counter() - started
        stats = None
        if profiler:
            profiler.disable()
            import io
            import pstats

            buffer = io.StringIO()
            pstats.Stats(profiler, stream=buffer).sort_stats("tottime").print_stats(18)
            stats = buffer.getvalue()
        db.close()
        results.put({"elapsed": elapsed, "started": started, "count": count, "profile": stats})
    except BaseException:
        import traceback

        results.put({"error": traceback.format_exc()})


RAW_UPDATE = {
    "STOPPED": (
        f"UPDATE runs SET status = ?, previous_status = runs.status, updated_at = {NOW} "
        "WHERE runs.run_id = ? AND runs.status IN (?, ?) RETURNING *"
    ),
    "ONGOING": (
        f"UPDATE runs SET status = ?, previous_status = runs.status, ended_by = NULL, "
        f"started_at = coalesce(runs.started_at, {NOW}), updated_at = {NOW} "
        "WHERE runs.run_id = ? AND runs.status IN (?, ?) AND (runs.status != 'STOPPED' OR runs.experiment_id IN "
        "(SELECT experiments.experiment_id FROM experiments WHERE experiments.status = 'RUNNING')) RETURNING *"
    ),
}
RAW_FROM = {"STOPPED": ("NEW", "ONGOING"), "ONGOING": ("NEW", "STOPPED")}
RAW_INSERT = (
    "INSERT INTO state_transitions (entity, entity_id, from_status, to_status, at, pid, host, reason) "
    f"VALUES ('run', ?, ?, ?, {NOW}, ?, ?, NULL)"
)


def raw_connect(path: str) -> sqlite3.Connection:
    connection = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
    connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = NORMAL")
    connection.execute("PRAGMA foreign_keys = ON")
    return connection


def raw_transition(connection: sqlite3.Connection, run_id: int, target: str, host: str) -> None:
    while True:
        try:
            connection.execute("BEGIN IMMEDIATE")
            break
        except sqlite3.OperationalError as exc:  # past the busy timeout: retry, as StateDB does
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
    try:
        row = connection.execute(RAW_UPDATE[target], (target, run_id, *RAW_FROM[target])).fetchone()
        if row is None:
            raise RuntimeError(f"run {run_id} could not move to {target}")
        connection.execute(RAW_INSERT, (run_id, row[3], target, os.getpid(), host))
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


def raw_worker(path: str, run_ids: list[int], count: int, barrier, results) -> None:
    try:
        connection = raw_connect(path)
        host = socket.gethostname()
        status = {run_id: "ONGOING" for run_id in run_ids}
        for run_id in run_ids[:2]:
            for target in ("STOPPED", "ONGOING"):
                raw_transition(connection, run_id, target, host)
        barrier.wait()
        started = time.perf_counter()
        for i in range(count):
            run_id = run_ids[i % len(run_ids)]
            target = "STOPPED" if status[run_id] == "ONGOING" else "ONGOING"
            raw_transition(connection, run_id, target, host)
            status[run_id] = target
        elapsed = time.perf_counter() - started
        connection.close()
        results.put({"elapsed": elapsed, "started": started, "count": count})
    except BaseException:
        import traceback

        results.put({"error": traceback.format_exc()})


def claim_worker(path: str, experiment_id: int, worker_id: int, idle_polls: int, barrier, results) -> None:
    try:
        from rapidfire_state import StateDB

        db = StateDB(path)
        db.claim_worker_task(worker_id + 1000, experiment_id=experiment_id)  # warm up (idle)
        latencies, idle_latencies = [], []
        barrier.wait()
        began = time.perf_counter()
        idle = 0
        while idle < idle_polls:
            started = time.perf_counter()
            task = db.claim_worker_task(worker_id, experiment_id=experiment_id)
            elapsed = time.perf_counter() - started
            if task is None:
                idle += 1
                idle_latencies.append(elapsed)
                time.sleep(0.002)
                continue
            latencies.append(elapsed)
            db.finish_worker_task(task.task_id)
        ended = time.perf_counter()
        db.close()
        results.put({"claims": latencies, "idle": idle_latencies, "began": began, "ended": ended})
    except BaseException:
        import traceback

        results.put({"error": traceback.format_exc()})


def throughput(outcomes: list[dict]) -> float:
    total = sum(o["count"] for o in outcomes)
    # perf_counter is system-wide (CLOCK_MONOTONIC) on Linux: comparable across processes
    start = min(o["started"] for o in outcomes)
    end = max(o["started"] + o["elapsed"] for o in outcomes)
    return total / (end - start)


# --- the parts ------------------------------------------------------------------------------------


def bench_throughput(tmp: Path, procs: int, count: int, rounds: int, profile: bool) -> dict:
    figures: dict[str, list[float]] = {"statedb": [], "raw": []}
    profile_text = None
    # alternate whole rounds so that background load hits both sides alike
    for round_index in range(rounds):
        for kind in ("statedb", "raw"):
            path = str(tmp / f"throughput_{kind}_{round_index}.db")
            runs = make_database(path, procs, RUNS_PER_PROC)
            if kind == "statedb":
                args = [(path, runs[p], count, profile and p == 0 and round_index == 0) for p in range(procs)]
                outcomes = run_children(statedb_worker, args)
                profile_text = profile_text or next((o["profile"] for o in outcomes if o.get("profile")), None)
            else:
                outcomes = run_children(raw_worker, [(path, runs[p], count) for p in range(procs)])
            figures[kind].append(throughput(outcomes))
            check_history(path, procs * (count + 4), runs)
    statedb = statistics.median(figures["statedb"])
    raw = statistics.median(figures["raw"])
    return {"tx_per_s_statedb": statedb, "tx_per_s_raw": raw, "ratio_vs_raw": statedb / raw,
            "rounds": figures, "profile": profile_text}


def check_history(path: str, expected_changes: int, runs: dict[int, list[int]]) -> None:
    """Every transition of the benchmark left exactly one history row."""
    connection = sqlite3.connect(path)
    try:
        run_ids = [r for ids in runs.values() for r in ids]
        placeholders = ",".join("?" * len(run_ids))
        found = connection.execute(
            "SELECT COUNT(*) FROM state_transitions WHERE entity = 'run' AND from_status IN ('ONGOING', 'STOPPED') "
            f"AND entity_id IN ({placeholders})", run_ids,
        ).fetchone()[0]
    finally:
        connection.close()
    if found != expected_changes:
        raise SystemExit(f"history check failed: {found} rows for {expected_changes} transitions")


def bench_claims(tmp: Path, procs: int, tasks_per_worker: int, idle_polls: int) -> dict:
    from rapidfire_state import StateDB

    path = str(tmp / "claims.db")
    db = StateDB(path)
    experiment = db.create_experiment("claims", str(tmp))
    db.transition_experiment(experiment.experiment_id, "RUNNING")
    db.close()
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("BEGIN IMMEDIATE")
    for worker_id in range(procs):
        for chunk in range(tasks_per_worker):
            task_id = connection.execute(
                "INSERT INTO worker_tasks (experiment_id, worker_id, chunk_id, task_type, status, created_at) "
                f"VALUES (?, ?, ?, 'TRAIN_VAL', 'SCHEDULED', {NOW}) RETURNING task_id",
                (experiment.experiment_id, worker_id, chunk),
            ).fetchone()[0]
            connection.execute(
                "INSERT INTO state_transitions (entity, entity_id, from_status, to_status, at, pid, host, reason) "
                f"VALUES ('worker_task', ?, NULL, 'SCHEDULED', {NOW}, 1, 'bench', 'created')", (task_id,),
            )
    connection.execute("COMMIT")
    connection.close()
    outcomes = run_children(claim_worker, [(path, experiment.experiment_id, w, idle_polls) for w in range(procs)])
    claims = sorted(x for o in outcomes for x in o["claims"])
    # every poller claimed its own tasks, and all of them were polling at one moment
    # (perf_counter is system-wide on Linux): the p99 is that of `procs` pollers at once
    pollers = sum(1 for o in outcomes if o["claims"])
    if max(o["began"] for o in outcomes) >= min(o["ended"] for o in outcomes):
        raise SystemExit("claim check failed: the pollers did not overlap in time")
    idle = sorted(x for o in outcomes for x in o["idle"])
    both = sorted(claims + idle)
    if len(claims) != procs * tasks_per_worker:
        raise SystemExit(f"claim check failed: {len(claims)} claims for {procs * tasks_per_worker} tasks")
    return {
        "claim_p50_ms": percentile(both, 50) * 1000,
        "claim_p99_ms": percentile(both, 99) * 1000,
        "claim_hit_p50_ms": percentile(claims, 50) * 1000,
        "claim_idle_p50_ms": percentile(idle, 50) * 1000 if idle else None,
        "claims": len(claims),
        "idle_polls": len(idle),
        "pollers": pollers,
    }


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    index = min(len(values) - 1, max(0, round(pct / 100 * (len(values) - 1))))
    return values[index]


def bench_scale(tmp: Path, transitions: int, blocks: int) -> dict:
    from rapidfire_state import StateDB

    paths = {}
    for size in (100, 100_000):
        path = str(tmp / f"scale_{size}.db")
        runs = make_database(path, 1, 50)
        bulk_runs(path, size - 50)
        paths[size] = (path, runs[0])
    databases = {size: StateDB(path) for size, (path, _) in paths.items()}
    status = {size: {r: "ONGOING" for r in ids} for size, (_, ids) in paths.items()}
    per_tx: dict[int, list[float]] = {100: [], 100_000: []}
    try:
        for size, db in databases.items():  # warm up both
            for run_id in paths[size][1][:2]:
                for target in ("STOPPED", "ONGOING"):
                    db.transition_run(run_id, target)
        per_block = max(1, transitions // blocks)
        for _ in range(blocks):
            for size, db in databases.items():
                ids = paths[size][1]
                started = time.perf_counter()
                for i in range(per_block):
                    run_id = ids[i % len(ids)]
                    target = "STOPPED" if status[size][run_id] == "ONGOING" else "ONGOING"
                    db.transition_run(run_id, target)
                    status[size][run_id] = target
                per_tx[size].append((time.perf_counter() - started) / per_block)
        counts = {size: db.engine.connect().exec_driver_sql("SELECT COUNT(*) FROM runs").scalar() for size, db in databases.items()}
    finally:
        for db in databases.values():
            db.close()
    small = statistics.median(per_tx[100])
    large = statistics.median(per_tx[100_000])
    return {"transition_ms_100": small * 1000, "transition_ms_100k": large * 1000,
            "scale_ratio_100k_vs_100": large / small, "run_counts": counts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, default=4, help="processes of the throughput part (default 4)")
    parser.add_argument("--claimers", type=int, default=CLAIM_TARGET_PROCS,
                        help=f"processes polling claim_worker_task (default {CLAIM_TARGET_PROCS}, as the target)")
    parser.add_argument("--tx", type=int, default=2000, help="transitions per process (default 2000)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="alternated statedb/raw rounds of the throughput part, median taken (default 2; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smaller counts, for a smoke test")
    parser.add_argument("--profile", action="store_true", help="cProfile one process's StateDB transitions")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    args = parser.parse_args(argv)
    count = 300 if args.quick else args.tx
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 2)
    tasks_per_worker = 50 if args.quick else 250
    idle_polls = 10 if args.quick else 25
    scale_tx = 400 if args.quick else 3000

    with tempfile.TemporaryDirectory(prefix="rf_bench_tx_") as tmp_name:
        tmp = Path(tmp_name)
        os.environ["RF_HOME"] = str(tmp / "home")  # payload key and defaults stay in the sandbox
        os.environ.pop("RF_DB_URL", None)
        print(f"SQLite {sqlite3.sqlite_version}, {args.procs} processes x {count} transitions, {rounds} round(s) each")
        tput = bench_throughput(tmp, args.procs, count, rounds, args.profile)
        print(f"  StateDB.transition_run      {tput['tx_per_s_statedb']:8.0f} tx/s   rounds: "
              + ", ".join(f"{x:.0f}" for x in tput["rounds"]["statedb"]))
        print(f"  plain sqlite3, same SQL     {tput['tx_per_s_raw']:8.0f} tx/s   rounds: "
              + ", ".join(f"{x:.0f}" for x in tput["rounds"]["raw"]))
        print(f"  ratio_vs_raw = {tput['ratio_vs_raw']:.2f}  (target >= {TARGETS['ratio_vs_raw']}: "
              f"{'met' if tput['ratio_vs_raw'] >= TARGETS['ratio_vs_raw'] else 'MISSED'})")
        if tput["profile"]:
            print("  cProfile of one StateDB process (by own time):")
            print("\n".join("    " + line for line in tput["profile"].splitlines() if line.strip()))
        claims = bench_claims(tmp, args.claimers, tasks_per_worker, idle_polls)
        if claims["pollers"] != args.claimers:
            raise SystemExit(f"claim check failed: {claims['pollers']} processes polled, {args.claimers} were started")
        print(f"claim_worker_task, {claims['pollers']} workers polling ({claims['claims']} claims, {claims['idle_polls']} idle polls):"
              f" p50 {claims['claim_p50_ms']:.2f} ms, p99 {claims['claim_p99_ms']:.2f} ms"
              f" (claims only p50 {claims['claim_hit_p50_ms']:.2f} ms)")
        if args.claimers == CLAIM_TARGET_PROCS:
            print(f"  claim_p99_ms = {claims['claim_p99_ms']:.2f}  (target <= {TARGETS['claim_p99_ms']:g} with "
                  f"{CLAIM_TARGET_PROCS} pollers: {'met' if claims['claim_p99_ms'] <= TARGETS['claim_p99_ms'] else 'MISSED'})")
        else:
            print(f"  claim_p99_ms target (<= {TARGETS['claim_p99_ms']:g}) is for {CLAIM_TARGET_PROCS} pollers; "
                  f"not judged with {args.claimers}")
        scale = bench_scale(tmp, scale_tx, 10)
        print(f"one transition: {scale['transition_ms_100']:.3f} ms with 100 runs, "
              f"{scale['transition_ms_100k']:.3f} ms with 100,000 runs: "
              f"scale_ratio_100k_vs_100 = {scale['scale_ratio_100k_vs_100']:.2f} (target <= "
              f"{TARGETS['scale_ratio_100k_vs_100']}: "
              f"{'met' if scale['scale_ratio_100k_vs_100'] <= TARGETS['scale_ratio_100k_vs_100'] else 'MISSED'})")

    if args.json:
        print(json.dumps({
            "tx_per_s_statedb": round(tput["tx_per_s_statedb"], 1),
            "tx_per_s_raw": round(tput["tx_per_s_raw"], 1),
            "ratio_vs_raw": round(tput["ratio_vs_raw"], 3),
            "claim_p50_ms": round(claims["claim_p50_ms"], 3),
            "claim_p99_ms": round(claims["claim_p99_ms"], 3),
            "claim_procs": args.claimers,
            "scale_ratio_100k_vs_100": round(scale["scale_ratio_100k_vs_100"], 3),
            "transition_ms_100": round(scale["transition_ms_100"], 4),
            "transition_ms_100k": round(scale["transition_ms_100k"], 4),
            "procs": args.procs,
            "tx_per_proc": count,
            "quick": args.quick,
            "targets": TARGETS,
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
