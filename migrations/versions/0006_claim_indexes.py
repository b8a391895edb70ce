"""Partial indexes shaped for the claim: the SCHEDULED tasks only, in claim order.

Revision ID: 0006_claim_indexes
Revises: 0005_metric_outbox
Create Date: 2026-12-01

The claim takes the oldest SCHEDULED task of a worker (``worker_tasks``, by
``worker_id``, optionally of one experiment) or of an experiment
(``controller_tasks``).  With table statistics PostgreSQL judged a walk of the
primary key, filtering every finished task ahead of the queue, cheaper than the
``(…, status, task_id)`` indexes: a claim grew with the history.  These indexes
hold the claimable rows only, so they stay the size of the queue:

* ``ix_worker_tasks_claim`` on ``worker_tasks (worker_id, task_id) WHERE status = 'SCHEDULED'``
* ``ix_controller_tasks_claim`` on ``controller_tasks (experiment_id, task_id) WHERE status = 'SCHEDULED'``

Only indexes are added (no table rebuild on SQLite, nothing read from the
connection), so ``alembic upgrade … --sql`` works on both backends.  The
downgrade drops them; no row is touched either way.
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0006_claim_indexes"
down_revision: Union[str, None] = "0005_metric_outbox"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# Frozen here (not read from the package): a revision describes the schema it makes.
_CLAIMABLE = "status = 'SCHEDULED'"
_INDEXES = (
    ("ix_worker_tasks_claim", "worker_tasks", ["worker_id", "task_id"]),
    ("ix_controller_tasks_claim", "controller_tasks", ["experiment_id", "task_id"]),
)


def upgrade() -> None:
    for name, table, columns in _INDEXES:
        op.create_index(
            name, table, columns, sqlite_where=sa.text(_CLAIMABLE), postgresql_where=sa.text(_CLAIMABLE)
        )


def downgrade() -> None:
    for name, table, _columns in reversed(_INDEXES):
        op.drop_index(name, table_name=table)
