"""Offsets to commit: past each partition's last handled record, only while it is ours."""

from __future__ import annotations

from dataclasses import dataclass

from aiokafka import TopicPartition

from cj_assessment.consumer import HandledOffsets

A, B = TopicPartition("results", 0), TopicPartition("results", 1)


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int


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
