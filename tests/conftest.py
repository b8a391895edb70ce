"""Shared fixtures.

Every test gets its own ``RF_HOME`` under ``tmp_path`` (no test touches the
user's ~/rapidfireai).  The ``db_url``/``db`` fixtures are parametrised over the
backends: SQLite always, PostgreSQL when ``RF_TEST_PG_URL`` is set — each
PostgreSQL test gets a database of its own, created and dropped around it, so
test runs never see each other's rows.
"""

from __future__ import annotations

import os
import sys
import uuid
from typing import Iterator

import pytest

PG_URL = os.environ.get("RF_TEST_PG_URL")
BACKENDS = ["sqlite"] + (["postgresql"] if PG_URL else [])


@pytest.fixture(autouse=True)
def rf_home(tmp_path, monkeypatch) -> str:
    home = tmp_path / "rf_home"
    home.mkdir()
    monkeypatch.setenv("RF_HOME", str(home))
    monkeypatch.delenv("RF_DB_URL", raising=False)
    monkeypatch.delenv("RF_LOG_PATH", raising=False)
    return str(home)


def _pg_admin_engine():
    from sqlalchemy import create_engine

    from rapidfire_state.db.engine import resolve_url

    return create_engine(resolve_url(PG_URL), isolation_level="AUTOCOMMIT")


@pytest.fixture
def pg_database_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database (skips when RF_TEST_PG_URL is unset)."""
    if not PG_URL:
        pytest.skip("RF_TEST_PG_URL is not set")
    from sqlalchemy import text

    from rapidfire_state.db.engine import resolve_url

    name = f"rf_test_{uuid.uuid4().hex[:12]}"
    admin = _pg_admin_engine()
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = resolve_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=BACKENDS)
def db_url(request, tmp_path) -> str:
    """A URL of an empty database on each backend under test."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return request.getfixturevalue("pg_database_url")


@pytest.fixture
def db(db_url):
    """An open, migrated :class:`StateDB` on each backend under test."""
    from rapidfire_state import StateDB

    database = StateDB(db_url)
    try:
        yield database
    finally:
        database.close()


@pytest.fixture
def experiment(db, tmp_path):
    """A RUNNING experiment in ``db``."""
    record = db.create_experiment("exp", str(tmp_path / "experiments"))
    return db.transition_experiment(record.experiment_id, "RUNNING")


@pytest.fixture(autouse=True)
def _stop_metric_flushers():
    """Stop the background flushers a test started: threads left running would outlive it."""
    yield
    manager_module = sys.modules.get("rapidfire_state.metric_manager")
    if manager_module is None:
        return
    for manager in list(manager_module._EXIT_FLUSH):
        try:
            manager.close(timeout=2)
        except Exception:  # noqa: BLE001 - its database may be gone with the test
            pass
