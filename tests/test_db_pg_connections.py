"""PostgreSQL connection hygiene: named connections, server-side timeouts, nothing left behind.

Each test gets a database of its own (``pg_database_url``) and looks at the
server's own view of its connections (``pg_stat_activity``) through a separate
admin connection.  Skipped when ``RF_TEST_PG_URL`` is unset.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError, OperationalError

from rapidfire_state import StateDB
from rapidfire_state.db import engine as engine_module
from rapidfire_state.db.engine import application_name, resolve_url, set_application_name
from rapidfire_state.exceptions import ConfigError


@pytest.fixture
def admin(pg_database_url):
    engine = create_engine(resolve_url(pg_database_url), isolation_level="AUTOCOMMIT")
    try:
        yield engine
    finally:
        engine.dispose()


def _activity(admin, pg_database_url: str) -> list[tuple]:
    """(pid, application_name, state) of every other connection to the test's database."""
    database = resolve_url(pg_database_url).database
    with admin.connect() as connection:
        return [tuple(r) for r in connection.execute(text(
            "SELECT pid, application_name, state FROM pg_stat_activity "
            "WHERE datname = :d AND pid <> pg_backend_pid()"
        ), {"d": database})]


def _backend_pid(db: StateDB) -> int:
    with db.engine.connect() as connection:
        return connection.execute(text("SELECT pg_backend_pid()")).scalar()


@pytest.fixture
def no_role():
    previous = set_application_name(None)
    try:
        yield
    finally:
        set_application_name(previous)


def test_a_connection_is_named_by_its_process_by_default_by_env_and_by_role(
    pg_database_url, admin, monkeypatch, no_role
):
    monkeypatch.delenv("RF_DB_APPLICATION_NAME", raising=False)
    db = StateDB(pg_database_url)
    try:
        pid = _backend_pid(db)
        names = {p: name for p, name, _ in _activity(admin, pg_database_url)}
        program = os.path.basename(sys.argv[0])
        assert names[pid] == f"rapidfire_state:{program}:{os.getpid()}"[:63]
    finally:
        db.close()

    monkeypatch.setenv("RF_DB_APPLICATION_NAME", "my-controller")
    db = StateDB(pg_database_url)
    try:
        assert {p: n for p, n, _ in _activity(admin, pg_database_url)}[_backend_pid(db)] == "my-controller"
        # a role named in the process wins over the inherited environment, from the next connection on
        set_application_name("controller")
        db.engine.dispose()
        pid = _backend_pid(db)
        assert {p: n for p, n, _ in _activity(admin, pg_database_url)}[pid] == f"rapidfire_state:controller:{os.getpid()}"
    finally:
        db.close()
    with pytest.raises(ConfigError):
        set_application_name("  ")


def test_an_application_name_in_the_url_is_kept(pg_database_url, admin, no_role):
    url = resolve_url(pg_database_url).update_query_dict({"application_name": "from-url"})
    db = StateDB(url)
    try:
        assert {p: n for p, n, _ in _activity(admin, pg_database_url)}[_backend_pid(db)] == "from-url"
    finally:
        db.close()


def test_a_session_left_idle_in_a_transaction_is_ended_by_the_server(pg_database_url, admin, monkeypatch):
    # the schema first, under the default timeout: on a loaded machine the migration's own
    # pauses between statements could pass a timeout this short
    StateDB(pg_database_url).close()
    monkeypatch.setenv("RF_DB_IDLE_IN_TRANSACTION_TIMEOUT_S", "1")
    db = StateDB(pg_database_url)
    try:
        with db.session() as session:
            pid = session.execute(text("SELECT pg_backend_pid()")).scalar()  # the transaction is open now
            states = {p: state for p, _, state in _activity(admin, pg_database_url)}
            # seen idle in its transaction, unless the server already ended it
            assert states.get(pid, "idle in transaction") == "idle in transaction"
            deadline = time.monotonic() + 10
            while pid in {p for p, _, _ in _activity(admin, pg_database_url)} and time.monotonic() < deadline:
                time.sleep(0.1)
            assert pid not in {p for p, _, _ in _activity(admin, pg_database_url)}  # terminated by the server
            with pytest.raises((OperationalError, DBAPIError)):
                session.execute(text("SELECT 1"))
        # the pool drops the dead connection (its reset on return fails): the store works on
        assert db.create_experiment("after-idle", "/tmp/x").name == "after-idle"
    finally:
        db.close()


def test_a_pooled_connection_is_pinged_only_after_sitting_idle_and_replaced_when_gone(
    pg_database_url, admin, monkeypatch
):
    monkeypatch.setattr(engine_module, "PING_AFTER_IDLE_S", 0.3)
    db = StateDB(pg_database_url)
    try:
        pings = []
        ping = db.engine.dialect.do_ping
        monkeypatch.setattr(db.engine.dialect, "do_ping", lambda c: pings.append(1) or ping(c))
        for _ in range(5):  # in steady use: no ping, no extra round trip per unit
            db.list_experiments()
        assert pings == []
        time.sleep(0.5)
        pid = _backend_pid(db)  # pinged (idle 0.5 s), alive, kept
        assert pings == [1]
        time.sleep(0.5)
        with admin.connect() as connection:  # the server ends the idle pooled connection
            assert connection.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
        deadline = time.monotonic() + 10
        while pid in {p for p, _, _ in _activity(admin, pg_database_url)} and time.monotonic() < deadline:
            time.sleep(0.05)
        # the ping finds it gone and the pool opens another: the unit never sees it
        assert db.create_experiment("after-terminate", "/tmp/x").name == "after-terminate"
        assert len(pings) == 2 and _backend_pid(db) != pid
    finally:
        db.close()


def test_a_statement_past_the_statement_timeout_is_cancelled(pg_database_url, monkeypatch):
    monkeypatch.setenv("RF_DB_STATEMENT_TIMEOUT_S", "0.3")
    db = StateDB(pg_database_url)
    try:
        with db.engine.connect() as connection:
            assert connection.execute(text("SHOW statement_timeout")).scalar() == "300ms"
            assert connection.execute(text("SHOW idle_in_transaction_session_timeout")).scalar() == "1min"
            started = time.monotonic()
            with pytest.raises(OperationalError) as cancelled:
                connection.execute(text("SELECT pg_sleep(5)"))
            assert time.monotonic() - started < 3
            assert getattr(cancelled.value.orig, "sqlstate", None) == "57014"  # query_canceled
            connection.rollback()
            assert connection.execute(text("SELECT pg_sleep(0.05), 1")).one()[1] == 1
    finally:
        db.close()


def test_zero_turns_the_timeouts_off_and_bad_values_are_refused(pg_database_url, monkeypatch):
    monkeypatch.setenv("RF_DB_STATEMENT_TIMEOUT_S", "0")
    monkeypatch.setenv("RF_DB_IDLE_IN_TRANSACTION_TIMEOUT_S", "0")
    db = StateDB(pg_database_url)
    try:
        with db.engine.connect() as connection:
            assert connection.execute(text("SHOW statement_timeout")).scalar() == "0"
            assert connection.execute(text("SHOW idle_in_transaction_session_timeout")).scalar() == "0"
    finally:
        db.close()
    for bad in ("-1", "soon", "inf"):
        monkeypatch.setenv("RF_DB_STATEMENT_TIMEOUT_S", bad)
        with pytest.raises(ConfigError, match="RF_DB_STATEMENT_TIMEOUT_S"):
            engine_module.postgresql_session_options()


def test_the_sql_command_keeps_its_own_timeout_under_the_library_one(pg_database_url, monkeypatch, capsys):
    from rapidfire_state import cli

    StateDB(pg_database_url).close()  # migrated: the reader role exists
    monkeypatch.setenv("RF_DB_STATEMENT_TIMEOUT_S", "60")
    assert cli.main(["--url", pg_database_url, "sql", "--timeout", "0.3", "SELECT pg_sleep(3)"]) == cli.EXIT_ERROR
    assert "ran past --timeout 0.3 s" in capsys.readouterr().err
    assert cli.main(["--url", pg_database_url, "sql", "--timeout", "5", "SELECT 41 + 1 AS answer"]) == 0
    assert "42" in capsys.readouterr().out
    assert engine_module._role is None  # main() gave the role back


@pytest.mark.parametrize("ending", ["return", "os._exit", "SIGKILL"])
def test_a_process_that_exits_leaves_no_connection(pg_database_url, admin, ending):
    script = textwrap.dedent(f"""
        import os, signal, sys
        from sqlalchemy import text
        from rapidfire_state import StateDB
        from rapidfire_state.db.engine import set_application_name
        set_application_name("exiting")
        db = StateDB({pg_database_url!r})
        db.create_experiment("exiting", "/tmp/x")
        with db.engine.connect() as connection:
            print(connection.execute(text("SELECT pg_backend_pid()")).scalar(), flush=True)
        ending = {ending!r}
        if ending == "os._exit":
            os._exit(0)
        if ending == "SIGKILL":
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert child.stdout.strip().isdigit(), child.stdout + child.stderr
    deadline = time.monotonic() + 10
    left = _activity(admin, pg_database_url)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = _activity(admin, pg_database_url)
    assert left == [], left


def test_application_name_follows_the_pid_and_role(no_role, monkeypatch):
    monkeypatch.delenv("RF_DB_APPLICATION_NAME", raising=False)
    assert application_name().endswith(f":{os.getpid()}")
    assert set_application_name("worker_3") is None
    assert application_name() == f"rapidfire_state:worker_3:{os.getpid()}"
    assert set_application_name(None) == "worker_3"


def test_spawned_workers_name_their_connections_worker_n(pg_database_url, admin, tmp_path):
    from rapidfire_state.worker_manager import WorkerManager

    import worker_targets

    db = StateDB(pg_database_url)
    manager = None
    try:
        experiment = db.create_experiment("named-workers", str(tmp_path / "exps"))
        manager = WorkerManager(
            2, target=worker_targets.task_worker, db=db, heartbeat_seconds=0.2,
            worker_kwargs={"record_dir": str(tmp_path), "heartbeat_seconds": 0.2},
        )
        pids = manager.spawn_workers(experiment.experiment_id, experiment.name)
        wanted = {f"rapidfire_state:worker_{w}:{pid}" for w, pid in enumerate(pids)}
        deadline = time.monotonic() + 20
        names: set[str] = set()
        while not wanted <= names and time.monotonic() < deadline:
            time.sleep(0.1)
            names = {n for _, n, _ in _activity(admin, pg_database_url)}
        assert wanted <= names, names
        manager.shutdown_workers(timeout=10)
        manager = None
        # the workers exited: none of their connections is left
        deadline = time.monotonic() + 10
        while names & wanted and time.monotonic() < deadline:
            time.sleep(0.1)
            names = {n for _, n, _ in _activity(admin, pg_database_url)}
        assert not names & wanted, names
    finally:
        if manager is not None:
            manager.terminate_workers()
        db.close()


def _hold_migration_lock(admin):
    from rapidfire_state.db.migrate import _PG_LOCK_KEY

    connection = admin.connect()
    connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _PG_LOCK_KEY})
    return connection


def test_a_migration_waits_for_the_lock_past_the_statement_timeout(pg_database_url, admin, monkeypatch):
    # another process migrating for longer than the library's statement timeout:
    # the waiting process is not cancelled by that timeout, it waits for the lock
    import threading

    monkeypatch.setenv("RF_DB_STATEMENT_TIMEOUT_S", "0.3")
    holder = _hold_migration_lock(admin)
    opened: list = []

    def open_db() -> None:
        try:
            opened.append(StateDB(pg_database_url))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            opened.append(exc)

    thread = threading.Thread(target=open_db)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        # the moment is chosen by what the server shows: the opener waits on the advisory lock
        while True:
            with admin.connect() as connection:
                waiting = connection.execute(text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                )).scalar()
            if waiting:
                break
            assert time.monotonic() < deadline, "the opener never waited for the migration lock"
            time.sleep(0.05)
        time.sleep(1.0)  # > 3x the statement timeout while it waits
        assert thread.is_alive() and not opened
    finally:
        holder.execute(text("SELECT pg_advisory_unlock_all()"))
        holder.close()
        thread.join(30)
    assert len(opened) == 1 and isinstance(opened[0], StateDB), opened
    db = opened[0]
    try:
        with db.engine.connect() as connection:
            # SET LOCAL ended with the lock's transaction and the migration's: pooled
            # connections keep the library's own timeout
            assert connection.execute(text("SHOW statement_timeout")).scalar() == "300ms"
        db.create_experiment("after-the-wait", "/tmp/rf-wait")
    finally:
        db.close()


def test_the_wait_for_another_migration_is_bounded_and_named(pg_database_url, admin, monkeypatch):
    from rapidfire_state.db import migrate
    from rapidfire_state.exceptions import DBException

    monkeypatch.setattr(migrate, "MIGRATION_LOCK_WAIT_S", 1)
    holder = _hold_migration_lock(admin)
    try:
        with pytest.raises(DBException, match=r"waited 1 s for the migration lock of .*another process holds it"):
            StateDB(pg_database_url)
    finally:
        holder.execute(text("SELECT pg_advisory_unlock_all()"))
        holder.close()
    # nothing was created while it waited; the next open migrates
    with admin.connect() as connection:
        assert connection.execute(text("SELECT to_regclass('experiments')")).scalar() is None
    db = StateDB(pg_database_url)
    try:
        assert db.list_experiments() == []
    finally:
        db.close()


def _connection_parameters(db: StateDB) -> dict:
    with db.engine.connect() as connection:
        return dict(connection.connection.driver_connection.info.get_parameters())


def test_connections_bound_their_wait_on_a_silent_network(pg_database_url, monkeypatch):
    # what a cut host's calls run into is tested with real namespaces in test_multihost.py
    monkeypatch.delenv("RF_DB_NETWORK_TIMEOUT_S", raising=False)
    db = StateDB(pg_database_url)
    try:
        parameters = _connection_parameters(db)
    finally:
        db.close()
    assert {name: parameters.get(name) for name in (
        "connect_timeout", "tcp_user_timeout", "keepalives", "keepalives_idle", "keepalives_interval",
        "keepalives_count",
    )} == {"connect_timeout": "30", "tcp_user_timeout": "30000", "keepalives": "1", "keepalives_idle": "10",
           "keepalives_interval": "3", "keepalives_count": "3"}

    monkeypatch.setenv("RF_DB_NETWORK_TIMEOUT_S", "0.5")
    db = StateDB(pg_database_url)
    try:
        parameters = _connection_parameters(db)
        assert (parameters["connect_timeout"], parameters["tcp_user_timeout"]) == ("2", "500")
    finally:
        db.close()

    monkeypatch.setenv("RF_DB_NETWORK_TIMEOUT_S", "0")
    db = StateDB(pg_database_url)
    try:
        parameters = _connection_parameters(db)
        assert not {"connect_timeout", "tcp_user_timeout", "keepalives"} & set(parameters)
    finally:
        db.close()

    # a parameter in the URL's query is the operator's choice and is kept
    monkeypatch.delenv("RF_DB_NETWORK_TIMEOUT_S")
    db = StateDB(f"{pg_database_url}?connect_timeout=7")
    try:
        assert _connection_parameters(db)["connect_timeout"] == "7"
    finally:
        db.close()

    for bad in ("-2", "never", "nan"):
        monkeypatch.setenv("RF_DB_NETWORK_TIMEOUT_S", bad)
        with pytest.raises(ConfigError, match="RF_DB_NETWORK_TIMEOUT_S"):
            engine_module.postgresql_network_parameters()


def test_a_migration_is_not_ended_by_a_short_idle_in_transaction_timeout(pg_database_url, monkeypatch):
    # The migration's transaction pauses between statements while Alembic loads each
    # revision script; a timeout shorter than such a pause must not end it.  A pause
    # is made certain here: a connection event that sleeps before the version-table
    # update, inside the migration's transaction.
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    monkeypatch.setenv("RF_DB_IDLE_IN_TRANSACTION_TIMEOUT_S", "0.2")
    paused = []

    def pause(conn, cursor, statement, parameters, context, executemany):
        if "alembic_version" in statement and statement.lstrip().upper().startswith(("UPDATE", "INSERT")):
            paused.append(statement)
            time.sleep(0.6)

    event.listen(Engine, "before_cursor_execute", pause)
    try:
        db = StateDB(pg_database_url)
    finally:
        event.remove(Engine, "before_cursor_execute", pause)
    try:
        assert paused and db.schema_revision() is not None
        with db.engine.connect() as connection:  # the library's own setting outside migrations
            assert connection.execute(text("SHOW idle_in_transaction_session_timeout")).scalar() == "200ms"
    finally:
        db.close()
