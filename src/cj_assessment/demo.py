"""`cj-assessment demo`: an embedded broker and database, the simulated provider and the
service, ranking the bundled sample essays end to end."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid

from sqlalchemy import text

from cj_assessment.database import create_engine, migrate
from cj_assessment.embedded import EmbeddedKafka, EmbeddedPostgres, free_port
from cj_assessment.llm_provider import ProviderConfig, SimulatedProvider
from cj_assessment.logs import configure_logging
from cj_assessment.pipeline_client import OutcomeWatcher, format_ranking, publish, request_envelope
from cj_assessment.samples import SAMPLE_INSTRUCTIONS, load_sample_essays
from cj_assessment.service import serve
from cj_assessment.settings import Settings
from cj_assessment.topics import ensure_topics, service_topics


def _bar(done: int, total: int, width: int = 40) -> str:
    share = 0.0 if total == 0 else min(1.0, done / total)
    filled = int(share * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} comparisons"


async def run_demo(*, timeout: float = 120.0) -> int:
    started = time.monotonic()
    # The exported settings are checked before anything starts, like every other command's:
    # an out-of-range value (the log level included, which the demo then overrides) refuses
    # the demo instead of being found after the broker and database are up.
    Settings()
    configure_logging("WARNING", json=False)
    print("starting embedded Kafka (Tansu) and PostgreSQL ...", flush=True)
    kafka = EmbeddedKafka().start()
    postgres = EmbeddedPostgres().start()
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    try:
        settings = Settings(
            kafka_bootstrap_servers=kafka.bootstrap_servers,
            kafka_enable_idempotence=False,
            database_url=postgres.url,
            http_port=free_port(),
            http_host="127.0.0.1",
            log_level="WARNING",
            log_json=False,
        )
        await asyncio.to_thread(migrate, settings.database_url, settings.alembic_dir)
        await ensure_topics(
            settings.kafka_bootstrap_servers, service_topics(settings), partitions=3
        )
        provider = SimulatedProvider(
            ProviderConfig(
                bootstrap_servers=settings.kafka_bootstrap_servers,
                request_topic=settings.topic_llm_comparison_request,
                enable_idempotence=False,
                latency_median_ms=40,
                seed=7,
            )
        )
        tasks.append(asyncio.create_task(serve(settings, stop)))
        tasks.append(asyncio.create_task(provider.run(stop)))
        essays = load_sample_essays()
        bos_batch_id = f"demo-{uuid.uuid4().hex[:8]}"
        watcher = OutcomeWatcher(settings)
        await watcher.start()
        await publish(
            settings,
            [
                request_envelope(
                    bos_batch_id=bos_batch_id, essays=essays, instructions=SAMPLE_INSTRUCTIONS
                )
            ],
        )
        print(
            f"submitted {len(essays)} sample essays as {bos_batch_id} "
            f"(service metrics on http://127.0.0.1:{settings.http_port}/metrics)",
            flush=True,
        )
        engine = create_engine(settings)
        deadline = time.monotonic() + timeout
        outcome = None
        try:
            while time.monotonic() < deadline and outcome is None:
                await watcher.poll(0.25)
                found = watcher.outcomes_for(bos_batch_id)
                outcome = found[0] if found else None
                async with engine.connect() as conn:
                    row = (
                        await conn.execute(
                            text(
                                "SELECT s.completed_comparisons, s.total_comparisons, s.state"
                                " FROM cj_batch_states s JOIN cj_batch_uploads u"
                                " ON u.id = s.cj_batch_id WHERE u.bos_batch_id = :b"
                            ),
                            {"b": bos_batch_id},
                        )
                    ).first()
                if row is not None:
                    sys.stdout.write(f"\r{_bar(row[0], row[1])}  {row[2]:<18}")
                    sys.stdout.flush()
        finally:
            await engine.dispose()
            await watcher.stop()
        print()
        if outcome is None:
            print(f"no outcome within {timeout:.0f} s", file=sys.stderr)
            return 1
        print(format_ranking(outcome))
        print(f"\ndemo finished in {time.monotonic() - started:.1f} s")
        return 0 if outcome["data"]["event_name"] == "cj_assessment.completed" else 1
    finally:
        stop.set()
        for task in tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, timeout=15)
        kafka.stop()
        postgres.stop()
