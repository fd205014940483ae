"""deployment identity, and claims that hold until a deadline

- `deployment`: one row with a random id, made here once. Every idempotency key sent
  downstream starts with it, so a rebuilt database (which makes a new one) or a second
  deployment never sends a key that another sent.
- `assignments.claimed_until`: a claim holds until then even when its worker looks
  stuck; the claimer sets it to outlive the longest call its processor may make.
  Nullable with no default: adding it rewrites nothing, whatever the table's size.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "deployment",
        sa.Column("single", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("id", sa.Uuid(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.CheckConstraint("single", name=op.f("ck_deployment_single")),
        sa.PrimaryKeyConstraint("single", name=op.f("pk_deployment")),
    )
    op.execute("INSERT INTO deployment DEFAULT VALUES")
    op.add_column("assignments", sa.Column("claimed_until", sa.DateTime(timezone=True)))


def downgrade():
    # Claims fall back to CLAIM_TIMEOUT_SECONDS; the deployment's id is only a prefix.
    op.drop_column("assignments", "claimed_until")
    op.drop_table("deployment")
