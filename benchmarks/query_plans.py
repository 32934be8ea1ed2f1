"""Query plans of the hot queries, on a database holding many finished assessments, so that
no per-result or per-assessment query scans the work of other assessments.

    .venv/bin/python -m benchmarks.query_plans [--quick]
"""

from __future__ import annotations

import asyncio
import sys

from sqlalchemy import text

from benchmarks.system import make_essays, running_system
from cj_assessment.pipeline_client import request_envelope

HOT_QUERIES = {
    "claim inbox (per transaction)": (
        'INSERT INTO cj_event_inbox (event_id, topic, partition, "offset", outcome)'
        " SELECT v.event_id, v.topic, v.partition, v.record_offset, 'handled'"
        " FROM unnest(ARRAY['x', 'y'], ARRAY['t', 't'], ARRAY[0, 0], ARRAY[0, 1]::bigint[])"
        " AS v(event_id, topic, partition, record_offset)"
        " ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
    ),
    "results -> owning assessments (per transaction)": (
        "SELECT DISTINCT cj_batch_id FROM cj_comparison_pairs"
        " WHERE request_correlation_id = ANY("
        "ARRAY(SELECT request_correlation_id FROM cj_comparison_pairs LIMIT 50))"
    ),
    "result -> attempt with its siblings (per transaction)": (
        "SELECT p.*, s.attempts, s.statuses FROM cj_comparison_pairs AS p"
        " CROSS JOIN LATERAL (SELECT array_agg(q.attempt) AS attempts,"
        " array_agg(q.status) AS statuses FROM cj_comparison_pairs AS q"
        " WHERE q.comparison_id = p.comparison_id) AS s"
        " WHERE p.request_correlation_id = ANY("
        "ARRAY(SELECT request_correlation_id FROM cj_comparison_pairs LIMIT 50))"
        " AND p.cj_batch_id = ANY(ARRAY[1, 2, 3]::bigint[])"
    ),
    "write attempt outcomes (per transaction)": (
        "UPDATE cj_comparison_pairs AS p SET status = v.status"
        " FROM unnest(ARRAY(SELECT id FROM cj_comparison_pairs LIMIT 50),"
        " array_fill('succeeded'::text, ARRAY[50])) AS v(id, status) WHERE p.id = v.id"
        " AND p.id = ANY(ARRAY(SELECT id FROM cj_comparison_pairs LIMIT 50))"
    ),
    "lock assessments (per transaction)": (
        "SELECT * FROM cj_batch_states WHERE cj_batch_id = ANY(ARRAY[1, 2, 3]::bigint[])"
        " ORDER BY cj_batch_id FOR UPDATE"
    ),
    "write state rows (per transaction)": (
        "UPDATE cj_batch_states AS s SET state = v.state, last_activity_at = now()"
        " FROM unnest(ARRAY[1, 2, 3]::bigint[], ARRAY['WAITING_CALLBACKS', 'WAITING_CALLBACKS',"
        " 'WAITING_CALLBACKS']) AS v(cj_batch_id, state) WHERE s.cj_batch_id = v.cj_batch_id"
        " AND s.cj_batch_id = ANY(ARRAY[1, 2, 3]::bigint[])"
    ),
    "planned pairs and judgements (per iteration)": (
        "SELECT essay_a_els_id, essay_b_els_id, attempt, status, winner FROM cj_comparison_pairs"
        " WHERE cj_batch_id = 3 ORDER BY id"
    ),
    "send batches (per release)": (
        "UPDATE cj_comparison_pairs AS p SET status = CASE WHEN a.answered THEN 'superseded'"
        " ELSE 'in_flight' END, submitted_at = now() FROM (SELECT q.id, EXISTS (SELECT 1"
        " FROM cj_comparison_pairs AS s WHERE s.comparison_id = q.comparison_id"
        " AND s.status = 'succeeded') AS answered FROM cj_comparison_pairs AS q"
        " WHERE q.cj_batch_id = 3 AND q.status = 'queued' AND q.submission_batch_id = ANY("
        "ARRAY(SELECT submission_batch_id FROM cj_comparison_pairs LIMIT 1))) AS a"
        " WHERE p.id = a.id RETURNING p.id"
    ),
    "outbox claim (relay)": (
        "SELECT id, topic, message_key, payload FROM cj_event_outbox WHERE published_at IS NULL"
        " AND undeliverable IS NULL ORDER BY id LIMIT 500 FOR UPDATE SKIP LOCKED"
    ),
    "overdue attempts (monitor)": (
        "SELECT p.cj_batch_id FROM cj_comparison_pairs AS p WHERE p.status = 'in_flight'"
        " AND p.submitted_at < now() - interval '300 seconds' AND NOT COALESCE((SELECT"
        " o.published_at IS NULL AND o.undeliverable IS NULL FROM cj_event_outbox AS o"
        " WHERE o.event_id = p.request_event_id), false)"
        " AND p.cj_batch_id <> ALL(ARRAY[]::bigint[])"
        " GROUP BY p.cj_batch_id ORDER BY min(p.submitted_at) LIMIT 50"
    ),
    "idle assessments (monitor)": (
        "SELECT cj_batch_id FROM cj_batch_states WHERE state NOT IN ('COMPLETED', 'FAILED',"
        " 'CANCELLED') AND last_activity_at < now() - interval '600 seconds'"
        " ORDER BY last_activity_at LIMIT 50 FOR UPDATE SKIP LOCKED"
    ),
    "running assessments per state (monitor gauge)": (
        "SELECT state, count(*) FROM cj_batch_states WHERE state NOT IN ('COMPLETED', 'FAILED',"
        " 'CANCELLED') GROUP BY state"
    ),
}


async def _plans(assessments: int) -> str:
    async with running_system(provider={"latency_median_ms": 5}, warm_up=False) as system:
        ids = [f"plan-{i}" for i in range(assessments)]
        essays = make_essays(20)
        await system.submit(*(request_envelope(bos_batch_id=b, essays=essays) for b in ids))
        await system.wait_for(ids, timeout=600)
        async with system.engine.begin() as conn:
            await conn.execute(text("ANALYZE"))
        pairs = (await system.rows("SELECT count(*) FROM cj_comparison_pairs"))[0][0]
        lines = [f"Query plans with {assessments} finished assessments, {pairs} attempt rows", ""]
        for name, sql in HOT_QUERIES.items():
            plan = await system.rows(f"EXPLAIN (COSTS OFF) {sql}")
            lines.append(f"-- {name}")
            lines += [f"   {row[0]}" for row in plan]
        return "\n".join(lines)


def run(quick: bool = False) -> str:
    return asyncio.run(_plans(30 if quick else 200))


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
