"""When to retry, when an iteration is done, and what to decide after scoring."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from cj_assessment.batch_config import BatchConfig
from cj_assessment.batch_state import (
    BatchKind,
    BatchStatus,
    IterationProgress,
    Progress,
    SubmissionBatch,
    plan_iteration,
    release_batches,
)
from cj_assessment.completion_policy import (
    Decision,
    Verdict,
    decide_after_scoring,
    first_iteration_size,
    iteration_done,
    retry_due,
)
from tests.support.pool import failed_pool

NOW = "2026-01-01T12:00:00Z"


def _config(**overrides: object) -> BatchConfig:
    values: dict[str, object] = {
        "batch_size": 50,
        "max_concurrent_batches": 3,
        "partial_completion_threshold": 0.85,
        "enable_stability_checking": True,
        "stability_threshold": 0.05,
        "min_iterations_for_stability": 2,
        "max_comparisons": 1000,
        "matchings_per_iteration": 5,
        "failed_comparison_retry_threshold": 20,
        "max_retry_attempts": 3,
        "min_success_rate": 0.8,
    }
    values.update(overrides)
    return BatchConfig(**values)  # type: ignore[arg-type]


def _sent_iteration(planned: int, *, batch_size: int = 50) -> Progress:
    """An iteration of `planned` comparisons with all its batches released (an in-flight batch
    per slot; the policy only looks at whether first batches are still queued)."""
    batches = math.ceil(planned / batch_size)
    progress, _ = plan_iteration(
        Progress(),
        iteration=1,
        batch_ids=[f"b{i}" for i in range(batches)],
        comparisons=planned,
        batch_size=batch_size,
    )
    progress, _ = release_batches(progress, max_concurrent=batches, now=NOW)
    assert progress.queued() == []
    return progress


def _with_current(progress: Progress, **changes: object) -> Progress:
    """The current iteration changed, and the assessment's counters with it (one iteration)."""
    current = progress.current
    assert current is not None
    changed = replace(current, **changes)
    return replace(
        progress,
        iterations=progress.iterations[:-1] + (changed,),
        completed=changed.succeeded,
        failed=changed.permanently_failed,
    )


# --- retry_due -------------------------------------------------------------------------------


def test_retry_is_not_due_with_an_empty_pool() -> None:
    progress = _with_current(_sent_iteration(20), first_attempts_outstanding=0)
    assert not retry_due(progress, _config())
    assert not retry_due(Progress(), _config())


def test_retry_is_due_once_the_pool_reaches_the_threshold() -> None:
    progress = _sent_iteration(100)  # first attempts still outstanding
    config = _config(failed_comparison_retry_threshold=5)
    assert not retry_due(replace(progress, pool=failed_pool(4)), config)
    assert retry_due(replace(progress, pool=failed_pool(5)), config)
    assert retry_due(replace(progress, pool=failed_pool(9)), config)


@pytest.mark.parametrize("pool_size", [1, 2, 19])
def test_retry_is_due_at_end_of_iteration_whatever_the_pool_size(pool_size: int) -> None:
    progress = _with_current(_sent_iteration(100), first_attempts_outstanding=0)
    config = _config(failed_comparison_retry_threshold=20)
    assert retry_due(replace(progress, pool=failed_pool(pool_size)), config)


def test_retry_waits_while_first_attempts_are_outstanding_below_threshold() -> None:
    progress = _with_current(_sent_iteration(100), first_attempts_outstanding=1)
    config = _config(failed_comparison_retry_threshold=20)
    assert not retry_due(replace(progress, pool=failed_pool(19)), config)


# --- iteration_done --------------------------------------------------------------------------


@pytest.mark.parametrize(("planned", "needed"), [(20, 17), (47, 40), (100, 85)])
def test_iteration_done_exactly_at_the_threshold_share_of_planned(
    planned: int, needed: int
) -> None:
    progress = _sent_iteration(planned, batch_size=10)
    config = _config(partial_completion_threshold=0.85)
    below = _with_current(progress, succeeded=needed - 1)
    assert not iteration_done(below, config)
    at = _with_current(progress, succeeded=needed)
    assert iteration_done(at, config)


def test_the_iteration_that_planned_the_last_unseen_pairs_waits_for_retries_owed() -> None:
    config = _config(partial_completion_threshold=0.85)
    progress = _with_current(_sent_iteration(15), completes_pairs=True)
    # 13 answered, 2 first attempts failed: their retries are owed.
    owed = _with_current(progress, succeeded=13, first_attempts_outstanding=0)
    assert not iteration_done(owed, config)
    # 13 answered, 2 still out: stragglers are not waited for, as at any close.
    out = _with_current(progress, succeeded=13, first_attempts_outstanding=2)
    assert iteration_done(out, config)
    retried = _with_current(owed, succeeded=14, permanently_failed=1)
    assert iteration_done(retried, config)


def test_iteration_done_counts_permanent_failures_as_resolved() -> None:
    progress = _sent_iteration(20, batch_size=10)
    # A success rate that closing would not fail on (10 of 17 is below the default 0.8).
    config = _config(partial_completion_threshold=0.85, min_success_rate=0.5)
    assert iteration_done(_with_current(progress, succeeded=10, permanently_failed=7), config)
    assert not iteration_done(_with_current(progress, succeeded=10, permanently_failed=6), config)


def test_the_denominator_is_planned_not_first_attempts_answered() -> None:
    # All first attempts answered, most of them failed and waiting in the pool: not done.
    progress = _with_current(
        _sent_iteration(20, batch_size=10), first_attempts_outstanding=0, succeeded=10
    )
    assert not iteration_done(progress, _config(partial_completion_threshold=0.85))


def test_iteration_not_done_while_a_first_batch_is_still_queued() -> None:
    progress, _ = plan_iteration(
        Progress(), iteration=1, batch_ids=["b0", "b1"], comparisons=100, batch_size=50
    )
    progress, released = release_batches(progress, max_concurrent=1, now=NOW)
    assert [b.id for b in released] == ["b0"]
    config = _config(partial_completion_threshold=0.5)
    resolved_half = _with_current(progress, succeeded=50)
    assert not iteration_done(resolved_half, config)
    sent_all, _ = release_batches(resolved_half, max_concurrent=2, now=NOW)
    assert iteration_done(sent_all, config)


def test_an_iteration_that_would_fail_at_its_threshold_waits_for_answers_still_to_come() -> None:
    # Threshold 0.5, no retries: 5 errors of 10 reach it, and closing would fail the
    # assessment (nothing succeeded) while 5 answers are still on their way.
    progress = _sent_iteration(10, batch_size=10)
    config = _config(partial_completion_threshold=0.5, max_retry_attempts=0, min_success_rate=0.5)
    errors_first = _with_current(progress, permanently_failed=5, first_attempts_outstanding=5)
    assert not iteration_done(errors_first, config)
    # Once nothing more can come, it closes (and the decision fails it).
    all_in = _with_current(progress, permanently_failed=10, first_attempts_outstanding=0)
    assert iteration_done(all_in, config)
    # An iteration that would not fail closes at the threshold as usual.
    fine = _with_current(progress, succeeded=5, first_attempts_outstanding=5)
    assert iteration_done(fine, config)
    # Nor does it wait when even every answer to come could not spare it: 1 of 6 at most.
    six = replace(progress, total=6, batches=(replace(progress.batches[0], size=6),))
    hopeless = _with_current(six, planned=6, permanently_failed=5, first_attempts_outstanding=1)
    assert iteration_done(hopeless, config)


def test_an_iteration_below_the_success_rate_waits_for_every_unresolved_comparison() -> None:
    # 14 succeeded and 4 failed for good (78%). The 2 unresolved comparisons are retries in a
    # batch already past its own threshold: if both succeed, 80%.
    sent = _sent_iteration(20, batch_size=10)
    retries = SubmissionBatch(
        id="r1", iteration=1, kind=BatchKind.RETRY, size=6, status=BatchStatus.DONE, results_in=5
    )
    progress = replace(sent, batches=sent.batches + (retries,))
    config = _config(partial_completion_threshold=0.85, min_success_rate=0.8)
    waiting = _with_current(
        progress, succeeded=14, permanently_failed=4, first_attempts_outstanding=0
    )
    assert not iteration_done(waiting, config)
    settled = _with_current(
        progress, succeeded=14, permanently_failed=6, first_attempts_outstanding=0
    )
    assert iteration_done(settled, config)


def test_iteration_done_when_every_comparison_is_resolved() -> None:
    progress = _with_current(_sent_iteration(47), succeeded=40, permanently_failed=7)
    assert iteration_done(progress, _config(partial_completion_threshold=1.0))


def test_threshold_one_waits_for_every_comparison() -> None:
    progress = _sent_iteration(100)
    config = _config(partial_completion_threshold=1.0)
    assert not iteration_done(_with_current(progress, succeeded=99), config)
    assert iteration_done(_with_current(progress, succeeded=99, permanently_failed=1), config)


def test_a_closed_iteration_or_no_iteration_is_not_done_again() -> None:
    progress = _with_current(_sent_iteration(20), succeeded=20, completed_at=NOW)
    assert not iteration_done(progress, _config())
    assert not iteration_done(Progress(), _config())


# --- decide_after_scoring --------------------------------------------------------------------


def _scored(
    *,
    total: int = 100,
    completed: int = 90,
    failed: int = 5,
    iteration: int = 1,
) -> Progress:
    it = IterationProgress(
        iteration=iteration, planned=total, first_attempts_outstanding=0, succeeded=completed
    )
    return Progress(
        total=total,
        submitted=total,
        completed=completed,
        failed=failed,
        current_iteration=iteration,
        iterations=(it,),
    )


def _decide(
    progress: Progress,
    config: BatchConfig | None = None,
    *,
    essays: int = 20,
    scored: int = 20,
    change: float | None = None,
    all_pairs: bool = False,
    reliability: float | None = None,
    bound: float | None = None,
    mean_se: float | None = None,
) -> Decision:
    return decide_after_scoring(
        progress=progress,
        config=config or _config(),
        essay_count=essays,
        scored_essays=scored,
        max_score_change=change,
        all_pairs_seen=all_pairs,
        reliability=reliability,
        reliability_lower_bound=reliability if bound is None else bound,
        mean_standard_error=mean_se,
    )


def test_fails_with_no_scorable_essays_when_nothing_succeeded() -> None:
    decision = _decide(_scored(completed=0, failed=10), scored=0)
    assert (decision.verdict, decision.reason) == (Verdict.FAIL, "NO_SCORABLE_ESSAYS")
    decision = _decide(_scored(completed=0, failed=0), scored=20)
    assert (decision.verdict, decision.reason) == (Verdict.FAIL, "NO_SCORABLE_ESSAYS")


def test_fails_with_low_success_rate_below_the_minimum() -> None:
    decision = _decide(_scored(completed=79, failed=21), _config(min_success_rate=0.8))
    assert (decision.verdict, decision.reason) == (Verdict.FAIL, "LOW_SUCCESS_RATE")


def test_a_success_rate_exactly_at_the_minimum_does_not_fail() -> None:
    decision = _decide(_scored(completed=80, failed=20), _config(min_success_rate=0.8))
    assert decision.verdict is Verdict.CONTINUE


def test_stability_completes_only_from_min_iterations_on() -> None:
    config = _config(min_iterations_for_stability=2, stability_threshold=0.05)
    early = _decide(_scored(iteration=1), config, change=0.01, reliability=0.8)
    assert early.verdict is Verdict.CONTINUE
    on_time = _decide(_scored(iteration=2), config, change=0.01, reliability=0.8)
    assert (on_time.verdict, on_time.reason) == (Verdict.COMPLETE, "stability")
    later = _decide(_scored(iteration=5), config, change=0.01, reliability=0.8)
    assert (later.verdict, later.reason) == (Verdict.COMPLETE, "stability")


def test_stability_needs_a_change_below_the_threshold() -> None:
    config = _config(stability_threshold=0.05)
    for change in (0.05, None):
        decision = _decide(_scored(iteration=3), config, change=change, reliability=0.8)
        assert decision.verdict is Verdict.CONTINUE


@pytest.mark.parametrize("reliability", [None, 0.0, 0.002, 0.49])
def test_a_scale_that_barely_separates_the_essays_is_neither_stable_nor_precise(
    reliability: float | None,
) -> None:
    # A collapsed scale: every score and standard error near zero, so the change is tiny.
    config = _config(target_mean_standard_error=0.5, min_reliability_to_stop_early=0.5)
    decision = _decide(
        _scored(iteration=3), config, change=0.002, mean_se=0.03, reliability=reliability
    )
    assert decision.verdict is Verdict.CONTINUE


def test_stability_and_precision_stop_once_the_scale_separates_the_essays() -> None:
    stable = _decide(_scored(iteration=3), _config(), change=0.002, reliability=0.5)
    assert (stable.verdict, stable.reason) == (Verdict.COMPLETE, "stability")
    config = _config(target_mean_standard_error=0.5, enable_stability_checking=False)
    precise = _decide(_scored(iteration=3), config, mean_se=0.03, reliability=0.5)
    assert (precise.verdict, precise.reason) == (Verdict.COMPLETE, "precision")


def test_stability_is_ignored_when_checking_is_disabled() -> None:
    config = _config(enable_stability_checking=False)
    decision = _decide(_scored(iteration=4), config, change=0.0)
    assert decision.verdict is Verdict.CONTINUE


def test_target_reliability_completes_once_reached_from_min_iterations_on() -> None:
    config = _config(target_reliability=0.8, min_iterations_for_stability=2)
    early = _decide(_scored(iteration=1), config, reliability=0.95)
    assert early.verdict is Verdict.CONTINUE
    below = _decide(_scored(iteration=2), config, reliability=0.79)
    assert below.verdict is Verdict.CONTINUE
    reached = _decide(_scored(iteration=2), config, reliability=0.8)
    assert (reached.verdict, reached.reason) == (Verdict.COMPLETE, "reliability")


def test_target_reliability_is_checked_against_the_lower_bound_not_the_estimate() -> None:
    config = _config(target_reliability=0.8, min_iterations_for_stability=2)
    uncertain = _decide(_scored(iteration=3), config, reliability=0.86, bound=0.78)
    assert uncertain.verdict is Verdict.CONTINUE
    sure = _decide(_scored(iteration=3), config, reliability=0.86, bound=0.8)
    assert (sure.verdict, sure.reason) == (Verdict.COMPLETE, "reliability")


def test_target_mean_standard_error_completes_once_reached_from_min_iterations_on() -> None:
    config = _config(target_mean_standard_error=0.4, min_iterations_for_stability=2)
    early = _decide(_scored(iteration=1), config, mean_se=0.1, reliability=0.8)
    assert early.verdict is Verdict.CONTINUE
    above = _decide(_scored(iteration=3), config, mean_se=0.41, reliability=0.8)
    assert above.verdict is Verdict.CONTINUE
    reached = _decide(_scored(iteration=3), config, mean_se=0.4, reliability=0.8)
    assert (reached.verdict, reached.reason) == (Verdict.COMPLETE, "precision")


def test_precision_targets_are_off_by_default() -> None:
    decision = _decide(_scored(iteration=5), _config(), reliability=0.99, mean_se=0.01)
    assert decision.verdict is Verdict.CONTINUE


def test_precision_targets_need_a_measured_value() -> None:
    config = _config(target_reliability=0.5, target_mean_standard_error=1.0)
    assert _decide(_scored(iteration=3), config).verdict is Verdict.CONTINUE


def test_failure_checks_come_before_a_reached_target() -> None:
    config = _config(target_reliability=0.5, min_success_rate=0.8)
    decision = _decide(_scored(completed=70, failed=30, iteration=3), config, reliability=0.9)
    assert (decision.verdict, decision.reason) == (Verdict.FAIL, "LOW_SUCCESS_RATE")


def test_a_reached_target_is_named_before_stability_and_budget() -> None:
    config = _config(target_reliability=0.7, max_comparisons=100)
    decision = _decide(_scored(total=100, iteration=3), config, change=0.0, reliability=0.75)
    assert (decision.verdict, decision.reason) == (Verdict.COMPLETE, "reliability")


@pytest.mark.parametrize("total", [1000, 1001])
def test_completes_on_budget_when_total_reaches_max_comparisons(total: int) -> None:
    decision = _decide(_scored(total=total, completed=900), _config(max_comparisons=1000))
    assert (decision.verdict, decision.reason) == (Verdict.COMPLETE, "budget")


def test_completes_when_all_pairs_are_compared() -> None:
    decision = _decide(_scored(), all_pairs=True)
    assert (decision.verdict, decision.reason) == (Verdict.COMPLETE, "all_pairs_compared")


@pytest.mark.parametrize(
    ("essays", "max_comparisons", "total", "expected"),
    [
        (25, 1000, 100, 60),  # 5 matchings x 12 pairs
        (20, 1000, 100, 50),
        (25, 130, 100, 30),  # the remaining budget is smaller
        (3, 1000, 100, 5),
    ],
)
def test_continues_with_the_smaller_of_budget_and_matchings(
    essays: int, max_comparisons: int, total: int, expected: int
) -> None:
    decision = _decide(
        _scored(total=total, completed=total - 5),
        _config(max_comparisons=max_comparisons, matchings_per_iteration=5),
        essays=essays,
        scored=essays,
    )
    assert decision == Decision(Verdict.CONTINUE, "", expected)


def test_retries_sent_and_failures_held_for_a_retry_come_out_of_the_budget() -> None:
    # 100 first attempts, 12 retries in two batches, 3 failures waiting in the pool: 115 of
    # the 130 calls are spoken for, so the next iteration gets 15 new pairs, not 30.
    retries = (
        SubmissionBatch(id="r1", iteration=1, kind=BatchKind.RETRY, size=10),
        SubmissionBatch(id="r2", iteration=1, kind=BatchKind.RETRY, size=2),
    )
    progress = replace(_scored(total=100, completed=95), batches=retries, pool=failed_pool(3))
    decision = _decide(progress, _config(max_comparisons=130, matchings_per_iteration=5))
    assert decision == Decision(Verdict.CONTINUE, "", 15)
    spent = _decide(progress, _config(max_comparisons=115, matchings_per_iteration=5))
    assert (spent.verdict, spent.reason) == (Verdict.COMPLETE, "budget")


def test_first_iteration_size_is_matchings_capped_by_budget() -> None:
    assert first_iteration_size(_config(max_comparisons=1000), 24) == 60
    assert first_iteration_size(_config(max_comparisons=40), 24) == 40
