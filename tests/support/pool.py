"""Failed-pool entries for tests of the pure core."""

from __future__ import annotations

from cj_assessment.failed_pool import FailedPool, PoolEntry


def failed_pool(count: int, *, failed_at: str = "2026-01-01T12:00:00Z") -> FailedPool:
    """`count` first attempts of iteration 1, batch b0, failed and waiting for a retry."""
    return FailedPool(
        tuple(
            PoolEntry(
                comparison_id=f"c{i}",
                correlation_id=f"r{i}",
                essay_a_id="a",
                essay_b_id="b",
                iteration=1,
                failure_reason="error",
                failed_at=failed_at,
                retry_count=0,
                submission_batch_id="b0",
            )
            for i in range(count)
        )
    )
