"""Benchmark 4 of issue 5: scoring and pairing cost per iteration, 20 / 100 / 500 / 2,000 essays.

What the orchestrator computes (in-process, no I/O) when an iteration closes:
`score_judgements` over every successful comparison so far (Bradley–Terry with the judge's
position bias, standard errors, calibrated reliability and SSR), `PairingHistory.from_pairs`
once, `covers_all_pairs` and adaptive `generate_pairs` for the next iteration (5 matchings).
`score_comparisons` (the plain Bradley–Terry MAP fit) is broken down into fit, standard errors
and the rest for comparison.

Data: essays with N(0, 1) abilities, pairs planned by `generate_pairs` itself (so the history
is the service's own), judgements drawn from the Bradley–Terry model with a small first-position
advantage (0.2 logits). Scoring sees the final iteration of the default budget: 10 x essays
comparisons (each essay in about 20). Pairing plans iteration 4 of 4 with the 3 earlier
iterations (7.5 x essays pairs) as history. Figures are medians of several repeats after one
untimed warm-up call; the first call in a process also pays BLAS/LAPACK start-up.
"""

from __future__ import annotations

import inspect
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.blas import describe, limited_blas_threads
from cj_assessment import pair_generation, scoring_ranking

SIZES = (20, 100, 500, 2000)
COMPARISONS_PER_ESSAY = 10  # the service's budget: comparisons = this x essays
MATCHINGS = 5
POSITION_BIAS = 0.2
CELL_BUDGET_S = 8.0  # stop repeating a measurement once this much time went into it


def _timed(fn: Callable[[], Any], repeats: int, budget_s: float | None = None) -> float | None:
    """Median wall milliseconds of up to `repeats` calls after one warm-up, stopping early once
    `budget_s` is spent (at least one timed call); None if the call raises."""
    budget_s = CELL_BUDGET_S if budget_s is None else budget_s
    try:
        started = time.perf_counter()
        fn()
        first = time.perf_counter() - started
    except Exception as exc:  # noqa: BLE001 - an internal that changed shape is reported n/a
        print(f"    skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    if first > budget_s:
        return first * 1000  # too slow to repeat: the warm-up call is the measurement
    samples: list[float] = []
    spent = 0.0
    while len(samples) < repeats and (not samples or spent < budget_s):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
        spent += samples[-1] / 1000
    return statistics.median(samples)


def _history(ids: list[str], iterations: int) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    per_iteration = MATCHINGS * (len(ids) // 2)
    for iteration in range(1, iterations + 1):
        history = pair_generation.PairingHistory.from_pairs(pairs)
        pairs += pair_generation.generate_pairs(
            ids,
            history,
            np.random.default_rng([1, iteration]),
            matchings=MATCHINGS,
            max_pairs=per_iteration,
        )
    return pairs


def _judgements(
    pairs: list[tuple[str, str]], ability: dict[str, float], rng: np.random.Generator
) -> list[tuple[str, str, bool]]:
    out = []
    for a, b in pairs:
        p = 1.0 / (1.0 + math.exp(-(ability[a] - ability[b] + POSITION_BIAS)))
        out.append((a, b, bool(rng.random() < p)))
    return out


def measure(n: int, repeats: int, *, only_score: bool = False) -> dict[str, float | None]:
    ids = [f"essay-{i:05d}" for i in range(n)]
    rng = np.random.default_rng(n)
    ability = dict(zip(ids, rng.normal(0.0, 1.0, n), strict=True))
    budget = COMPARISONS_PER_ESSAY * n
    per_iteration = MATCHINGS * (n // 2)
    iterations = max(1, budget // per_iteration)
    planned = _history(ids, iterations)[:budget]
    judgements = _judgements(planned, ability, rng)
    outcomes = [(a, b) if a_won else (b, a) for a, b, a_won in judgements]
    before_last = planned[: per_iteration * (iterations - 1)]
    history = pair_generation.PairingHistory.from_pairs(before_last)

    row: dict[str, float | None] = {"comparisons": float(len(outcomes))}
    row["score"] = _timed(lambda: scoring_ranking.score_comparisons(ids, outcomes), repeats)
    if only_score:
        return row
    if hasattr(scoring_ranking, "score_judgements"):
        row["judgements"] = _timed(
            lambda: scoring_ranking.score_judgements(ids, judgements), repeats
        )
    row.update(_components(ids, outcomes, repeats))
    parts = [row.get("score"), row.get("fit"), row.get("se")]
    row["rest"] = (
        None if any(p is None for p in parts) else max(0.0, parts[0] - parts[1] - parts[2])  # type: ignore[operator]
    )
    row["history"] = _timed(lambda: pair_generation.PairingHistory.from_pairs(planned), repeats)
    # The orchestrator asks whether the settled pairs cover every pair of essays.
    row["seen"] = _timed(lambda: pair_generation.covers_all_pairs(ids, planned), repeats)
    kwargs: dict[str, Any] = {"matchings": MATCHINGS, "max_pairs": per_iteration}
    if "estimates" in inspect.signature(pair_generation.generate_pairs).parameters:
        scored = scoring_ranking.score_judgements(ids, judgements)
        kwargs["estimates"] = pair_generation.AbilityEstimates(
            scored.scores(), scored.standard_errors()
        )
        kwargs["strategy"] = pair_generation.PairingStrategy.ADAPTIVE
    row["adaptive"] = 1.0 if "estimates" in kwargs else 0.0
    row["generate"] = _timed(
        lambda: pair_generation.generate_pairs(
            ids, history, np.random.default_rng([1, iterations]), **kwargs
        ),
        repeats,
    )
    parts = [row.get("judgements"), row.get("history"), row.get("seen"), row.get("generate")]
    row["total"] = None if any(p is None for p in parts) else sum(parts)  # type: ignore[misc]
    return row


def _components(
    ids: list[str], outcomes: list[tuple[str, str]], repeats: int
) -> dict[str, float | None]:
    """The Bradley-Terry fit and its standard errors alone, through the module's internals as
    `score_judgements` calls them for `score_comparisons`; n/a if those changed."""
    sr = scoring_ranking
    try:
        index = {e: i for i, e in enumerate(ids)}
        shown_a, shown_b, a_won = sr._encode_judgements(
            ((w, lo, True) for w, lo in outcomes), index
        )
        n = len(ids)
        ridge = 2.0 * sr.RAW_ALPHA
        edges = sr._aggregate_edges(shown_a, shown_b, a_won, n)
        raw = sr._fit(edges, n, ridge=ridge, fit_bias=False)
        sr._posterior(edges, raw, ridge=ridge, fit_bias=False)
    except Exception as exc:  # noqa: BLE001
        print(
            f"    scoring internals changed ({type(exc).__name__}: {exc}); fit/SE split n/a",
            file=sys.stderr,
        )
        return {"fit": None, "se": None}
    return {
        "fit": _timed(lambda: sr._fit(edges, n, ridge=ridge, fit_bias=False), repeats),
        "se": _timed(lambda: sr._posterior(edges, raw, ridge=ridge, fit_bias=False), repeats),
    }


COLUMNS = [
    ("score", "score_comparisons"),
    ("fit", "BT fit"),
    ("se", "SEs"),
    ("rest", "reliab.+rest"),
    ("judgements", "score_judgements"),
    ("history", "history"),
    ("generate", "generate_pairs"),
    ("seen", "covers_all_pairs"),
    ("total", "per iteration"),
    ("score_default", "score_comp. default BLAS"),
]
BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _cell(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _growth(a: float | None, b: float | None, factor: float) -> str:
    if a is None or b is None or a <= 0 or b <= 0:
        return "n/a"
    return f"x{b / a:.1f} (k={math.log(b / a) / math.log(factor):.2f})"


def report(rows: dict[int, dict[str, float | None]], repeats: int, limited: bool) -> str:
    adaptive = any(r.get("adaptive") for r in rows.values())
    blas = ", ".join(f"{k}={os.environ[k]}" for k in BLAS_ENV if k in os.environ)
    lines = [
        "Scoring and pairing cost per iteration (pure computation, no I/O), median ms of "
        f"{repeats} repeats (fewer at 2,000 essays,",
        f"or when one measurement took over {CELL_BUDGET_S:g} s).",
        f"Scoring: {COMPARISONS_PER_ESSAY} x essays comparisons (the default budget, the last "
        "iteration's scoring); judgements from Bradley-Terry with N(0,1) abilities.",
        f"Pairing: iteration 4 of 4, {MATCHINGS} matchings, 3 iterations of history"
        + (" (adaptive, from the scores)." if adaptive else "."),
        "All columns on ONE BLAS thread"
        + ("" if limited else " (NOT POSSIBLE here: process default)")
        + " (stable, algorithmic cost; `cj-assessment serve` pins one thread), except the last:",
        f"  score_comparisons with this process's default BLAS threads ({describe()}"
        + (f"; {blas}" if blas else "")
        + ").",
        "score_comparisons = plain Bradley-Terry: BT fit + SEs (the fit's posterior) + "
        "reliab.+rest (the calibrated",
        "  reliability, i.e. a second, Bayesian fit, and bookkeeping; = total - fit - SEs);",
        "score_judgements = what the orchestrator calls (with the judge's position bias); "
        "history = PairingHistory.from_pairs;",
        "  per iteration = score_judgements + history + covers_all_pairs + generate_pairs.",
        "",
        f"{'essays':>6} {'compars':>7} "
        + " ".join(f"{title:>{max(len(title), 8)}}" for _, title in COLUMNS),
    ]
    for n, row in rows.items():
        lines.append(
            f"{n:>6} {int(row['comparisons'] or 0):>7} "
            + " ".join(f"{_cell(row.get(key)):>{max(len(title), 8)}}" for key, title in COLUMNS)
        )
    lines += ["", "Growth (time ratio per step in essays; k: time ~ essays^k):"]
    sizes = list(rows)
    for small, large in zip(sizes, sizes[1:], strict=False):
        factor = large / small
        cells = [
            f"{title} {_growth(rows[small].get(key), rows[large].get(key), factor)}"
            for key, title in COLUMNS
        ]
        lines.append(f"  {small:>4} -> {large:<4} (x{factor:g} essays):")
        for i in range(0, len(cells), 4):
            lines.append("      " + "; ".join(cells[i : i + 4]))
    return "\n".join(lines)


def _repeats(n: int, quick: bool) -> int:
    repeats = 3 if quick else 7
    return repeats if n < 2000 else max(2, repeats // 2)


def run(quick: bool = False) -> str:
    global CELL_BUDGET_S
    CELL_BUDGET_S = 3.0 if quick else 8.0
    rows: dict[int, dict[str, float | None]] = {}
    limited_ok = True
    for n in SIZES:
        print(f"  scoring: {n} essays", file=sys.stderr, flush=True)
        with limited_blas_threads(1) as limited:
            limited_ok = limited_ok and limited
            rows[n] = measure(n, _repeats(n, quick))
        rows[n]["score_default"] = measure(n, _repeats(n, quick), only_score=True)["score"]
    return report(rows, 3 if quick else 7, limited_ok)


if __name__ == "__main__":
    print(run("--quick" in sys.argv))
