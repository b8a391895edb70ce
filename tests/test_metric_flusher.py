"""The metric outbox delivered to MLflow: exactly once, in order, and MLflow's run status in step.

Real MLflow stores (embedded SQLite in tmp_path), real processes and real
signals.  The server side (outages, a killed server) is in
``test_metric_outbox_server.py``.
"""

from __future__ import annotations

import json
import time
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rapidfire_state import StateDB, states
from rapidfire_state.constants import RunSource, RunStatus
from rapidfire_state.exceptions import ConfigError, InvalidTransitionError
from rapidfire_state.metric_flusher import BATCH_TAG, StoreTransport
from rapidfire_state.metric_manager import MetricInputError, MLflowManager, mlflow_status_for, sanitize_key

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def paths(tmp_path, db_url):
    """The state database (the outbox; each backend under test) and an embedded MLflow store."""
    return {"db": db_url, "mlflow": f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}", "dir": tmp_path}


@pytest.fixture
def manager(paths):
    made = MLflowManager(paths["mlflow"], db=paths["db"], background=False)
    yield made
    made.close(timeout=5)


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    points = MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)
    return sorted((int(m.step), float(m.value)) for m in points)


def _child(code: str, *, timeout: float = 120) -> subprocess.CompletedProcess:
    prelude = "import os, signal, sys, json\nfrom rapidfire_state.metric_manager import MLflowManager\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


# --- the status table -------------------------------------------------------------------------


def test_mlflow_status_for_follows_the_table():
    expected = {
        RunStatus.ONGOING: "RUNNING", RunStatus.COMPLETED: "FINISHED", RunStatus.FAILED: "FAILED",
        RunStatus.STOPPED: "KILLED", RunStatus.KILLED: "KILLED", RunStatus.NEW: "SCHEDULED",
    }
    assert set(states.MLFLOW_RUN_STATUS) == set(RunStatus)
    for status, mlflow_status in expected.items():
        assert mlflow_status_for(status) == mlflow_status == mlflow_status_for(status.value)
    for bad in ("RUNNING", "ongoing", None, 3):
        with pytest.raises(ConfigError, match="ONGOING"):
            mlflow_status_for(bad)


def test_mlflow_statuses_never_leave_finished_or_failed():
    may = states.mlflow_status_may_follow
    assert may("RUNNING", "FINISHED") and may("RUNNING", "KILLED") and may("KILLED", "RUNNING")
    for terminal in ("FINISHED", "FAILED"):
        for other in ("RUNNING", "KILLED", "FAILED", "FINISHED", "SCHEDULED"):
            assert may(terminal, other) == (other == terminal)
    assert not may("RUNNING", "SCHEDULED")  # a started run does not go back


# --- logging and reading back -------------------------------------------------------------------


def test_every_point_and_param_reads_back_exactly_once(manager, paths):
    experiment = manager.get_experiment("exactly once")
    runs = [manager.create_run(experiment.experiment_id) for _ in range(2)]
    for run in runs:
        for step in range(1200):  # more than one batch of 999
            manager.log_metric(run, "loss", 1.0 / (step + 1), step=step)
        manager.log_metrics(run, {"acc": 0.5, "f1": 0.25}, step=3)
        manager.log_params(run, {f"p{i}": i for i in range(150)})  # more than one batch of 100
        manager.set_tag(run, "team", "blue")
    assert manager.pending() == 2 * (1200 + 2 + 150 + 1)
    delivered = manager.flush(timeout=60)
    assert delivered == 2 * (1200 + 2 + 150 + 1) and manager.pending() == 0
    for run in runs:
        assert _history(paths["mlflow"], run, "loss") == [(s, 1.0 / (s + 1)) for s in range(1200)]
        assert _history(paths["mlflow"], run, "acc") == [(3, 0.5)]
        params = manager.get_run_params(run)
        assert params == {f"p{i}": str(i) for i in range(150)}
        tags = manager.get_run_tags(run)
        assert tags["team"] == "blue" and BATCH_TAG in tags
    assert manager.flusher.stats.failed == 0 and manager.failed() == []


def test_non_finite_values_survive_the_outbox(manager, paths):
    run = manager.create_run(manager.get_experiment("nan").experiment_id)
    manager.log_metric(run, "loss", float("nan"), step=1)
    manager.log_metric(run, "loss", float("-inf"), step=2)
    manager.flush(timeout=30)
    [(_, nan), (_, minus_inf)] = _history(paths["mlflow"], run, "loss")
    assert math.isnan(nan) and minus_inf in (-math.inf, -sys.float_info.max)


@pytest.mark.parametrize(
    "given, stored",
    [
        ("loss", "loss"),
        ("train/loss", "train/loss"),
        ("bad key!", "bad key_"),
        ("val acc (%)", "val acc ___"),
        ("/abs//path/", "abs/path"),
        ("a/../b", "a/__/b"),
        ("./x", "_/x"),
        ("..", "__"),
        ("émoji🙂", "émoji_"),
        ("tab\there", "tab_here"),
    ],
)
def test_names_mlflow_refuses_are_sanitized_predictably(manager, given, stored):
    assert sanitize_key(given) == stored
    assert sanitize_key(stored) == stored  # idempotent: a clean name is left alone
    run = manager.create_run(manager.get_experiment("names").experiment_id)
    manager.log_metric(run, given, 1.0)
    manager.log_param(run, given, "v")
    assert list(manager.get_run_metrics(run)) == [stored]
    assert manager.get_run_params(run) == {stored: "v"}
    assert manager.failed() == []


def test_a_name_too_long_is_refused_not_cut(manager):
    run = manager.create_run(manager.get_experiment("long").experiment_id)
    with pytest.raises(MetricInputError, match="251 characters.*at most 250"):
        manager.log_metric(run, "k" * 251, 1.0)
    assert manager.pending() == 0


def test_param_values_are_immutable_at_once(manager):
    run = manager.create_run(manager.get_experiment("params").experiment_id)
    manager.log_param(run, "lr", 0.1)
    manager.log_param(run, "lr", 0.1)  # the same value again is fine, and sent once
    with pytest.raises(MetricInputError, match="Changing param values is not allowed.*'0.1'.*'0.2'"):
        manager.log_param(run, "lr", 0.2)
    with pytest.raises(MetricInputError, match="given twice"):
        manager.log_params(run, {"a": 1, "a ": 2, "a!": 3, "a?": 4})  # a! and a? both become a_
    assert manager.pending() == 1
    assert manager.get_run_params(run) == {"lr": "0.1"}


def test_logging_costs_no_mlflow_call(manager):
    run = manager.create_run(manager.get_experiment("local").experiment_id)
    calls = []
    transport = manager.flusher.transport
    original = transport.log_batch
    transport.log_batch = lambda *a, **k: (calls.append(a), original(*a, **k))[1]  # count, then send
    for step in range(50):
        manager.log_metric(run, "loss", 0.5, step=step)
    assert calls == [] and manager.pending() == 50
    manager.flush()
    assert len(calls) == 1 and manager.pending() == 0


# --- crashes and concurrency -----------------------------------------------------------------------


def _backlog(paths, points: int = 300) -> str:
    """An MLflow run with ``points`` pending points in the outbox (logged, not sent)."""
    made = MLflowManager(paths["mlflow"], db=paths["db"], background=False)
    run = made.create_run(made.get_experiment("backlog").experiment_id)
    made.log_metrics(run, {"warmup": 1.0}, step=0)
    for step in range(points):
        made.log_metric(run, "loss", step / 1000.0, step=step)
    made.flusher.stop()
    return run


def _outbox_rows(db_url: str) -> list[tuple]:
    with StateDB(db_url) as database, database.engine.connect() as conn:
        from sqlalchemy import text

        return conn.execute(
            text("SELECT outbox_id, batch_token, delivered_at IS NOT NULL FROM metric_outbox ORDER BY outbox_id")
        ).all()


@pytest.mark.parametrize("moment", ["after send", "before send"])
def test_sigkill_around_the_send_then_a_new_process_delivers_exactly_once(paths, moment):
    run = _backlog(paths, points=300)
    # A real process flushes and is killed (SIGKILL) at the chosen moment: after
    # MLflow stored the batch but before the outbox marks it, or after the claim
    # committed the batch token but before anything was sent.
    killed = _child(f"""
        manager = MLflowManager({paths['mlflow']!r}, db={paths['db']!r}, background=False)
        flusher = manager.flusher
        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        if {moment!r} == "after send":
            flusher.db.settle_metric_batch = die
        else:
            flusher.transport.log_batch = die
        manager.flush()
    """)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    rows = _outbox_rows(paths["db"])
    in_doubt = [r for r in rows if r[1] is not None and not r[2]]
    assert len(in_doubt) == 301 and len({r[1] for r in in_doubt}) == 1  # one batch, sent or not: unknown
    expected_in_mlflow = [(s, s / 1000.0) for s in range(300)] if moment == "after send" else []
    assert _history(paths["mlflow"], run, "loss") == expected_in_mlflow

    # a new process resolves the doubt by asking MLflow, then sends only what is missing
    recovered = _child(f"""
        manager = MLflowManager({paths['mlflow']!r}, db={paths['db']!r}, background=False)
        sent = []
        transport = manager.flusher.transport
        original = transport.log_batch
        def counting(run_id, metrics, params, tags):
            sent.append(len(metrics))
            original(run_id, metrics, params, tags)
        transport.log_batch = counting
        delivered = manager.flush(timeout=60)
        stats = manager.flusher.stats
        print(json.dumps({{"delivered": delivered, "sent": sent, "resolved": stats.resolved_in_doubt,
                          "resent": stats.resent_after_doubt, "pending": manager.pending()}}))
    """)
    assert recovered.returncode == 0, recovered.stderr[-3000:]
    report = json.loads(recovered.stdout.strip().splitlines()[-1])
    assert report["delivered"] == 301 and report["pending"] == 0 and report["resolved"] == 1
    if moment == "after send":
        assert report["sent"] == [] and report["resent"] == 0  # nothing was sent twice
    else:
        assert report["sent"] == [301] and report["resent"] == 301
    assert _history(paths["mlflow"], run, "loss") == [(s, s / 1000.0) for s in range(300)]
    assert _history(paths["mlflow"], run, "warmup") == [(0, 1.0)]


def test_two_processes_flushing_one_backlog_send_each_row_once(paths):
    runs = [_backlog(paths, points=1500) for _ in range(3)]
    code = f"""
        manager = MLflowManager({paths['mlflow']!r}, db={paths['db']!r}, background=False)
        sys.stdin.readline()  # both start together
        manager.flush(timeout=120)
        print(json.dumps({{"delivered": manager.flusher.stats.delivered, "pending": manager.pending()}}))
    """
    prelude = "import os, signal, sys, json\nfrom rapidfire_state.metric_manager import MLflowManager\n"
    children = [
        subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(code)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
        for _ in range(2)
    ]
    import time

    time.sleep(4)  # both have imported mlflow and opened the stores
    for child in children:
        child.stdin.write("go\n")
        child.stdin.flush()
    reports = []
    for child in children:
        out, err = child.communicate(timeout=180)
        assert child.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    # every row was settled as delivered by exactly one of them: none was sent by both
    assert sum(r["delivered"] for r in reports) == 3 * 1501
    assert all(r["pending"] == 0 for r in reports)
    for run in runs:
        assert _history(paths["mlflow"], run, "loss") == [(s, s / 1000.0) for s in range(1500)]
    assert all(delivered for _, _, delivered in _outbox_rows(paths["db"]))


def test_rows_of_a_process_that_died_are_delivered_by_another(paths):
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(tracking_uri=paths["mlflow"]).create_experiment(
        "orphans", artifact_location=Path(paths["mlflow"][len("sqlite:///"):]).parent.as_uri()
    )
    died = _child(f"""
        manager = MLflowManager({paths['mlflow']!r}, db={paths['db']!r}, background=False)
        run = manager.create_run({experiment!r})
        for step in range(20):
            manager.log_metric(run, "loss", 0.5, step=step)
        print(run, flush=True)
        os._exit(0)  # no exit flush: what was logged waits in the outbox
    """)
    run = died.stdout.strip().splitlines()[-1]
    assert _history(paths["mlflow"], run, "loss") == []
    survivor = MLflowManager(paths["mlflow"], db=paths["db"], background=False)
    assert survivor.pending() == 20
    assert survivor.flush(timeout=30) == 20
    assert _history(paths["mlflow"], run, "loss") == [(s, 0.5) for s in range(20)]


def test_a_deleted_run_fails_its_backlog_in_one_call(manager):
    run = manager.create_run(manager.get_experiment("deleted").experiment_id)
    manager.client.delete_run(run)  # behind the manager's back: rows are already queued below
    for step in range(500):
        manager.log_metric(run, "loss", 0.5, step=step)
    calls = []
    transport = manager.flusher.transport
    original = transport.log_batch
    transport.log_batch = lambda *a, **k: (calls.append(a), original(*a, **k))[1]
    manager.flush(timeout=30)
    assert len(calls) == 1  # not one call per row
    assert manager.pending() == 0 and len(manager.failed(limit=1000)) == 500
    assert all("active" in row["error"] for row in manager.failed(limit=1000))


def test_a_claim_left_by_this_process_is_taken_over(manager, monkeypatch):
    run = manager.create_run(manager.get_experiment("own claim").experiment_id)
    manager.log_metric(run, "loss", 0.5, step=1)
    flusher = manager.flusher
    db = flusher.db
    real_settle = db.settle_metric_batch

    def settle_fails_once(*args, **kwargs):  # e.g. the database went away for a moment
        monkeypatch.setattr(db, "settle_metric_batch", real_settle)
        from rapidfire_state.db.store import metric_outbox

        metric_outbox._IN_FLIGHT.discard(args[0].claim_token)
        raise OSError("settle failed")

    monkeypatch.setattr(db, "settle_metric_batch", settle_fails_once)
    manager.flush()  # sent; the settle failed: the rows are in doubt, the claim still ours
    assert manager.pending() == 1
    assert manager.flush(timeout=30) == 1  # our own abandoned claim is taken over, the doubt resolved
    assert flusher.stats.resolved_in_doubt == 1 and flusher.stats.resent_after_doubt == 0
    assert _history(manager.tracking_uri, run, "loss") == [(1, 0.5)]


def test_interpreter_exit_flushes(paths):
    exited = _child(f"""
        manager = MLflowManager({paths['mlflow']!r}, db={paths['db']!r}, background=False)
        run = manager.create_run(manager.get_experiment("exit").experiment_id)
        manager.log_metrics(run, {{"a": 1.0, "b": 2.0}}, step=4)
        print(run, flush=True)
    """)
    assert exited.returncode == 0, exited.stderr[-2000:]
    run = exited.stdout.strip().splitlines()[-1]
    assert _history(paths["mlflow"], run, "a") == [(4, 1.0)] and _history(paths["mlflow"], run, "b") == [(4, 2.0)]
    assert MLflowManager(paths["mlflow"], db=paths["db"], background=False).pending() == 0


def test_the_background_flusher_delivers_without_being_asked(paths):
    import time

    manager = MLflowManager(paths["mlflow"], db=paths["db"], flush_interval=0.2)
    try:
        run = manager.create_run(manager.get_experiment("background").experiment_id)
        manager.log_metric(run, "loss", 0.75, step=1)
        deadline = time.monotonic() + 30
        while manager.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert manager.pending() == 0
        assert _history(paths["mlflow"], run, "loss") == [(1, 0.75)]
    finally:
        manager.close()


# --- status parity --------------------------------------------------------------------------------


@pytest.fixture
def tracked(manager, paths):
    """A RUNNING experiment and a helper making runs tracked in MLflow."""
    db = manager.db
    record = db.create_experiment("parity", str(paths["dir"] / "experiments"))
    db.transition_experiment(record.experiment_id, "RUNNING")

    def make(config=None, **kwargs):
        run = db.create_run(record.experiment_id, config or {"lr": 0.1, "model": {"depth": 2}}, **kwargs)
        return run.run_id, manager.create_run_for(run.run_id)

    return db, record.experiment_id, make


def test_run_status_reaches_mlflow_in_order(manager, tracked):
    db, experiment_id, make = tracked
    run_id, metric_run = make()
    assert db.get_run(run_id).metric_run_id == metric_run
    assert db.get_experiment(experiment_id).metric_experiment_id == manager.track_experiment(experiment_id)
    seen = []
    for status in (RunStatus.ONGOING, RunStatus.STOPPED, RunStatus.ONGOING, RunStatus.COMPLETED):
        db.transition_run(run_id, status)
        manager.log_metric(metric_run, "loss", 0.1)  # points interleave with statuses
        manager.flush(timeout=30)
        seen.append(manager.get_run_status(metric_run))
    assert seen == ["RUNNING", "KILLED", "RUNNING", "FINISHED"]
    # a late stop after completion: the database refuses it, so MLflow never hears of it
    with pytest.raises(InvalidTransitionError):
        db.transition_run(run_id, RunStatus.STOPPED)
    # and an MLflow-side late stop is not applied either: FINISHED stays FINISHED
    manager.end_run(metric_run, "KILLED")
    assert manager.get_run_status(metric_run) == "FINISHED"
    [note] = [r for r in _status_rows(db) if r[1] == "end_run"]
    assert "left so" in note[3]


def _status_rows(db):
    from sqlalchemy import text

    with db.engine.connect() as conn:
        return conn.execute(
            text("SELECT outbox_id, key, text_value, error FROM metric_outbox WHERE kind = 'STATUS' ORDER BY outbox_id")
        ).all()


def test_a_tracked_run_is_named_tagged_and_carries_its_config(manager, tracked):
    db, experiment_id, make = tracked
    parent, parent_metric = make({"lr": 0.1, "model": {"depth": 2}, "notes": "x" * 7000})
    child = db.create_run(
        experiment_id, {"lr": 0.05}, source=RunSource.CLONE_MODIFY, cloned_from=parent, warm_started_from=parent,
    )
    child_metric = manager.create_run_for(child.run_id)
    assert manager.create_run_for(child.run_id) == child_metric  # once per run
    run = manager.client.get_run(child_metric)
    assert run.info.run_name == f"run_{child.run_id}"
    tags = manager.get_run_tags(child_metric)
    assert tags["rapidfire.experiment"] == "parity" and tags["rapidfire.run_id"] == str(child.run_id)
    assert tags["rapidfire.source"] == "CLONE_MODIFY" and tags["rapidfire.parent_run_id"] == str(parent)
    assert tags["rapidfire.warm_started_from"] == str(parent)
    assert manager.get_run_params(child_metric) == {"lr": "0.05"}
    # the parent's flattened config; a value longer than MLflow keeps is named, not cut
    assert manager.get_run_params(parent_metric) == {"lr": "0.1", "model.depth": "2"}
    assert manager.get_run_tags(parent_metric)["rapidfire.params_too_long"] == "notes"


def test_ending_the_experiment_ends_the_mlflow_runs(manager, tracked):
    from rapidfire_state.experiment_utils import ExperimentUtils

    db, experiment_id, make = tracked
    live, live_metric = make()
    done, done_metric = make()
    stopped, stopped_metric = make()
    for run_id in (live, done, stopped):
        db.transition_run(run_id, RunStatus.ONGOING)
    db.transition_run(done, RunStatus.COMPLETED)
    db.transition_run(stopped, RunStatus.STOPPED)
    # one bulk change (live runs KILLED), then the bounded flush of the attached manager
    report = ExperimentUtils(db, metrics=manager).end_experiment()
    assert report is not None and report.experiment_id == experiment_id
    assert manager.pending() == 0  # delivered by end_experiment itself
    statuses = {run: manager.client.get_run(run).info.status for run in (live_metric, done_metric, stopped_metric)}
    assert statuses == {live_metric: "KILLED", done_metric: "FINISHED", stopped_metric: "KILLED"}


def test_a_failed_lookup_never_writes_a_status(manager, tracked):
    db, _, make = tracked
    run_id, metric_run = make()
    db.transition_run(run_id, RunStatus.ONGOING)
    db.transition_run(run_id, RunStatus.COMPLETED)
    manager.flush(timeout=30)
    assert manager.get_run_status(metric_run) == "FINISHED"

    # MLflow's answer is unavailable (a store that cannot be read): the status row
    # for a late, stale KILLED must neither be applied nor dropped
    class Unreadable(StoreTransport):
        def get_run(self, run_id):
            raise OSError("store unavailable")

        def set_status(self, *args):  # pragma: no cover - must never be reached
            raise AssertionError("a status was written without a lookup")

    flusher = manager.flusher
    real = flusher.transport
    flusher.transport = Unreadable(manager.client)
    manager.end_run(metric_run, "KILLED")  # bounded wait, nothing raised
    assert manager.pending() == 1 and "store unavailable" in flusher.stats.last_error
    flusher.transport = real
    manager.flush(timeout=30)
    assert manager.pending() == 0 and manager.get_run_status(metric_run) == "FINISHED"
    assert db.get_run(run_id).status == RunStatus.COMPLETED  # MLflow trouble never touches the run


def test_untracked_runs_write_no_status_rows(manager, tracked):
    db, experiment_id, _ = tracked
    run = db.create_run(experiment_id, {"lr": 1})
    db.transition_run(run.run_id, RunStatus.ONGOING)
    db.transition_run(run.run_id, RunStatus.COMPLETED)
    assert _status_rows(db) == [] and manager.pending() == 0


def test_a_signal_ends_the_mlflow_runs_killed(paths):
    # A controller with a tracked ONGOING run and the signal handlers installed,
    # idling; SIGTERM makes the handler clean up, and its flush tells MLflow.
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from rapidfire_state import StateDB
            from rapidfire_state.experiment_utils import ExperimentUtils
            from rapidfire_state.metric_manager import MLflowManager
            db = StateDB({paths['db']!r})
            manager = MLflowManager({paths['mlflow']!r}, db=db, background=False)
            utils = ExperimentUtils(db, metrics=manager)
            experiment_id, _, _ = utils.create_experiment("signalled", {str(paths['dir'] / 'exps')!r})
            run = db.create_run(experiment_id, {{"lr": 1}})
            metric_run = manager.create_run_for(run.run_id)
            db.transition_run(run.run_id, "ONGOING")
            manager.flush(timeout=30)
            utils.setup_signal_handlers([])
            print(metric_run, run.run_id, flush=True)
            time.sleep(120)
            sys.exit(3)
        """)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    try:
        metric_run, run_id = child.stdout.readline().split()
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=paths["mlflow"])
        assert client.get_run(metric_run).info.status == "RUNNING"
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 128 + signal.SIGTERM, child.stderr.read()[-2000:]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert client.get_run(metric_run).info.status == "KILLED"  # delivered by the handler itself
    with StateDB(paths["db"]) as db:
        assert db.get_run(int(run_id)).status == RunStatus.KILLED
        assert db.pending_metric_rows() == 0
        [experiment] = db.list_experiments()
        assert experiment.status.value == "FAILED" and experiment.error == "interrupted by SIGTERM"


def test_the_collector_pause_nests_and_restores_the_previous_state():
    import gc
    import threading

    from rapidfire_state.metric_flusher import _collector_paused

    assert gc.isenabled()
    inside = threading.Event()
    release = threading.Event()

    def other_flusher():
        with _collector_paused():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=other_flusher)
    thread.start()
    inside.wait(10)
    with _collector_paused():
        assert not gc.isenabled()
    assert not gc.isenabled()  # the other thread's pause is still on
    release.set()
    thread.join()
    assert gc.isenabled()
    gc.disable()  # a caller that turned the collector off keeps it off
    try:
        with _collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_fork_waits_for_the_flushers_pass_and_the_child_logs_on_its_own(manager, paths):
    import threading

    run = manager.create_run(manager.get_experiment("fork").experiment_id)
    manager.log_metric(run, "loss", 0.5, step=1)
    flusher = manager.flusher
    entered, leave = threading.Event(), threading.Event()
    real = flusher.transport.log_batch

    def slow_send(*args, **kwargs):  # a pass in progress, held open by the test
        entered.set()
        leave.wait(10)
        real(*args, **kwargs)

    flusher.transport.log_batch = slow_send
    sender = threading.Thread(target=manager.flush)
    sender.start()
    assert entered.wait(10)
    threading.Timer(0.5, leave.set).start()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: a fresh flusher of its own, and nothing held
        try:
            manager.log_metric(run, "loss", 0.25, step=2)
            os._exit(0 if manager.flush(timeout=20) >= 1 else 3)
        except BaseException:
            os._exit(4)
    waited = time.monotonic() - started
    _, status = os.waitpid(pid, 0)
    sender.join(10)
    assert waited >= 0.4  # the fork waited for the pass to end
    assert os.waitstatus_to_exitcode(status) == 0
    assert _history(paths["mlflow"], run, "loss") == [(1, 0.5), (2, 0.25)]
