"""limits.held_since: when a process found a limit's destination no longer allowed

A limit written earlier whose URL (or secret) the deployment's settings no longer allow
is held, as a paused limit is (service/limits/held.py); the column records that a process
found it so, so that the first process that finds it allowed again plans its overdue IDs
again from then, as a resume does. Nullable with no default: nothing is rewritten, and
the table's lock is held for a moment.

The downgrade drops the column: below 0015 no limit is held, and the marks are rebuilt
from the settings by the next process that finds a limit held.

Revision ID: 0015
Revises: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("limits", sa.Column("held_since", sa.DateTime(timezone=True), nullable=True))


def downgrade():
    op.drop_column("limits", "held_since")
