"""attempts know the event id of their request

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 02:00:00

An attempt's wait for its answer (CJ_CALLBACK_WAIT_TIMEOUT_SECONDS) counts from when its
request was published, not from when the request was written to the outbox: while the broker
is away, requests wait in the outbox, and timing them out would fail assessments whose
requests were never sent, then pay for them when the broker returns. The monitor finds the
request's outbox row by this id and leaves the attempt alone while the row is unpublished.
Nullable without a default, so adding it does not rewrite the table; attempts planned before
it and still queued get the id when they are sent, and those already sent are timed out as
before, from their release.
"""

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import UUID

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "cj_comparison_pairs", sa.Column("request_event_id", UUID(as_uuid=True), nullable=True)
    )


def downgrade() -> None:
    op.drop_column("cj_comparison_pairs", "request_event_id")
