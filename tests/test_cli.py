"""The ``rapidfire-state`` command line: inspection, SQL, maintenance, and the wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from rapidfire_state.cli import main
from rapidfire_state.db import migrate
from rapidfire_state.db.engine import resolve_url

REPO = Path(__file__).resolve().parents[1]


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
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", str(REPO), "-w", str(dist)],
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
