"""What the broker says about a topic's partitions: the monitor's guard against watermark rows
of partitions a topic no longer has."""

from __future__ import annotations

import uuid

from aiokafka import AIOKafkaProducer

from cj_assessment.embedded import free_port
from cj_assessment.topics import BrokerPartitions, ensure_topics


async def test_the_broker_names_a_topics_partitions(kafka_bootstrap: str) -> None:
    topic = f"partitions-{uuid.uuid4().hex[:8]}"
    await ensure_topics(kafka_bootstrap, [topic], 3)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        known = await BrokerPartitions(producer, timeout_seconds=5.0).of(topic)
    finally:
        await producer.stop()
    assert known == frozenset({0, 1, 2})


async def test_an_unreachable_broker_is_an_unknown_answer_not_an_error() -> None:
    producer = AIOKafkaProducer(bootstrap_servers=f"127.0.0.1:{free_port()}")
    assert await BrokerPartitions(producer, timeout_seconds=1.0).of("anything") is None
