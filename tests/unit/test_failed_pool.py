"""The failed-comparison pool: one entry per comparison, emptied oldest-first into retry batches."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from cj_assessment.failed_pool import FailedPool, PoolEntry, PoolStatistics


def _entry(cid: str, failed_at: str = "2026-01-01T12:00:00Z", **overrides: object) -> PoolEntry:
    values: dict[str, object] = {
        "comparison_id": cid,
        "correlation_id": f"{cid}-corr",
        "essay_a_id": f"{cid}-a",
        "essay_b_id": f"{cid}-b",
        "iteration": 1,
        "failure_reason": "error",
        "failed_at": failed_at,
        "retry_count": 0,
        "submission_batch_id": "batch-1",
    }
    values.update(overrides)
    return PoolEntry(**values)  # type: ignore[arg-type]


def _at(second: int) -> str:
    return f"2026-01-01T12:00:{second:02d}Z"


def test_a_new_pool_is_empty_with_zero_statistics() -> None:
    pool = FailedPool()
    assert pool.entries == ()
    assert pool.statistics == PoolStatistics(0, 0, 0, 0)
    assert not pool.holds("c1")


def test_adding_an_entry_holds_it_and_counts_a_failure() -> None:
    pool = FailedPool().add(_entry("c1"))
    assert pool.holds("c1")
    assert [e.comparison_id for e in pool.entries] == ["c1"]
    assert pool.statistics.total_failed == 1


def test_adding_the_same_comparison_again_keeps_one_entry_the_latest() -> None:
    first = _entry("c1", _at(1), correlation_id="r1", retry_count=0)
    latest = _entry("c1", _at(5), correlation_id="r2", retry_count=1, failure_reason="timeout")
    pool = FailedPool().add(first).add(_entry("c2")).add(latest)
    assert [e.comparison_id for e in pool.entries].count("c1") == 1
    assert next(e for e in pool.entries if e.comparison_id == "c1") == latest
    assert pool.statistics.total_failed == 3


def test_adding_does_not_change_the_original_pool() -> None:
    empty = FailedPool()
    empty.add(_entry("c1"))
    assert empty.entries == ()
    assert empty.statistics.total_failed == 0


def test_discard_removes_only_that_comparison_and_keeps_statistics() -> None:
    pool = FailedPool().add(_entry("c1")).add(_entry("c2"))
    pool = pool.discard("c1")
    assert [e.comparison_id for e in pool.entries] == ["c2"]
    assert pool.statistics.total_failed == 2
    assert pool.discard("unknown") == pool


def test_take_retry_batches_chunks_oldest_first_and_empties_the_pool() -> None:
    pool = FailedPool()
    for second in [5, 1, 7, 3, 2, 6, 4]:
        pool = pool.add(_entry(f"c{second}", _at(second)))
    emptied, chunks = pool.take_retry_batches(3)
    assert [[e.comparison_id for e in chunk] for chunk in chunks] == [
        ["c1", "c2", "c3"],
        ["c4", "c5", "c6"],
        ["c7"],
    ]
    assert emptied.entries == ()
    assert emptied.statistics.retry_batches_sent == 0  # counted when released, not formed
    assert emptied.statistics.total_failed == 7


def test_take_retry_batches_keeps_each_entry_unchanged() -> None:
    entry = _entry("c1", essay_a_id="zeta", essay_b_id="alpha", retry_count=2, iteration=3)
    _, chunks = FailedPool().add(entry).take_retry_batches(50)
    assert chunks == [[entry]]


def test_take_retry_batches_of_an_empty_pool_sends_nothing() -> None:
    emptied, chunks = FailedPool().take_retry_batches(10)
    assert chunks == []
    assert emptied.statistics.retry_batches_sent == 0


def test_retry_batches_sent_counts_each_batch_released() -> None:
    pool = FailedPool().add(_entry("c1")).add(_entry("c2"))
    pool, _ = pool.take_retry_batches(1)
    pool = pool.count_retry_batch_sent().count_retry_batch_sent().count_retry_batch_sent()
    assert pool.statistics.retry_batches_sent == 3


@settings(max_examples=60, deadline=None)
@given(
    seconds=st.lists(st.integers(0, 59), min_size=0, max_size=40),
    batch_size=st.integers(1, 15),
)
def test_take_retry_batches_partitions_the_pool_in_failure_order(
    seconds: list[int], batch_size: int
) -> None:
    pool = FailedPool()
    for i, second in enumerate(seconds):
        pool = pool.add(_entry(f"c{i:03d}", _at(second)))
    emptied, chunks = pool.take_retry_batches(batch_size)
    flat = [e for chunk in chunks for e in chunk]
    assert sorted(flat, key=lambda e: e.comparison_id) == sorted(
        pool.entries, key=lambda e: e.comparison_id
    )
    assert [e.failed_at for e in flat] == sorted(e.failed_at for e in flat)
    assert all(1 <= len(chunk) <= batch_size for chunk in chunks)
    assert all(len(chunk) == batch_size for chunk in chunks[:-1])
    assert emptied.entries == ()
    assert emptied.statistics == pool.statistics


def test_statistic_counters_are_cumulative() -> None:
    pool = FailedPool().count_failure().count_failure().count_permanent_failure()
    pool = pool.count_successful_retry()
    assert pool.statistics == PoolStatistics(
        total_failed=2, retry_batches_sent=0, successful_retries=1, permanently_failed=1
    )


def test_statistics_round_trip_through_json() -> None:
    stats = PoolStatistics(
        total_failed=9, retry_batches_sent=2, successful_retries=4, permanently_failed=1
    )
    assert PoolStatistics.from_json(json.loads(json.dumps(stats.to_json()))) == stats
    assert set(stats.to_json()) == {
        "total_failed",
        "retry_batches_sent",
        "successful_retries",
        "permanently_failed",
        "unretried_over_budget",
    }


def test_statistics_from_missing_or_partial_json_default_to_zero() -> None:
    assert PoolStatistics.from_json(None) == PoolStatistics()
    assert PoolStatistics.from_json({}) == PoolStatistics()
    assert PoolStatistics.from_json({"total_failed": "3"}) == PoolStatistics(total_failed=3)


def test_pool_entry_round_trips_through_json() -> None:
    entry = _entry("c1", retry_count=2, failure_reason="timeout", iteration=4)
    assert PoolEntry.from_json(json.loads(json.dumps(entry.to_json()))) == entry
