"""The service as benchmarks run it: real broker, real database, simulated provider, one process.

    from benchmarks.system import running_system, make_essays
    from cj_assessment.pipeline_client import request_envelope

    async with running_system(provider={"latency_median_ms": 200}, instances=2,
                              enable_stability_checking=False) as system:
        await system.submit(request_envelope(bos_batch_id="b1", essays=make_essays(30)))
        outcome = (await system.wait_for(["b1"], timeout=120))["b1"]
        print(outcome.seconds, outcome.completed)
        rows = await system.rows("SELECT count(*) FROM cj_comparison_pairs")

Infrastructure. One embedded Kafka-protocol broker (Tansu) and one embedded PostgreSQL are
started the first time a system is needed and kept for the rest of the process
(`shutdown_infrastructure()` stops them; it also runs at exit). `CJ_BENCH_KAFKA` (bootstrap
servers) and `CJ_BENCH_DATABASE_URL` (a SQLAlchemy asyncpg URL on a server where databases may
be created) point the benchmarks at running servers instead.

Per scenario (`running_system`). A fresh migrated database (so `cj_batch_id`s start at 1 and
pair generation, seeded per (cj_batch_id, iteration), repeats across scenarios; the warm-up
assessment takes id 1), per-scenario topic names and consumer groups, N `serve(settings, stop)`
instances sharing the consumer group, an optional `TimedProvider` (the reference
`SimulatedProvider`, recording per correlation id when a request reached it, the latency it
drew and when its result was acknowledged; in this process, or in a child process with
`provider_process=True`; read it with `system.provider_timeline()`) and an `OutcomeWatcher`.
On exit everything is stopped and the database dropped.

`running_system` keywords: `provider` (a dict of `ProviderConfig` fields; broker, topic and
group are filled in; None: no provider), `instances`, `warm_up` (one tiny assessment first, so
that group joins are not measured), `provider_process`, `consumer_fetch_max_wait_ms` (a
what-if, see `consumer_fetch_max_wait`); every other keyword is a `Settings` field (e.g.
`batch_size`, `partial_completion_threshold`, `enable_stability_checking`,
`outbox_poll_interval_seconds`).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from cj_assessment.database import migrate
from cj_assessment.embedded import EmbeddedKafka, EmbeddedPostgres, free_port
from cj_assessment.llm_provider import ProviderConfig, SimulatedProvider
from cj_assessment.pipeline_client import OutcomeWatcher, make_producer, request_envelope
from cj_assessment.samples import load_sample_essays
from cj_assessment.service import serve
from cj_assessment.settings import Settings
from cj_assessment.topics import ensure_topics, service_topics

__all__ = [
    "BenchSystem",
    "Outcome",
    "ProviderTimeline",
    "TimedProvider",
    "consumer_fetch_max_wait",
    "infrastructure",
    "make_essays",
    "running_system",
    "shutdown_infrastructure",
]

TOPIC_PARTITIONS = 3
_ROOT = Path(__file__).resolve().parents[1]  # the repository: `benchmarks` is importable there

# --- infrastructure, once per process ------------------------------------------------------------


@dataclass
class Infrastructure:
    kafka_bootstrap: str
    postgres_url: str  # a URL on the server; databases are created beside its database
    external_kafka: bool
    _kafka: EmbeddedKafka | None = None
    _postgres: EmbeddedPostgres | None = None

    def stop(self) -> None:
        if self._kafka is not None:
            self._kafka.stop()
            self._kafka = None
        if self._postgres is not None:
            self._postgres.stop()
            self._postgres = None


_infrastructure: Infrastructure | None = None


def infrastructure() -> Infrastructure:
    """The broker and database server of this process, started on first use (blocking)."""
    global _infrastructure
    if _infrastructure is not None:
        return _infrastructure
    kafka_env = os.environ.get("CJ_BENCH_KAFKA")
    database_env = os.environ.get("CJ_BENCH_DATABASE_URL")
    kafka = None if kafka_env else EmbeddedKafka().start()
    try:
        postgres = None if database_env else EmbeddedPostgres().start()
    except BaseException:
        if kafka is not None:
            kafka.stop()
        raise
    _infrastructure = Infrastructure(
        kafka_bootstrap=kafka_env or kafka.bootstrap_servers,  # type: ignore[union-attr]
        postgres_url=database_env or postgres.url,  # type: ignore[union-attr]
        external_kafka=bool(kafka_env),
        _kafka=kafka,
        _postgres=postgres,
    )
    atexit.register(shutdown_infrastructure)
    return _infrastructure


def shutdown_infrastructure() -> None:
    global _infrastructure
    if _infrastructure is not None:
        _infrastructure.stop()
        _infrastructure = None


def _sibling_url(server_url: str, database: str) -> str:
    return server_url.rsplit("/", 1)[0] + f"/{database}"


@contextlib.asynccontextmanager
async def fresh_database(server_url: str) -> AsyncIterator[str]:
    """A new, migrated database on the server of `server_url`; dropped afterwards."""
    name = f"cj_bench_{uuid.uuid4().hex[:10]}"
    admin = create_async_engine(_sibling_url(server_url, "postgres"), isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = _sibling_url(server_url, name)
        await asyncio.to_thread(migrate, url)
        try:
            yield url
        finally:
            async with admin.connect() as conn:
                await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        await admin.dispose()


# --- essays --------------------------------------------------------------------------------------


def make_essays(n: int, prefix: str = "essay") -> dict[str, str]:
    """`n` distinct essay texts: the 24 bundled samples, then revisions of them."""
    samples = list(load_sample_essays().values())
    essays: dict[str, str] = {}
    for i in range(n):
        body = samples[i % len(samples)]
        essays[f"{prefix}-{i:04d}"] = body if i < len(samples) else f"{body}\n\nRevision {i}."
    return essays


# --- provider with a timeline --------------------------------------------------------------------


class ProviderTimeline:
    """Per correlation id (UTC datetimes): `received` (request parsed, before waiting for a
    slot), `latency` (drawn answer latency in seconds, tail included), `published` (first
    result acknowledged by the broker)."""

    def __init__(self) -> None:
        self.received: dict[str, datetime] = {}
        self.latency: dict[str, float] = {}
        self.published: dict[str, datetime] = {}
        self._read = 0

    def load(self, path: Path) -> ProviderTimeline:
        """Read what a provider process appended to `path` since the last call."""
        if not path.exists():
            return self
        with path.open(encoding="utf-8") as f:
            f.seek(self._read)
            while True:
                line = f.readline()
                if not line.endswith("\n"):
                    break  # not completely written yet
                self._read = f.tell()
                kind, cid, moment, *rest = line.split()
                at = datetime.fromtimestamp(float(moment), UTC)
                if kind == "r":
                    self.received.setdefault(cid, at)
                    self.latency.setdefault(cid, float(rest[0]))
                else:
                    self.published.setdefault(cid, at)
        return self


class TimedProvider(SimulatedProvider):
    """The reference simulated provider, also recording its `ProviderTimeline` (in memory, and
    appended to `timeline_path` when given).

    It hooks the provider's `_plan` and `_publish`; if those change, the timeline stays empty
    and the benchmarks print n/a for what depends on it."""

    def __init__(self, config: ProviderConfig, timeline_path: Path | None = None) -> None:
        super().__init__(config)
        self.timeline = ProviderTimeline()
        self._file = timeline_path.open("a", encoding="utf-8") if timeline_path else None

    def _plan(self, request: Any) -> Any:  # type: ignore[override]
        now = datetime.now(UTC)
        plan = super()._plan(request)
        cid = request.correlation_id
        self.timeline.received.setdefault(cid, now)
        self.timeline.latency.setdefault(cid, plan.latency_s)
        if self._file is not None:
            self._file.write(f"r {cid} {now.timestamp():.6f} {plan.latency_s:.6f}\n")
            self._file.flush()
        return plan

    async def _publish(self, envelope: Any, request: Any, result: Any, delivery: int) -> bool:  # type: ignore[override]
        ok = await super()._publish(envelope, request, result, delivery)
        if ok and delivery == 1:
            now = datetime.now(UTC)
            self.timeline.published.setdefault(request.correlation_id, now)
            if self._file is not None:
                self._file.write(f"p {request.correlation_id} {now.timestamp():.6f}\n")
                self._file.flush()
        return ok


class _ProviderProcess:
    """A `TimedProvider` in a child process (`python -m benchmarks.system provider ...`)."""

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config
        self._directory = Path(tempfile.mkdtemp(prefix="cj-bench-provider-"))
        self.timeline_path = self._directory / "timeline.txt"
        self.timeline = ProviderTimeline()
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {**os.environ}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.system",
            "provider",
            json.dumps(asdict(self.config)),
            str(self.timeline_path),
            cwd=_ROOT,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
        )

    def refresh(self) -> ProviderTimeline:
        return self.timeline.load(self.timeline_path)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout=15)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        shutil.rmtree(self._directory, ignore_errors=True)

    def check_alive(self) -> None:
        if self.process is not None and self.process.returncode is not None:
            raise RuntimeError(f"provider process exited with {self.process.returncode}")


def _provider_main(config_json: str, timeline: str) -> None:
    """Entry point of the provider child process: answer until SIGTERM."""
    from cj_assessment.logs import configure_logging

    configure_logging("WARNING", json=False)
    config = ProviderConfig(**json.loads(config_json))

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await TimedProvider(config, Path(timeline)).run(stop)

    asyncio.run(main())


# --- the running system --------------------------------------------------------------------------


@dataclass
class Outcome:
    """The completed or failed event of one assessment and when the watcher saw it."""

    bos_batch_id: str
    event: dict[str, Any]
    seconds: float  # submit() -> event seen by the watcher (monotonic clock)
    seen_at: datetime  # UTC wall clock when the watcher saw it

    @property
    def completed(self) -> bool:
        return self.event["data"].get("event_name") != "cj_assessment.failed"


@dataclass
class BenchSystem:
    settings: Settings
    engine: AsyncEngine
    watcher: OutcomeWatcher
    producer: AIOKafkaProducer
    provider: TimedProvider | _ProviderProcess | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    submitted: dict[str, float] = field(default_factory=dict)  # bos_batch_id -> monotonic
    submitted_at: dict[str, datetime] = field(default_factory=dict)  # bos_batch_id -> UTC
    _seen: dict[str, tuple[float, datetime]] = field(default_factory=dict)

    async def submit(self, *envelopes: dict[str, Any]) -> None:
        """Publish assessment requests (built with `pipeline_client.request_envelope`)."""
        for envelope in envelopes:
            data = envelope["data"]
            key = (data.get("entity_ref") or {}).get("entity_id") or data.get("entity_id")
            self.submitted[key] = time.monotonic()
            self.submitted_at[key] = datetime.now(UTC)
            await self.producer.send_and_wait(
                self.settings.topic_assessment_requested,
                json.dumps(envelope).encode(),
                key=key.encode() if key else None,
            )

    async def wait_for(self, bos_batch_ids: list[str], timeout: float) -> dict[str, Outcome]:
        """Wait for every id's completed or failed event; raise TimeoutError naming the missing
        ones, or re-raise the error of a service instance / provider that died."""
        deadline = time.monotonic() + timeout
        while True:
            await self.watcher.poll(timeout=0.05)
            now, now_utc = time.monotonic(), datetime.now(UTC)
            for b in bos_batch_ids:
                if b not in self._seen and self.watcher.outcomes_for(b):
                    self._seen[b] = (now, now_utc)
            if all(b in self._seen for b in bos_batch_ids):
                break
            self.check_alive()
            if now > deadline:
                missing = [b for b in bos_batch_ids if b not in self._seen]
                raise TimeoutError(f"no outcome within {timeout:.0f} s for {missing[:5]}")
        return {
            b: Outcome(
                bos_batch_id=b,
                event=self.watcher.outcomes_for(b)[0],
                seconds=self._seen[b][0] - self.submitted.get(b, self._seen[b][0]),
                seen_at=self._seen[b][1],
            )
            for b in bos_batch_ids
        }

    async def rows(self, sql: str, **params: Any) -> list[Any]:
        """Run one SQL statement on the scenario's database; rows as tuples."""
        async with self.engine.connect() as conn:
            return list((await conn.execute(text(sql), params)).all())

    def provider_timeline(self) -> ProviderTimeline:
        """What the provider saw so far (empty without a provider)."""
        if isinstance(self.provider, _ProviderProcess):
            return self.provider.refresh()
        if isinstance(self.provider, TimedProvider):
            return self.provider.timeline
        return ProviderTimeline()

    def check_alive(self) -> None:
        if isinstance(self.provider, _ProviderProcess):
            self.provider.check_alive()
        for task in self.tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def warm_up(self, timeout: float = 60.0) -> None:
        """Run one tiny assessment through the whole loop (consumer groups joined, relay,
        provider, watcher), so that what is measured next excludes start-up. It takes
        cj_batch_id 1; the next assessment gets 2."""
        bos = f"warm-up-{uuid.uuid4().hex[:6]}"
        await self.submit(
            request_envelope(
                bos_batch_id=bos,
                essays=make_essays(4, prefix="warm"),
                batch_config_overrides={"max_comparisons": 2},
            )
        )
        await self.wait_for([bos], timeout=timeout)


def _scenario_settings(infra: Infrastructure, database_url: str, overrides: Mapping[str, Any]):
    suffix = uuid.uuid4().hex[:8]
    base = Settings()
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": infra.kafka_bootstrap,
        "kafka_enable_idempotence": False,
        "kafka_consumer_group": f"cj-bench-{suffix}",
        "kafka_topic_partitions": TOPIC_PARTITIONS,
        "database_url": database_url,
        "http_host": "127.0.0.1",
        "http_port": free_port(),
        "log_level": "WARNING",
        "log_json": False,
        "topic_assessment_requested": f"{base.topic_assessment_requested}.{suffix}",
        "topic_llm_comparison_request": f"{base.topic_llm_comparison_request}.{suffix}",
        "topic_llm_comparison_result": f"{base.topic_llm_comparison_result}.{suffix}",
        "topic_assessment_completed": f"{base.topic_assessment_completed}.{suffix}",
        "topic_assessment_failed": f"{base.topic_assessment_failed}.{suffix}",
    }
    values.update(overrides)
    return Settings(**values)


def _provider_config(settings: Settings, overrides: Mapping[str, Any]) -> ProviderConfig:
    config = ProviderConfig(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        request_topic=settings.topic_llm_comparison_request,
        enable_idempotence=False,
        group_id=f"cj-bench-provider-{uuid.uuid4().hex[:8]}",
        seed=11,
        drain_timeout_s=1.0,  # answers still running at the end of a scenario are dropped
    )
    return replace(config, **dict(overrides))


@contextlib.contextmanager
def consumer_fetch_max_wait(ms: int | None) -> Iterator[None]:
    """What-if knob: every `AIOKafkaConsumer` created meanwhile (service, provider, watcher)
    defaults to `fetch_max_wait_ms=ms` instead of aiokafka's 500. The service has no setting
    for it; this measures what one would change. None leaves everything as it is."""
    if ms is None:
        yield
        return
    original = AIOKafkaConsumer.__init__

    def patched(self: AIOKafkaConsumer, *topics: str, **kwargs: Any) -> None:
        kwargs.setdefault("fetch_max_wait_ms", ms)
        original(self, *topics, **kwargs)

    AIOKafkaConsumer.__init__ = patched  # type: ignore[method-assign]
    try:
        yield
    finally:
        AIOKafkaConsumer.__init__ = original  # type: ignore[method-assign]


@contextlib.asynccontextmanager
async def running_system(
    *,
    provider: Mapping[str, Any] | None = None,
    instances: int = 1,
    warm_up: bool = True,
    consumer_fetch_max_wait_ms: int | None = None,
    provider_process: bool = False,
    **settings_overrides: Any,
) -> AsyncIterator[BenchSystem]:
    """A fresh scenario: database, topics, `instances` service instances, the provider.

    With `warm_up` (the default, needs a provider) one tiny assessment runs first; see
    `BenchSystem.warm_up`. `consumer_fetch_max_wait_ms`: see `consumer_fetch_max_wait` (it
    reaches a provider process too). `provider_process`: run the provider in a child process,
    so that its CPU does not share the service's event loop (as in production)."""
    infra = await asyncio.to_thread(infrastructure)
    with consumer_fetch_max_wait(consumer_fetch_max_wait_ms):
        async with fresh_database(infra.postgres_url) as database_url:
            settings = _scenario_settings(infra, database_url, settings_overrides)
            await ensure_topics(
                settings.kafka_bootstrap_servers, service_topics(settings), TOPIC_PARTITIONS
            )
            stop = asyncio.Event()
            watcher = OutcomeWatcher(settings)
            producer = make_producer(settings)
            await producer.start()
            engine = create_async_engine(settings.database_url, pool_pre_ping=True)
            system = BenchSystem(settings, engine, watcher, producer)
            # The watcher's start() waits for its group join (seconds): overlap it with the
            # service's and the provider's joins.
            watcher_started = asyncio.create_task(watcher.start())
            try:
                for i in range(instances):
                    instance = (
                        settings
                        if i == 0
                        else settings.model_copy(update={"http_port": free_port()})
                    )
                    system.tasks.append(
                        asyncio.create_task(serve(instance, stop), name=f"serve-{i}")
                    )
                if provider is not None:
                    config = _provider_config(settings, provider)
                    if provider_process:
                        if consumer_fetch_max_wait_ms is not None:
                            os.environ["CJ_BENCH_FETCH_MAX_WAIT_MS"] = str(
                                consumer_fetch_max_wait_ms
                            )
                        child = _ProviderProcess(config)
                        system.provider = child
                        try:
                            await child.start()
                        finally:
                            os.environ.pop("CJ_BENCH_FETCH_MAX_WAIT_MS", None)
                    else:
                        timed = TimedProvider(config)
                        system.provider = timed
                        system.tasks.append(asyncio.create_task(timed.run(stop), name="provider"))
                await watcher_started
                if warm_up and provider is not None:
                    await system.warm_up()
                yield system
                system.check_alive()
            finally:
                stop.set()
                for task in system.tasks:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(task, timeout=20)
                if isinstance(system.provider, _ProviderProcess):
                    await system.provider.stop()
                with contextlib.suppress(Exception):
                    await watcher_started
                    await watcher.stop()
                await producer.stop()
                await engine.dispose()
                if infra.external_kafka:
                    await _delete_topics(settings)


async def _delete_topics(settings: Settings) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    with contextlib.suppress(Exception):
        await admin.start()
        try:
            await asyncio.wait_for(admin.delete_topics(service_topics(settings)), timeout=10)
        finally:
            await admin.close()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "provider":
        with consumer_fetch_max_wait(
            int(os.environ["CJ_BENCH_FETCH_MAX_WAIT_MS"])
            if os.environ.get("CJ_BENCH_FETCH_MAX_WAIT_MS")
            else None
        ):
            _provider_main(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python -m benchmarks.system provider CONFIG_JSON TIMELINE_PATH")
