"""a task may start no sooner than a given moment

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("id_tasks", sa.Column("not_before", sa.DateTime(timezone=True), nullable=True))


def downgrade():
    op.drop_column("id_tasks", "not_before")
