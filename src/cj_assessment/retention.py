"""Retention: delivery bookkeeping is deleted once it has done its job.

Published outbox rows are kept `outbox_retention_seconds` (their payloads are prompts holding
essay text), inbox rows `inbox_retention_seconds` and unmatched results (a provider's raw
output, which may quote essays) `unmatched_retention_seconds`; 0 keeps them. Unpublished
outbox rows are never deleted. Pruning the inbox gives up no guarantee, because it is not the
only guard: a result redelivered after its event id was pruned finds its attempt already
resolved, and a request finds its bos_batch_id already taken.

With `text_retention_seconds` set, the texts of assessments finished that long ago are erased:
their essays' text, their instructions and the judge's justifications (which may quote the
essays). Essays are pupils' writing, and the service needs their text only while an assessment
runs. Assessments, essay ids, attempts, judgements and scores stay: they are the record of what
was judged and paid for, and the upload row still makes a repeated request a duplicate."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from cj_assessment.metrics import Metrics
from cj_assessment.repository import AssessmentRepository
from cj_assessment.settings import Settings

log = structlog.get_logger(__name__)

PRUNE_LIMIT = 5000  # rows per delete statement, each its own short transaction
# Statements go on while they come back full, for at most this long per table and pass: a
# fixed number of statements would cap pruning below what one instance can write (about
# 3,300 rows/s at 20 statements every 30 s, against bursts of 10,000 results/s), and an
# unbounded loop would hold up the monitor's timeouts behind a backlog.
PRUNE_SECONDS = 5.0
# Assessments whose texts one transaction erases: each may have thousands of essays and tens
# of thousands of attempts, so far fewer than rows per delete.
TEXT_ERASE_LIMIT = 10

_Prune = Callable[[AssessmentRepository, datetime, int], Awaitable[int]]


class Retention:
    def __init__(
        self, settings: Settings, sessions: async_sessionmaker[AsyncSession], metrics: Metrics
    ) -> None:
        self._sessions = sessions
        self._metrics = metrics
        self._tables: list[tuple[str, float, _Prune, int]] = [
            (
                "outbox",
                settings.outbox_retention_seconds,
                AssessmentRepository.prune_outbox,
                PRUNE_LIMIT,
            ),
            (
                "inbox",
                settings.inbox_retention_seconds,
                AssessmentRepository.prune_inbox,
                PRUNE_LIMIT,
            ),
            (
                "unmatched",
                settings.unmatched_retention_seconds,
                AssessmentRepository.prune_unmatched,
                PRUNE_LIMIT,
            ),
            # Counted per assessment whose texts were erased.
            (
                "texts",
                settings.text_retention_seconds,
                AssessmentRepository.erase_texts,
                TEXT_ERASE_LIMIT,
            ),
        ]

    async def prune(self, now: datetime) -> dict[str, int]:
        """Delete what is past its retention at `now`; the rows deleted per table."""
        pruned: dict[str, int] = {}
        for table, seconds, prune, limit in self._tables:
            if seconds <= 0:
                continue
            before = now - timedelta(seconds=seconds)
            pruned[table] = 0
            deadline = time.monotonic() + PRUNE_SECONDS
            while True:
                async with self._sessions() as session, session.begin():
                    deleted = await prune(AssessmentRepository(session), before, limit)
                pruned[table] += deleted
                self._metrics.rows_pruned.labels(table).inc(deleted)
                if deleted < limit or time.monotonic() >= deadline:
                    break
            if pruned[table]:
                log.info("rows_pruned", table=table, rows=pruned[table])
        return pruned
