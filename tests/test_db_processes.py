"""Which process a row records, and whether it is still there (``rapidfire_state/db/store/processes.py``).

A row of this host names its process by pid, OS start time and, since revision
0008, its process identity: ``"<boot id>:<start in clock ticks since boot>"``.
The OS start time is the boot time plus the start offset, and the OS moves its
boot time with every step of the wall clock (a virtual machine resumed, NTP
stepping) and by a whole second as NTP slews it.  So a row whose recorded start
time is an hour off the live process's is what a clock step leaves behind: the
identity, which no clock moves, must keep that process alive in every judge
(worker rows, task claims, metric-stream claims, an experiment's owner, the
cleanup's signals), while a recycled pid (another start since boot) or a host
restarted since (another boot id) is gone.  Real processes throughout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest
from sqlalchemy import text

from rapidfire_state.constants import TaskStatus
from rapidfire_state.db.store import processes
from rapidfire_state.db.store.processes import (
    HOST,
    gone_here,
    identity_changed,
    own_process,
    process_identity,
    process_start_time,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process identities are Linux's")


def sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def psutil_start_ticks(pid: int) -> int:
    """psutil's reading of the start since boot: its create time less the boot time it added."""
    process = psutil.Process(pid)
    return round((process.create_time() - psutil.boot_time()) * os.sysconf("SC_CLK_TCK"))


def another_start(identity: str, ticks: int = 1) -> str:
    boot, _, start = identity.partition(":")
    return f"{boot}:{int(start) + ticks}"


def rewrite(db, sql: str, **params) -> None:
    """Change rows as a clock step (or a recycled pid) leaves them."""
    with db.transaction() as session:
        session.execute(text(sql), params)


# --- the identity itself ---------------------------------------------------------------------


def test_the_identity_is_the_boot_id_and_the_start_since_boot():
    identity = process_identity(os.getpid())
    boot, _, start = identity.partition(":")
    with open("/proc/sys/kernel/random/boot_id") as file:
        assert boot == file.read().strip()
    assert int(start) == psutil_start_ticks(os.getpid())
    assert own_process() == (os.getpid(), process_start_time(os.getpid()), identity)


def test_each_process_has_its_own_identity_and_an_exited_one_has_none():
    child = sleeper()
    try:
        identity = process_identity(child.pid)
        assert identity is not None and identity != process_identity(os.getpid())
        assert identity.partition(":")[0] == process_identity(os.getpid()).partition(":")[0]
        assert process_identity(child.pid) == identity  # stable while it runs
    finally:
        child.kill()
        child.wait()
    assert process_identity(child.pid) is None


def test_a_command_name_with_spaces_and_parentheses_does_not_confuse_the_reading(tmp_path):
    # field 2 of /proc/<pid>/stat is the command name in parentheses, as the process set it
    odd = tmp_path / "a b) (c"
    odd.symlink_to(sys.executable)
    child = subprocess.Popen([str(odd), "-c", "import time; time.sleep(60)"])
    try:
        deadline = time.monotonic() + 10
        while psutil.Process(child.pid).name() != "a b) (c" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process_identity(child.pid) == f"{process_identity(os.getpid()).partition(':')[0]}:" \
            f"{psutil_start_ticks(child.pid)}"
    finally:
        child.kill()
        child.wait()


def test_gone_here_by_identity():
    own = process_identity(os.getpid())
    started = process_start_time(os.getpid())
    # a clock step of an hour: the recorded start time is off, the identity is the process's
    assert gone_here(HOST, os.getpid(), started - 3600, own) is None
    assert gone_here(HOST, os.getpid(), started + 3600, own) is None
    assert "another process" in gone_here(HOST, os.getpid(), started, another_start(own))
    boot, _, start = own.partition(":")
    assert "restarted" in gone_here(HOST, os.getpid(), started, f"00000000-0000-0000-0000-000000000000:{start}")
    assert "restarted" in identity_changed(f"00000000-0000-0000-0000-000000000000:{start}", os.getpid())
    # another host's pid means nothing here, whatever its identity
    assert gone_here("another-host", os.getpid(), started, another_start(own)) is None


def test_gone_here_without_an_identity_is_judged_by_the_start_time():
    started = process_start_time(os.getpid())
    # the whole second the OS start time wanders by as NTP slews the clock is tolerated
    assert gone_here(HOST, os.getpid(), started - 1.0, None) is None
    assert gone_here(HOST, os.getpid(), started + 1.0, None) is None
    assert processes.START_TIME_TOLERANCE_S < 2.0
    assert "another process" in gone_here(HOST, os.getpid(), started - 3600, None)
    child = sleeper()
    child.kill()
    child.wait()
    assert gone_here(HOST, child.pid, None, None) == "has exited (pid not running)"


# --- every judge, after a clock step -----------------------------------------------------------


def test_a_clock_step_does_not_make_a_live_worker_or_its_claim_look_gone(db, tmp_path):
    """Both rows recorded an hour "before" the live process started: nothing is failed."""
    e = db.transition_experiment(db.create_experiment("steps", str(tmp_path)).experiment_id, "RUNNING").experiment_id
    task = db.create_worker_task(e, None, 1, 0)
    child = sleeper()  # the worker row's process
    try:
        worker = db.register_worker(e, 1, child.pid)
        assert worker.process_identity == process_identity(child.pid)
        claim = db.claim_worker_task(1)  # claimed by this process
        assert claim.claim_process_identity == process_identity(os.getpid())
        rewrite(db, "UPDATE workers SET process_started_at = process_started_at - 3600 WHERE worker_id = 1")
        rewrite(db, "UPDATE worker_tasks SET claim_process_started_at = claim_process_started_at - 3600")
        assert db.fail_stale_workers(60) == []
        assert db.list_workers(e, alive_only=True)[0].pid == child.pid
        # a restart of the worker id by the same process keeps the claim (its claimer is alive)
        db.register_worker(e, 1, child.pid)
        assert db.get_task("worker", task.task_id).status is TaskStatus.IN_PROGRESS
        assert [why for _, why in db.open_workers(e, grace_seconds=60)] == [None]

        # the same rows as a recycled pid leaves them: gone, both
        rewrite(db, "UPDATE workers SET process_identity = :i WHERE worker_id = 1",
                i=another_start(process_identity(child.pid)))
        [why] = [why for _, why in db.open_workers(e, grace_seconds=60)]
        assert "another process" in why
        rewrite(db, "UPDATE worker_tasks SET claim_process_identity = :i",
                i=another_start(claim.claim_process_identity))
        reports = db.fail_stale_workers(60)
        assert [t for r in reports for t in r.failed_task_ids] == [task.task_id]
        assert "another process" in db.get_task("worker", task.task_id).error
        assert db.list_workers(e, alive_only=True) == []
    finally:
        child.kill()
        child.wait()


def test_a_worker_registered_for_another_host_records_no_identity(db, tmp_path):
    e = db.create_experiment("remote", str(tmp_path)).experiment_id
    record = db.register_worker(e, 1, os.getpid(), host="another-host")
    assert record.process_identity is None and record.process_started_at is None


# --- readers in another time namespace ---------------------------------------------------------


def _in_time_namespace(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a new time namespace whose boot clock is 1000 s ahead (root; skips otherwise)."""
    probe = subprocess.run(["unshare", "--time", "--boottime", "1000", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a time namespace here: {probe.stderr.strip() or probe.returncode}")
    return subprocess.run(
        ["unshare", "--time", "--boottime", "1000", sys.executable, "-c", code, *args],
        capture_output=True, text=True, timeout=120,
    )


def test_a_reader_in_another_time_namespace_reads_the_same_identity():
    # the kernel shows starts shifted by the reader's boot-clock offset; the identity is read back
    code = "import sys; from rapidfire_state.db.store.processes import process_identity; print(process_identity(int(sys.argv[1])))"
    result = _in_time_namespace(code, str(os.getpid()))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == process_identity(os.getpid())


def test_a_judge_in_another_time_namespace_does_not_fail_a_live_worker(db, tmp_path):
    e = db.transition_experiment(db.create_experiment("ns", str(tmp_path)).experiment_id, "RUNNING").experiment_id
    task = db.create_worker_task(e, None, 1, 0)
    db.register_worker(e, 1, os.getpid())
    db.claim_worker_task(1)
    code = (
        "import sys; from rapidfire_state import StateDB; db = StateDB(sys.argv[1]); "
        "print(len(db.fail_stale_workers(60)))"
    )
    result = _in_time_namespace(code, db.url.render_as_string(hide_password=False))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"
    assert db.get_task("worker", task.task_id).status is TaskStatus.IN_PROGRESS
