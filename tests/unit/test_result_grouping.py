"""How a poll's results are split into concurrent transactions: by assessment, so that the
transactions seldom wait for each other's row locks, and in arrival order within each."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from cj_assessment.consumer import _assessment_key, _by_assessment
from cj_assessment.contracts import ComparisonResultEnvelope


@dataclass(frozen=True)
class _Record:
    offset: int


def _result(assessment: str | None) -> ComparisonResultEnvelope:
    return ComparisonResultEnvelope.model_validate_json(
        json.dumps(
            {
                "event_id": str(uuid.uuid4()),
                "event_type": "LLMComparisonResultV1",
                "data": {
                    "correlation_id": str(uuid.uuid4()),
                    "winner": "Essay A",
                    "request_metadata": None
                    if assessment is None
                    else {"bos_batch_id": assessment, "essay_a_id": "a", "essay_b_id": "b"},
                },
            }
        )
    )


@given(
    owners=st.lists(st.sampled_from(["b1", "b2", "b3", "b4", "b5", None]), max_size=40),
    count=st.integers(min_value=1, max_value=4),
)
def test_each_assessment_lands_in_one_group_in_arrival_order(
    owners: list[str | None], count: int
) -> None:
    decoded = [(_Record(offset), _result(owner)) for offset, owner in enumerate(owners)]
    groups = _by_assessment([(_assessment_key(e), r, e) for r, e in decoded], count)

    assert len(groups) <= count
    assert all(group for _, group in groups)
    assert sorted(r.offset for _, group in groups for r, _ in group) == list(range(len(owners)))
    for keys, group in groups:
        offsets = [r.offset for r, _ in group]
        assert offsets == sorted(offsets)
        assert keys == {_assessment_key(e) for _, e in group}
    for owner in {o for o in owners if o is not None}:
        holding = [
            g
            for _, g in groups
            if any((e.data.request_metadata or {}).get("bos_batch_id") == owner for _, e in g)
        ]
        assert len(holding) == 1


def test_one_transaction_per_poll_keeps_every_result_together() -> None:
    decoded = [(_Record(i), _result(f"b{i % 7}")) for i in range(30)]
    keyed = [(_assessment_key(e), r, e) for r, e in decoded]
    assert _by_assessment(keyed, 1) == [({f"b{i}" for i in range(7)}, decoded)]
