"""workflow_orchestrator: the one place that decides what an assessment does next.

It starts assessments, and after every change of an assessment's progress (a result, a
timeout, a monitor pass) it is called back to: form retry batches, release submission
batches, and once an iteration is done score it with Bradley-Terry and decide — more
comparisons, completed, or failed. All of it runs inside the caller's transaction while the
assessment's state row is locked; finishing is a compare-and-set on that row."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, Protocol, TypeVar

import numpy as np
import structlog

from cj_assessment import batch_state
from cj_assessment.batch_config import BatchConfig
from cj_assessment.batch_processor import AssessmentContext, BatchProcessor
from cj_assessment.batch_state import Progress
from cj_assessment.completion_policy import (
    Decision,
    Verdict,
    decide_after_scoring,
    first_iteration_size,
    iteration_done,
    retry_due,
)
from cj_assessment.contracts import (
    MAX_ID_CHARS,
    CJAssessmentCompletedV1,
    CJAssessmentFailedV1,
    ProcessingSummary,
    RankingEntry,
    deterministic_event_id,
    envelope_json,
    outcome_header,
    utc_iso,
)
from cj_assessment.database import longer_idle_limit
from cj_assessment.errors import RequestRejected
from cj_assessment.metrics import Metrics, after_commit
from cj_assessment.pair_generation import (
    AbilityEstimates,
    PairingHistory,
    PairingStrategy,
    covers_all_pairs,
    generate_pairs,
)
from cj_assessment.repository import AssessmentRepository, Comparisons, OutboxRow, StateRow
from cj_assessment.scoring_ranking import ScoringResult, score_judgements
from cj_assessment.settings import Settings
from cj_assessment.tables import CJBatchUpload
from cj_assessment.workers import WorkerThread

log = structlog.get_logger(__name__)

_Result = TypeVar("_Result")

# From this many essays, scoring and pair generation run on the worker (a child process in
# `serve`, see `workers.py`). They take seconds at the largest sizes (scoring 2,000 essays:
# 2-10 s, longest with few judgements), and on the event loop that would stall the relay, the
# group heartbeat, the HTTP probes and the rest of the poll. Below it they take milliseconds,
# less than the hand-off is worth.
OFF_LOOP_MIN_ESSAYS = 200
# They run inside the transaction that holds the assessment's row, and queue for the worker
# one at a time. Ended by the connections' idle limit
# (CJ_DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS), the poll would be retried, computed again
# and ended again, for ever; such a transaction may pause this long instead.
LARGE_CLOSE_IDLE_LIMIT_SECONDS = 600.0


class Worker(Protocol):
    """Where large computations run, off the event loop (`workers.WorkerProcess` in `serve`)."""

    async def run(self, compute: Callable[[], _Result]) -> _Result: ...


@dataclass(frozen=True)
class NewAssessment:
    bos_batch_id: str
    correlation_id: str
    essays: list[tuple[str, str | None, str]]  # (essay id, text storage id, text)
    config: BatchConfig
    essay_instructions: str | None
    llm_config_overrides: dict[str, Any]
    language: str | None
    course_code: str | None
    assignment_id: str | None
    user_id: str | None
    org_id: str | None


def hashed_user(user_id: str | None) -> str | None:
    """User ids are personal data: logs carry a short one-way hash instead."""
    if not user_id:
        return None
    return hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:12]


def context_of(upload: CJBatchUpload, state: StateRow) -> AssessmentContext:
    return AssessmentContext(
        cj_batch_id=upload.id,
        bos_batch_id=upload.bos_batch_id,
        correlation_id=upload.event_correlation_id,
        config=BatchConfig.from_json(state.batch_config),
        essay_instructions=upload.essay_instructions,
        llm_config_overrides=upload.llm_config_overrides,
        user_id=upload.user_id,
        started_at=state.started_at,
    )


class WorkflowOrchestrator:
    def __init__(
        self,
        settings: Settings,
        batch_processor: BatchProcessor,
        metrics: Metrics,
        worker: Worker | None = None,
    ):
        self._settings = settings
        self._worker = worker if worker is not None else WorkerThread()
        # One large computation at a time: two at once took twice as long each (the cores
        # are shared with PostgreSQL, the broker and the interpreter lock) and held both
        # dense posteriors in memory, so the first to start would finish no sooner.
        self._off_loop = asyncio.Semaphore(1)
        self._large_close_idle_limit = longer_idle_limit(
            settings.database_idle_in_transaction_timeout_seconds, LARGE_CLOSE_IDLE_LIMIT_SECONDS
        )
        self._batches = batch_processor
        self._metrics = metrics

    # --- start ---------------------------------------------------------------------------

    async def start(
        self, repo: AssessmentRepository, new: NewAssessment, *, now: datetime
    ) -> int | None:
        """Create the assessment and send its first iteration; None for a duplicate request."""
        cj_batch_id = await repo.create_upload(
            bos_batch_id=new.bos_batch_id,
            event_correlation_id=new.correlation_id,
            language=new.language,
            course_code=new.course_code,
            essay_instructions=new.essay_instructions,
            assignment_id=new.assignment_id,
            user_id=new.user_id,
            org_id=new.org_id,
            llm_config_overrides=new.llm_config_overrides,
            expected_essay_count=len(new.essays),
            status="PROCESSING",
        )
        if cj_batch_id is None:
            return None
        await repo.add_essays(cj_batch_id, new.essays)
        await repo.create_state(cj_batch_id, config=new.config.to_json(), now=now)
        state = await repo.lock_state(cj_batch_id)
        assert state is not None
        state.processing_metadata = {"effective_config": new.config.to_json()}
        upload = await repo.upload(cj_batch_id)
        ctx = context_of(upload, state)
        log.info(
            "assessment_started",
            cj_batch_id=cj_batch_id,
            bos_batch_id=new.bos_batch_id,
            essays=len(new.essays),
            user=hashed_user(new.user_id),
            effective_config=new.config.to_json(),
        )
        self._metrics.assessments_started.inc()
        essay_ids = sorted(e[0] for e in new.essays)
        size = first_iteration_size(new.config, len(essay_ids))
        progress = await self._plan_next_iteration(
            repo, ctx, Progress(), essay_ids, PairingHistory.empty(), iteration=1, size=size
        )
        await self.advance(repo, ctx, state, progress, now=now)
        return cj_batch_id

    async def reject(
        self,
        repo: AssessmentRepository,
        *,
        bos_batch_id: str,
        correlation_id: str,
        error: RequestRejected,
        essay_count: int,
        now: datetime,
    ) -> bool:
        """Record a refused request and write its failed event; False for a duplicate. An
        identity too long to store gets its failed event alone, and a repeat is recognised by
        the event's deterministic id (one outbox row per event id while it is kept; consumers
        deduplicate on it too)."""
        cj_batch_id = None
        if len(bos_batch_id) <= MAX_ID_CHARS:
            cj_batch_id = await repo.create_upload(
                bos_batch_id=bos_batch_id,
                event_correlation_id=correlation_id,
                llm_config_overrides={},
                expected_essay_count=essay_count,
                status="FAILED",
                error_code=error.error_code,
                error_message=error.message,
                completed_at=now,
            )
            if cj_batch_id is None:
                return False
        written = await self._write_failed_event(
            repo,
            bos_batch_id=bos_batch_id,
            correlation_id=correlation_id,
            cj_batch_id=cj_batch_id,
            error_code=error.error_code,
            error_message=error.message,
            error_type="RequestRejected",
            context=error.context,
            started_at=now,
            now=now,
        )
        if not written:
            return False
        self._metrics.assessments.labels("rejected").inc()
        log.info(
            "assessment_rejected",
            bos_batch_id=bos_batch_id[:MAX_ID_CHARS],
            bos_batch_id_chars=len(bos_batch_id),
            error_code=error.error_code,
        )
        return True

    # --- the callback into the orchestrator -----------------------------------------------

    async def advance(
        self,
        repo: AssessmentRepository,
        ctx: AssessmentContext,
        state: StateRow,
        progress: Progress,
        *,
        now: datetime,
    ) -> None:
        """Drive the assessment as far as its progress allows, then store it."""
        config = ctx.config
        closing: float | None = None  # when the iteration's close began (perf_counter)
        while True:
            if not iteration_done(progress, config):
                # Only while the iteration runs: at its close the decision comes first, and
                # retries of an assessment that completes would be paid calls for nothing.
                if retry_due(progress, config):
                    progress = await self._batches.plan_retries(repo, ctx, progress)
                progress = await self._batches.release(repo, ctx, progress, now=now)
            if not iteration_done(progress, config):
                await self._batches.store(repo, state, progress, phase="WAITING_CALLBACKS", now=now)
                self._metrics.failed_pool_size.observe(len(progress.pool.entries))
                self._closed(closing)
                return
            closing = closing or time.perf_counter()
            # Read once per iteration close: scoring, the stop decision and the next pairs
            # all work from the same essays and the same planned pairs.
            essay_ids = await repo.essay_ids(ctx.cj_batch_id)
            comparisons = await repo.comparisons(ctx.cj_batch_id)
            history = _pairing_history(comparisons, progress)
            progress, decision, scoring = await self._score_iteration(
                repo,
                ctx,
                progress,
                essay_ids,
                comparisons.judgements,
                settled=_settled_pairs(comparisons, progress),
                now=now,
            )
            match decision.verdict:
                case Verdict.COMPLETE:
                    assert scoring is not None
                    await self._complete(repo, ctx, state, progress, scoring, decision, now=now)
                    self._closed(closing)
                    return
                case Verdict.FAIL:
                    await self._fail(repo, ctx, state, progress, decision.reason, now=now)
                    self._closed(closing)
                    return
                case Verdict.CONTINUE:
                    if progress.pool.entries:
                        # End of iteration: every failed comparison gets its retry, whatever
                        # the pool size, ahead of the next iteration's first attempts.
                        progress = await self._batches.plan_retries(repo, ctx, progress)
                    progress = await self._plan_next_iteration(
                        repo,
                        ctx,
                        progress,
                        essay_ids,
                        history,
                        iteration=progress.current_iteration + 1,
                        size=decision.next_comparisons,
                    )

    def _closed(self, closing: float | None) -> None:
        if closing is not None:
            self._metrics.iteration_close.observe(time.perf_counter() - closing)

    async def _computed(
        self,
        repo: AssessmentRepository,
        essays: int,
        compute: Callable[[], _Result],
        *,
        step: str,
    ) -> _Result:
        """``compute()``, for large assessments on the worker, one at a time, in a
        transaction allowed to pause that long (see OFF_LOOP_MIN_ESSAYS)."""
        started = time.perf_counter()
        if essays < OFF_LOOP_MIN_ESSAYS:
            place, result = "event_loop", compute()
        else:
            if self._large_close_idle_limit > 0:
                await repo.allow_idle(self._large_close_idle_limit)
            async with self._off_loop:
                place, result = "worker", await self._worker.run(compute)
        self._metrics.computation.labels(step, place).observe(time.perf_counter() - started)
        return result

    async def _plan_next_iteration(
        self,
        repo: AssessmentRepository,
        ctx: AssessmentContext,
        progress: Progress,
        essay_ids: list[str],
        history: PairingHistory,
        *,
        iteration: int,
        size: int,
    ) -> Progress:
        rng = np.random.default_rng([ctx.cj_batch_id, iteration])
        # Adaptive pairing works from the latest scored iteration; the first has none and
        # stays random.
        latest = next((it for it in reversed(progress.iterations) if it.scores), None)
        estimates = None
        if latest is not None and latest.scores and latest.standard_errors:
            estimates = AbilityEstimates(latest.scores, latest.standard_errors)
        pairs = await self._computed(
            repo,
            len(essay_ids),
            partial(
                generate_pairs,
                essay_ids,
                history,
                rng,
                matchings=ctx.config.matchings_per_iteration,
                max_pairs=size,
                strategy=PairingStrategy(ctx.config.pairing_strategy),
                estimates=estimates,
            ),
            step="pairing",
        )
        return await self._batches.plan_iteration(
            repo,
            ctx,
            progress,
            iteration=iteration,
            pairs=pairs,
            completes_pairs=covers_all_pairs(essay_ids, [*history.pair_counts, *pairs]),
        )

    async def _score_iteration(
        self,
        repo: AssessmentRepository,
        ctx: AssessmentContext,
        progress: Progress,
        essay_ids: list[str],
        judgements: list[tuple[str, str, bool]],
        *,
        settled: list[tuple[str, str]],
        now: datetime,
    ) -> tuple[Progress, Decision, ScoringResult | None]:
        iteration = progress.current_iteration
        if not judgements:
            progress = batch_state.close_iteration(
                progress,
                iteration=iteration,
                now=utc_iso(now),
                scores={},
                max_score_change=None,
                reliability=None,
            )
            decision = decide_after_scoring(
                progress=progress,
                config=ctx.config,
                essay_count=len(essay_ids),
                scored_essays=0,
                max_score_change=None,
                all_pairs_seen=False,
            )
            return progress, decision, None
        scoring = await self._computed(
            repo,
            len(essay_ids),
            partial(score_judgements, essay_ids, judgements),
            step="scoring",
        )
        scores = scoring.scores()
        previous = next(
            (
                it.scores
                for it in reversed(progress.iterations)
                if it.iteration < iteration and it.scores
            ),
            None,
        )
        change = max(abs(scores[e] - previous.get(e, 0.0)) for e in scores) if previous else None
        progress = batch_state.close_iteration(
            progress,
            iteration=iteration,
            now=utc_iso(now),
            scores=scores,
            max_score_change=change,
            reliability=scoring.reliability,
            standard_errors=scoring.standard_errors(),
            scale_separation_reliability=scoring.scale_separation_reliability,
        )
        await repo.store_scores(
            ctx.cj_batch_id,
            [
                {
                    "els_essay_id": e.essay_id,
                    "score": e.score,
                    "standard_error": e.standard_error,
                    "comparison_count": e.comparison_count,
                    "wins": e.wins,
                    "losses": e.losses,
                    "rank": e.rank,
                }
                for e in scoring.essays
            ],
        )
        scored = [e for e in scoring.essays if e.comparison_count > 0]
        mean_standard_error = (
            sum(e.standard_error for e in scored) / len(scored) if scored else None
        )
        decision = decide_after_scoring(
            progress=progress,
            config=ctx.config,
            essay_count=len(essay_ids),
            scored_essays=len(scored),
            max_score_change=change,
            all_pairs_seen=covers_all_pairs(essay_ids, settled),
            reliability=scoring.reliability,
            reliability_lower_bound=scoring.reliability_lower_bound,
            mean_standard_error=mean_standard_error,
        )
        log.info(
            "iteration_scored",
            cj_batch_id=ctx.cj_batch_id,
            iteration=iteration,
            comparisons_succeeded=progress.completed,
            max_score_change=change,
            reliability=scoring.reliability,
            reliability_lower_bound=scoring.reliability_lower_bound,
            scale_separation_reliability=scoring.scale_separation_reliability,
            mean_standard_error=mean_standard_error,
            position_bias=None if scoring.position_bias is None else scoring.position_bias.logit,
            verdict=decision.verdict.value,
            reason=decision.reason,
        )
        return progress, decision, scoring

    # --- finishing -----------------------------------------------------------------------

    async def _complete(
        self,
        repo: AssessmentRepository,
        ctx: AssessmentContext,
        state: StateRow,
        progress: Progress,
        scoring: ScoringResult,
        decision: Decision,
        *,
        now: datetime,
    ) -> None:
        await self._batches.store(repo, state, progress, phase="SCORING", now=now)
        if not await repo.finish_state(state, state="COMPLETED", now=now):
            return
        await repo.finish_upload(ctx.cj_batch_id, status="COMPLETED", now=now)
        rankings = [
            RankingEntry(
                els_essay_id=e.essay_id,
                rank=e.rank,
                score=round(e.score, 6),
                standard_error=round(e.standard_error, 6),
                comparison_count=e.comparison_count,
                wins=e.wins,
                losses=e.losses,
            )
            for e in scoring.essays
        ]
        failed_ids = [e.essay_id for e in scoring.essays if e.comparison_count == 0]
        ok_ids = [e.essay_id for e in scoring.essays if e.comparison_count > 0]
        attempts = await repo.count_attempts(ctx.cj_batch_id)
        bias = scoring.position_bias
        summary = ProcessingSummary(
            total_essays=len(scoring.essays),
            successful=len(ok_ids),
            failed=len(failed_ids),
            successful_essay_ids=ok_ids,
            failed_essay_ids=failed_ids,
            processing_time_seconds=round((now - ctx.started_at).total_seconds(), 3),
            comparisons_requested=progress.submitted,
            comparisons_succeeded=progress.completed,
            comparisons_failed=progress.failed,
            rounds=progress.current_iteration,
            stop_reason=decision.reason,
            # Calibrated (empirical Bayes): an honest estimate of the squared correlation of
            # the scores with the truth, also under adaptive pairing. The raw SSR, which
            # adaptive pairing inflates, is reported next to it for comparison.
            reliability=None if scoring.reliability is None else round(scoring.reliability, 4),
            # What a target reliability is checked against (see `score_judgements`).
            reliability_lower_bound=None
            if scoring.reliability_lower_bound is None
            else round(scoring.reliability_lower_bound, 4),
            comparison_attempts=attempts,
            # Neither succeeded nor failed for good: still unanswered when the threshold
            # closed the last iteration. requested = succeeded + failed + outstanding.
            comparisons_outstanding=progress.submitted - progress.completed - progress.failed,
            pool_statistics=progress.pool.statistics.to_json(),
            scale_separation_reliability=None
            if scoring.scale_separation_reliability is None
            else round(scoring.scale_separation_reliability, 4),
            position_bias=None
            if bias is None
            else {
                "a_win_share": round(bias.a_win_share, 4),
                "logit": round(bias.logit, 4),
                "standard_error": round(bias.standard_error, 4),
            },
            pairing_strategy=ctx.config.pairing_strategy,
        )
        event = CJAssessmentCompletedV1(
            **outcome_header(
                bos_batch_id=ctx.bos_batch_id,
                stage="completed",
                started_at=ctx.started_at,
                finished_at=now,
            ),
            cj_assessment_job_id=str(ctx.cj_batch_id),
            rankings=rankings,
            processing_summary=summary,
        )
        topic = self._settings.topic_assessment_completed
        envelope = envelope_json(
            event_id=deterministic_event_id(topic, ctx.bos_batch_id),
            event_type=topic,
            correlation_id=ctx.correlation_id,
            data=event,
            now=now,
        )
        await repo.add_outbox([OutboxRow.of(envelope, topic, ctx.bos_batch_id)])
        self._metrics.assessments.labels("completed").inc()
        after_commit(
            partial(
                log.info,
                "assessment_completed",
                cj_batch_id=ctx.cj_batch_id,
                bos_batch_id=ctx.bos_batch_id,
                stop_reason=decision.reason,
                iterations=progress.current_iteration,
                comparisons_succeeded=progress.completed,
                reliability=scoring.reliability,
            )
        )

    async def _fail(
        self,
        repo: AssessmentRepository,
        ctx: AssessmentContext,
        state: StateRow,
        progress: Progress,
        error_code: str,
        *,
        now: datetime,
        message: str | None = None,
    ) -> None:
        await self._batches.store(repo, state, progress, phase="SCORING", now=now)
        if not await repo.finish_state(state, state="FAILED", now=now):
            return
        settled = progress.completed + progress.failed
        message = message or {
            "NO_SCORABLE_ESSAYS": "no comparison succeeded, so no essay could be scored",
            "LOW_SUCCESS_RATE": (
                f"only {progress.completed} of {settled} settled comparisons succeeded; "
                f"the minimum success rate is {ctx.config.min_success_rate:g}"
            ),
        }.get(error_code, error_code)
        await repo.finish_upload(
            ctx.cj_batch_id, status="FAILED", now=now, error_code=error_code, error_message=message
        )
        await self._write_failed_event(
            repo,
            bos_batch_id=ctx.bos_batch_id,
            correlation_id=ctx.correlation_id,
            cj_batch_id=ctx.cj_batch_id,
            error_code=error_code,
            error_message=message,
            error_type="AssessmentFailed",
            context={
                "comparisons_requested": progress.submitted,
                "comparisons_succeeded": progress.completed,
                "comparisons_failed": progress.failed,
                "comparisons_planned": progress.total,
                "iterations": progress.current_iteration,
            },
            started_at=ctx.started_at,
            now=now,
        )
        self._metrics.assessments.labels("failed").inc()
        after_commit(
            partial(
                log.info,
                "assessment_failed",
                cj_batch_id=ctx.cj_batch_id,
                bos_batch_id=ctx.bos_batch_id,
                error_code=error_code,
            )
        )

    async def fail_assessment(
        self,
        repo: AssessmentRepository,
        ctx: AssessmentContext,
        state: StateRow,
        progress: Progress,
        *,
        error_code: str,
        message: str,
        now: datetime,
    ) -> None:
        await self._fail(repo, ctx, state, progress, error_code, now=now, message=message)

    async def _write_failed_event(
        self,
        repo: AssessmentRepository,
        *,
        bos_batch_id: str,
        correlation_id: str,
        cj_batch_id: int | None,
        error_code: str,
        error_message: str,
        error_type: str,
        context: dict[str, Any],
        started_at: datetime,
        now: datetime,
    ) -> int:
        event = CJAssessmentFailedV1(
            **outcome_header(
                bos_batch_id=bos_batch_id,
                stage="failed",
                started_at=started_at,
                finished_at=now,
                error_info={
                    "error_code": error_code,
                    "error_message": error_message,
                    "error_type": error_type,
                    "context": context,
                },
            ),
            # No job was created for a request that could not be stored.
            cj_assessment_job_id="" if cj_batch_id is None else str(cj_batch_id),
        )
        topic = self._settings.topic_assessment_failed
        envelope = envelope_json(
            event_id=deterministic_event_id(topic, bos_batch_id),
            event_type=topic,
            correlation_id=correlation_id,
            data=event,
            now=now,
        )
        return await repo.add_outbox([OutboxRow.of(envelope, topic, bos_batch_id)])


def _pairing_history(comparisons: Comparisons, progress: Progress) -> PairingHistory:
    """The comparisons that count for pairing: judged, awaiting an answer, or with a retry in
    the failed pool. The first comparison of a pair to fail for good leaves it, so that the
    pair can be planned once more and its essays are not left with fewer judgements than
    the others; a pair that fails for good again stays, or a pair the provider always
    refuses would be planned, and paid for, in every iteration."""
    # Failed for good: no winner, no attempt awaiting an answer and no retry in the pool.
    lost = comparisons.unanswered - {entry.comparison_id for entry in progress.pool.entries}
    made_up: set[frozenset[str]] = set()
    pairs = []
    for comparison_id, essay_a, essay_b in comparisons.planned:
        if comparison_id in lost:
            pair = frozenset((essay_a, essay_b))
            if pair not in made_up:
                made_up.add(pair)
                continue
        pairs.append((essay_a, essay_b))
    return PairingHistory.from_pairs(pairs)


def _settled_pairs(comparisons: Comparisons, progress: Progress) -> list[tuple[str, str]]:
    """The pairs with nothing owed: every planned pair but those whose comparison waits in
    the failed pool for its retry or for its retry's answer. Once every pair of essays is
    settled the assessment completes (`all_pairs_compared`); a retry owed would otherwise be
    dropped, its budget unspent. A pair failed for good is settled, or a pair the provider
    always refuses would keep a small assessment running to its budget on repeats; so is a
    pair whose first answer is still on its way, as at any completion."""
    owed = {entry.comparison_id for entry in progress.pool.entries} | comparisons.retrying
    judged = [(a, b) for a, b, _ in comparisons.judgements]
    owed_nothing = [(a, b) for c, a, b in comparisons.planned if c not in owed]
    return judged + owed_nothing
