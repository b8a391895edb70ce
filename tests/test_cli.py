"""The ``rapidfire-state`` command line: inspection, SQL, maintenance, and the wheel."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import venv
from pathlib import Path
from typing import Optional

import pytest

from rapidfire_state.cli import main
from rapidfire_state.db import migrate
from rapidfire_state.db.engine import resolve_url
from rapidfire_state.db.store.processes import HOST

REPO = Path(__file__).resolve().parents[1]
FIRST = "0001_initial"


@pytest.fixture
def populated(db, tmp_path):
    experiment = db.create_experiment("cli_exp", str(tmp_path / "exps"))
    db.transition_experiment(experiment.experiment_id, "RUNNING")
    run = db.create_run(experiment.experiment_id, {"lr": 0.1})
    db.transition_run(run.run_id, "ONGOING")
    db.create_worker_task(experiment.experiment_id, run.run_id, 0, 0)
    return db, experiment, run


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_listings_show_the_state(populated, capsys):
    db, experiment, run = populated
    url = db.url.render_as_string(hide_password=False)
    code, out, _ = run_cli(capsys, "--url", url, "experiments")
    assert code == 0 and "cli_exp" in out and "RUNNING" in out
    code, out, _ = run_cli(capsys, "--url", url, "runs", "--json")
    rows = json.loads(out)
    assert code == 0 and rows[0]["run_id"] == run.run_id and rows[0]["status"] == "ONGOING"
    code, out, _ = run_cli(capsys, "--url", url, "tasks", "--json")
    assert [r["status"] for r in json.loads(out)] == ["SCHEDULED"]
    code, out, _ = run_cli(capsys, "--url", url, "history", "run", str(run.run_id), "--json")
    assert [(r["from_status"], r["to_status"]) for r in json.loads(out)] == [(None, "NEW"), ("NEW", "ONGOING")]


def test_sql_reads_views_and_refuses_writes(populated, capsys):
    db, experiment, run = populated
    url = db.url.render_as_string(hide_password=False)
    code, out, _ = run_cli(capsys, "--url", url, "sql", "SELECT run_id, experiment_name, status FROM run_overview", "--json")
    assert code == 0
    assert json.loads(out) == [{"run_id": run.run_id, "experiment_name": "cli_exp", "status": "ONGOING"}]
    code, out, err = run_cli(capsys, "--url", url, "sql", "DELETE FROM runs")
    assert code == 2 and "refused: DELETE" in err
    assert len(db.list_runs()) == 1  # nothing was deleted
    code, _, err = run_cli(capsys, "--url", url, "sql", "SELECT * FROM no_such_table")
    assert code == 2 and "no_such_table" in err


def test_cleanup_and_unknown_ids(populated, capsys):
    db, experiment, run = populated
    url = db.url.render_as_string(hide_password=False)
    code, out, _ = run_cli(capsys, "--url", url, "cleanup")
    assert code == 0 and "COMPLETED" in out
    assert db.get_run(run.run_id).status.value == "KILLED"
    code, out, _ = run_cli(capsys, "--url", url, "cleanup")
    assert code == 0 and "nothing to clean up" in out
    code, _, err = run_cli(capsys, "--url", url, "history", "run", "999")
    assert code == 2 and "999" in err


def test_bad_url_is_a_clear_error(capsys):
    code, _, err = run_cli(capsys, "--url", "mysql://x@y/z", "experiments")
    assert code == 2 and "mysql" in err and "allowed" in err


def test_db_current_never_migrates(tmp_path, capsys):
    path = tmp_path / "fresh.db"
    code, out, err = run_cli(capsys, "--url", str(path), "db", "current")
    assert code == 2 and f"no database at {path}" in err and out == ""
    assert sorted(tmp_path.iterdir()) == [tmp_path / "rf_home"]  # nothing was created
    code, out, _ = run_cli(capsys, "--url", str(path), "db", "upgrade")
    assert code == 0 and f"to {migrate.HEAD_REVISION}" in out
    code, out, _ = run_cli(capsys, "--url", str(path), "db", "current")
    assert "up to date" in out


def test_help_imports_neither_torch_nor_mlflow():
    code = (
        "import sys\n"
        "from rapidfire_state.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "bad = [m for m in ('torch', 'mlflow', 'sqlalchemy', 'alembic') if m in sys.modules]\n"
        "print('LOADED', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "LOADED []" in out


@pytest.mark.slow
def test_wheel_in_fresh_venv_runs_db_upgrade(tmp_path):
    """Build the wheel, install it into a new virtual environment, migrate a temp database."""
    dist = tmp_path / "dist"
    # from a copy of the files git knows: a build/ left in the checkout by an earlier build
    # would put files into the wheel that the tree no longer has (a withdrawn migration)
    source = tmp_path / "source"
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True, capture_output=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", str(source), "-w", str(dist)],
        check=True, capture_output=True,
    )
    wheel = next(dist.glob("rapidfire_state-*.whl"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    # Only what `db upgrade` needs: the wheel itself, then the database dependencies.
    subprocess.run(pip + ["--no-deps", str(wheel)], check=True, capture_output=True)
    subprocess.run(pip + ["sqlalchemy>=2.0", "alembic", "filelock", "psutil", "dill"], check=True, capture_output=True)
    database = tmp_path / "wheel.db"
    result = subprocess.run(
        [str(env_dir / "bin" / "rapidfire-state"), "--url", f"sqlite:///{database}", "db", "upgrade"],
        cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""},
    )
    assert result.returncode == 0, result.stderr
    assert migrate.HEAD_REVISION in result.stdout
    assert migrate.read_revision(resolve_url(str(database))) == migrate.HEAD_REVISION
    # the installed copy, not the repository, provided the migrations
    located = subprocess.run(
        [str(python), "-c", "from rapidfire_state.db import migrate; print(migrate.migrations_dir())"],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    ).stdout
    assert str(env_dir) in located


# --- readers never create, migrate or back up (issue 8, item 2) -----------------------------

READERS = [
    ["experiments"], ["runs"], ["runs", "--json"], ["tasks", "--all"], ["workers"], ["shm"],
    ["history", "run", "1"], ["sql", "SELECT 1 AS one"], ["metrics"], ["metrics", "--failed"], ["db", "current"],
]


def tree(root: Path) -> dict[str, Optional[bytes]]:
    """Every path under ``root`` with its bytes (None for a directory)."""
    return {
        str(path.relative_to(root)): (None if path.is_dir() else path.read_bytes())
        for path in sorted(root.rglob("*"))
    }


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_readers_on_a_missing_database_create_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "no" / "such" / "dir" / "x.db"
    before = tree(tmp_path)
    for argv in READERS + [["cleanup"], ["fail-stale"]]:
        code, out, err = run_cli(capsys, "--url", str(missing), *argv)
        assert code == 2 and out == "", argv
        assert one_error_line(err) .startswith(f"rapidfire-state: error: no database at {missing}"), err
    # the default database ($RF_HOME/db/rapidfire_state.db) is not created either
    for argv in READERS:
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and "no database at" in one_error_line(err) and "rapidfire_state.db" in err
    assert tree(tmp_path) == before


def writer_database(url: str, tmp_path: Path) -> dict:
    """A database with an experiment, a run and its history, closed again."""
    from rapidfire_state import StateDB

    database = StateDB(url)
    try:
        experiment = database.create_experiment("kept", str(tmp_path / "exps"))
        database.transition_experiment(experiment.experiment_id, "RUNNING")
        run = database.create_run(experiment.experiment_id, {"lr": 0.5})
        database.transition_run(run.run_id, "ONGOING")
        return {"experiment_id": experiment.experiment_id, "run_id": run.run_id, "database": database}
    except BaseException:
        database.close()
        raise


def read_everything(capsys, url: str, run_id: int, *, sql_ok: bool = True, unserved: tuple = ()) -> None:
    """Every reader on ``url``; the commands in ``unserved`` need columns the database's
    revision lacks and must say so (revision and upgrade command) instead of reading."""
    code, out, err = run_cli(capsys, "--url", url, "runs", "--json")
    assert code == 0, err
    assert [(r["run_id"], r["status"]) for r in json.loads(out)] == [(run_id, "ONGOING")]
    code, out, err = run_cli(capsys, "--url", url, "history", "run", str(run_id), "--json")
    assert code == 0 and [r["to_status"] for r in json.loads(out)] == ["NEW", "ONGOING"], err
    for argv in (["experiments"], ["tasks", "--all"], ["workers"], ["shm"], ["metrics"]):
        code, _, err = run_cli(capsys, "--url", url, *argv)
        if argv[0] in unserved:
            line = one_error_line(err)
            assert code == 2 and f"revision {FIRST}" in line and "rapidfire-state db upgrade" in line, err
        else:
            assert code == 0, (argv, err)
    if sql_ok:
        code, out, err = run_cli(capsys, "--url", url, "sql", "SELECT count(*) AS n FROM state_transitions", "--json")
        assert code == 0 and json.loads(out)[0]["n"] >= 3, err


def test_readers_leave_a_sqlite_database_byte_for_byte(tmp_path, capsys):
    path = tmp_path / "kept.db"
    made = writer_database(str(path), tmp_path)
    made["database"].close()
    before = tree(tmp_path)
    assert not (tmp_path / "kept.db-wal").exists()
    read_everything(capsys, str(path), made["run_id"])
    code, out, _ = run_cli(capsys, "--url", str(path), "db", "current")
    assert code == 0 and "up to date" in out
    assert tree(tmp_path) == before  # no -wal, -shm, backup or lock file; the same bytes


def test_readers_read_a_database_behind_head_and_never_upgrade_it(db_url, tmp_path, capsys):
    made = writer_database(db_url, tmp_path)
    database = made["database"]
    try:
        database.downgrade(FIRST)
    finally:
        database.close()
    before = tree(tmp_path)
    # worker_tasks gained its claim columns in 0003_task_claims: at 0001 `tasks` cannot be served
    # ... and the metric outbox came in 0005: no `metrics` either
    read_everything(capsys, db_url, made["run_id"], sql_ok=db_url.startswith("sqlite"), unserved=("tasks", "metrics"))
    code, out, _ = run_cli(capsys, "--url", db_url, "db", "current")
    assert code == 0 and f"revision: {FIRST} (behind: run `rapidfire-state db upgrade`)" in out
    assert migrate.probe_database(resolve_url(db_url)).revision == FIRST
    assert tree(tmp_path) == before  # SQLite: no backup, no upgrade, not a byte changed


def test_a_read_the_older_schema_cannot_serve_names_revision_and_command(tmp_path, capsys):
    """Stand-in for a future revision that adds a table: at 0001 without ``shm_objects``,
    the ``shm`` listing cannot be served, and says so without upgrading anything."""
    path = tmp_path / "old.db"
    made = writer_database(str(path), tmp_path)
    database = made["database"]
    try:
        database.downgrade(FIRST)
    finally:
        database.close()
    connection = sqlite3.connect(path)
    connection.execute("DROP VIEW shm_usage")
    connection.execute("DROP TABLE shm_objects")
    connection.commit()
    connection.close()
    before = tree(tmp_path)
    code, out, err = run_cli(capsys, "--url", str(path), "shm")
    line = one_error_line(err)
    assert code == 2 and out == ""
    assert f"at schema revision {FIRST}" in line and "rapidfire-state db upgrade" in line and "shm_objects" in line
    code, out, _ = run_cli(capsys, "--url", str(path), "runs", "--json")
    assert code == 0 and len(json.loads(out)) == 1  # what the schema has is still read
    assert tree(tmp_path) == before


def test_a_file_that_is_not_a_database_is_one_line_and_untouched(tmp_path, capsys):
    path = tmp_path / "notes.db"
    path.write_bytes(b"these are not the pages you are looking for\n" * 100)
    before = tree(tmp_path)
    for argv in (["runs"], ["sql", "SELECT 1"], ["db", "current"]):
        code, _, err = run_cli(capsys, "--url", str(path), *argv)
        assert code == 2 and "not a readable SQLite database" in one_error_line(err) and str(path) in err
    assert tree(tmp_path) == before


def stamp(url: str, revision: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(resolve_url(url))
    try:
        with engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": revision})
    finally:
        engine.dispose()


def test_readers_refuse_a_newer_database_and_leave_it_alone(db_url, tmp_path, capsys):
    made = writer_database(db_url, tmp_path)
    made["database"].close()
    stamp(db_url, "9999_from_the_future")
    before = tree(tmp_path)
    for argv in READERS[:-1]:
        code, out, err = run_cli(capsys, "--url", db_url, *argv)
        assert code == 2 and out == "", argv
        line = one_error_line(err)
        assert "9999_from_the_future" in line and "newer release" in line and "not modified" in line
    code, out, _ = run_cli(capsys, "--url", db_url, "db", "current")
    assert code == 0 and "9999_from_the_future (unknown to this library" in out
    assert tree(tmp_path) == before
    assert migrate.probe_database(resolve_url(db_url)).revision == "9999_from_the_future"


def test_readers_refuse_an_empty_file_without_touching_it(tmp_path, capsys):
    path = tmp_path / "empty.db"
    path.write_bytes(b"")
    before = tree(tmp_path)
    for argv in READERS[:-1]:
        code, _, err = run_cli(capsys, "--url", str(path), *argv)
        assert code == 2 and "no rapidfire_state schema" in one_error_line(err) and "db upgrade" in err
    code, out, _ = run_cli(capsys, "--url", str(path), "db", "current")
    assert code == 0 and "empty" in out
    assert tree(tmp_path) == before


def test_readers_refuse_an_empty_file_with_a_wal_naming_both(tmp_path, capsys):
    path = tmp_path / "damaged.db"
    path.write_bytes(b"")
    (tmp_path / "damaged.db-wal").write_bytes(b"\x37\x7f\x06\x82" + b"\0" * 60)
    before = tree(tmp_path)
    for argv in (["runs"], ["sql", "SELECT 1"], ["db", "current"]):
        code, _, err = run_cli(capsys, "--url", str(path), *argv)
        line = one_error_line(err)
        assert code == 2 and str(path) in line and f"{path}-wal" in line and "damaged" in line
    assert tree(tmp_path) == before


def test_readers_on_a_missing_postgresql_database_create_nothing(capsys):
    from conftest import PG_URL, _pg_admin_engine
    from sqlalchemy import text

    if not PG_URL:
        pytest.skip("RF_TEST_PG_URL is not set")
    name = f"rf_missing_{os.getpid()}_{id(capsys)}"
    url = resolve_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    for argv in READERS:
        code, out, err = run_cli(capsys, "--url", url, *argv)
        assert code == 2 and out == "" and "no database at" in one_error_line(err) and name in err
    admin = _pg_admin_engine()
    try:
        with admin.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM pg_database WHERE datname = :n"), {"n": name}).scalar() == 0
    finally:
        admin.dispose()


def test_read_only_statedb_never_writes(tmp_path):
    import pickle

    from rapidfire_state import StateDB
    from rapidfire_state.exceptions import DatabaseMissingError, ReadOnlyError

    with pytest.raises(DatabaseMissingError, match="no database at"):
        StateDB(str(tmp_path / "deep" / "x.db"), read_only=True)
    assert not (tmp_path / "deep").exists()
    made = writer_database(str(tmp_path / "s.db"), tmp_path)
    made["database"].close()
    before = tree(tmp_path)
    reader = StateDB(str(tmp_path / "s.db"), read_only=True)
    try:
        assert reader.read_only and reader.probe.status == "head"
        assert reader.get_run(made["run_id"]).status.value == "ONGOING"
        with pytest.raises(ReadOnlyError, match="read-only"):
            reader.transition_run(made["run_id"], "COMPLETED")
        with pytest.raises(ReadOnlyError):
            reader.create_experiment("nope", str(tmp_path / "exps"))
        with pytest.raises(ReadOnlyError):
            reader.upgrade()
        with pytest.raises(ReadOnlyError):
            reader.downgrade(FIRST)
        copy = pickle.loads(pickle.dumps(reader))
        try:
            assert copy.read_only
        finally:
            copy.close()
    finally:
        reader.close()
    assert tree(tmp_path) == before


@pytest.mark.parametrize("url, needle", [
    ("sqlite:/abs/path/x.db", "no '://'"),
    ("sqlite://x.db", "host part"),
    ("", "empty"),
    ("   ", "empty"),
    ("postgresql://user@host:notaport/db", "not a valid URL"),
    ("mysql://x@y/z", "allowed: sqlite, postgresql"),
])
def test_urls_that_are_not_urls_or_paths_are_refused(url, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    for argv in (["runs"], ["db", "current"], ["db", "upgrade"]):
        code, out, err = run_cli(capsys, "--url", url, *argv)
        line = one_error_line(err)
        assert code == 2 and needle in line and ("expected" in line or "allowed" in line), line
    assert tree(tmp_path) == before  # in particular no file named 'sqlite:' under the working directory


def test_a_directory_is_not_a_database(tmp_path, capsys):
    for argv in (["runs"], ["db", "upgrade"], ["sql", "SELECT 1"]):
        code, _, err = run_cli(capsys, "--url", str(tmp_path), *argv)
        assert code == 2 and "is a directory" in one_error_line(err) and str(tmp_path) in err


# --- one-line errors from the real executable (issue 8, item 4) ---------------------------

EXECUTABLE = str(Path(sys.executable).with_name("rapidfire-state"))


def run_exe(*argv: str, cwd: Optional[Path] = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([EXECUTABLE, *argv], capture_output=True, text=True, cwd=cwd, timeout=120, **kwargs)


@pytest.mark.parametrize("argv, needles", [
    (["--url", "sqlite:/abs/path/x.db", "runs"], ["'sqlite:/abs/path/x.db'", "sqlite:////ABSOLUTE/PATH"]),
    (["--url", "sqlite://relative.db", "runs"], ["host part 'relative.db'"]),
    (["--url", "", "runs"], ["empty"]),
    (["--url", "/", "runs"], ["'/' is a directory"]),
    (["--url", "postgresql+psycopg://postgres@127.0.0.1:1/test", "runs"], ["127.0.0.1:1", "Connection refused"]),
    (["--url", "postgresql+psycopg://postgres@127.0.0.1:1/test", "db", "upgrade"], ["127.0.0.1:1", "Connection refused"]),
    (["--url", "postgresql+psycopg://postgres@127.0.0.1:1/test", "db", "current"], ["127.0.0.1:1", "Connection refused"]),
    (["--url", "postgresql+psycopg2://postgres@127.0.0.1/test", "runs"], ["'psycopg2'", "not installed", "postgresql+psycopg://"]),
    (["--url", "postgresql+nodriver://postgres@127.0.0.1/test", "runs"], ["no driver 'postgresql+nodriver'"]),
    (["--url", "{tmp}/no/such/dir/x.db", "runs"], ["no database at {tmp}/no/such/dir/x.db"]),
])
def test_cli_errors_are_one_line_without_traceback(argv, needles, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = tree(tmp_path)
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    needles = [needle.format(tmp=tmp_path) for needle in needles]
    result = run_exe(*argv, cwd=cwd)
    assert result.returncode == 2 and result.stdout == ""
    line = one_error_line(result.stderr)
    assert line.startswith("rapidfire-state: error: ")
    for needle in needles:
        assert needle in line, line
    assert tree(tmp_path) == before


def test_debug_flag_shows_the_traceback(tmp_path):
    for argv in (["--debug", "--url", "sqlite:/x.db", "runs"], ["--url", "sqlite:/x.db", "runs", "--debug"]):
        result = run_exe(*argv, cwd=tmp_path)
        assert result.returncode == 2
        assert "Traceback" in result.stderr and "ConfigError" in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("rapidfire-state: error: ")


def test_closed_stdout_ends_quietly(tmp_path):
    path = tmp_path / "s.db"
    writer_database(str(path), tmp_path)["database"].close()
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will ever read: the first write gets EPIPE
    try:
        result = subprocess.run(
            [EXECUTABLE, "--url", str(path), "runs"], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 141
    assert result.stderr == ""


def test_head_of_a_long_listing_is_quiet(tmp_path):
    path = tmp_path / "s.db"
    writer_database(str(path), tmp_path)["database"].close()
    many = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 100000) SELECT x FROM c"
    script = f'"{EXECUTABLE}" --url "{path}" sql "{many}" 2>"{tmp_path}/err" | head -1; echo "status=${{PIPESTATUS[0]}}"'
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.splitlines() == ["x", "status=141"]
    assert (tmp_path / "err").read_text() == ""


# --- found under attack (atksql) ---------------------------------------------------------


@pytest.mark.parametrize("argv, needles", [
    (["history", "worker", "1"], ["invalid choice: 'worker'", "history --help"]),
    (["history", "run", "abc"], ["invalid int value: 'abc'"]),
    (["runs", "-e", "x"], ["invalid int value: 'x'"]),
    ([], ["required: COMMAND"]),
    (["sql", "SELECT 1", "--timeout", "-1"], ["--timeout '-1'"]),
])
def test_bad_arguments_are_one_line(argv, needles, tmp_path):
    result = run_exe("--url", str(tmp_path / "x.db"), *argv, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    line = one_error_line(result.stderr)
    assert line.startswith("rapidfire-state")
    for needle in needles:
        assert needle in line, line


def test_ids_out_of_range_name_the_value_on_both_backends(db_url, tmp_path):
    """Huge or negative ids: one line naming the value and the range (on SQLite an
    OverflowError escaped, on PostgreSQL "integer out of range" named nothing)."""
    writer_database(db_url, tmp_path)["database"].close()
    huge = "99999999999999999999999"
    for argv, value in [
        (["history", "run", huge], f"run_id={huge}"),
        (["history", "run", "2147483648"], "run_id=2147483648"),
        (["runs", "-e", huge], f"experiment_id={huge}"),
        (["tasks", "-e", "2147483648"], "experiment_id=2147483648"),
        (["workers", "-e", huge], f"experiment_id={huge}"),
        (["shm", "-e", "2147483648"], "experiment_id=2147483648"),
        (["shm", "-e", "-3"], "experiment_id=-3"),
        (["cleanup", "-e", huge], f"experiment_id={huge}"),
        (["fail-stale", "--grace", "nan"], "grace_seconds=nan"),
    ]:
        result = run_exe("--url", db_url, *argv, cwd=tmp_path)
        assert result.returncode == 2 and result.stdout == "", (argv, result.stdout, result.stderr)
        line = one_error_line(result.stderr)
        assert value in line and "is not valid" in line, (argv, line)


def test_a_sqlite_url_with_query_parameters_cannot_make_a_reader_create(tmp_path):
    """?mode=rwc (with or without uri=true) is ignored by readers: no file, one line."""
    before = tree(tmp_path)
    for url in (f"sqlite:///{tmp_path}/a.db?mode=rwc", f"sqlite:///file:{tmp_path}/b.db?mode=rwc&uri=true"):
        for argv in (["runs"], ["sql", "SELECT 1"], ["db", "current"]):
            result = run_exe("--url", url, *argv, cwd=tmp_path)
            assert result.returncode == 2, (url, argv, result.stderr)
            assert "no database at" in one_error_line(result.stderr), result.stderr
    assert tree(tmp_path) == before


def _as_nobody() -> list[str]:
    import shutil

    if os.geteuid() != 0:
        return []  # already not root: permissions apply to us
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("needs setpriv to drop root (root ignores file permissions)")
    return [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def test_a_wal_database_in_a_read_only_directory_is_read_and_left_alone(tmp_path):
    """A WAL database its reader may not write beside (a read-only share, another
    user's directory): readers read it instead of failing with "attempt to write a
    readonly database", and create nothing."""
    import tempfile

    prefix = _as_nobody()
    shared = Path(tempfile.mkdtemp(prefix="rf_ro_", dir="/tmp"))
    try:
        os.chmod(shared, 0o755)
        path = shared / "s.db"
        writer_database(str(path), tmp_path)["database"].close()
        assert not Path(f"{path}-wal").exists()
        os.chmod(path, 0o444)
        os.chmod(shared, 0o555)
        before = tree(shared)
        for argv, needle in [
            (["runs", "--json"], '"status": "ONGOING"'),
            (["sql", "SELECT count(*) AS n FROM runs", "--json"], '[{"n": 1}]'),
            (["db", "current"], migrate.HEAD_REVISION),
            (["history", "run", "1", "--json"], '"to_status": "ONGOING"'),
            (["experiments", "--json"], '"metrics_pending": 0'),
            (["metrics", "--json"], "[]"),
        ]:
            result = subprocess.run(
                [*prefix, EXECUTABLE, "--url", str(path), *argv], capture_output=True, text=True, timeout=120,
                cwd="/",
            )
            assert result.returncode == 0, (argv, result.stderr)
            assert needle in result.stdout, (argv, result.stdout)
        assert tree(shared) == before
    finally:
        os.chmod(shared, 0o755)
        for child in shared.iterdir():
            child.unlink()
        shared.rmdir()


# --- the metric outbox in the listings (issue 10, item 6) -----------------------------------

OUTBOX_URI = "file:///tmp/rf-test-mlruns"


def outbox_state(db, tmp_path) -> dict:
    """Beside ``populated``: a second experiment, 3 points of the run's MLflow run and one of an
    MLflow run of no experiment pending, and one row MLflow refused."""
    idle = db.create_experiment("idle_exp", str(tmp_path / "exps"))
    run = db.list_runs()[0]
    linked = db.metric_stream(OUTBOX_URI, "mlflow-run-1", run_id=run.run_id)
    loose = db.metric_stream("http://127.0.0.1:5999", "mlflow-loose")
    db.metric_stream(OUTBOX_URI, "mlflow-done", run_id=run.run_id)  # nothing pending
    db.append_metric_rows(
        [{"stream_id": linked, "kind": "METRIC", "key": "loss", "value": 0.5, "step": step, "timestamp_ms": 1000 + step}
         for step in range(4)]
        + [{"stream_id": loose, "kind": "TAG", "key": "team", "text_value": "rf", "timestamp_ms": 1}]
    )
    batch = db.claim_metric_batch(OUTBOX_URI, limit=1)
    assert db.settle_metric_batch(batch, failed={batch.rows[0].outbox_id: "INVALID_PARAMETER_VALUE: step"})
    return {"idle": idle.experiment_id, "run_id": run.run_id, "linked": linked, "loose": loose}


def test_experiments_show_their_metric_rows_pending(populated, tmp_path, capsys):
    db, experiment, run = populated
    url = db.url.render_as_string(hide_password=False)
    code, out, _ = run_cli(capsys, "--url", url, "experiments", "--json")
    assert code == 0 and [r["metrics_pending"] for r in json.loads(out)] == [0]  # an outbox, nothing in it
    state = outbox_state(db, tmp_path)
    code, out, err = run_cli(capsys, "--url", url, "experiments", "--json")
    assert code == 0, err
    pending = {r["experiment_id"]: r["metrics_pending"] for r in json.loads(out)}
    assert pending == {experiment.experiment_id: 3, state["idle"]: 0}
    code, out, _ = run_cli(capsys, "--url", url, "experiments")
    lines = out.splitlines()
    assert code == 0 and "metrics_pending" in lines[0].split()
    column = lines[0].split().index("metrics_pending")
    assert [line.split()[column] for line in lines[1:3]] == ["3", "0"]
    assert lines[-1] == "metric rows pending for MLflow runs of no experiment: 1 (see `rapidfire-state metrics`)"
    # delivered rows leave the count; a status change of the run is a pending row of its experiment
    while (batch := db.claim_metric_batch(OUTBOX_URI)) is not None:
        assert db.settle_metric_batch(batch, delivered=[row.outbox_id for row in batch.rows])
    db.transition_run(run.run_id, "COMPLETED")  # one STATUS row for each of the run's two MLflow runs
    code, out, _ = run_cli(capsys, "--url", url, "experiments", "--json")
    assert {r["experiment_id"]: r["metrics_pending"] for r in json.loads(out)} == {
        experiment.experiment_id: 2, state["idle"]: 0}


def test_metrics_lists_mlflow_runs_with_rows_pending_and_refused_rows(populated, tmp_path, capsys):
    db, experiment, run = populated
    url = db.url.render_as_string(hide_password=False)
    state = outbox_state(db, tmp_path)
    code, out, err = run_cli(capsys, "--url", url, "metrics", "--json")
    assert code == 0, err
    assert [(r["experiment_id"], r["run_id"], r["metric_run_id"], r["pending"], r["claimed_by"]) for r in json.loads(out)] == [
        (experiment.experiment_id, run.run_id, "mlflow-run-1", 3, None),
        (None, None, "mlflow-loose", 1, None),  # runs of no experiment come last
    ]
    code, out, _ = run_cli(capsys, "--url", url, "metrics", "--all", "--json")
    assert [r["metric_run_id"] for r in json.loads(out)] == ["mlflow-run-1", "mlflow-done", "mlflow-loose"]
    code, out, _ = run_cli(capsys, "--url", url, "metrics", "-e", str(experiment.experiment_id))
    assert code == 0 and "mlflow-run-1" in out and "mlflow-loose" not in out
    assert out.splitlines()[-1] == f"rows pending for experiment {experiment.experiment_id}: 3"
    code, out, _ = run_cli(capsys, "--url", url, "metrics", "-e", str(state["idle"]), "--json")
    assert code == 0 and json.loads(out) == []
    # a batch in flight shows who holds it
    held = db.claim_metric_batch(OUTBOX_URI)
    code, out, _ = run_cli(capsys, "--url", url, "metrics", "--json")
    claimed = json.loads(out)[0]
    assert claimed["claimed_by"] == f"{HOST}:{os.getpid()}" and claimed["claimed_at"]
    assert db.settle_metric_batch(held, resend=[row.outbox_id for row in held.rows], error="server down")
    code, out, _ = run_cli(capsys, "--url", url, "metrics")
    assert "server down" in out and out.splitlines()[-1] == "rows pending in all: 4"

    code, out, _ = run_cli(capsys, "--url", url, "metrics", "--failed", "--json")
    assert code == 0
    assert [(r["metric_run_id"], r["kind"], r["key"], r["step"], r["error"]) for r in json.loads(out)] == [
        ("mlflow-run-1", "METRIC", "loss", 0, "INVALID_PARAMETER_VALUE: step")]
    code, out, _ = run_cli(capsys, "--url", url, "metrics", "--failed", "--limit", "1")
    assert code == 0 and "INVALID_PARAMETER_VALUE: step" in out
    code, out, err = run_cli(capsys, "--url", url, "metrics", "--failed", "-e", "1")
    assert code == 2 and out == "" and "-e does not apply" in one_error_line(err)


@pytest.mark.parametrize("argv, needle", [
    (["metrics", "--limit", "0"], "--limit '0'"),
    (["metrics", "--limit", "many"], "--limit 'many'"),
    (["metrics", "-e", "x"], "invalid int value: 'x'"),
])
def test_metrics_bad_arguments_are_one_line(argv, needle, tmp_path):
    result = run_exe("--url", str(tmp_path / "x.db"), *argv, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert needle in one_error_line(result.stderr)


def test_a_database_one_revision_before_the_outbox_is_listed_as_it_is(db_url, tmp_path, capsys):
    made = writer_database(db_url, tmp_path)
    database = made["database"]
    previous = migrate.REVISIONS[migrate.REVISIONS.index("0005_metric_outbox") - 1]
    try:
        database.downgrade(previous)
    finally:
        database.close()
    before = tree(tmp_path)
    code, out, err = run_cli(capsys, "--url", db_url, "experiments")
    assert code == 0, err
    header, row = out.splitlines()[:2]
    assert row.split()[header.split().index("metrics_pending")] == "-"  # unknown, not 0
    code, out, _ = run_cli(capsys, "--url", db_url, "experiments", "--json")
    assert code == 0 and json.loads(out)[0]["metrics_pending"] is None and json.loads(out)[0]["name"] == "kept"
    for argv in (["metrics"], ["metrics", "--failed"], ["metrics", "--json"]):
        code, out, err = run_cli(capsys, "--url", db_url, *argv)
        line = one_error_line(err)
        assert code == 2 and out == ""
        assert f"revision {previous}" in line and "0005_metric_outbox" in line and "rapidfire-state db upgrade" in line
    assert migrate.probe_database(resolve_url(db_url)).revision == previous  # never upgraded
    assert tree(tmp_path) == before


def test_metrics_commands_import_neither_torch_nor_mlflow(tmp_path):
    path = tmp_path / "s.db"
    writer_database(str(path), tmp_path)["database"].close()
    code = (
        "import sys\n"
        "from rapidfire_state.cli import main\n"
        f"assert main(['--url', {str(path)!r}, 'experiments']) == 0\n"
        f"assert main(['--url', {str(path)!r}, 'metrics', '--all']) == 0\n"
        "print('LOADED', [m for m in ('torch', 'mlflow', 'alembic') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "LOADED []" in out


def test_shm_lists_which_host_holds_each_object_and_its_copy(db, db_url, tmp_path, capsys):
    copy = tmp_path / "shared" / "ckpt.pt"
    db.upsert_shm_object("here-only", num_bytes=8, tensor_count=1)
    db.upsert_shm_object("with-copy", num_bytes=8, tensor_count=1, copy_path=str(copy))
    code, out, _ = run_cli(capsys, "--url", db_url, "shm", "--json")
    assert code == 0
    rows = {row["key"]: row for row in json.loads(out)}
    assert (rows["here-only"]["host"], rows["here-only"]["copy_path"]) == (HOST, None)
    assert (rows["with-copy"]["host"], rows["with-copy"]["copy_path"]) == (HOST, str(copy))
    code, out, _ = run_cli(capsys, "--url", db_url, "shm")
    header = out.splitlines()[0].split()
    assert code == 0 and "host" in header and "copy_path" in header
