"""Topics the broker refuses to create stop the start-up instead of going unnoticed."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from cj_assessment.errors import TopicsNotCreated
from cj_assessment.topics import raise_refused_topics


@dataclass
class CreateTopicsResponse:
    """The part of aiokafka's CreateTopicsResponse (v1+) that reports each topic."""

    topic_errors: list[tuple[str, int, str | None]]


def test_created_topics_and_topics_created_meanwhile_are_fine() -> None:
    raise_refused_topics(
        CreateTopicsResponse([("requests", 0, None), ("results", 36, "already exists")])
    )


def test_a_refused_topic_names_the_topic_and_the_broker_reason() -> None:
    response = CreateTopicsResponse(
        [
            ("requests", 0, None),
            ("results", 38, "Replication factor: 3 larger than available brokers: 1."),
            ("results.dlt", 29, None),
        ]
    )
    with pytest.raises(TopicsNotCreated) as refused:
        raise_refused_topics(response)
    message = str(refused.value)
    assert "results: Replication factor: 3 larger than available brokers" in message
    assert "results.dlt: error code 29" in message
    assert "requests:" not in message
