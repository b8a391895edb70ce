"""The metric outbox: what processes log for MLflow, kept until it is delivered.

Revision ID: 0005_metric_outbox
Revises: 0004_sql_reader_role
Create Date: 2026-12-01

Two new tables, nothing else changes:

* ``metric_streams``: one row per MLflow run of one tracking store (``tracking_uri``,
  ``metric_run_id``, unique), with the RapidFire run and experiment it tracks when
  known, and the claim of whoever has a batch of it in flight.
* ``metric_outbox``: the metric points, parameters, tags and run statuses, in
  ``outbox_id`` order, each pending until ``delivered_at`` or ``failed_at`` is set;
  ``batch_token`` names the batch a row was last sent in.  A partial index holds
  the pending rows only, so finding work costs the backlog, not the history.

On PostgreSQL the reader role of 0004 gets SELECT on both tables (its default
privileges cover only tables made by the role that ran 0004).

The downgrade drops both tables, and refuses (online) while any row is still
pending: those points have reached no MLflow store yet, and dropping them would
lose them without a word.  Flush them first (``MLflowManager.flush()``), or mark
them failed by hand if they are to be given up.  Offline (``--sql``) there are no
rows to look at, so the drops are emitted as they are.
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

from rapidfire_state.exceptions import MigrationError

revision: str = "0005_metric_outbox"
down_revision: Union[str, None] = "0004_sql_reader_role"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# Frozen here (not read from the package): a revision describes the schema it makes.
_PENDING = "delivered_at IS NULL AND failed_at IS NULL"
_KINDS = "kind IN ('METRIC', 'PARAM', 'TAG', 'STATUS')"
_READER_ROLE = "rapidfire_reader"


def _now() -> sa.TextClause:
    return sa.text("CURRENT_TIMESTAMP")


def upgrade() -> None:
    op.create_table(
        "metric_streams",
        sa.Column("stream_id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tracking_uri", sa.Text(), nullable=False),
        sa.Column("metric_run_id", sa.String(length=64), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.Column("experiment_id", sa.Integer(), nullable=True),
        sa.Column("claim_token", sa.String(length=32), nullable=True),
        sa.Column("claim_pid", sa.Integer(), nullable=True),
        sa.Column("claim_host", sa.String(length=255), nullable=True),
        sa.Column("claim_process_started_at", sa.Float(), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=False), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=False), server_default=_now(), nullable=False),
        sa.ForeignKeyConstraint(
            ["experiment_id"], ["experiments.experiment_id"], name="fk_metric_streams_experiment_id_experiments"
        ),
        sa.ForeignKeyConstraint(["run_id"], ["runs.run_id"], name="fk_metric_streams_run_id_runs"),
        sa.PrimaryKeyConstraint("stream_id", name="pk_metric_streams"),
    )
    op.create_index(
        "uq_metric_streams_tracking_uri_metric_run_id", "metric_streams", ["tracking_uri", "metric_run_id"],
        unique=True,
    )
    op.create_index("ix_metric_streams_run_id", "metric_streams", ["run_id"])
    op.create_index("ix_metric_streams_experiment_id", "metric_streams", ["experiment_id"])

    op.create_table(
        "metric_outbox",
        sa.Column("outbox_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("stream_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("key", sa.String(length=250), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("text_value", sa.Text(), nullable=True),
        sa.Column("step", sa.BigInteger(), nullable=True),
        sa.Column("timestamp_ms", sa.BigInteger(), nullable=False),
        sa.Column("batch_token", sa.String(length=32), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=False), nullable=True),
        sa.Column("failed_at", sa.DateTime(timezone=False), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=False), server_default=_now(), nullable=False),
        sa.CheckConstraint(_KINDS, name=op.f("ck_metric_outbox_kind")),
        sa.ForeignKeyConstraint(["stream_id"], ["metric_streams.stream_id"], name="fk_metric_outbox_stream_id_metric_streams"),
        sa.PrimaryKeyConstraint("outbox_id", name="pk_metric_outbox"),
    )
    op.create_index("ix_metric_outbox_stream_id_key", "metric_outbox", ["stream_id", "key", "outbox_id"])
    op.create_index(
        "ix_metric_outbox_pending", "metric_outbox", ["stream_id", "outbox_id"],
        sqlite_where=sa.text(_PENDING), postgresql_where=sa.text(_PENDING),
    )
    if op.get_context().dialect.name == "postgresql":
        # The role exists (0004 made it); a database migrated by another role needs the grant.
        op.execute(f"GRANT SELECT ON metric_streams, metric_outbox TO {_READER_ROLE}")


def downgrade() -> None:
    context = op.get_context()
    if not context.as_sql:
        pending = op.get_bind().execute(sa.text(f"SELECT count(*) FROM metric_outbox WHERE {_PENDING}")).scalar()
        if pending:
            raise MigrationError(
                f"metric_outbox holds {pending} metric row(s) not yet delivered to MLflow; the downgrade "
                "would drop them. Deliver them first (MLflowManager(...).flush()), or set failed_at on the "
                "rows to give them up, then downgrade again. Nothing was changed.",
                table="metric_outbox", row_count=int(pending), revision=revision,
            )
    op.drop_index("ix_metric_outbox_pending", table_name="metric_outbox")
    op.drop_index("ix_metric_outbox_stream_id_key", table_name="metric_outbox")
    op.drop_table("metric_outbox")
    op.drop_index("ix_metric_streams_experiment_id", table_name="metric_streams")
    op.drop_index("ix_metric_streams_run_id", table_name="metric_streams")
    op.drop_index("uq_metric_streams_tracking_uri_metric_run_id", table_name="metric_streams")
    op.drop_table("metric_streams")
