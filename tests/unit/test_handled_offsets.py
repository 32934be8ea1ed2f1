"""Offsets to commit: past each partition's last handled record, only while it is ours; and
what happens to them, and to dead letters, while the broker is away."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import RequestTimedOutError

from cj_assessment.consumer import EventConsumer, HandledOffsets
from cj_assessment.errors import PoisonMessage, ServiceStalled
from cj_assessment.metrics import Metrics
from cj_assessment.settings import Settings

A, B = TopicPartition("results", 0), TopicPartition("results", 1)


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    timestamp: int = 0


def test_each_partition_commits_past_its_last_handled_record_once() -> None:
    handled = HandledOffsets()
    handled.mark([Record("results", 0, 7), Record("results", 0, 3), Record("results", 1, 0)])
    assert handled.take({A, B}) == {A: 8, B: 1}
    assert handled.take({A, B}) == {}


def test_a_revoked_partition_commits_alone_while_still_assigned() -> None:
    handled = HandledOffsets()
    handled.mark([Record("results", 0, 7), Record("results", 1, 4)])
    assert handled.take({A, B}, only={B}) == {B: 5}
    assert handled.take({A, B}) == {A: 8}


def test_an_offset_of_a_partition_taken_away_is_never_committed_later() -> None:
    handled = HandledOffsets()
    handled.mark([Record("results", 0, 100)])
    # Taken away while its records were being handled: the other instance commits it.
    assert handled.take({B}) == {}
    # Back again after the other instance committed 501: 101 must not be committed.
    handled.mark([Record("results", 1, 2)])
    assert handled.take({A, B}) == {B: 3}


def test_a_partition_commits_only_up_to_its_oldest_record_still_being_handled() -> None:
    handled = HandledOffsets()
    handled.fetched([Record("results", 0, o) for o in range(10, 15)], at=0.0)
    # 10 waits behind a long iteration close while the later records are handled.
    handled.mark([Record("results", 0, o) for o in range(11, 15)])
    offsets = handled.take({A})
    assert offsets == {A: 10}
    handled.committed(offsets)
    assert not handled.pending()
    assert handled.take({A}) == {}
    handled.mark([Record("results", 0, 10)])
    assert handled.pending()
    assert handled.take({A}) == {A: 15}


def test_the_oldest_open_record_bounds_the_partitions_watermark() -> None:
    handled = HandledOffsets()
    handled.fetched(
        [Record("results", 0, 1, timestamp=5_000), Record("results", 0, 2, timestamp=4_000)],
        at=0.0,
    )
    handled.mark([Record("results", 0, 1, timestamp=5_000)])
    assert handled.oldest_open_ms(A) == 4_000
    assert handled.last_handled_ms(A) == 5_000
    handled.mark([Record("results", 0, 2, timestamp=4_000)])
    assert handled.oldest_open_ms(A) is None
    assert handled.open_records() == 0


def test_committed_offsets_report_when_their_records_were_fetched() -> None:
    handled = HandledOffsets()
    handled.fetched([Record("results", 0, 0), Record("results", 0, 1)], at=7.0)
    handled.mark([Record("results", 0, 1)])
    offsets = handled.take({A})
    assert offsets == {A: 0}
    assert handled.committed(offsets) == []
    handled.mark([Record("results", 0, 0)])
    offsets = handled.take({A})
    assert handled.committed(offsets) == [7.0, 7.0]


def test_offsets_not_committed_are_committed_with_the_next_ones() -> None:
    handled = HandledOffsets()
    handled.mark([Record("results", 0, 7)])
    failed = handled.take({A, B})
    handled.mark([Record("results", 1, 2)])
    handled.keep(failed)
    assert handled.take({A, B}) == {A: 8, B: 3}


class _BrokerAway:
    """The commit side of an AIOKafkaConsumer whose coordinator is away for one commit."""

    def __init__(self) -> None:
        self.committed: list[dict[TopicPartition, int]] = []
        self.failures = 1

    def assignment(self) -> set[TopicPartition]:
        return {A, B}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.failures:
            self.failures -= 1
            raise RequestTimedOutError()
        self.committed.append(offsets)


async def test_a_commit_that_fails_for_a_moment_keeps_the_consumer_running() -> None:
    consumer = EventConsumer(Settings(), *[None] * 5, Metrics())  # type: ignore[arg-type]
    broker = _BrokerAway()
    consumer._handled.mark([Record("results", 0, 7)])
    await consumer._commit_handled(broker)  # type: ignore[arg-type]
    consumer._handled.mark([Record("results", 1, 0)])
    await consumer._commit_handled(broker)  # type: ignore[arg-type]
    assert broker.committed == [{A: 8, B: 1}]


class _CoordinatorGone(_BrokerAway):
    """A coordinator that never answers: aiokafka would retry such a commit forever."""

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.failures:
            self.failures -= 1
            await asyncio.Event().wait()
        self.committed.append(offsets)


async def test_a_commit_that_never_returns_is_given_up_and_carried_by_the_next() -> None:
    settings = Settings(kafka_operation_timeout_seconds=0.05)
    consumer = EventConsumer(settings, *[None] * 5, Metrics())  # type: ignore[arg-type]
    broker = _CoordinatorGone()
    consumer._handled.mark([Record("results", 0, 7)])
    await asyncio.wait_for(consumer._commit_handled(broker), timeout=5)  # type: ignore[arg-type]
    consumer._handled.mark([Record("results", 1, 0)])
    await consumer._commit_handled(broker)  # type: ignore[arg-type]
    assert broker.committed == [{A: 8, B: 1}]


async def _refused_once(failures: int = 1) -> tuple[EventConsumer, _CoordinatorGone]:
    """A consumer whose first commit the coordinator left unanswered; the stall limit 0.2 s."""
    settings = Settings(kafka_operation_timeout_seconds=0.01, consumer_commit_stall_seconds=0.2)
    consumer = EventConsumer(settings, *[None] * 5, Metrics())  # type: ignore[arg-type]
    broker = _CoordinatorGone()
    broker.failures = failures
    consumer._handled.mark([Record("results", 0, 7)])
    await consumer._commit_handled(broker)  # type: ignore[arg-type]
    return consumer, broker


async def test_offsets_refused_past_the_stall_limit_stop_the_consumer() -> None:
    consumer, broker = await _refused_once(failures=1_000)
    consumer._check_commits_progress()  # refused for a moment only: carry on
    await asyncio.sleep(0.25)
    await consumer._commit_handled(broker)  # type: ignore[arg-type]
    with pytest.raises(ServiceStalled):
        consumer._check_commits_progress()


async def test_a_commit_that_succeeds_again_clears_the_stall() -> None:
    consumer, broker = await _refused_once()
    await asyncio.sleep(0.25)
    await consumer._commit_handled(broker)  # type: ignore[arg-type]
    consumer._check_commits_progress()
    assert broker.committed == [{A: 8}]


async def test_offsets_dropped_with_their_partitions_leave_nothing_stalled() -> None:
    consumer, broker = await _refused_once()
    await asyncio.sleep(0.25)
    broker.assignment = lambda: {B}  # type: ignore[method-assign]  # partition 0 moved away
    await consumer._commit_handled(broker)  # type: ignore[arg-type]
    consumer._check_commits_progress()
    assert broker.committed == []


@dataclass(frozen=True)
class PoisonRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class _SlowBroker:
    """The send side of an AIOKafkaProducer whose broker acknowledges after `ack_after`
    seconds; what it acknowledged is what the dead-letter topic holds."""

    def __init__(self, ack_after: float) -> None:
        self.ack_after = ack_after
        self.topic: list[tuple[str, bytes | None, dict[str, bytes]]] = []

    async def send(
        self, topic: str, value: bytes | None, key: bytes | None, headers: list
    ) -> asyncio.Future[None]:
        delivery: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def acknowledge() -> None:
            self.topic.append((topic, value, dict(headers)))
            delivery.set_result(None)

        asyncio.get_running_loop().call_later(self.ack_after, acknowledge)
        return delivery

    async def send_and_wait(
        self, topic: str, value: bytes | None, key: bytes | None, headers: list
    ) -> None:
        await (await self.send(topic, value, key, headers))


def _dead_lettering(broker: _SlowBroker) -> EventConsumer:
    settings = Settings(kafka_operation_timeout_seconds=0.02)
    return EventConsumer(settings, *[None] * 4, broker, Metrics())  # type: ignore[arg-type]


async def test_a_dead_letter_acknowledged_late_is_in_the_topic_once() -> None:
    broker = _SlowBroker(ack_after=0.3)
    record = PoisonRecord("results", 0, 42, b"k", b"not json")
    sent = await asyncio.wait_for(
        _dead_lettering(broker)._dead_letter(record, PoisonMessage("undecodable"), asyncio.Event()),
        timeout=3,
    )
    await asyncio.sleep(0.4)
    assert sent is True
    assert [(topic, value) for topic, value, _ in broker.topic] == [("results.dlt", b"not json")]
    assert broker.topic[0][2]["dlt.source.offset"] == b"42"


async def test_stopping_while_a_dead_letter_waits_leaves_the_record_unhandled() -> None:
    broker = _SlowBroker(ack_after=5.0)
    stop = asyncio.Event()
    record = PoisonRecord("results", 0, 42, b"k", b"not json")
    asyncio.get_running_loop().call_later(0.1, stop.set)
    sent = await asyncio.wait_for(
        _dead_lettering(broker)._dead_letter(record, PoisonMessage("undecodable"), stop),
        timeout=2,
    )
    assert sent is False
