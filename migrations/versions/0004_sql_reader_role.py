"""The reader that ``rapidfire-state sql`` runs as on PostgreSQL.

Revision ID: 0004_sql_reader_role
Revises: 0003_task_claims
Create Date: 2026-12-01

PostgreSQL only (on SQLite this revision changes nothing: ``sql`` is kept
read-only there by the sqlite3 authorizer).

* ``rapidfire_reader``: a NOLOGIN role with no attributes and no membership of
  the built-in roles that read or write server files, run programs or signal
  backends.  Roles are cluster-wide, and many databases of one server may be
  migrated at once: creation is skipped when the role exists and a concurrent
  creation (``duplicate_object``/``unique_violation``) is taken as success.  The
  user running the migration is made a member, so it may ``SET ROLE`` to it
  (superusers always may; any other user of ``sql`` needs
  ``GRANT rapidfire_reader TO <user>``).
* It gets USAGE on the current schema and SELECT on its tables and views.
  Tables and views added later are covered by default privileges for the role
  that runs this migration (``ALTER DEFAULT PRIVILEGES … GRANT SELECT ON TABLES``);
  a later revision run by a *different* role must grant SELECT itself.
* ``rapidfire_sql_read(statement text) RETURNS SETOF json``: a STABLE, SECURITY
  DEFINER function owned by the reader role that runs one statement and returns
  its rows as JSON.  Inside a security-definer function PostgreSQL refuses to
  change ``role`` or ``session_authorization`` (so ``set_config('role', 'none',
  …)`` cannot regain the superuser the connection logged in as), a STABLE
  function's statements may not write or lock rows, and ``FOR … IN EXECUTE``
  opens exactly one statement as a cursor.  Only the reader role may execute it.

The SQL is fixed text evaluated by the server (no reads from the migration's
connection), so ``alembic upgrade --sql`` (offline mode) emits it as is.
Downgrade drops the function and revokes this schema's grants and default
privileges; the role itself is kept, because other databases of the cluster may
still use it (``DROP ROLE rapidfire_reader`` by hand once none does).
"""

from __future__ import annotations

from typing import Sequence, Union

from alembic import op

revision: str = "0004_sql_reader_role"
down_revision: Union[str, None] = "0003_task_claims"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

#: fixed here (a revision must not change when the library does); migrate.py names the same
ROLE = "rapidfire_reader"
FUNCTION = "rapidfire_sql_read"

_SCHEMA = "quote_ident(current_schema())"


def create_role_sql(role: str = ROLE) -> str:
    """A DO block that creates ``role`` unless it exists; safe to run concurrently."""
    return f"""
DO $rf$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = '{role}') THEN
        BEGIN
            CREATE ROLE {role} NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT
                NOREPLICATION NOBYPASSRLS;
        EXCEPTION
            -- another database of this cluster created it at the same moment
            WHEN duplicate_object OR unique_violation THEN NULL;
        END;
    END IF;
END
$rf$
"""


def _grant_membership_sql(role: str = ROLE) -> str:
    return f"""
DO $rf$
BEGIN
    IF NOT pg_catalog.pg_has_role(current_user, '{role}', 'MEMBER') THEN
        EXECUTE 'GRANT {role} TO ' || quote_ident(current_user);
    END IF;
EXCEPTION
    WHEN duplicate_object OR unique_violation THEN NULL;
END
$rf$
"""


def _grant_schema_sql(role: str = ROLE) -> str:
    return f"""
DO $rf$
BEGIN
    EXECUTE 'GRANT USAGE ON SCHEMA ' || {_SCHEMA} || ' TO {role}';
    EXECUTE 'GRANT SELECT ON ALL TABLES IN SCHEMA ' || {_SCHEMA} || ' TO {role}';
    EXECUTE 'ALTER DEFAULT PRIVILEGES IN SCHEMA ' || {_SCHEMA} || ' GRANT SELECT ON TABLES TO {role}';
END
$rf$
"""


_CREATE_FUNCTION = f"""
CREATE FUNCTION {FUNCTION}(statement text) RETURNS SETOF json
LANGUAGE plpgsql STABLE SECURITY DEFINER
AS $rf$
DECLARE
    result record;
BEGIN
    FOR result IN EXECUTE statement LOOP
        RETURN NEXT pg_catalog.to_json(result);
    END LOOP;
END
$rf$
"""

# The owner of a function needs CREATE on its schema at the moment it becomes the owner;
# the reader has it only for that moment.
_OWN_FUNCTION = f"""
DO $rf$
BEGIN
    EXECUTE 'GRANT CREATE ON SCHEMA ' || {_SCHEMA} || ' TO {ROLE}';
    ALTER FUNCTION {FUNCTION}(text) OWNER TO {ROLE};
    EXECUTE 'REVOKE CREATE ON SCHEMA ' || {_SCHEMA} || ' FROM {ROLE}';
END
$rf$
"""

_REVOKE_SCHEMA = f"""
DO $rf$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = '{ROLE}') THEN
        EXECUTE 'ALTER DEFAULT PRIVILEGES IN SCHEMA ' || {_SCHEMA} || ' REVOKE SELECT ON TABLES FROM {ROLE}';
        EXECUTE 'REVOKE SELECT ON ALL TABLES IN SCHEMA ' || {_SCHEMA} || ' FROM {ROLE}';
        EXECUTE 'REVOKE ALL ON SCHEMA ' || {_SCHEMA} || ' FROM {ROLE}';
    END IF;
END
$rf$
"""


def _is_postgresql() -> bool:
    # the context's dialect, not a connection: the same in offline (--sql) mode
    return op.get_context().dialect.name == "postgresql"


def upgrade() -> None:
    if not _is_postgresql():
        return
    op.execute(create_role_sql())
    op.execute(_grant_membership_sql())
    op.execute(_grant_schema_sql())
    op.execute(_CREATE_FUNCTION)
    op.execute(_OWN_FUNCTION)
    op.execute(f"REVOKE ALL ON FUNCTION {FUNCTION}(text) FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION {FUNCTION}(text) TO {ROLE}")


def downgrade() -> None:
    if not _is_postgresql():
        return
    op.execute(f"DROP FUNCTION IF EXISTS {FUNCTION}(text)")
    op.execute(_REVOKE_SCHEMA)
