"""The pipeline's side of the contract: build and publish an assessment request, and wait for
its completed or failed event. Used by `submit`, the demo, the tests and the benchmarks."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from cj_assessment.contracts import utc_iso
from cj_assessment.settings import Settings


def request_envelope(
    *,
    bos_batch_id: str,
    essays: Mapping[str, str],
    instructions: str | None = None,
    batch_config_overrides: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    user_id: str | None = "cli-user",
    flat_entity: bool = False,
) -> dict[str, Any]:
    """An ELS_CJAssessmentRequestV1 envelope with inline essay texts."""
    now = utc_iso(datetime.now(UTC))
    data: dict[str, Any] = {
        "event_name": "els.cj_assessment.requested",
        "timestamp": now,
        "system_metadata": {
            "entity": {"entity_id": bos_batch_id, "entity_type": "batch"},
            "entity_id": bos_batch_id,
            "entity_type": "batch",
            "processing_stage": "pending",
            "event": "els.cj_assessment.requested",
        },
        "essays_for_cj": [
            {"essay_id": essay_id, "text_storage_id": f"inline-{essay_id}", "text": body}
            for essay_id, body in essays.items()
        ],
        "language": "en",
        "course_code": "ENG5",
        "essay_instructions": instructions,
        "llm_config_overrides": None,
        "batch_config_overrides": batch_config_overrides,
        "assignment_id": None,
        "user_id": user_id,
        "org_id": None,
    }
    if flat_entity:
        data.update({"entity_id": bos_batch_id, "entity_type": "batch", "parent_id": None})
    else:
        data["entity_ref"] = {"entity_id": bos_batch_id, "entity_type": "batch", "parent_id": None}
    return {
        "event_id": str(uuid.uuid4()),
        "event_type": "huleedu.els.cj_assessment.requested.v1",
        "event_timestamp": now,
        "source_service": "essay_lifecycle_service",
        "schema_version": 1,
        "correlation_id": str(uuid.uuid4()),
        "data_schema_uri": None,
        "data": data,
        "metadata": metadata or {},
    }


def essays_from_folder(folder: Path) -> dict[str, str]:
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no .txt essays in {folder}")
    return {f.stem: f.read_text(encoding="utf-8") for f in files}


def make_producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        enable_idempotence=settings.kafka_enable_idempotence,
        acks="all",
        max_request_size=16 * 1024 * 1024,
    )


async def publish(settings: Settings, envelopes: list[dict[str, Any]]) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        for envelope in envelopes:
            key = (envelope["data"].get("entity_ref") or {}).get("entity_id") or envelope[
                "data"
            ].get("entity_id")
            await producer.send_and_wait(
                settings.topic_assessment_requested,
                json.dumps(envelope).encode(),
                key=key.encode() if key else None,
            )
    finally:
        await producer.stop()


class OutcomeWatcher:
    """Collects completed and failed events; start it before publishing requests."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._consumer = AIOKafkaConsumer(
            settings.topic_assessment_completed,
            settings.topic_assessment_failed,
            bootstrap_servers=settings.kafka_bootstrap_servers,
            group_id=f"cj-outcome-watcher-{uuid.uuid4()}",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            fetch_max_wait_ms=20,
        )
        self.events: list[dict[str, Any]] = []
        self._by_entity: dict[str, list[dict[str, Any]]] = {}

    async def start(self) -> None:
        await self._consumer.start()

    async def stop(self) -> None:
        await self._consumer.stop()

    async def poll(self, timeout: float = 0.2) -> None:
        batch = await self._consumer.getmany(timeout_ms=int(timeout * 1000))
        for records in batch.values():
            for record in records:
                event = json.loads(record.value)
                self.events.append(event)
                self._by_entity.setdefault(event["data"].get("entity_id"), []).append(event)

    def outcomes_for(self, bos_batch_id: str) -> list[dict[str, Any]]:
        return list(self._by_entity.get(bos_batch_id, ()))

    async def wait_for(
        self, bos_batch_ids: list[str], timeout: float, *, settle: float = 0.0
    ) -> dict[str, dict[str, Any]]:
        """Wait until every id has an outcome; then keep listening `settle` seconds more so
        that a duplicate would be seen."""
        deadline = time.monotonic() + timeout
        waiting = set(bos_batch_ids)
        while time.monotonic() < deadline:
            await self.poll()
            waiting = {b for b in waiting if b not in self._by_entity}
            if not waiting:
                break
        else:
            missing = sorted(waiting)
            raise TimeoutError(f"no outcome within {timeout:.0f} s for {missing[:5]}")
        settle_until = time.monotonic() + settle
        while time.monotonic() < settle_until:
            await self.poll()
        return {b: self.outcomes_for(b)[0] for b in bos_batch_ids}


def format_ranking(event: dict[str, Any]) -> str:
    data = event["data"]
    if data.get("event_name") == "cj_assessment.failed":
        info = data["system_metadata"]["error_info"]
        return f"assessment failed: {info.get('error_code')}: {info.get('error_message')}"
    lines = [f"{'rank':>4}  {'essay':<20} {'score':>8} {'± SE':>7} {'comparisons':>11}"]
    for r in data["rankings"]:
        lines.append(
            f"{r['rank']:>4}  {r['els_essay_id']:<20} {r['score']:>8.2f} "
            f"{r['standard_error']:>7.2f} {r['comparison_count']:>11}"
        )
    s = data["processing_summary"]
    reliability = s.get("reliability")
    lines.append("")
    lines.append(
        f"reliability (calibrated): {reliability if reliability is not None else 'n/a'}; "
        f"comparisons: {s['comparisons_succeeded']} succeeded / {s['comparisons_requested']} "
        f"requested in {s['rounds']} iterations; stop reason: {s['stop_reason']}"
    )
    return "\n".join(lines)


async def sleep_until(predicate: Any, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(interval)
    return False
