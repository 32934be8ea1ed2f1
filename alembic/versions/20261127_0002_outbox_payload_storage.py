"""outbox payloads stored uncompressed

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 12:00:00

An outbox row lives from its transaction's commit to the relay's acknowledgement: written
once, read once. Prompts are a few kilobytes, above PostgreSQL's TOAST threshold, so by
default every payload was compressed with pglz inside the closing transaction: 75 prompts
took 2.6 ms to insert instead of 1.1 ms. EXTERNAL keeps them out of line but uncompressed.
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE cj_event_outbox ALTER COLUMN payload SET STORAGE EXTERNAL")


def downgrade() -> None:
    op.execute("ALTER TABLE cj_event_outbox ALTER COLUMN payload SET STORAGE EXTENDED")
