#!/usr/bin/env python
"""Metric logging through MLflowManager's outbox against MLflow's own client.

In one run, each part in a temporary directory (its own state database, its
own MLflow store):

1. ``embedded`` (``sqlite:///`` store): ``--points`` (10,000) ``log_metric``
   calls through :class:`MLflowManager` (each timed on the caller's side, the
   background flusher running as in training), then ``flush`` until nothing is
   pending.  Baseline: :class:`mlflow.tracking.MlflowClient` ``log_metric``,
   one call per point, on ``--baseline-embedded`` (200) points of another run
   of the same store, scaled to ``--points``.
   ``speedup_embedded`` = baseline seconds per point × points / (log + flush seconds).
2. ``server``: the same against a real ``mlflow server --workers 1`` on a free
   port of 127.0.0.1 (SQLite backend); baseline on ``--baseline-server`` (100)
   points.  ``speedup_server`` likewise.
3. ``server down``: the server's process tree is SIGKILLed, then
   ``--down-points`` (2000) points are logged; ``max_stall_ms_server_down`` is the
   longest of those calls.  The server is started again on the same port and the
   backlog flushed; every point of parts 2 and 3 is counted in MLflow
   (``delivered_ok``).

Targets: ``speedup_embedded >= 20``, ``speedup_server >= 100``,
``log_metric_us <= 200`` (median, embedded), ``max_stall_ms_server_down <= 20``.
``--profile`` prints a cProfile of the embedded logging loop and the flusher
thread's share.  ``--json`` prints one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

TARGETS = {
    "speedup_embedded": 20.0,
    "speedup_server": 100.0,
    "log_metric_us": 200.0,
    "max_stall_ms_server_down": 20.0,
}
#: targets that are upper bounds (the others are lower bounds)
_AT_MOST = {"log_metric_us", "max_stall_ms_server_down"}


# --- a server of our own (the bench does not import the tests' helper) ----------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Server:
    """``mlflow server --workers 1`` in ``directory``; kill() and start() keep port and backend."""

    def __init__(self, directory: Path):
        self.cli = Path(sys.executable).with_name("mlflow")
        if not self.cli.exists():
            raise SystemExit(f"the mlflow command is not installed next to {sys.executable}")
        self.directory = directory
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: Optional[subprocess.Popen] = None
        self.start_seconds: list[float] = []

    def start(self, timeout: float = 90.0) -> None:
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no huey dir in /dev/shm
        log = (self.directory / "server.log").open("a")
        started = time.monotonic()
        self.process = subprocess.Popen(
            [str(self.cli), "server", "--workers", "1", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.directory / 'server.db'}",
             "--artifacts-destination", str(self.directory / "server-artifacts")],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.directory,
        )
        log.close()
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"mlflow server exited early:\n{self._tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - started > timeout:
                self.kill()
                raise SystemExit(f"mlflow server not healthy within {timeout:g} s:\n{self._tail()}")
            time.sleep(0.25)
        self.start_seconds.append(time.monotonic() - started)

    def kill(self) -> None:
        """SIGKILL the whole tree (the CLI and its uvicorn/gunicorn children) and wait for the port to close."""
        import psutil

        if self.process is None:
            return
        try:
            root = psutil.Process(self.process.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            tree = []
        for proc in tree:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        psutil.wait_procs(tree, timeout=10)
        self.process.wait(10)
        self.process = None
        deadline = time.monotonic() + 15
        while _accepts(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _tail(self) -> str:
        return (self.directory / "server.log").read_text(errors="replace")[-3000:]


# --- measuring ---------------------------------------------------------------------------------


class Baseline:
    """MLflow's own client, one ``log_metric`` call per point, timed in rounds.

    The rounds are taken before and after the outbox part, so a change of the
    machine's load during the run weighs on both sides alike.
    """

    def __init__(self, uri: str, experiment_id: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = self.client.create_run(experiment_id).info.run_id
        self.client.log_metric(self.run_id, "warmup", 0.0, step=0)  # opens connections, caches the store
        self.points = 0
        self.seconds = 0.0

    def measure(self, points: int) -> None:
        log_metric = self.client.log_metric
        started = time.perf_counter()
        for step in range(self.points, self.points + points):
            log_metric(self.run_id, "loss", 1.0 / (step + 1), step=step)
        self.seconds += time.perf_counter() - started
        self.points += points

    def per_point(self) -> float:
        got = len(self.client.get_metric_history(self.run_id, "loss"))
        if got != self.points:
            raise SystemExit(f"baseline check failed: {got} points in MLflow, {self.points} logged")
        return self.seconds / self.points


class GCPauses:
    """Full (generation 2) garbage collections while it is on: they stop every thread."""

    def __init__(self) -> None:
        import gc

        self._gc = gc
        self._started: dict[int, float] = {}
        self.pauses: list[float] = []

    def _callback(self, phase: str, info: dict) -> None:
        import threading

        me = threading.get_ident()
        if phase == "start":
            self._started[me] = time.perf_counter()
        elif me in self._started:
            began = self._started.pop(me)
            if info.get("generation") == 2:
                self.pauses.append(time.perf_counter() - began)

    def __enter__(self) -> "GCPauses":
        self._gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._gc.callbacks.remove(self._callback)


def _log(manager: Any, run_id: str, points: int, first_step: int = 0, profile: Any = None) -> tuple[float, list[float]]:
    """Log ``points`` values; the wall time and each call's caller-side seconds."""
    durations = []
    clock = time.perf_counter
    if profile is not None:
        profile.enable()
    started = clock()
    for step in range(first_step, first_step + points):
        before = clock()
        manager.log_metric(run_id, "loss", 1.0 / (step + 1), step=step)
        durations.append(clock() - before)
    elapsed = clock() - started
    if profile is not None:
        profile.disable()
    return elapsed, durations


def _summary(durations: list[float]) -> dict[str, float]:
    ordered = sorted(durations)
    return {
        "median_us": statistics.median(ordered) * 1e6,
        "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6,
        "max_ms": ordered[-1] * 1e3,
    }


def _outbox(manager: Any, uri: str, run_id: str, points: int, profile: Any = None) -> dict[str, Any]:
    """Log ``points`` through the outbox, flush, and check MLflow has each point once."""
    from mlflow.tracking import MlflowClient

    log_seconds, durations = _log(manager, run_id, points, profile=profile)
    delivered_while_logging = manager.flusher.stats.delivered
    started = time.perf_counter()
    manager.flush(timeout=300)
    flush_seconds = time.perf_counter() - started
    if manager.pending():
        raise SystemExit(f"{manager.pending()} rows still pending after flush(300): {manager.flusher.stats.last_error}")
    got = len(MlflowClient(tracking_uri=uri).get_metric_history(run_id, "loss"))
    if got != points:
        raise SystemExit(f"outbox check failed: {got} points in MLflow, {points} logged")
    return {"log_s": log_seconds, "flush_s": flush_seconds, "delivered_while_logging": delivered_while_logging,
            "batches": manager.flusher.stats.batches, **_summary(durations)}


def _new_manager(tmp: Path, uri: str, name: str) -> Any:
    from rapidfire_state import StateDB
    from rapidfire_state.metric_manager import MLflowManager

    db = StateDB(f"sqlite:///{tmp / f'state-{name}.db'}")
    return MLflowManager(uri, db=db)


def _close(manager: Any) -> None:
    manager.close(timeout=5)
    manager.db.close()


def bench_embedded(tmp: Path, points: int, baseline_points: int, profile: bool) -> dict[str, Any]:
    uri = f"sqlite:///{tmp / 'embedded' / 'mlflow.db'}"
    manager = _new_manager(tmp, uri, "embedded")
    experiment_id = manager.get_experiment("bench").experiment_id
    baseline = Baseline(uri, experiment_id)
    baseline.measure(baseline_points - baseline_points // 2)
    run_id = manager.create_run(experiment_id)
    manager.log_metric(run_id, "warmup", 0.0)  # starts the flusher thread (not counted)
    manager.flush(timeout=30)
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
    with GCPauses() as gc_pauses:
        result = _outbox(manager, uri, run_id, points, profiler)
    _close(manager)
    baseline.measure(baseline_points // 2)
    per_point = baseline.per_point()
    result["gc_full_pauses_ms"] = [round(p * 1e3, 1) for p in gc_pauses.pauses]
    result["baseline_us_per_point"] = per_point * 1e6
    result["speedup"] = per_point * points / (result["log_s"] + result["flush_s"])
    if profiler is not None:
        import io
        import pstats

        buffer = io.StringIO()
        pstats.Stats(profiler, stream=buffer).sort_stats("tottime").print_stats(15)
        result["profile"] = buffer.getvalue()
    return result


def bench_server(tmp: Path, points: int, baseline_points: int, down_points: int) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    directory = tmp / "server"
    directory.mkdir()
    server = Server(directory)
    server.start()
    manager = None
    try:
        manager = _new_manager(tmp, server.url, "server")
        experiment_id = manager.get_experiment("bench").experiment_id
        baseline = Baseline(server.url, experiment_id)
        baseline.measure(baseline_points - baseline_points // 2)
        run_id = manager.create_run(experiment_id)
        manager.log_metric(run_id, "warmup", 0.0)
        manager.flush(timeout=30)
        with GCPauses() as gc_pauses:
            result = _outbox(manager, server.url, run_id, points)
        baseline.measure(baseline_points // 2)
        per_point = baseline.per_point()
        result["gc_full_pauses_ms"] = [round(p * 1e3, 1) for p in gc_pauses.pauses]
        result["baseline_us_per_point"] = per_point * 1e6
        result["speedup"] = per_point * points / (result["log_s"] + result["flush_s"])

        down_run = manager.create_run(experiment_id)
        server.kill()
        with GCPauses() as gc_pauses:
            _, durations = _log(manager, down_run, down_points)
        down_gc = [round(p * 1e3, 1) for p in gc_pauses.pauses]
        down = _summary(durations)
        down["gc_full_pauses_ms"] = down_gc
        down["pending"] = manager.pending()
        down["flusher_errors"] = manager.flusher.stats.errors
        server.start()
        started = time.perf_counter()
        manager.flush(timeout=120)
        down["flush_after_restart_s"] = time.perf_counter() - started
        client = MlflowClient(tracking_uri=server.url)
        down["delivered_ok"] = (
            manager.pending() == 0
            and len(client.get_metric_history(down_run, "loss")) == down_points
            and len(client.get_metric_history(run_id, "loss")) == points
        )
        result["down"] = down
        result["server_start_s"] = server.start_seconds
        return result
    finally:
        if manager is not None:
            _close(manager)
        server.kill()


def _verdict(name: str, value: float) -> str:
    target = TARGETS[name]
    met = value <= target if name in _AT_MOST else value >= target
    return f"(target {'<=' if name in _AT_MOST else '>='} {target:g}: {'met' if met else 'MISSED'})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=10_000, help="points logged through the outbox (default 10000)")
    parser.add_argument("--baseline-embedded", type=int, default=200,
                        help="points of the embedded baseline, scaled per point (default 200)")
    parser.add_argument("--baseline-server", type=int, default=100,
                        help="points of the server baseline, scaled per point (default 100)")
    parser.add_argument("--down-points", type=int, default=2000, help="points logged with the server killed (default 2000)")
    parser.add_argument("--no-server", action="store_true", help="the embedded part only")
    parser.add_argument("--profile", action="store_true", help="cProfile the embedded logging loop")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="rf_bench_metrics_") as tmp_name:
        tmp = Path(tmp_name)
        os.environ["RF_HOME"] = str(tmp / "home")  # defaults stay in the sandbox
        os.environ.pop("RF_DB_URL", None)
        import mlflow

        print(f"MLflow {mlflow.__version__}, {args.points} points through MLflowManager, then flushed")
        embedded = bench_embedded(tmp, args.points, args.baseline_embedded, args.profile)
        print(f"embedded: MlflowClient.log_metric {embedded['baseline_us_per_point'] / 1e3:.2f} ms/point "
              f"(on {args.baseline_embedded}); outbox: log {embedded['log_s']:.3f} s + flush {embedded['flush_s']:.3f} s "
              f"({embedded['delivered_while_logging']} delivered while logging, {embedded['batches']} batches)")
        print(f"  log_metric median {embedded['median_us']:.0f} us, p99 {embedded['p99_us']:.0f} us, "
              f"max {embedded['max_ms']:.2f} ms  {_verdict('log_metric_us', embedded['median_us'])}")
        print(f"  full garbage collections meanwhile (they stop every thread): {embedded['gc_full_pauses_ms']} ms")
        print(f"  speedup_embedded = {embedded['speedup']:.1f}  {_verdict('speedup_embedded', embedded['speedup'])}")
        if "profile" in embedded:
            print(embedded["profile"])
        served = None
        if not args.no_server:
            served = bench_server(tmp, args.points, args.baseline_server, args.down_points)
            down = served["down"]
            print(f"server: MlflowClient.log_metric {served['baseline_us_per_point'] / 1e3:.2f} ms/point "
                  f"(on {args.baseline_server}); outbox: log {served['log_s']:.3f} s + flush {served['flush_s']:.3f} s "
                  f"({served['delivered_while_logging']} delivered while logging, {served['batches']} batches)")
            print(f"  log_metric median {served['median_us']:.0f} us, p99 {served['p99_us']:.0f} us, "
                  f"max {served['max_ms']:.2f} ms; full garbage collections {served['gc_full_pauses_ms']} ms")
            print(f"  speedup_server = {served['speedup']:.1f}  {_verdict('speedup_server', served['speedup'])}")
            print(f"server killed: {args.down_points} log_metric calls, median {down['median_us']:.0f} us, "
                  f"p99 {down['p99_us']:.0f} us, max {down['max_ms']:.2f} ms "
                  f"{_verdict('max_stall_ms_server_down', down['max_ms'])}; {down['pending']} pending; after the "
                  f"restart flushed in {down['flush_after_restart_s']:.2f} s, every point once: {down['delivered_ok']}")
            print(f"  (server starts took {', '.join(f'{s:.1f}' for s in served['server_start_s'])} s)")

    if args.json:
        report: dict[str, Any] = {
            "speedup_embedded": round(embedded["speedup"], 2),
            "log_metric_us": round(embedded["median_us"], 1),
            "log_metric_p99_us": round(embedded["p99_us"], 1),
            "log_metric_max_ms": round(embedded["max_ms"], 3),
            "baseline_us_per_point_embedded": round(embedded["baseline_us_per_point"], 1),
            "log_s_embedded": round(embedded["log_s"], 4),
            "gc_full_pauses_ms_embedded": embedded["gc_full_pauses_ms"],
            "flush_s_embedded": round(embedded["flush_s"], 4),
            "points": args.points,
            "baseline_points_embedded": args.baseline_embedded,
            "targets": TARGETS,
        }
        if served is not None:
            down = served["down"]
            report.update({
                "speedup_server": round(served["speedup"], 2),
                "log_metric_us_server": round(served["median_us"], 1),
                "log_metric_p99_us_server": round(served["p99_us"], 1),
                "log_metric_max_ms_server": round(served["max_ms"], 3),
                "baseline_us_per_point_server": round(served["baseline_us_per_point"], 1),
                "log_s_server": round(served["log_s"], 4),
                "gc_full_pauses_ms_server": served["gc_full_pauses_ms"],
                "gc_full_pauses_ms_server_down": down["gc_full_pauses_ms"],
                "flush_s_server": round(served["flush_s"], 4),
                "max_stall_ms_server_down": round(down["max_ms"], 3),
                "log_metric_us_server_down": round(down["median_us"], 1),
                "down_points": args.down_points,
                "flush_after_restart_s": round(down["flush_after_restart_s"], 3),
                "delivered_ok": down["delivered_ok"],
                "baseline_points_server": args.baseline_server,
            })
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
