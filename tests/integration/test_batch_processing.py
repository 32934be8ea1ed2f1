"""Batch processing on the real broker and database: submission batch sizes, concurrency,
the failed pool, partial completion and stragglers."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from datetime import UTC, datetime

from cj_assessment.pipeline_client import request_envelope, sleep_until
from tests.integration.test_assessment_flow import _essays
from tests.support.harness import provider_config, running_system, system_settings

TAIL_SECONDS = 6.0
NEVER = datetime.max.replace(tzinfo=UTC)


async def test_sixty_essays_with_errors_and_stragglers_complete_once_within_batch_limits(
    kafka_bootstrap: str, database_url: str
) -> None:
    settings = system_settings(
        kafka_bootstrap,
        database_url,
        callback_wait_timeout_seconds=3.0,
        batch_timeout_seconds=30.0,
        enable_stability_checking=False,
    )
    provider = provider_config(
        settings,
        latency_median_ms=20,
        latency_sigma=0.3,
        error_rate=0.10,
        tail_rate=0.10,
        tail_factor=TAIL_SECONDS * 1000 / 20,
        duplicate_rate=0.05,
        drain_timeout_s=2.0,
    )
    essays = _essays(60)
    overrides = {
        "batch_size": 25,
        "max_concurrent_batches": 2,
        "partial_completion_threshold": 0.85,
    }
    async with running_system(settings, provider) as system:
        await system.submit(
            request_envelope(
                bos_batch_id="batch-60", essays=essays, batch_config_overrides=overrides
            )
        )
        outcome = (await system.watcher.wait_for(["batch-60"], timeout=120))["batch-60"]

        # Let every straggler arrive so that late results are recorded.
        async def stragglers_recorded() -> bool:
            await system.watcher.poll()
            pending = "SELECT count(*) FROM cj_comparison_pairs WHERE status = 'in_flight'"
            return (await system.rows(pending))[0][0] == 0

        assert await sleep_until(stragglers_recorded, timeout=60)
        assert len(system.watcher.outcomes_for("batch-60")) == 1
        rows = await system.rows(
            "SELECT comparison_id, essay_a_els_id, essay_b_els_id, iteration, attempt,"
            " submission_batch_id, status, submitted_at, completed_at, is_late, winner,"
            " justification, error_code, error_details"
            " FROM cj_comparison_pairs ORDER BY id"
        )
        finished_at = (await system.rows("SELECT completed_at FROM cj_batch_uploads"))[0][0]
        state = (
            await system.rows(
                "SELECT total_comparisons, submitted_comparisons, completed_comparisons,"
                " failed_comparisons, processing_metadata FROM cj_batch_states"
            )
        )[0]

    data = outcome["data"]
    summary = data["processing_summary"]
    total, submitted, completed, failed, metadata = state
    assert data["status"] == "completed_successfully"
    assert sorted(r["els_essay_id"] for r in data["rankings"]) == sorted(essays)

    # Every submission batch holds at most 25 comparisons.
    batch_sizes = Counter(r.submission_batch_id for r in rows)
    assert max(batch_sizes.values()) <= 25

    # Never more than 2 batches in flight: a batch is in flight from its submission until
    # 85% of its results are in.
    by_batch: dict[object, list] = defaultdict(list)
    for r in rows:
        by_batch[r.submission_batch_id].append(r)
    spans = []
    for batch_rows in by_batch.values():
        if batch_rows[0].submitted_at is None:
            # A retry batch still queued when the assessment finished is never sent: it was
            # never in flight. Only retry batches can be left like this.
            assert all(r.attempt > 1 for r in batch_rows)
            continue
        done = sorted(r.completed_at for r in batch_rows if r.completed_at is not None)
        needed = math.ceil(0.85 * len(batch_rows) - 1e-9)
        end = done[needed - 1] if len(done) >= needed else NEVER
        spans.append((batch_rows[0].submitted_at, end))
    for start, _ in spans:
        overlapping = sum(1 for s, e in spans if s <= start < e)
        assert overlapping <= 2

    # Retries repeat the pair and its orientation.
    first = {r.comparison_id: r for r in rows if r.attempt == 1}
    retries = [r for r in rows if r.attempt > 1]
    assert retries, "the provider's errors should have produced retries"
    for r in retries:
        assert (r.essay_a_els_id, r.essay_b_els_id) == (
            first[r.comparison_id].essay_a_els_id,
            first[r.comparison_id].essay_b_els_id,
        )

    # Each answer is stored with what the provider said: a verdict with its justification (a
    # late one without: the outcome was published without it), an error with its code and
    # details.
    for r in rows:
        if r.status == "succeeded":
            assert r.winner in ("essay_a", "essay_b")
            assert bool(r.justification) is not r.is_late
            assert r.error_code is None
        elif r.status == "failed":
            assert r.winner == "error" and r.error_code
            assert set(r.error_details) == {"message", "operation", "service"}

    # Planned comparisons per essay differ by at most one.
    planned: Counter[str] = Counter()
    for r in first.values():
        planned[r.essay_a_els_id] += 1
        planned[r.essay_b_els_id] += 1
    assert max(planned.values()) - min(planned.values()) <= 1

    # Every planned comparison succeeded, failed for good, or was still outstanding when the
    # assessment finished: no failure was left in the pool without its retry.
    attempts_of: dict[object, list] = defaultdict(list)
    for r in rows:
        attempts_of[r.comparison_id].append(r)
    final_pool = {e["comparison_id"]: e for e in metadata["failed_comparison_pool"]}
    last_iteration_started = min(
        r.submitted_at for r in rows if r.iteration == summary["rounds"] and r.attempt == 1
    )
    for comparison_id, attempts in attempts_of.items():
        if any(a.status == "succeeded" and not a.is_late for a in attempts):
            continue
        last = max(attempts, key=lambda a: a.attempt)
        permanently_failed = last.status in ("failed", "timed_out") and last.attempt > 3
        outstanding_at_finish = last.completed_at is None or last.completed_at > finished_at
        failed_in_final_iteration = (
            str(comparison_id) in final_pool and last.completed_at >= last_iteration_started
        )
        # No LLM call left in the budget for its retry: failed for good at once.
        given_up_over_budget = str(comparison_id) in metadata.get("unretried_comparisons", [])
        assert (
            permanently_failed
            or outstanding_at_finish
            or failed_in_final_iteration
            or given_up_over_budget
        )
    assert all(
        b["submitted_at"] is not None or b["kind"] == "retry"
        for b in metadata["submission_batches"]
    )

    # It moved on without waiting for the slowest answers ...
    assert summary["rounds"] >= 3
    assert summary["processing_time_seconds"] < summary["rounds"] * TAIL_SECONDS
    # ... whose results were recorded when they came.
    assert not [r for r in rows if r.status == "in_flight"]
    assert any(r.is_late or r.status == "superseded" for r in rows) or any(
        r.completed_at > finished_at for r in rows if r.completed_at
    )

    # Cumulative counters never exceed their totals.
    assert completed + failed <= submitted <= total
    assert total == len(first)
    stats = metadata["pool_statistics"]
    assert stats["total_failed"] >= 1 and stats["retry_batches_sent"] >= 1
    # Retries are paid calls within the budget: every attempt, sent or still queued, counts.
    assert len(rows) <= metadata["effective_config"]["max_comparisons"] == 600
    assert all(b["size"] <= 25 for b in metadata["submission_batches"])


async def test_requests_too_large_for_the_broker_fail_at_once_and_hold_up_nothing(
    kafka_bootstrap: str, database_url: str
) -> None:
    # Prompts of two 40,000-character essays exceed a 64 KB broker limit. A callback timeout
    # of ten minutes shows that their attempts fail because they were set aside, not late.
    settings = system_settings(
        kafka_bootstrap,
        database_url,
        kafka_max_message_bytes=65_536,
        callback_wait_timeout_seconds=600.0,
        max_retry_attempts=1,
    )
    large = {
        essay_id: (body + "\n\n") * (40_000 // (len(body) + 2) + 1)
        for essay_id, body in _essays(4).items()
    }
    async with running_system(settings, provider_config(settings)) as system:
        await system.submit(
            request_envelope(bos_batch_id="too-large", essays=large),
            request_envelope(bos_batch_id="fits", essays=_essays(6)),
        )
        outcomes = await system.watcher.wait_for(["too-large", "fits"], timeout=60, settle=1.0)
        attempts = await system.rows(
            "SELECT p.attempt, p.status, p.error_code FROM cj_comparison_pairs p"
            " JOIN cj_batch_uploads u ON u.id = p.cj_batch_id WHERE u.bos_batch_id = 'too-large'"
        )
        aside = await system.rows(
            "SELECT topic, count(*) FROM cj_event_outbox WHERE undeliverable IS NOT NULL"
            " GROUP BY topic"
        )
        pending = await system.rows(
            "SELECT count(*) FROM cj_event_outbox WHERE published_at IS NULL"
            " AND undeliverable IS NULL"
        )
    assert outcomes["fits"]["data"]["status"] == "completed_successfully"
    failed = outcomes["too-large"]["data"]["system_metadata"]["error_info"]
    assert failed["error_code"] == "NO_SCORABLE_ESSAYS"
    assert attempts and {(a.status, a.error_code) for a in attempts} == {
        ("failed", "UNDELIVERABLE")
    }
    first = sum(1 for a in attempts if a.attempt == 1)
    assert sum(1 for a in attempts if a.attempt == 2) == first  # each retried once
    assert aside == [(settings.topic_llm_comparison_request, len(attempts))]
    assert pending[0][0] == 0
