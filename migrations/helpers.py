"""What revisions share: frozen schema snapshots and two operations.

Importable as ``rapidfire_state.migrations.helpers`` (the repository checkout
is installed editable; a wheel installs it as part of the package).  It must
not live in ``versions/``: Alembic loads every module there as a revision.

Frozen snapshots.  ``alembic upgrade --sql`` (offline mode) has no database to
read, so whatever a revision would otherwise read from the database — the SQL
of the views it must drop and re-create, the definition of a table SQLite
rebuilds — comes from here.  A snapshot describes the schema *at one
revision* and is never edited afterwards; a revision that changes a view or a
rebuilt table adds a new snapshot (``VIEWS_0003 = {**VIEWS_0001, ...}``,
``runs_table_0003``) and leaves the old ones alone, because older revisions
still use them.  ``tests/test_db_migrations.py`` checks each snapshot against
the schema the online migration actually produces.

Operations.

* :func:`alter_table` changes a table on both backends and in both modes:
  plain ``ALTER TABLE`` on PostgreSQL; on SQLite the table copy of Alembic's
  batch mode, with the views dropped around it (SQLite refuses to rename a
  table while a view names it).  Online, the table is reflected and every view
  in the database (a user's own too) is dropped and re-created with its stored
  SQL; offline, the given snapshot and views are used.
* :func:`refuse_violating_rows` runs before a revision adds a CHECK: rows that
  the condition rejects raise :class:`~rapidfire_state.exceptions.MigrationError`
  naming the table, the constraint and the row ids, before anything is
  altered (the migration's transaction is then rolled back whole).  Offline it
  emits nothing: there are no rows to look at.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import sqlalchemy as sa
from alembic import op

from rapidfire_state.exceptions import MigrationError

#: row ids named in a MigrationError's message (all of them are in ``row_ids``
#: up to MAX_ROW_IDS)
SHOWN_ROW_IDS = 20
MAX_ROW_IDS = 1000


# --- frozen snapshots -----------------------------------------------------------------


#: the views of revision 0001 (unchanged by 0002): plain SQL both backends accept
VIEWS_0001: Mapping[str, str] = {
    "run_overview": """
        SELECT r.run_id, e.name AS experiment_name, r.experiment_id, r.status, r.source,
               r.ended_by, r.completed_steps, r.total_steps, r.progress,
               r.num_chunks_visited, r.num_epochs_completed, r.metric_run_id,
               r.cloned_from, r.warm_started_from, r.error,
               r.created_at, r.started_at, r.ended_at
        FROM runs r JOIN experiments e ON e.experiment_id = r.experiment_id
    """,
    "active_tasks": """
        SELECT 'worker' AS kind, t.task_id, t.experiment_id, t.run_id, t.worker_id,
               t.chunk_id, t.task_type, t.status, t.created_at, t.started_at
        FROM worker_tasks t WHERE t.status IN ('PENDING', 'SCHEDULED', 'IN_PROGRESS')
        UNION ALL
        SELECT 'controller' AS kind, c.task_id, c.experiment_id, c.run_id, NULL AS worker_id,
               NULL AS chunk_id, c.task_type, c.status, c.created_at, c.started_at
        FROM controller_tasks c WHERE c.status IN ('PENDING', 'SCHEDULED', 'IN_PROGRESS')
    """,
    "shm_usage": """
        SELECT s.experiment_id, s.location, s.object_type, COUNT(*) AS objects,
               SUM(s.num_bytes) AS total_bytes, SUM(s.tensor_count) AS tensors
        FROM shm_objects s GROUP BY s.experiment_id, s.location, s.object_type
    """,
}

#: ``runs.ck_runs_ended_by_matches_status``, added by revision 0002
RUNS_ENDED_BY_MATCHES_STATUS = (
    "(status IN ('NEW', 'ONGOING') AND ended_by IS NULL)"
    " OR (status = 'STOPPED' AND (ended_by IS NULL OR ended_by = 'STOPPED'))"
    " OR (status IN ('COMPLETED', 'FAILED', 'KILLED') AND ended_by IS NOT NULL AND ended_by = status)"
)


def runs_table_0001(metadata: sa.MetaData) -> sa.Table:
    """``runs`` exactly as revision 0001 creates it (columns, constraints, indexes)."""
    return sa.Table(
        "runs",
        metadata,
        sa.Column("run_id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("experiment_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("previous_status", sa.String(length=16), nullable=True),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("ended_by", sa.String(length=16), nullable=True),
        sa.Column("metric_run_id", sa.String(length=64), nullable=True),
        sa.Column("config_leaf", sa.LargeBinary(), nullable=True),
        sa.Column("flattened_config", sa.JSON(), nullable=True),
        sa.Column("completed_steps", sa.Integer(), nullable=False),
        sa.Column("total_steps", sa.Integer(), nullable=False),
        sa.Column("num_chunks_visited", sa.Integer(), nullable=False),
        sa.Column("num_epochs_completed", sa.Integer(), nullable=False),
        sa.Column("chunk_offset", sa.Integer(), nullable=False),
        sa.Column("estimated_runtime", sa.Float(), nullable=True),
        sa.Column("required_workers", sa.Integer(), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("cloned_from", sa.Integer(), nullable=True),
        sa.Column("warm_started_from", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(), server_default=sa.text("(CURRENT_TIMESTAMP)"), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("updated_at", sa.DateTime(), server_default=sa.text("(CURRENT_TIMESTAMP)"), nullable=False),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
        sa.CheckConstraint(
            "ended_by IS NULL OR ended_by IN ('COMPLETED', 'FAILED', 'KILLED', 'STOPPED')", name="ck_runs_ended_by"
        ),
        sa.CheckConstraint("source IN ('USER', 'CLONE_MODIFY')", name="ck_runs_source"),
        sa.CheckConstraint(
            "status IN ('NEW', 'ONGOING', 'COMPLETED', 'FAILED', 'STOPPED', 'KILLED')", name="ck_runs_status"
        ),
        sa.CheckConstraint("completed_steps >= 0 AND total_steps >= 0", name="ck_runs_steps_non_negative"),
        sa.CheckConstraint("required_workers >= 1", name="ck_runs_required_workers_positive"),
        sa.ForeignKeyConstraint(["cloned_from"], ["runs.run_id"], name="fk_runs_cloned_from_runs"),
        sa.ForeignKeyConstraint(
            ["experiment_id"], ["experiments.experiment_id"], name="fk_runs_experiment_id_experiments"
        ),
        sa.ForeignKeyConstraint(["warm_started_from"], ["runs.run_id"], name="fk_runs_warm_started_from_runs"),
        sa.PrimaryKeyConstraint("run_id", name="pk_runs"),
        sa.Index("ix_runs_experiment_id_status", "experiment_id", "status"),
        sa.Index("ix_runs_status", "status"),
    )


def runs_table_0002(metadata: sa.MetaData) -> sa.Table:
    """``runs`` at revision 0002: 0001's table plus ``ck_runs_ended_by_matches_status``."""
    table = runs_table_0001(metadata)
    table.append_constraint(
        sa.CheckConstraint(RUNS_ENDED_BY_MATCHES_STATUS, name="ck_runs_ended_by_matches_status")
    )
    return table


# --- operations -----------------------------------------------------------------------


def is_offline() -> bool:
    """True under ``alembic ... --sql``: SQL is written out, no database is connected."""
    return bool(op.get_context().as_sql)


def alter_table(
    table_name: str,
    change: Callable[[object], None],
    *,
    snapshot: Callable[[sa.MetaData], sa.Table],
    views: Mapping[str, str],
) -> None:
    """Apply ``change(batch_op)`` to ``table_name`` (see the module docstring).

    ``snapshot`` builds the table as it is *before* this change and ``views``
    are the views at that revision; both are only read in offline mode on
    SQLite, where there is no database to reflect them from.
    """
    context = op.get_context()
    if context.dialect.name != "sqlite":
        # no recreate: batch mode emits plain ALTER TABLE statements here
        with op.batch_alter_table(table_name) as batch_op:
            change(batch_op)
        return
    copy_from: Optional[sa.Table] = None
    if context.as_sql:
        view_sql = [(name, f"CREATE VIEW {name} AS {body}") for name, body in views.items()]
        copy_from = snapshot(sa.MetaData())
    else:
        view_sql = list(
            op.get_bind().exec_driver_sql("SELECT name, sql FROM sqlite_master WHERE type = 'view'").fetchall()
        )
    for name, _ in view_sql:
        op.execute(f"DROP VIEW {name}")
    with op.batch_alter_table(table_name, recreate="always", copy_from=copy_from) as batch_op:
        change(batch_op)
    for _, sql in view_sql:
        op.execute(sql)


def refuse_violating_rows(*, revision: str, table: str, key: str, constraint: str, condition: str) -> None:
    """Raise MigrationError when rows of ``table`` fail ``condition`` (the CHECK ``constraint``).

    A CHECK rejects a row only when its condition is false (NULL passes), which
    is exactly what ``WHERE NOT (condition)`` selects.
    """
    if is_offline():
        return
    bind = op.get_bind()
    violating = sa.text(f"SELECT {key} FROM {table} WHERE NOT ({condition}) ORDER BY {key} LIMIT {MAX_ROW_IDS}")
    count = sa.text(f"SELECT COUNT(*) FROM {table} WHERE NOT ({condition})")
    row_ids = tuple(row[0] for row in bind.execute(violating))
    if not row_ids:
        return
    total = int(bind.execute(count).scalar() or 0)
    shown = ", ".join(str(r) for r in row_ids[:SHOWN_ROW_IDS])
    more = f" and {total - min(total, SHOWN_ROW_IDS)} more" if total > SHOWN_ROW_IDS else ""
    raise MigrationError(
        f"revision {revision} adds CHECK constraint {constraint} to table {table}, but {total} row(s) "
        f"break it: {key} {shown}{more}. The migration was not applied; correct or delete those rows "
        f"(SELECT * FROM {table} WHERE NOT ({condition})) and upgrade again",
        table=table,
        constraint=constraint,
        row_ids=row_ids,
        revision=revision,
        row_count=total,
    )
