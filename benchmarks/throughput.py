"""Benchmark 1 of issue 5: result throughput of one `serve` instance.

Protocol. A `cj-assessment serve` child process (the measured instance) and a fresh database.
`assessments` requests of 20 essays are submitted; once every first-iteration comparison
request is published, results (a simulated verdict each) are pre-loaded in one burst onto the
result topic while the service is paused (SIGSTOP), then it is resumed. Measured: results
consumed, persisted and their offsets committed per second (the inbox holds one row per
handled result; offsets are committed right after each poll's transactions).

Two bursts: "results only" answers 80% of each assessment's requests, so no iteration closes
(the threshold is 85%); "with iteration closes" answers all of them, so every assessment also
scores, plans its next iteration and writes its next requests to the outbox.
Results go out in request order (each assessment's answers together, as a provider answering
in order sends them); one more "results only" burst interleaves them across all assessments.
Each burst runs against a service with `CJ_CONSUMER_BATCH_TRANSACTIONS=false` (one
transaction per record) as the baseline.

After each per-poll burst the service gets results at half its measured rate for a few
seconds, and the p99 of `cj_consume_to_commit_seconds` (fetched from the broker -> offset
committed) is read off its /metrics: for "results only", answers to requests answered before
(under new event ids: inbox, lookups and locks, but no state change); for "with iteration
closes", fresh answers to the next iteration's requests, each assessment closing again at 85%.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from aiokafka import AIOKafkaProducer

from benchmarks.system import (
    _scenario_settings,
    fresh_database,
    infrastructure,
    make_essays,
)
from cj_assessment.embedded import free_port
from cj_assessment.pipeline_client import make_producer, request_envelope
from cj_assessment.settings import Settings, child_environment
from cj_assessment.topics import ensure_topics, service_topics

ESSAYS = 20


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return response.read().decode()


async def _wait_http(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            await asyncio.to_thread(_get, port, "/healthz")
            return
        except OSError:
            await asyncio.sleep(0.2)
    raise TimeoutError("service did not start")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _result(payload: dict[str, Any], rng: np.random.Generator) -> bytes:
    data = payload["data"]
    meta = data["metadata"]
    return json.dumps(
        {
            "event_id": str(uuid.uuid4()),
            "event_type": "LLMComparisonResultV1",
            "event_timestamp": "2026-01-01T12:00:00Z",
            "source_service": "llm_provider_service",
            "schema_version": 1,
            "correlation_id": payload["correlation_id"],
            "data": {
                "request_id": str(uuid.uuid4()),
                "correlation_id": data["correlation_id"],
                "winner": "Essay A" if rng.random() < 0.5 else "Essay B",
                "justification": "Clearer argument and better organisation.",
                "confidence": 3.0,
                "error_detail": None,
                "provider": "bench",
                "model": "bench",
                "response_time_ms": 10,
                "token_usage": {"prompt_tokens": 900, "completion_tokens": 40, "total_tokens": 940},
                "cost_estimate": 0.0004,
                "request_metadata": {
                    "essay_a_id": meta["essay_a_id"],
                    "essay_b_id": meta["essay_b_id"],
                    "bos_batch_id": meta["bos_batch_id"],
                },
            },
            "metadata": {},
        }
    ).encode()


async def _rows(engine: Any, sql: str, **params: Any) -> list[Any]:
    from sqlalchemy import text

    async with engine.connect() as conn:
        return list((await conn.execute(text(sql), params)).all())


async def _count_handled(engine: Any, topic: str) -> int:
    rows = await _rows(engine, "SELECT count(*) FROM cj_event_inbox WHERE topic = :t", t=topic)
    return int(rows[0][0])


async def _scenario(
    assessments: int,
    *,
    batched: bool,
    half_load_seconds: float,
    share: float,
    interleaved: bool = False,
) -> dict:
    from sqlalchemy.ext.asyncio import create_async_engine

    infra = await asyncio.to_thread(infrastructure)
    async with fresh_database(infra.postgres_url) as database_url:
        settings = _scenario_settings(
            infra,
            database_url,
            {"http_port": free_port(), "monitor_interval_seconds": 30.0, "log_level": "WARNING"},
        )
        await ensure_topics(settings.kafka_bootstrap_servers, service_topics(settings), 3)
        env = child_environment(settings, CJ_CONSUMER_BATCH_TRANSACTIONS=str(batched).lower())
        service = subprocess.Popen(
            [sys.executable, "-m", "cj_assessment.cli", "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        engine = create_async_engine(database_url)
        producer: AIOKafkaProducer = make_producer(settings)
        await producer.start()
        try:
            await _wait_http(settings.http_port)
            essays = make_essays(ESSAYS)
            for i in range(assessments):
                envelope = request_envelope(bos_batch_id=f"tp-{i}", essays=essays)
                await producer.send(
                    settings.topic_assessment_requested,
                    json.dumps(envelope).encode(),
                    key=f"tp-{i}".encode(),
                )
            await producer.flush()
            topic = settings.topic_llm_comparison_request
            expected = assessments * (ESSAYS // 2) * settings.matchings_per_iteration
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                published = await _rows(
                    engine,
                    "SELECT count(*) FROM cj_event_outbox WHERE topic = :t"
                    " AND published_at IS NOT NULL",
                    t=topic,
                )
                if published[0][0] >= expected:
                    break
                await asyncio.sleep(0.5)
            payloads = [
                json.loads(row[0])
                for row in await _rows(
                    engine, "SELECT payload FROM cj_event_outbox WHERE topic = :t", t=topic
                )
            ]
            rng = np.random.default_rng(1)
            # `share` < 0.85 of each assessment's results: no iteration closes, the burst
            # measures result handling alone; 1.0: every assessment also closes its iteration
            # (scoring, next pairs, next requests) inside the burst.
            per_assessment: dict[str, list[dict]] = {}
            for p in payloads:
                per_assessment.setdefault(p["data"]["metadata"]["bos_batch_id"], []).append(p)
            chosen = [
                p for group in per_assessment.values() for p in group[: int(len(group) * share)]
            ]
            if interleaved:
                # Every poll then touches hundreds of assessments (the provider answering many
                # assessments at once) instead of a few dozen (answering in request order).
                rng.shuffle(chosen)  # type: ignore[arg-type]
            results = [_result(p, rng) for p in chosen]
            results_topic = settings.topic_llm_comparison_result
            # The burst is pre-loaded while the service is paused, so that the measurement is
            # of the service draining a backlog, not of it keeping pace with this producer.
            service.send_signal(signal.SIGSTOP)
            try:
                loading = time.monotonic()
                for value in results:
                    await producer.send(results_topic, value)
                await producer.flush()
                produced = time.monotonic() - loading
            finally:
                cpu_before = _cpu_seconds(service.pid)
                started = time.monotonic()
                service.send_signal(signal.SIGCONT)
            while await _count_handled(engine, results_topic) < len(results):
                await asyncio.sleep(0.05)
            elapsed = time.monotonic() - started
            cpu = _cpu_seconds(service.pid) - cpu_before
            rate = len(results) / elapsed
            p99 = None
            if half_load_seconds > 0:
                if share < 1.0:
                    # The same work as the burst: results for attempts that were answered
                    # (repeats under new event ids; no iteration closes).
                    steady = chosen
                else:
                    # Fresh answers to the next iteration's requests: the natural mix, with
                    # each assessment closing its iteration once 85% of them are in.
                    steady = await _next_iteration_requests(engine, topic, payloads)
                p99 = await _half_load_p99(
                    settings, producer, engine, steady, rng, rate / 2, half_load_seconds
                )
            return {
                "batched": batched,
                "results": len(results),
                "seconds": elapsed,
                "produce_seconds": produced,
                "rate": rate,
                "service_cpu_share": cpu / elapsed,
                "p99": p99,
            }
        finally:
            await producer.stop()
            await engine.dispose()
            service.send_signal(signal.SIGTERM)
            try:
                service.wait(timeout=30)
            except subprocess.TimeoutExpired:
                service.kill()


async def _next_iteration_requests(engine: Any, topic: str, first: list[dict]) -> list[dict]:
    """The comparison requests published after the burst (iteration 2), once they stop
    growing."""
    seen = {p["data"]["correlation_id"] for p in first}
    count, stable_since = -1, time.monotonic()
    while time.monotonic() - stable_since < 1.0:
        rows = await _rows(
            engine,
            "SELECT count(*) FROM cj_event_outbox WHERE topic = :t AND published_at IS NOT NULL",
            t=topic,
        )
        if rows[0][0] != count:
            count, stable_since = rows[0][0], time.monotonic()
        await asyncio.sleep(0.2)
    payloads = [
        json.loads(row[0])
        for row in await _rows(
            engine, "SELECT payload FROM cj_event_outbox WHERE topic = :t ORDER BY id", t=topic
        )
    ]
    return [p for p in payloads if p["data"]["correlation_id"] not in seen]


async def _half_load_p99(
    settings: Settings,
    producer: AIOKafkaProducer,
    engine: Any,
    payloads: list[dict],
    rng: np.random.Generator,
    rate: float,
    seconds: float,
) -> float | None:
    """Results built from `payloads` at `rate` per second; p99 of consume -> commit from the
    service's histogram."""
    before = _histogram(_get(settings.http_port, "/metrics"))
    interval = 0.05
    per_tick = max(1, int(rate * interval))
    ticks = int(seconds / interval)
    results_topic = settings.topic_llm_comparison_result
    index = 0
    start = time.monotonic()
    for tick in range(ticks):
        for _ in range(per_tick):
            await producer.send(results_topic, _result(payloads[index % len(payloads)], rng))
            index += 1
        await asyncio.sleep(max(0.0, start + (tick + 1) * interval - time.monotonic()))
    await producer.flush()
    await asyncio.sleep(2)
    after = _histogram(_get(settings.http_port, "/metrics"))
    counts = {le: after[le] - before.get(le, 0.0) for le in after}
    total = counts.get(float("inf"), 0.0)
    if total <= 0:
        return None
    for le in sorted(counts):
        if counts[le] >= 0.99 * total:
            return le
    return None


def _histogram(metrics: str) -> dict[float, float]:
    buckets: dict[float, float] = {}
    for match in re.finditer(
        r'cj_consume_to_commit_seconds_bucket\{le="([^"]+)"\} ([0-9.e+]+)', metrics
    ):
        le = float("inf") if match.group(1) == "+Inf" else float(match.group(1))
        buckets[le] = float(match.group(2))
    return buckets


def run(quick: bool = False) -> str:
    assessments = 100 if quick else 600
    return asyncio.run(_run(assessments, quick))


async def _run(assessments: int, quick: bool) -> str:
    half_load = 4 if quick else 8
    rows = [
        (
            "results only, per poll",
            await _scenario(assessments, batched=True, half_load_seconds=half_load, share=0.8),
        ),
        (
            "results only, per record",
            await _scenario(assessments, batched=False, half_load_seconds=0, share=0.8),
        ),
        (
            "results only, interleaved, per poll",
            await _scenario(
                assessments, batched=True, half_load_seconds=0, share=0.8, interleaved=True
            ),
        ),
        (
            "with iteration closes, per poll",
            await _scenario(assessments, batched=True, half_load_seconds=half_load, share=1.0),
        ),
        (
            "with iteration closes, per record",
            await _scenario(assessments, batched=False, half_load_seconds=0, share=1.0),
        ),
    ]
    lines = [
        f"Result throughput of one serve instance ({assessments} assessments x {ESSAYS} essays,"
        " results pre-loaded in one burst)",
        "",
        f"{'burst':<42} {'results':>8} {'results/s':>10} {'seconds':>8} {'service CPU':>12}",
    ]
    for label, row in rows:
        lines.append(
            f"{label:<42} {row['results']:>8} {row['rate']:>10.0f} {row['seconds']:>8.2f}"
            f" {row['service_cpu_share']:>11.0%}"
        )
    lines.append("")
    only, only_base, _, closes, closes_base = (row for _, row in rows)
    lines.append(
        f"speed-up of per-poll transactions: {only['rate'] / only_base['rate']:.1f}x (results"
        f" only), {closes['rate'] / closes_base['rate']:.1f}x (with iteration closes)"
    )
    for label, row in (("results only", only), ("with iteration closes", closes)):
        p99 = row["p99"]
        lines.append(
            f"p99 consume -> offset commit at half the measured rate, {label}: "
            + ("n/a" if p99 is None else f"<= {p99 * 1000:.0f} ms (histogram bucket bound)")
        )
    rate = only["rate"]
    verdict = "PASS" if rate >= 10_000 else ("PARTIAL" if rate >= 5_000 else "FAIL")
    lines.append(f"target >= 10,000 results/s (never below 5,000), results only: {verdict}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
