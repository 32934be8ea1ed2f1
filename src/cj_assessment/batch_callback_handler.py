"""batch_callback_handler: records comparison results (or timeouts) and calls back into the
orchestrator. Results arrive unkeyed, out of order, more than once, late, or for comparisons we
never sent; each case ends in a stored, counted outcome."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum

import structlog

from cj_assessment import batch_state
from cj_assessment.batch_config import BatchConfig
from cj_assessment.batch_state import (
    AttemptStatus,
    AttemptView,
    Disposition,
    Progress,
    Unanswered,
)
from cj_assessment.contracts import LLMComparisonResultV1, storable, utc_iso
from cj_assessment.metrics import Metrics
from cj_assessment.repository import AssessmentRepository, AttemptRecord, StateRow
from cj_assessment.tables import TERMINAL_STATES
from cj_assessment.workflow_orchestrator import (
    OFF_LOOP_MIN_ESSAYS,
    AssessmentContext,
    WorkflowOrchestrator,
    context_of,
)

log = structlog.get_logger(__name__)


# About 2 KB each: the contexts of every assessment a busy instance has in flight.
CONTEXTS_KEPT = 4096
# An unmatched result's raw payload is kept for inspection up to this size: enough for any
# real answer, while a misrouted stream of large records cannot fill the table as fast.
UNMATCHED_PAYLOAD_BYTES = 65_536


class ResultOutcome(StrEnum):
    HANDLED = "handled"
    DUPLICATE = "duplicate"
    ORPHAN = "orphan"
    LATE = "late"
    INTEGRITY = "integrity"


def _attempt_view(row: AttemptRecord, progress: Progress, max_retry_attempts: int) -> AttemptView:
    resolved = batch_state.comparison_resolved(
        [(AttemptStatus(status), number) for number, status in row.siblings.items()],
        max_retry_attempts,
    ) or bool(progress.pool.unretried and progress.pool.gave_up(str(row.comparison_id)))
    return AttemptView(
        comparison_id=str(row.comparison_id),
        correlation_id=str(row.correlation_id),
        essay_a_id=row.essay_a_id,
        essay_b_id=row.essay_b_id,
        iteration=row.iteration,
        attempt=row.attempt,
        submission_batch_id=str(row.submission_batch_id),
        status=AttemptStatus(row.status),
        comparison_resolved=resolved,
    )


def _correlation_uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


# Attempts still without an answer of their own when their assessment finished: an answer that
# comes after the end is stored as late (a timed-out attempt's, too).
_ANSWERABLE_AFTER_THE_END = (
    AttemptStatus.IN_FLIGHT.value,
    AttemptStatus.QUEUED.value,
    AttemptStatus.TIMED_OUT.value,
)


class BatchCallbackHandler:
    def __init__(self, orchestrator: WorkflowOrchestrator, metrics: Metrics) -> None:
        self._orchestrator = orchestrator
        self._metrics = metrics
        self._contexts: dict[int, AssessmentContext] = {}
        # The bos_batch_ids of the large assessments among the contexts read (insertion order,
        # the oldest forgotten first, like the contexts).
        self._large: dict[str, None] = {}

    def is_large(self, bos_batch_id: str) -> bool:
        """Whether results of this assessment were seen and it has `OFF_LOOP_MIN_ESSAYS`
        essays or more: its iteration closes take seconds, and the consumer gives its results
        transactions of their own, so that a close holds no other assessment's rows."""
        return bos_batch_id in self._large

    async def _contexts_of(
        self, repo: AssessmentRepository, states: dict[int, StateRow]
    ) -> dict[int, AssessmentContext]:
        """The contexts of the running assessments among `states`. A context never changes
        once its assessment has started, so the latest few thousand are kept rather than read
        back on every poll."""
        running = [i for i, state in states.items() if state.state not in TERMINAL_STATES]
        missing = [i for i in running if i not in self._contexts]
        contexts = {i: self._contexts[i] for i in running if i in self._contexts}
        if missing:
            uploads = await repo.uploads(missing)
            for i in missing:
                contexts[i] = self._contexts[i] = context_of(uploads[i], states[i])
                if uploads[i].expected_essay_count >= OFF_LOOP_MIN_ESSAYS:
                    self._large[uploads[i].bos_batch_id] = None
            while len(self._contexts) > CONTEXTS_KEPT:
                del self._contexts[next(iter(self._contexts))]
            while len(self._large) > CONTEXTS_KEPT:
                del self._large[next(iter(self._large))]
        return contexts

    async def handle_results(
        self,
        repo: AssessmentRepository,
        results: Sequence[tuple[LLMComparisonResultV1, bytes]],
        *,
        now: datetime,
    ) -> list[ResultOutcome]:
        """Record (result, raw record value) pairs of one poll in the caller's transaction: each
        assessment is locked once, takes its results in arrival order, and is advanced once."""
        outcomes: list[ResultOutcome | None] = [None] * len(results)
        wanted = {i: _correlation_uuid(r.correlation_id) for i, (r, _) in enumerate(results)}
        known = [c for c in wanted.values() if c is not None]
        states = await repo.lock_states(await repo.assessments_answered(known))
        # Read the attempts only under the locks: a concurrent handler may have resolved them.
        attempts = await repo.attempts_by_correlation(known, within=list(states))
        unmatched = [i for i, c in wanted.items() if c is None or c not in attempts]
        await repo.store_unmatched(
            [
                (
                    storable(results[i][0].correlation_id),
                    "unknown_correlation_id",
                    storable(results[i][1][:UNMATCHED_PAYLOAD_BYTES].decode("utf-8", "replace")),
                )
                for i in unmatched
            ]
        )
        for i in unmatched:
            outcomes[i] = ResultOutcome.ORPHAN
            self._metrics.unmatched_results.labels("unknown_correlation_id").inc()
            log.warning("result_unmatched", correlation_id=results[i][0].correlation_id)

        written: list[AttemptRecord] = []
        advancing: list[tuple[AssessmentContext, StateRow, Progress]] = []
        contexts = await self._contexts_of(repo, states)
        by_assessment: dict[int, list[int]] = {}
        for i, correlation in wanted.items():
            if outcomes[i] is None:
                by_assessment.setdefault(attempts[correlation].cj_batch_id, []).append(i)  # type: ignore[index]
        stamp = utc_iso(now)

        for cj_batch_id in sorted(by_assessment):
            state = states[cj_batch_id]
            indices = by_assessment[cj_batch_id]
            if state.state in TERMINAL_STATES:
                final = state.progress()
                max_retry = BatchConfig.from_json(state.batch_config).max_retry_attempts
                for i in indices:
                    attempt = attempts[wanted[i]]  # type: ignore[index]
                    resolved = _attempt_view(attempt, final, max_retry).comparison_resolved
                    outcomes[i] = self._store_late(attempt, results[i][0], now, resolved=resolved)
                    if outcomes[i] is ResultOutcome.LATE:
                        written.append(attempt)
                continue
            ctx = contexts[cj_batch_id]
            progress = state.progress()
            changed = False
            for i in indices:
                result = results[i][0]
                attempt = attempts[wanted[i]]  # type: ignore[index]
                mismatch = _contradicts_pair(attempt, result)
                succeeded = result.winner is not None and not mismatch
                reason = "integrity" if mismatch else (None if succeeded else _error_reason(result))
                progress, disposition = batch_state.record_outcome(
                    progress,
                    _attempt_view(attempt, progress, ctx.config.max_retry_attempts),
                    succeeded=succeeded,
                    failure_reason=reason,
                    now=stamp,
                    max_retry_attempts=ctx.config.max_retry_attempts,
                    threshold=ctx.config.partial_completion_threshold,
                    budget=ctx.config.max_comparisons,
                )
                if disposition is Disposition.DUPLICATE:
                    outcomes[i] = ResultOutcome.DUPLICATE
                    continue
                _store_result(
                    attempt, result, now, disposition=disposition, integrity_failure=mismatch
                )
                attempt.siblings[attempt.attempt] = attempt.status
                written.append(attempt)
                self._count(attempt, disposition, reason, now)
                changed = True
                outcomes[i] = ResultOutcome.INTEGRITY if mismatch else ResultOutcome.HANDLED
            if changed:
                advancing.append((ctx, state, progress))
        # The outcomes are written before any assessment advances: scoring reads them back.
        await repo.save_attempts(written)
        for ctx, state, progress in advancing:
            await self._advance(repo, ctx, state, progress, now=now)
        return [o if o is not None else ResultOutcome.DUPLICATE for o in outcomes]

    async def count_unanswered(
        self,
        repo: AssessmentRepository,
        state: StateRow,
        attempts: list[AttemptRecord],
        *,
        cause: Unanswered,
        now: datetime,
    ) -> int:
        """Count attempts of one assessment, whose state row the caller has locked, that will
        not be answered (overdue, or never sent) as failed."""
        if not attempts:
            return 0
        if state.state in TERMINAL_STATES:
            # Outstanding when the assessment finished, and now overdue: closed without
            # counting (the published outcome stands), so that the monitor does not find them
            # again on every pass. An answer that still comes is stored as late.
            for attempt in attempts:
                _close_unanswered(attempt, cause, now)
            await repo.save_attempts(attempts)
            return 0
        ctx = (await self._contexts_of(repo, {state.cj_batch_id: state}))[state.cj_batch_id]
        progress = state.progress()
        written: list[AttemptRecord] = []
        for attempt in attempts:
            progress, disposition = batch_state.record_outcome(
                progress,
                _attempt_view(attempt, progress, ctx.config.max_retry_attempts),
                succeeded=False,
                failure_reason=cause.value,
                now=utc_iso(now),
                max_retry_attempts=ctx.config.max_retry_attempts,
                threshold=ctx.config.partial_completion_threshold,
                budget=ctx.config.max_comparisons,
            )
            if disposition is Disposition.DUPLICATE:
                continue
            _close_unanswered(attempt, cause, now)
            attempt.siblings[attempt.attempt] = attempt.status
            written.append(attempt)
            self._count(attempt, disposition, cause.value, now)
        await repo.save_attempts(written)
        await self._advance(repo, ctx, state, progress, now=now)
        return len(written)

    async def _advance(
        self,
        repo: AssessmentRepository,
        ctx: AssessmentContext,
        state: StateRow,
        progress: Progress,
        *,
        now: datetime,
    ) -> None:
        await self._orchestrator.advance(repo, ctx, state, progress, now=now)
        if state.state in TERMINAL_STATES:
            # A finished assessment's context is needed no more.
            self._contexts.pop(state.cj_batch_id, None)

    def _store_late(
        self,
        attempt: AttemptRecord,
        result: LLMComparisonResultV1,
        now: datetime,
        *,
        resolved: bool,
    ) -> ResultOutcome:
        if attempt.status not in _ANSWERABLE_AFTER_THE_END:
            return ResultOutcome.DUPLICATE
        if resolved:
            # Its comparison succeeded through another attempt, or was counted as failed for
            # good (out of retries, or given up over budget) in the published outcome: the
            # stored rows keep one success per comparison and agree with the counts.
            disposition = Disposition.SUPERSEDED
        else:
            disposition = Disposition.SUCCEEDED if result.winner else Disposition.RETRY_POOLED
        _store_result(
            attempt,
            result,
            now,
            disposition=disposition,
            integrity_failure=_contradicts_pair(attempt, result),
        )
        # The outcome it came too late for was published without it, and retention
        # (CJ_TEXT_RETENTION_SECONDS) may have erased the assessment's texts already: a late
        # answer keeps its verdict, tokens and cost, not the judge's words about the essays.
        attempt.justification = None
        # Its siblings share this map: a sibling answered later in the same poll sees it.
        attempt.siblings[attempt.attempt] = attempt.status
        attempt.is_late = True
        self._metrics.late_results.inc()
        log.info(
            "late_result_stored",
            cj_batch_id=attempt.cj_batch_id,
            comparison_id=str(attempt.comparison_id),
        )
        return ResultOutcome.LATE

    def _count(
        self, attempt: AttemptRecord, disposition: Disposition, reason: str | None, now: datetime
    ) -> None:
        if attempt.submitted_at is not None:
            self._metrics.callback_latency.observe(
                max(0.0, (now - attempt.submitted_at).total_seconds())
            )
        match disposition:
            case Disposition.SUCCEEDED | Disposition.RESCUED:
                self._metrics.comparisons_succeeded.inc()
                if attempt.attempt > 1:
                    self._metrics.successful_retries.inc()
            case Disposition.RETRY_POOLED:
                self._metrics.comparisons_failed.labels(reason or "error").inc()
            case Disposition.PERMANENTLY_FAILED:
                self._metrics.comparisons_failed.labels(reason or "error").inc()
                self._metrics.permanent_failures.inc()
            case Disposition.SUPERSEDED | Disposition.DUPLICATE:
                pass


def _close_unanswered(attempt: AttemptRecord, cause: Unanswered, now: datetime) -> None:
    attempt.status = cause.status.value
    attempt.completed_at = now
    attempt.winner = "error"
    attempt.error_code = cause.error_code


def _contradicts_pair(attempt: AttemptRecord, result: LLMComparisonResultV1) -> bool:
    meta = result.request_metadata or {}
    a, b = meta.get("essay_a_id"), meta.get("essay_b_id")
    # Compared as text: a provider may echo an id that looks like a number as a JSON number.
    return (a is not None and str(a) != attempt.essay_a_id) or (
        b is not None and str(b) != attempt.essay_b_id
    )


# Provider error codes that become a metric label, lower-cased; any other code is counted as
# `provider_other`, so that what a provider writes cannot grow the label set without bound.
# The provider's own timeout is `provider_timeout`: `timeout` is the service's, for an answer
# that did not come in time.
PROVIDER_ERROR_LABELS = {
    code: code
    for code in (
        "provider_error",
        "validation_error",
        "rate_limit",
        "rate_limited",
        "invalid_request",
        "content_filter",
        "authentication_error",
        "quota_exceeded",
        "service_unavailable",
        "parsing_error",
        "connection_error",
    )
} | {"timeout": "provider_timeout"}


def _error_reason(result: LLMComparisonResultV1) -> str:
    if result.error_detail is None:
        return "error"
    return PROVIDER_ERROR_LABELS.get(result.error_detail.error_code.lower(), "provider_other")


def _store_result(
    attempt: AttemptRecord,
    result: LLMComparisonResultV1,
    now: datetime,
    *,
    disposition: Disposition,
    integrity_failure: bool,
) -> None:
    succeeded = result.winner is not None and not integrity_failure
    if disposition is Disposition.SUPERSEDED:
        attempt.status = AttemptStatus.SUPERSEDED.value
    elif disposition is Disposition.RESCUED:
        attempt.status = AttemptStatus.SUCCEEDED.value
    else:
        attempt.status = (AttemptStatus.SUCCEEDED if succeeded else AttemptStatus.FAILED).value
    # First resolution time: a rescued timeout keeps the moment it was counted.
    attempt.completed_at = attempt.completed_at or now
    if succeeded:
        attempt.winner = "essay_a" if result.winner == "Essay A" else "essay_b"
        attempt.confidence = result.confidence
        attempt.justification = storable(result.justification or "")[:2000]
        attempt.error_code = None
    else:
        attempt.winner = "error"
        if integrity_failure:
            attempt.error_code = "INTEGRITY"
            attempt.error_details = {"reason": "essay ids in the result contradict the stored pair"}
        elif result.error_detail is not None:
            attempt.error_code = storable(result.error_detail.error_code)[:64]
            attempt.error_details = {
                "message": storable(result.error_detail.message or "")[:500],
                "operation": _stored(result.error_detail.operation, 200),
                "service": _stored(result.error_detail.service, 200),
            }
    attempt.provider = _stored(result.provider, 64)
    attempt.model = _stored(result.model, 128)
    attempt.response_time_ms = _int4(result.response_time_ms)
    attempt.cost_estimate = result.cost_estimate
    if result.token_usage is not None:
        attempt.prompt_tokens = _int4(result.token_usage.prompt_tokens)
        attempt.completion_tokens = _int4(result.token_usage.completion_tokens)
        attempt.total_tokens = _int4(result.token_usage.total_tokens)


def _stored(text: str | None, limit: int | None = None) -> str | None:
    """What a provider wrote, as its column can keep it: a paid answer is not refused for a
    stray NUL character or a long model name."""
    return None if text is None else storable(text)[:limit]


def _int4(number: int | None) -> int | None:
    """A provider's count if an integer column holds it; None (unknown) otherwise."""
    return number if number is not None and -(2**31) <= number < 2**31 else None
