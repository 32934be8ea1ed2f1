"""All wiring, in one dishka provider. Business code never imports dishka."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import datetime

import structlog
from aiokafka import AIOKafkaProducer
from dishka import AsyncContainer, Provider, Scope, from_context, make_async_container, provide
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from cj_assessment.batch_callback_handler import BatchCallbackHandler
from cj_assessment.batch_processor import BatchProcessor
from cj_assessment.consumer import Clock, EventConsumer, utcnow
from cj_assessment.content import ContentClient, HttpContentClient
from cj_assessment.database import create_engine, session_factory
from cj_assessment.metrics import Metrics
from cj_assessment.monitor import StuckAssessmentMonitor, UnsentAttempts
from cj_assessment.outbox import OutboxRelay
from cj_assessment.retention import Retention
from cj_assessment.settings import Settings
from cj_assessment.topics import BrokerPartitions
from cj_assessment.workers import WorkerProcess
from cj_assessment.workflow_orchestrator import WorkflowOrchestrator

log = structlog.get_logger(__name__)


class ServiceProvider(Provider):
    scope = Scope.APP

    settings = from_context(provides=Settings, scope=Scope.APP)

    @provide
    def clock(self) -> Clock:
        return utcnow

    @provide
    def metrics(self) -> Metrics:
        return Metrics()

    @provide
    async def engine(self, settings: Settings) -> AsyncIterator[AsyncEngine]:
        engine = create_engine(settings)
        yield engine
        await engine.dispose()

    @provide
    def sessions(self, engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
        return session_factory(engine)

    @provide
    async def producer(self, settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            enable_idempotence=settings.kafka_enable_idempotence,
            acks="all",
            # No lingering: the relay appends a whole round before it yields, so batches fill
            # anyway, and a round's last batch would otherwise wait out the linger.
            linger_ms=0,
            # An iteration's requests share one key, so one partition: with aiokafka's 16 KB
            # batches (two prompts each) they left as hundreds of sequential produce requests.
            max_batch_size=min(1024 * 1024, settings.kafka_max_message_bytes),
            # The broker's limit: a larger record is refused here, at `send`, for that row
            # alone, rather than by the broker for its whole batch.
            max_request_size=settings.kafka_max_message_bytes,
        )
        await producer.start()
        yield producer
        try:
            # Stopping flushes what is buffered, which waits as long as the broker is away.
            # Nothing unacknowledged is lost by giving up: outbox rows are marked published
            # only at their acknowledgement, dead letters are sent and awaited one by one.
            await asyncio.wait_for(producer.stop(), timeout=settings.shutdown_timeout_seconds)
        except TimeoutError:
            log.warning("producer_close_timed_out")

    @provide
    async def content(self, settings: Settings) -> AsyncIterator[ContentClient]:
        client = HttpContentClient(
            settings.content_service_url,
            timeout_seconds=settings.content_fetch_timeout_seconds,
            attempts=settings.content_fetch_attempts,
        )
        yield client
        await client.close()

    @provide
    def batch_processor(self, settings: Settings, metrics: Metrics) -> BatchProcessor:
        return BatchProcessor(settings, metrics)

    @provide
    def worker(self) -> Iterator[WorkerProcess]:
        worker = WorkerProcess()
        yield worker
        worker.close()

    @provide
    def orchestrator(
        self, settings: Settings, batches: BatchProcessor, metrics: Metrics, worker: WorkerProcess
    ) -> WorkflowOrchestrator:
        return WorkflowOrchestrator(settings, batches, metrics, worker)

    @provide
    def callbacks(
        self, orchestrator: WorkflowOrchestrator, metrics: Metrics
    ) -> BatchCallbackHandler:
        return BatchCallbackHandler(orchestrator, metrics)

    @provide
    def relay(
        self,
        settings: Settings,
        sessions: async_sessionmaker[AsyncSession],
        producer: AIOKafkaProducer,
        metrics: Metrics,
        unsent: UnsentAttempts,
    ) -> OutboxRelay:
        return OutboxRelay(
            sessions,
            producer,
            metrics,
            batch_size=settings.outbox_batch_size,
            poll_interval=settings.outbox_poll_interval_seconds,
            comparison_topic=settings.topic_llm_comparison_request,
            unsent=unsent,
            kill_after_ack=settings.fault_kill_after_relay_ack,
            idle_in_transaction_timeout_seconds=(
                settings.database_idle_in_transaction_timeout_seconds
            ),
        )

    @provide
    def unsent(
        self,
        sessions: async_sessionmaker[AsyncSession],
        callbacks: BatchCallbackHandler,
        metrics: Metrics,
        clock: Clock,
    ) -> UnsentAttempts:
        return UnsentAttempts(sessions, callbacks, metrics, clock)

    @provide
    def consumer(
        self,
        settings: Settings,
        sessions: async_sessionmaker[AsyncSession],
        orchestrator: WorkflowOrchestrator,
        callbacks: BatchCallbackHandler,
        content: ContentClient,
        producer: AIOKafkaProducer,
        metrics: Metrics,
        relay: OutboxRelay,
        clock: Clock,
    ) -> EventConsumer:
        return EventConsumer(
            settings,
            sessions,
            orchestrator,
            callbacks,
            content,
            producer,
            metrics,
            on_commit=relay.notify,
            clock=clock,
        )

    @provide
    def retention(
        self, settings: Settings, sessions: async_sessionmaker[AsyncSession], metrics: Metrics
    ) -> Retention:
        return Retention(settings, sessions, metrics)

    @provide
    def monitor(
        self,
        settings: Settings,
        sessions: async_sessionmaker[AsyncSession],
        callbacks: BatchCallbackHandler,
        orchestrator: WorkflowOrchestrator,
        metrics: Metrics,
        relay: OutboxRelay,
        retention: Retention,
        clock: Clock,
        producer: AIOKafkaProducer,
    ) -> StuckAssessmentMonitor:
        return StuckAssessmentMonitor(
            settings,
            sessions,
            callbacks,
            orchestrator,
            metrics,
            retention,
            clock,
            partitions=BrokerPartitions(producer),
            on_commit=relay.notify,
        )


def build_container(settings: Settings) -> AsyncContainer:
    return make_async_container(ServiceProvider(), context={Settings: settings})


__all__ = ["build_container", "ServiceProvider", "datetime"]
