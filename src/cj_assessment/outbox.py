"""The outbox relay: publishes rows written by handling transactions.

Rows are claimed with `FOR UPDATE SKIP LOCKED`, so several relays (one per instance) publish
each row once; a row is marked published only after the broker acknowledged it. After a crash
between acknowledgement and marking, the row is sent again with the same deterministic
event id, which consumers deduplicate.

A row larger than the broker takes (`kafka_max_message_bytes`) can never be sent: it is set
aside (`undeliverable`, kept unpublished and counted) instead of failing every round and
holding up the rows behind it; a comparison request set aside is reported to
`UnsentComparisons`, which counts its attempt as failed at once."""

from __future__ import annotations

import asyncio
import json
import math
import os
from collections.abc import Awaitable, Sequence
from datetime import UTC, datetime
from typing import Protocol

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from cj_assessment.database import longer_idle_limit, set_idle_limit
from cj_assessment.metrics import Metrics

log = structlog.get_logger(__name__)

# The predicate is the claim index's (ix_cj_event_outbox_pending), written out literally.
_CLAIM = text(
    "SELECT id, topic, message_key, payload, created_at FROM cj_event_outbox"
    " WHERE published_at IS NULL AND undeliverable IS NULL"
    " ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED"
)
# A comparison request published this long after it was written to the outbox (the broker was
# away, or the relay far behind) restarts its attempt's wait for an answer at publication.
HELD_SECONDS = 1.0
_WAIT_FROM_PUBLICATION = text(
    "UPDATE cj_comparison_pairs AS p SET submitted_at = v.acked_at"
    " FROM unnest(CAST(:correlation_ids AS uuid[]), CAST(:acked_at AS timestamptz[]))"
    " AS v(correlation_id, acked_at)"
    " WHERE p.request_correlation_id = v.correlation_id AND p.status = 'in_flight'"
    " AND p.submitted_at < v.acked_at"
)
_TOO_LARGE = "larger than kafka_max_message_bytes"
_SET_ASIDE = text(
    "UPDATE cj_event_outbox SET undeliverable = :reason WHERE id = ANY(CAST(:ids AS bigint[]))"
)
# Each row gets the moment the broker acknowledged it, not the end of its round: a round of
# hundreds of rows takes a while, and published_at is what time-to-result is measured from.
_MARK = text(
    "UPDATE cj_event_outbox AS o SET published_at = v.acked_at"
    " FROM unnest(CAST(:ids AS bigint[]), CAST(:acked_at AS timestamptz[])) AS v(id, acked_at)"
    " WHERE o.id = v.id"
)
_YIELD_EVERY = 50
# How long a round may wait for the broker's acknowledgements before PostgreSQL ends it: far
# above any acknowledgement of a live broker, yet a relay cut off from the database (a network
# partition, which TCP notices only after hours) releases its claimed rows to the others.
ROUND_IDLE_LIMIT_SECONDS = 600.0
_BACKLOG = text(
    "SELECT count(*), min(created_at) FROM cj_event_outbox"
    " WHERE published_at IS NULL AND undeliverable IS NULL"
)


class UnsentComparisons(Protocol):
    async def fail(self, correlation_ids: Sequence[str]) -> int:
        """Count these comparison attempts, whose requests will never be sent, as failed."""
        ...


class OutboxRelay:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        producer: AIOKafkaProducer,
        metrics: Metrics,
        *,
        batch_size: int,
        poll_interval: float,
        comparison_topic: str,
        unsent: UnsentComparisons | None = None,
        kill_after_ack: bool = False,
        backlog_refresh_seconds: float = 1.0,
        idle_in_transaction_timeout_seconds: float = 0.0,
    ) -> None:
        self._sessions = sessions
        self._producer = producer
        self._metrics = metrics
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._comparison_topic = comparison_topic
        self._unsent = unsent
        self._wake = asyncio.Event()
        self._kill_after_ack = kill_after_ack
        self._backlog_refresh_seconds = backlog_refresh_seconds
        # The connections' own idle limit (0: none) is too short for a round waiting on the
        # broker: ended halfway, the round would be sent a second time.
        self._round_idle_limit = longer_idle_limit(
            idle_in_transaction_timeout_seconds, ROUND_IDLE_LIMIT_SECONDS
        )

    def notify(self) -> None:
        """A handler committed outbox rows: publish without waiting for the next poll."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        delay = self._poll_interval
        loop = asyncio.get_running_loop()
        refreshed_at = -math.inf
        while True:
            try:
                published = await self.publish_pending()
                delay = self._poll_interval
            except Exception as exc:  # noqa: BLE001 - the relay keeps going while the broker is away
                log.warning("outbox_publish_failed", error_class=type(exc).__name__)
                published = 0
                delay = min(max(delay * 2, 0.5), 10.0)
            # Also while rounds follow each other without a pause: a backlog builds exactly
            # then, and its gauges are what an alert watches.
            if loop.time() - refreshed_at >= self._backlog_refresh_seconds:
                await self._refresh_backlog()
                refreshed_at = loop.time()
            if published:
                continue
            if stop.is_set():
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            except TimeoutError:
                pass

    async def publish_pending(self) -> int:
        """Publish one round of pending rows; the number of rows published or set aside."""
        async with self._sessions() as session, session.begin():
            rows = (await session.execute(_CLAIM, {"limit": self._batch_size})).all()
            if not rows:
                return 0
            # The round's transaction waits for the broker's acknowledgements: it holds only
            # the claimed outbox rows, which everyone else skips, so it gets a longer idle
            # limit than the connections' own. Set once there is a round, not on idle polls.
            await set_idle_limit(session, self._round_idle_limit)
            taken_at = datetime.now(UTC)
            held = [
                (json.loads(payload)["data"]["correlation_id"], taken_at)
                for _, topic, _, payload, created_at in rows
                if topic == self._comparison_topic
                and (taken_at - created_at).total_seconds() > HELD_SECONDS
            ]
            if held:
                # Committed on its own before sending, so that no lock on an attempt is held
                # across the send (an answer's transaction would wait on it). Harmless if the
                # sends fail: an attempt whose request is still in the outbox is never
                # overdue, and the round that does send it moves its wait again.
                async with self._sessions() as attempts, attempts.begin():
                    await wait_from_publication(attempts, held)
            sent: list[tuple[int, str]] = []
            futures = []
            aside: list[tuple[int, str, str]] = []  # id, topic, payload
            for position, (row_id, topic, key, payload, _) in enumerate(rows, start=1):
                try:
                    future = await self._producer.send(
                        topic,
                        value=payload.encode("utf-8"),
                        key=key.encode("utf-8") if key is not None else None,
                    )
                except MessageSizeTooLargeError:
                    # The producer's limit is the broker's: it would refuse the row every time.
                    aside.append((row_id, topic, payload))
                    continue
                sent.append((row_id, topic))
                futures.append(future)
                if position % _YIELD_EVERY == 0:
                    # `send` only appends to the producer's buffer without yielding; let its
                    # sender task ship the first batches while the rest are appended.
                    await asyncio.sleep(0)
            acked_at = await asyncio.gather(*(_acknowledged(future) for future in futures))
            if self._kill_after_ack:
                log.warning("fault_hook_exit", rows=len(rows))
                os._exit(18)
            if sent:
                await session.execute(
                    _MARK, {"ids": [row[0] for row in sent], "acked_at": acked_at}
                )
            if aside:
                await session.execute(
                    _SET_ASIDE,
                    {"ids": [a[0] for a in aside], "reason": _TOO_LARGE},
                )
        for _, topic in sent:
            self._metrics.outbox_published.labels(topic).inc()
        if aside:
            await self._report_set_aside(aside)
        return len(rows)

    async def _report_set_aside(self, rows: list[tuple[int, str, str]]) -> None:
        unsent: list[str] = []
        for row_id, topic, payload in rows:
            self._metrics.outbox_undeliverable.labels(topic).inc()
            log.error(
                "outbox_row_undeliverable",
                outbox_id=row_id,
                topic=topic,
                payload_chars=len(payload),
                reason=_TOO_LARGE,
            )
            if topic == self._comparison_topic:
                unsent.append(json.loads(payload)["data"]["correlation_id"])
        if unsent and self._unsent is not None:
            try:
                await self._unsent.fail(unsent)
            except Exception as exc:  # noqa: BLE001 - the monitor's timeout still fails them
                log.warning("unsent_comparisons_not_failed", error_class=type(exc).__name__)

    async def _refresh_backlog(self) -> None:
        try:
            async with self._sessions() as session:
                count, oldest = (await session.execute(_BACKLOG)).one()
        except Exception:  # noqa: BLE001 - a gauge refresh must never stop the relay
            return
        self._metrics.outbox_backlog.set(count)
        age = (datetime.now(UTC) - oldest).total_seconds() if oldest else 0.0
        self._metrics.outbox_oldest_age.set(max(0.0, age))


async def wait_from_publication(
    session: AsyncSession, published: Sequence[tuple[str, datetime]]
) -> None:
    """Restart the wait for an answer of these attempts, (request correlation id, moment its
    request is published), at their publication, in the transaction that publishes their
    rows. An attempt's wait (CJ_CALLBACK_WAIT_TIMEOUT_SECONDS) counts from when it was
    released into the outbox; after an outage that would time out requests the moment they
    are finally sent, and pay for their retries."""
    if published:
        await session.execute(
            _WAIT_FROM_PUBLICATION,
            {
                "correlation_ids": [correlation_id for correlation_id, _ in published],
                "acked_at": [moment for _, moment in published],
            },
        )


async def _acknowledged(future: Awaitable[object]) -> datetime:
    await future
    return datetime.now(UTC)
