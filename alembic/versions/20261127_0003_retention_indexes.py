"""indexes for pruning the outbox and the inbox

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 12:20:00

The monitor deletes published outbox rows and inbox rows past their retention. Both tables
are written in time order, so BRIN indexes find the old rows for a few bytes per block range
and cost the hot inserts almost nothing.

Built CONCURRENTLY, outside the migration's transaction, so that upgrading a running
deployment with large tables does not block their writes while the indexes are built; an
index an operator already built by hand under the same name is kept.
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        for name, table, column in (
            ("ix_cj_event_outbox_created_brin", "cj_event_outbox", "created_at"),
            ("ix_cj_event_inbox_handled_brin", "cj_event_inbox", "handled_at"),
        ):
            op.create_index(
                name,
                table,
                [column],
                postgresql_using="brin",
                postgresql_concurrently=True,
                if_not_exists=True,
            )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for name, table in (
            ("ix_cj_event_inbox_handled_brin", "cj_event_inbox"),
            ("ix_cj_event_outbox_created_brin", "cj_event_outbox"),
        ):
            op.drop_index(name, table_name=table, postgresql_concurrently=True, if_exists=True)
