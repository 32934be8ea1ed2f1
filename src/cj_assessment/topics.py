"""Topic creation: the service creates the topics it uses when they are missing."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from cj_assessment.errors import TopicsNotCreated
from cj_assessment.settings import Settings


def service_topics(settings: Settings) -> list[str]:
    consumed = [settings.topic_assessment_requested, settings.topic_llm_comparison_result]
    return [
        *consumed,
        settings.topic_llm_comparison_request,
        settings.topic_assessment_completed,
        settings.topic_assessment_failed,
        *(f"{topic}.dlt" for topic in consumed),
    ]


async def ensure_topics(
    bootstrap_servers: str, topics: list[str], partitions: int, replication_factor: int = 1
) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            try:
                response = await admin.create_topics(
                    [
                        NewTopic(
                            t, num_partitions=partitions, replication_factor=replication_factor
                        )
                        for t in missing
                    ]
                )
            except TopicAlreadyExistsError:
                return
            raise_refused_topics(response)
    finally:
        await admin.close()


_TOPIC_ALREADY_EXISTS = 36


def raise_refused_topics(response: Any) -> None:
    """aiokafka reports per-topic errors in the create-topics response instead of raising:
    raise them. A topic that another instance created meanwhile is no error."""
    refused = [
        f"{error[0]}: {error[2] if len(error) > 2 and error[2] else f'error code {error[1]}'}"
        for error in response.topic_errors
        if error[1] not in (0, _TOPIC_ALREADY_EXISTS)
    ]
    if refused:
        raise TopicsNotCreated("the broker refused to create " + "; ".join(refused))


class BrokerPartitions:
    """A topic's partitions from the metadata the producer's client keeps: refreshed in the
    background (`metadata_max_age_ms`), so asking once per monitor pass costs no request, and
    only this topic's metadata is ever fetched for it. An unreachable broker or an unknown
    topic is an unknown answer, not an error."""

    def __init__(self, producer: AIOKafkaProducer, timeout_seconds: float = 5.0) -> None:
        self._producer = producer
        self._timeout = timeout_seconds

    async def of(self, topic: str) -> frozenset[int] | None:
        try:
            partitions = await asyncio.wait_for(self._producer.partitions_for(topic), self._timeout)
        except Exception:  # noqa: BLE001 - unknown, and the caller counts every partition
            return None
        return frozenset(partitions) if partitions else None
