"""users, ID tasks and their IDs

Revision ID: 0001
Revises: 

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('id_tasks',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False, start=1), nullable=False),
    sa.Column('task_name', sa.String(length=255), nullable=False),
    sa.Column('overflow', sa.String(length=8), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('payload', sa.Text(), nullable=True),
    sa.Column('total', sa.Integer(), nullable=False),
    sa.Column('duplicates', sa.Integer(), nullable=False),
    sa.Column('planned', sa.Integer(), nullable=False),
    sa.Column('done', sa.Integer(), nullable=False),
    sa.Column('failed', sa.Integer(), nullable=False),
    sa.Column('first_slot', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_slot', sa.DateTime(timezone=True), nullable=True),
    sa.Column('date_created', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('date_updated', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("overflow IN ('spread', 'defer')", name=op.f('ck_id_tasks_overflow')),
    sa.CheckConstraint("status IN ('received', 'planning', 'scheduled', 'running', 'done', 'failed', 'cancelled')", name=op.f('ck_id_tasks_status')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_id_tasks'))
    )
    with op.batch_alter_table('id_tasks', schema=None) as batch_op:
        batch_op.create_index('ix_id_tasks_newest', ['date_created', 'id'], unique=False)
        batch_op.create_index('ix_id_tasks_status', ['status'], unique=False)

    op.create_table('users',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False, start=1), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=True),
    sa.Column('date_created', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('last_processed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('times_processed', sa.Integer(), server_default='0', nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_users'))
    )
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.create_index('ix_users_newest', ['date_created', 'id'], unique=False)

    op.create_table('task_ids',
    sa.Column('task_id', sa.BigInteger(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['task_id'], ['id_tasks.id'], name=op.f('fk_task_ids_task_id_id_tasks'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('task_id', 'position', name=op.f('pk_task_ids')),
    sa.UniqueConstraint('task_id', 'user_id', name=op.f('uq_task_ids_task_id_user_id'))
    )


def downgrade():
    op.drop_table('task_ids')
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_index('ix_users_newest')

    op.drop_table('users')
    with op.batch_alter_table('id_tasks', schema=None) as batch_op:
        batch_op.drop_index('ix_id_tasks_status')
        batch_op.drop_index('ix_id_tasks_newest')

    op.drop_table('id_tasks')
