"""Name each recorded process by its boot and its start since boot, which no clock step moves.

Revision ID: 0008_process_identity
Revises: 0007_shm_host
Create Date: 2026-12-01

Whether a pid of this host is still the process a row recorded (a worker, a
task's claimer, a metric stream's claimer, an experiment's owner) was judged by
the OS start time of the process, in seconds since the epoch.  The OS computes it
from its boot time, which moves with every step of the wall clock (a virtual
machine resumed, NTP stepping) and by a whole second as NTP slews the clock: a
live worker could be judged gone, its tasks failed, while it trained.

One nullable ``String(64)`` column on each of those tables holds
``"<boot id>:<start in clock ticks since boot>"`` (Linux's ``boot_id`` and field 22
of ``/proc/<pid>/stat``), which names one process for the life of its host:

* ``experiments.owner_process_identity``
* ``workers.process_identity``
* ``worker_tasks.claim_process_identity``, ``controller_tasks.claim_process_identity``
* ``metric_streams.claim_process_identity``

Rows written before this revision (or off Linux) keep NULL and are judged by
their OS start time, as before.  As in 0003 and 0007, SQLite adds the columns
with a plain ``ALTER TABLE … ADD COLUMN`` (no table rebuild, so the views stay)
and nothing is read from the connection, so ``alembic upgrade … --sql`` works on
both backends.  The downgrade drops them (SQLite >= 3.35 drops a column in
place); rows are kept.
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0008_process_identity"
down_revision: Union[str, None] = "0007_shm_host"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# Frozen here (not read from the package): a revision describes the schema it makes.
COLUMNS = (
    ("experiments", "owner_process_identity"),
    ("workers", "process_identity"),
    ("worker_tasks", "claim_process_identity"),
    ("controller_tasks", "claim_process_identity"),
    ("metric_streams", "claim_process_identity"),
)


def upgrade() -> None:
    for table, column in COLUMNS:
        op.add_column(table, sa.Column(column, sa.String(length=64), nullable=True))


def downgrade() -> None:
    for table, column in reversed(COLUMNS):
        op.drop_column(table, column)
