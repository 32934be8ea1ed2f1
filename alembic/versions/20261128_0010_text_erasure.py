"""finished assessments' texts can be erased after a retention period

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-28 15:00:00

Essays are pupils' writing. The service needs their text only while an assessment runs (to
build prompts), so with `CJ_TEXT_RETENTION_SECONDS` set the monitor erases, that long after an
assessment finished, its essays' text, its instructions and the judge's justifications (which
may quote the essays), and notes when in `texts_erased_at`. Ids, judgements, scores and ranks
stay: they are the record of what was judged and paid for, and the upload row still makes a
repeated request a duplicate. The partial index finds the finished assessments not yet
erased, oldest first, without reading those already done. Adding a nullable column without a
default is a catalogue change; the index is built CONCURRENTLY so that upgrading does not
block the consumer's writes, and an invalid one left by an interrupted earlier run is dropped
and built again.
"""

import sqlalchemy as sa

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

INDEX = "ix_cj_batch_uploads_texts_due"
TABLE = "cj_batch_uploads"


def upgrade() -> None:
    op.add_column(TABLE, sa.Column("texts_erased_at", sa.DateTime(timezone=True), nullable=True))
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
            INDEX,
            TABLE,
            ["completed_at"],
            postgresql_where=sa.text("completed_at IS NOT NULL AND texts_erased_at IS NULL"),
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(INDEX, table_name=TABLE, postgresql_concurrently=True, if_exists=True)
    op.drop_column(TABLE, "texts_erased_at")
