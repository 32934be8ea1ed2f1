"""Benchmark: random against adaptive pairing as the service runs them, head to head.

Pure core only (``pair_generation`` and ``scoring_ranking``), no broker or database:

    .venv/bin/python -m benchmarks.pairing_service            # about a minute on 2 cores
    .venv/bin/python -m benchmarks.pairing_service --quick    # a fifth of the seeds

`benchmarks/pairing.py` measures the issue's protocol: one matching per iteration, scored
after each. The service plans `matchings_per_iteration` rounds (default 5) per iteration from
one set of estimates, so its first iteration is all random and adaptivity acts less often.
This benchmark asks the question a black-box check asks: at the budget the service spends,
does adaptive pairing rank at least as well as random pairing would have?

Per size, judge and seed, both strategies get the same essays (same true abilities) and the
same judge's random stream; each runs 4 iterations of the service's default rounds and is
scored after each like in the service. Reported: the mean Spearman correlation with the truth
at 10, 15 and 20 comparisons per essay for each strategy, and the mean of the paired
difference (adaptive − random) with its standard error. Many seeds are needed: single runs
of 24 essays scatter by about 0.1, so 60 seeds still leave differences of ±0.03 to chance.

Judges: "protocol" is issue 6's (θ ~ N(0, 1.5²), first-position bias 0.3, 2% random
answers); "noisy" is a much weaker one (θ ~ N(0, 0.8²), bias 0.6, 10% random answers).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import numpy as np
from scipy.stats import spearmanr

from benchmarks.pairing import answers
from benchmarks.simulation import MATCHINGS, command_line, on_every_core, service_iterations
from cj_assessment.pair_generation import (
    PairingStrategy,
)

JUDGES = {"protocol": (1.5, 0.3, 0.02), "noisy": (0.8, 0.6, 0.10)}  # ability SD, bias, random
SEEDS = {24: 300, 50: 300, 100: 150}
QUICK_FRACTION = 5
ITERATIONS = 4
BUDGETS = (10, 15, 20)


def simulate(n: int, seed: int, judge: str, strategy: PairingStrategy) -> dict[int, float]:
    """Spearman correlation with the truth after each iteration, by comparisons per essay."""
    ability_sd, bias, random_share = JUDGES[judge]
    theta = np.random.default_rng([seed, n, 99]).normal(0.0, ability_sd, n)
    judge_rng = np.random.default_rng([seed, n, 1])
    ids = [f"essay-{k:03d}" for k in range(n)]
    index = {essay_id: k for k, essay_id in enumerate(ids)}
    spearman: dict[int, float] = {}

    def judge_pairs(pairs: list[tuple[str, str]]) -> list[tuple[str, str, bool]]:
        return answers(pairs, index, theta, judge_rng, bias=bias, random_share=random_share)

    for judgements, result in service_iterations(ids, seed, strategy, ITERATIONS, judge_pairs):
        scores = result.scores()
        estimated = [scores[essay_id] for essay_id in ids]
        spearman[round(2 * len(judgements) / n)] = float(spearmanr(estimated, theta).statistic)
    return spearman


def _run(job: tuple[int, int, str, str]) -> tuple[int, int, str, str, dict[int, float]]:
    n, seed, judge, strategy = job
    return n, seed, judge, strategy, simulate(n, seed, judge, PairingStrategy(strategy))


def run(quick: bool = False, workers: int | None = None) -> str:
    seeds = {n: max(10, s // QUICK_FRACTION) if quick else s for n, s in SEEDS.items()}
    jobs = [
        (n, seed, judge, strategy.value)
        for n in SEEDS
        for judge in JUDGES
        for seed in range(seeds[n])
        for strategy in PairingStrategy
    ]
    jobs.sort(key=lambda job: -job[0])
    started = time.monotonic()
    runs: dict[tuple[int, str, str], dict[int, dict[int, float]]] = {}
    for n, seed, judge, strategy, spearman in on_every_core(_run, jobs, workers):
        runs.setdefault((n, judge, strategy), {})[seed] = spearman

    lines = [
        f"Random against adaptive pairing as the service runs them ({MATCHINGS} rounds per"
        f" iteration, {ITERATIONS} iterations; mean Spearman with the truth)",
        "",
        "| essays | judge | seeds | comparisons/essay | random | adaptive | adaptive − random |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in SEEDS:
        for judge in JUDGES:
            random_runs = runs[(n, judge, PairingStrategy.RANDOM.value)]
            adaptive_runs = runs[(n, judge, PairingStrategy.ADAPTIVE.value)]
            for budget in BUDGETS:
                paired = [(random_runs[s][budget], adaptive_runs[s][budget]) for s in random_runs]
                random_values, adaptive_values = (np.array(v) for v in zip(*paired, strict=True))
                difference = adaptive_values - random_values
                error = difference.std(ddof=1) / np.sqrt(difference.size)
                lines.append(
                    f"| {n} | {judge} | {difference.size} | {budget} |"
                    f" {random_values.mean():.3f} | {adaptive_values.mean():.3f} |"
                    f" {difference.mean():+.4f} ± {error:.4f} |"
                )
    lines.append("")
    lines.append(f"{time.monotonic() - started:.0f} s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return command_line(run, __doc__.splitlines()[0], "a fifth of the seeds", argv)


if __name__ == "__main__":
    sys.exit(main())
