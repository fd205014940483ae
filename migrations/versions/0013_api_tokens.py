"""api_tokens: named tokens with a scope, stored as their SHA-256 digests

A new, empty table: nothing else is read, rewritten or locked. Once it holds a token,
every request but the public ones needs a token (service/web/auth.py).

The downgrade refuses, changing nothing, while any token exists: below 0013 a
deployment knows only API_TOKEN, so its clients' tokens would be lost, and a deployment
without API_TOKEN would be open to anyone.

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import context, op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), sa.Identity(start=1), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("scope", sa.String(length=8), nullable=False),
        sa.Column("digest", sa.LargeBinary(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "scope IN ('read', 'submit', 'admin')", name=op.f("ck_api_tokens_scope")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("digest", name=op.f("uq_api_tokens_digest")),
        sa.UniqueConstraint("name", name=op.f("uq_api_tokens_name")),
    )


def downgrade():
    # Locked first: no token can be created between the look and the drop.
    op.execute("LOCK TABLE api_tokens IN ACCESS EXCLUSIVE MODE")
    _refuse_while_tokens_exist()
    op.drop_table("api_tokens")


class TokensExist(RuntimeError):
    """The downgrade would delete tokens that clients use."""


def _refuse_while_tokens_exist() -> None:
    if context.is_offline_mode():
        # The SQL script refuses as the online downgrade does, when it is run.
        op.execute(
            """
            DO $$
            BEGIN
                IF EXISTS (SELECT 1 FROM api_tokens) THEN
                    RAISE EXCEPTION USING MESSAGE = 'downgrade below 0013 refused: API '
                        || 'tokens exist and would be deleted; revoke them first '
                        || '(flask tokens revoke NAME); no data was changed';
                END IF;
            END $$
            """
        )
        return
    names = (
        op.get_bind().execute(sa.text("SELECT name FROM api_tokens ORDER BY name")).scalars().all()
    )
    if not names:
        return
    raise TokensExist(
        f"downgrade below 0013 refused: {len(names)} API tokens exist: {', '.join(names)}. "
        "Below 0013 only API_TOKEN is known: these tokens would be deleted, their clients "
        "refused, and a deployment without API_TOKEN would be open to anyone. Revoke them "
        "(flask tokens revoke NAME) once their clients use API_TOKEN, then downgrade again. "
        "No data was changed."
    )
