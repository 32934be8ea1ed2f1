"""Benchmark: stopping on a reliability target, on the estimate against on its lower bound.

Pure core only (``pair_generation`` and ``scoring_ranking``), no broker or database:

    .venv/bin/python -m benchmarks.reliability_stop            # about 20 s on 2 cores
    .venv/bin/python -m benchmarks.reliability_stop --quick    # a quarter of the seeds

With ``CJ_TARGET_RELIABILITY`` set, an assessment completes at the first iteration (from
``CJ_MIN_ITERATIONS_FOR_STABILITY``) whose reliability reaches the target. Stopping at the
first estimate that reaches a threshold selects the runs whose estimate is too high, so the
runs that stop early overstate their reliability more than the estimate does on average.
The service therefore stops on ``reliability_lower_bound``: the calibrated reliability
recomputed at the lower end of a one-sided 95% interval for the spread of the abilities τ².

Per judge, size and seed, one run of adaptive pairing as the service plans it (5 rounds per
iteration, scored after each) records the reliability, its lower bound and the true squared
correlation of the scores with the abilities at every iteration. Both stopping rules are then
applied to the same runs. The baseline rule is the point estimate. Reported per target: the
mean comparisons per essay spent (a run that never reaches the target counts with the most
it may spend), the share of the runs that stopped on the target with a true ρ² below it and
below it by more than 0.05, their mean overstatement (reported − true), and the share that
never reached the target.

Judges: "protocol" is issue 6's (θ ~ N(0, 1.5²), logistic, first-position bias 0.3, 2% random
answers). "probit" is unlike it: a probit link, a bimodal and skewed spread of abilities, a
bias towards Essay B, 5% random answers and 5% of essays judged with three times the noise.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import numpy as np
from scipy.stats import norm

from benchmarks.simulation import MATCHINGS, command_line, on_every_core, service_iterations
from cj_assessment.pair_generation import (
    PairingStrategy,
)
from cj_assessment.settings import Settings

SIZES = (30, 100)
JUDGES = ("protocol", "probit")
SEEDS = 60
QUICK_FRACTION = 4
ITERATIONS = 8
TARGETS = (0.7, 0.8, 0.9)
FIRST_STOP = int(Settings.model_fields["min_iterations_for_stability"].default)

# (iteration, reliability, lower bound, true squared correlation)
Trace = list[tuple[int, float, float, float]]


def _abilities(judge: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if judge == "protocol":
        return rng.normal(0.0, 1.5, n), np.ones(n)
    upper = rng.random(n) < 0.3
    theta = 0.9 * np.where(upper, rng.normal(2.0, 0.5, n), rng.normal(0.0, 0.7, n))
    noise = np.where(rng.random(n) < 0.05, 3.0, 1.0)
    return theta, noise


def _a_wins(
    judge: str, a: int, b: int, theta: np.ndarray, noise: np.ndarray, rng: np.random.Generator
) -> bool:
    if judge == "protocol":
        if rng.random() < 0.02:
            return bool(rng.random() < 0.5)
        return bool(rng.random() < 1.0 / (1.0 + np.exp(-(theta[a] - theta[b] + 0.3))))
    if rng.random() < 0.05:
        return bool(rng.random() < 0.5)
    spread = np.sqrt((noise[a] ** 2 + noise[b] ** 2) / 2.0)
    return bool(rng.random() < norm.cdf((theta[a] - theta[b] - 0.25) / spread))


def simulate(job: tuple[str, int, int]) -> tuple[str, int, int, Trace]:
    judge, n, seed = job
    theta, noise = _abilities(judge, n, np.random.default_rng([seed, n, 7]))
    judge_rng = np.random.default_rng([seed, n, 1])
    ids = [f"essay-{k:03d}" for k in range(n)]
    index = {essay_id: k for k, essay_id in enumerate(ids)}
    trace: Trace = []

    def judge_pairs(pairs: list[tuple[str, str]]) -> list[tuple[str, str, bool]]:
        return [
            (a, b, _a_wins(judge, index[a], index[b], theta, noise, judge_rng)) for a, b in pairs
        ]

    runs = service_iterations(ids, seed, PairingStrategy.ADAPTIVE, ITERATIONS, judge_pairs)
    for iteration, (_, result) in enumerate(runs, start=1):
        scores = result.scores()
        estimated = np.array([scores[essay_id] for essay_id in ids])
        true = float(np.corrcoef(estimated, theta)[0, 1] ** 2)
        trace.append(
            (iteration, result.reliability or 0.0, result.reliability_lower_bound or 0.0, true)
        )
    return judge, n, seed, trace


def _stop(trace: Trace, target: float, use_bound: bool) -> tuple[int, float, float, bool]:
    """(iteration, reported reliability, true ρ², whether the target stopped it) where the
    rule stops; the last iteration if it never does."""
    for iteration, reliability, bound, true in trace:
        if iteration >= FIRST_STOP and (bound if use_bound else reliability) >= target:
            return iteration, reliability, true, True
    iteration, reliability, _, true = trace[-1]
    return iteration, reliability, true, False


def run(quick: bool = False, workers: int | None = None) -> str:
    seeds = SEEDS // QUICK_FRACTION if quick else SEEDS
    jobs = [(judge, n, seed) for n in SIZES for judge in JUDGES for seed in range(seeds)]
    started = time.monotonic()
    traces: dict[tuple[str, int], list[Trace]] = {}
    for judge, n, _, trace in on_every_core(simulate, jobs, workers, chunksize=4):
        traces.setdefault((judge, n), []).append(trace)

    per_iteration = MATCHINGS  # each round gives every essay one comparison (n even)
    lines = [
        "Stopping on a reliability target: the point estimate (baseline) against its lower"
        f" bound (adaptive pairing, {MATCHINGS} rounds per iteration, stops from iteration"
        f" {FIRST_STOP}, at most {ITERATIONS} iterations)",
        "",
        "| judge | essays | seeds | target | rule | comparisons/essay | true ρ² < target"
        " | true ρ² < target − 0.05 | reported − true at the stop | never reached |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in SIZES:
        for judge in JUDGES:
            runs = traces[(judge, n)]
            for target in TARGETS:
                for use_bound in (False, True):
                    stops = [_stop(trace, target, use_bound) for trace in runs]
                    iterations, reported, true, reached = (
                        np.array(c) for c in zip(*stops, strict=True)
                    )
                    below = true[reached] < target
                    far_below = true[reached] < target - 0.05
                    lines.append(
                        f"| {judge} | {n} | {len(runs)} | {target:.1f} |"
                        f" {'lower bound' if use_bound else 'estimate'} |"
                        f" {per_iteration * iterations.mean():.1f} |"
                        f" {below.mean() if below.size else 0.0:.0%} |"
                        f" {far_below.mean() if far_below.size else 0.0:.0%} |"
                        f" {np.mean((reported - true)[reached]) if reached.any() else 0.0:+.3f} |"
                        f" {np.mean(~reached):.0%} |"
                    )
    lines += ["", f"{time.monotonic() - started:.0f} s"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return command_line(run, __doc__.splitlines()[0], "a quarter of the seeds", argv)


if __name__ == "__main__":
    sys.exit(main())
