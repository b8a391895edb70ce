"""Importing the package, and opening an up-to-date database, stay light.

Checked in fresh interpreters: ``sys.modules`` of the test process is polluted
by everything the other tests imported.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "mlflow", "alembic")


def _loaded(code: str) -> dict:
    probe = (
        code
        + "\nimport json, sys\n"
        + "print(json.dumps({name: sorted(m for m in sys.modules if m == name or m.startswith(name + '.'))[:5]"
        + f" for name in {HEAVY!r}}}))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_rapidfire_state_loads_no_torch_mlflow_or_alembic():
    loaded = _loaded("import rapidfire_state")
    assert loaded == {"torch": [], "mlflow": [], "alembic": []}


def test_public_enums_and_errors_need_nothing_heavy():
    loaded = _loaded(
        "from rapidfire_state import RunStatus, InvalidTransitionError, RapidFireError\n"
        "from rapidfire_state import states\n"
        "assert states.can_transition('run', RunStatus.NEW, 'ONGOING')\n"
    )
    assert loaded == {"torch": [], "mlflow": [], "alembic": []}


def test_opening_an_up_to_date_database_loads_no_torch_or_mlflow(tmp_path):
    path = tmp_path / "state.db"
    from rapidfire_state import StateDB

    db = StateDB(path)  # created (and migrated) here, so the probe finds it at head
    db.create_experiment("light", str(tmp_path))
    db.close()
    loaded = _loaded(
        "from rapidfire_state import StateDB\n"
        f"db = StateDB({str(path)!r})\n"
        "assert db.last_migration is None\n"
        "assert db.get_experiment_by_name('light').name == 'light'\n"
        "db.list_runs()\n"
        "db.close()\n"
    )
    assert loaded["torch"] == [] and loaded["mlflow"] == []
    assert loaded["alembic"] == []


def test_the_probe_can_see_a_heavy_import():
    # the checks above can fail: the probe reports what is loaded
    pytest.importorskip("alembic")
    loaded = _loaded("import alembic.config")
    assert "alembic" in loaded["alembic"]
