"""The failed-comparison pool: failed comparisons waiting for a retry, kept with their original
pair and orientation so that a retry asks exactly the same question.

Every entry holds one LLM call of the assessment's budget for its retry. A failure that finds
no call left in the budget is not pooled: its comparison fails for good, and its id is kept
in `unretried` so that a late answer to one of its attempts cannot count it a second time."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class PoolEntry:
    comparison_id: str
    correlation_id: str  # of the attempt that failed
    essay_a_id: str
    essay_b_id: str
    iteration: int
    failure_reason: str
    failed_at: str
    retry_count: int  # retries already sent for this comparison
    submission_batch_id: str

    def to_json(self) -> dict[str, Any]:
        # Shallow on purpose: fields are plain values, and asdict's deep copy is the hot spot
        # of storing progress once per assessment per poll.
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PoolEntry:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class PoolStatistics:
    total_failed: int = 0
    retry_batches_sent: int = 0
    successful_retries: int = 0
    permanently_failed: int = 0
    unretried_over_budget: int = 0  # of permanently_failed: no call left for their retry

    def to_json(self) -> dict[str, Any]:
        # Shallow on purpose: fields are plain values, and asdict's deep copy is the hot spot
        # of storing progress once per assessment per poll.
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> PoolStatistics:
        return cls(**{k: int((data or {}).get(k, 0)) for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class FailedPool:
    entries: tuple[PoolEntry, ...] = ()
    statistics: PoolStatistics = PoolStatistics()
    # Comparisons failed for good because the budget had no call left for their retry.
    unretried: tuple[str, ...] = ()

    def holds(self, comparison_id: str) -> bool:
        return any(e.comparison_id == comparison_id for e in self.entries)

    def gave_up(self, comparison_id: str) -> bool:
        return comparison_id in self.unretried

    def give_up_over_budget(self, comparison_id: str) -> FailedPool:
        """A failure with no call left in the budget for its retry: failed for good."""
        stats = replace(
            self.statistics,
            total_failed=self.statistics.total_failed + 1,
            permanently_failed=self.statistics.permanently_failed + 1,
            unretried_over_budget=self.statistics.unretried_over_budget + 1,
        )
        return FailedPool(self.entries, stats, self.unretried + (comparison_id,))

    def add(self, entry: PoolEntry) -> FailedPool:
        """A failed attempt joins the pool; one entry per comparison, the latest failure wins."""
        kept = tuple(e for e in self.entries if e.comparison_id != entry.comparison_id)
        stats = replace(self.statistics, total_failed=self.statistics.total_failed + 1)
        return FailedPool(kept + (entry,), stats, self.unretried)

    def count_failure(self) -> FailedPool:
        stats = replace(self.statistics, total_failed=self.statistics.total_failed + 1)
        return FailedPool(self.entries, stats, self.unretried)

    def count_permanent_failure(self) -> FailedPool:
        stats = replace(self.statistics, permanently_failed=self.statistics.permanently_failed + 1)
        return FailedPool(self.entries, stats, self.unretried)

    def count_retry_batch_sent(self) -> FailedPool:
        stats = replace(self.statistics, retry_batches_sent=self.statistics.retry_batches_sent + 1)
        return FailedPool(self.entries, stats, self.unretried)

    def count_successful_retry(self) -> FailedPool:
        stats = replace(self.statistics, successful_retries=self.statistics.successful_retries + 1)
        return FailedPool(self.entries, stats, self.unretried)

    def discard(self, comparison_id: str) -> FailedPool:
        kept = tuple(e for e in self.entries if e.comparison_id != comparison_id)
        return FailedPool(kept, self.statistics, self.unretried)

    def take_retry_batches(self, batch_size: int) -> tuple[FailedPool, list[list[PoolEntry]]]:
        """Empty the pool into retry batches of at most `batch_size`, oldest failures first.
        They count as sent when they are released (`count_retry_batch_sent`): a batch still
        queued when its assessment finishes is never sent."""
        ordered = sorted(self.entries, key=lambda e: (e.failed_at, e.comparison_id))
        chunks = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
        return FailedPool((), self.statistics, self.unretried), chunks
