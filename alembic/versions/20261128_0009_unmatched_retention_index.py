"""pruning finds old unmatched results through a B-tree index on their arrival

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28 07:00:00

Unmatched results (answers to no comparison we sent) are kept with their raw payload for
inspection, and the monitor now deletes them after `CJ_UNMATCHED_RETENTION_SECONDS`. Their
payloads are a provider's output, which may quote essays, so they are not kept for ever. The
index lets a prune statement read the rows it deletes rather than the table. Built
CONCURRENTLY so that upgrading does not block the consumer's writes; an invalid index left by
an interrupted earlier run is dropped and built again.
"""

import sqlalchemy as sa

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

INDEX = "ix_cj_unmatched_results_received_at"
TABLE = "cj_unmatched_results"


def upgrade() -> None:
    with op.get_context().autocommit_block():
        invalid = op.get_bind().execute(
            sa.text(
                "SELECT NOT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                " WHERE c.relname = :name"
            ),
            {"name": INDEX},
        )
        if invalid.scalar():
            op.drop_index(INDEX, table_name=TABLE, postgresql_concurrently=True, if_exists=True)
        op.create_index(
            INDEX, TABLE, ["received_at"], postgresql_concurrently=True, if_not_exists=True
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(INDEX, table_name=TABLE, postgresql_concurrently=True, if_exists=True)
