"""Reads and writes of one handling transaction. Every method runs on the caller's session;
the caller owns the transaction (`async with session.begin()`)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import TextClause, event, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from cj_assessment.batch_state import AttemptStatus, Progress, Unanswered
from cj_assessment.database import set_idle_limit
from cj_assessment.tables import (
    TERMINAL_STATES,
    CJBatchState,
    CJBatchUpload,
    CJComparisonPair,
    CJProcessedEssay,
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
    request_event_id: uuid.UUID


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


@dataclass(slots=True)
class AttemptRecord:
    """One comparison attempt as the result path reads and writes it: a plain value, not an
    ORM object, because a poll touches hundreds of them (identity-map bookkeeping and a
    per-object flush were a third of the handler's time). `siblings` maps every attempt
    number of the same comparison to its status; records of one comparison read together
    share one map, so that an outcome recorded for one attempt is seen by its siblings. Result
    fields hold the values the row should have once written by
    `AssessmentRepository.save_attempts`."""

    id: int
    cj_batch_id: int
    comparison_id: uuid.UUID
    correlation_id: uuid.UUID
    essay_a_id: str
    essay_b_id: str
    iteration: int
    attempt: int
    submission_batch_id: uuid.UUID
    status: str
    submitted_at: datetime | None
    completed_at: datetime | None
    siblings: dict[int, str]
    winner: str | None = None
    confidence: float | None = None
    justification: str | None = None
    error_code: str | None = None
    error_details: dict[str, Any] | None = None
    provider: str | None = None
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cost_estimate: float | None = None
    response_time_ms: int | None = None
    is_late: bool = False


_ATTEMPT_COLUMNS = (
    "p.id, p.cj_batch_id, p.comparison_id, p.request_correlation_id, p.essay_a_els_id,"
    " p.essay_b_els_id, p.iteration, p.attempt, p.submission_batch_id, p.status,"
    " p.submitted_at, p.completed_at, s.attempts, s.statuses"
)
# Every attempt of the same comparison comes along (retries decide whether it is resolved).
_SIBLINGS = (
    " CROSS JOIN LATERAL (SELECT array_agg(q.attempt) AS attempts,"
    " array_agg(q.status) AS statuses FROM cj_comparison_pairs AS q"
    " WHERE q.comparison_id = p.comparison_id) AS s"
)


def _attempt_records(rows: Sequence[Any]) -> list[AttemptRecord]:
    """Records of one read; attempts of the same comparison share one `siblings` map. With a
    map each, a timed-out attempt and its retry answered in the same poll would each see the
    other unresolved, and the comparison would be counted, and scored, twice."""
    records = [_attempt_record(row) for row in rows]
    shared: dict[uuid.UUID, dict[int, str]] = {}
    for record in records:
        record.siblings = shared.setdefault(record.comparison_id, record.siblings)
    return records


def _attempt_record(row: Any) -> AttemptRecord:
    return AttemptRecord(
        id=row[0],
        cj_batch_id=row[1],
        comparison_id=row[2],
        correlation_id=row[3],
        essay_a_id=row[4],
        essay_b_id=row[5],
        iteration=row[6],
        attempt=row[7],
        submission_batch_id=row[8],
        status=row[9],
        submitted_at=row[10],
        completed_at=row[11],
        siblings=dict(zip(row[12], row[13], strict=True)),
    )


def _unnest(columns: dict[str, str], *, ordinality: bool = False) -> str:
    """`unnest(CAST(:name AS type[]), …) AS v(name, …)`: many rows as one statement's
    parameters, one array per column (bound under the column's name), so a poll's or an
    iteration's rows cost one round trip and one cached statement whatever their number."""
    arrays = ", ".join(f"CAST(:{name} AS {kind}[])" for name, kind in columns.items())
    names = ", ".join([*columns, "position"] if ordinality else columns)
    return f"unnest({arrays}){' WITH ORDINALITY' if ordinality else ''} AS v({names})"


def _arrays(
    records: Sequence[Any], columns: Iterable[str], types: dict[str, str]
) -> dict[str, list[Any]]:
    """One list per column of the records' attributes: the parameters of a statement over
    `_unnest`. jsonb columns go as JSON text, which is what the driver's jsonb codec takes."""
    values: dict[str, list[Any]] = {}
    for column in columns:
        items = [getattr(r, column) for r in records]
        if types.get(column) == "jsonb":
            items = [None if item is None else json.dumps(item) for item in items]
        values[column] = items
    return values


def _update_by_key(table: str, key: tuple[str, str], columns: dict[str, str]) -> TextClause:
    """`UPDATE table SET column = v.column, … FROM unnest(…)`: new values of many rows, one
    array per column, matched on the primary key `key` (name, type). The key array is also an
    index condition, so the rows are found by primary key whatever plan the join gets, never
    by scanning the table."""
    name, kind = key
    return text(
        f"UPDATE {table} AS t SET "
        + ", ".join(f"{c} = v.{c}" for c in columns)
        + f" FROM {_unnest({name: kind, **columns})}"
        f" WHERE t.{name} = v.{name} AND t.{name} = ANY(CAST(:{name} AS {kind}[]))"
    )


_INBOX_CLAIM = text(
    'INSERT INTO cj_event_inbox (event_id, topic, partition, "offset", outcome)'
    " SELECT v.event_id, v.topic, v.partition, v.record_offset, 'handled' FROM "
    + _unnest(
        {"event_id": "text", "topic": "text", "partition": "integer", "record_offset": "bigint"}
    )
    + " ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
)
_INBOX_OUTCOMES = text(
    "UPDATE cj_event_inbox AS i SET outcome = v.outcome FROM "
    + _unnest({"event_id": "text", "outcome": "text"})
    + " WHERE i.event_id = v.event_id"
)
_SCORE_COLUMNS = {
    "els_essay_id": "text",
    "score": "float8",
    "standard_error": "float8",
    "comparison_count": "integer",
    "wins": "integer",
    "losses": "integer",
    "rank": "integer",
}
_SCORES = text(
    "UPDATE cj_processed_essays AS e SET current_bt_score = v.score,"
    " current_bt_se = v.standard_error, comparison_count = v.comparison_count, wins = v.wins,"
    " losses = v.losses, rank = v.rank FROM "
    + _unnest(_SCORE_COLUMNS)
    + " WHERE e.cj_batch_id = :cj_batch_id AND e.els_essay_id = v.els_essay_id"
)
_OUTBOX_COLUMNS = {"event_id": "uuid", "topic": "text", "message_key": "text", "payload": "text"}
# Ids follow the order of the rows: the relay publishes in id order.
_ADD_OUTBOX = text(
    f"INSERT INTO cj_event_outbox ({', '.join(_OUTBOX_COLUMNS)})"
    f" SELECT {', '.join('v.' + c for c in _OUTBOX_COLUMNS)}"
    f" FROM {_unnest(_OUTBOX_COLUMNS, ordinality=True)} ORDER BY v.position"
    " ON CONFLICT (event_id) DO NOTHING"
)
_NEW_ATTEMPT_COLUMNS = {
    "comparison_id": "uuid",
    "request_correlation_id": "uuid",
    "essay_a_els_id": "text",
    "essay_b_els_id": "text",
    "iteration": "integer",
    "attempt": "integer",
    "submission_batch_id": "uuid",
    "request_event_id": "uuid",
}
# WITH ORDINALITY: ids are assigned in planning order, which is the order requests go out.
_INSERT_ATTEMPTS = text(
    f"INSERT INTO cj_comparison_pairs (cj_batch_id, {', '.join(_NEW_ATTEMPT_COLUMNS)},"
    " status, is_late)"
    f" SELECT :cj_batch_id, {', '.join('v.' + c for c in _NEW_ATTEMPT_COLUMNS)}, :queued, false"
    f" FROM {_unnest(_NEW_ATTEMPT_COLUMNS, ordinality=True)} ORDER BY v.position"
)
_OUTCOME_COLUMNS = {
    "status": "text",
    "completed_at": "timestamptz",
    "winner": "text",
    "confidence": "float8",
    "justification": "text",
    "error_code": "text",
    "error_details": "jsonb",
    "provider": "text",
    "model": "text",
    "prompt_tokens": "integer",
    "completion_tokens": "integer",
    "total_tokens": "integer",
    "cost_estimate": "float8",
    "response_time_ms": "integer",
    "is_late": "boolean",
}
_SAVE_ATTEMPTS = _update_by_key("cj_comparison_pairs", ("id", "bigint"), _OUTCOME_COLUMNS)


_ESSAY_IDS = text(
    "SELECT els_essay_id FROM cj_processed_essays WHERE cj_batch_id = :cj_batch_id"
    " ORDER BY els_essay_id"
)
_ESSAY_TEXTS = text(
    "SELECT els_essay_id, assessment_input_text FROM cj_processed_essays"
    " WHERE cj_batch_id = :cj_batch_id AND els_essay_id = ANY(CAST(:ids AS text[]))"
)
# By assessment and status first: that is the index; the batch ids only pick among its rows.
# A queued retry whose comparison was answered meanwhile (a timed-out attempt answered after
# all) is not sent: superseded, never submitted. Only retries are looked up (AND stops at the
# first false): a first attempt has no earlier sibling, and an iteration's release sends
# hundreds of them.
_SEND_BATCHES = text(
    "UPDATE cj_comparison_pairs AS p SET"
    " status = CASE WHEN a.answered THEN :superseded ELSE :in_flight END,"
    " submitted_at = CASE WHEN a.answered THEN NULL ELSE CAST(:now AS timestamptz) END,"
    " completed_at = CASE WHEN a.answered THEN CAST(:now AS timestamptz) END"
    " FROM (SELECT q.id, q.attempt > 1 AND EXISTS (SELECT 1 FROM cj_comparison_pairs AS s"
    " WHERE s.comparison_id = q.comparison_id AND s.status = :succeeded) AS answered"
    " FROM cj_comparison_pairs AS q WHERE q.cj_batch_id = :cj_batch_id AND q.status = :queued"
    " AND q.submission_batch_id = ANY(CAST(:batch_ids AS uuid[]))) AS a"
    " WHERE p.id = a.id"
    " RETURNING p.id, p.request_correlation_id, p.essay_a_els_id, p.essay_b_els_id,"
    " p.submission_batch_id, p.iteration, p.attempt, p.comparison_id, p.status,"
    " p.request_event_id"
)
# An attempt in flight is overdue once it has waited since before `moment`. Its wait starts at
# its release into the outbox, or at its request's publication when that came later (the
# relay moves `submitted_at`, see `outbox.wait_from_publication`). While its request is still
# in the outbox (the broker is away, the relay behind) it is not waiting for anything:
# timing it out would fail assessments for answers nobody was asked for, and pay for retries
# once the broker is back. A request set aside as undeliverable is never sent: the relay
# fails its attempt at once, and this catches the case where that did not run.
# The status is written literally, as the predicate of ix_cj_comparison_pairs_in_flight, so
# that a generic plan of the prepared statement can use that index too. The request is looked
# up by a scalar subquery, one probe of the outbox's unique event id index per candidate: as a
# NOT EXISTS, planned on statistics from before an outage filled the outbox, it became a
# nested loop over every pending row for every candidate (15 s at 30,000 of each).
assert AttemptStatus.IN_FLIGHT.value == "in_flight"
_OVERDUE = (
    "p.status = 'in_flight' AND p.submitted_at < :moment AND NOT COALESCE((SELECT"
    " o.published_at IS NULL AND o.undeliverable IS NULL FROM cj_event_outbox AS o"
    " WHERE o.event_id = p.request_event_id), false)"
)
_OVERDUE_ASSESSMENTS = text(
    f"SELECT p.cj_batch_id FROM cj_comparison_pairs AS p WHERE {_OVERDUE}"
    " AND p.cj_batch_id <> ALL(CAST(:exclude AS bigint[]))"
    " GROUP BY p.cj_batch_id ORDER BY min(p.submitted_at) LIMIT :limit"
)
_NAME_REQUESTS = text(
    "UPDATE cj_comparison_pairs AS p SET request_event_id = v.event_id"
    " FROM unnest(CAST(:ids AS bigint[]), CAST(:event_ids AS uuid[])) AS v(id, event_id)"
    " WHERE p.id = v.id"
)
# In id order: judgements in the order they were planned, whatever order they arrived in.
_COMPARISONS = text(
    "SELECT comparison_id::text, essay_a_els_id, essay_b_els_id, attempt, status, winner"
    " FROM cj_comparison_pairs WHERE cj_batch_id = :cj_batch_id ORDER BY id"
)


# A bounded number per statement: a backlog of millions is pruned over several short
# transactions instead of one long one. SKIP LOCKED: the monitors of several instances prune
# side by side without waiting for each other. Unpublished rows are never pruned. The rows are
# chosen in index order (ORDER BY: the generic plan of the prepared statement keeps the index
# scan) and deleted by their ctid: `id IN (subquery)` planned as a hash join over a scan of
# the whole table.
_PRUNE_OUTBOX = text(
    "DELETE FROM cj_event_outbox WHERE ctid = ANY(ARRAY(SELECT ctid FROM cj_event_outbox"
    " WHERE created_at < :before AND published_at IS NOT NULL ORDER BY created_at"
    " LIMIT :limit FOR UPDATE SKIP LOCKED))"
)
_PRUNE_INBOX = text(
    "DELETE FROM cj_event_inbox WHERE ctid = ANY(ARRAY(SELECT ctid FROM cj_event_inbox"
    " WHERE handled_at < :before ORDER BY handled_at LIMIT :limit FOR UPDATE SKIP LOCKED))"
)

_PRUNE_UNMATCHED = text(
    "DELETE FROM cj_unmatched_results WHERE ctid = ANY(ARRAY(SELECT ctid FROM"
    " cj_unmatched_results WHERE received_at < :before ORDER BY received_at LIMIT :limit"
    " FOR UPDATE SKIP LOCKED))"
)

# Texts of finished assessments: the assessments are chosen through the partial index
# (ix_cj_batch_uploads_texts_due), oldest first; their essays and attempts are then found by
# their assessment's id in an array, which keeps the index scans of the generic plan.
_TEXTS_DUE = text(
    "SELECT id FROM cj_batch_uploads WHERE completed_at < :before AND completed_at IS NOT NULL"
    " AND texts_erased_at IS NULL ORDER BY completed_at LIMIT :limit FOR UPDATE SKIP LOCKED"
)
_ERASE_ESSAY_TEXTS = text(
    "UPDATE cj_processed_essays SET assessment_input_text = ''"
    " WHERE cj_batch_id = ANY(CAST(:ids AS bigint[])) AND assessment_input_text <> ''"
)
_ERASE_JUSTIFICATIONS = text(
    "UPDATE cj_comparison_pairs SET justification = NULL"
    " WHERE cj_batch_id = ANY(CAST(:ids AS bigint[])) AND justification IS NOT NULL"
)
_TEXTS_ERASED = text(
    "UPDATE cj_batch_uploads SET essay_instructions = NULL, texts_erased_at = now()"
    " WHERE id = ANY(CAST(:ids AS bigint[]))"
)

# An attempt with one of these statuses has its winner, or may still get one.
_ALIVE = frozenset(
    (AttemptStatus.SUCCEEDED.value, AttemptStatus.QUEUED.value, AttemptStatus.IN_FLIGHT.value)
)


class Comparisons(NamedTuple):
    """An assessment's comparisons as an iteration close needs them."""

    planned: list[tuple[str, str, str]]
    """(comparison_id, essay_a, essay_b) of every comparison planned, retries not repeated."""
    judgements: list[tuple[str, str, bool]]
    """(essay_a, essay_b, a_won) of every comparison answered with a winner, in the
    orientation the judge saw it (scoring fits the judge's position bias from it)."""
    unanswered: frozenset[str]
    """Comparisons with no winner and no attempt awaiting an answer: failed for good unless
    the failed pool holds their retry."""
    retrying: frozenset[str] = frozenset()
    """Comparisons with no winner and a retry queued or awaiting its answer."""


@dataclass(slots=True)
class StateRow:
    """An assessment's `cj_batch_states` row as the handlers read it under its row lock and
    change it: a plain value, not an ORM object, because a poll of results touches hundreds
    of assessments and the ORM's per-object loading and flushing cost more than the work."""

    cj_batch_id: int
    state: str
    total_comparisons: int
    submitted_comparisons: int
    completed_comparisons: int
    failed_comparisons: int
    current_iteration: int
    batch_config: dict[str, Any]
    processing_metadata: dict[str, Any]
    started_at: datetime
    last_activity_at: datetime
    # The progress the fields describe, with the metadata object and counters it was built
    # from: valid only while both are still the row's own.
    _known: tuple[dict[str, Any], tuple[int, ...], Progress] | None = field(
        default=None, repr=False, compare=False
    )

    def counters(self) -> tuple[int, ...]:
        return (
            self.total_comparisons,
            self.submitted_comparisons,
            self.completed_comparisons,
            self.failed_comparisons,
            self.current_iteration,
        )

    def progress(self) -> Progress:
        """The progress the counters and `processing_metadata` describe, built once."""
        known = self._known
        if known and known[0] is self.processing_metadata and known[1] == self.counters():
            return known[2]
        progress = Progress.from_state(
            total=self.total_comparisons,
            submitted=self.submitted_comparisons,
            completed=self.completed_comparisons,
            failed=self.failed_comparisons,
            current_iteration=self.current_iteration,
            metadata=self.processing_metadata or {},
        )
        self._known = (self.processing_metadata, self.counters(), progress)
        return progress


# The row's columns, in `StateRow` order (its private fields are no columns).
_STATE_COLUMN_NAMES = tuple(f for f in StateRow.__dataclass_fields__ if not f.startswith("_"))
# The jsonb columns come as their text: `DecodedStates` decodes each text once.
_STATE_COLUMNS = ", ".join(
    f"{c}::text AS {c}" if c in ("batch_config", "processing_metadata") else c
    for c in _STATE_COLUMN_NAMES
)
# Bounds of what `DecodedStates` keeps: as many assessments as the callback handler keeps
# contexts for, and at most this much JSON text (decoded with its progress, about five bytes
# per character: some 80 MB at the bound, measured on real state rows).
_DECODED_MAX_ENTRIES = 4096
_DECODED_MAX_CHARS = 16_000_000


@dataclass(slots=True)
class _Decoded:
    config_text: str
    config: dict[str, Any]
    metadata_text: str
    metadata: dict[str, Any]
    known: tuple[tuple[int, ...], Progress] | None


class DecodedStates:
    """The decoded jsonb of the state rows this instance last read or wrote, per assessment,
    reused while the stored text is the same.

    A poll of results touches many assessments once each; decoding each state row's
    `processing_metadata` and rebuilding its progress was about a sixth of the work. The
    cache is keyed by the stored JSON text itself, so it needs no invalidation and cannot go
    stale: a write by any transaction or instance changes the text, and the next read then
    decodes it. Rows and progress handed out share the cached objects, which nothing mutates
    (`save_progress` builds a new metadata dict; `Progress` is immutable).
    """

    def __init__(
        self, max_entries: int = _DECODED_MAX_ENTRIES, max_chars: int = _DECODED_MAX_CHARS
    ) -> None:
        self._entries: dict[int, _Decoded] = {}
        self._chars = 0
        self._max_entries = max_entries
        self._max_chars = max_chars

    @property
    def entries(self) -> int:
        return len(self._entries)

    def row(self, values: Sequence[Any]) -> StateRow:
        """A `StateRow` from the values of `_STATE_COLUMNS` (jsonb columns as text)."""
        row = StateRow(*values)
        cj_batch_id = row.cj_batch_id
        config_text: str = row.batch_config  # type: ignore[assignment]
        metadata_text: str = row.processing_metadata  # type: ignore[assignment]
        entry = self._entries.get(cj_batch_id)
        if entry is None or entry.config_text != config_text:
            config = json.loads(config_text)
        else:
            config = entry.config
        if entry is None or entry.metadata_text != metadata_text:
            metadata = json.loads(metadata_text)
            known = None
        else:
            metadata, known = entry.metadata, entry.known
        row.batch_config, row.processing_metadata = config, metadata
        if known is not None and known[0] == row.counters():
            row._known = (metadata, known[0], known[1])
        if row.state in TERMINAL_STATES:
            self._forget(cj_batch_id)  # read again only for its late answers, if ever
        else:
            self._keep(cj_batch_id, _Decoded(config_text, config, metadata_text, metadata, known))
        return row

    def written(self, row: StateRow, metadata_text: str) -> None:
        """Keep what `row` holds, as stored under `metadata_text` by the write just made; a
        finished assessment's row leaves the cache."""
        if row.state in TERMINAL_STATES:
            self._forget(row.cj_batch_id)
            return
        entry = self._entries.get(row.cj_batch_id)
        if entry is None or entry.config is not row.batch_config:
            return
        known = row._known
        progress = None
        if known is not None and known[0] is row.processing_metadata:
            progress = (known[1], known[2])
        metadata = row.processing_metadata
        self._keep(
            row.cj_batch_id,
            _Decoded(entry.config_text, entry.config, metadata_text, metadata, progress),
        )

    def _forget(self, cj_batch_id: int) -> None:
        old = self._entries.pop(cj_batch_id, None)
        if old is not None:
            self._chars -= len(old.config_text) + len(old.metadata_text)

    def _keep(self, cj_batch_id: int, entry: _Decoded) -> None:
        self._forget(cj_batch_id)
        self._entries[cj_batch_id] = entry  # now the most recently used
        self._chars += len(entry.config_text) + len(entry.metadata_text)
        while self._entries and (
            self._chars > self._max_chars or len(self._entries) > self._max_entries
        ):
            evicted = self._entries.pop(next(iter(self._entries)))
            self._chars -= len(evicted.config_text) + len(evicted.metadata_text)


_LOCK_STATE = text(
    f"SELECT {_STATE_COLUMNS} FROM cj_batch_states WHERE cj_batch_id = :cj_batch_id FOR UPDATE"
)
_LOCK_STATE_SKIP_LOCKED = text(
    f"SELECT {_STATE_COLUMNS} FROM cj_batch_states WHERE cj_batch_id = :cj_batch_id"
    " FOR UPDATE SKIP LOCKED"
)
_LOCK_STATES = text(
    f"SELECT {_STATE_COLUMNS} FROM cj_batch_states"
    " WHERE cj_batch_id = ANY(CAST(:ids AS bigint[])) ORDER BY cj_batch_id FOR UPDATE"
)
# Literally the predicate of the partial index `ix_cj_batch_states_active`: with the states
# as bound parameters, a generic plan could not prove the index applies.
_RUNNING = "state NOT IN (" + ", ".join(f"'{state}'" for state in TERMINAL_STATES) + ")"
_IDLE_STATES = text(
    f"SELECT cj_batch_id FROM cj_batch_states WHERE {_RUNNING} AND last_activity_at < :moment"
    " AND cj_batch_id <> ALL(CAST(:exclude AS bigint[]))"
    " ORDER BY last_activity_at LIMIT :limit FOR UPDATE SKIP LOCKED"
)
_NOTE_WATERMARKS = text(
    "INSERT INTO cj_result_watermarks (topic, partition, handled_through, noted_at)"
    " SELECT :topic, p, m, now()"
    " FROM unnest(CAST(:partitions AS integer[]), CAST(:moments AS timestamptz[])) AS v(p, m)"
    " ON CONFLICT (topic, partition) DO UPDATE"
    " SET handled_through = excluded.handled_through, noted_at = excluded.noted_at"
)
# The slowest partition's moment, over the partitions the topic has (all rows when the broker
# could not say), and the partitions whose rows were not written for `stale` while another's
# was: they still count, so their owner is named in a warning rather than passed over.
_HANDLED_THROUGH = text(
    "WITH w AS (SELECT partition, handled_through, noted_at, max(noted_at) OVER () AS newest"
    " FROM cj_result_watermarks WHERE topic = :topic"
    " AND (CAST(:partitions AS integer[]) IS NULL"
    " OR partition = ANY(CAST(:partitions AS integer[]))))"
    " SELECT min(handled_through),"
    " coalesce(array_agg(partition ORDER BY partition)"
    " FILTER (WHERE noted_at < newest - CAST(:stale AS interval)), '{}') FROM w"
)
_COUNT_RUNNING_BY_STATE = text(
    f"SELECT state, count(*) FROM cj_batch_states WHERE {_RUNNING} GROUP BY state"
)
_PROGRESS_COLUMNS = {
    "state": "text",
    "total_comparisons": "integer",
    "submitted_comparisons": "integer",
    "completed_comparisons": "integer",
    "failed_comparisons": "integer",
    "current_iteration": "integer",
    "processing_metadata": "jsonb",
    "last_activity_at": "timestamptz",
}
_WRITE_STATES = text(
    _update_by_key("cj_batch_states", ("cj_batch_id", "bigint"), _PROGRESS_COLUMNS).text
    # The stored text of what was written: the decoded rows stay valid for the next read.
    + " RETURNING t.cj_batch_id, t.processing_metadata::text"
)
# Session.info keys: the state rows changed in the session's transaction, whether the
# session writes them before it commits, and the decoded states it reads and writes through.
_CHANGED_STATES = "cj_changed_states"
_WRITES_STATES = "cj_writes_states"
_DECODED_STATES = "cj_decoded_states"


def _state_write(session: Session) -> tuple[dict[int, StateRow], dict[str, list[Any]]] | None:
    """The session's changed state rows (then forgotten) and the parameters of
    `_WRITE_STATES` for them."""
    changed: dict[int, StateRow] = session.info.pop(_CHANGED_STATES, {})
    if not changed:
        return None
    rows = [changed[i] for i in sorted(changed)]
    return changed, _arrays(rows, ["cj_batch_id", *_PROGRESS_COLUMNS], _PROGRESS_COLUMNS)


def _written(session: Session, changed: dict[int, StateRow], stored: Iterable[Any]) -> None:
    decoded: DecodedStates | None = session.info.get(_DECODED_STATES)
    if decoded is not None:
        for cj_batch_id, metadata_text in stored:
            decoded.written(changed[cj_batch_id], metadata_text)


def _write_states_before_commit(session: Session) -> None:
    # Runs inside the commit, which the async session drives on its greenlet: the synchronous
    # execute is the async connection underneath.
    write = _state_write(session)
    if write is not None:
        changed, values = write
        _written(session, changed, session.execute(_WRITE_STATES, values).all())


def _forget_states(session: Session, *_: Any) -> None:
    session.info.pop(_CHANGED_STATES, None)


class AssessmentRepository:
    def __init__(self, session: AsyncSession, decoded: DecodedStates | None = None) -> None:
        """`decoded`: the instance's long-lived `DecodedStates`; without it, state rows are
        decoded afresh in each transaction."""
        self.session = session
        sync = session.sync_session
        if not sync.info.get(_WRITES_STATES):
            event.listen(sync, "before_commit", _write_states_before_commit)
            event.listen(sync, "after_rollback", _forget_states)
            sync.info[_WRITES_STATES] = True
        if decoded is None:
            decoded = sync.info.get(_DECODED_STATES)
        if decoded is None:
            decoded = DecodedStates()
        sync.info[_DECODED_STATES] = decoded
        self._decoded = decoded

    @property
    def _changed_states(self) -> dict[int, StateRow]:
        changed: dict[int, StateRow] = self.session.sync_session.info.setdefault(
            _CHANGED_STATES, {}
        )
        return changed

    async def allow_idle(self, seconds: float) -> None:
        """Let this transaction pause up to ``seconds`` between statements (0: without limit)
        before PostgreSQL ends it; the connections' own limit returns with the next one."""
        await set_idle_limit(self.session, seconds)

    async def write_states(self) -> None:
        """Write the state rows changed so far (otherwise written just before the commit)."""
        sync = self.session.sync_session
        write = _state_write(sync)
        if write is not None:
            changed, values = write
            _written(sync, changed, (await self.session.execute(_WRITE_STATES, values)).all())

    # --- inbox / outbox -------------------------------------------------------------------

    async def claim_inbox(self, entries: Sequence[InboxEntry]) -> set[str]:
        """Record consumed event ids; returns those not handled before (first occurrence)."""
        if not entries:
            return set()
        rows = await self.session.execute(
            _INBOX_CLAIM,
            {
                "event_id": [e.event_id for e in entries],
                "topic": [e.topic for e in entries],
                "partition": [e.partition for e in entries],
                "record_offset": [e.offset for e in entries],
            },
        )
        return set(rows.scalars())

    async def set_inbox_outcomes(self, outcomes: dict[str, str]) -> None:
        if not outcomes:
            return
        await self.session.execute(
            _INBOX_OUTCOMES,
            {"event_id": list(outcomes), "outcome": list(outcomes.values())},
        )

    async def add_outbox(self, rows: Sequence[OutboxRow]) -> int:
        """Store events to publish; returns how many were new (one row per event id)."""
        if not rows:
            return 0
        result = await self.session.execute(
            _ADD_OUTBOX,
            {
                "event_id": [r.event_id for r in rows],
                "topic": [r.topic for r in rows],
                "message_key": [r.key for r in rows],
                "payload": [r.payload for r in rows],
            },
        )
        return int(result.rowcount)  # type: ignore[attr-defined]

    async def prune_outbox(self, before: datetime, limit: int) -> int:
        """Delete up to `limit` outbox rows published and created before `before`."""
        result = await self.session.execute(_PRUNE_OUTBOX, {"before": before, "limit": limit})
        return int(result.rowcount)  # type: ignore[attr-defined]

    async def prune_inbox(self, before: datetime, limit: int) -> int:
        """Delete up to `limit` inbox rows handled before `before`."""
        result = await self.session.execute(_PRUNE_INBOX, {"before": before, "limit": limit})
        return int(result.rowcount)  # type: ignore[attr-defined]

    async def prune_unmatched(self, before: datetime, limit: int) -> int:
        """Delete up to `limit` unmatched results received before `before`."""
        result = await self.session.execute(_PRUNE_UNMATCHED, {"before": before, "limit": limit})
        return int(result.rowcount)  # type: ignore[attr-defined]

    async def erase_texts(self, before: datetime, limit: int) -> int:
        """Erase the texts of up to `limit` assessments finished before `before`: their essays'
        text, their instructions and the judge's justifications; the number of assessments."""
        ids = list(
            (await self.session.execute(_TEXTS_DUE, {"before": before, "limit": limit})).scalars()
        )
        if ids:
            await self.session.execute(_ERASE_ESSAY_TEXTS, {"ids": ids})
            await self.session.execute(_ERASE_JUSTIFICATIONS, {"ids": ids})
            await self.session.execute(_TEXTS_ERASED, {"ids": ids})
        return len(ids)

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
        rows = await self.session.execute(_ESSAY_IDS, {"cj_batch_id": cj_batch_id})
        return list(rows.scalars())

    async def essay_texts(self, cj_batch_id: int, essay_ids: Iterable[str]) -> dict[str, str]:
        rows = await self.session.execute(
            _ESSAY_TEXTS, {"cj_batch_id": cj_batch_id, "ids": list(set(essay_ids))}
        )
        return {row[0]: row[1] for row in rows.all()}

    async def store_scores(self, cj_batch_id: int, rows: list[dict[str, Any]]) -> None:
        """rows: els_essay_id, score, standard_error, comparison_count, wins, losses, rank."""
        if not rows:
            return
        await self.session.execute(
            _SCORES,
            {"cj_batch_id": cj_batch_id}
            | {column: [r[column] for r in rows] for column in _SCORE_COLUMNS},
        )

    # --- state ----------------------------------------------------------------------------

    async def create_state(
        self, cj_batch_id: int, *, config: dict[str, Any], now: datetime
    ) -> None:
        await self.session.execute(
            insert(CJBatchState).values(
                cj_batch_id=cj_batch_id,
                state="INITIALIZING",
                batch_config=config,
                processing_metadata={},
                started_at=now,
                last_activity_at=now,
            )
        )

    async def lock_state(self, cj_batch_id: int, *, skip_locked: bool = False) -> StateRow | None:
        rows = await self.session.execute(
            _LOCK_STATE_SKIP_LOCKED if skip_locked else _LOCK_STATE, {"cj_batch_id": cj_batch_id}
        )
        row = rows.first()
        return None if row is None else self._decoded.row(row)

    async def lock_states(self, cj_batch_ids: Sequence[int]) -> dict[int, StateRow]:
        """Lock several assessments' state rows, always in id order so that concurrent
        handlers cannot deadlock."""
        if not cj_batch_ids:
            return {}
        rows = await self.session.execute(_LOCK_STATES, {"ids": sorted(set(cj_batch_ids))})
        return {row[0]: self._decoded.row(row) for row in rows.all()}

    async def save_progress(
        self, row: StateRow, progress: Progress, *, state: str, now: datetime
    ) -> None:
        """Store the progress under the row lock the caller holds; terminal states never move.
        The row is written with every other changed state row in one statement, before the
        transaction commits."""
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
        # `metadata` holds exactly `progress.metadata_json()` for the keys progress reads.
        row._known = (metadata, row.counters(), progress)
        self._changed_states[row.cj_batch_id] = row

    async def finish_state(self, row: StateRow, *, state: str, now: datetime) -> bool:
        """Compare-and-set into a terminal state: True only for the one caller that wins."""
        await self.write_states()
        result = await self.session.execute(
            update(CJBatchState)
            .where(
                CJBatchState.cj_batch_id == row.cj_batch_id,
                CJBatchState.state.not_in(TERMINAL_STATES),
            )
            .values(state=state, last_activity_at=now)
            .returning(CJBatchState.cj_batch_id)
        )
        won = result.scalar_one_or_none() is not None
        if won:
            row.state, row.last_activity_at = state, now
        return won

    async def states_idle_since(
        self, moment: datetime, limit: int, exclude: Sequence[int] = ()
    ) -> list[int]:
        """Running assessments without activity since `moment`, longest idle first, except
        `exclude`; locked, skipping those another transaction holds."""
        rows = await self.session.execute(
            _IDLE_STATES, {"moment": moment, "limit": limit, "exclude": list(exclude)}
        )
        return list(rows.scalars())

    async def note_result_watermarks(self, topic: str, moments: dict[int, datetime]) -> None:
        """Per partition of the result topic: every result on it up to this moment is handled."""
        partitions = sorted(moments)
        await self.session.execute(
            _NOTE_WATERMARKS,
            {"topic": topic, "partitions": partitions, "moments": [moments[p] for p in partitions]},
        )

    async def results_handled_through(
        self, topic: str, partitions: Collection[int] | None, stale: timedelta
    ) -> tuple[datetime | None, list[int]]:
        """The moment up to which every partition of the result topic among `partitions`
        (None: every one with a row) has been handled, as far as their consumers have said
        (None before any has), and those of them whose rows were not written for `stale`
        while another's was."""
        params = {
            "topic": topic,
            "partitions": None if partitions is None else sorted(partitions),
            "stale": stale,
        }
        row = (await self.session.execute(_HANDLED_THROUGH, params)).one()
        return row[0], list(row[1])

    async def count_running_by_state(self) -> dict[str, int]:
        """Running assessments per state. Finished ones are not counted: they only grow, and
        counting them would read every state row ever written on each monitor pass, where
        the running ones come from the small partial index `ix_cj_batch_states_active`."""
        rows = await self.session.execute(_COUNT_RUNNING_BY_STATE)
        return {row[0]: int(row[1]) for row in rows.all()}

    async def assessments_with_overdue_attempts(
        self, moment: datetime, limit: int, exclude: Sequence[int] = ()
    ) -> list[int]:
        """Assessments with an attempt waiting for its answer since before `moment` (see
        `_OVERDUE`), longest waiting first, except `exclude`."""
        rows = await self.session.execute(
            _OVERDUE_ASSESSMENTS, {"moment": moment, "limit": limit, "exclude": list(exclude)}
        )
        return list(rows.scalars())

    # --- comparison attempts -------------------------------------------------------------

    async def insert_attempts(self, cj_batch_id: int, attempts: Sequence[NewAttempt]) -> None:
        if not attempts:
            return
        await self.session.execute(
            _INSERT_ATTEMPTS,
            {
                "cj_batch_id": cj_batch_id,
                "queued": AttemptStatus.QUEUED.value,
                "comparison_id": [a.comparison_id for a in attempts],
                "request_correlation_id": [a.correlation_id for a in attempts],
                "essay_a_els_id": [a.essay_a_id for a in attempts],
                "essay_b_els_id": [a.essay_b_id for a in attempts],
                "iteration": [a.iteration for a in attempts],
                "attempt": [a.attempt for a in attempts],
                "submission_batch_id": [a.submission_batch_id for a in attempts],
                "request_event_id": [a.request_event_id for a in attempts],
            },
        )

    async def name_requests(self, named: Sequence[tuple[int, uuid.UUID]]) -> None:
        """Store the event id of the request of these attempts, (attempt id, event id)."""
        if named:
            await self.session.execute(
                _NAME_REQUESTS,
                {"ids": [i for i, _ in named], "event_ids": [e for _, e in named]},
            )

    async def send_batches(
        self, cj_batch_id: int, batch_ids: Sequence[uuid.UUID], now: datetime
    ) -> list[Any]:
        """Mark the attempts of these submission batches of the assessment in flight and
        return them (rows with the request's columns and the new status, in planning order).
        Retries whose comparison has been answered meanwhile come back `superseded`: they
        are not to be sent."""
        rows = await self.session.execute(
            _SEND_BATCHES,
            {
                "cj_batch_id": cj_batch_id,
                "batch_ids": list(batch_ids),
                "queued": AttemptStatus.QUEUED.value,
                "in_flight": AttemptStatus.IN_FLIGHT.value,
                "superseded": AttemptStatus.SUPERSEDED.value,
                "succeeded": AttemptStatus.SUCCEEDED.value,
                "now": now,
            },
        )
        return sorted(rows.all(), key=lambda r: r.id)

    async def assessments_answered(self, correlation_ids: Sequence[uuid.UUID]) -> list[int]:
        """The assessments these attempts belong to (read before locking them)."""
        if not correlation_ids:
            return []
        rows = await self.session.execute(
            text(
                "SELECT DISTINCT cj_batch_id FROM cj_comparison_pairs"
                " WHERE request_correlation_id = ANY(CAST(:ids AS uuid[]))"
            ),
            {"ids": list(correlation_ids)},
        )
        return list(rows.scalars())

    async def attempts_by_correlation(
        self, correlation_ids: Sequence[uuid.UUID], *, within: Sequence[int]
    ) -> dict[uuid.UUID, AttemptRecord]:
        """The attempts these results answer, with their siblings, of the assessments `within`;
        read them only under those assessments' row locks, since a concurrent handler may have
        resolved them."""
        if not correlation_ids or not within:
            return {}
        rows = await self.session.execute(
            text(
                f"SELECT {_ATTEMPT_COLUMNS} FROM cj_comparison_pairs AS p{_SIBLINGS}"
                " WHERE p.request_correlation_id = ANY(CAST(:ids AS uuid[]))"
                " AND p.cj_batch_id = ANY(CAST(:within AS bigint[]))"
            ),
            {"ids": list(correlation_ids), "within": list(within)},
        )
        return {record.correlation_id: record for record in _attempt_records(rows.all())}

    async def overdue_attempts(self, cj_batch_id: int, moment: datetime) -> list[AttemptRecord]:
        rows = await self.session.execute(
            text(
                f"SELECT {_ATTEMPT_COLUMNS} FROM cj_comparison_pairs AS p{_SIBLINGS}"
                f" WHERE p.cj_batch_id = :cj_batch_id AND {_OVERDUE} ORDER BY p.id"
            ),
            {"cj_batch_id": cj_batch_id, "moment": moment},
        )
        return _attempt_records(rows.all())

    async def awaits_answers(self, cj_batch_id: int) -> bool:
        """Whether any attempt of the assessment is sent and still unanswered."""
        row = await self.session.execute(
            text(
                "SELECT EXISTS (SELECT 1 FROM cj_comparison_pairs"
                " WHERE cj_batch_id = :cj_batch_id AND status = :in_flight)"
            ),
            {"cj_batch_id": cj_batch_id, "in_flight": AttemptStatus.IN_FLIGHT.value},
        )
        return bool(row.scalar())

    async def save_attempts(self, records: Sequence[AttemptRecord]) -> None:
        """Write the outcome of these attempts in one statement."""
        if not records:
            return
        await self.session.execute(
            _SAVE_ATTEMPTS, _arrays(records, ["id", *_OUTCOME_COLUMNS], _OUTCOME_COLUMNS)
        )

    async def comparisons(self, cj_batch_id: int) -> Comparisons:
        """Every pair planned so far and every judgement received, in one read."""
        rows = await self.session.execute(_COMPARISONS, {"cj_batch_id": cj_batch_id})
        planned: list[tuple[str, str, str]] = []
        judgements: list[tuple[str, str, bool]] = []
        alive: set[str] = set()
        won: set[str] = set()
        retried: set[str] = set()
        succeeded = AttemptStatus.SUCCEEDED.value
        for comparison_id, essay_a, essay_b, attempt, status, winner in rows.all():
            if attempt == 1:
                planned.append((comparison_id, essay_a, essay_b))
            if status == succeeded:
                judgements.append((essay_a, essay_b, winner == "essay_a"))
                won.add(comparison_id)
            elif status in _ALIVE and attempt > 1:
                retried.add(comparison_id)
            if status in _ALIVE:
                alive.add(comparison_id)
        unanswered = frozenset(c for c, _, _ in planned if c not in alive)
        return Comparisons(planned, judgements, unanswered, frozenset(retried - won))

    async def count_attempts(self, cj_batch_id: int) -> int:
        """Attempts whose requests went to the provider: paid calls. Not those still queued
        when the assessment finished, nor those the relay set aside as undeliverable."""
        stmt = select(func.count()).where(
            CJComparisonPair.cj_batch_id == cj_batch_id,
            CJComparisonPair.submitted_at.is_not(None),
            CJComparisonPair.error_code.is_distinct_from(Unanswered.UNDELIVERABLE.error_code),
        )
        return int((await self.session.execute(stmt)).scalar_one())

    async def store_unmatched(self, rows: Sequence[tuple[str, str, str]]) -> None:
        """(correlation id, reason, raw payload) of results that match nothing we sent."""
        if rows:
            await self.session.execute(
                insert(UnmatchedResult),
                [{"correlation_id": c, "reason": r, "payload": p} for c, r, p in rows],
            )
