"""The real ``alembic`` executable run from the repository root, as a user runs it.

Covers: which database it migrates (``-x url``, then ``$RF_DB_URL``, then
``sqlalchemy.url``, then ``$RF_HOME/db/rapidfire_state.db``; the default file
stays untouched when another is named); the "Running upgrade/downgrade" lines;
offline mode (``--sql``) for every revision step up and down, on SQLite and
PostgreSQL, with the generated script applied to a real database and the result
compared with what the online migration makes; read commands on a missing,
empty or damaged file fail and create nothing.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import create_engine, inspect, text

from rapidfire_state.db import migrate
from rapidfire_state.db.engine import resolve_url

REPO = Path(__file__).resolve().parents[1]
ALEMBIC = Path(sys.executable).with_name("alembic")
HEAD = migrate.HEAD_REVISION
FIRST = migrate.REVISIONS[0]
PG_URL = os.environ.get("RF_TEST_PG_URL")
BACKENDS = ["sqlite"] + (["postgresql"] if PG_URL else [])
STEPS = list(zip((None,) + migrate.REVISIONS[:-1], migrate.REVISIONS))


def alembic(*args: str, home: Path, rf_db_url: str | None = None) -> subprocess.CompletedProcess:
    """``alembic ARGS`` through the installed executable, cwd = the repository root."""
    env = dict(os.environ, RF_HOME=str(home))
    env.pop("RF_DB_URL", None)
    if rf_db_url is not None:
        env["RF_DB_URL"] = rf_db_url
    return subprocess.run(
        [str(ALEMBIC), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def out(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def sqlite_revision(path: Path):
    with sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True) as connection:
        rows = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    connection.close()
    return rows[0][0] if rows else None


def files_of(directory: Path) -> dict[str, bytes]:
    if not directory.exists():
        return {}
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture
def home(tmp_path) -> Path:
    """RF_HOME for the command: its default database must stay untouched unless asked for."""
    return tmp_path / "home"


def default_db(home: Path) -> Path:
    return home / "db" / "rapidfire_state.db"


# --- which database --------------------------------------------------------------------


def test_x_url_names_the_database_and_the_default_stays_untouched(tmp_path, home):
    target = tmp_path / "b.db"
    result = alembic("-x", f"url=sqlite:///{target}", "upgrade", "head", home=home)
    assert result.returncode == 0, out(result)
    assert sqlite_revision(target) == HEAD
    assert not default_db(home).exists() and not home.exists()
    # Alembic's usual progress lines, one per revision
    for previous, revision in STEPS:
        assert re.search(rf"Running upgrade {previous or ''} -> {revision}", out(result)), out(result)


def test_x_url_wins_over_rf_db_url(tmp_path, home):
    named, environment = tmp_path / "named.db", tmp_path / "env.db"
    result = alembic("-x", f"url=sqlite:///{named}", "upgrade", FIRST, home=home,
                     rf_db_url=f"sqlite:///{environment}")
    assert result.returncode == 0, out(result)
    assert sqlite_revision(named) == FIRST
    assert not environment.exists() and not home.exists()


def test_x_url_takes_a_bare_path(tmp_path, home):
    target = tmp_path / "bare.db"
    result = alembic("-x", f"url={target}", "upgrade", "head", home=home)
    assert result.returncode == 0, out(result)
    assert sqlite_revision(target) == HEAD


def test_rf_db_url_wins_over_the_ini_url_which_wins_over_the_default(tmp_path, home):
    ini_db, env_db = tmp_path / "ini.db", tmp_path / "env.db"
    ini = tmp_path / "alembic.ini"
    text_ = (REPO / "alembic.ini").read_text()
    text_ = text_.replace("%(here)s/migrations", str(REPO / "migrations"))
    text_ = text_.replace("[alembic]\n", f"[alembic]\nsqlalchemy.url = sqlite:///{ini_db}\n", 1)
    ini.write_text(text_)
    result = alembic("-c", str(ini), "upgrade", "head", home=home, rf_db_url=f"sqlite:///{env_db}")
    assert result.returncode == 0, out(result)
    assert sqlite_revision(env_db) == HEAD and not ini_db.exists()
    result = alembic("-c", str(ini), "upgrade", "head", home=home)
    assert result.returncode == 0, out(result)
    assert sqlite_revision(ini_db) == HEAD
    assert not home.exists()


def test_without_any_url_the_embedded_database_is_migrated(home):
    result = alembic("upgrade", "head", home=home)
    assert result.returncode == 0, out(result)
    assert sqlite_revision(default_db(home)) == HEAD
    assert "Running upgrade" in out(result)


def test_downgrade_prints_its_steps_and_touches_only_the_named_database(tmp_path, home):
    target = tmp_path / "b.db"
    assert alembic("-x", f"url=sqlite:///{target}", "upgrade", "head", home=home).returncode == 0
    result = alembic("-x", f"url=sqlite:///{target}", "downgrade", "-1", home=home)
    assert result.returncode == 0, out(result)
    previous = migrate.REVISIONS[-2] if len(migrate.REVISIONS) > 1 else None
    assert re.search(rf"Running downgrade {HEAD} -> {previous or ''}", out(result)), out(result)
    assert sqlite_revision(target) == previous
    result = alembic("-x", f"url=sqlite:///{target}", "downgrade", "base", home=home)
    assert result.returncode == 0, out(result)
    assert f"Running downgrade {FIRST} -> ," in out(result)
    assert sqlite_revision(target) is None
    assert not home.exists()


def test_a_url_that_is_not_one_fails_in_one_line(tmp_path, home):
    result = alembic("-x", "url=mysql://nobody@nowhere/x", "current", home=home)
    assert result.returncode != 0
    assert "Traceback" not in out(result)
    assert "mysql" in result.stdout + result.stderr and "allowed" in out(result)


def test_a_database_server_that_does_not_answer_fails_in_one_line(home):
    result = alembic("-x", "url=postgresql+psycopg://nobody:secret@127.0.0.1:1/none", "current", home=home)
    assert result.returncode != 0
    assert "Traceback" not in out(result)
    failed = [line for line in out(result).splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and "127.0.0.1" in failed[0]
    assert "secret" not in out(result)


# --- read commands never create --------------------------------------------------------


@pytest.mark.parametrize("command", [["current"], ["downgrade", "base"], ["stamp", "head"], ["check"]])
def test_commands_other_than_upgrade_refuse_a_missing_file(tmp_path, home, command):
    target = tmp_path / "no_such_dir" / "x.db"
    result = alembic("-x", f"url=sqlite:///{target}", *command, home=home)
    assert result.returncode != 0
    assert f"no database at {target}" in out(result)
    assert "Traceback" not in out(result)
    assert not target.parent.exists() and not home.exists()


def test_current_refuses_an_empty_file_and_leaves_it_empty(tmp_path, home):
    target = tmp_path / "empty.db"
    target.touch()
    result = alembic("-x", f"url=sqlite:///{target}", "current", home=home)
    assert result.returncode != 0
    assert "no database at" in out(result) and "empty" in out(result)
    assert files_of(tmp_path) == {"empty.db": b""}


def test_current_reads_without_writing(tmp_path, home):
    target = tmp_path / "b.db"
    assert alembic("-x", f"url=sqlite:///{target}", "upgrade", FIRST, home=home).returncode == 0
    before = files_of(tmp_path)
    result = alembic("-x", f"url=sqlite:///{target}", "current", home=home)
    assert result.returncode == 0, out(result)
    assert FIRST in result.stdout
    after = files_of(tmp_path)
    # a reader of a WAL database may leave the shared-memory index and an empty log
    after.pop("b.db-shm", None)
    assert after.pop("b.db-wal", b"") == b""
    assert after == before


def test_current_refuses_an_empty_file_beside_a_live_write_ahead_log(tmp_path, home):
    target = tmp_path / "b.db"
    target.touch()
    Path(f"{target}-wal").write_bytes(b"\x37\x7f\x06\x82" + b"\0" * 60)
    before = files_of(tmp_path)
    for command in (["current"], ["upgrade", "head"]):
        result = alembic("-x", f"url=sqlite:///{target}", *command, home=home)
        assert result.returncode != 0
        assert str(target) in out(result) and f"{target}-wal" in out(result)
        assert "Traceback" not in out(result)
        assert files_of(tmp_path) == before


def test_upgrade_over_rows_a_new_check_forbids_fails_in_one_line(tmp_path, home):
    target = tmp_path / "b.db"
    url = f"sqlite:///{target}"
    _at(url, FIRST, home)
    with sqlite3.connect(target) as connection:
        connection.execute("UPDATE runs SET ended_by = NULL WHERE status = 'COMPLETED'")
        bad = connection.execute("SELECT run_id FROM runs WHERE status = 'COMPLETED'").fetchone()[0]
    connection.close()
    before = rows(url)
    result = alembic("-x", f"url={url}", "upgrade", "head", home=home)
    assert result.returncode != 0
    assert "Traceback" not in out(result)
    failed = [line for line in out(result).splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1
    assert "ck_runs_ended_by_matches_status" in failed[0] and "table runs" in failed[0]
    assert f"run_id {bad}" in failed[0]
    assert sqlite_revision(target) == FIRST and rows(url) == before


# --- offline mode: every revision step, both backends ----------------------------------


def _normalize_sql(sql: str | None) -> str:
    return re.sub(r"\s+", " ", sql or "").strip().rstrip(";").strip()


def _index_where(index: dict) -> str:
    options = index.get("dialect_options") or {}
    for key in ("sqlite_where", "postgresql_where"):
        if options.get(key) is not None:
            return _normalize_sql(str(options[key]))
    return ""


def schema_signature(url: str) -> dict:
    """Everything that makes the schema, independent of DDL text layout and constraint order."""
    engine = create_engine(resolve_url(url))
    try:
        with engine.connect() as connection:
            inspector = inspect(connection)
            tables = {}
            for name in sorted(inspector.get_table_names()):
                columns = [
                    (c["name"], str(c["type"]), c["nullable"], _normalize_sql(str(c["default"])) if c["default"] else None)
                    for c in inspector.get_columns(name)
                ]
                checks = sorted((c["name"], _normalize_sql(c["sqltext"])) for c in inspector.get_check_constraints(name))
                fks = sorted(
                    (f["name"], tuple(f["constrained_columns"]), f["referred_table"], tuple(f["referred_columns"]))
                    for f in inspector.get_foreign_keys(name)
                )
                indexes = sorted(
                    (i["name"], tuple(i["column_names"]), bool(i["unique"]), _index_where(i))
                    for i in inspector.get_indexes(name)
                )
                uniques = sorted((u["name"], tuple(u["column_names"])) for u in inspector.get_unique_constraints(name))
                pk = inspector.get_pk_constraint(name)
                tables[name] = {
                    "columns": columns, "checks": checks, "fks": fks, "indexes": indexes,
                    "uniques": uniques, "pk": (pk.get("name"), tuple(pk["constrained_columns"])),
                }
            views = {v: _normalize_sql(inspector.get_view_definition(v)) for v in sorted(inspector.get_view_names())}
            revision = None
            if "alembic_version" in tables:
                revision = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
            return {"tables": tables, "views": views, "revision": revision}
    finally:
        engine.dispose()


def apply_script(url: str, script: str) -> None:
    """Run a generated SQL script the way an operator would (sqlite3 / one psql-like batch)."""
    parsed = resolve_url(url)
    if parsed.get_backend_name() == "sqlite":
        connection = sqlite3.connect(parsed.database)
        try:
            connection.isolation_level = None
            connection.executescript(script)
        finally:
            connection.close()
        return
    import psycopg

    with psycopg.connect(parsed.set(drivername="postgresql").render_as_string(hide_password=False),
                         autocommit=True) as connection:
        connection.execute(script.encode())


def _at(url: str, revision: str | None, home: Path) -> None:
    """Bring ``url`` to ``revision`` online, with a few rows in it."""
    if revision is None:
        return
    result = alembic("-x", f"url={url}", "upgrade", revision, home=home)
    assert result.returncode == 0, out(result)
    engine = create_engine(resolve_url(url))
    try:
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO experiments (name, status, current_task, experiments_path) "
                "VALUES ('offline', 'RUNNING', 'IDLE', '/tmp/x')"))
            experiment_id = connection.execute(text("SELECT experiment_id FROM experiments")).scalar()
            for status, ended_by in [("NEW", None), ("STOPPED", None), ("COMPLETED", "COMPLETED")]:
                connection.execute(text(
                    "INSERT INTO runs (experiment_id, status, source, ended_by, completed_steps, total_steps, "
                    "num_chunks_visited, num_epochs_completed, chunk_offset, required_workers, progress) "
                    "VALUES (:e, :s, 'USER', :b, 0, 0, 0, 0, 0, 1, 0)"), {"e": experiment_id, "s": status, "b": ended_by})
            run_id = connection.execute(text("SELECT MIN(run_id) FROM runs")).scalar()
            connection.execute(text(
                "INSERT INTO worker_tasks (experiment_id, run_id, worker_id, task_type, status) "
                "VALUES (:e, :r, 0, 'TRAIN_VAL', 'PENDING')"), {"e": experiment_id, "r": run_id})
    finally:
        engine.dispose()


def rows(url: str) -> dict:
    """Every row of the tables the steps touch, as column → value, in key order."""
    engine = create_engine(resolve_url(url))
    try:
        with engine.connect() as connection:
            return {
                t: sorted(
                    (dict(r._mapping) for r in connection.execute(text(f"SELECT * FROM {t}"))),
                    key=lambda row: next(iter(row.values())),
                )
                for t in ("experiments", "runs", "worker_tasks")
            }
    finally:
        engine.dispose()


def assert_rows_kept(before: dict, after: dict) -> None:
    """The same rows with the same values in every column both sides have; a column a step
    added is NULL in every row (a step that drops a column drops only its values)."""
    assert before.keys() == after.keys()
    for table in before:
        assert len(after[table]) == len(before[table]), table
        for old, new in zip(before[table], after[table]):
            shared = old.keys() & new.keys()
            assert {c: new[c] for c in shared} == {c: old[c] for c in shared}, table
            assert all(new[c] is None for c in new.keys() - old.keys()), (table, new)


@pytest.fixture(params=BACKENDS)
def two_databases(request, tmp_path) -> Iterator[tuple[str, str]]:
    """Two empty databases of one backend: one for the offline script, one migrated online."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'offline.db'}", f"sqlite:///{tmp_path / 'online.db'}"
        return
    admin = create_engine(resolve_url(PG_URL), isolation_level="AUTOCOMMIT")
    names = [f"rf_test_{uuid.uuid4().hex[:12]}" for _ in range(2)]
    with admin.connect() as connection:
        for name in names:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield tuple(resolve_url(PG_URL).set(database=n).render_as_string(hide_password=False) for n in names)
    finally:
        with admin.connect() as connection:
            for name in names:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _offline_sql(url: str, spec: str, home: Path, direction: str = "upgrade") -> str:
    result = alembic("-x", f"url={url}", direction, spec, "--sql", home=home)
    assert result.returncode == 0, out(result)
    assert "Traceback" not in result.stderr
    return result.stdout


def test_offline_upgrade_head_equals_the_online_upgrade(two_databases, home, tmp_path):
    offline, online = two_databases
    script = _offline_sql(offline, "head", home)
    for _, revision in STEPS:
        assert revision in script  # each revision stamps alembic_version
    if offline.startswith("sqlite"):
        assert not Path(resolve_url(offline).database).exists()  # --sql connects to nothing
    apply_script(offline, script)
    _at(online, "head", home)
    assert schema_signature(offline) == schema_signature(online)
    assert schema_signature(offline)["revision"] == HEAD
    assert not home.exists()


@pytest.mark.parametrize("step", STEPS, ids=[r for _, r in STEPS])
def test_each_offline_upgrade_step_keeps_the_rows_and_equals_online(two_databases, home, step):
    previous, revision = step
    offline, online = two_databases
    for url in (offline, online):
        _at(url, previous, home)
    before = rows(offline) if previous else None
    spec = f"{previous}:{revision}" if previous else revision
    apply_script(offline, _offline_sql(offline, spec, home))
    result = alembic("-x", f"url={online}", "upgrade", revision, home=home)
    assert result.returncode == 0, out(result)
    assert schema_signature(offline) == schema_signature(online)
    assert schema_signature(offline)["revision"] == revision
    if before is not None:
        assert_rows_kept(before, rows(offline))  # (the online twin has the same rows, other timestamps)


@pytest.mark.parametrize("step", STEPS, ids=[r for _, r in STEPS])
def test_each_offline_downgrade_step_keeps_the_rows_and_equals_online(two_databases, home, step):
    previous, revision = step
    offline, online = two_databases
    for url in (offline, online):
        _at(url, revision, home)
    before = rows(offline)
    apply_script(offline, _offline_sql(offline, f"{revision}:{previous or 'base'}", home, "downgrade"))
    result = alembic("-x", f"url={online}", "downgrade", previous or "base", home=home)
    assert result.returncode == 0, out(result)
    assert schema_signature(offline) == schema_signature(online)
    if previous is not None:
        assert schema_signature(offline)["revision"] == previous
        assert_rows_kept(before, rows(offline))
    else:
        assert schema_signature(offline)["tables"].keys() <= {"alembic_version"}


def test_offline_sqlite_script_switches_foreign_keys_off_and_is_one_transaction(tmp_path, home):
    script = _offline_sql(f"sqlite:///{tmp_path / 'x.db'}", "head", home)
    statements = [s.strip() for s in script.split(";") if s.strip()]
    assert statements[0] == "PRAGMA foreign_keys = OFF"
    assert statements[1] == "BEGIN" and statements[-1] == "COMMIT"
    assert not (tmp_path / "x.db").exists()


# --- found under attack (atksql) ---------------------------------------------------------


def test_an_empty_x_url_is_refused_not_taken_as_the_default(home):
    """``-x url=$UNSET`` must not migrate $RF_HOME's database (or RF_DB_URL's)."""
    for command in (["upgrade", "head"], ["current"], ["downgrade", "base"]):
        result = alembic("-x", "url=", *command, home=home)
        assert result.returncode != 0
        assert "FAILED: the database URL is empty" in out(result)
        assert "Traceback" not in out(result)
        assert not home.exists()


def test_a_file_that_is_not_a_database_fails_in_one_line_and_is_untouched(tmp_path, home):
    target = tmp_path / "notes.txt"
    target.write_text("these are not the pages you are looking for\n" * 100)
    before = files_of(tmp_path)
    for command in (["current"], ["upgrade", "head"], ["check"]):
        result = alembic("-x", f"url={target}", *command, home=home)
        assert result.returncode != 0
        assert "Traceback" not in out(result), out(result)
        assert "FAILED:" in out(result) and "file is not a database" in out(result)
        assert files_of(tmp_path) == before


def test_current_and_check_leave_a_rollback_journal_database_byte_for_byte(tmp_path, home):
    """Read commands opened the writers' engine, whose first PRAGMA journal_mode = WAL
    rewrote the header of a database kept in rollback-journal mode."""
    target = tmp_path / "b.db"
    assert alembic("-x", f"url={target}", "upgrade", "head", home=home).returncode == 0
    connection = sqlite3.connect(target)
    assert connection.execute("PRAGMA journal_mode = DELETE").fetchone() == ("delete",)
    connection.close()
    before = files_of(tmp_path)
    for command in (["current"], ["check"]):
        result = alembic("-x", f"url={target}", *command, home=home)
        assert result.returncode == 0, out(result)
        assert files_of(tmp_path) == before, command
