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


def _with(data: dict[str, object], **envelope: object) -> SimpleNamespace:
    value = {
        "event_id": "evt-3",
        "event_type": "LLMComparisonResultV1",
        **envelope,
        "data": {"correlation_id": "c-1", **data},
    }
    return _raw(json.dumps(value).encode())


@pytest.mark.parametrize(
    ("data", "envelope", "dropped"),
    [
        ({"winner": "Essay A", "response_time_ms": 1800.5}, {}, "response_time_ms"),
        ({"winner": "Essay A", "token_usage": {"prompt_tokens": 1.5}}, {}, "token_usage"),
        ({"winner": "Essay A", "justification": 17, "provider": []}, {}, "justification"),
        ({"winner": "Essay B", "cost_estimate": "free", "requested_at": {}}, {}, "cost_estimate"),
        ({"winner": "Essay B", "request_metadata": ["a", "b"]}, {}, "request_metadata"),
        ({"winner": "Essay B"}, {"metadata": [], "schema_version": None}, "metadata"),
        ({"winner": "Essay B"}, {"event_type": None, "event_timestamp": 1e20}, "event_timestamp"),
        (
            {"error_detail": {"error_code": "RATE_LIMIT", "message": None, "details": []}},
            {},
            "message",
        ),
        ({"winner": "Essay A", "justification": "\\ud800", "model": 5}, {}, "model"),
    ],
)
def test_a_value_that_does_not_fit_a_recorded_field_costs_the_field_not_the_answer(
    data: dict[str, object], envelope: dict[str, object], dropped: str
) -> None:
    record = _with(data, **envelope)
    if "\\ud800" in json.dumps(data):
        record.value = record.value.replace(b"\\\\ud800", b"\\ud800")
    decoded = _decode_result(record)
    result = decoded.data
    assert result.correlation_id == "c-1"
    assert (result.winner, result.error_detail and result.error_detail.error_code) == (
        data.get("winner"),
        (data.get("error_detail") or {}).get("error_code"),  # type: ignore[union-attr]
    )
    fields = {
        **result.model_dump(),
        **(result.error_detail.model_dump() if result.error_detail else {}),
    }
    fields |= decoded.model_dump(exclude={"data"})
    assert fields[dropped] in (None, "", 1)  # the field's default


@pytest.mark.parametrize(
    "data",
    [
        {"winner": "essay a"},  # the verdict is the contract's, exactly
        {"winner": "Essay A", "error_detail": {"error_code": "X"}},
        {"error_detail": {"message": "no code"}},
        {"winner": "Essay A", "response_time_ms": 1.5, "correlation_id": ["c"]},
    ],
)
def test_a_result_whose_verdict_or_identity_does_not_fit_stays_refused(
    data: dict[str, object],
) -> None:
    with pytest.raises(PoisonMessage):
        _decode_result(_with(data))
