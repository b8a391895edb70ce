"""Checkpoints across hosts: ``shm_objects.host``/``copy_path``, placement, copy_to_shared, fenced stores.

"Another host" is a real process with ``RF_HOST=rf-host-b`` and a registry Manager
of its own (``tests/shm_host_child.py``), sharing the database and a shared
directory in tmp_path with this process, which is a host of a different name.
Both backends; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from rapidfire_state import StateDB
from rapidfire_state.constants import SHMLocation, TaskStatus
from rapidfire_state.db.store import processes
from rapidfire_state.exceptions import ConfigError, InvalidTransitionError, RapidFireError
from rapidfire_state.shm_manager import SharedMemoryManager, SHMKeyError, SHMNotOnThisHostError
from shm_host_child import value_for

OTHER_HOST = "rf-host-b"
CHILD = Path(__file__).with_name("shm_host_child.py")
KEY = "run_1/checkpoint"


class OtherHost:
    """The child process standing for host ``rf-host-b``: one JSON command, one JSON answer."""

    def __init__(self, db_url: str, name: str, placement: str, shared_dir: Path | None):
        assert processes.HOST != OTHER_HOST
        env = dict(os.environ, RF_HOST=OTHER_HOST)
        args = [sys.executable, str(CHILD), db_url, name, placement] + ([str(shared_dir)] if shared_dir else [])
        self.process = subprocess.Popen(args, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._answer() == {"ready": True}

    def _answer(self) -> dict:
        line = self.process.stdout.readline()
        assert line, f"the other host's process exited ({self.process.wait(30)})"
        return json.loads(line)

    def __call__(self, op: str, **fields) -> dict:
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write(json.dumps({"op": "exit"}) + "\n")
            self.process.stdin.close()
            self.process.wait(60)
        assert self.process.returncode == 0


#: for tests whose subject is the manager's own checks, not the database's behaviour:
#: one backend is enough (the row-level tests run on both)
ON_SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture
def shared(tmp_path) -> Path:
    return tmp_path / "shared"


@pytest.fixture
def name() -> str:
    return f"ckpt-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def other_host(db_url, db, name, shared):
    """Host B, cross-host placement (``db`` first: the database is migrated before B opens it)."""
    host = OtherHost(db_url, name, "cross_host", shared)
    yield host
    host.close()


@pytest.fixture
def here(db, name, shared):
    manager = SharedMemoryManager(name, db=db, placement="cross_host", shared_dir=shared)
    yield manager
    manager.close()


def assert_value(loaded, seed: int) -> None:
    expected = value_for(seed)
    assert torch.equal(loaded["weight"], expected["weight"]) and torch.equal(loaded["bias"], expected["bias"])
    assert loaded["weight"].dtype == torch.float32 and loaded["bias"].dtype == torch.float64
    assert loaded["step"] == seed


def assert_answer_value(answer: dict, seed: int) -> None:
    expected = value_for(seed)
    assert answer.get("error") is None, answer
    assert answer["weight"] == expected["weight"].tolist() and answer["bias"] == expected["bias"].tolist()


# --- a store on another host ---------------------------------------------------------------


def test_a_cross_host_store_on_another_host_loads_here(db, other_host, here, name, shared, experiment):
    stored = other_host("store", key=KEY, seed=3, experiment_id=experiment.experiment_id)
    assert stored["host"] == OTHER_HOST and stored["location"] == "SHM"
    copy = Path(stored["copy_path"])
    assert copy.is_file() and copy.is_relative_to(shared / name / f"experiment_{experiment.experiment_id}")
    torch.load(copy, weights_only=True)  # loadable as the disk fallback is
    row = db.get_shm_object(KEY)
    assert (row.host, row.copy_path, row.location) == (OTHER_HOST, str(copy), SHMLocation.SHM)
    assert here.exists(KEY)
    assert_value(here.load(KEY), 3)
    # a manager with local placement reads the copy too (this host's registry lacks the key)
    with SharedMemoryManager(name, db=db) as local:
        assert local.exists(KEY)
        assert_value(local.load(KEY), 3)


@ON_SQLITE
def test_another_registry_of_this_host_is_read_from_its_copy(db, name, shared, experiment):
    # a controller and a worker of one host with registries of their own (managers of two
    # names): the row names this host, but the payload is in the other registry
    with SharedMemoryManager(f"{name}-controller", db=db, placement="cross_host", shared_dir=shared) as controller, \
            SharedMemoryManager(f"{name}-worker", db=db, placement="cross_host", shared_dir=shared) as worker:
        controller.store(KEY, value_for(5), experiment_id=experiment.experiment_id)
        assert worker.exists(KEY)
        assert_value(worker.load(KEY), 5)
        worker.store(KEY, value_for(6), experiment_id=experiment.experiment_id)  # the next chunk's weights
        # the controller's own registry still holds the older payload: the row says whose is current
        assert_value(controller.load(KEY), 6)
    with SharedMemoryManager(f"{name}-local", db=db) as local, \
            SharedMemoryManager(f"{name}-reader", db=db) as reader:
        local.store("no-copy", value_for(7))
        with pytest.raises(SHMKeyError):  # local placement writes no copy: nothing to read elsewhere
            reader.load("no-copy")
        assert not reader.exists("no-copy")


@ON_SQLITE
def test_a_local_store_elsewhere_is_refused_clearly_until_copy_to_shared(db_url, db, name, shared):
    other = OtherHost(db_url, name, "local", shared)
    try:
        stored = other("store", key=KEY, seed=5)
        assert stored["host"] == OTHER_HOST and stored["copy_path"] is None
        with SharedMemoryManager(name, db=db) as local:
            assert not local.exists(KEY)
            with pytest.raises(SHMNotOnThisHostError) as info:
                local.load(KEY)
            assert not isinstance(info.value, KeyError)  # the checkpoint exists: not "nothing stored"
            message = str(info.value)
            assert KEY in message and OTHER_HOST in message and "copy_to_shared" in message and "cross_host" in message
            assert info.value.host == OTHER_HOST and info.value.here == processes.HOST
            # this host cannot copy what it does not hold; the error names the holder
            with pytest.raises(SHMNotOnThisHostError, match=OTHER_HOST):
                local.copy_to_shared(KEY, shared)
            with pytest.raises(ConfigError, match="shared_dir"):
                other_manager_without_dir = SharedMemoryManager(name + "-x", db=db)
                try:
                    other_manager_without_dir.copy_to_shared(KEY)
                finally:
                    other_manager_without_dir.close()
            copied = other("copy_to_shared", key=KEY)
            assert copied["host"] == OTHER_HOST and Path(copied["copy_path"]).is_file()
            assert db.get_shm_object(KEY).copy_path == copied["copy_path"]
            assert local.exists(KEY)
            assert_value(local.load(KEY), 5)
            # a second copy replaces the first, which is removed once the row names the new one
            again = other("copy_to_shared", key=KEY)
            assert again["copy_path"] != copied["copy_path"] and not Path(copied["copy_path"]).exists()
            assert_value(local.load(KEY), 5)
    finally:
        other.close()


def test_a_store_here_takes_the_row_over_and_reconcile_there_drops_the_stale_entry(
    db, other_host, here, name, shared
):
    first = other_host("store", key=KEY, seed=2)
    assert first["host"] == OTHER_HOST
    # the run moves to this host: it loads the checkpoint, trains, stores the next one
    assert_value(here.load(KEY), 2)
    record = here.store(KEY, value_for(7))
    assert record.host == processes.HOST and record.location is SHMLocation.SHM
    assert record.copy_path and record.copy_path != first["copy_path"] and Path(record.copy_path).is_file()
    assert not Path(first["copy_path"]).exists()  # the replaced copy, removed after the new row committed
    row = db.get_shm_object(KEY)
    assert other_host("has_entry", key=KEY) == {"has_entry": True}  # B still holds the stale payload
    answer = other_host("reconcile")
    assert answer == {"dropped_elsewhere": [KEY], "removed": []}
    assert other_host("has_entry", key=KEY) == {"has_entry": False}
    assert db.get_shm_object(KEY) == row  # the row is host A's: not touched
    assert_answer_value(other_host("load", key=KEY), 7)  # B now reads A's copy
    assert_value(here.load(KEY), 7)
    assert here.reconcile().changed is False
    # and back: B stores again, the row is B's
    assert other_host("store", key=KEY, seed=9)["host"] == OTHER_HOST
    assert not Path(record.copy_path).exists()
    assert_value(here.load(KEY), 9)  # cross_host placement reads the row first: not the stale entry here
    assert here.reconcile().dropped_elsewhere == (KEY,)


def test_delete_and_cleanup_remove_copies_but_never_one_a_row_names(db, here, experiment, shared):
    kept = here.store("kept", value_for(1), experiment_id=experiment.experiment_id)
    gone = here.store("gone", value_for(2), experiment_id=experiment.experiment_id)
    assert here.delete("gone") and not Path(gone.copy_path).exists()
    assert Path(kept.copy_path).is_file()
    # a copy a live row names survives the cleanup of a row that named the same file
    other = db.create_experiment("other", str(shared / "exps"))
    db.upsert_shm_object("alias", experiment_id=other.experiment_id, copy_path=kept.copy_path)
    db.cleanup_experiment_state(experiment.experiment_id)
    assert db.get_shm_object("kept") is None and Path(kept.copy_path).is_file()
    db.delete_shm_objects(["alias"])
    loose = here.store("loose", value_for(3), experiment_id=other.experiment_id)
    db.cleanup_experiment_state(other.experiment_id, status="FAILED")  # no hook of this manager needed: the store removes copies
    assert not Path(loose.copy_path).exists()


# --- placement arguments ---------------------------------------------------------------------


@ON_SQLITE
def test_placement_arguments_are_checked(db, tmp_path):
    with pytest.raises(ConfigError, match="placement='anywhere' is not valid; allowed: 'local', 'cross_host'"):
        SharedMemoryManager("p", db=db, placement="anywhere")
    with pytest.raises(ConfigError, match="shared_dir"):
        SharedMemoryManager("p", db=db, placement="cross_host")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        SharedMemoryManager("p", db=db, placement="cross_host", shared_dir=a_file)
    with pytest.raises(ConfigError, match="shared_dir=3"):
        SharedMemoryManager("p", db=db, placement="cross_host", shared_dir=3)
    with SharedMemoryManager("p", db=db, placement="cross_host", shared_dir=str(tmp_path / "s")) as manager:
        copy = pickle.loads(pickle.dumps(manager))
        try:
            assert copy.placement == "cross_host" and copy.shared_dir == tmp_path / "s"
        finally:
            copy.close()


@ON_SQLITE
def test_local_placement_writes_no_copy_and_records_this_host(db, name, tmp_path):
    with SharedMemoryManager(name, db=db) as manager:
        record = manager.store(KEY, value_for(1))
        assert record.host == processes.HOST and record.copy_path is None
        assert not (tmp_path / "shared").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensors_are_copied_for_other_hosts(db, here):
    value = {"w": torch.arange(1000, dtype=torch.float32, device="cuda").reshape(10, 100) * 0.5}
    record = here.store(KEY, value)
    copy = torch.load(record.copy_path, weights_only=True)
    assert copy["w"].device.type == "cpu" and torch.equal(copy["w"], value["w"].cpu())
    assert torch.equal(here.load(KEY)["w"], value["w"].cpu())


# --- fenced stores ---------------------------------------------------------------------------


@pytest.fixture
def claimed(db, experiment):
    run = db.create_run(experiment.experiment_id, {"lr": 0.1})
    db.create_worker_task(experiment.experiment_id, run.run_id, 0, 0)
    task = db.claim_worker_task(0)
    assert task is not None and task.status is TaskStatus.IN_PROGRESS and task.claim_token
    return task


def test_a_fenced_store_with_a_stale_claim_is_refused_and_the_old_payload_still_loads(db, here, claimed):
    first = here.store(KEY, value_for(1), claim=claimed)
    assert first.host == processes.HOST
    assert here.store(KEY, value_for(2), claim=(claimed.task_id, claimed.claim_token)).copy_path
    # the worker is declared dead: its task fails; it comes back and stores its (older) chunk
    db.finish_worker_task(claimed.task_id, ok=False, error="worker lost", claim_token=claimed.claim_token)
    row = db.get_shm_object(KEY)
    for stale in (claimed, (claimed.task_id, claimed.claim_token)):
        with pytest.raises(InvalidTransitionError) as info:
            here.store(KEY, value_for(3), claim=stale)
        message = str(info.value)
        assert f"worker_task {claimed.task_id}" in message and "FAILED" in message and claimed.claim_token in message
        assert db.get_shm_object(KEY) == row
        assert_value(here.load(KEY), 2)
        assert Path(row.copy_path).is_file()
    # a wrong token on an IN_PROGRESS task is refused the same way
    db.create_worker_task(claimed.experiment_id, claimed.run_id, 0, 1)
    live = db.claim_worker_task(0)
    with pytest.raises(InvalidTransitionError, match="IN_PROGRESS under claim"):
        here.store(KEY, value_for(4), claim=(live.task_id, "not-the-token"))
    assert here.store(KEY, value_for(4), claim=live).copy_path
    assert_value(here.load(KEY), 4)
    assert len(list((Path(row.copy_path).parent).glob("*.pt"))) == 1  # refused stores left no copy behind


def test_a_fenced_row_write_is_checked_in_its_transaction(db, claimed):
    db.upsert_shm_object(KEY, num_bytes=1, claim=claimed)
    db.finish_worker_task(claimed.task_id, claim_token=claimed.claim_token)
    row = db.get_shm_object(KEY)
    with pytest.raises(InvalidTransitionError, match="COMPLETED"):
        db.upsert_shm_object(KEY, num_bytes=2, claim=claimed)
    with pytest.raises(InvalidTransitionError, match="no such worker task"):
        db.upsert_shm_object(KEY, num_bytes=2, claim=(10_000, "x"))
    assert db.get_shm_object(KEY) == row


@ON_SQLITE
@pytest.mark.parametrize("claim", [(1,), ("1", "t"), (1, ""), (1, None), "token", 5])
def test_a_bad_claim_is_a_config_error(db, here, claim):
    with pytest.raises(ConfigError, match="claim"):
        here.store(KEY, value_for(1), claim=claim)
    with pytest.raises(ConfigError, match="claim"):
        db.upsert_shm_object(KEY, claim=claim)
    assert db.get_shm_object(KEY) is None


def test_a_claim_without_a_database_is_a_config_error(claimed):
    with SharedMemoryManager("nodb") as manager:
        with pytest.raises(ConfigError, match="database"):
            manager.store(KEY, value_for(1), claim=claimed)
        with pytest.raises(SHMKeyError):
            manager.load(KEY)


@ON_SQLITE
def test_copy_to_shared_of_a_missing_key_is_a_key_error(here):
    with pytest.raises(SHMKeyError):
        here.copy_to_shared("nothing")
    with pytest.raises(RapidFireError):
        here.copy_to_shared("nothing", shared_dir=5)
