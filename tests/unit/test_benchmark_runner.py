"""The benchmark runner can reach every benchmark it lists (running them is not a test)."""

from __future__ import annotations

import importlib
import inspect

import pytest

from benchmarks.__main__ import BENCHMARKS


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_listed_benchmark_has_a_run_taking_quick(name: str) -> None:
    run = getattr(importlib.import_module(BENCHMARKS[name]), "run", None)
    assert callable(run), f"{name} cannot be run by `python -m benchmarks {name}`"
    assert "quick" in inspect.signature(run).parameters


def test_the_scoring_benchmark_measures_every_column_against_the_current_core() -> None:
    # Its cells turn n/a when a function it times is renamed; that must fail here, not in a
    # table someone reads weeks later.
    from benchmarks import scoring_cost

    row = scoring_cost.measure(20, repeats=1)

    missing = [
        title
        for key, title in scoring_cost.COLUMNS
        if key != "score_default" and row.get(key) is None
    ]
    assert missing == []


def test_the_time_to_result_benchmark_times_steps_that_exist() -> None:
    # A step renamed by refactoring is silently not timed (its column reads n/a).
    from benchmarks import time_to_result

    missing = []
    for module_name, class_name, attribute, _, _ in time_to_result._TIMED:
        owner = importlib.import_module(module_name)
        if class_name is not None:
            owner = getattr(owner, class_name, None)
        found = vars(owner).get(attribute) if owner is not None else None
        if not callable(found):
            missing.append(f"{module_name}.{class_name or ''}.{attribute}")
    assert missing == []


def test_the_time_to_result_benchmark_leaves_the_worker_processes_computations_picklable() -> None:
    # From 200 essays scoring and pairing run in a worker process, which takes them by
    # reference: a timing wrapper in their place failed every 500-essay start with a
    # PicklingError, and the benchmark's 500-essay rows timed out.
    import pickle
    from functools import partial

    from benchmarks import time_to_result
    from cj_assessment import workflow_orchestrator

    with time_to_result.timed_internals([]):
        scoring = workflow_orchestrator.score_judgements
        pairing = workflow_orchestrator.generate_pairs
        for compute in (scoring, pairing):
            pickle.dumps(partial(compute, ["e1", "e2"]))


async def test_the_time_to_result_benchmark_names_computations_by_the_orchestrators_step() -> None:
    from benchmarks import time_to_result
    from cj_assessment.batch_processor import BatchProcessor
    from cj_assessment.metrics import Metrics
    from cj_assessment.settings import Settings
    from cj_assessment.workflow_orchestrator import WorkflowOrchestrator

    settings, metrics = Settings(), Metrics()
    orchestrator = WorkflowOrchestrator(settings, BatchProcessor(settings, metrics), metrics)
    spans: list[time_to_result.Span] = []
    with time_to_result.timed_internals(spans):
        await orchestrator._computed(None, 10, lambda: 1, step="scoring")  # type: ignore[arg-type]
        await orchestrator._computed(None, 10, lambda: 2, step="pairing")  # type: ignore[arg-type]
    assert [span.name for span in spans] == ["bt", "pairs"]
