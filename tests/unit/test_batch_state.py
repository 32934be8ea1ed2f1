"""The batch state machine (`batch_state`): planning, releasing, recording outcomes.

The centrepiece is a hypothesis-driven simulation of one assessment that mirrors what the edges
do (store attempts, release batches, deliver results, time attempts out, form retry batches)
and checks the counter invariants after every step against an oracle kept in the test.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cj_assessment.batch_config import BatchConfig
from cj_assessment.batch_state import (
    AttemptStatus,
    AttemptView,
    BatchKind,
    BatchStatus,
    Disposition,
    IterationProgress,
    Progress,
    SubmissionBatch,
    batch_reached_threshold,
    calls_committed,
    close_iteration,
    comparison_resolved,
    plan_iteration,
    plan_retry_batches,
    record_outcome,
    release_batches,
    withdraw_answered,
)
from cj_assessment.completion_policy import iteration_done, retry_due
from cj_assessment.contracts import utc_iso
from cj_assessment.failed_pool import PoolStatistics
from tests.support.pool import failed_pool

NOW = "2026-01-01T12:00:00Z"
BASE = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def _config(
    *,
    batch_size: int = 50,
    max_concurrent: int = 3,
    threshold: float = 0.85,
    max_retry: int = 3,
    retry_threshold: int = 20,
    budget: int = 10_000,
) -> BatchConfig:
    return BatchConfig(
        batch_size=batch_size,
        max_concurrent_batches=max_concurrent,
        partial_completion_threshold=threshold,
        enable_stability_checking=True,
        stability_threshold=0.05,
        min_iterations_for_stability=2,
        max_comparisons=budget,
        matchings_per_iteration=5,
        failed_comparison_retry_threshold=retry_threshold,
        max_retry_attempts=max_retry,
        min_success_rate=0.8,
    )


def _roundtrip(progress: Progress) -> Progress:
    """What the edges do: store the metadata as JSON and load it again."""
    metadata = json.loads(json.dumps(progress.metadata_json()))
    return Progress.from_state(
        total=progress.total,
        submitted=progress.submitted,
        completed=progress.completed,
        failed=progress.failed,
        current_iteration=progress.current_iteration,
        metadata=metadata,
    )


# --- plan_iteration ----------------------------------------------------------------------------


def test_plan_iteration_splits_comparisons_into_batches_of_at_most_batch_size() -> None:
    progress, batches = plan_iteration(
        Progress(), iteration=1, batch_ids=_ids("b", 5), comparisons=47, batch_size=20
    )
    assert batches == [("b0", 20), ("b1", 20), ("b2", 7)]
    assert progress.total == 47
    assert progress.submitted == 0
    assert progress.current_iteration == 1
    assert [b.status for b in progress.batches] == [BatchStatus.QUEUED] * 3
    assert [b.kind for b in progress.batches] == [BatchKind.FIRST] * 3
    it = progress.iteration(1)
    assert (it.planned, it.first_attempts_outstanding, it.resolved) == (47, 47, 0)


def test_plan_iteration_adds_to_the_cumulative_total() -> None:
    progress, _ = plan_iteration(
        Progress(), iteration=1, batch_ids=["a"], comparisons=10, batch_size=10
    )
    progress, _ = plan_iteration(
        progress, iteration=2, batch_ids=["b", "c"], comparisons=15, batch_size=10
    )
    assert progress.total == 25
    assert progress.current_iteration == 2
    assert progress.current is not None and progress.current.iteration == 2
    assert [i.planned for i in progress.iterations] == [10, 15]


def test_plan_iteration_rejects_an_empty_iteration() -> None:
    with pytest.raises(ValueError):
        plan_iteration(Progress(), iteration=1, batch_ids=["b"], comparisons=0, batch_size=10)


def test_plan_iteration_rejects_too_few_batch_ids() -> None:
    with pytest.raises(ValueError):
        plan_iteration(Progress(), iteration=1, batch_ids=["b"], comparisons=11, batch_size=10)


@FAST
@given(comparisons=st.integers(1, 600), batch_size=st.integers(1, 200))
def test_plan_iteration_batches_cover_the_comparisons_exactly(
    comparisons: int, batch_size: int
) -> None:
    needed = math.ceil(comparisons / batch_size)
    progress, batches = plan_iteration(
        Progress(),
        iteration=1,
        batch_ids=_ids("b", needed + 2),
        comparisons=comparisons,
        batch_size=batch_size,
    )
    sizes = [size for _, size in batches]
    assert len(sizes) == needed
    assert sum(sizes) == comparisons == progress.total
    assert all(1 <= s <= batch_size for s in sizes)
    assert all(s == batch_size for s in sizes[:-1])
    assert [b.id for b in progress.batches] == [bid for bid, _ in batches]


# --- release_batches -----------------------------------------------------------------------------


def test_release_sends_oldest_batches_first_up_to_max_concurrent() -> None:
    progress, _ = plan_iteration(
        Progress(), iteration=1, batch_ids=_ids("b", 5), comparisons=45, batch_size=10
    )
    progress, released = release_batches(progress, max_concurrent=2, now=NOW)
    assert [b.id for b in released] == ["b0", "b1"]
    assert all(b.status is BatchStatus.IN_FLIGHT and b.submitted_at == NOW for b in released)
    assert [b.id for b in progress.in_flight()] == ["b0", "b1"]
    assert progress.submitted == 20

    # A full set of slots releases nothing.
    again, none = release_batches(progress, max_concurrent=2, now=NOW)
    assert none == [] and again == progress

    # One batch done frees exactly one slot, taken by the next queued batch.
    progress = replace(
        progress,
        batches=tuple(
            replace(b, status=BatchStatus.DONE) if b.id == "b0" else b for b in progress.batches
        ),
    )
    progress, released = release_batches(progress, max_concurrent=2, now=NOW)
    assert [b.id for b in released] == ["b2"]
    assert progress.submitted == 30


def test_release_counts_only_first_batches_as_submitted() -> None:
    progress, _ = plan_iteration(
        Progress(), iteration=1, batch_ids=["b0"], comparisons=10, batch_size=10
    )
    progress, _ = release_batches(progress, max_concurrent=3, now=NOW)
    progress = replace(progress, pool=failed_pool(4))
    progress, planned = plan_retry_batches(progress, batch_size=10, batch_ids=["r0"])
    assert [(bid, len(chunk)) for bid, chunk in planned] == [("r0", 4)]
    assert progress.batch("r0").kind is BatchKind.RETRY
    assert progress.pool.entries == ()
    progress, released = release_batches(progress, max_concurrent=3, now=NOW)
    assert [b.id for b in released] == ["r0"]
    assert progress.submitted == 10  # the retry batch is not counted again
    assert progress.total == 10
    assert progress.pool.statistics.retry_batches_sent == 1


def test_retries_answered_before_they_were_sent_count_toward_their_batch() -> None:
    progress, _ = plan_iteration(
        Progress(), iteration=1, batch_ids=["b0"], comparisons=2, batch_size=10
    )
    progress, _ = plan_retry_batches(
        replace(progress, pool=failed_pool(2)), batch_size=10, batch_ids=["r0"]
    )
    progress, _ = release_batches(progress, max_concurrent=3, now=NOW)
    once = withdraw_answered(progress, batch_id="r0", threshold=1.0)
    assert (once.batch("r0").results_in, once.batch("r0").status) == (1, BatchStatus.IN_FLIGHT)
    twice = withdraw_answered(once, batch_id="r0", threshold=1.0)
    assert (twice.batch("r0").results_in, twice.batch("r0").failures) == (2, 0)
    assert twice.batch("r0").status is BatchStatus.DONE
    assert (twice.completed, twice.failed, twice.iterations) == (0, 0, progress.iterations)


@FAST
@given(
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=4),
    batch_size=st.integers(1, 12),
    max_concurrent=st.integers(1, 5),
    finish=st.lists(st.integers(0, 50), max_size=20),
)
def test_release_never_exceeds_max_concurrent_and_keeps_fifo_order(
    sizes: list[int], batch_size: int, max_concurrent: int, finish: list[int]
) -> None:
    progress = Progress()
    for number, size in enumerate(sizes, start=1):
        progress, _ = plan_iteration(
            progress,
            iteration=number,
            batch_ids=_ids(f"i{number}-", size),
            comparisons=size,
            batch_size=batch_size,
        )
    order = [b.id for b in progress.batches]
    sent: list[str] = []
    progress, released = release_batches(progress, max_concurrent=max_concurrent, now=NOW)
    sent += [b.id for b in released]
    for pick in finish:
        assert len(progress.in_flight()) <= max_concurrent
        flying = progress.in_flight()
        if flying:
            done = flying[pick % len(flying)]
            progress = replace(
                progress,
                batches=tuple(
                    replace(b, status=BatchStatus.DONE) if b.id == done.id else b
                    for b in progress.batches
                ),
            )
        progress, released = release_batches(progress, max_concurrent=max_concurrent, now=NOW)
        sent += [b.id for b in released]
        assert len(progress.in_flight()) <= max_concurrent
        # Released while a slot is free: never leaves a free slot with batches waiting.
        assert not progress.queued() or len(progress.in_flight()) == max_concurrent
    assert sent == order[: len(sent)]
    assert progress.submitted == sum(progress.batch(bid).size for bid in sent)
    assert progress.submitted <= progress.total


# --- batch threshold -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "threshold", "needed"),
    [(20, 0.85, 17), (47, 0.85, 40), (100, 0.85, 85), (10, 1.0, 10), (3, 0.5, 2), (1, 0.5, 1)],
)
def test_batch_reaches_threshold_at_the_share_of_its_size(
    size: int, threshold: float, needed: int
) -> None:
    batch = SubmissionBatch(id="b", iteration=1, kind=BatchKind.FIRST, size=size)
    assert not batch_reached_threshold(replace(batch, results_in=needed - 1), threshold)
    assert batch_reached_threshold(replace(batch, results_in=needed), threshold)


# --- record_outcome, single steps ---------------------------------------------------------------


def _one_batch(size: int = 4) -> Progress:
    progress, _ = plan_iteration(
        Progress(), iteration=1, batch_ids=["b0"], comparisons=size, batch_size=size
    )
    progress, _ = release_batches(progress, max_concurrent=1, now=NOW)
    return progress


def _view(
    *,
    cid: str = "c0",
    attempt: int = 1,
    status: AttemptStatus = AttemptStatus.IN_FLIGHT,
    resolved: bool = False,
    batch: str = "b0",
) -> AttemptView:
    return AttemptView(
        comparison_id=cid,
        correlation_id=f"{cid}-{attempt}",
        essay_a_id="e1",
        essay_b_id="e2",
        iteration=1,
        attempt=attempt,
        submission_batch_id=batch,
        status=status,
        comparison_resolved=resolved,
    )


def _record(progress: Progress, view: AttemptView, succeeded: bool, max_retry: int = 3):
    return record_outcome(
        progress,
        view,
        succeeded=succeeded,
        failure_reason=None if succeeded else "timeout",
        now=NOW,
        max_retry_attempts=max_retry,
        threshold=1.0,
    )


def test_a_success_counts_one_completed_comparison() -> None:
    progress, disposition = _record(_one_batch(), _view(), succeeded=True)
    assert disposition is Disposition.SUCCEEDED
    assert (progress.completed, progress.failed) == (1, 0)
    assert progress.batch("b0").results_in == 1
    assert progress.iteration(1).first_attempts_outstanding == 3
    assert progress.iteration(1).succeeded == 1


def test_a_failure_with_retries_left_joins_the_pool_in_its_orientation() -> None:
    progress, disposition = _record(_one_batch(), _view(), succeeded=False)
    assert disposition is Disposition.RETRY_POOLED
    assert (progress.completed, progress.failed) == (0, 0)
    (entry,) = progress.pool.entries
    assert (entry.comparison_id, entry.essay_a_id, entry.essay_b_id) == ("c0", "e1", "e2")
    assert entry.retry_count == 0
    assert entry.failure_reason == "timeout"
    assert progress.batch("b0").failures == 1


def test_the_last_allowed_attempt_failing_fails_the_comparison_for_good() -> None:
    progress, disposition = _record(_one_batch(), _view(attempt=3), succeeded=False, max_retry=2)
    assert disposition is Disposition.PERMANENTLY_FAILED
    assert progress.failed == 1
    assert progress.pool.entries == ()
    assert progress.pool.statistics.permanently_failed == 1
    assert progress.iteration(1).permanently_failed == 1


def test_a_failure_with_no_call_left_in_the_budget_fails_for_good_without_a_retry() -> None:
    progress = _one_batch(size=4)  # 4 first attempts planned
    common = dict(now=NOW, max_retry_attempts=3, threshold=1.0, failure_reason="error")
    progress, first = record_outcome(progress, _view(cid="c0"), succeeded=False, budget=5, **common)
    assert first is Disposition.RETRY_POOLED  # the fifth call is held for its retry
    assert calls_committed(progress) == 5
    progress, second = record_outcome(
        progress, _view(cid="c1"), succeeded=False, budget=5, **common
    )
    assert second is Disposition.PERMANENTLY_FAILED
    assert progress.failed == 1 and progress.iteration(1).permanently_failed == 1
    assert progress.pool.gave_up("c1") and not progress.pool.gave_up("c0")
    assert progress.pool.statistics.unretried_over_budget == 1
    assert [e.comparison_id for e in progress.pool.entries] == ["c0"]
    assert _roundtrip(progress) == progress


def test_no_retries_allowed_fails_at_the_first_failure() -> None:
    _, disposition = _record(_one_batch(), _view(), succeeded=False, max_retry=0)
    assert disposition is Disposition.PERMANENTLY_FAILED


@pytest.mark.parametrize(
    "status", [AttemptStatus.SUCCEEDED, AttemptStatus.FAILED, AttemptStatus.SUPERSEDED]
)
@pytest.mark.parametrize("succeeded", [True, False])
def test_an_attempt_delivered_twice_is_a_duplicate_that_changes_nothing(
    status: AttemptStatus, succeeded: bool
) -> None:
    before = _one_batch()
    after, disposition = _record(before, _view(status=status), succeeded=succeeded)
    assert disposition is Disposition.DUPLICATE
    assert after == before


def test_a_success_after_timeout_rescues_the_comparison_and_leaves_the_pool() -> None:
    progress, disposition = _record(_one_batch(), _view(), succeeded=False)
    assert disposition is Disposition.RETRY_POOLED
    progress, disposition = _record(progress, _view(status=AttemptStatus.TIMED_OUT), True)
    assert disposition is Disposition.RESCUED
    assert progress.completed == 1
    assert progress.pool.entries == ()
    assert progress.batch("b0").results_in == 1  # the timeout already counted this result
    assert progress.iteration(1).first_attempts_outstanding == 3


def test_a_failure_after_timeout_is_a_duplicate() -> None:
    progress, _ = _record(_one_batch(), _view(), succeeded=False)
    after, disposition = _record(progress, _view(status=AttemptStatus.TIMED_OUT), False)
    assert disposition is Disposition.DUPLICATE
    assert after == progress


def test_a_result_for_an_already_resolved_comparison_is_superseded() -> None:
    progress, disposition = _record(_one_batch(), _view(resolved=True), succeeded=True)
    assert disposition is Disposition.SUPERSEDED
    assert (progress.completed, progress.failed) == (0, 0)
    assert progress.batch("b0").results_in == 1


def test_comparison_resolved_by_success_or_by_the_last_allowed_failure() -> None:
    S, F, T = AttemptStatus.SUCCEEDED, AttemptStatus.FAILED, AttemptStatus.TIMED_OUT
    assert comparison_resolved([(F, 1), (S, 2)], 3)
    assert not comparison_resolved([(F, 1), (T, 2)], 3)
    assert comparison_resolved([(F, 1), (F, 2), (T, 3), (F, 4)], 3)
    assert comparison_resolved([(T, 1)], 0)
    assert not comparison_resolved([(AttemptStatus.IN_FLIGHT, 1)], 0)


# --- metadata round trip -------------------------------------------------------------------------


def test_closing_an_iteration_keeps_only_the_latest_scores() -> None:
    progress = Progress()
    for iteration in (1, 2):
        progress, _ = plan_iteration(
            progress,
            iteration=iteration,
            batch_ids=[f"b{iteration}"],
            comparisons=4,
            batch_size=10,
        )
        progress = close_iteration(
            progress,
            iteration=iteration,
            now=NOW,
            scores={"e1": 0.1 * iteration, "e2": -0.1 * iteration},
            max_score_change=None,
            reliability=0.5 + 0.1 * iteration,
            standard_errors={"e1": 0.3, "e2": 0.3},
        )
    first, second = progress.iterations
    assert first.scores is None and first.standard_errors is None
    assert first.reliability == pytest.approx(0.6) and first.completed_at == NOW
    assert second.scores == {"e1": 0.2, "e2": -0.2}
    assert second.standard_errors == {"e1": 0.3, "e2": 0.3}


def test_progress_round_trips_through_its_metadata_json() -> None:
    progress, _ = plan_iteration(
        Progress(), iteration=1, batch_ids=_ids("b", 3), comparisons=25, batch_size=10
    )
    progress, _ = release_batches(progress, max_concurrent=2, now=NOW)
    progress, _ = _record(progress, _view(), succeeded=False)
    progress, _ = _record(progress, _view(cid="c1"), succeeded=True)
    progress = close_iteration(
        progress,
        iteration=1,
        now=NOW,
        scores={"e1": 0.1234567891, "e2": -0.1234567891},
        max_score_change=0.02,
        reliability=0.8,
        standard_errors={"e1": 0.3333333333, "e2": 0.25},
        scale_separation_reliability=0.9,
    )
    progress, _ = plan_iteration(
        progress, iteration=2, batch_ids=["b9"], comparisons=5, batch_size=10
    )
    assert _roundtrip(progress) == progress
    assert progress.iteration(1).standard_errors == {"e1": 0.333333, "e2": 0.25}
    assert progress.iteration(1).scale_separation_reliability == 0.9
    metadata = progress.metadata_json()
    assert set(metadata) == {
        "submission_batches",
        "iterations",
        "failed_comparison_pool",
        "pool_statistics",
    }


def test_iteration_stored_before_standard_errors_existed_loads_without_them() -> None:
    stored = {
        "iteration": 1,
        "planned": 10,
        "first_attempts_outstanding": 0,
        "succeeded": 10,
        "completed_at": NOW,
        "max_score_change": None,
        "reliability": 0.7,
        "scores": {"e1": 0.5, "e2": -0.5},
    }
    iteration = IterationProgress.from_json(stored)
    assert iteration.scores == {"e1": 0.5, "e2": -0.5}
    assert iteration.standard_errors is None and iteration.scale_separation_reliability is None


def test_progress_from_empty_metadata_is_empty() -> None:
    progress = Progress.from_state(
        total=0, submitted=0, completed=0, failed=0, current_iteration=0, metadata={}
    )
    assert progress == Progress()
    assert progress.pool.statistics == PoolStatistics()


# --- the simulation ------------------------------------------------------------------------------

LIVE = (AttemptStatus.QUEUED, AttemptStatus.IN_FLIGHT)
ANSWERED = (AttemptStatus.SUCCEEDED, AttemptStatus.FAILED, AttemptStatus.SUPERSEDED)


@dataclass
class Attempt:
    correlation_id: str
    comparison_id: str
    essay_a_id: str
    essay_b_id: str
    iteration: int
    attempt: int
    batch_id: str
    status: AttemptStatus = AttemptStatus.QUEUED


class Simulation:
    """One assessment driven like the edges drive it; the test's own bookkeeping is the oracle."""

    def __init__(self, config: BatchConfig, later_iterations: list[int]) -> None:
        self.config = config
        self.progress = Progress()
        self.attempts: dict[str, Attempt] = {}
        self.orientation: dict[str, tuple[str, str]] = {}
        self.counted: dict[str, str] = {}  # comparison -> "completed" | "failed"
        self.failures: Counter[str] = Counter()  # failures while unresolved
        self.dispositions: Counter[Disposition] = Counter()
        self.successful_retries = 0
        self.retry_batches = 0
        self.later_iterations = list(later_iterations)
        self.clock = 0
        self.serial = 0

    # edges ---------------------------------------------------------------------------------

    def now(self) -> str:
        self.clock += 1
        return utc_iso(BASE + timedelta(seconds=self.clock))

    def new_id(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}{self.serial}"

    def plan(self, comparisons: int) -> None:
        iteration = self.progress.current_iteration + 1
        size = self.config.batch_size
        ids = [self.new_id("b") for _ in range(math.ceil(comparisons / size))]
        self.progress, batches = plan_iteration(
            self.progress,
            iteration=iteration,
            batch_ids=ids,
            comparisons=comparisons,
            batch_size=size,
        )
        for batch_id, batch_size in batches:
            for _ in range(batch_size):
                cid = self.new_id("c")
                # Alternate orientations so that a swapped pair would be noticed.
                pair = (f"{cid}-x", f"{cid}-y") if self.serial % 2 else (f"{cid}-y", f"{cid}-x")
                self.orientation[cid] = pair
                self._store(cid, pair, iteration, 1, batch_id)

    def _store(
        self, cid: str, pair: tuple[str, str], iteration: int, attempt: int, batch_id: str
    ) -> None:
        corr = self.new_id("r")
        self.attempts[corr] = Attempt(corr, cid, pair[0], pair[1], iteration, attempt, batch_id)

    def plan_retries(self) -> None:
        pool_before = self.progress.pool.entries
        size = self.config.batch_size
        ids = [self.new_id("rb") for _ in range(math.ceil(len(pool_before) / size))]
        self.progress, planned = plan_retry_batches(self.progress, batch_size=size, batch_ids=ids)
        self.retry_batches += len(planned)
        assert self.progress.pool.entries == ()
        assert {e.comparison_id for _, c in planned for e in c} == {
            e.comparison_id for e in pool_before
        }
        for batch_id, entries in planned:
            assert 1 <= len(entries) <= size
            assert self.progress.batch(batch_id).kind is BatchKind.RETRY
            for entry in entries:
                cid = entry.comparison_id
                assert (entry.essay_a_id, entry.essay_b_id) == self.orientation[cid]
                assert cid not in self.counted
                assert entry.retry_count + 1 == self.failures[cid]
                self._store(
                    cid,
                    (entry.essay_a_id, entry.essay_b_id),
                    entry.iteration,
                    entry.retry_count + 2,
                    batch_id,
                )

    def release(self) -> None:
        queued_before = [b.id for b in self.progress.queued()]
        free = self.config.max_concurrent_batches - len(self.progress.in_flight())
        self.progress, released = release_batches(
            self.progress, max_concurrent=self.config.max_concurrent_batches, now=self.now()
        )
        ids = [b.id for b in released]
        assert ids == queued_before[: max(0, min(free, len(queued_before)))]
        for attempt in self.attempts.values():
            if attempt.batch_id in ids:
                assert attempt.status is AttemptStatus.QUEUED
                attempt.status = AttemptStatus.IN_FLIGHT

    def advance(self) -> None:
        """What `WorkflowOrchestrator.advance` does with the state machine."""
        while True:
            if retry_due(self.progress, self.config):
                self.plan_retries()
            self.release()
            if not iteration_done(self.progress, self.config):
                return
            if self.progress.pool.entries:
                self.plan_retries()
                self.release()
            self.progress = close_iteration(
                self.progress,
                iteration=self.progress.current_iteration,
                now=self.now(),
                scores={"e": 0.0},
                max_score_change=None,
                reliability=None,
            )
            # What the budget leaves after first attempts, retries and pooled failures.
            remaining = self.config.max_comparisons - calls_committed(self.progress)
            if not self.later_iterations or remaining <= 0:
                return
            self.plan(min(remaining, self.later_iterations.pop(0)))

    def deliver(self, corr: str, *, succeeded: bool, timeout: bool = False) -> Disposition:
        attempt = self.attempts[corr]
        cid = attempt.comparison_id
        siblings = [(a.status, a.attempt) for a in self.attempts.values() if a.comparison_id == cid]
        resolved = comparison_resolved(
            siblings, self.config.max_retry_attempts
        ) or self.progress.pool.gave_up(cid)
        assert resolved == (cid in self.counted)

        if attempt.status in ANSWERED:
            expected = Disposition.DUPLICATE
        elif attempt.status is AttemptStatus.TIMED_OUT:
            expected = Disposition.RESCUED if succeeded and not resolved else Disposition.DUPLICATE
        elif resolved:
            expected = Disposition.SUPERSEDED
        elif succeeded:
            expected = Disposition.SUCCEEDED
        elif self.failures[cid] + 1 > self.config.max_retry_attempts:
            expected = Disposition.PERMANENTLY_FAILED
        elif calls_committed(self.progress) >= self.config.max_comparisons:
            expected = Disposition.PERMANENTLY_FAILED  # no call left in the budget to retry it
        else:
            expected = Disposition.RETRY_POOLED

        before = self.progress
        after, disposition = record_outcome(
            before,
            AttemptView(
                comparison_id=cid,
                correlation_id=corr,
                essay_a_id=attempt.essay_a_id,
                essay_b_id=attempt.essay_b_id,
                iteration=attempt.iteration,
                attempt=attempt.attempt,
                submission_batch_id=attempt.batch_id,
                status=attempt.status,
                comparison_resolved=resolved,
            ),
            succeeded=succeeded,
            failure_reason=None if succeeded else ("timeout" if timeout else "error"),
            now=self.now(),
            max_retry_attempts=self.config.max_retry_attempts,
            threshold=self.config.partial_completion_threshold,
            budget=self.config.max_comparisons,
        )
        assert disposition is expected
        self.dispositions[disposition] += 1
        if disposition is Disposition.DUPLICATE:
            assert after == before
            return disposition

        # No comparison is counted twice: each event adds at most one, to an uncounted one.
        d_completed = after.completed - before.completed
        d_failed = after.failed - before.failed
        assert d_completed >= 0 and d_failed >= 0 and d_completed + d_failed <= 1
        if d_completed + d_failed:
            assert cid not in self.counted
            self.counted[cid] = "completed" if d_completed else "failed"
            if d_completed and attempt.attempt > 1:
                self.successful_retries += 1
        if not succeeded and not resolved:
            self.failures[cid] += 1
        self.progress = after

        # Store the attempt as the handler does.
        if timeout:
            attempt.status = AttemptStatus.TIMED_OUT
        elif disposition is Disposition.SUPERSEDED:
            attempt.status = AttemptStatus.SUPERSEDED
        elif disposition is Disposition.RESCUED or succeeded:
            attempt.status = AttemptStatus.SUCCEEDED
        else:
            attempt.status = AttemptStatus.FAILED
        return disposition

    # invariants ------------------------------------------------------------------------------

    def check(self) -> None:
        p, cfg = self.progress, self.config
        assert 0 <= p.completed + p.failed <= p.submitted <= p.total
        assert p.completed == sum(1 for v in self.counted.values() if v == "completed")
        assert p.failed == sum(1 for v in self.counted.values() if v == "failed")
        assert len(p.in_flight()) <= cfg.max_concurrent_batches
        assert p.total == sum(i.planned for i in p.iterations)
        assert p.submitted == sum(
            b.size
            for b in p.batches
            if b.kind is BatchKind.FIRST and b.status is not BatchStatus.QUEUED
        )

        for batch in p.batches:
            assert 0 <= batch.failures <= batch.results_in <= batch.size
            attempts = [a for a in self.attempts.values() if a.batch_id == batch.id]
            assert len(attempts) == batch.size
            answered = sum(1 for a in attempts if a.status not in LIVE)
            assert batch.results_in == answered
            if batch.status is BatchStatus.QUEUED:
                assert all(a.status is AttemptStatus.QUEUED for a in attempts)
            if answered == batch.size:
                assert batch.status is BatchStatus.DONE

        for it in p.iterations:
            outstanding = sum(
                1
                for a in self.attempts.values()
                if a.iteration == it.iteration and a.attempt == 1 and a.status in LIVE
            )
            assert it.first_attempts_outstanding == outstanding
            assert 0 <= it.resolved <= it.planned
            counted_here = [
                v for c, v in self.counted.items() if self._iteration_of(c) == it.iteration
            ]
            assert it.succeeded == counted_here.count("completed")
            assert it.permanently_failed == counted_here.count("failed")

        pool_ids = [e.comparison_id for e in p.pool.entries]
        assert len(pool_ids) == len(set(pool_ids))  # one entry per comparison
        for entry in p.pool.entries:
            cid = entry.comparison_id
            assert (entry.essay_a_id, entry.essay_b_id) == self.orientation[cid]
            assert cid not in self.counted
            assert not any(
                a.comparison_id == cid and a.status in LIVE for a in self.attempts.values()
            )

        # Every LLM call, sent or still queued, and every call held for a pooled retry, is
        # within the budget.
        assert len(self.attempts) + len(p.pool.entries) == calls_committed(p)
        assert calls_committed(p) <= cfg.max_comparisons

        limit = cfg.max_retry_attempts + 1
        for cid in self.orientation:
            assert self.failures[cid] <= limit
            if self.failures[cid] == limit:
                assert self.counted.get(cid) == "failed"
            if self.counted.get(cid) == "failed":
                # Out of retries, or out of budget for the next one.
                assert self.failures[cid] == limit or p.pool.gave_up(cid)
        assert len(set(p.pool.unretried)) == len(p.pool.unretried)
        assert all(self.counted.get(cid) == "failed" for cid in p.pool.unretried)

        stats = p.pool.statistics
        assert stats.permanently_failed == p.failed
        assert stats.unretried_over_budget == len(p.pool.unretried)
        assert stats.total_failed == (
            self.dispositions[Disposition.RETRY_POOLED]
            + self.dispositions[Disposition.PERMANENTLY_FAILED]
        )
        assert stats.successful_retries == self.successful_retries
        assert self.retry_batches == sum(1 for b in p.batches if b.kind is BatchKind.RETRY)
        assert stats.retry_batches_sent == sum(
            1 for b in p.batches if b.kind is BatchKind.RETRY and b.status is not BatchStatus.QUEUED
        )

        assert _roundtrip(p) == p

    def _iteration_of(self, cid: str) -> int:
        return next(a.iteration for a in self.attempts.values() if a.comparison_id == cid)

    def with_status(self, *statuses: AttemptStatus) -> list[str]:
        return [c for c, a in self.attempts.items() if a.status in statuses]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_interleavings_keep_the_counter_invariants(data: st.DataObject) -> None:
    config = _config(
        batch_size=data.draw(st.integers(1, 12), label="batch_size"),
        max_concurrent=data.draw(st.integers(1, 5), label="max_concurrent"),
        threshold=data.draw(st.sampled_from([0.5, 0.6, 0.85, 0.9, 1.0]), label="threshold"),
        max_retry=data.draw(st.integers(0, 3), label="max_retry"),
        retry_threshold=data.draw(st.integers(1, 8), label="retry_threshold"),
    )
    first = data.draw(st.integers(1, 40), label="comparisons")
    later = data.draw(st.lists(st.integers(1, 15), max_size=2), label="later_iterations")
    # A budget (LLM calls, retries included) from none to spare to far more than needed.
    spare = data.draw(st.sampled_from([0, 1, 3, 10, 10_000]), label="budget_spare")
    config = replace(config, max_comparisons=first + spare)
    sim = Simulation(config, later)
    sim.plan(first)
    sim.advance()
    sim.check()

    for _ in range(data.draw(st.integers(0, 120), label="steps")):
        in_flight = sim.with_status(AttemptStatus.IN_FLIGHT)
        answered = sim.with_status(*ANSWERED)
        timed_out = sim.with_status(AttemptStatus.TIMED_OUT)
        kinds = (["result", "timeout"] if in_flight else []) + (["duplicate"] if answered else [])
        kinds += ["late"] if timed_out else []
        if not kinds:
            break
        kind = data.draw(st.sampled_from(kinds))
        if kind == "result":
            sim.deliver(data.draw(st.sampled_from(in_flight)), succeeded=data.draw(st.booleans()))
        elif kind == "timeout":
            sim.deliver(data.draw(st.sampled_from(in_flight)), succeeded=False, timeout=True)
        elif kind == "duplicate":
            disposition = sim.deliver(
                data.draw(st.sampled_from(answered)), succeeded=data.draw(st.booleans())
            )
            assert disposition is Disposition.DUPLICATE
        else:
            sim.deliver(data.draw(st.sampled_from(timed_out)), succeeded=data.draw(st.booleans()))
        sim.advance()
        sim.check()

    # Drain: every attempt still out gets an answer; the assessment must not get stuck.
    rnd = data.draw(st.randoms(use_true_random=False), label="drain")
    for _ in range(5_000):
        in_flight = sim.with_status(AttemptStatus.IN_FLIGHT)
        if not in_flight:
            break
        sim.deliver(rnd.choice(in_flight), succeeded=rnd.random() < 0.7)
        sim.advance()
        sim.check()
    p = sim.progress
    assert sim.with_status(*LIVE) == []
    assert p.pool.entries == ()
    assert p.queued() == [] and p.in_flight() == []
    assert p.completed + p.failed == p.submitted == p.total
    assert set(sim.counted) == set(sim.orientation)
    assert all(it.first_attempts_outstanding == 0 for it in p.iterations)
    assert all(it.resolved == it.planned for it in p.iterations)
    for disposition in sim.dispositions:
        event(f"disposition {disposition.value}")
