"""What an iteration close and a release read and write, against the migrated schema."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from cj_assessment.batch_state import AttemptStatus
from cj_assessment.repository import AssessmentRepository, NewAttempt

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


async def _assessment(repo: AssessmentRepository, name: str) -> int:
    cj_batch_id = await repo.create_upload(
        bos_batch_id=name,
        event_correlation_id="corr",
        llm_config_overrides={},
        expected_essay_count=3,
        status="PROCESSING",
    )
    assert cj_batch_id is not None
    await repo.add_essays(cj_batch_id, [(e, None, f"text of {e}") for e in ("e1", "e2", "e3")])
    return cj_batch_id


def _attempt(a: str, b: str, batch: uuid.UUID, *, attempt: int = 1) -> NewAttempt:
    return NewAttempt(
        comparison_id=uuid.uuid4(),
        correlation_id=uuid.uuid4(),
        essay_a_id=a,
        essay_b_id=b,
        iteration=1,
        attempt=attempt,
        submission_batch_id=batch,
        request_event_id=uuid.uuid4(),
    )


async def test_comparisons_hold_first_attempts_as_planned_pairs_and_only_winners_as_judgements(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    batch = uuid.uuid4()
    async with sessions() as session, session.begin():
        repo = AssessmentRepository(session)
        cj_batch_id = await _assessment(repo, "reads")
        planned = [_attempt("e1", "e2", batch), _attempt("e3", "e1", batch)]
        failed = _attempt("e2", "e3", batch)
        retry = dataclasses.replace(failed, correlation_id=uuid.uuid4(), attempt=2)
        waiting = _attempt("e1", "e3", batch)
        await repo.insert_attempts(cj_batch_id, [*planned, failed, retry, waiting])
        outcomes = {
            planned[1].correlation_id: ("essay_a", AttemptStatus.SUCCEEDED),
            planned[0].correlation_id: ("essay_b", AttemptStatus.SUCCEEDED),
            failed.correlation_id: ("error", AttemptStatus.TIMED_OUT),
            retry.correlation_id: (None, AttemptStatus.FAILED),
        }
        for correlation_id, (winner, status) in outcomes.items():
            await session.execute(
                text(
                    "UPDATE cj_comparison_pairs SET winner = :winner, status = :status"
                    " WHERE request_correlation_id = :id"
                ),
                {"winner": winner, "status": status.value, "id": correlation_id},
            )
        comparisons = await repo.comparisons(cj_batch_id)

    assert sorted((a, b) for _, a, b in comparisons.planned) == [
        ("e1", "e2"),
        ("e1", "e3"),
        ("e2", "e3"),
        ("e3", "e1"),
    ]
    # In planning order, whatever order the answers came in; the failed retry is no judgement.
    assert comparisons.judgements == [("e1", "e2", False), ("e3", "e1", True)]
    # Every attempt of e2-e3 ended without a winner; e1-e3 still awaits its answer.
    assert comparisons.unanswered == {str(failed.comparison_id)}


async def test_sending_batches_marks_only_that_assessments_queued_attempts_in_flight(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    batch, other_batch = uuid.uuid4(), uuid.uuid4()
    async with sessions() as session, session.begin():
        repo = AssessmentRepository(session)
        mine = await _assessment(repo, "mine")
        theirs = await _assessment(repo, "theirs")
        await repo.insert_attempts(mine, [_attempt("e1", "e2", batch), _attempt("e2", "e3", batch)])
        await repo.insert_attempts(theirs, [_attempt("e1", "e3", other_batch)])
        # Another assessment's batch id in the list selects nothing of it.
        sent = await repo.send_batches(mine, [batch, other_batch], NOW)
        statuses = (
            await session.execute(
                text("SELECT cj_batch_id, status FROM cj_comparison_pairs ORDER BY id")
            )
        ).all()

    assert [(r.essay_a_els_id, r.essay_b_els_id) for r in sent] == [("e1", "e2"), ("e2", "e3")]
    assert [tuple(s) for s in statuses] == [
        (mine, "in_flight"),
        (mine, "in_flight"),
        (theirs, "queued"),
    ]


async def test_outbox_payloads_are_stored_out_of_line_without_compression(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with sessions() as session:
        storage = (
            await session.execute(
                text(
                    "SELECT attstorage::text FROM pg_attribute"
                    " WHERE attrelid = 'cj_event_outbox'::regclass AND attname = 'payload'"
                )
            )
        ).scalar_one()

    assert storage == "e"


async def test_pruning_deletes_only_published_outbox_rows_and_inbox_rows_older_than_the_cutoff(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    old, recent = NOW - timedelta(hours=12), NOW + timedelta(minutes=30)
    outbox = [("old-published", old, old), ("old-unpublished", old, None)]
    outbox += [("recent-published", recent, recent)]
    async with sessions() as session, session.begin():
        for key, created, published in outbox:
            await session.execute(
                text(
                    "INSERT INTO cj_event_outbox (event_id, topic, message_key, payload,"
                    " created_at, published_at) VALUES (gen_random_uuid(), 't', :key, '{}',"
                    " CAST(:created AS timestamptz), CAST(:published AS timestamptz))"
                ),
                {"key": key, "created": created, "published": published},
            )
        for event_id, handled in (("old-event", old), ("recent-event", recent)):
            await session.execute(
                text(
                    'INSERT INTO cj_event_inbox (event_id, topic, partition, "offset", outcome,'
                    " handled_at) VALUES (:id, 't', 0, 0, 'handled', CAST(:at AS timestamptz))"
                ),
                {"id": event_id, "at": handled},
            )
    async with sessions() as session, session.begin():
        repo = AssessmentRepository(session)
        pruned = (await repo.prune_outbox(NOW, 100), await repo.prune_inbox(NOW, 100))
        kept_outbox = (
            await session.execute(text("SELECT message_key FROM cj_event_outbox ORDER BY id"))
        ).scalars()
        kept_inbox = (await session.execute(text("SELECT event_id FROM cj_event_inbox"))).scalars()
        kept = (list(kept_outbox), list(kept_inbox))

    assert pruned == (1, 1)
    assert kept == (["old-unpublished", "recent-published"], ["recent-event"])


async def test_pruning_deletes_unmatched_results_received_before_the_cutoff(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with sessions() as session, session.begin():
        for correlation_id, received in (("old", NOW - timedelta(days=8)), ("recent", NOW)):
            await session.execute(
                text(
                    "INSERT INTO cj_unmatched_results (correlation_id, reason, payload,"
                    " received_at) VALUES (:id, 'unknown_correlation_id', '{}',"
                    " CAST(:at AS timestamptz))"
                ),
                {"id": correlation_id, "at": received},
            )
    async with sessions() as session, session.begin():
        pruned = await AssessmentRepository(session).prune_unmatched(NOW - timedelta(days=7), 100)
        kept = (
            await session.execute(text("SELECT correlation_id FROM cj_unmatched_results"))
        ).scalars()
        kept_ids = list(kept)

    assert pruned == 1
    assert kept_ids == ["recent"]


async def test_pruning_stops_at_its_limit(sessions: async_sessionmaker[AsyncSession]) -> None:
    async with sessions() as session, session.begin():
        await session.execute(
            text(
                'INSERT INTO cj_event_inbox (event_id, topic, partition, "offset", outcome,'
                " handled_at) SELECT 'e' || g, 't', 0, g, 'handled', CAST(:at AS timestamptz)"
                " FROM generate_series(1, 7) AS g"
            ),
            {"at": NOW - timedelta(days=1)},
        )
    async with sessions() as session, session.begin():
        repo = AssessmentRepository(session)
        rounds = [await repo.prune_inbox(NOW, 3) for _ in range(4)]

    assert rounds == [3, 3, 1, 0]


async def test_erasing_texts_takes_only_assessments_finished_before_the_cutoff_and_keeps_ids(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    batch = uuid.uuid4()
    async with sessions() as session, session.begin():
        repo = AssessmentRepository(session)
        ids = {name: await _assessment(repo, name) for name in ("old", "recent", "running")}
        for cj_batch_id in ids.values():
            await repo.insert_attempts(cj_batch_id, [_attempt("e1", "e2", batch)])
        await session.execute(
            text(
                "UPDATE cj_comparison_pairs SET winner = 'essay_a', status = 'succeeded',"
                " justification = 'e1 quotes its sources'"
            )
        )
        await session.execute(text("UPDATE cj_batch_uploads SET essay_instructions = 'Argue.'"))
        await repo.finish_upload(ids["old"], status="COMPLETED", now=NOW - timedelta(days=31))
        await repo.finish_upload(ids["recent"], status="FAILED", now=NOW - timedelta(days=1))
        # Running for ever so long: only a finished assessment's texts are done with.
        await session.execute(
            text("UPDATE cj_batch_uploads SET created_at = :at WHERE id = :id"),
            {"at": NOW - timedelta(days=60), "id": ids["running"]},
        )
    cutoff = NOW - timedelta(days=30)

    async with sessions() as session, session.begin():
        repo = AssessmentRepository(session)
        erased = [await repo.erase_texts(cutoff, 10), await repo.erase_texts(cutoff, 10)]
        essays = (
            await session.execute(
                text(
                    "SELECT u.bos_batch_id, e.els_essay_id, e.assessment_input_text"
                    " FROM cj_processed_essays e JOIN cj_batch_uploads u ON u.id = e.cj_batch_id"
                    " ORDER BY 1, 2"
                )
            )
        ).all()
        attempts = (
            await session.execute(
                text(
                    "SELECT u.bos_batch_id, p.winner, p.justification FROM cj_comparison_pairs p"
                    " JOIN cj_batch_uploads u ON u.id = p.cj_batch_id ORDER BY 1"
                )
            )
        ).all()
        uploads = (
            await session.execute(
                text(
                    "SELECT bos_batch_id, essay_instructions, texts_erased_at IS NOT NULL"
                    " FROM cj_batch_uploads ORDER BY 1"
                )
            )
        ).all()

    assert erased == [1, 0]
    assert [tuple(r) for r in essays if r[0] == "old"] == [
        ("old", "e1", ""),
        ("old", "e2", ""),
        ("old", "e3", ""),
    ]
    assert {r[2] for r in essays if r[0] != "old"} == {"text of e1", "text of e2", "text of e3"}
    assert [tuple(r) for r in attempts] == [
        ("old", "essay_a", None),
        ("recent", "essay_a", "e1 quotes its sources"),
        ("running", "essay_a", "e1 quotes its sources"),
    ]
    assert [tuple(r) for r in uploads] == [
        ("old", None, True),
        ("recent", "Argue.", False),
        ("running", "Argue.", False),
    ]


async def _finished_long_ago(sessions: async_sessionmaker[AsyncSession], count: int) -> None:
    """`count` assessments completed nine days before NOW."""
    async with sessions() as session, session.begin():
        repo = AssessmentRepository(session)
        for k in range(count):
            cj_batch_id = await _assessment(repo, f"done-{k}")
            await repo.finish_upload(cj_batch_id, status="COMPLETED", now=NOW - timedelta(days=9))


async def test_erasing_texts_stops_at_its_limit_of_assessments(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await _finished_long_ago(sessions, 3)
    async with sessions() as session, session.begin():
        repo = AssessmentRepository(session)
        rounds = [await repo.erase_texts(NOW, 2) for _ in range(3)]

    assert rounds == [2, 1, 0]


async def test_two_instances_erase_texts_side_by_side_without_waiting_or_overlap(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await _finished_long_ago(sessions, 3)
    async with sessions() as first, first.begin():
        taken_first = await AssessmentRepository(first).erase_texts(NOW, 1)
        # The other instance's monitor, while the first transaction is still open.
        async with sessions() as second, second.begin():
            taken_second = await asyncio.wait_for(
                AssessmentRepository(second).erase_texts(NOW, 10), timeout=10
            )
    async with sessions() as session:
        left = (
            await session.execute(
                text("SELECT count(*) FROM cj_batch_uploads WHERE texts_erased_at IS NULL")
            )
        ).scalar_one()

    assert (taken_first, taken_second, left) == (1, 2, 0)
