"""Migrations against a real PostgreSQL: the retention indexes build outside a transaction
and keep an index an operator built by hand."""

from __future__ import annotations

import asyncio

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from alembic import command
from cj_assessment.database import _alembic_config, head_revision

BRIN_INDEXES = {"ix_cj_event_outbox_created_brin", "ix_cj_event_inbox_handled_brin"}


async def _brin_indexes(url: str) -> dict[str, bool]:
    """Name -> valid, for the BRIN indexes of the outbox and inbox."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT c.relname, i.indisvalid FROM pg_index i"
                    " JOIN pg_class c ON c.oid = i.indexrelid"
                    " JOIN pg_am a ON a.oid = c.relam WHERE a.amname = 'brin'"
                )
            )
            return {name: valid for name, valid in rows.all()}
    finally:
        await engine.dispose()


async def test_retention_indexes_are_rebuilt_concurrently_and_keep_one_built_by_hand(
    database_url: str,
) -> None:
    config = _alembic_config(database_url)
    assert await _brin_indexes(database_url) == dict.fromkeys(BRIN_INDEXES, True)

    await asyncio.to_thread(command.downgrade, config, "0002")
    assert await _brin_indexes(database_url) == {}

    engine = create_async_engine(database_url, isolation_level="AUTOCOMMIT")
    async with engine.connect() as conn:
        await conn.execute(
            text(
                "CREATE INDEX CONCURRENTLY ix_cj_event_outbox_created_brin"
                " ON cj_event_outbox USING brin (created_at)"
            )
        )
    await engine.dispose()
    await asyncio.to_thread(command.upgrade, config, "head")

    assert await _brin_indexes(database_url) == dict.fromkeys(BRIN_INDEXES, True)
    engine = create_async_engine(database_url)
    async with engine.connect() as conn:
        version = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
    await engine.dispose()
    assert version == head_revision()
