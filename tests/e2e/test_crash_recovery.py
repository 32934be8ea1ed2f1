"""Real processes killed at the worst moments: after the database commit but before the
offset commit, after the broker acknowledged but before the outbox row was marked, and one of
two instances SIGKILLed mid-assessment."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest

from cj_assessment.embedded import free_port
from cj_assessment.pipeline_client import request_envelope, sleep_until
from cj_assessment.settings import child_environment
from tests.integration.test_assessment_flow import _essays
from tests.integration.test_result_delivery import _read_all
from tests.support.harness import provider_config, running_system, system_settings
from tests.support.processes import CliProcess, http_get, wait_http

pytestmark = pytest.mark.slow

SENTINEL = "SENTINEL-a11ce-91b2"


def _serve(settings, tmp_path: Path, name: str, **extra: str) -> CliProcess:  # type: ignore[no-untyped-def]
    settings = settings.model_copy(update={"http_port": free_port()})
    return CliProcess(["serve"], child_environment(settings, **extra), tmp_path / f"{name}.log")


async def test_crash_between_database_commit_and_offset_commit_changes_nothing_on_restart(
    kafka_bootstrap: str, database_url: str, tmp_path: Path
) -> None:
    settings = system_settings(kafka_bootstrap, database_url)
    async with running_system(settings, provider_config(settings), instances=0) as system:
        request = request_envelope(bos_batch_id="crashed", essays=_essays(10))
        crashing = _serve(settings, tmp_path, "crashing", CJ_FAULT_KILL_AFTER_DB_COMMIT="true")
        await system.submit(request)
        assert await asyncio.to_thread(crashing.wait, 60) == 17
        before = await system.rows(
            "SELECT request_correlation_id, status FROM cj_comparison_pairs ORDER BY id"
        )
        assert before and {status for _, status in before} <= {"queued", "in_flight"}

        restarted = _serve(settings, tmp_path, "restarted")
        try:
            await system.watcher.wait_for(["crashed"], timeout=90, settle=2.0)
        finally:
            assert await asyncio.to_thread(restarted.terminate) == 0
        inbox = await system.rows(
            "SELECT event_id FROM cj_event_inbox WHERE topic = :t",
            t=settings.topic_assessment_requested,
        )
        first_attempts = await system.rows(
            "SELECT request_correlation_id FROM cj_comparison_pairs WHERE iteration = 1"
            " AND attempt = 1 ORDER BY id"
        )
        uploads = await system.rows("SELECT count(*) FROM cj_batch_uploads")
    assert inbox == [(request["event_id"],)]
    assert uploads[0][0] == 1
    assert [row[0] for row in first_attempts] == [row[0] for row in before]
    events = system.watcher.outcomes_for("crashed")
    assert len({e["event_id"] for e in events}) == len(events) == 1


async def test_relay_crash_after_broker_ack_resends_rows_with_the_same_event_id(
    kafka_bootstrap: str, database_url: str, tmp_path: Path
) -> None:
    settings = system_settings(kafka_bootstrap, database_url)
    async with running_system(settings, provider=None, instances=0) as system:
        crashing = _serve(settings, tmp_path, "relay", CJ_FAULT_KILL_AFTER_RELAY_ACK="true")
        await system.submit(request_envelope(bos_batch_id="resent", essays=_essays(8)))
        assert await asyncio.to_thread(crashing.wait, 60) == 18
        unmarked = await system.rows(
            "SELECT count(*) FROM cj_event_outbox WHERE published_at IS NULL"
        )
        restarted = _serve(settings, tmp_path, "relay-restarted")
        try:
            sent = await _read_all(
                kafka_bootstrap, settings.topic_llm_comparison_request, 2 * unmarked[0][0]
            )
        finally:
            assert await asyncio.to_thread(restarted.terminate) == 0
    assert unmarked[0][0] > 0
    ids = Counter(json.loads(r.value)["event_id"] for r in sent)
    assert len(sent) == 2 * unmarked[0][0]
    assert set(ids.values()) == {2}
    by_id: dict[str, set[str]] = {}
    for record in sent:
        envelope = json.loads(record.value)
        by_id.setdefault(envelope["event_id"], set()).add(envelope["data"]["correlation_id"])
    assert all(len(correlations) == 1 for correlations in by_id.values())


async def test_one_of_two_instances_killed_mid_assessment_every_assessment_completes_once(
    kafka_bootstrap: str, database_url: str, tmp_path: Path
) -> None:
    settings = system_settings(kafka_bootstrap, database_url, log_level="DEBUG", log_json=True)
    provider = provider_config(settings, latency_median_ms=100)
    ids = [f"scale-{i}" for i in range(6)]
    essays = {k: f"{v}\n{SENTINEL}" for k, v in _essays(12).items()}
    async with running_system(settings, provider, instances=0) as system:
        first = _serve(settings, tmp_path, "first")
        second = _serve(settings, tmp_path, "second")
        await asyncio.sleep(3)
        await system.submit(*(request_envelope(bos_batch_id=b, essays=essays) for b in ids))

        async def underway() -> bool:
            done = await system.rows(
                "SELECT count(*) FROM cj_comparison_pairs WHERE status = 'succeeded'"
            )
            return done[0][0] >= 40

        assert await sleep_until(underway, timeout=90)
        first.kill()
        revived = _serve(settings, tmp_path, "revived")
        try:
            await system.watcher.wait_for(ids, timeout=180, settle=3.0)
            port = int(revived.env["CJ_HTTP_PORT"])
            assert wait_http(port, "/readyz", 30) == 200
            metrics = http_get(port, "/metrics")
        finally:
            codes = [await asyncio.to_thread(p.terminate) for p in (second, revived)]
        counters = await system.rows(
            "SELECT total_comparisons, submitted_comparisons, completed_comparisons,"
            " failed_comparisons FROM cj_batch_states"
        )
    assert codes == [0, 0]
    assert "cj_consumed_records_total" in metrics
    for bos_batch_id in ids:
        events = system.watcher.outcomes_for(bos_batch_id)
        assert len({e["event_id"] for e in events}) == 1
        assert events[0]["data"]["status"] == "completed_successfully"
        assert len(events[0]["data"]["rankings"]) == 12
    for total, submitted, completed, failed in counters:
        assert completed + failed <= submitted <= total
    logs = "".join((tmp_path / f"{n}.log").read_text() for n in ("first", "second", "revived"))
    assert "assessment_started" in logs
    assert SENTINEL not in logs
