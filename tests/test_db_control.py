"""Interactive-control requests in the store: checked and queued in one transaction, applied atomically.

``StateDB.request_run_control`` (queueing), ``StateDB.apply_run_control`` (stop,
resume, kill) and ``rapidfire_state.interactive.apply_control_request`` (all
four, clones included), on every backend under test.
"""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import func, select

from rapidfire_state import states
from rapidfire_state.constants import ControllerTask, RunSource, RunStatus, TaskStatus
from rapidfire_state.db import schema as tables
from rapidfire_state.db.store.control import ControlRequestError, needed_statuses
from rapidfire_state.exceptions import InvalidTransitionError
from rapidfire_state.interactive import apply_control_request, clone_config

R = RunStatus


def _counts(db) -> tuple[int, int]:
    """(controller tasks, history rows): a refused request adds neither."""
    with db.engine.connect() as conn:
        tasks = conn.execute(select(func.count()).select_from(tables.controller_tasks)).scalar_one()
        history = conn.execute(select(func.count()).select_from(tables.state_transitions)).scalar_one()
    return tasks, history


def _run_in(db, experiment_id, status: RunStatus, config=None):
    """A run of ``experiment_id`` brought to ``status`` through legal transitions."""
    run = db.create_run(experiment_id, config or {"lr": 0.1, "hidden": 8}, total_steps=32)
    path = {
        R.NEW: [], R.ONGOING: [R.ONGOING], R.STOPPED: [R.ONGOING, R.STOPPED],
        R.COMPLETED: [R.ONGOING, R.COMPLETED], R.FAILED: [R.ONGOING, R.FAILED], R.KILLED: [R.KILLED],
    }[status]
    for step in path:
        run = db.transition_run(run.run_id, step)
    return run


def _claim(db, experiment_id):
    task = db.claim_controller_task(experiment_id)
    assert task is not None
    return task


# --- the rules come from the state machine ------------------------------------------------------


def test_needed_statuses_are_the_run_machines():
    assert needed_statuses("stop") == states.allowed_from("run", R.STOPPED) == {R.NEW, R.ONGOING}
    assert needed_statuses("kill") == states.allowed_from("run", R.KILLED) == {R.NEW, R.ONGOING, R.STOPPED}
    assert needed_statuses("resume") == {R.STOPPED}
    assert all(states.can_transition("run", s, R.ONGOING) for s in needed_statuses("resume"))
    assert needed_statuses("clone") == frozenset(RunStatus)


# --- queueing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "action, status, task_type",
    [
        ("stop", R.ONGOING, ControllerTask.IC_STOP),
        ("stop", R.NEW, ControllerTask.IC_STOP),
        ("resume", R.STOPPED, ControllerTask.IC_RESUME),
        ("kill", R.ONGOING, ControllerTask.IC_DELETE),
        ("kill", R.STOPPED, ControllerTask.IC_DELETE),
        ("kill", R.NEW, ControllerTask.IC_DELETE),
    ],
)
def test_each_run_action_is_queued_for_the_running_experiment(db, experiment, action, status, task_type):
    run = _run_in(db, experiment.experiment_id, status)
    task = db.request_run_control(run.run_id, action)
    assert (task.kind, task.task_type, task.status, task.run_id, task.experiment_id) == (
        "controller", task_type, TaskStatus.SCHEDULED, run.run_id, experiment.experiment_id,
    )
    assert task.config_leaf is None
    assert db.get_run(run.run_id).status == status  # queueing changes no run
    assert [(h.from_status, h.to_status) for h in db.history("controller_task", task.task_id)] == [
        (None, TaskStatus.SCHEDULED)
    ]


@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize("status", [R.ONGOING, R.COMPLETED, R.KILLED])
def test_clone_of_any_run_is_queued_with_its_config(db, experiment, warm, status):
    run = _run_in(db, experiment.experiment_id, status)
    task = db.request_run_control(
        run.run_id, "clone", experiment_id=experiment.experiment_id, config={"lr": 0.01}, warm=warm
    )
    assert task.task_type == (ControllerTask.IC_CLONE_MODIFY_WARM if warm else ControllerTask.IC_CLONE_MODIFY)
    assert task.config == {"lr": 0.01}


def _refusal(db, call, *needles):
    before = _counts(db)
    with pytest.raises(ControlRequestError) as raised:
        call()
    assert _counts(db) == before, "a refused request queued or recorded something"
    message = str(raised.value)
    for needle in needles:
        assert needle in message, (needle, message)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "action, status, needs",
    [
        ("stop", R.STOPPED, "NEW or ONGOING"),
        ("stop", R.COMPLETED, "NEW or ONGOING"),
        ("stop", R.KILLED, "NEW or ONGOING"),
        ("resume", R.ONGOING, "STOPPED"),
        ("resume", R.NEW, "STOPPED"),
        ("resume", R.COMPLETED, "STOPPED"),
        ("kill", R.COMPLETED, "NEW, ONGOING or STOPPED"),
        ("kill", R.FAILED, "NEW, ONGOING or STOPPED"),
        ("kill", R.KILLED, "NEW, ONGOING or STOPPED"),
    ],
)
def test_a_status_that_does_not_allow_the_action_is_refused(db, experiment, action, status, needs):
    run = _run_in(db, experiment.experiment_id, status)
    _refusal(
        db, lambda: db.request_run_control(run.run_id, action),
        f"cannot {action} run {run.run_id}: it is {status.value}", f"needs a run that is {needs}",
    )


def test_unknown_runs_experiments_and_actions_are_refused(db, experiment, tmp_path):
    run = _run_in(db, experiment.experiment_id, R.ONGOING)
    _refusal(db, lambda: db.request_run_control(9999, "stop"), "run 9999 does not exist")
    _refusal(db, lambda: db.request_run_control(9999, "clone", config={"lr": 1}), "run 9999 does not exist")
    _refusal(db, lambda: db.request_run_control(run.run_id, "pause"), "'pause'", "stop, resume, kill, clone")
    _refusal(db, lambda: db.request_run_control(run.run_id, "stop", experiment_id=777), "experiment 777 does not exist")
    other = db.create_experiment("other", str(tmp_path / "experiments"))
    other_run = db.create_run(other.experiment_id, {"lr": 1})
    _refusal(
        db, lambda: db.request_run_control(other_run.run_id, "kill"),
        f"run {other_run.run_id} belongs to experiment {other.experiment_id}",
        f"not to experiment {experiment.experiment_id}",
    )
    _refusal(
        db, lambda: db.request_run_control(other_run.run_id, "kill", experiment_id=other.experiment_id),
        f"experiment {other.experiment_id} is NEW", "RUNNING",
    )
    db.transition_experiment(experiment.experiment_id, "COMPLETED")
    _refusal(db, lambda: db.request_run_control(run.run_id, "stop"), "no experiment is RUNNING")


@pytest.mark.parametrize(
    "config, needle",
    [
        (None, "got nothing"),
        ([1, 2], "got a list"),
        ("lr=0.1", "got a str"),
        ({1: "a"}, "keys must be strings"),
        ({"lr": float("nan")}, "not JSON"),
        ({"lr": object()}, "not JSON"),
    ],
)
def test_clone_needs_a_json_object(db, experiment, config, needle):
    run = _run_in(db, experiment.experiment_id, R.ONGOING)
    _refusal(db, lambda: db.request_run_control(run.run_id, "clone", config=config), needle)


def test_config_and_warm_belong_to_clone_only(db, experiment):
    run = _run_in(db, experiment.experiment_id, R.ONGOING)
    _refusal(db, lambda: db.request_run_control(run.run_id, "stop", config={"lr": 1}), "clone only")
    _refusal(db, lambda: db.request_run_control(run.run_id, "kill", warm=True), "clone only")


def test_a_second_open_request_of_the_same_action_is_refused(db, experiment):
    run = _run_in(db, experiment.experiment_id, R.ONGOING)
    first = db.request_run_control(run.run_id, "stop")
    _refusal(db, lambda: db.request_run_control(run.run_id, "stop"), f"controller task {first.task_id}", "already open")
    # another action, and clones (each a run of its own), are still taken
    db.request_run_control(run.run_id, "kill")
    db.request_run_control(run.run_id, "clone", config={"lr": 1})
    db.request_run_control(run.run_id, "clone", config={"lr": 2})
    # a resume of a run whose stop is not applied yet says what is open
    _refusal(db, lambda: db.request_run_control(run.run_id, "resume"), "it is ONGOING", f"stop (task {first.task_id})")
    # once the stop is finished, another stop may be asked for
    db.finish_controller_task(_claim(db, experiment.experiment_id).task_id, ok=False, error="x")
    db.request_run_control(run.run_id, "stop")


def test_concurrent_identical_requests_queue_exactly_one(db, experiment):
    run = _run_in(db, experiment.experiment_id, R.ONGOING)
    results: list = []
    start = threading.Barrier(4)

    def ask() -> None:
        start.wait()
        try:
            results.append(db.request_run_control(run.run_id, "stop").task_id)
        except ControlRequestError as exc:
            results.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    queued = [r for r in results if isinstance(r, int)]
    assert len(results) == 4 and len(queued) == 1, results
    assert all("already open" in str(r) for r in results if not isinstance(r, int))
    assert [t.task_id for t in db.list_tasks("controller", run_id=run.run_id)] == queued


# --- applying stop / resume / kill ---------------------------------------------------------------


def test_stop_resume_kill_applied_in_one_transaction_each(db, experiment):
    eid = experiment.experiment_id
    run = _run_in(db, eid, R.ONGOING)
    queued = db.create_worker_task(eid, run.run_id, 0, 1)
    running = db.create_worker_task(eid, run.run_id, 1, 0)
    running = db.claim_worker_task(1)
    other_run = _run_in(db, eid, R.ONGOING)
    other_task = db.create_worker_task(eid, other_run.run_id, 0, 0)

    db.request_run_control(run.run_id, "stop")
    task = _claim(db, eid)
    outcome = apply_control_request(db, task)
    assert (outcome.ok, outcome.action, outcome.run_id) == (True, "stop", run.run_id)
    assert outcome.message == f"run {run.run_id} STOPPED; 1 queued worker task cancelled"
    stopped = db.get_run(run.run_id)
    assert stopped.status == R.STOPPED
    assert db.history("run", run.run_id)[-1].reason == f"stopped by user (controller task {task.task_id})"
    finished = db.get_task("controller", task.task_id)
    assert finished.status == TaskStatus.COMPLETED and finished.error is None
    assert db.history("controller_task", task.task_id)[-1].reason == outcome.message
    # the run's queued chunk is cancelled; the one a worker is training is the worker's to finish
    assert db.get_task("worker", queued.task_id).status == TaskStatus.FAILED
    assert "stopped by user" in db.get_task("worker", queued.task_id).error
    assert db.get_task("worker", running.task_id).status == TaskStatus.IN_PROGRESS
    assert db.get_task("worker", other_task.task_id).status == TaskStatus.SCHEDULED

    db.request_run_control(run.run_id, "resume")
    outcome = apply_control_request(db, _claim(db, eid))
    assert outcome.ok and outcome.message == f"run {run.run_id} ONGOING"
    assert db.get_run(run.run_id).status == R.ONGOING and db.get_run(run.run_id).ended_by is None

    db.request_run_control(run.run_id, "kill")
    outcome = apply_control_request(db, _claim(db, eid))
    assert outcome.ok and outcome.message == f"run {run.run_id} KILLED"
    assert db.get_run(run.run_id).status == R.KILLED
    assert db.history("run", run.run_id)[-1].reason.startswith("killed by user")


def test_a_request_that_became_invalid_fails_and_changes_nothing(db, experiment):
    eid = experiment.experiment_id
    run = _run_in(db, eid, R.ONGOING)
    queued = db.create_worker_task(eid, run.run_id, 0, 1)
    db.request_run_control(run.run_id, "stop")
    db.transition_run(run.run_id, R.COMPLETED)  # the run finished before the controller reached it
    history = len(db.history("run", run.run_id))
    task = _claim(db, eid)
    outcome = apply_control_request(db, task)
    assert not outcome.ok
    assert outcome.message == f"cannot stop run {run.run_id}: it is COMPLETED now; stop needs a run that is NEW or ONGOING"
    failed = db.get_task("controller", task.task_id)
    assert failed.status == TaskStatus.FAILED and failed.error == outcome.message
    assert db.get_run(run.run_id).status == R.COMPLETED and len(db.history("run", run.run_id)) == history
    assert db.get_task("worker", queued.task_id).status == TaskStatus.SCHEDULED


def test_a_run_already_in_the_wanted_status_is_done(db, experiment):
    run = _run_in(db, experiment.experiment_id, R.ONGOING)
    db.request_run_control(run.run_id, "stop")
    db.transition_run(run.run_id, R.STOPPED)
    outcome = apply_control_request(db, _claim(db, experiment.experiment_id))
    assert outcome.ok and outcome.message == f"run {run.run_id} was already STOPPED"


def test_a_resume_when_the_experiment_ended_fails(db, experiment):
    run = _run_in(db, experiment.experiment_id, R.STOPPED)
    db.request_run_control(run.run_id, "resume")
    task = _claim(db, experiment.experiment_id)
    db.transition_experiment(experiment.experiment_id, "FAILED")
    outcome = apply_control_request(db, task)
    assert not outcome.ok and "only while its experiment" in outcome.message
    assert db.get_run(run.run_id).status == R.STOPPED


def test_the_run_change_is_undone_when_the_task_cannot_be_finished(db, experiment):
    """One transaction: a finish refused (another claim's token) leaves the run as it was."""
    run = _run_in(db, experiment.experiment_id, R.ONGOING)
    db.request_run_control(run.run_id, "kill")
    task = _claim(db, experiment.experiment_id)
    with pytest.raises(InvalidTransitionError, match="claim token"):
        db.apply_run_control(task.task_id, claim_token="not-the-claim")
    assert db.get_run(run.run_id).status == R.ONGOING
    assert db.get_task("controller", task.task_id).status == TaskStatus.IN_PROGRESS
    assert db.apply_run_control(task.task_id, claim_token=task.claim_token) == (True, f"run {run.run_id} KILLED")


def test_only_claimed_control_requests_are_applied(db, experiment):
    run = _run_in(db, experiment.experiment_id, R.ONGOING)
    queued = db.request_run_control(run.run_id, "stop")
    with pytest.raises(ControlRequestError, match="SCHEDULED; a request is applied once claimed"):
        db.apply_run_control(queued.task_id)
    fit = db.create_controller_task(experiment.experiment_id, ControllerTask.RUN_FIT, run_id=run.run_id)
    with pytest.raises(ControlRequestError, match="not a stop, resume or kill"):
        db.apply_run_control(fit.task_id)
    with pytest.raises(ControlRequestError, match="not an interactive-control request"):
        apply_control_request(db, fit)
    assert db.get_run(run.run_id).status == R.ONGOING
    assert db.get_task("controller", queued.task_id).status == TaskStatus.SCHEDULED


# --- applying clones -----------------------------------------------------------------------------


@pytest.mark.parametrize("warm", [False, True])
def test_clone_creates_a_run_and_calls_the_hook(db, experiment, warm):
    parent = _run_in(db, experiment.experiment_id, R.ONGOING, config={"lr": 0.1, "hidden": 8, "opt": {"m": 0.9}})
    db.request_run_control(parent.run_id, "clone", config={"lr": 0.05}, warm=warm)
    task = _claim(db, experiment.experiment_id)
    seen = []
    outcome = apply_control_request(db, task, clone_hook=lambda new, old, w: seen.append((new, old, w)))
    assert outcome.ok and outcome.action == "clone"
    new = db.get_run(outcome.run_id)
    assert outcome.message == f"run {new.run_id} created from run {parent.run_id} ({'warm' if warm else 'cold'} start)"
    assert (new.source, new.cloned_from, new.warm_started_from) == (
        RunSource.CLONE_MODIFY, parent.run_id, parent.run_id if warm else None,
    )
    assert new.config == {"lr": 0.05, "hidden": 8, "opt": {"m": 0.9}}
    assert (new.total_steps, new.status, new.experiment_id) == (32, R.ONGOING, experiment.experiment_id)
    [(hook_new, hook_parent, hook_warm)] = seen
    assert (hook_new.run_id, hook_new.status, hook_parent.run_id, hook_warm) == (new.run_id, R.NEW, parent.run_id, warm)
    assert db.get_task("controller", task.task_id).status == TaskStatus.COMPLETED
    assert db.history("controller_task", task.task_id)[-1].reason == outcome.message
    assert db.get_run(parent.run_id).status == R.ONGOING


def test_clone_hook_failure_fails_the_new_run_and_the_request(db, experiment):
    parent = _run_in(db, experiment.experiment_id, R.COMPLETED)
    db.request_run_control(parent.run_id, "clone", config={"lr": 0.5}, warm=True)
    task = _claim(db, experiment.experiment_id)

    def hook(new, old, warm):
        raise OSError("no weights to copy")

    outcome = apply_control_request(db, task, clone_hook=hook)
    assert not outcome.ok and "no weights to copy" in outcome.message
    [new] = [r for r in db.list_runs(experiment.experiment_id) if r.cloned_from == parent.run_id]
    assert new.status == R.FAILED and "no weights to copy" in new.error
    failed = db.get_task("controller", task.task_id)
    assert failed.status == TaskStatus.FAILED and failed.error == outcome.message


def test_clone_without_start_leaves_the_new_run_new(db, experiment):
    parent = _run_in(db, experiment.experiment_id, R.ONGOING)
    db.request_run_control(parent.run_id, "clone", config={"hidden": 16})
    outcome = apply_control_request(db, _claim(db, experiment.experiment_id), start_clone=False)
    assert db.get_run(outcome.run_id).status == R.NEW


def test_clone_config_replaces_top_level_keys():
    assert clone_config({"a": 1, "b": {"c": 2}}, {"b": {"d": 3}}) == {"a": 1, "b": {"d": 3}}
    assert clone_config([1, 2], {"a": 1}) == {"a": 1}


# --- PostgreSQL: a transition racing the request ------------------------------------------------


def _wait_for_lock_wait(db, deadline_s: float = 20.0) -> None:
    """Until some session of this database waits for a row lock (what the server shows)."""
    from sqlalchemy import text

    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        with db.engine.connect() as conn:
            waiting = conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
        if waiting:
            return
        time.sleep(0.02)
    raise AssertionError("no session came to wait for the run's row lock")


@pytest.mark.parametrize("race", ["completes", "stops"])
def test_postgresql_a_racing_transition_is_seen_by_the_request(db, experiment, race):
    """The run's row is locked before the checks read it: a transition committed meanwhile decides."""
    if db.dialect != "postgresql":
        pytest.skip("SQLite's BEGIN IMMEDIATE already orders the two writers")
    from rapidfire_state.db.store.runs import change_run_without_commit, plan_run_change

    run = _run_in(db, experiment.experiment_id, R.ONGOING)
    target = R.COMPLETED if race == "completes" else R.STOPPED
    outcome: list = []
    with db._write_connection() as conn:
        change, params = plan_run_change(target, None, None)
        change_run_without_commit(conn, run.run_id, change, params, "racing transition")
        # the transition is made but not committed: the request must wait for it
        asker = threading.Thread(
            target=lambda: outcome.append(_attempt(lambda: db.request_run_control(run.run_id, "stop")))
        )
        asker.start()
        _wait_for_lock_wait(db)
        assert not outcome  # still waiting on the run's row
    asker.join(30)
    [result] = outcome
    assert isinstance(result, ControlRequestError), result
    assert f"it is {target.value}" in str(result)
    assert db.list_tasks("controller") == []


def _attempt(call):
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc
