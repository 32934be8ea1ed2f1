"""An assessment's state row: read under its lock as a plain value, changed by the handlers,
and written in one statement just before the transaction commits (or before a compare-and-set
that must see it)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from cj_assessment import repository
from cj_assessment.batch_state import Progress, plan_iteration
from cj_assessment.repository import AssessmentRepository, DecodedStates, StateRow

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


async def _read(sessions, cj_batch_id: int, decoded: DecodedStates) -> StateRow:
    async with sessions() as session, session.begin():
        row = await AssessmentRepository(session, decoded).lock_state(cj_batch_id)
    assert row is not None
    return row


async def _write(sessions, cj_batch_id: int, decoded: DecodedStates, progress: Progress) -> None:
    async with sessions() as session, session.begin():
        repo = AssessmentRepository(session, decoded)
        row = await repo.lock_state(cj_batch_id)
        assert row is not None
        await repo.save_progress(row, progress, state="WAITING_CALLBACKS", now=NOW)


async def test_a_state_row_stored_unchanged_is_not_decoded_again(sessions) -> None:
    cj_batch_id = await _assessment(sessions)
    decoded = DecodedStates()
    await _write(sessions, cj_batch_id, decoded, _progress())

    first = await _read(sessions, cj_batch_id, decoded)
    second = await _read(sessions, cj_batch_id, decoded)

    # The objects the write kept: neither the metadata nor the progress was rebuilt.
    assert second.processing_metadata is first.processing_metadata
    assert second.progress() is first.progress()
    assert second.progress() == _progress()


async def test_a_state_row_written_elsewhere_is_read_as_stored(sessions) -> None:
    cj_batch_id = await _assessment(sessions)
    mine, other_instance = DecodedStates(), DecodedStates()
    await _write(sessions, cj_batch_id, mine, _progress())
    assert (await _read(sessions, cj_batch_id, mine)).progress() == _progress()

    further, _ = plan_iteration(
        _progress(), iteration=2, batch_ids=["b2"], comparisons=4, batch_size=50
    )
    await _write(sessions, cj_batch_id, other_instance, further)
    async with sessions() as session, session.begin():
        await session.execute(
            text(
                "UPDATE cj_batch_states SET processing_metadata = processing_metadata"
                " || '{\"note\": 1}'::jsonb WHERE cj_batch_id = :id"
            ),
            {"id": cj_batch_id},
        )

    row = await _read(sessions, cj_batch_id, mine)
    assert row.progress() == further
    assert row.total_comparisons == 10
    assert row.processing_metadata["note"] == 1


async def test_a_rolled_back_write_is_not_taken_for_the_stored_row(sessions) -> None:
    cj_batch_id = await _assessment(sessions)
    decoded = DecodedStates()
    await _write(sessions, cj_batch_id, decoded, _progress())
    further, _ = plan_iteration(
        _progress(), iteration=2, batch_ids=["b2"], comparisons=4, batch_size=50
    )
    with pytest.raises(RuntimeError, match="handler failed"):
        async with sessions() as session, session.begin():
            repo = AssessmentRepository(session, decoded)
            row = await repo.lock_state(cj_batch_id)
            assert row is not None
            await repo.save_progress(row, further, state="WAITING_CALLBACKS", now=NOW)
            await repo.write_states()  # written, then rolled back
            raise RuntimeError("handler failed")

    row = await _read(sessions, cj_batch_id, decoded)
    assert row.progress() == _progress()
    assert row.total_comparisons == 6


def test_a_state_rows_progress_follows_its_counters_and_metadata() -> None:
    row = StateRow(1, "WAITING_CALLBACKS", 6, 0, 0, 0, 1, {}, _progress().metadata_json(), NOW, NOW)
    assert row.progress() == _progress()

    row.completed_comparisons = 2
    assert row.progress().completed == 2
    row.processing_metadata = {}
    assert row.progress() == Progress(total=6, completed=2, current_iteration=1)


def _values(cj_batch_id: int, metadata_text: str) -> tuple[object, ...]:
    return (cj_batch_id, "WAITING_CALLBACKS", 6, 0, 0, 0, 1, "{}", metadata_text, NOW, NOW)


def test_decoded_states_keep_only_the_latest_rows_within_their_bounds() -> None:
    by_count = DecodedStates(max_entries=2)
    rows = [by_count.row(_values(i, json.dumps({"k": i}))) for i in (1, 2, 3)]
    assert by_count.entries == 2
    assert [r.processing_metadata for r in rows] == [{"k": 1}, {"k": 2}, {"k": 3}]
    # The oldest went: reading it again decodes it afresh, and the same text is then reused.
    again = by_count.row(_values(1, '{"k": 1}'))
    assert again.processing_metadata == {"k": 1}
    assert again.processing_metadata is not rows[0].processing_metadata
    assert by_count.row(_values(1, '{"k": 1}')).processing_metadata is again.processing_metadata

    by_size = DecodedStates(max_chars=40)
    for i in range(5):
        by_size.row(_values(i, json.dumps({"padding": "x" * 10})))
    assert by_size.entries == 1


async def test_running_assessments_are_counted_per_state_from_the_active_index_only(
    sessions,
) -> None:
    async with sessions() as session, session.begin():
        await session.execute(
            text(
                "INSERT INTO cj_batch_uploads (bos_batch_id, event_correlation_id,"
                " llm_config_overrides, expected_essay_count, status)"
                " SELECT 'b' || g, 'c', '{}', 2, 'PROCESSING' FROM generate_series(1, 3000) g"
            )
        )
        # 2,995 finished assessments and five running ones.
        await session.execute(
            text(
                "INSERT INTO cj_batch_states (cj_batch_id, state, total_comparisons,"
                " submitted_comparisons, completed_comparisons, failed_comparisons,"
                " current_iteration, batch_config, processing_metadata, started_at,"
                " last_activity_at)"
                " SELECT id, CASE WHEN id % 600 = 0 THEN"
                "   (ARRAY['WAITING_CALLBACKS', 'SCORING'])[1 + id % 1200 / 600]"
                "   ELSE (ARRAY['COMPLETED', 'FAILED'])[1 + id % 2] END,"
                " 0, 0, 0, 0, 1, '{}', '{}', now(), now() FROM cj_batch_uploads"
            )
        )
    async with sessions() as session, session.begin():
        await session.execute(text("ANALYZE cj_batch_states"))
        counts = await AssessmentRepository(session).count_running_by_state()
        plan = await session.execute(text("EXPLAIN " + repository._COUNT_RUNNING_BY_STATE.text))
        plan_text = "\n".join(row[0] for row in plan)

    assert counts == {"WAITING_CALLBACKS": 2, "SCORING": 3}
    assert "ix_cj_batch_states_active" in plan_text
    assert "Seq Scan" not in plan_text


def test_decoded_states_let_go_of_finished_assessments() -> None:
    decoded = DecodedStates()
    running = decoded.row(_values(1, json.dumps({"k": 1})))
    decoded.row(_values(2, json.dumps({"k": 2})))
    assert decoded.entries == 2
    running.state = "COMPLETED"
    decoded.written(running, json.dumps({"k": 1}))
    assert decoded.entries == 1
    late = (2, "FAILED", *_values(2, "{}")[2:])
    decoded.row(late)  # a late answer reads a finished assessment's row
    assert decoded.entries == 0
