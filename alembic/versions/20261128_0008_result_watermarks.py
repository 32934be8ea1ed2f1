"""how far the result topic's partitions have been handled

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28 05:00:00

Per partition of the result topic, the moment up to which every result on it has been handled
(written by the consumer that owns the partition, about once a second, with the database's
time of writing). The monitor times an attempt out only once its deadline lies before every
partition's moment: while this service cannot store answers (the database away, a lock held,
a backlog after a pause), answers that are already on the topic are not taken for missing ones
and paid for again. Keyed by topic, so that a renamed result topic leaves its rows behind; a
row no longer written while others are (a partition nobody here owns) stops counting.
"""

import sqlalchemy as sa

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cj_result_watermarks",
        sa.Column("topic", sa.String(255), primary_key=True),
        sa.Column("partition", sa.Integer(), primary_key=True),
        sa.Column("handled_through", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "noted_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )


def downgrade() -> None:
    op.drop_table("cj_result_watermarks")
