"""A run's ended_by must match its status (a database CHECK).

Revision ID: 0002_run_ended_by_check
Revises: 0001_initial
Create Date: 2026-11-29

A terminal run (COMPLETED, FAILED, KILLED) is ended by exactly its status; a
live run (NEW, ONGOING) is not ended; a STOPPED run is either resumable
(ended_by NULL) or frozen at the end of its experiment (ended_by STOPPED).

SQLite rebuilds the ``runs`` table to add a CHECK (``helpers.alter_table``):
views that name ``runs`` would make the rename step fail, so they are dropped
first and re-created afterwards.  Offline (``--sql``) the table and the views
come from the frozen snapshots in ``migrations/helpers.py``.  Rows that break
the new CHECK are refused before anything is altered, with a MigrationError
naming them.
"""

from __future__ import annotations

from typing import Sequence, Union

from alembic import op

from rapidfire_state.migrations.helpers import (
    RUNS_ENDED_BY_MATCHES_STATUS,
    VIEWS_0001,
    alter_table,
    refuse_violating_rows,
    runs_table_0001,
    runs_table_0002,
)

revision: str = "0002_run_ended_by_check"
down_revision: Union[str, None] = "0001_initial"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

CONSTRAINT = "ended_by_matches_status"
CONDITION = RUNS_ENDED_BY_MATCHES_STATUS


def upgrade() -> None:
    refuse_violating_rows(
        revision=revision, table="runs", key="run_id", constraint=f"ck_runs_{CONSTRAINT}", condition=CONDITION
    )
    alter_table(
        "runs",
        lambda batch_op: batch_op.create_check_constraint(op.f(f"ck_runs_{CONSTRAINT}"), CONDITION),
        snapshot=runs_table_0001,
        views=VIEWS_0001,
    )


def downgrade() -> None:
    alter_table(
        "runs",
        lambda batch_op: batch_op.drop_constraint(op.f(f"ck_runs_{CONSTRAINT}"), type_="check"),
        snapshot=runs_table_0002,
        views=VIEWS_0001,
    )
