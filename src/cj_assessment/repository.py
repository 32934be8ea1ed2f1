"""Reads and writes of one handling transaction. Every method runs on the caller's session;
the caller owns the transaction (`async with session.begin()`)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from cj_assessment.batch_state import AttemptStatus, Progress
from cj_assessment.tables import (
    TERMINAL_STATES,
    CJBatchState,
    CJBatchUpload,
    CJComparisonPair,
    CJProcessedEssay,
    InboxRecord,
    OutboxMessage,
    UnmatchedResult,
)


@dataclass(frozen=True)
class NewAttempt:
    comparison_id: uuid.UUID
    correlation_id: uuid.UUID
    essay_a_id: str
    essay_b_id: str
    iteration: int
    attempt: int
    submission_batch_id: uuid.UUID


@dataclass(frozen=True)
class InboxEntry:
    event_id: str
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class OutboxRow:
    event_id: uuid.UUID
    topic: str
    key: str | None
    payload: str

    @classmethod
    def of(cls, envelope: dict[str, Any], topic: str, key: str | None) -> OutboxRow:
        payload = json.dumps(envelope, separators=(",", ":"), ensure_ascii=False)
        return cls(uuid.UUID(envelope["event_id"]), topic, key, payload)


class AssessmentRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    # --- inbox / outbox -------------------------------------------------------------------

    async def claim_inbox(self, entries: Sequence[InboxEntry]) -> set[str]:
        """Record consumed event ids; returns those not handled before (first occurrence)."""
        if not entries:
            return set()
        # One cached statement run as executemany: no per-poll compilation of a VALUES list.
        stmt = (
            insert(InboxRecord)
            .on_conflict_do_nothing(index_elements=[InboxRecord.event_id])
            .returning(InboxRecord.event_id)
        )
        rows = [
            {
                "event_id": e.event_id,
                "topic": e.topic,
                "partition": e.partition,
                "offset": e.offset,
                "outcome": "handled",
            }
            for e in entries
        ]
        return set((await self.session.execute(stmt, rows)).scalars())

    async def set_inbox_outcomes(self, outcomes: dict[str, str]) -> None:
        if not outcomes:
            return
        await self.session.execute(
            text(
                "UPDATE cj_event_inbox AS i SET outcome = v.outcome"
                " FROM unnest(CAST(:ids AS text[]), CAST(:outcomes AS text[]))"
                " AS v(event_id, outcome) WHERE i.event_id = v.event_id"
            ),
            {"ids": list(outcomes), "outcomes": list(outcomes.values())},
        )

    async def add_outbox(self, rows: Sequence[OutboxRow]) -> None:
        if not rows:
            return
        stmt = insert(OutboxMessage).on_conflict_do_nothing(index_elements=["event_id"])
        await self.session.execute(
            stmt,
            [
                {
                    "event_id": r.event_id,
                    "topic": r.topic,
                    "message_key": r.key,
                    "payload": r.payload,
                }
                for r in rows
            ],
        )

    # --- uploads and essays ---------------------------------------------------------------

    async def upload_exists(self, bos_batch_id: str) -> bool:
        stmt = select(CJBatchUpload.id).where(CJBatchUpload.bos_batch_id == bos_batch_id)
        return (await self.session.execute(stmt)).first() is not None

    async def create_upload(self, **values: Any) -> int | None:
        """The new assessment's id, or None when the bos_batch_id is already known."""
        stmt = (
            insert(CJBatchUpload)
            .values(**values)
            .on_conflict_do_nothing(index_elements=[CJBatchUpload.bos_batch_id])
            .returning(CJBatchUpload.id)
        )
        return (await self.session.execute(stmt)).scalar_one_or_none()

    async def uploads(self, cj_batch_ids: Sequence[int]) -> dict[int, CJBatchUpload]:
        stmt = select(CJBatchUpload).where(CJBatchUpload.id.in_(list(cj_batch_ids)))
        return {u.id: u for u in (await self.session.execute(stmt)).scalars()}

    async def upload(self, cj_batch_id: int) -> CJBatchUpload:
        return (
            await self.session.execute(select(CJBatchUpload).where(CJBatchUpload.id == cj_batch_id))
        ).scalar_one()

    async def finish_upload(
        self,
        cj_batch_id: int,
        *,
        status: str,
        now: datetime,
        error_code: str | None = None,
        error_message: str | None = None,
    ) -> None:
        await self.session.execute(
            update(CJBatchUpload)
            .where(CJBatchUpload.id == cj_batch_id)
            .values(
                status=status, completed_at=now, error_code=error_code, error_message=error_message
            )
        )

    async def add_essays(
        self, cj_batch_id: int, essays: Iterable[tuple[str, str | None, str]]
    ) -> None:
        rows = [
            {
                "cj_batch_id": cj_batch_id,
                "els_essay_id": essay_id,
                "text_storage_id": storage_id,
                "assessment_input_text": body,
                "comparison_count": 0,
                "wins": 0,
                "losses": 0,
            }
            for essay_id, storage_id, body in essays
        ]
        await self.session.execute(insert(CJProcessedEssay), rows)

    async def essay_ids(self, cj_batch_id: int) -> list[str]:
        stmt = (
            select(CJProcessedEssay.els_essay_id)
            .where(CJProcessedEssay.cj_batch_id == cj_batch_id)
            .order_by(CJProcessedEssay.els_essay_id)
        )
        return list((await self.session.execute(stmt)).scalars())

    async def essay_texts(self, cj_batch_id: int, essay_ids: Iterable[str]) -> dict[str, str]:
        stmt = select(CJProcessedEssay.els_essay_id, CJProcessedEssay.assessment_input_text).where(
            CJProcessedEssay.cj_batch_id == cj_batch_id,
            CJProcessedEssay.els_essay_id.in_(list(set(essay_ids))),
        )
        return {row[0]: row[1] for row in (await self.session.execute(stmt)).all()}

    async def store_scores(self, cj_batch_id: int, rows: list[dict[str, Any]]) -> None:
        """rows: els_essay_id, score, standard_error, comparison_count, wins, losses, rank."""
        if not rows:
            return
        await self.session.execute(
            text(
                "UPDATE cj_processed_essays AS e SET current_bt_score = v.score,"
                " current_bt_se = v.se, comparison_count = v.cnt, wins = v.wins,"
                " losses = v.losses, rank = v.rank"
                " FROM unnest(CAST(:ids AS text[]), CAST(:scores AS float8[]),"
                " CAST(:ses AS float8[]), CAST(:cnts AS int[]), CAST(:wins AS int[]),"
                " CAST(:losses AS int[]), CAST(:ranks AS int[]))"
                " AS v(id, score, se, cnt, wins, losses, rank)"
                " WHERE e.cj_batch_id = :batch AND e.els_essay_id = v.id"
            ),
            {
                "batch": cj_batch_id,
                "ids": [r["els_essay_id"] for r in rows],
                "scores": [r["score"] for r in rows],
                "ses": [r["standard_error"] for r in rows],
                "cnts": [r["comparison_count"] for r in rows],
                "wins": [r["wins"] for r in rows],
                "losses": [r["losses"] for r in rows],
                "ranks": [r["rank"] for r in rows],
            },
        )

    # --- state ----------------------------------------------------------------------------

    async def create_state(
        self, cj_batch_id: int, *, config: dict[str, Any], now: datetime
    ) -> None:
        self.session.add(
            CJBatchState(
                cj_batch_id=cj_batch_id,
                state="INITIALIZING",
                batch_config=config,
                processing_metadata={},
                started_at=now,
                last_activity_at=now,
            )
        )
        await self.session.flush()

    async def lock_state(
        self, cj_batch_id: int, *, skip_locked: bool = False
    ) -> CJBatchState | None:
        stmt = (
            select(CJBatchState)
            .where(CJBatchState.cj_batch_id == cj_batch_id)
            .with_for_update(skip_locked=skip_locked)
            .execution_options(populate_existing=True)
        )
        return (await self.session.execute(stmt)).scalar_one_or_none()

    async def lock_states(self, cj_batch_ids: Sequence[int]) -> dict[int, CJBatchState]:
        """Lock several assessments' state rows, always in id order so that concurrent
        handlers cannot deadlock."""
        stmt = (
            select(CJBatchState)
            .where(CJBatchState.cj_batch_id.in_(sorted(set(cj_batch_ids))))
            .order_by(CJBatchState.cj_batch_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        return {s.cj_batch_id: s for s in (await self.session.execute(stmt)).scalars()}

    async def save_progress(
        self, row: CJBatchState, progress: Progress, *, state: str, now: datetime
    ) -> None:
        """Write the progress under the row lock the caller holds; terminal states never move."""
        if row.state in TERMINAL_STATES and state != row.state:
            raise RuntimeError(f"assessment {row.cj_batch_id} is {row.state}; refusing {state}")
        metadata = dict(row.processing_metadata or {})
        metadata.update(progress.metadata_json())
        row.state = state
        row.total_comparisons = progress.total
        row.submitted_comparisons = progress.submitted
        row.completed_comparisons = progress.completed
        row.failed_comparisons = progress.failed
        row.current_iteration = progress.current_iteration
        row.processing_metadata = metadata
        row.last_activity_at = now

    async def finish_state(self, cj_batch_id: int, *, state: str, now: datetime) -> bool:
        """Compare-and-set into a terminal state: True only for the one caller that wins."""
        result = await self.session.execute(
            update(CJBatchState)
            .where(
                CJBatchState.cj_batch_id == cj_batch_id,
                CJBatchState.state.not_in(TERMINAL_STATES),
            )
            .values(state=state, last_activity_at=now)
            .returning(CJBatchState.cj_batch_id)
        )
        return result.scalar_one_or_none() is not None

    async def states_idle_since(self, moment: datetime, limit: int) -> list[int]:
        stmt = (
            select(CJBatchState.cj_batch_id)
            .where(
                CJBatchState.state.not_in(TERMINAL_STATES),
                CJBatchState.last_activity_at < moment,
            )
            .order_by(CJBatchState.last_activity_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return list((await self.session.execute(stmt)).scalars())

    async def count_by_state(self) -> dict[str, int]:
        stmt = select(CJBatchState.state, func.count()).group_by(CJBatchState.state)
        return {row[0]: int(row[1]) for row in (await self.session.execute(stmt)).all()}

    async def assessments_with_overdue_attempts(self, moment: datetime, limit: int) -> list[int]:
        stmt = (
            select(CJComparisonPair.cj_batch_id)
            .where(
                CJComparisonPair.status == AttemptStatus.IN_FLIGHT.value,
                CJComparisonPair.submitted_at < moment,
            )
            .group_by(CJComparisonPair.cj_batch_id)
            .limit(limit)
        )
        return list((await self.session.execute(stmt)).scalars())

    # --- comparison attempts -------------------------------------------------------------

    async def insert_attempts(self, cj_batch_id: int, attempts: Sequence[NewAttempt]) -> None:
        if not attempts:
            return
        rows = [
            {
                "cj_batch_id": cj_batch_id,
                "comparison_id": a.comparison_id,
                "request_correlation_id": a.correlation_id,
                "essay_a_els_id": a.essay_a_id,
                "essay_b_els_id": a.essay_b_id,
                "iteration": a.iteration,
                "attempt": a.attempt,
                "submission_batch_id": a.submission_batch_id,
                "status": AttemptStatus.QUEUED.value,
                "is_late": False,
            }
            for a in attempts
        ]
        await self.session.execute(insert(CJComparisonPair), rows)

    async def send_batches(
        self, batch_ids: Sequence[uuid.UUID], now: datetime
    ) -> list[CJComparisonPair]:
        """Mark the attempts of these submission batches in flight and return them."""
        stmt = (
            update(CJComparisonPair)
            .where(
                CJComparisonPair.submission_batch_id.in_(list(batch_ids)),
                CJComparisonPair.status == AttemptStatus.QUEUED.value,
            )
            .values(status=AttemptStatus.IN_FLIGHT.value, submitted_at=now)
            .returning(CJComparisonPair)
        )
        rows = list((await self.session.execute(stmt)).scalars())
        return sorted(rows, key=lambda r: r.id)

    async def owners_of(self, correlation_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, int]:
        """The assessment each attempt belongs to (read before locking the assessments)."""
        stmt = select(CJComparisonPair.request_correlation_id, CJComparisonPair.cj_batch_id).where(
            CJComparisonPair.request_correlation_id.in_(list(correlation_ids))
        )
        return {row[0]: row[1] for row in (await self.session.execute(stmt)).all()}

    async def attempts_by_correlation(
        self, correlation_ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, CJComparisonPair]:
        stmt = (
            select(CJComparisonPair)
            .where(CJComparisonPair.request_correlation_id.in_(list(correlation_ids)))
            .execution_options(populate_existing=True)
        )
        rows = (await self.session.execute(stmt)).scalars()
        return {row.request_correlation_id: row for row in rows}

    async def sibling_attempts(
        self, comparison_ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, dict[int, str]]:
        """Every attempt of these comparisons: comparison id -> {attempt number: status}."""
        stmt = select(
            CJComparisonPair.comparison_id, CJComparisonPair.attempt, CJComparisonPair.status
        ).where(CJComparisonPair.comparison_id.in_(list(set(comparison_ids))))
        siblings: dict[uuid.UUID, dict[int, str]] = {}
        for comparison_id, attempt, status in (await self.session.execute(stmt)).all():
            siblings.setdefault(comparison_id, {})[attempt] = status
        return siblings

    async def overdue_attempts(self, cj_batch_id: int, moment: datetime) -> list[CJComparisonPair]:
        stmt = select(CJComparisonPair).where(
            CJComparisonPair.cj_batch_id == cj_batch_id,
            CJComparisonPair.status == AttemptStatus.IN_FLIGHT.value,
            CJComparisonPair.submitted_at < moment,
        )
        return list((await self.session.execute(stmt)).scalars())

    async def planned_pairs(self, cj_batch_id: int) -> list[tuple[str, str]]:
        stmt = select(CJComparisonPair.essay_a_els_id, CJComparisonPair.essay_b_els_id).where(
            CJComparisonPair.cj_batch_id == cj_batch_id, CJComparisonPair.attempt == 1
        )
        return [(r[0], r[1]) for r in (await self.session.execute(stmt)).all()]

    async def successful_outcomes(self, cj_batch_id: int) -> list[tuple[str, str]]:
        """(winner, loser) of every comparison answered with a winner."""
        stmt = select(
            CJComparisonPair.essay_a_els_id,
            CJComparisonPair.essay_b_els_id,
            CJComparisonPair.winner,
        ).where(
            CJComparisonPair.cj_batch_id == cj_batch_id,
            CJComparisonPair.status == AttemptStatus.SUCCEEDED.value,
        )
        rows = (await self.session.execute(stmt)).all()
        return [(a, b) if winner == "essay_a" else (b, a) for a, b, winner in rows]

    async def successful_judgements(self, cj_batch_id: int) -> list[tuple[str, str, bool]]:
        """(essay_a, essay_b, a_won) of every comparison answered with a winner, in the
        orientation the judge saw it (scoring fits the judge's position bias from it)."""
        stmt = (
            select(
                CJComparisonPair.essay_a_els_id,
                CJComparisonPair.essay_b_els_id,
                CJComparisonPair.winner,
            )
            .where(
                CJComparisonPair.cj_batch_id == cj_batch_id,
                CJComparisonPair.status == AttemptStatus.SUCCEEDED.value,
            )
            .order_by(CJComparisonPair.id)
        )
        rows = (await self.session.execute(stmt)).all()
        return [(a, b, winner == "essay_a") for a, b, winner in rows]

    async def count_attempts(self, cj_batch_id: int) -> int:
        stmt = select(func.count()).where(CJComparisonPair.cj_batch_id == cj_batch_id)
        return int((await self.session.execute(stmt)).scalar_one())

    async def store_unmatched(self, rows: Sequence[tuple[str, str, str]]) -> None:
        """(correlation id, reason, raw payload) of results that match nothing we sent."""
        if rows:
            await self.session.execute(
                insert(UnmatchedResult),
                [{"correlation_id": c, "reason": r, "payload": p} for c, r, p in rows],
            )
