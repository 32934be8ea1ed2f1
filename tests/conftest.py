"""Session-wide real infrastructure: a Kafka-protocol broker and PostgreSQL.

`CJ_TEST_KAFKA_BOOTSTRAP_SERVERS` / `CJ_TEST_DATABASE_URL` point the tests at running servers;
otherwise an embedded Tansu broker and an embedded PostgreSQL are started once per session."""

from __future__ import annotations

import os

# As `cj-assessment` does: one BLAS thread, set before numpy is imported by the service code.
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from cj_assessment.database import migrate
from cj_assessment.embedded import EmbeddedKafka, EmbeddedPostgres


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    external = os.environ.get("CJ_TEST_KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    broker = EmbeddedKafka().start()
    try:
        yield broker.bootstrap_servers
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_is_embedded() -> bool:
    return not os.environ.get("CJ_TEST_KAFKA_BOOTSTRAP_SERVERS")


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    external = os.environ.get("CJ_TEST_DATABASE_URL")
    if external:
        yield external
        return
    server = EmbeddedPostgres().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
async def database_url(postgres_server_url: str) -> AsyncIterator[str]:
    """A fresh, migrated database per test, on the session's server."""
    name = f"cj_test_{uuid.uuid4().hex[:10]}"
    admin_url = postgres_server_url.rsplit("/", 1)[0] + "/postgres"
    admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = postgres_server_url.rsplit("/", 1)[0] + f"/{name}"
    await asyncio.to_thread(migrate, url)
    try:
        yield url
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("CJ_TEST_KAFKA_BOOTSTRAP_SERVERS"):
        return
    skip = pytest.mark.skip(
        reason="needs a real Apache Kafka broker (CJ_TEST_KAFKA_BOOTSTRAP_SERVERS)"
    )
    for item in items:
        if "real_kafka" in item.keywords:
            item.add_marker(skip)
