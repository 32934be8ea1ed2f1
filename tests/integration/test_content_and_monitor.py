"""Essay text from the Content Service, and the monitor driving assessments nobody answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from sqlalchemy import text

from cj_assessment.content import HttpContentClient
from cj_assessment.embedded import free_port
from cj_assessment.pipeline_client import request_envelope, sleep_until
from cj_assessment.settings import Settings
from tests.integration.test_assessment_flow import _essays
from tests.support.harness import provider_config, running_system, system_settings

Handler = Callable[[web.Request], Awaitable[web.Response]]


@pytest.fixture
async def content_service() -> AsyncIterator[tuple[str, dict[str, str | bytes]]]:
    store: dict[str, str | bytes] = {}

    async def get(request: web.Request) -> web.Response:
        key = request.match_info["key"]
        if key not in store:
            return web.Response(status=404)
        value = store[key]
        if isinstance(value, bytes):
            return web.Response(body=value, content_type="text/plain", charset="utf-8")
        return web.Response(text=value)

    async with _served("/v1/content/{key}", get) as origin:
        yield f"{origin}/v1/content", store


@asynccontextmanager
async def _served(route: str, handler: Handler) -> AsyncIterator[str]:
    """A local HTTP server answering GET `route` with `handler`; yields its origin."""
    app = web.Application()
    app.router.add_get(route, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def _content_settings(
    handler: Handler, kafka_bootstrap: str, database_url: str, **overrides: Any
) -> AsyncIterator[Settings]:
    """Test settings whose Content Service answers with `handler`, while it serves."""
    async with _served("/v1/content/{key}", handler) as origin:
        yield system_settings(
            kafka_bootstrap, database_url, content_service_url=f"{origin}/v1/content", **overrides
        )


def _by_reference(envelope: dict, drop_text: set[str]) -> dict:
    for essay in envelope["data"]["essays_for_cj"]:
        if essay["essay_id"] in drop_text:
            essay.pop("text")
    return envelope


async def test_essays_without_inline_text_are_fetched_and_a_missing_one_fails_naming_it(
    kafka_bootstrap: str, database_url: str, content_service: tuple[str, dict[str, str | bytes]]
) -> None:
    url, store = content_service
    settings = system_settings(
        kafka_bootstrap, database_url, content_service_url=url, content_fetch_attempts=2
    )
    essays = _essays(6)
    for essay_id, body in essays.items():
        store[f"inline-{essay_id}"] = body
    fetched = _by_reference(request_envelope(bos_batch_id="fetched", essays=essays), set(essays))
    missing = _by_reference(
        request_envelope(bos_batch_id="missing", essays={**essays, "ghost": "x"}), {"ghost"}
    )
    store["inline-latin"] = "Caf\u00e9 culture".encode("latin-1")  # declared UTF-8, it is not
    undecodable = _by_reference(
        request_envelope(bos_batch_id="undecodable", essays={**essays, "latin": "x"}), {"latin"}
    )
    async with running_system(settings, provider_config(settings)) as system:
        await system.submit(fetched, missing, undecodable)
        outcomes = await system.watcher.wait_for(["fetched", "missing", "undecodable"], timeout=60)
        stored = await system.rows(
            "SELECT e.els_essay_id, e.assessment_input_text FROM cj_processed_essays e"
            " JOIN cj_batch_uploads u ON u.id = e.cj_batch_id WHERE u.bos_batch_id = 'fetched'"
        )
    assert outcomes["fetched"]["data"]["status"] == "completed_successfully"
    assert dict(stored) == essays
    info = outcomes["missing"]["data"]["system_metadata"]["error_info"]
    assert info["error_code"] == "CONTENT_UNAVAILABLE"
    assert "ghost" in info["error_message"] and info["context"]["essay_id"] == "ghost"
    info = outcomes["undecodable"]["data"]["system_metadata"]["error_info"]
    assert (info["error_code"], info["context"]["essay_id"]) == ("CONTENT_UNAVAILABLE", "latin")
    assert "not decodable" in info["error_message"]


async def test_a_requests_texts_are_fetched_once_per_storage_id_several_at_a_time(
    kafka_bootstrap: str, database_url: str
) -> None:
    texts = {f"doc-{k}": body for k, body in enumerate(_essays(6).values())}
    hits: dict[str, int] = {}
    running, most = [0], [0]

    async def get(request: web.Request) -> web.Response:
        key = request.match_info["key"]
        hits[key] = hits.get(key, 0) + 1
        running[0] += 1
        most[0] = max(most[0], running[0])
        try:
            await asyncio.sleep(0.05)
            return web.Response(text=texts[key])
        finally:
            running[0] -= 1

    # Twelve essays, two by two on the same stored text.
    envelope = request_envelope(bos_batch_id="shared", essays={f"e{k}": "x" for k in range(12)})
    for k, essay in enumerate(envelope["data"]["essays_for_cj"]):
        essay.pop("text")
        essay["text_storage_id"] = f"doc-{k // 2}"
    async with (
        _content_settings(
            get, kafka_bootstrap, database_url, content_fetch_concurrency=4
        ) as settings,
        running_system(settings, provider_config(settings)) as system,
    ):
        await system.submit(envelope)
        outcome = (await system.watcher.wait_for(["shared"], timeout=60))["shared"]
        stored = await system.rows(
            "SELECT els_essay_id, assessment_input_text FROM cj_processed_essays"
        )
    assert outcome["data"]["status"] == "completed_successfully"
    assert hits == dict.fromkeys(texts, 1)
    assert 1 < most[0] <= 4
    assert dict(stored) == {f"e{k}": texts[f"doc-{k // 2}"] for k in range(12)}


async def test_a_request_whose_texts_are_slow_to_fetch_holds_up_no_other_batchs_request(
    kafka_bootstrap: str, database_url: str
) -> None:
    # A 2,000-essay request takes seconds to fetch and start; the requests behind it are
    # mostly other batches', which used to wait for it.
    asked, released = asyncio.Event(), asyncio.Event()
    essays = _essays(6)

    async def get(request: web.Request) -> web.Response:
        asked.set()
        await released.wait()
        return web.Response(text=essays[request.match_info["key"].removeprefix("inline-")])

    slow = _by_reference(request_envelope(bos_batch_id="slow", essays=essays), set(essays))
    async with (
        _content_settings(
            get, kafka_bootstrap, database_url, content_fetch_timeout_seconds=60
        ) as settings,
        running_system(settings, provider_config(settings)) as system,
    ):
        # The repeat of the slow batch must wait for it, not fail beside it.
        await system.submit(slow, slow | {"event_id": "repeat-of-slow"})
        await asyncio.wait_for(asked.wait(), timeout=30)
        await system.submit(request_envelope(bos_batch_id="quick", essays=essays))
        await system.watcher.wait_for(["quick"], timeout=30)
        assert system.watcher.outcomes_for("slow") == []
        released.set()
        await system.watcher.wait_for(["slow"], timeout=60, settle=1.0)
        inbox = await system.rows(
            "SELECT outcome, count(*) FROM cj_event_inbox WHERE topic = :t GROUP BY outcome",
            t=settings.topic_assessment_requested,
        )
    for bos_batch_id in ("quick", "slow"):
        outcomes = system.watcher.outcomes_for(bos_batch_id)
        assert [e["event_type"] for e in outcomes] == [settings.topic_assessment_completed]
    assert dict(inbox) == {"handled": 2, "duplicate": 1}


@pytest.mark.parametrize(
    "storage_id", ["..", ".", "../../admin", "a/b", "doc?page=2", "doc#1", "50%25 off", "é ü"]
)
async def test_a_storage_id_is_fetched_as_one_path_segment_whatever_it_holds(
    content_service: tuple[str, dict[str, str | bytes]], storage_id: str
) -> None:
    url, store = content_service
    store[storage_id] = f"text of {storage_id}"
    client = HttpContentClient(url, timeout_seconds=5, attempts=1)
    try:
        assert await client.fetch("e1", storage_id) == f"text of {storage_id}"
    finally:
        await client.close()


async def test_monitor_times_out_unanswered_comparisons_and_fails_the_assessment_clearly(
    kafka_bootstrap: str, database_url: str
) -> None:
    settings = system_settings(
        kafka_bootstrap,
        database_url,
        callback_wait_timeout_seconds=0.5,
        batch_timeout_seconds=2.0,
        monitor_interval_seconds=0.3,
        max_retry_attempts=1,
    )
    async with running_system(settings, provider=None) as system:
        await system.submit(request_envelope(bos_batch_id="unanswered", essays=_essays(6)))
        outcome = (await system.watcher.wait_for(["unanswered"], timeout=60, settle=1.0))[
            "unanswered"
        ]
        assert len(system.watcher.outcomes_for("unanswered")) == 1
        attempts = await system.rows(
            "SELECT attempt, status, error_code FROM cj_comparison_pairs ORDER BY id"
        )
    info = outcome["data"]["system_metadata"]["error_info"]
    assert info["error_code"] == "NO_SCORABLE_ESSAYS"
    assert info["context"]["comparisons_succeeded"] == 0
    first = [a for a in attempts if a.attempt == 1]
    retries = [a for a in attempts if a.attempt == 2]
    assert first and len(retries) == len(first)
    assert {a.status for a in attempts} == {"timed_out"}
    assert {a.error_code for a in attempts} == {"TIMEOUT"}


async def test_monitor_prunes_delivery_bookkeeping_and_unmatched_results_after_retention(
    kafka_bootstrap: str, database_url: str
) -> None:
    settings = system_settings(
        kafka_bootstrap,
        database_url,
        monitor_interval_seconds=0.3,
        outbox_retention_seconds=1.0,
        inbox_retention_seconds=1.0,
        unmatched_retention_seconds=1.0,
    )
    async with running_system(settings, provider_config(settings)) as system:
        async with system.engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO cj_unmatched_results (correlation_id, reason, payload)"
                    " VALUES ('nobody-asked', 'unknown_correlation_id', '{}')"
                )
            )
        await system.submit(request_envelope(bos_batch_id="pruned", essays=_essays(6)))
        await system.watcher.wait_for(["pruned"], timeout=60)
        counts: list[int] = []

        async def pruned() -> bool:
            rows = await system.rows(
                "SELECT (SELECT count(*) FROM cj_event_outbox),"
                " (SELECT count(*) FROM cj_event_inbox),"
                " (SELECT count(*) FROM cj_unmatched_results)"
            )
            counts[:] = list(rows[0])
            return counts == [0, 0, 0]

        # A deadline, not a count of tries: under a loaded full run a pass takes longer.
        await sleep_until(pruned, timeout=60)
        comparisons = await system.rows("SELECT count(*) FROM cj_comparison_pairs")
    assert counts == [0, 0, 0]
    # Only delivery bookkeeping went: the assessment's own rows stay.
    assert comparisons[0][0] > 0
    assert len(system.watcher.outcomes_for("pruned")) == 1


async def test_monitor_erases_a_finished_assessments_texts_and_a_repeat_is_still_a_duplicate(
    kafka_bootstrap: str, database_url: str
) -> None:
    settings = system_settings(
        kafka_bootstrap, database_url, monitor_interval_seconds=0.3, text_retention_seconds=1.0
    )
    essays = _essays(6)
    async with running_system(settings, provider_config(settings)) as system:
        await system.submit(request_envelope(bos_batch_id="erased", essays=essays))
        await system.watcher.wait_for(["erased"], timeout=60)

        async def erased() -> bool:
            rows = await system.rows("SELECT texts_erased_at IS NOT NULL FROM cj_batch_uploads")
            return bool(rows[0][0])

        assert await sleep_until(erased, timeout=60)
        essay_rows = await system.rows(
            "SELECT count(*) FILTER (WHERE assessment_input_text <> ''),"
            " count(*) FILTER (WHERE rank IS NOT NULL AND current_bt_score IS NOT NULL)"
            " FROM cj_processed_essays"
        )
        attempt_rows = await system.rows(
            "SELECT count(justification), count(*) FILTER (WHERE winner IN ('essay_a', 'essay_b'))"
            " FROM cj_comparison_pairs"
        )
        await system.submit(request_envelope(bos_batch_id="erased", essays=essays))

        async def repeated() -> bool:
            rows = await system.rows(
                "SELECT count(*) FROM cj_event_inbox WHERE topic = :t AND outcome = 'duplicate'",
                t=settings.topic_assessment_requested,
            )
            return bool(rows[0][0] == 1)

        assert await sleep_until(repeated, timeout=60)
        uploads = await system.rows("SELECT count(*) FROM cj_batch_uploads")
    # The texts went; ranks, scores and verdicts stay, and the upload row still makes a repeated
    # request a duplicate rather than a second paid run.
    assert essay_rows == [(0, 6)]
    assert attempt_rows[0][0] == 0 and attempt_rows[0][1] > 0
    assert uploads[0][0] == 1
    assert len(system.watcher.outcomes_for("erased")) == 1


async def test_a_configured_url_with_a_space_or_an_umlaut_is_encoded_once() -> None:
    async def get(request: web.Request) -> web.Response:
        return web.Response(text=request.path)  # decoded once by the server

    async with _served("/{path:.*}", get) as origin:
        client = HttpContentClient(f"{origin}/v1/mein inhalt-ä", timeout_seconds=5, attempts=1)
        try:
            assert await client.fetch("e1", "a b") == "/v1/mein inhalt-ä/a b"
        finally:
            await client.close()
