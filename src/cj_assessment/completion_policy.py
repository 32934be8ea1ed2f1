"""When to retry, when an iteration is done, and what to do after scoring.

One threshold, one denominator: an iteration is done when every one of its submission batches
has been sent and (succeeded + permanently failed) / planned >= partial_completion_threshold,
unless closing it then would fail the assessment while answers are still to come.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from cj_assessment.batch_config import BatchConfig
from cj_assessment.batch_state import BatchKind, BatchStatus, Progress, calls_committed


def retry_due(progress: Progress, config: BatchConfig) -> bool:
    """Form retry batches when the pool is full enough; or, whatever its size, when the
    current iteration has no first attempts left outstanding (end-of-iteration fairness) or
    when all it still waits for are stragglers of batches past their threshold (otherwise a
    few slow answers would hold the failed comparisons, and the iteration, hostage)."""
    if not progress.pool.entries:
        return False
    if len(progress.pool.entries) >= config.failed_comparison_retry_threshold:
        return True
    current = progress.current
    if current is None or current.first_attempts_outstanding == 0:
        return True
    return not progress.in_flight() and not progress.queued()


def iteration_done(progress: Progress, config: BatchConfig) -> bool:
    current = progress.current
    if current is None or current.completed_at is not None:
        return False
    unsent = any(
        b.iteration == current.iteration
        and b.kind is BatchKind.FIRST
        and b.status is BatchStatus.QUEUED
        for b in progress.batches
    )
    if unsent:
        return False
    if current.completes_pairs and _retries_owed(progress):
        # Every pair has been planned and some failed ones, of this iteration or an earlier
        # one, are owed their retries: closing now would end the assessment without them (or
        # plan repeats while they are on their way). First answers still out are not waited
        # for, as at any close.
        return False
    if current.resolved >= current.planned:
        return True
    if current.resolved < config.partial_completion_threshold * current.planned - 1e-9:
        return False
    # At the threshold. If closing now would fail the assessment but the answers still to
    # come (first attempts, retries) could spare it that, it waits for them or their timeouts:
    # errors that happen to arrive first must not decide the outcome.
    if failure(progress, config) is None:
        return True
    return failure(progress, config, to_come=_answers_to_come(progress)) is not None


def failure(progress: Progress, config: BatchConfig, *, to_come: int = 0) -> str | None:
    """The error code the counters fail the assessment with, if any, should `to_come` more
    comparisons still succeed: nothing succeeded, or a success rate below the minimum."""
    completed = progress.completed + to_come
    if completed == 0:
        return "NO_SCORABLE_ESSAYS"
    if completed / (completed + progress.failed) < config.min_success_rate:
        return "LOW_SUCCESS_RATE"
    return None


def _answers_to_come(progress: Progress) -> int:
    """Comparisons that may still succeed: every one planned and not yet resolved. Each ends
    in an answer, a timeout or a retry, so waiting for them ends too."""
    return progress.total - progress.completed - progress.failed


class Verdict(StrEnum):
    CONTINUE = "continue"
    COMPLETE = "complete"
    FAIL = "fail"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str  # stop reason for COMPLETE, error code for FAIL, "" for CONTINUE
    next_comparisons: int = 0


def decide_after_scoring(
    *,
    progress: Progress,
    config: BatchConfig,
    essay_count: int,
    scored_essays: int,
    max_score_change: float | None,
    all_pairs_seen: bool,
    reliability: float | None = None,
    reliability_lower_bound: float | None = None,
    mean_standard_error: float | None = None,
) -> Decision:
    """After an iteration is scored: fail, complete (and why), or plan how many more.

    Completes, in this order: ``reliability`` (the lower bound of the calibrated reliability
    reached ``target_reliability``: stopping at the first estimate to reach a target would
    favour the runs whose estimate is too high), ``precision`` (the mean standard error fell to
    ``target_mean_standard_error``), ``stability``, ``budget``, ``all_pairs_compared``.
    The precision targets, like stability, count only from ``min_iterations_for_stability``
    on, so one lucky early iteration cannot end an assessment. Stability and the standard-error
    target also need the calibrated reliability at ``min_reliability_to_stop_early`` or above:
    when the judgements barely separate the essays, the estimated spread of abilities
    collapses, every score and standard error shrinks towards zero, and a scale that says
    nothing would look both stable and precise.
    """
    if scored_essays == 0:
        return Decision(Verdict.FAIL, "NO_SCORABLE_ESSAYS")
    failed = failure(progress, config)
    if failed is not None:
        return Decision(Verdict.FAIL, failed)
    late_enough = progress.current_iteration >= config.min_iterations_for_stability
    separates = reliability is not None and reliability >= config.min_reliability_to_stop_early
    if (
        late_enough
        and config.target_reliability is not None
        and reliability_lower_bound is not None
        and reliability_lower_bound >= config.target_reliability
    ):
        return Decision(Verdict.COMPLETE, "reliability")
    if (
        late_enough
        and separates
        and config.target_mean_standard_error is not None
        and mean_standard_error is not None
        and mean_standard_error <= config.target_mean_standard_error
    ):
        return Decision(Verdict.COMPLETE, "precision")
    if (
        config.enable_stability_checking
        and late_enough
        and separates
        and max_score_change is not None
        and max_score_change < config.stability_threshold
    ):
        return Decision(Verdict.COMPLETE, "stability")
    # Retries are paid calls too: what the budget has left after them goes to new pairs.
    remaining = config.max_comparisons - calls_committed(progress)
    if remaining <= 0:
        return Decision(Verdict.COMPLETE, "budget")
    if all_pairs_seen:
        return Decision(Verdict.COMPLETE, "all_pairs_compared")
    per_iteration = config.matchings_per_iteration * (essay_count // 2)
    return Decision(Verdict.CONTINUE, "", min(remaining, per_iteration))


def first_iteration_size(config: BatchConfig, essay_count: int) -> int:
    return min(config.max_comparisons, config.matchings_per_iteration * (essay_count // 2))


def _retries_owed(progress: Progress) -> bool:
    """Failed comparisons of the current iteration not yet resolved, or of any iteration
    still in the pool or in a retry batch not done."""
    current = progress.current
    assert current is not None
    return (
        current.planned - current.resolved > current.first_attempts_outstanding
        or bool(progress.pool.entries)
        or any(
            b.kind is BatchKind.RETRY and b.status is not BatchStatus.DONE for b in progress.batches
        )
    )
