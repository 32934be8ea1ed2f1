"""indexes for pruning the outbox and the inbox

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 12:20:00

The monitor deletes published outbox rows and inbox rows past their retention. Both tables
are written in time order, so BRIN indexes find the old rows for a few bytes per block range
and cost the hot inserts almost nothing.
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_cj_event_outbox_created_brin",
        "cj_event_outbox",
        ["created_at"],
        postgresql_using="brin",
    )
    op.create_index(
        "ix_cj_event_inbox_handled_brin",
        "cj_event_inbox",
        ["handled_at"],
        postgresql_using="brin",
    )


def downgrade() -> None:
    op.drop_index("ix_cj_event_inbox_handled_brin", table_name="cj_event_inbox")
    op.drop_index("ix_cj_event_outbox_created_brin", table_name="cj_event_outbox")
