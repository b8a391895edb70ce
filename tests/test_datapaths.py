"""DataPath: layout, validation, containment, lifecycle."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from rapidfire_state.datapaths import DataPath, validate_component, validate_index
from rapidfire_state.exceptions import DataPathException, RapidFireError


@pytest.fixture(autouse=True)
def _clean_datapath():
    DataPath.reset()
    yield
    DataPath.reset()


def tree(root: Path) -> set[str]:
    """Every file, directory and link under ``root``, relative (links not followed)."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            out.add(os.path.relpath(os.path.join(dirpath, name), root))
    return out


@pytest.fixture
def base(tmp_path) -> Path:
    return tmp_path / "experiments"


@pytest.fixture
def logs(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "logs"
    monkeypatch.setenv("RF_LOG_PATH", str(path))
    return path


# --- layout -------------------------------------------------------------------------


def test_initialize_creates_tree_and_returns_experiment_dir(base):
    exp_dir = DataPath.initialize("my_experiment", str(base))
    assert exp_dir == base.resolve() / "my_experiment"
    assert exp_dir.is_absolute()
    assert (exp_dir / "runs").is_dir()
    assert (exp_dir / "datasets").is_dir()
    assert tree(base) == {"my_experiment", "my_experiment/runs", "my_experiment/datasets"}
    assert DataPath.is_initialized()
    assert DataPath.experiment_name() == "my_experiment"
    assert DataPath.base_path() == base.resolve()
    assert DataPath.experiment_path() == exp_dir


def test_checkpoint_path_matches_spec_example(base):
    DataPath.initialize("my_experiment", str(base))
    path = DataPath.checkpoint_path(run_id=5, chunk_id=2)
    expected = f"{base.resolve()}/my_experiment/runs/run_5/checkpoints/checkpoint_chunk_2.pt"
    assert str(path) == expected
    assert path.parent.is_dir()  # parent created...
    assert not path.exists()  # ...but never the file


def test_every_path_form(base, logs):
    exp = DataPath.initialize("exp-1.a_b", base)  # a Path is accepted as well as a str
    assert DataPath.run_path(0) == exp / "runs" / "run_0"
    assert DataPath.run_path(0).is_dir()
    assert DataPath.checkpoints_dir(3) == exp / "runs" / "run_3" / "checkpoints"
    assert DataPath.checkpoints_dir(3).is_dir()
    assert DataPath.checkpoint_path(3, 0) == exp / "runs" / "run_3" / "checkpoints" / "checkpoint_chunk_0.pt"
    assert DataPath.dataset_path() == exp / "datasets" / "dataset.dill"
    assert DataPath.log_dir() == logs.resolve() / "exp-1.a_b"
    assert DataPath.log_dir().is_dir()
    assert DataPath.log_path("worker_0") == logs.resolve() / "exp-1.a_b" / "worker_0.log"
    assert not DataPath.log_path("worker_0").exists()


def test_relative_base_is_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp = DataPath.initialize("e", "rel/../rel2")
    assert DataPath.base_path() == tmp_path.resolve() / "rel2"
    assert exp == tmp_path.resolve() / "rel2" / "e"
    assert not (tmp_path / "rel").exists()


def test_user_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    exp = DataPath.initialize("e", "~/exps")
    assert exp == (tmp_path / "home" / "exps" / "e").resolve()


def test_log_path_reads_rf_log_path_at_call_time(base, tmp_path, monkeypatch, rf_home):
    DataPath.initialize("e", base)
    # conftest leaves RF_LOG_PATH unset: the default is $RF_HOME/logs
    assert DataPath.log_path("controller") == Path(rf_home).resolve() / "logs" / "e" / "controller.log"
    monkeypatch.setenv("RF_LOG_PATH", str(tmp_path / "other"))
    assert DataPath.log_path("controller") == (tmp_path / "other").resolve() / "e" / "controller.log"


def test_max_length_name_accepted_and_one_more_refused(base):
    DataPath.initialize("x" * 128, base)
    with pytest.raises(DataPathException):
        DataPath.initialize("y" * 129, base)
    assert DataPath.experiment_name() == "x" * 128


def test_numpy_style_integral_ids_accepted(base):
    import numbers

    class MyInt(int):  # stands in for numpy.int64 (an Integral that is not a bool)
        pass

    assert isinstance(MyInt(4), numbers.Integral)
    DataPath.initialize("e", base)
    assert DataPath.checkpoint_path(MyInt(4), MyInt(1)).name == "checkpoint_chunk_1.pt"


# --- use before initialize ------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda: DataPath.checkpoint_path(1, 1),
        lambda: DataPath.dataset_path(),
        lambda: DataPath.log_path("controller"),
        lambda: DataPath.log_dir(),
        lambda: DataPath.experiment_path(),
        lambda: DataPath.run_path(1),
        lambda: DataPath.checkpoints_dir(1),
        lambda: DataPath.experiment_name(),
        lambda: DataPath.base_path(),
    ],
)
def test_use_before_initialize_raises_clear_error(call, tmp_path):
    before = tree(tmp_path)
    assert not DataPath.is_initialized()
    with pytest.raises(DataPathException, match=r"call DataPath\.initialize"):
        call()
    assert tree(tmp_path) == before


def test_datapath_exception_is_a_rapidfire_error():
    with pytest.raises(RapidFireError):
        DataPath.dataset_path()


# --- refused input, nothing created ----------------------------------------------------

BAD_NAMES = [
    "",
    ".",
    "..",
    ".hidden",
    "a/b",
    "../escape",
    "..\\escape",
    "a\\b",
    "/abs",
    "a..b",
    "a\x00b",
    "a\nb",
    "tab\there",
    "with space",
    "semi;colon",
    "caf\u00e9",
    "x" * 129,
    "ok\n",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_experiment_names_refused_and_nothing_created(name, tmp_path, base):
    before = tree(tmp_path)
    with pytest.raises(DataPathException) as info:
        DataPath.initialize(name, str(base))
    assert repr(name) in str(info.value)  # the message names the value
    assert tree(tmp_path) == before
    assert not DataPath.is_initialized()


@pytest.mark.parametrize("name", [None, 5, b"bytes", ["a"]])
def test_non_string_experiment_names_refused(name, base, tmp_path):
    before = tree(tmp_path)
    with pytest.raises(DataPathException, match="invalid experiment name"):
        DataPath.initialize(name, str(base))  # type: ignore[arg-type]
    assert tree(tmp_path) == before


@pytest.mark.parametrize("bad_base", ["", "   ", "a\x00b", b"/tmp/x", 12])
def test_bad_base_path_refused(bad_base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    with pytest.raises(DataPathException):
        DataPath.initialize("e", bad_base)  # type: ignore[arg-type]
    assert tree(tmp_path) == before


@pytest.mark.parametrize("bad_id", [-1, True, False, 1.0, "5", None, 2.5])
def test_bad_run_and_chunk_ids_refused_and_nothing_created(bad_id, base):
    exp = DataPath.initialize("e", base)
    before = tree(base)
    for call in (
        lambda: DataPath.checkpoint_path(bad_id, 0),
        lambda: DataPath.checkpoint_path(0, bad_id),
        lambda: DataPath.run_path(bad_id),
        lambda: DataPath.checkpoints_dir(bad_id),
    ):
        with pytest.raises(DataPathException, match="must be a non-negative integer"):
            call()
    assert tree(base) == before
    assert list((exp / "runs").iterdir()) == []


@pytest.mark.parametrize("name", ["../x", "a/b", ".log", "", "..", "x" * 129, "a b"])
def test_bad_logger_names_refused(name, base, logs, tmp_path):
    DataPath.initialize("e", base)
    before = tree(tmp_path)
    with pytest.raises(DataPathException, match="invalid logger name"):
        DataPath.log_path(name)
    assert tree(tmp_path) == before


# --- containment: symlinks may not lead outside the base ---------------------------------


def test_symlinked_experiment_dir_outside_base_refused(tmp_path, base):
    outside = tmp_path / "outside"
    outside.mkdir()
    base.mkdir()
    (base / "evil").symlink_to(outside, target_is_directory=True)
    DataPath.initialize("good", base)
    before = tree(tmp_path)
    with pytest.raises(DataPathException, match="outside its base"):
        DataPath.initialize("evil", base)
    assert tree(tmp_path) == before  # no runs/ or datasets/ created in outside/
    assert DataPath.experiment_name() == "good"  # state unchanged by the failure


def test_symlinked_run_dir_outside_experiment_refused(tmp_path, base):
    exp = DataPath.initialize("e", base)
    outside = tmp_path / "outside"
    outside.mkdir()
    (exp / "runs" / "run_7").symlink_to(outside, target_is_directory=True)
    for call in (
        lambda: DataPath.checkpoint_path(7, 0),
        lambda: DataPath.checkpoints_dir(7),
        lambda: DataPath.run_path(7),
    ):
        with pytest.raises(DataPathException, match="outside its base"):
            call()
    assert list(outside.iterdir()) == []  # no checkpoints/ created through the link
    # other runs are unaffected
    assert DataPath.checkpoint_path(8, 0).parent.is_dir()


def test_symlinked_checkpoint_file_outside_refused(tmp_path, base):
    DataPath.initialize("e", base)
    target = tmp_path / "victim.pt"
    directory = DataPath.checkpoints_dir(1)
    (directory / "checkpoint_chunk_0.pt").symlink_to(target)
    with pytest.raises(DataPathException, match="outside its base"):
        DataPath.checkpoint_path(1, 0)


def test_symlinked_dataset_dir_outside_refused(tmp_path, base):
    exp = DataPath.initialize("e", base)
    outside = tmp_path / "outside"
    outside.mkdir()
    (exp / "datasets").rmdir()
    (exp / "datasets").symlink_to(outside, target_is_directory=True)
    with pytest.raises(DataPathException, match="outside its base"):
        DataPath.dataset_path()


def test_symlinked_log_dir_outside_log_base_refused(tmp_path, base, logs):
    DataPath.initialize("e", base)
    outside = tmp_path / "outside"
    outside.mkdir()
    logs.mkdir()
    (logs / "e").symlink_to(outside, target_is_directory=True)
    with pytest.raises(DataPathException, match="outside its base"):
        DataPath.log_path("controller")
    with pytest.raises(DataPathException, match="outside its base"):
        DataPath.log_dir()


def test_symlink_inside_base_is_fine(base):
    exp = DataPath.initialize("e", base)
    real = exp / "runs" / "real_run"
    real.mkdir()
    (exp / "runs" / "run_1").symlink_to(real, target_is_directory=True)
    # resolved to the real directory, which is inside the experiment
    assert DataPath.checkpoint_path(1, 0) == real / "checkpoints" / "checkpoint_chunk_0.pt"


# --- lifecycle ---------------------------------------------------------------------------


def test_reset_forgets_state_but_keeps_files(base):
    exp = DataPath.initialize("e", base)
    ckpt_dir = DataPath.checkpoints_dir(1)
    DataPath.reset()
    assert not DataPath.is_initialized()
    with pytest.raises(DataPathException, match="not initialized"):
        DataPath.checkpoint_path(1, 0)
    assert exp.is_dir() and ckpt_dir.is_dir()
    DataPath.reset()  # idempotent


def test_reinitialize_switches_experiment(base):
    DataPath.initialize("first", base)
    DataPath.initialize("second", base)
    assert DataPath.experiment_name() == "second"
    assert DataPath.dataset_path() == base.resolve() / "second" / "datasets" / "dataset.dill"
    DataPath.initialize("second", base)  # same again: fine
    assert DataPath.experiment_name() == "second"


def test_concurrent_switches_never_mix_experiments(base):
    """A reader always gets the base, name and paths of one and the same experiment."""
    names = ["alpha", "beta"]
    for name in names:
        DataPath.initialize(name, base)
    errors: list[str] = []
    stop = threading.Event()

    def switcher() -> None:
        i = 0
        while not stop.is_set():
            DataPath.initialize(names[i % 2], base)
            i += 1

    def reader() -> None:
        for _ in range(300):
            path = DataPath.checkpoint_path(1, 2)
            exp = path.parents[3].name
            if exp not in names or path != base.resolve() / exp / "runs" / "run_1" / "checkpoints" / "checkpoint_chunk_2.pt":
                errors.append(str(path))

    threads = [threading.Thread(target=switcher)] + [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join()
    stop.set()
    threads[0].join()
    assert errors == []


def test_cannot_instantiate():
    with pytest.raises(TypeError):
        DataPath()


def test_validators_directly():
    assert validate_component("worker_0", "logger name") == "worker_0"
    assert validate_index(0, "run_id") == 0
    with pytest.raises(DataPathException, match="invalid run_id -1"):
        validate_index(-1, "run_id")
    with pytest.raises(DataPathException, match="invalid logger name 'a/b'"):
        validate_component("a/b", "logger name")
