"""Which host holds each shared-memory object, and its disk copy for the other hosts.

Revision ID: 0007_shm_host
Revises: 0006_claim_indexes
Create Date: 2026-12-01

A payload in shared memory exists only on the host that stored it.  Two
nullable columns on ``shm_objects``:

* ``host`` (String(255)): the host whose registry (or disk) holds the payload.
  Rows written before this revision keep NULL, which readers take as "this
  host" (every process of such a database ran on one host).
* ``copy_path`` (Text): a disk copy of the payload under a directory every host
  can read (a network file system), written by a cross-host placement or
  ``SharedMemoryManager.copy_to_shared``; NULL when there is none.

As in 0003, SQLite adds them with a plain ``ALTER TABLE … ADD COLUMN`` (no table
rebuild, so the views stay) and nothing is read from the connection, so
``alembic upgrade … --sql`` works on both backends.  The downgrade drops both
columns (SQLite >= 3.35 drops a column in place); rows are kept.
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0007_shm_host"
down_revision: Union[str, None] = "0006_claim_indexes"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def _columns() -> list[sa.Column]:
    # Frozen here (not read from the package): a revision describes the schema it makes.
    return [
        sa.Column("host", sa.String(length=255), nullable=True),
        sa.Column("copy_path", sa.Text(), nullable=True),
    ]


def upgrade() -> None:
    for column in _columns():
        op.add_column("shm_objects", column)


def downgrade() -> None:
    for column in reversed(_columns()):
        op.drop_column("shm_objects", column.name)
