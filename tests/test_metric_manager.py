"""MLflowManager against real MLflow stores (embedded SQLite; a server in the slow test).

Opening a new SQLite store runs MLflow's migrations (~1.5 s), so most tests share
one module-scoped manager and make their own experiments and runs in it.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path


import pytest

from mlflow_server import mlflow_server_factory  # noqa: F401  (a fixture)

from rapidfire_state.exceptions import ConfigError, NotFoundError, RapidFireError
from rapidfire_state.metric_manager import (
    MetricInputError,
    MetricLoggingError,
    MetricNotFoundError,
    MLflowManager,
)

UNKNOWN_RUN = "0" * 32


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mlflow_store")


@pytest.fixture(scope="module")
def manager(store_dir) -> MLflowManager:
    return MLflowManager(f"sqlite:///{store_dir / 'mlflow.db'}")


@pytest.fixture
def run_id(manager) -> str:
    experiment = manager.get_experiment(f"exp-{uuid.uuid4().hex[:8]}")
    return manager.create_run(experiment.experiment_id)


# --- stores -------------------------------------------------------------------------------


def test_default_store_lives_under_rf_home(rf_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's own default would put artifacts in ./mlruns
    manager = MLflowManager()
    home = Path(rf_home).resolve()
    assert manager.tracking_uri == f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    assert (home / "mlflow" / "mlflow.db").is_file()
    assert manager.artifact_root == home / "mlflow" / "artifacts"
    assert manager.artifact_root.is_dir()

    # The "Default" experiment MLflow creates with the store, and ours, keep their
    # artifacts under RF_HOME, and nothing is written to the working directory.
    default = manager.client.get_experiment("0")
    assert default.artifact_location == (home / "mlflow" / "artifacts" / "0").as_uri()
    experiment = manager.get_experiment("default store")
    assert experiment.artifact_location.startswith((home / "mlflow" / "artifacts").as_uri() + "/")
    for experiment_id in ("0", experiment.experiment_id):
        run = manager.create_run(experiment_id)
        artifact = tmp_path / "note.txt"
        artifact.write_text("x")
        manager.log_artifact(run, artifact)
    assert not (tmp_path / "mlruns").exists()
    assert len(list((home / "mlflow" / "artifacts").rglob("note.txt"))) == 2


def test_store_survives_reopening(store_dir, manager):
    experiment = manager.get_experiment("reopened")
    run = manager.create_run(experiment.experiment_id)
    manager.log_metric(run, "loss", 0.25, step=3)
    again = MLflowManager(f"sqlite:///{store_dir / 'mlflow.db'}")
    assert again.get_experiment("reopened").experiment_id == experiment.experiment_id
    assert again.get_run_metrics(run) == {"loss": [(3, 0.25)]}


@pytest.mark.parametrize(
    "uri, hint",
    [
        ("/tmp/mlruns", "file store"),
        ("./mlruns", "file store"),
        ("file:///tmp/mlruns", "file store"),
        (Path("/tmp/mlruns"), "is a path"),
        ("", "non-empty"),
        ("   ", "non-empty"),
        (42, "non-empty"),
        ("ftp://host/x", "unsupported scheme"),
        ("databricks", "file store"),
        ("http://", "no host"),
        ("sqlitex:///a.db", "unsupported scheme"),
    ],
)
def test_bad_store_uri(uri, hint):
    with pytest.raises(ConfigError, match=hint) as info:
        MLflowManager(uri)  # type: ignore[arg-type]
    message = str(info.value)
    assert "sqlite:///" in message and "http" in message
    if isinstance(uri, str) and uri.strip():
        assert repr(uri) in message


def test_server_uri_is_accepted_without_contacting_it():
    # The REST store is lazy: constructing a manager for a server that is not
    # running must not block or fail (the first call would).
    manager = MLflowManager("http://127.0.0.1:1")
    assert manager.is_server and manager.artifact_root is None
    # MLflow would retry for minutes; check_server says so at once.
    started = time.monotonic()
    with pytest.raises(MetricLoggingError, match="not healthy.*connection refused"):
        manager.check_server(timeout=1.0)
    assert time.monotonic() - started < 5


def test_check_server_is_a_no_op_for_databases(manager):
    manager.check_server()


def test_managers_with_different_stores_coexist(manager, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    global_uri = mlflow.get_tracking_uri()
    other = MLflowManager(f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}")
    assert other.artifact_root == (tmp_path / "other" / "artifacts").resolve()
    a = manager.get_experiment("only in the first store")
    b = other.get_experiment("only in the second store")
    assert manager.client.get_experiment_by_name("only in the second store") is None
    assert other.client.get_experiment_by_name("only in the first store") is None
    assert a.artifact_location != b.artifact_location
    # No global MLflow state was touched.
    assert mlflow.get_tracking_uri() == global_uri
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert mlflow.active_run() is None


_RACER = """
import sys, time
from pathlib import Path
import mlflow.tracking  # imported before the start signal, so that the opens overlap
from rapidfire_state.metric_manager import MLflowManager
work = Path(sys.argv[1])
(work / f"ready-{sys.argv[2]}").touch()
while not (work / "go").exists():
    time.sleep(0.01)
manager = MLflowManager(f"sqlite:///{work / 'store' / 'mlflow.db'}")
print(manager.get_experiment("shared").experiment_id)
"""


@pytest.mark.slow
def test_processes_opening_a_new_store_at_once(tmp_path):
    # Unserialised, MLflow's table creation races ("duplicate column", "table
    # _alembic_tmp_tags already exists") and every process but one fails.
    count = 3
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(tmp_path), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(count)
    ]
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("ready-*"))) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        (tmp_path / "go").touch()
        outputs = [racer.communicate(timeout=120) for racer in racers]
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
                racer.wait()
    for racer, (out, err) in zip(racers, outputs):
        assert racer.returncode == 0, err[-2000:]
    assert len({out.strip() for out, _ in outputs}) == 1


# --- experiments and runs ---------------------------------------------------------------------


def test_get_experiment_gets_or_creates(manager):
    first = manager.get_experiment("my_experiment")
    second = manager.get_experiment("my_experiment")
    assert first.experiment_id == second.experiment_id
    assert first.name == "my_experiment"
    assert first.lifecycle_stage == "active"
    assert manager.get_experiment("another").experiment_id != first.experiment_id


def test_deleted_experiment_is_restored(manager):
    experiment = manager.get_experiment("to be deleted")
    manager.client.delete_experiment(experiment.experiment_id)
    restored = manager.get_experiment("to be deleted")
    assert restored.experiment_id == experiment.experiment_id
    assert restored.lifecycle_stage == "active"


@pytest.mark.parametrize("name", ["", "   ", None, 3])
def test_get_experiment_bad_name(manager, name):
    with pytest.raises(MetricInputError, match="name"):
        manager.get_experiment(name)  # type: ignore[arg-type]


def test_create_run_and_end_run(manager):
    experiment = manager.get_experiment("lifecycle")
    run = manager.create_run(experiment.experiment_id)
    assert isinstance(run, str) and len(run) == 32
    assert manager.get_run_status(run) == "RUNNING"
    manager.end_run(run)
    assert manager.get_run_status(run) == "FINISHED"

    failed = manager.create_run(int(experiment.experiment_id), run_name="r-failed")
    manager.end_run(failed, "failed")
    assert manager.get_run_status(failed) == "FAILED"

    from rapidfire_state.constants import RunEndedBy

    completed = manager.create_run(experiment.experiment_id)
    manager.end_run(completed, RunEndedBy.COMPLETED)  # RapidFire's word for FINISHED
    assert manager.get_run_status(completed) == "FINISHED"


@pytest.mark.parametrize("status", ["BOGUS", "RUNNING", "STOPPED", "", 3])
def test_end_run_bad_status(manager, run_id, status):
    with pytest.raises(MetricInputError, match="FINISHED, FAILED, KILLED"):
        manager.end_run(run_id, status)  # type: ignore[arg-type]
    assert manager.get_run_status(run_id) == "RUNNING"


def test_create_run_unknown_experiment(manager):
    with pytest.raises(MetricNotFoundError) as info:
        manager.create_run("987654")
    assert info.value.entity_id == "987654"
    assert "987654" in str(info.value)
    with pytest.raises(MetricInputError):
        manager.create_run("")


def test_delete_run(manager, run_id):
    manager.log_metric(run_id, "loss", 1.0)
    manager.delete_run(run_id)  # flushes what was logged before it
    assert manager.client.get_run(run_id).info.lifecycle_stage == "deleted"
    assert [m.value for m in manager.client.get_metric_history(run_id, "loss")] == [1.0]
    # MLflow refuses to log to a deleted run: the point is kept as failed, with
    # MLflow's reason, and nothing is raised into the caller
    manager.log_metric(run_id, "loss", 2.0)
    manager.flush(timeout=30)
    assert manager.pending() == 0
    [failed] = manager.failed()
    assert failed["key"] == "loss" and failed["value"] == 2.0 and "active" in failed["error"]


# --- metrics -----------------------------------------------------------------------------------


def test_metrics_with_steps(manager, run_id):
    manager.log_metric(run_id, "loss", 0.9, step=0)
    manager.log_metric(run_id, "loss", 0.5, step=2)
    manager.log_metric(run_id, "loss", 0.7, step=1)
    manager.log_metric(run_id, "accuracy", 1)  # int, default step 0
    assert manager.get_run_metrics(run_id) == {
        "accuracy": [(0, 1.0)],
        "loss": [(0, 0.9), (1, 0.7), (2, 0.5)],
    }


def test_non_finite_values(manager, run_id):
    manager.log_metric(run_id, "nan", float("nan"), step=1)
    manager.log_metric(run_id, "inf", float("inf"), step=1)
    metrics = manager.get_run_metrics(run_id)
    assert math.isnan(metrics["nan"][0][1])
    # MLflow's SQL store clamps +inf to the largest float.
    assert metrics["inf"][0][1] in (math.inf, sys.float_info.max)


@pytest.mark.parametrize(
    "key, value, step, match",
    [
        ("loss", "0.5", None, "not a number"),
        ("loss", None, None, "not a number"),
        ("loss", [1.0], None, "not a number"),
        (None, 1.0, None, "key"),
        (3, 1.0, None, "key"),
        ("", 1.0, None, "key"),
        ("loss", 1.0, -1, "step"),
        ("loss", 1.0, 1.5, "step"),
        ("loss", 1.0, True, "step"),
        ("loss", 1.0, "3", "step"),
    ],
)
def test_log_metric_bad_input(manager, run_id, key, value, step, match):
    with pytest.raises(MetricInputError, match=match):
        manager.log_metric(run_id, key, value, step=step)
    assert manager.get_run_metrics(run_id) == {}


def test_log_metrics_batch(manager, run_id):
    metrics = {f"m{i}": i / 10 for i in range(1000)}
    started = time.perf_counter()
    manager.log_metrics(run_id, metrics, step=7)
    elapsed = time.perf_counter() - started
    stored = manager.get_run_metrics(run_id)
    assert len(stored) == 1000
    assert stored["m999"] == [(7, 99.9)]
    # ~0.15 s measured; a per-metric loop would take ~10 s.  Generous bound for CI.
    assert elapsed < 5, elapsed
    manager.log_metrics(run_id, {})  # nothing to do, no error


def test_log_metrics_validates_everything_first(manager, run_id):
    with pytest.raises(MetricInputError, match="'bad'"):
        manager.log_metrics(run_id, {"good": 1.0, "bad": "x"})
    assert manager.get_run_metrics(run_id) == {}
    with pytest.raises(MetricInputError, match="mapping"):
        manager.log_metrics(run_id, [("a", 1.0)])  # type: ignore[arg-type]


# --- parameters ---------------------------------------------------------------------------------


def test_params(manager, run_id):
    manager.log_param(run_id, "lr", 0.001)
    manager.log_params(run_id, {"batch_size": 32, "optimizer": "adam", **{f"p{i}": i for i in range(250)}})
    params = manager.get_run_params(run_id)
    assert params["lr"] == "0.001"
    assert params["batch_size"] == "32" and params["optimizer"] == "adam"
    assert len(params) == 253  # more than MLflow's 100 per request: split into batches
    manager.log_param(run_id, "lr", 0.001)  # the same value again is accepted


def test_param_is_immutable(manager, run_id):
    manager.log_param(run_id, "lr", 0.1)
    with pytest.raises(MetricInputError, match="Changing param values is not allowed") as info:
        manager.log_param(run_id, "lr", 0.2)
    assert "Incorrect Example" not in str(info.value)  # MLflow's tutorial is cut
    assert manager.get_run_params(run_id) == {"lr": "0.1"}


def test_too_long_param_is_refused_not_truncated(manager, run_id):
    with pytest.raises(MetricInputError, match="6001 characters"):
        manager.log_param(run_id, "config", "x" * 6001)
    with pytest.raises(MetricInputError, match="truncate"):
        manager.log_params(run_id, {"ok": 1, "config": "x" * 6001})
    assert manager.get_run_params(run_id) == {}
    manager.log_param(run_id, "config", "x" * 6000)
    assert len(manager.get_run_params(run_id)["config"]) == 6000


# --- artifacts --------------------------------------------------------------------------------------


def test_log_artifact_file_and_directory(manager, run_id, tmp_path):
    checkpoint = tmp_path / "checkpoint_chunk_2.pt"
    checkpoint.write_bytes(b"\x00weights")
    manager.log_artifact(run_id, checkpoint)
    manager.log_artifact(run_id, str(checkpoint), artifact_dir="checkpoints")
    folder = tmp_path / "plots"
    folder.mkdir()
    (folder / "loss.png").write_bytes(b"png")
    manager.log_artifact(run_id, folder)

    assert sorted(manager.list_artifacts(run_id)) == ["checkpoint_chunk_2.pt", "checkpoints", "plots"]
    assert manager.list_artifacts(run_id, "plots") == ["plots/loss.png"]
    copies = list(manager.artifact_root.rglob("checkpoint_chunk_2.pt"))
    assert len(copies) == 2 and all(c.read_bytes() == b"\x00weights" for c in copies)


def test_log_artifact_missing_file(manager, run_id, tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(MetricInputError, match="nope.pt.*does not exist"):
        manager.log_artifact(run_id, missing)
    with pytest.raises(MetricInputError):
        manager.log_artifact(run_id, "")
    assert manager.list_artifacts(run_id) == []


# --- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.log_metric(UNKNOWN_RUN, "loss", 1.0),
        lambda m: m.log_metrics(UNKNOWN_RUN, {"loss": 1.0}),
        lambda m: m.log_param(UNKNOWN_RUN, "lr", 1),
        lambda m: m.log_params(UNKNOWN_RUN, {"lr": 1}),
        lambda m: m.end_run(UNKNOWN_RUN),
        lambda m: m.get_run_metrics(UNKNOWN_RUN),
        lambda m: m.get_run_status(UNKNOWN_RUN),
        lambda m: m.delete_run(UNKNOWN_RUN),
    ],
)
def test_unknown_run_id(manager, call):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MetricNotFoundError) as info:
        call(manager)
    error = info.value
    assert isinstance(error, NotFoundError) and isinstance(error, MetricLoggingError)
    assert isinstance(error, RapidFireError)
    assert error.entity == "mlflow run" and error.entity_id == UNKNOWN_RUN
    assert UNKNOWN_RUN in str(error)
    assert isinstance(error.__cause__, MlflowException)


def test_unknown_run_id_artifact(manager, tmp_path):
    artifact = tmp_path / "a.txt"
    artifact.write_text("a")
    with pytest.raises(MetricLoggingError):
        manager.log_artifact(UNKNOWN_RUN, artifact)


@pytest.mark.parametrize("run", ["", None, 5])
def test_bad_run_id(manager, run):
    with pytest.raises(MetricInputError, match="run_id"):
        manager.log_metric(run, "loss", 1.0)  # type: ignore[arg-type]


# --- imports --------------------------------------------------------------------------------------------


def test_import_does_not_load_mlflow():
    code = (
        "import sys\n"
        "import rapidfire_state.metric_manager\n"
        "from rapidfire_state.metric_mlflow_manager import MLflowManager\n"
        "import rapidfire_state\n"
        "assert rapidfire_state.MLflowManager is MLflowManager\n"
        "assert MLflowManager is rapidfire_state.metric_manager.MLflowManager\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'torch'))\n"
        "print(loaded)\n"
        "sys.exit(1 if loaded else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_bad_uri_is_refused_before_importing_mlflow():
    code = (
        "import sys\n"
        "from rapidfire_state.metric_manager import MLflowManager\n"
        "from rapidfire_state.exceptions import ConfigError\n"
        "try:\n"
        "    MLflowManager('/tmp/mlruns')\n"
        "except ConfigError:\n"
        "    sys.exit(1 if 'mlflow' in sys.modules else 0)\n"
        "sys.exit(2)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- a real MLflow server -------------------------------------------------------------------------------


@pytest.fixture
def mlflow_server(mlflow_server_factory):  # noqa: F811  (the imported fixture, used here)
    """A real ``mlflow server --workers 1`` (see tests/mlflow_server.py)."""
    return mlflow_server_factory()


@pytest.mark.slow
def test_against_a_real_server(mlflow_server, tmp_path):
    manager = MLflowManager(mlflow_server.url)
    assert manager.is_server
    manager.check_server()
    experiment = manager.get_experiment("served")
    assert manager.get_experiment("served").experiment_id == experiment.experiment_id
    run = manager.create_run(experiment.experiment_id)
    manager.log_metric(run, "loss", 0.5, step=100)
    manager.log_metrics(run, {"a": 1.0, "b": 2.0}, step=101)
    manager.log_params(run, {"lr": 0.01})
    artifact = tmp_path / "model.txt"
    artifact.write_text("weights")
    manager.log_artifact(run, artifact)
    manager.end_run(run)
    assert manager.get_run_metrics(run) == {"a": [(101, 1.0)], "b": [(101, 2.0)], "loss": [(100, 0.5)]}
    assert manager.get_run_params(run) == {"lr": "0.01"}
    assert manager.list_artifacts(run) == ["model.txt"]
    assert manager.get_run_status(run) == "FINISHED"
    assert list((mlflow_server.directory / "server-artifacts").rglob("model.txt"))
    with pytest.raises(MetricNotFoundError):
        manager.log_metric(UNKNOWN_RUN, "loss", 1.0)
    # a name MLflow refuses is sanitised, not refused (see sanitize_key)
    manager.log_metric(run, "bad key!", 1.0)
    assert manager.get_run_metrics(run)["bad key_"] == [(0, 1.0)]


# --- a store whose creation was interrupted -------------------------------------------------------------
#
# MLflow builds a new SQLite store in ~60 migrations over ~2 s, committing each DDL
# statement on its own.  A process SIGKILLed meanwhile used to leave a store every
# later open refused ("table _alembic_tmp_experiments already exists").


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _store_tables(path: Path) -> tuple[set[str], str | None]:
    import sqlite3

    con = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        revision = None
        if "alembic_version" in tables:
            revision = con.execute("SELECT version_num FROM alembic_version").fetchone()
    finally:
        con.close()
    return tables, None if revision is None else revision[0]


def _mlflow_script():
    from alembic.config import Config
    from alembic.script import ScriptDirectory
    import mlflow.store

    config = Config()
    config.set_main_option("script_location", str(Path(mlflow.store.__file__).parent / "db_migrations"))
    return ScriptDirectory.from_config(config)


def _mlflow_head() -> str:
    return _mlflow_script().get_current_head()


def _assert_complete(path: Path) -> None:
    tables, revision = _store_tables(path)
    assert not [t for t in tables if t.startswith("_alembic_tmp_")], tables
    assert revision == _mlflow_head()


def _assert_usable(uri: str) -> None:
    """A new manager opens ``uri``, logs a metric, and MLflow's own client reads it back."""
    from mlflow.tracking import MlflowClient

    manager = MLflowManager(uri)
    experiment = manager.get_experiment("after the kill")
    run = manager.create_run(experiment.experiment_id)
    manager.log_metric(run, "loss", 0.125, step=7)
    manager.flush(timeout=30)  # the outbox delivers it (or its background thread did)
    assert manager.pending() == 0
    history = MlflowClient(tracking_uri=uri).get_metric_history(run, "loss")
    assert [(m.step, m.value) for m in history] == [(7, 0.125)]


@pytest.fixture(scope="module")
def pristine_store(tmp_path_factory) -> Path:
    """A complete, new store nobody wrote to (copied by the tests that damage one)."""
    directory = tmp_path_factory.mktemp("pristine")
    MLflowManager(f"sqlite:///{directory / 'mlflow.db'}")
    return directory / "mlflow.db"


def _copy_store(pristine: Path, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "mlflow.db"
    shutil.copyfile(pristine, target)
    return target


def _older_revision() -> str:
    head = _mlflow_script().get_revision("head")
    return head.down_revision if isinstance(head.down_revision, str) else head.down_revision[0]


def _damage(path: Path, how: str) -> None:
    """Make ``path`` look like a store whose creation (or migration) was killed midway."""
    import sqlite3

    if how == "empty-file":
        path.write_bytes(b"")
        return
    con = sqlite3.connect(path)
    try:
        if how == "tmp-table":
            # What a batch migration leaves when killed between copying a table into
            # its _alembic_tmp_ twin and renaming it back, one revision short of head.
            con.execute("CREATE TABLE _alembic_tmp_experiments AS SELECT * FROM experiments")
            con.execute("UPDATE alembic_version SET version_num = ?", (_older_revision(),))
        elif how == "no-revision":
            con.execute("DROP TABLE alembic_version")
        elif how == "tmp-runs":
            con.execute("CREATE TABLE _alembic_tmp_runs AS SELECT * FROM runs")
            con.execute("UPDATE alembic_version SET version_num = ?", (_older_revision(),))
        elif how == "older-revision":
            con.execute("UPDATE alembic_version SET version_num = ?", (_older_revision(),))
        elif how == "newer-revision":
            con.execute("UPDATE alembic_version SET version_num = 'ffffffffffff'")
        else:  # pragma: no cover
            raise AssertionError(how)
        con.commit()
    finally:
        con.close()


@pytest.mark.parametrize("how", ["tmp-table", "no-revision", "empty-file"])
def test_unfinished_store_without_data_is_rebuilt(pristine_store, tmp_path, how, caplog):
    path = _copy_store(pristine_store, tmp_path / "store")
    _damage(path, how)
    if how == "tmp-table":
        # The failure this guards against: MLflow itself refuses such a store.
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        with pytest.raises(Exception):
            SqlAlchemyStore(f"sqlite:///{path}", (tmp_path / "art").as_uri())
    caplog.set_level("WARNING", logger="rapidfire_state.metric_manager")
    _assert_usable(f"sqlite:///{path}")
    _assert_complete(path)
    rebuilt = [r.getMessage() for r in caplog.records if "rebuilt" in r.getMessage()]
    assert len(rebuilt) == 1 and str(path) in rebuilt[0] and "held no data" in rebuilt[0], rebuilt
    assert sorted(p.name for p in path.parent.iterdir()) == ["artifacts", "mlflow.db", "mlflow.db.lock"]


@pytest.mark.parametrize(
    "how, problem",
    [
        ("tmp-runs", "interrupted migration left _alembic_tmp_runs"),
        ("older-revision", "schema revision"),
        ("no-revision", "no MLflow schema revision"),
    ],
)
def test_unfinished_store_with_data_is_refused_and_kept(pristine_store, tmp_path, how, problem):
    path = _copy_store(pristine_store, tmp_path / "store")
    uri = f"sqlite:///{path}"
    manager = MLflowManager(uri)
    run = manager.create_run(manager.get_experiment("precious").experiment_id)
    manager.log_metric(run, "loss", 0.5, step=1)
    manager.close(timeout=30)  # delivered, and no flusher writes to the store any more
    _damage(path, how)
    before = _sha256(path)
    listing = sorted(p.name for p in path.parent.iterdir())
    for _ in range(2):  # and again: a refusal leaves nothing that changes the next answer
        with pytest.raises(MetricLoggingError) as info:
            MLflowManager(uri)
        message = str(info.value)
        assert str(path) in message and problem in message
        assert "holds data" in message and "runs: 1 row" in message and "left untouched" in message
        assert _sha256(path) == before
        assert sorted(p.name for p in path.parent.iterdir()) == listing


@pytest.mark.parametrize(
    "content, match",
    [("newer-revision", "newer MLflow"), (b"this is not a database, " * 100, "cannot be read as an SQLite")],
    ids=["newer-revision", "not-sqlite"],
)
def test_store_that_cannot_be_judged_is_left_untouched(pristine_store, tmp_path, content, match):
    path = _copy_store(pristine_store, tmp_path / "store")
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        _damage(path, content)
    before = _sha256(path)
    with pytest.raises(MetricLoggingError, match=match) as info:
        MLflowManager(f"sqlite:///{path}")
    assert "untouched" in str(info.value)
    assert _sha256(path) == before


_STORE_OPENER = """
import sys, time
from pathlib import Path
kind, uri, root, work = sys.argv[1:5]
if kind == "manager":
    from rapidfire_state.metric_manager import MLflowManager
else:  # MLflow on its own: how a store was made before this library built it beside
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
import mlflow.tracking  # imported before the start signal: the test waits for the store, not imports
(Path(work) / "ready").touch()
while not (Path(work) / "go").exists():
    time.sleep(0.005)
if kind == "manager":
    MLflowManager(uri)
else:
    SqlAlchemyStore(uri, root)
"""


@pytest.fixture(scope="module")
def full_store_size(pristine_store) -> int:
    return pristine_store.stat().st_size


def _store_files(directory: Path) -> dict[str, int]:
    files = {}
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                try:
                    files[entry.name] = entry.stat().st_size
                except FileNotFoundError:  # renamed or deleted while we looked
                    pass
    except FileNotFoundError:
        pass
    return files


def _databases(files: dict[str, int]) -> dict[str, int]:
    """The database files among ``files`` (final or temporary), without lock and journals."""
    return {
        name: size
        for name, size in files.items()
        if name.startswith("mlflow.db") and not name.endswith((".lock", "-journal", "-wal", "-shm"))
    }


# Moments of a first start, told by what the directory shows (not by sleeps).
_KILL_MOMENTS = {
    "database-file-created": lambda files, full: bool(_databases(files)),
    "tables-being-created": lambda files, full: any(s > 0 for s in _databases(files).values()),
    "journal-open": lambda files, full: any(n.startswith("mlflow.db") and n.endswith("-journal") for n in files),
    "migrations-30pct": lambda files, full: any(s >= 0.3 * full for s in _databases(files).values()),
    "migrations-75pct": lambda files, full: any(s >= 0.75 * full for s in _databases(files).values()),
    "store-installed": lambda files, full: files.get("mlflow.db", 0) > 0 and len(_databases(files)) == 1,
}
_KILLS = [("manager", m) for m in _KILL_MOMENTS] + [("mlflow-alone", "migrations-30pct")]


@pytest.mark.slow
def test_sigkill_during_store_creation_never_bricks_later_opens(tmp_path, full_store_size):
    # One child per moment, all started at once so that their imports (seconds each)
    # overlap; each waits for its own start signal.
    children = []
    for index, (opener, moment) in enumerate(_KILLS):
        work = tmp_path / f"kill{index}"
        directory = work / "mlflow"
        directory.mkdir(parents=True)
        uri = f"sqlite:///{directory / 'mlflow.db'}"
        child = subprocess.Popen(
            [sys.executable, "-c", _STORE_OPENER, opener, uri, (work / "art").as_uri(), str(work)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        children.append((opener, moment, work, directory, uri, child))
    try:
        for opener, moment, work, directory, uri, child in children:
            label = f"{opener}/{moment}"
            wait_until = time.monotonic() + 120
            while not (work / "ready").exists():
                assert child.poll() is None, (label, child.stderr.read()[-2000:])
                assert time.monotonic() < wait_until, label
                time.sleep(0.02)
            condition = _KILL_MOMENTS[moment]
            (work / "go").touch()
            seen: dict[str, int] = {}
            while child.poll() is None and time.monotonic() < wait_until:
                seen = _store_files(directory)
                if condition(seen, full_store_size):
                    child.kill()
                    break
                time.sleep(0.001)
            child.wait(timeout=30)
            if moment != "store-installed":
                # The kill must have landed during the creation, not after it.
                assert child.returncode == -signal.SIGKILL, (label, seen, child.stderr.read()[-2000:])
            final = directory / "mlflow.db"
            if opener == "manager" and final.exists():
                _assert_complete(final)  # never a half-made store under the final name
            _assert_usable(uri)
            _assert_complete(final)
            leftovers = [n for n in os.listdir(directory) if ".creating." in n or n.endswith(("-journal", "-wal"))]
            assert leftovers == [], label
    finally:
        for *_, child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
