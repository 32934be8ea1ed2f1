"""Topic creation: the service creates the topics it uses when they are missing."""

from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

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
                await admin.create_topics(
                    [
                        NewTopic(
                            t, num_partitions=partitions, replication_factor=replication_factor
                        )
                        for t in missing
                    ]
                )
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()
