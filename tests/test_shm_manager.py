"""SharedMemoryManager: payloads in a Manager registry, metadata in ``shm_objects``.

Real processes (spawn), real shared memory, real databases; nothing is mocked.
Most tests share one registry Manager (module fixture, cleared around each test);
the tests that kill a Manager or a writer use their own.  Multi-process tests are
marked ``slow``.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from rapidfire_state import shm_manager as shm_module
from rapidfire_state.constants import SHMLocation, SHMObjectType
from rapidfire_state.datapaths import DataPath
from rapidfire_state.exceptions import ConfigError, InsufficientSharedMemoryError, RapidFireError
from rapidfire_state.shm_manager import (
    META_PREFIX,
    SharedMemoryManager,
    SHMKeyError,
    SHMLock,
    SHMLockTimeoutError,
    SHMRegistryUnavailableError,
    start_registry_manager,
)

SPAWN = multiprocessing.get_context("spawn")
CHILD_TIMEOUT = 120


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry_manager():
    manager = start_registry_manager()
    try:
        yield manager
    finally:
        manager.shutdown()


@pytest.fixture
def shared(registry_manager, tmp_path):
    """(registry, lock) like get_shm_objects() hands out: a dict of the module's
    registry Manager, empty for each test, and a file lock of its own."""
    registry, lock = registry_manager.dict(), SHMLock.create("test", tmp_path / "locks")
    yield registry, lock
    registry.clear()
    lock.remove()


@pytest.fixture
def shm(shared, db):
    manager = SharedMemoryManager(f"shm-{uuid.uuid4().hex[:8]}", *shared, db)
    yield manager
    manager.close()


@pytest.fixture
def datapath(tmp_path):
    base = tmp_path / "experiments"
    DataPath.initialize("exp", base)
    yield base / "exp"
    DataPath.reset()


@pytest.fixture
def run(db, experiment):
    return db.create_run(experiment.experiment_id, {"lr": 0.1})


def _fd_count(pid: int | None = None) -> int:
    return len(os.listdir(f"/proc/{pid or os.getpid()}/fd"))


def _filename(tensor: torch.Tensor) -> bytes:
    """The /dev/shm file name behind a shared CPU tensor."""
    return tensor.untyped_storage()._share_filename_cpu_()[1]


def _registry_keys(registry) -> set:
    return {k for k in registry.keys() if not k.startswith(META_PREFIX)}


def _assert_same(a, b):
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict)), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.cpu(), b.cpu())
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys())
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def _nested_value():
    od = OrderedDict(w=torch.randn(3, 4), b=torch.zeros(4, dtype=torch.float16))
    od._metadata = {"": {"version": 2}}
    return {
        "model": od,
        "opt": {
            "state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.randn(2, 2)}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1], "foreach": None}],
        },
        "mask": torch.tensor([True, False, True]),
        "ids": torch.arange(7, dtype=torch.int64),
        "complex": torch.randn(3, dtype=torch.complex64),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.empty(0, 3),
        "strided": torch.arange(20.0).reshape(4, 5)[:, ::2],  # not contiguous
        "tuple": (torch.ones(2), 3, "text", None, b"raw", 1.5, True),
        "misc": [torch.int8, torch.device("cpu"), torch.Size([2, 3]), 2 + 1j],
    }


# --- import and basics -------------------------------------------------------------------


def test_importing_the_module_loads_neither_torch_nor_sqlalchemy():
    code = (
        "import sys, rapidfire_state.shm_manager\n"
        "bad = [m for m in ('torch', 'sqlalchemy', 'mlflow') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_constructor_sets_file_system_strategy(shm):
    import torch.multiprocessing as torch_mp

    assert torch_mp.get_sharing_strategy() == "file_system"


def test_nested_state_dict_round_trip(shm, shared):
    value = _nested_value()
    record = shm.store("nested", value)
    assert record.location == SHMLocation.SHM
    tensors = [t for t in _walk(value) if isinstance(t, torch.Tensor)]
    assert record.tensor_count == len(tensors)
    assert record.num_bytes == sum(t.numel() * t.element_size() for t in tensors)
    loaded = shm.load("nested")
    _assert_same(value, loaded)
    assert isinstance(loaded["model"], OrderedDict)
    assert loaded["model"]._metadata == {"": {"version": 2}}
    assert all(t.is_shared() for t in _walk(loaded) if isinstance(t, torch.Tensor))
    # the spec's raw read gets the value itself, not a wrapper
    registry, lock = shared
    with lock:
        raw = registry["nested"]
    _assert_same(value, raw)


def _walk(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _walk(v)
    elif isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        for v in value:
            yield from _walk(v)
    else:
        yield value


def test_bare_tensor_and_plain_values(shm):
    shm.store("t", torch.arange(5))
    assert torch.equal(shm.load("t"), torch.arange(5))
    record = shm.store("plain", {"epoch": 3, "name": "x"})
    assert record.tensor_count == 0 and record.num_bytes == 0
    assert shm.load("plain") == {"epoch": 3, "name": "x"}


def test_nn_module_is_stored_as_its_state_dict(shm, db):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    record = shm.store("model", model, object_type=SHMObjectType.MODEL)
    assert record.object_type == SHMObjectType.MODEL
    assert db.get_shm_object("model").tensor_count == len(model.state_dict())
    loaded = shm.load("model")
    _assert_same(model.state_dict(), loaded)
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    fresh.load_state_dict(loaded)
    x = torch.randn(5, 4)
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))


def test_tied_weights_are_stored_once(shm):
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    state = model.state_dict()
    assert state["0.weight"] is not state["1.weight"]  # two detach()es of one parameter
    record = shm.store("tied", state)
    assert record.tensor_count == 1 and record.num_bytes == 10 * 4 * 4
    loaded = shm.load("tied")
    assert loaded["0.weight"] is loaded["1.weight"]
    fresh = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    fresh[1].weight = fresh[0].weight
    fresh.load_state_dict(loaded)
    assert torch.equal(fresh[1].weight, model[1].weight)


def test_device_move_helper_leaves_cpu_tensors_alone():
    t = torch.randn(3)
    assert shm_module._to_cpu(t) is t


def test_bad_input_touches_nothing(shm, shared, db):
    registry, _ = shared
    with pytest.raises(ConfigError, match="object"):
        shm.store("k", {"w": torch.ones(2), "bad": object()})
    with pytest.raises(ConfigError, match="key"):
        shm.store("", torch.ones(1))
    with pytest.raises(ConfigError, match="reserved"):
        shm.store(META_PREFIX + "x", torch.ones(1))
    with pytest.raises(ConfigError, match="run_id"):
        shm.store("k", torch.ones(1), run_id=-1)
    with pytest.raises(ConfigError, match="SHMObjectType"):
        shm.store("k", torch.ones(1), object_type="WEIGHTS")
    with pytest.raises(ConfigError, match="sparse"):
        shm.store("k", torch.ones(2).to_sparse())
    assert list(registry.keys()) == [] and db.list_shm_objects() == []


def test_load_of_a_missing_key_names_it(shm):
    with pytest.raises(SHMKeyError, match="'nope'") as info:
        shm.load("nope")
    assert isinstance(info.value, KeyError) and isinstance(info.value, RapidFireError)
    assert not shm.exists("nope")
    assert shm.delete("nope") is False


# --- in-place stores and reallocation ------------------------------------------------------


def test_restore_with_same_layout_copies_in_place(shm, shared):
    registry, lock = shared
    value = {"w": torch.zeros(64), "b": torch.zeros(3, dtype=torch.float64), "step": 1}
    shm.store("m", value)
    loaded = shm.load("m")
    ptr, name = loaded["w"].data_ptr(), _filename(loaded["w"])
    with lock:
        raw_name = _filename(registry["m"]["w"])
    assert raw_name == name

    value2 = {"w": torch.full((64,), 2.0), "b": torch.ones(3, dtype=torch.float64), "step": 1}
    shm.store("m", value2)
    again = shm.load("m")
    assert again["w"].data_ptr() == ptr and _filename(again["w"]) == name
    assert torch.equal(loaded["w"], value2["w"]), "views loaded earlier see the new weights"
    with lock:
        assert _filename(registry["m"]["w"]) == name

    # a changed plain value re-sends the structure, but keeps the storage
    value3 = {"w": torch.full((64,), 3.0), "b": torch.ones(3, dtype=torch.float64), "step": 2}
    shm.store("m", value3)
    third = shm.load("m")
    assert third["step"] == 2 and third["w"].data_ptr() == ptr
    assert torch.equal(loaded["w"], value3["w"])


def test_large_objects_and_lazy_views_copy_correctly(shm):
    # > 16 MiB: the parallel copy path; a lazily conjugated/negated source goes through copy_
    value = {"a": torch.randn(3_000_000), "b": torch.randn(2_500_000, dtype=torch.float64),
             "c": torch.randn(4, dtype=torch.complex64).conj(), "d": torch.randn(4, dtype=torch.complex64).conj().imag}
    shm.store("big", value)
    _assert_same({k: v.resolve_conj().resolve_neg() for k, v in value.items()}, shm.load("big"))
    loaded = shm.load("big")
    value = {k: v * 2 for k, v in value.items()}
    shm.store("big", value)
    _assert_same({k: v.resolve_conj().resolve_neg() for k, v in value.items()}, loaded)


def test_changed_shape_reallocates(shm):
    shm.store("m", {"w": torch.ones(8)})
    old = shm.load("m")["w"]
    shm.store("m", {"w": torch.full((9,), 4.0)})
    new = shm.load("m")["w"]
    assert new.shape == (9,) and torch.equal(new, torch.full((9,), 4.0))
    assert _filename(new) != _filename(old)
    assert torch.equal(old, torch.ones(8)), "a view of the replaced object keeps its old storage"
    shm.store("m", {"w": torch.zeros(9, dtype=torch.int32)})
    assert shm.load("m")["w"].dtype == torch.int32


def test_cache_follows_a_replacement_by_another_manager(shm, shared, db):
    other = SharedMemoryManager(shm.name, *shared, db)  # its own process-local cache
    try:
        shm.store("k", {"w": torch.ones(4)})
        assert torch.equal(other.load("k")["w"], torch.ones(4))
        other.store("k", {"w": torch.full((6,), 2.0)})  # new layout: reallocated by `other`
        assert torch.equal(shm.load("k")["w"], torch.full((6,), 2.0))
        shm.store("k", {"w": torch.full((6,), 3.0)})  # in place into other's storage
        seen = other.load("k")["w"]
        assert torch.equal(seen, torch.full((6,), 3.0))
        assert seen.data_ptr() == shm.load("k")["w"].data_ptr()
        other.store("k", {"w": torch.full((6,), 4.0), "epoch": 1})  # same tensors, new structure
        assert shm.load("k")["epoch"] == 1
        other.delete("k")
        with pytest.raises(SHMKeyError):
            shm.load("k")
    finally:
        other.close()


def test_two_thousand_tensors_keep_fds_flat(shm, registry_manager):
    state = {f"layer{i}.weight": torch.full((4,), float(i)) for i in range(2000)}
    fds, manager_fds = _fd_count(), _fd_count(registry_manager._process.pid)
    record = shm.store("big", state)
    loaded = shm.load("big")
    assert record.tensor_count == 2000 and len(loaded) == 2000
    assert torch.equal(loaded["layer1999.weight"], torch.full((4,), 1999.0))
    state["layer7.weight"].fill_(-1)
    shm.store("big", state)
    assert loaded["layer7.weight"][0].item() == -1
    assert _fd_count() - fds < 50
    assert _fd_count(registry_manager._process.pid) - manager_fds < 50


def test_pickled_manager_shares_the_same_objects(shm):
    shm.store("k", {"w": torch.arange(4.0)})
    copy = pickle.loads(pickle.dumps(shm))
    try:
        assert copy.name == shm.name and copy.db.url == shm.db.url
        assert copy.load("k")["w"].data_ptr() == shm.load("k")["w"].data_ptr()
    finally:
        copy.close()


@pytest.mark.parametrize("kind", ["shm-lock", "manager-lock"])
def test_lock_timeout(shared, db, registry_manager, kind):
    registry, lock = shared
    if kind == "manager-lock":  # a lock passed in is used as given
        lock = registry_manager.Lock()
    manager = SharedMemoryManager("locked", registry, lock, db, lock_timeout=0.2)
    try:
        lock.acquire()
        try:
            with pytest.raises(SHMLockTimeoutError, match="0.2"):
                manager.store("k", torch.ones(2))
        finally:
            lock.release()
        assert not manager.exists("k")
    finally:
        manager.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensors_go_to_cpu_shared_memory(shm, shared):
    shm2 = SharedMemoryManager(shm.name + "-disk", *shared, shm.db, max_object_bytes=0)
    try:
        value = {"w": torch.randn(16, device="cuda"), "b": torch.arange(3, device="cuda")}
        shm.store("gpu", value)
        loaded = shm.load("gpu")
        assert loaded["w"].device.type == "cpu" and loaded["w"].is_shared()
        assert torch.equal(loaded["w"], value["w"].cpu())
        ptr = loaded["w"].data_ptr()
        value["w"].mul_(2)
        shm.store("gpu", value)  # in place, straight from the device
        assert loaded["w"].data_ptr() == ptr and torch.equal(loaded["w"], value["w"].cpu())
        record = shm2.store("gpu-disk", value)
        assert record.location == SHMLocation.DISK
        disk = torch.load(record.disk_path, weights_only=True)
        assert disk["w"].device.type == "cpu" and torch.equal(disk["w"], value["w"].cpu())
    finally:
        shm2.close()


# --- metadata -------------------------------------------------------------------------------


def test_rows_follow_payloads(shm, shared, db, experiment, run):
    registry, _ = shared
    e, r = experiment.experiment_id, run.run_id
    shm.store("a", torch.ones(3), experiment_id=e, run_id=r, chunk_id=0)
    shm.store("b", {"x": torch.ones(2, 2)}, experiment_id=e, object_type="MODEL")
    row = db.get_shm_object("a")
    assert (row.experiment_id, row.run_id, row.chunk_id, row.manager_name) == (e, r, 0, shm.name)
    assert (row.location, row.num_bytes, row.tensor_count, row.disk_path) == (SHMLocation.SHM, 12, 1, None)
    shm.store("a", torch.zeros(3), experiment_id=e, run_id=r, chunk_id=1)
    assert db.get_shm_object("a").chunk_id == 1
    assert {o.key for o in shm.list_objects()} == _registry_keys(registry) == {"a", "b"}
    assert shm.delete("a") is True
    assert db.get_shm_object("a") is None and "a" not in registry.keys()
    assert {o.key for o in shm.list_objects()} == _registry_keys(registry) == {"b"}
    assert shm.exists("b") and not shm.exists("a")


@pytest.mark.parametrize("existing", [False, True], ids=["new-key", "existing-key"])
def test_failed_row_write_leaves_no_payload(shm, shared, db, experiment, existing):
    registry, _ = shared
    if existing:
        shm.store("k", {"w": torch.ones(4)}, experiment_id=experiment.experiment_id)
    with pytest.raises(RapidFireError):
        shm.store("k", {"w": torch.full((4,), 2.0)}, run_id=987654)  # no such run: the FK refuses
    assert list(registry.keys()) == []
    assert db.get_shm_object("k") is None
    assert not shm.exists("k")
    with pytest.raises(SHMKeyError):
        shm.load("k")


def test_failed_row_write_of_a_disk_object_leaves_no_file(shared, db, datapath):
    manager = SharedMemoryManager("disk", *shared, db, max_object_bytes=0)
    try:
        with pytest.raises(RapidFireError):
            manager.store("k", {"w": torch.ones(4)}, run_id=987654, chunk_id=0)
        assert list(shared[0].keys()) == [] and db.list_shm_objects() == []
        assert [p for p in datapath.rglob("*") if p.is_file()] == []
    finally:
        manager.close()


def test_without_database_records_come_from_the_registry(shared):
    manager = SharedMemoryManager("nodb", *shared)
    try:
        record = manager.store("k", {"w": torch.ones(2)}, run_id=3, chunk_id=1)
        assert record.shm_object_id == 0 and record.run_id == 3 and record.location == SHMLocation.SHM
        assert [r.key for r in manager.list_objects()] == ["k"]
        registry, lock = shared
        with lock:
            registry["raw"] = {"v": torch.zeros(3)}
        with lock:
            registry[42] = "not a str key"
        report = manager.reconcile()
        assert report.adopted == ("raw",) and report.ok == 1 and report.skipped == ("42",)
        assert {r.key for r in manager.list_objects()} == {"k", "raw"}
    finally:
        manager.close()


# --- disk fallback --------------------------------------------------------------------------


def test_disk_fallback_for_large_objects(shared, db, run, datapath):
    manager = SharedMemoryManager("disk", *shared, db, max_object_bytes=100)
    try:
        value = {"w": torch.randn(64), "n": 3}
        record = manager.store("ckpt", value, experiment_id=run.experiment_id, run_id=run.run_id, chunk_id=2)
        assert record.location == SHMLocation.DISK
        expected = DataPath.checkpoint_path(run.run_id, 2)
        assert record.disk_path == str(expected) and expected.exists()
        assert db.get_shm_object("ckpt").disk_path == str(expected)
        assert "ckpt" not in shared[0].keys(), "no payload in the registry for a disk object"
        _assert_same(value, manager.load("ckpt"))
        _assert_same(value, torch.load(expected, weights_only=True))
        assert manager.exists("ckpt")
        # small objects still go to shared memory
        assert manager.store("small", torch.ones(2)).location == SHMLocation.SHM
        # a model of the same run/chunk gets its own file; so does a second checkpoint key
        model = manager.store("model", value, run_id=run.run_id, chunk_id=2, object_type="MODEL")
        other = manager.store("ckpt2", {"w": torch.zeros(64)}, run_id=run.run_id, chunk_id=2)
        paths = {record.disk_path, model.disk_path, other.disk_path}
        assert len(paths) == 3 and all(Path(p).parent == expected.parent for p in paths)
        _assert_same(value, manager.load("ckpt"))
        # moving back to shared memory removes the file
        small = SharedMemoryManager("disk", *shared, db)
        try:
            assert small.store("ckpt", {"w": torch.ones(2)}).location == SHMLocation.SHM
            assert not expected.exists() and db.get_shm_object("ckpt").disk_path is None
        finally:
            small.close()
        assert manager.delete("model") and not Path(model.disk_path).exists()
    finally:
        manager.close()


def test_disk_fallback_without_datapath_uses_rf_home(shared, db, rf_home):
    manager = SharedMemoryManager("spill me", *shared, db, max_object_bytes=0)
    try:
        record = manager.store("odd/key name", torch.arange(10))
        path = Path(record.disk_path)
        assert path.parent == Path(rf_home) / "shm_spill" / "spill_me"
        assert path.exists() and torch.equal(manager.load("odd/key name"), torch.arange(10))
        assert [p.name for p in path.parent.iterdir()] == [path.name], "no temp file left"
    finally:
        manager.close()


def test_short_shared_memory_goes_to_disk(shared, db):
    manager = SharedMemoryManager("short", *shared, db, min_free_bytes=1 << 60)
    try:
        assert manager.store("k", torch.ones(4)).location == SHMLocation.DISK
        assert torch.equal(manager.load("k"), torch.ones(4))
    finally:
        manager.close()


def test_insufficient_only_when_nothing_fits(shared, db, rf_home):
    manager = SharedMemoryManager("full", *shared, db, min_free_bytes=1 << 60, min_free_disk_bytes=1 << 60)
    try:
        with pytest.raises(InsufficientSharedMemoryError, match="'k'"):
            manager.store("k", torch.ones(4))
        assert list(shared[0].keys()) == [] and db.list_shm_objects() == []
        spill = Path(rf_home) / "shm_spill"
        assert not spill.exists() or not any(p.is_file() for p in spill.rglob("*"))
    finally:
        manager.close()


def test_usage_warning_is_logged_once_per_crossing(shm, monkeypatch):
    from loguru import logger

    messages = []
    sink = logger.add(lambda m: messages.append(str(m)), level="WARNING")
    try:
        monkeypatch.setattr(shm_module, "SHM_WARN_FRACTION", 0.0)
        shm.store("a", torch.ones(4))
        shm.store("b", torch.ones(4))
    finally:
        logger.remove(sink)
    assert len([m for m in messages if "/dev/shm is" in m]) == 1


# --- reconcile, cleanup, warm start ---------------------------------------------------------


def test_reconcile_adopts_raw_registry_writes(shm, shared, db):
    registry, lock = shared
    with lock:  # the spec's usage pattern
        registry["7_model"] = {"w": torch.ones(3), "b": torch.zeros(2, dtype=torch.float64), "epoch": 1}
    report = shm.reconcile()
    assert report.adopted == ("7_model",) and report.removed == ()
    row = db.get_shm_object("7_model")
    assert (row.location, row.tensor_count, row.num_bytes, row.manager_name) == (SHMLocation.SHM, 2, 28, shm.name)
    loaded = shm.load("7_model")
    assert torch.equal(loaded["w"], torch.ones(3)) and loaded["epoch"] == 1
    shm.store("7_model", {"w": torch.full((3,), 5.0), "b": torch.ones(2, dtype=torch.float64), "epoch": 1})
    with lock:
        assert torch.equal(registry["7_model"]["w"], torch.full((3,), 5.0))
    again = shm.reconcile()
    assert again.adopted == () and again.removed == () and again.ok == 1


def test_reconcile_reports_a_deleted_disk_file(shared, db):
    manager = SharedMemoryManager("disk", *shared, db, max_object_bytes=0)
    try:
        record = manager.store("gone", torch.ones(3))
        kept = manager.store("kept", torch.ones(3))
        os.unlink(record.disk_path)
        report = manager.reconcile()
        assert report.missing_files == ("gone",) and report.removed == ("gone",)
        assert report.ok == 1 and report.registry_alive
        assert db.get_shm_object("gone") is None and db.get_shm_object("kept") is not None
        assert not manager.exists("gone") and manager.exists("kept")
        with pytest.raises(SHMKeyError):
            manager.load("gone")
        assert Path(kept.disk_path).exists()
    finally:
        manager.close()


def test_reconcile_removes_rows_whose_payload_vanished(shm, shared, db):
    shm.store("a", torch.ones(2))
    shm.store("b", torch.ones(2))
    registry, lock = shared
    with lock:
        del registry["a"]  # raw delete behind the manager's back
    report = shm.reconcile()
    assert report.removed == ("a",) and report.ok == 1
    assert [r.key for r in db.list_shm_objects()] == ["b"]
    assert META_PREFIX + "a" not in registry.keys()


def test_cleanup_hook_drops_payloads(shm, shared, db, experiment, datapath):
    other_experiment = db.create_experiment("other", str(datapath.parent))
    disk = SharedMemoryManager(shm.name, *shared, db, max_object_bytes=0)
    try:
        e = experiment.experiment_id
        shm.store("shm-obj", torch.ones(4), experiment_id=e)
        record = disk.store("disk-obj", torch.ones(4), experiment_id=e)
        shm.store("keep", torch.ones(4), experiment_id=other_experiment.experiment_id)
        shm.store("no-experiment", torch.ones(4))
        db.cleanup_experiment_state(e)
        registry = shared[0]
        assert _registry_keys(registry) == {"keep", "no-experiment"}
        assert not Path(record.disk_path).exists()
        assert not shm.exists("shm-obj") and not shm.exists("disk-obj")
        assert {r.key for r in db.list_shm_objects()} == {"keep", "no-experiment"}
    finally:
        disk.close()


def test_warm_start_is_a_copy(shm, db, experiment, run):
    child_run = db.create_run(experiment.experiment_id, {"lr": 0.2}, source="CLONE_MODIFY", cloned_from=run.run_id)
    parent = {"w": torch.arange(6.0), "epoch": 2}
    shm.store("parent", parent, experiment_id=experiment.experiment_id, run_id=run.run_id, chunk_id=3)
    record = shm.create_warm_start("parent", "child", run_id=child_run.run_id)
    assert (record.run_id, record.experiment_id, record.chunk_id) == (child_run.run_id, experiment.experiment_id, 3)
    child = shm.load("child")
    _assert_same(parent, child)
    assert _filename(child["w"]) != _filename(shm.load("parent")["w"])
    child["w"].fill_(-1)
    assert torch.equal(shm.load("parent")["w"], torch.arange(6.0))
    assert db.get_shm_object("parent").run_id == run.run_id
    with pytest.raises(ConfigError):
        shm.create_warm_start("parent", "parent")
    with pytest.raises(SHMKeyError):
        shm.create_warm_start("missing", "x")


# --- multi-process --------------------------------------------------------------------------


def _child_session(manager: SharedMemoryManager, inbox, outbox) -> None:
    """Runs commands from the parent against the shared objects; answers each one."""
    try:
        held = {}
        while True:
            cmd = inbox.get(timeout=CHILD_TIMEOUT)
            if cmd == "stop":
                outbox.put(("ok", None))
                return
            if cmd == "load-and-write":
                held["w"] = manager.load("zc")["w"]
                before = held["w"].tolist()
                held["w"][0] = 42.0  # write through the zero-copy view
                outbox.put(("ok", before))
            elif cmd == "read-held":
                outbox.put(("ok", held["w"].tolist()))
            elif cmd == "reload":
                held["w"] = manager.load("zc")["w"]
                outbox.put(("ok", held["w"].tolist()))
            elif cmd == "store-in-place":
                ptr = held["w"].data_ptr()
                manager.store("zc", {"w": torch.full((16,), 5.0)})
                outbox.put(("ok", manager.load("zc")["w"].data_ptr() == ptr))
            elif cmd == "store-new":  # a fresh allocation by this process, which then exits
                manager.store("from-child", {"w": torch.arange(10.0), "tag": "child"}, object_type="MODEL")
                outbox.put(("ok", None))
            elif cmd == "load-big":
                fds = _fd_count()
                big = manager.load("big")
                model = manager.load("model")
                ok = len(big) == 2000 and all(big[f"p{i}"][0].item() == i for i in (0, 999, 1999))
                outbox.put(("ok", (ok, _fd_count() - fds, sorted(model))))
            else:
                outbox.put(("error", f"unknown command {cmd!r}"))
    except BaseException:
        outbox.put(("error", traceback.format_exc()))


def _ask(inbox, outbox, cmd):
    inbox.put(cmd)
    status, value = outbox.get(timeout=CHILD_TIMEOUT)
    assert status == "ok", value
    return value


@pytest.mark.slow
def test_zero_copy_across_processes(shm):
    shm.store("zc", {"w": torch.zeros(8)})
    shm.store("big", {f"p{i}": torch.full((2,), float(i)) for i in range(2000)})
    model = torch.nn.Linear(3, 2)
    shm.store("model", model, object_type="MODEL")
    mine = shm.load("zc")["w"]
    inbox, outbox = SPAWN.Queue(), SPAWN.Queue()
    child = SPAWN.Process(target=_child_session, args=(shm, inbox, outbox), daemon=True)
    child.start()
    try:
        # child -> parent: a write through the child's loaded view is seen here
        assert _ask(inbox, outbox, "load-and-write") == [0.0] * 8
        assert mine[0].item() == 42.0
        # parent -> child: a write through the parent's view is seen there
        mine[1] = 7.0
        assert _ask(inbox, outbox, "read-held")[:2] == [42.0, 7.0]
        # the chunk-boundary swap: an in-place store is seen through the child's old view
        shm.store("zc", {"w": torch.arange(8.0)})
        assert _ask(inbox, outbox, "read-held") == list(map(float, range(8)))
        # a replacement with a new layout is picked up by the child's next load
        shm.store("zc", {"w": torch.ones(16)})
        assert _ask(inbox, outbox, "reload") == [1.0] * 16
        mine = shm.load("zc")["w"]
        # the child stores in place; the parent's view sees it
        assert _ask(inbox, outbox, "store-in-place") is True
        assert torch.equal(mine, torch.full((16,), 5.0))
        ok, fd_growth, model_keys = _ask(inbox, outbox, "load-big")
        assert ok and fd_growth < 50 and model_keys == ["bias", "weight"]
        _ask(inbox, outbox, "store-new")
        _ask(inbox, outbox, "stop")
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    # an object allocated by a process that has exited stays loadable
    from_child = shm.load("from-child")
    assert torch.equal(from_child["w"], torch.arange(10.0)) and from_child["tag"] == "child"
    assert shm.db.get_shm_object("from-child").object_type == SHMObjectType.MODEL


def _disk_writer(db_url: str, base: str, run_id: int, marker: str) -> None:
    """Stores one large-ish object to disk again and again until killed."""
    DataPath.initialize("exp", base)
    manager = SharedMemoryManager("writer", {}, threading.Lock(), db_url, max_object_bytes=0)
    version = 0
    while True:
        version += 1
        Path(marker).write_text(str(version))
        manager.store("ckpt", {"w": torch.full((3_000_000,), float(version)), "version": version},
                      run_id=run_id, chunk_id=0)


@pytest.mark.slow
def test_checkpoint_file_is_never_partial(db, db_url, run, datapath, shared):
    final = DataPath.checkpoint_path(run.run_id, 0)
    marker = datapath.parent / "marker"
    manager = SharedMemoryManager("writer", *shared, db, max_object_bytes=0)
    try:
        manager.store("ckpt", {"w": torch.full((3_000_000,), 0.0), "version": 0}, run_id=run.run_id, chunk_id=0)
        assert final.exists()
        killed_mid_write = 0
        for attempt in range(8):
            if attempt >= 3 and killed_mid_write:
                break
            temps_before = {p.name for p in final.parent.iterdir() if p.name.endswith(".rftmp")}
            marker.unlink(missing_ok=True)
            writer = SPAWN.Process(target=_disk_writer, args=(db_url, str(datapath.parent), run.run_id, str(marker)))
            writer.start()
            try:
                deadline = time.monotonic() + CHILD_TIMEOUT
                while not marker.exists() and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert marker.exists(), "writer never started"
                time.sleep(random.uniform(0.0, 0.4))
            finally:
                os.kill(writer.pid, signal.SIGKILL)
                writer.join(30)
            temps_after = {p.name for p in final.parent.iterdir() if p.name.endswith(".rftmp")}
            killed_mid_write += bool(temps_after - temps_before)  # its temp file was left behind
            loaded = torch.load(final, weights_only=True)  # the old version or the new one, never a torn file
            assert loaded["w"].shape == (3_000_000,)
            assert torch.equal(loaded["w"], torch.full((3_000_000,), float(loaded["version"])))
        assert killed_mid_write, "no kill landed during a write"
        # a manager of the writers' name reconciles: the row stands, dead writers' temp files go
        report = manager.reconcile()
        assert len(report.removed_temp_files) >= killed_mid_write and report.removed == ()
        assert not [p for p in final.parent.iterdir() if p.name.endswith(".rftmp")]
        assert db.get_shm_object("ckpt").disk_path == str(final)
        loaded = manager.load("ckpt")
        assert torch.equal(loaded["w"], torch.full((3_000_000,), float(loaded["version"])))
    finally:
        manager.close()


@pytest.mark.slow
def test_killed_manager_process_is_reconciled(db, tmp_path):
    manager = SharedMemoryManager("own", db=db, max_object_bytes=1000)
    try:
        manager.store("a", torch.ones(4))
        manager.store("b", {"w": torch.ones(8)})
        disk = manager.store("big", torch.ones(1000))
        assert disk.location == SHMLocation.DISK
        pid = manager.manager_pid
        os.kill(pid, signal.SIGKILL)
        manager._manager._process.join(30)
        report = manager.reconcile()
        assert not report.registry_alive
        assert sorted(report.removed) == ["a", "b"] and report.ok == 1 and report.missing_files == ()
        assert [r.key for r in db.list_shm_objects()] == ["big"]
        assert torch.equal(manager.load("big"), torch.ones(1000)), "disk objects survive the registry"
        assert manager.exists("big") and not manager.exists("a")
        with pytest.raises(SHMRegistryUnavailableError):
            manager.load("a")
        with pytest.raises(SHMRegistryUnavailableError):
            manager.store("c", torch.ones(1))
        # a manager constructed on the dead registry (another process, later) still reconciles
        late = SharedMemoryManager("own", *manager.get_shm_objects(), db)
        try:
            assert late.reconcile() == shm_module.ReconcileReport(ok=1, registry_alive=False)
        finally:
            late.close()
        assert manager.delete("big") is True and not Path(disk.disk_path).exists()
        assert db.list_shm_objects() == []
    finally:
        manager.close()


# --- the lock: released by the OS when its holder dies ------------------------------------


def _flock_holders(path) -> set:
    """Pids holding a flock on ``path``, as the kernel lists them in /proc/locks."""
    st = os.stat(path)
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders = set()
    with open("/proc/locks") as handle:
        for line in handle:
            parts = line.split()  # "1: FLOCK  ADVISORY  WRITE 15067 fe:00:2147645 0 EOF"; waiters have "->"
            if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == device:
                holders.add(int(parts[4]))
    return holders


def _wait_for(condition, what, timeout=CHILD_TIMEOUT, interval=0.0005):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def test_shm_lock_behaves_like_a_multiprocessing_lock(tmp_path):
    lock = SHMLock.create("t", tmp_path)
    other = pickle.loads(pickle.dumps(lock))  # another handle on the file, as a spawned child gets it
    try:
        assert other.path == lock.path and Path(lock.path).parent == tmp_path
        assert SHMLock.create("t", tmp_path).path != lock.path, "two created locks never share a file"
        with lock as entered:
            assert entered is True
            assert _flock_holders(lock.path) == {os.getpid()}
            assert other.acquire(blocking=False) is False
            start = time.monotonic()
            assert other.acquire(True, 0.2) is False
            assert time.monotonic() - start >= 0.2
            assert lock.acquire(timeout=0.05) is False, "not reentrant, like multiprocessing.Lock"
        assert _flock_holders(lock.path) == set()
        assert other.acquire(timeout=1) is True
        other.release()
        with pytest.raises(RuntimeError, match="unlocked"):
            lock.release()

        counter = {"n": 0}

        def bump(handle):
            for _ in range(150):
                with handle:
                    n = counter["n"]
                    time.sleep(0)  # invite a thread switch inside the critical section
                    counter["n"] = n + 1

        # threads sharing one handle, and threads with handles of their own
        threads = [threading.Thread(target=bump, args=(lock if i % 2 else other,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert counter["n"] == 900
    finally:
        other.close()
        lock.remove()
    assert not Path(lock.path).exists()
    with pytest.raises(SHMRegistryUnavailableError, match="gone"):
        pickle.loads(pickle.dumps(other)).acquire(timeout=1)  # never re-creates a removed lock file


def test_stale_lock_files_of_dead_processes_are_swept(tmp_path):
    host = shm_module._lock_host()
    dead = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # no process can have it
    stale = tmp_path / f"old.{host}.{dead}.{'a' * 12}.lock"
    held = tmp_path / f"held.{host}.{dead}.{'b' * 12}.lock"
    live = tmp_path / f"live.{host}.{os.getpid()}.{'c' * 12}.lock"
    foreign = tmp_path / f"other.elsewhere.{dead}.{'d' * 12}.lock"
    for path in (stale, held, live, foreign):
        path.write_text("")
    holder = SHMLock(held, create=False)
    assert holder.acquire(timeout=1)
    try:
        fresh = SHMLock.create("new", tmp_path)
    finally:
        holder.release()
    assert not stale.exists()
    assert held.exists() and live.exists() and foreign.exists()
    fresh.remove()


def _hold_lock(lock, ready: str) -> None:
    lock.acquire()
    Path(ready).write_text(str(os.getpid()))
    time.sleep(600)


def test_shm_lock_is_released_when_its_holder_is_killed(tmp_path):
    from loguru import logger

    lock = SHMLock.create("t", tmp_path)
    messages = []
    sink = logger.add(lambda m: messages.append(str(m)), level="WARNING")
    try:
        for attempt in range(3):
            ready = tmp_path / f"ready{attempt}"
            child = SPAWN.Process(target=_hold_lock, args=(lock, str(ready)))
            child.start()
            try:
                _wait_for(lambda: ready.exists() and _flock_holders(lock.path) == {child.pid}, "the child's lock",
                          interval=0.01)
                assert lock.acquire(blocking=False) is False
            finally:
                os.kill(child.pid, signal.SIGKILL)
                child.join(30)
            assert lock.acquire(timeout=5) is True, "the dead holder's lock was not released"
            lock.release()
    finally:
        logger.remove(sink)
        lock.remove()
    assert len([m for m in messages if "died holding it" in m]) == 3


def _hold_and_fork(lock, grandchild_file: str) -> None:
    with lock:
        pid = os.fork()
        if pid == 0:  # the grandchild inherits the descriptor but must not inherit the lock
            code = 0 if lock.acquire(blocking=False) is False else 3
            time.sleep(600)
            os._exit(code)
        Path(grandchild_file).write_text(str(pid))
        time.sleep(600)


def test_a_forked_child_does_not_keep_a_dead_parents_lock(tmp_path):
    lock = SHMLock.create("t", tmp_path)
    marker = tmp_path / "grandchild"
    child = SPAWN.Process(target=_hold_and_fork, args=(lock, str(marker)))
    child.start()
    grandchild = None
    try:
        _wait_for(lambda: marker.exists() and marker.read_text(), "the grandchild", interval=0.01)
        grandchild = int(marker.read_text())
        time.sleep(0.2)  # let the grandchild try the lock
        assert _flock_holders(lock.path) == {child.pid}
        os.kill(child.pid, signal.SIGKILL)
        # not child.join(): the grandchild inherited the child's end of multiprocessing's
        # sentinel pipe, so join would wait out its timeout; exitcode polls waitpid
        _wait_for(lambda: child.exitcode is not None, "the killed child to be reaped", interval=0.01)
        assert lock.acquire(timeout=5) is True, "the forked grandchild kept its dead parent's lock"
        lock.release()
    finally:
        if child.is_alive():
            child.kill()
        if grandchild is not None:
            try:
                os.kill(grandchild, signal.SIGKILL)
            except ProcessLookupError:
                pass
        lock.remove()


def _spec_worker(registry, lock, outbox) -> None:
    try:
        with lock:
            registry["7_model"] = {"w": torch.full((2,), 7.0)}
        with lock:
            state_dict = registry.get("0_model")
        outbox.put(("ok", state_dict["w"].tolist()))
    except BaseException:
        outbox.put(("error", traceback.format_exc()))


@pytest.mark.slow
def test_owned_lock_file_lives_beside_the_experiment(db, datapath, rf_home):
    first = SharedMemoryManager("ctl", db=db)
    second = SharedMemoryManager("ctl", db=db)
    try:
        a, b = first.get_shm_objects()[1], second.get_shm_objects()[1]
        assert isinstance(a, SHMLock) and isinstance(b, SHMLock)
        assert Path(a.path).parent == datapath / "shm_locks" == Path(b.path).parent
        assert a.path != b.path, "two managers of one name share a lock file"
        copy = pickle.loads(pickle.dumps(a))
        with a:
            assert b.acquire(blocking=False)
            b.release()
            assert not copy.acquire(blocking=False)
        first.store("0_model", {"w": torch.ones(3)})
        # the spec's pattern in a spawned worker, with get_shm_objects()'s registry and lock
        outbox = SPAWN.Queue()
        worker = SPAWN.Process(target=_spec_worker, args=(*first.get_shm_objects(), outbox))
        worker.start()
        status, value = outbox.get(timeout=CHILD_TIMEOUT)
        worker.join(30)
        assert status == "ok", value
        assert value == [1.0, 1.0, 1.0] and worker.exitcode == 0
        assert first.reconcile().adopted == ("7_model",)
        assert torch.equal(first.load("7_model")["w"], torch.full((2,), 7.0))
    finally:
        first.close()
        second.close()
    assert not Path(a.path).exists() and not Path(b.path).exists(), "close() leaves the lock file"
    with pytest.raises(SHMRegistryUnavailableError, match="gone"):
        copy.acquire(timeout=1)
    DataPath.reset()
    third = SharedMemoryManager("ctl")
    try:
        assert Path(third.get_shm_objects()[1].path).parent == Path(rf_home) / "shm_locks"
    finally:
        third.close()


def test_a_removed_lock_file_is_refused_not_taken_for_a_dead_registry(shm, shared, db, tmp_path):
    registry, lock = shared
    shm.store("k", torch.ones(3))
    os.unlink(lock.path)  # removed behind the manager's back; the registry still runs
    for call in (shm.reconcile, lambda: shm.delete("k"), lambda: shm.store("k2", torch.ones(2))):
        with pytest.raises(SHMRegistryUnavailableError, match="gone"):
            call()
    assert db.get_shm_object("k") is not None and "k" in registry.keys()
    assert torch.equal(shm.load("k"), torch.ones(3)), "loads take no lock"


# --- nothing slow under the lock ------------------------------------------------------------


def _block_shm_rows(db_url: str):
    """Hold the database's write lock (SQLite) or a table lock on shm_objects (PostgreSQL)."""
    if db_url.startswith("sqlite"):
        import sqlite3

        conn = sqlite3.connect(db_url.split("///", 1)[1], isolation_level=None, timeout=30)
        conn.execute("BEGIN IMMEDIATE")
    else:
        import psycopg
        from sqlalchemy.engine import make_url

        url = make_url(db_url)
        conn = psycopg.connect(host=url.host, port=url.port, user=url.username, password=url.password,
                               dbname=url.database)
        conn.execute("LOCK TABLE shm_objects IN EXCLUSIVE MODE")

    def release():
        conn.rollback()
        conn.close()

    return release


def test_row_write_does_not_hold_the_lock(shm, shared, db, db_url):
    registry, lock = shared
    shm.store("other", torch.arange(4.0))
    result = {}

    def store():
        try:
            result["record"] = shm.store("k", {"w": torch.ones(8)})
        except BaseException as exc:  # reported below
            result["error"] = exc

    release_db = _block_shm_rows(db_url)
    thread = threading.Thread(target=store)
    thread.start()
    try:
        _wait_for(lambda: META_PREFIX + "k" in registry.keys(), "the publish", interval=0.01)
        time.sleep(0.3)
        assert thread.is_alive(), "the row write was not held up by the database lock"
        probe = pickle.loads(pickle.dumps(lock))  # how another process sees the lock
        assert probe.acquire(timeout=2), "the store holds the shared-memory lock while it waits for the database"
        probe.release()
        probe.close()
        assert torch.equal(shm.load("k")["w"], torch.ones(8))
    finally:
        release_db()
        thread.join(120)
    assert "error" not in result, result.get("error")
    assert db.get_shm_object("k").num_bytes == 32


def test_allocation_and_disk_writes_happen_outside_the_lock(shm, shared, db, monkeypatch):
    registry, lock = shared
    probe = pickle.loads(pickle.dumps(lock))
    seen = []

    def watched(name, fn):
        def wrapper(*args, **kwargs):
            free = probe.acquire(blocking=False)
            if free:
                probe.release()
            seen.append((name, free))
            return fn(*args, **kwargs)

        return wrapper

    new_shared = torch.UntypedStorage._new_shared
    monkeypatch.setattr(torch.UntypedStorage, "_new_shared",
                        classmethod(lambda cls, *a, **k: watched("allocate", new_shared)(*a, **k)))
    monkeypatch.setattr(shm_module, "_write_temp", watched("disk write", shm_module._write_temp))
    monkeypatch.setattr(shm_module, "fsync_directory", watched("fsync", shm_module.fsync_directory))
    other = SharedMemoryManager(shm.name, *shared, db)
    disk = SharedMemoryManager(shm.name, *shared, db, max_object_bytes=0)
    try:
        shm.store("a", {"w": torch.ones(4)})  # new key
        shm.store("a", {"w": torch.full((4,), 2.0)})  # in place
        other.store("a", {"w": torch.ones(6)})  # replaced by another manager with a new layout ...
        shm.store("a", {"w": torch.full((4,), 3.0)})  # ... so this one's cached plan is stale under the lock
        assert torch.equal(other.load("a")["w"], torch.full((4,), 3.0))
        disk.store("d", torch.ones(5))
        disk.store("d", torch.ones(7))
    finally:
        other.close()
        disk.close()
        probe.close()
    names = {name for name, _ in seen}
    assert {"allocate", "disk write", "fsync"} <= names
    assert all(free for _, free in seen), [name for name, free in seen if not free]


# --- SIGKILLed writers: no wedged lock, no torn key -----------------------------------------

_FORKSERVER = multiprocessing.get_context("forkserver")
_KILL_W, _KILL_B = 2_000_000, 500_000  # 8 MB of float32 + 4 MB of float64, copied in place


def _victim(version: int) -> dict:
    return {"w": torch.full((_KILL_W,), float(version)),
            "b": torch.full((_KILL_B,), float(version), dtype=torch.float64)}


def _victim2(version: int) -> dict:  # a new layout each time: replaced, not copied in place
    return {"w": torch.full((1000 + version % 7,), float(version)), "v": version}


def _kill_loop_writer(manager: SharedMemoryManager, first_version: int, progress: str) -> None:
    """Stores two keys again and again until killed; ``progress`` names the version being stored."""
    version = first_version
    temp = progress + ".tmp"
    while True:
        Path(temp).write_text(str(version))
        os.replace(temp, progress)
        manager.store("victim", _victim(version))
        manager.store("victim2", _victim2(version))
        version += 1


def _uniform_version(value: dict, names: tuple) -> float:
    """The one version all of ``value``'s tensors hold; fails on a torn payload."""
    version = value[names[0]].view(-1)[0].item()
    for name in names:
        tensor = value[name]
        assert torch.equal(tensor, torch.full_like(tensor, version)), f"{name} is torn"
    return version


@pytest.mark.slow
def test_sigkilled_writers_never_wedge_the_lock_or_tear_a_key(registry_manager, db, tmp_path):
    # Writers are forked from a forkserver that has torch loaded (a fresh spawn imports
    # torch for seconds); like spawned processes they get the manager, its lock
    # included, by pickle and inherit nothing else.
    _FORKSERVER.set_forkserver_preload(["torch", "rapidfire_state.shm_manager", "rapidfire_state.db.store"])
    registry, lock = registry_manager.dict(), SHMLock.create("kill", tmp_path)
    shm = SharedMemoryManager("killed", registry, lock, db, lock_timeout=10)
    progress = tmp_path / "progress"
    rng = random.Random(8)
    keep = {f"keep{i}": {"w": torch.randn(1000 + i), "i": torch.arange(i + 3)} for i in range(3)}
    try:
        for key, value in keep.items():
            shm.store(key, value)
        shm.store("victim", _victim(0))
        shm.store("victim2", _victim2(0))
        floor = floor2 = 0.0
        next_version = 1
        held_at_kill = marker_at_kill = 0
        for attempt in range(30):
            mode = ("lock", "marker", "counter")[attempt % 3]
            progress.unlink(missing_ok=True)
            writer = _FORKSERVER.Process(target=_kill_loop_writer, args=(shm, next_version, str(progress)))
            writer.start()
            try:
                if mode == "lock":  # the kernel says the writer holds the lock
                    _wait_for(lambda: writer.pid in _flock_holders(lock.path), "the writer holding the lock",
                              interval=0.0002)
                elif mode == "marker":  # an in-place copy is under way
                    def copying():
                        meta = registry.get(META_PREFIX + "victim")
                        return bool(progress.exists() and meta and meta.get("redo") is not None)

                    _wait_for(copying, "an in-place copy", interval=0.0002)
                    time.sleep(rng.uniform(0, 0.002))
                else:  # a few stores in, at a random moment
                    target = next_version + rng.randint(1, 3)
                    _wait_for(lambda: progress.exists() and int(progress.read_text() or 0) >= target,
                              "the writer's progress", interval=0.002)
                    time.sleep(rng.uniform(0, 0.03))
            finally:
                os.kill(writer.pid, signal.SIGKILL)
                writer.join(30)
            held_at_kill += writer.pid in _flock_holders(lock.path)  # (the kernel drops it at once)
            meta = registry.get(META_PREFIX + "victim")
            marker_at_kill += meta.get("redo") is not None
            written = int(progress.read_text())

            # the lock is free, and the next store/load/delete go through without a restart
            assert lock.acquire(timeout=5), f"kill {attempt} ({mode}) left the lock held"
            lock.release()
            version = _uniform_version(shm.load("victim"), ("w", "b"))
            assert floor <= version <= written, (attempt, mode, floor, version, written)
            victim2 = shm.load("victim2")
            version2 = _uniform_version(victim2, ("w",))
            assert floor2 <= version2 <= written and victim2["v"] == version2
            assert victim2["w"].shape == (1000 + int(version2) % 7,)
            for key, value in keep.items():
                _assert_same(value, shm.load(key))
            shm.store("after-kill", torch.arange(6.0))
            assert torch.equal(shm.load("after-kill"), torch.arange(6.0)) and shm.delete("after-kill")
            floor, floor2 = version, version2
            next_version = written + 1
        assert held_at_kill == 0, "a dead writer still holds the lock"
        assert marker_at_kill >= 3, f"only {marker_at_kill} kills landed during an in-place copy"
        report = shm.reconcile()
        assert report.removed == () and report.registry_alive
        assert not [k for k in registry.keys() if k.startswith(META_PREFIX)
                    and (registry.get(k) or {}).get("redo") is not None]
        journals = [f for f in os.listdir(shm_module.SHM_DIR)
                    if f.startswith(shm_module.JOURNAL_PREFIX + shm._journal_tag)]
        assert journals == [], "killed writers' journals are left in /dev/shm"
        row = db.get_shm_object("victim")
        assert (row.num_bytes, row.tensor_count) == (_KILL_W * 4 + _KILL_B * 8, 2)
        row2 = db.get_shm_object("victim2")
        assert row2.num_bytes == (1000 + int(floor2) % 7) * 4
    finally:
        shm.close()
        lock.remove()


# --- /dev/shm files of killed writers ---------------------------------------------------------


def _dev_shm_files_of(pid: int) -> list:
    """The /dev/shm files whose name carries ``pid`` (torch's ``torch_<pid>_…``, our journals)."""
    import re

    pattern = re.compile(rf"(^|[._]){pid}([._]|$)")
    return sorted(name for name in os.listdir(shm_module.SHM_DIR) if pattern.search(name))


def _in_place_writer(manager: SharedMemoryManager, progress: str) -> None:
    """In-place stores of a key the parent created, until killed; ``progress`` counts them."""
    version = 1
    while True:
        manager.store("victim", _victim(version))
        Path(progress + ".tmp").write_text(str(version))
        os.replace(progress + ".tmp", progress)
        version += 1


@pytest.mark.parametrize("moment", ["idle", "mid-copy"])
def test_a_killed_writers_journal_does_not_stay_in_dev_shm(registry_manager, db, tmp_path, moment):
    # The writer only copies in place (the parent made the key), so every /dev/shm file
    # named after it is its journal.  Nobody else may keep it once reconcile() has run:
    # a journal is one object's size, and one per killed writer would fill /dev/shm.
    _FORKSERVER.set_forkserver_preload(["torch", "rapidfire_state.shm_manager", "rapidfire_state.db.store"])
    registry, lock = registry_manager.dict(), SHMLock.create("journal", tmp_path)
    shm = SharedMemoryManager("journal", registry, lock, db, lock_timeout=10)
    progress = tmp_path / "progress"
    try:
        shm.store("victim", _victim(0))
        writer = _FORKSERVER.Process(target=_in_place_writer, args=(shm, str(progress)))
        writer.start()
        try:
            _wait_for(lambda: progress.exists() and int(progress.read_text() or 0) >= 2, "two in-place stores",
                      interval=0.002)
            if moment == "mid-copy":
                _wait_for(lambda: (registry.get(META_PREFIX + "victim") or {}).get("redo") is not None,
                          "an in-place copy", interval=0.0002)
            assert _dev_shm_files_of(writer.pid), "the writer's journal is not in /dev/shm"
        finally:
            os.kill(writer.pid, signal.SIGKILL)
            writer.join(30)
        _uniform_version(shm.load("victim"), ("w", "b"))
        shm.reconcile()
        assert _dev_shm_files_of(writer.pid) == [], "a dead writer's journal is left in /dev/shm"
        shm.store("victim", _victim(99))  # and in-place stores still work
        assert _uniform_version(shm.load("victim"), ("w", "b")) == 99
    finally:
        shm.close()
        lock.remove()


def _store_and_die_mid_copy(manager: SharedMemoryManager, version: int) -> None:
    """An in-place store that SIGKILLs itself halfway through the copy under the lock."""
    real, calls = shm_module._copy_tensors, []

    def copy(dsts, srcs):
        calls.append(len(dsts))
        if len(calls) == 2:  # the second copy is the journal into the shared tensors
            real(dsts[:1], srcs[:1])
            os.kill(os.getpid(), signal.SIGKILL)
        real(dsts, srcs)

    shm_module._copy_tensors = copy
    manager.store("victim", _victim(version))


def _delete_and_die_between_pops(manager: SharedMemoryManager) -> None:
    """A delete that SIGKILLs itself after its first registry removal."""
    registry, real_pop = manager._registry, manager._registry.pop

    def pop(*args):
        result = real_pop(*args)
        os.kill(os.getpid(), signal.SIGKILL)
        return result

    registry.pop = pop
    manager.delete("victim")


def test_a_delete_killed_after_a_killed_copy_never_leaves_a_torn_key(registry_manager, db, tmp_path):
    _FORKSERVER.set_forkserver_preload(["torch", "rapidfire_state.shm_manager", "rapidfire_state.db.store"])
    registry, lock = registry_manager.dict(), SHMLock.create("delete", tmp_path)
    shm = SharedMemoryManager("delete", registry, lock, db, lock_timeout=10)
    try:
        shm.store("victim", _victim(1))
        for target, args in ((_store_and_die_mid_copy, (shm, 2)), (_delete_and_die_between_pops, (shm,))):
            child = _FORKSERVER.Process(target=target, args=args)
            child.start()
            child.join(CHILD_TIMEOUT)
            assert child.exitcode == -signal.SIGKILL
            if target is _store_and_die_mid_copy:
                assert registry.get(META_PREFIX + "victim").get("redo") is not None, "the copy was not cut short"
                assert registry.get("victim")["w"][0].item() == 2.0 and registry.get("victim")["b"][0].item() == 1.0
        assert lock.acquire(timeout=5)
        lock.release()
        try:
            value = shm.load("victim")
        except SHMKeyError:
            pass  # deleted: fine
        else:
            _uniform_version(value, ("w", "b"))
        shm.reconcile()
        assert [f for f in os.listdir(shm_module.SHM_DIR) if f.startswith(shm_module.JOURNAL_PREFIX + shm._journal_tag)] == []
    finally:
        shm.close()
        lock.remove()


def _in_place_and_return(manager: SharedMemoryManager) -> None:
    manager.store("victim", _victim(5))
    manager.store("victim", _victim(6))


@pytest.mark.parametrize("context", ["forkserver", "spawn"])
def test_a_worker_that_returns_takes_its_journal_with_it(registry_manager, db, tmp_path, context):
    # No reconcile(), no close(): a worker process that just returns (forked children end
    # with os._exit, which skips atexit) removes its journal.
    _FORKSERVER.set_forkserver_preload(["torch", "rapidfire_state.shm_manager", "rapidfire_state.db.store"])
    registry, lock = registry_manager.dict(), SHMLock.create("exit", tmp_path)
    shm = SharedMemoryManager("exit", registry, lock, db)
    try:
        shm.store("victim", _victim(0))
        child = multiprocessing.get_context(context).Process(target=_in_place_and_return, args=(shm,))
        child.start()
        child.join(CHILD_TIMEOUT)
        assert child.exitcode == 0
        assert _uniform_version(shm.load("victim"), ("w", "b")) == 6
        assert _dev_shm_files_of(child.pid) == [], "a worker's journal outlived it"
    finally:
        shm.close()
        lock.remove()
