"""A stand-in for `score_judgements` that can cross into the worker process (a module-level
function, bound with `functools.partial`): it scores like the real one, and for a large
assessment first notes in a file when it started, sleeps, and notes when it ended."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cj_assessment.scoring_ranking import ScoringResult, score_judgements
from cj_assessment.workflow_orchestrator import OFF_LOOP_MIN_ESSAYS


def slow_when_large(
    marker: str, seconds: float, essay_ids: Any, judgements: Any, **kwargs: Any
) -> ScoringResult:
    if len(essay_ids) < OFF_LOOP_MIN_ESSAYS:
        return score_judgements(essay_ids, judgements, **kwargs)
    with Path(marker).open("a") as notes:
        notes.write(f"started {time.time()}\n")
    time.sleep(seconds)
    try:
        return score_judgements(essay_ids, judgements, **kwargs)
    finally:
        with Path(marker).open("a") as notes:
            notes.write(f"ended {time.time()}\n")


def noted(marker: str, event: str) -> list[float]:
    """The wall-clock times at which `event` ("started" or "ended") was noted."""
    path = Path(marker)
    if not path.exists():
        return []
    return [
        float(line.split()[1]) for line in path.read_text().splitlines() if line.startswith(event)
    ]
