"""A partial index of the open worker tasks, for the open-tasks listing across experiments.

Revision ID: 0008_open_tasks_index
Revises: 0007_shm_host
Create Date: 2026-12-01

``list_tasks("worker", statuses=[PENDING, SCHEDULED, IN_PROGRESS])`` with no
experiment filters by status alone; no index of ``worker_tasks`` leads with the
status, so both backends scanned the whole history.  This index holds the open
rows only, so it stays the size of the queue:

* ``ix_worker_tasks_open`` on ``worker_tasks (task_id) WHERE status IN ('IN_PROGRESS', 'PENDING', 'SCHEDULED')``

The condition is written as the store renders the listing (the statuses sorted,
as constants): SQLite uses a partial index only for a query whose WHERE contains
the index's own terms.  A full ``(status, task_id)`` index served PostgreSQL
only; SQLite's statistics still preferred the scan.

Only an index is added (no table rebuild, nothing read from the connection), so
``alembic upgrade … --sql`` works on both backends; the downgrade drops it.
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0008_open_tasks_index"
down_revision: Union[str, None] = "0007_shm_host"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# Frozen here (not read from the package): a revision describes the schema it makes.
_OPEN = "status IN ('IN_PROGRESS', 'PENDING', 'SCHEDULED')"


def upgrade() -> None:
    op.create_index(
        "ix_worker_tasks_open", "worker_tasks", ["task_id"],
        sqlite_where=sa.text(_OPEN), postgresql_where=sa.text(_OPEN),
    )


def downgrade() -> None:
    op.drop_index("ix_worker_tasks_open", table_name="worker_tasks")
