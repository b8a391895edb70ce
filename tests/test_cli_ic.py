"""``rapidfire-state ic``: requests from another terminal, applied by a controller in another process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from rapidfire_state.cli import main
from rapidfire_state.constants import ControllerTask, RunStatus, TaskStatus

# The console, as a person runs it; it also proves that torch and mlflow were never imported.
CONSOLE = textwrap.dedent(
    """
    import sys
    from rapidfire_state.cli import main
    code = main(sys.argv[1:])
    loaded = [name for name in ("torch", "mlflow") if name in sys.modules]
    if loaded:
        print("imported:", loaded, file=sys.stderr)
        code = 99
    sys.exit(code)
    """
)

# A controller in a process of its own: claims requests of one experiment and applies them.
CONTROLLER = textwrap.dedent(
    """
    import sys, time
    from rapidfire_state import StateDB
    from rapidfire_state.interactive import apply_control_request
    url, experiment_id, wanted = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    db = StateDB(url)
    def copy_weights(new_run, parent, warm):
        print(f"hook {new_run.run_id} {parent.run_id} {warm}", flush=True)
    done = 0
    deadline = time.monotonic() + 60
    while done < wanted and time.monotonic() < deadline:
        task = db.claim_controller_task(experiment_id)
        if task is None:
            time.sleep(0.05)
            continue
        outcome = apply_control_request(db, task, clone_hook=copy_weights)
        print("applied", outcome.ok, outcome.message, flush=True)
        done += 1
    db.close()
    sys.exit(0 if done == wanted else 1)
    """
)


@pytest.fixture
def setup(db, experiment):
    eid = experiment.experiment_id
    runs = {}
    for status in (RunStatus.ONGOING, RunStatus.STOPPED, RunStatus.COMPLETED):
        run = db.create_run(eid, {"lr": 0.1, "hidden": 8}, total_steps=16)
        for step in {
            RunStatus.ONGOING: [RunStatus.ONGOING],
            RunStatus.STOPPED: [RunStatus.ONGOING, RunStatus.STOPPED],
            RunStatus.COMPLETED: [RunStatus.ONGOING, RunStatus.COMPLETED],
        }[status]:
            db.transition_run(run.run_id, step)
        runs[status] = run.run_id
    return db, db.url.render_as_string(hide_password=False), eid, runs


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argument errors: argparse exits, as the console script would
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def console(url: str, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CONSOLE, "--url", url, *argv], capture_output=True, text=True, timeout=timeout
    )


def start_controller(url: str, experiment_id: int, wanted: int = 1) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CONTROLLER, url, str(experiment_id), str(wanted)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(controller: subprocess.Popen) -> str:
    out, err = controller.communicate(timeout=90)
    assert controller.returncode == 0, (out, err)
    return out


def test_no_wait_queues_each_action(setup, capsys):
    db, url, eid, runs = setup
    ongoing, stopped, completed = runs[RunStatus.ONGOING], runs[RunStatus.STOPPED], runs[RunStatus.COMPLETED]
    expected = []
    for argv, task_type, run_id in [
        (["stop", str(ongoing)], ControllerTask.IC_STOP, ongoing),
        (["resume", str(stopped)], ControllerTask.IC_RESUME, stopped),
        (["kill", str(stopped)], ControllerTask.IC_DELETE, stopped),
        (["clone", str(completed), "--config", '{"lr": 0.01}'], ControllerTask.IC_CLONE_MODIFY, completed),
        (["clone", str(ongoing), "--config", '{"hidden": 32}', "--warm", "-e", str(eid)],
         ControllerTask.IC_CLONE_MODIFY_WARM, ongoing),
    ]:
        code, out, err = run_cli(capsys, "--url", url, "ic", *argv, "--no-wait")
        assert (code, err) == (0, "")
        task = db.list_tasks("controller")[-1]
        assert out == f"ic {argv[0]} {run_id}: queued (controller task {task.task_id} of experiment {eid})\n"
        assert (task.task_type, task.run_id, task.status) == (task_type, run_id, TaskStatus.SCHEDULED)
        expected.append(task_type)
    assert [t.task_type for t in db.list_tasks("controller")] == expected
    assert [t.config for t in db.list_tasks("controller")][3:] == [{"lr": 0.01}, {"hidden": 32}]
    assert db.get_run(ongoing).status == RunStatus.ONGOING  # queueing changes no run


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["stop", "9999"], "run 9999 does not exist"),
        (["resume", "{completed}"], "cannot resume run {completed}: it is COMPLETED; resume needs a run that is STOPPED"),
        (["resume", "{ongoing}"], "it is ONGOING"),
        (["stop", "{stopped}"], "stop needs a run that is NEW or ONGOING"),
        (["kill", "{completed}"], "kill needs a run that is NEW, ONGOING or STOPPED"),
        (["clone", "9999", "--config", '{"lr": 1}'], "run 9999 does not exist"),
        (["clone", "{ongoing}", "--config", "{lr: 1}"], "is not valid JSON"),
        (["clone", "{ongoing}", "--config", "[1, 2]"], "a JSON object is required"),
        (["clone", "{ongoing}", "--config", '{"lr": NaN}'], "NaN is not a JSON number"),
        (["clone", "{ongoing}"], "--config"),
        (["stop", "{ongoing}", "-e", "{other}"], "is NEW; requests go to a RUNNING experiment"),
        (["stop", "{ongoing}", "-e", "555"], "experiment 555 does not exist"),
        (["stop", "x"], "invalid int value: 'x'"),
        (["stop", "-5"], "-5"),
        (["stop", "{ongoing}", "--timeout", "0"], "--timeout '0' is not valid"),
        (["pause", "{ongoing}"], "invalid choice: 'pause'"),
    ],
)
def test_invalid_requests_are_one_line_and_queue_nothing(setup, capsys, tmp_path, argv, needle):
    db, url, eid, runs = setup
    other = db.create_experiment("other", str(tmp_path / "experiments")).experiment_id
    names = {
        "ongoing": runs[RunStatus.ONGOING], "stopped": runs[RunStatus.STOPPED],
        "completed": runs[RunStatus.COMPLETED], "other": other,
    }
    def fill(text: str) -> str:
        for name, value in names.items():
            text = text.replace("{" + name + "}", str(value))
        return text

    code, out, err = run_cli(capsys, "--url", url, "ic", *map(fill, argv))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("rapidfire-state"), err
    assert fill(needle) in err
    assert db.list_tasks("controller") == []


def test_no_running_experiment_is_refused(setup, capsys):
    db, url, eid, runs = setup
    db.transition_experiment(eid, "COMPLETED")
    code, out, err = run_cli(capsys, "--url", url, "ic", "stop", str(runs[RunStatus.ONGOING]))
    assert code == 2 and "no experiment is RUNNING" in err and err.count("\n") == 1
    assert db.list_tasks("controller") == []


def test_a_missing_database_is_not_created(tmp_path, capsys):
    path = tmp_path / "nothing.db"
    code, _, err = run_cli(capsys, "--url", f"sqlite:///{path}", "ic", "stop", "1")
    assert code == 2 and "no database at" in err and not path.exists()


def test_stop_waits_for_the_controller_and_prints_the_outcome(setup):
    db, url, eid, runs = setup
    run_id = runs[RunStatus.ONGOING]
    controller = start_controller(url, eid)
    done = console(url, "ic", "stop", str(run_id), "--timeout", "60")
    assert (done.returncode, done.stderr) == (0, ""), done
    assert done.stdout == f"ic stop {run_id}: done (run {run_id} STOPPED)\n"
    assert f"applied True run {run_id} STOPPED" in finish(controller)
    assert db.get_run(run_id).status == RunStatus.STOPPED
    # and back, from another terminal again
    controller = start_controller(url, eid)
    done = console(url, "ic", "resume", str(run_id))
    assert done.returncode == 0 and done.stdout == f"ic resume {run_id}: done (run {run_id} ONGOING)\n", done
    finish(controller)
    assert db.get_run(run_id).status == RunStatus.ONGOING


def test_kill_and_warm_clone_wait_for_the_controller(setup):
    db, url, eid, runs = setup
    parent = runs[RunStatus.COMPLETED]
    controller = start_controller(url, eid, wanted=2)
    cloned = console(url, "ic", "clone", str(parent), "--config", '{"lr": 0.02}', "--warm")
    killed = console(url, "ic", "kill", str(runs[RunStatus.STOPPED]))
    out = finish(controller)
    [new] = [r for r in db.list_runs(eid) if r.cloned_from == parent]
    assert cloned.returncode == 0, cloned
    assert cloned.stdout == f"ic clone {parent}: done (run {new.run_id} created from run {parent} (warm start))\n"
    assert f"hook {new.run_id} {parent} True" in out
    assert (new.config, new.warm_started_from, new.status) == ({"lr": 0.02, "hidden": 8}, parent, RunStatus.ONGOING)
    stopped = runs[RunStatus.STOPPED]
    assert killed.returncode == 0 and killed.stdout == f"ic kill {stopped}: done (run {stopped} KILLED)\n", killed
    assert db.get_run(stopped).status == RunStatus.KILLED


def test_a_request_the_controller_refuses_exits_1_with_its_error(setup):
    """This test process is the controller: the run completes before the request is applied."""
    db, url, eid, runs = setup
    run_id = runs[RunStatus.ONGOING]
    asker = subprocess.Popen(
        [sys.executable, "-c", CONSOLE, "--url", url, "ic", "stop", str(run_id)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    from rapidfire_state.interactive import apply_control_request

    deadline = time.monotonic() + 30
    task = None
    while task is None and time.monotonic() < deadline:
        task = db.claim_controller_task(eid)
        time.sleep(0.02)
    assert task is not None, asker.communicate(timeout=5)
    db.transition_run(run_id, RunStatus.COMPLETED, reason="all chunks trained")
    outcome = apply_control_request(db, task)
    out, err = asker.communicate(timeout=30)
    assert asker.returncode == 1 and out == ""
    assert err == f"ic stop {run_id}: failed: {outcome.message}\n"
    assert "it is COMPLETED now" in err


def test_a_timeout_leaves_the_request_queued_and_says_so(setup):
    db, url, eid, runs = setup
    run_id = runs[RunStatus.ONGOING]
    started = time.monotonic()
    waited = console(url, "ic", "stop", str(run_id), "--timeout", "0.5")
    assert time.monotonic() - started < 30
    [task] = db.list_tasks("controller")
    assert waited.returncode == 3 and waited.stdout == ""
    assert waited.stderr == (
        f"ic stop {run_id}: not applied within 0.5 s; still SCHEDULED as controller task {task.task_id} of "
        f"experiment {eid} (it stays queued: the controller applies it when it next reaches the run)\n"
    )
    assert task.status == TaskStatus.SCHEDULED
    # a second stop while that one is open is refused, naming it
    again = console(url, "ic", "stop", str(run_id), "--no-wait")
    assert again.returncode == 2 and f"controller task {task.task_id}" in again.stderr and "already open" in again.stderr
    assert len(db.list_tasks("controller")) == 1


def test_ic_help_lists_the_actions(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["ic", "--help"])
    out = capsys.readouterr().out
    assert raised.value.code == 0
    for action in ("stop", "resume", "kill", "clone"):
        assert action in out
    assert "0 done, 1 refused by the controller" in out


def test_the_queued_line_names_the_task(setup, capsys):
    """The queued line names the task, which ``rapidfire-state tasks --json`` then lists."""
    db, url, eid, runs = setup
    code, out, _ = run_cli(capsys, "--url", url, "ic", "kill", str(runs[RunStatus.ONGOING]), "--no-wait")
    task_id = int(out.split("controller task ")[1].split()[0])
    code, out, _ = run_cli(capsys, "--url", url, "tasks", "--json")
    [row] = [r for r in json.loads(out) if r["kind"] == "controller"]
    assert (row["task_id"], row["task_type"], row["status"]) == (task_id, "IC_DELETE", "SCHEDULED")


def test_ctrl_c_while_waiting_says_the_request_stays_queued(setup):
    import signal

    db, url, eid, runs = setup
    run_id = runs[RunStatus.ONGOING]
    asker = subprocess.Popen(
        [sys.executable, "-c", CONSOLE, "--url", url, "ic", "kill", str(run_id)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 30
    while not db.list_tasks("controller") and time.monotonic() < deadline:  # queued: now it waits
        time.sleep(0.02)
    [task] = db.list_tasks("controller")
    asker.send_signal(signal.SIGINT)
    out, err = asker.communicate(timeout=30)
    assert asker.returncode == 130 and out == ""
    assert err == (
        f"ic kill {run_id}: interrupted; the request stays queued as controller task {task.task_id} "
        f"of experiment {eid}\n"
    )
    assert db.get_task("controller", task.task_id).status == TaskStatus.SCHEDULED
