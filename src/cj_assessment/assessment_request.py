"""Checks of an incoming assessment request that need no I/O."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import ValidationError

from cj_assessment.contracts import ELSCJAssessmentRequestV1, RankingEntry, unstorable
from cj_assessment.errors import RequestRejected

INVALID_FIELDS_NAMED = 10


@dataclass(frozen=True)
class EssayInput:
    essay_id: str
    text_storage_id: str | None
    text: str | None


def invalid_request(headline: str, problems: list[tuple[str, str]]) -> RequestRejected:
    """`INVALID_REQUEST` naming each (field, what is wrong with it), the first ten in the
    message and up to fifty in `context.invalid_fields`; never a value."""
    named = [f"{field}: {why}" for field, why in problems]
    more = len(named) - INVALID_FIELDS_NAMED
    return RequestRejected(
        "INVALID_REQUEST",
        f"{headline}: "
        + "; ".join(named[:INVALID_FIELDS_NAMED])
        + (f"; and {more} more" if more > 0 else ""),
        {"invalid_fields": [field for field, _ in problems][:50]},
    )


def schema_rejection(exc: ValidationError) -> RequestRejected:
    """A request payload that does not match the contract's types, as a refusal naming each
    invalid field and what is wrong with it. Pydantic's messages name the expectation, not
    the value, so no essay text or id reaches the failed event or the logs."""
    errors = exc.errors(include_url=False, include_input=False)
    return invalid_request(
        "the request does not match ELS_CJAssessmentRequestV1",
        [(".".join(str(part) for part in e["loc"]) or "data", e["msg"]) for e in errors],
    )


def check_storable(request: ELSCJAssessmentRequestV1) -> None:
    """Refuse text the database cannot store (NUL characters, unpaired surrogates) in every
    stored field but the essays' text, which `check_essay_text` checks wherever it comes
    from. Refused here, the request gets its failed event; stored, it would fail its
    transaction again on every redelivery."""
    fields: list[tuple[str, str | None]] = [
        ("essay_instructions", request.essay_instructions),
        ("language", request.language),
        ("course_code", request.course_code),
        ("assignment_id", request.assignment_id),
        ("user_id", request.user_id),
        ("org_id", request.org_id),
    ]
    llm = request.llm_config_overrides
    if llm is not None:
        fields += [
            ("llm_config_overrides.model_override", llm.model_override),
            ("llm_config_overrides.provider_override", llm.provider_override),
        ]
    for i, essay in enumerate(request.essays_for_cj):
        fields += [
            (f"essays_for_cj.{i}.essay_id", essay.essay_id),
            (f"essays_for_cj.{i}.text_storage_id", essay.text_storage_id),
        ]
    invalid = [(name, why) for name, value in fields if value and (why := unstorable(value))]
    if invalid:
        raise invalid_request("the request holds text that cannot be stored", invalid)


def check_instructions(request: ELSCJAssessmentRequestV1, *, max_chars: int) -> None:
    length = len(request.essay_instructions or "")
    if length > max_chars:
        raise RequestRejected(
            "INSTRUCTIONS_TOO_LONG",
            f"essay_instructions has {length} characters; the limit is {max_chars}",
            {"length": length, "max_chars": max_chars},
        )


def check_essay_list(request: ELSCJAssessmentRequestV1, *, max_essays: int) -> list[EssayInput]:
    essays = request.essays_for_cj
    if len(essays) < 2:
        raise RequestRejected(
            "TOO_FEW_ESSAYS",
            f"an assessment needs at least 2 essays, got {len(essays)}",
            {"essay_count": len(essays)},
        )
    if len(essays) > max_essays:
        raise RequestRejected(
            "TOO_MANY_ESSAYS",
            f"an assessment may hold at most {max_essays} essays, got {len(essays)}",
            {"essay_count": len(essays), "max_essays": max_essays},
        )
    seen: set[str] = set()
    duplicates: list[str] = []
    for essay in essays:
        if essay.essay_id in seen:
            duplicates.append(essay.essay_id)
        seen.add(essay.essay_id)
    if duplicates:
        raise RequestRejected(
            "DUPLICATE_ESSAY_IDS",
            f"essay ids must be unique; repeated: {sorted(set(duplicates))[:10]}",
            {"duplicate_essay_ids": sorted(set(duplicates))[:50]},
        )
    for essay in essays:
        if not essay.essay_id.strip():
            raise RequestRejected("INVALID_ESSAY_ID", "essay ids must not be empty", {})
        if essay.text is None and not essay.text_storage_id:
            raise RequestRejected(
                "MISSING_ESSAY_TEXT",
                f"essay {essay.essay_id!r} has neither text nor text_storage_id",
                {"essay_id": essay.essay_id},
            )
    return [EssayInput(e.essay_id, e.text_storage_id, e.text) for e in essays]


def check_essay_text(essay_id: str, text: str, *, max_chars: int) -> str:
    if why := unstorable(text):
        raise RequestRejected(
            "INVALID_ESSAY_TEXT", f"essay {essay_id!r} {why}", {"essay_id": essay_id}
        )
    if not text.strip():
        raise RequestRejected(
            "EMPTY_ESSAY_TEXT", f"essay {essay_id!r} has empty text", {"essay_id": essay_id}
        )
    if len(text) > max_chars:
        raise RequestRejected(
            "ESSAY_TOO_LONG",
            f"essay {essay_id!r} has {len(text)} characters; the limit is {max_chars}",
            {"essay_id": essay_id, "length": len(text), "max_chars": max_chars},
        )
    return text


# Bytes of the completed event that do not depend on the essays or the batch id: envelope,
# header, summary (position bias, pool statistics and the like) and the record's headers.
# The largest seen is under 3 KB; the rest is margin.
OUTCOME_FIXED_BYTES = 16_384


def _ranking_entry_bytes(essays: int, max_count: int) -> int:
    """The longest ranking entry of an empty essay id, plus its list's punctuation: rank and
    counts at their largest, scores and standard errors in the longest float repr."""
    worst = RankingEntry(
        els_essay_id="",
        rank=essays,
        score=-1.2345678901234567e-300,
        standard_error=-1.2345678901234567e-300,
        comparison_count=max_count,
        wins=max_count,
        losses=max_count,
    )
    return len(worst.model_dump_json()) + 1


def outcome_bytes_bound(bos_batch_id: str, essay_ids: Sequence[str], max_count: int) -> int:
    """An upper bound of the completed event's size in bytes, as the relay will send it. Each
    essay id appears twice (its ranking entry, and an essay id list, where it takes its
    quotes and a comma); the batch id five times (both entity shapes, the system metadata's
    two, and the record's key). `max_count` bounds an essay's comparison count (the budget)."""
    ids = sum(len(json.dumps(e, ensure_ascii=False).encode()) for e in essay_ids)
    identity = len(json.dumps(bos_batch_id, ensure_ascii=False).encode())
    per_essay = _ranking_entry_bytes(len(essay_ids), max_count) + 1
    return OUTCOME_FIXED_BYTES + 5 * identity + 2 * ids + per_essay * len(essay_ids)


def check_outcome_fits(
    bos_batch_id: str, essays: Sequence[EssayInput], *, max_count: int, max_bytes: int
) -> None:
    """Refuse, before a single comparison is paid for, a request whose completed event the
    broker would not take: it lists every essay id twice, so 2,000 ids of 255 characters make
    about 1.2 MB against Kafka's default 1 MB."""
    bound = outcome_bytes_bound(bos_batch_id, [e.essay_id for e in essays], max_count)
    if bound > max_bytes:
        raise RequestRejected(
            "ESSAY_IDS_TOO_LONG",
            f"with {len(essays)} essays and these essay ids the completed event could reach"
            f" {bound} bytes; the broker takes at most {max_bytes} (CJ_KAFKA_MAX_MESSAGE_BYTES):"
            " use shorter essay ids or fewer essays",
            {"essay_count": len(essays), "bound_bytes": bound, "max_bytes": max_bytes},
        )
