"""The console: ``rapidfire-state status``, ``watch``, ``doctor`` and the limited listings (issue 11, item 6).

Real databases on both backends (the ``db``/``db_url`` fixtures), real processes
(a dead owner is the pid of a subprocess that exited), real files, a real
pseudo-terminal for ``watch`` and real signals.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from rapidfire_state.cli import EXIT_DOCTOR_FOUND, main
from rapidfire_state.db import migrate
from rapidfire_state.db.engine import resolve_url
from rapidfire_state.db.store.processes import HOST

REPO = Path(__file__).resolve().parents[1]
OUTBOX = "file:///tmp/rf-console-mlruns"


def url_of(db) -> str:
    return db.url.render_as_string(hide_password=False)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def exited_pid() -> int:
    """The pid of a process that has exited (and was reaped): nobody owns it now."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def running_experiment(db, tmp_path, name: str = "exp", *, owner_pid: int | None = None, runs: int = 3, **options):
    """A RUNNING experiment owned by ``owner_pid`` (this process by default) with ``runs`` ONGOING runs."""
    experiment = db.create_experiment(
        name, str(tmp_path / "exps"), owner_pid=owner_pid or os.getpid(), owner_host=HOST,
        config_options=options or None,
    )
    db.transition_experiment(experiment.experiment_id, "RUNNING")
    made = []
    for i in range(runs):
        run = db.create_run(experiment.experiment_id, {"lr": 0.01 * (i + 1), "model": {"hidden": 16 * (i + 1)}},
                            total_steps=8)
        db.transition_run(run.run_id, "ONGOING")
        made.append(run)
    return experiment, made


def log_metrics(db, run, values: dict, step: int, name: str | None = None) -> None:
    stream = db.metric_stream(OUTBOX, name or f"mlflow-{run.run_id}", run_id=run.run_id)
    db.append_metric_rows([
        {"stream_id": stream, "kind": "METRIC", "key": key, "value": value, "step": step, "timestamp_ms": 1000 + step}
        for key, value in values.items()
    ])


def downgrade_before_outbox(url: str) -> str:
    from rapidfire_state import StateDB

    previous = migrate.REVISIONS[migrate.REVISIONS.index("0005_metric_outbox") - 1]
    database = StateDB(url)
    try:
        database.downgrade(previous)
    finally:
        database.close()
    return previous


# --- status ------------------------------------------------------------------------------------


def test_status_on_a_database_without_experiments(db, capsys):
    code, out, err = run_cli(capsys, "--url", url_of(db), "status")
    assert code == 0 and err == ""
    assert out.strip() == f"no experiments in {db.url_text}"
    code, out, _ = run_cli(capsys, "--url", url_of(db), "status", "--json")
    assert code == 0 and json.loads(out)["experiment"] is None and json.loads(out)["running"] is False


def test_status_of_a_running_experiment(db, tmp_path, capsys):
    experiment, runs = running_experiment(db, tmp_path)
    eid = experiment.experiment_id
    db.set_experiment_task(eid, "RUN_FIT")
    db.transition_run(runs[2].run_id, "STOPPED")
    db.create_worker_task(eid, runs[0].run_id, 0, 0)
    claimed = db.create_worker_task(eid, runs[1].run_id, 1, 0)
    assert db.claim_worker_task(1).task_id == claimed.task_id
    db.register_worker(eid, 0, os.getpid())
    db.register_worker(eid, 1, exited_pid())  # its process is gone: stale
    db.upsert_shm_object("a", experiment_id=eid, run_id=runs[0].run_id, num_bytes=1000)
    db.upsert_shm_object("b", experiment_id=eid, run_id=runs[1].run_id, num_bytes=2000)
    db.upsert_shm_object("c", experiment_id=eid, location="DISK", disk_path=str(tmp_path / "c.pt"), num_bytes=500)
    log_metrics(db, runs[0], {"train_loss": 0.5, "val_accuracy": 0.8}, 1)

    code, out, err = run_cli(capsys, "--url", url_of(db), "status", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["running"] is True
    assert report["experiment"]["experiment_id"] == eid and report["experiment"]["current_task"] == "RUN_FIT"
    assert report["experiment"]["owner_gone"] is None
    assert report["runs"] == {"ONGOING": 2, "STOPPED": 1} and report["runs_total"] == 3
    assert report["open_tasks"] == {"worker": {"IN_PROGRESS": 1, "SCHEDULED": 1}, "controller": {}}
    assert [w["worker_id"] for w in report["workers"]["alive"]] == [0]
    assert [(w["worker_id"], "pid not running" in w["reason"]) for w in report["workers"]["stale"]] == [(1, True)]
    assert report["shm"] == {"DISK": {"objects": 1, "bytes": 500}, "SHM": {"objects": 2, "bytes": 3000}}
    assert report["metrics_pending"] == 2

    code, out, _ = run_cli(capsys, "--url", url_of(db), "status")
    lines = out.splitlines()
    assert code == 0
    assert lines[0] == (f"experiment {eid} 'exp': RUNNING, current task RUN_FIT, owner pid {os.getpid()} on {HOST}")
    assert "  runs: 3 (ONGOING 2, STOPPED 1)" in lines
    assert "  open tasks: worker IN_PROGRESS 1, SCHEDULED 1; controller none" in lines
    assert "  workers: 1 alive, 1 stale, 0 exited" in lines
    assert any(line.startswith("    stale: worker 1") and f"fail-stale -e {eid}" in line for line in lines)
    assert "  shared memory: DISK 1 object 500 B, SHM 2 objects 2.9 KiB" in lines
    assert lines[-1] == "  metric rows pending: 2"

    # a heartbeat older than the grace (database clock) is stale too
    time.sleep(0.05)
    code, out, _ = run_cli(capsys, "--url", url_of(db), "status", "--json", "--grace", "0")
    stale = json.loads(out)["workers"]["stale"]
    assert code == 0 and any(w["worker_id"] == 0 and "missed its heartbeat" in w["reason"] for w in stale)


def test_status_with_no_experiment_running_shows_the_latest(db, tmp_path, capsys):
    first, _ = running_experiment(db, tmp_path, "first")
    db.cleanup_experiment_state(first.experiment_id, status="COMPLETED")
    second, _ = running_experiment(db, tmp_path, "second", runs=1)
    db.cleanup_experiment_state(second.experiment_id, status="FAILED", run_status="FAILED", error="boom")
    code, out, err = run_cli(capsys, "--url", url_of(db), "status")
    lines = out.splitlines()
    assert code == 0, err
    assert lines[0] == "no experiment is running; the latest:"
    assert lines[1].startswith(f"experiment {second.experiment_id} 'second': FAILED, ended ")
    assert "  runs: 1 (FAILED 1)" in lines
    # -e picks another one
    code, out, _ = run_cli(capsys, "--url", url_of(db), "status", "-e", str(first.experiment_id), "--json")
    report = json.loads(out)
    assert code == 0 and report["running"] is False and report["experiment"]["name"] == "first"
    assert report["runs"] == {"KILLED": 3}
    code, out, err = run_cli(capsys, "--url", url_of(db), "status", "-e", "999")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "999" in err


def test_status_one_revision_behind_reads_it_as_it_is(db_url, tmp_path, capsys):
    from rapidfire_state import StateDB

    database = StateDB(db_url)
    try:
        experiment, _ = running_experiment(database, tmp_path)
    finally:
        database.close()
    previous = downgrade_before_outbox(db_url)
    code, out, err = run_cli(capsys, "--url", db_url, "status")
    assert code == 0, err
    assert out.splitlines()[-1] == "  metric rows pending: -"
    code, out, _ = run_cli(capsys, "--url", db_url, "status", "--json")
    assert code == 0 and json.loads(out)["metrics_pending"] is None and json.loads(out)["runs"] == {"ONGOING": 3}
    # doctor says the schema is behind, and how to upgrade; watch (in a pipe) still shows the runs
    code, out, _ = run_cli(capsys, "--url", db_url, "doctor")
    assert code == EXIT_DOCTOR_FOUND
    assert f"schema: the database is at revision {previous}" in out and "`rapidfire-state db upgrade`" in out
    assert migrate.probe_database(resolve_url(db_url)).revision == previous  # never upgraded


# --- runs and the limits -----------------------------------------------------------------------


def test_runs_show_config_and_progress_and_stop_at_the_limit(db, tmp_path, capsys):
    experiment, runs = running_experiment(db, tmp_path, runs=5)
    db.update_run_progress(runs[0].run_id, completed_steps=4, progress=0.5)
    code, out, err = run_cli(capsys, "--url", url_of(db), "runs", "--json")
    rows = json.loads(out)
    assert code == 0 and err == ""
    assert rows[0]["config"] == {"lr": 0.01, "model.hidden": 16} and rows[0]["progress"] == 0.5
    assert len(rows) == 5 and "config_leaf" not in rows[0]
    code, out, err = run_cli(capsys, "--url", url_of(db), "runs", "--json", "--limit", "2")
    assert code == 0 and [r["run_id"] for r in json.loads(out)] == [runs[0].run_id, runs[1].run_id]
    assert err.strip() == "(listing cut at --limit 2: 2 runs shown, more exist)"
    code, out, _ = run_cli(capsys, "--url", url_of(db), "runs", "--limit", "2")
    lines = out.splitlines()
    assert code == 0 and "config" in lines[0].split() and "progress" in lines[0].split()
    assert "lr=0.01 model.hidden=16" in lines[1] and "0.500" in lines[1].split()
    assert lines[-1] == "(listing cut at --limit 2: 2 runs shown, more exist)"
    code, out, _ = run_cli(capsys, "--url", url_of(db), "runs", "--limit", "5")
    assert code == 0 and "listing cut" not in out
    for argv in (["tasks", "--all"], ["workers"], ["shm"]):
        code, out, _ = run_cli(capsys, "--url", url_of(db), *argv, "--limit", "1", "--json")
        assert code == 0 and json.loads(out) == []
    for i in range(3):
        db.create_worker_task(experiment.experiment_id, runs[i].run_id, 0, i)
    code, out, err = run_cli(capsys, "--url", url_of(db), "tasks", "--limit", "2", "--json")
    assert code == 0 and len(json.loads(out)) == 2 and "cut at --limit 2" in err


# --- doctor -----------------------------------------------------------------------------------


def findings(capsys, db, *extra: str) -> tuple[int, list[dict]]:
    code, out, err = run_cli(capsys, "--url", url_of(db), "doctor", "--json", *extra)
    assert err == ""
    report = json.loads(out)
    assert report["ok"] == (code == 0)
    return code, report["findings"]


def good_database(db, tmp_path):
    """A running experiment owned by this process, with a live worker, rows and files that agree."""
    ended, _ = running_experiment(db, tmp_path, "ended", runs=1)
    db.cleanup_experiment_state(ended.experiment_id)
    experiment, runs = running_experiment(db, tmp_path)
    eid = experiment.experiment_id
    db.register_worker(eid, 0, os.getpid())
    db.create_worker_task(eid, runs[0].run_id, 0, 0)
    db.update_run_progress(runs[1].run_id, completed_steps=8, progress=1.0)
    db.transition_run(runs[1].run_id, "COMPLETED")
    spilled = tmp_path / "exps" / "exp" / "runs" / f"run_{runs[0].run_id}" / "checkpoints" / "checkpoint_chunk_0.pt"
    spilled.parent.mkdir(parents=True)
    spilled.write_bytes(b"weights")
    db.upsert_shm_object("spilled", experiment_id=eid, run_id=runs[0].run_id, chunk_id=0, location="DISK",
                         disk_path=str(spilled), num_bytes=7)
    db.upsert_shm_object("model", experiment_id=eid, run_id=runs[0].run_id, num_bytes=100)
    return experiment, runs


def test_doctor_is_clean_on_a_good_database(db, tmp_path, capsys):
    good_database(db, tmp_path)
    code, found = findings(capsys, db)
    assert (code, found) == (0, [])
    code, out, _ = run_cli(capsys, "--url", url_of(db), "doctor")
    assert code == 0 and out.startswith(f"no problems found in {db.url_text}")


def test_doctor_finds_a_running_experiment_whose_owner_is_dead(db, tmp_path, capsys):
    experiment, _ = running_experiment(db, tmp_path, owner_pid=exited_pid())
    eid = experiment.experiment_id
    code, found = findings(capsys, db)
    assert code == EXIT_DOCTOR_FOUND
    assert [(f["check"], f["repair"]) for f in found] == [("dead_owner", f"`rapidfire-state cleanup -e {eid} --failed`")]
    assert "is RUNNING but its owner process" in found[0]["what"] and "pid not running" in found[0]["what"]
    # the repair it names repairs it
    code, out, err = run_cli(capsys, "--url", url_of(db), "cleanup", "-e", str(eid), "--failed")
    assert code == 0, err
    assert findings(capsys, db) == (0, [])


def test_doctor_finds_shm_rows_of_an_ended_experiment_and_missing_files(db, tmp_path, capsys):
    experiment, runs = good_database(db, tmp_path)
    ended = db.get_experiment_by_name("ended")
    db.upsert_shm_object("left-behind", experiment_id=ended.experiment_id, num_bytes=2048)
    missing = tmp_path / "exps" / "exp" / "shm_spill" / "m" / "gone.pt"
    db.upsert_shm_object("gone", experiment_id=experiment.experiment_id, location="DISK", disk_path=str(missing))
    code, found = findings(capsys, db)
    assert code == EXIT_DOCTOR_FOUND
    assert [f["check"] for f in found] == ["shm_rows", "shm_rows"]
    assert "of experiment %d, which is COMPLETED" % ended.experiment_id in found[0]["what"]
    assert found[0]["repair"] == f"`rapidfire-state cleanup -e {ended.experiment_id}`"
    assert f"names {missing}, which is missing" in found[1]["what"] and "reconcile()" in found[1]["repair"]
    code, _, _ = run_cli(capsys, "--url", url_of(db), "cleanup", "-e", str(ended.experiment_id))
    assert code == 0
    assert [f["check"] for f in findings(capsys, db)[1]] == ["shm_rows"]  # the running experiment's is left


def test_doctor_finds_completed_runs_short_of_full_progress(db, tmp_path, capsys):
    experiment, runs = good_database(db, tmp_path)
    db.update_run_progress(runs[2].run_id, completed_steps=6, num_chunks_visited=3, progress=0.75)
    db.transition_run(runs[2].run_id, "COMPLETED")
    code, found = findings(capsys, db)
    assert code == EXIT_DOCTOR_FOUND and [f["check"] for f in found] == ["completed_progress"]
    assert found[0]["what"].startswith(f"run {runs[2].run_id} of experiment {experiment.experiment_id} is COMPLETED "
                                       "with progress 0.750 (6/8 steps, 3 chunks")
    assert f"history run {runs[2].run_id}" in found[0]["repair"]
    code, found = findings(capsys, db, "-e", str(db.get_experiment_by_name("ended").experiment_id))
    assert (code, found) == (0, [])  # -e narrows it to another experiment


def test_doctor_finds_open_tasks_of_ended_runs(db, tmp_path, capsys):
    experiment, runs = good_database(db, tmp_path)
    task = db.create_worker_task(experiment.experiment_id, runs[2].run_id, 0, 1)
    db.transition_run(runs[2].run_id, "KILLED")
    code, found = findings(capsys, db)
    assert code == EXIT_DOCTOR_FOUND and [f["check"] for f in found] == ["open_tasks_of_ended_runs"]
    assert found[0]["what"] == (f"worker task {task.task_id} (TRAIN_VAL) is SCHEDULED but its run {runs[2].run_id} "
                                "is KILLED")


def test_doctor_finds_files_no_row_knows_and_stale_workers(db, tmp_path, capsys):
    experiment, runs = good_database(db, tmp_path)
    base = tmp_path / "exps" / "exp"
    orphan = base / "runs" / f"run_{runs[1].run_id}" / "checkpoints" / "checkpoint_chunk_3.pt"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"x")
    spill = base / "shm_spill" / "controller-shm" / "old-0123.pt"
    spill.parent.mkdir(parents=True)
    spill.write_bytes(b"y")
    dead_temp = spill.parent / f".ckpt-abc.{exited_pid()}.rftmp"
    dead_temp.write_bytes(b"z")
    live_temp = spill.parent / f".ckpt-def.{os.getpid()}.rftmp"  # a write in progress
    live_temp.write_bytes(b"w")
    (base / "datasets").mkdir(exist_ok=True)
    (base / "datasets" / "dataset.dill").write_bytes(b"d")  # not a file the shm manager writes
    db.register_worker(experiment.experiment_id, 1, exited_pid())
    code, found = findings(capsys, db)
    assert code == EXIT_DOCTOR_FOUND
    assert [f["check"] for f in found] == ["stale_workers", "orphan_files", "orphan_files", "orphan_files"]
    assert found[0]["repair"] == f"`rapidfire-state fail-stale -e {experiment.experiment_id}`"
    assert [f["what"].split()[0] for f in found[1:]] == [str(orphan), str(spill), str(dead_temp)]
    assert all(f["repair"].startswith("`rm -- ") for f in found[1:])
    # the repairs it names repair it
    assert run_cli(capsys, "--url", url_of(db), "fail-stale", "-e", str(experiment.experiment_id))[0] == 0
    for path in (orphan, spill, dead_temp):
        path.unlink()
    assert findings(capsys, db) == (0, [])
    code, out, _ = run_cli(capsys, "--url", url_of(db), "doctor")
    assert code == 0


def test_doctor_finds_a_damaged_sqlite_file_and_foreign_keys(tmp_path, capsys):
    import sqlite3

    from rapidfire_state import StateDB

    path = tmp_path / "fk.db"
    database = StateDB(str(path))
    experiment, _ = running_experiment(database, tmp_path, runs=1)
    database.close()
    connection = sqlite3.connect(path)  # foreign keys are off on a plain connection
    connection.execute("UPDATE runs SET experiment_id = 77")
    connection.commit()
    connection.close()
    code, out, err = run_cli(capsys, "--url", str(path), "doctor")
    assert code == EXIT_DOCTOR_FOUND, err
    assert "foreign_keys: runs row 1 names a missing experiments row" in out


# --- watch ------------------------------------------------------------------------------------


def cli_command(url: str, *argv: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from rapidfire_state.cli import main; sys.exit(main())", "--url", url, *argv]


def read_until(fd: int, needle: bytes, timeout: float, seen: bytearray) -> bool:
    """Read the pty master into ``seen`` until ``needle`` shows up or the time is up."""
    deadline = time.monotonic() + timeout
    while needle not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError as exc:  # EIO: the child closed its side
                if exc.errno == errno.EIO:
                    break
                raise
            if not chunk:
                break
            seen += chunk
    return needle in seen


def drain(fd: int, seen: bytearray) -> None:
    read_until(fd, b"\x00never\x00", 0.5, seen)


def spawn_in_pty(argv: list[str]) -> tuple[subprocess.Popen, int]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "40"}
    env.pop("NO_COLOR", None)
    child = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO, close_fds=True,
                             start_new_session=True)
    os.close(slave)
    return child, master


def test_watch_in_a_terminal_draws_the_table_and_exits_when_the_experiment_ends(db, tmp_path):
    experiment, runs = running_experiment(db, tmp_path, num_epochs=2, num_chunks=4)
    db.update_run_progress(runs[0].run_id, completed_steps=2, num_chunks_visited=1, progress=0.25)
    log_metrics(db, runs[0], {"train_loss": 0.6931, "val_accuracy": 0.5}, 1)
    child, master = spawn_in_pty(cli_command(url_of(db), "watch", "--interval", "0.2"))
    seen = bytearray()
    try:
        assert read_until(master, b"val acc", 30, seen), seen.decode(errors="replace")
        assert read_until(master, b"0.6931", 10, seen), seen.decode(errors="replace")
        text = seen.decode(errors="replace")
        assert "\x1b[" in text  # drawn for a terminal, not plain lines
        assert "train loss" in text and "1/4" in text and "25%" in text and "━" in text
        # it refreshes in place: new progress and metrics show up without a new process
        db.update_run_progress(runs[0].run_id, completed_steps=4, num_chunks_visited=2, progress=0.5)
        log_metrics(db, runs[0], {"train_loss": 0.3141, "val_acc": 0.875}, 2)
        assert read_until(master, b"0.3141", 10, seen), seen.decode(errors="replace")
        assert read_until(master, b"0.875", 10, seen)
        for run in runs:
            db.update_run_progress(run.run_id, completed_steps=8, progress=1.0)
            db.transition_run(run.run_id, "COMPLETED")
        db.cleanup_experiment_state(experiment.experiment_id)
        assert child.wait(timeout=15) == 0
        drain(master, seen)
        assert f"experiment {experiment.experiment_id} 'exp' COMPLETED" in seen.decode(errors="replace")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        os.close(master)


def test_watch_exits_130_on_sigint_with_one_line(db, tmp_path):
    running_experiment(db, tmp_path, runs=2)
    child, master = spawn_in_pty(cli_command(url_of(db), "watch", "--interval", "0.2"))
    seen = bytearray()
    try:
        assert read_until(master, b"val acc", 30, seen), seen.decode(errors="replace")
        drain(master, seen)
        before = len(seen)
        os.kill(child.pid, signal.SIGINT)
        assert child.wait(timeout=10) == 130
        drain(master, seen)
        after = seen[before:].decode(errors="replace")
        assert "rapidfire-state: interrupted" in after and "Traceback" not in after
        assert after.count("interrupted") == 1
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        os.close(master)


def test_watch_in_a_pipe_prints_plain_lines_until_the_experiment_ends(db, tmp_path):
    experiment, runs = running_experiment(db, tmp_path, runs=2)
    child = subprocess.Popen(cli_command(url_of(db), "watch", "--interval", "0.2"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        first = child.stdout.readline()
        assert first == f"experiment {experiment.experiment_id} 'exp': RUNNING, task IDLE | runs 2 (ONGOING 2)\n"
        assert child.stdout.readline().startswith(f"run {runs[0].run_id} ONGOING epoch 0 chunk 0 0%")
        assert child.stdout.readline().startswith(f"run {runs[1].run_id} ONGOING")
        db.update_run_progress(runs[1].run_id, completed_steps=4, num_chunks_visited=1, progress=0.5)
        log_metrics(db, runs[1], {"train_loss": 0.25, "val_accuracy": 0.75}, 1)
        line = child.stdout.readline()
        while "train_loss 0.25 " not in line:  # the progress and the metrics may come in two reads
            assert line.startswith(f"run {runs[1].run_id} ONGOING"), line
            line = child.stdout.readline()
        assert line == f"run {runs[1].run_id} ONGOING epoch 0 chunk 1 50% train_loss 0.25 val_acc 0.75\n"
        db.cleanup_experiment_state(experiment.experiment_id)
        out, err = child.communicate(timeout=15)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0 and err == ""
    assert "\x1b" not in out
    assert out.splitlines()[-1] == f"experiment {experiment.experiment_id} 'exp' COMPLETED"
    assert f"run {runs[0].run_id} KILLED" in out


def test_watch_of_an_ended_experiment_shows_it_once(db, tmp_path, capsys):
    experiment, runs = running_experiment(db, tmp_path, runs=1)
    db.cleanup_experiment_state(experiment.experiment_id)
    code, out, err = run_cli(capsys, "--url", url_of(db), "watch")
    assert code == 0 and err == ""
    assert out.splitlines()[0] == "no experiment is running; the latest:"
    assert out.splitlines()[-1] == f"experiment {experiment.experiment_id} 'exp' COMPLETED"


def test_snapshot_reads_only_new_metric_rows_and_keeps_the_last_value(db, tmp_path):
    from rapidfire_state.console import run_table, snapshot

    experiment, runs = running_experiment(db, tmp_path, runs=2)
    log_metrics(db, runs[0], {"train_loss": 1.0, "val_acc": 0.1}, 1)
    log_metrics(db, runs[0], {"train_loss": 0.5}, 2)
    log_metrics(db, runs[1], {"other": 3.0}, 1)
    first = snapshot(db, experiment.experiment_id)
    assert (first.train_loss(runs[0].run_id), first.val_accuracy(runs[0].run_id)) == (0.5, 0.1)
    assert (first.train_loss(runs[1].run_id), first.val_accuracy(runs[1].run_id)) == (None, None)
    log_metrics(db, runs[0], {"val_accuracy": 0.9}, 3)
    second = snapshot(db, experiment.experiment_id, previous=first)
    assert second.metrics.cursor > first.metrics.cursor
    assert (second.train_loss(runs[0].run_id), second.val_accuracy(runs[0].run_id)) == (0.5, 0.9)
    table = run_table(second)
    assert [column.header for column in table.columns][:2] == ["run", "status"] and table.row_count == 2
    limited = snapshot(db, experiment.experiment_id, limit=1)
    assert limited.truncated and len(limited.runs) == 1 and "1 more runs not shown" in run_table(limited).caption


def test_console_commands_import_neither_torch_nor_mlflow(tmp_path):
    from rapidfire_state import StateDB

    path = tmp_path / "s.db"
    database = StateDB(str(path))
    running_experiment(database, tmp_path, runs=1)
    database.close()
    code = (
        "import sys\n"
        "from rapidfire_state.cli import main\n"
        f"assert main(['--url', {str(path)!r}, 'status']) == 0\n"
        f"assert main(['--url', {str(path)!r}, 'doctor']) == 0\n"
        f"assert main(['--url', {str(path)!r}, 'runs', '--limit', '5']) == 0\n"
        "from rapidfire_state.console import run_table, snapshot\n"
        "print('LOADED', [m for m in ('torch', 'mlflow', 'alembic') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "LOADED []" in out


def test_status_of_a_given_experiment_while_another_runs(db, tmp_path, capsys):
    first, _ = running_experiment(db, tmp_path, "first", runs=1)
    db.cleanup_experiment_state(first.experiment_id)
    running_experiment(db, tmp_path, "second", runs=1)
    code, out, _ = run_cli(capsys, "--url", url_of(db), "status", "-e", str(first.experiment_id))
    assert code == 0 and out.splitlines()[0].startswith(f"experiment {first.experiment_id} 'first': COMPLETED")
    code, out, _ = run_cli(capsys, "--url", url_of(db), "status", "--json")
    assert code == 0 and json.loads(out)["shown"] == "running" and json.loads(out)["experiment"]["name"] == "second"


@pytest.mark.parametrize("argv, needle", [
    (["watch", "--interval", "0"], "--interval '0' is not valid"),
    (["status", "--grace", "-1"], "--grace '-1' is not valid"),
    (["doctor", "--grace", "soon"], "--grace 'soon' is not valid"),
    (["runs", "--limit", "0"], "--limit '0' is not valid"),
    (["shm", "--limit", "x"], "--limit 'x' is not valid"),
])
def test_console_bad_arguments_are_one_line(argv, needle, tmp_path):
    result = subprocess.run(cli_command(str(tmp_path / "x.db"), *argv), capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and needle in result.stderr
    assert not (tmp_path / "x.db").exists()


def test_console_readers_on_a_missing_database_create_nothing(tmp_path, capsys):
    missing = tmp_path / "none.db"
    for argv in (["status"], ["watch"], ["doctor"]):
        code, out, err = run_cli(capsys, "--url", str(missing), *argv)
        assert code == 2 and out == "" and "no database at" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == [tmp_path / "rf_home"]


def test_console_readers_leave_a_sqlite_database_byte_for_byte(tmp_path, capsys):
    from rapidfire_state import StateDB

    path = tmp_path / "kept.db"
    database = StateDB(str(path))
    experiment, runs = running_experiment(database, tmp_path, runs=2)
    log_metrics(database, runs[0], {"train_loss": 0.1}, 1)
    database.cleanup_experiment_state(experiment.experiment_id)
    database.close()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    for argv in (["status"], ["status", "--json"], ["doctor"], ["watch"], ["runs", "--limit", "1"]):
        code, _, err = run_cli(capsys, "--url", str(path), *argv)
        assert code == 0, (argv, err)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # no -wal, -shm, backup
