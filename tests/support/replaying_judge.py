"""A misbehaving provider for tests: answers every comparison request with a real simulated
verdict, but delivers results repeatedly, under new event ids, shuffled, with unknown
correlation ids mixed in, and holds some back to deliver after the assessment finished."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from cj_assessment.prompt import extract_essays
from cj_assessment.settings import Settings
from cj_assessment.simulated_judge import judge


def result_envelope(request: dict[str, Any], rng: np.random.Generator, topic: str) -> dict:
    data = request["data"]
    text_a, text_b = extract_essays(data["user_prompt"])
    verdict = judge(text_a, text_b, rng)
    meta = data["metadata"]
    return {
        "event_id": str(uuid.uuid4()),
        "event_type": "LLMComparisonResultV1",
        "event_timestamp": "2026-01-01T12:00:00Z",
        "source_service": "llm_provider_service",
        "schema_version": 1,
        "correlation_id": request["correlation_id"],
        "data": {
            "request_id": str(uuid.uuid4()),
            "correlation_id": data["correlation_id"],
            "winner": verdict.winner,
            "justification": verdict.justification,
            "confidence": verdict.confidence,
            "error_detail": None,
            "provider": "test",
            "model": "replaying-judge",
            "response_time_ms": 5,
            "token_usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
            "cost_estimate": 0.0,
            "request_metadata": {
                "essay_a_id": meta["essay_a_id"],
                "essay_b_id": meta["essay_b_id"],
                "bos_batch_id": meta["bos_batch_id"],
            },
        },
        "metadata": {},
    }


@dataclass
class ReplayingJudge:
    settings: Settings
    hold_back_share: float = 0.05
    seed: int = 3
    held_back: list[dict] = field(default_factory=list)
    delivered: list[dict] = field(default_factory=list)
    unknown_sent: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        rng = np.random.default_rng(self.seed)
        shuffle = random.Random(self.seed)
        consumer = AIOKafkaConsumer(
            self.settings.topic_llm_comparison_request,
            bootstrap_servers=self.settings.kafka_bootstrap_servers,
            group_id=f"replaying-judge-{uuid.uuid4().hex[:6]}",
            auto_offset_reset="earliest",
        )
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap_servers, enable_idempotence=False
        )
        await consumer.start()
        await self._producer.start()
        try:
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=200)
                outgoing: list[dict] = []
                for records in batch.values():
                    for record in records:
                        envelope = result_envelope(
                            json.loads(record.value), rng, self.settings.topic_llm_comparison_result
                        )
                        if shuffle.random() < self.hold_back_share:
                            self.held_back.append(envelope)
                            continue
                        again = {**envelope, "event_id": str(uuid.uuid4())}
                        outgoing += [envelope, envelope, envelope, again]
                        self.delivered.append(envelope)
                if outgoing:
                    unknown = result_envelope_for_unknown(outgoing[0])
                    self.unknown_sent += 1
                    outgoing.append(unknown)
                    shuffle.shuffle(outgoing)
                    await self.send(outgoing)
        finally:
            await consumer.stop()

    async def send(self, envelopes: list[dict]) -> None:
        for envelope in envelopes:
            await self._producer.send(
                self.settings.topic_llm_comparison_result, json.dumps(envelope).encode()
            )
        await self._producer.flush()

    async def release_held_back(self) -> int:
        await self.send(self.held_back)
        return len(self.held_back)

    async def close(self) -> None:
        await self._producer.stop()


def result_envelope_for_unknown(template: dict) -> dict:
    data = {**template["data"], "correlation_id": str(uuid.uuid4())}
    return {**template, "event_id": str(uuid.uuid4()), "data": data}
