"""A run's ended_by must match its status (a database CHECK).

Revision ID: 0002_run_ended_by_check
Revises: 0001_initial
Create Date: 2026-11-29

A terminal run (COMPLETED, FAILED, KILLED) is ended by exactly its status; a
live run (NEW, ONGOING) is not ended; a STOPPED run is either resumable
(ended_by NULL) or frozen at the end of its experiment (ended_by STOPPED).

SQLite rebuilds the ``runs`` table to add a CHECK; views that name ``runs``
would make the rename step fail, so they are dropped first and re-created with
their stored SQL.
"""

from __future__ import annotations

from typing import Sequence, Union

from alembic import op

revision: str = "0002_run_ended_by_check"
down_revision: Union[str, None] = "0001_initial"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

CONSTRAINT = "ended_by_matches_status"
CONDITION = (
    "(status IN ('NEW', 'ONGOING') AND ended_by IS NULL)"
    " OR (status = 'STOPPED' AND (ended_by IS NULL OR ended_by = 'STOPPED'))"
    " OR (status IN ('COMPLETED', 'FAILED', 'KILLED') AND ended_by IS NOT NULL AND ended_by = status)"
)


def _alter_runs(change) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        change(op)
        return
    views = bind.exec_driver_sql("SELECT name, sql FROM sqlite_master WHERE type = 'view'").fetchall()
    for name, _ in views:
        op.execute(f"DROP VIEW {name}")
    with op.batch_alter_table("runs", recreate="always") as batch_op:
        change(batch_op)
    for _, sql in views:
        op.execute(sql)


def upgrade() -> None:
    def add(target) -> None:
        if target is op:
            op.create_check_constraint(op.f(f"ck_runs_{CONSTRAINT}"), "runs", CONDITION)
        else:
            target.create_check_constraint(op.f(f"ck_runs_{CONSTRAINT}"), CONDITION)

    _alter_runs(add)


def downgrade() -> None:
    def drop(target) -> None:
        if target is op:
            op.drop_constraint(op.f(f"ck_runs_{CONSTRAINT}"), "runs", type_="check")
        else:
            target.drop_constraint(op.f(f"ck_runs_{CONSTRAINT}"), type_="check")

    _alter_runs(drop)
