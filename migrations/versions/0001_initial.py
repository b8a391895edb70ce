"""Initial schema: experiments, runs, tasks, workers, shm_objects, state_transitions, views.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-29

Timestamps are stored as naive UTC (``TIMESTAMP WITHOUT TIME ZONE``); every enum
column is a string with a named CHECK constraint.  The views are for people who
inspect the state with SQL.
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

from rapidfire_state.migrations.helpers import VIEWS_0001


revision: str = '0001_initial'
down_revision: Union[str, None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


#: views for people who inspect state with SQL (frozen in the helpers module,
#: where revisions that rebuild tables in offline mode read them too)
VIEWS = VIEWS_0001


def upgrade() -> None:
    op.create_table('experiments',
    sa.Column('experiment_id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('previous_status', sa.String(length=16), nullable=True),
    sa.Column('current_task', sa.String(length=32), nullable=False),
    sa.Column('experiments_path', sa.Text(), nullable=False),
    sa.Column('metric_experiment_id', sa.String(length=64), nullable=True),
    sa.Column('config_options', sa.JSON(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('owner_pid', sa.Integer(), nullable=True),
    sa.Column('owner_host', sa.String(length=255), nullable=True),
    sa.Column('created_at', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('updated_at', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=True),
    sa.Column('ended_at', sa.DateTime(), nullable=True),
    sa.CheckConstraint("current_task IN ('IDLE', 'CREATE_MODELS', 'IC_OPS', 'RUN_FIT')", name=op.f('ck_experiments_current_task')),
    sa.CheckConstraint("status IN ('NEW', 'RUNNING', 'COMPLETED', 'FAILED')", name=op.f('ck_experiments_status')),
    sa.PrimaryKeyConstraint('experiment_id', name=op.f('pk_experiments')),
    sa.UniqueConstraint('name', name=op.f('uq_experiments_name'))
    )
    with op.batch_alter_table('experiments', schema=None) as batch_op:
        batch_op.create_index('ix_experiments_status', ['status'], unique=False)
        batch_op.create_index('uq_experiments_one_running', ['status'], unique=True, sqlite_where=sa.text("status = 'RUNNING'"), postgresql_where=sa.text("status = 'RUNNING'"))

    op.create_table('state_transitions',
    sa.Column('transition_id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('entity', sa.String(length=32), nullable=False),
    sa.Column('entity_id', sa.Integer(), nullable=False),
    sa.Column('from_status', sa.String(length=16), nullable=True),
    sa.Column('to_status', sa.String(length=16), nullable=False),
    sa.Column('at', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.CheckConstraint("entity IN ('experiment', 'run', 'worker_task', 'controller_task')", name=op.f('ck_state_transitions_entity')),
    sa.PrimaryKeyConstraint('transition_id', name=op.f('pk_state_transitions'))
    )
    with op.batch_alter_table('state_transitions', schema=None) as batch_op:
        batch_op.create_index('ix_state_transitions_entity_entity_id', ['entity', 'entity_id', 'transition_id'], unique=False)

    op.create_table('runs',
    sa.Column('run_id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('experiment_id', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('previous_status', sa.String(length=16), nullable=True),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('ended_by', sa.String(length=16), nullable=True),
    sa.Column('metric_run_id', sa.String(length=64), nullable=True),
    sa.Column('config_leaf', sa.LargeBinary(), nullable=True),
    sa.Column('flattened_config', sa.JSON(), nullable=True),
    sa.Column('completed_steps', sa.Integer(), nullable=False),
    sa.Column('total_steps', sa.Integer(), nullable=False),
    sa.Column('num_chunks_visited', sa.Integer(), nullable=False),
    sa.Column('num_epochs_completed', sa.Integer(), nullable=False),
    sa.Column('chunk_offset', sa.Integer(), nullable=False),
    sa.Column('estimated_runtime', sa.Float(), nullable=True),
    sa.Column('required_workers', sa.Integer(), nullable=False),
    sa.Column('progress', sa.Float(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('cloned_from', sa.Integer(), nullable=True),
    sa.Column('warm_started_from', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=True),
    sa.Column('updated_at', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('ended_at', sa.DateTime(), nullable=True),
    sa.CheckConstraint("ended_by IS NULL OR ended_by IN ('COMPLETED', 'FAILED', 'KILLED', 'STOPPED')", name=op.f('ck_runs_ended_by')),
    sa.CheckConstraint("source IN ('USER', 'CLONE_MODIFY')", name=op.f('ck_runs_source')),
    sa.CheckConstraint("status IN ('NEW', 'ONGOING', 'COMPLETED', 'FAILED', 'STOPPED', 'KILLED')", name=op.f('ck_runs_status')),
    sa.CheckConstraint('completed_steps >= 0 AND total_steps >= 0', name=op.f('ck_runs_steps_non_negative')),
    sa.CheckConstraint('required_workers >= 1', name=op.f('ck_runs_required_workers_positive')),
    sa.ForeignKeyConstraint(['cloned_from'], ['runs.run_id'], name=op.f('fk_runs_cloned_from_runs')),
    sa.ForeignKeyConstraint(['experiment_id'], ['experiments.experiment_id'], name=op.f('fk_runs_experiment_id_experiments')),
    sa.ForeignKeyConstraint(['warm_started_from'], ['runs.run_id'], name=op.f('fk_runs_warm_started_from_runs')),
    sa.PrimaryKeyConstraint('run_id', name=op.f('pk_runs'))
    )
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.create_index('ix_runs_experiment_id_status', ['experiment_id', 'status'], unique=False)
        batch_op.create_index('ix_runs_status', ['status'], unique=False)

    op.create_table('workers',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('experiment_id', sa.Integer(), nullable=False),
    sa.Column('worker_id', sa.Integer(), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('process_started_at', sa.Float(), nullable=True),
    sa.Column('started_at', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('heartbeat_at', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('exited_at', sa.DateTime(), nullable=True),
    sa.Column('exit_code', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['experiment_id'], ['experiments.experiment_id'], name=op.f('fk_workers_experiment_id_experiments')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_workers'))
    )
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.create_index('ix_workers_exited_at', ['exited_at'], unique=False)
        batch_op.create_index('uq_workers_experiment_id_worker_id', ['experiment_id', 'worker_id'], unique=True)

    op.create_table('controller_tasks',
    sa.Column('task_id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('experiment_id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=True),
    sa.Column('task_type', sa.String(length=32), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('previous_status', sa.String(length=16), nullable=True),
    sa.Column('config_leaf', sa.LargeBinary(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=True),
    sa.Column('ended_at', sa.DateTime(), nullable=True),
    sa.CheckConstraint("status IN ('PENDING', 'SCHEDULED', 'IN_PROGRESS', 'COMPLETED', 'FAILED')", name=op.f('ck_controller_tasks_status')),
    sa.CheckConstraint("task_type IN ('RUN_FIT', 'CREATE_MODELS', 'IC_DELETE', 'IC_STOP', 'IC_RESUME', 'IC_CLONE_MODIFY', 'IC_CLONE_MODIFY_WARM', 'EPOCH_BOUNDARY', 'GET_RUN_METRICS')", name=op.f('ck_controller_tasks_task_type')),
    sa.ForeignKeyConstraint(['experiment_id'], ['experiments.experiment_id'], name=op.f('fk_controller_tasks_experiment_id_experiments')),
    sa.ForeignKeyConstraint(['run_id'], ['runs.run_id'], name=op.f('fk_controller_tasks_run_id_runs')),
    sa.PrimaryKeyConstraint('task_id', name=op.f('pk_controller_tasks'))
    )
    with op.batch_alter_table('controller_tasks', schema=None) as batch_op:
        batch_op.create_index('ix_controller_tasks_experiment_id_status_task_id', ['experiment_id', 'status', 'task_id'], unique=False)
        batch_op.create_index('ix_controller_tasks_run_id', ['run_id'], unique=False)
        batch_op.create_index('ix_controller_tasks_status_task_id', ['status', 'task_id'], unique=False)

    op.create_table('shm_objects',
    sa.Column('shm_object_id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('key', sa.String(length=512), nullable=False),
    sa.Column('experiment_id', sa.Integer(), nullable=True),
    sa.Column('run_id', sa.Integer(), nullable=True),
    sa.Column('chunk_id', sa.Integer(), nullable=True),
    sa.Column('object_type', sa.String(length=16), nullable=False),
    sa.Column('location', sa.String(length=8), nullable=False),
    sa.Column('disk_path', sa.Text(), nullable=True),
    sa.Column('num_bytes', sa.BigInteger(), nullable=False),
    sa.Column('tensor_count', sa.Integer(), nullable=False),
    sa.Column('manager_name', sa.String(length=255), nullable=True),
    sa.Column('created_at', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('updated_at', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.CheckConstraint("(location = 'DISK' AND disk_path IS NOT NULL) OR (location = 'SHM' AND disk_path IS NULL)", name=op.f('ck_shm_objects_disk_path_matches_location')),
    sa.CheckConstraint("location IN ('SHM', 'DISK')", name=op.f('ck_shm_objects_location')),
    sa.CheckConstraint("object_type IN ('MODEL', 'CHECKPOINT')", name=op.f('ck_shm_objects_object_type')),
    sa.ForeignKeyConstraint(['experiment_id'], ['experiments.experiment_id'], name=op.f('fk_shm_objects_experiment_id_experiments')),
    sa.ForeignKeyConstraint(['run_id'], ['runs.run_id'], name=op.f('fk_shm_objects_run_id_runs')),
    sa.PrimaryKeyConstraint('shm_object_id', name=op.f('pk_shm_objects')),
    sa.UniqueConstraint('key', name=op.f('uq_shm_objects_key'))
    )
    with op.batch_alter_table('shm_objects', schema=None) as batch_op:
        batch_op.create_index('ix_shm_objects_experiment_id', ['experiment_id'], unique=False)
        batch_op.create_index('ix_shm_objects_run_id', ['run_id'], unique=False)

    op.create_table('worker_tasks',
    sa.Column('task_id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('experiment_id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=True),
    sa.Column('worker_id', sa.Integer(), nullable=False),
    sa.Column('chunk_id', sa.Integer(), nullable=True),
    sa.Column('task_type', sa.String(length=32), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('previous_status', sa.String(length=16), nullable=True),
    sa.Column('config_options', sa.JSON(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=True),
    sa.Column('ended_at', sa.DateTime(), nullable=True),
    sa.CheckConstraint("status IN ('PENDING', 'SCHEDULED', 'IN_PROGRESS', 'COMPLETED', 'FAILED')", name=op.f('ck_worker_tasks_status')),
    sa.CheckConstraint("task_type IN ('CREATE_MODELS', 'TRAIN_VAL')", name=op.f('ck_worker_tasks_task_type')),
    sa.ForeignKeyConstraint(['experiment_id'], ['experiments.experiment_id'], name=op.f('fk_worker_tasks_experiment_id_experiments')),
    sa.ForeignKeyConstraint(['run_id'], ['runs.run_id'], name=op.f('fk_worker_tasks_run_id_runs')),
    sa.PrimaryKeyConstraint('task_id', name=op.f('pk_worker_tasks'))
    )
    with op.batch_alter_table('worker_tasks', schema=None) as batch_op:
        batch_op.create_index('ix_worker_tasks_experiment_id_status', ['experiment_id', 'status'], unique=False)
        batch_op.create_index('ix_worker_tasks_run_id', ['run_id'], unique=False)
        batch_op.create_index('ix_worker_tasks_worker_id_status_task_id', ['worker_id', 'status', 'task_id'], unique=False)

    for name, body in VIEWS.items():
        op.execute(f"CREATE VIEW {name} AS {body}")


def downgrade() -> None:
    for name in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {name}")
    with op.batch_alter_table('worker_tasks', schema=None) as batch_op:
        batch_op.drop_index('ix_worker_tasks_worker_id_status_task_id')
        batch_op.drop_index('ix_worker_tasks_run_id')
        batch_op.drop_index('ix_worker_tasks_experiment_id_status')

    op.drop_table('worker_tasks')
    with op.batch_alter_table('shm_objects', schema=None) as batch_op:
        batch_op.drop_index('ix_shm_objects_run_id')
        batch_op.drop_index('ix_shm_objects_experiment_id')

    op.drop_table('shm_objects')
    with op.batch_alter_table('controller_tasks', schema=None) as batch_op:
        batch_op.drop_index('ix_controller_tasks_status_task_id')
        batch_op.drop_index('ix_controller_tasks_run_id')
        batch_op.drop_index('ix_controller_tasks_experiment_id_status_task_id')

    op.drop_table('controller_tasks')
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.drop_index('uq_workers_experiment_id_worker_id')
        batch_op.drop_index('ix_workers_exited_at')

    op.drop_table('workers')
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_index('ix_runs_status')
        batch_op.drop_index('ix_runs_experiment_id_status')

    op.drop_table('runs')
    with op.batch_alter_table('state_transitions', schema=None) as batch_op:
        batch_op.drop_index('ix_state_transitions_entity_entity_id')

    op.drop_table('state_transitions')
    with op.batch_alter_table('experiments', schema=None) as batch_op:
        batch_op.drop_index('uq_experiments_one_running', sqlite_where=sa.text("status = 'RUNNING'"), postgresql_where=sa.text("status = 'RUNNING'"))
        batch_op.drop_index('ix_experiments_status')

    op.drop_table('experiments')
