"""Learned rates: what a downstream's refusals taught each limit, and the re-plans they caused

- `limits`: `adaptive` (refusals lower the learned rate; default on) and `max_refusals`
  (refusals in a row that fail an ID);
- `learned_rates`, a row per limit that ran a slot, apart from `limits` so that
  recording a refusal or a claim never waits for a planner's share lock on the limit's
  row:
  `learned_rpm` (null while it equals `rpm`), `learned_slot` (the slot of the last
  lowering: at most one per slot), `learned_at` (its last change, for the quiet period
  before it rises), `refusals` (how many in all), the last refusal (`last_refusal_at`,
  `_status`, `_retry_after`, `_reason`), `replan_event_id` (the newest re-plan) and
  `next_turn_at` (every slot of the limit takes its turns from this one sequence);
- `assignments.refusals`: refusals of the ID in a row (they use no attempt), and
  `assignments.replanned_in`: the re-plan that last moved it;
- `slots.replanned`: the slot took IDs from a re-plan (the plan page marks it);
- `limit_events`: one row per change of a learned rate, with the IDs it moved.

Every new column is nullable or has a constant default (PostgreSQL keeps such a default
in the catalogue), so nothing is rewritten: each
table's lock is held for a moment, `assignments`' included.

The downgrade refuses, changing nothing, while a limit holds a learned rate below its
`rpm`: below 0016 it would plan at `rpm` into a downstream that refused it. Reset them
first (PATCH /limits/<name>/ with `"learned_rpm": null`). It then drops the columns and
the events (their history is lost); IDs waiting after a refusal stay `retrying`, to be
planned as retries are below 0016.

Revision ID: 0016
Revises: 0015
"""

import sqlalchemy as sa
from alembic import context, op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

TIMESTAMP = sa.DateTime(timezone=True)


def upgrade():
    op.add_column(
        "limits", sa.Column("adaptive", sa.Boolean(), server_default="true", nullable=False)
    )
    op.add_column(
        "limits", sa.Column("max_refusals", sa.Integer(), server_default="30", nullable=False)
    )
    op.create_check_constraint(op.f("ck_limits_max_refusals"), "limits", "max_refusals >= 1")
    op.create_table(
        "learned_rates",
        sa.Column(
            "limit_id",
            sa.Integer(),
            sa.ForeignKey("limits.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("learned_rpm", sa.Integer(), nullable=True),
        sa.Column("learned_slot", TIMESTAMP, nullable=True),
        sa.Column("learned_at", TIMESTAMP, nullable=True),
        sa.Column("refusals", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("last_refusal_at", TIMESTAMP, nullable=True),
        sa.Column("last_refusal_status", sa.SmallInteger(), nullable=True),
        sa.Column("last_refusal_retry_after", sa.Float(), nullable=True),
        sa.Column("last_refusal_reason", sa.Text(), nullable=True),
        sa.Column("replan_event_id", sa.BigInteger(), nullable=True),
        sa.Column("next_turn_at", TIMESTAMP, nullable=True),
        sa.CheckConstraint(
            "learned_rpm IS NULL OR learned_rpm >= 1", name=op.f("ck_learned_rates_learned_rpm")
        ),
    )
    op.add_column(
        "assignments",
        sa.Column("refusals", sa.SmallInteger(), server_default="0", nullable=False),
    )
    op.add_column("assignments", sa.Column("replanned_in", sa.BigInteger(), nullable=True))
    op.add_column(
        "slots", sa.Column("replanned", sa.Boolean(), server_default="false", nullable=False)
    )
    op.create_table(
        "limit_events",
        sa.Column("id", sa.BigInteger(), sa.Identity(start=1), primary_key=True),
        sa.Column(
            "limit_id",
            sa.Integer(),
            sa.ForeignKey("limits.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("at", TIMESTAMP, server_default=sa.func.now(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("from_rpm", sa.Integer(), nullable=False),
        sa.Column("to_rpm", sa.Integer(), nullable=False),
        sa.Column("moved", sa.Integer(), server_default="0", nullable=False),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
    )
    op.create_index("ix_limit_events_by_limit", "limit_events", ["limit_id", "id"])


def downgrade():
    # Locked first: no rate can be learned between the look and the change.
    op.execute("LOCK TABLE learned_rates IN ACCESS EXCLUSIVE MODE")
    _refuse_while_rates_are_learned()
    op.drop_table("limit_events")
    op.drop_column("slots", "replanned")
    op.drop_column("assignments", "replanned_in")
    op.drop_column("assignments", "refusals")
    op.drop_table("learned_rates")
    op.drop_constraint(op.f("ck_limits_max_refusals"), "limits", type_="check")
    op.drop_column("limits", "max_refusals")
    op.drop_column("limits", "adaptive")


class LearnedRatesExist(RuntimeError):
    """The downgrade would plan at `rpm` into downstreams that refused it."""


def _refuse_while_rates_are_learned() -> None:
    query = (
        "SELECT l.name FROM learned_rates AS r JOIN limits AS l ON l.id = r.limit_id "
        "WHERE r.learned_rpm IS NOT NULL ORDER BY l.name LIMIT 11"
    )
    if context.is_offline_mode():
        op.execute(
            """
            DO $$
            BEGIN
                IF EXISTS (SELECT 1 FROM learned_rates WHERE learned_rpm IS NOT NULL) THEN
                    RAISE EXCEPTION USING MESSAGE = 'downgrade below 0016 refused: limits '
                        || 'hold learned rates; reset them first; no data was changed';
                END IF;
            END $$
            """
        )
        return
    names = op.get_bind().execute(sa.text(query)).scalars().all()
    if not names:
        return
    more = " and more" if len(names) > 10 else ""
    listed = ", ".join(names[:10]) + more
    raise LearnedRatesExist(
        f"downgrade below 0016 refused: limits {listed} hold learned rates below their "
        "rpm, which revisions before 0016 would ignore. Reset them (PATCH /limits/<name>/ "
        'with {"learned_rpm": null}), then downgrade again. No data was changed.'
    )
