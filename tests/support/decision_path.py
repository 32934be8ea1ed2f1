"""The service's decision path on a real database, without a broker: the orchestrator, the
callback handler and the monitor wired as `serve` wires them, driven with chosen results at
chosen moments. Outbox rows are what would be published."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from cj_assessment.batch_callback_handler import BatchCallbackHandler
from cj_assessment.batch_config import resolve_batch_config
from cj_assessment.batch_processor import BatchProcessor
from cj_assessment.contracts import ErrorDetail, LLMComparisonResultV1
from cj_assessment.database import transaction
from cj_assessment.metrics import Metrics
from cj_assessment.monitor import CLAIM_LIMIT, StuckAssessmentMonitor
from cj_assessment.outbox import HELD_SECONDS, wait_from_publication
from cj_assessment.repository import AssessmentRepository, DecodedStates
from cj_assessment.retention import Retention
from cj_assessment.settings import Settings
from cj_assessment.workflow_orchestrator import NewAssessment, Worker, WorkflowOrchestrator

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@dataclass
class KnownPartitions:
    """The broker's answer about the result topic's partitions, as a test sets it (None: the
    broker cannot say)."""

    partitions: frozenset[int] | None = None

    async def of(self, topic: str) -> frozenset[int] | None:
        return self.partitions


@dataclass
class DecisionPath:
    settings: Settings
    sessions: async_sessionmaker[AsyncSession]
    orchestrator: WorkflowOrchestrator
    callbacks: BatchCallbackHandler
    metrics: Metrics
    decoded: DecodedStates
    broker_away: bool = False  # the relay publishes nothing until `publish_pending`
    result_partitions: KnownPartitions = field(default_factory=KnownPartitions)

    @classmethod
    def build(
        cls,
        sessions: async_sessionmaker[AsyncSession],
        database_url: str,
        *,
        worker: Worker | None = None,
        **settings: Any,
    ) -> DecisionPath:
        """One matching per iteration and no stopping on stability, unless `settings` say
        otherwise: small iterations whose end the tests choose. Large computations run on a
        thread unless a `worker` is given."""
        defaults = {"matchings_per_iteration": 1, "enable_stability_checking": False}
        s = Settings(database_url=database_url, log_level="WARNING", **(defaults | settings))
        metrics = Metrics()
        orchestrator = WorkflowOrchestrator(s, BatchProcessor(s, metrics), metrics, worker)
        callbacks = BatchCallbackHandler(orchestrator, metrics)
        return cls(s, sessions, orchestrator, callbacks, metrics, DecodedStates())

    def monitor(
        self, now: datetime | Callable[[], datetime], *, claim_limit: int = CLAIM_LIMIT
    ) -> RelayedMonitor:
        """The monitor at `now` (a moment, or a clock for a monitor that runs several
        passes); what its passes write to the outbox is published at once."""
        retention = Retention(self.settings, self.sessions, self.metrics)
        monitor = StuckAssessmentMonitor(
            self.settings,
            self.sessions,
            self.callbacks,
            self.orchestrator,
            self.metrics,
            retention,
            now if callable(now) else lambda: now,
            partitions=self.result_partitions,
            claim_limit=claim_limit,
        )
        return RelayedMonitor(monitor, self)

    async def relay(self) -> int:
        """Publish the pending outbox rows as a relay would right after their commit: each at
        its own event timestamp (the moment the test chose for the step that wrote it)."""
        if self.broker_away:
            return 0
        async with transaction(self.sessions) as session:
            published = await session.execute(
                text(
                    "UPDATE cj_event_outbox SET published_at ="
                    " CAST(CAST(payload AS jsonb) ->> 'event_timestamp' AS timestamptz)"
                    " WHERE published_at IS NULL AND undeliverable IS NULL"
                )
            )
        return published.rowcount

    async def handled_through(
        self, moments: dict[int, datetime], *, topic: str | None = None
    ) -> None:
        """Result partitions handled up to these moments, as their consumers note it (the
        result topic unless another is named)."""
        async with transaction(self.sessions) as session:
            await AssessmentRepository(session).note_result_watermarks(
                topic or self.settings.topic_llm_comparison_result, moments
            )

    async def publish_pending(self, now: datetime) -> int:
        """The broker is back: every pending outbox row is published at `now`, and the
        comparison requests held up restart their attempts' wait, as the relay does."""
        self.broker_away = False
        async with transaction(self.sessions) as session:
            published = (
                await session.execute(
                    text(
                        "UPDATE cj_event_outbox SET published_at = :now"
                        " WHERE published_at IS NULL AND undeliverable IS NULL"
                        " RETURNING topic, payload"
                    ),
                    {"now": now},
                )
            ).all()
            held = []
            for topic, payload in published:
                envelope = json.loads(payload)
                written = datetime.fromisoformat(envelope["event_timestamp"])
                if (
                    topic == self.settings.topic_llm_comparison_request
                    and (now - written).total_seconds() > HELD_SECONDS
                ):
                    held.append((envelope["data"]["correlation_id"], now))
            await wait_from_publication(session, held)
        return len(published)

    async def start(self, name: str, essays: int, now: datetime, **overrides: Any) -> int:
        config = resolve_batch_config(self.settings, essay_count=essays, overrides=overrides)
        new = NewAssessment(
            bos_batch_id=name,
            correlation_id=f"corr-{name}",
            essays=[(f"e{i:02d}", None, f"text {i}") for i in range(essays)],
            config=config,
            essay_instructions=None,
            llm_config_overrides={},
            language="en",
            course_code=None,
            assignment_id=None,
            user_id=None,
            org_id=None,
        )
        async with transaction(self.sessions) as session:
            repo = AssessmentRepository(session, self.decoded)
            cj_batch_id = await self.orchestrator.start(repo, new, now=now)
        assert cj_batch_id is not None
        await self.relay()
        return cj_batch_id

    async def answer(
        self, answers: list[tuple[Any, bool]], now: datetime, *, lost_before_commit: bool = False
    ) -> list[str]:
        """One poll: (attempt row from `attempts`, True for an "Essay A" verdict, False for an
        error result). `lost_before_commit`: the connection drops once the poll is handled,
        before its transaction commits (ConnectionResetError)."""
        results = [
            LLMComparisonResultV1(
                correlation_id=str(row.request_correlation_id),
                winner="Essay A" if ok else None,
                error_detail=None
                if ok
                else ErrorDetail(error_code="PROVIDER_ERROR", message="unavailable"),
            )
            for row, ok in answers
        ]
        return await self.deliver(results, now, lost_before_commit=lost_before_commit)

    async def deliver(
        self,
        results: list[LLMComparisonResultV1],
        now: datetime,
        *,
        lost_before_commit: bool = False,
    ) -> list[str]:
        """One poll of results as written."""
        polled = [(result, b"{}") for result in results]
        async with transaction(self.sessions) as session:
            repo = AssessmentRepository(session, self.decoded)
            outcomes = await self.callbacks.handle_results(repo, polled, now=now)
            if lost_before_commit:
                raise ConnectionResetError("connection lost before the commit")
        await self.relay()
        return [o.value for o in outcomes]

    async def answer_until_quiet(
        self,
        verdict: Callable[[Any], bool],
        start: int,
        *,
        only: Callable[[Any], bool] = lambda attempt: True,
    ) -> int:
        """Poll after poll, one second apart from `start`, answer every attempt in flight
        that `only` selects with `verdict(attempt)` (True: a winner, False: an error) until
        none is left; the second after the last poll."""
        moment = start
        while sent := [a for a in await self.in_flight() if only(a)]:
            await self.answer([(a, verdict(a)) for a in sent], at(moment))
            moment += 1
        return moment

    async def judged_pairs(self) -> set[frozenset[str]]:
        """The unordered essay pairs with a successful attempt."""
        return {
            frozenset((a.essay_a_els_id, a.essay_b_els_id))
            for a in await self.attempts()
            if a.status == "succeeded"
        }

    async def in_flight(self) -> list[Any]:
        """The attempts sent and not yet answered, in planning order."""
        return [a for a in await self.attempts() if a.status == "in_flight"]

    async def attempts(self) -> list[Any]:
        return await self.rows(
            "SELECT id, comparison_id, attempt, status, submitted_at, submission_batch_id,"
            " request_correlation_id, error_code, is_late, essay_a_els_id, essay_b_els_id,"
            " iteration FROM cj_comparison_pairs ORDER BY id"
        )

    async def state(self) -> Any:
        return (
            await self.rows(
                "SELECT state, total_comparisons, submitted_comparisons, completed_comparisons,"
                " failed_comparisons, current_iteration, last_activity_at FROM cj_batch_states"
            )
        )[0]

    async def completed_summary(self) -> dict[str, Any]:
        """`processing_summary` of the completed event written to the outbox."""
        (payload,) = await self.rows(
            "SELECT payload FROM cj_event_outbox WHERE payload LIKE '%\"cj_assessment.completed\"%'"
        )
        return json.loads(payload[0])["data"]["processing_summary"]

    async def rows(self, sql: str, **params: Any) -> list[Any]:
        async with self.sessions() as session:
            return list((await session.execute(text(sql), params)).all())


@dataclass
class RelayedMonitor:
    """A monitor whose passes are followed by the relay, as in `serve`."""

    monitor: StuckAssessmentMonitor
    path: DecisionPath

    async def run_once(self) -> int:
        actions = await self.monitor.run_once()
        await self.path.relay()
        return actions

    async def _drive_idle(
        self, cj_batch_id: int, idle_since: datetime, overdue_since: datetime, now: datetime
    ) -> int:
        actions = await self.monitor._drive_idle(cj_batch_id, idle_since, overdue_since, now)
        await self.path.relay()
        return actions
