"""One assessment end to end on the real broker and database: request -> comparisons ->
Bradley-Terry -> exactly one completed event."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from cj_assessment import workflow_orchestrator
from cj_assessment.pipeline_client import request_envelope, sleep_until
from cj_assessment.samples import SAMPLE_INSTRUCTIONS, load_sample_essays
from cj_assessment.simulated_judge import latent_quality
from tests.support.harness import provider_config, running_system, system_settings
from tests.support.slow_scoring import noted, slow_when_large

SENTINEL = "SENTINEL-5e1f-aa07"
# Long enough for a small assessment to go from request to completed event meanwhile.
LARGE_CLOSE_SECONDS = 15.0


def _essays(n: int) -> dict[str, str]:
    samples = list(load_sample_essays().values())
    essays = {}
    for i in range(n):
        body = samples[i % len(samples)]
        # Variants of the samples keep distinct texts (and so distinct latent qualities).
        essays[f"essay-{i:03d}"] = body if i < len(samples) else f"{body}\n\nRevision {i}."
    return essays


async def test_twenty_essays_end_in_one_completed_event_ranking_every_essay(
    kafka_bootstrap: str, database_url: str
) -> None:
    settings = system_settings(kafka_bootstrap, database_url)
    essays = _essays(20)
    async with running_system(settings, provider_config(settings)) as system:
        await system.submit(
            request_envelope(
                bos_batch_id="flow-20", essays=essays, instructions=SAMPLE_INSTRUCTIONS
            )
        )
        outcome = (await system.watcher.wait_for(["flow-20"], timeout=90, settle=1.0))["flow-20"]
        assert len(system.watcher.outcomes_for("flow-20")) == 1

    data = outcome["data"]
    assert outcome["event_type"] == settings.topic_assessment_completed
    assert data["status"] == "completed_successfully"
    assert data["entity_ref"]["entity_id"] == data["entity_id"] == "flow-20"
    ranked = [r["els_essay_id"] for r in data["rankings"]]
    assert sorted(ranked) == sorted(essays)
    assert [r["rank"] for r in data["rankings"]] == list(range(1, 21))
    assert abs(sum(r["score"] for r in data["rankings"])) < 1e-3
    summary = data["processing_summary"]
    assert summary["total_essays"] == 20
    assert summary["comparisons_succeeded"] <= summary["comparisons_requested"] <= 200
    assert summary["stop_reason"] in {"stability", "budget", "all_pairs_compared"}
    truth = [latent_quality(essays[e]) for e in ranked]
    scores = [r["score"] for r in data["rankings"]]
    rho = spearmanr(scores, truth).statistic
    assert rho >= 0.8, rho
    assert np.isfinite(summary["reliability"])


async def test_duplicate_request_for_a_known_batch_creates_nothing_new(
    kafka_bootstrap: str, database_url: str
) -> None:
    settings = system_settings(kafka_bootstrap, database_url)
    essays = _essays(6)
    async with running_system(settings, provider_config(settings)) as system:
        first = request_envelope(bos_batch_id="dup-1", essays=essays)
        again = request_envelope(bos_batch_id="dup-1", essays=essays, flat_entity=True)
        redelivered = json.loads(json.dumps(first))
        await system.submit(first, again, redelivered)
        await system.watcher.wait_for(["dup-1"], timeout=60, settle=2.0)
        assert len(system.watcher.outcomes_for("dup-1")) == 1
        uploads = await system.rows("SELECT count(*) FROM cj_batch_uploads")
        inbox = await system.rows(
            "SELECT outcome, count(*) FROM cj_event_inbox WHERE topic = :t GROUP BY outcome",
            t=settings.topic_assessment_requested,
        )
    assert uploads[0][0] == 1
    assert dict(inbox) == {"handled": 1, "duplicate": 1}


LONG_IDENTITY = "batch-" + "L" * 300


async def _send_raw(settings, value: bytes) -> None:  # type: ignore[no-untyped-def]
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers, enable_idempotence=False
    )
    await producer.start()
    try:
        await producer.send_and_wait(settings.topic_assessment_requested, value)
    finally:
        await producer.stop()


async def test_invalid_requests_each_end_in_one_failed_event(
    kafka_bootstrap: str, database_url: str
) -> None:
    settings = system_settings(kafka_bootstrap, database_url, max_instructions_chars=100)
    essays = _essays(4)
    no_essays = request_envelope(bos_batch_id="bad-no-essays", essays=essays)
    del no_essays["data"]["essays_for_cj"]
    wrong_types = request_envelope(bos_batch_id="bad-types", essays=essays)
    wrong_types["data"]["essays_for_cj"][0]["essay_id"] = 17
    wrong_types["data"]["language"] = f"{SENTINEL} " * 10
    wrong_types["data"]["llm_config_overrides"] = {"temperature_override": 7.5}
    cases = {
        "bad-no-essays": no_essays,
        "bad-types": wrong_types,
        "bad-long-id": request_envelope(
            bos_batch_id="bad-long-id", essays={"x" * 256: "text one", "b": "text two"}
        ),
        "bad-instructions": request_envelope(
            bos_batch_id="bad-instructions", essays=essays, instructions="Discuss. " * 20
        ),
        "bad-one-essay": request_envelope(bos_batch_id="bad-one-essay", essays={"a": "text"}),
        "bad-override": request_envelope(
            bos_batch_id="bad-override", essays=essays, batch_config_overrides={"batch_size": 500}
        ),
        "bad-empty": request_envelope(bos_batch_id="bad-empty", essays={"a": "x", "b": "  "}),
        "bad-metadata-override": request_envelope(
            bos_batch_id="bad-metadata-override",
            essays=essays,
            metadata={"batch_config_overrides": {"max_concurrent_batches": 9}},
        ),
        # Longer than the tables hold: answered all the same, by its failed event alone.
        LONG_IDENTITY: request_envelope(bos_batch_id=LONG_IDENTITY, essays=essays),
        # Text the database cannot store, in stored fields and in an essay.
        "bad-nul-instructions": request_envelope(
            bos_batch_id="bad-nul-instructions", essays=essays, instructions="Discuss\x00."
        ),
        "bad-surrogate-id": request_envelope(
            bos_batch_id="bad-surrogate-id", essays={"a\ud800": "text one", "b": "text two"}
        ),
        "bad-surrogate-text": request_envelope(
            bos_batch_id="bad-surrogate-text", essays={"a": "text \udfff one", "b": "two"}
        ),
        "bad-huge-override": request_envelope(
            bos_batch_id="bad-huge-override",
            essays=essays,
            batch_config_overrides={"batch_size": 10**400},
        ),
        "bad-text-override": request_envelope(
            bos_batch_id="bad-text-override",
            essays=essays,
            batch_config_overrides={"batch_size": SENTINEL * 1000},
        ),
    }
    # Envelopes that break CONTRACT §3 around data that names its batch.
    no_event_type = request_envelope(bos_batch_id="bad-envelope-type", essays=essays)
    del no_event_type["event_type"]
    odd_metadata = request_envelope(bos_batch_id="bad-envelope-metadata", essays=essays)
    odd_metadata["metadata"] = "not an object"
    nul_correlation = request_envelope(bos_batch_id="bad-envelope-correlation", essays=essays)
    nul_correlation["correlation_id"] = "corr\x00elation"
    # Event ids that cannot tell requests apart: each request still gets its own answer.
    empty_ids = [
        request_envelope(bos_batch_id=f"bad-empty-event-id-{i}", essays=essays) for i in (1, 2)
    ]
    for envelope in empty_ids:
        envelope["event_id"] = ""
    bool_id = request_envelope(bos_batch_id="bad-bool-event-id", essays=essays)
    bool_id["event_id"] = True
    cases |= {
        "bad-envelope-type": no_event_type,
        "bad-envelope-metadata": odd_metadata,
        "bad-envelope-correlation": nul_correlation,
        "bad-empty-event-id-1": empty_ids[0],
        "bad-empty-event-id-2": empty_ids[1],
        "bad-bool-event-id": bool_id,
    }
    # A number past the 4,300 digits Python reads, written as the JSON text it would be.
    huge = request_envelope(
        bos_batch_id="bad-5000-digits", essays=essays, batch_config_overrides={"batch_size": 0}
    )
    huge_json = json.dumps(huge).replace('"batch_size": 0', '"batch_size": ' + "9" * 5000)
    # The same identity sent again as a new event gets no second failed event.
    again = request_envelope(bos_batch_id=LONG_IDENTITY, essays=essays, flat_entity=True)
    async with running_system(settings, provider=None) as system:
        await system.submit(*cases.values(), again)
        await _send_raw(settings, huge_json.encode())
        cases["bad-5000-digits"] = huge
        outcomes = await system.watcher.wait_for(list(cases), timeout=60, settle=1.0)
        for bos_batch_id in cases:
            assert len(system.watcher.outcomes_for(bos_batch_id)) == 1
        inbox = await system.rows(
            "SELECT outcome, count(*) FROM cj_event_inbox WHERE topic = :t GROUP BY outcome",
            t=settings.topic_assessment_requested,
        )
    assert dict(inbox) == {"rejected": len(cases), "duplicate": 1}
    codes = {
        b: o["data"]["system_metadata"]["error_info"]["error_code"] for b, o in outcomes.items()
    }
    assert codes == {
        "bad-no-essays": "INVALID_REQUEST",
        "bad-types": "INVALID_REQUEST",
        "bad-long-id": "INVALID_REQUEST",
        "bad-instructions": "INSTRUCTIONS_TOO_LONG",
        "bad-one-essay": "TOO_FEW_ESSAYS",
        "bad-override": "INVALID_BATCH_CONFIG_OVERRIDE",
        "bad-empty": "EMPTY_ESSAY_TEXT",
        "bad-metadata-override": "INVALID_BATCH_CONFIG_OVERRIDE",
        LONG_IDENTITY: "INVALID_REQUEST",
        "bad-nul-instructions": "INVALID_REQUEST",
        "bad-surrogate-id": "INVALID_REQUEST",
        "bad-surrogate-text": "INVALID_ESSAY_TEXT",
        "bad-huge-override": "INVALID_BATCH_CONFIG_OVERRIDE",
        "bad-text-override": "INVALID_BATCH_CONFIG_OVERRIDE",
        "bad-envelope-type": "INVALID_REQUEST",
        "bad-envelope-metadata": "INVALID_REQUEST",
        "bad-envelope-correlation": "INVALID_REQUEST",
        "bad-empty-event-id-1": "INVALID_REQUEST",
        "bad-empty-event-id-2": "INVALID_REQUEST",
        "bad-bool-event-id": "INVALID_REQUEST",
        "bad-5000-digits": "INVALID_BATCH_CONFIG_OVERRIDE",
    }

    def info(bos_batch_id: str) -> dict:
        return outcomes[bos_batch_id]["data"]["system_metadata"]["error_info"]

    assert info("bad-nul-instructions")["context"]["invalid_fields"] == ["essay_instructions"]
    assert info("bad-surrogate-id")["context"]["invalid_fields"] == [
        "essays_for_cj.0.essay_id",
        "essays_for_cj.0.text_storage_id",  # built from the id by `request_envelope`
    ]
    assert "a number of 401 digits" in info("bad-huge-override")["error_message"]
    assert SENTINEL not in json.dumps(outcomes["bad-text-override"])
    assert info("bad-envelope-type")["context"]["invalid_fields"] == ["envelope.event_type"]
    assert info("bad-envelope-metadata")["context"]["invalid_fields"] == ["envelope.metadata"]
    assert info("bad-envelope-correlation")["context"]["invalid_fields"] == [
        "envelope.correlation_id"
    ]
    # An unusable correlation id is answered under the request's event id.
    answered = outcomes["bad-envelope-correlation"]
    assert answered["correlation_id"] == nul_correlation["event_id"]
    unstored = outcomes[LONG_IDENTITY]["data"]
    assert unstored["entity_ref"]["entity_id"] == unstored["entity_id"] == LONG_IDENTITY
    assert unstored["cj_assessment_job_id"] == ""  # no job was created
    assert "entity_ref.entity_id" in unstored["system_metadata"]["error_info"]["error_message"]
    message = outcomes["bad-override"]["data"]["system_metadata"]["error_info"]["error_message"]
    assert "batch_size" in message and "10-200" in message
    info = outcomes["bad-types"]["data"]["system_metadata"]["error_info"]
    assert info["context"]["invalid_fields"] == [
        "essays_for_cj.0.essay_id",
        "language",
        "llm_config_overrides.temperature_override",
    ]
    assert SENTINEL not in json.dumps(outcomes["bad-types"])
    assert (
        "essays_for_cj: Field required"
        in (outcomes["bad-no-essays"]["data"]["system_metadata"]["error_info"]["error_message"])
    )
    for outcome in outcomes.values():
        assert outcome["data"]["status"] == "failed_critically"
        assert outcome["event_type"] == settings.topic_assessment_failed


async def test_undecodable_record_goes_to_the_dead_letter_topic_and_the_partition_moves_on(
    kafka_bootstrap: str, database_url: str
) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    settings = system_settings(kafka_bootstrap, database_url)
    async with running_system(settings, provider_config(settings)) as system:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=False)
        await producer.start()
        try:
            for partition in range(3):
                await producer.send_and_wait(
                    settings.topic_assessment_requested, b"\xff not json", partition=partition
                )
        finally:
            await producer.stop()
        await system.submit(request_envelope(bos_batch_id="after-poison", essays=_essays(4)))
        await system.watcher.wait_for(["after-poison"], timeout=60)
        dlt = AIOKafkaConsumer(
            f"{settings.topic_assessment_requested}.dlt",
            bootstrap_servers=kafka_bootstrap,
            auto_offset_reset="earliest",
            group_id="dlt-reader",
        )
        await dlt.start()
        records = []
        try:
            for _ in range(40):
                batch = await dlt.getmany(timeout_ms=250)
                records += [r for rs in batch.values() for r in rs]
                if len(records) >= 3:
                    break
        finally:
            await dlt.stop()
    assert len(records) == 3
    headers = dict(records[0].headers)
    assert headers["dlt.source.topic"].decode() == settings.topic_assessment_requested
    assert headers["dlt.error.class"].decode() == "PoisonMessage"
    assert records[0].value == b"\xff not json"


async def test_serve_refuses_to_start_on_an_unmigrated_database(
    kafka_bootstrap: str, postgres_server_url: str
) -> None:
    import uuid

    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    from cj_assessment.errors import SchemaNotMigrated
    from cj_assessment.service import serve

    name = f"cj_empty_{uuid.uuid4().hex[:8]}"
    admin = create_async_engine(
        postgres_server_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT"
    )
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        settings = system_settings(
            kafka_bootstrap, postgres_server_url.rsplit("/", 1)[0] + f"/{name}"
        )
        try:
            await asyncio.wait_for(serve(settings), timeout=30)
            raise AssertionError("serve started on an unmigrated database")
        except SchemaNotMigrated as exc:
            assert "cj-assessment migrate" in str(exc)
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


async def test_serve_refuses_a_database_migrated_by_a_newer_build_and_says_so(
    kafka_bootstrap: str, database_url: str
) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    from cj_assessment.errors import SchemaNotMigrated
    from cj_assessment.service import serve

    engine = create_async_engine(database_url)
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    await engine.dispose()
    with pytest.raises(SchemaNotMigrated) as refused:
        await asyncio.wait_for(serve(system_settings(kafka_bootstrap, database_url)), timeout=30)
    assert "9999_from_the_future" in str(refused.value)
    assert "this build does not know" in str(refused.value)
    assert "cj-assessment migrate" not in str(refused.value)


@pytest.mark.real_kafka
async def test_with_an_idempotent_producer_on_real_kafka_an_assessment_completes_once(
    kafka_bootstrap: str, database_url: str
) -> None:
    settings = system_settings(kafka_bootstrap, database_url, kafka_enable_idempotence=True)
    async with running_system(
        settings, provider_config(settings, enable_idempotence=True)
    ) as system:
        await system.submit(request_envelope(bos_batch_id="idempotent", essays=_essays(10)))
        await system.watcher.wait_for(["idempotent"], timeout=90, settle=1.0)
        assert len(system.watcher.outcomes_for("idempotent")) == 1


async def test_serve_starts_its_worker_process_before_any_assessment_arrives_and_stops_it(
    kafka_bootstrap: str, database_url: str
) -> None:
    before = {p.pid for p in multiprocessing.active_children()}
    settings = system_settings(kafka_bootstrap, database_url)
    async with running_system(settings, provider=None):

        async def worker_started() -> bool:
            return bool({p.pid for p in multiprocessing.active_children()} - before)

        assert await sleep_until(worker_started, timeout=60)
        started = {p.pid for p in multiprocessing.active_children()} - before

    async def worker_stopped() -> bool:
        return not started & {p.pid for p in multiprocessing.active_children()}

    assert await sleep_until(worker_stopped, timeout=20)


async def test_a_small_assessment_completes_while_a_large_ones_iteration_close_is_scoring(
    kafka_bootstrap: str,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # A large close takes seconds. The consumer used to handle a poll completely before it
    # fetched the next, and scoring on a thread of the service starved its event loop: every
    # other assessment of the instance waited for the close.
    marker = str(tmp_path / "large-close")
    monkeypatch.setattr(
        workflow_orchestrator,
        "score_judgements",
        partial(slow_when_large, marker, LARGE_CLOSE_SECONDS),
    )
    settings = system_settings(kafka_bootstrap, database_url)
    large = _essays(workflow_orchestrator.OFF_LOOP_MIN_ESSAYS)
    async with running_system(settings, provider_config(settings)) as system:
        # One iteration of 300 comparisons, then the budget ends it: one (slow) close.
        await system.submit(
            request_envelope(bos_batch_id="large", essays=large, metadata={"max_comparisons": 300})
        )

        async def large_close_started() -> bool:
            return bool(noted(marker, "started"))

        assert await sleep_until(large_close_started, timeout=120)
        await system.submit(request_envelope(bos_batch_id="small", essays=_essays(6)))
        await system.watcher.wait_for(["small"], timeout=LARGE_CLOSE_SECONDS)
        small_done = time.time()
        await system.watcher.wait_for(["large"], timeout=60, settle=1.0)
    assert small_done < noted(marker, "ended")[0]
    for bos_batch_id in ("small", "large"):
        outcomes = system.watcher.outcomes_for(bos_batch_id)
        assert [e["event_type"] for e in outcomes] == [settings.topic_assessment_completed]
