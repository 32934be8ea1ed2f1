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
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from benchmarks.system import _scenario_settings, fresh_database, infrastructure, make_essays
from cj_assessment.embedded import free_port
from cj_assessment.pipeline_client import OutcomeWatcher, make_producer, request_envelope
from cj_assessment.settings import Settings, environment_of
from cj_assessment.topics import ensure_topics, service_topics

ESSAYS = 20


def _environment(settings: Settings, **extra: str) -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("CJ_")}
    return {**inherited, **environment_of(settings, **extra)}


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _sample(engine: Any) -> tuple[int, int, float]:
    """(attempts answered, outbox rows waiting, database MB)."""
    async with engine.connect() as conn:
        answered = (
            await conn.execute(
                text("SELECT count(*) FROM cj_comparison_pairs WHERE completed_at IS NOT NULL")
            )
        ).scalar_one()
        waiting = (
            await conn.execute(
                text("SELECT count(*) FROM cj_event_outbox WHERE published_at IS NULL")
            )
        ).scalar_one()
        size = (
            await conn.execute(text("SELECT pg_database_size(current_database())"))
        ).scalar_one()
    return int(answered), int(waiting), size / 1024 / 1024


async def _watch(
    watcher: OutcomeWatcher,
    ids: list[str],
    engine: Any,
    service_pid: int,
    *,
    started: float,
    minutes: float,
    every: float = 30.0,
) -> list[dict]:
    """Progress of a stretch run, sampled every `every` seconds until all ids have an
    outcome or `minutes` have passed."""
    samples: list[dict] = []
    waiting = set(ids)
    next_sample = started + every
    last_answered, last_at = 0, started
    while waiting and time.monotonic() - started < minutes * 60:
        await watcher.poll(0.5)
        waiting = {b for b in waiting if not watcher.outcomes_for(b)}
        now = time.monotonic()
        if now >= next_sample or not waiting:
            answered, backlog, database_mb = await _sample(engine)
            samples.append(
                {
                    "seconds": now - started,
                    "done": len(ids) - len(waiting),
                    "answered": answered,
                    "results_per_second": (answered - last_answered) / max(now - last_at, 1e-9),
                    "outbox_waiting": backlog,
                    "rss_mb": _rss_mb(service_pid),
                    "database_mb": database_mb,
                }
            )
            last_answered, last_at = answered, now
            next_sample = now + every
    return samples


async def _stretch(assessments: int, minutes: float) -> str:
    infra = await asyncio.to_thread(infrastructure)
    async with fresh_database(infra.postgres_url) as database_url:
        settings = _scenario_settings(
            infra, database_url, {"kafka_topic_partitions": 6, "log_level": "WARNING"}
        )
        await ensure_topics(settings.kafka_bootstrap_servers, service_topics(settings), 6)
        cli = [sys.executable, "-m", "cj_assessment.cli"]
        service = subprocess.Popen(
            [*cli, "serve"],
            env=_environment(settings.model_copy(update={"http_port": free_port()})),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        provider = subprocess.Popen(
            [*cli, "provider"],
            env=_environment(
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
            await asyncio.sleep(3)
            essays = make_essays(ESSAYS)
            ids = [f"stretch-{i}" for i in range(assessments)]
            started = time.monotonic()
            for bos_batch_id in ids:
                envelope = request_envelope(bos_batch_id=bos_batch_id, essays=essays)
                await producer.send(
                    settings.topic_assessment_requested,
                    json.dumps(envelope).encode(),
                    key=bos_batch_id.encode(),
                )
            await producer.flush()
            submitted = time.monotonic() - started
            samples = await _watch(
                watcher, ids, engine, service.pid, started=started, minutes=minutes
            )
            alive = service.poll() is None
            peak = _peak_rss_mb(service.pid) if alive else float("nan")
            events = sum(len(watcher.outcomes_for(b)) for b in ids)
        finally:
            await producer.stop()
            await watcher.stop()
            await engine.dispose()
            for process in (service, provider):
                process.send_signal(signal.SIGTERM)
            for process in (service, provider):
                try:
                    process.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    process.kill()
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
                env=_environment(settings.model_copy(update={"http_port": free_port()})),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(instances)
        ]
        provider = subprocess.Popen(
            [*cli, "provider"],
            env=_environment(
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
            essays = make_essays(ESSAYS)
            ids = [f"load-{i}" for i in range(assessments)]
            started = time.monotonic()
            for bos_batch_id in ids:
                envelope = request_envelope(bos_batch_id=bos_batch_id, essays=essays)
                await producer.send(
                    settings.topic_assessment_requested,
                    json.dumps(envelope).encode(),
                    key=bos_batch_id.encode(),
                )
            await producer.flush()
            await watcher.wait_for(ids, timeout=timeout)
            elapsed = time.monotonic() - started
            await asyncio.sleep(2)
            await watcher.poll(0.5)
            exactly_once = all(
                len({e["event_id"] for e in watcher.outcomes_for(b)}) == 1 for b in ids
            )
            completed = sum(
                1
                for b in ids
                if watcher.outcomes_for(b)[0]["data"]["event_name"] == "cj_assessment.completed"
            )
            async with engine.connect() as conn:
                attempts = (
                    await conn.execute(
                        text(
                            "SELECT count(*) FROM cj_comparison_pairs"
                            " WHERE completed_at IS NOT NULL"
                        )
                    )
                ).scalar_one()
                size = (
                    await conn.execute(text("SELECT pg_database_size(current_database())"))
                ).scalar_one()
            rss = [_peak_rss_mb(p.pid) for p in services]
            return {
                "assessments": assessments,
                "instances": instances,
                "seconds": elapsed,
                "results_per_second": attempts / elapsed,
                "exactly_once": exactly_once,
                "completed": completed,
                "peak_rss_mb": max(rss),
                "database_mb": size / 1024 / 1024,
            }
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


def _row(r: dict) -> str:
    return (
        f"{r['assessments']:>11} {r['instances']:>9} {r['seconds']:>9.1f} "
        f"{r['results_per_second']:>10.0f} {r['completed']:>9} {str(r['exactly_once']):>12} "
        f"{r['peak_rss_mb']:>12.0f} {r['database_mb']:>9.0f}"
    )


async def _run(assessments: int, instances: int, timeout: float) -> str:
    single = await _scenario(assessments, 1, timeout)
    several = await _scenario(assessments, instances, timeout) if instances > 1 else None
    lines = [
        f"Concurrent assessments ({ESSAYS} essays each, provider latency 20 ms)",
        "",
        f"{'assessments':>11} {'instances':>9} {'seconds':>9} {'results/s':>10} "
        f"{'completed':>9} {'exactly once':>12} {'peak RSS MB':>12} {'DB MB':>9}",
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
