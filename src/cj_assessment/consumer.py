"""The Kafka edge: one consumer for the request and result topics.

One record, one transaction: the record's event id goes into the inbox, the handler's state
changes and outgoing events (outbox rows) are written, the transaction commits, and only then
is that record's own offset committed (`{tp: offset + 1}`). Transient failures are retried in
place with backoff; permanent ones go to `<topic>.dlt` and the partition moves on."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from pydantic import ValidationError
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from cj_assessment.assessment_request import check_essay_list, check_essay_text
from cj_assessment.batch_callback_handler import BatchCallbackHandler
from cj_assessment.batch_config import merge_override_sources, resolve_batch_config
from cj_assessment.content import ContentClient
from cj_assessment.contracts import ELSCJAssessmentRequestV1, EventEnvelope, LLMComparisonResultV1
from cj_assessment.errors import PermanentError, PoisonMessage, RequestRejected, TransientError
from cj_assessment.metrics import Metrics
from cj_assessment.repository import AssessmentRepository
from cj_assessment.settings import Settings
from cj_assessment.workflow_orchestrator import NewAssessment, WorkflowOrchestrator

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]
MAX_UNKNOWN_ERROR_ATTEMPTS = 3


def utcnow() -> datetime:
    return datetime.now(UTC)


def classify(exc: BaseException) -> type[TransientError] | type[PermanentError] | None:
    """Which branch of the error tree an exception belongs to (None: unknown)."""
    if isinstance(exc, TransientError):
        return TransientError
    if isinstance(exc, PermanentError):
        return PermanentError
    if isinstance(exc, DBAPIError):
        return _classify_database_error(exc)
    if isinstance(exc, KafkaError | OSError | asyncio.TimeoutError | ConnectionError):
        return TransientError
    return None


# SQLSTATE classes: 08 connection, 40 rollback (serialization, deadlock), 53 resources,
# 57 operator intervention (shutdown), 58 system error: retrying can succeed.
_TRANSIENT_SQLSTATE_CLASSES = {"08", "40", "53", "57", "58"}
# 22 data exception (e.g. NUL in text), 23 integrity violation: the same record fails again.
_PERMANENT_SQLSTATE_CLASSES = {"22", "23"}


def _classify_database_error(exc: DBAPIError) -> type[TransientError] | type[PermanentError] | None:
    if exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError):
        return TransientError
    if isinstance(exc, IntegrityError | DataError):
        return PermanentError
    orig = exc.orig
    sqlstate = getattr(orig, "sqlstate", None) or getattr(
        getattr(orig, "__cause__", None), "sqlstate", None
    )
    if isinstance(sqlstate, str):
        if sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES:
            return TransientError
        if sqlstate[:2] in _PERMANENT_SQLSTATE_CLASSES:
            return PermanentError
    if isinstance(getattr(orig, "__cause__", None), OSError | ConnectionError):
        return TransientError
    return None


class _RebalanceListener(ConsumerRebalanceListener):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def on_partitions_revoked(self, revoked: Any) -> None:
        # Offsets are committed record by record after each transaction, so nothing handled is
        # left uncommitted when partitions move.
        self._metrics.rebalances.labels("revoked").inc()
        log.info("partitions_revoked", partitions=len(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self._metrics.rebalances.labels("assigned").inc()
        log.info("partitions_assigned", partitions=len(assigned))


class EventConsumer:
    def __init__(
        self,
        settings: Settings,
        sessions: async_sessionmaker[AsyncSession],
        orchestrator: WorkflowOrchestrator,
        callbacks: BatchCallbackHandler,
        content: ContentClient,
        producer: AIOKafkaProducer,
        metrics: Metrics,
        on_commit: Callable[[], None] = lambda: None,
        clock: Clock = utcnow,
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._orchestrator = orchestrator
        self._callbacks = callbacks
        self._content = content
        self._producer = producer
        self._metrics = metrics
        self._on_commit = on_commit
        self._clock = clock

    async def run(self, stop: asyncio.Event) -> None:
        s = self._settings
        consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap_servers,
            group_id=s.kafka_consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=s.kafka_max_poll_records,
        )
        await consumer.start()
        consumer.subscribe(
            [s.topic_assessment_requested, s.topic_llm_comparison_result],
            listener=_RebalanceListener(self._metrics),
        )
        try:
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=500)
                for tp, records in batch.items():
                    for record in records:
                        if not await self._process_with_retry(record, stop):
                            return  # stopping in the middle of a transient retry: not committed
                        await consumer.commit({tp: record.offset + 1})
        finally:
            await consumer.stop()

    async def _process_with_retry(self, record: Any, stop: asyncio.Event) -> bool:
        delay = 0.1
        unknown_failures = 0
        while True:
            try:
                outcome = await self._process(record)
                self._metrics.records.labels(record.topic, outcome).inc()
                return True
            except Exception as exc:  # noqa: BLE001 - every failure ends in retry or dead letter
                kind = classify(exc)
                if kind is None:
                    unknown_failures += 1
                    if unknown_failures >= MAX_UNKNOWN_ERROR_ATTEMPTS:
                        kind = PermanentError
                    else:
                        kind = TransientError
                    log.exception(
                        "record_failed_unexpectedly", topic=record.topic, offset=record.offset
                    )
                if kind is PermanentError:
                    await self._dead_letter(record, exc)
                    return True
                self._metrics.transient_retries.labels(record.topic).inc()
                log.warning(
                    "record_retry",
                    topic=record.topic,
                    partition=record.partition,
                    offset=record.offset,
                    error_class=type(exc).__name__,
                    delay_seconds=delay,
                )
                try:
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                    return False
                except TimeoutError:
                    delay = min(delay * 2, 10.0)

    async def _dead_letter(self, record: Any, exc: BaseException) -> None:
        reason = "poison" if isinstance(exc, PoisonMessage) else type(exc).__name__
        message = _short_message(exc)
        headers = [
            ("dlt.source.topic", record.topic.encode()),
            ("dlt.source.partition", str(record.partition).encode()),
            ("dlt.source.offset", str(record.offset).encode()),
            ("dlt.error.class", type(exc).__name__.encode()),
            ("dlt.error.message", message.encode()),
        ]
        await self._producer.send_and_wait(
            f"{record.topic}.dlt", value=record.value, key=record.key, headers=headers
        )
        self._metrics.dead_letters.labels(record.topic, reason).inc()
        self._metrics.records.labels(record.topic, "dead_lettered").inc()
        log.warning(
            "record_dead_lettered",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            error_class=type(exc).__name__,
            error=message,
        )

    async def _process(self, record: Any) -> str:
        envelope = _decode_envelope(record.value)
        if record.topic == self._settings.topic_llm_comparison_result:
            result = _parse(LLMComparisonResultV1, envelope.data)
            return await self._in_transaction(
                record,
                envelope,
                lambda repo, now: self._callbacks.handle_result(
                    repo, result, raw_payload=record.value.decode("utf-8", "replace"), now=now
                ),
            )
        if record.topic == self._settings.topic_assessment_requested:
            request = _parse(ELSCJAssessmentRequestV1, envelope.data)
            return await self._handle_request(record, envelope, request)
        raise PoisonMessage(f"no handler for topic {record.topic}")

    async def _in_transaction(
        self,
        record: Any,
        envelope: EventEnvelope,
        work: Callable[[AssessmentRepository, datetime], Awaitable[Any]],
    ) -> str:
        async with self._sessions() as session, session.begin():
            repo = AssessmentRepository(session)
            if not await repo.claim_inbox(
                envelope.event_id, record.topic, record.partition, record.offset
            ):
                return "duplicate"
            outcome = str(await work(repo, self._clock()))
            if outcome != "handled":
                await repo.set_inbox_outcome(envelope.event_id, outcome)
        self._on_commit()
        if self._settings.fault_kill_after_db_commit:
            log.warning("fault_hook_exit", topic=record.topic, offset=record.offset)
            os._exit(17)
        return outcome

    async def _handle_request(
        self, record: Any, envelope: EventEnvelope, request: ELSCJAssessmentRequestV1
    ) -> str:
        bos_batch_id = request.bos_batch_id
        if not bos_batch_id:
            raise PoisonMessage("request names no entity_ref.entity_id or entity_id")
        correlation_id = envelope.correlation_id or envelope.event_id
        async with self._sessions() as session:
            known = await AssessmentRepository(session).upload_exists(bos_batch_id)
        if known:
            return await self._in_transaction(record, envelope, _duplicate)
        try:
            new = await self._accept(request, envelope, bos_batch_id, correlation_id)
        except RequestRejected as exc:
            rejected = exc
            count = len(request.essays_for_cj)

            async def reject(repo: AssessmentRepository, now: datetime) -> str:
                done = await self._orchestrator.reject(
                    repo,
                    bos_batch_id=bos_batch_id,
                    correlation_id=correlation_id,
                    error=rejected,
                    essay_count=count,
                    now=now,
                )
                return "rejected" if done else "duplicate"

            return await self._in_transaction(record, envelope, reject)

        async def start(repo: AssessmentRepository, now: datetime) -> str:
            created = await self._orchestrator.start(repo, new, now=now)
            return "handled" if created is not None else "duplicate"

        return await self._in_transaction(record, envelope, start)

    async def _accept(
        self,
        request: ELSCJAssessmentRequestV1,
        envelope: EventEnvelope,
        bos_batch_id: str,
        correlation_id: str,
    ) -> NewAssessment:
        s = self._settings
        essays = check_essay_list(request, max_essays=s.max_essays)
        metadata = envelope.metadata or {}
        config = resolve_batch_config(
            s,
            essay_count=len(essays),
            overrides=merge_override_sources(
                request.batch_config_overrides, metadata.get("batch_config_overrides")
            ),
            metadata_max_comparisons=metadata.get("max_comparisons"),
        )
        texts = []
        for essay in essays:
            text = (
                essay.text
                if essay.text is not None
                else await self._content.fetch(essay.essay_id, essay.text_storage_id or "")
            )
            texts.append(
                (
                    essay.essay_id,
                    essay.text_storage_id,
                    check_essay_text(essay.essay_id, text, max_chars=s.max_essay_chars),
                )
            )
        overrides = (
            request.llm_config_overrides.model_dump() if request.llm_config_overrides else {}
        )
        llm = {
            "model_override": overrides.get("model_override") or s.llm_default_model,
            "temperature_override": overrides.get("temperature_override")
            if overrides.get("temperature_override") is not None
            else s.llm_default_temperature,
            "max_tokens_override": overrides.get("max_tokens_override") or s.llm_default_max_tokens,
            "provider_override": overrides.get("provider_override") or s.llm_default_provider,
        }
        return NewAssessment(
            bos_batch_id=bos_batch_id,
            correlation_id=correlation_id,
            essays=texts,
            config=config,
            essay_instructions=request.essay_instructions,
            llm_config_overrides=llm,
            language=request.language,
            course_code=request.course_code,
            assignment_id=request.assignment_id,
            user_id=request.user_id,
            org_id=request.org_id,
        )


async def _duplicate(repo: AssessmentRepository, now: datetime) -> str:
    return "duplicate"


def _decode_envelope(value: bytes | None) -> EventEnvelope:
    if value is None:
        raise PoisonMessage("record has no value")
    try:
        raw = json.loads(value.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PoisonMessage(f"undecodable record: {type(exc).__name__}") from exc
    if not isinstance(raw, dict):
        raise PoisonMessage("envelope is not a JSON object")
    return _parse(EventEnvelope, raw)


def _parse(model: Any, data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        fields = ",".join(".".join(str(p) for p in err["loc"]) for err in exc.errors()[:5])
        raise PoisonMessage(f"{model.__name__} invalid at: {fields}") from exc


def _short_message(exc: BaseException) -> str:
    # Messages of our own errors name fields, never values; driver messages can quote data.
    if isinstance(exc, PoisonMessage | RequestRejected):
        return str(exc)[:300]
    return type(exc).__name__
