"""arena models, reward scores, arena task kind

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 07:51:20.613950
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel  # noqa: F401
from alembic import op


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

# Assignments may now reserve an arena battle (task 'arena'). The enum is a plain CHECK constraint
# (native_enum=False), which autogenerate does not compare: it is replaced here by hand.
_TASK_CHECK = 'ck_assignments_task_kind'
_TASKS_BEFORE = "task IN ('pairwise', 'segment')"
_TASKS_AFTER = "task IN ('pairwise', 'segment', 'arena')"


def upgrade() -> None:
    op.create_table('arena_models',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('project_id', sa.Integer(), nullable=False),
    sa.Column('checkpoint_id', sa.Integer(), nullable=False),
    sa.Column('is_anchor', sa.Boolean(), nullable=False),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('source', sa.Enum('auto', 'manual', name='arena_source', native_enum=False, create_constraint=True, length=24), nullable=False),
    sa.Column('added_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('added_by', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['added_by'], ['users.id'], name=op.f('fk_arena_models_added_by_users')),
    sa.ForeignKeyConstraint(['checkpoint_id'], ['checkpoints.id'], name=op.f('fk_arena_models_checkpoint_id_checkpoints')),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_arena_models_project_id_projects')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_arena_models')),
    sa.UniqueConstraint('project_id', 'checkpoint_id', name=op.f('uq_arena_models_project_id_checkpoint_id'))
    )
    with op.batch_alter_table('arena_models', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_arena_models_project_id'), ['project_id'], unique=False)

    op.create_table('reward_scores',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('checkpoint_id', sa.Integer(), nullable=False),
    sa.Column('generation_id', sa.Integer(), nullable=False),
    sa.Column('score', sa.Float(), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['checkpoint_id'], ['checkpoints.id'], name=op.f('fk_reward_scores_checkpoint_id_checkpoints')),
    sa.ForeignKeyConstraint(['generation_id'], ['generations.id'], name=op.f('fk_reward_scores_generation_id_generations')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_reward_scores')),
    sa.UniqueConstraint('checkpoint_id', 'generation_id', name=op.f('uq_reward_scores_checkpoint_id_generation_id'))
    )
    with op.batch_alter_table('reward_scores', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_reward_scores_generation_id'), ['generation_id'], unique=False)

    with op.batch_alter_table('assignments', schema=None) as batch_op:
        batch_op.drop_constraint(op.f(_TASK_CHECK), type_='check')
        batch_op.create_check_constraint(op.f(_TASK_CHECK), _TASKS_AFTER)


def downgrade() -> None:
    # Arena reservations cannot exist under the old CHECK: their votes keep no assignment.
    op.execute(
        "UPDATE pairwise_votes SET assignment_id = NULL "
        "WHERE assignment_id IN (SELECT id FROM assignments WHERE task = 'arena')"
    )
    op.execute("DELETE FROM assignments WHERE task = 'arena'")
    with op.batch_alter_table('assignments', schema=None) as batch_op:
        batch_op.drop_constraint(op.f(_TASK_CHECK), type_='check')
        batch_op.create_check_constraint(op.f(_TASK_CHECK), _TASKS_BEFORE)

    with op.batch_alter_table('reward_scores', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_reward_scores_generation_id'))

    op.drop_table('reward_scores')
    with op.batch_alter_table('arena_models', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_arena_models_project_id'))

    op.drop_table('arena_models')
