"""pruning finds old outbox and inbox rows through B-tree indexes

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 23:20:00

The BRIN indexes of 0003 assumed rows stay in time order on disk. They do until the first
prune: then new rows reuse the space freed by the deletes, every block range comes to hold
an old timestamp, BRIN summaries only ever widen, and each prune statement read most of the
table (a soak test saw every page of the inbox marked lossy). A B-tree on the inbox's
`handled_at`, and one on the outbox's `created_at` over published rows only (the rows
pruning may delete), keep a prune statement's cost to the rows it deletes.

Built CONCURRENTLY before the BRIN indexes are dropped, so that writes go on and pruning
always has an index; an invalid index left by an interrupted earlier run is dropped and built
again.
"""

import sqlalchemy as sa

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _drop_if_invalid(name: str, table: str) -> None:
    """An interrupted CREATE INDEX CONCURRENTLY leaves an invalid index of its name, which
    IF NOT EXISTS would keep: dropped, it is built again."""
    invalid = op.get_bind().execute(
        sa.text(
            "SELECT NOT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " WHERE c.relname = :name"
        ),
        {"name": name},
    )
    if invalid.scalar():
        op.drop_index(name, table_name=table, postgresql_concurrently=True, if_exists=True)


def upgrade() -> None:
    with op.get_context().autocommit_block():
        _drop_if_invalid("ix_cj_event_outbox_published_created", "cj_event_outbox")
        _drop_if_invalid("ix_cj_event_inbox_handled_at", "cj_event_inbox")
        op.create_index(
            "ix_cj_event_outbox_published_created",
            "cj_event_outbox",
            ["created_at"],
            postgresql_where=sa.text("published_at IS NOT NULL"),
            postgresql_concurrently=True,
            if_not_exists=True,
        )
        op.create_index(
            "ix_cj_event_inbox_handled_at",
            "cj_event_inbox",
            ["handled_at"],
            postgresql_concurrently=True,
            if_not_exists=True,
        )
        for name, table in (
            ("ix_cj_event_outbox_created_brin", "cj_event_outbox"),
            ("ix_cj_event_inbox_handled_brin", "cj_event_inbox"),
        ):
            op.drop_index(name, table_name=table, postgresql_concurrently=True, if_exists=True)


def downgrade() -> None:
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
        op.drop_index(
            "ix_cj_event_inbox_handled_at",
            table_name="cj_event_inbox",
            postgresql_concurrently=True,
            if_exists=True,
        )
        op.drop_index(
            "ix_cj_event_outbox_published_created",
            table_name="cj_event_outbox",
            postgresql_concurrently=True,
            if_exists=True,
        )
