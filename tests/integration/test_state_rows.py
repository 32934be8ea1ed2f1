"""An assessment's state row: read under its lock as a plain value, changed by the handlers,
and written in one statement just before the transaction commits (or before a compare-and-set
that must see it)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from cj_assessment.batch_state import Progress, plan_iteration
from cj_assessment.repository import AssessmentRepository

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


async def _assessment(sessions: async_sessionmaker[AsyncSession]) -> int:
    async with sessions() as session, session.begin():
        repo = AssessmentRepository(session)
        cj_batch_id = await repo.create_upload(
            bos_batch_id="state-rows",
            event_correlation_id="corr",
            llm_config_overrides={},
            expected_essay_count=4,
            status="PROCESSING",
        )
        assert cj_batch_id is not None
        await repo.create_state(cj_batch_id, config={"batch_size": 50}, now=NOW)
    return cj_batch_id


def _progress() -> Progress:
    progress, _ = plan_iteration(
        Progress(), iteration=1, batch_ids=["b1"], comparisons=6, batch_size=50
    )
    return progress


async def test_changed_state_rows_are_written_when_the_transaction_commits(sessions) -> None:
    cj_batch_id = await _assessment(sessions)
    later = NOW + timedelta(seconds=5)
    async with sessions() as session, session.begin():
        repo = AssessmentRepository(session)
        row = await repo.lock_state(cj_batch_id)
        assert row is not None and row.state == "INITIALIZING"
        await repo.save_progress(row, _progress(), state="WAITING_CALLBACKS", now=later)

    async with sessions() as session, session.begin():
        stored = await AssessmentRepository(session).lock_state(cj_batch_id)
    assert stored is not None
    assert stored.state == "WAITING_CALLBACKS"
    assert stored.total_comparisons == 6
    assert stored.current_iteration == 1
    assert stored.last_activity_at == later
    assert stored.batch_config == {"batch_size": 50}
    assert (
        Progress.from_state(
            total=stored.total_comparisons,
            submitted=stored.submitted_comparisons,
            completed=stored.completed_comparisons,
            failed=stored.failed_comparisons,
            current_iteration=stored.current_iteration,
            metadata=stored.processing_metadata,
        )
        == _progress()
    )


async def test_a_rolled_back_transaction_leaves_the_state_row_as_it_was(sessions) -> None:
    cj_batch_id = await _assessment(sessions)
    with pytest.raises(RuntimeError, match="handler failed"):
        async with sessions() as session, session.begin():
            repo = AssessmentRepository(session)
            row = await repo.lock_state(cj_batch_id)
            assert row is not None
            await repo.save_progress(row, _progress(), state="WAITING_CALLBACKS", now=NOW)
            raise RuntimeError("handler failed")

    async with sessions() as session, session.begin():
        stored = await AssessmentRepository(session).lock_state(cj_batch_id)
    assert stored is not None
    assert stored.state == "INITIALIZING"
    assert stored.total_comparisons == 0


async def test_finishing_writes_pending_progress_and_only_one_caller_wins(sessions) -> None:
    cj_batch_id = await _assessment(sessions)
    async with sessions() as session, session.begin():
        repo = AssessmentRepository(session)
        row = await repo.lock_state(cj_batch_id)
        assert row is not None
        await repo.save_progress(row, _progress(), state="SCORING", now=NOW)
        assert await repo.finish_state(row, state="COMPLETED", now=NOW)
        assert row.state == "COMPLETED"
        assert not await repo.finish_state(row, state="FAILED", now=NOW)

    async with sessions() as session, session.begin():
        stored = await AssessmentRepository(session).lock_state(cj_batch_id)
    assert stored is not None
    assert stored.state == "COMPLETED"
    assert stored.total_comparisons == 6
