"""The decision path on a real database, results and monitor passes at chosen moments: what
is sent, timed out and decided when answers, timeouts and monitors interleave."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from cj_assessment import workflow_orchestrator
from cj_assessment.assessment_request import OUTCOME_FIXED_BYTES, outcome_bytes_bound
from cj_assessment.contracts import ErrorDetail, LLMComparisonResultV1, TokenUsage
from cj_assessment.database import create_engine, session_factory, transaction
from cj_assessment.errors import TransientError
from cj_assessment.pipeline_client import sleep_until
from cj_assessment.settings import Settings
from cj_assessment.workers import WorkerProcess
from tests.support.decision_path import DecisionPath, at


async def test_the_transaction_that_completes_an_assessment_sends_no_retries(
    decision_path: Callable[..., DecisionPath],
) -> None:
    path = decision_path()
    await path.start("last-iteration", 20, at(0), batch_size=10, max_comparisons=10)
    sent = await path.in_flight()
    assert len(sent) == 10
    await path.answer([(a, True) for a in sent[:8]], at(5))
    # An error and a success: the error is pooled and due for a retry, but 9 of 10 resolved
    # close the iteration, and the budget of 10 completes the assessment.
    await path.answer([(sent[8], False), (sent[9], True)], at(6))
    state = await path.state()
    retries = await path.rows(
        "SELECT count(*) FROM cj_event_outbox WHERE payload LIKE '%\"cj_retry\"%'"
    )
    assert state.state == "COMPLETED"
    assert retries[0][0] == 0
    assert [a.attempt for a in await path.attempts()] == [1] * 10


def _count(path: DecisionPath, name: str, **labels: str) -> float:
    return path.metrics.registry.get_sample_value(f"{name}_count", labels) or 0.0


async def test_iteration_closes_and_their_computations_are_timed_for_prometheus(
    decision_path: Callable[..., DecisionPath],
) -> None:
    path = decision_path()
    await path.start("timed", 10, at(0), max_comparisons=10)
    assert _count(path, "cj_computation_seconds", step="pairing", place="event_loop") == 1
    assert _count(path, "cj_iteration_close_seconds") == 0

    await path.answer([(a, True) for a in await path.in_flight()], at(5))  # closes iteration 1
    assert _count(path, "cj_iteration_close_seconds") == 1
    assert _count(path, "cj_computation_seconds", step="scoring", place="event_loop") == 1
    assert _count(path, "cj_computation_seconds", step="pairing", place="event_loop") == 2

    await path.answer([(a, True) for a in await path.in_flight()], at(10))  # budget: completes
    assert (await path.state()).state == "COMPLETED"
    assert _count(path, "cj_iteration_close_seconds") == 2
    assert _count(path, "cj_computation_seconds", step="scoring", place="event_loop") == 2
    assert _count(path, "cj_computation_seconds", step="pairing", place="worker") == 0


async def test_a_monitor_acting_on_an_earlier_scan_leaves_just_sent_retries_alone(
    decision_path: Callable[..., DecisionPath],
) -> None:
    path = decision_path(
        callback_wait_timeout_seconds=300,
        batch_timeout_seconds=600,
    )
    cj_batch_id = await path.start("idle", 4, at(0))
    first, second = path.monitor(at(700)), path.monitor(at(701))
    await first.run_once()  # times out the first attempts and sends their retries at 700 s
    retries = [a for a in await path.attempts() if a.attempt == 2]
    assert retries and {a.status for a in retries} == {"in_flight"}
    # The second monitor's pass found the assessment idle before the first drove it, and
    # now drives it from that scan.
    driven = await second._drive_idle(cj_batch_id, at(101), at(401), at(701))
    assert driven == 0
    assert [a.status for a in await path.attempts() if a.attempt == 2] == ["in_flight"] * len(
        retries
    )
    assert (await path.state()).state == "WAITING_CALLBACKS"


async def test_requests_held_in_the_outbox_are_not_timed_out_and_wait_from_their_publication(
    decision_path: Callable[..., DecisionPath],
) -> None:
    path = decision_path(callback_wait_timeout_seconds=300, batch_timeout_seconds=600)
    path.broker_away = True
    await path.start("outage", 4, at(0))
    # Outbox rows written at the test's moments, so that retention prunes them on its clock.
    async with path.sessions() as session, session.begin():
        await session.execute(
            text(
                "UPDATE cj_event_outbox SET created_at ="
                " CAST(CAST(payload AS jsonb) ->> 'event_timestamp' AS timestamptz)"
            )
        )
    sent = [a.id for a in await path.in_flight()]
    await path.monitor(at(1000)).run_once()  # twenty minutes into the outage, idle all along
    assert [a.id for a in await path.in_flight()] == sent
    assert (await path.state()).state == "WAITING_CALLBACKS"
    assert await path.publish_pending(at(7200)) == len(sent)  # back after two hours
    # Retention deletes the published requests (written more than an hour before) at once;
    # the wait restarted at publication is the attempts' own.
    await path.monitor(at(7230)).run_once()
    assert not await path.rows("SELECT id FROM cj_event_outbox WHERE published_at IS NOT NULL")
    await path.monitor(at(7499)).run_once()
    in_flight = await path.in_flight()
    assert [a.id for a in in_flight] == sent
    assert {a.submitted_at for a in in_flight} == {at(7200)}
    await path.monitor(at(7501)).run_once()  # 301 s after publication
    attempts = await path.attempts()
    assert {a.status for a in attempts if a.attempt == 1} == {"timed_out"}
    assert len([a for a in attempts if a.attempt == 2]) == len(sent)


async def test_attempts_planned_before_their_request_id_was_stored_learn_it_when_sent(
    decision_path: Callable[..., DecisionPath],
) -> None:
    # Planned by a build from before migration 0007, queued, and sent by this one while the
    # broker is away: they must wait for their publication like any other.
    path = decision_path(callback_wait_timeout_seconds=300, batch_size=10, max_concurrent_batches=1)
    await path.start("upgraded", 24, at(0))  # 12 comparisons: 10 sent, 2 queued
    async with path.sessions() as session, session.begin():
        await session.execute(
            text("UPDATE cj_comparison_pairs SET request_event_id = NULL WHERE status = 'queued'")
        )
    path.broker_away = True
    first = await path.in_flight()
    await path.answer([(a, True) for a in first], at(5))  # 10 of 12: the last batch goes out
    queued_then = {a.id for a in await path.in_flight()}
    assert len(queued_then) == 2
    await path.monitor(at(1000)).run_once()
    assert {a.id for a in await path.in_flight()} == queued_then


async def test_an_assessment_the_monitor_cannot_handle_holds_up_neither_others_nor_pruning(
    decision_path: Callable[..., DecisionPath],
) -> None:
    path = decision_path(callback_wait_timeout_seconds=300, outbox_retention_seconds=3600)
    broken = await path.start("broken", 4, at(0))
    await path.start("healthy", 4, at(0))
    async with path.sessions() as session, session.begin():
        await session.execute(
            text("UPDATE cj_batch_states SET processing_metadata = '[]' WHERE cj_batch_id = :id"),
            {"id": broken},
        )
    # Outbox rows are pruned by their creation, which the database stamps with the wall clock.
    later = datetime.now(UTC) + timedelta(hours=2)
    for moment in (later, later + timedelta(seconds=30)):  # the same failure on every pass
        await path.monitor(moment).run_once()
    by_assessment = await path.rows(
        "SELECT u.bos_batch_id, p.attempt, p.status FROM cj_comparison_pairs p"
        " JOIN cj_batch_uploads u ON u.id = p.cj_batch_id WHERE p.attempt = 1"
    )
    assert {status for name, _, status in by_assessment if name == "healthy"} == {"timed_out"}
    assert {status for name, _, status in by_assessment if name == "broken"} == {"in_flight"}
    errors = path.metrics.registry.get_sample_value("cj_monitor_actions_total", {"action": "error"})
    assert errors is not None and errors >= 2
    pruned = path.metrics.registry.get_sample_value("cj_rows_pruned_total", {"table": "outbox"})
    assert pruned is not None and pruned > 0


async def test_assessments_failing_in_every_pass_do_not_starve_the_others_of_the_monitor(
    decision_path: Callable[..., DecisionPath],
) -> None:
    path = decision_path(callback_wait_timeout_seconds=300, monitor_interval_seconds=30)
    broken = [await path.start(f"broken-{i}", 4, at(0)) for i in range(2)]
    await path.start("healthy", 4, at(10))  # waiting for less long than the broken ones
    async with path.sessions() as session, session.begin():
        await session.execute(
            text(
                "UPDATE cj_batch_states SET processing_metadata = '[]'"
                " WHERE cj_batch_id = ANY(CAST(:ids AS bigint[]))"
            ),
            {"ids": broken},
        )
    moment = [at(400)]
    # A scan limit of one stands in for fifty: the oldest candidates fail first every time.
    monitor = path.monitor(lambda: moment[0], claim_limit=1)
    for _ in range(10):  # five minutes
        await monitor.run_once()
        moment[0] += timedelta(seconds=30)
    statuses = await path.rows(
        "SELECT u.bos_batch_id, p.status FROM cj_comparison_pairs p"
        " JOIN cj_batch_uploads u ON u.id = p.cj_batch_id WHERE p.attempt = 1"
    )
    assert {status for name, status in statuses if name == "healthy"} == {"timed_out"}
    assert {status for name, status in statuses if name != "healthy"} == {"in_flight"}


async def test_the_monitor_times_out_the_longest_waiting_assessment_first(
    decision_path: Callable[..., DecisionPath],
) -> None:
    path = decision_path(callback_wait_timeout_seconds=300)
    newer = await path.start("newer", 4, at(20))
    older = await path.start("older", 4, at(0))
    await path.monitor(at(400), claim_limit=1).run_once()
    statuses = await path.rows("SELECT cj_batch_id, status FROM cj_comparison_pairs")
    assert {status for batch, status in statuses if batch == older} >= {"timed_out"}
    assert {status for batch, status in statuses if batch == newer} == {"in_flight"}


async def test_answers_the_service_has_not_handled_yet_are_not_taken_for_missing_ones(
    decision_path: Callable[..., DecisionPath],
) -> None:
    path = decision_path(callback_wait_timeout_seconds=300)
    await path.start("unhandled", 4, at(0))
    # The database was away from 100 s to 900 s: one partition's results were handled up to
    # 100 s, the other's are all handled. Answers to the requests of 0 s may wait there.
    await path.handled_through({0: at(100), 1: at(899)})
    await path.monitor(at(900)).run_once()
    assert {a.status for a in await path.attempts()} == {"in_flight"}
    # Once every partition is handled past the deadline, the wait is over.
    await path.handled_through({0: at(350), 1: at(899)})
    await path.monitor(at(901)).run_once()
    assert {a.status for a in await path.attempts() if a.attempt == 1} == {"timed_out"}


async def test_a_partition_the_topic_no_longer_has_does_not_stop_every_timeout(
    decision_path: Callable[..., DecisionPath],
) -> None:
    path = decision_path(callback_wait_timeout_seconds=300)
    await path.start("leftover", 4, at(0))
    # A renamed topic's rows, and a partition the topic no longer has (recreated with fewer
    # partitions): its row will never be written again.
    await path.handled_through({0: at(1)}, topic=f"{path.settings.topic_llm_comparison_result}.old")
    await path.handled_through({0: at(899), 1: at(899), 6: at(1)})
    path.result_partitions.partitions = frozenset({0, 1})
    await path.monitor(at(900)).run_once()
    assert {a.status for a in await path.attempts() if a.attempt == 1} == {"timed_out"}
    behind = path.metrics.registry.get_sample_value("cj_results_handled_behind_seconds")
    assert behind == 1.0


async def test_a_partition_between_owners_holds_timeouts_back_however_long_it_goes_unwritten(
    decision_path: Callable[..., DecisionPath],
) -> None:
    # Its owner was killed or frozen: until another instance takes it over and handles it,
    # answers to these requests may be waiting there. Timing them out would pay twice.
    path = decision_path(callback_wait_timeout_seconds=300)
    await path.start("orphaned", 4, at(0))
    topic = path.settings.topic_llm_comparison_result
    await path.handled_through({0: at(899), 1: at(899), 2: at(100)})
    async with transaction(path.sessions) as session:
        await session.execute(
            text(
                "UPDATE cj_result_watermarks SET noted_at = now() - interval '301 seconds'"
                " WHERE topic = :t AND partition = 2"
            ),
            {"t": topic},
        )
    path.result_partitions.partitions = frozenset({0, 1, 2})
    await path.monitor(at(900)).run_once()
    assert {a.status for a in await path.attempts()} == {"in_flight"}
    behind = path.metrics.registry.get_sample_value("cj_results_handled_behind_seconds")
    assert behind == 800.0
    # Taken over and handled past the deadline: the wait is over.
    await path.handled_through({2: at(899)})
    await path.monitor(at(901)).run_once()
    assert {a.status for a in await path.attempts() if a.attempt == 1} == {"timed_out"}


async def test_an_idle_assessment_waits_for_attempts_not_yet_overdue(
    decision_path: Callable[..., DecisionPath],
) -> None:
    # A provider on batch APIs answers in minutes to hours: idle is not overdue.
    path = decision_path(
        callback_wait_timeout_seconds=3600,
        batch_timeout_seconds=600,
    )
    await path.start("patient", 4, at(0))
    await path.monitor(at(700)).run_once()
    assert {a.status for a in await path.attempts()} == {"in_flight"}
    assert (await path.state()).state == "WAITING_CALLBACKS"
    await path.monitor(at(3700)).run_once()
    attempts = await path.attempts()
    assert {a.status for a in attempts if a.attempt == 1} == {"timed_out"}
    assert {a.status for a in attempts if a.attempt == 2} == {"in_flight"}


async def test_attempts_left_unanswered_by_a_finished_assessment_are_closed_once(
    decision_path: Callable[..., DecisionPath],
) -> None:
    path = decision_path()
    await path.start("finished", 20, at(0), batch_size=10, max_comparisons=10)
    sent = await path.attempts()
    await path.answer([(a, True) for a in sent[:9]], at(5))  # 9 of 10: done, budget spent
    assert (await path.state()).state == "COMPLETED"
    straggler = sent[9]
    await path.monitor(at(400)).run_once()
    closed = (await path.attempts())[9]
    assert (closed.status, closed.error_code) == ("timed_out", "TIMEOUT")
    # Nothing left for later passes to find again.
    assert await path.rows("SELECT id FROM cj_comparison_pairs WHERE status = 'in_flight'") == []
    assert await path.answer([(straggler, True)], at(500)) == ["late"]
    stored = (await path.attempts())[9]
    assert (stored.status, stored.is_late) == ("succeeded", True)
    state = await path.state()
    assert (state.completed_comparisons, state.failed_comparisons) == (9, 0)


async def test_the_summary_counts_only_requests_that_were_sent(
    decision_path: Callable[..., DecisionPath],
) -> None:
    path = decision_path(
        failed_comparison_retry_threshold=1,
    )
    await path.start(
        "queued-retry",
        60,
        at(0),
        batch_size=10,
        max_concurrent_batches=1,
        partial_completion_threshold=0.5,
        max_comparisons=31,  # 30 first attempts and one call for a retry
    )
    first = await path.in_flight()
    # One error: its retry batch is formed at once but queues behind the iteration's
    # remaining first batches; the threshold closes the iteration and the budget is spent.
    await path.answer([(first[0], False)] + [(a, True) for a in first[1:]], at(5))
    second = await path.in_flight()
    await path.answer([(a, True) for a in second], at(6))
    third = await path.in_flight()
    await path.answer([(a, True) for a in third], at(7))
    attempts = await path.attempts()
    assert (await path.state()).state == "COMPLETED"
    assert [a.status for a in attempts if a.attempt == 2] == ["queued"]
    summary = await path.completed_summary()
    assert summary["comparison_attempts"] == 30
    assert summary["pool_statistics"]["retry_batches_sent"] == 0
    # 19 of 30 resolved passed the threshold of 0.5 as the third batch went out: its ten
    # answers came after the end, and the errored comparison was never retried. Those 11 are
    # neither succeeded nor failed for good.
    assert (
        summary["comparisons_requested"],
        summary["comparisons_succeeded"],
        summary["comparisons_failed"],
        summary["comparisons_outstanding"],
    ) == (30, 19, 0, 11)


async def test_a_queued_retry_of_a_comparison_answered_meanwhile_is_not_sent(
    decision_path: Callable[..., DecisionPath],
) -> None:
    path = decision_path(
        callback_wait_timeout_seconds=300,
        failed_comparison_retry_threshold=1,
    )
    await path.start("rescued", 40, at(0), batch_size=10, max_concurrent_batches=1)
    first = await path.in_flight()
    await path.answer([(a, True) for a in first[1:]], at(200))  # releases the second batch
    late = first[0]
    await path.monitor(at(400)).run_once()  # times out `late`; its retry queues behind
    retry = [a for a in await path.attempts() if a.attempt == 2]
    assert [a.status for a in retry] == ["queued"]
    assert await path.answer([(late, True)], at(410)) == ["handled"]  # rescued after all
    second = await path.in_flight()
    await path.answer([(a, True) for a in second], at(420))  # the slot frees: retry's turn
    attempts = await path.attempts()
    (retried,) = [a for a in attempts if a.attempt == 2]
    assert (retried.status, retried.submitted_at) == ("superseded", None)
    requests = await path.rows(
        "SELECT count(*) FROM cj_event_outbox WHERE payload LIKE :id",
        id=f"%{retried.request_correlation_id}%",
    )
    assert requests[0][0] == 0
    state = await path.state()
    assert (state.state, state.current_iteration) == ("WAITING_CALLBACKS", 2)
    assert state.completed_comparisons == 20


async def test_metrics_count_a_poll_once_when_its_first_transaction_was_lost(
    decision_path: Callable[..., DecisionPath],
) -> None:
    path = decision_path()
    await path.start("retried-poll", 20, at(0), batch_size=10)
    sent = await path.in_flight()
    poll = [(sent[0], True), (sent[1], True), (sent[2], False)]
    with pytest.raises(ConnectionResetError):
        await path.answer(poll, at(5), lost_before_commit=True)
    # Redelivered, handled again, committed this time.
    await path.answer(poll, at(6))
    stored = await path.rows(
        "SELECT status, count(*) FROM cj_comparison_pairs WHERE status IN ('succeeded', 'failed')"
        " GROUP BY status"
    )
    registry = path.metrics.registry
    assert dict(stored) == {"succeeded": 2, "failed": 1}
    assert registry.get_sample_value("cj_comparisons_succeeded_total") == 2
    failed = {"reason": "provider_error"}
    assert registry.get_sample_value("cj_comparisons_failed_total", failed) == 1
    assert registry.get_sample_value("cj_assessments_started_total") == 1


async def test_retries_are_paid_calls_within_the_budget_and_a_failure_without_one_is_not_retried(
    decision_path: Callable[..., DecisionPath],
) -> None:
    path = decision_path(min_success_rate=0.5)
    # 4 essays, one matching: 2 comparisons; a budget of 3 LLM calls leaves one for a retry.
    await path.start("tight-budget", 4, at(0), batch_size=10, max_comparisons=3)
    first = await path.in_flight()
    assert len(first) == 2
    await path.answer([(first[0], False), (first[1], False)], at(5))
    retries = await path.in_flight()
    assert [a.comparison_id for a in retries] == [first[0].comparison_id]
    await path.answer([(retries[0], True)], at(6))
    assert (await path.state()).state == "COMPLETED"
    assert len(await path.attempts()) == 3  # calls made: never more than max_comparisons
    requests = await path.rows(
        "SELECT count(*) FROM cj_event_outbox WHERE topic = :topic",
        topic=path.settings.topic_llm_comparison_request,
    )
    assert requests[0][0] == 3
    summary = await path.completed_summary()
    assert (summary["comparisons_succeeded"], summary["comparisons_failed"]) == (1, 1)
    assert summary["stop_reason"] == "budget"
    assert summary["pool_statistics"]["unretried_over_budget"] == 1


async def test_a_late_answer_after_a_successful_retry_is_stored_as_superseded(
    decision_path: Callable[..., DecisionPath],
) -> None:
    path = decision_path(callback_wait_timeout_seconds=300)
    # 2 comparisons and their 2 retries spend the budget of 4.
    await path.start("late-twin", 4, at(0), batch_size=10, max_comparisons=4)
    first = await path.in_flight()
    await path.monitor(at(400)).run_once()  # both time out; their retries go out
    retries = await path.in_flight()
    assert [a.attempt for a in retries] == [2, 2]
    await path.answer([(a, True) for a in retries], at(410))
    assert (await path.state()).state == "COMPLETED"
    assert await path.answer([(first[0], True)], at(420)) == ["late"]
    stored = (await path.attempts())[0]
    assert (stored.status, stored.is_late) == ("superseded", True)
    # One success per comparison in the stored rows, as in the published counts.
    succeeded = await path.rows(
        "SELECT comparison_id, count(*) FROM cj_comparison_pairs WHERE status = 'succeeded'"
        " GROUP BY comparison_id"
    )
    assert sorted(count for _, count in succeeded) == [1, 1]


async def test_an_idle_assessment_is_not_stuck_while_attempts_past_their_batch_threshold_wait(
    decision_path: Callable[..., DecisionPath],
) -> None:
    # A batch past its threshold is no longer in flight, yet its last attempts may still be
    # answered when the callback timeout is longer than the batch timeout (batch APIs).
    path = decision_path(callback_wait_timeout_seconds=3600, batch_timeout_seconds=600)
    await path.start("patient-tail", 20, at(0), batch_size=10)
    first = await path.in_flight()
    await path.answer([(a, False) for a in first[:9]], at(5))  # 9 of 10 in: batch done
    retries = await path.in_flight()
    retries = [a for a in retries if a.attempt == 2]
    assert len(retries) == 9
    await path.answer([(a, True) for a in retries[:8]], at(6))  # 8 of 10 resolved: < 85%
    await path.monitor(at(700)).run_once()
    state = await path.state()
    assert state.state == "WAITING_CALLBACKS"
    assert len(await path.in_flight()) == 2  # the first batch's tail and one retry


async def test_errors_first_do_not_fail_an_assessment_whose_other_answers_are_still_coming(
    decision_path: Callable[..., DecisionPath],
) -> None:
    path = decision_path(max_retry_attempts=0, min_success_rate=0.5)
    await path.start(
        "errors-first",
        20,
        at(0),
        batch_size=10,
        partial_completion_threshold=0.5,
        max_comparisons=10,
    )
    sent = await path.in_flight()
    # Half resolved reaches the threshold, but closing on errors alone would fail it.
    await path.answer([(a, False) for a in sent[:5]], at(5))
    assert (await path.state()).state == "WAITING_CALLBACKS"
    assert await path.answer([(a, True) for a in sent[5:]], at(6)) == ["handled"] * 5
    state = await path.state()
    assert (state.state, state.completed_comparisons, state.failed_comparisons) == (
        "COMPLETED",
        5,
        5,
    )


async def _three_timed_out_two_retried(
    name: str, path: DecisionPath
) -> tuple[list[Any], list[Any]]:
    """10 comparisons and a budget of 12 calls: 7 answered, then 3 time out at 400 s, of which
    2 are retried and 1 is given up over the budget. The first attempts and the 2 retries."""
    await path.start(name, 20, at(0), batch_size=10, max_comparisons=12)
    first = await path.in_flight()
    await path.answer([(a, True) for a in first[:7]], at(5))
    await path.monitor(at(400)).run_once()
    retries = [a for a in await path.in_flight() if a.attempt == 2]
    assert len(retries) == 2
    return first, retries


async def test_two_attempts_of_one_comparison_answered_late_in_one_poll_store_one_success(
    decision_path: Callable[..., DecisionPath],
) -> None:
    path = decision_path(callback_wait_timeout_seconds=300)
    first, retries = await _three_timed_out_two_retried("late-pair", path)
    await path.answer([(retries[0], True)], at(410))  # 9 of 10 resolved: done, budget spent
    assert (await path.state()).state == "COMPLETED"
    other = retries[1]
    (timed_out,) = [a for a in first if a.comparison_id == other.comparison_id]
    assert await path.answer([(timed_out, True), (other, True)], at(420)) == ["late", "late"]
    statuses = [a.status for a in await path.attempts() if a.comparison_id == other.comparison_id]
    assert sorted(statuses) == ["succeeded", "superseded"]


async def test_a_late_answer_to_a_comparison_given_up_over_budget_is_stored_as_superseded(
    decision_path: Callable[..., DecisionPath],
) -> None:
    path = decision_path(callback_wait_timeout_seconds=300)
    first, retries = await _three_timed_out_two_retried("late-given-up", path)
    await path.answer([(a, True) for a in retries], at(410))
    assert (await path.state()).state == "COMPLETED"
    retried = {a.comparison_id for a in retries}
    (given_up,) = [a for a in first[7:] if a.comparison_id not in retried]
    assert await path.answer([(given_up, True)], at(420)) == ["late"]
    stored = next(a for a in await path.attempts() if a.id == given_up.id)
    assert (stored.status, stored.is_late) == ("superseded", True)
    summary = await path.completed_summary()
    succeeded = await path.rows(
        "SELECT count(*) FROM cj_comparison_pairs WHERE status = 'succeeded'"
    )
    assert (summary["comparisons_succeeded"], summary["comparisons_failed"]) == (9, 1)
    assert succeeded[0][0] == 9


async def test_a_late_answer_to_a_comparison_out_of_retries_is_stored_as_superseded(
    decision_path: Callable[..., DecisionPath],
) -> None:
    path = decision_path(
        callback_wait_timeout_seconds=300, max_retry_attempts=1, min_success_rate=0.5
    )
    # 2 comparisons and a budget of 3 calls: one retry.
    await path.start("late-exhausted", 4, at(0), batch_size=10, max_comparisons=3)
    first = await path.in_flight()
    await path.answer([(first[0], True)], at(5))
    await path.monitor(at(400)).run_once()  # the other times out; its one retry goes out
    (retry,) = [a for a in await path.in_flight() if a.attempt == 2]
    await path.monitor(at(800)).run_once()  # the retry times out: failed for good
    assert (await path.state()).state == "COMPLETED"
    assert await path.answer([(retry, True)], at(820)) == ["late"]
    stored = next(a for a in await path.attempts() if a.id == retry.id)
    assert (stored.status, stored.is_late) == ("superseded", True)
    succeeded = await path.rows(
        "SELECT count(*) FROM cj_comparison_pairs WHERE status = 'succeeded'"
    )
    assert succeeded[0][0] == (await path.completed_summary())["comparisons_succeeded"] == 1


async def test_an_idle_assessment_with_nothing_left_to_wait_for_fails_as_stuck(
    decision_path: Callable[..., DecisionPath],
) -> None:
    path = decision_path(callback_wait_timeout_seconds=3600, batch_timeout_seconds=600)
    await path.start("lost-track", 20, at(0), batch_size=10)
    # Bookkeeping lost behind the state row's back: the attempts are closed, the progress
    # still counts them as out. Nothing can move it any more.
    async with path.sessions() as session, session.begin():
        await session.execute(
            text("UPDATE cj_comparison_pairs SET status = 'failed' WHERE status = 'in_flight'")
        )
    await path.monitor(at(700)).run_once()
    assert (await path.state()).state == "FAILED"
    (payload,) = await path.rows(
        "SELECT payload FROM cj_event_outbox WHERE payload LIKE '%\"cj_assessment.failed\"%'"
    )
    assert '"ASSESSMENT_STUCK"' in payload[0]


async def test_every_pair_planned_is_not_every_pair_compared_while_two_wait_for_retries(
    decision_path: Callable[..., DecisionPath],
) -> None:
    path = decision_path(matchings_per_iteration=5)
    await path.start("six", 6, at(0), max_comparisons=60)
    first = await path.in_flight()
    assert len({frozenset((a.essay_a_els_id, a.essay_b_els_id)) for a in first}) == 15
    # 13 of 15 pass the threshold; the two errors still owe their pairs a judgement.
    await path.answer([(a, i >= 2) for i, a in enumerate(first)], at(1))
    assert (await path.state()).state == "WAITING_CALLBACKS"
    retried = {a.comparison_id for a in await path.in_flight() if a.attempt == 2}
    assert retried == {a.comparison_id for a in first[:2]}
    await path.answer_until_quiet(lambda attempt: True, 2)
    assert len(await path.judged_pairs()) == 15
    summary = await path.completed_summary()
    assert summary["pool_statistics"]["successful_retries"] == 2
    # The iteration that planned the last unseen pairs waited for its retries: no repeats.
    assert (summary["stop_reason"], summary["comparison_attempts"]) == ("all_pairs_compared", 17)


async def test_comparisons_failed_for_good_are_made_up_so_judgement_counts_stay_within_one(
    decision_path: Callable[..., DecisionPath],
) -> None:
    path = decision_path(matchings_per_iteration=1, enable_stability_checking=False)
    await path.start("outage", 12, at(0), max_comparisons=60)
    # Every attempt at e00's first-iteration comparison fails, its retries included.
    await path.answer_until_quiet(
        lambda a: not (a.iteration == 1 and "e00" in (a.essay_a_els_id, a.essay_b_els_id)), 1
    )
    judgements: dict[str, int] = {}
    for a in await path.attempts():
        if a.status == "succeeded":
            for essay in (a.essay_a_els_id, a.essay_b_els_id):
                judgements[essay] = judgements.get(essay, 0) + 1
    summary = await path.completed_summary()
    assert summary["pool_statistics"]["permanently_failed"] == 1
    assert max(judgements.values()) - min(judgements.values()) <= 1


async def test_what_a_provider_writes_is_stored_as_its_columns_can_hold_it(
    decision_path: Callable[..., DecisionPath],
) -> None:
    path = decision_path()
    await path.start("odd-answers", 6, at(0))
    won, errored, timed_out = (await path.in_flight())[:3]
    answers = [
        LLMComparisonResultV1(
            correlation_id=str(won.request_correlation_id),
            winner="Essay B",
            justification="clearer\x00 argument \ud800",
            provider="p" * 100,
            model="m" * 300,
            response_time_ms=10**12,
            token_usage=TokenUsage(prompt_tokens=2**31, completion_tokens=5, total_tokens=-1),
        ),
        LLMComparisonResultV1(
            correlation_id=str(errored.request_correlation_id),
            error_detail=ErrorDetail(
                error_code="rate limited req-0e1add4c", message="slow\x00 down", service="s\x00"
            ),
        ),
        LLMComparisonResultV1(
            correlation_id=str(timed_out.request_correlation_id),
            error_detail=ErrorDetail(error_code="TIMEOUT", message="upstream", service="s"),
        ),
    ]
    assert await path.deliver(answers, at(1)) == ["handled", "handled", "handled"]
    (stored,) = await path.rows(
        "SELECT winner, justification, provider, model, response_time_ms, prompt_tokens,"
        " completion_tokens, total_tokens FROM cj_comparison_pairs WHERE id = :id",
        id=won.id,
    )
    assert tuple(stored) == (
        "essay_b",
        "clearer argument ?",
        "p" * 64,
        "m" * 128,
        None,
        None,
        5,
        -1,
    )
    (failed,) = await path.rows(
        "SELECT error_code, error_details FROM cj_comparison_pairs WHERE id = :id", id=errored.id
    )
    assert failed[0] == "rate limited req-0e1add4c"
    assert (failed[1]["message"], failed[1]["service"]) == ("slow down", "s")
    # A provider's own code is no metric label: the label set stays bounded.
    registry = path.metrics.registry
    failed_other = {"reason": "provider_other"}
    assert registry.get_sample_value("cj_comparisons_failed_total", failed_other) == 1
    # The provider's timeout is not the service's own (an answer that never came in time).
    provider_timeout = {"reason": "provider_timeout"}
    assert registry.get_sample_value("cj_comparisons_failed_total", provider_timeout) == 1
    assert registry.get_sample_value("cj_comparisons_failed_total", {"reason": "timeout"}) is None


@pytest.mark.parametrize(
    ("essays", "matchings", "calls"),
    [(4, 3, 6 + 3), (4, 5, 10 + 3), (6, 5, 15 + 3), (5, 2, 10 + 4 + 4)],
)
async def test_a_pair_the_provider_always_refuses_does_not_keep_a_small_assessment_running(
    decision_path: Callable[..., DecisionPath], essays: int, matchings: int, calls: int
) -> None:
    path = decision_path(matchings_per_iteration=matchings)
    await path.start("refused-pair", essays, at(0), max_comparisons=10 * essays)
    await path.answer_until_quiet(
        lambda a: {a.essay_a_els_id, a.essay_b_els_id} != {"e00", "e01"}, 1
    )
    summary = await path.completed_summary()
    # Every pair is settled once the refused one has failed for good (after its retries, and
    # at most one make-up when it was planned before the last unseen pairs).
    assert summary["stop_reason"] == "all_pairs_compared"
    assert summary["comparison_attempts"] == calls


async def test_all_pairs_compared_waits_for_a_retry_an_earlier_iteration_still_owes(
    decision_path: Callable[..., DecisionPath],
) -> None:
    path = decision_path(matchings_per_iteration=1)
    await path.start("early-retry", 4, at(0), max_comparisons=40, partial_completion_threshold=0.5)
    first = await path.in_flight()
    # One success and one error: 1 of 2 passes the threshold, and the error's retry goes out
    # with the next iteration.
    await path.answer([(first[0], True), (first[1], False)], at(1))
    moment = await path.answer_until_quiet(lambda a: True, 2, only=lambda a: a.attempt == 1)
    # Every pair planned, every first answer in: only the retry is out, and it is waited for.
    assert (await path.state()).state == "WAITING_CALLBACKS"
    (retry,) = await path.in_flight()
    assert (retry.comparison_id, retry.attempt) == (first[1].comparison_id, 2)
    await path.answer([(retry, True)], at(moment))
    assert len(await path.judged_pairs()) == 6
    assert (await path.completed_summary())["stop_reason"] == "all_pairs_compared"


async def test_a_completed_event_stays_within_the_size_bound_the_request_was_checked_against(
    decision_path: Callable[..., DecisionPath],
) -> None:
    path = decision_path(matchings_per_iteration=3)
    await path.start("sized", 8, at(0))
    await path.answer_until_quiet(lambda attempt: True, 1)
    assert (await path.state()).state == "COMPLETED"
    (payload,) = await path.rows(
        "SELECT payload FROM cj_event_outbox WHERE payload LIKE '%\"cj_assessment.completed\"%'"
    )
    essay_ids = [f"e{i:02d}" for i in range(8)]
    bound = outcome_bytes_bound("sized", essay_ids, path.settings.comparisons_per_essay * 8)
    assert len(payload[0].encode()) <= bound - OUTCOME_FIXED_BYTES // 2


async def test_a_large_iteration_is_scored_and_planned_while_the_event_loop_serves_others(
    decision_path: Callable[..., DecisionPath], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each step first asks the event loop to run a callback and waits for it: on the loop's
    # own thread nothing else can run until the step returns, so the wait would time out.
    loop = asyncio.get_running_loop()
    served: dict[str, list[bool]] = {"score_judgements": [], "generate_pairs": []}

    def needing_the_loop(name: str) -> Callable[..., object]:
        real = getattr(workflow_orchestrator, name)

        def step(*args: object, **kwargs: object) -> object:
            ran = threading.Event()
            loop.call_soon_threadsafe(ran.set)
            served[name].append(ran.wait(timeout=5.0))
            return real(*args, **kwargs)

        return step

    for name in served:
        monkeypatch.setattr(workflow_orchestrator, name, needing_the_loop(name))
    path = decision_path()
    essays = workflow_orchestrator.OFF_LOOP_MIN_ESSAYS + 40
    await path.start("large", essays, at(0))
    sent = await path.in_flight()
    assert len(sent) == essays // 2  # one matching
    await path.answer([(a, True) for a in sent], at(10))
    assert (await path.state()).current_iteration == 2
    # Pairing the first iteration (no estimates yet), then scoring it and pairing the next.
    assert served == {"score_judgements": [True], "generate_pairs": [True, True]}


async def test_a_large_close_that_outlasts_the_connections_idle_limit_is_not_ended(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Scoring pauses the transaction that holds the assessment's row; ended by the idle
    # limit, the same poll would be retried and ended again for ever.
    limits = {"database_idle_in_transaction_timeout_seconds": 0.5}
    real = workflow_orchestrator.score_judgements

    def slow_scoring(*args: object, **kwargs: object) -> object:
        time.sleep(1.5)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(workflow_orchestrator, "score_judgements", slow_scoring)
    engine = create_engine(Settings(database_url=database_url, **limits))
    try:
        path = DecisionPath.build(session_factory(engine), database_url, **limits)
        essays = workflow_orchestrator.OFF_LOOP_MIN_ESSAYS
        await path.start("large-and-slow", essays, at(0))
        sent = await path.in_flight()
        await path.answer([(a, True) for a in sent], at(10))
        assert (await path.state()).current_iteration == 2
        assert len(await path.in_flight()) == essays // 2
    finally:
        await engine.dispose()


async def test_large_closes_in_concurrent_transactions_are_scored_one_at_a_time(
    decision_path: Callable[..., DecisionPath], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two at once take twice as long each on shared cores and hold two dense posteriors.
    real = workflow_orchestrator.score_judgements
    guard = threading.Lock()
    running, most = [0], [0]

    def counted_scoring(*args: object, **kwargs: object) -> object:
        with guard:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.3)
            return real(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            with guard:
                running[0] -= 1

    monkeypatch.setattr(workflow_orchestrator, "score_judgements", counted_scoring)
    path = decision_path()
    essays = workflow_orchestrator.OFF_LOOP_MIN_ESSAYS
    first = await path.start("large-1", essays, at(0))
    await path.start("large-2", essays, at(0))
    sent = await path.rows(
        "SELECT cj_batch_id, request_correlation_id FROM cj_comparison_pairs"
        " WHERE status = 'in_flight'"
    )
    by_assessment = [[row for row in sent if (row[0] == first) == own] for own in (True, False)]
    await asyncio.gather(
        *(
            path.deliver(
                [
                    LLMComparisonResultV1(correlation_id=str(row[1]), winner="Essay A")
                    for row in rows
                ],
                at(10),
            )
            for rows in by_assessment
        )
    )
    iterations = await path.rows("SELECT current_iteration FROM cj_batch_states")
    assert sorted(i[0] for i in iterations) == [2, 2]
    assert most[0] == 1


async def test_the_callback_handler_knows_an_assessment_as_large_once_it_handled_its_results(
    decision_path: Callable[..., DecisionPath],
) -> None:
    # The consumer gives a large assessment's results transactions of their own, so that its
    # seconds-long iteration closes hold no other assessment's rows.
    path = decision_path()
    await path.start("large", workflow_orchestrator.OFF_LOOP_MIN_ESSAYS, at(0))
    await path.start("small", 6, at(0))
    assert not path.callbacks.is_large("large")
    await path.answer([(a, True) for a in await path.in_flight()], at(1))
    assert path.callbacks.is_large("large")
    assert not path.callbacks.is_large("small")


async def test_a_large_close_is_scored_and_planned_in_the_worker_process(
    decision_path: Callable[..., DecisionPath],
) -> None:
    # `serve` computes large closes in a child process, so that the interpreter lock is not
    # shared with the event loop; the inputs and results cross the process boundary.
    essays = workflow_orchestrator.OFF_LOOP_MIN_ESSAYS
    worker = WorkerProcess()
    try:
        path = decision_path(worker=worker)
        await path.start("large", essays, at(0))
        sent = await path.in_flight()
        await path.answer([(a, True) for a in sent], at(10))
        state = await path.state()
        planned = [a for a in await path.in_flight() if a.iteration == 2]
        scores = await path.rows(
            "SELECT count(*) FROM cj_processed_essays WHERE current_bt_score IS NOT NULL"
        )
    finally:
        worker.close()
    assert state.current_iteration == 2
    assert len(planned) == essays // 2
    assert len({e for a in planned for e in (a.essay_a_els_id, a.essay_b_els_id)}) == essays
    assert scores[0][0] == essays
    assert _count(path, "cj_computation_seconds", step="scoring", place="worker") == 1
    assert _count(path, "cj_computation_seconds", step="pairing", place="worker") == 2
    assert _count(path, "cj_computation_seconds", step="scoring", place="event_loop") == 0


async def test_a_worker_process_that_died_is_a_transient_error_and_is_started_again() -> None:
    worker = WorkerProcess()
    try:
        assert await worker.run(partial(math.sqrt, 16.0)) == 4.0
        with pytest.raises(TransientError):
            await worker.run(partial(os._exit, 1))
        assert await worker.run(partial(math.sqrt, 9.0)) == 3.0
    finally:
        worker.close()


async def test_a_warmed_up_worker_has_the_core_loaded_and_computes_in_that_process() -> None:
    # `serve` warms the worker up at start, so that the first large assessment does not wait
    # seconds for a process to start and import numpy, scipy and the core.
    worker = WorkerProcess()
    try:
        child = await worker.warm_up()
        # Evaluated in the child: which of the core's modules it has already imported.
        loaded = await worker.run(
            partial(
                eval,
                "[m for m in ('cj_assessment.scoring_ranking', 'cj_assessment.pair_generation')"
                " if m in __import__('sys').modules]",
            )
        )
        assert await worker.run(os.getpid) == child
    finally:
        worker.close()
    assert child != os.getpid()
    assert loaded == ["cj_assessment.scoring_ranking", "cj_assessment.pair_generation"]


_SERVICE_WITH_A_WORKER = """
import asyncio
from cj_assessment.workers import WorkerProcess

async def main():
    worker = WorkerProcess()
    print(await worker.warm_up(), flush=True)
    await asyncio.sleep(120)

if __name__ == "__main__":
    asyncio.run(main())
"""


async def test_the_worker_process_exits_when_the_service_is_killed(tmp_path: Path) -> None:
    # SIGKILL gives the service no chance to stop its child, and the pool's queues would keep
    # the child (and the forkserver it came from) waiting for ever.
    script = tmp_path / "service.py"
    script.write_text(_SERVICE_WITH_A_WORKER)
    service = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        assert service.stdout is not None
        child = int(await asyncio.wait_for(asyncio.to_thread(service.stdout.readline), 60))
        await asyncio.sleep(1.0)  # the child idle between computations, waiting for work
        assert _running(child)
    finally:
        service.kill()
        service.wait()

    async def stopped() -> bool:
        return not _running(child)

    assert await sleep_until(stopped, timeout=10.0)


def _running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_closing_the_worker_stops_a_computation_it_is_still_running() -> None:
    # At shutdown the transaction that waits for the computation is abandoned; the
    # interpreter would otherwise wait for the child at exit, as long as a large close takes.
    worker = WorkerProcess()
    try:
        child = await worker.run(os.getpid)
        computing = asyncio.create_task(worker.run(partial(time.sleep, 60.0)))
        await asyncio.sleep(0.5)
        computing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await computing
    finally:
        worker.close()

    async def stopped() -> bool:
        return not _running(child)

    assert await sleep_until(stopped, timeout=10.0)
