"""Fixtures shared by the integration tests that talk to the repository directly."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from functools import partial

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from tests.support.decision_path import DecisionPath


@pytest.fixture
async def sessions(database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """Sessions on the test's fresh, migrated database."""
    engine = create_async_engine(database_url)
    try:
        yield async_sessionmaker(engine, expire_on_commit=False)
    finally:
        await engine.dispose()


@pytest.fixture
def decision_path(
    sessions: async_sessionmaker[AsyncSession], database_url: str
) -> Callable[..., DecisionPath]:
    """`decision_path(**settings)`: the decision path on the test's database."""
    return partial(DecisionPath.build, sessions, database_url)
