"""The completed event's processing summary: calibrated reliability, raw SSR, position bias
and pairing strategy (built by the orchestrator when an assessment completes)."""

from __future__ import annotations

import json
import math
import uuid
from datetime import UTC, datetime
from typing import Any

import numpy as np

from cj_assessment.batch_config import BatchConfig
from cj_assessment.batch_processor import AssessmentContext, BatchProcessor
from cj_assessment.batch_state import Progress
from cj_assessment.completion_policy import Decision, Verdict
from cj_assessment.metrics import Metrics
from cj_assessment.repository import OutboxRow
from cj_assessment.scoring_ranking import score_judgements
from cj_assessment.settings import Settings
from cj_assessment.workflow_orchestrator import WorkflowOrchestrator

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


class _Repository:
    """Just what completing needs: the state always wins the compare-and-set."""

    def __init__(self) -> None:
        self.outbox: list[OutboxRow] = []

    async def save_progress(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def finish_state(self, *args: Any, **kwargs: Any) -> bool:
        return True

    async def finish_upload(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def count_attempts(self, cj_batch_id: int) -> int:
        return 61

    async def add_outbox(self, rows: list[OutboxRow]) -> int:
        self.outbox += rows
        return len(rows)


def _config(pairing_strategy: str) -> BatchConfig:
    return BatchConfig(
        batch_size=50,
        max_concurrent_batches=3,
        partial_completion_threshold=0.85,
        enable_stability_checking=True,
        stability_threshold=0.05,
        min_iterations_for_stability=2,
        max_comparisons=60,
        matchings_per_iteration=5,
        failed_comparison_retry_threshold=20,
        max_retry_attempts=3,
        min_success_rate=0.8,
        pairing_strategy=pairing_strategy,
        target_reliability=0.7,
    )


async def test_completed_summary_reports_both_reliabilities_position_bias_and_strategy() -> None:
    rng = np.random.default_rng(5)
    ids = [f"essay-{k}" for k in range(12)]
    abilities = rng.normal(0.0, 1.5, len(ids))
    judgements = []
    for _ in range(60):
        a, b = rng.choice(len(ids), size=2, replace=False)
        a_won = rng.random() < 1.0 / (1.0 + math.exp(-(abilities[a] - abilities[b] + 0.3)))
        judgements.append((ids[a], ids[b], bool(a_won)))
    scoring = score_judgements(ids, judgements)
    repo = _Repository()
    settings, metrics = Settings(), Metrics()
    orchestrator = WorkflowOrchestrator(settings, BatchProcessor(settings, metrics), metrics)
    ctx = AssessmentContext(
        cj_batch_id=1,
        bos_batch_id="summary-1",
        correlation_id=str(uuid.uuid4()),
        config=_config("adaptive"),
        essay_instructions=None,
        llm_config_overrides={},
        user_id=None,
        started_at=NOW,
    )
    progress = Progress(total=60, submitted=60, completed=60, current_iteration=2)

    await orchestrator._complete(
        repo,  # type: ignore[arg-type]
        ctx,
        None,  # type: ignore[arg-type]
        progress,
        scoring,
        Decision(Verdict.COMPLETE, "reliability"),
        now=NOW,
    )

    (row,) = repo.outbox
    summary = json.loads(row.payload)["data"]["processing_summary"]
    assert scoring.reliability is not None and scoring.scale_separation_reliability is not None
    assert scoring.position_bias is not None
    assert summary["stop_reason"] == "reliability"
    assert summary["reliability"] == round(scoring.reliability, 4)
    assert scoring.reliability_lower_bound is not None
    assert summary["reliability_lower_bound"] == round(scoring.reliability_lower_bound, 4)
    assert summary["reliability_lower_bound"] <= summary["reliability"]
    assert summary["scale_separation_reliability"] == round(scoring.scale_separation_reliability, 4)
    assert summary["position_bias"] == {
        "a_win_share": round(scoring.position_bias.a_win_share, 4),
        "logit": round(scoring.position_bias.logit, 4),
        "standard_error": round(scoring.position_bias.standard_error, 4),
    }
    assert summary["pairing_strategy"] == "adaptive"
    assert summary["comparison_attempts"] == 61
