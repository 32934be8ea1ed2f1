"""`cj-assessment serve`: consumer, outbox relay, monitor and HTTP server in one process.

SIGTERM stops fetching, lets the record in hand finish and commit, flushes the outbox,
and exits 0."""

from __future__ import annotations

import asyncio
import gc
import signal

import structlog
from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from cj_assessment.consumer import EventConsumer
from cj_assessment.database import current_revision, head_revision, known_revisions
from cj_assessment.errors import DependencyUnavailable, SchemaNotMigrated
from cj_assessment.http_api import build_app
from cj_assessment.metrics import Metrics
from cj_assessment.monitor import StuckAssessmentMonitor
from cj_assessment.outbox import OutboxRelay
from cj_assessment.settings import Settings
from cj_assessment.topics import ensure_topics, service_topics
from cj_assessment.wiring import build_container
from cj_assessment.workers import WorkerProcess

log = structlog.get_logger(__name__)


async def check_schema(engine: AsyncEngine, alembic_dir: str | None = None) -> None:
    current = await current_revision(engine)
    head = head_revision(alembic_dir)
    if current is not None and current != head and current not in known_revisions(alembic_dir):
        raise SchemaNotMigrated(
            f"database schema is at revision {current}, which this build does not know (a"
            f" newer build's, or another branch's; this build's newest is {head}): run a build"
            f" that includes revision {current}"
        )
    if current != head:
        raise SchemaNotMigrated(
            f"database schema is at revision {current or 'none'}, this service needs {head}: "
            "run `cj-assessment migrate` first"
        )


def tune_garbage_collector(young_threshold: int) -> None:
    """A poll of results allocates hundreds of thousands of short-lived objects. With Python's
    default thresholds the collector runs so often, over a heap of long-lived start-up objects,
    that it takes about a quarter of the service's CPU under a burst. Start-up objects are
    frozen out of every collection, and the young generation is collected less often (garbage
    is still collected; only the cadence changes)."""
    gc.collect()
    gc.freeze()
    if young_threshold > 0:
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(young_threshold, older, oldest)


def _unhandled_in_loop(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """asyncio's default handler writes the failed task's repr, exception message included;
    this one logs asyncio's own message and the exception's class and stack only."""
    log.error(
        "event_loop_exception",
        what=str(context.get("message", ""))[:200],
        exc_info=context.get("exception"),
    )


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    loop.set_exception_handler(_unhandled_in_loop)
    container = build_container(settings)
    try:
        engine = await container.get(AsyncEngine)
        try:
            await check_schema(engine, settings.alembic_dir)
        except (OSError, TimeoutError, DBAPIError) as exc:
            where = engine.url.render_as_string(hide_password=True)
            raise DependencyUnavailable(f"database {where} unreachable: {exc!r:.300}") from exc
        try:
            await ensure_topics(
                settings.kafka_bootstrap_servers,
                service_topics(settings),
                settings.kafka_topic_partitions,
                settings.kafka_topic_replication_factor,
            )
            producer = await container.get(AIOKafkaProducer)
        except (OSError, TimeoutError, KafkaError) as exc:
            where = settings.kafka_bootstrap_servers
            raise DependencyUnavailable(f"broker {where} unreachable: {exc!r:.300}") from exc
        metrics = await container.get(Metrics)
        relay = await container.get(OutboxRelay)
        consumer = await container.get(EventConsumer)
        monitor = await container.get(StuckAssessmentMonitor)

        async def readiness() -> dict[str, bool]:
            # Stopping: no longer ready, so that traffic and dependants move on first.
            checks = {"database": False, "broker": False, "running": not stop.is_set()}
            try:
                await asyncio.wait_for(_database_answers(engine), timeout=2)
                checks["database"] = True
            except Exception:  # noqa: BLE001 - readiness reports, never raises
                pass
            try:
                await asyncio.wait_for(producer.client.fetch_all_metadata(), timeout=2)
                checks["broker"] = True
            except Exception:  # noqa: BLE001
                pass
            return checks

        runner = web.AppRunner(build_app(metrics, readiness), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, settings.http_host, settings.http_port)
        await site.start()
        tune_garbage_collector(settings.gc_young_threshold)
        log.info("service_started", http_port=settings.http_port)
        relay_stop = asyncio.Event()
        tasks = [
            asyncio.create_task(consumer.run(stop), name="consumer"),
            asyncio.create_task(monitor.run(stop), name="monitor"),
        ]
        relay_task = asyncio.create_task(relay.run(relay_stop), name="relay")
        warming = asyncio.create_task(
            _warm_up(await container.get(WorkerProcess)), name="worker-warm-up"
        )
        stop_task = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([*tasks, stop_task], return_when=asyncio.FIRST_COMPLETED)
        stop.set()
        # One deadline for the whole shutdown, broker or database away included. Whatever is
        # cut short is left as a crash would leave it, which loses nothing: unacknowledged
        # outbox rows stay pending, uncommitted offsets are redelivered to the inbox. The
        # consumer, cancelled at half-time, still commits and leaves the group, each within a
        # fifth of the deadline; then the relay's last round, then the producer's flush.
        budget = settings.shutdown_timeout_seconds
        started = loop.time()
        await _finish(tasks, cancel_at=started + 0.5 * budget, give_up_at=started + 0.9 * budget)
        relay_stop.set()
        relay.notify()
        await _finish(
            [relay_task], cancel_at=started + 0.95 * budget, give_up_at=started + 0.97 * budget
        )
        try:
            await asyncio.wait_for(
                producer.stop(), timeout=max(0.1, started + budget - loop.time())
            )
        except TimeoutError:
            log.warning("producer_close_timed_out")
        stop_task.cancel()
        warming.cancel()
        await runner.cleanup()
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        log.info("service_stopped")
    finally:
        await container.close()


async def _warm_up(worker: WorkerProcess) -> None:
    """Start the worker process for large computations now rather than on the first large
    assessment (see `cj_assessment.workers`)."""
    try:
        await worker.warm_up()
    except Exception as exc:  # noqa: BLE001 - the first computation starts it again
        log.warning("worker_warm_up_failed", error_class=type(exc).__name__)


async def _finish(tasks: list[asyncio.Task[None]], cancel_at: float, give_up_at: float) -> None:
    """Wait for `tasks` until `cancel_at` (loop time), cancel those still running then, and
    wait for their clean-up until `give_up_at`."""
    loop = asyncio.get_running_loop()
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, cancel_at - loop.time()))
    for task in pending:
        log.warning("shutdown_task_cancelled", task=task.get_name())
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=max(0.0, give_up_at - loop.time()))


async def _database_answers(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
