"""Effectively-once handling of what the broker and the provider actually deliver: repeats,
repeats under new event ids, shuffling, unknown correlation ids, late results, poison records,
and a database that goes away for ten seconds."""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from cj_assessment.consumer import classify
from cj_assessment.database import create_engine, migrate
from cj_assessment.embedded import EmbeddedPostgres
from cj_assessment.errors import TransientError
from cj_assessment.pipeline_client import request_envelope, sleep_until
from cj_assessment.settings import Settings
from cj_assessment.topics import ensure_topics, service_topics
from tests.integration.test_assessment_flow import _essays
from tests.support.harness import RunningSystem, provider_config, running_system, system_settings
from tests.support.replaying_judge import (
    ReplayingJudge,
    result_envelope,
    result_envelope_for_unknown,
)

SENTINEL = "SENTINEL-c0ffee-7f3a"


async def _read_all(bootstrap: str, topic: str, expected: int, timeout: float = 15) -> list:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        group_id=f"reader-{uuid.uuid4().hex[:6]}",
    )
    await consumer.start()
    records: list = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(timeout_ms=250)
            records += [r for rs in batch.values() for r in rs]
            if len(records) >= expected:
                await asyncio.sleep(0.5)
                batch = await consumer.getmany(timeout_ms=250)
                records += [r for rs in batch.values() for r in rs]
                break
    finally:
        await consumer.stop()
    return records


async def test_repeated_shuffled_unknown_and_late_results_change_nothing_twice(
    kafka_bootstrap: str, database_url: str
) -> None:
    settings = system_settings(kafka_bootstrap, database_url)
    judge = ReplayingJudge(settings)
    stop_judge = asyncio.Event()
    async with running_system(settings, provider=None) as system:
        judge_task = asyncio.create_task(judge.run(stop_judge))
        await system.submit(request_envelope(bos_batch_id="replayed", essays=_essays(16)))
        await system.watcher.wait_for(["replayed"], timeout=90)
        late = await judge.release_held_back()
        # Everything delivered again after the end, under new event ids.
        await judge.send([{**e, "event_id": str(uuid.uuid4())} for e in judge.delivered])

        async def all_handled() -> bool:
            await system.watcher.poll()
            handled = await system.rows(
                "SELECT count(*) FROM cj_event_inbox WHERE topic = :t",
                t=settings.topic_llm_comparison_result,
            )
            return handled[0][0] >= 3 * len(judge.delivered) + late + judge.unknown_sent

        assert await sleep_until(all_handled, timeout=60)
        stop_judge.set()
        await judge_task
        await judge.close()
        events = system.watcher.outcomes_for("replayed")
        state = (await system.rows("SELECT completed_comparisons FROM cj_batch_states"))[0][0]
        succeeded = await system.rows(
            "SELECT count(*) FROM cj_comparison_pairs WHERE status = 'succeeded' AND NOT is_late"
        )
        late_rows = await system.rows(
            "SELECT count(*), count(justification) FROM cj_comparison_pairs WHERE is_late"
        )
        orphans = await system.rows("SELECT count(*) FROM cj_unmatched_results")
        outcomes = dict(
            await system.rows(
                "SELECT outcome, count(*) FROM cj_event_inbox WHERE topic = :t GROUP BY outcome",
                t=settings.topic_llm_comparison_result,
            )
        )
    assert late > 0
    assert len(events) == 1
    summary = events[0]["data"]["processing_summary"]
    assert state == succeeded[0][0] == summary["comparisons_succeeded"]
    assert orphans[0][0] == judge.unknown_sent == outcomes["orphan"]
    assert late_rows[0][0] == outcomes["late"] >= late
    # A late answer keeps its verdict, not the judge's words: retention may have erased texts.
    assert late_rows[0][1] == 0
    # Of each answer's two event ids the first to arrive is handled and the other is a
    # duplicate, so is the whole replay after the end; repeats under the same event id never
    # reach a handler (the inbox holds each event id once).
    assert outcomes["duplicate"] == 2 * len(judge.delivered)
    assert outcomes["handled"] + outcomes["late"] == len(judge.delivered) + late


async def test_poison_records_on_both_topics_are_dead_lettered_and_the_next_record_handled(
    kafka_bootstrap: str, database_url: str
) -> None:
    settings = system_settings(kafka_bootstrap, database_url)
    valid_request = request_envelope(bos_batch_id="after-poison", essays=_essays(4))
    wrong_request = request_envelope(bos_batch_id="wrong", essays=_essays(2))
    wrong_request["data"]["essays_for_cj"] = f"{SENTINEL} not a list"
    # No usable identity either, so there is no one to send a failed event to.
    wrong_request["data"]["entity_ref"] = {"entity_id": 42}
    nul_request = request_envelope(bos_batch_id=f"nul\u0000{SENTINEL}", essays=_essays(2))
    wrong_result = {
        "event_id": str(uuid.uuid4()),
        "event_type": "LLMComparisonResultV1",
        "data": {"correlation_id": str(uuid.uuid4()), "winner": f"Essay C {SENTINEL}"},
    }
    nul_result = {
        "event_id": str(uuid.uuid4()),
        "event_type": "LLMComparisonResultV1",
        "data": {"correlation_id": f"x\u0000{SENTINEL}", "winner": "Essay A"},
    }
    poison = [
        f"not json {SENTINEL}".encode(),
        b"{}",
    ]
    per_topic = {
        settings.topic_assessment_requested: [*poison, *map(_json, (wrong_request, nul_request))],
        settings.topic_llm_comparison_result: [*poison, _json(wrong_result)],
    }
    # A correlation id PostgreSQL cannot store matches nothing we sent either: it is kept with
    # the unmatched results, its NUL removed, rather than dead-lettered.
    unmatched = {settings.topic_llm_comparison_result: [_json(nul_result)]}
    async with running_system(settings, provider_config(settings)) as system:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=False)
        await producer.start()
        try:
            for topic, values in [*per_topic.items(), *unmatched.items()]:
                for value in values:
                    await producer.send_and_wait(topic, value, key=b"poison")
        finally:
            await producer.stop()
        await system.submit(valid_request)
        outcome = (await system.watcher.wait_for(["after-poison"], timeout=60))["after-poison"]
        system.check_alive()
        dead = {
            topic: await _read_all(kafka_bootstrap, f"{topic}.dlt", len(values))
            for topic, values in per_topic.items()
        }
        kept = await system.rows("SELECT correlation_id FROM cj_unmatched_results")
    assert outcome["data"]["status"] == "completed_successfully"
    assert kept == [(f"x{SENTINEL}",)]
    for topic, values in per_topic.items():
        records = dead[topic]
        assert sorted(r.value for r in records) == sorted(values)
        for record in records:
            headers = dict(record.headers)
            assert headers["dlt.source.topic"].decode() == topic
            assert int(headers["dlt.source.offset"]) >= 0
            assert record.key == b"poison"
            assert all(SENTINEL.encode() not in v for v in headers.values())


async def test_a_poison_record_too_large_to_copy_whole_is_dead_lettered_without_its_value(
    kafka_bootstrap: str, database_url: str
) -> None:
    settings = system_settings(kafka_bootstrap, database_url, kafka_max_message_bytes=65_536)
    # Within the broker's limit, but not once the dead-letter headers are added to it.
    oversized = b"x" * 65_400
    async with running_system(settings, provider_config(settings)) as system:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=False)
        await producer.start()
        try:
            await producer.send_and_wait(
                settings.topic_llm_comparison_result, oversized, key=b"big"
            )
        finally:
            await producer.stop()
        await system.submit(request_envelope(bos_batch_id="after-big", essays=_essays(4)))
        outcome = (await system.watcher.wait_for(["after-big"], timeout=60))["after-big"]
        system.check_alive()
        dead = await _read_all(kafka_bootstrap, f"{settings.topic_llm_comparison_result}.dlt", 1)
    assert outcome["data"]["status"] == "completed_successfully"
    assert len(dead) == 1
    headers = dict(dead[0].headers)
    assert dead[0].value is None
    assert dead[0].key == b"big"
    assert headers["dlt.value.dropped.bytes"] == str(len(oversized)).encode()
    assert headers["dlt.source.topic"].decode() == settings.topic_llm_comparison_result
    assert int(headers["dlt.source.offset"]) >= 0


async def test_database_away_for_ten_seconds_loses_nothing_and_the_assessment_completes(
    kafka_bootstrap: str,
) -> None:
    postgres = EmbeddedPostgres().start()
    try:
        await asyncio.to_thread(migrate, postgres.url)
        settings = system_settings(kafka_bootstrap, postgres.url)
        provider = provider_config(settings, latency_median_ms=150)
        async with running_system(settings, provider) as system:
            await system.submit(request_envelope(bos_batch_id="outage", essays=_essays(30)))

            async def underway() -> bool:
                done = await system.rows(
                    "SELECT count(*) FROM cj_comparison_pairs WHERE status = 'succeeded'"
                )
                return done[0][0] >= 20

            assert await sleep_until(underway, timeout=60)
            postgres.pause()
            await asyncio.sleep(10)
            postgres.resume()
            outcome = (await system.watcher.wait_for(["outage"], timeout=120, settle=1.0))["outage"]
            assert len(system.watcher.outcomes_for("outage")) == 1
            system.check_alive()
            dead = [
                await _read_all(kafka_bootstrap, f"{topic}.dlt", 1, timeout=3)
                for topic in (
                    settings.topic_assessment_requested,
                    settings.topic_llm_comparison_result,
                )
            ]
            succeeded = await system.rows(
                "SELECT count(*) FROM cj_comparison_pairs WHERE status = 'succeeded'"
            )
    finally:
        postgres.stop()
    assert outcome["data"]["status"] == "completed_successfully"
    assert dead == [[], []]
    assert outcome["data"]["processing_summary"]["comparisons_succeeded"] <= succeeded[0][0]


def _json(value: dict) -> bytes:
    return json.dumps(value).encode()


def _answer(settings_topic: str, correlation_id: str, bos_batch_id: str, a: str, b: str) -> bytes:
    return _json(
        {
            "event_id": str(uuid.uuid4()),
            "event_type": settings_topic,
            "data": {
                "correlation_id": correlation_id,
                "winner": "Essay A",
                "justification": "clearer argument",
                "confidence": 4.0,
                "request_metadata": {
                    "essay_a_id": a,
                    "essay_b_id": b,
                    "bos_batch_id": bos_batch_id,
                },
            },
        }
    )


async def test_a_timed_out_attempt_and_its_retry_answered_in_one_poll_count_once(
    kafka_bootstrap: str, database_url: str
) -> None:
    # Both first attempts time out and are retried; then each comparison's two attempts are
    # answered back to back (one comparison in each order), so that one poll holds both.
    settings = system_settings(
        kafka_bootstrap,
        database_url,
        callback_wait_timeout_seconds=2.0,
        monitor_interval_seconds=0.2,
        matchings_per_iteration=1,
        enable_stability_checking=False,
    )
    # 2 comparisons and a retry each: the budget of 4 LLM calls ends the assessment after them.
    request = request_envelope(
        bos_batch_id="answered-twice", essays=_essays(4), metadata={"max_comparisons": 4}
    )
    async with running_system(settings, provider=None) as system:
        await system.submit(request)

        async def retries_in_flight() -> bool:
            rows = await system.rows(
                "SELECT count(*) FROM cj_comparison_pairs"
                " WHERE attempt = 2 AND status = 'in_flight'"
            )
            return rows[0][0] == 2

        assert await sleep_until(retries_in_flight, timeout=30)
        attempts = await system.rows(
            "SELECT comparison_id, attempt, request_correlation_id, essay_a_els_id,"
            " essay_b_els_id, status FROM cj_comparison_pairs ORDER BY comparison_id, attempt"
        )
        assert [a.status for a in attempts] == ["timed_out", "in_flight"] * 2
        values = [
            _answer(
                settings.topic_llm_comparison_result,
                str(a.request_correlation_id),
                "answered-twice",
                a.essay_a_els_id,
                a.essay_b_els_id,
            )
            for a in attempts
        ]
        values[2], values[3] = values[3], values[2]
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=False)
        await producer.start()
        try:
            # One partition, one produce batch: the service fetches all four together.
            sent = [
                await producer.send(settings.topic_llm_comparison_result, v, partition=0)
                for v in values
            ]
            await asyncio.gather(*sent)
        finally:
            await producer.stop()
        outcome = (await system.watcher.wait_for(["answered-twice"], timeout=30))["answered-twice"]
        statuses = await system.rows(
            "SELECT comparison_id, array_agg(status ORDER BY attempt) FROM cj_comparison_pairs"
            " GROUP BY comparison_id"
        )
        counters = await system.rows(
            "SELECT submitted_comparisons, completed_comparisons, failed_comparisons"
            " FROM cj_batch_states"
        )
    # Answered after its retry succeeded, a timed-out attempt changes nothing (it stays
    # timed_out); answered before, it rescues its comparison and the retry is superseded.
    assert sorted(sorted(s) for _, s in statuses) == [
        ["succeeded", "superseded"],
        ["succeeded", "timed_out"],
    ]
    assert list(counters[0]) == [2, 2, 0]
    summary = outcome["data"]["processing_summary"]
    assert summary["comparisons_succeeded"] == 2
    assert sum(r["comparison_count"] for r in outcome["data"]["rankings"]) == 4


async def _sloppy_provider(settings: Settings, stop: asyncio.Event, sent: list[int]) -> None:
    """Answers every request with a real verdict, written the way a careless provider writes:
    a fractional latency, a list for the envelope's metadata, numeric-looking essay ids echoed
    as numbers, a null error message; one unknown answer in UTF-16 and one far too large."""
    rng = np.random.default_rng(5)
    consumer = AIOKafkaConsumer(
        settings.topic_llm_comparison_request,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=f"sloppy-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers, enable_idempotence=False
    )
    await consumer.start()
    await producer.start()
    topic = settings.topic_llm_comparison_result
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200)
            for record in (r for rs in batch.values() for r in rs):
                envelope = result_envelope(json.loads(record.value), rng, topic)
                data = envelope["data"]
                data["response_time_ms"] = 1800.5
                data["token_usage"]["prompt_tokens"] = 10.5
                envelope["metadata"] = []
                meta = data["request_metadata"]
                meta["essay_a_id"], meta["essay_b_id"] = (
                    int(meta["essay_a_id"]),
                    int(meta["essay_b_id"]),
                )
                if sent[0] % 7 == 3:  # now and then an error, with its message null
                    data["winner"] = None
                    data["error_detail"] = {"error_code": "RATE_LIMIT", "message": None}
                await producer.send(topic, _json(envelope))
                if sent[0] == 0:
                    unknown = result_envelope_for_unknown(envelope)
                    unknown["data"]["error_detail"] = None
                    unknown["data"]["winner"] = "Essay B"
                    await producer.send(topic, json.dumps(unknown).encode("utf-16"))
                    unknown["data"]["justification"] = "x" * 200_000
                    unknown["event_id"] = str(uuid.uuid4())
                    await producer.send(topic, _json(unknown))
                sent[0] += 1
            await producer.flush()
    finally:
        await consumer.stop()
        await producer.stop()


async def test_answers_written_carelessly_are_kept_for_their_verdicts(
    kafka_bootstrap: str, database_url: str
) -> None:
    settings = system_settings(kafka_bootstrap, database_url)
    essays = {str(k): text for k, text in enumerate(_essays(8).values(), start=1)}
    stop, sent = asyncio.Event(), [0]
    async with running_system(settings, provider=None) as system:
        provider = asyncio.create_task(_sloppy_provider(settings, stop, sent))
        try:
            await system.submit(request_envelope(bos_batch_id="careless", essays=essays))
            outcome = (await system.watcher.wait_for(["careless"], timeout=90))["careless"]
        finally:
            stop.set()
            await provider
        system.check_alive()
        statuses = dict(
            await system.rows("SELECT status, count(*) FROM cj_comparison_pairs GROUP BY status")
        )
        errors = dict(
            await system.rows(
                "SELECT error_code, count(*) FROM cj_comparison_pairs"
                " WHERE error_code IS NOT NULL GROUP BY error_code"
            )
        )
        unmatched = await system.rows(
            "SELECT octet_length(payload) FROM cj_unmatched_results ORDER BY 1"
        )
        dead = await _read_all(kafka_bootstrap, f"{settings.topic_llm_comparison_result}.dlt", 1, 3)
        # The consumer tells the monitor how far each result partition is handled: all of them
        # (it owns every one), to within a few seconds of now.
        watermarks = await system.rows(
            "SELECT count(*), extract(epoch FROM now() - min(handled_through))"
            " FROM cj_result_watermarks"
        )
        partitions = await system.rows(
            "SELECT count(DISTINCT partition) FROM cj_event_inbox WHERE topic = :t",
            t=settings.topic_llm_comparison_result,
        )
    assert watermarks[0][0] >= partitions[0][0] > 0
    assert 0 < watermarks[0][1] < 10
    assert outcome["data"]["status"] == "completed_successfully"
    summary = outcome["data"]["processing_summary"]
    # Every verdict counted: none dead-lettered, none taken for a contradiction of its pair.
    assert dead == []
    assert set(errors) == {"RATE_LIMIT"}
    assert summary["comparisons_succeeded"] == statuses["succeeded"] > 0
    # Both unknown answers are kept for inspection, the large one cut to a bounded size.
    assert len(unmatched) == 2
    assert unmatched[-1][0] <= 65_536


async def _submitted_and_underway(system: RunningSystem, bos_batch_id: str) -> None:
    """A 12-essay assessment submitted, with a few of its comparisons answered."""
    await system.submit(request_envelope(bos_batch_id=bos_batch_id, essays=_essays(12)))

    async def underway() -> bool:
        done = await system.rows(
            "SELECT count(*) FROM cj_comparison_pairs WHERE status = 'succeeded'"
        )
        return done[0][0] >= 5

    assert await sleep_until(underway, timeout=60)


async def test_a_lock_held_elsewhere_is_waited_out_visibly_and_the_assessment_completes(
    kafka_bootstrap: str, database_url: str
) -> None:
    settings = system_settings(kafka_bootstrap, database_url, database_lock_timeout_seconds=0.5)
    async with running_system(settings, provider_config(settings, latency_median_ms=50)) as system:
        await _submitted_and_underway(system, "locked-out")
        # Someone else's session holds the assessment's row: results for it cannot be stored.
        async with system.engine.connect() as conn, conn.begin():
            await conn.execute(text("SELECT 1 FROM cj_batch_states FOR UPDATE"))
            await asyncio.sleep(4)
        outcome = (await system.watcher.wait_for(["locked-out"], timeout=90))["locked-out"]
        metrics = await asyncio.to_thread(_metrics_text, settings.http_port)
    assert outcome["data"]["status"] == "completed_successfully"
    # The wait was not silent: each lock timeout was a counted, logged transient retry.
    retries = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("cj_transient_retries_total{")
        and settings.topic_llm_comparison_result in line
    ]
    assert sum(retries) > 0


async def test_a_transaction_frozen_while_holding_locks_is_ended_and_holds_up_no_one(
    kafka_bootstrap: str, database_url: str
) -> None:
    # The lock timeout alone would have waiters fail and queue again behind the same lock for
    # as long as the holder stays frozen; the idle timeout ends the holder.
    settings = system_settings(
        kafka_bootstrap,
        database_url,
        database_idle_in_transaction_timeout_seconds=1.0,
        database_lock_timeout_seconds=120.0,
    )
    async with running_system(settings, provider_config(settings, latency_median_ms=50)) as system:
        await _submitted_and_underway(system, "frozen-out")
        # A session opened as the service opens its own, frozen after taking the
        # assessment's row: like an instance stopped in the middle of its transaction.
        frozen = create_engine(settings)
        try:
            async with frozen.connect() as conn:
                await conn.execute(text("BEGIN"))
                await conn.execute(text("SELECT 1 FROM cj_batch_states FOR UPDATE"))
                outcome = (await system.watcher.wait_for(["frozen-out"], timeout=60))["frozen-out"]
                with pytest.raises(DBAPIError) as ended:
                    await conn.execute(text("SELECT 1"))
        finally:
            await frozen.dispose()
    assert outcome["data"]["status"] == "completed_successfully"
    assert classify(ended.value) is TransientError


def _metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


async def test_a_poll_takes_no_more_records_than_configured(
    kafka_bootstrap: str, database_url: str
) -> None:
    # CJ_KAFKA_MAX_POLL_RECORDS bounds a poll, and with it the transactions it is handled in,
    # also while there is room for twice as many records in hand.
    settings = system_settings(kafka_bootstrap, database_url, kafka_max_poll_records=10)
    await ensure_topics(settings.kafka_bootstrap_servers, service_topics(settings), 3)
    results = 60
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        for _ in range(results):
            envelope = {
                "event_id": str(uuid.uuid4()),
                "event_type": settings.topic_llm_comparison_result,
                "event_timestamp": "2026-01-01T12:00:00Z",
                "source_service": "llm_provider_service",
                "schema_version": 1,
                "correlation_id": str(uuid.uuid4()),
                "data": {"correlation_id": str(uuid.uuid4()), "winner": "Essay A"},
            }
            await producer.send(settings.topic_llm_comparison_result, json.dumps(envelope).encode())
        await producer.flush()
    finally:
        await producer.stop()
    async with running_system(settings, None) as system:

        async def all_stored() -> bool:
            rows = await system.rows("SELECT count(*) FROM cj_unmatched_results")
            return bool(rows[0][0] == results)

        assert await sleep_until(all_stored, timeout=60)
        metrics = await asyncio.to_thread(_metrics_text, settings.http_port)
    polls = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("cj_poll_records_")
    }
    assert polls["cj_poll_records_sum"] == results
    assert polls['cj_poll_records_bucket{le="10.0"}'] == polls["cj_poll_records_count"]
