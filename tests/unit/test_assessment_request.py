"""Checks of an incoming assessment request that need no I/O."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from cj_assessment.assessment_request import (
    EssayInput,
    check_essay_list,
    check_essay_text,
    check_instructions,
    check_outcome_fits,
    outcome_bytes_bound,
    schema_rejection,
)
from cj_assessment.contracts import ELSCJAssessmentRequestV1, RankingEntry
from cj_assessment.errors import PermanentError, RequestRejected


def _request(essays: list[dict[str, Any]]) -> ELSCJAssessmentRequestV1:
    return ELSCJAssessmentRequestV1.model_validate(
        {"entity_id": "bos-batch-42", "essays_for_cj": essays}
    )


def _essays(n: int) -> list[dict[str, Any]]:
    return [{"essay_id": f"e{i}", "text_storage_id": f"s{i}"} for i in range(n)]


def _rejected(call: Any) -> RequestRejected:
    with pytest.raises(RequestRejected) as caught:
        call()
    assert isinstance(caught.value, PermanentError)
    return caught.value


def test_a_valid_list_gives_the_essays_in_order() -> None:
    request = _request(
        [{"essay_id": "e1", "text_storage_id": "s1"}, {"essay_id": "e2", "text": "inline"}]
    )
    assert check_essay_list(request, max_essays=10) == [
        EssayInput("e1", "s1", None),
        EssayInput("e2", None, "inline"),
    ]


@pytest.mark.parametrize("count", [0, 1])
def test_too_few_essays_are_rejected(count: int) -> None:
    error = _rejected(lambda: check_essay_list(_request(_essays(count)), max_essays=10))
    assert error.error_code == "TOO_FEW_ESSAYS"
    assert error.context == {"essay_count": count}


def test_too_many_essays_are_rejected() -> None:
    error = _rejected(lambda: check_essay_list(_request(_essays(6)), max_essays=5))
    assert error.error_code == "TOO_MANY_ESSAYS"
    assert error.context["max_essays"] == 5


def test_exactly_the_limits_are_accepted() -> None:
    assert len(check_essay_list(_request(_essays(2)), max_essays=2)) == 2
    assert len(check_essay_list(_request(_essays(5)), max_essays=5)) == 5


def test_duplicate_essay_ids_are_rejected_naming_them() -> None:
    essays = _essays(4) + [{"essay_id": "e2", "text": "again"}, {"essay_id": "e0", "text": "x"}]
    error = _rejected(lambda: check_essay_list(_request(essays), max_essays=10))
    assert error.error_code == "DUPLICATE_ESSAY_IDS"
    assert error.context["duplicate_essay_ids"] == ["e0", "e2"]


@pytest.mark.parametrize("essay", [{"essay_id": "e9"}, {"essay_id": "e9", "text_storage_id": ""}])
def test_an_essay_with_neither_text_nor_storage_id_is_rejected(essay: dict[str, Any]) -> None:
    error = _rejected(lambda: check_essay_list(_request(_essays(2) + [essay]), max_essays=10))
    assert error.error_code == "MISSING_ESSAY_TEXT"
    assert error.context == {"essay_id": "e9"}


def test_a_blank_essay_id_is_rejected() -> None:
    essays = _essays(2) + [{"essay_id": "  ", "text": "x"}]
    error = _rejected(lambda: check_essay_list(_request(essays), max_essays=10))
    assert error.error_code == "INVALID_ESSAY_ID"


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_empty_text_is_rejected(text: str) -> None:
    error = _rejected(lambda: check_essay_text("e1", text, max_chars=100))
    assert error.error_code == "EMPTY_ESSAY_TEXT"
    assert error.context == {"essay_id": "e1"}


def test_inline_empty_text_passes_the_list_check_and_fails_the_text_check() -> None:
    request = _request([{"essay_id": "e1", "text": ""}, {"essay_id": "e2", "text": "ok"}])
    (first, _) = check_essay_list(request, max_essays=10)
    error = _rejected(lambda: check_essay_text(first.essay_id, first.text or "", max_chars=10))
    assert error.error_code == "EMPTY_ESSAY_TEXT"


def test_over_long_text_is_rejected() -> None:
    error = _rejected(lambda: check_essay_text("e1", "x" * 11, max_chars=10))
    assert error.error_code == "ESSAY_TOO_LONG"
    assert error.context == {"essay_id": "e1", "length": 11, "max_chars": 10}


def test_text_exactly_at_the_limit_is_accepted_unchanged() -> None:
    assert check_essay_text("e1", "x" * 10, max_chars=10) == "x" * 10


@pytest.mark.parametrize("text", ["\x00", "good text\x00", "\x00\x00   "])
def test_text_with_nul_characters_is_rejected(text: str) -> None:
    error = _rejected(lambda: check_essay_text("e1", text, max_chars=100))
    assert error.error_code == "INVALID_ESSAY_TEXT"
    assert "NUL" in error.message
    assert error.context == {"essay_id": "e1"}


def test_rejection_messages_name_the_essay_not_its_text() -> None:
    secret = "the student's private words " * 3
    error = _rejected(lambda: check_essay_text("e7", secret + "\x00", max_chars=1000))
    assert "e7" in error.message
    assert secret not in error.message


def test_a_schema_rejection_names_each_invalid_field_and_never_its_value() -> None:
    secret = "SECRET-ESSAY-TEXT"
    with pytest.raises(ValidationError) as caught:
        ELSCJAssessmentRequestV1.model_validate(
            {
                "entity_id": "bos-batch-42",
                "essays_for_cj": [{"essay_id": 7, "text": secret}, {"text": secret}],
                "language": secret * 5,
            }
        )
    rejected = schema_rejection(caught.value)
    assert rejected.error_code == "INVALID_REQUEST"
    assert rejected.context == {
        "invalid_fields": ["essays_for_cj.0.essay_id", "essays_for_cj.1.essay_id", "language"]
    }
    assert "essays_for_cj.1.essay_id: Field required" in rejected.message
    assert "language: String should have at most 32 characters" in rejected.message
    assert secret not in rejected.message and "7" not in rejected.message


def test_a_schema_rejection_names_ten_fields_and_counts_the_rest() -> None:
    essays = [{"essay_id": i} for i in range(14)]
    with pytest.raises(ValidationError) as caught:
        ELSCJAssessmentRequestV1.model_validate({"entity_id": "b", "essays_for_cj": essays})
    rejected = schema_rejection(caught.value)
    assert rejected.message.endswith("; and 4 more")
    assert len(rejected.context["invalid_fields"]) == 14


def test_instructions_up_to_the_limit_pass_and_longer_ones_are_rejected() -> None:
    request = _request(_essays(2)).model_copy(update={"essay_instructions": "x" * 100})
    check_instructions(request, max_chars=100)
    error = _rejected(lambda: check_instructions(request, max_chars=99))
    assert error.error_code == "INSTRUCTIONS_TOO_LONG"
    assert error.context == {"length": 100, "max_chars": 99}


def _with_ids(count: int, length: int) -> list[EssayInput]:
    return [EssayInput(f"{i:05d}".ljust(length, "x"), None, "text") for i in range(count)]


def test_ids_whose_completed_event_the_broker_would_refuse_are_rejected_before_any_call() -> None:
    error = _rejected(
        lambda: check_outcome_fits(
            "bos-1", _with_ids(2000, 255), max_count=20_000, max_bytes=1_048_576
        )
    )
    assert error.error_code == "ESSAY_IDS_TOO_LONG"
    assert error.context["bound_bytes"] > error.context["max_bytes"] == 1_048_576
    assert "CJ_KAFKA_MAX_MESSAGE_BYTES" in error.message


def test_the_largest_assessment_with_uuid_long_ids_fits_the_default_message_size() -> None:
    check_outcome_fits("bos-1", _with_ids(2000, 36), max_count=20_000, max_bytes=1_048_576)


@pytest.mark.parametrize("essay_id", ["e1", "x" * 255, '"\\\\' * 60, "\u00e9\u4e2d" * 100])
def test_an_essay_costs_the_completed_event_no_more_than_the_bound_allows(essay_id: str) -> None:
    entry = RankingEntry(
        els_essay_id=essay_id,
        rank=1,
        score=-1.2345678901234567e-300,
        standard_error=1.2345678901234567e300,
        comparison_count=20_000,
        wins=20_000,
        losses=20_000,
    )
    listed = json.dumps(essay_id, ensure_ascii=False) + ","
    used = len(entry.model_dump_json().encode()) + 1 + len(listed.encode())
    allowed = outcome_bytes_bound("b", [essay_id], 20_000) - outcome_bytes_bound("b", [], 20_000)
    assert used <= allowed
