"""Runs the real service and the simulated provider in-process against the session's broker and
a per-test database, on per-test topics, and reads what they wrote."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from cj_assessment.embedded import free_port
from cj_assessment.llm_provider import ProviderConfig, SimulatedProvider
from cj_assessment.pipeline_client import OutcomeWatcher, publish
from cj_assessment.service import serve
from cj_assessment.settings import Settings
from cj_assessment.topics import ensure_topics, service_topics


def system_settings(kafka_bootstrap: str, database_url: str, **overrides: Any) -> Settings:
    suffix = uuid.uuid4().hex[:8]
    base = Settings()
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": kafka_bootstrap,
        "kafka_enable_idempotence": False,
        "kafka_consumer_group": f"cj-test-{suffix}",
        "kafka_topic_partitions": 3,
        "database_url": database_url,
        "http_host": "127.0.0.1",
        "http_port": free_port(),
        "log_level": "WARNING",
        "log_json": False,
        "monitor_interval_seconds": 1.0,
        "outbox_poll_interval_seconds": 0.1,
        "topic_assessment_requested": f"{base.topic_assessment_requested}.{suffix}",
        "topic_llm_comparison_request": f"{base.topic_llm_comparison_request}.{suffix}",
        "topic_llm_comparison_result": f"{base.topic_llm_comparison_result}.{suffix}",
        "topic_assessment_completed": f"{base.topic_assessment_completed}.{suffix}",
        "topic_assessment_failed": f"{base.topic_assessment_failed}.{suffix}",
    }
    values.update(overrides)
    return Settings(**values)


def provider_config(settings: Settings, **overrides: Any) -> ProviderConfig:
    config = ProviderConfig(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        request_topic=settings.topic_llm_comparison_request,
        enable_idempotence=False,
        group_id=f"cj-provider-{uuid.uuid4().hex[:8]}",
        latency_median_ms=20,
        seed=11,
    )
    return replace(config, **overrides)


@dataclass
class RunningSystem:
    settings: Settings
    watcher: OutcomeWatcher
    engine: AsyncEngine
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def submit(self, *envelopes: dict[str, Any]) -> None:
        await publish(self.settings, list(envelopes))

    async def rows(self, sql: str, **params: Any) -> list[Any]:
        async with self.engine.connect() as conn:
            return list((await conn.execute(text(sql), params)).all())

    def check_alive(self) -> None:
        for task in self.tasks:
            if task.done() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]


@contextlib.asynccontextmanager
async def running_system(
    settings: Settings, provider: ProviderConfig | None, *, instances: int = 1
) -> AsyncIterator[RunningSystem]:
    await ensure_topics(settings.kafka_bootstrap_servers, service_topics(settings), 3)
    stop = asyncio.Event()
    watcher = OutcomeWatcher(settings)
    await watcher.start()
    engine = create_async_engine(settings.database_url, pool_pre_ping=True)
    system = RunningSystem(settings, watcher, engine)
    for i in range(instances):
        instance = settings if i == 0 else settings.model_copy(update={"http_port": free_port()})
        system.tasks.append(asyncio.create_task(serve(instance, stop)))
    if provider is not None:
        system.tasks.append(asyncio.create_task(SimulatedProvider(provider).run(stop)))
    try:
        yield system
        system.check_alive()
    finally:
        stop.set()
        for task in system.tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, timeout=20)
        await watcher.stop()
        await engine.dispose()
