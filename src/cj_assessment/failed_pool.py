"""The failed-comparison pool: failed comparisons waiting for a retry, kept with their original
pair and orientation so that a retry asks exactly the same question."""

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

    def holds(self, comparison_id: str) -> bool:
        return any(e.comparison_id == comparison_id for e in self.entries)

    def add(self, entry: PoolEntry) -> FailedPool:
        """A failed attempt joins the pool; one entry per comparison, the latest failure wins."""
        kept = tuple(e for e in self.entries if e.comparison_id != entry.comparison_id)
        stats = replace(self.statistics, total_failed=self.statistics.total_failed + 1)
        return FailedPool(kept + (entry,), stats)

    def count_failure(self) -> FailedPool:
        return FailedPool(
            self.entries, replace(self.statistics, total_failed=self.statistics.total_failed + 1)
        )

    def count_permanent_failure(self) -> FailedPool:
        stats = replace(self.statistics, permanently_failed=self.statistics.permanently_failed + 1)
        return FailedPool(self.entries, stats)

    def count_retry_batch_sent(self) -> FailedPool:
        stats = replace(self.statistics, retry_batches_sent=self.statistics.retry_batches_sent + 1)
        return FailedPool(self.entries, stats)

    def count_successful_retry(self) -> FailedPool:
        stats = replace(self.statistics, successful_retries=self.statistics.successful_retries + 1)
        return FailedPool(self.entries, stats)

    def discard(self, comparison_id: str) -> FailedPool:
        return FailedPool(
            tuple(e for e in self.entries if e.comparison_id != comparison_id), self.statistics
        )

    def take_retry_batches(self, batch_size: int) -> tuple[FailedPool, list[list[PoolEntry]]]:
        """Empty the pool into retry batches of at most `batch_size`, oldest failures first.
        They count as sent when they are released (`count_retry_batch_sent`): a batch still
        queued when its assessment finishes is never sent."""
        ordered = sorted(self.entries, key=lambda e: (e.failed_at, e.comparison_id))
        chunks = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
        return FailedPool((), self.statistics), chunks
