"""Benchmark 3 of issue 5: many concurrent assessments.

`assessments` requests of 20 essays are submitted at once; the service runs as `instances`
`cj-assessment serve` child processes in one consumer group, the reference provider as a
`cj-assessment provider` child process (20 ms median latency). Reported: wall time from the
first request to the last outcome, comparison results per second, whether every assessment
ended in exactly one completed event (distinct event ids), peak resident memory of each
service process, and the database size. The single-instance run is the baseline of the
multi-instance run.

    .venv/bin/python -m benchmarks.concurrency [--quick] [--assessments N] [--instances K]
    .venv/bin/python -m benchmarks.concurrency --stretch 10000 [--minutes 20]

The stretch run (one instance) samples its progress every 30 s: outcomes, results per second,
outbox rows waiting, the service's resident memory and the database size, so that what gives
way first shows; it stops when every assessment has its outcome or at the time cap.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from benchmarks.system import _scenario_settings, fresh_database, infrastructure, make_essays
from cj_assessment.embedded import free_port
from cj_assessment.pipeline_client import OutcomeWatcher, make_producer, request_envelope
from cj_assessment.settings import Settings, child_environment
from cj_assessment.topics import ensure_topics, service_topics

ESSAYS = 20


def _memory_mb(pid: int, field: str) -> float:
    """VmHWM (peak) or VmRSS (current) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class _Load:
    """A fresh database and topics, `serve` instances and the provider as child processes, an
    outcome watcher, a producer of requests and an engine on the database."""

    settings: Settings
    services: list[subprocess.Popen]
    watcher: OutcomeWatcher
    producer: AIOKafkaProducer
    engine: Any

    async def submit(self, ids: list[str]) -> float:
        """Publish one request of ESSAYS essays per id; returns the moment the first went."""
        essays = make_essays(ESSAYS)
        started = time.monotonic()
        for bos_batch_id in ids:
            envelope = request_envelope(bos_batch_id=bos_batch_id, essays=essays)
            await self.producer.send(
                self.settings.topic_assessment_requested,
                json.dumps(envelope).encode(),
                key=bos_batch_id.encode(),
            )
        await self.producer.flush()
        return started

    async def scalar(self, sql: str) -> Any:
        async with self.engine.connect() as conn:
            return (await conn.execute(text(sql))).scalar_one()

    async def answered(self) -> int:
        return int(
            await self.scalar(
                "SELECT count(*) FROM cj_comparison_pairs WHERE completed_at IS NOT NULL"
            )
        )

    async def database_mb(self) -> float:
        return float(await self.scalar("SELECT pg_database_size(current_database())")) / 2**20


@contextlib.asynccontextmanager
async def _load(instances: int) -> AsyncIterator[_Load]:
    infra = await asyncio.to_thread(infrastructure)
    async with fresh_database(infra.postgres_url) as database_url:
        settings = _scenario_settings(
            infra, database_url, {"kafka_topic_partitions": 6, "log_level": "WARNING"}
        )
        await ensure_topics(settings.kafka_bootstrap_servers, service_topics(settings), 6)
        cli = [sys.executable, "-m", "cj_assessment.cli"]
        services = [
            subprocess.Popen(
                [*cli, "serve"],
                env=child_environment(settings.model_copy(update={"http_port": free_port()})),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(instances)
        ]
        provider = subprocess.Popen(
            [*cli, "provider"],
            env=child_environment(
                settings,
                CJ_PROVIDER_LATENCY_MEDIAN_MS="20",
                CJ_PROVIDER_SLOTS="512",
                CJ_PROVIDER_GROUP_ID=f"{settings.kafka_consumer_group}-provider",
                CJ_PROVIDER_SEED="3",
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        watcher = OutcomeWatcher(settings)
        await watcher.start()
        producer = make_producer(settings)
        await producer.start()
        engine = create_async_engine(database_url)
        try:
            await asyncio.sleep(3)  # consumer groups joined
            yield _Load(settings, services, watcher, producer, engine)
        finally:
            await producer.stop()
            await watcher.stop()
            await engine.dispose()
            for process in (*services, provider):
                process.send_signal(signal.SIGTERM)
            for process in (*services, provider):
                try:
                    process.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    process.kill()


async def _watch(load: _Load, ids: list[str], *, started: float, minutes: float) -> list[dict]:
    """Progress of a stretch run, sampled every 30 s until every id has an outcome or
    `minutes` have passed."""
    every = 30.0
    samples: list[dict] = []
    waiting = set(ids)
    next_sample = started + every
    last_answered, last_at = 0, started
    pid = load.services[0].pid
    while waiting and time.monotonic() - started < minutes * 60:
        await load.watcher.poll(0.5)
        waiting = {b for b in waiting if not load.watcher.outcomes_for(b)}
        now = time.monotonic()
        if now >= next_sample or not waiting:
            answered = await load.answered()
            samples.append(
                {
                    "seconds": now - started,
                    "done": len(ids) - len(waiting),
                    "answered": answered,
                    "results_per_second": (answered - last_answered) / max(now - last_at, 1e-9),
                    "outbox_waiting": int(
                        await load.scalar(
                            "SELECT count(*) FROM cj_event_outbox WHERE published_at IS NULL"
                        )
                    ),
                    "rss_mb": _memory_mb(pid, "VmRSS"),
                    "database_mb": await load.database_mb(),
                }
            )
            last_answered, last_at = answered, now
            next_sample = now + every
    return samples


async def _stretch(assessments: int, minutes: float) -> str:
    async with _load(1) as load:
        ids = [f"stretch-{i}" for i in range(assessments)]
        started = await load.submit(ids)
        submitted = time.monotonic() - started
        samples = await _watch(load, ids, started=started, minutes=minutes)
        service = load.services[0]
        alive = service.poll() is None
        peak = _memory_mb(service.pid, "VmHWM") if alive else float("nan")
        events = sum(len(load.watcher.outcomes_for(b)) for b in ids)
    lines = [
        f"Stretch: {assessments} assessments of {ESSAYS} essays on one instance (provider"
        f" latency 20 ms), sampled every 30 s, stopped after {minutes:g} min at the latest;"
        f" requests published in {submitted:.1f} s",
        "",
        f"{'seconds':>8} {'outcomes':>9} {'answered':>9} {'results/s':>10} "
        f"{'outbox waiting':>15} {'RSS MB':>8} {'DB MB':>8}",
    ]
    for x in samples:
        lines.append(
            f"{x['seconds']:>8.0f} {x['done']:>9} {x['answered']:>9} "
            f"{x['results_per_second']:>10.0f} {x['outbox_waiting']:>15} {x['rss_mb']:>8.0f} "
            f"{x['database_mb']:>8.0f}"
        )
    done = samples[-1]["done"] if samples else 0
    lines += [
        "",
        f"outcome events: {events} for {done} assessments with an outcome (one each: "
        f"{events == done}); service {'alive' if alive else 'DEAD'}, peak RSS {peak:.0f} MB",
    ]
    return "\n".join(lines)


async def _scenario(assessments: int, instances: int, timeout: float) -> dict:
    async with _load(instances) as load:
        ids = [f"load-{i}" for i in range(assessments)]
        started = await load.submit(ids)
        await load.watcher.wait_for(ids, timeout=timeout)
        elapsed = time.monotonic() - started
        await asyncio.sleep(2)
        await load.watcher.poll(0.5)
        outcomes = {b: load.watcher.outcomes_for(b) for b in ids}
        return {
            "assessments": assessments,
            "instances": instances,
            "seconds": elapsed,
            "results_per_second": await load.answered() / elapsed,
            "exactly_once": all(len({e["event_id"] for e in o}) == 1 for o in outcomes.values()),
            "completed": sum(
                1
                for o in outcomes.values()
                if o[0]["data"]["event_name"] == "cj_assessment.completed"
            ),
            "peak_rss_mb": max(_memory_mb(p.pid, "VmHWM") for p in load.services),
            "database_mb": await load.database_mb(),
            # An instance that died (or never bound its port) would quietly turn a 3-instance
            # figure into a 2-instance one.
            "alive": sum(p.poll() is None for p in load.services),
        }


def _row(r: dict) -> str:
    return (
        f"{r['assessments']:>11} {r['instances']:>9} {r['seconds']:>9.1f} "
        f"{r['results_per_second']:>10.0f} {r['completed']:>9} {str(r['exactly_once']):>12} "
        f"{r['peak_rss_mb']:>12.0f} {r['database_mb']:>9.0f} {r['alive']:>9}"
    )


async def _run(assessments: int, instances: int, timeout: float) -> str:
    single = await _scenario(assessments, 1, timeout)
    several = await _scenario(assessments, instances, timeout) if instances > 1 else None
    lines = [
        f"Concurrent assessments ({ESSAYS} essays each, provider latency 20 ms)",
        "",
        f"{'assessments':>11} {'instances':>9} {'seconds':>9} {'results/s':>10} "
        f"{'completed':>9} {'exactly once':>12} {'peak RSS MB':>12} {'DB MB':>9} {'alive':>9}",
        _row(single),
    ]
    if several is not None:
        lines.append(_row(several))
        lines.append("")
        lines.append(
            f"speed-up with {instances} instances: {single['seconds'] / several['seconds']:.2f}x"
        )
    return "\n".join(lines)


def run(quick: bool = False) -> str:
    return asyncio.run(_run(200 if quick else 1000, 3, timeout=3600))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--assessments", type=int, default=None)
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument(
        "--stretch", type=int, default=None, help="one instance, this many assessments, sampled"
    )
    parser.add_argument("--minutes", type=float, default=20, help="time cap of --stretch")
    args = parser.parse_args()
    if args.stretch:
        print(asyncio.run(_stretch(args.stretch, args.minutes)))
        sys.exit(0)
    count = args.assessments or (200 if args.quick else 1000)
    print(asyncio.run(_run(count, args.instances, timeout=3600)))
