"""Metrics of what a transaction decides count only once it commits."""

from __future__ import annotations

import pytest

from cj_assessment.metrics import Metrics, after_commit, counted_on_commit


def _succeeded(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("cj_comparisons_succeeded_total")


def test_increments_outside_a_transaction_count_at_once() -> None:
    metrics = Metrics()
    metrics.comparisons_succeeded.inc()
    assert _succeeded(metrics) == 1


def test_increments_of_a_completed_block_count_when_it_ends() -> None:
    metrics = Metrics()
    with counted_on_commit():
        metrics.comparisons_succeeded.inc(3)
        metrics.comparisons_failed.labels("timeout").inc()
        assert _succeeded(metrics) == 0
    assert _succeeded(metrics) == 3
    assert metrics.registry.get_sample_value("cj_comparisons_failed_total", {"reason": "timeout"})


def test_increments_of_a_block_that_fails_never_count() -> None:
    metrics = Metrics()
    with pytest.raises(ConnectionResetError), counted_on_commit():
        metrics.comparisons_succeeded.inc()
        raise ConnectionResetError
    assert _succeeded(metrics) == 0


def test_an_inner_block_counts_only_if_the_outer_one_completes_too() -> None:
    metrics = Metrics()
    with pytest.raises(ConnectionResetError), counted_on_commit():
        with counted_on_commit():
            metrics.comparisons_succeeded.inc()
        raise ConnectionResetError
    assert _succeeded(metrics) == 0


def test_a_decision_is_announced_once_its_transaction_commits_and_never_for_a_lost_try() -> None:
    announced: list[str] = []
    with pytest.raises(ConnectionResetError), counted_on_commit():
        after_commit(lambda: announced.append("completed"))
        raise ConnectionResetError
    with counted_on_commit():
        after_commit(lambda: announced.append("completed"))
        assert announced == []
    assert announced == ["completed"]
