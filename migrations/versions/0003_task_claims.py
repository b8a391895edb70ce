"""Record who claimed each task: claim token, pid, host and process start time.

Revision ID: 0003_task_claims
Revises: 0002_run_ended_by_check
Create Date: 2026-12-01

A task moved SCHEDULED -> IN_PROGRESS carries its claim: a random token per
claim and the claiming process (pid, host, OS start time), so that a task left
IN_PROGRESS by a process that died is found by its own columns even after its
worker id was registered again by a new process.

Four nullable columns on ``worker_tasks`` and ``controller_tasks``: SQLite adds
them with a plain ``ALTER TABLE … ADD COLUMN`` (no table rebuild, so the views
stay), and nothing is read from the connection, so ``alembic upgrade head
--sql`` works on both backends.  Tasks claimed before this revision keep NULL
claim columns; they are judged by their worker row, as before.  The downgrade
drops the columns (SQLite >= 3.35 drops a column in place).
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0003_task_claims"
down_revision: Union[str, None] = "0002_run_ended_by_check"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

TABLES = ("worker_tasks", "controller_tasks")


def _columns() -> list[sa.Column]:
    return [
        sa.Column("claim_token", sa.String(length=32), nullable=True),
        sa.Column("claim_pid", sa.Integer(), nullable=True),
        sa.Column("claim_host", sa.String(length=255), nullable=True),
        sa.Column("claim_process_started_at", sa.Float(), nullable=True),
    ]


def upgrade() -> None:
    for table in TABLES:
        for column in _columns():
            op.add_column(table, column)


def downgrade() -> None:
    for table in TABLES:
        for column in reversed(_columns()):
            op.drop_column(table, column.name)
