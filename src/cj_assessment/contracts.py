"""The wire contract (CONTRACT.md §3-§8) as pydantic models: one model per message.

Consumed models accept unknown fields (the platform adds fields over time); emitted models
are built by this service and serialised with every field the contract shows.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

SOURCE_SERVICE = "cj_assessment_service"
# Ids are stored in varchar(255) columns: longer ones are refused when a message is read, with
# the field named, rather than by the database in the middle of a transaction.
MAX_ID_CHARS = 255
# A request whose identity is longer than the columns hold is still answered with a failed
# event (nothing stored but that event), up to this length; longer, it is dead-lettered: four
# copies in the event must stay far below the broker's message limit.
MAX_ANSWERED_ID_CHARS = 4096
EVENT_NAMESPACE = uuid.UUID("5b0f4a8e-2f65-4c8e-9d6a-0c3e7a1b9f21")


def unstorable(text: str) -> str | None:
    """Why PostgreSQL cannot store `text`, or None if it can: it refuses NUL characters, and
    an unpaired surrogate (JSON allows one as an escape) has no UTF-8 encoding."""
    if "\x00" in text:
        return "contains NUL characters"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "contains an unpaired surrogate"
    return None


def storable(text: str) -> str:
    """`text` as PostgreSQL can store it: NUL characters removed, unpaired surrogates replaced
    (for what a provider writes, which is kept rather than refused)."""
    if "\x00" in text:
        text = text.replace("\x00", "")
    if unstorable(text) is not None:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def deterministic_event_id(*parts: str) -> uuid.UUID:
    """uuid5 of what the event is, so that a re-publish carries the same id."""
    return uuid.uuid5(EVENT_NAMESPACE, "|".join(parts))


def deterministic_event_ids(prefix: str, names: Iterable[str]) -> list[uuid.UUID]:
    """`deterministic_event_id(prefix, name)` for each name, hashing the shared part once: an
    iteration of 2,000 essays names 5,000 requests, in the event loop."""
    shared = hashlib.sha1(EVENT_NAMESPACE.bytes + f"{prefix}|".encode(), usedforsecurity=False)
    ids = []
    for name in names:
        digest = shared.copy()
        digest.update(name.encode())
        ids.append(uuid.UUID(bytes=digest.digest()[:16], version=5))
    return ids


def random_ids(count: int) -> list[uuid.UUID]:
    """`count` times `uuid.uuid4()`, from one read of the system's randomness."""
    raw = os.urandom(16 * count)
    return [uuid.UUID(bytes=raw[i : i + 16], version=4) for i in range(0, 16 * count, 16)]


def utc_iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


class _Accept(BaseModel):
    """Base of consumed messages: tolerant, unknown fields ignored."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class _Emit(BaseModel):
    """Base of emitted messages: exactly the fields the contract shows."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# --- §3 envelope -----------------------------------------------------------------------------


def _as_text(value: Any) -> Any:
    return value if value is None or isinstance(value, str) else str(value)


# Producers send ids as strings, numbers or UUIDs; they are kept as text. A field validator,
# not a model one: a model "before" validator makes pydantic build the whole JSON document as
# Python objects first, which doubled the cost of parsing a result on the consumer's hot path.
_Id = Annotated[str, BeforeValidator(_as_text), StringConstraints(max_length=MAX_ID_CHARS)]
_Text = Annotated[str, StringConstraints(max_length=MAX_ID_CHARS)]


class EventEnvelope(_Accept):
    event_id: _Id = Field(description="Unique id of this event; deterministic for emitted events")
    event_type: str = Field(description="Topic name (any string accepted)")
    event_timestamp: str | datetime | None = Field(None, description="When the event was made")
    source_service: str | None = Field(None, description="Producing service")
    schema_version: int = Field(1, description="Envelope schema version")
    correlation_id: _Id | None = Field(None, description="Correlates everything of one request")
    data_schema_uri: str | None = Field(None, description="Optional schema URI of `data`")
    data: dict[str, Any] = Field(description="The event payload")
    metadata: dict[str, Any] | None = Field(default=None, description="Optional metadata")


def envelope_json(
    *,
    event_id: uuid.UUID,
    event_type: str,
    correlation_id: str,
    data: BaseModel,
    now: datetime,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The exact envelope this service emits (CONTRACT §3)."""
    return {
        **_envelope_head(event_id, event_type, correlation_id, now),
        "data": data.model_dump(mode="json"),
        "metadata": metadata or {},
    }


def _envelope_head(
    event_id: uuid.UUID, event_type: str, correlation_id: str, now: datetime
) -> dict[str, Any]:
    """The envelope's fields before `data` and `metadata`, in the contract's order."""
    return {
        "event_id": str(event_id),
        "event_type": event_type,
        "event_timestamp": utc_iso(now),
        "source_service": SOURCE_SERVICE,
        "schema_version": 1,
        "correlation_id": correlation_id,
        "data_schema_uri": None,
    }


def envelope_text(
    *,
    event_id: uuid.UUID,
    event_type: str,
    correlation_id: str,
    data: BaseModel,
    now: datetime,
) -> str:
    """`envelope_json` already serialised (compact, UTF-8 kept): the payload is serialised by
    pydantic directly, at a third of the cost of building it as a dict and dumping that, which
    counts when an iteration publishes hundreds of prompts."""
    head = json.dumps(
        _envelope_head(event_id, event_type, correlation_id, now),
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return f'{head[:-1]},"data":{data.model_dump_json()},"metadata":{{}}}}'


# --- shared pieces ---------------------------------------------------------------------------


class EntityRef(_Accept):
    entity_id: _Text = Field(description="The batch id of the pipeline (bos_batch_id)")
    entity_type: str = Field("batch", description="Entity kind")
    parent_id: str | None = Field(None, description="Parent entity, if any")


class LLMConfigOverrides(_Accept):
    model_override: _Text | None = Field(None, description="Model to use instead of the default")
    temperature_override: float | None = Field(
        None, ge=0.0, le=2.0, description="Sampling temperature (0-2)"
    )
    max_tokens_override: int | None = Field(None, ge=1, description="Answer token limit (>= 1)")
    provider_override: _Text | None = Field(None, description="Provider to use")


class BatchConfigOverrides(_Accept):
    """Per-request overrides; ranges are checked by `batch_config.resolve_batch_config`."""

    batch_size: int | None = Field(None, description="Comparisons per submission batch (10-200)")
    max_concurrent_batches: int | None = Field(None, description="Batches in flight (1-5)")
    partial_completion_threshold: float | None = Field(
        None, description="Resolved share that completes an iteration (0.5-1.0)"
    )
    enable_stability_checking: bool | None = Field(None, description="Stop early when stable")
    stability_threshold: float | None = Field(None, description="Stable score change (> 0)")
    max_comparisons: int | None = Field(None, description="Cap on total comparisons (>= 1)")


# --- §4 assessment request (consumed) --------------------------------------------------------


class EssayForCJ(_Accept):
    essay_id: _Text = Field(description="The pipeline's essay id (els_essay_id)")
    text_storage_id: _Text | None = Field(None, description="Content Service id of the text")
    text: str | None = Field(None, description="Inline essay text; wins over text_storage_id")


class ELSCJAssessmentRequestV1(_Accept):
    event_name: str | None = Field(None, description="els.cj_assessment.requested")
    entity_ref: EntityRef | None = Field(None, description="Older producers: the batch reference")
    entity_id: _Text | None = Field(None, description="Newer producers: flat batch id")
    entity_type: str | None = Field(None, description="Newer producers: flat entity type")
    parent_id: str | None = Field(None, description="Newer producers: flat parent id")
    timestamp: str | datetime | None = Field(None, description="When the request was made")
    system_metadata: dict[str, Any] | None = Field(None, description="Pipeline bookkeeping")
    essays_for_cj: list[EssayForCJ] = Field(description="The essays to rank")
    language: Annotated[str, StringConstraints(max_length=32)] | None = Field(
        None, description="Language of the essays (at most 32 characters)"
    )
    course_code: Annotated[str, StringConstraints(max_length=64)] | None = Field(
        None, description="Course code (at most 64 characters)"
    )
    essay_instructions: str | None = Field(None, description="The task the essays answer")
    llm_config_overrides: LLMConfigOverrides | None = Field(None, description="LLM settings")
    batch_config_overrides: dict[str, Any] | None = Field(
        None, description="Batch overrides; checked against allowed ranges"
    )
    assignment_id: _Text | None = Field(None, description="Assignment id")
    user_id: _Text | None = Field(None, description="Requesting user")
    org_id: _Text | None = Field(None, description="Organisation")

    @property
    def bos_batch_id(self) -> str | None:
        """`entity_ref.entity_id`, else the flat `entity_id` (an empty one counts as absent,
        as in `bos_batch_id_of`)."""
        if self.entity_ref is not None and self.entity_ref.entity_id:
            return self.entity_ref.entity_id
        return self.entity_id


def bos_batch_id_of(data: dict[str, Any]) -> str | None:
    """The identity of a request payload that may not validate, read as `bos_batch_id` reads
    a valid one (`entity_ref.entity_id`, else the flat `entity_id`): with it, an invalid
    request is answered by a failed event. None when no usable identity is there (missing,
    empty, not text, longer than `MAX_ANSWERED_ID_CHARS`, or `unstorable`). It may be longer
    than the `MAX_ID_CHARS` that can be stored."""
    ref = data.get("entity_ref")
    for candidate in (
        ref.get("entity_id") if isinstance(ref, dict) else None,
        data.get("entity_id"),
    ):
        if isinstance(candidate, str) and candidate:
            # Too long or unstorable is no identity at all: falling through to the flat id
            # could answer a different batch.
            usable = len(candidate) <= MAX_ANSWERED_ID_CHARS and unstorable(candidate) is None
            return candidate if usable else None
    return None


# --- §5 comparison request (emitted) ---------------------------------------------------------


class ComparisonRequestMetadata(_Emit):
    essay_a_id: str = Field(description="Essay shown as 'Essay A'")
    essay_b_id: str = Field(description="Essay shown as 'Essay B'")
    bos_batch_id: str = Field(description="The assessment's batch id")
    cj_batch_id: str = Field(description="This service's assessment id")
    submission_batch_id: str = Field(description="Shared by all comparisons of one batch")
    comparison_iteration: int = Field(description="Iteration the pair was planned in")
    attempt: int = Field(description="1 for the first attempt, +1 per retry")
    cj_request_type: Literal["cj_comparison", "cj_retry"] = Field(description="First or retry")


class LLMComparisonRequestV1(_Emit):
    correlation_id: str = Field(description="Unique per comparison attempt; echoed in the result")
    user_prompt: str = Field(description="Full prompt holding Essay A and Essay B")
    callback_topic: str = Field(description="Topic the provider answers on")
    llm_config_overrides: LLMConfigOverrides = Field(description="LLM settings for this call")
    user_id: str | None = Field(None, description="Requesting user")
    metadata: ComparisonRequestMetadata = Field(description="Which comparison this is")


# --- §6 comparison result (consumed) ---------------------------------------------------------


class TokenUsage(_Accept):
    prompt_tokens: int = Field(0, description="Prompt tokens")
    completion_tokens: int = Field(0, description="Completion tokens")
    total_tokens: int = Field(0, description="All tokens")


class ErrorDetail(_Accept):
    error_code: str = Field(description="Machine-readable error code")
    message: str = Field("", description="Human-readable message")
    correlation_id: str | None = Field(None, description="The request's correlation id")
    timestamp: str | datetime | None = Field(None, description="When it failed")
    service: str | None = Field(None, description="Service that failed")
    operation: str | None = Field(None, description="Operation that failed")
    details: dict[str, Any] | None = Field(None, description="Extra details")


def _confidence_or_none(value: Any) -> float | None:
    """The provider's confidence, if it is a number within 1-5. Anything else is dropped rather
    than refused: the verdict it came with is a paid answer and still counts. (A number too
    long for the JSON parser itself, thousands of digits, still makes the result unreadable.)"""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond any float
        return None
    return number if 1.0 <= number <= 5.0 else None  # NaN fails both comparisons


class LLMComparisonResultV1(_Accept):
    request_id: str | None = Field(None, description="Provider queue id (never used to match)")
    correlation_id: _Text = Field(description="The request's correlation_id")
    winner: Literal["Essay A", "Essay B"] | None = Field(None, description="Verdict on success")
    justification: str | None = Field(None, description="Short reason (<= 500 chars)")
    confidence: Annotated[float | None, BeforeValidator(_confidence_or_none)] = Field(
        None, description="Confidence 1-5; dropped (None) when outside it or not a number"
    )
    error_detail: ErrorDetail | None = Field(None, description="Set on error, exclusive of winner")
    provider: str | None = Field(None, description="Provider that answered")
    model: str | None = Field(None, description="Model that answered")
    response_time_ms: int | None = Field(None, description="Provider latency")
    token_usage: TokenUsage | None = Field(None, description="Tokens used")
    cost_estimate: float | None = Field(None, description="Estimated cost")
    requested_at: str | datetime | None = Field(None, description="When requested")
    completed_at: str | datetime | None = Field(None, description="When answered")
    trace_id: str | None = Field(None, description="Trace id")
    request_metadata: dict[str, Any] | None = Field(None, description="Echo of request metadata")

    @model_validator(mode="after")
    def _success_xor_error(self) -> LLMComparisonResultV1:
        if (self.winner is None) == (self.error_detail is None):
            raise ValueError("exactly one of winner and error_detail must be set")
        return self


def _result_event_id(value: Any) -> str | None:
    """A result's event id as text when it is text or a number; None otherwise (missing,
    null, a boolean), for the consumer to replace: the answer it carries is paid for."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


class ComparisonResultEnvelope(EventEnvelope):
    """A result's envelope validated together with its payload, straight from the bytes:
    the consumer's hot path parses each result once. Its event id is taken as it comes, any
    length or none at all; the consumer keys the inbox on a stand-in when it cannot use it."""

    event_id: Annotated[str | None, BeforeValidator(_result_event_id)] = Field(  # type: ignore[assignment]
        None, description="Unique id of this event (replaced by a stand-in when unusable)"
    )
    event_type: str | None = Field(  # type: ignore[assignment]
        None, description="Topic name (any string accepted; the topic says what it is)"
    )

    data: LLMComparisonResultV1 = Field(description="The comparison result")  # type: ignore[assignment]


# --- §7/§8 completed and failed (emitted) ----------------------------------------------------


class EmittedEntityRef(_Emit):
    entity_id: str = Field(description="The pipeline's batch id (bos_batch_id)")
    entity_type: str = Field("batch", description="Entity kind: always 'batch'")
    parent_id: str | None = Field(None, description="Parent entity: none")


class SystemMetadata(_Emit):
    entity: dict[str, Any] = Field(description="{entity_id, entity_type}")
    entity_id: str = Field(description="The pipeline's batch id (bos_batch_id)")
    entity_type: str = Field("batch", description="Entity kind: always 'batch'")
    processing_stage: Literal["completed", "failed"] = Field(description="How it ended")
    event: str = Field(description="The event name: cj_assessment.completed or .failed")
    started_at: str | None = Field(None, description="When the assessment started (UTC, ISO)")
    completed_at: str | None = Field(None, description="When it ended (UTC, ISO)")
    error_info: dict[str, Any] = Field(
        default_factory=dict,
        description="Failed: {error_code, error_message, error_type, context}; else empty",
    )


class RankingEntry(_Emit):
    els_essay_id: str = Field(description="Essay id")
    rank: int = Field(description="1 = best")
    score: float = Field(description="Bradley-Terry ability, mean-centred")
    standard_error: float = Field(description="Standard error of the score")
    comparison_count: int = Field(description="Successful comparisons the essay took part in")
    wins: int = Field(description="Comparisons won")
    losses: int = Field(description="Comparisons lost")


class ProcessingSummary(_Emit):
    total_essays: int = Field(description="Essays in the assessment")
    successful: int = Field(description="Essays with at least one successful comparison")
    failed: int = Field(description="Essays without any successful comparison")
    successful_essay_ids: list[str] = Field(description="Ids of the successful essays")
    failed_essay_ids: list[str] = Field(description="Ids of the failed essays")
    processing_time_seconds: float = Field(description="From the request's arrival to now")
    comparisons_requested: int = Field(description="Comparison requests sent, retries included")
    comparisons_succeeded: int = Field(description="Comparisons answered with a winner")
    comparisons_failed: int = Field(description="Comparisons failed for good")
    rounds: int = Field(description="Iterations run")
    stop_reason: str = Field(
        description="stability, budget, reliability, precision or all_pairs_compared"
    )
    reliability: float | None = Field(
        description="Calibrated reliability: expected squared correlation of the scores with"
        " the essays' true quality (empirical Bayes, honest under adaptive pairing)"
    )
    reliability_lower_bound: float | None = Field(
        None, description="The reliability at the lower end of a one-sided 95% interval"
    )
    comparison_attempts: int | None = Field(
        None, description="LLM calls made: first attempts and retries"
    )
    comparisons_outstanding: int | None = Field(
        None, description="Requested, neither succeeded nor failed when the assessment ended"
    )
    pool_statistics: dict[str, int] | None = Field(
        None,
        description="The failed-comparison pool: total_failed, retry_batches_sent,"
        " successful_retries, permanently_failed, unretried_over_budget",
    )
    scale_separation_reliability: float | None = Field(
        None, description="Raw Scale Separation Reliability (inflated by adaptive pairing)"
    )
    position_bias: dict[str, float] | None = Field(
        None,
        description="The judge's first-position advantage: a_win_share, logit, standard_error",
    )
    pairing_strategy: str | None = Field(None, description="random or adaptive")


class _AssessmentOutcome(_Emit):
    event_name: str = Field(description="cj_assessment.completed or cj_assessment.failed")
    entity_ref: EmittedEntityRef = Field(description="The batch, in the nested shape")
    entity_id: str = Field(description="The batch id, in the flat shape")
    entity_type: str = Field("batch", description="Entity kind: always 'batch'")
    parent_id: str | None = Field(None, description="Parent entity: none")
    timestamp: str = Field(description="When the assessment ended (UTC, ISO)")
    status: str = Field(description="completed_successfully or failed_critically")
    system_metadata: SystemMetadata = Field(description="Stage, times and error info")
    cj_assessment_job_id: str = Field(description="This service's assessment id")


class CJAssessmentCompletedV1(_AssessmentOutcome):
    event_name: Literal["cj_assessment.completed"] = Field(
        "cj_assessment.completed", description="The event name"
    )
    status: Literal["completed_successfully"] = Field(
        "completed_successfully", description="Always completed_successfully"
    )
    rankings: list[RankingEntry] = Field(description="Every essay, ordered by rank (1 = best)")
    processing_summary: ProcessingSummary = Field(description="Figures of the whole run")


class CJAssessmentFailedV1(_AssessmentOutcome):
    event_name: Literal["cj_assessment.failed"] = Field(
        "cj_assessment.failed", description="The event name"
    )
    status: Literal["failed_critically"] = Field(
        "failed_critically", description="Always failed_critically"
    )


def outcome_header(
    *,
    bos_batch_id: str,
    stage: Literal["completed", "failed"],
    started_at: datetime | None,
    finished_at: datetime,
    error_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Header fields shared by the completed and failed events, both entity shapes."""
    event = "cj_assessment.completed" if stage == "completed" else "cj_assessment.failed"
    return {
        "entity_ref": EmittedEntityRef(entity_id=bos_batch_id),
        "entity_id": bos_batch_id,
        "entity_type": "batch",
        "parent_id": None,
        "timestamp": utc_iso(finished_at),
        "system_metadata": SystemMetadata(
            entity={"entity_id": bos_batch_id, "entity_type": "batch"},
            entity_id=bos_batch_id,
            processing_stage=stage,
            event=event,
            started_at=utc_iso(started_at) if started_at else None,
            completed_at=utc_iso(finished_at),
            error_info=error_info or {},
        ),
    }
