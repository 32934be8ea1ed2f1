"""PostgreSQL schema (SQLAlchemy 2 declarative). Alembic's migration creates exactly this."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED")


class Base(DeclarativeBase):
    pass


class CJBatchUpload(Base):
    """One assessment request."""

    __tablename__ = "cj_batch_uploads"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    bos_batch_id: Mapped[str] = mapped_column(String(255), unique=True, nullable=False)
    event_correlation_id: Mapped[str] = mapped_column(String(255), nullable=False)
    language: Mapped[str | None] = mapped_column(String(32))
    course_code: Mapped[str | None] = mapped_column(String(64))
    essay_instructions: Mapped[str | None] = mapped_column(Text)
    assignment_id: Mapped[str | None] = mapped_column(String(255))
    user_id: Mapped[str | None] = mapped_column(String(255))
    org_id: Mapped[str | None] = mapped_column(String(255))
    llm_config_overrides: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    expected_essay_count: Mapped[int] = mapped_column(Integer, nullable=False)
    status: Mapped[str] = mapped_column(String(32), nullable=False)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When retention erased the texts of this finished assessment (migration 0010).
    texts_erased_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index(
            "ix_cj_batch_uploads_texts_due",
            "completed_at",
            postgresql_where=text("completed_at IS NOT NULL AND texts_erased_at IS NULL"),
        ),
    )


class CJProcessedEssay(Base):
    """An essay within one assessment; the same essay id may recur in other assessments."""

    __tablename__ = "cj_processed_essays"

    cj_batch_id: Mapped[int] = mapped_column(
        ForeignKey("cj_batch_uploads.id", ondelete="CASCADE"), primary_key=True
    )
    els_essay_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    text_storage_id: Mapped[str | None] = mapped_column(String(255))
    assessment_input_text: Mapped[str] = mapped_column(Text, nullable=False)
    current_bt_score: Mapped[float | None] = mapped_column(Float)
    current_bt_se: Mapped[float | None] = mapped_column(Float)
    comparison_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    wins: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    losses: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    rank: Mapped[int | None] = mapped_column(Integer)


class CJComparisonPair(Base):
    """One attempt at one comparison; retries are new rows sharing `comparison_id`."""

    __tablename__ = "cj_comparison_pairs"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    cj_batch_id: Mapped[int] = mapped_column(
        ForeignKey("cj_batch_uploads.id", ondelete="CASCADE"), nullable=False
    )
    comparison_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    request_correlation_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), unique=True, nullable=False
    )
    # The event id of the attempt's request in the outbox (migration 0007): its wait for an
    # answer counts from that row's publication.
    request_event_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    essay_a_els_id: Mapped[str] = mapped_column(String(255), nullable=False)
    essay_b_els_id: Mapped[str] = mapped_column(String(255), nullable=False)
    iteration: Mapped[int] = mapped_column(Integer, nullable=False)
    attempt: Mapped[int] = mapped_column(Integer, nullable=False)
    submission_batch_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    winner: Mapped[str | None] = mapped_column(String(16))  # essay_a | essay_b | error
    confidence: Mapped[float | None] = mapped_column(Float)
    justification: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_details: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    provider: Mapped[str | None] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(128))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    total_tokens: Mapped[int | None] = mapped_column(Integer)
    cost_estimate: Mapped[float | None] = mapped_column(Float)
    response_time_ms: Mapped[int | None] = mapped_column(Integer)
    is_late: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )

    __table_args__ = (
        Index("ix_cj_comparison_pairs_batch_status", "cj_batch_id", "status"),
        Index("ix_cj_comparison_pairs_comparison", "comparison_id"),
        Index(
            "ix_cj_comparison_pairs_in_flight",
            "submitted_at",
            postgresql_where=text("status = 'in_flight'"),
        ),
    )


class CJBatchState(Base):
    """The workflow state of one assessment; every change happens under its row lock."""

    __tablename__ = "cj_batch_states"

    cj_batch_id: Mapped[int] = mapped_column(
        ForeignKey("cj_batch_uploads.id", ondelete="CASCADE"), primary_key=True
    )
    state: Mapped[str] = mapped_column(String(32), nullable=False)
    total_comparisons: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    submitted_comparisons: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    completed_comparisons: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    failed_comparisons: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    current_iteration: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    batch_config: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    processing_metadata: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    last_activity_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)

    __table_args__ = (
        Index(
            "ix_cj_batch_states_active",
            "last_activity_at",
            postgresql_where=text("state NOT IN ('COMPLETED', 'FAILED', 'CANCELLED')"),
        ),
    )


class OutboxMessage(Base):
    """Events written in the handling transaction, published by the relay afterwards."""

    __tablename__ = "cj_event_outbox"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    event_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), unique=True, nullable=False)
    topic: Mapped[str] = mapped_column(String(255), nullable=False)
    # Text (migration 0005): a failed event answers even an identity too long to store.
    message_key: Mapped[str | None] = mapped_column(Text)
    # Stored EXTERNAL (out of line, uncompressed; migration 0002): written once, read once.
    payload: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Why the relay set the row aside unpublished (too large for the broker); kept, never sent.
    undeliverable: Mapped[str | None] = mapped_column(String(255))

    __table_args__ = (
        # The relay's claim: pending rows only (migration 0004).
        Index(
            "ix_cj_event_outbox_pending",
            "id",
            postgresql_where=text("published_at IS NULL AND undeliverable IS NULL"),
        ),
        # Pruning: published rows past their retention (migration 0006). A B-tree, not BRIN:
        # once pruning frees space, new rows land among old ones and BRIN ranges stop
        # narrowing anything.
        Index(
            "ix_cj_event_outbox_published_created",
            "created_at",
            postgresql_where=text("published_at IS NOT NULL"),
        ),
    )


class InboxRecord(Base):
    """Consumed events already handled: a redelivered event id changes nothing."""

    __tablename__ = "cj_event_inbox"

    event_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    topic: Mapped[str] = mapped_column(String(255), nullable=False)
    partition: Mapped[int] = mapped_column(Integer, nullable=False)
    offset: Mapped[int] = mapped_column(BigInteger, nullable=False)
    outcome: Mapped[str] = mapped_column(String(32), nullable=False)
    handled_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )

    __table_args__ = (
        Index("ix_cj_event_inbox_handled_at", "handled_at"),  # pruning (migration 0006)
    )


class UnmatchedResult(Base):
    """Comparison results that match no comparison we sent, kept with their raw payload."""

    __tablename__ = "cj_unmatched_results"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    correlation_id: Mapped[str] = mapped_column(String(255), nullable=False)
    reason: Mapped[str] = mapped_column(String(32), nullable=False)
    payload: Mapped[str] = mapped_column(Text, nullable=False)
    received_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )

    __table_args__ = (
        Index("ix_cj_unmatched_results_received_at", "received_at"),  # pruning (migration 0009)
    )


class ResultWatermark(Base):
    """Per partition of the result topic, the moment up to which every result on it has been
    handled (migration 0008); the monitor's clock for timing attempts out."""

    __tablename__ = "cj_result_watermarks"

    topic: Mapped[str] = mapped_column(String(255), primary_key=True)
    partition: Mapped[int] = mapped_column(Integer, primary_key=True)
    handled_through: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    noted_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
