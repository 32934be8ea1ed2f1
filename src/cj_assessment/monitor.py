"""The stuck-assessment monitor. Safe in several instances at once: every assessment it touches
is claimed with `FOR UPDATE SKIP LOCKED`, so two monitors never work on the same one.

Each pass (1) counts comparison attempts outstanding longer than CALLBACK_WAIT_TIMEOUT as
failed (reason timeout), which sends them through the failed pool (those of a finished
assessment are only closed); (2) takes assessments idle for BATCH_TIMEOUT in any non-terminal
state, times out what is overdue and drives them on, in one transaction under the row lock;
an assessment that still cannot move is failed with a clear error; (3) has `Retention` delete
delivery bookkeeping past its retention."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Protocol

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from cj_assessment.batch_callback_handler import BatchCallbackHandler
from cj_assessment.batch_state import AttemptStatus, Unanswered
from cj_assessment.database import transaction
from cj_assessment.metrics import Metrics
from cj_assessment.repository import AssessmentRepository, StateRow
from cj_assessment.retention import Retention
from cj_assessment.settings import Settings
from cj_assessment.tables import TERMINAL_STATES
from cj_assessment.workflow_orchestrator import WorkflowOrchestrator, context_of

log = structlog.get_logger(__name__)

CLAIM_LIMIT = 50


class TopicPartitions(Protocol):
    """The partitions a topic has, as the broker reports them."""

    async def of(self, topic: str) -> frozenset[int] | None:
        """The topic's partition numbers; None when the broker cannot say (unreachable, or
        the topic unknown)."""
        ...


# The gauge's states: finished assessments are counted by `cj_assessments_total{outcome}`.
RUNNING_STATES = ("INITIALIZING", "GENERATING_PAIRS", "WAITING_CALLBACKS", "SCORING")


class StuckAssessmentMonitor:
    def __init__(
        self,
        settings: Settings,
        sessions: async_sessionmaker[AsyncSession],
        callbacks: BatchCallbackHandler,
        orchestrator: WorkflowOrchestrator,
        metrics: Metrics,
        retention: Retention,
        clock: Callable[[], datetime],
        *,
        partitions: TopicPartitions,
        on_commit: Callable[[], None] = lambda: None,
        claim_limit: int = CLAIM_LIMIT,
    ) -> None:
        self._settings = settings
        self._partitions = partitions
        self._sessions = sessions
        self._callbacks = callbacks
        self._orchestrator = orchestrator
        self._metrics = metrics
        self._retention = retention
        self._clock = clock
        self._on_commit = on_commit
        self._claim_limit = claim_limit
        # Assessments whose step failed: (failures in a row, not tried again before). They are
        # left out of the scans meanwhile, so that however many fail, the oldest first, the
        # scans' limit still reaches the others.
        self._failing: dict[int, tuple[int, datetime]] = {}

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.run_once()
            except Exception as exc:  # noqa: BLE001 - the monitor must outlive a failed pass
                log.warning("monitor_pass_failed", error_class=type(exc).__name__)
            try:
                await asyncio.wait_for(stop.wait(), timeout=self._settings.monitor_interval_seconds)
            except TimeoutError:
                pass

    async def run_once(self) -> int:
        now = self._clock()
        timeout = timedelta(seconds=self._settings.callback_wait_timeout_seconds)
        topic = self._settings.topic_llm_comparison_result
        # Only a partition the topic no longer has is left out of the clock (a topic recreated
        # with fewer of them); one that is merely not written (its owner killed, frozen or
        # between owners) holds it back, since its answers may be waiting there.
        partitions = await self._partitions.of(topic)
        async with self._sessions() as session:
            handled_through, behind = await AssessmentRepository(session).results_handled_through(
                topic, partitions, stale=timeout
            )
        if behind:
            log.warning("result_watermarks_stale", partitions=behind)
        # An attempt is overdue once its wait has passed on the clock of the results handled:
        # while answers sit on the topic unhandled (the database away, a lock held, a backlog
        # after a pause, a partition between owners), they are not taken for missing ones and
        # paid for again.
        answers_seen_until = now if handled_through is None else min(now, handled_through)
        self._metrics.results_handled_behind.set((now - answers_seen_until).total_seconds())
        overdue_since = answers_seen_until - timeout
        actions = 0
        # Forget failures not seen again for an hour after their pause (finished elsewhere, or
        # mended): the record stays as small as what currently fails.
        forgotten = now - timedelta(hours=1)
        self._failing = {k: v for k, v in self._failing.items() if v[1] > forgotten}
        resting = [cj_batch_id for cj_batch_id, (_, until) in self._failing.items() if until > now]
        async with self._sessions() as session:
            candidates = await AssessmentRepository(session).assessments_with_overdue_attempts(
                overdue_since, self._claim_limit, exclude=resting
            )
        for cj_batch_id in candidates:
            actions += await self._isolated(
                cj_batch_id, now, self._time_out(cj_batch_id, overdue_since, now)
            )
        idle_since = now - timedelta(seconds=self._settings.batch_timeout_seconds)
        resting = [cj_batch_id for cj_batch_id, (_, until) in self._failing.items() if until > now]
        # Candidates only: each is checked again under its row lock before anything is done.
        async with transaction(self._sessions) as session:
            idle = await AssessmentRepository(session).states_idle_since(
                idle_since, self._claim_limit, exclude=resting
            )
        for cj_batch_id in idle:
            actions += await self._isolated(
                cj_batch_id, now, self._drive_idle(cj_batch_id, idle_since, overdue_since, now)
            )
        async with self._sessions() as session:
            counts = await AssessmentRepository(session).count_running_by_state()
        for state in RUNNING_STATES:
            self._metrics.assessments_by_state.labels(state).set(counts.get(state, 0))
        await self._retention.prune(now)
        return actions

    async def _isolated(self, cj_batch_id: int, now: datetime, work: Awaitable[int]) -> int:
        """One assessment's step, rolled back alone if it fails. An assessment that fails the
        same way on every pass would come first on every pass (its activity does not move
        on): letting its error end the pass would stop timeouts, the other assessments and
        pruning for good. It is tried again after a pause that doubles with each failure in
        a row, from one monitor interval up to an hour."""
        try:
            done = await work
        except Exception as exc:  # noqa: BLE001 - logged and counted; tried again later
            failures = self._failing.get(cj_batch_id, (0, now))[0] + 1
            pause = min(self._settings.monitor_interval_seconds * 2 ** (failures - 1), 3600.0)
            self._failing[cj_batch_id] = (failures, now + timedelta(seconds=pause))
            log.warning(
                "monitor_assessment_failed",
                cj_batch_id=cj_batch_id,
                error_class=type(exc).__name__,
                failures_in_a_row=failures,
            )
            self._metrics.monitor_actions.labels("error").inc()
            return 0
        self._failing.pop(cj_batch_id, None)
        return done

    async def _time_out(self, cj_batch_id: int, overdue_since: datetime, now: datetime) -> int:
        async with transaction(self._sessions) as session:
            repo = AssessmentRepository(session)
            state = await repo.lock_state(cj_batch_id, skip_locked=True)
            if state is None:
                return 0
            count = await self._time_out_locked(repo, state, overdue_since, now)
        if count:
            self._on_commit()
        self._count_timeouts("timeout", cj_batch_id, count)
        return count

    async def _time_out_locked(
        self, repo: AssessmentRepository, state: StateRow, overdue_since: datetime, now: datetime
    ) -> int:
        """Count the overdue attempts of an assessment whose row the caller holds as failed."""
        attempts = await repo.overdue_attempts(state.cj_batch_id, overdue_since)
        return await self._callbacks.count_unanswered(
            repo, state, attempts, cause=Unanswered.TIMEOUT, now=now
        )

    def _count_timeouts(self, action: str, cj_batch_id: int, count: int) -> None:
        if count:
            self._metrics.monitor_actions.labels(action).inc(count)
            log.info("comparisons_timed_out", cj_batch_id=cj_batch_id, comparisons=count)

    async def _advance_or_fail(
        self, repo: AssessmentRepository, state: StateRow, now: datetime
    ) -> None:
        """Drive a locked, running assessment on; fail it if it then waits for nothing."""
        ctx = context_of(await repo.upload(state.cj_batch_id), state)
        await self._orchestrator.advance(repo, ctx, state, state.progress(), now=now)
        # Stuck: no attempt sent and unanswered once advancing has released what it could
        # (in this transaction). The attempts are asked, not the batches: a batch past its
        # threshold no longer counts as in flight while its last attempts may still be
        # answered (with CALLBACK_WAIT_TIMEOUT above BATCH_TIMEOUT they are not overdue yet).
        if state.state in TERMINAL_STATES or await repo.awaits_answers(state.cj_batch_id):
            return
        await self._orchestrator.fail_assessment(
            repo,
            ctx,
            state,
            state.progress(),
            error_code="ASSESSMENT_STUCK",
            message=(
                f"no progress for {self._settings.batch_timeout_seconds:g} s"
                " and nothing left to wait for"
            ),
            now=now,
        )
        self._metrics.monitor_actions.labels("failed_stuck").inc()

    async def _drive_idle(
        self, cj_batch_id: int, idle_since: datetime, overdue_since: datetime, now: datetime
    ) -> int:
        """One transaction under the assessment's lock: whether it is still idle, its overdue
        attempts, advancing it and the stuck check are all decided from what the lock
        protects. A decision from the scan alone could time out retries that another monitor
        or a result sent a moment ago, or fail an assessment whose lock was briefly busy."""
        async with transaction(self._sessions) as session:
            repo = AssessmentRepository(session)
            state = await repo.lock_state(cj_batch_id, skip_locked=True)
            if (
                state is None
                or state.state in TERMINAL_STATES
                or state.last_activity_at >= idle_since
            ):
                return 0
            # Idle is not overdue: attempts younger than CALLBACK_WAIT_TIMEOUT may still be
            # answered (batch APIs take minutes to hours).
            timed_out = await self._time_out_locked(repo, state, overdue_since, now)
            if state.state not in TERMINAL_STATES:
                await self._advance_or_fail(repo, state, now)
        self._on_commit()
        self._count_timeouts("idle_timeout", cj_batch_id, timed_out)
        self._metrics.monitor_actions.labels("driven").inc()
        return timed_out + 1


class UnsentAttempts:
    """Attempts whose requests the outbox relay set aside as undeliverable (`UnsentComparisons`
    in outbox.py): counted as failed at once, reason `undeliverable`, so that their iteration
    does not wait out CALLBACK_WAIT_TIMEOUT for answers that cannot come. Their retries follow
    the pool's rules like any failure. Should this never run (a crash after the relay's
    commit), the monitor's timeout fails them later."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        callbacks: BatchCallbackHandler,
        metrics: Metrics,
        clock: Callable[[], datetime],
    ) -> None:
        self._sessions = sessions
        self._callbacks = callbacks
        self._metrics = metrics
        self._clock = clock

    async def fail(self, correlation_ids: Sequence[str]) -> int:
        ids = [uuid.UUID(c) for c in correlation_ids]
        now = self._clock()
        async with self._sessions() as session:
            assessments = await AssessmentRepository(session).assessments_answered(ids)
        failed = 0
        for cj_batch_id in sorted(assessments):
            async with transaction(self._sessions) as session:
                repo = AssessmentRepository(session)
                state = await repo.lock_state(cj_batch_id)
                if state is None:
                    continue
                attempts = await repo.attempts_by_correlation(ids, within=[cj_batch_id])
                in_flight = [
                    a for a in attempts.values() if a.status == AttemptStatus.IN_FLIGHT.value
                ]
                count = await self._callbacks.count_unanswered(
                    repo, state, in_flight, cause=Unanswered.UNDELIVERABLE, now=now
                )
            self._metrics.monitor_actions.labels("undeliverable").inc(count)
            log.warning("comparisons_undeliverable", cj_batch_id=cj_batch_id, comparisons=count)
            failed += count
        return failed
