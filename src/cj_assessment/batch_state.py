"""The batch state machine of one assessment, as pure functions over plain values.

`Progress` is what an assessment's state row (`cj_batch_states`) holds: the cumulative
counters and the `processing_metadata` (submission batches, iterations, failed-comparison
pool). Every transition takes the old progress and returns a new one; the edges load it under
the assessment's row lock and store it in the same transaction.

Counter invariants (never overwritten, never above 100%):
    completed + failed <= submitted <= total
where total counts planned comparisons (a comparison is one pair question, however many attempts
it takes), submitted those sent at least once, completed those answered with a winner and
failed those that exhausted their retries.

The budget (`max_comparisons`) caps LLM calls, retries included: `calls_committed` (first
attempts planned, retries planned, and one call held by each pooled failure for its retry)
never exceeds it. A failure that finds no call left is not retried (`FailedPool.unretried`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from cj_assessment.failed_pool import FailedPool, PoolEntry, PoolStatistics


class BatchStatus(StrEnum):
    QUEUED = "queued"
    IN_FLIGHT = "in_flight"
    DONE = "done"


class BatchKind(StrEnum):
    FIRST = "first"
    RETRY = "retry"


class AttemptStatus(StrEnum):
    QUEUED = "queued"
    IN_FLIGHT = "in_flight"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    SUPERSEDED = "superseded"  # answered after its comparison was already resolved


class Unanswered(StrEnum):
    """Why an attempt will get no answer: counted as a failed attempt all the same."""

    TIMEOUT = "timeout"  # overdue; a late answer can still rescue its comparison
    UNDELIVERABLE = "undeliverable"  # the broker refused the request; no answer can come

    @property
    def status(self) -> AttemptStatus:
        return AttemptStatus.TIMED_OUT if self is Unanswered.TIMEOUT else AttemptStatus.FAILED

    @property
    def error_code(self) -> str:
        """Stored in `cj_comparison_pairs.error_code`."""
        return self.value.upper()


@dataclass(frozen=True)
class SubmissionBatch:
    id: str
    iteration: int
    kind: BatchKind
    size: int
    status: BatchStatus = BatchStatus.QUEUED
    submitted_at: str | None = None
    results_in: int = 0
    failures: int = 0

    def to_json(self) -> dict[str, Any]:
        # Shallow on purpose: fields are plain values, and asdict's deep copy is the hot spot
        # of storing progress once per assessment per poll.
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SubmissionBatch:
        values = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        values["kind"] = BatchKind(values["kind"])
        values["status"] = BatchStatus(values["status"])
        return cls(**values)


@dataclass(frozen=True)
class IterationProgress:
    iteration: int
    planned: int
    first_attempts_outstanding: int
    succeeded: int = 0
    permanently_failed: int = 0
    completed_at: str | None = None
    max_score_change: float | None = None
    reliability: float | None = None  # calibrated
    scores: dict[str, float] | None = None
    # The next iteration's adaptive pairing reads scores and standard errors from here.
    standard_errors: dict[str, float] | None = None
    scale_separation_reliability: float | None = None
    # With this iteration every pair of essays has been planned: it waits for all its
    # comparisons rather than close at the threshold (see `completion_policy.iteration_done`).
    completes_pairs: bool = False

    @property
    def resolved(self) -> int:
        return self.succeeded + self.permanently_failed

    def to_json(self) -> dict[str, Any]:
        # Shallow on purpose: fields are plain values, and asdict's deep copy is the hot spot
        # of storing progress once per assessment per poll.
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> IterationProgress:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class Progress:
    total: int = 0
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    current_iteration: int = 0
    batches: tuple[SubmissionBatch, ...] = ()
    iterations: tuple[IterationProgress, ...] = ()
    pool: FailedPool = field(default_factory=FailedPool)

    # --- views ---------------------------------------------------------------------------

    def batch(self, batch_id: str) -> SubmissionBatch:
        return self.batches[_batch_index(self, batch_id)]

    def iteration(self, number: int) -> IterationProgress:
        return self.iterations[_iteration_index(self, number)]

    @property
    def current(self) -> IterationProgress | None:
        return self.iterations[-1] if self.iterations else None

    def in_flight(self) -> list[SubmissionBatch]:
        return [b for b in self.batches if b.status is BatchStatus.IN_FLIGHT]

    def queued(self) -> list[SubmissionBatch]:
        return [b for b in self.batches if b.status is BatchStatus.QUEUED]

    # --- metadata round trip -------------------------------------------------------------

    def metadata_json(self) -> dict[str, Any]:
        metadata = {
            "submission_batches": [b.to_json() for b in self.batches],
            "iterations": [i.to_json() for i in self.iterations],
            "failed_comparison_pool": [e.to_json() for e in self.pool.entries],
            "pool_statistics": self.pool.statistics.to_json(),
        }
        if self.pool.unretried:  # rare: only once a budget runs out with failures to retry
            metadata["unretried_comparisons"] = list(self.pool.unretried)
        return metadata

    @classmethod
    def from_state(
        cls,
        *,
        total: int,
        submitted: int,
        completed: int,
        failed: int,
        current_iteration: int,
        metadata: dict[str, Any],
    ) -> Progress:
        return cls(
            total=total,
            submitted=submitted,
            completed=completed,
            failed=failed,
            current_iteration=current_iteration,
            batches=tuple(
                SubmissionBatch.from_json(b) for b in metadata.get("submission_batches", [])
            ),
            iterations=tuple(
                IterationProgress.from_json(i) for i in metadata.get("iterations", [])
            ),
            pool=FailedPool(
                tuple(PoolEntry.from_json(e) for e in metadata.get("failed_comparison_pool", [])),
                PoolStatistics.from_json(metadata.get("pool_statistics")),
                tuple(metadata.get("unretried_comparisons", ())),
            ),
        )


def calls_committed(progress: Progress) -> int:
    """LLM calls the assessment has planned or holds, which its budget caps: first attempts,
    retries, and one call for the retry of each failure in the pool."""
    retries = sum(b.size for b in progress.batches if b.kind is BatchKind.RETRY)
    return progress.total + retries + len(progress.pool.entries)


# --- transitions -------------------------------------------------------------------------


def _evolve(record: Any, /, **changes: Any) -> Any:
    """`dataclasses.replace` for the frozen records of this module, which validate nothing in
    `__init__`: copies the fields instead of calling it. Every result applies several of
    these, and the generic version (field introspection plus a frozen `__init__`) was a
    quarter of the cost of handling a result."""
    values = record.__dict__.copy()
    values.update(changes)
    if len(values) != len(record.__dict__):  # a misspelt field would add a key
        unknown = changes.keys() - record.__dict__.keys()
        raise TypeError(f"{type(record).__name__} has no field(s) {sorted(unknown)}")
    new = object.__new__(type(record))
    object.__setattr__(new, "__dict__", values)
    return new


def _replaced(items: tuple[Any, ...], index: int, item: Any) -> tuple[Any, ...]:
    return items[:index] + (item,) + items[index + 1 :]


def _batch_index(progress: Progress, batch_id: str) -> int:
    for index, b in enumerate(progress.batches):
        if b.id == batch_id:
            return index
    raise KeyError(batch_id)


def _iteration_index(progress: Progress, number: int) -> int:
    # Scanned from the end: results nearly always answer the latest iteration.
    for index in range(len(progress.iterations) - 1, -1, -1):
        if progress.iterations[index].iteration == number:
            return index
    raise KeyError(number)


def _with_batch(progress: Progress, batch: SubmissionBatch) -> Progress:
    return _evolve(
        progress, batches=_replaced(progress.batches, _batch_index(progress, batch.id), batch)
    )


def _with_iteration(progress: Progress, it: IterationProgress) -> Progress:
    return _evolve(
        progress,
        iterations=_replaced(progress.iterations, _iteration_index(progress, it.iteration), it),
    )


def plan_iteration(
    progress: Progress,
    *,
    iteration: int,
    batch_ids: list[str],
    comparisons: int,
    batch_size: int,
    completes_pairs: bool = False,
) -> tuple[Progress, list[tuple[str, int]]]:
    """Record a new iteration of `comparisons` first attempts, split into queued submission
    batches of at most `batch_size`. Returns the batches as (id, size) in submission order.
    `completes_pairs`: with it every pair of essays has been planned."""
    if comparisons <= 0:
        raise ValueError("an iteration needs at least one comparison")
    sizes = [min(batch_size, comparisons - start) for start in range(0, comparisons, batch_size)]
    if len(batch_ids) < len(sizes):
        raise ValueError("not enough batch ids for the iteration")
    new_batches = tuple(
        SubmissionBatch(id=bid, iteration=iteration, kind=BatchKind.FIRST, size=size)
        for bid, size in zip(batch_ids, sizes, strict=False)
    )
    it = IterationProgress(
        iteration=iteration,
        planned=comparisons,
        first_attempts_outstanding=comparisons,
        completes_pairs=completes_pairs,
    )
    new = _evolve(
        progress,
        total=progress.total + comparisons,
        current_iteration=iteration,
        batches=progress.batches + new_batches,
        iterations=progress.iterations + (it,),
    )
    return new, [(b.id, b.size) for b in new_batches]


def plan_retry_batches(
    progress: Progress, *, batch_size: int, batch_ids: list[str]
) -> tuple[Progress, list[tuple[str, list[PoolEntry]]]]:
    """Empty the pool into queued retry batches (same pair, same orientation)."""
    pool, chunks = progress.pool.take_retry_batches(batch_size)
    if len(batch_ids) < len(chunks):
        raise ValueError("not enough batch ids for the retry batches")
    planned = list(zip(batch_ids, chunks, strict=False))
    new_batches = tuple(
        SubmissionBatch(
            id=bid,
            iteration=progress.current_iteration,
            kind=BatchKind.RETRY,
            size=len(chunk),
        )
        for bid, chunk in planned
    )
    return _evolve(progress, pool=pool, batches=progress.batches + new_batches), planned


def release_batches(
    progress: Progress, *, max_concurrent: int, now: str
) -> tuple[Progress, list[SubmissionBatch]]:
    """Send queued batches, oldest first, while fewer than `max_concurrent` are in flight."""
    released: list[SubmissionBatch] = []
    slots = max_concurrent - len(progress.in_flight())
    for batch in progress.queued():
        if slots <= 0:
            break
        sent = _evolve(batch, status=BatchStatus.IN_FLIGHT, submitted_at=now)
        progress = _with_batch(progress, sent)
        if batch.kind is BatchKind.FIRST:
            progress = _evolve(progress, submitted=progress.submitted + batch.size)
        else:
            progress = _evolve(progress, pool=progress.pool.count_retry_batch_sent())
        released.append(sent)
        slots -= 1
    return progress, released


def batch_reached_threshold(batch: SubmissionBatch, threshold: float) -> bool:
    """All results in, or the partial-completion share of them (one denominator: batch size)."""
    needed = min(batch.size, math.ceil(threshold * batch.size - 1e-9))
    return batch.results_in >= needed


class Disposition(StrEnum):
    SUCCEEDED = "succeeded"
    RETRY_POOLED = "retry_pooled"
    PERMANENTLY_FAILED = "permanently_failed"
    RESCUED = "rescued"  # a timed-out attempt answered after all; its comparison succeeds
    SUPERSEDED = "superseded"  # the attempt's result, but its comparison was already resolved
    DUPLICATE = "duplicate"  # this attempt already had its result


@dataclass(frozen=True)
class AttemptView:
    """One attempt as stored, with what is known about its comparison."""

    comparison_id: str
    correlation_id: str
    essay_a_id: str
    essay_b_id: str
    iteration: int
    attempt: int
    submission_batch_id: str
    status: AttemptStatus
    comparison_resolved: bool


def comparison_resolved(sibling_attempts: list[tuple[AttemptStatus, int]], max_retry: int) -> bool:
    """A comparison is resolved once any attempt succeeded or its last allowed attempt failed."""
    for status, attempt in sibling_attempts:
        if status is AttemptStatus.SUCCEEDED:
            return True
        if status in (AttemptStatus.FAILED, AttemptStatus.TIMED_OUT) and attempt > max_retry:
            return True
    return False


def record_outcome(
    progress: Progress,
    attempt: AttemptView,
    *,
    succeeded: bool,
    failure_reason: str | None,
    now: str,
    max_retry_attempts: int,
    threshold: float,
    budget: int | None = None,
) -> tuple[Progress, Disposition]:
    """Apply one attempt's outcome (a result or a timeout) to the progress. A failure is
    pooled for a retry while it has retries left and the `budget` (None: unlimited) has a
    call left for it; otherwise its comparison fails for good."""
    if attempt.status in (AttemptStatus.SUCCEEDED, AttemptStatus.FAILED, AttemptStatus.SUPERSEDED):
        return progress, Disposition.DUPLICATE
    if attempt.status is AttemptStatus.TIMED_OUT:
        # The attempt was already counted as failed; only a success that saves its comparison
        # changes anything.
        if not succeeded or attempt.comparison_resolved:
            return progress, Disposition.DUPLICATE
        return _comparison_rescued(progress, attempt), Disposition.RESCUED

    # One copy of the progress per result: the counters of the attempt's submission batch and
    # iteration and the comparison's outcome are applied together.
    batch_index = _batch_index(progress, attempt.submission_batch_id)
    batch = _counted(progress.batches[batch_index], failed=not succeeded, threshold=threshold)
    it_index = _iteration_index(progress, attempt.iteration)
    it = progress.iterations[it_index]
    it_changes: dict[str, int] = {}
    if attempt.attempt == 1:
        it_changes["first_attempts_outstanding"] = it.first_attempts_outstanding - 1
    changes: dict[str, Any] = {}
    retries_sent = attempt.attempt - 1
    if attempt.comparison_resolved:
        disposition = Disposition.SUPERSEDED
    elif succeeded:
        disposition = Disposition.SUCCEEDED
        it_changes["succeeded"] = it.succeeded + 1
        changes["completed"] = progress.completed + 1
        if attempt.attempt > 1:
            changes["pool"] = progress.pool.count_successful_retry()
    elif retries_sent >= max_retry_attempts or (
        budget is not None and calls_committed(progress) >= budget
    ):
        disposition = Disposition.PERMANENTLY_FAILED
        it_changes["permanently_failed"] = it.permanently_failed + 1
        changes["failed"] = progress.failed + 1
        changes["pool"] = (
            progress.pool.count_failure().count_permanent_failure()
            if retries_sent >= max_retry_attempts
            else progress.pool.give_up_over_budget(attempt.comparison_id)
        )
    else:
        disposition = Disposition.RETRY_POOLED
        entry = PoolEntry(
            comparison_id=attempt.comparison_id,
            correlation_id=attempt.correlation_id,
            essay_a_id=attempt.essay_a_id,
            essay_b_id=attempt.essay_b_id,
            iteration=attempt.iteration,
            failure_reason=failure_reason or "error",
            failed_at=now,
            retry_count=retries_sent,
            submission_batch_id=attempt.submission_batch_id,
        )
        changes["pool"] = progress.pool.add(entry)
    iterations = (
        _replaced(progress.iterations, it_index, _evolve(it, **it_changes))
        if it_changes
        else progress.iterations
    )
    progress = _evolve(
        progress,
        batches=_replaced(progress.batches, batch_index, batch),
        iterations=iterations,
        **changes,
    )
    return progress, disposition


def withdraw_answered(progress: Progress, *, batch_id: str, threshold: float) -> Progress:
    """A retry of the just-released batch `batch_id` whose comparison was answered while the
    retry queued (its timed-out attempt answered after all): never sent, it counts among the
    batch's results as superseded, so that the batch can still reach its threshold."""
    index = _batch_index(progress, batch_id)
    batch = _counted(progress.batches[index], failed=False, threshold=threshold)
    return _evolve(progress, batches=_replaced(progress.batches, index, batch))


def _counted(batch: SubmissionBatch, *, failed: bool, threshold: float) -> SubmissionBatch:
    """One more result of the batch; done once it reaches the partial-completion share."""
    batch = _evolve(batch, results_in=batch.results_in + 1, failures=batch.failures + failed)
    if batch.status is BatchStatus.IN_FLIGHT and batch_reached_threshold(batch, threshold):
        batch = _evolve(batch, status=BatchStatus.DONE)
    return batch


def _comparison_rescued(progress: Progress, attempt: AttemptView) -> Progress:
    """A timed-out attempt answered after all: its comparison succeeds and leaves the pool."""
    it = progress.iteration(attempt.iteration)
    progress = _with_iteration(progress, _evolve(it, succeeded=it.succeeded + 1))
    pool = progress.pool.discard(attempt.comparison_id)
    if attempt.attempt > 1:
        pool = pool.count_successful_retry()
    return _evolve(progress, completed=progress.completed + 1, pool=pool)


def close_iteration(
    progress: Progress,
    *,
    iteration: int,
    now: str,
    scores: dict[str, float],
    max_score_change: float | None,
    reliability: float | None,
    standard_errors: dict[str, float] | None = None,
    scale_separation_reliability: float | None = None,
) -> Progress:
    it = progress.iteration(iteration)
    closed = _evolve(
        it,
        completed_at=now,
        scores={k: round(v, 6) for k, v in scores.items()},
        max_score_change=max_score_change,
        reliability=reliability,
        standard_errors=None
        if standard_errors is None
        else {k: round(v, 6) for k, v in standard_errors.items()},
        scale_separation_reliability=scale_separation_reliability,
    )
    # Only the latest scores are read again (stability, adaptive pairing); older ones would
    # make the metadata that every result rewrites grow with essays x iterations.
    iterations = tuple(
        closed
        if i.iteration == iteration
        else (_evolve(i, scores=None, standard_errors=None) if i.scores is not None else i)
        for i in progress.iterations
    )
    return _evolve(progress, iterations=iterations)
