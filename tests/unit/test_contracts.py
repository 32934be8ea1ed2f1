"""The wire contract (CONTRACT.md §3-§8): the documented examples parse, and what the service
emits has exactly the documented shape."""

from __future__ import annotations

import copy
import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from cj_assessment import contracts
from cj_assessment.contracts import (
    SOURCE_SERVICE,
    CJAssessmentCompletedV1,
    CJAssessmentFailedV1,
    ComparisonRequestMetadata,
    ELSCJAssessmentRequestV1,
    EventEnvelope,
    LLMComparisonRequestV1,
    LLMComparisonResultV1,
    LLMConfigOverrides,
    ProcessingSummary,
    RankingEntry,
    bos_batch_id_of,
    deterministic_event_id,
    deterministic_event_ids,
    envelope_json,
    envelope_text,
    outcome_header,
    random_ids,
    storable,
    unstorable,
    utc_iso,
)

TS = "2026-01-01T12:00:00Z"
TS_LATER = "2026-01-01T12:00:42Z"

# --- the contract's examples, "..." filled in ---------------------------------------------------

ENVELOPE_EXAMPLE: dict[str, Any] = {
    "event_id": "7f1c2a52-5a3e-4d7e-9d3b-0b0a4c7f6a10",
    "event_type": "huleedu.cj_assessment.completed.v1",
    "event_timestamp": TS,
    "source_service": "cj_assessment_service",
    "schema_version": 1,
    "correlation_id": "0f4b8f5e-2f7e-4b8e-8a3c-1d2e3f4a5b6c",
    "data_schema_uri": None,
    "data": {},
    "metadata": {},
}

REQUEST_EXAMPLE: dict[str, Any] = {
    "event_name": "els.cj_assessment.requested",
    "entity_ref": {"entity_id": "bos-batch-42", "entity_type": "batch", "parent_id": None},
    "timestamp": TS,
    "system_metadata": {
        "entity": {"entity_id": "bos-batch-42", "entity_type": "batch"},
        "entity_id": "bos-batch-42",
        "entity_type": "batch",
        "processing_stage": "pending",
        "event": "els.cj_assessment.requested",
    },
    "essays_for_cj": [
        {"essay_id": "e1", "text_storage_id": "s1"},
        {"essay_id": "e2", "text_storage_id": "s2", "text": "inline essay text"},
    ],
    "language": "en",
    "course_code": "ENG5",
    "essay_instructions": "Write about project-based learning.",
    "llm_config_overrides": {
        "model_override": None,
        "temperature_override": None,
        "max_tokens_override": None,
        "provider_override": None,
    },
    "batch_config_overrides": {
        "batch_size": 100,
        "max_concurrent_batches": 2,
        "partial_completion_threshold": 0.85,
    },
    "assignment_id": None,
    "user_id": "teacher-7",
    "org_id": None,
}

COMPARISON_REQUEST_EXAMPLE: dict[str, Any] = {
    "correlation_id": "3b6f0c1e-8a53-4c1f-9a55-8f1f3c2d7e90",
    "user_prompt": "full prompt; Essay A and Essay B are both inside it",
    "callback_topic": "huleedu.llm_provider.comparison_result.v1",
    "llm_config_overrides": {
        "model_override": "gpt-4.1",
        "temperature_override": 0.1,
        "max_tokens_override": 512,
        "provider_override": "openai",
    },
    "user_id": "teacher-7",
    "metadata": {
        "essay_a_id": "e1",
        "essay_b_id": "e2",
        "bos_batch_id": "bos-batch-42",
        "cj_batch_id": "17",
        "submission_batch_id": "9d0e1f2a-3b4c-4d5e-8f60-718293a4b5c6",
        "comparison_iteration": 1,
        "attempt": 1,
        "cj_request_type": "cj_comparison",
    },
}

RESULT_EXAMPLE: dict[str, Any] = {
    "request_id": "provider queue id",
    "correlation_id": "3b6f0c1e-8a53-4c1f-9a55-8f1f3c2d7e90",
    "winner": "Essay A",
    "justification": "short text (<= 500 chars)",
    "confidence": 4.0,
    "error_detail": None,
    "provider": "openai",
    "model": "gpt-4.1",
    "response_time_ms": 1800,
    "token_usage": {"prompt_tokens": 2100, "completion_tokens": 90, "total_tokens": 2190},
    "cost_estimate": 0.0021,
    "requested_at": TS,
    "completed_at": TS_LATER,
    "trace_id": None,
    "request_metadata": {"essay_a_id": "e1", "essay_b_id": "e2", "bos_batch_id": "bos-batch-42"},
}

ERROR_DETAIL_EXAMPLE: dict[str, Any] = {
    "error_code": "PROVIDER_TIMEOUT",
    "message": "the provider did not answer",
    "correlation_id": "3b6f0c1e-8a53-4c1f-9a55-8f1f3c2d7e90",
    "timestamp": TS_LATER,
    "service": "llm_provider_service",
    "operation": "compare",
    "details": {"retries": 3},
}

COMPLETED_EXAMPLE: dict[str, Any] = {
    "event_name": "cj_assessment.completed",
    "entity_ref": {"entity_id": "bos-batch-42", "entity_type": "batch", "parent_id": None},
    "entity_id": "bos-batch-42",
    "entity_type": "batch",
    "parent_id": None,
    "timestamp": TS_LATER,
    "status": "completed_successfully",
    "system_metadata": {
        "entity": {"entity_id": "bos-batch-42", "entity_type": "batch"},
        "entity_id": "bos-batch-42",
        "entity_type": "batch",
        "processing_stage": "completed",
        "event": "cj_assessment.completed",
        "started_at": TS,
        "completed_at": TS_LATER,
        "error_info": {},
    },
    "cj_assessment_job_id": "17",
    "rankings": [
        {
            "els_essay_id": "e2",
            "rank": 1,
            "score": 1.42,
            "standard_error": 0.31,
            "comparison_count": 12,
            "wins": 9,
            "losses": 3,
        }
    ],
    "processing_summary": {
        "total_essays": 30,
        "successful": 30,
        "failed": 0,
        "successful_essay_ids": ["e2"],
        "failed_essay_ids": [],
        "processing_time_seconds": 41.7,
        "comparisons_requested": 190,
        "comparisons_succeeded": 180,
        "comparisons_failed": 10,
        "rounds": 4,
        "stop_reason": "stability",
        "reliability": 0.91,
    },
}

STARTED = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
FINISHED = STARTED + timedelta(seconds=42)


# --- §3 envelope ---------------------------------------------------------------------------------


def test_the_envelope_example_parses() -> None:
    envelope = EventEnvelope.model_validate(ENVELOPE_EXAMPLE)
    assert envelope.event_type == "huleedu.cj_assessment.completed.v1"
    assert envelope.correlation_id == ENVELOPE_EXAMPLE["correlation_id"]
    assert envelope.data == {}


def test_an_envelope_without_metadata_and_with_any_event_type_is_accepted() -> None:
    raw = {k: v for k, v in ENVELOPE_EXAMPLE.items() if k != "metadata"}
    raw["event_type"] = "LLMComparisonResultV1"
    raw["something_new"] = {"added": "later"}
    envelope = EventEnvelope.model_validate(raw)
    assert envelope.metadata is None
    assert envelope.event_type == "LLMComparisonResultV1"


def test_envelope_ids_given_as_uuids_become_strings() -> None:
    raw = {**ENVELOPE_EXAMPLE, "event_id": uuid.UUID(int=1), "correlation_id": uuid.UUID(int=2)}
    envelope = EventEnvelope.model_validate(raw)
    assert envelope.event_id == str(uuid.UUID(int=1))
    assert envelope.correlation_id == str(uuid.UUID(int=2))


def test_envelope_json_emits_exactly_the_contract_keys() -> None:
    event_id = deterministic_event_id("topic", "bos-batch-42")
    data = LLMConfigOverrides(model_override="m")
    envelope = envelope_json(
        event_id=event_id,
        event_type="huleedu.cj_assessment.completed.v1",
        correlation_id="corr-1",
        data=data,
        now=FINISHED,
    )
    assert set(envelope) == set(ENVELOPE_EXAMPLE)
    assert envelope["event_id"] == str(event_id)
    assert envelope["event_type"] == "huleedu.cj_assessment.completed.v1"
    assert envelope["event_timestamp"] == TS_LATER
    assert envelope["source_service"] == SOURCE_SERVICE == "cj_assessment_service"
    assert envelope["schema_version"] == 1
    assert envelope["correlation_id"] == "corr-1"
    assert envelope["data_schema_uri"] is None
    assert envelope["data"] == data.model_dump(mode="json")
    assert envelope["metadata"] == {}
    # What it emits, it also accepts.
    assert EventEnvelope.model_validate(envelope).event_id == str(event_id)


def test_envelope_text_is_the_envelope_serialised_as_the_outbox_stores_it() -> None:
    request = LLMComparisonRequestV1(
        correlation_id=str(uuid.UUID(int=3)),
        user_prompt='Essay "A":\n«naïve» text\tand a backslash \\ and 💡',
        callback_topic="huleedu.llm_provider.comparison_result.v1",
        llm_config_overrides=LLMConfigOverrides(temperature_override=0.25),
        user_id="teacher-1",
        metadata=ComparisonRequestMetadata(
            essay_a_id="e1",
            essay_b_id="e2",
            bos_batch_id="bos-1",
            cj_batch_id="7",
            submission_batch_id=str(uuid.UUID(int=4)),
            comparison_iteration=2,
            attempt=1,
            cj_request_type="cj_comparison",
        ),
    )
    fields = dict(
        event_id=deterministic_event_id("topic", "x"),
        event_type="huleedu.llm_provider.comparison_request.v1",
        correlation_id="corr-1",
        data=request,
        now=FINISHED,
    )
    text = envelope_text(**fields)  # type: ignore[arg-type]
    as_dict = envelope_json(**fields)  # type: ignore[arg-type]
    assert text == json.dumps(as_dict, separators=(",", ":"), ensure_ascii=False)
    assert json.loads(text) == as_dict


def test_deterministic_event_id_is_stable_and_distinguishes_events() -> None:
    first = deterministic_event_id("huleedu.cj_assessment.completed.v1", "bos-batch-42")
    again = deterministic_event_id("huleedu.cj_assessment.completed.v1", "bos-batch-42")
    other = deterministic_event_id("huleedu.cj_assessment.failed.v1", "bos-batch-42")
    assert first == again
    assert first != other
    assert first.version == 5


@given(
    prefix=st.text(max_size=40),
    names=st.lists(st.one_of(st.uuids().map(str), st.text(max_size=40)), max_size=20),
)
def test_event_ids_named_in_bulk_are_the_ids_named_one_at_a_time(
    prefix: str, names: list[str]
) -> None:
    expected = [deterministic_event_id(prefix, name) for name in names]
    assert deterministic_event_ids(prefix, names) == expected


def test_random_ids_are_distinct_version_4_uuids() -> None:
    ids = random_ids(1000)
    assert len(set(ids)) == 1000
    assert {(i.version, i.variant) for i in ids} == {(4, uuid.RFC_4122)}
    assert random_ids(0) == []


def test_utc_iso_renders_z_suffix_in_utc() -> None:
    plus_two = datetime(2026, 1, 1, 16, 0, 0, tzinfo=timezone(timedelta(hours=2)))
    assert utc_iso(plus_two) == "2026-01-01T14:00:00Z"


# --- §4 assessment request -----------------------------------------------------------------------


def test_the_request_example_with_entity_ref_parses() -> None:
    request = ELSCJAssessmentRequestV1.model_validate(REQUEST_EXAMPLE)
    assert request.bos_batch_id == "bos-batch-42"
    assert [e.essay_id for e in request.essays_for_cj] == ["e1", "e2"]
    assert request.essays_for_cj[0].text is None
    assert request.essays_for_cj[0].text_storage_id == "s1"
    assert request.essays_for_cj[1].text == "inline essay text"
    assert request.batch_config_overrides == {
        "batch_size": 100,
        "max_concurrent_batches": 2,
        "partial_completion_threshold": 0.85,
    }
    assert request.user_id == "teacher-7"


def test_the_flat_entity_id_form_gives_the_same_bos_batch_id() -> None:
    raw = copy.deepcopy(REQUEST_EXAMPLE)
    del raw["entity_ref"]
    raw.update({"entity_id": "bos-batch-42", "entity_type": "batch", "parent_id": None})
    request = ELSCJAssessmentRequestV1.model_validate(raw)
    assert request.bos_batch_id == "bos-batch-42"


def test_a_minimal_request_is_accepted() -> None:
    raw = {
        "entity_id": "bos-batch-42",
        "essays_for_cj": [{"essay_id": "e1", "text": "x"}, {"essay_id": "e2", "text": "y"}],
    }
    request = ELSCJAssessmentRequestV1.model_validate(raw)
    assert request.bos_batch_id == "bos-batch-42"
    assert request.batch_config_overrides is None
    assert request.llm_config_overrides is None


def test_unknown_request_fields_are_ignored() -> None:
    raw = copy.deepcopy(REQUEST_EXAMPLE)
    raw["brand_new_field"] = {"nested": [1, 2, 3]}
    raw["entity_ref"]["extra"] = "x"
    raw["essays_for_cj"][0]["word_count"] = 512
    raw["llm_config_overrides"]["top_p"] = 0.3
    request = ELSCJAssessmentRequestV1.model_validate(raw)
    assert request.bos_batch_id == "bos-batch-42"
    assert "brand_new_field" not in request.model_dump()
    assert not hasattr(request.essays_for_cj[0], "word_count")


def test_a_request_without_essays_is_invalid() -> None:
    raw = {k: v for k, v in REQUEST_EXAMPLE.items() if k != "essays_for_cj"}
    with pytest.raises(ValidationError):
        ELSCJAssessmentRequestV1.model_validate(raw)


def test_an_empty_entity_ref_id_gives_way_to_the_flat_entity_id() -> None:
    raw = copy.deepcopy(REQUEST_EXAMPLE)
    raw["entity_ref"] = {"entity_id": ""}
    raw["entity_id"] = "bos-flat"
    request = ELSCJAssessmentRequestV1.model_validate(raw)
    assert request.bos_batch_id == "bos-flat" == bos_batch_id_of(raw)


@pytest.mark.parametrize(
    ("data", "identity"),
    [
        ({"entity_ref": {"entity_id": "b-1"}, "essays_for_cj": "not a list"}, "b-1"),
        ({"entity_id": "b-2", "essays_for_cj": None}, "b-2"),
        ({"entity_ref": {"entity_id": "b-3"}, "entity_id": "flat-ignored"}, "b-3"),
        ({"entity_ref": {"entity_id": 42}, "entity_id": "b-4"}, "b-4"),
        ({"entity_ref": {"entity_type": "batch"}}, None),
        ({"entity_ref": "b-5"}, None),
        ({"entity_id": ""}, None),
        ({"entity_id": "x" * 256}, "x" * 256),  # too long to store, still answered
        ({"entity_id": "x" * 4097}, None),
        ({"entity_ref": {"entity_id": "x" * 4097}, "entity_id": "another-batch"}, None),
        ({}, None),
    ],
)
def test_the_identity_of_an_invalid_request_is_read_as_a_valid_one_would_be(
    data: dict[str, Any], identity: str | None
) -> None:
    assert bos_batch_id_of(data) == identity


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("essays_for_cj", 0, "essay_id"), "e" * 256),
        (("essays_for_cj", 0, "text_storage_id"), "s" * 256),
        (("entity_ref", "entity_id"), "b" * 256),
        (("language",), "l" * 33),
        (("course_code",), "c" * 65),
        (("user_id",), "u" * 256),
        (("llm_config_overrides", "temperature_override"), -0.1),
        (("llm_config_overrides", "temperature_override"), 2.5),
        (("llm_config_overrides", "max_tokens_override"), 0),
    ],
)
def test_request_fields_beyond_what_can_be_stored_or_sent_are_invalid(
    path: tuple[Any, ...], value: Any
) -> None:
    raw = copy.deepcopy(REQUEST_EXAMPLE)
    target = raw
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ValidationError) as caught:
        ELSCJAssessmentRequestV1.model_validate(raw)
    assert [e["loc"] for e in caught.value.errors()] == [path]


def test_envelope_ids_longer_than_a_stored_id_are_invalid() -> None:
    with pytest.raises(ValidationError):
        EventEnvelope.model_validate({"event_id": "e" * 256, "event_type": "t", "data": {}})


# --- §5 comparison request -----------------------------------------------------------------------


def test_comparison_request_dumps_exactly_the_contract_example() -> None:
    example = COMPARISON_REQUEST_EXAMPLE
    request = LLMComparisonRequestV1(
        correlation_id=example["correlation_id"],
        user_prompt=example["user_prompt"],
        callback_topic=example["callback_topic"],
        llm_config_overrides=LLMConfigOverrides(**example["llm_config_overrides"]),
        user_id=example["user_id"],
        metadata=ComparisonRequestMetadata(**example["metadata"]),
    )
    dumped = request.model_dump(mode="json")
    assert dumped == example
    assert set(dumped) == set(example)
    assert set(dumped["metadata"]) == set(example["metadata"])
    assert set(dumped["llm_config_overrides"]) == set(example["llm_config_overrides"])


def test_comparison_request_refuses_fields_outside_the_contract() -> None:
    with pytest.raises(ValidationError):
        LLMComparisonRequestV1.model_validate({**COMPARISON_REQUEST_EXAMPLE, "extra": 1})
    with pytest.raises(ValidationError):
        ComparisonRequestMetadata.model_validate(
            {**COMPARISON_REQUEST_EXAMPLE["metadata"], "cj_request_type": "something_else"}
        )


# --- §6 comparison result ------------------------------------------------------------------------


def test_the_success_result_example_parses() -> None:
    result = LLMComparisonResultV1.model_validate(RESULT_EXAMPLE)
    assert result.winner == "Essay A"
    assert result.confidence == 4.0
    assert result.error_detail is None
    assert result.token_usage is not None and result.token_usage.total_tokens == 2190
    assert result.request_metadata == RESULT_EXAMPLE["request_metadata"]


def test_the_error_result_form_parses() -> None:
    raw = {
        **RESULT_EXAMPLE,
        "winner": None,
        "justification": None,
        "confidence": None,
        "error_detail": ERROR_DETAIL_EXAMPLE,
    }
    result = LLMComparisonResultV1.model_validate(raw)
    assert result.winner is None
    assert result.error_detail is not None
    assert result.error_detail.error_code == "PROVIDER_TIMEOUT"
    assert result.error_detail.details == {"retries": 3}


def test_a_result_with_both_winner_and_error_is_invalid() -> None:
    with pytest.raises(ValidationError):
        LLMComparisonResultV1.model_validate(
            {**RESULT_EXAMPLE, "error_detail": ERROR_DETAIL_EXAMPLE}
        )


def test_a_result_with_neither_winner_nor_error_is_invalid() -> None:
    with pytest.raises(ValidationError):
        LLMComparisonResultV1.model_validate({**RESULT_EXAMPLE, "winner": None})


@pytest.mark.parametrize("winner", ["essay_a", "A", "Essay C", ""])
def test_a_winner_outside_essay_a_or_b_is_invalid(winner: str) -> None:
    with pytest.raises(ValidationError):
        LLMComparisonResultV1.model_validate({**RESULT_EXAMPLE, "winner": winner})


@pytest.mark.parametrize(
    "confidence", [0.5, 5.5, float("nan"), "high", True, [4], 10**400, "1e999", -(10**400)]
)
def test_a_confidence_outside_one_to_five_is_dropped_and_the_verdict_kept(
    confidence: object,
) -> None:
    # The verdict is a paid answer: refusing the result would pay for the comparison again.
    result = LLMComparisonResultV1.model_validate({**RESULT_EXAMPLE, "confidence": confidence})
    assert result.winner == RESULT_EXAMPLE["winner"]
    assert result.confidence is None


@pytest.mark.parametrize("confidence", [1, 1.0, 4.5, "3", 5])
def test_a_confidence_within_one_to_five_is_kept(confidence: object) -> None:
    result = LLMComparisonResultV1.model_validate({**RESULT_EXAMPLE, "confidence": confidence})
    assert result.confidence == float(confidence)  # type: ignore[arg-type]


def test_unknown_result_fields_are_ignored() -> None:
    result = LLMComparisonResultV1.model_validate({**RESULT_EXAMPLE, "new_field": "x"})
    assert result.winner == "Essay A"


# --- §7 completed and §8 failed ------------------------------------------------------------------


def _completed() -> CJAssessmentCompletedV1:
    ranking = COMPLETED_EXAMPLE["rankings"][0]
    summary = COMPLETED_EXAMPLE["processing_summary"]
    return CJAssessmentCompletedV1(
        **outcome_header(
            bos_batch_id="bos-batch-42",
            stage="completed",
            started_at=STARTED,
            finished_at=FINISHED,
        ),
        cj_assessment_job_id="17",
        rankings=[RankingEntry(**ranking)],
        processing_summary=ProcessingSummary(**summary),
    )


def test_completed_event_has_exactly_the_contract_keys() -> None:
    dumped = _completed().model_dump(mode="json")
    example = COMPLETED_EXAMPLE
    assert set(dumped) == set(example)
    assert set(dumped["system_metadata"]) == set(example["system_metadata"])
    assert set(dumped["entity_ref"]) == set(example["entity_ref"])
    assert set(dumped["rankings"][0]) == set(example["rankings"][0])
    assert set(dumped["processing_summary"]) >= set(example["processing_summary"])


def test_completed_event_matches_the_contract_example_values() -> None:
    dumped = _completed().model_dump(mode="json")
    summary = dumped.pop("processing_summary")
    example = copy.deepcopy(COMPLETED_EXAMPLE)
    example_summary = example.pop("processing_summary")
    assert dumped == example
    assert {k: summary[k] for k in example_summary} == example_summary
    # The service's own figures, beyond the contract's example, default to none.
    assert {summary[k] for k in set(summary) - set(example_summary)} == {None}


def test_completed_event_carries_both_entity_shapes() -> None:
    dumped = _completed().model_dump(mode="json")
    assert dumped["entity_ref"] == {
        "entity_id": "bos-batch-42",
        "entity_type": "batch",
        "parent_id": None,
    }
    assert (dumped["entity_id"], dumped["entity_type"], dumped["parent_id"]) == (
        "bos-batch-42",
        "batch",
        None,
    )
    assert dumped["event_name"] == "cj_assessment.completed"
    assert dumped["status"] == "completed_successfully"
    assert dumped["system_metadata"]["processing_stage"] == "completed"
    assert dumped["system_metadata"]["event"] == "cj_assessment.completed"


def test_completed_event_summary_holds_only_declared_figures() -> None:
    summary = {**COMPLETED_EXAMPLE["processing_summary"], "position_bias_share_a": 0.52}
    with pytest.raises(ValidationError):
        ProcessingSummary(**summary)


def test_every_field_of_every_message_model_is_described() -> None:
    models = [
        obj
        for obj in vars(contracts).values()
        if isinstance(obj, type)
        and issubclass(obj, BaseModel)
        and obj.__module__ == contracts.__name__
    ]
    undescribed = [
        f"{model.__name__}.{name}"
        for model in models
        for name, info in model.model_fields.items()
        if not info.description
    ]
    assert len(models) > 10
    assert undescribed == []


def test_failed_event_has_status_stage_and_error_info() -> None:
    error_info = {
        "error_code": "LOW_SUCCESS_RATE",
        "error_message": "too few comparisons succeeded",
        "error_type": "AssessmentFailed",
        "context": {"completed": 3, "failed": 7},
    }
    event = CJAssessmentFailedV1(
        **outcome_header(
            bos_batch_id="bos-batch-42",
            stage="failed",
            started_at=None,
            finished_at=FINISHED,
            error_info=error_info,
        ),
        cj_assessment_job_id="17",
    )
    dumped = event.model_dump(mode="json")
    assert dumped["event_name"] == "cj_assessment.failed"
    assert dumped["status"] == "failed_critically"
    assert dumped["system_metadata"]["processing_stage"] == "failed"
    assert dumped["system_metadata"]["event"] == "cj_assessment.failed"
    assert set(dumped["system_metadata"]["error_info"]) == {
        "error_code",
        "error_message",
        "error_type",
        "context",
    }
    assert dumped["system_metadata"]["error_info"] == error_info
    header_keys = set(COMPLETED_EXAMPLE) - {"rankings", "processing_summary"}
    assert set(dumped) == header_keys
    assert dumped["entity_ref"]["entity_id"] == dumped["entity_id"] == "bos-batch-42"
    assert dumped["system_metadata"]["started_at"] is None
    assert dumped["timestamp"] == TS_LATER


def test_emitted_outcome_models_refuse_unknown_fields() -> None:
    with pytest.raises(ValidationError):
        CJAssessmentFailedV1(
            **outcome_header(
                bos_batch_id="b", stage="failed", started_at=None, finished_at=FINISHED
            ),
            cj_assessment_job_id="1",
            surprise=True,
        )


@pytest.mark.parametrize(
    ("text", "why", "kept"),
    [
        ("plain", None, "plain"),
        ("caf\u00e9 \U0001f600", None, "caf\u00e9 \U0001f600"),
        ("a\x00b", "contains NUL characters", "ab"),
        ("a\ud800b", "contains an unpaired surrogate", "a?b"),
        ("\x00\udfff", "contains NUL characters", "?"),
    ],
)
def test_text_the_database_cannot_store_is_named_or_made_storable(
    text: str, why: str | None, kept: str
) -> None:
    assert unstorable(text) == why
    assert storable(text) == kept
    assert unstorable(storable(text)) is None
