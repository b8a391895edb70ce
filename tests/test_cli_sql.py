"""``rapidfire-state sql`` is read-only on both backends, tried as an attacker would.

Every escape attempt must be refused in one line with a non-zero exit, and leave
every row and every history entry as it was (and create no file).  On
PostgreSQL the tests run as the superuser ``postgres``: what holds them back is
the reader role of migration 0004 and its security-definer function, not the
login.  Layers are also tested one at a time (the database's own enforcement
with the keyword pre-check bypassed).
"""

from __future__ import annotations

import io
import threading
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text

from rapidfire_state import cli
from rapidfire_state.cli import main
from rapidfire_state.db import StateDB, migrate
from rapidfire_state.db.engine import resolve_url
from rapidfire_state.exceptions import DBException, SQLRefusedError

TABLES = (
    "experiments", "runs", "worker_tasks", "controller_tasks", "workers", "shm_objects",
    "state_transitions", "alembic_version",
)


@pytest.fixture
def populated(db, tmp_path):
    experiment = db.create_experiment("sql_exp", str(tmp_path / "exps"))
    db.transition_experiment(experiment.experiment_id, "RUNNING")
    run = db.create_run(experiment.experiment_id, {"lr": 0.1})
    db.transition_run(run.run_id, "ONGOING")
    db.create_worker_task(experiment.experiment_id, run.run_id, 0, 0)
    db.upsert_shm_object("model/1", object_type="MODEL", num_bytes=10, tensor_count=1,
                         experiment_id=experiment.experiment_id, run_id=run.run_id)
    return db


def snapshot(db: StateDB) -> dict:
    """Every table's rows (as text), the history included: what must not change."""
    with db.session() as session:
        state = {}
        for table in TABLES:
            rows = session.execute(text(f"SELECT * FROM {table}")).all()
            state[table] = sorted(repr(tuple(row)) for row in rows)
        return state


def url_of(db: StateDB) -> str:
    return db.url.render_as_string(hide_password=False)


def sql(capsys, db: StateDB, statement: str, *extra: str) -> tuple[int, str, str]:
    code = main(["--url", url_of(db), "sql", statement, *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(capsys, db: StateDB, statement: str, *needles: str, timeout: str = "10") -> str:
    before = snapshot(db)
    code, out, err = sql(capsys, db, statement, "--timeout", timeout)
    assert code == 2, (statement, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("rapidfire-state: error: refused: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert out == ""
    assert snapshot(db) == before, f"{statement!r} changed the database"
    return lines[0]


# --- both backends ----------------------------------------------------------------------

COMMON_ESCAPES = [
    ("COMMIT; DELETE FROM state_transitions", "COMMIT"),
    ("ROLLBACK; DELETE FROM runs", "ROLLBACK"),
    ("END; DELETE FROM runs", "END"),
    ("BEGIN; DELETE FROM runs; COMMIT", "BEGIN"),
    ("SELECT 1; DELETE FROM state_transitions", "more than one statement"),
    ("SELECT 1; COMMIT; DELETE FROM state_transitions", "more than one statement"),
    ("DELETE FROM runs", "DELETE"),
    ("  -- a comment first\n  /* and another */ UPDATE runs SET error = 'x'", "UPDATE"),
    ("INSERT INTO state_transitions (entity) VALUES ('run')", "INSERT"),
    ("DROP TABLE state_transitions", "DROP"),
    ("SAVEPOINT s1", "SAVEPOINT"),
    ("", "empty"),
]


def test_statements_that_are_not_one_read_are_refused(populated, capsys):
    for statement, needle in COMMON_ESCAPES:
        assert_refused(capsys, populated, statement, needle)


def test_reads_still_work(populated, capsys):
    code, out, err = sql(capsys, populated, "SELECT entity, to_status FROM state_transitions ORDER BY transition_id", "--json")
    assert code == 0, err
    assert '"to_status": "ONGOING"' in out
    code, out, _ = sql(capsys, populated, "SELECT 1 AS a, 2 AS a", "--json")
    assert code == 0 and out.strip() == '[{"a": 1, "a_2": 2}]'
    code, out, _ = sql(capsys, populated, "SELECT * FROM runs WHERE 1 = 0")
    assert code == 0 and out.splitlines()[0].startswith("run_id") and "(no rows)" in out
    code, out, _ = sql(capsys, populated, "WITH t AS (SELECT status FROM run_overview) SELECT count(*) AS n FROM t", "--json")
    assert code == 0 and out.strip() == '[{"n": 1}]'


def test_recursive_cte_is_cancelled_by_the_timeout(populated, capsys):
    line = assert_refused(
        capsys, populated,
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
        "--timeout 0.3 s", timeout="0.3",
    )
    assert "cancelled" in line


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_timeout_must_be_a_positive_number(populated, capsys, value):
    with pytest.raises(SystemExit) as exited:
        main(["--url", url_of(populated), "sql", "SELECT 1", "--timeout", value])
    assert exited.value.code == 2
    assert "--timeout" in capsys.readouterr().err


# --- SQLite: the authorizer and the progress handler ------------------------------------


def sqlite_only(db: StateDB) -> None:
    if not db.is_sqlite:
        pytest.skip("SQLite only")


def test_sqlite_attach_detach_vacuum_into_create_nothing(populated, capsys, tmp_path):
    sqlite_only(populated)
    before = sorted(p.name for p in tmp_path.iterdir())
    target = tmp_path / "attached.db"
    assert_refused(capsys, populated, f"ATTACH DATABASE '{target}' AS evil", "ATTACH")
    assert_refused(capsys, populated, f"EXPLAIN ATTACH DATABASE '{target}' AS evil", "ATTACH", str(target))
    assert_refused(capsys, populated, "DETACH DATABASE main", "DETACH")
    assert_refused(capsys, populated, f"VACUUM INTO '{tmp_path / 'copy.db'}'", "VACUUM")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


SQLITE_DENIED = [
    ("PRAGMA journal_mode = DELETE", "PRAGMA journal_mode = DELETE"),
    ("PRAGMA user_version = 7", "PRAGMA user_version = 7"),
    ("PRAGMA main.user_version = 7", "PRAGMA user_version = 7"),
    ("PRAGMA wal_checkpoint(TRUNCATE)", "PRAGMA wal_checkpoint"),
    ("PRAGMA wal_checkpoint", "PRAGMA wal_checkpoint"),
    ("PRAGMA query_only = OFF", "PRAGMA query_only = OFF"),
    ("PRAGMA writable_schema = ON", "PRAGMA writable_schema"),
    ("PRAGMA optimize", "PRAGMA optimize"),
    ("PRAGMA incremental_vacuum", "PRAGMA incremental_vacuum"),
    ("EXPLAIN DELETE FROM runs", "DELETE from runs"),
    ("EXPLAIN COMMIT", "COMMIT"),
    ("WITH a AS (SELECT 1) UPDATE runs SET error = 'x'", "UPDATE runs"),
    ("WITH a AS (SELECT 1) DELETE FROM state_transitions", "DELETE from state_transitions"),
    ("WITH a AS (SELECT 1) INSERT INTO state_transitions (entity) SELECT 'run'", "INSERT into state_transitions"),
    ("SELECT load_extension('/tmp/nothing')", "load_extension"),
]


def test_sqlite_writes_past_the_keyword_are_denied_by_the_authorizer(populated, capsys):
    sqlite_only(populated)
    for statement, needle in SQLITE_DENIED:
        assert_refused(capsys, populated, statement, needle)


def test_sqlite_read_pragmas_work(populated, capsys):
    sqlite_only(populated)
    code, out, _ = sql(capsys, populated, "PRAGMA table_info(runs)", "--json")
    assert code == 0 and '"name": "run_id"' in out
    code, out, _ = sql(capsys, populated, "SELECT name FROM pragma_table_info('runs') LIMIT 1", "--json")
    assert code == 0 and out.strip() == '[{"name": "run_id"}]'
    code, out, _ = sql(capsys, populated, "PRAGMA journal_mode", "--json")
    assert code == 0 and out.strip() == '[{"journal_mode": "wal"}]'


def test_sqlite_authorizer_holds_without_the_keyword_check(populated):
    """The keyword pre-check is only for clear messages: the authorizer alone refuses."""
    sqlite_only(populated)
    before = snapshot(populated)
    for statement in (
        "DELETE FROM runs", "COMMIT", "ROLLBACK", "BEGIN", "END", "UPDATE runs SET error = 'x'",
        "PRAGMA user_version = 3", "CREATE TABLE t (a)", "DROP VIEW run_overview", "REINDEX", "ANALYZE",
        "SAVEPOINT s", "RELEASE s", "ALTER TABLE runs ADD COLUMN x",
    ):
        with pytest.raises(SQLRefusedError, match="^refused: .* is not allowed"):
            cli._sql_sqlite(Path(populated.sqlite_path), statement, 5.0)
    assert snapshot(populated) == before


def test_sqlite_attach_without_the_keyword_check_creates_no_file(populated, tmp_path):
    sqlite_only(populated)
    target = tmp_path / "evil.db"
    with pytest.raises(SQLRefusedError, match="ATTACH"):
        cli._sql_sqlite(Path(populated.sqlite_path), f"ATTACH '{target}' AS evil", 5.0)
    assert not target.exists()


# --- PostgreSQL: the reader role, its function, the extended protocol ---------------------


def pg_only(db: StateDB) -> None:
    if db.is_sqlite:
        pytest.skip("PostgreSQL only")


PG_ESCAPES = [
    ("COPY runs TO '{tmp}'", "COPY"),
    ("COPY (SELECT 1) TO PROGRAM 'touch {tmp}'", "COPY"),
    ("SELECT pg_read_file('/etc/passwd')", "permission denied for function pg_read_file"),
    ("SELECT * FROM pg_ls_dir('/')", "permission denied for function pg_ls_dir"),
    ("SELECT lo_import('/etc/passwd')", ""),
    ("SELECT query_to_xml('COPY (SELECT 1) TO ''{tmp}''', false, false, '')", "COPY is not allowed"),
    ("SELECT query_to_xml('DELETE FROM state_transitions RETURNING 1', false, false, '')", "DELETE is not allowed"),
    # regaining the superuser the connection logged in as: refused inside the security-definer function
    ("SELECT set_config('role', 'none', true), query_to_xml('SELECT pg_read_file(''/etc/passwd'')', false, false, '')",
     'cannot set parameter "role"'),
    ("SELECT set_config('session_authorization', 'postgres', true)", 'cannot set parameter "session_authorization"'),
    ("SELECT set_config('role', 'postgres', true)", 'cannot set parameter "role"'),
    ("RESET ROLE", "RESET"),
    ("SET ROLE postgres", "SET"),
    ("SET SESSION AUTHORIZATION DEFAULT", "SET"),
    ("WITH d AS (DELETE FROM state_transitions RETURNING 1) SELECT count(*) FROM d", "would write"),
    ("WITH u AS (UPDATE runs SET error = 'x' RETURNING 1) SELECT * FROM u", "would write"),
    ("SELECT * FROM runs FOR UPDATE", "lock rows"),
    ("SELECT nextval('runs_run_id_seq')", ""),
    ("SELECT * INTO TEMP stolen FROM runs", ""),
    ("SELECT 1; COMMIT", "more than one statement"),
    ("SELECT 1 /* ; */; /* nested /* comment */ */ DELETE FROM runs", "more than one statement"),
    ("/* /* nested */ COMMIT; */ DELETE FROM runs", "DELETE"),
    ("EXPLAIN ANALYZE DELETE FROM runs", "EXPLAIN"),
    ("CALL nothing()", "CALL"),
]


def test_postgresql_escapes_are_refused_even_as_superuser(populated, capsys):
    pg_only(populated)
    with populated.session() as session:
        assert session.execute(text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")).scalar()
    for statement, needle in PG_ESCAPES:
        target = Path(f"/tmp/rf_sql_escape_{uuid.uuid4().hex}")
        assert_refused(capsys, populated, statement.format(tmp=target), needle)
        assert not target.exists()


def test_postgresql_cannot_signal_other_sessions(populated, capsys):
    pg_only(populated)
    other = populated.engine.connect()
    try:
        pid = other.execute(text("SELECT pg_backend_pid()")).scalar()
        other.commit()
        for function in ("pg_terminate_backend", "pg_cancel_backend"):
            assert_refused(capsys, populated, f"SELECT {function}({pid})", "superuser")
        assert other.execute(text("SELECT 1")).scalar() == 1  # still connected
    finally:
        other.close()


def test_postgresql_timeout_cancels_pg_sleep_even_if_the_statement_resets_it(populated, capsys):
    pg_only(populated)
    assert_refused(capsys, populated, "SELECT pg_sleep(60)", "--timeout 0.5 s", timeout="0.5")
    assert_refused(
        capsys, populated, "SELECT set_config('statement_timeout', '0', false), pg_sleep(60)",
        "--timeout 0.5 s", timeout="0.5",
    )


def test_postgresql_function_holds_without_the_keyword_check(populated):
    """The keyword pre-check is only for clear messages: the server alone refuses."""
    pg_only(populated)
    before = snapshot(populated)
    reader = StateDB(url_of(populated), read_only=True)
    try:
        for statement, needle in [
            ("COMMIT", "COMMIT query as cursor"),
            ("ROLLBACK", "ROLLBACK query as cursor"),
            ("RESET ROLE", "query as cursor"),
            ("SET ROLE NONE", "query as cursor"),
            ("DELETE FROM runs", "DELETE query as cursor"),
            ("DELETE FROM runs RETURNING run_id", "DELETE"),
            ("SELECT 1; DELETE FROM runs", "more than one statement"),
            ("COPY runs TO '/tmp/rf_never_written'", "query as cursor"),
            ("COPY (SELECT 1) TO PROGRAM 'touch /tmp/rf_never_written'", "query as cursor"),
        ]:
            with pytest.raises(SQLRefusedError, match="^refused: ") as refused:
                cli._sql_postgresql(reader, statement, 5.0)
            assert needle in str(refused.value), (statement, refused.value)
    finally:
        reader.close()
    assert snapshot(populated) == before
    assert not Path("/tmp/rf_never_written").exists()


def test_postgresql_reader_role_and_function_are_what_0004_promises(populated):
    pg_only(populated)
    with populated.session() as session:
        role = session.execute(text(
            "SELECT rolsuper, rolcanlogin, rolcreaterole, rolcreatedb, rolbypassrls, rolreplication"
            " FROM pg_roles WHERE rolname = :r"), {"r": migrate.SQL_READER_ROLE}).one()
        assert tuple(role) == (False, False, False, False, False, False)
        function = session.execute(text(
            "SELECT prosecdef, provolatile, pg_get_userbyid(proowner) FROM pg_proc"
            " WHERE oid = to_regprocedure(:f)"), {"f": f"{migrate.SQL_READER_FUNCTION}(text)"}).one()
        assert tuple(function) == (True, "s", migrate.SQL_READER_ROLE)
        granted = session.execute(text(
            "SELECT has_table_privilege(:r, 'runs', 'SELECT'), has_table_privilege(:r, 'run_overview', 'SELECT'),"
            " has_table_privilege(:r, 'runs', 'INSERT'), has_table_privilege(:r, 'runs', 'DELETE'),"
            " has_schema_privilege(:r, current_schema(), 'CREATE'),"
            " has_function_privilege('public', :f, 'EXECUTE')"), {"r": migrate.SQL_READER_ROLE,
                                                                "f": f"{migrate.SQL_READER_FUNCTION}(text)"}).one()
        assert tuple(granted) == (True, True, False, False, False, False)


def test_postgresql_tables_created_later_are_readable_by_default_privileges(populated, capsys):
    pg_only(populated)
    with populated.transaction() as session:
        session.execute(text("CREATE TABLE later_table (a integer)"))
        session.execute(text("INSERT INTO later_table VALUES (41)"))
    code, out, err = sql(capsys, populated, "SELECT a + 1 AS b FROM later_table", "--json")
    assert code == 0, err
    assert out.strip() == '[{"b": 42}]'


def test_postgresql_database_before_0004_refuses_sql_and_stays_there(db_url, capsys):
    database = StateDB(db_url)
    if database.is_sqlite:
        database.close()
        pytest.skip("PostgreSQL only")
    try:
        database.downgrade("0003_task_claims")
    finally:
        database.close()
    code, out, err = run_main(capsys, "--url", db_url, "sql", "SELECT 1")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "0003_task_claims" in err and migrate.SQL_READER_REVISION in err
    assert "rapidfire-state db upgrade" in err
    code, out, err = run_main(capsys, "--url", db_url, "runs", "--json")
    assert code == 0 and out.strip() == "[]"  # a listing still reads it
    assert migrate.probe_database(resolve_url(db_url)).revision == "0003_task_claims"


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_postgresql_reader_role_creation_is_race_safe(pg_database_url):
    """Roles are cluster-wide: many databases migrating at once all create 'the' role."""
    from sqlalchemy import create_engine

    from rapidfire_state.db.engine import resolve_url

    module = _migration_module()
    role = f"rf_test_reader_{uuid.uuid4().hex[:10]}"
    engine = create_engine(resolve_url(pg_database_url), pool_size=8, max_overflow=0)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def create() -> None:
        try:
            with engine.connect() as connection:
                barrier.wait()
                connection.exec_driver_sql(module.create_role_sql(role))
                connection.commit()
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        with engine.connect() as connection:
            count = connection.execute(text("SELECT count(*) FROM pg_roles WHERE rolname = :r"), {"r": role}).scalar()
        assert count == 1
    finally:
        with engine.connect() as connection:
            connection.exec_driver_sql(f"DROP ROLE IF EXISTS {role}")
            connection.commit()
        engine.dispose()


def _migration_module():
    import importlib.util

    path = migrate.migrations_dir() / "versions" / "0004_sql_reader_role.py"
    spec = importlib.util.spec_from_file_location("rf_migration_0004", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _offline_sql(url: str, revisions: str) -> str:
    from alembic import command
    from alembic.config import Config

    buffer = io.StringIO()
    config = Config(output_buffer=buffer)
    config.set_main_option("script_location", str(migrate.migrations_dir()))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, revisions, sql=True)
    return buffer.getvalue()


def test_offline_sql_of_0004_runs_on_postgresql_and_is_empty_on_sqlite(db_url, capsys):
    script = _offline_sql(db_url, "0003_task_claims:0004_sql_reader_role")
    assert "0004_sql_reader_role" in script
    if db_url.startswith("sqlite"):
        assert "CREATE ROLE" not in script and "rapidfire_sql_read" not in script
        return
    assert "CREATE ROLE rapidfire_reader" in script and "SECURITY DEFINER" in script
    database = StateDB(db_url)
    try:
        database.downgrade("0003_task_claims")
        # what a DBA would do with the emitted script: run it as is
        raw = database.engine.raw_connection()
        try:
            raw.driver_connection.autocommit = True
            raw.driver_connection.execute(script)
        finally:
            raw.close()
        assert database.schema_revision() == "0004_sql_reader_role"
    finally:
        database.close()
    code, out, err = run_main(capsys, "--url", db_url, "sql", "SELECT version_num FROM alembic_version", "--json")
    assert code == 0, err
    assert out.strip() == '[{"version_num": "0004_sql_reader_role"}]'


def test_postgresql_downgrade_of_0004_removes_function_and_grants(db):
    pg_only(db)
    db.downgrade("0003_task_claims")
    with db.session() as session:
        assert session.execute(text("SELECT to_regprocedure(:f)"),
                               {"f": f"{migrate.SQL_READER_FUNCTION}(text)"}).scalar() is None
        assert session.execute(text("SELECT has_table_privilege(:r, 'runs', 'SELECT')"),
                               {"r": migrate.SQL_READER_ROLE}).scalar() is False
        # the role itself stays: other databases of the cluster may use it
        assert session.execute(text("SELECT count(*) FROM pg_roles WHERE rolname = :r"),
                               {"r": migrate.SQL_READER_ROLE}).scalar() == 1
    db.upgrade()
    assert db.schema_revision() == migrate.HEAD_REVISION


def test_query_errors_are_one_line_and_not_refusals(populated, capsys):
    code, out, err = sql(capsys, populated, "SELECT * FROM no_such_table")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "query failed" in err and "no_such_table" in err
    with pytest.raises(DBException):
        if populated.is_sqlite:
            cli._sql_sqlite(Path(populated.sqlite_path), "SELEC 1", 5.0)
        else:
            reader = StateDB(url_of(populated), read_only=True)
            try:
                cli._sql_postgresql(reader, "SELEC 1", 5.0)
            finally:
                reader.close()


def test_postgresql_sql_as_a_member_and_as_a_non_member(populated, capsys):
    """A login that is not a superuser: refused (one line, the GRANT to ask for) until it is
    made a member of the reader role; then it reads, and still cannot write."""
    pg_only(populated)
    login = f"rf_test_login_{uuid.uuid4().hex[:10]}"
    with populated.transaction() as session:
        session.execute(text(f"CREATE ROLE {login} LOGIN"))
        session.execute(text(f"GRANT SELECT ON alembic_version TO {login}"))
    url = populated.url.set(username=login).render_as_string(hide_password=False)
    try:
        code, out, err = run_main(capsys, "--url", url, "sql", "SELECT count(*) AS n FROM runs")
        assert code == 2 and out == ""
        assert f"GRANT {migrate.SQL_READER_ROLE} TO {login}" in err and len(err.strip().splitlines()) == 1
        with populated.transaction() as session:
            session.execute(text(f"GRANT {migrate.SQL_READER_ROLE} TO {login}"))
        code, out, err = run_main(capsys, "--url", url, "sql", "SELECT count(*) AS n FROM runs", "--json")
        assert code == 0 and out.strip() == '[{"n": 1}]', err
        before = snapshot(populated)
        code, _, err = run_main(capsys, "--url", url, "sql", "WITH d AS (DELETE FROM runs RETURNING 1) SELECT * FROM d")
        assert code == 2 and "refused" in err
        assert snapshot(populated) == before
    finally:
        with populated.transaction() as session:
            session.execute(text(f"REVOKE ALL ON alembic_version FROM {login}"))
        populated.engine.dispose()  # the login's sessions are gone; nothing else holds the role
        with populated.transaction() as session:
            session.execute(text(f"DROP ROLE {login}"))


# --- found under attack (atksql) ---------------------------------------------------------


def test_sqlite_fts3_tokenizer_is_denied(populated, capsys):
    """fts3_tokenizer() leaks a C pointer (one argument) or swaps one in (two: enabled in
    this SQLite build); neither is reading, both are refused by the authorizer."""
    sqlite_only(populated)
    assert_refused(capsys, populated, "SELECT fts3_tokenizer('simple')", "fts3_tokenizer")
    assert_refused(capsys, populated, "SELECT fts3_tokenizer('simple', x'4141414141414141')", "fts3_tokenizer")
    with pytest.raises(SQLRefusedError, match="fts3_tokenizer"):
        cli._sql_sqlite(Path(populated.sqlite_path), "SELECT upper(fts3_tokenizer('porter'))", 5.0)


def test_postgresql_session_state_of_a_statement_does_not_outlive_it(populated):
    """A session-level advisory lock survives ROLLBACK: the statement's connection must
    not go back to the pool holding it (the migration lock, or any other key)."""
    pg_only(populated)
    reader = StateDB(url_of(populated), read_only=True)
    try:
        for key in (4242, migrate._PG_LOCK_KEY):
            columns, rows = cli._sql_postgresql(reader, f"SELECT pg_advisory_lock({key}) AS locked", 5.0)
            assert columns == ["locked"]
            with populated.engine.connect() as other:
                assert other.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar() is True
                other.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                other.commit()
    finally:
        reader.close()


def test_one_statement_with_semicolons_in_literals_or_a_trailing_comment_runs(populated, capsys):
    for statement, expected in [
        ("SELECT ';' AS a", '[{"a": ";"}]'),
        ("SELECT 'x; DELETE FROM runs' AS a;", '[{"a": "x; DELETE FROM runs"}]'),
        ("SELECT 1 AS a; -- a trailing comment", '[{"a": 1}]'),
        ("SELECT 1 AS a ; /* and ; another */", '[{"a": 1}]'),
        ('SELECT 1 AS "a;b"', '[{"a;b": 1}]'),
        ("\u3000\u00a0 SELECT 2 AS a" if not populated.is_sqlite else "\t\n SELECT 2 AS a", '[{"a": 2}]'),
    ]:
        code, out, err = sql(capsys, populated, statement, "--json")
        if "\u3000" in statement:  # PostgreSQL's lexer does not take unicode spaces: a query error, never a run
            assert code == 2 and "query failed" in err and out == "", (statement, err)
            continue
        assert code == 0 and out.strip() == expected, (statement, out, err)
    if not populated.is_sqlite:
        code, out, err = sql(capsys, populated, "SELECT $x$;DELETE FROM runs$x$ AS a", "--json")
        assert code == 0 and out.strip() == '[{"a": ";DELETE FROM runs"}]', err


def test_statements_with_a_nul_character_are_refused_and_change_nothing(populated, capsys):
    before = snapshot(populated)
    code, out, err = sql(capsys, populated, "SELECT 1\x00; DELETE FROM runs")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert snapshot(populated) == before


def test_postgresql_a_function_planted_in_the_search_path_never_runs_as_the_login(populated, capsys):
    """A user with CREATE on the database makes a schema named like the reader role.
    After ``SET ROLE rapidfire_reader`` its "$user" entry of the search path resolved
    the unqualified call of rapidfire_sql_read to the planted function, which ran as
    the superuser login (it could ``RESET`` the role: COPY TO a file, TO PROGRAM)."""
    pg_only(populated)
    import psycopg

    planter = f"rf_test_planter_{uuid.uuid4().hex[:10]}"
    proof = Path(f"/tmp/rf_planted_{uuid.uuid4().hex}")
    database_name = populated.url.database
    with populated.transaction() as session:
        session.execute(text(f"CREATE ROLE {planter} LOGIN"))
        session.execute(text(f'GRANT CREATE ON DATABASE "{database_name}" TO {planter}'))
    conninfo = populated.url.set(drivername="postgresql", username=planter).render_as_string(hide_password=False)
    try:
        with psycopg.connect(conninfo, autocommit=True) as planted:
            planted.execute(f"CREATE SCHEMA {migrate.SQL_READER_ROLE}")
            planted.execute(f"GRANT USAGE ON SCHEMA {migrate.SQL_READER_ROLE} TO PUBLIC")
            planted.execute(f"""
                CREATE FUNCTION {migrate.SQL_READER_ROLE}.{migrate.SQL_READER_FUNCTION}(statement text)
                RETURNS SETOF json LANGUAGE plpgsql AS $f$
                BEGIN
                    PERFORM pg_catalog.set_config('role', 'none', true);
                    EXECUTE 'COPY (SELECT current_user) TO ''{proof}''';
                    RETURN NEXT pg_catalog.json_build_object('n', -1);
                END $f$""")
            planted.execute(f"GRANT EXECUTE ON FUNCTION {migrate.SQL_READER_ROLE}.{migrate.SQL_READER_FUNCTION}(text) TO PUBLIC")
        code, out, err = sql(capsys, populated, "SELECT count(*) AS n FROM runs", "--json")
        assert not proof.exists(), "the planted function ran as the superuser"
        assert code == 0 and out.strip() == '[{"n": 1}]', (out, err)
    finally:
        proof.unlink(missing_ok=True)
        with populated.transaction() as session:
            session.execute(text(f"DROP SCHEMA IF EXISTS {migrate.SQL_READER_ROLE} CASCADE"))
            session.execute(text(f'REVOKE CREATE ON DATABASE "{database_name}" FROM {planter}'))
        populated.engine.dispose()
        with populated.transaction() as session:
            session.execute(text(f"DROP ROLE {planter}"))
