"""Benchmark: random against adaptive pairing, calibrated reliability, position bias.

Pure core only (``pair_generation`` and ``scoring_ranking``), no broker or database:

    .venv/bin/python -m benchmarks.pairing            # 20 seeds, a few minutes on 2 cores
    .venv/bin/python -m benchmarks.pairing --quick    # 5 seeds

Protocol (issue 6). The simulated judge: true abilities θ ~ N(0, 1.5²), P(Essay A wins) =
sigmoid(θ_A − θ_B + 0.3) (a first-position bias of 0.3 logits), and 2% of answers a coin
toss. For 30, 100 and 300 essays and each seed, an assessment runs in iterations of one
matching each (every essay compared once per iteration), scoring after every iteration as
the service does; adaptive pairing takes its estimates from the previous iteration's scores,
and its first iteration is random. Both strategies see the same essays (same θ) per seed.

Reported per size: the median number of comparisons per essay needed to first reach a
Spearman correlation of 0.90 and 0.95 with the truth; at budgets of 5, 10, … comparisons per
essay, the true squared (Pearson) correlation of the scores with θ, the reported calibrated
reliability with its median signed and absolute error, the raw SSR and its error for
contrast, and the median estimated position bias (logit) against the true 0.3. The "scatter
of true ρ²" column, the median distance of a run's true ρ² from the median, is the floor
any reliability estimate faces: a run's own ρ² varies that much around what its data can
reveal. The "with τ² known" column scores the same judgements with the abilities' true
prior variance (1.5²) given instead of estimated: no estimator that has to learn the spread
from the judgements can be expected to do better.

A third table shows what limits adaptive pairing, for the essays within one standard
deviation of the mean (where most rank swaps happen): the judge's outcome uncertainty
p(1 − p), at the true abilities, of their comparison in the iteration, against a reference:
the same for the partner whose estimate (as the pairing saw it) is nearest to their own,
ignoring every constraint of a matching. Random pairing gets about 0.17 there, a true equal
would give 0.25; a pairing rule that chooses from the estimates can hardly expect more than
the nearest estimate gives. Then one PASS/FAIL line per
target of the issue.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import expit
from scipy.stats import spearmanr

from cj_assessment.pair_generation import (
    AbilityEstimates,
    PairingHistory,
    PairingStrategy,
    generate_pairs,
)
from cj_assessment.scoring_ranking import score_judgements

ABILITY_SD = 1.5
POSITION_BIAS = 0.3
RANDOM_ANSWER_SHARE = 0.02
SIZES = (30, 100, 300)
SEEDS = 20
QUICK_SEEDS = 5
BUDGETS = (5, 10, 15, 20, 25, 30)
MAX_COMPARISONS_PER_ESSAY = 60
ACCURACY_LEVELS = (0.90, 0.95)

TARGET_REDUCTION = 0.20  # adaptive vs random, comparisons to reach Spearman 0.90
TARGET_REDUCTION_SIZES = (100, 300)
TARGET_RELIABILITY_ERROR = 0.05  # median |reported − true ρ²| at every budget ≥ 5
TARGET_BIAS_ERROR = 0.10  # median estimated position bias within 0.3 ± 0.1


@dataclass(frozen=True)
class Step:
    """The state of one simulated assessment after one iteration."""

    comparisons_per_essay: float
    spearman: float
    true_r2: float
    reliability: float | None
    ssr: float | None
    position_bias: float
    a_win_share: float
    known_prior_reliability: float | None  # computed at the reported budgets only
    middle_uncertainty: float  # p(1 − p) of the comparisons of essays within 1 SD of the mean
    middle_reference: float  # the same against the partner of nearest estimate


def outcome_uncertainty(difference: np.ndarray) -> np.ndarray:
    """The judge's p(1 − p) for essays this far apart, averaged over the two orientations."""
    return 0.5 * sum(
        expit(difference + bias) * (1.0 - expit(difference + bias))
        for bias in (POSITION_BIAS, -POSITION_BIAS)
    )


def answers(
    pairs: Sequence[tuple[str, str]],
    index: dict[str, int],
    theta: np.ndarray,
    rng: np.random.Generator,
    *,
    bias: float = POSITION_BIAS,
    random_share: float = RANDOM_ANSWER_SHARE,
) -> list[tuple[str, str, bool]]:
    """The simulated judge's (essay A, essay B, A won) for ordered pairs: P(A wins) =
    sigmoid(θ_A − θ_B + bias), and a coin toss instead for a ``random_share`` of answers."""
    a = np.array([index[essay_a] for essay_a, _ in pairs])
    b = np.array([index[essay_b] for _, essay_b in pairs])
    a_wins = rng.random(a.size) < expit(theta[a] - theta[b] + bias)
    coin = rng.random(a.size) < random_share
    a_wins = np.where(coin, rng.random(a.size) < 0.5, a_wins)
    return [
        (essay_a, essay_b, bool(won))
        for (essay_a, essay_b), won in zip(pairs, a_wins.tolist(), strict=True)
    ]


def nearest_estimate_uncertainty(
    theta: np.ndarray, estimated: np.ndarray, essays: np.ndarray
) -> float:
    """Mean p(1 − p) of ``essays`` against the essay whose estimate is nearest to theirs."""
    order = np.argsort(estimated, kind="stable")
    position = np.empty_like(order)
    position[order] = np.arange(order.size)
    sorted_estimates = estimated[order]
    values = []
    for essay in essays:
        k = position[essay]
        neighbours = [j for j in (k - 1, k + 1) if 0 <= j < order.size]
        nearest = min(neighbours, key=lambda j: abs(sorted_estimates[j] - sorted_estimates[k]))
        values.append(outcome_uncertainty(theta[essay] - theta[order[nearest]]))
    return float(np.mean(values))


def simulate(n: int, seed: int, strategy: PairingStrategy) -> list[Step]:
    """One assessment: iterations of one matching until both Spearman 0.95 is reached and
    the largest reported budget is passed (or the cap)."""
    truth_rng = np.random.default_rng([seed, n])
    theta = truth_rng.normal(0.0, ABILITY_SD, n)
    judge_rng = np.random.default_rng([seed, n, 1, list(PairingStrategy).index(strategy)])
    ids = [f"essay-{k:03d}" for k in range(n)]
    index = {essay_id: k for k, essay_id in enumerate(ids)}
    planned: list[tuple[str, str]] = []
    judgements: list[tuple[str, str, bool]] = []
    estimates: AbilityEstimates | None = None
    steps: list[Step] = []
    middle = np.abs(theta) < ABILITY_SD
    for iteration in range(1, MAX_COMPARISONS_PER_ESSAY + 1):
        reference = (
            nearest_estimate_uncertainty(
                theta,
                np.array([estimates.scores[essay_id] for essay_id in ids]),
                np.flatnonzero(middle),
            )
            if estimates is not None
            else float("nan")
        )
        pairs = generate_pairs(
            ids,
            PairingHistory.from_pairs(planned),
            np.random.default_rng([seed, n, 2, iteration]),
            matchings=1,
            max_pairs=n // 2,
            strategy=strategy,
            estimates=estimates,
        )
        planned += pairs
        a = np.array([index[essay_a] for essay_a, _ in pairs])
        b = np.array([index[essay_b] for _, essay_b in pairs])
        p_a = expit(theta[a] - theta[b] + POSITION_BIAS)
        essay_uncertainty = np.full(n, np.nan)
        essay_uncertainty[a] = essay_uncertainty[b] = p_a * (1.0 - p_a)
        judgements += answers(pairs, index, theta, judge_rng)
        result = score_judgements(ids, judgements)
        estimates = AbilityEstimates(result.scores(), result.standard_errors())
        scores = result.scores()
        estimated = np.array([scores[essay_id] for essay_id in ids])
        bias = result.position_bias
        assert bias is not None
        comparisons_per_essay = 2 * len(judgements) / n
        known = (
            score_judgements(ids, judgements, prior_variance=ABILITY_SD**2).reliability
            if any(np.isclose(comparisons_per_essay, budget) for budget in BUDGETS)
            else None
        )
        steps.append(
            Step(
                comparisons_per_essay=comparisons_per_essay,
                spearman=float(spearmanr(estimated, theta).statistic),
                true_r2=float(np.corrcoef(estimated, theta)[0, 1] ** 2),
                reliability=result.reliability,
                ssr=result.scale_separation_reliability,
                position_bias=bias.logit,
                a_win_share=bias.a_win_share,
                known_prior_reliability=known,
                middle_uncertainty=float(np.nanmean(essay_uncertainty[middle])),
                middle_reference=reference,
            )
        )
        reached = steps[-1].spearman >= max(ACCURACY_LEVELS)
        if reached and steps[-1].comparisons_per_essay >= max(BUDGETS):
            break
    return steps


def _run(job: tuple[int, int, str]) -> tuple[int, int, str, list[Step]]:
    n, seed, strategy = job
    return n, seed, strategy, simulate(n, seed, PairingStrategy(strategy))


def first_reaching(steps: Sequence[Step], level: float) -> float:
    return next((s.comparisons_per_essay for s in steps if s.spearman >= level), np.inf)


def at_budget(steps: Sequence[Step], budget: int) -> Step | None:
    return next((s for s in steps if s.comparisons_per_essay >= budget), None)


def _median(values: Sequence[float]) -> float:
    return float(np.median(values)) if len(values) else float("nan")


def _fmt_budget(value: float) -> str:
    return f">{MAX_COMPARISONS_PER_ESSAY}" if not np.isfinite(value) else f"{value:.1f}"


@dataclass
class SizeReport:
    reduction: float
    worst_reliability_error: dict[str, float]  # over budgets, of the median abs error
    position_bias: dict[str, float]  # median over runs and budgets


def report_size(n: int, runs: dict[str, list[list[Step]]]) -> SizeReport:
    print(f"\n## {n} essays ({len(runs['random'])} seeds)\n")
    print("| strategy | comparisons/essay to Spearman ≥ 0.90 | to ≥ 0.95 |")
    print("|---|---|---|")
    needed: dict[str, dict[float, float]] = {}
    for strategy, all_steps in runs.items():
        needed[strategy] = {
            level: _median([first_reaching(steps, level) for steps in all_steps])
            for level in ACCURACY_LEVELS
        }
        print(
            f"| {strategy} | {_fmt_budget(needed[strategy][0.90])} |"
            f" {_fmt_budget(needed[strategy][0.95])} |"
        )
    reductions = {
        level: 1.0 - needed["adaptive"][level] / needed["random"][level]
        if np.isfinite(needed["random"][level]) and np.isfinite(needed["adaptive"][level])
        else float("nan")
        for level in ACCURACY_LEVELS
    }
    print(
        f"| reduction (adaptive vs random) | {reductions[0.90]:.0%} | {reductions[0.95]:.0%} |"
        if np.isfinite(reductions[0.95])
        else f"| reduction (adaptive vs random) | {reductions[0.90]:.0%} | n/a |"
    )

    print(
        "\n| strategy | comparisons/essay | true ρ² | scatter of true ρ² | reliability"
        " | median error | median abs error | with τ² known: median abs error"
        " | SSR | SSR median abs error | position bias (logit) | Essay A win share |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    worst_reliability: dict[str, float] = {}
    pooled_bias: dict[str, float] = {}
    for strategy, all_steps in runs.items():
        worst_reliability[strategy] = 0.0
        biases: list[float] = []
        for budget in BUDGETS:
            points = [s for s in (at_budget(steps, budget) for steps in all_steps) if s]
            points = [s for s in points if s.reliability is not None and s.ssr is not None]
            if not points:
                continue
            truth = [s.true_r2 for s in points]
            errors = [s.reliability - s.true_r2 for s in points]  # type: ignore[operator]
            ssr_errors = [s.ssr - s.true_r2 for s in points]  # type: ignore[operator]
            known_errors = [
                abs(s.known_prior_reliability - s.true_r2)
                for s in points
                if s.known_prior_reliability is not None
            ]
            reliability_error = _median([abs(e) for e in errors])
            worst_reliability[strategy] = max(worst_reliability[strategy], reliability_error)
            biases += [s.position_bias for s in points]
            print(
                f"| {strategy} | {budget} | {_median(truth):.3f}"
                f" | {_median([abs(t - _median(truth)) for t in truth]):.3f}"
                f" | {_median([s.reliability for s in points]):.3f}"  # type: ignore[misc]
                f" | {_median(errors):+.3f} | {reliability_error:.3f}"
                f" | {_median(known_errors):.3f}"
                f" | {_median([s.ssr for s in points]):.3f}"  # type: ignore[misc]
                f" | {_median([abs(e) for e in ssr_errors]):.3f}"
                f" | {_median([s.position_bias for s in points]):.3f}"
                f" | {_median([s.a_win_share for s in points]):.3f} |"
            )
        pooled_bias[strategy] = _median(biases)

    print(
        "\n| strategy | comparisons/essay | p(1 − p) of essays within 1 SD"
        " | against the nearest estimate |"
    )
    print("|---|---|---|---|")
    for strategy, all_steps in runs.items():
        for budget in (3, *BUDGETS):
            points = [s for s in (at_budget(steps, budget) for steps in all_steps) if s]
            if points:
                print(
                    f"| {strategy} | {budget}"
                    f" | {_median([s.middle_uncertainty for s in points]):.3f}"
                    f" | {_median([s.middle_reference for s in points]):.3f} |"
                )
    return SizeReport(reductions[0.90], worst_reliability, pooled_bias)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SEEDS} seeds per size")
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds per size ({SEEDS})")
    parser.add_argument(
        "--sizes", default=",".join(map(str, SIZES)), help="comma-separated essay counts"
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes (default: cores)"
    )
    args = parser.parse_args(argv)
    seeds = args.seeds or (QUICK_SEEDS if args.quick else SEEDS)
    sizes = [int(size) for size in args.sizes.split(",")]
    strategies = [strategy.value for strategy in PairingStrategy]

    print("# Pairing benchmark (issue 6)")
    print(
        f"\njudge: θ ~ N(0, {ABILITY_SD}²), P(A wins) = sigmoid(θ_A − θ_B + {POSITION_BIAS}),"
        f" {RANDOM_ANSWER_SHARE:.0%} random answers; one matching per iteration;"
        f" {seeds} seeds; machine: {os.cpu_count()} cores, {platform.machine()},"
        f" Python {platform.python_version()}"
    )
    started = time.monotonic()
    jobs = [(n, seed, strategy) for n in sizes for seed in range(seeds) for strategy in strategies]
    # Largest first so the slow runs do not end up alone at the tail; one BLAS thread per
    # worker process so the workers do not fight over the cores.
    jobs.sort(key=lambda job: -job[0])
    os.environ.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    results: dict[int, dict[str, list[list[Step]]]] = {
        n: {strategy: [] for strategy in strategies} for n in sizes
    }
    context = multiprocessing.get_context("spawn")
    with context.Pool(max(1, args.workers)) as pool:
        for n, _seed, strategy, steps in pool.imap_unordered(_run, jobs):
            results[n][strategy].append(steps)
    reports = {n: report_size(n, results[n]) for n in sizes}

    print("\n## Targets\n")
    passed = True
    for n in TARGET_REDUCTION_SIZES:
        if n in reports:
            reduction = reports[n].reduction
            ok = bool(np.isfinite(reduction) and reduction >= TARGET_REDUCTION)
            passed &= ok
            print(
                f"{_verdict(ok)}: {n} essays: adaptive needs {reduction:.0%} fewer comparisons"
                f" than random to reach Spearman 0.90 (target ≥ {TARGET_REDUCTION:.0%})"
            )
    for n, report in reports.items():
        for strategy in strategies:
            error = report.worst_reliability_error[strategy]
            ok = error <= TARGET_RELIABILITY_ERROR
            passed &= ok
            print(
                f"{_verdict(ok)}: {n} essays, {strategy}: median |reliability − true ρ²| is at"
                f" most {error:.3f} at every budget from 5 (target ≤ {TARGET_RELIABILITY_ERROR})"
            )
    for n, report in reports.items():
        for strategy in strategies:
            estimate = report.position_bias[strategy]
            ok = abs(estimate - POSITION_BIAS) <= TARGET_BIAS_ERROR
            passed &= ok
            print(
                f"{_verdict(ok)}: {n} essays, {strategy}: median estimated position bias"
                f" {estimate:.3f} (over runs and budgets from 5; target {POSITION_BIAS}"
                f" ± {TARGET_BIAS_ERROR})"
            )
    print(f"\n{seeds} seeds, {time.monotonic() - started:.0f} s")
    return 0 if passed else 1


def run(quick: bool = False) -> str:
    """The runner's entry (`python -m benchmarks pairing`): the same report as `main`,
    returned as text. The report is printed as it is built, so it is captured here."""
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        main(["--quick"] if quick else [])
    return captured.getvalue()


if __name__ == "__main__":
    sys.exit(main())
