"""Reading a result record: an event id the inbox cannot key on is replaced, the answer kept."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from cj_assessment.consumer import _decode_result
from cj_assessment.contracts import storable
from cj_assessment.errors import PoisonMessage


def _record(event_id: object, offset: int = 7) -> SimpleNamespace:
    envelope = {
        "event_id": event_id,
        "event_type": "LLMComparisonResultV1",
        "data": {"correlation_id": "c-1", "winner": "Essay A", "justification": "clearer"},
    }
    return SimpleNamespace(
        topic="results", partition=2, offset=offset, value=json.dumps(envelope).encode()
    )


@pytest.mark.parametrize("event_id", ["", "evt\x00id", None, True, "e" * 300])
def test_a_result_whose_event_id_cannot_key_the_inbox_keeps_its_answer(event_id: object) -> None:
    first, redelivered, other = _record(event_id), _record(event_id), _record(event_id, 8)
    decoded = _decode_result(first)
    assert decoded.data.winner == "Essay A"
    assert decoded.event_id and decoded.event_id != event_id
    # The stand-in follows the record's place: a redelivery is recognised, another is not.
    assert _decode_result(redelivered).event_id == decoded.event_id
    assert _decode_result(other).event_id != decoded.event_id


def test_a_result_with_a_usable_event_id_keeps_it() -> None:
    assert _decode_result(_record("evt-1")).event_id == "evt-1"


def _raw(value: bytes) -> SimpleNamespace:
    return SimpleNamespace(topic="results", partition=0, offset=1, value=value)


def test_an_unpaired_surrogate_in_a_justification_costs_the_text_not_the_answer() -> None:
    value = (
        b'{"event_id": "evt-2", "event_type": "LLMComparisonResultV1", "data":'
        b' {"correlation_id": "c-1", "winner": "Essay B",'
        b' "justification": "cut \\ud83d here, kept \\ud83d\\ude00"}}'
    )
    decoded = _decode_result(_raw(value))
    assert (decoded.event_id, decoded.data.winner) == ("evt-2", "Essay B")
    # The pair makes one character; the lone half is made storable with the other texts.
    assert storable(decoded.data.justification or "") == "cut ? here, kept \U0001f600"


@pytest.mark.parametrize(
    "value",
    [
        b'{"event_id": "e", "event_type": "t", "data": {"correlation_id": "c", "winner":'
        b' "Essay A", "confidence": NaN, "justification": "\\ud800"}}',
        b'{"event_id": "e", "event_type": "t", "data": {"correlation_id": "c", "winner":'
        b' "Essay A", "justification": "\\ud800"',
        b'{"event_id": "e", "event_type": "t", "data": {"winner": "Essay A", "note": "\\ud800"}}',
    ],
)
def test_a_record_refused_for_anything_besides_a_surrogate_stays_refused(value: bytes) -> None:
    with pytest.raises(PoisonMessage):
        _decode_result(_raw(value))
