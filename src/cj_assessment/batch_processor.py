"""batch_processor: turns planned comparisons into submission batches of at most `batch_size`
(never above 200), keeps at most `max_concurrent_batches` in flight per assessment, and writes
each released comparison as an attempt row plus an outbox message in the caller's transaction;
stores the assessment's `CJBatchState` row.

The attempt row (with its own correlation id) is written before the request can be sent, so
every result can be matched to exactly one comparison."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

from cj_assessment import batch_state
from cj_assessment.batch_config import BatchConfig
from cj_assessment.batch_state import AttemptStatus, BatchKind, Progress
from cj_assessment.contracts import (
    ComparisonRequestMetadata,
    LLMComparisonRequestV1,
    LLMConfigOverrides,
    deterministic_event_id,
    deterministic_event_ids,
    envelope_text,
    random_ids,
    utc_iso,
)
from cj_assessment.metrics import Metrics
from cj_assessment.prompt import new_boundary_token, render_comparison_prompt
from cj_assessment.repository import AssessmentRepository, NewAttempt, OutboxRow, StateRow
from cj_assessment.settings import Settings

log = structlog.get_logger(__name__)

MAX_SUBMISSION_BATCH = 200


@dataclass(frozen=True)
class AssessmentContext:
    """What every step of one assessment needs to know about it."""

    cj_batch_id: int
    bos_batch_id: str
    correlation_id: str
    config: BatchConfig
    essay_instructions: str | None
    llm_config_overrides: dict[str, Any]
    user_id: str | None
    started_at: datetime


class BatchProcessor:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics

    def _batch_size(self, ctx: AssessmentContext) -> int:
        return min(ctx.config.batch_size, MAX_SUBMISSION_BATCH)

    async def plan_iteration(
        self,
        repo: AssessmentRepository,
        ctx: AssessmentContext,
        progress: Progress,
        *,
        iteration: int,
        pairs: Sequence[tuple[str, str]],
        completes_pairs: bool = False,
    ) -> Progress:
        size = self._batch_size(ctx)
        batch_count = -(-len(pairs) // size)
        batch_ids = [uuid.uuid4() for _ in range(batch_count)]
        progress, batches = batch_state.plan_iteration(
            progress,
            iteration=iteration,
            batch_ids=[str(b) for b in batch_ids],
            comparisons=len(pairs),
            batch_size=size,
            completes_pairs=completes_pairs,
        )
        correlation_ids = random_ids(len(pairs))
        comparison_ids = random_ids(len(pairs))
        event_ids = self._request_event_ids(correlation_ids)
        by_text = {str(b): b for b in batch_ids}
        attempts: list[NewAttempt] = []
        for batch_id, batch_size in batches:
            batch = by_text[batch_id]
            for k in range(len(attempts), len(attempts) + batch_size):
                a, b = pairs[k]
                attempts.append(
                    NewAttempt(
                        comparison_id=comparison_ids[k],
                        correlation_id=correlation_ids[k],
                        essay_a_id=a,
                        essay_b_id=b,
                        iteration=iteration,
                        attempt=1,
                        submission_batch_id=batch,
                        request_event_id=event_ids[k],
                    )
                )
        await repo.insert_attempts(ctx.cj_batch_id, attempts)
        log.info(
            "iteration_planned",
            cj_batch_id=ctx.cj_batch_id,
            iteration=iteration,
            comparisons=len(pairs),
            submission_batches=len(batches),
        )
        return progress

    async def plan_retries(
        self, repo: AssessmentRepository, ctx: AssessmentContext, progress: Progress
    ) -> Progress:
        """Form retry batches from the whole pool: same pair, same orientation, new ids."""
        size = self._batch_size(ctx)
        count = -(-len(progress.pool.entries) // size)
        batch_ids = [str(uuid.uuid4()) for _ in range(count)]
        progress, planned = batch_state.plan_retry_batches(
            progress, batch_size=size, batch_ids=batch_ids
        )
        retried = [
            (batch, entry)
            for batch_id, entries in planned
            for batch in (uuid.UUID(batch_id),)
            for entry in entries
        ]
        correlation_ids = random_ids(len(retried))
        event_ids = self._request_event_ids(correlation_ids)
        attempts = [
            NewAttempt(
                comparison_id=uuid.UUID(entry.comparison_id),
                correlation_id=correlation_id,
                essay_a_id=entry.essay_a_id,
                essay_b_id=entry.essay_b_id,
                iteration=entry.iteration,
                attempt=entry.retry_count + 2,
                submission_batch_id=batch,
                request_event_id=event_id,
            )
            for (batch, entry), correlation_id, event_id in zip(
                retried, correlation_ids, event_ids, strict=True
            )
        ]
        await repo.insert_attempts(ctx.cj_batch_id, attempts)
        self._metrics.retry_batches.inc(len(planned))
        log.info(
            "retry_batches_formed",
            cj_batch_id=ctx.cj_batch_id,
            retry_batches=len(planned),
            comparisons=len(attempts),
        )
        return progress

    async def release(
        self,
        repo: AssessmentRepository,
        ctx: AssessmentContext,
        progress: Progress,
        *,
        now: datetime,
    ) -> Progress:
        """Send queued batches while fewer than `max_concurrent_batches` are in flight. A
        retry whose comparison was answered while it queued is not sent (a paid call for
        nothing): it counts as a superseded result of its batch, which may free a slot."""
        while True:
            progress, released = batch_state.release_batches(
                progress, max_concurrent=ctx.config.max_concurrent_batches, now=utc_iso(now)
            )
            if not released:
                return progress
            rows = await repo.send_batches(
                ctx.cj_batch_id, [uuid.UUID(b.id) for b in released], now
            )
            sent = [r for r in rows if r.status == AttemptStatus.IN_FLIGHT.value]
            unsent = [r for r in rows if r.status == AttemptStatus.SUPERSEDED.value]
            await self._publish(repo, ctx, sent, now)
            for batch in released:
                self._metrics.submission_batches.labels(batch.kind.value).inc()
            retries = sum(1 for row in sent if row.attempt > 1)
            for kind, count in ((BatchKind.FIRST, len(sent) - retries), (BatchKind.RETRY, retries)):
                if count:
                    self._metrics.comparisons_requested.labels(kind.value).inc(count)
            log.info(
                "submission_batches_released",
                cj_batch_id=ctx.cj_batch_id,
                batches=[b.id for b in released],
                comparisons=len(sent),
                answered_meanwhile=len(unsent),
                retry=any(b.kind is BatchKind.RETRY for b in released),
            )
            if not unsent:
                return progress
            for row in unsent:
                progress = batch_state.withdraw_answered(
                    progress,
                    batch_id=str(row.submission_batch_id),
                    threshold=ctx.config.partial_completion_threshold,
                )

    async def store(
        self,
        repo: AssessmentRepository,
        state: StateRow,
        progress: Progress,
        *,
        phase: str,
        now: datetime,
    ) -> None:
        """Store the assessment's `CJBatchState`: its progress (batches, attempts counted,
        failed pool) in `processing_metadata` and its counters, in the caller's transaction
        and under the row lock the caller holds."""
        await repo.save_progress(state, progress, state=phase, now=now)

    def _request_event_id(self, correlation_id: uuid.UUID) -> uuid.UUID:
        """The event id of an attempt's request: the same for every publication of it."""
        topic = self._settings.topic_llm_comparison_request
        return deterministic_event_id(topic, str(correlation_id))

    def _request_event_ids(self, correlation_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
        """`_request_event_id` of each."""
        topic = self._settings.topic_llm_comparison_request
        return deterministic_event_ids(topic, map(str, correlation_ids))

    async def _publish(
        self, repo: AssessmentRepository, ctx: AssessmentContext, rows: list[Any], now: datetime
    ) -> None:
        """The comparison requests of these attempts, as outbox rows."""
        if not rows:
            return
        texts = await repo.essay_texts(
            ctx.cj_batch_id, [e for r in rows for e in (r.essay_a_els_id, r.essay_b_els_id)]
        )
        overrides = LLMConfigOverrides.model_validate(ctx.llm_config_overrides)
        messages = []
        # Attempts planned before migration 0007 learn their request's event id as it goes
        # out, so that the monitor leaves them alone while it waits in the outbox.
        unnamed: list[tuple[int, uuid.UUID]] = []
        for row in rows:
            request = LLMComparisonRequestV1(
                correlation_id=str(row.request_correlation_id),
                user_prompt=render_comparison_prompt(
                    essay_a=texts[row.essay_a_els_id],
                    essay_b=texts[row.essay_b_els_id],
                    instructions=ctx.essay_instructions,
                    token=new_boundary_token(),
                ),
                callback_topic=self._settings.topic_llm_comparison_result,
                llm_config_overrides=overrides,
                user_id=ctx.user_id,
                metadata=ComparisonRequestMetadata(
                    essay_a_id=row.essay_a_els_id,
                    essay_b_id=row.essay_b_els_id,
                    bos_batch_id=ctx.bos_batch_id,
                    cj_batch_id=str(ctx.cj_batch_id),
                    submission_batch_id=str(row.submission_batch_id),
                    comparison_iteration=row.iteration,
                    attempt=row.attempt,
                    cj_request_type="cj_comparison" if row.attempt == 1 else "cj_retry",
                ),
            )
            topic = self._settings.topic_llm_comparison_request
            event_id = row.request_event_id
            if event_id is None:
                event_id = self._request_event_id(row.request_correlation_id)
                unnamed.append((row.id, event_id))
            payload = envelope_text(
                event_id=event_id,
                event_type=topic,
                correlation_id=ctx.correlation_id,
                data=request,
                now=now,
            )
            messages.append(OutboxRow(event_id, topic, ctx.bos_batch_id, payload))
        await repo.add_outbox(messages)
        await repo.name_requests(unnamed)
