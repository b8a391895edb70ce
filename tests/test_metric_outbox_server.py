"""The metric outbox against a real ``mlflow server``: outages, restarts, status parity.

Each test starts one server (``--workers 1``, SQLite backend in tmp_path) and
SIGKILLs its whole process tree while the library is in use, then starts it
again on the same port with the same backend, as a crashed and restarted
tracking server would be.  What MLflow stored is read back with MLflow's own
client, never through the manager.
"""

from __future__ import annotations

import threading
import time

import pytest

from mlflow_server import mlflow_server_factory  # noqa: F401  (the fixture)
from rapidfire_state import StateDB
from rapidfire_state.constants import RunSource
from rapidfire_state.exceptions import InvalidTransitionError
from rapidfire_state.metric_flusher import BATCH_TAG
from rapidfire_state.metric_manager import MetricLoggingError, MLflowManager

#: the longest caller-side log_metric accepted; generous for a busy two-core
#: machine (the local insert itself takes well under a millisecond)
MAX_CALL_SECONDS = 0.050


def _client(url: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=url)


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def _history(client, run_id: str, key: str) -> list[tuple[int, float, int]]:
    return [(int(m.step), float(m.value), int(m.timestamp)) for m in client.get_metric_history(run_id, key)]


@pytest.mark.slow
def test_server_killed_mid_stream_loses_and_duplicates_nothing(mlflow_server_factory, tmp_path):  # noqa: F811
    server = mlflow_server_factory()
    db = StateDB(f"sqlite:///{tmp_path / 'state.db'}")
    manager = MLflowManager(server.url, db=db, flush_interval=0.05)
    try:
        experiment = manager.get_experiment("outage")
        runs = [manager.create_run(experiment.experiment_id) for _ in range(2)]
        manager.log_params(runs[0], {"lr": 0.01, "layers": 4})
        manager.log_params(runs[1], {"lr": 0.02, "layers": 8})
        manager.set_tag(runs[0], "phase", "before the kill")

        steps = 150  # 300 points over the two runs
        expected: dict[str, dict[int, float]] = {run: {} for run in runs}
        durations_up: list[float] = []
        durations_down: list[float] = []

        def log(step: int, into: list[float]) -> None:
            for index, run in enumerate(runs):
                value = step * 0.5 + index
                started = time.perf_counter()
                manager.log_metric(run, "loss", value, step=step)
                into.append(time.perf_counter() - started)
                expected[run][step] = value

        for step in range(40):
            log(step, durations_up)
            time.sleep(0.002)
        # the background flusher has delivered part of it before the server dies
        _wait_for(lambda: manager.flusher.stats.delivered > 0, 30, "a first delivery")
        pending_at_kill = manager.pending()

        # SIGKILL the tree while points keep coming: a batch may be in flight
        killer = threading.Thread(target=server.kill)
        killer.start()
        step = 40
        while killer.is_alive() and step < 100:
            log(step, durations_up)
            step += 1
            time.sleep(0.01)
        killer.join()
        logged_during_kill = step - 40
        assert not server.healthy()

        # down: logging goes on at full speed and never raises
        down_started = time.monotonic()
        step_down = step
        while step < steps:
            log(step, durations_down)
            step += 1
        manager.log_param(runs[1], "logged_while_down", "yes")
        manager.set_tag(runs[1], "phase", "while down")
        # let the flusher meet the dead server a few times (it backs off, loggers never wait)
        time.sleep(1.5)
        for index in range(20):
            log_started = time.perf_counter()
            # distinct steps: MLflow's store keeps one row per (key, timestamp, step, value)
            manager.log_metric(runs[0], "down_only", 1.0, step=index)
            durations_down.append(time.perf_counter() - log_started)
        expected_down_only = 20
        longest_down = max(durations_down)
        print(f"\nlog_metric while up: max {max(durations_up) * 1e3:.2f} ms; while down: max "
              f"{longest_down * 1e3:.2f} ms, median {sorted(durations_down)[len(durations_down) // 2] * 1e6:.0f} us "
              f"({len(durations_down)} calls); pending at the kill {pending_at_kill}, "
              f"{logged_during_kill} steps logged while it was being killed")
        assert longest_down < MAX_CALL_SECONDS, f"a log_metric took {longest_down * 1e3:.1f} ms with the server down"

        backlog = manager.pending()
        assert backlog >= 2 * (steps - step_down) + expected_down_only + 2, backlog  # at least what was logged while down
        assert manager.pending(runs[1]) > 0
        assert manager.flusher.stats.errors > 0
        assert manager.flusher.stats.last_error
        assert manager.flush() == 0  # one pass against a dead server: nothing, no exception

        started = time.monotonic()
        with pytest.raises(MetricLoggingError, match="not healthy"):
            manager.check_server(timeout=2.0)
        assert time.monotonic() - started < 5
        assert time.monotonic() - down_started < 60  # the whole outage stayed short

        server.start()
        manager.flush(timeout=60)
        assert manager.pending() == 0
        assert manager.failed() == []

        client = _client(server.url)
        for run in runs:
            history = _history(client, run, "loss")
            steps_seen = [s for s, _, _ in history]
            assert len(steps_seen) == len(set(steps_seen)) == steps, f"{run}: {len(history)} points, {steps} logged"
            assert {s: v for s, v, _ in history} == expected[run]
            # delivered in logging order: timestamps grow with the step
            by_step = sorted(history)
            assert [t for _, _, t in by_step] == sorted(t for _, _, t in by_step)
        assert len(_history(client, runs[0], "down_only")) == expected_down_only
        params = [client.get_run(run).data.params for run in runs]
        assert params[0] == {"lr": "0.01", "layers": "4"}
        assert params[1] == {"lr": "0.02", "layers": "8", "logged_while_down": "yes"}
        tags = [client.get_run(run).data.tags for run in runs]
        assert tags[0]["phase"] == "before the kill" and tags[1]["phase"] == "while down"
        assert BATCH_TAG in tags[0]
        print(f"flusher: {manager.flusher.stats}")
    finally:
        manager.close(timeout=5)
        db.close()


@pytest.mark.slow
def test_status_parity_and_outage(mlflow_server_factory, tmp_path):  # noqa: F811
    server = mlflow_server_factory()
    db = StateDB(f"sqlite:///{tmp_path / 'state.db'}")
    # no background thread: each delivery below is an explicit flush, so what
    # MLflow shows between flushes is exactly what was delivered
    manager = MLflowManager(server.url, db=db, background=False)
    manager.read_flush_seconds = 2.0
    client = _client(server.url)

    def mlflow_status(run_id: str) -> str:
        return client.get_run(run_id).info.status

    try:
        experiment = db.create_experiment("parity", str(tmp_path / "experiments"))
        db.transition_experiment(experiment.experiment_id, "RUNNING")
        record = db.create_run(experiment.experiment_id, {"lr": 0.1, "model": {"layers": 2}})
        mlflow_run = manager.create_run_for(record.run_id)
        assert manager.create_run_for(record.run_id) == mlflow_run
        assert db.get_run(record.run_id).metric_run_id == mlflow_run
        info = client.get_run(mlflow_run)
        assert info.info.run_name == f"run_{record.run_id}"
        assert info.info.experiment_id == db.get_experiment(experiment.experiment_id).metric_experiment_id
        assert info.data.tags["rapidfire.run_id"] == str(record.run_id)
        assert info.data.tags["rapidfire.experiment"] == "parity"

        # ONGOING -> STOPPED -> ONGOING (resume) -> COMPLETED, each delivered before the next
        for to, shown in [("ONGOING", "RUNNING"), ("STOPPED", "KILLED"), ("ONGOING", "RUNNING"),
                          ("COMPLETED", "FINISHED")]:
            db.transition_run(record.run_id, to)
            manager.flush(timeout=30)
            assert manager.pending() == 0, to
            assert mlflow_status(mlflow_run) == shown, to
        assert client.get_run(mlflow_run).data.params, "the flattened config is logged as params"

        # a late stop: the database refuses it (COMPLETED is terminal) and MLflow stays FINISHED
        with pytest.raises(InvalidTransitionError):
            db.transition_run(record.run_id, "STOPPED")
        manager.end_run(mlflow_run, "KILLED")  # a direct late end: not applied to a finished run
        assert manager.pending() == 0
        assert mlflow_status(mlflow_run) == "FINISHED"

        # a clone-modify of the run carries its parent
        clone = db.create_run(experiment.experiment_id, {"lr": 0.05, "model": {"layers": 2}},
                              source=RunSource.CLONE_MODIFY,
                              cloned_from=record.run_id)
        clone_run = manager.create_run_for(clone.run_id)
        clone_tags = client.get_run(clone_run).data.tags
        assert clone_tags["rapidfire.parent_run_id"] == str(record.run_id)
        assert clone_tags["rapidfire.source"] == "CLONE_MODIFY"
        db.transition_run(clone.run_id, "ONGOING")
        other = db.create_run(experiment.experiment_id, {"lr": 0.2})
        other_run = manager.create_run_for(other.run_id)
        db.transition_run(other.run_id, "ONGOING")
        manager.flush(timeout=30)
        assert manager.pending() == 0
        assert mlflow_status(clone_run) == mlflow_status(other_run) == "RUNNING"

        # --- the server dies; the database goes on recording status changes ---
        server.kill()
        db.transition_run(clone.run_id, "STOPPED")      # MLflow trouble never fails the run
        db.transition_run(clone.run_id, "ONGOING")
        db.transition_run(clone.run_id, "COMPLETED")
        db.transition_run(other.run_id, "STOPPED")
        assert db.get_run(clone.run_id).status.value == "COMPLETED"
        started = time.monotonic()
        manager.end_run(mlflow_run, "KILLED")            # late, and MLflow cannot even be asked
        assert time.monotonic() - started < 3            # one attempt, not the whole bounded wait
        assert manager.flush() == 0                      # a lookup that fails writes nothing
        assert manager.pending(clone_run) == 3
        assert manager.pending(other_run) == 1
        assert manager.pending(mlflow_run) == 1

        server.start()
        # MLflow shows what was delivered before the outage until the backlog is flushed
        assert mlflow_status(clone_run) == "RUNNING"
        assert mlflow_status(other_run) == "RUNNING"
        assert mlflow_status(mlflow_run) == "FINISHED"
        manager.flush(timeout=30)
        assert manager.pending() == 0
        assert manager.failed() == []
        assert mlflow_status(clone_run) == "FINISHED"   # KILLED, RUNNING, FINISHED applied in order
        assert mlflow_status(other_run) == "KILLED"
        assert mlflow_status(mlflow_run) == "FINISHED"  # never clobbered by the late KILLED

        # resuming after the outage reopens the stopped run's MLflow run
        db.transition_run(other.run_id, "ONGOING")
        manager.flush(timeout=30)
        assert mlflow_status(other_run) == "RUNNING"
    finally:
        manager.close(timeout=5)
        db.close()
