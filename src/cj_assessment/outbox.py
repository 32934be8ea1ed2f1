"""The outbox relay: publishes rows written by handling transactions.

Rows are claimed with `FOR UPDATE SKIP LOCKED`, so several relays (one per instance) publish
each row once; a row is marked published only after the broker acknowledged it. After a crash
between acknowledgement and marking, the row is sent again with the same deterministic
event id, which consumers deduplicate."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable
from datetime import UTC, datetime

import structlog
from aiokafka import AIOKafkaProducer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from cj_assessment.metrics import Metrics

log = structlog.get_logger(__name__)

_CLAIM = text(
    "SELECT id, topic, message_key, payload FROM cj_event_outbox"
    " WHERE published_at IS NULL ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED"
)
# Each row gets the moment the broker acknowledged it, not the end of its round: a round of
# hundreds of rows takes a while, and published_at is what time-to-result is measured from.
_MARK = text(
    "UPDATE cj_event_outbox AS o SET published_at = v.acked_at"
    " FROM unnest(CAST(:ids AS bigint[]), CAST(:acked_at AS timestamptz[])) AS v(id, acked_at)"
    " WHERE o.id = v.id"
)
_YIELD_EVERY = 50
_BACKLOG = text("SELECT count(*), min(created_at) FROM cj_event_outbox WHERE published_at IS NULL")


class OutboxRelay:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        producer: AIOKafkaProducer,
        metrics: Metrics,
        *,
        batch_size: int,
        poll_interval: float,
        kill_after_ack: bool = False,
    ) -> None:
        self._sessions = sessions
        self._producer = producer
        self._metrics = metrics
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._wake = asyncio.Event()
        self._kill_after_ack = kill_after_ack

    def notify(self) -> None:
        """A handler committed outbox rows: publish without waiting for the next poll."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        delay = self._poll_interval
        while True:
            try:
                published = await self.publish_pending()
                delay = self._poll_interval
            except Exception as exc:  # noqa: BLE001 - the relay keeps going while the broker is away
                log.warning("outbox_publish_failed", error_class=type(exc).__name__)
                published = 0
                delay = min(max(delay * 2, 0.5), 10.0)
            if published:
                continue
            if stop.is_set():
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            except TimeoutError:
                pass
            await self._refresh_backlog()

    async def publish_pending(self) -> int:
        async with self._sessions() as session, session.begin():
            rows = (await session.execute(_CLAIM, {"limit": self._batch_size})).all()
            if not rows:
                return 0
            futures = []
            for position, (_, topic, key, payload) in enumerate(rows, start=1):
                futures.append(
                    await self._producer.send(
                        topic,
                        value=payload.encode("utf-8"),
                        key=key.encode("utf-8") if key is not None else None,
                    )
                )
                if position % _YIELD_EVERY == 0:
                    # `send` only appends to the producer's buffer without yielding; let its
                    # sender task ship the first batches while the rest are appended.
                    await asyncio.sleep(0)
            acked_at = await asyncio.gather(*(_acknowledged(future) for future in futures))
            if self._kill_after_ack:
                log.warning("fault_hook_exit", rows=len(rows))
                os._exit(18)
            await session.execute(_MARK, {"ids": [row[0] for row in rows], "acked_at": acked_at})
        for _, topic, _, _ in rows:
            self._metrics.outbox_published.labels(topic).inc()
        return len(rows)

    async def _refresh_backlog(self) -> None:
        try:
            async with self._sessions() as session:
                count, oldest = (await session.execute(_BACKLOG)).one()
        except Exception:  # noqa: BLE001 - a gauge refresh must never stop the relay
            return
        self._metrics.outbox_backlog.set(count)
        age = (datetime.now(UTC) - oldest).total_seconds() if oldest else 0.0
        self._metrics.outbox_oldest_age.set(max(0.0, age))


async def _acknowledged(future: Awaitable[object]) -> datetime:
    await future
    return datetime.now(UTC)
