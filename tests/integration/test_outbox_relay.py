"""The outbox relay against the real broker and database: what its gauges show while busy."""

from __future__ import annotations

import asyncio
import uuid

from aiokafka import AIOKafkaProducer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from cj_assessment.metrics import Metrics
from cj_assessment.outbox import OutboxRelay
from cj_assessment.topics import ensure_topics

ROWS = 60


async def test_backlog_gauges_follow_a_backlog_while_the_relay_publishes_without_pause(
    sessions: async_sessionmaker[AsyncSession], kafka_bootstrap: str
) -> None:
    topic = f"relay-gauges-{uuid.uuid4().hex[:8]}"
    await ensure_topics(kafka_bootstrap, [topic], 1)
    async with sessions() as session, session.begin():
        await session.execute(
            text(
                "INSERT INTO cj_event_outbox (event_id, topic, message_key, payload)"
                " SELECT gen_random_uuid(), :topic, NULL, '{}' FROM generate_series(1, :rows)"
            ),
            {"topic": topic, "rows": ROWS},
        )
    metrics = Metrics()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=False)
    await producer.start()
    relay = OutboxRelay(
        sessions,
        producer,
        metrics,
        batch_size=5,  # twelve rounds, one after another
        poll_interval=0.05,
        comparison_topic=topic,
        backlog_refresh_seconds=0.0,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    shown: list[float] = []
    try:
        async with asyncio.timeout(30):
            while not (shown and shown[-1] == 0 and any(shown)):
                value = metrics.registry.get_sample_value("cj_outbox_backlog")
                if not shown or value != shown[-1]:
                    shown.append(value)
                await asyncio.sleep(0)
    finally:
        stop.set()
        await task
        await producer.stop()
    assert any(0 < value < ROWS for value in shown), shown
    assert shown[-1] == 0
    async with sessions() as session:
        pending = await session.scalar(
            text("SELECT count(*) FROM cj_event_outbox WHERE published_at IS NULL")
        )
    assert pending == 0
