"""Checks of an incoming assessment request that need no I/O."""

from __future__ import annotations

from dataclasses import dataclass

from cj_assessment.contracts import ELSCJAssessmentRequestV1
from cj_assessment.errors import RequestRejected


@dataclass(frozen=True)
class EssayInput:
    essay_id: str
    text_storage_id: str | None
    text: str | None


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
    if "\x00" in text:
        raise RequestRejected(
            "INVALID_ESSAY_TEXT",
            f"essay {essay_id!r} contains NUL characters",
            {"essay_id": essay_id},
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
