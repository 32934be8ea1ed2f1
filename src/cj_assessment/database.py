"""Engine, sessions and schema checks for the service's PostgreSQL database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from cj_assessment.errors import MigrationsNotFound
from cj_assessment.metrics import counted_on_commit
from cj_assessment.settings import Settings


def create_engine(settings: Settings) -> AsyncEngine:
    return create_async_engine(
        settings.database_url,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_pool_size,
        pool_pre_ping=True,
        # Statement parameters hold essay text and ids: kept out of error messages and logs.
        hide_parameters=True,
        # asyncpg waits 60 s for a connection by default: a database that drops packets would
        # hold a handler (and a shutdown) that long before its retry or its stop is noticed.
        connect_args={
            "timeout": settings.database_connect_timeout_seconds,
            # A lock held elsewhere (a forgotten session, a manual update) would otherwise hold
            # a poll's transaction, and every assessment of the instance behind it, silently
            # and without bound; past this its transaction fails, is logged and counted as a
            # transient retry (SQLSTATE 55P03), and is tried again.
            "server_settings": {
                "lock_timeout": str(max(1, int(settings.database_lock_timeout_seconds * 1000))),
                # An instance frozen inside a transaction (SIGSTOP, a paused container, a VM
                # stall) keeps its row locks while Kafka hands its partitions on; results of
                # any assessment reach every instance, so each would soon wait on them and
                # nothing would be handled anywhere until it woke. PostgreSQL ends such a
                # session after this; the frozen instance's transaction fails and is retried.
                "idle_in_transaction_session_timeout": str(
                    int(settings.database_idle_in_transaction_timeout_seconds * 1000)
                ),
            },
        },
    )


_IDLE_LIMIT = text("SELECT set_config('idle_in_transaction_session_timeout', :milliseconds, true)")


def longer_idle_limit(configured_seconds: float, at_least_seconds: float) -> float:
    """The idle-in-transaction limit for a transaction known to pause longer than the rest:
    at least ``at_least_seconds``, unless the connections have no limit at all (0)."""
    return 0.0 if configured_seconds <= 0 else max(configured_seconds, at_least_seconds)


async def set_idle_limit(session: AsyncSession, seconds: float) -> None:
    """This transaction's idle-in-transaction limit (0: none); it ends with the transaction."""
    await session.execute(_IDLE_LIMIT, {"milliseconds": str(int(seconds * 1000))})


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def transaction(sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """One transaction, committed when the block ends; what it counts in metrics is counted
    only once the commit succeeded."""
    with counted_on_commit():
        async with sessions() as session, session.begin():
            yield session


def alembic_directory(configured: str | None = None) -> Path:
    """`configured` (CJ_ALEMBIC_DIR), else `alembic/` of the source tree (editable install),
    else of the working directory. A configured directory is never passed over for another:
    migrating with other migrations than the ones meant would be worse than stopping."""
    if configured:
        candidates = [Path(configured)]
    else:
        candidates = [Path(__file__).resolve().parents[2] / "alembic", Path.cwd() / "alembic"]
    for candidate in candidates:
        if (candidate / "env.py").is_file():
            return candidate
    where = f"CJ_ALEMBIC_DIR={configured!r} holds no env.py" if configured else "none found"
    raise MigrationsNotFound(f"no alembic/ directory with the migrations: {where}")


def _alembic_config(database_url: str, directory: str | None = None):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(alembic_directory(directory)))
    config.attributes["database_url"] = database_url
    return config


def migrate(database_url: str, directory: str | None = None) -> None:
    """`alembic upgrade head`; idempotent."""
    from alembic import command

    command.upgrade(_alembic_config(database_url, directory), "head")


def head_revision(directory: str | None = None) -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config("", directory)).get_current_head()
    assert head is not None
    return head


def known_revisions(directory: str | None = None) -> set[str]:
    """Every revision this build's migrations know."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config("", directory))
    return {r.revision for r in script.walk_revisions()}


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        exists = (
            await conn.execute(text("SELECT to_regclass('public.alembic_version') IS NOT NULL"))
        ).scalar_one()
        if not exists:
            return None
        return (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
