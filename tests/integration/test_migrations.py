"""Migrations against a real PostgreSQL: the retention indexes build outside a transaction,
keep an index an operator built by hand, and are B-trees from 0006 on; the outbox's claim
index covers pending rows."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from alembic import command
from cj_assessment.database import _alembic_config, head_revision

BRIN_INDEXES = {"ix_cj_event_outbox_created_brin", "ix_cj_event_inbox_handled_brin"}
PRUNE_INDEXES = {
    "ix_cj_event_outbox_published_created": "(published_at IS NOT NULL)",
    "ix_cj_event_inbox_handled_at": None,
}
PRUNED_OUTBOX_INDEX = {"ix_cj_event_outbox_published_created": "(published_at IS NOT NULL)"}
PENDING_INDEX = {
    "ix_cj_event_outbox_pending": "((published_at IS NULL) AND (undeliverable IS NULL))"
}


async def _rows(url: str, sql: str) -> list[Any]:
    """One statement on its own autocommit connection (CREATE INDEX CONCURRENTLY needs it)."""
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            result = await conn.execute(text(sql))
            return list(result.all()) if result.returns_rows else []
    finally:
        await engine.dispose()


async def _brin_indexes(url: str) -> dict[str, bool]:
    """Name -> valid, for the BRIN indexes of the outbox and inbox."""
    rows = await _rows(
        url,
        "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " JOIN pg_am a ON a.oid = c.relam WHERE a.amname = 'brin'",
    )
    return dict(rows)


async def _prune_indexes(url: str) -> dict[str, str | None]:
    """Name -> partial predicate, for the valid B-tree indexes pruning uses."""
    rows = await _rows(
        url,
        "SELECT c.relname, pg_get_expr(i.indpred, i.indrelid) FROM pg_index i"
        " JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam"
        " WHERE a.amname = 'btree' AND i.indisvalid"
        " AND c.relname IN ('ix_cj_event_outbox_published_created',"
        " 'ix_cj_event_inbox_handled_at')",
    )
    return dict(rows)


async def _outbox_shape(url: str) -> tuple[dict[str, str], set[str]]:
    """Partial-index predicates and column names of the outbox."""
    indexes = await _rows(
        url,
        "SELECT c.relname, pg_get_expr(i.indpred, i.indrelid) FROM pg_index i"
        " JOIN pg_class c ON c.oid = i.indexrelid"
        " WHERE i.indrelid = 'cj_event_outbox'::regclass AND i.indpred IS NOT NULL",
    )
    columns = await _rows(
        url,
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'cj_event_outbox'",
    )
    return dict(indexes), {c for (c,) in columns}


async def test_retention_indexes_are_rebuilt_concurrently_and_keep_one_built_by_hand(
    database_url: str,
) -> None:
    config = _alembic_config(database_url)
    assert await _brin_indexes(database_url) == {}
    assert await _prune_indexes(database_url) == PRUNE_INDEXES

    await asyncio.to_thread(command.downgrade, config, "0005")
    assert await _brin_indexes(database_url) == dict.fromkeys(BRIN_INDEXES, True)
    assert await _prune_indexes(database_url) == {}
    await asyncio.to_thread(command.downgrade, config, "0002")
    assert await _brin_indexes(database_url) == {}

    await _rows(
        database_url,
        "CREATE INDEX CONCURRENTLY ix_cj_event_outbox_created_brin"
        " ON cj_event_outbox USING brin (created_at)",
    )
    await asyncio.to_thread(command.upgrade, config, "0005")
    assert await _brin_indexes(database_url) == dict.fromkeys(BRIN_INDEXES, True)

    await asyncio.to_thread(command.upgrade, config, "head")
    assert await _brin_indexes(database_url) == {}
    assert await _prune_indexes(database_url) == PRUNE_INDEXES
    assert await _rows(database_url, "SELECT version_num FROM alembic_version") == [
        (head_revision(),)
    ]


async def test_the_outbox_claim_index_covers_pending_rows_and_the_downgrade_restores_it(
    database_url: str,
) -> None:
    config = _alembic_config(database_url)
    indexes, columns = await _outbox_shape(database_url)
    assert indexes == PENDING_INDEX | PRUNED_OUTBOX_INDEX
    assert "undeliverable" in columns

    await asyncio.to_thread(command.downgrade, config, "0003")
    indexes, columns = await _outbox_shape(database_url)
    assert indexes == {"ix_cj_event_outbox_unpublished": "(published_at IS NULL)"}
    assert "undeliverable" not in columns

    await asyncio.to_thread(command.upgrade, config, "head")
    assert (await _outbox_shape(database_url))[0] == PENDING_INDEX | PRUNED_OUTBOX_INDEX


async def test_outbox_keys_take_any_length_and_the_downgrade_cuts_them_to_255(
    database_url: str,
) -> None:
    config = _alembic_config(database_url)
    long_key = "k" * 300
    await _rows(
        database_url,
        "INSERT INTO cj_event_outbox (event_id, topic, message_key, payload)"
        f" VALUES (gen_random_uuid(), 't', '{long_key}', '{{}}')",
    )
    await asyncio.to_thread(command.downgrade, config, "0004")
    (kept,) = await _rows(database_url, "SELECT message_key FROM cj_event_outbox")
    assert kept[0] == long_key[:255]
    await asyncio.to_thread(command.upgrade, config, "head")
    types = await _rows(
        database_url,
        "SELECT data_type FROM information_schema.columns"
        " WHERE table_name = 'cj_event_outbox' AND column_name = 'message_key'",
    )
    assert types == [("text",)]


async def test_an_interrupted_build_of_a_prune_index_is_built_again(database_url: str) -> None:
    config = _alembic_config(database_url)
    await asyncio.to_thread(command.downgrade, config, "0005")
    # A unique build over duplicate timestamps fails half way, as an interrupted concurrent
    # build does: it leaves an invalid index of that name behind.
    await _rows(
        database_url,
        'INSERT INTO cj_event_inbox (event_id, topic, partition, "offset", outcome, handled_at)'
        " SELECT 'e' || g, 't', 0, g, 'handled', '2026-01-01' FROM generate_series(1, 100) g",
    )
    try:
        await _rows(
            database_url,
            "CREATE UNIQUE INDEX CONCURRENTLY ix_cj_event_inbox_handled_at"
            " ON cj_event_inbox (handled_at)",
        )
    except Exception:  # noqa: BLE001 - the failure is the point
        pass
    await asyncio.to_thread(command.upgrade, config, "head")
    assert await _prune_indexes(database_url) == PRUNE_INDEXES


async def test_unmatched_results_get_their_prune_index_and_lose_it_on_downgrade(
    database_url: str,
) -> None:
    config = _alembic_config(database_url)
    query = (
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " WHERE c.relname = 'ix_cj_unmatched_results_received_at'"
    )
    assert await _rows(database_url, query) == [(True,)]

    await asyncio.to_thread(command.downgrade, config, "0008")
    assert await _rows(database_url, query) == []

    await asyncio.to_thread(command.upgrade, config, "head")
    assert await _rows(database_url, query) == [(True,)]


async def test_finished_assessments_get_their_text_erasure_column_and_index_and_lose_them(
    database_url: str,
) -> None:
    config = _alembic_config(database_url)
    index = (
        "SELECT i.indisvalid, pg_get_expr(i.indpred, i.indrelid) FROM pg_index i"
        " JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = 'ix_cj_batch_uploads_texts_due'"
    )
    column = (
        "SELECT count(*) FROM information_schema.columns"
        " WHERE table_name = 'cj_batch_uploads' AND column_name = 'texts_erased_at'"
    )
    due = [(True, "((completed_at IS NOT NULL) AND (texts_erased_at IS NULL))")]
    assert await _rows(database_url, index) == due
    assert await _rows(database_url, column) == [(1,)]

    await asyncio.to_thread(command.downgrade, config, "0009")
    assert await _rows(database_url, index) == []
    assert await _rows(database_url, column) == [(0,)]

    await asyncio.to_thread(command.upgrade, config, "head")
    assert await _rows(database_url, index) == due
    assert await _rows(database_url, column) == [(1,)]
