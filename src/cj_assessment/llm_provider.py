"""The reference LLM provider worker (`cj-assessment provider --backend simulated`).

It stands in for the platform's LLM Provider Service: it consumes `LLMComparisonRequestV1`
messages (CONTRACT §5), judges each pair with `simulated_judge.judge` after a sampled latency,
and publishes an `LLMComparisonResultV1` (CONTRACT §6) to the request's `callback_topic`,
unkeyed, exactly like the real provider (whose results may land on any partition).

Delivery semantics are at-least-once:

* many requests are answered concurrently (`slots` tasks), so answers complete out of order;
* per partition, the committed offset only ever moves up to the first request whose result has
  not been published yet, so a crash re-delivers every unanswered request while a slow
  (heavy-tailed) answer never blocks new work from being fetched;
* results can be duplicated on purpose (`duplicate_rate`) to exercise the consumer's dedup.

Logs carry ids only (correlation ids, topic/partition/offset), never prompts or essay text.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from pydantic import BaseModel, ValidationError

from cj_assessment.contracts import (
    ComparisonRequestMetadata,
    ErrorDetail,
    EventEnvelope,
    LLMComparisonRequestV1,
    LLMComparisonResultV1,
    TokenUsage,
    deterministic_event_id,
    envelope_json,
    utc_iso,
)
from cj_assessment.prompt import extract_essays
from cj_assessment.simulated_judge import judge

log = structlog.get_logger(__name__)

PROVIDER_NAME = "simulated"
MODEL_NAME = "simulated-judge-1"
PROVIDER_SERVICE = "llm_provider_service"
DEFAULT_REQUEST_TOPIC = "huleedu.llm_provider.comparison_request.v1"

# Notional prices (USD per token) so cost_estimate looks like a real provider's.
_PROMPT_PRICE = 0.40 / 1_000_000
_COMPLETION_PRICE = 1.60 / 1_000_000


@dataclass(frozen=True)
class ProviderConfig:
    bootstrap_servers: str = "localhost:9092"
    request_topic: str = DEFAULT_REQUEST_TOPIC
    enable_idempotence: bool = True
    group_id: str = "cj_llm_provider"
    slots: int = 256  # requests answered concurrently
    latency_median_ms: float = 50.0  # median of the lognormal answer latency
    latency_sigma: float = 0.5  # lognormal sigma of the answer latency
    tail_rate: float = 0.0  # share of answers that are tail_factor x slower
    tail_factor: float = 10.0
    error_rate: float = 0.0  # share of answers that are PROVIDER_ERROR results
    duplicate_rate: float = 0.0  # share of results published twice
    noise: float = 1.0  # logistic noise scale of the judge
    position_bias: float = 0.0  # logits in favour of Essay A
    seed: int | None = None
    commit_interval_s: float = 0.2  # commit at most this often
    drain_timeout_s: float = 30.0  # on stop / revoke, longest wait for in-flight answers
    fetch_max_wait_ms: int = 20  # longest a fetch waits at the broker for new requests

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError("slots must be >= 1")
        for name in ("tail_rate", "error_rate", "duplicate_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        if self.latency_median_ms < 0 or self.latency_sigma < 0:
            raise ValueError("latency_median_ms and latency_sigma must be >= 0")
        if self.tail_factor < 1.0:
            raise ValueError("tail_factor must be >= 1")
        if self.noise <= 0:
            raise ValueError("noise must be > 0")
        if self.commit_interval_s <= 0 or self.drain_timeout_s <= 0:
            raise ValueError("commit_interval_s and drain_timeout_s must be > 0")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _env_bool(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name} must be a boolean, got {raw!r}")


def _env_num(environ: Mapping[str, str], name: str, default: float, kind: type = float) -> Any:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return kind(raw.strip())
    except ValueError as exc:
        described = "an integer" if kind is int else "a number"
        raise ValueError(f"{name} must be {described}, got {raw!r}") from exc


def provider_config_from_env(environ: Mapping[str, str]) -> ProviderConfig:
    """Build the provider's configuration from `CJ_KAFKA_*`, `CJ_TOPIC_*` and `CJ_PROVIDER_*`."""
    d = ProviderConfig()
    seed_raw = environ.get("CJ_PROVIDER_SEED", "").strip()
    try:
        return _provider_config(environ, d, seed_raw)
    except ValueError as exc:
        # Named as the operator set them (the field `error_rate` is CJ_PROVIDER_ERROR_RATE),
        # in the message's own words only: the value after ", got" is the operator's.
        head, got, value = str(exc).partition(", got ")
        for name in sorted(ProviderConfig.__dataclass_fields__, key=len, reverse=True):
            head = re.sub(rf"(?<![A-Z_]){name}\b", f"CJ_PROVIDER_{name.upper()}", head)
        raise ValueError(head + got + value) from exc


def _provider_config(
    environ: Mapping[str, str], d: ProviderConfig, seed_raw: str
) -> ProviderConfig:
    return ProviderConfig(
        bootstrap_servers=environ.get("CJ_KAFKA_BOOTSTRAP_SERVERS") or d.bootstrap_servers,
        request_topic=environ.get("CJ_TOPIC_LLM_COMPARISON_REQUEST") or d.request_topic,
        enable_idempotence=_env_bool(environ, "CJ_KAFKA_ENABLE_IDEMPOTENCE", d.enable_idempotence),
        group_id=environ.get("CJ_PROVIDER_GROUP_ID") or d.group_id,
        slots=_env_num(environ, "CJ_PROVIDER_SLOTS", d.slots, int),
        latency_median_ms=_env_num(environ, "CJ_PROVIDER_LATENCY_MEDIAN_MS", d.latency_median_ms),
        latency_sigma=_env_num(environ, "CJ_PROVIDER_LATENCY_SIGMA", d.latency_sigma),
        tail_rate=_env_num(environ, "CJ_PROVIDER_TAIL_RATE", d.tail_rate),
        tail_factor=_env_num(environ, "CJ_PROVIDER_TAIL_FACTOR", d.tail_factor),
        error_rate=_env_num(environ, "CJ_PROVIDER_ERROR_RATE", d.error_rate),
        duplicate_rate=_env_num(environ, "CJ_PROVIDER_DUPLICATE_RATE", d.duplicate_rate),
        noise=_env_num(environ, "CJ_PROVIDER_NOISE", d.noise),
        position_bias=_env_num(environ, "CJ_PROVIDER_POSITION_BIAS", d.position_bias),
        seed=_env_num(environ, "CJ_PROVIDER_SEED", 0, int) if seed_raw else None,
    )


# --- offset bookkeeping ----------------------------------------------------------------------


class _PartitionTracker:
    """Offsets of one partition in fetch order; knows how far it is safe to commit.

    A record is "done" once its result is published (or it was skipped as unparseable). The
    committable position is one past the longest done prefix, so out-of-order completion never
    commits past an unanswered request.
    """

    def __init__(self) -> None:
        self._in_order: deque[int] = deque()
        self._done: set[int] = set()
        self._position: int | None = None  # next offset to commit
        self.committed: int | None = None  # last position actually committed

    def add(self, offset: int) -> None:
        if self._position is None:
            self._position = offset
        self._in_order.append(offset)

    def mark_done(self, offset: int) -> None:
        self._done.add(offset)
        while self._in_order and self._in_order[0] in self._done:
            first = self._in_order.popleft()
            self._done.discard(first)
            self._position = first + 1

    @property
    def in_flight(self) -> int:
        return len(self._in_order)

    def to_commit(self) -> int | None:
        """The position to commit, or None when nothing new became committable."""
        if self._position is None or self._position == self.committed:
            return None
        return self._position


@dataclass(frozen=True)
class _Plan:
    """Everything random about one answer, drawn at dispatch so a seed reproduces a run."""

    latency_s: float
    fails: bool
    duplicate_delay_s: float | None
    winner: Literal["Essay A", "Essay B"] | None
    confidence: float | None
    justification: str | None


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, provider: SimulatedProvider) -> None:
        self._provider = provider

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._provider._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("provider.partitions_assigned", partitions=sorted(tp.partition for tp in assigned))


def _known_fields(model: type[BaseModel], data: Any) -> Any:
    """Keep only the fields `model` declares: requests are consumed tolerantly (unknown fields
    ignored) although the contract model forbids extras on the emitting side."""
    if not isinstance(data, dict):
        return data
    return {k: v for k, v in data.items() if k in model.model_fields}


def _parse_request(value: bytes | None) -> tuple[EventEnvelope, LLMComparisonRequestV1]:
    if value is None:
        raise ValueError("empty record value")
    envelope = EventEnvelope.model_validate(json.loads(value.decode("utf-8")))
    data = _known_fields(LLMComparisonRequestV1, envelope.data)
    if isinstance(data, dict) and isinstance(data.get("metadata"), dict):
        data = {**data, "metadata": _known_fields(ComparisonRequestMetadata, data["metadata"])}
    return envelope, LLMComparisonRequestV1.model_validate(data)


class SimulatedProvider:
    """Consumes comparison requests and answers them with the simulated judge."""

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config
        self._rng = np.random.default_rng(config.seed)
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._slots = asyncio.Semaphore(config.slots)
        self._trackers: dict[TopicPartition, _PartitionTracker] = {}
        self._tasks: dict[TopicPartition, set[asyncio.Task[None]]] = {}
        self._commit_lock = asyncio.Lock()
        self._stopping = False
        self.stats: dict[str, int] = {
            "received": 0,
            "answered": 0,
            "errors": 0,
            "duplicates": 0,
            "skipped": 0,
            "commits": 0,
        }

    # --- lifecycle ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Answer requests until `stop` is set; then finish in-flight answers, commit, stop."""
        if not await self._start_clients(stop):
            return
        assert self._consumer is not None and self._producer is not None
        committer = asyncio.create_task(self._commit_loop(stop), name="provider-committer")
        log.info(
            "provider.started",
            topic=self.config.request_topic,
            group_id=self.config.group_id,
            slots=self.config.slots,
        )
        try:
            if await self._await_topic(stop):
                self._consumer.subscribe(
                    topics=[self.config.request_topic], listener=_Rebalance(self)
                )
                await self._consume(stop)
        finally:
            self._stopping = True
            await self._drain(self._all_tasks())
            committer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await committer
            await self._commit()
            # The producer first: every answer is already awaited, this only flushes leftovers.
            with contextlib.suppress(KafkaError):
                await self._producer.stop()
            with contextlib.suppress(KafkaError):
                await self._consumer.stop()
            log.info("provider.stopped", **self.stats)

    async def _start_clients(self, stop: asyncio.Event) -> bool:
        """Start consumer and producer, retrying while the broker is not up yet."""
        delay = 0.5
        while not stop.is_set():
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.config.bootstrap_servers,
                group_id=self.config.group_id,
                client_id="cj-llm-provider",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                # Answer new requests promptly: some brokers hold a waiting fetch to its limit.
                fetch_max_wait_ms=self.config.fetch_max_wait_ms,
            )
            producer = AIOKafkaProducer(
                bootstrap_servers=self.config.bootstrap_servers,
                client_id="cj-llm-provider",
                enable_idempotence=self.config.enable_idempotence,
                acks="all",
                linger_ms=5,
            )
            try:
                await producer.start()
                await consumer.start()
            except KafkaError as exc:
                log.warning("provider.broker_unavailable", error=type(exc).__name__, retry_s=delay)
                with contextlib.suppress(KafkaError):
                    await producer.stop()
                with contextlib.suppress(KafkaError):
                    await consumer.stop()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                delay = min(delay * 2, 5.0)
                continue
            self._consumer, self._producer = consumer, producer
            return True
        return False

    async def _await_topic(self, stop: asyncio.Event) -> bool:
        """Wait until the request topic exists; False if stopped first.

        Subscribing to a missing topic would make the client's metadata requests ask the broker
        to auto-create it with broker defaults (wrong partition count); topics are created by
        whoever owns the deployment, so we only look (a full metadata fetch never auto-creates).
        """
        assert self._consumer is not None
        announced = False
        while not stop.is_set():
            try:
                if self.config.request_topic in await self._consumer.topics():
                    return True
            except KafkaError as exc:
                log.warning("provider.metadata_failed", error=type(exc).__name__)
            if not announced:
                log.info("provider.waiting_for_topic", topic=self.config.request_topic)
                announced = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
        return False

    async def _consume(self, stop: asyncio.Event) -> None:
        assert self._consumer is not None
        while not stop.is_set():
            try:
                batch = await self._consumer.getmany(timeout_ms=200, max_records=self.config.slots)
            except KafkaError as exc:
                # Transient fetch trouble (topic not there yet, leader moving): keep polling.
                log.warning("provider.fetch_failed", error=type(exc).__name__)
                await asyncio.sleep(0.5)
                continue
            for tp, records in batch.items():
                for record in records:
                    if stop.is_set():
                        # Fetched but never started: left uncommitted, so re-delivered later.
                        return
                    await self._dispatch(tp, record)

    # --- per record ----------------------------------------------------------------------------

    async def _dispatch(self, tp: TopicPartition, record: ConsumerRecord) -> None:
        assert self._consumer is not None
        if tp not in self._consumer.assignment():
            # Left over from a batch fetched before a rebalance took the partition away: the new
            # owner reads it from the committed offset, so starting it here would only duplicate.
            return
        tracker = self._trackers.setdefault(tp, _PartitionTracker())
        tracker.add(record.offset)
        self.stats["received"] += 1
        try:
            envelope, request = _parse_request(record.value)
        except (ValueError, ValidationError, UnicodeDecodeError) as exc:
            self.stats["skipped"] += 1
            log.warning(
                "provider.record_skipped",
                topic=tp.topic,
                partition=tp.partition,
                offset=record.offset,
                error=type(exc).__name__,
            )
            tracker.mark_done(record.offset)
            return
        plan = self._plan(request)
        # Wait for a free slot before starting: bounds concurrency and memory.
        await self._slots.acquire()
        task = asyncio.create_task(
            self._answer(tp, tracker, record.offset, envelope, request, plan),
            name=f"answer-{request.correlation_id}",
        )
        tasks = self._tasks.setdefault(tp, set())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def _plan(self, request: LLMComparisonRequestV1) -> _Plan:
        cfg = self.config
        rng = self._rng
        latency_ms = cfg.latency_median_ms * math.exp(cfg.latency_sigma * rng.standard_normal())
        if cfg.tail_rate > 0 and rng.random() < cfg.tail_rate:
            latency_ms *= cfg.tail_factor
        fails = cfg.error_rate > 0 and bool(rng.random() < cfg.error_rate)
        duplicate_delay_s: float | None = None
        if cfg.duplicate_rate > 0 and rng.random() < cfg.duplicate_rate:
            duplicate_delay_s = (
                cfg.latency_median_ms * math.exp(cfg.latency_sigma * rng.standard_normal()) / 1000
            )
        winner = confidence = justification = None
        if not fails:
            texts: tuple[str, str] | None
            try:
                texts = extract_essays(request.user_prompt)
            except ValueError:
                # A prompt we cannot read is answered with an error, never silence.
                texts = None
            if texts is not None:
                text_a, text_b = texts
                verdict = judge(
                    text_a, text_b, rng, noise=cfg.noise, position_bias=cfg.position_bias
                )
                winner = verdict.winner
                confidence = verdict.confidence
                justification = verdict.justification
        return _Plan(
            latency_s=latency_ms / 1000.0,
            fails=fails,
            duplicate_delay_s=duplicate_delay_s,
            winner=winner,
            confidence=confidence,
            justification=justification,
        )

    def _result(
        self, request: LLMComparisonRequestV1, plan: _Plan, requested_at: datetime
    ) -> LLMComparisonResultV1:
        completed_at = datetime.now(UTC)
        response_ms = max(0, int((completed_at - requested_at).total_seconds() * 1000))
        meta = request.metadata
        common: dict[str, Any] = {
            "request_id": str(deterministic_event_id("llm_request", request.correlation_id)),
            "correlation_id": request.correlation_id,
            "provider": PROVIDER_NAME,
            "model": MODEL_NAME,
            "response_time_ms": response_ms,
            "requested_at": utc_iso(requested_at),
            "completed_at": utc_iso(completed_at),
            "trace_id": None,
            "request_metadata": {
                "essay_a_id": meta.essay_a_id,
                "essay_b_id": meta.essay_b_id,
                "bos_batch_id": meta.bos_batch_id,
            },
        }
        if plan.winner is None:
            unreadable = not plan.fails
            return LLMComparisonResultV1(
                **common,
                error_detail=ErrorDetail(
                    error_code="VALIDATION_ERROR" if unreadable else "PROVIDER_ERROR",
                    message=(
                        "prompt does not hold exactly one Essay A and one Essay B"
                        if unreadable
                        else "simulated provider error"
                    ),
                    correlation_id=request.correlation_id,
                    timestamp=utc_iso(completed_at),
                    service=PROVIDER_SERVICE,
                    operation="generate_comparison",
                    details={},
                ),
            )
        # Token estimate: roughly four characters per token, as for English text.
        prompt_tokens = math.ceil(len(request.user_prompt) / 4)
        answer = json.dumps(
            {
                "winner": plan.winner,
                "justification": plan.justification,
                "confidence": plan.confidence,
            }
        )
        completion_tokens = math.ceil(len(answer) / 4)
        return LLMComparisonResultV1(
            **common,
            winner=plan.winner,
            justification=plan.justification,
            confidence=plan.confidence,
            token_usage=TokenUsage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
            ),
            cost_estimate=round(
                prompt_tokens * _PROMPT_PRICE + completion_tokens * _COMPLETION_PRICE, 8
            ),
        )

    async def _publish(
        self,
        envelope: EventEnvelope,
        request: LLMComparisonRequestV1,
        result: LLMComparisonResultV1,
        delivery: int,
    ) -> bool:
        """Publish one result; retry until acknowledged (or until shutdown gives up)."""
        assert self._producer is not None
        message = envelope_json(
            event_id=deterministic_event_id("llm_result", request.correlation_id, str(delivery)),
            event_type=request.callback_topic,
            correlation_id=envelope.correlation_id or request.correlation_id,
            data=result,
            now=datetime.now(UTC),
        )
        # envelope_json stamps the CJ service as source; this worker plays the provider.
        message["source_service"] = PROVIDER_SERVICE
        value = json.dumps(message, separators=(",", ":")).encode("utf-8")
        delay = 0.1
        while True:
            try:
                await self._producer.send_and_wait(request.callback_topic, value=value, key=None)
                return True
            except KafkaError as exc:
                log.warning(
                    "provider.publish_failed",
                    correlation_id=request.correlation_id,
                    delivery=delivery,
                    error=type(exc).__name__,
                )
                if self._stopping and delay >= 2.0:
                    # Shutting down with the broker away: leave it uncommitted (re-delivered).
                    return False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _answer(
        self,
        tp: TopicPartition,
        tracker: _PartitionTracker,
        offset: int,
        envelope: EventEnvelope,
        request: LLMComparisonRequestV1,
        plan: _Plan,
    ) -> None:
        requested_at = datetime.now(UTC)
        released = False
        try:
            await asyncio.sleep(plan.latency_s)
            result = self._result(request, plan, requested_at)
            if not await self._publish(envelope, request, result, delivery=1):
                return
            # Mark on the tracker this record was registered with: if the partition was revoked
            # and re-assigned meanwhile, the new tracker is not touched.
            tracker.mark_done(offset)
            if result.error_detail is not None:
                self.stats["errors"] += 1
            else:
                self.stats["answered"] += 1
            log.debug(
                "provider.answered",
                correlation_id=request.correlation_id,
                partition=tp.partition,
                offset=offset,
                error=result.error_detail is not None,
            )
            self._slots.release()
            released = True
            if plan.duplicate_delay_s is not None:
                await asyncio.sleep(plan.duplicate_delay_s)
                if await self._publish(envelope, request, result, delivery=2):
                    self.stats["duplicates"] += 1
        except Exception:
            # Never let one answer kill the worker; the record stays uncommitted (re-delivered).
            log.exception("provider.answer_failed", correlation_id=request.correlation_id)
        finally:
            if not released:
                self._slots.release()

    # --- commits and rebalances ------------------------------------------------------------------

    def _all_tasks(self) -> set[asyncio.Task[None]]:
        return {task for tasks in self._tasks.values() for task in tasks}

    async def _drain(self, tasks: set[asyncio.Task[None]]) -> None:
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self.config.drain_timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("provider.drain_timeout", abandoned=len(pending))
            await asyncio.wait(pending)

    async def _commit(self, only: set[TopicPartition] | None = None) -> None:
        if self._consumer is None:
            return
        async with self._commit_lock:
            # Only partitions we still own: committing any other one fails the whole commit.
            assigned = self._consumer.assignment()
            offsets: dict[TopicPartition, int] = {}
            for tp, tracker in self._trackers.items():
                if tp not in assigned:
                    continue
                if only is not None and tp not in only:
                    continue
                position = tracker.to_commit()
                if position is not None:
                    offsets[tp] = position
            if not offsets:
                return
            try:
                await self._consumer.commit(offsets)
            except KafkaError as exc:
                # e.g. a rebalance in progress: the next round (or the new owner) catches up.
                log.warning("provider.commit_failed", error=type(exc).__name__)
                return
            for tp, position in offsets.items():
                self._trackers[tp].committed = position
            self.stats["commits"] += 1

    async def _commit_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.config.commit_interval_s)
            await self._commit()

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Before a partition moves: finish its answers, commit them, forget the partition."""
        if not revoked:
            return
        tasks = {task for tp in revoked for task in self._tasks.get(tp, set())}
        await self._drain(tasks)
        await self._commit(only=revoked)
        for tp in revoked:
            self._trackers.pop(tp, None)
            self._tasks.pop(tp, None)
        log.info("provider.partitions_revoked", partitions=sorted(tp.partition for tp in revoked))


__all__ = [
    "MODEL_NAME",
    "PROVIDER_NAME",
    "ProviderConfig",
    "SimulatedProvider",
    "provider_config_from_env",
]
