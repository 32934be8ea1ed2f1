"""outbox message keys as text

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 21:00:00

A request whose identity is longer than the 255 characters the assessment tables hold is
still answered with a failed event keyed by that identity, so the outbox's key column takes
any length. varchar(255) to text is binary-coercible in PostgreSQL: no table rewrite, no
index rebuild. The downgrade cuts longer keys to 255 characters.
"""

import sqlalchemy as sa

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.alter_column("cj_event_outbox", "message_key", type_=sa.Text(), existing_type=sa.String(255))


def downgrade() -> None:
    op.alter_column(
        "cj_event_outbox",
        "message_key",
        type_=sa.String(255),
        existing_type=sa.Text(),
        postgresql_using="left(message_key, 255)",
    )
