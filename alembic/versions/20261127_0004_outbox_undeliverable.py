"""outbox rows the broker will never take are set aside

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 16:00:00

A row larger than the broker's message limit would fail every relay round and hold up every
row behind it. The relay now marks such a row `undeliverable` (the reason) and moves on; the
row stays, unpublished, for an operator. The relay's claim index covers pending rows only:
unpublished and not set aside. The new column is nullable without a default, so adding it
does not rewrite the table; the index is swapped CONCURRENTLY so that writes go on meanwhile.
"""

import sqlalchemy as sa

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("cj_event_outbox", sa.Column("undeliverable", sa.String(255), nullable=True))
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_cj_event_outbox_pending",
            "cj_event_outbox",
            ["id"],
            postgresql_where=sa.text("published_at IS NULL AND undeliverable IS NULL"),
            postgresql_concurrently=True,
            if_not_exists=True,
        )
        op.drop_index(
            "ix_cj_event_outbox_unpublished",
            table_name="cj_event_outbox",
            postgresql_concurrently=True,
            if_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_cj_event_outbox_unpublished",
            "cj_event_outbox",
            ["id"],
            postgresql_where=sa.text("published_at IS NULL"),
            postgresql_concurrently=True,
            if_not_exists=True,
        )
        op.drop_index(
            "ix_cj_event_outbox_pending",
            table_name="cj_event_outbox",
            postgresql_concurrently=True,
            if_exists=True,
        )
    op.drop_column("cj_event_outbox", "undeliverable")
