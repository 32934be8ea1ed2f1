"""The outbox relay against the real broker and database: what its gauges show while busy."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from cj_assessment import outbox
from cj_assessment.database import create_engine, session_factory
from cj_assessment.metrics import Metrics
from cj_assessment.outbox import OutboxRelay
from cj_assessment.settings import Settings
from cj_assessment.topics import ensure_topics
from tests.support.decision_path import DecisionPath, at

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


class _SlowAcknowledgements(AIOKafkaProducer):
    """The real producer, whose acknowledgements arrive `delay` seconds late (a broker under
    strain, or away for a while with an idempotent producer waiting for it)."""

    delay = 1.5

    async def send(self, *args: Any, **kwargs: Any) -> Any:
        delivery = await super().send(*args, **kwargs)

        async def late() -> Any:
            result = await delivery
            await asyncio.sleep(self.delay)
            return result

        return asyncio.ensure_future(late())


async def _round_with_late_acknowledgements(
    database_url: str, kafka_bootstrap: str
) -> tuple[int | None, int]:
    """One relay round of 5 rows on connections with a 0.5 s idle-in-transaction timeout,
    acknowledged 1.5 s late: the rows it published (None: the round failed) and the rows
    left pending."""
    topic = f"relay-slow-{uuid.uuid4().hex[:8]}"
    await ensure_topics(kafka_bootstrap, [topic], 1)
    settings = Settings(database_url=database_url, database_idle_in_transaction_timeout_seconds=0.5)
    engine = create_engine(settings)
    sessions = session_factory(engine)
    producer = _SlowAcknowledgements(bootstrap_servers=kafka_bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        async with sessions() as session, session.begin():
            await session.execute(
                text(
                    "INSERT INTO cj_event_outbox (event_id, topic, message_key, payload)"
                    " SELECT gen_random_uuid(), :topic, NULL, '{}' FROM generate_series(1, 5)"
                ),
                {"topic": topic},
            )
        relay = OutboxRelay(
            sessions,
            producer,
            Metrics(),
            batch_size=10,
            poll_interval=0.05,
            comparison_topic=topic,
            idle_in_transaction_timeout_seconds=(
                settings.database_idle_in_transaction_timeout_seconds
            ),
        )
        try:
            published: int | None = await relay.publish_pending()
        except DBAPIError:
            published = None
        async with sessions() as session:
            pending = await session.scalar(
                text("SELECT count(*) FROM cj_event_outbox WHERE published_at IS NULL")
            )
    finally:
        await producer.stop()
        await engine.dispose()
    return published, int(pending or 0)


async def test_a_round_waiting_longer_for_acknowledgements_than_the_idle_timeout_completes(
    database_url: str, kafka_bootstrap: str
) -> None:
    # Ended halfway by PostgreSQL, the round would be sent again: paid requests, twice.
    assert await _round_with_late_acknowledgements(database_url, kafka_bootstrap) == (5, 0)


async def test_a_round_waiting_past_its_own_limit_is_ended_and_releases_its_rows(
    database_url: str, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A relay cut off from the database (which TCP notices only after hours) must not keep
    # its claimed rows from the other relays for that long.
    monkeypatch.setattr(outbox, "ROUND_IDLE_LIMIT_SECONDS", 1.0)
    assert await _round_with_late_acknowledgements(database_url, kafka_bootstrap) == (None, 5)


async def test_a_comparison_request_published_late_restarts_its_attempts_wait_for_an_answer(
    sessions: async_sessionmaker[AsyncSession],
    kafka_bootstrap: str,
    decision_path: Callable[..., DecisionPath],
) -> None:
    topic = f"relay-held-{uuid.uuid4().hex[:8]}"
    await ensure_topics(kafka_bootstrap, [topic], 1)
    path = decision_path(topic_llm_comparison_request=topic, callback_wait_timeout_seconds=300)
    path.broker_away = True
    held = await path.start("held", 4, at(0))
    async with sessions() as session, session.begin():
        await session.execute(text("UPDATE cj_event_outbox SET created_at = now() - interval '2h'"))
    prompt = await path.start("prompt", 4, at(0))  # written just now: published on time
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        relay = OutboxRelay(
            sessions,
            producer,
            Metrics(),
            batch_size=100,
            poll_interval=0.05,
            comparison_topic=topic,
        )
        assert await relay.publish_pending() == 4
    finally:
        await producer.stop()
    waits = await path.rows(
        "SELECT p.cj_batch_id, p.submitted_at, o.published_at FROM cj_comparison_pairs p"
        " JOIN cj_event_outbox o ON o.event_id = p.request_event_id"
    )
    # The wait restarts as the relay takes the request to send it, just before the ack.
    restarted = [row[2] - row[1] for row in waits if row[0] == held]
    assert restarted and all(timedelta(0) <= gap < timedelta(seconds=5) for gap in restarted)
    assert {row[1] for row in waits if row[0] == prompt} == {at(0)}
    published = max(row[2] for row in waits)
    await path.monitor(published + timedelta(seconds=200)).run_once()
    statuses = await path.rows("SELECT cj_batch_id, status FROM cj_comparison_pairs")
    assert {status for batch, status in statuses if batch == held} == {"in_flight"}
    assert "timed_out" in {status for batch, status in statuses if batch == prompt}
