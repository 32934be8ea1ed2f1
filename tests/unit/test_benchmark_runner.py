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
