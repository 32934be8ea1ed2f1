"""Pruning in its steady state: few rows past retention, spread over a large table (freed
space is reused), and the prepared statements on their generic plans (asyncpg prepares each
statement; PostgreSQL switches to a generic plan after five executions)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from cj_assessment.repository import (
    _ERASE_JUSTIFICATIONS,
    _PRUNE_INBOX,
    _PRUNE_OUTBOX,
    _PRUNE_UNMATCHED,
    _TEXTS_DUE,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ROWS = 100_000  # one in a thousand past retention, in random places


async def _generic_plans(conn: AsyncConnection, *executions: str) -> list[str]:
    """EXPLAIN ANALYZE of each prepared statement's EXECUTE on its sixth run, the first on
    the generic plan; every run is rolled back."""
    plans: list[str] = []
    for _ in range(6):
        await conn.exec_driver_sql("BEGIN")
        plans = [
            "\n".join(
                (await conn.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS) {execution}")).scalars()
            )
            for execution in executions
        ]
        await conn.exec_driver_sql("ROLLBACK")
    return plans


@pytest.mark.parametrize(
    ("table", "statement"),
    [
        ("cj_event_inbox", _PRUNE_INBOX),
        ("cj_event_outbox", _PRUNE_OUTBOX),
        ("cj_unmatched_results", _PRUNE_UNMATCHED),
    ],
)
async def test_a_prune_reads_the_rows_it_deletes_not_the_table(
    database_url: str, table: str, statement: object
) -> None:
    when = (
        "CAST(:t0 AS timestamptz) + (CASE WHEN g % 1000 = 0 THEN 0 ELSE 3600 END"
        " + random() * 60) * interval '1 s'"
    )
    rows = {
        "cj_event_inbox": 'INSERT INTO cj_event_inbox (event_id, topic, partition, "offset",'
        f" outcome, handled_at) SELECT md5(g::text), 't', 0, g, 'handled', {when}",
        "cj_event_outbox": "INSERT INTO cj_event_outbox (event_id, topic, message_key, payload,"
        f" created_at, published_at) SELECT gen_random_uuid(), 't', 'k', '{{}}', {when}, now()",
        "cj_unmatched_results": "INSERT INTO cj_unmatched_results (correlation_id, reason,"
        f" payload, received_at) SELECT md5(g::text), 'unknown_correlation_id', '{{}}', {when}",
    }[table]
    engine = create_async_engine(database_url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(
                text(f"{rows} FROM generate_series(1, :n) g ORDER BY random()"),
                {"t0": T0, "n": ROWS},
            )
            await conn.execute(text(f"VACUUM ANALYZE {table}"))
            sql = statement.text.replace(":before", "$1").replace(":limit", "$2")  # type: ignore[attr-defined]
            await conn.exec_driver_sql(f"PREPARE prune(timestamptz, int) AS {sql}")
            before = (T0 + timedelta(minutes=30)).isoformat()
            (plan,) = await _generic_plans(conn, f"EXECUTE prune('{before}', 5000)")
    finally:
        await engine.dispose()
    assert "Seq Scan" not in plan, plan
    assert "Tid Scan" in plan, plan


async def test_erasing_texts_reads_the_assessments_due_and_their_attempts_not_the_tables(
    database_url: str,
) -> None:
    # Steady state: most finished assessments erased long ago, some finished recently, some
    # running, one in a thousand due; an attempt or two each.
    due = "g % 1000 = 0"
    uploads = (
        "INSERT INTO cj_batch_uploads (id, bos_batch_id, event_correlation_id,"
        " llm_config_overrides, expected_essay_count, status, completed_at, texts_erased_at)"
        " SELECT g, 'b' || g, 'c', '{}', 2, 'COMPLETED',"
        f" CASE WHEN g % 10 = 1 THEN NULL WHEN {due} THEN CAST(:t0 AS timestamptz)"
        "  ELSE CAST(:t0 AS timestamptz) + (g % 7200) * interval '1 s' END,"
        f" CASE WHEN g % 2 = 0 AND NOT {due} THEN CAST(:t0 AS timestamptz) END"
        " FROM generate_series(1, :n) g ORDER BY random()"
    )
    attempts = (
        "INSERT INTO cj_comparison_pairs (cj_batch_id, comparison_id, request_correlation_id,"
        " essay_a_els_id, essay_b_els_id, iteration, attempt, submission_batch_id, status,"
        " is_late, justification) SELECT 1 + g % :n, gen_random_uuid(), gen_random_uuid(), 'e1',"
        " 'e2', 1, 1, gen_random_uuid(), 'succeeded', false, 'why'"
        " FROM generate_series(1, 2 * :n) g"
    )
    engine = create_async_engine(database_url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(text(uploads), {"t0": T0, "n": ROWS})
            await conn.execute(text(attempts), {"n": ROWS})
            await conn.execute(text("VACUUM ANALYZE cj_batch_uploads"))
            await conn.execute(text("VACUUM ANALYZE cj_comparison_pairs"))
            chosen = _TEXTS_DUE.text.replace(":before", "$1").replace(":limit", "$2")
            erase = _ERASE_JUSTIFICATIONS.text.replace(":ids", "$1")
            await conn.exec_driver_sql(f"PREPARE due(timestamptz, int) AS {chosen}")
            await conn.exec_driver_sql(f"PREPARE erase(bigint[]) AS {erase}")
            before = (T0 + timedelta(minutes=30)).isoformat()
            due_plan, erase_plan = await _generic_plans(
                conn, f"EXECUTE due('{before}', 10)", "EXECUTE erase('{1000,2000,3000}')"
            )
    finally:
        await engine.dispose()
    assert "Seq Scan" not in due_plan, due_plan
    assert "ix_cj_batch_uploads_texts_due" in due_plan, due_plan
    assert "Seq Scan" not in erase_plan, erase_plan
    assert "ix_cj_comparison_pairs_batch_status" in erase_plan, erase_plan
