"""The Kafka edge: one consumer for the request and result topics.

One record, one transaction: the record's event id goes into the inbox, the handler's state
changes and outgoing events (outbox rows) are written, the transaction commits, and only then
is that record's own offset committed (`{tp: offset + 1}`). Transient failures are retried in
place with backoff; permanent ones go to `<topic>.dlt` and the partition moves on."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
)
from pydantic import ValidationError
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from cj_assessment.assessment_request import (
    check_essay_list,
    check_essay_text,
    check_instructions,
    check_outcome_fits,
    check_storable,
    invalid_request,
    schema_rejection,
)
from cj_assessment.batch_callback_handler import BatchCallbackHandler
from cj_assessment.batch_config import (
    merge_override_sources,
    resolve_batch_config,
    unknown_override_fields,
)
from cj_assessment.content import ContentClient
from cj_assessment.contracts import (
    MAX_ID_CHARS,
    ComparisonResultEnvelope,
    ELSCJAssessmentRequestV1,
    ErrorDetail,
    EventEnvelope,
    LLMComparisonResultV1,
    bos_batch_id_of,
    deterministic_event_id,
    unstorable,
)
from cj_assessment.database import transaction
from cj_assessment.errors import (
    PermanentError,
    PoisonMessage,
    RequestRejected,
    ServiceStalled,
    TransientError,
)
from cj_assessment.metrics import Metrics
from cj_assessment.repository import AssessmentRepository, DecodedStates, InboxEntry
from cj_assessment.settings import Settings
from cj_assessment.workflow_orchestrator import NewAssessment, WorkflowOrchestrator

log = structlog.get_logger(__name__)

# How often the result partitions' watermarks are written, and how far before the poll's
# start a partition with nothing left on it counts as handled: a result produced just before
# the poll may not have reached the fetch that reported the partition's end.
WATERMARK_SECONDS = 1.0
WATERMARK_MARGIN = timedelta(seconds=2)
# How long the loop waits for a poll's requests and large assessments' results (an iteration
# close of a large assessment, or a 2,000-essay request, takes seconds) before it fetches the
# next poll beside them. The rest of a poll's results are handled before the next poll, so
# that bursts are still handled a poll per transaction.
POLL_PATIENCE_SECONDS = 0.5
# Requests of one batch are handled one after another, as one chain of work per batch.
_REQUESTS = "\x00requests:"

Clock = Callable[[], datetime]
MAX_UNKNOWN_ERROR_ATTEMPTS = 3


def utcnow() -> datetime:
    return datetime.now(UTC)


def classify(exc: BaseException) -> type[TransientError] | type[PermanentError] | None:
    """Which branch of the error tree an exception belongs to (None: unknown)."""
    if isinstance(exc, TransientError):
        return TransientError
    if isinstance(exc, PermanentError):
        return PermanentError
    if isinstance(exc, DBAPIError):
        return _classify_database_error(exc)
    if isinstance(exc, KafkaError | OSError | asyncio.TimeoutError | ConnectionError):
        return TransientError
    return None


# SQLSTATE classes: 08 connection, 40 rollback (serialization, deadlock), 53 resources,
# 57 operator intervention (shutdown), 58 system error: retrying can succeed.
_TRANSIENT_SQLSTATE_CLASSES = {"08", "40", "53", "57", "58"}
# 55P03 lock_not_available: CJ_DATABASE_LOCK_TIMEOUT_SECONDS passed waiting for a lock;
# 25P03 idle_in_transaction_session_timeout and 25P04 transaction_timeout: PostgreSQL ended a
# session that sat too long in its transaction (this instance was frozen, or overloaded).
_TRANSIENT_SQLSTATES = {"55P03", "25P03", "25P04"}
# 22 data exception (e.g. NUL in text), 23 integrity violation: the same record fails again.
_PERMANENT_SQLSTATE_CLASSES = {"22", "23"}


def _classify_database_error(exc: DBAPIError) -> type[TransientError] | type[PermanentError] | None:
    if exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError):
        return TransientError
    if isinstance(exc, IntegrityError | DataError):
        return PermanentError
    orig = exc.orig
    sqlstate = getattr(orig, "sqlstate", None) or getattr(
        getattr(orig, "__cause__", None), "sqlstate", None
    )
    if isinstance(sqlstate, str):
        if sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES or sqlstate in _TRANSIENT_SQLSTATES:
            return TransientError
        if sqlstate[:2] in _PERMANENT_SQLSTATE_CLASSES:
            return PermanentError
    if isinstance(getattr(orig, "__cause__", None), OSError | ConnectionError):
        return TransientError
    return None


class _Stopped:
    """The service stopped while a transient failure was being retried."""


class _RebalanceListener(ConsumerRebalanceListener):
    def __init__(
        self,
        metrics: Metrics,
        commit: Callable[[AIOKafkaConsumer, set[TopicPartition]], Awaitable[object]],
        consumer: AIOKafkaConsumer,
    ) -> None:
        self._metrics = metrics
        self._commit = commit
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: Any) -> None:
        # Commit what was handled on these partitions before another instance takes them.
        await self._commit(self._consumer, set(revoked))
        self._metrics.rebalances.labels("revoked").inc()
        log.info("partitions_revoked", partitions=len(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self._metrics.rebalances.labels("assigned").inc()
        log.info("partitions_assigned", partitions=len(assigned))


class HandledOffsets:
    """Per partition, the records fetched and not yet handled, and the offset past the last
    handled record ({tp: offset + 1}), kept until it is committed.

    A partition commits only up to its oldest record still open: while one assessment's long
    iteration close holds its records, later records of the same partition are handled, and
    an offset past the open record would skip it after a restart."""

    def __init__(self) -> None:
        self._next: dict[TopicPartition, int] = {}
        # Per partition: offset -> (record timestamp in ms, monotonic time it was fetched).
        self._open: dict[TopicPartition, dict[int, tuple[int, float]]] = {}
        # Handled and not yet committed: (offset, monotonic time fetched), in handling order.
        self._waiting: dict[TopicPartition, list[tuple[int, float]]] = {}
        self._taken: dict[TopicPartition, int] = {}
        self._last_handled_ms: dict[TopicPartition, int] = {}

    def fetched(self, records: Sequence[Any], at: float) -> None:
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            self._open.setdefault(tp, {})[record.offset] = (record.timestamp, at)

    def mark(self, records: Sequence[Any]) -> None:
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            self._next[tp] = max(self._next.get(tp, 0), record.offset + 1)
            self._last_handled_ms[tp] = max(self._last_handled_ms.get(tp, 0), record.timestamp)
            opened = self._open.get(tp)
            entry = opened.pop(record.offset, None) if opened is not None else None
            if opened is not None and not opened:
                del self._open[tp]
            if entry is not None:
                self._waiting.setdefault(tp, []).append((record.offset, entry[1]))

    def open_records(self) -> int:
        """Records fetched and not yet handled."""
        return sum(len(offsets) for offsets in self._open.values())

    def oldest_open_ms(self, tp: TopicPartition) -> int | None:
        """The earliest timestamp among the partition's records not yet handled, if any."""
        opened = self._open.get(tp)
        return min(timestamp for timestamp, _ in opened.values()) if opened else None

    def last_handled_ms(self, tp: TopicPartition) -> int | None:
        return self._last_handled_ms.get(tp)

    def _committable(self, tp: TopicPartition) -> int:
        opened = self._open.get(tp)
        return min(self._next[tp], min(opened)) if opened else self._next[tp]

    def pending(self) -> bool:
        """Offsets handled that could be committed and are not yet."""
        return any(self._committable(tp) > self._taken.get(tp, -1) for tp in self._next)

    def keep(self, offsets: dict[TopicPartition, int]) -> None:
        """Offsets taken but not committed: committed with the next ones."""
        for tp, offset in offsets.items():
            self._next[tp] = max(self._next.get(tp, 0), offset)

    def take(
        self, assigned: set[TopicPartition], only: set[TopicPartition] | None = None
    ) -> dict[TopicPartition, int]:
        """The offsets to commit now (of `only`, if given), forgotten here once they reach the
        last handled record. Partitions no longer assigned are forgotten too: taken away while
        their records were being handled, they are the new owner's to commit, and an offset
        kept here would be committed should the partition come back, behind what the other
        instance committed meanwhile."""
        for kept in (self._next, self._open, self._waiting, self._taken, self._last_handled_ms):
            for tp in [tp for tp in kept if tp not in assigned]:
                del kept[tp]
        taken = {}
        for tp in self._next:
            if only is not None and tp not in only:
                continue
            offset = self._committable(tp)
            if offset > self._taken.get(tp, -1):
                taken[tp] = offset
        for tp, offset in taken.items():
            if offset >= self._next[tp]:
                del self._next[tp]
        return taken

    def committed(self, offsets: dict[TopicPartition, int]) -> list[float]:
        """Offsets the group took: the monotonic fetch times of the handled records they
        cover, forgotten."""
        fetched = []
        for tp, offset in offsets.items():
            self._taken[tp] = max(self._taken.get(tp, -1), offset)
            waiting = self._waiting.get(tp, [])
            fetched += [at for record_offset, at in waiting if record_offset < offset]
            rest = [(o, at) for o, at in waiting if o >= offset]
            if rest:
                self._waiting[tp] = rest
            else:
                self._waiting.pop(tp, None)
        return fetched


class EventConsumer:
    def __init__(
        self,
        settings: Settings,
        sessions: async_sessionmaker[AsyncSession],
        orchestrator: WorkflowOrchestrator,
        callbacks: BatchCallbackHandler,
        content: ContentClient,
        producer: AIOKafkaProducer,
        metrics: Metrics,
        on_commit: Callable[[], None] = lambda: None,
        clock: Clock = utcnow,
        decoded: DecodedStates | None = None,
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._orchestrator = orchestrator
        self._callbacks = callbacks
        self._content = content
        self._producer = producer
        self._metrics = metrics
        self._on_commit = on_commit
        self._clock = clock
        # State rows decoded by earlier transactions, reused while their stored text is the same.
        self._decoded = decoded if decoded is not None else DecodedStates()
        self._handled = HandledOffsets()
        # Work in hand: tasks handling fetched records, and per assessment (or the request
        # chain) the latest of them, which the next records of that assessment wait for.
        self._work: set[asyncio.Task[None]] = set()
        self._tails: dict[str, asyncio.Task[None]] = {}
        self._patient: set[asyncio.Task[None]] = set()  # requests and large assessments' work
        self._slots = asyncio.Semaphore(settings.consumer_result_transactions)
        # Large assessments' transactions, beside those: mostly waiting for the worker process.
        self._large_slots = asyncio.Semaphore(settings.consumer_result_transactions)
        self._request_slots = asyncio.Semaphore(settings.consumer_result_transactions)
        self._halted = False  # work stopped during a transient retry: the service is stopping
        self._failure: BaseException | None = None
        # When the oldest handled offset still uncommitted was first refused (monotonic).
        self._uncommitted_since: float | None = None
        self._watermarks_noted = float("-inf")

    async def run(self, stop: asyncio.Event) -> None:
        s = self._settings
        consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap_servers,
            group_id=s.kafka_consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=s.kafka_max_poll_records,
            # Under load, let the broker gather a larger fetch: one transaction then covers
            # more results. Idle, a fetch returns after at most fetch_max_wait_ms.
            fetch_min_bytes=s.kafka_fetch_min_bytes,
            fetch_max_wait_ms=s.kafka_fetch_max_wait_ms,
        )
        await consumer.start()
        consumer.subscribe(
            [s.topic_assessment_requested, s.topic_llm_comparison_result],
            listener=_RebalanceListener(self._metrics, self._commit_handled, consumer),
        )
        # Records fetched and not yet handled, at most: a poll waits for room below this.
        most_open = 2 * s.kafka_max_poll_records
        try:
            while not stop.is_set() and not self._halted:
                self._raise_if_failed()
                room = most_open - self._handled.open_records()
                if room <= 0:
                    await self._wait_for_work(set(self._work), first=True)
                    await self._commit_and_check(consumer)
                    continue
                polled_at = self._clock()
                # A poll is a transaction's worth: never more than the setting, even with
                # room for two.
                batch = await consumer.getmany(
                    timeout_ms=500, max_records=min(room, s.kafka_max_poll_records)
                )
                assigned = consumer.assignment()
                records = [r for tp, rs in batch.items() if tp in assigned for r in rs]
                if records:
                    self._metrics.poll_records.observe(len(records))
                    self._handled.fetched(records, time.perf_counter())
                    started = await self._dispatch(records, stop)
                    if started is None:
                        break  # stopping during a dead-letter retry: the rest is redelivered
                    # Requests and large assessments' results may take seconds: the next
                    # poll comes in beside them, for the other assessments.
                    if ordinary := started - self._patient:
                        await asyncio.wait(ordinary)
                    await self._wait_for_work(started & self._patient)
                self._raise_if_failed()
                await self._note_watermarks(consumer, polled_at)
                if records or self._handled.pending():
                    # Offsets refused before are tried again while idle too, not only when
                    # the next records come, so that a stall is measured on real attempts.
                    await self._commit_and_check(consumer)
        finally:
            # Stopping, perhaps with the broker away; `serve` may cancel this task at its
            # deadline, and the group is left (consumer.stop) even then.
            budget = s.shutdown_timeout_seconds / 5
            try:
                await self._settle_work(budget)
                await self._commit_handled(consumer, timeout=budget)
            finally:
                try:
                    await asyncio.wait_for(consumer.stop(), timeout=budget)
                except TimeoutError:
                    log.warning("consumer_close_timed_out")
        self._raise_if_failed()

    async def _commit_and_check(self, consumer: AIOKafkaConsumer) -> None:
        await self._commit_handled(consumer)
        self._check_commits_progress()

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def _wait_for_work(self, work: set[asyncio.Task[None]], *, first: bool = False) -> None:
        """Until `work` is done (or the first of it, with `first`), at most
        `POLL_PATIENCE_SECONDS`."""
        if work:
            await asyncio.wait(
                work,
                timeout=POLL_PATIENCE_SECONDS,
                return_when=asyncio.FIRST_COMPLETED if first else asyncio.ALL_COMPLETED,
            )

    async def _settle_work(self, budget: float) -> None:
        """On the way out: work in hand gets `budget` seconds to finish (it stops at its next
        retry, the service stopping), then is cancelled; its records are redelivered."""
        if not self._work:
            return
        _, unfinished = await asyncio.wait(set(self._work), timeout=budget)
        for task in unfinished:
            task.cancel()
        if unfinished:
            await asyncio.wait(unfinished, timeout=budget)

    async def _note_watermarks(self, consumer: AIOKafkaConsumer, polled_at: datetime) -> None:
        """Tell the monitor, about once a second, how far each result partition this instance
        owns has been handled: while records fetched from it are still being handled, to just
        before the oldest of them; when nothing is left on it, to the poll's start or the
        broker's report of its end, whichever is older, less a margin; else to the last handled
        result's timestamp. The monitor times attempts out on the slowest partition's clock
        (`StuckAssessmentMonitor.run_once`)."""
        if time.monotonic() - self._watermarks_noted < WATERMARK_SECONDS:
            return
        # Noted or not, the next try waits its turn: with the database away, every idle poll
        # would otherwise wait out a connection attempt.
        self._watermarks_noted = time.monotonic()
        topic = self._settings.topic_llm_comparison_result
        moments: dict[int, datetime] = {}
        try:
            for tp in consumer.assignment():
                highwater = consumer.highwater(tp) if tp.topic == topic else None
                seen_ms = consumer.last_poll_timestamp(tp) if highwater is not None else None
                if highwater is None or seen_ms is None:
                    continue  # not fetched since it was assigned: nothing known yet
                if (oldest_open := self._handled.oldest_open_ms(tp)) is not None:
                    moments[tp.partition] = datetime.fromtimestamp(
                        oldest_open / 1000, UTC
                    ) - timedelta(milliseconds=1)
                    continue
                position = await asyncio.wait_for(consumer.position(tp), timeout=1)
                if position >= highwater:
                    # Handled up to the partition's end as the broker reported it: as of that
                    # report, which may predate the poll (records buffered before a pause).
                    seen = datetime.fromtimestamp(seen_ms / 1000, UTC)
                    moments[tp.partition] = min(polled_at, seen) - WATERMARK_MARGIN
                elif (last_handled := self._handled.last_handled_ms(tp)) is not None:
                    moments[tp.partition] = datetime.fromtimestamp(last_handled / 1000, UTC)
            if moments:
                async with transaction(self._sessions) as session:
                    await AssessmentRepository(session).note_result_watermarks(topic, moments)
        except Exception as exc:  # noqa: BLE001 - only the monitor's clock waits for the next try
            log.warning("result_watermarks_not_noted", error_class=type(exc).__name__)

    async def _fetch_texts(self, essays: Sequence[Any]) -> dict[str, str]:
        """The texts of essays sent without one, by storage id: each distinct id fetched once,
        `CJ_CONTENT_FETCH_CONCURRENCY` at a time: one by one, a large request's texts took
        40 s (2,000 essays at 20 ms a fetch)."""
        wanted: dict[str, str] = {}  # storage id -> the first essay naming it, for errors
        for essay in essays:
            if essay.text is None:
                wanted.setdefault(essay.text_storage_id or "", essay.essay_id)
        if not wanted:
            return {}
        gate = asyncio.Semaphore(self._settings.content_fetch_concurrency)

        async def fetch(storage_id: str, essay_id: str) -> tuple[str, str]:
            async with gate:
                return storage_id, await self._content.fetch(essay_id, storage_id)

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(fetch(s, e)) for s, e in wanted.items()]
        except ExceptionGroup as failed:
            # The first failure refuses the request; the other fetches were cancelled.
            raise failed.exceptions[0] from None
        return dict(task.result() for task in tasks)

    def _check_commits_progress(self) -> None:
        """Handled records whose offsets the group refuses for too long (a coordinator that
        never comes back, topics gone from under the group): this process is alive but can
        move nothing forward, so it stops for its supervisor to start a fresh one."""
        since = self._uncommitted_since
        stall = self._settings.consumer_commit_stall_seconds
        if since is not None and time.monotonic() - since > stall:
            raise ServiceStalled(f"offsets of handled records not committed for {stall:.0f} s")

    async def _commit_handled(
        self,
        consumer: AIOKafkaConsumer,
        only: set[TopicPartition] | None = None,
        timeout: float | None = None,
    ) -> bool:
        """Commit each partition's offset past its last handled record ({tp: offset + 1});
        False if the offsets were kept for a later commit."""
        offsets = self._handled.take(consumer.assignment(), only)
        if not offsets:
            if not self._handled.pending():
                # Nothing waits any more (offsets of partitions taken away are dropped).
                self._uncommitted_since = None
            return True
        try:
            # aiokafka retries a commit for as long as the coordinator stays away; bounded,
            # so that the loop (and a SIGTERM) is never stuck behind it.
            await asyncio.wait_for(
                consumer.commit(offsets),
                timeout=timeout or self._settings.kafka_operation_timeout_seconds,
            )
        except (CommitFailedError, IllegalStateError) as exc:
            # The partitions moved on; the new owner re-reads these records and its inbox
            # recognises them as handled.
            log.warning("offset_commit_skipped", error_class=type(exc).__name__)
            self._uncommitted_since = None
            return True
        except (KafkaError, TimeoutError) as exc:
            # The coordinator or broker is away for a moment: the next commit carries these
            # offsets too (the handling is committed in the database; a redelivery meanwhile
            # is recognised by the inbox).
            self._handled.keep(offsets)
            if self._uncommitted_since is None:
                self._uncommitted_since = time.monotonic()
            log.warning("offset_commit_deferred", error_class=type(exc).__name__)
            return False
        self._uncommitted_since = None
        now = time.perf_counter()
        for fetched in self._handled.committed(offsets):
            self._metrics.consume_to_commit.observe(now - fetched)
        return True

    async def _dispatch(
        self, records: list[Any], stop: asyncio.Event
    ) -> set[asyncio.Task[None]] | None:
        """Hand a poll's records to work in hand, which handles them concurrently:
        - requests of one batch one after another, after its requests of earlier polls;
          requests of different batches side by side, in slots of their own (a 2,000-essay
          request takes seconds to start, and the requests behind it are others' batches);
        - results by assessment in up to `CJ_CONSUMER_RESULT_TRANSACTIONS` transactions at a
          time; a large assessment's results in a transaction of their own, in slots of their
          own, so that its iteration close (seconds, from `OFF_LOOP_MIN_ESSAYS` essays) holds
          no other assessment's rows or slot;
        - results of an assessment whose earlier results are still being handled after
          them, so that two transactions of this instance never wait for one row.
        Returns the work started, or None if the service stopped while an unreadable result
        was being dead-lettered."""
        results_topic = self._settings.topic_llm_comparison_result
        chains: dict[str, list[Any]] = {}
        for record in (r for r in records if r.topic != results_topic):
            chains.setdefault(_request_chain(record), []).append(record)
        started = {
            self._start({key}, partial(self._handle_each, chain, stop), slots=self._request_slots)
            for key, chain in chains.items()
        }
        decoded = []
        for record in (r for r in records if r.topic == results_topic):
            try:
                decoded.append((record, _decode_result(record)))
            except Exception as exc:  # noqa: BLE001 - unreadable: dead-lettered, never a crash loop
                if not await self._dead_letter(record, exc, stop):
                    return None
                self._handled.mark([record])
        following: dict[asyncio.Task[None], _Group] = {}
        large: dict[str, _Group] = {}
        rest: list[tuple[str, Any, ComparisonResultEnvelope]] = []
        for record, envelope in decoded:
            key = _assessment_key(envelope)
            if (earlier := self._tails.get(key)) is not None:
                keys, items = following.setdefault(earlier, (set(), []))
                keys.add(key)
                items.append((record, envelope))
            elif self._callbacks.is_large(key):
                large.setdefault(key, ({key}, []))[1].append((record, envelope))
            else:
                rest.append((key, record, envelope))
        groups = _by_assessment(rest, self._settings.consumer_result_transactions)
        for keys, group in [*groups, *following.values(), *large.values()]:
            started.add(
                self._start(
                    keys,
                    partial(self._handle_group, group, stop),
                    slots=self._large_slots
                    if all(self._callbacks.is_large(key) for key in keys)
                    else self._slots,
                )
            )
        return started

    def _start(
        self,
        keys: set[str],
        work: Callable[[], Awaitable[None]],
        *,
        slots: asyncio.Semaphore,
    ) -> asyncio.Task[None]:
        """Run `work` once the work in hand on any of `keys` is done, holding one of `slots`.
        Requests and large assessments' work have slots of their own, so that a request's
        start or a large close (which takes the worker process one at a time, see
        `WorkflowOrchestrator._computed`) leaves the other results' slots free."""
        earlier = {self._tails[key] for key in keys if key in self._tails}
        task = asyncio.create_task(self._after(earlier, work, slots))
        self._work.add(task)
        if slots is not self._slots:
            self._patient.add(task)
        for key in keys:
            self._tails[key] = task
        task.add_done_callback(partial(self._work_done, keys))
        return task

    async def _after(
        self,
        earlier: set[asyncio.Task[None]],
        work: Callable[[], Awaitable[None]],
        slots: asyncio.Semaphore,
    ) -> None:
        if earlier:
            await asyncio.wait(earlier)
        async with slots:
            await work()

    def _work_done(self, keys: set[str], task: asyncio.Task[None]) -> None:
        self._work.discard(task)
        self._patient.discard(task)
        for key in keys:
            if self._tails.get(key) is task:
                del self._tails[key]
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Only the dead-letter path raises (a broker refusing the copy): the service
            # stops rather than let a partition pass a record that is nowhere.
            self._failure = self._failure or exc

    async def _handle_group(
        self, group: list[tuple[Any, ComparisonResultEnvelope]], stop: asyncio.Event
    ) -> None:
        records = [record for record, _ in group]
        if not self._settings.consumer_batch_transactions:
            await self._handle_each(records, stop)
            return
        outcome = await self._attempt(partial(self._handle_results, group), stop, records)
        if outcome is _Stopped:
            self._halted = True
            return
        if isinstance(outcome, BaseException):
            # A record of the group cannot be stored: one transaction per record, in offset
            # order, so that only it is dead-lettered and no offset passes an unhandled record.
            await self._handle_each(sorted(records, key=lambda r: (r.partition, r.offset)), stop)
            return
        self._handled.mark(records)

    async def _handle_each(self, records: list[Any], stop: asyncio.Event) -> None:
        for record in records:
            if not await self._process_one(record, stop):
                self._halted = True
                return

    async def _process_one(self, record: Any, stop: asyncio.Event) -> bool:
        outcome = await self._attempt(lambda: self._process_record(record), stop, [record])
        if outcome is _Stopped:
            return False
        if isinstance(outcome, BaseException) and not await self._dead_letter(
            record, outcome, stop
        ):
            return False
        self._handled.mark([record])
        return True

    async def _attempt(
        self, work: Callable[[], Awaitable[None]], stop: asyncio.Event, records: list[Any]
    ) -> object:
        """Run `work` until it succeeds (None), fails for good (the exception), or the service
        stops during a transient retry (_Stopped)."""
        delay = 0.1
        unknown_failures = 0
        while True:
            try:
                await work()
                return None
            except Exception as exc:  # noqa: BLE001 - every failure ends in retry or dead letter
                kind = classify(exc)
                if kind is None:
                    unknown_failures += 1
                    kind = (
                        PermanentError
                        if unknown_failures >= MAX_UNKNOWN_ERROR_ATTEMPTS
                        else TransientError
                    )
                    log.exception(
                        "records_failed_unexpectedly",
                        topic=records[0].topic,
                        first_offset=records[0].offset,
                        records=len(records),
                    )
                if kind is PermanentError:
                    return exc
                self._metrics.transient_retries.labels(records[0].topic).inc(len(records))
                log.warning(
                    "records_retry",
                    topic=records[0].topic,
                    first_offset=records[0].offset,
                    records=len(records),
                    error_class=type(exc).__name__,
                    delay_seconds=delay,
                )
                if await _stopped_within(stop, delay):
                    return _Stopped
                delay = min(delay * 2, 10.0)

    async def _dead_letter(self, record: Any, exc: BaseException, stop: asyncio.Event) -> bool:
        """Copy `record` to `<topic>.dlt` with why it failed; False if the service stopped
        before the broker took it (the record is then redelivered, not skipped).

        A record the broker accepted can still be too large to copy (the headers add to it):
        the copy then goes without its value (`dlt.value.dropped.bytes` says how large it
        was), then without its key too; the source partition and offset locate the original.
        A broker away is waited for; any other refusal stops the service rather than let a
        partition pass a record that is nowhere."""
        reason = "poison" if isinstance(exc, PoisonMessage) else type(exc).__name__
        message = _short_message(exc)
        headers = [
            ("dlt.source.topic", record.topic.encode()),
            ("dlt.source.partition", str(record.partition).encode()),
            ("dlt.source.offset", str(record.offset).encode()),
            ("dlt.error.class", type(exc).__name__.encode()),
            ("dlt.error.message", message.encode()),
        ]
        value, key = record.value, record.key
        delay = 0.1
        while True:
            try:
                # One copy per try: its acknowledgement is then waited for as long as it takes
                # (an idempotent producer retries it until the broker is back), never sent
                # again on a mere timeout, which would leave several copies in the topic.
                delivery = await asyncio.wait_for(
                    self._producer.send(
                        f"{record.topic}.dlt", value=value, key=key, headers=headers
                    ),
                    timeout=self._settings.kafka_operation_timeout_seconds,
                )
                if not await _acknowledged_unless_stopped(delivery, stop, record.topic):
                    return False
                break
            except (MessageSizeTooLargeError, RecordTooLargeError):
                if value is not None:
                    headers.append(("dlt.value.dropped.bytes", str(len(value)).encode()))
                    value = None
                elif key is not None:
                    headers.append(("dlt.key.dropped.bytes", str(len(key)).encode()))
                    key = None
                else:
                    raise
                log.warning("dead_letter_copy_shortened", topic=record.topic)
            except (KafkaError, TimeoutError) as send_error:
                if not _broker_away(send_error):
                    raise
                log.warning(
                    "dead_letter_send_retry",
                    topic=record.topic,
                    error_class=type(send_error).__name__,
                    delay_seconds=delay,
                )
                if await _stopped_within(stop, delay):
                    return False
                delay = min(delay * 2, 10.0)
        self._metrics.dead_letters.labels(record.topic, reason).inc()
        self._metrics.records.labels(record.topic, "dead_lettered").inc()
        log.warning(
            "record_dead_lettered",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            error_class=type(exc).__name__,
            error=message,
        )
        return True

    async def _process_record(self, record: Any) -> None:
        if record.topic == self._settings.topic_llm_comparison_result:
            await self._handle_results([(record, _decode_result(record))])
            return
        if record.topic == self._settings.topic_assessment_requested:
            envelope, refusal = _request_envelope(record)
            outcome = await self._handle_request(record, envelope, refusal)
            self._metrics.records.labels(record.topic, outcome).inc()
            return
        raise PoisonMessage(f"no handler for topic {record.topic}")

    async def _handle_results(self, decoded: list[tuple[Any, ComparisonResultEnvelope]]) -> None:
        parsed = [(record, env, env.data) for record, env in decoded]
        started = time.perf_counter()
        outcomes: dict[int, str] = {}
        async with transaction(self._sessions) as session:
            repo = AssessmentRepository(session, self._decoded)
            claimed = await repo.claim_inbox(
                [InboxEntry(env.event_id, r.topic, r.partition, r.offset) for r, env, _ in parsed]
            )
            fresh = []
            for index, (_, env, result) in enumerate(parsed):
                if env.event_id in claimed:
                    claimed.discard(env.event_id)  # a repeat within this poll is a duplicate
                    fresh.append((index, env.event_id, result))
                else:
                    outcomes[index] = "duplicate"
            handled = await self._callbacks.handle_results(
                repo,
                # Raw bytes: only a result matching nothing is stored with its payload.
                [(result, parsed[i][0].value) for i, _, result in fresh],
                now=self._clock(),
            )
            for (index, _, _), outcome in zip(fresh, handled, strict=True):
                outcomes[index] = outcome.value
            await repo.set_inbox_outcomes(
                {
                    event_id: outcomes[index]
                    for index, event_id, _ in fresh
                    if outcomes[index] != "handled"
                }
            )
        self._after_commit(parsed[0][0] if parsed else None)
        topic = self._settings.topic_llm_comparison_result
        for outcome, count in Counter(outcomes.values()).items():
            self._metrics.records.labels(topic, outcome).inc(count)
        if parsed:
            self._metrics.callback_processing.observe((time.perf_counter() - started) / len(parsed))

    def _after_commit(self, record: Any | None) -> None:
        self._on_commit()
        if self._settings.fault_kill_after_db_commit:
            log.warning(
                "fault_hook_exit",
                topic=getattr(record, "topic", None),
                offset=getattr(record, "offset", None),
            )
            os._exit(17)

    async def _in_transaction(
        self,
        record: Any,
        envelope: EventEnvelope,
        work: Callable[[AssessmentRepository, datetime], Awaitable[Any]],
    ) -> str:
        async with transaction(self._sessions) as session:
            repo = AssessmentRepository(session, self._decoded)
            entry = InboxEntry(envelope.event_id, record.topic, record.partition, record.offset)
            if not await repo.claim_inbox([entry]):
                return "duplicate"
            outcome = str(await work(repo, self._clock()))
            if outcome != "handled":
                await repo.set_inbox_outcomes({envelope.event_id: outcome})
        self._after_commit(record)
        return outcome

    async def _handle_request(
        self, record: Any, envelope: EventEnvelope, refusal: RequestRejected | None
    ) -> str:
        correlation_id = envelope.correlation_id or envelope.event_id
        if refusal is not None:
            identity = bos_batch_id_of(envelope.data)
            if identity is None:
                raise PoisonMessage(refusal.message)
            return await self._refuse(
                record, envelope, identity, correlation_id, refusal, _essay_count(envelope.data)
            )
        try:
            request = ELSCJAssessmentRequestV1.model_validate(envelope.data)
        except ValidationError as exc:
            identity = bos_batch_id_of(envelope.data)
            if identity is None:
                raise _invalid(ELSCJAssessmentRequestV1, exc) from exc
            # The pipeline waits for an outcome of this batch: it gets a failed event naming
            # the invalid fields, not only a dead letter it never reads.
            return await self._refuse(
                record,
                envelope,
                identity,
                correlation_id,
                schema_rejection(exc),
                _essay_count(envelope.data),
            )
        bos_batch_id = request.bos_batch_id
        if not bos_batch_id:
            raise PoisonMessage("request names no entity_ref.entity_id or entity_id")
        async with self._sessions() as session:
            known = await AssessmentRepository(session).upload_exists(bos_batch_id)
        if known:
            return await self._in_transaction(record, envelope, _duplicate)
        try:
            new = await self._accept(request, envelope, bos_batch_id, correlation_id)
        except RequestRejected as exc:
            return await self._refuse(
                record, envelope, bos_batch_id, correlation_id, exc, len(request.essays_for_cj)
            )

        async def start(repo: AssessmentRepository, now: datetime) -> str:
            created = await self._orchestrator.start(repo, new, now=now)
            return "handled" if created is not None else "duplicate"

        return await self._in_transaction(record, envelope, start)

    async def _refuse(
        self,
        record: Any,
        envelope: EventEnvelope,
        bos_batch_id: str,
        correlation_id: str,
        error: RequestRejected,
        essay_count: int,
    ) -> str:
        async def reject(repo: AssessmentRepository, now: datetime) -> str:
            done = await self._orchestrator.reject(
                repo,
                bos_batch_id=bos_batch_id,
                correlation_id=correlation_id,
                error=error,
                essay_count=essay_count,
                now=now,
            )
            return "rejected" if done else "duplicate"

        return await self._in_transaction(record, envelope, reject)

    async def _accept(
        self,
        request: ELSCJAssessmentRequestV1,
        envelope: EventEnvelope,
        bos_batch_id: str,
        correlation_id: str,
    ) -> NewAssessment:
        s = self._settings
        check_storable(request)
        essays = check_essay_list(request, max_essays=s.max_essays)
        check_instructions(request, max_chars=s.max_instructions_chars)
        metadata = envelope.metadata or {}
        if unknown := unknown_override_fields(
            request.batch_config_overrides, metadata.get("batch_config_overrides")
        ):
            log.warning("batch_config_overrides_ignored", bos_batch_id=bos_batch_id, fields=unknown)
        config = resolve_batch_config(
            s,
            essay_count=len(essays),
            overrides=merge_override_sources(
                request.batch_config_overrides, metadata.get("batch_config_overrides")
            ),
            metadata_max_comparisons=metadata.get("max_comparisons"),
        )
        check_outcome_fits(
            bos_batch_id,
            essays,
            max_count=config.max_comparisons,
            max_bytes=s.kafka_max_message_bytes,
        )
        fetched = await self._fetch_texts(essays)
        texts = []
        for essay in essays:
            text = essay.text if essay.text is not None else fetched[essay.text_storage_id or ""]
            texts.append(
                (
                    essay.essay_id,
                    essay.text_storage_id,
                    check_essay_text(essay.essay_id, text, max_chars=s.max_essay_chars),
                )
            )
        overrides = (
            request.llm_config_overrides.model_dump() if request.llm_config_overrides else {}
        )
        llm = {
            "model_override": overrides.get("model_override") or s.llm_default_model,
            "temperature_override": overrides.get("temperature_override")
            if overrides.get("temperature_override") is not None
            else s.llm_default_temperature,
            "max_tokens_override": overrides.get("max_tokens_override") or s.llm_default_max_tokens,
            "provider_override": overrides.get("provider_override") or s.llm_default_provider,
        }
        return NewAssessment(
            bos_batch_id=bos_batch_id,
            correlation_id=correlation_id,
            essays=texts,
            config=config,
            essay_instructions=request.essay_instructions,
            llm_config_overrides=llm,
            language=request.language,
            course_code=request.course_code,
            assignment_id=request.assignment_id,
            user_id=request.user_id,
            org_id=request.org_id,
        )


async def _duplicate(repo: AssessmentRepository, now: datetime) -> str:
    return "duplicate"


def _request_chain(record: Any) -> str:
    """The chain of work a request joins: its batch's, so that a repeat finds the assessment
    the first one created (run side by side, the second would fail on the batch's unique
    key). A request whose batch cannot be read joins the chain of all such requests."""
    try:
        envelope, _ = _request_envelope(record)
        data = envelope.data
        identity = bos_batch_id_of(data) if isinstance(data, dict) else None
    except Exception:  # noqa: BLE001 - unreadable: its own handling dead-letters it
        identity = None
    return _REQUESTS + (identity or "")


def _assessment_key(envelope: ComparisonResultEnvelope) -> str:
    """The assessment a result belongs to, as the echoed request metadata names it; a result
    without it goes by its correlation id, which can only cost a lock wait."""
    result = envelope.data
    return str((result.request_metadata or {}).get("bos_batch_id") or result.correlation_id)


_Group = tuple[set[str], list[tuple[Any, ComparisonResultEnvelope]]]
"""Results handled in one transaction, with the assessments (`_assessment_key`) they belong to."""


def _by_assessment(
    keyed: list[tuple[str, Any, ComparisonResultEnvelope]], count: int
) -> list[_Group]:
    """Split results, each with its `_assessment_key`, into at most `count` groups, each
    assessment's results in one group and in arrival order."""
    groups: list[_Group] = [(set(), []) for _ in range(count)]
    for key, record, envelope in keyed:
        keys, items = groups[hash(key) % count]
        keys.add(key)
        items.append((record, envelope))
    return [group for group in groups if group[1]]


async def _stopped_within(stop: asyncio.Event, delay: float) -> bool:
    """Wait out a retry's backoff; True if the service stopped meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=delay)
        return True
    except TimeoutError:
        return False


async def _acknowledged_unless_stopped(
    delivery: asyncio.Future[Any], stop: asyncio.Event, topic: str
) -> bool:
    """True once the broker acknowledged `delivery` (its failure is raised); False if the
    service stopped first."""
    stopping = asyncio.ensure_future(stop.wait())
    try:
        while not delivery.done():
            await asyncio.wait({delivery, stopping}, timeout=30.0, return_when="FIRST_COMPLETED")
            if stopping.done() and not delivery.done():
                return False
            if not delivery.done():
                log.warning("dead_letter_waiting_for_broker", topic=topic)
    finally:
        stopping.cancel()
    delivery.result()
    return True


def _broker_away(exc: BaseException) -> bool:
    """A Kafka failure that waiting can cure (aiokafka does not mark its own timeout so)."""
    return isinstance(exc, TimeoutError | KafkaTimeoutError) or (
        isinstance(exc, KafkaError) and exc.retriable
    )


JSON_INT_DIGITS = 4000


def _request_envelope(record: Any) -> tuple[EventEnvelope, RequestRejected | None]:
    """A request's envelope, and its refusal when the envelope breaks CONTRACT §3 (a field
    missing or mistyped, an id the database cannot store). Such a request is still answered
    when its data names its batch: the envelope is rebuilt from what is usable, with a
    stand-in for an unusable event id (derived from the record's place in the topic, so a
    redelivery is recognised) and the event id for an unusable correlation id."""
    if record.value is None:
        raise PoisonMessage("record has no value")
    try:
        raw = json.loads(record.value.decode("utf-8"), parse_int=_json_int)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PoisonMessage(f"undecodable record: {type(exc).__name__}") from exc
    if not isinstance(raw, dict):
        raise PoisonMessage("envelope is not a JSON object")
    problems: list[tuple[str, str]] = []
    try:
        envelope = EventEnvelope.model_validate(raw)
    except ValidationError as exc:
        for error in exc.errors(include_url=False, include_input=False):
            problems.append((".".join(str(p) for p in error["loc"]) or "envelope", error["msg"]))
    else:
        if isinstance(raw.get("event_id"), bool) or not envelope.event_id:
            # `true` would be read as "True", "" as itself: one inbox key for every such
            # request, each after the first taken for a repeat.
            problems.append(("event_id", "must be non-empty text or a number"))
        for name in ("event_id", "correlation_id"):
            value = getattr(envelope, name)
            if value is not None and (why := unstorable(value)):
                problems.append((name, why))
        if not problems:
            return envelope, None
    named = "; ".join(f"{field}: {why}" for field, why in problems[:10])
    data = raw.get("data")
    if not isinstance(data, dict):
        raise PoisonMessage(f"EventEnvelope invalid: {named}"[:300])
    broken = {field.split(".")[0] for field, _ in problems}

    def usable(name: str) -> str | None:
        value = raw.get(name)
        if name in broken or not isinstance(value, str | int) or isinstance(value, bool):
            return None
        text = str(value)
        return text if 0 < len(text) <= MAX_ID_CHARS and unstorable(text) is None else None

    event_id = usable("event_id") or _stand_in_event_id(record)
    rebuilt = EventEnvelope.model_construct(
        event_id=event_id,
        event_type=str(raw.get("event_type")),
        correlation_id=usable("correlation_id") or event_id,
        data=data,
        metadata=None,
    )
    refusal = invalid_request(
        "the request's envelope does not match EventEnvelope",
        [(f"envelope.{field}", why) for field, why in problems],
    )
    return rebuilt, refusal


def _json_int(digits: str) -> int | str:
    """An integer as written, or, past what Python reads as an integer (4,300 digits), its
    digits as text: the field that expected a number then refuses it by its type or length,
    with a failed event, instead of the whole record failing to decode."""
    return int(digits) if len(digits) <= JSON_INT_DIGITS else digits


def _essay_count(data: dict[str, Any]) -> int:
    essays = data.get("essays_for_cj")
    return len(essays) if isinstance(essays, list) else 0


def _decode_result(record: Any) -> ComparisonResultEnvelope:
    if record.value is None:
        raise PoisonMessage("record has no value")
    try:
        envelope = ComparisonResultEnvelope.model_validate_json(record.value)
    except ValidationError as exc:
        envelope = _result_as_far_as_readable(record, exc)
    event_id = envelope.event_id
    if not event_id or len(event_id) > MAX_ID_CHARS or unstorable(event_id):
        # The inbox could not key on it; the answer itself is paid for and still counts.
        envelope.event_id = _stand_in_event_id(record)
    return envelope


# Fields of a result the service only records or ignores: a value that does not fit is
# dropped (the field's default applies) rather than the paid answer refused. Every field of
# the models but the verdict, the correlation id and an error's code, so a field added to a
# model is covered too.
_STRICT = {("data",), ("data", "correlation_id"), ("data", "winner"), ("data", "error_detail")}
_DROPPABLE = (
    frozenset(
        {(name,) for name in ComparisonResultEnvelope.model_fields}
        | {("data", name) for name in LLMComparisonResultV1.model_fields}
        | {
            ("data", "error_detail", name)
            for name in ErrorDetail.model_fields
            if name != "error_code"
        }
    )
    - _STRICT
)


def _result_as_far_as_readable(record: Any, error: ValidationError) -> ComparisonResultEnvelope:
    """A result the strict parse refused, read as far as its paid answer allows.

    - JSON that escapes an unpaired surrogate (`"\\ud800"`), which pydantic's parser refuses, is
      parsed by the standard library; its texts are made storable where every provider text
      is (`batch_callback_handler._store_result`). Anything else the parser refused stays
      refused (`NaN` and `Infinity` included).
    - Values that do not fit a field the service only records (`_DROPPABLE`: a fractional
      `response_time_ms`, a null error message, a list for `metadata`, ...) are dropped,
      and the field names logged (`result_fields_dropped`).
    Everything else (the verdict, the correlation id, winner and error together) is refused."""
    try:
        # Refuses what pydantic's parser refused but for the surrogates (NaN, trailing bytes),
        # and integers beyond the standard library's limit.
        data = json.loads(record.value, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError):
        raise _invalid(ComparisonResultEnvelope, error) from error
    try:
        return ComparisonResultEnvelope.model_validate(data)
    except ValidationError as exc:
        error = exc
    dropped = _drop_unfitting(data, error)
    if not dropped:
        raise _invalid(ComparisonResultEnvelope, error) from error
    try:
        envelope = ComparisonResultEnvelope.model_validate(data)
    except ValidationError as exc:
        raise _invalid(ComparisonResultEnvelope, exc) from exc
    log.warning(
        "result_fields_dropped",
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        fields=",".join(".".join(path) for path in dropped),
    )
    return envelope


def _drop_unfitting(data: Any, error: ValidationError) -> list[tuple[str, ...]]:
    """Remove from `data` the droppable fields `error` found wrong; the paths removed, or none
    when any other field is wrong too (the result is then refused as it is)."""
    paths: list[tuple[str, ...]] = []
    for problem in error.errors():
        loc = tuple(str(part) for part in problem["loc"])
        path = next((loc[:n] for n in range(len(loc), 0, -1) if loc[:n] in _DROPPABLE), None)
        if path is None:
            return []
        if path not in paths:
            paths.append(path)
    for path in paths:
        parent = data
        for part in path[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if isinstance(parent, dict):
            parent.pop(path[-1], None)
    return paths


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _stand_in_event_id(record: Any) -> str:
    """An event id for a record whose own cannot key the inbox: derived from the record's
    place in its topic, so that a redelivery of the record is recognised."""
    return str(
        deterministic_event_id(
            "unusable-event-id", record.topic, str(record.partition), str(record.offset)
        )
    )


def _invalid(model: Any, exc: ValidationError) -> PoisonMessage:
    fields = ",".join(".".join(str(p) for p in err["loc"]) for err in exc.errors()[:5])
    return PoisonMessage(f"{model.__name__} invalid at: {fields or 'json'}")


def _short_message(exc: BaseException) -> str:
    # Messages of our own errors name fields, never values; driver messages can quote data.
    if isinstance(exc, PoisonMessage | RequestRejected):
        return str(exc)[:300]
    return type(exc).__name__
