"""What the pure-core simulation benchmarks share: assessments iterated as the service
iterates them, their runs spread over every core with one BLAS thread each (as `serve`
runs), and their command line (`--quick`, `--workers`)."""

from __future__ import annotations

import argparse
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from cj_assessment.pair_generation import (
    AbilityEstimates,
    PairingHistory,
    PairingStrategy,
    generate_pairs,
)
from cj_assessment.scoring_ranking import ScoringResult, score_judgements
from cj_assessment.settings import Settings


def on_every_core(
    function: Callable[[Any], Any], jobs: Iterable[Any], workers: int | None, chunksize: int = 1
) -> Iterator[Any]:
    """`function(job)` for every job, in processes of their own, in completion order."""
    os.environ.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    context = multiprocessing.get_context("spawn")
    with context.Pool(max(1, workers or os.cpu_count() or 1)) as pool:
        yield from pool.imap_unordered(function, jobs, chunksize=chunksize)


def command_line(
    run: Callable[..., str], description: str, quick: str, argv: Sequence[str] | None
) -> int:
    """Parse `--quick` (described by `quick`) and `--workers`, run, print the table."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: cores)")
    args = parser.parse_args(argv)
    print(run(quick=args.quick, workers=args.workers))
    return 0


MATCHINGS = int(Settings.model_fields["matchings_per_iteration"].default)

Pair = tuple[str, str]
Judgement = tuple[str, str, bool]


def service_iterations(
    ids: list[str],
    seed: int,
    strategy: PairingStrategy,
    iterations: int,
    judge: Callable[[list[Pair]], list[Judgement]],
) -> Iterator[tuple[list[Judgement], ScoringResult]]:
    """Iterations as the service runs them: `MATCHINGS` rounds planned from the last scores
    (the first at random), answered by `judge`, and every judgement so far scored. Yields
    the judgements so far and their scoring after each iteration."""
    planned: list[Pair] = []
    judgements: list[Judgement] = []
    estimates: AbilityEstimates | None = None
    for iteration in range(1, iterations + 1):
        pairs = generate_pairs(
            ids,
            PairingHistory.from_pairs(planned),
            np.random.default_rng([seed, iteration]),
            matchings=MATCHINGS,
            max_pairs=MATCHINGS * (len(ids) // 2),
            strategy=strategy,
            estimates=estimates,
        )
        planned += pairs
        judgements += judge(pairs)
        result = score_judgements(ids, judgements)
        estimates = AbilityEstimates(result.scores(), result.standard_errors())
        yield judgements, result
